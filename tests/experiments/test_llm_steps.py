"""The LLM steps of the table drivers run as the drivers write them (CLI arguments included)."""

import os

from experiments.llactr import llm_steps
from recsys_llm.semantics.store import load_vectors
from tests.semantics.conftest import make_schema


def test_llactr_ssft_then_encode(tmp_path, capsys) -> None:
    schema = make_schema(str(tmp_path / "data"))
    schema_path = os.path.join(schema.root, "schema.json")
    vectors, metrics = llm_steps(schema_path, str(tmp_path / "work"), quick=True)
    stored = load_vectors(vectors, schema=schema)
    assert stored.keys == ["color", "city", "user_id", "price"] and os.path.exists(metrics)
    assert "+ssft:" in stored.provenance.model_id
