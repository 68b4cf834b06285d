"""SplitWriter: a close that fails or is interrupted (Ctrl-C while the last row group and the footer are written)
leaves neither the output nor its temp file (``recsys-llm score --output`` left ``<output>.<id>.tmp`` beside it)."""

import os

import numpy as np
import pyarrow as pa
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
