"""``teacher_outputs.write_with_columns``: a copy of a split with the teacher's two columns, row by row.

The whole ``teacher-outputs`` command (sharded teacher, two ranks) runs in ``tests/test_methods_e2e.py``.
"""

import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.train.teacher_outputs import LOGITS_COLUMN, REPRESENTATION_COLUMN, write_with_columns


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
