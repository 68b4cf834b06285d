"""``recsys-llm score``: a Parquet split through an exported artifact, as serving scores it."""

import contextlib
import dataclasses
import io
import json
import os
from typing import Any, Dict, List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.cli import main as cli_main
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.data.validation import DataError, field_specs_metadata
from recsys_llm.serving import ServedModel
from recsys_llm.serving.scoring import SCORES_STAMP_KEY, score_columns, score_split
from recsys_llm.train.metrics import binary_metrics
from tests.multiprocess import run_multiprocess
from tests.small_artifact import export_small_deepfm, write_config_as_exported


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """2,000 synthetic rows (several row groups per split) and an artifact of a small DeepFM trained a few steps."""
    root = tmp_path_factory.mktemp("scoring")
    data = str(root / "data")
    generate_synthetic(data, 2_000, seed=0, rows_per_group=128)
    schema = DatasetSchema.load(data)
    artifact = str(root / "artifact")
    task = export_small_deepfm(schema, artifact, batch_size=256, steps=4)
    with torch.no_grad():
        logits = torch.cat([task.predict(batch).logits for batch in ParquetBatchReader(schema, "test", 100)])
    torch.save(logits, str(root / "task_logits.pt"))
    return {"data": data, "artifact": artifact, "task_logits": str(root / "task_logits.pt")}


def _split_table(schema: DatasetSchema, split: str) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in resolve_paths(schema, split)])


def test_every_row_is_scored_in_file_order_as_the_trained_task_scores_it(exported: Dict[str, str], tmp_path) -> None:
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    output = str(tmp_path / "scores.parquet")
    report = score_split(served, schema, "test", batch_size=64, output=output, progress=False)
    scores, split = pq.read_table(output), _split_table(schema, "test")
    assert scores.column_names == ["row_id", "label", "logit", "probability"]
    assert scores.num_rows == report["rows"] == split.num_rows
    assert scores["row_id"].to_pylist() == split["row_id"].to_pylist()
    assert scores["label"].to_pylist() == split["label"].cast(pa.float32()).to_pylist()
    logits = torch.tensor(scores["logit"].to_numpy())
    torch.testing.assert_close(logits, torch.load(exported["task_logits"], weights_only=True))
    torch.testing.assert_close(torch.tensor(scores["probability"].to_numpy()), torch.sigmoid(logits))
    labels = torch.tensor(scores["label"].to_numpy())
    expected = binary_metrics(torch.sigmoid(logits.double()), labels, logits)
    assert report["auc"] == pytest.approx(expected["auc"]) and report["logloss"] == pytest.approx(expected["logloss"])
    cold = torch.tensor(split["is_cold_item"].to_numpy()).bool()
    assert report["cold/num_samples"] == int(cold.sum()) > 0
    assert report["cold/auc"] == pytest.approx(binary_metrics(torch.sigmoid(logits[cold].double()), labels[cold],
                                                              logits[cold])["auc"])
    assert report["split"] == "test" and report["output"] == output and report["samples_per_s"] > 0
    assert sorted(os.listdir(tmp_path)) == ["scores.parquet"]  # no temp file left


def test_an_existing_output_is_refused_before_anything_is_read_and_left_as_it_was(exported: Dict[str, str],
                                                                                  tmp_path) -> None:
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    output = tmp_path / "scores.parquet"
    output.write_bytes(b"yesterday's scores")
    with pytest.raises(FileExistsError, match=r"scores.parquet: exists; the scores are written to a new file"):
        score_split(served, schema, "test", output=str(output), progress=False)
    assert output.read_bytes() == b"yesterday's scores"
    with pytest.raises(FileNotFoundError, match=r"its directory .*no_such_dir does not exist"):
        score_split(served, schema, "test", output=str(tmp_path / "no_such_dir" / "s.parquet"), progress=False)


def test_an_output_in_a_directory_this_user_cannot_write_is_refused_before_any_work(tmp_path, monkeypatch) -> None:
    """`score --output ro/scores.parquet` (a run directory of another user) loaded the artifact and the data, then
    failed on its temp file with pyarrow's 'Failed to open local file ...tmp'. Root writes anywhere but on a read-only
    mount, so the directory's refusal is stood in for."""
    from recsys_llm.serving.scoring import check_scores_output

    locked = tmp_path / "ro"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    output = locked / "scores.parquet"
    with pytest.raises(PermissionError, match=f"^{output}: cannot be written: {locked} is not writable here"):
        check_scores_output(str(output))
    check_scores_output(str(tmp_path / "scores.parquet"))  # writable: passes


def test_a_batch_the_artifact_refuses_leaves_no_scores_file(exported: Dict[str, str], tmp_path) -> None:
    """Data of a grown item table (an id beyond the artifact's rows, in the split's last row group) is refused
    by the artifact naming the feature; the rows scored before it are not left behind as a partial file."""
    schema = DatasetSchema.load(exported["data"])
    item = schema.field("item_id")
    grown = dataclasses.replace(schema, fields=[dataclasses.replace(f, cardinality=f.cardinality + 10)
                                                if f.name == "item_id" else f for f in schema.fields])
    table = _split_table(schema, "test")
    items = table["item_id"].to_pylist()
    items[-1] = item.cardinality + 5
    split = str(tmp_path / "grown_test.parquet")
    table = table.set_column(table.column_names.index("item_id"), "item_id", pa.array(items, pa.int64()))
    pq.write_table(table.replace_schema_metadata(field_specs_metadata(grown.fields)), split, row_group_size=128)
    output = tmp_path / "out" / "scores.parquet"
    output.parent.mkdir()
    served = ServedModel.load(exported["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=r"item_id"):
        score_split(served, grown, split, batch_size=64, output=str(output), progress=False)
    assert os.listdir(output.parent) == []


def test_synthetic_data_generated_again_with_another_seed_is_refused_naming_its_fields(exported: Dict[str, str],
                                                                                       tmp_path) -> None:
    """The same schema, sizes and fingerprint, but each user and item id is another user and item (its value text):
    such data was scored as if its ids meant what the model trained on, and so were entity vectors and evaluate."""
    other = str(tmp_path / "seed1")
    generate_synthetic(other, 2_000, seed=1, rows_per_group=128)
    schema = DatasetSchema.load(other)
    assert schema.fingerprint() == DatasetSchema.load(exported["data"]).fingerprint()
    served = ServedModel.load(exported["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=r"seed1/schema\.json: the vocabulary of field\(s\) \['item_id', 'user_id'\] "
                                         r"is not the one the artifact's model was trained on"):
        score_split(served, schema, "test", progress=False)
    generated_again = str(tmp_path / "seed0")  # the same seed and rows: the same ids, scored
    generate_synthetic(generated_again, 2_000, seed=0, rows_per_group=128)
    assert score_split(served, DatasetSchema.load(generated_again), "test", progress=False)["rows"] > 0


def test_data_prepared_with_other_table_sizes_is_refused_naming_the_fields(exported: Dict[str, str]) -> None:
    """The same fields hashed into other table sizes (``prepare criteo --hash-size``) read other rows for every id:
    scored, every row was silently wrong (AUC near 0.5); ``evaluate`` refuses such data too."""
    schema = DatasetSchema.load(exported["data"])
    resized = dataclasses.replace(schema, fields=[dataclasses.replace(f, cardinality=f.cardinality * 2)
                                                  if f.name == "item_id" else f for f in schema.fields])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=r"the artifact's tables do not have the sizes of the data's fields "
                                         r"\(item_id: \d+ rows, the data's cardinality \d+\)"):
        score_split(served, resized, "test", progress=False)


def test_a_schema_without_the_artifacts_features_is_named(exported: Dict[str, str]) -> None:
    schema = DatasetSchema.load(exported["data"])
    renamed = dataclasses.replace(schema, fields=[dataclasses.replace(f, name="movie_id") if f.name == "item_id" else f
                                                  for f in schema.fields])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    with pytest.raises(ValueError, match=r"the schema has no sparse features \['item_id'\], which the artifact reads"):
        score_split(served, renamed, "test", progress=False)


def test_the_command_asks_for_trust_in_the_program_and_prints_the_metrics(exported: Dict[str, str], tmp_path,
                                                                            capsys) -> None:
    output = str(tmp_path / "scores.parquet")
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--output", output,
                 "--no-progress"]
    assert cli_main(arguments) == 2
    assert "here: pass --trust-program" in capsys.readouterr().err
    assert not os.path.exists(output)
    assert cli_main(arguments + ["--trust-program"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["artifact"] == exported["artifact"] and report["rows"] == pq.read_metadata(output).num_rows
    logits = torch.tensor(pq.read_table(output)["logit"].to_numpy())
    torch.testing.assert_close(logits, torch.load(exported["task_logits"], weights_only=True))
    # the same command again (a kill once the file was in place, before it exited): its own scores, replaced
    written = pq.read_table(output)
    assert written.schema.metadata[SCORES_STAMP_KEY]
    assert cli_main(arguments + ["--trust-program"]) == 0
    capsys.readouterr()
    assert pq.read_table(output).equals(written)
    # another split's scores into that file: refused, the file left as it was
    assert cli_main(arguments + ["--trust-program", "--split", "valid"]) == 2
    assert "exists (the scores of another artifact or other data)" in capsys.readouterr().err
    assert pq.read_table(output).equals(written)


def test_a_split_whose_files_have_no_row_key_is_scored_without_one(exported: Dict[str, str], tmp_path) -> None:
    """Scores of a day's file without the schema's row key column hold label, logit and probability alone."""
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    split = str(tmp_path / "no_key.parquet")
    pq.write_table(table.drop(["row_id"]), split, row_group_size=128)
    output = str(tmp_path / "scores.parquet")
    served = ServedModel.load(exported["artifact"], trust_program=True)
    report = score_split(served, schema, split, batch_size=64, output=output, progress=False)
    scores = pq.read_table(output)
    assert scores.column_names == ["label", "logit", "probability"] and report["rows"] == table.num_rows
    torch.testing.assert_close(torch.tensor(scores["logit"].to_numpy()),
                               torch.load(exported["task_logits"], weights_only=True))


def test_a_dangling_link_at_the_output_is_refused_and_left_as_it_was(exported: Dict[str, str], tmp_path) -> None:
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    output = tmp_path / "scores.parquet"
    output.symlink_to(tmp_path / "elsewhere.parquet")
    with pytest.raises(FileExistsError, match=r"scores.parquet: exists"):
        score_split(served, schema, "test", output=str(output), progress=False)
    assert output.is_symlink() and sorted(os.listdir(tmp_path)) == ["scores.parquet"]


def test_samples_per_second_count_rows_over_the_artifacts_time_and_the_bar_shows_only_when_asked(
        exported: Dict[str, str], capsys) -> None:
    """The artifact's calls take part of the call's wall time: at least rows / wall time samples per second."""
    import time

    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    start = time.perf_counter()
    report = score_split(served, schema, "test", batch_size=64, progress=False)
    wall = time.perf_counter() - start
    assert report["samples_per_s"] >= report["rows"] / wall > 0
    assert capsys.readouterr().err == ""
    score_split(served, schema, "test", batch_size=64, progress=True)
    assert "score test" in capsys.readouterr().err


def test_the_command_refuses_an_existing_output_before_loading_the_artifact(exported: Dict[str, str], tmp_path,
                                                                             capsys) -> None:
    """The output is checked first: an existing file is named even where the artifact would not load."""
    output = tmp_path / "scores.parquet"
    output.write_bytes(b"yesterday's scores")
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--output", str(output)]
    assert cli_main(arguments) == 2  # no --trust-program: the artifact would be refused
    err = capsys.readouterr().err
    assert "exists" in err and "--trust-program" not in err, err
    assert output.read_bytes() == b"yesterday's scores"


def test_an_empty_output_is_refused_not_scored_into_nowhere(exported: Dict[str, str], tmp_path, capsys,
                                                            monkeypatch) -> None:
    """``output=""`` names no file: it was taken as given, every row scored and the scores silently dropped
    (on several ranks rank 0 then wrote to no writer); the command's ``--output ''`` means none."""
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"--output '': names no file"):
        score_split(served, schema, "test", output="", progress=False)
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--output", "",
                 "--trust-program", "--no-progress"]
    assert cli_main(arguments) == 0  # the command's --output '' (an empty $VAR) is none: metrics only, as before
    assert json.loads(capsys.readouterr().out)["output"] is None
    assert os.listdir(tmp_path) == []


def test_the_scores_schema_has_a_row_key_only_where_the_schema_and_its_files_have_one(exported: Dict[str, str]) -> None:
    schema = DatasetSchema.load(exported["data"])
    assert score_columns(schema, True).names == ["row_id", "label", "logit", "probability"]
    assert score_columns(schema, False).names == ["label", "logit", "probability"]
    assert score_columns(dataclasses.replace(schema, row_key=None), True).names == ["label", "logit", "probability"]
    assert set(score_columns(schema, True).types) == {pa.int64(), pa.float32()}


def test_the_command_passes_its_batch_size_and_progress_on(exported: Dict[str, str], tmp_path, capsys) -> None:
    import math

    rows = _split_table(DatasetSchema.load(exported["data"]), "test").num_rows
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--trust-program",
                 "--batch-size", "64"]
    assert cli_main(arguments + ["--progress"]) == 0
    batches = math.ceil(rows / 64)  # not the default's one batch
    err = capsys.readouterr().err
    assert batches > 1 and f" {batches}/{batches} " in err, err
    assert cli_main(arguments + ["--no-progress"]) == 0
    assert "score test" not in capsys.readouterr().err


def test_dense_features_in_another_order_or_number_are_refused_before_any_row_is_scored(exported: Dict[str, str],
                                                                                        tmp_path) -> None:
    """The program reads the dense features by column: a schema listing them in another order scored every row
    silently wrong (no shape differs); one with fewer failed on the first batch without naming the schema."""
    schema = DatasetSchema.load(exported["data"])
    dense = [f for f in schema.fields if f.kind == "dense"]
    assert len(dense) >= 2
    others = [f for f in schema.fields if f.kind != "dense"]
    served = ServedModel.load(exported["artifact"], trust_program=True)
    assert served.dense_feature_names == [f.name for f in dense]
    swapped = dataclasses.replace(schema, fields=others + dense[::-1])
    output = tmp_path / "scores.parquet"
    with pytest.raises(ValueError, match=r"schema.json: the schema's dense features .* are not the artifact's"):
        score_split(served, swapped, "test", output=str(output), progress=False)
    assert not output.exists()
    # an artifact exported before the names were recorded: their number is still checked
    old = tmp_path / "old_artifact"
    old.mkdir()
    for name in os.listdir(exported["artifact"]):
        (old / name).write_bytes(open(os.path.join(exported["artifact"], name), "rb").read())
    config = json.loads((old / "config.json").read_text())
    del config["dense_feature_names"]
    write_config_as_exported(str(old / "config.json"), config)
    fewer = dataclasses.replace(schema, fields=others + dense[1:])
    with pytest.raises(ValueError, match=rf"the schema has {len(dense) - 1} dense features .*; the artifact reads "
                                         rf"{len(dense)}"):
        score_split(ServedModel.load(str(old), trust_program=True), fewer, "test", progress=False)


@pytest.mark.parametrize("marker", ["config.yaml", "train_state.json", "ckpt-00000010"])  # a run, a checkpoint, best/
def test_a_run_or_checkpoint_directory_as_artifact_says_to_export_it(tmp_path, marker: str) -> None:
    (tmp_path / marker).write_text("{}")
    with pytest.raises(ValueError, match=r"a training run or checkpoint directory, not an export artifact: export it "
                                         r"first \(`recsys-llm export --checkpoint"):
        ServedModel.load(str(tmp_path), trust_program=True)


def test_a_split_of_one_class_prints_strict_json_with_null_auc(exported: Dict[str, str], tmp_path, capsys) -> None:
    """As `evaluate` prints it: strict JSON parsers (jq, JavaScript) refuse the NaN that json.dumps writes."""
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    index = table.column_names.index(schema.label)
    table = table.set_column(index, schema.label, pa.array([0] * table.num_rows, table.schema.field(index).type))
    split = str(tmp_path / "no_clicks.parquet")
    pq.write_table(table, split)
    assert cli_main(["score", "--artifact", exported["artifact"], "--data", exported["data"], "--split", split,
                     "--trust-program", "--no-progress"]) == 0

    def refuse(constant: str) -> None:
        raise AssertionError(f"not strict JSON: {constant}")

    report = json.loads(capsys.readouterr().out, parse_constant=refuse)
    assert report["auc"] is None and report["rows"] == table.num_rows and report["logloss"] > 0


def test_an_artifact_of_weighted_tables_is_refused_before_any_row_naming_what_the_split_lacks(
        exported: Dict[str, str], tmp_path) -> None:
    """It failed on the first batch with ServedModel's message to a Python caller ("pass weights=")."""
    served = ServedModel.load(exported["artifact"], trust_program=True)
    served._config = {**served._config, "weighted": True}  # as a weighted EBC's export records it
    output = tmp_path / "scores.parquet"
    with pytest.raises(ValueError, match=r"tables pool per-id weights .* a Parquet split holds ids without weights"):
        score_split(served, DatasetSchema.load(exported["data"]), "test", output=str(output), progress=False)
    assert not output.exists()


def test_rows_without_labels_are_scored_without_metrics(exported: Dict[str, str], tmp_path, capsys) -> None:
    """A day's traffic before its clicks: files without the label column get their scores, and no metrics."""
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    split = str(tmp_path / "unlabeled.parquet")
    pq.write_table(table.drop([schema.label]), split, row_group_size=128)
    output = str(tmp_path / "scores.parquet")
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--split", split,
                 "--output", output, "--trust-program", "--no-progress"]
    assert cli_main(arguments) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labeled"] is False and report["rows"] == table.num_rows
    assert "auc" not in report and "cold/auc" not in report
    scores = pq.read_table(output)
    assert scores.column_names == ["row_id", "logit", "probability"]
    assert scores["row_id"].to_pylist() == table["row_id"].to_pylist()
    torch.testing.assert_close(torch.tensor(scores["logit"].to_numpy()),
                               torch.load(exported["task_logits"], weights_only=True))


def test_a_split_whose_later_file_lacks_the_labels_of_the_first_is_refused_naming_it(exported: Dict[str, str],
                                                                                      tmp_path) -> None:
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    split = tmp_path / "day"
    split.mkdir()
    pq.write_table(table.slice(0, 100), str(split / "part-0.parquet"))
    pq.write_table(table.slice(100).drop([schema.label]), str(split / "part-1.parquet"))
    served = ServedModel.load(exported["artifact"], trust_program=True)
    with pytest.raises(DataError, match=r"part-1.parquet: missing column\(s\) \['label'\]"):
        score_split(served, schema, str(split), progress=False)


def test_a_reader_without_labels_reads_files_with_or_without_them_and_gives_nan_labels(exported: Dict[str, str],
                                                                                        tmp_path) -> None:
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    unlabeled = str(tmp_path / "unlabeled.parquet")
    pq.write_table(table.drop([schema.label]), unlabeled)
    with pytest.raises(DataError, match=r"missing column\(s\) \['label'\]"):
        ParquetBatchReader(schema, unlabeled, 64)
    for split in (unlabeled, "test"):
        batches = list(ParquetBatchReader(schema, split, 64, labels=False))
        labeled = list(ParquetBatchReader(schema, "test", 64))
        assert all(torch.isnan(batch.labels).all() for batch in batches)
        for batch, reference in zip(batches, labeled):
            torch.testing.assert_close(batch.dense_features, reference.dense_features)
            assert batch.sparse_features.values().tolist() == reference.sparse_features.values().tolist()


def _score_with_the_command_as_a_torchrun_rank(arguments: List[str]) -> Dict[str, Any]:
    """One rank: ``recsys-llm score`` as torchrun starts it on each rank (the command sets up the group)."""
    os.environ["TORCHELASTIC_RUN_ID"] = "scoring-test"
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = cli_main(arguments)
    return {"code": code, "stdout": stdout.getvalue()}


@pytest.mark.multiprocess
def test_three_ranks_write_the_file_one_process_writes_and_rank_0_alone_prints_the_metrics(
        exported: Dict[str, str], tmp_path) -> None:
    """Each rank scores its contiguous share; rank 0 writes them all in row order: the one-process file."""
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    alone = str(tmp_path / "alone.parquet")
    expected = score_split(served, schema, "test", batch_size=64, output=alone, progress=False)
    output = str(tmp_path / "ranks" / "scores.parquet")
    os.makedirs(os.path.dirname(output))
    arguments = ["score", "--artifact", exported["artifact"], "--data", exported["data"], "--output", output,
                 "--batch-size", "64", "--trust-program", "--no-progress"]
    results = run_multiprocess(_score_with_the_command_as_a_torchrun_rank, world_size=3, arguments=arguments)
    assert [result["code"] for result in results] == [0, 0, 0]
    assert [bool(result["stdout"]) for result in results] == [True, False, False]
    report = json.loads(results[0]["stdout"])
    assert report["rows"] == expected["rows"] and report["ranks"] == 3 and expected["ranks"] == 1
    assert report["auc"] == pytest.approx(expected["auc"]) and report["logloss"] == pytest.approx(expected["logloss"])
    assert report["cold/num_samples"] == expected["cold/num_samples"]
    scores, one_process = pq.read_table(output), pq.read_table(alone)
    assert scores.schema == one_process.schema
    for name in ("row_id", "label"):
        assert scores[name].to_pylist() == one_process[name].to_pylist()
    for name in ("logit", "probability"):  # batches cut at other rows: the same values to float rounding
        torch.testing.assert_close(torch.tensor(scores[name].to_numpy()), torch.tensor(one_process[name].to_numpy()))
    assert os.listdir(os.path.dirname(output)) == ["scores.parquet"]  # no temp file left


def _score_as_a_rank(schema_path: str, artifact: str, split: str, output: str) -> Dict[str, Any]:
    """One rank: ``score_split`` in a gloo group; an error comes back as its type and message."""
    from recsys_llm.train.distributed import init_distributed

    init_distributed("cpu")
    schema = DatasetSchema.load(schema_path)
    try:
        return score_split(ServedModel.load(artifact, trust_program=True), schema, split, batch_size=64,
                           output=output, progress=False)
    except Exception as error:
        return {"error": f"{type(error).__name__}: {error}"}


def _score_on_a_clock_of_a_second_per_call(schema_path: str, artifact: str, split: str) -> Dict[str, Any]:
    """One rank scoring ``split`` with ``time.perf_counter`` a second further at each call (so each batch
    takes the artifact one second): the report and this rank's own rows and batches."""
    import itertools
    import time

    from recsys_llm.train.distributed import init_distributed

    init_distributed("cpu")
    served = ServedModel.load(artifact, trust_program=True)
    own = {"rows": 0, "batches": 0}
    score = served.logits

    def counted(dense: torch.Tensor, sparse: Any) -> torch.Tensor:
        logits = score(dense, sparse)
        own["rows"] += logits.numel()
        own["batches"] += 1
        return logits

    served.logits = counted  # type: ignore[method-assign]
    clock = itertools.count()
    time.perf_counter = lambda: float(next(clock))  # this spawned process's own clock
    report = score_split(served, DatasetSchema.load(schema_path), split, batch_size=64, progress=False)
    return {"report": report, **own}


@pytest.mark.multiprocess
def test_samples_per_second_of_several_ranks_are_their_rates_summed(exported: Dict[str, str], tmp_path) -> None:
    """The ranks score their shares side by side: the throughput is the sum of each rank's rows per second of the
    artifact's time, on every rank (not rank 0's rate, nor their mean)."""
    split = str(tmp_path / "three_rows.parquet")  # one rank scores one row, the other two: a batch each
    pq.write_table(_split_table(DatasetSchema.load(exported["data"]), "test").slice(0, 3), split)
    results = run_multiprocess(_score_on_a_clock_of_a_second_per_call, world_size=2, schema_path=exported["data"],
                               artifact=exported["artifact"], split=split)
    rates = [result["rows"] / result["batches"] for result in results]
    assert sorted(rates) == [1.0, 2.0]  # a mean or one rank's rate would not pass
    for result in results:
        assert result["report"]["samples_per_s"] == pytest.approx(sum(rates))
        assert result["report"]["rows"] == sum(r["rows"] for r in results)


@pytest.mark.multiprocess
def test_a_batch_one_rank_refuses_fails_every_rank_and_leaves_no_scores_file(exported: Dict[str, str],
                                                                            tmp_path) -> None:
    """The last rank's share holds an id beyond the schema's table: its reader names the file and column, the others
    say that another rank failed (none waits for it), and rank 0 leaves nothing at the output."""
    schema = DatasetSchema.load(exported["data"])
    table = _split_table(schema, "test")
    items = table["item_id"].to_pylist()
    items[-1] = schema.field("item_id").cardinality + 5
    split = str(tmp_path / "bad_test.parquet")
    table = table.set_column(table.column_names.index("item_id"), "item_id", pa.array(items, pa.int64()))
    pq.write_table(table.replace_schema_metadata(field_specs_metadata(schema.fields)), split, row_group_size=128)
    output = tmp_path / "out" / "scores.parquet"
    output.parent.mkdir()
    results = run_multiprocess(_score_as_a_rank, world_size=2, schema_path=exported["data"],
                               artifact=exported["artifact"], split=split, output=str(output))
    assert "failed on another rank" in results[0]["error"]
    assert results[1]["error"].startswith("DataError: ") and f"{split}: column 'item_id'" in results[1]["error"]
    assert os.listdir(output.parent) == []


@pytest.mark.multiprocess
def test_a_rank_without_rows_sends_none_and_the_file_holds_every_row(exported: Dict[str, str], tmp_path) -> None:
    """Two rows on three ranks: rank 0's share is empty; it still writes the other ranks' rows."""
    schema = DatasetSchema.load(exported["data"])
    split = str(tmp_path / "two_rows.parquet")
    pq.write_table(_split_table(schema, "test").slice(0, 2), split)
    output = str(tmp_path / "scores.parquet")
    results = run_multiprocess(_score_as_a_rank, world_size=3, schema_path=exported["data"],
                               artifact=exported["artifact"], split=split, output=output)
    assert [result["rows"] for result in results] == [2, 2, 2]
    logits = torch.load(exported["task_logits"], weights_only=True)[:2]
    torch.testing.assert_close(torch.tensor(pq.read_table(output)["logit"].to_numpy()), logits)


def test_the_cold_item_column_of_the_run_is_the_one_scored(exported: Dict[str, str], tmp_path, capsys) -> None:
    """A run's data.cold_item_column other than is_cold_item: `evaluate` reported its cold/... metrics, `score`
    silently none (it read the default name alone)."""
    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    expected = score_split(served, schema, "test", progress=False)
    table = _split_table(schema, "test")
    table = table.rename_columns(["is_new" if name == "is_cold_item" else name for name in table.column_names])
    split = str(tmp_path / "renamed.parquet")
    pq.write_table(table, split)
    renamed = dataclasses.replace(schema, extra_columns=["is_new"])
    report = score_split(served, renamed, split, progress=False, cold_item_column="is_new")
    assert report["cold/num_samples"] == expected["cold/num_samples"] > 0
    assert report["cold/auc"] == expected["cold/auc"]
    assert "cold/auc" not in score_split(served, schema, "test", progress=False, cold_item_column="")
    with pytest.raises(ValueError, match=r"cold item column 'is_nwe': the data has no such extra column"):
        score_split(served, renamed, split, progress=False, cold_item_column="is_nwe")
    assert cli_main(["score", "--artifact", exported["artifact"], "--data", exported["data"], "--split", "test",
                     "--trust-program", "--no-progress", "--cold-item-column", ""]) == 0
    assert "cold/auc" not in json.loads(capsys.readouterr().out)


def _stamped(path, stamp: str) -> None:
    table = pa.table({"logit": pa.array([0.5], pa.float32())})
    pq.write_table(table.replace_schema_metadata({SCORES_STAMP_KEY: stamp.encode("utf-8")}), str(path))


def test_only_this_commands_own_earlier_scores_are_replaced(tmp_path) -> None:
    """A stamped scores file passes the check before the artifact is loaded (no stamp yet) without being taken as
    this command's own; with the stamp it is replaced where the stamps agree, refused where they differ; a link to
    such a file is no scores file of this command's."""
    from recsys_llm.serving.scoring import check_scores_output

    output = tmp_path / "scores.parquet"
    _stamped(output, '{"export_id": "a"}')
    assert check_scores_output(str(output)) is False
    assert check_scores_output(str(output), '{"export_id": "a"}') is True
    with pytest.raises(FileExistsError, match=r"exists \(the scores of another artifact or other data\)"):
        check_scores_output(str(output), '{"export_id": "b"}')
    link = tmp_path / "link.parquet"
    link.symlink_to(output)
    with pytest.raises(FileExistsError, match=r"link\.parquet: exists; the scores are written to a new file"):
        check_scores_output(str(link), '{"export_id": "a"}')


def test_the_scores_stamp_names_the_export_and_the_splits_rows(exported: Dict[str, str]) -> None:
    """Other rows behind the same split name (the data prepared again) are other data: the stamp holds the split's
    fingerprint, not its name."""
    from recsys_llm.data.parquet_files import split_fingerprint
    from recsys_llm.serving.scoring import scores_stamp

    schema = DatasetSchema.load(exported["data"])
    served = ServedModel.load(exported["artifact"], trust_program=True)
    assert json.loads(scores_stamp(served, schema, "test")) == {"export_id": served.export_id,
                                                                 "split": split_fingerprint(schema, "test")}


def test_an_existing_output_that_cannot_be_read_is_refused_as_existing(tmp_path, monkeypatch) -> None:
    """A file whose metadata cannot be read (another user's, unreadable) is no scores file of this command's."""
    from recsys_llm.serving import scoring

    output = tmp_path / "scores.parquet"
    _stamped(output, '{"export_id": "a"}')

    def unreadable(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(scoring.pq, "read_schema", unreadable)
    with pytest.raises(FileExistsError, match=r"scores\.parquet: exists; the scores are written to a new file"):
        scoring.check_scores_output(str(output), '{"export_id": "a"}')
