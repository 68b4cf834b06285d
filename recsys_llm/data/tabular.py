"""Bring your own data: any CSV/Parquet file + a schema file -> validated Parquet splits.

The user writes a schema file (JSON or YAML, the format of
:class:`~recsys_llm.data.schema.DatasetSchema`) naming the fields to use::

    name: shop-clicks
    label: clicked
    row_key: event_id                 # optional: a column of unique integers; without it rows are numbered as row_id
    extra_columns: [timestamp]
    fields:
      - {name: user, kind: sparse, cardinality: 50000, description: "shopper id"}
      - {name: city, kind: sparse, cardinality: 400, description: "city of the shopper"}
      - {name: query, kind: sparse, cardinality: 1000000, hashed: true, description: "search query"}
      - {name: categories, kind: sequence, cardinality: 300, max_length: 5, description: "product categories"}
      - {name: price, kind: dense, description: "price in euros"}

Columns are converted per field kind (values are taken as they are: no scaling):

* **sparse**: integer columns are ids (checked against ``cardinality``; folded with a
  modulo when ``hashed``, a ``uint64`` id above ``2**63 - 1`` included). A floating column (pandas
  writes an integer column with a gap as float64) holds ids too: whole numbers, NaN or null for
  missing; another value is an error naming its row. Dictionary-encoded columns (pandas'
  ``category``) are read as their values. String columns holding only integers are parsed as ids (a
  column of mostly integers with a few other values is an error naming the first one, unless
  the field is listed in ``vocabulary_fields`` or hashed); other strings are hashed
  (``hashed: true``) or mapped through a vocabulary built from the data (ids ``1..V`` in
  sorted order, ``cardinality`` must be at least ``V + 1``), and the vocabulary is written as the field's value text: the strings become what the
  LLM methods read. Missing values get id 0; in a CSV, only an empty cell is missing
  (``TabularConfig.missing_tokens``), so ``NA`` or ``null`` are words like any other,
  except in a column of integer ids, where pyarrow's missing markers (``NA``, ``null``,
  ``NaN``, ...) are missing (R's ``write.csv`` writes ``NA``).
* **sequence**: list columns (Parquet) or strings joined by ``sequence_separator``
  (CSV, or a Parquet string column), tokens handled as for sparse fields, except that a missing
  token is dropped from its sequence, not given id 0: a null element of a list (of strings or of
  integers), an empty or blank string token, a missing-value marker among integer ids. A scalar
  column of numbers is no sequence column (an error).
* **dense**: numbers; NaN/inf/missing are errors unless ``fill_missing_dense`` is set.
* **label**: 0/1 (or ``value > label_threshold`` when a threshold is set, e.g. ratings).
* **row key**: the column ``row_key`` names must exist and hold a unique integer per row;
  without ``row_key`` in the schema a ``row_id`` column of the data is used, else the rows
  are numbered ``0..N-1`` as ``row_id``.

Errors name CSV rows as ``data row R (line L if no blank line or multi-line cell precedes it)``:
``R`` counts data rows from 0, ``L`` counts lines from the header line 1 (the CSV reader skips
blank lines, and a quoted cell may span lines: either shifts ``L``).

Splits are random (seeded, stable per row) or time-ordered by ``split_by`` (rows
ranked by that column, ties in file order; rows keep file order inside a split). The split
column holds one sortable type: numbers, or ISO-8601 dates/timestamps (all with or all without
a zone offset); a text column of them is parsed, other text is an error naming the first such
cell, as text order is no time order (``"10" < "100" < "20"``, ``"12/31/2023" > "01/05/2024"``).
In a directory of Parquet files, every file must hold the columns, each of one token type (integer
ids or string tokens) in all files; a field listed in ``vocabulary_fields`` may mix them (every
value is then read as text). Reading is streamed in blocks; only the split column, the row keys (checked for repeats)
and the vocabularies are held in memory. The output is written whole or not at all (a failed run keeps an earlier one).
"""

import csv
import dataclasses
import os
import re
import shutil
from typing import Dict, Iterator, List, Optional, Set, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from recsys_llm.data.hashing import hash_strings
from recsys_llm.data.parquet import SplitWriter, arrow_schema_for, list_array, parquet_files, write_prepared
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec, SchemaError, load_raw, schema_file
from recsys_llm.data.synthetic import write_value_text
from recsys_llm.data.validation import (
    DataError,
    check_dense,
    check_ids,
    check_labels,
    check_no_nulls,
    check_number,
    check_split_fractions,
    describe_row,
    offsets_from_lengths,
    open_parquet,
    row_of_value,
)

_INTEGER = r"^\s*-?\d+\s*$"
# how to accept missing or non-finite dense values, from the command line and from Python
_FILL_HINT = "or pass --fill-missing-dense VALUE, TabularConfig.fill_missing_dense in Python, to replace missing and NaN/inf"
# what a split column must hold (see _sort_keys)
_SPLIT_TYPES = ("one sortable type in every row of the split column (--split-by): numbers, or ISO-8601 dates/"
                "timestamps such as 2024-01-05 or 2024-01-05T10:00:00 (all with or all without a zone offset "
                "such as Z or +02:00); other text is refused as its order is no time order ('10' < '100' < '20')")
_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_ISO_TIME = r"^\s*\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)?\s*$"
_ZONE = r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)\s*$"  # a time with a zone offset
# pyarrow's message for a cell its CSV reader cannot convert to the column's type (Row # counts the header as 1)
_CONVERSION = re.compile(r"In CSV column #(\d+): (?:Row #(\d+): )?CSV conversion error to (.+?): invalid value '(.*)'$",
                         re.DOTALL)
# pyarrow's CSV missing-value markers: in a column of integer ids they mean missing (id 0)
NULL_MARKERS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                          "<NA>", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"})


@dataclasses.dataclass(frozen=True)
class TabularConfig:
    """Options of the tabular conversion.

    Args:
        split_by (Optional[str]): column for a time-ordered split, holding numbers or ISO-8601
            dates/timestamps (text of them is parsed; other text is an error); None: random split.
        split_fractions (Tuple[float, float, float]): train/valid/test shares.
        seed (int): seed of the random split.
        label_threshold (Optional[float]): label = (value > threshold) instead of requiring 0/1.
        fill_missing_dense (Optional[float]): value for missing/NaN dense features (None: error).
        sequence_separator (str): separator of sequence tokens in CSV strings.
        delimiter (str): CSV delimiter.
        rows_per_group (int): Parquet row group size.
        block_bytes (int): CSV bytes parsed per block.
        missing_tokens (Tuple[str, ...]): CSV cells of string columns (sparse, sequence, extra)
            read as missing; by default only the empty cell, so words such as ``NA``
            (Namibia) or ``null`` stay values. Numeric columns (dense, label) read pyarrow's
            usual missing markers (empty, ``NA``, ``NaN``, ``null``, ``N/A``, ...).
        vocabulary_fields (Tuple[str, ...]): categorical fields whose values are mapped through
            a vocabulary built from the data even when they are (mostly) integers, e.g. zip codes.
            Without it, a column of integer ids with a few other values is an error.
    """

    split_by: Optional[str] = None
    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    seed: int = 0
    label_threshold: Optional[float] = None
    fill_missing_dense: Optional[float] = None
    sequence_separator: str = "|"
    delimiter: str = ","
    rows_per_group: int = 65536
    block_bytes: int = 16 << 20
    missing_tokens: Tuple[str, ...] = ("",)
    vocabulary_fields: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_split_fractions(self.split_fractions, "TabularConfig.split_fractions")
        check_number("TabularConfig.seed", self.seed, integer=True, minimum=0)
        check_number("TabularConfig.label_threshold", self.label_threshold, optional=True)
        check_number("TabularConfig.fill_missing_dense", self.fill_missing_dense, optional=True)
        check_number("TabularConfig.rows_per_group", self.rows_per_group, integer=True, minimum=1)
        check_number("TabularConfig.block_bytes", self.block_bytes, integer=True, minimum=1)
        if not isinstance(self.sequence_separator, str) or not self.sequence_separator:
            raise ValueError(f"TabularConfig.sequence_separator={self.sequence_separator!r}: expected a non-empty string")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1:
            raise ValueError(f"TabularConfig.delimiter={self.delimiter!r}: expected one character, e.g. ',' or '\\t'")
        for option in ("missing_tokens", "vocabulary_fields"):
            value = getattr(self, option)
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"TabularConfig.{option}={value!r}: expected a tuple of strings, e.g. ('', 'NA')")


# ---- streaming the source ---------------------------------------------------------------------------
def _is_parquet(path: str) -> bool:
    return path.endswith((".parquet", ".pq")) or os.path.isdir(path)


def _first_line(path: str) -> Optional[int]:
    """Line of data row 0 in a CSV (the header is line 1); None for Parquet (rows have no lines)."""
    return None if _is_parquet(path) else 2


def _csv_columns(path: str, delimiter: str) -> List[str]:
    """The header's column names, quoted ones unquoted and a UTF-8 byte order mark dropped
    (as pyarrow's CSV reader reads them: Excel's "CSV UTF-8" starts with one)."""
    with open(path, encoding="utf-8-sig", errors="replace", newline="") as handle:
        return next(csv.reader(handle, delimiter=delimiter), [])


def _blocks(
    path: str, schema: DatasetSchema, columns: List[str], config: TabularConfig, row_key: Optional[str] = None
) -> Iterator[pa.RecordBatch]:
    """Record batches of the wanted columns, from a Parquet file/directory or a CSV with a header.

    In a CSV, field columns are read as strings (dense ones as floats) and the row key column
    ``row_key`` as strings, parsed later with messages naming the row.
    """
    if _is_parquet(path):
        for file_path in parquet_files(path):
            handle = open_parquet(file_path)
            try:
                yield from handle.iter_batches(batch_size=65536, columns=columns)
            except (pa.ArrowException, OSError) as error:
                raise DataError(f"{file_path}: cannot be decoded (corrupt Parquet?): {error}") from error
        return
    types: Dict[str, pa.DataType] = {}
    for spec in schema.fields:
        types[spec.name] = pa.float64() if spec.kind == FieldKind.DENSE else pa.string()
    types[schema.label] = pa.float64()
    if row_key and row_key != config.split_by:  # a split column keeps its inferred (numeric) type to sort by
        types[row_key] = pa.string()
    bad: List[str] = []

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(f"{path}, line {row.number}: {row.actual_columns} columns, expected {row.expected_columns}: {row.text[:80]!r}")
        return "error"

    try:
        reader = pacsv.open_csv(
            path,
            read_options=pacsv.ReadOptions(block_size=config.block_bytes, use_threads=False),
            parse_options=pacsv.ParseOptions(delimiter=config.delimiter, invalid_row_handler=on_invalid),
            convert_options=pacsv.ConvertOptions(column_types={k: v for k, v in types.items() if k in columns},
                                                 include_columns=columns, strings_can_be_null=False),
        )
        for batch in reader:
            yield _missing_as_null(batch, config.missing_tokens)
    except pa.ArrowInvalid as error:
        raise DataError(bad[0] if bad else _conversion_error(path, schema, config, str(error))) from error


def _conversion_error(path: str, schema: DatasetSchema, config: TabularConfig, message: str) -> str:
    """pyarrow's ``In CSV column #4: Row #9: CSV conversion error to double: invalid value 'abc'``
    worded as this module's messages: the column by name, the data row (pyarrow counts the header as
    row 1) and what was expected; any other message of the CSV reader as it is."""
    match = _CONVERSION.search(message)
    if match is None:
        return f"{path}: cannot parse as CSV with the schema's column types: {message}"
    index, number, type_name, value = match.groups()
    header = _csv_columns(path, config.delimiter)
    column = header[int(index)] if int(index) < len(header) else f"#{index}"
    where = f"{path}: column {column!r}" + (f", {describe_row(int(number) - 2, _first_line(path))}" if number else "")
    kind = ("a number" if type_name in ("double", "float") else "an integer" if "int" in type_name
            else "a timestamp" if type_name.startswith("timestamp") else "a date" if type_name.startswith("date")
            else f"a {type_name}")
    if column == config.split_by:
        return f"{where}: {value!r} is not {kind} like the column's first rows; expected {_SPLIT_TYPES}"
    if column in schema.dense_feature_names:
        return (f"{where}: {value!r} is not a number; expected a number in every row of dense field {column!r} "
                "(a missing value is an empty cell or NA, which --fill-missing-dense replaces)")
    if column == schema.label:
        return (f"{where}: {value!r} is not a number; expected a 0/1 label (or a number to binarise with "
                "--label-threshold)")
    return (f"{where}: {value!r} is not {kind} like the column's first rows; expected one type per column "
            f"(the CSV reader took {type_name} from the first rows)")


def _null_where_in(strings: pa.Array, tokens: pa.Array) -> pa.Array:
    """``strings`` with every cell equal to one of ``tokens`` made null."""
    return pc.if_else(pc.is_in(strings, value_set=tokens), pa.scalar(None, strings.type), strings)


def _missing_as_null(batch: pa.RecordBatch, tokens: Tuple[str, ...]) -> pa.RecordBatch:
    """String cells equal to one of ``tokens`` become null (the CSV reader keeps every string as written)."""
    if not tokens:
        return batch
    arrays = [
        _null_where_in(column, pa.array(tokens, column.type))
        if pa.types.is_string(column.type) or pa.types.is_large_string(column.type) else column
        for column in batch.columns
    ]
    return pa.RecordBatch.from_arrays(arrays, schema=batch.schema)


def _repeated_columns(available: List[str], wanted: List[str]) -> List[str]:
    """The ``wanted`` columns that ``available`` (a file's header) holds more than once."""
    return [c for c in dict.fromkeys(wanted) if available.count(c) > 1]


def _source_columns(path: str, config: TabularConfig) -> List[str]:
    if not os.path.exists(path):
        raise DataError(f"{path}: data file not found")
    if _is_parquet(path):
        return list(open_parquet(parquet_files(path)[0]).schema_arrow.names)
    return _csv_columns(path, config.delimiter)


# ---- tokens -------------------------------------------------------------------------------------------
def _is_list(dtype: pa.DataType) -> bool:
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


_TOKEN_WORDS = {"integer": "integer ids", "string": "string tokens"}  # a token type in messages


def _token_type(dtype: pa.DataType) -> Optional[str]:
    """What a categorical column's values are: ``"integer"`` ids (integers, or floats holding whole
    numbers), ``"string"`` tokens, or None (another type); lists and dictionaries by their values."""
    if _is_list(dtype):
        dtype = dtype.value_type
    if pa.types.is_dictionary(dtype):
        dtype = dtype.value_type
    if pa.types.is_integer(dtype) or pa.types.is_floating(dtype):
        return "integer"
    return "string" if _is_text(dtype) else None


def _check_token_column(path: str, spec: FieldSpec, dtype: pa.DataType, separator: str) -> None:
    """Raises unless a column of type ``dtype`` fits categorical field ``spec``: one value per row for
    a sparse field, a list (or a string of tokens joined by ``separator``) for a sequence field."""
    where = f"{path}: column {spec.name!r} ({spec.kind.value} field) has type {dtype}"
    scalar = dtype.value_type if pa.types.is_dictionary(dtype) else dtype  # a string column may be dictionary-encoded
    if spec.kind == FieldKind.SEQUENCE and not _is_list(dtype) and not _is_text(scalar):
        raise DataError(f"{where}; expected a list column (e.g. list<int64> or list<string>) or a string column of "
                        f"tokens joined by {separator!r} (--sequence-separator, TabularConfig.sequence_separator); "
                        "a column of one value per row fits a sparse field")
    if spec.kind == FieldKind.SPARSE and _is_list(dtype):
        raise DataError(f"{where}; expected one integer id or string token per row (a list column fits a "
                        "sequence field)")
    if _token_type(dtype) is None:
        raise DataError(f"{where}; expected integer ids (integers, or floats holding whole numbers) or string "
                        "tokens (strings, or dictionary-encoded strings such as pandas' category)")


def _check_parquet_types(path: str, schema: DatasetSchema, config: TabularConfig, columns: List[str]) -> Dict[str, str]:
    """Checks the footer of every Parquet file of ``path``: the ``columns``, and categorical columns
    of a type that fits their field and of one token type in every file (``"integer"`` ids or
    ``"string"`` tokens; a ``vocabulary_fields`` field may mix them: its values are read as text).

    Returns:
        Dict[str, str]: the token type of every categorical field: ``"integer"``, ``"string"`` or
        ``"mixed"`` (a ``vocabulary_fields`` field whose files differ).
    """
    files = parquet_files(path)
    first: Dict[str, Tuple[str, pa.DataType, str]] = {}  # field -> (token type, Arrow type, file) of its first file
    kinds: Dict[str, str] = {}
    for file_path in files:
        arrow = open_parquet(file_path).schema_arrow
        absent = [c for c in columns if c not in arrow.names]
        if absent:
            raise DataError(f"{file_path}: missing column(s) {absent} that {files[0]} has; expected the same columns "
                            f"in every file of {path}")
        repeated = _repeated_columns(arrow.names, columns)
        if repeated:
            raise DataError(f"{file_path}: column(s) {repeated} occur more than once; expected each column once "
                            "(rename or drop the copies)")
        for spec in schema.categorical_fields:
            dtype = arrow.field(spec.name).type
            _check_token_column(file_path, spec, dtype, config.sequence_separator)
            kind = _token_type(dtype)
            first_kind, first_type, first_file = first.setdefault(spec.name, (kind, dtype, file_path))
            kinds[spec.name] = kinds.get(spec.name, kind) if kind == first_kind else "mixed"
            if kind == first_kind or spec.name in config.vocabulary_fields:
                continue
            hint = "" if spec.hashed else (f", or pass --vocabulary {spec.name} (TabularConfig.vocabulary_fields) to "
                                            "read every value as text through a vocabulary")
            raise DataError(
                f"{path}: column {spec.name!r} has type {dtype} ({_TOKEN_WORDS[kind]}) in {file_path} but {first_type} "
                f"({_TOKEN_WORDS[first_kind]}) in {first_file}; expected integer ids in every file or string tokens in "
                f"every file (write the column with one type{hint})"
            )
    return kinds


def _decoded(array: pa.Array) -> pa.Array:
    """A dictionary-encoded array (pandas' category) as its values; any other array as it is."""
    return pc.cast(array, array.type.value_type) if pa.types.is_dictionary(array.type) else array


def _whole_numbers(flat: pa.Array, path: str, spec: FieldSpec, lengths: Optional[np.ndarray], row: int) -> pa.Array:
    """Floating ids (pandas writes an integer column with a gap as float64) as int64; NaN and null are
    missing (null). ``lengths``: per-row counts of ``flat`` for sequences, None for sparse fields.

    Raises:
        DataError: naming the row of the first value that is no whole number within int64.
    """
    values = flat.to_numpy(zero_copy_only=False).astype(np.float64)  # nulls as NaN
    missing = np.isnan(values)
    with np.errstate(invalid="ignore"):
        ok = missing | ((values == np.floor(values)) & (values >= -(2.0 ** 63)) & (values < 2.0 ** 63))
    if not ok.all():
        index = int(np.argmin(ok))
        bad_row = row + row_of_value(None if lengths is None else offsets_from_lengths(lengths), index)
        raise DataError(
            f"{path}: column {spec.name!r}, {describe_row(bad_row, _first_line(path))}: {values[index].item()!r} is not "
            f"a whole number; expected integer ids in {spec.kind.value} field {spec.name!r} (a floating column may "
            "hold whole numbers, and NaN or null for missing)"
        )
    return pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing)


def _tokens(
    array: pa.Array,
    spec: FieldSpec,
    separator: str,
    path: str,
    row: int,
    missing: Optional[pa.Array] = None,
) -> Tuple[pa.Array, Optional[np.ndarray]]:
    """(flat tokens, per-row lengths or None for sparse fields) of a block whose first row is ``row``.

    The tokens are integer ids or strings: dictionary-encoded columns are decoded and floating
    ids made int64 (NaN is missing, a fraction an error). Sequences drop their missing tokens:
    null elements (of string and of integer lists alike), empty or blank strings, and strings
    in ``missing`` (markers such as ``NA`` among integer ids); a null list is an empty sequence.
    Sparse fields keep their nulls (id 0).

    Raises:
        DataError: a column whose type does not fit the field (see :func:`_check_token_column`),
            or a floating id that is no whole number.
    """
    _check_token_column(path, spec, array.type, separator)
    array = _decoded(array)
    lengths: Optional[np.ndarray] = None
    if spec.kind == FieldKind.SPARSE:
        flat = array
    else:
        if _is_text(array.type):
            array = pc.split_pattern(pc.fill_null(array, ""), separator)
        lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False).astype(np.int64)
        flat = _decoded(pc.list_flatten(array))
    if pa.types.is_floating(flat.type):
        flat = _whole_numbers(flat, path, spec, lengths, row)
    if lengths is not None:
        keep = flat.is_valid()
        if _is_text(flat.type):
            flat = pc.utf8_trim_whitespace(flat)
            keep = pc.and_(keep, pc.fill_null(pc.not_equal(flat, ""), False))
            if missing is not None:
                keep = pc.and_(keep, pc.invert(pc.fill_null(pc.is_in(flat, value_set=missing), False)))
        keep = np.asarray(keep, dtype=bool)
        if not keep.all():
            rows = np.repeat(np.arange(len(lengths)), lengths)
            lengths = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int64)
            flat = flat.filter(pa.array(keep))
    return flat, lengths


@dataclasses.dataclass
class _FieldPlan:
    mode: str  # "ids" (integers), "hash" or "vocab"
    vocabulary: Optional[pa.Array] = None
    missing: Optional[pa.Array] = None  # "ids": missing-value markers among the integers (id 0)


@dataclasses.dataclass
class _TokenCounts:
    """What the first pass saw of a string field's tokens."""

    seen: Set[str] = dataclasses.field(default_factory=set)  # distinct non-null tokens
    not_integer: Set[str] = dataclasses.field(default_factory=set)  # distinct tokens that are no integer
    integers: int = 0  # integer tokens
    others: int = 0  # tokens that are neither an integer nor a missing-value marker
    first_other: Optional[Tuple[str, int]] = None  # (token, row) of the first such token


def _count_tokens(counts: _TokenCounts, flat: pa.Array, lengths: Optional[np.ndarray], row: int) -> None:
    """Adds a block's string tokens (``flat``; ``lengths`` per row for sequences) whose first row is ``row``."""
    flat_valid = flat.drop_null()
    counts.seen.update(pc.unique(flat_valid).to_pylist())
    is_integer = pc.fill_null(pc.match_substring_regex(flat, _INTEGER), False)
    counts.not_integer.update(pc.unique(flat.filter(pc.invert(is_integer)).drop_null()).to_pylist())
    counts.integers += int(pc.sum(is_integer).as_py() or 0)
    marker = pc.fill_null(pc.is_in(flat, value_set=pa.array(sorted(NULL_MARKERS), flat.type)), False)
    other = np.asarray(pc.and_(pc.and_(flat.is_valid(), pc.invert(is_integer)), pc.invert(marker)), dtype=bool)
    counts.others += int(other.sum())
    if counts.first_other is None and other.any():
        index = int(np.argmax(other))
        offsets = None if lengths is None else offsets_from_lengths(lengths)
        counts.first_other = (flat[index].as_py(), row + row_of_value(offsets, index))


def _plan(
    path: str, schema: DatasetSchema, config: TabularConfig, columns: List[str], row_key: Optional[str] = None
) -> Tuple[Dict[str, _FieldPlan], Optional[pa.Array]]:
    """First pass: token kinds and vocabularies of string fields, and the split column.

    Parquet sources get their footers checked first (:func:`_check_parquet_types`); the pass is
    skipped (integer ids everywhere, random split) when their categorical columns are all of
    integer (or floating) type in every file.

    Raises:
        DataError: a column of integer ids with a few other values (``3.5``, ``bob``), naming the
            first such cell: read as a vocabulary, every id would be renumbered silently; a
            Parquet column of a type that does not fit its field, or of integer ids in one file
            and string tokens in another.
    """
    forced = set(config.vocabulary_fields)
    if _is_parquet(path):
        kinds = _check_parquet_types(path, schema, config, columns)
        if not config.split_by and not forced and all(kinds[s.name] == "integer" for s in schema.categorical_fields):
            return {spec.name: _FieldPlan("ids") for spec in schema.categorical_fields}, None
    string_fields: Dict[str, FieldSpec] = {}
    counts: Dict[str, _TokenCounts] = {}
    split_values: List[pa.Array] = []
    row = 0
    for block in _blocks(path, schema, columns, config, row_key):
        for spec in schema.categorical_fields:
            flat, lengths = _tokens(block.column(spec.name), spec, config.sequence_separator, path, row)
            if pa.types.is_integer(flat.type):
                if spec.name not in forced:
                    continue
                flat = pc.cast(flat, pa.string())
            string_fields[spec.name] = spec
            _count_tokens(counts.setdefault(spec.name, _TokenCounts()), flat, lengths, row)
        if config.split_by:
            split_values.append(block.column(config.split_by))
        row += block.num_rows
    plans = {spec.name: _FieldPlan("ids") for spec in schema.categorical_fields}
    for name, spec in string_fields.items():
        count = counts[name]
        markers = count.not_integer & NULL_MARKERS
        if name in forced:
            plans[name] = _vocabulary_plan(path, spec, count.seen)
        elif not count.not_integer:
            plans[name] = _FieldPlan("ids")
        elif count.not_integer == markers and len(count.seen) > len(markers):
            # integer ids with a missing-value marker (R writes NA): missing, not a vocabulary
            plans[name] = _FieldPlan("ids", missing=pa.array(sorted(markers), pa.string()))
        elif spec.hashed:
            plans[name] = _FieldPlan("hash")
        elif count.integers > count.others:
            value, bad_row = count.first_other
            raise DataError(
                f"{path}: column {name!r}, {describe_row(bad_row, _first_line(path))}: {value!r} is not an integer, "
                f"but {count.integers} of the column's {count.integers + count.others} values are integer ids; "
                f"expected integer ids (fix the cell, or pass --vocabulary {name} / TabularConfig.vocabulary_fields "
                f"to map every value through a vocabulary, or set \"hashed\": true for field {name!r} in the schema "
                "to hash the values)"
            )
        else:
            plans[name] = _vocabulary_plan(path, spec, count.seen)
    split = pa.chunked_array(split_values) if config.split_by and split_values else None
    return plans, split


def _vocabulary_plan(path: str, spec: FieldSpec, seen: Set[str]) -> _FieldPlan:
    """The plan mapping the distinct values ``seen`` to ids ``1..V`` in sorted order."""
    vocab = sorted(seen)
    if len(vocab) + 1 > spec.cardinality:
        raise DataError(
            f"{path}: column {spec.name!r} has {len(vocab)} distinct values; field {spec.name!r} needs cardinality >= "
            f"{len(vocab) + 1} (id 0 is reserved for missing) or \"hashed\": true, got {spec.cardinality}"
        )
    return _FieldPlan("vocab", pa.array(vocab, pa.string()))


def _ids(flat: pa.Array, plan: _FieldPlan, spec: FieldSpec, salt: int) -> np.ndarray:
    """(N,) ids of the tokens ``flat`` (nulls: 0): int64, or uint64 as read from a uint64 column,
    whose values above ``2**63 - 1`` :func:`~recsys_llm.data.validation.check_ids` names as they
    are (or folds, for a hashed field) rather than letting them wrap to negative ids."""
    if plan.mode == "hash":
        return hash_strings(flat, spec.cardinality, salt=salt)
    if plan.mode == "vocab":
        if not (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
            flat = pc.cast(flat, pa.string())  # integer ids mapped through a vocabulary (vocabulary_fields)
        return pc.fill_null(pc.add(pc.index_in(flat, value_set=plan.vocabulary), 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not pa.types.is_integer(flat.type):
        if plan.missing is not None:
            flat = _null_where_in(flat, plan.missing)
        flat = pc.cast(pc.utf8_trim_whitespace(flat), pa.int64())
    ids = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False)
    return ids if ids.dtype == np.uint64 else ids.astype(np.int64)


# ---- splits ---------------------------------------------------------------------------------------------
def _uniform(rows: np.ndarray, seed: int) -> np.ndarray:
    """Stable uniform numbers in [0, 1) per row index (splitmix64), independent of block sizes."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sort_keys(values: pa.ChunkedArray, path: str, column: str) -> pa.ChunkedArray:
    """The split column as values to rank rows by: numbers and timestamps as they are; a text column
    (a CSV column with a cell pyarrow could not type, a sparse field's, a Parquet string column)
    parsed as integers, numbers or ISO-8601 timestamps (parsed, not compared as text: ``T`` and
    space separators, dates and times, zone offsets then order correctly).

    Raises:
        DataError: text that is not all of one such type, naming the first cell that is not of the
            type most of the column's cells have; ranking it as text would mix future rows into
            the training split (``"10" < "100" < "20"``).
    """
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        return values
    text = pc.utf8_trim_whitespace(values)
    targets = (pa.int64(), pa.float64(), pa.timestamp("us"), pa.timestamp("us", "UTC"))
    for target in targets:
        try:
            return pc.cast(text, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    times = pc.match_substring_regex(text, _ISO_TIME)
    zoned = pc.and_(times, pc.match_substring_regex(text, _ZONE))
    kinds = [  # (cells of the kind, their type, the kind in words)
        (pc.sum(pc.match_substring_regex(text, _NUMBER)).as_py(), targets[1], "a number"),
        (pc.sum(times).as_py() - pc.sum(zoned).as_py(), targets[2], "an ISO-8601 date/timestamp without a zone offset"),
        (pc.sum(zoned).as_py(), targets[3], "an ISO-8601 timestamp with a zone offset"),
    ]
    count, target, kind = max(kinds, key=lambda k: k[0])  # the first of equals
    if not count:
        raise DataError(f"{path}: column {column!r}, {describe_row(0, _first_line(path))}: {values[0].as_py()!r} is "
                        f"neither a number nor an ISO-8601 date/timestamp, nor is any other cell; expected {_SPLIT_TYPES}")
    low, high = 0, len(text)  # the first cell not of that kind ends the shortest prefix that does not parse
    while high - low > 1:
        middle = (low + high) // 2
        try:
            pc.cast(text.slice(0, middle), target)
            low = middle
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            high = middle
    row = high - 1
    raise DataError(f"{path}: column {column!r}, {describe_row(row, _first_line(path))}: {values[row].as_py()!r} is "
                    f"not {kind} as {count} of the column's {len(text)} values are; expected {_SPLIT_TYPES}")


def _split_of_rows(total: int, split_values: Optional[pa.ChunkedArray], config: TabularConfig, path: str) -> Optional[np.ndarray]:
    """(total,) int8 split index per row for a time-ordered split (None for a random split);
    rows ranked by the split column's numbers or timestamps (see :func:`_sort_keys`)."""
    if split_values is None:
        return None
    if split_values.null_count:
        raise DataError(f"{path}: split column {config.split_by!r} has {split_values.null_count} missing values; expected a value per row")
    order = pc.sort_indices(_sort_keys(split_values, path, config.split_by)).to_numpy()  # stable: ties keep file order
    bounds = np.cumsum(config.split_fractions) / sum(config.split_fractions) * total
    split = np.zeros(total, dtype=np.int8)
    split[order] = np.searchsorted(np.floor(bounds[:-1]).astype(np.int64), np.arange(total), side="right").astype(np.int8)
    return split


# ---- conversion -----------------------------------------------------------------------------------------
def prepare_tabular(
    data_path: str,
    schema_path: str,
    out_dir: str,
    config: Optional[TabularConfig] = None,
    progress: bool = False,
) -> DatasetSchema:
    """Converts a user's CSV/Parquet data with a user-written schema into validated splits.

    The output is built in a temp directory and replaces ``out_dir`` only when complete and
    checked (:func:`~recsys_llm.data.parquet.write_prepared`): a failed conversion leaves an
    earlier output as it was.

    Args:
        data_path (str): CSV file with a header line, Parquet file, or directory of Parquet files.
        schema_path (str): JSON/YAML schema (fields, label, optional row key and extra columns).
        out_dir (str): output directory (``train/valid/test.parquet``, ``text/``, ``schema.json``);
            absent, empty or an earlier prepared data set.
        config (Optional[TabularConfig]): split and parsing options.
        progress (bool): show a tqdm bar over rows.

    Returns:
        DatasetSchema: the written schema.

    Raises:
        SchemaError: a bad schema file, or one without a sparse or sequence field. DataError: data
            that does not fit the schema, naming the file, the column and what was expected, or a
            split left without rows.
            FileExistsError: ``out_dir`` holds other files. ValueError: ``out_dir`` holds an input.

    Example::

        schema = prepare_tabular("clicks.csv", "clicks.yaml", "data/clicks", TabularConfig(split_by="ts"))
    """
    config = config or TabularConfig()
    path = schema_file(schema_path)
    raw = load_raw(path)
    user_schema = DatasetSchema.from_dict(raw, root=os.path.dirname(os.path.abspath(path)), source=path)
    if not user_schema.categorical_fields:  # else only train would find it: every model embeds categorical fields
        what = "fields is empty" if not user_schema.fields else f"fields {user_schema.dense_feature_names} are all dense"
        raise SchemaError(f"{path}: {what}; expected at least one sparse or sequence field (the models embed them; "
                          "dense fields are optional)")
    # a row key the schema names must be in the data; only an unnamed one is generated (as row_id)
    row_key_named = isinstance(raw, dict) and raw.get("row_key") is not None
    if user_schema.row_key and user_schema.row_key in [f.name for f in user_schema.fields] + [user_schema.label]:
        raise SchemaError(f"{path}: row_key {user_schema.row_key!r} is also a field or the label; expected a column "
                          "of its own holding a unique integer per row")
    if user_schema.row_key in user_schema.extra_columns:  # written once, as the row key
        user_schema.extra_columns = [c for c in user_schema.extra_columns if c != user_schema.row_key]
    for name in config.vocabulary_fields:
        spec = next((f for f in user_schema.categorical_fields if f.name == name), None)
        if spec is None:
            raise ValueError(f"--vocabulary {name} (TabularConfig.vocabulary_fields): {schema_path} has no sparse or "
                             f"sequence field {name!r}; its categorical fields: {user_schema.sparse_feature_names}")
        if spec.hashed:
            raise ValueError(f"--vocabulary {name} (TabularConfig.vocabulary_fields): field {name!r} is hashed in "
                             f"{schema_path}; a field is either hashed or mapped through a vocabulary")
    value_texts = [user_schema.value_text_path(spec.name) for spec in user_schema.fields if spec.value_text]
    return write_prepared(
        out_dir, data_path, [data_path, schema_path] + value_texts,
        lambda tmp: _convert(data_path, user_schema, schema_path, tmp, config, progress, row_key_named),
    )


def _convert(
    data_path: str,
    user_schema: DatasetSchema,
    schema_path: str,
    out_dir: str,
    config: TabularConfig,
    progress: bool,
    row_key_named: bool = False,
) -> DatasetSchema:
    """The conversion into the fresh directory ``out_dir``; returns the schema rooted there (not yet saved)."""
    available = _source_columns(data_path, config)
    wanted = [f.name for f in user_schema.fields] + [user_schema.label] + list(user_schema.extra_columns)
    missing = [c for c in wanted if c not in available]
    if missing:
        raise DataError(f"{data_path}: missing column(s) {missing} named in {schema_path}; the file has columns {available}")
    repeated = _repeated_columns(available, wanted)
    if repeated:
        raise DataError(f"{data_path}: column(s) {repeated} named in {schema_path} occur more than once in the "
                        "file; expected each column once (rename or drop the copies)")
    if row_key_named and user_schema.row_key not in available:
        raise DataError(
            f"{data_path}: missing row key column {user_schema.row_key!r} named by row_key in {schema_path}; "
            f"the file has columns {available} (drop row_key from the schema to number the rows as row_id)"
        )
    if config.split_by and config.split_by not in available:
        raise DataError(f"{data_path}: missing column {config.split_by!r} named by --split-by "
                        f"(TabularConfig.split_by); the file has columns {available}")
    row_key = user_schema.row_key if user_schema.row_key in available else None
    columns = list(dict.fromkeys(wanted + ([config.split_by] if config.split_by else []) + ([row_key] if row_key else [])))

    plans, split_values = _plan(data_path, user_schema, config, columns, row_key)
    total = len(split_values) if split_values is not None else None
    split_rows = _split_of_rows(total, split_values, config, data_path) if split_values is not None else None
    schema = _output_schema(user_schema, plans, out_dir)
    bar = tqdm(total=total, desc="tabular rows", unit="row", disable=not progress)
    try:
        _write_splits(data_path, user_schema, schema, plans, columns, row_key, split_rows, config, bar)
    finally:
        bar.close()
    return schema


def _output_schema(user_schema: DatasetSchema, plans: Dict[str, _FieldPlan], out_dir: str) -> DatasetSchema:
    """The output schema rooted at ``out_dir``; writes vocabularies and copies user value text into ``out_dir/text``."""
    fields = []
    for spec in user_schema.fields:
        value_text = spec.value_text
        plan = plans.get(spec.name)
        if plan is not None and plan.mode == "vocab":
            value_text = f"text/{spec.name}.parquet"
            write_value_text(os.path.join(out_dir, value_text), ["unknown"] + plan.vocabulary.to_pylist())
        elif value_text:
            source = user_schema.value_text_path(spec.name)
            user_schema.load_value_text(spec.name)  # validates its columns
            value_text = f"text/{spec.name}.parquet"
            os.makedirs(os.path.join(out_dir, "text"), exist_ok=True)
            shutil.copyfile(source, os.path.join(out_dir, value_text))
        fields.append(dataclasses.replace(spec, value_text=value_text))
    return DatasetSchema(
        name=user_schema.name,
        fields=fields,
        label=user_schema.label,
        row_key=user_schema.row_key or "row_id",
        splits={"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
        extra_columns=list(user_schema.extra_columns),
        root=os.path.abspath(out_dir),
    )


def _write_splits(
    data_path: str,
    user_schema: DatasetSchema,
    schema: DatasetSchema,
    plans: Dict[str, _FieldPlan],
    columns: List[str],
    row_key: Optional[str],
    split_rows: Optional[np.ndarray],
    config: TabularConfig,
    bar: tqdm,
) -> None:
    """Streams the source block by block into one Parquet file per split under ``schema.root``."""
    writers: List[SplitWriter] = []
    keys: List[np.ndarray] = []  # the row keys read from the data, checked for repeats at the end
    row = 0
    try:
        for block in _blocks(data_path, user_schema, columns, config, row_key):
            out = _convert_block(block, schema, plans, config, data_path, row, row_key)
            if row_key:
                keys.append(out[schema.row_key])
            if not writers:
                extra_types = {name: block.column(name).type for name in schema.extra_columns}
                arrow_schema = arrow_schema_for(schema, extra_types)
                writers = [SplitWriter(schema.split_path(s), arrow_schema, config.rows_per_group) for s in schema.splits]
            n = block.num_rows
            split = split_rows[row : row + n] if split_rows is not None else _random_split(np.arange(row, row + n), config)
            table = pa.table(out)
            for index, writer in enumerate(writers):
                selected = np.nonzero(split == index)[0]
                if selected.size:
                    part = table.take(pa.array(selected))
                    writer.write({name: part.column(name).combine_chunks() for name in part.column_names})
            row += n
            bar.update(n)
        if not writers:
            raise DataError(f"{data_path}: the file is empty (0 rows); expected at least one row")
        if row_key:
            _check_unique_keys(data_path, row_key, np.concatenate(keys))
        for writer in writers:
            writer.close()
    except BaseException:
        for writer in writers:
            writer.__exit__(RuntimeError, None, None)
        raise


def _check_unique_keys(path: str, column: str, keys: np.ndarray) -> None:
    """Raises if a row key repeats (LLM row vectors and teacher outputs are looked up by it). ``keys``: (rows,)."""
    if keys.size < 2 or bool(np.all(keys[1:] > keys[:-1])):  # increasing (the common case): unique
        return
    ordered = np.sort(keys)  # ~25x faster than a stable argsort at 10^7+ keys
    if not bool(np.any(ordered[1:] == ordered[:-1])):
        return
    order = np.argsort(keys, kind="stable")  # only to name the rows of the first repeat
    ordered = keys[order]
    repeats = np.nonzero(ordered[1:] == ordered[:-1])[0]
    if repeats.size:
        first, second = int(order[repeats[0]]), int(order[repeats[0] + 1])
        line = _first_line(path)
        raise DataError(
            f"{path}: row key column {column!r}: key {int(ordered[repeats[0]])} is repeated, in "
            f"{describe_row(first, line)} and {describe_row(second, line)}; expected a unique key per row "
            "(LLM row vectors are looked up by it)"
        )


def _row_keys(array: pa.Array, path: str, column: str, row: int) -> np.ndarray:
    """(N,) int64 row keys of a block whose first row is ``row``; a missing or non-integer key is an error."""
    line = _first_line(path)
    what = "an integer row key per row (LLM row vectors are looked up by it)"
    if pa.types.is_string(array.type) or pa.types.is_large_string(array.type):
        check_no_nulls(path, column, array, row, what, line)
        ok = np.asarray(pc.match_substring_regex(array, _INTEGER), dtype=bool)
        if not ok.all():
            first = int(np.argmin(ok))
            raise DataError(f"{path}: column {column!r}, {describe_row(row + first, line)}: row key "
                            f"{array[first].as_py()!r} is not an integer; expected {what}")
        try:
            array = pc.cast(pc.utf8_trim_whitespace(array), pa.int64())
        except pa.ArrowInvalid as error:
            raise DataError(f"{path}: row key column {column!r}: {error}; expected int64 keys") from error
    elif pa.types.is_floating(array.type):  # pandas writes integer columns with a gap as float64
        try:
            array = pc.cast(array, pa.int64())  # refuses fractions
        except pa.ArrowInvalid as error:
            raise DataError(f"{path}: row key column {column!r} has non-integer values ({error}); "
                            "expected integers") from error
    elif not pa.types.is_integer(array.type):
        raise DataError(f"{path}: row key column {column!r} has type {array.type}; expected integers")
    check_no_nulls(path, column, array, row, what, line)
    return pc.cast(array, pa.int64()).to_numpy(zero_copy_only=False)


def _random_split(rows: np.ndarray, config: TabularConfig) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of every row index in ``rows`` for a seeded random split."""
    bounds = np.cumsum(config.split_fractions) / sum(config.split_fractions)
    return np.searchsorted(bounds[:-1], _uniform(rows, config.seed), side="right")


def _convert_block(
    block: pa.RecordBatch,
    schema: DatasetSchema,
    plans: Dict[str, _FieldPlan],
    config: TabularConfig,
    path: str,
    row: int,
    row_key: Optional[str],
) -> Dict[str, object]:
    """One block of source rows -> output columns, validated (row numbers count data rows from 0)."""
    out: Dict[str, object] = {}
    n = block.num_rows
    line = _first_line(path)
    out[schema.row_key] = (
        _row_keys(block.column(row_key), path, row_key, row) if row_key else np.arange(row, row + n, dtype=np.int64)
    )
    for salt, spec in enumerate(schema.fields):
        array = block.column(spec.name)
        if spec.kind == FieldKind.DENSE:
            if not (pa.types.is_floating(array.type) or pa.types.is_integer(array.type)):
                raise DataError(f"{path}: column {spec.name!r} (dense field) has type {array.type}; expected numbers")
            values = pc.cast(array, pa.float64())
            if config.fill_missing_dense is not None:
                values = pc.fill_null(values, config.fill_missing_dense).to_numpy(zero_copy_only=False)
                values = np.where(np.isfinite(values), values, config.fill_missing_dense)
            else:
                check_no_nulls(path, spec.name, values, row, f"a finite float ({_FILL_HINT})", line)
                values = values.to_numpy(zero_copy_only=False)
            check_dense(path, spec.name, values, row, line, _FILL_HINT)
            out[spec.name] = values.astype(np.float32)
            continue
        flat, lengths = _tokens(array, spec, config.sequence_separator, path, row, plans[spec.name].missing)
        try:
            ids = _ids(flat, plans[spec.name], spec, salt)
        except pa.ArrowInvalid as error:
            raise DataError(f"{path}: column {spec.name!r}: cannot read ids: {error}") from error
        offsets = None if lengths is None else offsets_from_lengths(lengths)
        ids = check_ids(path, spec, ids, offsets, row, line)
        out[spec.name] = ids if lengths is None else list_array(lengths, ids)
    labels = block.column(schema.label)
    check_no_nulls(path, schema.label, labels, row, "0 or 1", line)
    if not (pa.types.is_integer(labels.type) or pa.types.is_floating(labels.type) or pa.types.is_boolean(labels.type)):
        raise DataError(f"{path}: label column {schema.label!r} has type {labels.type}; expected 0/1 numbers")
    values = pc.cast(labels, pa.float64()).to_numpy(zero_copy_only=False)
    if config.label_threshold is not None:
        values = (values > config.label_threshold).astype(np.float64)
    check_labels(path, schema.label, values, row, line)
    out[schema.label] = values.astype(np.int8)
    for name in schema.extra_columns:
        out[name] = block.column(name)
    return out
