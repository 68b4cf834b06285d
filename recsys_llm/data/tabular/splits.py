"""Which split each row goes to: seeded and stable per row, or ranked by a time column."""

from fractions import Fraction
from typing import List, Optional, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from recsys_llm.data.tabular.config import SPLIT_TYPES, TabularConfig
from recsys_llm.data.tabular.source import first_line
from recsys_llm.data.validation import DataError, describe_row

_NUMBER = r"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$"
_ISO_TIME = r"^\s*\d{4}-\d{2}-\d{2}([T ]\d{2}:\d{2}(:\d{2}(\.\d+)?)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)?\s*$"
_ZONE = r"\d{2}:\d{2}(:\d{2}(\.\d+)?)?\s*(Z|[+-]\d{2}(:?\d{2})?)\s*$"  # a time with a zone offset


def _uniform(rows: np.ndarray, seed: int) -> np.ndarray:
    """Stable uniform numbers in [0, 1) per row index (splitmix64), independent of block sizes."""
    with np.errstate(over="ignore"):
        z = rows.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15) + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / float(1 << 53)


def _sort_keys(values: pa.ChunkedArray, path: str, column: str) -> pa.ChunkedArray:
    """The split column as values to rank rows by: numbers and timestamps as they are, a dictionary-encoded
    column (pandas' category) as its values; a text column (a CSV column with a cell pyarrow could not
    type, a sparse field's, a Parquet string column) parsed as integers, numbers or ISO-8601 timestamps (parsed, not compared as text: ``T`` and
    space separators, dates and times, zone offsets then order correctly).

    Raises:
        DataError: text that is not all of one such type, naming the first cell that is not of the
            type most of the column's cells have; ranking it as text would mix future rows into
            the training split (``"10" < "100" < "20"``).
    """
    if pa.types.is_dictionary(values.type):  # pandas' category: ranked by its values (Arrow sorts no dictionary)
        values = pc.cast(values, values.type.value_type)
    if pa.types.is_binary(values.type) or pa.types.is_large_binary(values.type):  # text stored as bytes: its text
        try:
            values = pc.cast(values, pa.large_string())
        except pa.ArrowInvalid as error:
            raise DataError(f"{path}: split column {column!r} is binary and not UTF-8 text ({error}); expected "
                            f"{SPLIT_TYPES}") from error
    if not (pa.types.is_string(values.type) or pa.types.is_large_string(values.type)):
        if pa.types.is_integer(values.type) or pa.types.is_floating(values.type) or pa.types.is_decimal(values.type) \
                or pa.types.is_timestamp(values.type) or pa.types.is_date(values.type):
            return values
        # a list, struct, bool or time of day is no time order (a list or struct is not even sortable)
        raise DataError(f"{path}: split column {column!r} has type {values.type}; expected {SPLIT_TYPES}")
    text = pc.utf8_trim_whitespace(values)
    targets = (pa.int64(), pa.float64(), pa.timestamp("us"), pa.timestamp("us", "UTC"))
    for target in targets:
        try:
            return pc.cast(text, target)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            pass
    times = pc.match_substring_regex(text, _ISO_TIME)
    zoned = pc.and_(times, pc.match_substring_regex(text, _ZONE))
    kinds = [  # (cells of the kind, their type, the kind in words, which cells look like the kind)
        (pc.match_substring_regex(text, _NUMBER), targets[1], "a number"),
        (pc.and_(times, pc.invert(zoned)), targets[2], "an ISO-8601 date/timestamp without a zone offset"),
        (zoned, targets[3], "an ISO-8601 timestamp with a zone offset"),
    ]
    kinds = [(pc.sum(looks).as_py() or 0, target, kind, looks) for looks, target, kind in kinds]
    count, target, kind, looks = max(kinds, key=lambda k: k[0])  # the first of equals
    if not count:
        raise DataError(f"{path}: column {column!r}, {describe_row(0, first_line(path))}: {values[0].as_py()!r} is "
                        f"neither a number nor an ISO-8601 date/timestamp, nor is any other cell; expected {SPLIT_TYPES}")
    low, high = 0, len(text)  # the first cell not of that kind ends the shortest prefix that does not parse
    while high - low > 1:
        middle = (low + high) // 2
        try:
            pc.cast(text.slice(0, middle), target)
            low = middle
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            high = middle
    row = high - 1
    others = count - int(bool(looks[row].as_py()))  # 2024-13-45 looks like a date and is none
    raise DataError(f"{path}: column {column!r}, {describe_row(row, first_line(path))}: {values[row].as_py()!r} is "
                    f"not {kind} as {others} of the column's other {len(text) - 1} values are; expected {SPLIT_TYPES}")


def split_bounds(fractions: Sequence[float], total: int) -> List[int]:
    """The first rows of the valid and test splits of ``total`` ranked rows: ``floor(total * share)``
    of the cumulative shares, computed exactly from the fractions as written (``0.1 + 0.7`` is
    ``0.7999999999999999`` in floating point, whose floor would move a row of 10 from valid to test)."""
    shares = [Fraction(repr(float(f))) for f in fractions]
    whole = sum(shares)
    return [int(total * sum(shares[: k + 1]) / whole) for k in range(len(shares) - 1)]


def split_of_rows(total: int, split_values: Optional[pa.ChunkedArray], config: TabularConfig, path: str) -> Optional[np.ndarray]:
    """(total,) int8 split index per row for a time-ordered split (None for a random split);
    rows ranked by the split column's numbers or timestamps (see :func:`_sort_keys`)."""
    if split_values is None:
        return None
    if split_values.null_count:
        raise DataError(f"{path}: split column {config.split_by!r} has {split_values.null_count} missing values; expected a value per row")
    keys = _sort_keys(split_values, path, config.split_by)
    nan = int(pc.sum(pc.is_nan(keys)).as_py() or 0) if pa.types.is_floating(keys.type) else 0
    if nan:
        raise DataError(f"{path}: split column {config.split_by!r} has {nan} NaN values; expected a value per row "
                        "(NaN ranks after every value: its rows would all go to the test split)")
    order = pc.sort_indices(keys).to_numpy()  # stable: ties keep file order
    split = np.zeros(total, dtype=np.int8)
    bounds = np.array(split_bounds(config.split_fractions, total), dtype=np.int64)
    split[order] = np.searchsorted(bounds, np.arange(total), side="right").astype(np.int8)
    return split


def random_split(rows: np.ndarray, config: TabularConfig) -> np.ndarray:
    """Split index (0 train, 1 valid, 2 test) of every row index in ``rows`` for a seeded random split."""
    bounds = np.cumsum(config.split_fractions) / sum(config.split_fractions)
    return np.searchsorted(bounds[:-1], _uniform(rows, config.seed), side="right")
