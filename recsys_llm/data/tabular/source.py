"""Streaming a CSV file or Parquet files in record batches: column names, types, missing-value
cells, and pyarrow's CSV errors worded with the column and row."""

import csv
import io
import os
import re
from typing import Dict, Iterator, List, Optional, Tuple

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from recsys_llm.data.compressed import open_text
from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.tabular.config import SPLIT_TYPES, TabularConfig
from recsys_llm.data.validation import DataError, describe_row, open_parquet, reads_as_number

# pyarrow's message for a cell its CSV reader cannot convert to the column's type (Row # counts the header as 1)
_CONVERSION = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to (.+?): invalid value '(.*)'$",
                         re.DOTALL)
# its message for a cell of a string column that is not UTF-8 (a latin-1 export)
_NOT_UTF8 = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to \w*string: invalid UTF8 data")


def is_parquet(path: str) -> bool:
    """A directory, a ``*.parquet`` / ``*.pq`` file, or a file of another name that starts and ends with
    Parquet's magic bytes ``PAR1`` (Hive's ``000000_0``, ``*.parq``); anything else is read as a CSV."""
    if path.endswith((".parquet", ".pq")) or os.path.isdir(path):
        return True
    try:
        with open(path, "rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == b"PAR1" and handle.read(4) == b"PAR1"
    except OSError:  # absent, unreadable or shorter than 4 bytes: named where it is read
        return False


def first_line(path: str) -> Optional[int]:
    """Line of data row 0 in a CSV (the header is line 1); None for Parquet, or for rows that are not read from
    a file (``raw_value_ids``' values): their rows have no lines."""
    return None if is_parquet(path) or not os.path.isfile(path) else 2


def unreadable(path: str, error: OSError) -> DataError:
    """The error of a file that fails while it is decompressed or read (pyarrow's bare ``OSError: Truncated
    compressed stream`` of a cut-short ``.csv.gz``, ``zlib inflate failed`` of a plain file named ``.gz``)."""
    return DataError(f"{path}: cannot be read ({error}); expected a complete file (a compressed one cut short, e.g. "
                     "by an interrupted download, or not in the format its suffix names)")


def _csv_columns(path: str, delimiter: str) -> List[str]:
    """The header's column names, quoted ones unquoted and a UTF-8 byte order mark dropped
    (as pyarrow's CSV reader reads them: Excel's "CSV UTF-8" starts with one)."""
    try:
        with io.TextIOWrapper(open_text(path), encoding="utf-8-sig", errors="replace",
                              newline="") as handle:  # a .csv.gz decompressed, as read_blocks reads it
            return next(csv.reader(handle, delimiter=delimiter), [])
    except OSError as error:
        if error.errno is not None:  # the file system's (absent, unreadable): named as it is
            raise
        raise unreadable(path, error) from error


class ColumnTypeChanged(DataError):
    """A CSV extra or split column whose type, inferred from the file's first block, does not hold a cell of a
    later block (an empty column there and ``hello`` later, integers there and ``3.5`` later). Reading the file
    again with the types :func:`csv_column_types` infers over the whole file converts it.

    Attributes:
        columns (List[str]): the columns whose types the reader inferred (the extra and split columns).
    """

    def __init__(self, message: str, columns: List[str]) -> None:
        super().__init__(message)
        self.columns = columns


def csv_column_types(path: str, columns: List[str], config: TabularConfig) -> Optional[Dict[str, pa.DataType]]:
    """The types pyarrow's CSV reader infers for ``columns`` over the whole CSV ``path`` (the streaming reader of
    :func:`read_blocks` infers them from the first block alone); None when the file cannot be read so (the
    streaming reader names why). A row of another column count is skipped here: the streaming reader, reading
    with these types, names it. Holds those columns of every row in memory while it reads."""
    try:
        with open_text(path) as stream:
            table = pacsv.read_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=config.block_bytes, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=config.delimiter, newlines_in_values=True,
                                                 invalid_row_handler=lambda row: "skip"),
                convert_options=pacsv.ConvertOptions(include_columns=columns, strings_can_be_null=False,
                                                     null_values=null_values(config)),
            )
    except (pa.ArrowException, OSError):
        return None
    return {name: table.schema.field(name).type for name in columns}


def read_blocks(
    path: str,
    schema: DatasetSchema,
    columns: List[str],
    config: TabularConfig,
    row_key: Optional[str] = None,
    column_types: Optional[Dict[str, pa.DataType]] = None,
) -> Iterator[Tuple[str, int, pa.RecordBatch]]:
    """``(file, row, batch)``: record batches of the wanted columns, from a Parquet file/directory or a
    CSV with a header, each with the file it comes from and the row of that file it starts at (what
    messages name: a directory's file, not the directory and a row counted over its files).

    In a CSV, field columns are read as strings (dense ones as floats) and the row key column
    ``row_key`` as strings, parsed later with messages naming the row. The other columns (extra and
    split columns) are read as ``column_types`` gives (:func:`csv_column_types`), else with the types
    the CSV reader infers from the first block: a later cell those types do not hold raises
    :class:`ColumnTypeChanged`.
    """
    if is_parquet(path):
        files = parquet_files(path)
        # the split column and extra columns are ranked and written as one column: one type in every file
        roles = {name: "extra column" for name in schema.extra_columns if name in columns}
        if config.split_by:
            roles[config.split_by] = "split column, --split-by"
        types = common_types(path, files, roles)
        for file_path in files:
            handle = open_parquet(file_path)
            row = 0
            try:
                for batch in handle.iter_batches(batch_size=65536, columns=columns):
                    yield file_path, row, _cast_columns(batch, types, file_path)
                    row += batch.num_rows
            except (pa.ArrowException, OSError) as error:
                raise DataError(f"{file_path}: cannot be decoded (corrupt Parquet?): {error}") from error
        return
    types: Dict[str, pa.DataType] = {}
    for spec in schema.fields:
        types[spec.name] = pa.float64() if spec.kind == FieldKind.DENSE else pa.string()
    types[schema.label] = pa.float64()
    if row_key and row_key != config.split_by:  # a split column keeps its inferred (numeric) type to sort by
        types[row_key] = pa.string()
    inferred = [name for name in columns if name not in types]  # extra and split columns
    types.update({name: dtype for name, dtype in (column_types or {}).items() if name in inferred})
    bad: List[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(f"{path}, line {row.number}: {row.actual_columns} columns, expected {row.expected_columns}: {row.text[:80]!r}")
        return "error"

    try:
        with open_text(path) as stream:  # decompressed by its suffix or, named otherwise, by its first bytes
            reader = pacsv.open_csv(
                stream,
                read_options=pacsv.ReadOptions(block_size=config.block_bytes, use_threads=False),
                # a quoted cell may span lines (a review, a description): without newlines_in_values, one that
                # crosses a block's end is cut there ("CSV parser got out of sync with chunker", or a false column
                # count)
                parse_options=pacsv.ParseOptions(delimiter=config.delimiter, invalid_row_handler=on_invalid,
                                                 newlines_in_values=True),
                # a --missing-token (MySQL's and PostgreSQL's \N) is missing in numeric columns too
                convert_options=pacsv.ConvertOptions(column_types={k: v for k, v in types.items() if k in columns},
                                                     include_columns=columns, strings_can_be_null=False,
                                                     null_values=null_values(config)),
            )
            row = 0
            for batch in reader:
                yield path, row, _missing_as_null(batch, config.missing_tokens)
                row += batch.num_rows
    except OSError as error:  # decompression, not conversion (pyarrow's ArrowIOError is one)
        if error.errno is not None:
            raise
        raise unreadable(path, error) from error
    except pa.ArrowInvalid as error:
        if bad:
            raise DataError(bad[0]) from error
        message = _conversion_error(path, schema, config, str(error))
        if _failing_column(path, config, str(error)) in [name for name in inferred if name not in types]:
            raise ColumnTypeChanged(message, inferred) from error
        raise DataError(message) from error


def common_types(path: str, files: List[str], roles: Dict[str, str]) -> Dict[str, pa.DataType]:
    """The type each column of ``roles`` (name -> its role, for messages) is read as in every file of
    ``files``: the same in all, or widened as pyarrow promotes types (int32 and int64 to int64, ms and
    us timestamps to us, a null column to the others' type); dictionary-encoded columns as their values.

    Raises:
        DataError: a column whose types in two files do not widen to one (an integer column in one file
            and a timestamp in another), naming both files; a file without it is left to the column checks.
    """
    types: Dict[str, pa.DataType] = {}
    first: Dict[str, Tuple[pa.DataType, str]] = {}
    stored: Dict[str, set] = {}  # the types as stored: a column of one type in every file is read as it is
    for file_path in files if len(files) > 1 else []:
        arrow = open_parquet(file_path).schema_arrow
        for name, role in roles.items():
            if arrow.get_field_index(name) < 0:
                continue
            dtype = arrow.field(name).type
            stored.setdefault(name, set()).add(dtype)
            dtype = dtype.value_type if pa.types.is_dictionary(dtype) else dtype
            first_type, first_file = first.setdefault(name, (dtype, file_path))
            try:
                types[name] = pa.unify_schemas([pa.schema([(name, types.get(name, first_type))]), pa.schema([(name, dtype)])],
                                               promote_options="permissive").field(name).type
            except (pa.ArrowTypeError, pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise DataError(f"{path}: column {name!r} ({role}) has type {dtype} in {file_path} but {first_type} in "
                                f"{first_file}; expected one type in every file (write the column with one type)") from error
    return {name: dtype for name, dtype in types.items() if len(stored[name]) > 1}


def _cast_columns(batch: pa.RecordBatch, types: Dict[str, pa.DataType], path: str) -> pa.RecordBatch:
    """``batch`` with the columns of ``types`` cast to those types (see :func:`common_types`)."""
    if not any(name in batch.schema.names and batch.schema.field(name).type != t for name, t in types.items()):
        return batch
    arrays = []
    for name, column in zip(batch.schema.names, batch.columns):
        if name in types and column.type != types[name]:
            try:
                column = pc.cast(column, types[name])
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as error:
                raise DataError(f"{path}: column {name!r} of type {column.type} cannot be read as {types[name]}, the "
                                f"type it has in the other files ({error}); expected one type in every file") from error
        arrays.append(column)
    return pa.RecordBatch.from_arrays(arrays, names=batch.schema.names)


def _failing_column(path: str, config: TabularConfig, message: str) -> Optional[str]:
    """The column of a CSV conversion error ``message`` of pyarrow's (None for another message)."""
    match = _CONVERSION.search(message)
    if match is None:
        return None
    header = _csv_columns(path, config.delimiter)
    index = int(match.group(1))
    return header[index] if index < len(header) else None


def _conversion_error(path: str, schema: DatasetSchema, config: TabularConfig, message: str) -> str:
    """pyarrow's ``In CSV column #4: Row #9: CSV conversion error to double: invalid value 'abc'``
    worded as this module's messages: the column by name, the data row (pyarrow counts the header as
    row 1) and what was expected; any other message of the CSV reader as it is."""
    not_utf8 = _NOT_UTF8.search(message)
    if not_utf8 is not None:
        index, number = not_utf8.groups()
        header = _csv_columns(path, config.delimiter)
        column = header[int(index)] if int(index) < len(header) else f"#{index}"
        where = f"{path}: column {column!r}" + (f", {describe_row(int(number) - 2, first_line(path))}" if number else "")
        return f"{where}: the cell is not UTF-8; expected a UTF-8 file (re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8)"
    match = _CONVERSION.search(message)
    if match is None:
        return f"{path}: cannot parse as CSV with the schema's column types: {message}"
    index, number, type_name, value = match.groups()
    header = _csv_columns(path, config.delimiter)
    column = header[int(index)] if int(index) < len(header) else f"#{index}"
    where = f"{path}: column {column!r}" + (f", {describe_row(int(number) - 2, first_line(path))}" if number else "")
    kind = ("a number" if type_name in ("double", "float") else "an integer" if "int" in type_name
            else "a timestamp" if type_name.startswith("timestamp") else "a date" if type_name.startswith("date")
            else f"a {type_name}")
    if column == config.split_by:
        return f"{where}: {value!r} is not {kind} like the column's first rows; expected {SPLIT_TYPES}"
    if column in schema.dense_feature_names:
        return (f"{where}: {value!r} is not a number; expected a number in every row of dense field {column!r} "
                "(a missing value is an empty cell, NA or a --missing-token, which --fill-missing-dense replaces)")
    if column == schema.label:
        return (f"{where}: {value!r} is not a number; expected a 0/1 label (or a number to binarise with "
                "--label-threshold)")
    return (f"{where}: {value!r} is not {kind} like the column's first rows; expected one type per column "
            f"(the CSV reader took {type_name} from the first rows)")


def null_values(config: TabularConfig) -> List[str]:
    """The cells a numeric CSV column reads as missing: pyarrow's usual markers (empty, ``NA``, ``NaN``, ``null``,
    ``N/A``, ...) and the ``config.missing_tokens`` that are no number (MySQL's ``\\N``, ``unknown``). A token that
    reads as a number (``-1``, ``0``: a string column's "unknown" code) stays that number in a number column, as
    it always did: a price of -1 or a label of 0 is not made missing (or filled by ``--fill-missing-dense``)."""
    usual = list(pacsv.ConvertOptions().null_values)
    return usual + [token for token in config.missing_tokens if token not in usual and not reads_as_number(token)]


def null_where_in(strings: pa.Array, tokens: pa.Array) -> pa.Array:
    """``strings`` with every cell equal to one of ``tokens`` made null."""
    return pc.if_else(pc.is_in(strings, value_set=tokens), pa.scalar(None, strings.type), strings)


def _missing_as_null(batch: pa.RecordBatch, tokens: Tuple[str, ...]) -> pa.RecordBatch:
    """String cells equal to one of ``tokens`` become null (the CSV reader keeps every string as written)."""
    if not tokens:
        return batch
    arrays = [
        null_where_in(column, pa.array(tokens, column.type))
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else column
        for column in batch.columns
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def repeated_columns(available: List[str], wanted: List[str]) -> List[str]:
    """The ``wanted`` columns that ``available`` (a file's header) holds more than once."""
    return [c for c in dict.fromkeys(wanted) if available.count(c) > 1]


def source_columns(path: str, config: TabularConfig) -> List[str]:
    """The column names of a source file (a Parquet file's or directory's first file, or a CSV's header)."""
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    if is_parquet(path):
        return list(open_parquet(parquet_files(path)[0]).schema_arrow.names)
    return _csv_columns(path, config.delimiter)
