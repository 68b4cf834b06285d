"""``experiments.elec_vector_auc`` splits the rows the CTR-adapted LLM saw the labels of from the others
on the split ``semantics adapt`` really tuned on, which ``adapted_on.json`` records."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from experiments.elec_vector_auc import vector_auc
from recsys_llm.cli import main
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from tests.tiny_models import save_tiny_bert


def _data(root: str) -> DatasetSchema:
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for offset, (split, n) in enumerate((("train", 24), ("valid", 20), ("test", 12))):
        pq.write_table(pa.table({
            "row_id": pa.array(np.arange(n) + 1000 * offset, pa.int64()),
            "user_id": pa.array(rng.integers(0, 3, n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 5, n), pa.int64()),
            "label": pa.array(np.arange(n) % 2, pa.int64()),  # both classes in every group
        }), os.path.join(root, f"{split}.parquet"))
    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3, description="user id"),
                                 FieldSpec("item_id", "sparse", 5, description="item id")],
                           row_key="row_id", splits={s: f"{s}.parquet" for s in ("train", "valid", "test")}, root=root)
    schema.save(os.path.join(root, "schema.json"))
    return schema


def _adapted_on_valid(tmp_path, sample_rows: int):
    """The test data, a run directory and a tiny BERT CTR-adapted (heads and all) on ``sample_rows`` rows
    of its valid split: (schema, run directory, the adapted LLM's directory)."""
    schema = _data(str(tmp_path / "data"))
    run = tmp_path / "run"
    llm = str(run / "ctr_llm")
    assert main(["semantics", "adapt", "--schema", schema.root, "--split", "valid", "--output-dir", llm,
                 "--model", save_tiny_bert(str(tmp_path / "bert")), "--representation-dim", "4", "--hidden-dim", "8",
                 "--batch-size", "8", "--max-length", "16", "--sample-rows", str(sample_rows)]) == 0
    return schema, run, llm


def test_the_tuned_rows_are_those_of_the_split_the_llm_was_adapted_on(tmp_path) -> None:
    # an LLM tuned on (a sample of) the validation rows: their labels are in its vectors
    schema, run, llm = _adapted_on_valid(tmp_path, sample_rows=6)
    with open(os.path.join(llm, "adapted_on.json"), encoding="utf-8") as handle:
        assert json.load(handle)["split"] == "valid"
    assert main(["semantics", "export", "--schema", schema.root, "--llm", llm, "--output-dir",
                 str(run / "vectors")]) == 0
    result = vector_auc(str(run), schema)
    # was: the 6 sampled positions marked on the training rows, and the validation rows one group
    assert {name: group["rows"] for name, group in result.items()} == {
        "train": 24, "valid (tuned on)": 6, "valid (not tuned on)": 14, "test": 12}


def test_vectors_per_entity_are_refused_with_what_is_needed(tmp_path) -> None:
    """The default ``experiments.elec`` run exports one vector per item into ``vectors/``: its item ids
    used to be looked up as row keys (``some train rows have no vector``, or the wrong vectors where
    every row key is also an item id)."""
    import pytest

    schema = _data(str(tmp_path / "data"))
    run = tmp_path / "run"
    llm = str(run / "ctr_llm")
    assert main(["semantics", "adapt", "--schema", schema.root, "--output-dir", llm, "--fields", "item_id",
                 "--model", save_tiny_bert(str(tmp_path / "bert")), "--representation-dim", "4", "--hidden-dim", "8",
                 "--batch-size", "8", "--max-length", "16", "--sample-rows", "6"]) == 0
    assert main(["semantics", "export", "--schema", schema.root, "--llm", llm, "--output-dir", str(run / "vectors"),
                 "--granularity", "entity", "--entity-field", "item_id", "--entity-fields", "item_id"]) == 0
    with pytest.raises(ValueError, match=r"vectors: one vector per item_id \(semantics export --granularity entity\); "
                                         r"the AUC per row needs row vectors: experiments.elec --granularity row"):
        vector_auc(str(run), schema)


def test_an_llm_tuned_on_every_row_of_its_split_leaves_no_untuned_group(tmp_path) -> None:
    """``--sample-rows`` at or above the split's rows tunes on all of them: the empty "not tuned on"
    group used to crash the AUC (IndexError)."""
    schema, run, llm = _adapted_on_valid(tmp_path, sample_rows=100)
    assert main(["semantics", "export", "--schema", schema.root, "--llm", llm, "--output-dir",
                 str(run / "vectors")]) == 0
    result = vector_auc(str(run), schema)
    assert result["valid (tuned on)"]["rows"] == 20
    assert result["valid (not tuned on)"] == {"auc": None, "rows": 0}


def test_an_interrupted_write_leaves_the_earlier_vector_auc_json(tmp_path, monkeypatch) -> None:
    """``vector_auc.json`` used to be written in place: a write cut short left a truncated file where
    the earlier result was."""
    import sys

    import pytest

    import experiments.elec_vector_auc as script

    path = tmp_path / "vector_auc.json"
    path.write_text('{"test": {"auc": 0.6, "rows": 12}}', encoding="utf-8")
    # the second group cannot be written: the write stops part-way, as a kill or a full disk would stop it
    monkeypatch.setattr(script, "vector_auc", lambda run, schema: {"train": {"auc": 0.7, "rows": 24},
                                                                   "test": {"auc": object(), "rows": 12}})
    monkeypatch.setattr(script.DatasetSchema, "load", staticmethod(lambda path: None))
    monkeypatch.setattr(sys, "argv", ["elec_vector_auc", "--run", str(tmp_path / "run"), "--schema", "unused",
                                      "--json", str(path)])
    with pytest.raises(TypeError):
        script.main()
    assert json.loads(path.read_text(encoding="utf-8")) == {"test": {"auc": 0.6, "rows": 12}}


def test_a_run_it_cannot_read_is_one_error_line(tmp_path, monkeypatch, capsys) -> None:
    """An entity-vector run (or no run) ended in a Python traceback, not the one line the commands print."""
    import sys

    from experiments import elec_vector_auc

    monkeypatch.setattr(sys, "argv", ["elec_vector_auc", "--run", str(tmp_path / "none"), "--schema", str(tmp_path)])
    with pytest.raises(SystemExit) as exited:
        elec_vector_auc.main()
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("elec_vector_auc: error: ") and "Traceback" not in err and len(err.splitlines()) == 1
