"""An artifact names the LLM whose vectors its run learned from (trained_llm_provenance, from plugins.json)."""

import json
import os

from recsys_llm.train.run_records import trained_llm_provenance


def _run(tmp_path, plugins) -> str:
    checkpoint = tmp_path / "run" / "best" / "ckpt-00000010"
    checkpoint.mkdir(parents=True)
    if plugins is not None:
        (tmp_path / "run" / "plugins.json").write_text(json.dumps(plugins), encoding="utf-8")
    return str(checkpoint)


def test_llactr_field_vectors_name_their_model_and_file(tmp_path) -> None:
    llactr = {"model_id": "/models/new", "model_hash": "59eb89a7dfdd7524", "pooling": "mean", "template": "t",
              "max_length": 256, "vectors": "/runs/fields.safetensors", "extra": {"texts": ["a"]}, "config": {}}
    assert trained_llm_provenance(_run(tmp_path, {"llactr": llactr, "schema_fingerprint": "x"})) == {
        "llactr": {"model_id": "/models/new", "model_hash": "59eb89a7dfdd7524", "pooling": "mean", "template": "t",
                   "max_length": 256, "vectors": "/runs/fields.safetensors"}}


def test_elec_entity_exports_and_frozen_teacher_are_kept(tmp_path) -> None:
    entity = {"item_id": {"model": "models/bert", "revision": "59eb89a7dfdd7524", "weights_sha256": "2dc2"}}
    teacher = {"checkpoint": "/runs/gain/best/ckpt-10", "checkpoint_sha256": {"train_state.json": "ab"}}
    elec = {"task": "distill", "entity_vectors": entity, "frozen_teacher": teacher, "row_vectors": None}
    assert trained_llm_provenance(_run(tmp_path, {"elec": elec})) == {
        "elec": {"entity_vectors": entity, "frozen_teacher": teacher}}


def test_a_run_without_llm_vectors_or_records_has_none(tmp_path) -> None:
    assert trained_llm_provenance(_run(tmp_path / "a", {"schema_fingerprint": "x", "elec": {"task": "gain"}})) is None
    assert trained_llm_provenance(_run(tmp_path / "b", None)) is None
    assert not os.path.exists(tmp_path / "b" / "run" / "plugins.json")


def test_other_field_vectors_name_the_file_the_run_read_them_from() -> None:
    """After an LLM upgrade the refusal said 'pass the vector file the run started with' without naming it."""
    import pytest

    from recsys_llm.train.config import ConfigError
    from recsys_llm.train.run_records import check_same_field_vectors

    saved = {"llactr": {"vectors": "/runs/old.safetensors", "model_hash": "f804395b21d9a6ac", "model_id": "/m/old"}}
    new = {"llactr": {"vectors": "/runs/new.safetensors", "model_hash": "59eb89a7dfdd7524", "model_id": "/m/new"}}
    with pytest.raises(ConfigError, match=r"/runs/new.safetensors holds now \(differing: model_hash "
                                          r"'f804395b21d9a6ac' -> '59eb89a7dfdd7524', model_id '/m/old' -> '/m/new'\)"
                                          r".* \(it read them from /runs/old.safetensors\)$"):
        check_same_field_vectors(saved, new, "run/plugins.json")
