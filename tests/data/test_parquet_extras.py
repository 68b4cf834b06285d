"""ParquetBatchReader: extra (vector) columns are checked for NaN/inf like dense features."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import DataError

SCHEMA = DatasetSchema("v", [FieldSpec("item", FieldKind.SPARSE, 5), FieldSpec("x", FieldKind.DENSE)], row_key=None)


def _write(path: str, vectors: np.ndarray, weight: np.ndarray) -> None:
    n = len(vectors)
    pq.write_table(pa.table({
        "item": pa.array(np.arange(n) % 5, pa.int64()), "x": pa.array(np.zeros(n, np.float32)),
        "label": pa.array(np.zeros(n, np.int8)), "weight": pa.array(weight),
        "llm_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), vectors.shape[1]),
    }), path, row_group_size=4)


class TestNonFiniteExtras:
    def test_a_nan_in_an_attached_vector_names_file_column_and_row(self, tmp_path):
        vectors = np.ones((10, 3), np.float32)
        vectors[6, 1] = np.nan  # row group 1 (rows 4-7): row 6 of the file
        vectors[9, 0] = np.inf
        path = str(tmp_path / "a.parquet")
        _write(path, vectors, np.ones(10, np.float32))
        with pytest.raises(DataError, match=r"a\.parquet: column 'llm_vector', row 6: extra value is nan \(1 of the 4 "
                                            r"rows read from row 4 on are not finite\); expected finite floats"):
            list(ParquetBatchReader(SCHEMA, path, 4, extras=["llm_vector"], prefetch=0))
        assert len(list(ParquetBatchReader(SCHEMA, path, 4, extras=["llm_vector"], prefetch=0, validate=False))) == 3

    def test_an_inf_in_a_float_extra_is_refused(self, tmp_path):
        weight = np.ones(10, np.float32)
        weight[2] = -np.inf
        path = str(tmp_path / "w.parquet")
        _write(path, np.ones((10, 3), np.float32), weight)
        with pytest.raises(DataError, match=r"w\.parquet: column 'weight', row 2: extra value is -inf"):
            list(ParquetBatchReader(SCHEMA, path, 4, extras=["weight"], prefetch=0))

    def test_finite_extras_are_read_as_before(self, tmp_path):
        path = str(tmp_path / "ok.parquet")
        vectors = np.arange(30, dtype=np.float32).reshape(10, 3)
        _write(path, vectors, np.ones(10, np.float32))
        batches = list(ParquetBatchReader(SCHEMA, path, 4, extras=["llm_vector", "weight"], prefetch=0))
        np.testing.assert_array_equal(np.concatenate([b.extras["llm_vector"].numpy() for b in batches]), vectors)


class TestVectorWidths:
    @pytest.mark.parametrize("rank", [0, 1])
    def test_files_with_other_vector_sizes_are_refused_by_every_rank_naming_both(self, tmp_path, rank):
        """From the footers, when the reader is made: rank 0 of two (reading part0 alone) read on, so only rank 1
        failed, in the middle of an epoch, while rank 0 waited for it in a collective."""
        (tmp_path / "split").mkdir()
        for index, width in enumerate([3, 5]):
            _write(str(tmp_path / "split" / f"part{index}.parquet"), np.ones((4, width), np.float32),
                   np.ones(4, np.float32))
        with pytest.raises(DataError, match=r"part1\.parquet: extra column 'llm_vector' holds vectors of length 5, "
                                            r"but .*part0\.parquet holds 3"):
            ParquetBatchReader(SCHEMA, str(tmp_path / "split"), 4, rank=rank, world_size=2, extras=["llm_vector"],
                               prefetch=0)

    @pytest.mark.parametrize("batch_size", [4, 3])  # batches cut at the file boundary, or across it
    def test_variable_size_lists_of_other_lengths_are_refused_naming_both(self, tmp_path, batch_size):
        (tmp_path / "split").mkdir()
        for index, width in enumerate([3, 5]):
            pq.write_table(pa.table({
                "item": pa.array(np.arange(4) % 5, pa.int64()), "x": pa.array(np.zeros(4, np.float32)),
                "label": pa.array(np.zeros(4, np.int8)),
                "llm_vector": pa.array([[1.0] * width] * 4, pa.list_(pa.float32()))}),
                str(tmp_path / "split" / f"part{index}.parquet"))
        reader = ParquetBatchReader(SCHEMA, str(tmp_path / "split"), batch_size, extras=["llm_vector"], prefetch=0)
        with pytest.raises(DataError, match=r"part1\.parquet: extra column 'llm_vector': rows 0\.\. hold vectors of "
                                            r"length 5, but those read before from .*part0\.parquet hold 3"):
            list(reader)

    def test_empty_vectors_are_read_as_zero_columns(self, tmp_path):
        path = str(tmp_path / "e.parquet")
        pq.write_table(pa.table({"item": pa.array(np.arange(6) % 5, pa.int64()), "x": pa.array(np.zeros(6, np.float32)),
                                 "label": pa.array(np.zeros(6, np.int8)),
                                 "llm_vector": pa.array([[]] * 6, pa.list_(pa.float32()))}), path)
        batches = list(ParquetBatchReader(SCHEMA, path, 4, extras=["llm_vector"], prefetch=0))
        assert [tuple(b.extras["llm_vector"].shape) for b in batches] == [(4, 0), (2, 0)]


class TestExtraKinds:
    def test_an_extra_integer_in_one_file_and_float_in_another_is_refused_naming_both(self, tmp_path):
        """Each file's values were converted alone (int64, float32), so an epoch's batches changed dtype and
        one mixing rows of both files (at the boundary, or anywhere when shuffling) carried float64."""
        (tmp_path / "split").mkdir()
        for index, weight in enumerate([np.ones(4, np.int64), np.full(4, 0.5, np.float32)]):
            _write(str(tmp_path / "split" / f"part{index}.parquet"), np.ones((4, 3), np.float32), weight)
        with pytest.raises(DataError, match=r"part1\.parquet: extra column 'weight' has Arrow type float \(float\), "
                                            r"but .*part0\.parquet has int64 \(integer\); expected one kind"):
            ParquetBatchReader(SCHEMA, str(tmp_path / "split"), 3, extras=["weight"], prefetch=0)

    def test_a_string_extra_is_refused_when_the_reader_is_built(self, tmp_path):
        """It was refused at the first batch, in training after the model was built and sharded."""
        path = str(tmp_path / "a.parquet")
        _write(path, np.ones((4, 3), np.float32), np.array(["a", "b", "c", "d"]))
        with pytest.raises(DataError, match=r"a\.parquet: extra column 'weight' has Arrow type string; expected numbers"):
            ParquetBatchReader(SCHEMA, path, 3, extras=["weight"], prefetch=0)

    def test_integer_widths_and_vector_value_types_may_differ_between_files(self, tmp_path):
        (tmp_path / "split").mkdir()
        for index, (weight, vectors) in enumerate([(np.ones(4, np.int32), np.ones((4, 3), np.float32)),
                                                   (np.ones(4, np.int64), np.ones((4, 3), np.float64))]):
            _write(str(tmp_path / "split" / f"part{index}.parquet"), vectors, weight)
        batches = list(ParquetBatchReader(SCHEMA, str(tmp_path / "split"), 3, extras=["weight", "llm_vector"],
                                          prefetch=0, shuffle=True))
        assert {b.extras["weight"].dtype for b in batches} == {torch.int64}
        assert {b.extras["llm_vector"].dtype for b in batches} == {torch.float32}


def test_an_extra_named_row_id_beside_another_row_key_is_refused(tmp_path):
    """Batches carry the schema's row key as ``extras["row_id"]``: an extra column of that name
    silently replaced the keys (teacher outputs and vector joins then matched the wrong rows)."""
    schema = DatasetSchema("v", [FieldSpec("item", FieldKind.SPARSE, 5)], row_key="key")
    path = str(tmp_path / "k.parquet")
    pq.write_table(pa.table({"item": pa.array(np.arange(4) % 5, pa.int64()), "label": pa.array(np.zeros(4, np.int8)),
                             "key": pa.array(np.arange(100, 104), pa.int64()),
                             "row_id": pa.array(np.arange(4), pa.int64())}), path)
    with pytest.raises(ValueError, match=r"k\.parquet: extra column 'row_id' would replace the row keys \(column "
                                         r"'key'\)"):
        ParquetBatchReader(schema, path, 2, extras=["row_id"], prefetch=0)
    batch = next(iter(ParquetBatchReader(schema, path, 2, prefetch=0)))
    assert batch.extras["row_id"].tolist() == [100, 101]


class TestIntegerVectors:
    def test_integer_lists_beyond_float32s_exact_integers_are_refused_naming_the_row(self, tmp_path):
        """Vectors are carried as float32, which holds integers exactly only up to 2**24: an id list
        extra such as [16777217] silently became [16777216.0]."""
        path = str(tmp_path / "ids.parquet")
        ids = [[1, 2], [3, 2**24], [5, -(2**24) - 1], [7, 8]]
        pq.write_table(pa.table({"item": pa.array([0, 1, 2, 3], pa.int64()), "x": pa.array(np.zeros(4, np.float32)),
                                 "label": pa.array(np.zeros(4, np.int8)), "ids": pa.array(ids, pa.list_(pa.int64()))}),
                       path, row_group_size=2)
        with pytest.raises(DataError, match=r"ids\.parquet: column 'ids', row 2: value -16777217 of the integer list "
                                            r"is not exact in float32"):
            list(ParquetBatchReader(SCHEMA, path, 4, extras=["ids"], prefetch=0))
        ok = str(tmp_path / "ok.parquet")
        pq.write_table(pq.read_table(path).slice(0, 2), ok)
        batch = next(iter(ParquetBatchReader(SCHEMA, ok, 4, extras=["ids"], prefetch=0)))
        assert batch.extras["ids"].tolist() == [[1.0, 2.0], [3.0, 16777216.0]]

    def test_the_first_positive_integer_float32_rounds_is_refused(self, tmp_path):
        """2**24 + 1 is the first positive integer float32 cannot hold (it becomes 2**24): refused, as its
        negative twin is, while 2**24 itself passes."""
        path = str(tmp_path / "ids.parquet")
        ids = [[2**24], [2**24 + 1]]
        pq.write_table(pa.table({"item": pa.array([0, 1], pa.int64()), "x": pa.array(np.zeros(2, np.float32)),
                                 "label": pa.array(np.zeros(2, np.int8)), "ids": pa.array(ids, pa.list_(pa.int64()))}),
                       path)
        with pytest.raises(DataError, match=r"ids\.parquet: column 'ids', row 1: value 16777217 of the integer list "
                                            r"is not exact in float32"):
            list(ParquetBatchReader(SCHEMA, path, 4, extras=["ids"], prefetch=0))


def test_a_file_named_twice_is_refused_not_read_twice(tmp_path):
    """A directory and a file in it (or one file twice) read its rows twice, row keys and all."""
    (tmp_path / "split").mkdir()
    path = str(tmp_path / "split" / "a.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    for named in ([str(tmp_path / "split"), path], [path, path]):
        with pytest.raises(DataError, match=r"a\.parquet: named twice among the split's files .* expected each file once"):
            ParquetBatchReader(SCHEMA, named, 4, prefetch=0)
    assert sum(len(b.labels) for b in ParquetBatchReader(SCHEMA, [path], 4, prefetch=0)) == 4


@pytest.mark.parametrize("value", [1e300, -1e300])
def test_a_dense_value_beyond_float32_is_named_as_stored(tmp_path, value):
    """1e300 in a float64 dense column was reported as "dense feature is inf" (the float32 it became), with numpy's
    overflow warning; the file holds no inf. -1e300 would become -inf alike."""
    import re
    import warnings

    path = str(tmp_path / "a.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    table = pq.read_table(path)
    table = table.set_column(table.schema.get_field_index("x"), "x", pa.array([0.5, value, 0.5, 0.5]))
    pq.write_table(table, path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no overflow RuntimeWarning either
        message = rf"a\.parquet: column 'x', row 1: dense feature {re.escape(repr(value))} is outside the float32 range"
        with pytest.raises(DataError, match=message):
            list(ParquetBatchReader(SCHEMA, path, 4, prefetch=0))
        batches = list(ParquetBatchReader(SCHEMA, path, 4, prefetch=0, validate=False))
    assert torch.isinf(batches[0].dense_features[1, 0])


@pytest.mark.parametrize("dtype", [pa.float32(), pa.int64()])
def test_a_null_in_an_extra_column_names_file_column_and_row(tmp_path, dtype):
    """An extra column is carried as it is: a null in it (a teacher output missing for a row) is refused, with or
    without validation, naming the row; it became NaN in a float column and a garbage integer in an int64 one."""
    path = str(tmp_path / "a.parquet")
    _write(path, np.ones((10, 3), np.float32), pa.array([1, 1, 1, 1, 1, 1, None, 1, 1, 1], dtype))
    for validate in (True, False):
        with pytest.raises(DataError, match=r"a\.parquet: column 'weight', row 6: null value; expected a value in "
                                            r"every row"):
            list(ParquetBatchReader(SCHEMA, path, 4, extras=["weight"], prefetch=0, validate=validate))


def test_a_vector_extra_of_another_length_names_its_row(tmp_path):
    path = str(tmp_path / "a.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    table = pq.read_table(path)
    ragged = pa.array([[1.0, 2.0], [1.0, 2.0], [1.0, 2.0, 3.0], [1.0, 2.0]], pa.list_(pa.float32()))
    pq.write_table(table.append_column("ragged", ragged), path)
    with pytest.raises(DataError, match=r"a\.parquet: extra column 'ragged', row 2: a vector of length 3, where row 0 "
                                        r"has 2; expected one size"):
        list(ParquetBatchReader(SCHEMA, path, 4, extras=["ragged"], prefetch=0))


@pytest.mark.parametrize("setting, message", [({"prefetch": -1}, r"prefetch must be >= 0"),
                                              ({"shuffle_buffer_rows": 0}, r"shuffle_buffer_rows must be > 0"),
                                              ({"shuffle_buffer_rows": -8}, r"shuffle_buffer_rows must be > 0")])
def test_reader_settings_out_of_range_are_refused(tmp_path, setting, message):
    """0 rows fell back to the default, fewer shuffled each row group alone, a negative prefetch read without one."""
    path = str(tmp_path / "a.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=message):
        ParquetBatchReader(SCHEMA, path, 4, shuffle=True, **setting)


def test_one_column_name_as_a_string_is_refused_naming_the_list_to_pass(tmp_path):
    """A str is a Sequence[str] of its characters: extras="weight" asked for columns 'w', 'e', ..."""
    path = str(tmp_path / "ok.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"extras='weight': expected a list of column names; pass \['weight'\]"):
        ParquetBatchReader(SCHEMA, path, 4, extras="weight", prefetch=0)
    batch = next(iter(ParquetBatchReader(SCHEMA, path, 4, extras=["weight"], prefetch=0)))
    assert list(batch.extras) == ["weight"]


@pytest.mark.parametrize("batch_size", [4.0, 0, True])
def test_a_batch_size_that_is_no_positive_integer_is_refused_when_the_reader_is_made(tmp_path, batch_size):
    """4.0 was taken, then failed in numpy with "'float' object cannot be interpreted as an integer"."""
    path = str(tmp_path / "ok.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    with pytest.raises(ValueError, match=rf"batch_size must be a positive integer, got {batch_size!r}"):
        ParquetBatchReader(SCHEMA, path, batch_size, prefetch=0)
    assert len(ParquetBatchReader(SCHEMA, path, np.int64(4), prefetch=0)) == 1


def test_extras_as_bytes_are_refused_like_a_string(tmp_path):
    """list(b"ts") is [116, 115]: bytes are refused as a single name is, not read as column numbers."""
    path = str(tmp_path / "ok.parquet")
    _write(path, np.ones((4, 3), np.float32), np.ones(4, np.float32))
    with pytest.raises(TypeError, match=r"extras=b'weight': expected a list of column names"):
        ParquetBatchReader(SCHEMA, path, 4, extras=b"weight", prefetch=0)
