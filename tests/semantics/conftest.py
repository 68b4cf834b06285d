"""Tiny, randomly initialised Hugging Face models and a tiny schema, built on the fly (no download).

The schema has four described fields whose values share a field-specific token
(``shade N``, ``town N``, raw user ids, prices ``N.5``), so a model can learn to
tell the field of values it never saw, plus one undescribed field ``C1``.
"""

import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from tests.tiny_models import save_tiny_bert, save_tiny_llama


def make_schema(root: str, name: str = "tiny", descriptions: bool = True) -> DatasetSchema:
    """Writes value-text files and a train split under ``root``; returns the schema."""
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    n = 100
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"shade {i}" for i in range(n)]}),
                   os.path.join(root, "text", "color.parquet"))
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"town {i}" for i in range(n)]}),
                   os.path.join(root, "text", "city.parquet"))
    rows = 200
    pq.write_table(
        pa.table({
            "color": pa.array([i % n for i in range(rows)], pa.int64()),
            "city": pa.array([(3 * i) % n for i in range(rows)], pa.int64()),
            "user_id": pa.array([(7 * i) % 300 for i in range(rows)], pa.int64()),
            "C1": pa.array([i % 10 for i in range(rows)], pa.int64()),
            "price": pa.array([float(i % n) + 0.5 for i in range(rows)], pa.float32()),
            "label": pa.array([i % 2 for i in range(rows)], pa.int64()),
        }),
        os.path.join(root, "train.parquet"),
    )
    desc = (lambda text: text) if descriptions else (lambda text: "")
    schema = DatasetSchema(
        name=name,
        fields=[
            FieldSpec("color", "sparse", cardinality=n, description=desc("colour of the item"), value_text="text/color.parquet"),
            FieldSpec("city", "sparse", cardinality=n, description=desc("city of the user"), value_text="text/city.parquet"),
            FieldSpec("user_id", "sparse", cardinality=300, description=desc("user id")),
            FieldSpec("C1", "sparse", cardinality=10),
            FieldSpec("price", "dense", description=desc("price paid in dollars")),
        ],
        splits={"train": "train.parquet"},
        root=root,
    )
    schema.save(os.path.join(root, "schema.json"))
    return DatasetSchema.load(os.path.join(root, "schema.json"))


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    return save_tiny_llama(str(tmp_path_factory.mktemp("tiny_llama")))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    return save_tiny_bert(str(tmp_path_factory.mktemp("tiny_bert")))


@pytest.fixture()
def tiny_schema(tmp_path) -> DatasetSchema:
    return make_schema(str(tmp_path / "data"))
