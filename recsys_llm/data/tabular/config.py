"""Options of ``prepare tabular`` (:class:`TabularConfig`) and the wording of what they accept."""

import dataclasses
from typing import Optional, Tuple

from recsys_llm.data.validation import check_number, check_split_fractions
from recsys_llm.typed_config import check_str_settings

# how to accept missing or non-finite dense values, from the command line and from Python
FILL_HINT = "or pass --fill-missing-dense VALUE, TabularConfig.fill_missing_dense in Python, to replace missing and NaN/inf"
# what a split column must hold (see splits._sort_keys)
SPLIT_TYPES = ("one sortable type in every row of the split column (--split-by): numbers, or ISO-8601 dates/"
               "timestamps such as 2024-01-05 or 2024-01-05T10:00:00 (all with or all without a zone offset "
               "such as Z or +02:00); other text is refused as its order is no time order ('10' < '100' < '20')")


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
            read as missing, and so are the categorical fields' values equal to one (a Parquet
            column's values, a sequence's tokens, read without surrounding spaces); by default
            only the empty cell, so words such as ``NA``
            (Namibia) or ``null`` stay values. Numeric columns (dense, label) read pyarrow's
            usual missing markers (empty, ``NA``, ``NaN``, ``null``, ``N/A``, ...) and those of
            these tokens that are no number (MySQL's ``\\N``; ``-1`` stays -1 there).
        vocabulary_fields (Tuple[str, ...]): categorical fields whose values are mapped through
            a vocabulary built from the data even when they are (mostly) integers, e.g. zip codes.
            Without it, a column of integer ids with a few other values is an error.
        hash_fields (Tuple[str, ...]): ``hashed`` fields whose values are hashed as text even when
            every value is an integer (which would otherwise be taken as ids, folded modulo the
            cardinality), so one non-integer value in new data cannot switch every id of the field.
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
    hash_fields: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        check_split_fractions(self.split_fractions, "TabularConfig.split_fractions")
        check_number("TabularConfig.seed", self.seed, integer=True, minimum=0)
        check_str_settings(self, ("split_by",), "TabularConfig")  # 1 would fail as a missing column
        check_number("TabularConfig.label_threshold", self.label_threshold, optional=True)
        check_number("TabularConfig.fill_missing_dense", self.fill_missing_dense, optional=True)
        check_number("TabularConfig.rows_per_group", self.rows_per_group, integer=True, minimum=1)
        check_number("TabularConfig.block_bytes", self.block_bytes, integer=True, minimum=1)
        if not isinstance(self.sequence_separator, str) or not self.sequence_separator:
            raise ValueError(f"TabularConfig.sequence_separator={self.sequence_separator!r}: expected a non-empty string")
        if not isinstance(self.delimiter, str) or len(self.delimiter) != 1:
            raise ValueError(f"TabularConfig.delimiter={self.delimiter!r}: expected one character, e.g. ',' or '\\t'")
        for option in ("missing_tokens", "vocabulary_fields", "hash_fields"):
            value = getattr(self, option)
            if isinstance(value, str) or not all(isinstance(t, str) for t in value):
                raise ValueError(f"TabularConfig.{option}={value!r}: expected a tuple of strings, e.g. ('', 'NA')")


def check_tabular_config(config: object, where: str) -> None:
    """Raises TypeError, naming ``where``, unless ``config`` is a :class:`TabularConfig` or None (a split name or
    a bool given by position failed later as "'str' object has no attribute 'split_by'")."""
    if config is not None and not isinstance(config, TabularConfig):
        raise TypeError(f"{where}: config must be a TabularConfig or None, got {config!r}; the settings after it "
                        "(progress=, field_ways=, ...) are keyword-only")
