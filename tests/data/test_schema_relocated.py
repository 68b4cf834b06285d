"""``DatasetSchema.relocated``: copies of the splits elsewhere keep the schema's identity."""

import os

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic


def test_relocated_copy_keeps_fingerprint_and_resolves_text(tmp_path) -> None:
    generate_synthetic(str(tmp_path / "data"), 1_000, seed=0)
    schema = DatasetSchema.load(str(tmp_path / "data" / "schema.json"))
    copy_dir = str(tmp_path / "copy")
    os.makedirs(copy_dir)
    moved = schema.relocated(copy_dir, {"train": "train.parquet"}, ["llm_vector"])
    moved.save(os.path.join(copy_dir, "schema.json"))
    reloaded = DatasetSchema.load(os.path.join(copy_dir, "schema.json"))
    assert reloaded.fingerprint() == schema.fingerprint()
    assert reloaded.split_path("train") == os.path.join(copy_dir, "train.parquet")
    assert os.path.samefile(reloaded.split_path("test"), schema.split_path("test"))
    assert os.path.samefile(reloaded.value_text_path("item_id"), schema.value_text_path("item_id"))
    assert reloaded.extra_columns == schema.extra_columns + ["llm_vector"]
    assert reloaded.load_value_text("item_id").num_rows == schema.load_value_text("item_id").num_rows


def test_fingerprint_changes_with_what_models_depend_on(tmp_path) -> None:
    generate_synthetic(str(tmp_path / "data"), 1_000, seed=0)
    schema = DatasetSchema.load(str(tmp_path / "data" / "schema.json"))
    changed = DatasetSchema.from_dict(schema.to_dict(), root=schema.root)
    object.__setattr__(changed.fields[0], "description", "something else")
    assert changed.fingerprint() != schema.fingerprint()
    relabelled = DatasetSchema.from_dict({**schema.to_dict(), "label": "purchase"}, root=schema.root)
    assert relabelled.fingerprint() != schema.fingerprint()  # another target: what was learnt does not carry over
