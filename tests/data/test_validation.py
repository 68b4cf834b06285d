"""One test per bad-input case: every error names the file, the column and what was expected."""

import dataclasses
import math
import os
import re
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import read_schema_and_check
from recsys_llm.data.parquet_writer import arrow_schema_for, list_array
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import FIELDS_METADATA_KEY, DataError, check_number, open_parquet


def _schema(hashed: bool = False) -> DatasetSchema:
    return DatasetSchema(
        name="tiny",
        fields=[
            FieldSpec("user_id", FieldKind.SPARSE, cardinality=10, hashed=hashed),
            FieldSpec("tags", FieldKind.SEQUENCE, cardinality=5, max_length=2),
            FieldSpec("price", FieldKind.DENSE),
        ],
    )


def _columns(n: int = 6) -> Dict[str, object]:
    return {
        "row_id": np.arange(n, dtype=np.int64),
        "user_id": np.arange(n, dtype=np.int64) % 10,
        "tags": list_array(np.full(n, 2), np.arange(2 * n) % 5),
        "price": np.linspace(0, 1, n).astype(np.float32),
        "label": (np.arange(n) % 2).astype(np.int8),
    }


def _write(path: str, schema: DatasetSchema, **overrides: object) -> str:
    columns = _columns()
    columns.update(overrides)
    arrays = {k: v for k, v in columns.items() if v is not None}
    table = pa.table(arrays)
    if all(k in arrays for k in ("row_id", "user_id", "tags", "price", "label")) and not overrides:
        table = table.cast(arrow_schema_for(schema))
    pq.write_table(table, path, row_group_size=3)
    return path


def _read_all(schema: DatasetSchema, path: str) -> list:
    return list(ParquetBatchReader(schema, path, batch_size=4, prefetch=0))


def test_valid_file_reads(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "ok.parquet"), schema)
    assert sum(b.batch_size for b in _read_all(schema, path)) == 6
    assert read_schema_and_check(schema, path) == 6


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_a_fifo_in_place_of_a_split_file_is_refused_not_waited_on(tmp_path):
    # pyarrow's open of a named pipe blocks until a writer comes, deaf to Ctrl-C and SIGTERM: a job hung for good
    path = str(tmp_path / "train.parquet")
    os.mkfifo(path)
    with pytest.raises(DataError, match=rf"{re.escape(path)}: is a named pipe \(FIFO\), not a Parquet file"):
        open_parquet(path)


def test_missing_column(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, price=None)
    with pytest.raises(DataError, match=r"f\.parquet.*missing column.*'price'"):
        _read_all(schema, path)
    path = _write(str(tmp_path / "g.parquet"), schema)
    with pytest.raises(DataError, match=r"g\.parquet: missing extra column\(s\) \['llm_vec'\] the run reads "
                                        r"\(data\.extras, or a plug-in's column\); file columns"):
        read_schema_and_check(schema, path, extras=["llm_vec"])


def test_wrong_dtype(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, user_id=pa.array([str(i) for i in range(6)]))
    with pytest.raises(DataError, match=r"f\.parquet.*column 'user_id'.*type string.*expected an integer column.* "
                                        r"\(raw values, not ids: prepare the rows first, `recsys-llm prepare tabular "
                                        r"--input FILE --like PREPARED_DATA"):
        _read_all(schema, path)


@pytest.mark.parametrize("column, values, message", [
    ("label", pa.array(["0", "1"] * 3), r"label column 'label' has Arrow type string; expected 0/1 integers"),
    ("row_id", pa.array(np.arange(6, dtype=np.float64)),
     r"row key column 'row_id' has Arrow type double; expected int64"),
    ("tags", pa.array([["1", "2"]] * 6, pa.list_(pa.string())),
     r"column 'tags' \(sequence field\) has Arrow type list<\w+: string>; expected a list of integers"),
], ids=["label", "row key", "sequence"])
def test_a_column_of_the_wrong_type_is_refused_from_the_footer(tmp_path, column, values, message):
    """Before any row is read, naming the file, the column and its type: string labels failed only at the first
    batch, float row keys were carried as floats and the string ids of a sequence were read as numbers."""
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, **{column: values})
    with pytest.raises(DataError, match=rf"f\.parquet: {message}"):
        read_schema_and_check(schema, path)
    with pytest.raises(DataError, match=rf"f\.parquet: {message}"):
        ParquetBatchReader(schema, path, batch_size=4)


def test_an_integer_dense_column_is_read_as_float32(tmp_path):
    """A dense field takes any numeric column (a count stored as int32), carried as float32."""
    schema = _schema()
    price = np.array([0, 3, 7, 1, 2, 5], np.int32)
    path = _write(str(tmp_path / "f.parquet"), schema, price=price)
    assert read_schema_and_check(schema, path) == 6
    dense = np.concatenate([b.dense_features.numpy() for b in _read_all(schema, path)])
    assert dense.dtype == np.float32
    np.testing.assert_array_equal(dense[:, 0], price.astype(np.float32))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_a_float16_dense_column(tmp_path, bad):
    """A half-float column is checked by its exponent bits (numpy's isfinite is slow on float16): NaN and inf are
    still found and named."""
    schema = _schema()
    price = np.linspace(0, 1, 6).astype(np.float16)
    price[4] = bad
    path = _write(str(tmp_path / "f.parquet"), schema, price=pa.array(price))
    with pytest.raises(DataError, match=r"f\.parquet: column 'price', row 4: dense feature is .*expected a finite "
                                        r"float"):
        _read_all(schema, path)


def test_a_null_inside_a_list_is_named_by_its_position_in_that_row(tmp_path):
    """The position counts within the row's own list, not from the first id of the row group."""
    schema = _schema()
    tags = pa.array([[0, 1], [2, 3], [4, None], [0], [1], [2]], pa.list_(pa.int64()))
    path = _write(str(tmp_path / "f.parquet"), schema, tags=tags)
    with pytest.raises(DataError, match=r"f\.parquet: column 'tags', row 2: null value at position 1 of the list; "
                                        r"expected an id in \[0, 5\)"):
        _read_all(schema, path)


def test_check_split_labels_names_the_row_of_a_bad_label_in_a_later_row_group(tmp_path):
    """check_split_labels (run before an LLM is tuned on a split) reads a row group at a time; a bad label is named
    by its row in the file."""
    from recsys_llm.data.parquet_files import check_split_labels

    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, label=np.array([0, 1, 0, 1, 5, 0], dtype=np.int8))
    with pytest.raises(DataError, match=r"f\.parquet: column 'label', row 4: label 5 is not a click label"):
        check_split_labels(schema, path)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_nan_or_inf_in_dense(tmp_path, bad):
    schema = _schema()
    price = np.linspace(0, 1, 6).astype(np.float32)
    price[4] = bad
    path = _write(str(tmp_path / "f.parquet"), schema, price=price)
    with pytest.raises(DataError, match=r"f\.parquet: column 'price', row 4: dense feature is .*expected a finite float"):
        _read_all(schema, path)


def test_null_in_dense(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, price=pa.array([0.1, None, 0.2, 0.3, 0.4, 0.5], pa.float32()))
    with pytest.raises(DataError, match=r"f\.parquet: column 'price', row 1: null value; expected a finite float"):
        _read_all(schema, path)


def test_negative_ids(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, user_id=np.array([0, 1, 2, 3, -7, 5], dtype=np.int64))
    with pytest.raises(DataError, match=r"f\.parquet: column 'user_id', row 4: negative id -7.*expected ids in \[0, 10\)"):
        _read_all(schema, path)


def test_negative_ids_in_sequence(tmp_path):
    schema = _schema()
    tags = list_array(np.array([1, 1, 1, 1, 2, 1]), np.array([0, 1, 2, 3, 4, -1, 0]))
    path = _write(str(tmp_path / "f.parquet"), schema, tags=tags)
    with pytest.raises(DataError, match=r"f\.parquet: column 'tags', row 4: negative id -1"):
        _read_all(schema, path)


@pytest.mark.parametrize("bad_id", [10, 12])  # 10: the first id past the table's rows 0..9
def test_ids_beyond_cardinality(tmp_path, bad_id):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, user_id=np.array([0, 1, 2, 3, 4, bad_id], dtype=np.int64))
    with pytest.raises(DataError, match=rf"f\.parquet: column 'user_id', row 5: id {bad_id} .* >= cardinality 10.*hashed"):
        _read_all(schema, path)


def test_ids_beyond_cardinality_fold_when_hashed(tmp_path):
    schema = _schema(hashed=True)
    path = _write(str(tmp_path / "f.parquet"), schema, user_id=np.array([0, 1, 2, 10, -3, 12], dtype=np.int64))
    batches = _read_all(schema, path)
    ids = np.concatenate([b.sparse_features["user_id"].values().numpy() for b in batches])
    np.testing.assert_array_equal(ids, [0, 1, 2, 0, 7, 2])


def test_empty_file(tmp_path):
    schema = _schema()
    path = str(tmp_path / "empty.parquet")
    pq.write_table(arrow_schema_for(schema).empty_table(), path)
    with pytest.raises(DataError, match=r"empty\.parquet: the file is empty \(0 rows\)"):
        _read_all(schema, path)


def _split_with_empty_parts(directory: str, schema: DatasetSchema) -> str:
    """A split directory as Spark or DuckDB write one: two parts with rows, an empty part with one empty
    row group and an empty part without row groups."""
    os.makedirs(directory)
    table = pa.table(_columns(10)).cast(arrow_schema_for(schema))
    pq.write_table(table.slice(0, 4), os.path.join(directory, "part-0.parquet"), row_group_size=3)
    pq.write_table(table.slice(0, 0), os.path.join(directory, "part-1.parquet"))
    pq.ParquetWriter(os.path.join(directory, "part-2.parquet"), table.schema).close()
    pq.write_table(table.slice(4), os.path.join(directory, "part-3.parquet"), row_group_size=3)
    return directory


@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_empty_parts_of_a_split_directory_are_read_as_no_rows(tmp_path, world_size):
    """One empty file refused the whole split (the part files of a directory may be empty)."""
    schema = _schema()
    path = _split_with_empty_parts(str(tmp_path / "train"), schema)
    assert read_schema_and_check(schema, path) == 10
    seen = [int(key) for rank in range(world_size)
            for batch in ParquetBatchReader(schema, path, batch_size=2, rank=rank, world_size=world_size, prefetch=0,
                                            extras=["row_id"], equal_batches=False)
            for key in batch.extras["row_id"]]
    assert sorted(seen) == list(range(10))


def test_a_split_of_empty_files_is_refused(tmp_path):
    schema = _schema()
    directory = str(tmp_path / "train")
    os.makedirs(directory)
    for part in range(2):
        pq.write_table(arrow_schema_for(schema).empty_table(), os.path.join(directory, f"part-{part}.parquet"))
    expected = rf"{directory}: all 2 Parquet files of the split are empty \(0 rows\); expected at least one row"
    with pytest.raises(DataError, match=expected):
        read_schema_and_check(schema, directory)
    with pytest.raises(DataError, match=expected):
        _read_all(schema, directory)


def test_corrupt_parquet(tmp_path):
    schema = _schema()
    path = _write(str(tmp_path / "corrupt.parquet"), schema)
    data = open(path, "rb").read()
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])  # truncated: footer gone
    with pytest.raises(DataError, match=r"corrupt\.parquet: not a readable Parquet file"):
        _read_all(schema, path)


def test_a_corrupt_row_group_is_named_with_its_file_when_read(tmp_path):
    """The footer opens, but a later row group's page header is damaged: pyarrow's thrift error becomes a DataError
    naming the file and the row group, after the batches of the row group before it."""
    schema = _schema()
    path = _write(str(tmp_path / "corrupt.parquet"), schema)
    offset = pq.ParquetFile(path).metadata.row_group(1).column(0).data_page_offset
    data = bytearray(open(path, "rb").read())
    data[offset:offset + 8] = b"\xff" * 8
    with open(path, "wb") as handle:
        handle.write(bytes(data))
    assert read_schema_and_check(schema, path) == 6  # the footer still reads
    batches = iter(ParquetBatchReader(schema, path, batch_size=3, prefetch=0))
    assert next(batches).batch_size == 3
    with pytest.raises(DataError, match=r"corrupt\.parquet: row group 1 cannot be decoded \(corrupt Parquet\?\)"):
        next(batches)


def test_a_file_removed_after_the_reader_was_made_is_named(tmp_path):
    """The reader opens each file again every epoch: one deleted since is named as not found, not as corrupt."""
    schema = _schema()
    path = _write(str(tmp_path / "gone.parquet"), schema)
    reader = ParquetBatchReader(schema, path, batch_size=4, prefetch=0)
    os.remove(path)
    with pytest.raises(DataError, match=r"gone\.parquet: Parquet file not found"):
        list(reader)


def test_corrupt_parquet_not_parquet_at_all(tmp_path):
    path = str(tmp_path / "notes.parquet")
    with open(path, "w") as handle:
        handle.write("this is a CSV,really\n1,2\n")
    with pytest.raises(DataError, match=r"notes\.parquet: not a readable Parquet file"):
        read_schema_and_check(_schema(), path)


@pytest.mark.parametrize("bad", [2, -1])
def test_labels_outside_0_1(tmp_path, bad):
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, label=np.array([0, 1, 0, bad, 1, 0], dtype=np.int8))
    with pytest.raises(DataError, match=rf"f\.parquet: column 'label', row 3: label {bad} .*expected 0 or 1"):
        _read_all(schema, path)


def test_schema_data_mismatch_written_specs(tmp_path):
    """The file records the field specs it was written with; a different schema.json is rejected."""
    written = _schema()
    path = _write(str(tmp_path / "f.parquet"), written)
    edited = DatasetSchema(
        name="tiny",
        fields=[
            FieldSpec("user_id", FieldKind.SPARSE, cardinality=50),
            FieldSpec("tags", FieldKind.SEQUENCE, cardinality=5, max_length=2),
            FieldSpec("price", FieldKind.DENSE),
        ],
    )
    with pytest.raises(DataError, match=r"f\.parquet: schema/data mismatch for field 'user_id'.*cardinality=50.*cardinality=10"):
        read_schema_and_check(edited, path)


@pytest.mark.parametrize("index, edit, message", [
    (1, {"max_length": 3}, r"field 'tags': the schema says max_length=3 but the file was written with max_length=2"),
    (0, {"hashed": True}, r"field 'user_id': the schema says hashed=True but the file was written with hashed=False"),
    (0, {"kind": FieldKind.DENSE, "cardinality": 0},
     r"field 'user_id': the schema says kind='dense' but the file was written with kind='sparse'"),
], ids=["max_length", "hashed", "kind"])
def test_schema_data_mismatch_of_every_written_spec(tmp_path, index, edit, message):
    """Each spec the file records is compared, not only the cardinality: a changed max_length, hashed or kind
    (an id column read as a dense float) is a schema/data mismatch."""
    written = _schema()
    path = _write(str(tmp_path / "f.parquet"), written)
    fields = list(written.fields)
    fields[index] = dataclasses.replace(fields[index], **edit)
    with pytest.raises(DataError, match=r"f\.parquet: schema/data mismatch for " + message):
        read_schema_and_check(DatasetSchema(name="tiny", fields=fields), path)


@pytest.mark.parametrize("metadata", [b"[" * 100_000 + b"]" * 100_000, b'{"a": 1}', b"3", b"[1]"])
def test_unreadable_written_specs_are_named(tmp_path, metadata):
    """The specs a file records, damaged (nested past the recursion limit, or JSON of another shape): one DataError
    naming the file, not a RecursionError or TypeError traceback."""
    schema = _schema()
    path = str(tmp_path / "f.parquet")
    table = pa.table(_columns()).cast(arrow_schema_for(schema))
    pq.write_table(table.replace_schema_metadata({FIELDS_METADATA_KEY: metadata}), path)
    with pytest.raises(DataError, match=rf"^{re.escape(path)}: unreadable recsys_llm.fields metadata"):
        read_schema_and_check(schema, path)


def test_schema_data_mismatch_kind(tmp_path):
    """A sequence column where the schema says sparse: named as a likely schema/data mismatch."""
    schema = _schema()
    path = _write(str(tmp_path / "f.parquet"), schema, user_id=list_array(np.ones(6, int), np.arange(6)))
    with pytest.raises(DataError, match=r"f\.parquet: column 'user_id' \(sparse field\).*list<.*sequence field: schema/data mismatch"):
        _read_all(schema, path)


def test_schema_data_mismatch_other_data_set(tmp_path):
    """A file of another data set: the missing columns and the unknown ones are both listed."""
    path = str(tmp_path / "other.parquet")
    pq.write_table(pa.table({"movie": [1, 2], "rating": [3.0, 4.0], "label": [0, 1]}), path)
    with pytest.raises(DataError, match=r"other\.parquet: missing column.*not in the schema: \['movie', 'rating'\]"):
        read_schema_and_check(_schema(), path)


@pytest.mark.parametrize("column", ["user_id", "label", "row_id", "llm_vec"])
def test_a_column_twice_in_a_file_is_refused_naming_file_and_column(tmp_path, column):
    """pyarrow answered a repeated column with KeyError 'Column user_id does not exist in schema'."""
    schema = _schema()
    columns = {**_columns(), "llm_vec": np.zeros(6)}
    table = pa.Table.from_arrays([pa.array(v) for v in columns.values()] + [pa.array(columns[column])],
                                 names=list(columns) + [column])
    path = str(tmp_path / "twice.parquet")
    pq.write_table(table, path)
    match = rf"twice\.parquet: column\(s\) \['{column}'\] occur more than once; expected each column once"
    with pytest.raises(DataError, match=match):
        read_schema_and_check(schema, path, extras=["llm_vec"])
    with pytest.raises(DataError, match=match):
        ParquetBatchReader(schema, path, batch_size=4, extras=["llm_vec"])


def test_row_key_present_in_some_files_only(tmp_path):
    schema = _schema()
    os.makedirs(tmp_path / "split")
    _write(str(tmp_path / "split" / "a.parquet"), schema)
    _write(str(tmp_path / "split" / "b.parquet"), schema, row_id=None)
    with pytest.raises(DataError, match=r"b\.parquet: schema/data mismatch: row key column 'row_id'"):
        ParquetBatchReader(schema, str(tmp_path / "split"), batch_size=4)


class TestCheckNumber:
    def test_messages(self) -> None:
        check_number("x", 3, integer=True, minimum=1)
        check_number("x", 0.5, minimum=0, below=1)
        with pytest.raises(ValueError, match=r"^Cfg.dim \(--dim\) must be an integer >= 1, got -3$"):
            check_number("Cfg.dim (--dim)", -3, integer=True, minimum=1)
        with pytest.raises(ValueError, match=r"^lr must be a finite number > 0, got nan$"):
            check_number("lr", float("nan"), above=0)
        with pytest.raises(ValueError, match=r"must be a finite number >= 0 and < 1, got 1.0"):
            check_number("p", 1.0, minimum=0, below=1)
        with pytest.raises(ValueError, match="must be an integer >= 1, got True"):
            check_number("n", True, integer=True, minimum=1)

    def test_maximum_and_every_bound_in_order(self) -> None:
        check_number("f", 1.0, minimum=0, maximum=1)
        with pytest.raises(ValueError, match=r"^f must be a finite number >= 0 and <= 1, got 1\.5$"):
            check_number("f", 1.5, minimum=0, maximum=1)
        with pytest.raises(ValueError, match=r"^g must be a finite number >= 0 and > 0 and <= 2 and < 3, got 0$"):
            check_number("g", 0, minimum=0, above=0, maximum=2, below=3)

    def test_optional(self) -> None:
        check_number("n", None, integer=True, minimum=1, optional=True)
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1 or None, got 0$"):
            check_number("n", 0, integer=True, minimum=1, optional=True)
        with pytest.raises(ValueError, match=r"^t must be a finite number or None, got inf$"):
            check_number("t", math.inf, optional=True)
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got None$"):
            check_number("n", None, integer=True, minimum=1)

    def test_kinds(self) -> None:
        check_number("n", np.int64(4), integer=True, minimum=1)  # numpy numbers count
        check_number("x", np.float32(0.25), minimum=0, below=1)
        check_number("n", 10**400, integer=True, minimum=0)  # an int is finite however large
        with pytest.raises(ValueError, match=r"^x must be a finite number, got 10{400}$"):
            check_number("x", 10**400)  # a real setting must fit a float
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got 2\.0$"):
            check_number("n", 2.0, integer=True, minimum=1)
        with pytest.raises(ValueError, match=r"^n must be an integer >= 1, got (np\.True_|True)$"):
            check_number("n", np.bool_(True), integer=True, minimum=1)
        with pytest.raises(ValueError, match=r"^x must be a finite number, got '1'$"):
            check_number("x", "1")
        with pytest.raises(ValueError, match=r"^x must be a finite number, got False$"):
            check_number("x", False)
