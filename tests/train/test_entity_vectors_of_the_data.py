"""ELEC entity exports against the data a run trains on, day by day: an export of another vocabulary is refused,
and a warning names the vocabulary values an export has no vector for."""

import json
import dataclasses
import os
import types
import warnings
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pytest
import torch
import yaml

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.convert import prepare_tabular
from recsys_llm.modules.elec import ELECConfig
from recsys_llm.semantics.row_text import RowTextRenderer
from recsys_llm.semantics.schema_export import export_schema_vectors
from recsys_llm.semantics.vector_export import (
    ProvenanceError,
    VectorExport,
    VectorExportConfig,
    chunk_path,
    manifest_path,
    read_manifest,
)
from recsys_llm.semantics.vector_reader import ids_without_vector
from recsys_llm.train.task_builder import check_entity_vocabularies, entity_vector_gaps
from tests.grown_days import SHOP_SCHEMA, clicks_csv, grown_days as _days

def _export(schema: DatasetSchema, out: str, splits: List[str], **provenance: str) -> str:
    export_schema_vectors(schema, splits, RowTextRenderer(schema), lambda texts: torch.ones(len(texts), 4), out,
                          {"model": "tiny", "revision": "r1", "pooling": "mean", **provenance}, VectorExportConfig(),
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


def test_an_entity_export_of_synthetic_data_generated_with_another_seed_is_refused(tmp_path) -> None:
    """Synthetic (and MovieLens) data records no ``ids``: its value texts say what each id means, and an export of
    data generated with another seed (item 1 another title) was let through, as were evaluate and score."""
    from recsys_llm.data.synthetic import generate_synthetic

    schemas = {}
    for seed in (0, 7):
        generate_synthetic(str(tmp_path / f"seed{seed}"), 400, seed=seed)
        schemas[seed] = DatasetSchema.load(str(tmp_path / f"seed{seed}"))
    assert schemas[0].fingerprint() == schemas[7].fingerprint()
    out = str(tmp_path / "items")
    export_schema_vectors(schemas[0], ["train"], RowTextRenderer(schemas[0]), lambda texts: torch.ones(len(texts), 4),
                          out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig(),
                          granularity="entity", entity_field="item_id", progress=False)
    built = types.SimpleNamespace(elec=ELECConfig.from_dict(
        {"task": "gain", "vector_dim": 4, "vector_source": "entity_table", "entity_field": "item_id",
         "entity_vectors": out}))
    check_entity_vocabularies(built, schemas[0])
    with pytest.raises(ProvenanceError, match=r"entity vectors of 'item_id' in .*items: exported from data whose \d+ "
                                              r"ids of 'item_id' mean other values than in .*seed7"):
        check_entity_vocabularies(built, schemas[7])


def test_a_day_export_that_leaves_out_earlier_values_is_named(tmp_path) -> None:
    days = _days(str(tmp_path))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])  # items a, c, d: not b and f of day 1
    [gap] = entity_vector_gaps(_built(day2), days["day2"])
    assert "'item'" in gap and "2 of the 5 values" in gap and "(ids 1, 3)" in gap and "--splits" in gap
    both = _export(days["day2"], str(tmp_path / "both"), ["train", os.path.join(str(tmp_path), "d1", "train.parquet"),
                                                          os.path.join(str(tmp_path), "d1", "valid.parquet"),
                                                          os.path.join(str(tmp_path), "d1", "test.parquet")])
    assert entity_vector_gaps(_built(both), days["day2"]) == []


def test_an_earlier_days_export_on_a_grown_vocabulary_is_named_as_such(tmp_path) -> None:
    """Day 1's export named on day 2's data (forgotten re-export): adding splits cannot cover the new ids, so the
    warning says to export again from the day's data."""
    days = _days(str(tmp_path))
    day1 = _export(days["day1"], str(tmp_path / "v1"), ["train", "valid", "test"])
    [gap] = entity_vector_gaps(_built(day1), days["day2"])
    assert "an earlier day's export" in gap and f"--schema {days['day2'].root}" in gap and "--reuse" in gap
    assert "--output pooled" not in gap and "--output representation" not in gap  # the default needs none
    pooled = _export(days["day1"], str(tmp_path / "pooled"), ["train", "valid", "test"], output="pooled")
    [gap] = entity_vector_gaps(_built(pooled), days["day2"])
    assert "--entity-field item --output pooled --splits" in gap  # without it, the command given is refused


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


def test_an_export_begun_before_vocabulary_records_resumes_in_that_form(tmp_path) -> None:
    """An export whose manifest predates the vocabulary record resumes without it (not refused as other settings),
    and training leaves such an export unchecked."""
    days = _days(str(tmp_path))
    out = _export(days["day1"], str(tmp_path / "old"), list(days["day1"].splits))
    path = manifest_path(out)
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    del manifest["provenance"]["vocabulary"]
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(manifest, handle)
    assert _export(days["day1"], out, list(days["day1"].splits)) == out
    assert "vocabulary" not in read_manifest(out)["provenance"]
    check_entity_vocabularies(_built(out), days["fresh"])


def test_an_export_of_other_settings_is_not_named_another_vocabulary(tmp_path) -> None:
    """Only an export recording another vocabulary than this run's is named data of other ids; one where this run
    records none differs in its settings."""
    out = str(tmp_path / "vec")

    def export(provenance: Dict[str, str]) -> None:
        VectorExport(out, provenance, VectorExportConfig()).run(
            pa.array([1, 2, 3], pa.int64()), lambda a, b: ["t"] * (b - a), lambda t: torch.zeros(len(t), 4),
            progress=False)

    base = {"model": "tiny", "revision": "r1", "pooling": "mean"}
    export({**base, "vocabulary": "v1"})
    with pytest.raises(ProvenanceError, match=r"other settings than this run's") as caught:
        export(base)
    assert "entity ids mean other values" not in str(caught.value)


def test_an_unfinished_export_of_other_rows_is_named_unfinished(tmp_path) -> None:
    """An export of another ``num_rows`` whose chunks are not all there is named unfinished, not finished."""
    out = str(tmp_path / "vec")

    def export(keys: List[int]) -> None:
        VectorExport(out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig(chunk_rows=2)).run(
            pa.array(keys, pa.int64()), lambda a, b: ["t"] * (b - a), lambda t: torch.zeros(len(t), 4),
            progress=False)

    export([1, 2, 3, 4, 5])
    os.remove(chunk_path(out, 2))
    with pytest.raises(ValueError, match=r"holds an unfinished export made with num_rows=5; this run has num_rows=4"):
        export([1, 2, 3, 4])


def test_ids_without_vector_come_back_sorted_and_once(tmp_path) -> None:
    """The ids an export lacks come back sorted and without repeats, whatever the order of those asked for."""
    out = str(tmp_path / "vec")
    VectorExport(out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig(chunk_rows=2)).run(
        pa.array([5, 1], pa.int64()), lambda a, b: ["t"] * (b - a), lambda texts: torch.zeros(len(texts), 4),
        progress=False)
    assert ids_without_vector(out, np.array([7, 3, 5, 7, 2])).tolist() == [2, 3, 7]


def test_exports_a_run_does_not_load_are_not_checked(tmp_path) -> None:
    """An offline student reads no vectors, a table without a directory (a frozen teacher's) and a missing directory
    (load_elec_state names it) are left to their own checks: neither refused nor warned about."""
    days = _days(str(tmp_path))
    day1 = _export(days["day1"], str(tmp_path / "v1"), list(days["day1"].splits))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])
    offline = {"task": "distill", "distill": {"mode": "offline"}}
    check_entity_vocabularies(_built(day1, **offline), days["fresh"])
    assert entity_vector_gaps(_built(day2, **offline), days["day2"]) == []
    for directory in (None, str(tmp_path / "nowhere")):
        check_entity_vocabularies(_built(directory), days["fresh"])
    assert entity_vector_gaps(_built(None), days["day2"]) == []


def test_training_warns_of_the_values_its_entity_export_lacks(tmp_path) -> None:
    """A run on day 2's data with an export of day 2's items alone warns, naming the ids of day 1's items its
    vocabulary keeps without a vector; with an export that covers them, no such warning; on data whose ids mean
    other values, the export is refused."""
    from recsys_llm.train.config import load_config
    from recsys_llm.train.distributed import teardown_distributed
    from recsys_llm.train.runner import run_training

    days = _days(str(tmp_path))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])
    both = _export(days["day2"], str(tmp_path / "both"), ["train", str(tmp_path / "d1" / "train.parquet"),
                                                          str(tmp_path / "d1" / "valid.parquet"),
                                                          str(tmp_path / "d1" / "test.parquet")])
    config = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                          "synthetic_deepfm.yaml")

    def train(vectors: str, run: str) -> List[str]:
        overrides = [f"data.schema={days['day2'].root}", "data.batch_size=8", "data.synthetic_rows=0",
                     "train.max_steps=1", "train.epochs=1", "train.progress=false", "train.device=cpu",
                     "data.valid_split=", "data.test_split=",
                     f"train.run_dir={tmp_path / run}", "model.mlp_layer_sizes=[4]", "model.embedding_dim=4",
                     "elec.task=gain", "elec.vector_dim=4", "elec.vector_source=entity_table",
                     "elec.entity_field=item", f"elec.entity_vectors={vectors}"]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            run_training(load_config(config, overrides))
        return [str(w.message) for w in caught if "have no vector" in str(w.message)]

    try:  # run_training starts a 1-rank process group in this process
        [gap] = train(day2, "run2")
        assert "'item'" in gap and "2 of the 5 values" in gap and "(ids 1, 3)" in gap
        assert train(both, "run_both") == []
        days["day2"] = days["fresh"]  # the same ids, other values: an export of day 2's vocabulary is refused
        with pytest.raises(ProvenanceError, match=r"entity vectors of 'item' in .*both: .*mean other values"):
            train(both, "run_fresh")
    finally:
        teardown_distributed()


def test_the_gap_warning_shows_five_ids_at_most(tmp_path) -> None:
    """The warning names the first five ids without a vector, and '...' only where there are more."""
    with open(tmp_path / "shop.yaml", "w", encoding="utf-8") as handle:
        yaml.safe_dump(SHOP_SCHEMA, handle)
    schema = prepare_tabular(clicks_csv(str(tmp_path / "day.csv"), list("abcdefg" * 6)), str(tmp_path / "shop.yaml"),
                             str(tmp_path / "d"))

    def gap(keys: List[int]) -> str:
        out = str(tmp_path / f"vec{len(keys)}")
        VectorExport(out, {"model": "tiny", "revision": "r1", "pooling": "mean"}, VectorExportConfig()).run(
            pa.array(keys, pa.int64()), lambda a, b: ["t"] * (b - a), lambda t: torch.zeros(len(t), 4),
            progress=False)
        [found] = entity_vector_gaps(_built(out), schema)
        return found

    assert "6 of the 7 values" in gap([1]) and "(ids 2, 3, 4, 5, 6, ...)" in gap([1])
    assert "5 of the 7 values" in gap([1, 2]) and "(ids 3, 4, 5, 6, 7)" in gap([1, 2])


def test_data_without_vocabulary_ids_has_no_gap_warning(tmp_path) -> None:
    """Only a field whose ids are a vocabulary's (``prepare tabular``) is checked for values without a vector: data
    without such ids (synthetic, MovieLens) warns not, though its field has value texts."""
    days = _days(str(tmp_path))
    day2 = _export(days["day2"], str(tmp_path / "v2"), ["train"])
    assert days["day2"].value_text_path("item") is not None and entity_vector_gaps(_built(day2), days["day2"])
    days["day2"].ids = {}
    assert entity_vector_gaps(_built(day2), days["day2"]) == []


def test_earlier_days_files_of_data_prepared_afresh_are_refused_as_splits(tmp_path) -> None:
    """``--splits`` may add an earlier day's files prepared ``--like`` (its ids are a prefix of the grown vocabulary),
    not files of data prepared afresh (its ids name other items) or of another schema."""
    days = _days(str(tmp_path))
    earlier = [os.path.join(str(tmp_path), "d1", f"{split}.parquet") for split in ("train", "valid", "test")]
    _export(days["day2"], str(tmp_path / "with_day1"), ["train", *earlier])
    fresh = os.path.join(str(tmp_path), "fresh", "train.parquet")
    with pytest.raises(ValueError, match=r"--splits .*fresh/train\.parquet: prepared as .*fresh \(schema 'shop'\), and "
                                         r"the vocabulary of field\(s\) \['item'\] differs from .*d2's"):
        _export(days["day2"], str(tmp_path / "with_fresh"), ["train", fresh])
    assert not os.path.exists(tmp_path / "with_fresh")
    other = DatasetSchema.load(os.path.join(str(tmp_path), "fresh"))
    other.fields[0] = dataclasses.replace(other.fields[0], cardinality=11)
    other.save(os.path.join(str(tmp_path), "fresh", "schema.json"))
    with pytest.raises(ValueError, match=r"its fields or sizes differ"):
        _export(days["day2"], str(tmp_path / "with_other"), ["train", fresh])
