"""Checks that Parquet data matches its :class:`~recsys_llm.data.schema.DatasetSchema`.

Two levels, both cheap:

* **metadata** (:func:`check_file_schema`): run once per file on the Parquet footer:
  missing columns, wrong Arrow types (a split without rows, :func:`check_split_has_rows`; its files may be
  empty), and a schema/data mismatch when the
  file was written for a different schema (``prepare`` stores the field specs it wrote
  with in the file's key-value metadata under :data:`FIELDS_METADATA_KEY`).
* **values** (``check_*`` on numpy arrays): run per row group on the arrays the reader
  converts anyway, fully vectorised: NaN/inf/null in dense features, negative ids, ids
  beyond the cardinality (folded with a modulo for ``hashed`` fields instead), labels
  outside {0, 1}.

Every error is a :class:`DataError` whose message names the file, the column/field and
what was expected, e.g.::

    DataError: /data/train.parquet: column 'item_id', row 17: id 2000 in sparse field 'item_id'
    is >= cardinality 1683; expected ids in [0, 1683) (set "hashed": true in the schema to fold
    larger ids with a modulo)
"""

import json
import math
import os
import numbers
import operator
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.paths import not_a_regular_file

#: Parquet key-value metadata key holding the JSON field specs a file was written with.
FIELDS_METADATA_KEY = b"recsys_llm.fields"


class DataError(ValueError):
    """Data (a Parquet or raw input file) that is unreadable or does not match its schema."""


# ---- opening files ------------------------------------------------------------------------------
def open_parquet(path: str) -> pq.ParquetFile:
    """Opens a Parquet file, turning pyarrow's errors into a :class:`DataError` naming the file."""
    found = not_a_regular_file(path)
    if found is not None:  # pyarrow would block for good on a FIFO, deaf to Ctrl-C and SIGTERM
        raise DataError(f"{path}: is {found}, not a Parquet file; expected a Parquet file of the data")
    try:
        return pq.ParquetFile(path)
    except FileNotFoundError as error:
        raise DataError(f"{path}: Parquet file not found") from error
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: not a readable Parquet file (corrupt or truncated?): {error}") from error


def read_row_group(handle: pq.ParquetFile, path: str, index: int, columns: Sequence[str]) -> pa.Table:
    """Reads one row group; a decoding failure becomes a :class:`DataError` naming file and row group."""
    try:
        return handle.read_row_group(index, columns=list(columns))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"{path}: row group {index} cannot be decoded (corrupt Parquet?): {error}") from error


# ---- metadata checks ----------------------------------------------------------------------------
def is_list_type(dtype: pa.DataType) -> bool:
    """Whether ``dtype`` is an Arrow list of any kind (list, large list, fixed-size list): a sequence field's column."""
    return pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype)


def _expected_type(spec: FieldSpec) -> str:
    return {
        FieldKind.SPARSE: "an integer column (int64)",
        FieldKind.SEQUENCE: "a list of integers (list<int64>)",
        FieldKind.DENSE: "a numeric column (float32)",
    }[spec.kind]


def _type_ok(spec: FieldSpec, dtype: pa.DataType) -> bool:
    if spec.kind == FieldKind.SPARSE:
        return pa.types.is_integer(dtype)
    if spec.kind == FieldKind.SEQUENCE:
        return is_list_type(dtype) and pa.types.is_integer(dtype.value_type)
    return pa.types.is_floating(dtype) or pa.types.is_integer(dtype)


def _check_spec_vs_written(path: str, schema: DatasetSchema, metadata: Optional[Dict[bytes, bytes]]) -> None:
    """Compares the schema's field specs with those the file was written with (if recorded)."""
    if not metadata or FIELDS_METADATA_KEY not in metadata:
        return
    try:
        written = {f["name"]: f for f in json.loads(metadata[FIELDS_METADATA_KEY])}
    except (ValueError, KeyError, TypeError, RecursionError) as error:
        raise DataError(f"{path}: unreadable {FIELDS_METADATA_KEY.decode()} metadata: {error}") from error
    for spec in schema.fields:
        if spec.name not in written:
            continue
        other = written[spec.name]
        for key in ("kind", "cardinality", "hashed", "max_length"):
            mine = spec.kind.value if key == "kind" else getattr(spec, key)
            theirs = other.get(key, {"kind": "sparse", "hashed": False}.get(key, 0))
            if mine != theirs:
                raise DataError(
                    f"{path}: schema/data mismatch for field {spec.name!r}: the schema says {key}={mine!r} "
                    f"but the file was written with {key}={theirs!r}; use the schema.json written with this data"
                )


def _holds_text(dtype: pa.DataType) -> bool:
    """Strings (plain, large, dictionary-encoded), or lists of them."""
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
        dtype = dtype.value_type
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype) or pa.types.is_dictionary(dtype)


def check_column_type(path: str, spec: FieldSpec, dtype: pa.DataType) -> None:
    """Raises if a column's Arrow type does not fit its field's kind, naming file, column and type."""
    if not _type_ok(spec, dtype):
        other = [k.value for k in FieldKind
                 if _type_ok(FieldSpec(spec.name, k, cardinality=0 if k == FieldKind.DENSE else 1), dtype)]
        hint = f" (it looks like a {other[0]} field: schema/data mismatch?)" if other else ""
        if spec.kind != FieldKind.DENSE and _holds_text(dtype):
            hint = (" (raw values, not ids: prepare the rows first, `recsys-llm prepare tabular --input FILE --like "
                    "PREPARED_DATA --out DIR`, which gives them the prepared data's ids)")
        raise DataError(
            f"{path}: column {spec.name!r} ({spec.kind.value} field) has Arrow type {dtype}; "
            f"expected {_expected_type(spec)}{hint}"
        )


def check_file_schema(
    path: str,
    schema: DatasetSchema,
    arrow_schema: pa.Schema,
    extras: Sequence[str] = (),
    with_label: bool = True,
) -> None:
    """Checks a file's footer against the schema: columns (present, each once), Arrow types, written
    specs. A file may be empty (an empty part of a directory that Spark or DuckDB wrote); a split
    without rows is refused by :func:`check_split_has_rows`.

    Args:
        path (str): file name, used in messages.
        schema (DatasetSchema): what the data should look like.
        arrow_schema (pa.Schema): the file's Arrow schema (``ParquetFile.schema_arrow``).
        extras (Sequence[str]): extra columns the caller will read; they must exist.
        with_label (bool): the caller reads the label column (False: rows to score, with or without one).

    Raises:
        DataError: naming the file, the column and what was expected.
    """
    columns = set(arrow_schema.names)
    wanted = [f.name for f in schema.fields] + [schema.label] * with_label + list(extras)
    missing = [name for name in wanted if name not in columns]
    if missing:
        known = set(wanted) | {schema.row_key} | set(schema.extra_columns)
        unknown = sorted(columns - known)
        hint = f"; the file has columns not in the schema: {unknown} (schema/data mismatch?)" if unknown else ""
        by_schema = [name for name in missing if name not in extras]
        asked = [name for name in missing if name in extras]
        what = "; ".join(
            part for part in (f"missing column(s) {by_schema} required by schema {schema.name!r}" if by_schema else "",
                              f"missing extra column(s) {asked} the run reads (data.extras, or a "
                              "plug-in's column)" if asked else "")
            if part
        )
        raise DataError(f"{path}: {what}; file columns: {sorted(columns)}{hint}")
    read = wanted + ([schema.row_key] if schema.row_key else [])
    repeated = [name for name in dict.fromkeys(read) if arrow_schema.names.count(name) > 1]
    if repeated:  # pyarrow would answer "Column x does not exist in schema"
        raise DataError(f"{path}: column(s) {repeated} occur more than once; expected each column once "
                        "(rename or drop the copies)")
    for spec in schema.fields:
        check_column_type(path, spec, arrow_schema.field(spec.name).type)
    label_type = arrow_schema.field(schema.label).type if with_label else None
    if label_type is not None and not (pa.types.is_integer(label_type) or pa.types.is_floating(label_type)
                                       or pa.types.is_boolean(label_type)):
        raise DataError(f"{path}: label column {schema.label!r} has Arrow type {label_type}; expected 0/1 integers")
    row_key_type = arrow_schema.field(schema.row_key).type if schema.row_key in columns else None
    if row_key_type is not None and not pa.types.is_integer(row_key_type):
        raise DataError(
            f"{path}: row key column {schema.row_key!r} has Arrow type {row_key_type}; expected int64"
        )
    _check_spec_vs_written(path, schema, arrow_schema.metadata)


def check_split_has_rows(paths: Sequence[str], num_rows: int) -> None:
    """Raises unless a split's files (``paths``, at least one) hold ``num_rows`` > 0 rows between them.

    Raises:
        DataError: naming the file, or the files' directory and how many files it read.
    """
    if num_rows:
        return
    if len(paths) == 1:
        raise DataError(f"{paths[0]}: the file is empty (0 rows); expected at least one row")
    where = os.path.commonpath([os.path.dirname(os.path.abspath(path)) for path in paths])
    raise DataError(f"{where}: all {len(paths)} Parquet files of the split are empty (0 rows); expected at least "
                    "one row")


# ---- value checks (numpy, vectorised) -----------------------------------------------------------
def describe_row(row: int, first_line: Optional[int] = None) -> str:
    """How messages name a row: ``row 4`` (a Parquet row index), or for a text file whose data row 0
    is on line ``first_line``: ``data row 4 (line 6 if no blank line or multi-line cell precedes
    it)``: the CSV reader skips blank lines, and a quoted cell may span lines."""
    if first_line is None:
        return f"row {row}"
    return f"data row {row} (line {row + first_line} if no blank line or multi-line cell precedes it)"


def _where(path: str, column: str, row_offset: int, index: int, first_line: Optional[int] = None) -> str:
    return f"{path}: column {column!r}, {describe_row(row_offset + index, first_line)}"


def check_no_nulls(
    path: str, column: str, array: pa.Array, row_offset: int, what: str, first_line: Optional[int] = None
) -> None:
    """Raises if an Arrow array holds nulls (``what`` says what was expected instead).

    ``first_line``: line of data row 0 in a text source (see :func:`describe_row`), None for Parquet.
    """
    if array.null_count:
        first = int(np.argmax(~np.asarray(array.is_valid())))
        raise DataError(f"{_where(path, column, row_offset, first, first_line)}: null value; expected {what}")


def first_non_finite_row(values: np.ndarray) -> Optional[Tuple[int, int, float]]:
    """``(row, number of rows holding NaN/inf, the first such value)`` of (N,) or (N, w)
    ``values``, None when all are finite (one vectorised pass; the rest only when one is not).
    The numpy twin of :func:`recsys_llm.semantics.store.first_non_finite_row`."""
    if values.dtype == np.float16:
        # numpy's isfinite has no SIMD loop for float16 (~10x slower): all exponent bits set is NaN/inf
        if not ((values.view(np.uint16) & 0x7C00) == 0x7C00).any():
            return None
    elif np.isfinite(values).all():
        return None
    finite = np.isfinite(values)
    bad = ~finite if finite.ndim == 1 else ~finite.all(axis=1)  # (N,)
    row = int(np.argmax(bad))
    value = values[row] if finite.ndim == 1 else values[row][~finite[row]][0]
    return row, int(bad.sum()), value.item()


def check_dense(
    path: str,
    column: str,
    values: np.ndarray,
    row_offset: int,
    first_line: Optional[int] = None,
    remedy: str = "fill or drop NaN/inf when preparing the data",
) -> None:
    """Raises on NaN or +-inf in a dense feature. ``values``: (N,) float; ``remedy`` ends the message."""
    bad = first_non_finite_row(values)
    if bad is not None:
        first, _, value = bad
        raise DataError(
            f"{_where(path, column, row_offset, first, first_line)}: dense feature is {value}; "
            f"expected a finite float ({remedy})"
        )


_FLOAT32_MAX = float(np.finfo(np.float32).max)


def check_float32_range(path: str, column: str, values: np.ndarray, row_offset: int,
                        first_line: Optional[int] = None) -> None:
    """Raises on a finite dense value beyond float32's range, where it would become inf (the prepared data stores
    float32, and batches carry it). ``values``: (N,) finite float64 of rows from ``row_offset`` on."""
    outside = np.abs(values) > _FLOAT32_MAX
    if outside.any():
        first = int(np.argmax(outside))
        raise DataError(
            f"{_where(path, column, row_offset, first, first_line)}: dense feature {values[first].item()!r} is outside "
            f"the float32 range (+-{_FLOAT32_MAX:.4g}), where it would become inf; expected a finite float32 value "
            "(scale the column, e.g. log(1 + x), when preparing the data)"
        )


def check_finite_extra(path: str, name: str, values: np.ndarray, row_offset: int) -> None:
    """Raises on NaN or +-inf in an extra float column (e.g. an attached ``llm_vector``),
    naming the file, column and first such row. ``values``: (N, w) float32."""
    bad = first_non_finite_row(values)
    if bad is None:
        return
    first, count, value = bad
    raise DataError(
        f"{path}: column {name!r}, row {row_offset + first}: extra value is {value} ({count} of "
        f"the {len(values)} rows read from row {row_offset} on are not finite); expected finite floats (re-export or "
        "re-attach the vectors, or fill NaN/inf when preparing the data)"
    )


def offsets_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """(N + 1,) int64 start of each row's values, then their total, of (N,) per-row ``lengths``."""
    out = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def row_of_value(offsets: Optional[np.ndarray], index: int) -> int:
    """The row (within the chunk) holding flat value ``index``: ``index`` itself when ``offsets``
    is None (one value per row), else the row whose ``offsets[r] <= index < offsets[r + 1]``."""
    if offsets is None:
        return index
    return int(np.searchsorted(offsets, index, side="right")) - 1


def check_no_null_elements(path: str, column: str, lists: pa.Array, row_offset: int, what: str) -> None:
    """Raises if a list column holds a null inside a list (a null list itself is fine: no values).

    Args:
        lists (pa.Array): list array of one chunk; its rows start at ``row_offset`` in the file.
        what (str): what was expected instead, for the message.
    """
    flat = pc.list_flatten(lists)
    if not flat.null_count:
        return
    lengths = pc.fill_null(pc.list_value_length(lists), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    offsets = offsets_from_lengths(lengths)
    first = int(np.argmax(~np.asarray(flat.is_valid())))
    row = row_of_value(offsets, first)
    raise DataError(
        f"{_where(path, column, row_offset, row)}: null value at position {first - int(offsets[row])} of the list; "
        f"expected {what}"
    )


def check_ids(
    path: str,
    spec: FieldSpec,
    ids: np.ndarray,
    offsets: Optional[np.ndarray],
    row_offset: int,
    first_line: Optional[int] = None,
) -> np.ndarray:
    """Checks ids of a sparse/sequence field; returns them, folded modulo cardinality if hashed.

    Args:
        path (str): file name for messages.
        spec (FieldSpec): the categorical field.
        ids (np.ndarray): (N,) int64 ids (flattened values for sequences), or uint64 ones (a uint64
            column): an id above ``2**63 - 1`` is then named as it is (it would wrap to a negative
            int64) or, for a hashed field, folded as the int64 of the same 64 bits (what a served
            model receives; :class:`~recsys_llm.id_rules.IdRules` folds it alike).
        offsets (Optional[np.ndarray]): (rows + 1,) offsets of each row's ids in ``ids``
            (sequences), None when id ``i`` belongs to row ``i``; only read to name the row
            of a bad id.
        row_offset (int): row index of the chunk's first row in the file.
        first_line (Optional[int]): line of data row 0 in a text source, None for Parquet.

    Returns:
        np.ndarray: the ids (int64 when ``ids`` is uint64), folded into ``[0, cardinality)`` if hashed.
    """
    unsigned = ids.dtype == np.uint64
    if ids.size == 0:
        return ids.astype(np.int64) if unsigned else ids
    low, high = int(ids.min()), int(ids.max())
    if low < 0:
        if spec.hashed:
            return np.mod(ids, spec.cardinality)
        first = int(np.argmax(ids < 0))
        raise DataError(
            f"{_where(path, spec.name, row_offset, row_of_value(offsets, first), first_line)}: negative id {ids[first].item()} in "
            f"{spec.kind.value} field {spec.name!r}; expected ids in [0, {spec.cardinality})"
        )
    if high >= spec.cardinality:
        if spec.hashed:
            # a served model gets int64 ids, so a uint64 id folds as the int64 of its 64 bits, as IdRules folds it
            return np.mod(ids.view(np.int64) if unsigned else ids, spec.cardinality)
        first = int(np.argmax(ids >= spec.cardinality))
        raise DataError(
            f"{_where(path, spec.name, row_offset, row_of_value(offsets, first), first_line)}: id {ids[first].item()} in "
            f"{spec.kind.value} field {spec.name!r} is >= cardinality {spec.cardinality}; expected ids in "
            f"[0, {spec.cardinality}) "
            '(set "hashed": true in the schema to fold larger ids with a modulo)'
        )
    return ids.astype(np.int64) if unsigned else ids


def check_labels(
    path: str,
    column: str,
    labels: np.ndarray,
    row_offset: int,
    first_line: Optional[int] = None,
    remedy: str = "binarise ratings when preparing the data",
) -> None:
    """Raises if a label is not 0 or 1. ``labels``: (N,) numeric; ``remedy`` ends the message."""
    ok = (labels == 0) | (labels == 1)
    if not ok.all():
        first = int(np.argmin(ok))
        raise DataError(
            f"{_where(path, column, row_offset, first, first_line)}: label {labels[first].item()!r} is not a click label; "
            f"expected 0 or 1 ({remedy})"
        )


def check_split_fractions(fractions: Sequence[float], option: str) -> None:
    """Raises unless ``fractions`` are three finite shares > 0 (train, valid, test).

    Args:
        fractions (Sequence[float]): the shares (any positive scale: they are normalised).
        option (str): how the caller names the setting, e.g. ``"MovieLensConfig.split_fractions"``.

    Raises:
        ValueError: naming ``option`` and the value; a zero share would leave a split without rows.
    """
    try:
        values = tuple(float(v) for v in fractions)
    except (TypeError, ValueError):
        values = ()
    if len(values) != 3 or not all(math.isfinite(v) and v > 0 for v in values):
        raise ValueError(
            f"{option}={fractions!r}: expected three "
            "positive train/valid/test shares like (0.8, 0.1, 0.1); a zero share leaves a split without rows"
        )


def reads_as_number(text: str) -> bool:
    """Whether the CSV cell ``text`` is a number (an integer or a float: ``-1``, ``1e3``, ``inf``), as a CSV reader
    takes it."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def check_number(
    where: str,
    value: Any,
    *,
    integer: bool = False,
    minimum: Optional[float] = None,
    above: Optional[float] = None,
    maximum: Optional[float] = None,
    below: Optional[float] = None,
    optional: bool = False,
) -> None:
    """Raises ValueError ``"{where} must be an integer >= 1, got -3"`` unless ``value`` fits.

    ``value`` fits when it is a finite number (an integer when ``integer``; numpy numbers
    count, bools do not) within every bound that is not None, or None when ``optional``.
    The message names ``where``, what was expected (the bounds joined by ``and``, then
    ``or None`` when ``optional``) and the value, e.g.
    ``"SyntheticConfig.cold_item_fraction must be a finite number >= 0 and < 1, got 1.5"``.

    Args:
        where (str): the setting, e.g. ``"CTRLLMConfig.representation_dim (--representation-dim)"``.
        value (Any): its value.
        integer (bool): ``value`` must be an integer (``numbers.Integral``), not just a real number.
        minimum (Optional[float]): ``value >= minimum``.
        above (Optional[float]): ``value > above``.
        maximum (Optional[float]): ``value <= maximum``.
        below (Optional[float]): ``value < below``.
        optional (bool): None is allowed too.

    Raises:
        ValueError: naming ``where``, the expected kind and range, and the value.
    """
    if value is None and optional:
        return
    bounds = [
        (">=", operator.ge, minimum), (">", operator.gt, above), ("<=", operator.le, maximum), ("<", operator.lt, below)
    ]
    bounds = [(sign, compare, limit) for sign, compare, limit in bounds if limit is not None]
    kinds = numbers.Integral if integer else numbers.Real  # numpy numbers too
    # an integer is finite however large; a real one must fit a float (no NaN, inf or overflow)
    fits = isinstance(value, kinds) and not isinstance(value, bool) and (integer or _finite(value))
    if not (fits and all(compare(value, limit) for _, compare, limit in bounds)):
        rule = " and ".join(f"{sign} {limit}" for sign, _, limit in bounds)
        expected = " ".join(part for part in ("an integer" if integer else "a finite number", rule) if part)
        raise ValueError(f"{where} must be {expected}{' or None' if optional else ''}, got {value!r}")


def _finite(value: numbers.Real) -> bool:
    """:func:`math.isfinite`, but False (not OverflowError) for a number too large for a float."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def field_specs_metadata(fields: Iterable[FieldSpec]) -> Dict[bytes, bytes]:
    """Key-value metadata recording the field specs a file is written with (see module docstring)."""
    payload: List[dict] = [
        {"name": f.name, "kind": f.kind.value, "cardinality": f.cardinality, "hashed": f.hashed, "max_length": f.max_length}
        for f in fields
    ]
    return {FIELDS_METADATA_KEY: json.dumps(payload).encode()}
