"""``teacher_output_stream.TeacherColumnsWriter`` / ``write_with_columns``: a copy of a split with the
teacher's two columns, row by row.

The whole ``teacher-outputs`` command (sharded teacher, two ranks) runs in ``tests/test_methods_e2e.py``.
"""

import contextlib
import io
import json
import errno
import os
import re
from typing import Any, Dict, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.train import teacher_output_stream
from recsys_llm.train.teacher_output_stream import (
    LOGITS_COLUMN,
    REPRESENTATION_COLUMN,
    OutputSpill,
    TeacherColumnsWriter,
    remove_spills,
    write_on_rank_0,
    write_with_columns,
)
from recsys_llm.train.teacher_outputs import (
    DATA_FINGERPRINTS_KEY,
    TEACHER_FILE,
    check_output_dir,
    check_same_teacher,
    source_fingerprints,
    teacher_record,
)
from tests.multiprocess import run_multiprocess

DEEPFM_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs",
                             "synthetic_deepfm.yaml")


def test_the_copy_takes_the_outputs_row_by_row_and_refuses_another_row_order(tmp_path) -> None:
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"row_id": np.arange(100, 110, dtype=np.int64), "x": np.arange(10.0)}), source,
                   row_group_size=4)
    logits = np.linspace(-1, 1, 10).astype(np.float32)
    representations = np.arange(20, dtype=np.float32).reshape(10, 2)
    keys = np.arange(100, 110, dtype=np.int64)
    write_with_columns(source, target, logits, representations, "row_id", keys)
    copy = pq.read_table(target)
    assert copy.column_names == ["row_id", "x", LOGITS_COLUMN, REPRESENTATION_COLUMN]
    np.testing.assert_array_equal(copy.column("row_id").to_numpy(), keys)
    np.testing.assert_array_equal(copy.column(LOGITS_COLUMN).to_numpy(), logits)
    np.testing.assert_array_equal(np.array(copy.column(REPRESENTATION_COLUMN).to_pylist()), representations)

    swapped = keys.copy()
    swapped[[5, 6]] = swapped[[6, 5]]  # outputs of rows 5 and 6 (row group 1) in each other's place
    other = str(tmp_path / "other.parquet")
    with pytest.raises(ValueError, match=r"split\.parquet: row group 1: row keys 'row_id' differ from the reader's "
                                         r"order"):
        write_with_columns(source, other, logits, representations, "row_id", swapped)
    assert not os.path.exists(other)
    with pytest.raises(ValueError, match=r"split\.parquet: 10 rows, but the teacher produced 9 outputs"):
        write_with_columns(source, other, logits[:9], representations[:9], "row_id", keys[:9])



def test_a_split_that_holds_an_earlier_teachers_columns_gets_this_teachers_in_their_place(tmp_path) -> None:
    """A teacher trained on teacher-outputs copies (they keep the LLM vectors, so a second gain network or
    a joint run may train there) reads split files that hold an earlier teacher's two columns: the copy
    used to hold both teachers' under the same names, which no reader can select (pyarrow: multiple
    matches), and the command then failed after writing every copy."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    earlier = pa.FixedSizeListArray.from_arrays(pa.array(np.ones(15, np.float32)), 3)
    pq.write_table(pa.table({"row_id": np.arange(5, dtype=np.int64), LOGITS_COLUMN: np.ones(5, np.float32),
                             REPRESENTATION_COLUMN: earlier, "x": np.arange(5.0)}), source, row_group_size=2)
    logits = np.arange(5, dtype=np.float32)
    representations = np.arange(10, dtype=np.float32).reshape(5, 2)
    write_with_columns(source, target, logits, representations, "row_id", np.arange(5, dtype=np.int64))
    copy = pq.read_table(target)
    assert copy.column_names == ["row_id", "x", LOGITS_COLUMN, REPRESENTATION_COLUMN]
    np.testing.assert_array_equal(copy.column(LOGITS_COLUMN).to_numpy(), logits)
    assert copy.schema.field(REPRESENTATION_COLUMN).type.list_size == 2
    np.testing.assert_array_equal(np.array(copy.column(REPRESENTATION_COLUMN).to_pylist()), representations)

    empty, empty_copy = str(tmp_path / "empty.parquet"), str(tmp_path / "empty_copy.parquet")
    pq.ParquetWriter(empty, pq.ParquetFile(source).schema_arrow).close()  # no row groups
    write_with_columns(empty, empty_copy, np.zeros(0, np.float32), np.zeros((0, 2), np.float32), "row_id", None)
    assert pq.ParquetFile(empty_copy).schema_arrow.names == ["row_id", "x", LOGITS_COLUMN, REPRESENTATION_COLUMN]


def test_the_writer_writes_each_row_group_once_its_outputs_are_there(tmp_path) -> None:
    """Rank 0 adds its share, then each other rank's: a row group is written as soon as it is
    complete, so the writer never holds more than the outputs it was given plus a row group."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"row_id": np.arange(10, dtype=np.int64)}), source, row_group_size=4)
    logits = np.arange(10, dtype=np.float32)
    representations = np.arange(30, dtype=np.float32).reshape(10, 3)
    writer = TeacherColumnsWriter(source, target, "row_id")
    pending = []
    for start, stop in ((0, 3), (3, 3), (3, 9), (9, 10)):  # shares of 3, 0, 6 and 1 rows
        writer.add(logits[start:stop], representations[start:stop], np.arange(start, stop, dtype=np.int64))
        pending.append(writer.pending_rows)
    assert pending == [3, 3, 1, 0]  # groups of 4, 4 and 2 rows: two written at the 3rd share, one at the 4th
    assert not os.path.exists(target)
    writer.finish()
    copy = pq.read_table(target)
    np.testing.assert_array_equal(copy.column(LOGITS_COLUMN).to_numpy(), logits)
    np.testing.assert_array_equal(np.array(copy.column(REPRESENTATION_COLUMN).to_pylist()), representations)
    assert pq.ParquetFile(target).metadata.num_row_groups == 3


def test_the_writer_refuses_more_outputs_than_rows_and_abort_leaves_no_file(tmp_path) -> None:
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"x": np.arange(5.0)}), source, row_group_size=2)
    writer = TeacherColumnsWriter(source, target, None)
    writer.add(np.zeros(4, np.float32), np.zeros((4, 2), np.float32))
    assert os.path.exists(f"{target}.tmp")
    with pytest.raises(ValueError, match=r"split\.parquet: 5 rows, but the teacher produced more outputs \(6 so far\)"):
        writer.add(np.zeros(2, np.float32), np.zeros((2, 2), np.float32))
    writer.abort()
    assert not os.path.exists(target) and not os.path.exists(f"{target}.tmp")


def test_the_copy_is_flushed_to_disk_before_it_is_renamed_into_place(tmp_path, monkeypatch) -> None:
    """A resume takes a copy that is there as finished: its bytes must be on disk before its name
    is, or a power loss could leave an empty ``<split>.parquet`` that no run writes again."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"x": np.arange(3.0)}), source)
    events = []
    fsync, replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.fstat(fd).st_ino)), fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", os.stat(a).st_ino)), replace(a, b))[1])
    write_with_columns(source, target, np.zeros(3, np.float32), np.zeros((3, 2), np.float32), None, None)
    inode = os.stat(target).st_ino
    assert ("replace", inode) in events and ("fsync", inode) in events
    assert events.index(("fsync", inode)) < events.index(("replace", inode))  # its bytes on disk before its name


def test_a_rank_without_rows_does_not_turn_off_the_row_key_check(tmp_path) -> None:
    """``predict_file`` on a rank whose range is empty returns no row keys (None): its share must not
    make the row group it falls in skip the check of the other ranks' keys."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"row_id": np.arange(3, dtype=np.int64)}), source)
    writer = TeacherColumnsWriter(source, target, "row_id")
    writer.add(np.zeros(2, np.float32), np.zeros((2, 4), np.float32), np.array([0, 1]))
    writer.add(np.zeros(0, np.float32), np.zeros((0, 4), np.float32), None)  # rank 1: no rows
    with pytest.raises(ValueError, match=r"split\.parquet: row group 0: row keys 'row_id' differ"):
        writer.add(np.zeros(1, np.float32), np.zeros((1, 4), np.float32), np.array([7]))
    writer.abort()


def test_empty_row_groups_and_an_empty_file_are_copied(tmp_path) -> None:
    """pyarrow writes an empty table as one row group of 0 rows, and ``ParquetWriter`` keeps an empty
    ``write_table`` as one: each is copied as an empty row group, not refused."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    with pq.ParquetWriter(source, pa.schema([("row_id", pa.int64())])) as parquet:
        for rows in ([0, 1], [], [2], []):
            parquet.write_table(pa.table({"row_id": pa.array(rows, pa.int64())}))
    representations = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_with_columns(source, target, np.arange(3, dtype=np.float32), representations, "row_id", np.arange(3))
    copy = pq.ParquetFile(target)
    assert [copy.metadata.row_group(i).num_rows for i in range(copy.num_row_groups)] == [2, 0, 1, 0]
    np.testing.assert_array_equal(np.array(copy.read().column(REPRESENTATION_COLUMN).to_pylist()), representations)

    empty, empty_copy = str(tmp_path / "empty.parquet"), str(tmp_path / "empty_copy.parquet")
    pq.write_table(pa.table({"row_id": pa.array([], pa.int64())}), empty)
    write_with_columns(empty, empty_copy, np.zeros(0, np.float32), np.zeros((0, 2), np.float32), "row_id", None)
    copy = pq.read_table(empty_copy)
    assert copy.num_rows == 0 and copy.schema.field(REPRESENTATION_COLUMN).type.list_size == 2


def test_a_file_without_row_groups_is_copied_without_row_groups(tmp_path) -> None:
    """A ``ParquetWriter`` closed before any ``write_table`` leaves a file of no row groups: its copy
    has the teacher's two columns and no row groups either."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.ParquetWriter(source, pa.schema([("row_id", pa.int64())])).close()
    assert pq.ParquetFile(source).num_row_groups == 0
    write_with_columns(source, target, np.zeros(0, np.float32), np.zeros((0, 3), np.float32), "row_id", None)
    copy = pq.ParquetFile(target)
    assert copy.num_row_groups == 0
    assert copy.schema_arrow.names == ["row_id", LOGITS_COLUMN, REPRESENTATION_COLUMN]
    assert copy.schema_arrow.field(REPRESENTATION_COLUMN).type.list_size == 3


def test_an_interrupt_while_rank_0_writes_leaves_no_partial_copy(tmp_path, monkeypatch) -> None:
    """Ctrl-C after the first row group is written: the interrupt goes on, and neither the copy
    nor its ``.tmp`` is left (an error is returned, an interrupt is raised: both clean up)."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "out" / "copy.parquet")
    pq.write_table(pa.table({"row_id": np.arange(10, dtype=np.int64)}), source, row_group_size=4)
    write_group = TeacherColumnsWriter._write_group
    groups_written = []

    def interrupted_after_the_first_group(self, group, *outputs):
        if groups_written:
            raise KeyboardInterrupt
        write_group(self, group, *outputs)
        groups_written.append(group)
        assert os.path.exists(f"{target}.tmp")

    monkeypatch.setattr(TeacherColumnsWriter, "_write_group", interrupted_after_the_first_group)
    own = (np.zeros(10, np.float32), np.zeros((10, 2), np.float32), np.arange(10, dtype=np.int64))
    with pytest.raises(KeyboardInterrupt):
        write_on_rank_0(source, target, "row_id", [(own, True)], world_size=1, group=None)
    assert groups_written == [0] and os.listdir(tmp_path / "out") == []


def _checkpoint(path, step: int) -> str:
    os.makedirs(path)
    with open(os.path.join(path, "train_state.json"), "w", encoding="utf-8") as handle:
        handle.write(f'{{"global_step": {step}}}')
    with open(os.path.join(path, ".metadata"), "wb") as handle:
        handle.write(b"dcp metadata")
    return str(path)


def test_a_resume_with_another_teacher_checkpoint_is_refused(tmp_path) -> None:
    """Finished copies are never rewritten: without the record, a teacher trained again would
    leave the earlier teacher's outputs in the splits it had finished."""
    out = tmp_path / "teacher"
    first = teacher_record(_checkpoint(tmp_path / "run" / "best" / "ckpt-10", 10))
    check_same_teacher(str(out), first)  # nothing there yet
    out.mkdir()
    (out / TEACHER_FILE).write_text(json.dumps(first), encoding="utf-8")
    (out / "train.parquet").write_bytes(b"finished copy")
    check_same_teacher(str(out), first)
    moved = {**first, "checkpoint": str(tmp_path / "elsewhere")}  # the same checkpoint, moved: the same teacher
    check_same_teacher(str(out), moved)
    retrained = teacher_record(_checkpoint(tmp_path / "run2" / "best" / "ckpt-10", 12))
    with pytest.raises(ValueError, match=rf"teacher: holds teacher outputs of another teacher checkpoint "
                                         rf"\({re.escape(first['checkpoint'])}\) than .*run2/best/ckpt-10 \(differing: "
                                         r"train_state\.json\): a resume would mix the outputs of "
                                         r"two teachers; use a new --output-dir, or delete it"):
        check_same_teacher(str(out), retrained)
    unrelated = {**first, "sha256": {"model.pt": "0" * 64}}  # no identity file of both: not the same teacher
    with pytest.raises(ValueError, match=r"\(differing: no file of both to compare\): a resume would mix"):
        check_same_teacher(str(out), unrelated)
    (out / TEACHER_FILE).unlink()  # copies of an older version, which wrote no record
    with pytest.raises(ValueError, match=r"teacher: holds teacher outputs \(train\.parquet\) without teacher\.json "
                                         r"\(written by an older version\)"):
        check_same_teacher(str(out), first)
    (out / TEACHER_FILE).write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"teacher\.json: damaged or not a teacher record"):
        check_same_teacher(str(out), first)


def test_a_record_over_no_finished_copy_is_replaced_not_refused(tmp_path) -> None:
    """A run killed before its first copy leaves teacher.json alone (and copies being written): another
    teacher has nothing there to mix with, so it goes on and records itself."""
    out = tmp_path / "teacher"
    first = teacher_record(_checkpoint(tmp_path / "run" / "best" / "ckpt-10", 10))
    retrained = teacher_record(_checkpoint(tmp_path / "run2" / "best" / "ckpt-10", 12))
    out.mkdir()
    (out / TEACHER_FILE).write_text(json.dumps(first), encoding="utf-8")
    (out / "train.parquet.tmp").write_bytes(b"a copy being written")
    (out / "valid").mkdir()
    (out / "valid" / "part-0.parquet.tmp").write_bytes(b"a copy being written")
    check_same_teacher(str(out), retrained)
    (out / TEACHER_FILE).write_text("{not json", encoding="utf-8")  # no copy depends on it either
    check_same_teacher(str(out), retrained)


def test_a_resume_on_data_prepared_again_is_refused(tmp_path) -> None:
    """The same teacher over a data directory prepared again (other rows, the same schema): the finished
    copies of the old rows would stay beside copies of the new, e.g. a train split of one preparation and
    a test split of another."""
    data = tmp_path / "data"
    data.mkdir()
    for split in ("train", "valid"):
        pq.write_table(pa.table({"row_id": np.arange(4, dtype=np.int64)}), str(data / f"{split}.parquet"))
    splits = {split: f"{split}.parquet" for split in ("train", "valid", "test")}
    schema = DatasetSchema(name="tiny", splits=splits, fields=[], root=str(data))
    checkpoint = _checkpoint(tmp_path / "run" / "best" / "ckpt-10", 10)
    first = teacher_record(checkpoint, source_fingerprints(schema))
    assert sorted(first[DATA_FINGERPRINTS_KEY]) == ["train", "valid"]  # no test file: nothing to record of it
    out = tmp_path / "teacher"
    out.mkdir()
    (out / TEACHER_FILE).write_text(json.dumps(first), encoding="utf-8")
    (out / "train.parquet").write_bytes(b"finished copy")
    (out / "valid.parquet.tmp").write_bytes(b"a copy being written")
    pq.write_table(pa.table({"row_id": np.arange(10, 14, dtype=np.int64)}), str(data / "valid.parquet"))
    check_same_teacher(str(out), teacher_record(checkpoint, source_fingerprints(schema)))  # valid: no copy yet
    pq.write_table(pa.table({"row_id": np.arange(20, 24, dtype=np.int64)}), str(data / "train.parquet"))
    with pytest.raises(ValueError, match=r"teacher: holds teacher outputs of split\(s\) \['train'\] copied from other "
                                         r"data than those splits hold now \(prepared again since\?\): a resume would "
                                         r"mix copies of both; use a new --output-dir"):
        check_same_teacher(str(out), teacher_record(checkpoint, source_fingerprints(schema)))
    check_same_teacher(str(out), teacher_record(checkpoint))  # no fingerprints: not compared


def _two_teachers_into_one_output(root: str) -> Dict[str, Any]:
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.train import teacher_outputs
    from recsys_llm.train.config import load_config
    from recsys_llm.train.runner import run_training

    data = os.path.join(root, "data")
    generate_synthetic(data, 2000, seed=0)

    def config(seed: int, run_dir: str):
        return load_config(DEEPFM_CONFIG, [
            f"data.schema={data}", "data.batch_size=256", "data.synthetic_rows=0", "train.epochs=1",
            "train.max_steps=1", "train.progress=false", "train.device=cpu", f"train.seed={seed}",
            f"train.run_dir={run_dir}"])

    first, second = os.path.join(root, "teacher1"), os.path.join(root, "teacher2")
    run_training(config(0, first))
    run_training(config(7, second))
    out = os.path.join(root, "teacher_data")
    write_copy, other = teacher_outputs.write_on_rank_0, []

    def write_while_the_other_run_writes(*args: Any, **kwargs: Any) -> Optional[Exception]:
        if not other:  # the other teacher's run, launched at the same time, writes all its copies meanwhile
            other.append(None)
            try:
                teacher_outputs.write_teacher_outputs(config(7, second), second, out, progress=False)
                other[0] = "wrote"
            except ValueError as error:
                other[0] = str(error)
        return write_copy(*args, **kwargs)

    teacher_outputs.write_on_rank_0 = write_while_the_other_run_writes
    try:
        teacher_outputs.write_teacher_outputs(config(0, first), first, out, progress=False)
    finally:
        teacher_outputs.write_on_rank_0 = write_copy
    with open(os.path.join(out, TEACHER_FILE), encoding="utf-8") as handle:
        recorded = json.load(handle)["checkpoint"]
    return {"other": other[0], "recorded": recorded, "first": first, "entries": sorted(os.listdir(out))}


@pytest.mark.multiprocess
def test_a_teacher_outputs_run_into_an_output_another_run_writes_is_refused(tmp_path) -> None:
    """Two runs (two teachers) launched into one --output-dir both passed the check of the empty directory: the
    copies were one teacher's, or some of each, and teacher.json named whichever wrote it last."""
    (out,) = run_multiprocess(_two_teachers_into_one_output, world_size=1, root=str(tmp_path))
    assert out["other"] == (f"{tmp_path / 'teacher_data'}: another teacher-outputs run is writing this --output-dir "
                            "(it holds .lock there); wait for it to end (or stop it), or use another --output-dir")
    assert out["recorded"].startswith(out["first"])
    assert out["entries"] == ["schema.json", "teacher.json", "test.parquet", "train.parquet", "valid.parquet"]


def test_copies_recorded_by_an_older_version_compare_their_sources_footers_only(tmp_path) -> None:
    """A teacher.json written before splits were also fingerprinted by their bytes holds the footers' hash alone."""
    (tmp_path / "train.parquet").write_bytes(b"a finished copy")
    (tmp_path / TEACHER_FILE).write_text(json.dumps({"checkpoint": "run", "sha256": {"state": "s"},
                                                     DATA_FINGERPRINTS_KEY: {"train": "aaaa"}}))
    check_same_teacher(str(tmp_path), {"checkpoint": "run", "sha256": {"state": "s"},
                                       DATA_FINGERPRINTS_KEY: {"train": "aaaa+bbbb"}})
    with pytest.raises(ValueError, match=r"split\(s\) \['train'\] copied from other data"):
        check_same_teacher(str(tmp_path), {"checkpoint": "run", "sha256": {"state": "s"},
                                           DATA_FINGERPRINTS_KEY: {"train": "zzzz+bbbb"}})


def test_empty_parts_of_a_split_directory_get_no_copy_and_a_split_of_empty_files_is_refused(tmp_path) -> None:
    """One empty part of a split directory (as Spark writes them) refused the whole command."""
    from recsys_llm.data.schema import FieldSpec
    from recsys_llm.data.validation import DataError
    from recsys_llm.train.teacher_outputs import split_copies

    data = tmp_path / "data"
    for split in ("train", "valid"):
        (data / split).mkdir(parents=True)
    table = pa.table({"user_id": pa.array([1, 2], pa.int64()), "label": pa.array([0, 1], pa.int8())})
    pq.write_table(table, data / "train" / "part-0.parquet")
    pq.write_table(table.slice(0, 0), data / "train" / "part-1.parquet")
    pq.ParquetWriter(str(data / "train" / "part-2.parquet"), table.schema).close()
    pq.write_table(table.slice(0, 0), data / "valid" / "part-0.parquet")
    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3)], splits={"train": "train", "valid": "valid"},
                           root=str(data))
    out = str(tmp_path / "out")
    copies, new_splits = split_copies(schema, ["train"], out)
    assert copies == [(str(data / "train" / "part-0.parquet"), os.path.join(out, "train", "part-0.parquet"))]
    assert new_splits == {"train": "train"}
    with pytest.raises(DataError, match=r"valid/part-0\.parquet: the file is empty \(0 rows\)"):
        split_copies(schema, ["train", "valid"], out)
    # a directory of one file is still a directory: its copy goes under <split>/ by its own name
    (data / "train" / "part-1.parquet").unlink()
    (data / "train" / "part-2.parquet").unlink()
    assert split_copies(schema, ["train"], out) == (
        [(str(data / "train" / "part-0.parquet"), os.path.join(out, "train", "part-0.parquet"))], {"train": "train"})


def test_an_offline_students_run_is_refused_before_it_is_loaded(tmp_path) -> None:
    """`teacher-outputs --checkpoint <offline student run>` loaded the run, then said only "the run is an offline
    teacher-student run", naming neither the run nor what to pass instead."""
    from recsys_llm import PACKAGED_CONFIGS
    from recsys_llm.train.config import load_config
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    config = load_config(os.path.join(PACKAGED_CONFIGS, "synthetic_deepfm.yaml"),
                         ["elec.task=distill", "elec.distill.mode=offline", "elec.vector_dim=8"])
    run = str(tmp_path / "no_run_is_opened")
    with pytest.raises(ValueError, match=rf"^--checkpoint {run}: an offline student's run "
                                         r"\(elec\.distill\.mode=offline\), which holds no teacher; pass the run of "
                                         r"its teacher \(elec\.task=gain\)"):
        write_teacher_outputs(config, run, str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def test_the_teacher_of_an_offline_students_task_is_refused_naming_the_mode() -> None:
    """An offline student's task holds no teacher: ``teacher_of`` says so, not None to run."""
    import torch

    from recsys_llm.data.schema import FieldSpec
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_elec_task
    from recsys_llm.modules.teacher_student import TeacherStudentConfig
    from recsys_llm.train.teacher_outputs import teacher_of

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("age", "dense")])
    student = build_elec_task(ELECConfig(task="distill", vector_dim=8, distill=TeacherStudentConfig(
        mode="offline", beta=0.0)), schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"^an offline student's task \(elec\.distill\.mode=offline\), which holds "
                                         r"no teacher to run"):
        teacher_of(student)


@pytest.mark.parametrize("settings", [["elec.task=distill", "elec.distill.mode=joint"],
                                      ["elec.task=gain", "elec.distill.mode=offline"]],
                         ids=["a joint distillation", "a gain run (its distill section unused)"])
def test_runs_that_hold_a_teacher_are_opened_not_refused_as_offline(tmp_path, settings) -> None:
    """Only an offline student's run is refused up front: a joint run holds its teacher, and a gain run is one
    whatever its unused elec.distill.mode says. Here the run is missing, which opening it names."""
    from recsys_llm import PACKAGED_CONFIGS
    from recsys_llm.train.config import load_config
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    config = load_config(os.path.join(PACKAGED_CONFIGS, "synthetic_deepfm.yaml"), settings + ["elec.vector_dim=8"])
    run = str(tmp_path / "no_run")
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(run)}: no such checkpoint or run directory"):
        write_teacher_outputs(config, run, str(tmp_path / "out"))


def test_a_spill_gives_back_what_it_was_given_a_batch_at_a_time(tmp_path) -> None:
    spill = OutputSpill(str(tmp_path / "copy.parquet.rank1.tmp"))
    given = [(np.arange(n, dtype=np.float32), np.arange(3 * n, dtype=np.float32).reshape(n, 3),
              np.arange(n, dtype=np.int64) + 100 * n) for n in (2, 5, 1)]
    for outputs in given:
        spill.append(outputs)
    for (logits, representations, keys), (want_logits, want_representations, want_keys) in zip(spill.outputs(), given):
        np.testing.assert_array_equal(logits, want_logits)
        np.testing.assert_array_equal(representations, want_representations)
        np.testing.assert_array_equal(keys, want_keys)
    assert len(list(spill.outputs())) == 3
    spill.remove()
    assert os.listdir(tmp_path) == []
    keyless = OutputSpill(str(tmp_path / "keyless"))
    keyless.append((np.zeros(2, np.float32), np.zeros((2, 4), np.float32), None))
    ((_, representations, keys),) = list(keyless.outputs())
    assert representations.shape == (2, 4) and keys is None
    assert list(OutputSpill(str(tmp_path / "never")).outputs()) == []  # a rank that sent no real batch


def test_rank_0_writes_its_row_groups_as_its_steps_come(tmp_path, monkeypatch) -> None:
    """Its outputs are not gathered first: when the teacher computes a batch, the row groups of the batches
    before it are in the copy already (a split's outputs held whole took 0.8 KB a row: 80 GB at 100M rows)."""
    source, target = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
    pq.write_table(pa.table({"row_id": np.arange(40, dtype=np.int64)}), source, row_group_size=4)
    written = []
    write_group = TeacherColumnsWriter._write_group
    monkeypatch.setattr(TeacherColumnsWriter, "_write_group",
                        lambda self, group, *outputs: (written.append(group), write_group(self, group, *outputs)))

    def steps():
        for batch in range(10):
            assert len(written) == batch  # every earlier batch's row group is written
            rows = np.arange(4 * batch, 4 * batch + 4)
            yield (rows.astype(np.float32), np.zeros((4, 2), np.float32), rows.astype(np.int64)), True
        yield (np.zeros(4, np.float32), np.zeros((4, 2), np.float32), None), False  # padding: not written

    assert write_on_rank_0(source, target, "row_id", steps(), world_size=1, group=None) is None
    np.testing.assert_array_equal(pq.read_table(target).column(LOGITS_COLUMN).to_numpy(), np.arange(40))


def test_spills_a_killed_run_left_are_its_own_entries_and_are_removed(tmp_path) -> None:
    """Of any split and world size: a run over other splits than the killed one's kept them for good."""
    data = tmp_path / "data"
    data.mkdir()
    pq.write_table(pa.table({"row_id": np.arange(4, dtype=np.int64)}), str(data / "train.parquet"))
    schema = DatasetSchema(name="tiny", splits={"train": "train.parquet"}, fields=[], root=str(data))
    out = tmp_path / "teacher"
    out.mkdir()
    (out / "train.parquet.tmp").write_bytes(b"a copy being written")
    (out / "train.parquet.rank3.tmp").write_bytes(b"a spill of a run on 4 ranks")
    check_output_dir(str(out), schema)
    (out / "train.parquet.rank3.tmp.bak").write_bytes(b"something else")
    with pytest.raises(FileExistsError, match=r"train\.parquet\.rank3\.tmp\.bak"):
        check_output_dir(str(out), schema)
    (out / "train.parquet.rank3.tmp.bak").unlink()
    (out / "valid").mkdir()
    (out / "valid" / "part-0.parquet.rank1.tmp").write_bytes(b"a spill of a split directory's file")
    (out / "valid" / "part-0.parquet").write_bytes(b"a finished copy")
    remove_spills(str(out), DatasetSchema(name="tiny", splits={"train": "train.parquet", "valid": "valid"}, fields=[],
                                          root=str(data)))
    assert sorted(os.listdir(out)) == ["train.parquet.tmp", "valid"]
    assert os.listdir(out / "valid") == ["part-0.parquet"]


def _rank_steps(rank: int, bad_keys: bool = False):
    """Rank ``rank``'s steps over rows 0..14 of a split, 6 a rank in batches of 3 (rank 2 has 3 rows: its
    second step is padding); ``bad_keys``: rank 0's second batch names its rows in another order."""
    for batch in range(2):
        rows = np.arange(6 * rank + 3 * batch, 6 * rank + 3 * batch + 3)
        keys = rows[::-1].copy() if bad_keys and batch == 1 else rows
        yield ((rows.astype(np.float32), np.stack([rows, -rows], axis=1).astype(np.float32), keys.astype(np.int64)),
               rank < 2 or batch == 0)


def _copies_written_from_three_ranks(source: str, out: str) -> Optional[Dict[str, Any]]:
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.teacher_output_stream import send_step

    ctx = init_distributed("cpu")
    found: Dict[str, Any] = {}
    for name, bad_keys in (("good", False), ("bad", True)):
        target = os.path.join(out, f"{name}.parquet")
        if ctx.rank == 0:
            shown = io.StringIO()
            with contextlib.redirect_stderr(shown):
                error = write_on_rank_0(source, target, "row_id", _rank_steps(0, bad_keys), ctx.world_size, None,
                                        progress=True)
            found[name] = None if error is None else str(error)
            found[f"{name} bar"] = shown.getvalue()
            found[f"{name} entries"] = sorted(os.listdir(out))
        else:
            for step in _rank_steps(ctx.rank):
                send_step(step, None)
    if ctx.rank == 0:
        copy = pq.read_table(os.path.join(out, "good.parquet"))
        found["logits"] = copy.column(LOGITS_COLUMN).to_pylist()
        found["representations"] = copy.column(REPRESENTATION_COLUMN).to_pylist()
        return found
    return None


@pytest.mark.multiprocess
def test_rank_0_writes_the_other_ranks_spilled_outputs_in_rank_order_and_leaves_no_spill(tmp_path) -> None:
    """Three ranks, the last with a padding step: the copy holds rank 0's rows, then rank 1's, then rank 2's
    (each other rank's spill read back in rank order), and no spill is left beside it; a copy that fails
    (rank 0's row keys out of order, after every rank's first batch was spilled) leaves neither the copy
    nor any spill, not only the copy."""
    source = str(tmp_path / "split.parquet")
    pq.write_table(pa.table({"row_id": np.arange(15, dtype=np.int64)}), source, row_group_size=3)
    out = tmp_path / "out"
    out.mkdir()
    found = run_multiprocess(_copies_written_from_three_ranks, world_size=3, source=source, out=str(out))[0]
    assert found["good"] is None and found["good entries"] == ["good.parquet"]
    assert "good.parquet: other ranks' rows: 100%" in found["good bar"] and "9/9" in found["good bar"]
    assert found["logits"] == list(range(15))
    assert found["representations"] == [[row, -row] for row in range(15)]
    assert re.search(r"split\.parquet: row group 1: row keys 'row_id' differ from the reader's order", found["bad"])
    assert found["bad entries"] == ["good.parquet"]  # no bad.parquet, .tmp or bad.parquet.rank<r>.tmp


def _outputs_over_a_killed_runs_spills(root: str) -> Dict[str, Any]:
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.train import teacher_outputs
    from recsys_llm.train.config import load_config
    from recsys_llm.train.runner import run_training

    data, run, out = (os.path.join(root, name) for name in ("data", "teacher", "teacher_data"))
    generate_synthetic(data, 2000, seed=0)
    config = load_config(DEEPFM_CONFIG, [
        f"data.schema={data}", "data.batch_size=256", "data.synthetic_rows=0", "train.epochs=1", "train.max_steps=1",
        "train.progress=false", "train.device=cpu", f"train.run_dir={run}"])
    run_training(config)
    os.makedirs(out)
    for name in ("valid.parquet.rank1.tmp", "train.parquet.rank12.tmp"):  # a killed run's, on 2 and on 13 ranks
        with open(os.path.join(out, name), "wb") as handle:
            handle.write(b"spilled outputs")
    teacher_outputs.write_teacher_outputs(config, run, out, splits=["train"], progress=False)
    copy = os.stat(os.path.join(out, "train.parquet"))
    teacher_outputs.write_teacher_outputs(config, run, out, splits=["train"], progress=False)  # nothing left to write
    again = os.stat(os.path.join(out, "train.parquet"))
    return {"entries": sorted(os.listdir(out)),
            "rewritten": (again.st_ino, again.st_mtime_ns) != (copy.st_ino, copy.st_mtime_ns)}


@pytest.mark.multiprocess
def test_a_teacher_outputs_run_removes_the_spills_a_killed_run_left(tmp_path) -> None:
    """A run over other splits, or on another world size, than the killed one's never writes those spills
    again: each could hold a copy's outputs, and they stayed in --output-dir for good. A run again over a
    finished copy leaves it as it is (a resume writes only the copies not there yet)."""
    (out,) = run_multiprocess(_outputs_over_a_killed_runs_spills, world_size=1, root=str(tmp_path))
    assert out["entries"] == ["schema.json", "teacher.json", "train.parquet"]
    assert not out["rewritten"]


class _RowIdTeacher:
    """A stand-in teacher whose logit is each row's label and whose representation is (B, 2) of ones."""

    def predict(self, batch: Any) -> Any:
        import torch

        rows = batch.batch_size
        return type("Output", (), {"logits": batch.labels.float(), "representation": torch.ones(rows, 2)})()


def test_each_step_carries_its_rows_keys_and_a_rank_with_a_batch_fewer_pads(tmp_path) -> None:
    """The row keys travel with every step (rank 0's copy checks them against the split: without them a
    teacher's outputs in another row order were written unchecked); the rank with one batch fewer repeats
    one, marked not real."""
    import torch

    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.train.teacher_output_stream import predict_steps

    generate_synthetic(str(tmp_path), 100, seed=0)
    schema = DatasetSchema.load(str(tmp_path / "schema.json"))
    path = schema.split_path("train")
    pq.write_table(pq.read_table(path).slice(0, 65), path)  # 32 rows for rank 0, 33 for rank 1
    row_ids = pq.read_table(path).column("row_id").to_numpy()
    shares = []
    for rank in (0, 1):
        steps = list(predict_steps(_RowIdTeacher(), schema, path, [], 16, False, torch.device("cpu"), rank, 2))
        shares.append([(keys, real) for (_, _, keys), real in steps])
    assert [[real for _, real in share] for share in shares] == [[True, True, False], [True, True, True]]
    got = np.concatenate([keys for share in shares for keys, real in share if real])
    np.testing.assert_array_equal(got, row_ids)


class FullDiskWriter:
    """Stands for a TeacherColumnsWriter whose copy's write fails as pyarrow's does on a full disk (no file name)."""

    code = errno.ENOSPC

    def __init__(self, source: str, target: str, row_key: object) -> None:
        raise OSError(self.code, f"Error writing bytes to file. Detail: [errno {self.code}] {os.strerror(self.code)}")


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["full_disk", "quota"])
def test_a_full_disk_names_the_copy_not_the_output_directory(tmp_path, monkeypatch: pytest.MonkeyPatch,
                                                             code: int) -> None:
    """The one-line error said '(writing <--output-dir>)': which of the split copies ran out of space (or of the
    user's quota) was not told."""
    monkeypatch.setattr(FullDiskWriter, "code", code)
    monkeypatch.setattr(teacher_output_stream, "TeacherColumnsWriter", FullDiskWriter)
    target = str(tmp_path / "out" / "valid.parquet")
    error = write_on_rank_0(str(tmp_path / "valid.parquet"), target, None, [], world_size=1, group=None)
    assert isinstance(error, OSError) and error.errno == code
    assert error.filename == target
    assert os.listdir(tmp_path / "out") == []
