"""ELEC entity exports against the data a run trains on, day by day: an export of another vocabulary is refused,
and a warning names the vocabulary values an export has no vector for."""

import os
import types
from typing import List

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.convert import prepare_tabular
from recsys_llm.data.tabular.like import prepare_tabular_like
from recsys_llm.modules.elec import ELECConfig
from recsys_llm.semantics.row_text import RowTextRenderer
from recsys_llm.semantics.schema_export import export_schema_vectors
from recsys_llm.semantics.vector_export import ProvenanceError, VectorExport, VectorExportConfig
from recsys_llm.semantics.vector_reader import ids_without_vector
from recsys_llm.train.task_builder import check_entity_vocabularies, entity_vector_gaps

SCHEMA = {"name": "shop", "label": "clicked", "fields": [
    {"name": "user", "kind": "sparse", "cardinality": 10, "description": "shopper id"},
    {"name": "item", "kind": "sparse", "cardinality": 20, "description": "product"},
]}


def _csv(path: str, items: List[str]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("user,item,clicked\n")
        handle.writelines(f"u{k % 3},{item},{k % 2}\n" for k, item in enumerate(items))
    return path


def _days(root: str) -> dict:
    """Day 1 (items b, d, f), day 2 grown --like day 1 (a, c and d: a and c new), day 2 prepared afresh."""
    with open(os.path.join(root, "shop.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(SCHEMA, handle)
    day1 = _csv(os.path.join(root, "day1.csv"), list("bdf" * 14))
    day2 = _csv(os.path.join(root, "day2.csv"), list("acd" * 14))
    out = {"day1": prepare_tabular(day1, os.path.join(root, "shop.yaml"), os.path.join(root, "d1"))}
    out["day2"] = prepare_tabular_like(day2, os.path.join(root, "d1"), os.path.join(root, "d2"), split_name="train",
                                       grow_vocabulary=True)
    out["fresh"] = prepare_tabular(day2, os.path.join(root, "shop.yaml"), os.path.join(root, "fresh"))
    return out


def _export(schema: DatasetSchema, out: str, splits: List[str]) -> str:
    export_schema_vectors(schema, splits, RowTextRenderer(schema), lambda texts: torch.ones(len(texts), 4), out,
                          {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig(),
                          granularity="entity", entity_field="item", progress=False)
    return out


def _built(directory: str, **elec: object) -> types.SimpleNamespace:
    raw = {"task": "gain", "vector_dim": 4, "vector_source": "entity_table", "entity_field": "item",
           "entity_vectors": directory, **elec}
    return types.SimpleNamespace(elec=ELECConfig.from_dict(raw))


def test_an_entity_export_of_another_vocabulary_is_refused(tmp_path) -> None:
    days = _days(str(tmp_path))
    day1 = _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])
    check_entity_vocabularies(_built(day1), days["day2"])  # the grown vocabulary keeps day 1's ids
    check_entity_vocabularies(_built(day2), days["day2"])
    # prepared afresh: the same fingerprint, but id 1 is 'a' there and 'b' on day 1
    assert days["fresh"].fingerprint() == days["day2"].fingerprint()
    for export in (day1, day2):
        with pytest.raises(ProvenanceError, match=r"entity vectors of 'item' in .*v\d: exported from data whose \d "
                                                  r"ids of 'item' mean other values than in .*fresh.*--like"):
            check_entity_vocabularies(_built(export), days["fresh"])
    check_entity_vocabularies(_built(day1, vector_source="extras", entity_field=None, entity_vectors=None),
                              days["fresh"])


def test_a_day_export_that_leaves_out_earlier_values_is_named(tmp_path) -> None:
    days = _days(str(tmp_path))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])  # items a, c, d: not b and f of day 1
    [gap] = entity_vector_gaps(_built(day2), days["day2"])
    assert "'item'" in gap and "2 of the 5 values" in gap and "(ids 1, 3)" in gap and "--splits" in gap
    both = _export(days["day2"], str(tmp_path / "both"), ["train", os.path.join(str(tmp_path), "d1", "train.parquet"),
                                                          os.path.join(str(tmp_path), "d1", "valid.parquet"),
                                                          os.path.join(str(tmp_path), "d1", "test.parquet")])
    assert entity_vector_gaps(_built(both), days["day2"]) == []


def test_ids_without_vector_reads_every_chunk(tmp_path) -> None:
    out = str(tmp_path / "vec")
    VectorExport(out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig(chunk_rows=2)).run(
        pa.array([5, 1, 3, 9, 2], pa.int64()), lambda a, b: ["t"] * (b - a), lambda texts: torch.zeros(len(texts), 4),
        progress=False)
    assert ids_without_vector(out, np.array([1, 2, 3, 4, 5, 6, 9, 9])).tolist() == [4, 6]


def test_a_later_days_export_into_an_earlier_days_directory_names_the_data(tmp_path) -> None:
    days = _days(str(tmp_path))
    out = _export(days["day1"], str(tmp_path / "v"), list(days["day1"].splits))
    with pytest.raises(ProvenanceError, match=r"v: holds an export of data whose entity ids mean other values .*"
                                              r"a later day's grown vocabulary.*use another --output-dir"):
        _export(days["day2"], out, ["train"])
    assert _export(days["day1"], out, list(days["day1"].splits)) == out  # the same export again: its chunks kept


def test_an_export_of_other_rows_names_them_not_a_setting(tmp_path) -> None:
    out = str(tmp_path / "vec")

    def export(keys: List[int]) -> None:
        VectorExport(out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig()).run(
            pa.array(keys, pa.int64()), lambda a, b: ["t"] * (b - a), lambda t: torch.zeros(len(t), 4),
            progress=False)

    export([1, 2, 3])
    with pytest.raises(ValueError, match=r"finished export of num_rows=3 rows or entities; this run's data and "
                                         r"--splits give num_rows=4 \(other data"):
        export([1, 2, 3, 4])


def test_values_added_since_a_model_trained_are_named(tmp_path) -> None:
    days = _days(str(tmp_path))
    trained = days["day1"].vocabulary_records()
    [note] = days["day2"].grown_vocabularies(trained, "the model of runs/day1")
    assert "d2" in note and "'item' holds 2 values (ids 4..5) added after the model of runs/day1" in note
    assert days["day1"].grown_vocabularies(trained, "m") == []
    assert days["day2"].grown_vocabularies({}, "m") == []  # a run that records no vocabulary
