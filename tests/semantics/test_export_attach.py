"""``semantics export --attach-dir``: split copies with the vectors, written whole or not at all,
and on several ranks only once every rank has finished."""

import hashlib
import os
import re
import warnings
from typing import Dict, List

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.cli import main
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from tests.multiprocess import run_multiprocess
from tests.tiny_models import save_tiny_bert


def _data(root: str) -> str:
    rng = np.random.default_rng(0)
    os.makedirs(root)
    for split, n in (("train", 24), ("test", 8)):
        pq.write_table(pa.table({
            "row_id": pa.array(np.arange(n) + (0 if split == "train" else 1000), pa.int64()),
            "user_id": pa.array(rng.integers(0, 3, n), pa.int64()),
            "item_id": pa.array(rng.integers(0, 5, n), pa.int64()),
            "label": pa.array(rng.integers(0, 2, n), pa.int64()),
        }), os.path.join(root, f"{split}.parquet"))
    DatasetSchema("t", [FieldSpec("user_id", "sparse", 3, description="user id"),
                        FieldSpec("item_id", "sparse", 5, description="item id")],
                  splits={"train": "train.parquet", "test": "test.parquet"}, root=root).save(
        os.path.join(root, "schema.json"))
    return root


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> Dict[str, str]:
    """A data set and a CTR-adapted tiny BERT (heads only, a few rows)."""
    root = tmp_path_factory.mktemp("attach")
    data, llm = _data(str(root / "data")), str(root / "llm")
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model",
                 save_tiny_bert(str(root / "bert")), "--tuning", "heads", "--representation-dim", "4",
                 "--hidden-dim", "8", "--batch-size", "8"]) == 0
    return {"data": data, "llm": llm}


def _digests(directory: str) -> Dict[str, str]:
    return {name: hashlib.sha256(open(os.path.join(directory, name), "rb").read()).hexdigest()
            for name in sorted(os.listdir(directory))}


def _export(adapted: Dict[str, str], vectors: str, *extra: str) -> List[str]:
    return ["semantics", "export", "--schema", adapted["data"], "--llm", adapted["llm"], "--output-dir", vectors,
            "--chunk-rows", "8", *extra]


def test_a_failed_attach_leaves_the_earlier_attach_dir_as_it_was(adapted, tmp_path) -> None:
    attached, vectors = str(tmp_path / "attached"), str(tmp_path / "vectors")
    assert main(_export(adapted, vectors, "--attach-dir", attached)) == 0
    before = _digests(attached)
    # the train split's row keys change after the export: "test" attaches first, then "train" fails
    data = adapted["data"]
    train = pq.read_table(os.path.join(data, "train.parquet"))
    shifted = train.set_column(0, "row_id", pa.array(np.arange(train.num_rows) + 500, pa.int64()))
    moved = os.path.join(str(tmp_path), "train.parquet")
    os.replace(os.path.join(data, "train.parquet"), moved)
    try:
        pq.write_table(shifted, os.path.join(data, "train.parquet"))
        assert main(_export(adapted, vectors, "--attach-dir", attached, "--column", "other_vector")) == 2
    finally:
        os.replace(moved, os.path.join(data, "train.parquet"))
    assert _digests(attached) == before  # test.parquet was not replaced with the other column


def test_attaching_shows_a_bar_over_each_splits_rows(adapted, tmp_path, capsys) -> None:
    """The rewrite of every split with its vectors, the export's longest step at scale, said nothing."""
    assert main(_export(adapted, str(tmp_path / "vectors"), "--attach-dir", str(tmp_path / "attached"))) == 0
    err = capsys.readouterr().err
    assert re.search(r"attaching vectors to train\.parquet: 100%.* 24/24 ", err), err
    assert re.search(r"attaching vectors to test\.parquet: 100%.* 8/8 ", err), err


def test_an_attach_dir_holding_the_data_is_refused_before_any_work(adapted, tmp_path) -> None:
    vectors = str(tmp_path / "vectors")
    before = _digests(adapted["data"])
    assert main(_export(adapted, vectors, "--attach-dir", adapted["data"])) == 2
    assert not os.path.exists(vectors)
    assert _digests(adapted["data"]) == before


@pytest.mark.parametrize("column, message", [
    ("", r"--column '': expected the name of the attached vector column"),
    ("label", r"train\.parquet: already has a column 'label'; --column names the attached vector column"),
])
def test_a_column_name_attaching_would_refuse_is_refused_before_the_export(adapted, tmp_path, capsys, column,
                                                                          message) -> None:
    """Not after the LLM has exported every row (or, for '', a column without a name)."""
    vectors = str(tmp_path / "vectors")
    assert main(_export(adapted, vectors, "--attach-dir", str(tmp_path / "attached"), "--column", column)) == 2
    assert re.search(message, capsys.readouterr().err)
    assert not os.path.exists(vectors) and not os.path.exists(tmp_path / "attached")


def test_splits_given_as_files_are_refused_with_an_attach_dir_before_the_export(adapted, tmp_path, capsys) -> None:
    """--attach-dir copies the schema's splits and writes a schema naming them: a Parquet file given in
    --splits (which the export reads) was refused after the LLM had exported all its rows."""
    vectors, attached = str(tmp_path / "vectors"), str(tmp_path / "attached")
    train = os.path.join(adapted["data"], "train.parquet")
    assert main(_export(adapted, vectors, "--splits", train, "--attach-dir", attached)) == 2
    assert re.search(rf"--splits \[{re.escape(repr(train))}\] with --attach-dir: not splits of schema 't' "
                     r"\(splits \['test', 'train'\]\)", capsys.readouterr().err)
    assert not os.path.exists(vectors) and not os.path.exists(attached)


def test_splits_leaving_one_out_are_refused_with_an_attach_dir_before_the_export(adapted, tmp_path, capsys) -> None:
    """The attached schema lists the vector column as every split's extra: with ``--splits train`` its test split
    pointed at the original file without the column, which training found only when it read that split."""
    vectors, attached = str(tmp_path / "vectors"), str(tmp_path / "attached")
    assert main(_export(adapted, vectors, "--splits", "train", "--attach-dir", attached)) == 2
    assert re.search(r"--splits \['train'\] with --attach-dir leaves out split\(s\) \['test'\] of schema 't'",
                     capsys.readouterr().err)
    assert not os.path.exists(vectors) and not os.path.exists(attached)


def test_an_entity_s_text_comes_from_its_first_training_row(adapted, tmp_path) -> None:
    """The splits were read in sorted order, ``test`` before ``train``: an item's text came from its first test row
    where it had one, so the vectors of a test item's (here: its first user's) text went into training."""
    from recsys_llm.semantics.vector_reader import read_vectors

    entity = ("--granularity", "entity", "--entity-field", "item_id", "--entity-fields", "item_id", "user_id")
    every_split, train_only = str(tmp_path / "every_split"), str(tmp_path / "train_only")
    assert main(_export(adapted, every_split, *entity)) == 0
    assert main(_export(adapted, train_only, *entity, "--splits", "train")) == 0
    keys, vectors = read_vectors(every_split)
    train_keys, train_vectors = read_vectors(train_only)
    np.testing.assert_array_equal(keys, train_keys)  # every item of the test split is in train
    np.testing.assert_array_equal(vectors, train_vectors)


def test_an_export_that_read_the_splits_sorted_resumes_in_that_order(adapted, tmp_path) -> None:
    """Before 2026-12-05 ``semantics export`` read the splits sorted by default (test before train), since then in
    the schema's order: the same command run again after an upgrade refused the export as one 'of other rows'."""
    vectors, fresh = str(tmp_path / "vectors"), str(tmp_path / "fresh")
    assert main(_export(adapted, vectors, "--splits", "test", "train")) == 0  # as the earlier default read them
    os.rename(os.path.join(vectors, "_manifest.json"), os.path.join(vectors, "manifest.json"))  # as it was named then
    before = _digests(vectors)
    with pytest.warns(UserWarning, match=r"holds an export made by a recsys_llm before 2026-12-05, which read the "
                                         r"splits sorted: it is resumed in that order, --splits test train"):
        assert main(_export(adapted, vectors)) == 0
    assert _digests(vectors) == before  # every chunk kept
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an export in the schema's order is resumed as it is, without a word
        assert main(_export(adapted, fresh)) == 0
        assert main(_export(adapted, fresh)) == 0


def test_texts_the_export_cuts_are_warned_about(adapted, tmp_path) -> None:
    """``adapt`` warned of the texts it cut, but only of its sample; an entity export encodes other texts (the entity's
    fields alone), and nothing said that their vectors missed the fields written last."""
    short = str(tmp_path / "short_llm")
    with pytest.warns(UserWarning, match="longer than max_length 8 tokens"):
        assert main(["semantics", "adapt", "--schema", adapted["data"], "--output-dir", short, "--model",
                     save_tiny_bert(str(tmp_path / "bert")), "--tuning", "heads", "--representation-dim", "4",
                     "--hidden-dim", "8", "--batch-size", "8", "--max-length", "8"]) == 0
    export = ["semantics", "export", "--schema", adapted["data"], "--llm", short, "--chunk-rows", "8"]
    items = ("--granularity", "entity", "--entity-field", "item_id", "--entity-fields", "item_id", "user_id")
    with pytest.warns(UserWarning, match=r"semantics export: 5 of the 5 texts encoded here are longer than the LLM's "
                                         r"max_length 8 tokens \(semantics adapt --max-length\) and were cut"):
        assert main(export + ["--output-dir", str(tmp_path / "items"), *items]) == 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # texts that fit are not warned about
        assert main(_export(adapted, str(tmp_path / "fitting"), *items)) == 0


def _export_on_two_ranks(adapted: Dict[str, str], vectors: str, attached: str) -> Dict[str, object]:
    import recsys_llm.semantics.schema_export as schema_export

    # a day: a rank 0 that waited for the timeout instead of the failure would hang past pytest's --timeout
    args = _export(adapted, vectors, "--attach-dir", attached, "--attach-timeout", "86400")
    if os.environ["RANK"] == "1":  # this rank dies in its export
        def fail(*_args, **_kwargs):
            raise RuntimeError("rank 1 died")

        schema_export.export_schema_vectors = fail
        try:
            main(args)
        except RuntimeError as exc:
            return {"error": str(exc)}
        return {"error": None}
    try:
        main(args)
        error = None
    except RuntimeError as exc:
        error = str(exc)
    return {"error": error}


@pytest.mark.multiprocess
def test_rank_0_does_not_wait_for_a_rank_that_died(adapted, tmp_path) -> None:
    attached = str(tmp_path / "attached")
    rank0, rank1 = run_multiprocess(_export_on_two_ranks, world_size=2, adapted=adapted,
                                    vectors=str(tmp_path / "vectors"), attached=attached)
    assert rank1["error"] == "rank 1 died"
    assert rank0["error"] is not None and "another rank failed" in rank0["error"]
    assert not os.path.exists(attached)


@pytest.mark.multiprocess
def test_two_ranks_attach_what_one_rank_attaches(adapted, tmp_path) -> None:
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    assert main(_export(adapted, str(tmp_path / "v1"), "--attach-dir", one)) == 0
    run_multiprocess(main, world_size=2, argv=_export(adapted, str(tmp_path / "v2"), "--attach-dir", two))
    for split in ("train", "test"):
        assert pq.read_table(os.path.join(one, f"{split}.parquet")).equals(
            pq.read_table(os.path.join(two, f"{split}.parquet")))


def _export_from_own_working_dir(adapted: Dict[str, str], root: str) -> Dict[str, object]:
    """The export into the relative --output-dir ``vectors``, each rank from its own working directory (as if
    each host had its own disk); returns the exit code and the error line."""
    import contextlib
    import io

    from recsys_llm.train.run_records import SHARED_CHECK_WAIT_ENV

    os.environ[SHARED_CHECK_WAIT_ENV] = "1"
    working_dir = os.path.join(root, f"host{os.environ['RANK']}")
    os.makedirs(working_dir)
    os.chdir(working_dir)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = main(_export(adapted, "vectors", "--attach-dir", os.path.join(working_dir, "attached")))
    return {"code": code, "error": stderr.getvalue().splitlines()[0], "entries": sorted(os.listdir(working_dir))}


@pytest.mark.multiprocess
def test_an_output_dir_that_not_every_rank_sees_is_refused_before_the_llm_loads(adapted, tmp_path) -> None:
    """Each rank would write its chunks on its own host, and rank 0 would wait for the others' chunks, then find
    them missing and say to re-run the export, which finds every rank's own chunks done."""
    rank0, rank1 = run_multiprocess(_export_from_own_working_dir, world_size=2, adapted=adapted, root=str(tmp_path))
    assert rank0["code"] == rank1["code"] == 2 and rank0["error"] == rank1["error"]
    assert rank0["error"].startswith("recsys-llm semantics export: error: vectors: --output-dir is not shared by every "
                                     "rank: rank 1 on ")
    assert "Every rank writes its chunks into --output-dir, and rank 0 attaches them all: put it on a volume" in (
        rank0["error"])
    assert rank0["entries"] == rank1["entries"] == []  # no chunk, no check file left


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_shows_the_export_bar(adapted, tmp_path, monkeypatch, capsys, rank) -> None:
    """Under torchrun every rank writes to the same terminal: rank 0's bar alone, not one per rank
    overwriting the others' line."""
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(_export(adapted, str(tmp_path / "vectors"))) == 0
    captured = capsys.readouterr()
    assert (f"export vectors (rank {rank}/2)" in captured.err) == (rank == "0"), captured.err
    assert f'"rank": {rank}, "world_size": 2' in captured.out  # each rank still says what it wrote


def test_an_adapt_and_export_written_inside_the_model_directory_agree_and_resume(tmp_path, capsys) -> None:
    """``--output-dir <model>/ctr_llm`` and ``<model>/vectors``: their files changed the base model's revision,
    so the vectors recorded another revision than provenance.json and a resumed export was refused as one
    of other settings."""
    import json

    data, model = _data(str(tmp_path / "data")), save_tiny_bert(str(tmp_path / "bert"))
    llm, vectors = os.path.join(model, "ctr_llm"), os.path.join(model, "vectors")
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model", model, "--tuning", "heads",
                 "--representation-dim", "4", "--hidden-dim", "8", "--batch-size", "8"]) == 0
    export = _export({"data": data, "llm": llm}, vectors)
    assert main(export) == 0
    with open(os.path.join(llm, "provenance.json"), encoding="utf-8") as handle:
        adapted = json.load(handle)["revision"]
    with open(os.path.join(vectors, "_manifest.json"), encoding="utf-8") as handle:
        assert json.load(handle)["provenance"]["revision"] == adapted
    last = sorted(name for name in os.listdir(vectors) if name.startswith("chunk-"))[-1]
    os.remove(os.path.join(vectors, last))  # as a killed export leaves it
    capsys.readouterr()
    assert main(export) == 0, capsys.readouterr().err
    assert os.path.isfile(os.path.join(vectors, last))


def test_adapt_reads_a_split_directory_s_parquet_files_only(tmp_path) -> None:
    """A split directory is its *.parquet files (data.parquet_files), as train and export read it: a temp file a
    killed write left beside them is no data, and adapt read the directory whole, failing on it with Arrow's
    "magic bytes not found"."""
    data = _data(str(tmp_path / "data"))
    os.makedirs(os.path.join(data, "train"))
    os.replace(os.path.join(data, "train.parquet"), os.path.join(data, "train", "part-0.parquet"))
    with open(os.path.join(data, "train", "part-1.parquet.0123abcd.tmp"), "wb") as handle:
        handle.write(b"PAR1 cut short")
    schema = DatasetSchema.load(os.path.join(data, "schema.json"))
    schema.splits["train"] = "train"
    schema.save(os.path.join(data, "schema.json"))
    llm = str(tmp_path / "llm")
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model",
                 save_tiny_bert(str(tmp_path / "bert")), "--tuning", "heads", "--representation-dim", "4",
                 "--hidden-dim", "8", "--batch-size", "8"]) == 0
    assert os.path.isfile(os.path.join(llm, "heads.safetensors"))


def test_an_export_resumes_after_its_base_model_moved(tmp_path) -> None:
    """The base model's path in the vectors' provenance (``model``) is a name: with the same files (``revision``) at
    another path, the export resumes; it was refused (model: stored 'models/bert', expected 'elsewhere/bert-copy')."""
    import json
    import shutil

    from recsys_llm.semantics.vector_export import ProvenanceError, check_provenance

    data, llm = _data(str(tmp_path / "data")), str(tmp_path / "llm")
    bert = save_tiny_bert(str(tmp_path / "models" / "bert"))
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model", bert, "--tuning", "heads",
                 "--representation-dim", "4", "--hidden-dim", "8", "--batch-size", "8"]) == 0
    vectors = str(tmp_path / "vectors")
    export = ["semantics", "export", "--schema", data, "--llm", llm, "--output-dir", vectors, "--chunk-rows", "8"]
    assert main(export) == 0
    whole = pq.read_table(os.path.join(vectors, "chunk-00003.parquet"))
    os.remove(os.path.join(vectors, "chunk-00003.parquet"))  # as if killed before the last chunk
    moved = shutil.copytree(bert, str(tmp_path / "elsewhere" / "bert-copy"))
    shutil.rmtree(bert)
    with open(os.path.join(llm, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    with open(os.path.join(llm, "config.json"), "w", encoding="utf-8") as handle:
        json.dump({**config, "model_path": moved}, handle)
    assert main(export) == 0
    assert pq.read_table(os.path.join(vectors, "chunk-00003.parquet")).equals(whole)
    # other files under the same name are still other vectors
    with pytest.raises(ProvenanceError, match=r"revision: stored 'a', expected 'b'"):
        check_provenance({"model": "m/x", "revision": "a"}, {"model": "m/x", "revision": "b"}, "vectors")
    check_provenance({"model": "m/x", "revision": "a"}, {"model": "n/y", "revision": "a"}, "vectors")


def test_a_split_directory_of_days_attached_by_two_adapted_llms_is_refused(adapted, tmp_path) -> None:
    """Each attach records its export's provenance in every file it writes; a split directory gathered from two
    attaches (a day attached after the LLM was adapted again) was judged by its first file alone."""
    from recsys_llm.data.parquet_files import parquet_files
    from recsys_llm.semantics.vector_reader import attached_vectors_provenance

    other_llm = str(tmp_path / "other_llm")
    assert main(["semantics", "adapt", "--schema", adapted["data"], "--output-dir", other_llm, "--model",
                 save_tiny_bert(str(tmp_path / "bert")), "--tuning", "heads", "--representation-dim", "4",
                 "--hidden-dim", "6", "--batch-size", "8"]) == 0
    days = tmp_path / "days"
    days.mkdir()
    for day, llm in (("day1", adapted["llm"]), ("day2", other_llm)):
        attached = str(tmp_path / f"attached_{day}")
        assert main(["semantics", "export", "--schema", adapted["data"], "--llm", llm, "--output-dir",
                     str(tmp_path / f"vectors_{day}"), "--attach-dir", attached]) == 0
        os.replace(os.path.join(attached, "train.parquet"), str(days / f"{day}.parquet"))
        os.replace(os.path.join(attached, "test.parquet"), str(tmp_path / f"test_{day}.parquet"))

    one_export = attached_vectors_provenance([str(days / "day1.parquet"), str(tmp_path / "test_day1.parquet")],
                                             "llm_vector")
    assert one_export is not None and one_export["column"] == "llm_vector"
    with pytest.raises(ValueError) as refusal:
        attached_vectors_provenance(parquet_files(str(days)), "llm_vector")
    assert str(refusal.value).startswith(f"{days / 'day2.parquet'}: vectors do not match the expected provenance (")
    assert "weights_sha256: stored" in str(refusal.value)
    assert f"which {days / 'day1.parquet'} records: a model would read vectors of two adapted LLMs" in str(
        refusal.value)


def test_adapt_s_note_goes_to_stderr_and_leaves_its_json_alone(adapted, tmp_path, capsys) -> None:
    """The note on a --representation-dim no multiple of 4 came first on stdout: `... | jq` of the summary failed."""
    import json

    capsys.readouterr()
    assert main(["semantics", "adapt", "--schema", adapted["data"], "--output-dir", str(tmp_path / "llm"), "--model",
                 save_tiny_bert(str(tmp_path / "bert")), "--tuning", "heads", "--representation-dim", "6",
                 "--hidden-dim", "8", "--batch-size", "8"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["output_dir"] == str(tmp_path / "llm")
    assert "--representation-dim 6 is no multiple of 4" in err


def test_an_entity_export_reusing_an_earlier_one_gives_the_vectors_of_a_full_export(adapted, tmp_path) -> None:
    """`--reuse` keeps the earlier export's vectors and encodes the other ids with the same adapted LLM: the result
    is that of one export of every id (an entity's text is its id alone here, so no text changed between them)."""
    from recsys_llm.semantics.vector_reader import read_vectors

    entity = ("--granularity", "entity", "--entity-field", "item_id")
    earlier, reusing, full = (str(tmp_path / name) for name in ("earlier", "reusing", "full"))
    assert main(_export(adapted, earlier, *entity, "--splits", "test")) == 0
    assert main(_export(adapted, reusing, *entity, "--reuse", earlier)) == 0
    assert main(_export(adapted, full, *entity)) == 0
    (keys, vectors), (earlier_keys, _) = read_vectors(reusing), read_vectors(earlier)
    full_keys, full_vectors = read_vectors(full)
    assert set(earlier_keys) < set(keys)
    np.testing.assert_array_equal(keys, full_keys)
    np.testing.assert_allclose(vectors, full_vectors, rtol=0, atol=1e-6)


def test_a_split_of_days_attached_with_the_base_model_moved_passes_and_one_without_a_record_is_named(tmp_path) -> None:
    """The files of a split are of one export where their records differ in where the base model lay alone (the same
    files, ``revision``: moved between days); a file recording nothing beside one that records is named as such."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_llm.semantics.vector_reader import ROW_VECTORS_METADATA_KEY, attached_vectors_provenance

    record = {"column": "llm_vector", "model": "models/bert", "revision": "r1", "weights_sha256": "w"}

    def write(name: str, provenance) -> str:
        table = pa.table({"x": [1]})
        if provenance is not None:
            table = table.replace_schema_metadata({ROW_VECTORS_METADATA_KEY: json.dumps(provenance).encode()})
        path = str(tmp_path / name)
        pq.write_table(table, path)
        return path

    day1 = write("day1.parquet", record)
    moved = write("day2.parquet", dict(record, model="elsewhere/bert"))
    assert attached_vectors_provenance([day1, moved], "llm_vector") == record
    other = write("day3.parquet", dict(record, model="elsewhere/bert", revision="r2"))
    with pytest.raises(ValueError, match=r"model: stored .*; revision: stored .r2., expected .r1."):
        attached_vectors_provenance([day1, other], "llm_vector")
    bare = write("day0.parquet", None)
    with pytest.raises(ValueError) as refusal:
        attached_vectors_provenance([bare, day1], "llm_vector")
    assert str(refusal.value).startswith(f"{bare}: records no provenance of its 'llm_vector' vectors")


def test_a_split_file_recording_a_setting_the_first_does_not_is_refused_and_other_columns_records_are_not_read(
        tmp_path) -> None:
    """A later file whose export records a setting the first file's does not (an adapter, a projection) is of another
    export: every key of either record counts, not only the first file's. And a file's record of vectors attached as
    another column says nothing of ``column``'s."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_llm.semantics.vector_reader import ROW_VECTORS_METADATA_KEY, attached_vectors_provenance

    record = {"column": "llm_vector", "model": "models/bert", "revision": "r1", "weights_sha256": "w"}

    def write(name: str, provenance) -> str:
        metadata = {ROW_VECTORS_METADATA_KEY: json.dumps(provenance).encode()}
        table = pa.table({"x": [1]}).replace_schema_metadata(metadata)
        path = str(tmp_path / name)
        pq.write_table(table, path)
        return path

    day1 = write("day1.parquet", record)
    adapted = write("day2.parquet", dict(record, adapter="a1"))
    with pytest.raises(ValueError, match=r"adapter: stored .a1., expected None"):
        attached_vectors_provenance([day1, adapted], "llm_vector")
    assert attached_vectors_provenance([day1], "other_vector") is None
    assert attached_vectors_provenance([write("day3.parquet", dict(record, column="other_vector"))],
                                       "llm_vector") is None
