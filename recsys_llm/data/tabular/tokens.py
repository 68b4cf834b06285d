"""Categorical columns: their token type (integer ids or strings), the first pass that plans
each field (ids, hash or a vocabulary built from the data), and the ids of a block's tokens."""

import dataclasses
import re
import warnings
from typing import Dict, List, NamedTuple, Optional, Set, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
from tqdm import tqdm

from recsys_llm.data.hashing import hash_strings
from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.tabular.config import TabularConfig
from recsys_llm.data.tabular.source import first_line, is_parquet, null_where_in, read_blocks, repeated_columns
from recsys_llm.data.validation import (
    DataError, describe_row, is_list_type, offsets_from_lengths, open_parquet, row_of_value,
)
from recsys_llm.progress import bar_options

INTEGER_PATTERN = r"^\s*-?\d+\s*$"
# pyarrow's CSV missing-value markers: in a column of integer ids they mean missing (id 0)
NULL_MARKERS = frozenset({"#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN",
                          "<NA>", "N/A", "NA", "NULL", "NaN", "n/a", "nan", "null"})


def _is_text(dtype: pa.DataType) -> bool:
    return pa.types.is_string(dtype) or pa.types.is_large_string(dtype)


_TOKEN_WORDS = {"integer": "integer ids", "string": "string tokens"}  # a token type in messages


def _token_type(dtype: pa.DataType) -> Optional[str]:
    """What a categorical column's values are: ``"integer"`` ids (integers, or floats holding whole
    numbers), ``"string"`` tokens, or None (another type); lists and dictionaries by their values."""
    if is_list_type(dtype):
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
    if spec.kind == FieldKind.SEQUENCE and not is_list_type(dtype) and not _is_text(scalar):
        raise DataError(f"{where}; expected a list column (e.g. list<int64> or list<string>) or a string column of "
                        f"tokens joined by {separator!r} (--sequence-separator, TabularConfig.sequence_separator); "
                        "a column of one value per row fits a sparse field")
    if spec.kind == FieldKind.SPARSE and is_list_type(dtype):
        raise DataError(f"{where}; expected one integer id or string token per row (a list column fits a "
                        "sequence field)")
    if _token_type(dtype) is None:
        raise DataError(f"{where}; expected integer ids (integers, or floats holding whole numbers) or string "
                        "tokens (strings, or dictionary-encoded strings such as pandas' category)")


def _check_parquet_types(path: str, schema: DatasetSchema, config: TabularConfig, columns: List[str]) -> Dict[str, str]:
    """Checks the footer of every Parquet file of ``path``: the ``columns``, and categorical columns
    of a type that fits their field and of one token type in every file (``"integer"`` ids or
    ``"string"`` tokens; a ``vocabulary_fields`` or ``hash_fields`` field may mix them: its values are
    read as text).

    Returns:
        Dict[str, str]: the token type of every categorical field: ``"integer"``, ``"string"`` or
        ``"mixed"`` (a ``vocabulary_fields`` or ``hash_fields`` field whose files differ).
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
        repeated = repeated_columns(arrow.names, columns)
        if repeated:
            raise DataError(f"{file_path}: column(s) {repeated} occur more than once; expected each column once "
                            "(rename or drop the copies)")
        for spec in schema.categorical_fields:
            dtype = arrow.field(spec.name).type
            _check_token_column(file_path, spec, dtype, config.sequence_separator)
            kind = _token_type(dtype)
            first_kind, first_type, first_file = first.setdefault(spec.name, (kind, dtype, file_path))
            kinds[spec.name] = kinds.get(spec.name, kind) if kind == first_kind else "mixed"
            if kind == first_kind or spec.name in config.vocabulary_fields or spec.name in config.hash_fields:
                continue
            hint = (f", or pass --hash {spec.name} (TabularConfig.hash_fields) to hash every value as text"
                    if spec.hashed else f", or pass --vocabulary {spec.name} (TabularConfig.vocabulary_fields) to "
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
        value = values[index].item()
        # 1e20 is whole and too large; inf and 3.5 are no whole numbers
        problem = "beyond int64" if np.isfinite(value) and value == np.floor(value) else "not a whole number"
        raise DataError(
            f"{path}: column {spec.name!r}, {describe_row(bad_row, first_line(path))}: {value!r} is {problem}; "
            f"expected integer ids in {spec.kind.value} field {spec.name!r} (a floating column may "
            "hold whole numbers, and NaN or null for missing)"
        )
    return pa.array(np.where(missing, 0, values).astype(np.int64), mask=missing)


def _check_utf8(array: pa.Array, path: str, spec: FieldSpec, row: int) -> None:
    """Raises naming the row of the first string token of ``array`` (a block whose first row is ``row``;
    strings or lists of them) that is not UTF-8: Parquet readers do not check it, and pyarrow's text
    functions or Python's decoding would fail on it without naming the file or column."""
    values, offsets = array, None
    if is_list_type(array.type):
        if not (_is_text(array.type.value_type) or pa.types.is_dictionary(array.type.value_type)):
            return
        values = _decoded(pc.list_flatten(array))
        offsets = offsets_from_lengths(pc.fill_null(pc.list_value_length(array), 0).to_numpy(zero_copy_only=False))
    if not _is_text(values.type):
        return
    try:
        values.validate(full=True)
    except pa.ArrowInvalid as error:
        match = re.search(r"string index (\d+)", str(error))
        index = int(match.group(1)) if match else 0
        raw = values.view(pa.large_binary() if pa.types.is_large_string(values.type) else pa.binary())[index].as_py()
        raise DataError(
            f"{path}: column {spec.name!r}, {describe_row(row + row_of_value(offsets, index), first_line(path))}: "
            f"{raw[:80]!r} is not UTF-8; expected UTF-8 text in {spec.kind.value} field {spec.name!r} (write the "
            "column as UTF-8, e.g. decode latin-1 text before writing it)"
        ) from error


def missing_tokens(config: TabularConfig, markers: Optional[pa.Array] = None) -> Optional[pa.Array]:
    """The tokens of a categorical field that are missing (strings, or None when none is): ``config.missing_tokens``
    (without the empty one: a blank token is missing anyway) and ``markers`` (a plan's missing-value markers among
    integer ids). A CSV reader makes only whole cells equal to a token missing; these also make a sequence's tokens
    (``a|NA|b``) and a Parquet column's values missing, as the warnings about such values advise."""
    tokens = {token.strip() for token in config.missing_tokens} - {""}
    if markers is not None:
        tokens.update(markers.to_pylist())
    return pa.array(sorted(tokens), pa.string()) if tokens else None


def field_tokens(
    array: pa.Array,
    spec: FieldSpec,
    separator: str,
    path: str,
    row: int,
    missing: Optional[pa.Array] = None,
    utf8_checked: bool = False,
) -> Tuple[pa.Array, Optional[np.ndarray]]:
    """(flat tokens, per-row lengths or None for sparse fields) of a block whose first row is ``row``.

    The tokens are integer ids or strings: dictionary-encoded columns are decoded, floating
    ids made int64 (NaN is missing, a fraction an error) and strings trimmed of surrounding white
    space. Sequences drop their missing tokens: null elements (of string and of integer lists
    alike), empty or blank strings, and strings in ``missing`` (markers such as ``NA`` among
    integer ids, ``--missing-token`` values: :func:`missing_tokens`); a null list is an empty sequence.
    Sparse fields keep their nulls and make empty or blank strings, and strings in ``missing``, null (id 0).
    ``utf8_checked``: an earlier pass over the same
    rows (:func:`plan_fields`) checked that their strings are UTF-8.

    Raises:
        DataError: a column whose type does not fit the field (see :func:`_check_token_column`),
            a floating id that is no whole number, or a string that is not UTF-8.
    """
    _check_token_column(path, spec, array.type, separator)
    array = _decoded(array)
    if not utf8_checked:
        _check_utf8(array, path, spec, row)
    lengths: Optional[np.ndarray] = None
    if spec.kind == FieldKind.SPARSE:
        flat = array
        if _is_text(flat.type):  # as a sequence's tokens: " Paris" is "Paris"; a blank cell is missing
            flat = pc.utf8_trim_whitespace(flat)
            flat = pc.if_else(pc.equal(flat, ""), pa.scalar(None, flat.type), flat)
            if missing is not None:
                flat = null_where_in(flat, missing.cast(flat.type))
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
                missing_here = pc.is_in(flat, value_set=missing.cast(flat.type))
                keep = pc.and_(keep, pc.invert(pc.fill_null(missing_here, False)))
        keep = np.asarray(keep, dtype=bool)
        if not keep.all():
            rows = np.repeat(np.arange(len(lengths)), lengths)
            lengths = np.bincount(rows[keep], minlength=len(lengths)).astype(np.int64)
            flat = flat.filter(pa.array(keep))
    return flat, lengths


@dataclasses.dataclass
class FieldPlan:
    mode: str  # "ids" (integers), "hash" or "vocab"
    vocabulary: Optional[pa.Array] = None
    missing: Optional[pa.Array] = None  # "ids": missing-value markers among the integers (id 0)
    # "vocab": the values (tokens) written so far that were not missing, and those of them the vocabulary lacks
    # (id 0: new data prepared --like an earlier output; the prepare report names them)
    values: int = dataclasses.field(default=0, compare=False)
    unseen: int = dataclasses.field(default=0, compare=False)
    # "vocab": token -> id (its position in ``vocabulary`` + 1), built once (:func:`with_lookup`) by a caller that
    # converts many small batches, such as a served model's requests: pc.index_in hashes the whole vocabulary at
    # every call (ms per call at 10^5 values), the dict only the tokens looked up; the same ids either way
    lookup: Optional[Dict[Optional[str], int]] = dataclasses.field(default=None, compare=False, repr=False)


def with_lookup(plan: FieldPlan) -> FieldPlan:
    """``plan`` with its vocabulary's token -> id dict built (:attr:`FieldPlan.lookup`); a plan of another mode as
    it is. The first of equal tokens keeps its id, as ``pc.index_in`` gives it."""
    if plan.mode != "vocab" or plan.vocabulary is None:
        return plan
    tokens = plan.vocabulary.to_pylist()
    lookup: Dict[Optional[str], int] = {}
    for index, token in enumerate(tokens):
        lookup.setdefault(token, index + 1)
    return dataclasses.replace(plan, lookup=lookup)


def without_unknown_tokens(ids: np.ndarray, lengths: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """A sequence field's flat ``ids`` (T,) and ``lengths`` (N,) without the tokens a vocabulary gave id 0
    (values it does not hold); returns ``(ids, lengths)``, lengths (N,) int64."""
    known = ids != 0
    if known.all():
        return ids, lengths
    rows = np.repeat(np.arange(len(lengths)), lengths)  # (T,) row of each token
    return ids[known], np.bincount(rows[known], minlength=len(lengths)).astype(np.int64)


#: ``FieldPlan.mode`` -> how the prepared schema records it (``DatasetSchema.ids``, one of ``schema.ID_WAYS``)
ID_WAY_OF_PLAN = {"vocab": "vocabulary", "hash": "hashed_text", "ids": "integer"}


# distinct tokens a hashed field's first pass keeps, as a sample (its plan needs no vocabulary)
HASHED_SAMPLE = 10_000


@dataclasses.dataclass
class _TokenCounts:
    """What the first pass saw of a string field's tokens.

    ``bounded`` (a hashed field: no vocabulary is made of it): ``seen`` keeps a sample of at most
    :data:`HASHED_SAMPLE` tokens and ``not_integer`` the missing-value markers only, so memory does
    not grow with the field's distinct values (10^8 URLs); the counts decide its plan alike.
    """

    bounded: bool = False
    seen: Set[str] = dataclasses.field(default_factory=set)  # distinct non-null tokens (a sample when bounded)
    not_integer: Set[str] = dataclasses.field(default_factory=set)  # distinct tokens that are no integer
    integers: int = 0  # integer tokens
    others: int = 0  # tokens that are neither an integer nor a missing-value marker
    first_other: Optional[Tuple[str, str, int]] = None  # (token, file, row in the file) of the first such token


def _count_tokens(counts: _TokenCounts, flat: pa.Array, lengths: Optional[np.ndarray], path: str, row: int) -> None:
    """Adds a block's string tokens (``flat``; ``lengths`` per row for sequences) whose first row is ``row``
    of file ``path``."""
    flat_valid = flat.drop_null()
    if not counts.bounded or len(counts.seen) < HASHED_SAMPLE:
        distinct = pc.unique(flat_valid)
        counts.seen.update(distinct.slice(0, HASHED_SAMPLE).to_pylist() if counts.bounded else distinct.to_pylist())
    is_integer = pc.fill_null(pc.match_substring_regex(flat, INTEGER_PATTERN), False)
    marker = pc.fill_null(pc.is_in(flat, value_set=pa.array(sorted(NULL_MARKERS), flat.type)), False)
    # bounded: the markers decide the plan; the other tokens only count
    kept = pc.and_(pc.invert(is_integer), marker) if counts.bounded else pc.invert(is_integer)
    counts.not_integer.update(pc.unique(flat.filter(kept).drop_null()).to_pylist())
    counts.integers += int(pc.sum(is_integer).as_py() or 0)
    other = np.asarray(pc.and_(pc.and_(flat.is_valid(), pc.invert(is_integer)), pc.invert(marker)), dtype=bool)
    counts.others += int(other.sum())
    if counts.first_other is None and other.any():
        index = int(np.argmax(other))
        offsets = None if lengths is None else offsets_from_lengths(lengths)
        counts.first_other = (flat[index].as_py(), path, row + row_of_value(offsets, index))


class FirstPass(NamedTuple):
    """What :func:`plan_fields` learned: each categorical field's plan, the split column's values (None without
    ``split_by``), and the source's rows (the second pass's total)."""

    plans: Dict[str, FieldPlan]
    split_values: Optional[pa.Array]
    rows: int


def plan_fields(
    path: str,
    schema: DatasetSchema,
    config: TabularConfig,
    columns: List[str],
    row_key: Optional[str] = None,
    column_types: Optional[Dict[str, pa.DataType]] = None,
    progress: bool = False,
) -> "FirstPass":
    """First pass: token kinds and vocabularies of string fields, and the split column (``column_types``: of a
    CSV's extra and split columns, as :func:`~recsys_llm.data.tabular.source.read_blocks` takes them);
    ``progress``: a tqdm bar over the rows read.

    Parquet sources get their footers checked first (:func:`_check_parquet_types`); the pass is
    skipped (integer ids everywhere, random split) when their categorical columns are all of
    integer (or floating) type in every file. A ``hash_fields`` field is hashed whatever its values.

    Raises:
        DataError: a column of integer ids with a few other values (``3.5``, ``bob``), naming the
            first such cell: read as a vocabulary, every id would be renumbered silently; a
            Parquet column of a type that does not fit its field, or of integer ids in one file
            and string tokens in another.
    """
    forced, hashed = set(config.vocabulary_fields), set(config.hash_fields)
    plans = {spec.name: FieldPlan("hash" if spec.name in hashed else "ids") for spec in schema.categorical_fields}
    if is_parquet(path):
        kinds = _check_parquet_types(path, schema, config, columns)
        if not config.split_by and not forced and all(kinds[s.name] == "integer" for s in schema.categorical_fields):
            return FirstPass(plans, None, sum(open_parquet(f).metadata.num_rows for f in parquet_files(path)))
    string_fields: Dict[str, FieldSpec] = {}
    counts: Dict[str, _TokenCounts] = {}
    split_values: List[pa.Array] = []
    split_cells: Set[str] = set()  # sequence fields of which a text cell held the separator
    missing = missing_tokens(config)
    bar = tqdm(desc="tabular rows (first pass)", unit="row", disable=not progress, **bar_options())
    try:
        for file_path, row, block in read_blocks(path, schema, columns, config, row_key, column_types):
            bar.update(block.num_rows)
            for spec in schema.categorical_fields:
                flat, lengths = field_tokens(block.column(spec.name), spec, config.sequence_separator, file_path, row,
                                             missing)
                if lengths is not None and len(lengths) and int(lengths.max()) > 1:
                    split_cells.add(spec.name)
                if spec.name in hashed:  # read for its UTF-8 check only: the field is hashed whatever its values
                    continue
                if pa.types.is_integer(flat.type):
                    if spec.name not in forced:
                        continue
                    flat = pc.cast(flat, pa.string())
                string_fields[spec.name] = spec
                bounded = spec.hashed and spec.name not in forced
                _count_tokens(counts.setdefault(spec.name, _TokenCounts(bounded)), flat, lengths, file_path, row)
            if config.split_by:
                split_values.append(block.column(config.split_by))
    finally:
        bar.close()
    for name, spec in string_fields.items():
        if spec.kind == FieldKind.SEQUENCE and name not in split_cells:
            _warn_unsplit(path, name, counts[name].seen, config.sequence_separator)
        count = counts[name]
        markers = count.not_integer & NULL_MARKERS
        if name in forced:
            plans[name] = _vocabulary_plan(path, spec, count.seen)
        elif not count.not_integer and not count.others:
            plans[name] = FieldPlan("ids")
        elif not count.others and count.integers:
            # integer ids with a missing-value marker (R writes NA): missing, not a vocabulary
            plans[name] = FieldPlan("ids", missing=pa.array(sorted(markers), pa.string()))
        elif spec.hashed:
            plans[name] = FieldPlan("hash")
        elif count.integers > count.others:
            value, bad_file, bad_row = count.first_other
            raise DataError(
                f"{bad_file}: column {name!r}, {describe_row(bad_row, first_line(bad_file))}: {value!r} is not an integer, "
                f"but {count.integers} of the column's {count.integers + count.others} values"
                f"{'' if bad_file == path else f' in {path}'} are integer ids; "
                f"expected integer ids (fix the cell, or pass --vocabulary {name} / TabularConfig.vocabulary_fields "
                f"to map every value through a vocabulary, or set \"hashed\": true for field {name!r} in the schema "
                "to hash the values)"
            )
        else:
            plans[name] = _vocabulary_plan(path, spec, count.seen)
    split = pa.chunked_array(split_values) if config.split_by and split_values else None
    return FirstPass(plans, split, bar.n)


def _warn_unsplit(path: str, name: str, seen: Set[str], separator: str) -> None:
    """Warns when no cell of the text sequence field ``name`` held ``separator`` (every row one value at most)
    while most of its values hold another separator: the tokens of a file joined otherwise became one value each."""
    for other in (",", ";", "|", "/"):
        holding = sorted(value for value in seen if other in value) if other != separator else []
        if seen and 2 * len(holding) >= len(seen):
            warnings.warn(f"{path}: no cell of sequence field {name!r} holds the separator {separator!r} "
                          f"(--sequence-separator), so each row has one value at most, while {len(holding)} of its "
                          f"{len(seen)} values hold {other!r} (e.g. {holding[0]!r}); if they are joined by {other!r}, "
                          f"pass --sequence-separator {other!r}", stacklevel=3)
            return


def _vocabulary_plan(path: str, spec: FieldSpec, seen: Set[str]) -> FieldPlan:
    """The plan mapping the distinct values ``seen`` to ids ``1..V`` in sorted order."""
    vocab = sorted(seen)
    if len(vocab) + 1 > spec.cardinality:
        raise DataError(
            f"{path}: column {spec.name!r} has {len(vocab)} distinct values; field {spec.name!r} needs cardinality >= "
            f"{len(vocab) + 1} (id 0 is reserved for missing) or \"hashed\": true, got {spec.cardinality}"
        )
    return FieldPlan("vocab", pa.array(vocab, pa.string()))


def token_ids(flat: pa.Array, plan: FieldPlan, spec: FieldSpec, salt: int) -> np.ndarray:
    """(N,) ids of the tokens ``flat`` (nulls: 0): int64, or uint64 as read from a uint64 column,
    whose values above ``2**63 - 1`` :func:`~recsys_llm.data.validation.check_ids` names as they
    are (or folds, for a hashed field) rather than letting them wrap to negative ids."""
    if plan.mode == "hash":
        if not (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
            flat = pc.cast(flat, pa.string())  # integer ids hashed as their text (hash_fields)
        return hash_strings(flat, spec.cardinality, salt=salt)
    if plan.mode == "vocab":
        if not (pa.types.is_string(flat.type) or pa.types.is_large_string(flat.type)):
            flat = pc.cast(flat, pa.string())  # integer ids mapped through a vocabulary (vocabulary_fields)
        # the dict for a request; pc.index_in for more tokens than the vocabulary holds (it hashes the vocabulary
        # once per call, then looks each token up in C); a token absent from the vocabulary (or missing) is id 0
        if plan.lookup is not None and len(flat) <= len(plan.lookup):
            get = plan.lookup.get
            return np.fromiter((get(token, 0) for token in flat.to_pylist()), dtype=np.int64, count=len(flat))
        return pc.fill_null(pc.add(pc.index_in(flat, value_set=plan.vocabulary), 1), 0).to_numpy(zero_copy_only=False).astype(np.int64)
    if not pa.types.is_integer(flat.type):
        if plan.missing is not None:
            flat = null_where_in(flat, plan.missing)
        flat = pc.cast(pc.utf8_trim_whitespace(flat), pa.int64())
    ids = pc.fill_null(flat, 0).to_numpy(zero_copy_only=False)
    return ids if ids.dtype == np.uint64 else ids.astype(np.int64)
