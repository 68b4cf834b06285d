"""SplitWriter: a close that fails or is interrupted (Ctrl-C while the last row group and the footer are written)
leaves neither the output nor its temp file (``recsys-llm score --output`` left ``<output>.<id>.tmp`` beside it)."""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.parquet_writer import SplitWriter


class Interrupted(BaseException):
    """Stands for the KeyboardInterrupt that Ctrl-C raises."""


def _interrupt_final_write(writer: SplitWriter) -> None:
    def write_table(*args, **kwargs):
        raise Interrupted()

    writer._writer.write_table = write_table  # the rows of the last row group are written on close


@pytest.mark.parametrize("replace", [True, False])
def test_close_interrupted_leaves_no_temp_file(tmp_path, replace):
    path = str(tmp_path / "scores.parquet")
    with pytest.raises(Interrupted):
        with SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=64, replace=replace) as writer:
            writer.write({"logit": np.zeros(10, dtype=np.float32)})  # fewer rows than a group: all written on close
            _interrupt_final_write(writer)
    assert sorted(os.listdir(tmp_path)) == []
    assert not writer._writer.is_open


@pytest.mark.parametrize("replace", [True, False])
def test_close_leaves_only_the_output(tmp_path, replace):
    path = str(tmp_path / "scores.parquet")
    with SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=64, replace=replace) as writer:
        writer.write({"logit": np.zeros(10, dtype=np.float32)})
    assert sorted(os.listdir(tmp_path)) == ["scores.parquet"]


def test_a_full_disk_when_the_temp_file_is_made_leaves_nothing_and_names_the_output(tmp_path, monkeypatch):
    """ENOSPC writing the header in ``ParquetWriter(...)`` left an empty ``<output>.<id>.tmp`` beside the output
    (``recsys-llm score --output`` on a full disk), and the error named no file."""
    path = str(tmp_path / "scores.parquet")
    real_writer = pq.ParquetWriter

    def full_disk(where, *args, **kwargs):
        open(where, "wb").close()  # made, then the header's write fails
        raise OSError(28, "Error writing bytes to file")

    monkeypatch.setattr(pq, "ParquetWriter", full_disk)
    with pytest.raises(OSError) as caught:
        SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=64, replace=False)
    assert caught.value.errno == 28 and caught.value.filename == path
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(pq, "ParquetWriter", real_writer)
    with SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=64, replace=False) as writer:
        writer.write({"logit": np.zeros(3, dtype=np.float32)})
    assert os.listdir(tmp_path) == ["scores.parquet"]


def test_a_failed_write_whose_footer_fails_too_leaves_no_temp_file(tmp_path):
    """A full disk in a row group's write, then again in the footer's as the writer is left: the close error
    escaped ``__exit__`` before the temp file was removed."""
    path = str(tmp_path / "scores.parquet")
    with pytest.raises(OSError, match="No space left"):
        with SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=4) as writer:
            real_close = writer._writer.close

            def full_disk() -> None:
                writer._writer.close = real_close  # pyarrow's own close when the writer is collected
                raise OSError(28, "No space left on device")

            writer._writer.close = full_disk
            raise OSError(28, "No space left on device")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("replace", [True, False])
def test_the_content_is_on_disk_before_a_name_publishes_it(tmp_path, replace, monkeypatch) -> None:
    """``score --output`` linked its file into place unflushed: a power loss could leave an empty file under the
    output's name, taken for complete by a later reader."""
    from recsys_llm.data import parquet_writer

    events = []
    monkeypatch.setattr(parquet_writer, "fsync_file", lambda path: events.append(("fsync", os.path.basename(path))))
    monkeypatch.setattr(parquet_writer, "fsync_directory", lambda path: events.append(("fsync dir", path)))
    real_replace, real_link = os.replace, parquet_writer.link_into_place
    monkeypatch.setattr(parquet_writer.os, "replace", lambda a, b: (events.append(("publish", b)), real_replace(a, b)))
    monkeypatch.setattr(parquet_writer, "link_into_place",
                        lambda a, b: (events.append(("publish", b)), real_link(a, b))[1])
    path = str(tmp_path / "scores.parquet")
    with SplitWriter(path, pa.schema([("logit", pa.float32())]), row_group_size=64, replace=replace) as writer:
        writer.write({"logit": np.zeros(10, dtype=np.float32)})
    assert [kind for kind, _ in events] == ["fsync", "publish", "fsync dir"]
    assert events[0][1].startswith("scores.parquet.") and events[1][1] == path and events[2][1] == str(tmp_path)
