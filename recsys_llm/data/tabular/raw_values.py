"""Raw values -> the ids ``prepare tabular`` gave them, for a process that receives values, not ids.

A served model (``recsys_llm.serving.ServedModel``) takes ids. A caller that holds the source's
raw values (``"Paris"``, a search query, a user number) turns them into the prepared ids with
:func:`raw_value_ids`, which runs the conversion's own steps (``field_tokens`` then ``token_ids``
then ``check_ids``) the way the prepared schema records for the field (``DatasetSchema.ids``):
through the field's vocabulary (its value-text file), hashed as text, or read as integer ids.

Example::

    schema = DatasetSchema.load("data/shop")
    ids, _ = raw_value_ids(schema, "city", ["Paris", " Lyon", None])   # (3,) int64; None: id 0
    flat, lengths = raw_value_ids(schema, "categories", ["shoes|bags", None])  # a sequence field
"""

from typing import Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.tabular.tokens import ID_WAY_OF_PLAN, NULL_MARKERS, FieldPlan, field_tokens, token_ids
from recsys_llm.data.validation import DataError, check_ids, offsets_from_lengths

_PLAN_OF_ID_WAY = {way: mode for mode, way in ID_WAY_OF_PLAN.items()}


def raw_value_ids(
    schema: DatasetSchema,
    field: str,
    values: Sequence[object],
    sequence_separator: str = "|",
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The ids ``prepare tabular`` gives the raw values of one sparse or sequence field.

    Values are what the source held: strings (trimmed of surrounding white space as the
    conversion trims them) or integers, None (or a blank string) for a missing value; for a
    sequence field, a list of such values or one string joined by ``sequence_separator`` (the
    one the data was prepared with, ``TabularConfig.sequence_separator``). A cell the CSV reader
    took as missing (``TabularConfig.missing_tokens``) is passed as None.

    Args:
        schema (DatasetSchema): the prepared schema; its ``ids`` names the field's way.
        field (str): a sparse or sequence field of ``schema``.
        values (Sequence[object]): one raw value per row.
        sequence_separator (str): separator of a sequence's tokens in one string.

    Returns:
        Tuple[np.ndarray, Optional[np.ndarray]]: ``(ids, None)`` for a sparse field, ids (N,) int64
        with 0 for a missing value or, through a vocabulary, a value it does not hold; for a sequence
        field ``(flat ids, lengths)``, lengths (N,) int64, missing tokens dropped (not cut to
        ``max_length``: the reader and ``ServedModel`` keep the first ``max_length``).

    Raises:
        ValueError: ``field`` is no sparse or sequence field, or ``schema`` does not record its way (data
            prepared by another source, or by ``prepare tabular`` before it recorded it: prepare it again).
        DataError: a value the conversion would refuse (an integer id outside the field's table, a
            fraction), or text for a field prepared from integer ids, naming the field.
    """
    spec = schema.field(field)
    if not spec.is_categorical:
        raise ValueError(f"raw_value_ids: field {field!r} of schema {schema.name!r} is dense; its values are the "
                         "model's input as they are")
    way = schema.ids.get(field)
    if way is None:
        raise ValueError(
            f"raw_value_ids: schema {schema.name!r} ({schema.root}) does not record how field {field!r}'s values "
            "became ids (its 'ids' key): it is written by `recsys-llm prepare tabular`; prepare the data again with "
            "it, or see docs/usage.md for the other sources' ids"
        )
    plan = FieldPlan(_PLAN_OF_ID_WAY[way])
    if plan.mode == "vocab":
        texts = schema.load_value_text(field).sort_by("id")
        plan.vocabulary = texts.column("text").combine_chunks()[1:]  # id 0: unknown
    elif plan.mode == "ids":
        plan.missing = pa.array(sorted(NULL_MARKERS), pa.string())
    where = f"raw values of field {field!r}"
    array = _arrow_values(values, sequence=spec.kind == FieldKind.SEQUENCE)
    flat, lengths = field_tokens(array, spec, sequence_separator, where, 0, plan.missing)
    try:
        ids = token_ids(flat, plan, spec, salt=[f.name for f in schema.fields].index(field))
    except pa.ArrowInvalid as error:  # a value that is no integer, for a field prepared from integer ids
        raise DataError(f"{where}: expected integer ids, the way schema {schema.name!r} records for the field "
                        f"(ids: integer); {error}") from None
    offsets = None if lengths is None else offsets_from_lengths(lengths)
    return check_ids(where, spec, ids, offsets, 0).astype(np.int64, copy=False), lengths


def _arrow_values(values: Sequence[object], sequence: bool) -> pa.Array:
    """``values`` as one Arrow array, as a column of the source would hold them: pyarrow's own type when it
    infers one; strings (a number as its text, as a CSV holds it) for values of several Python types; uint64
    for integers beyond int64; strings (lists of strings for a sequence field) when every value is missing."""
    try:
        array = pa.array(values)
    except OverflowError:  # integers beyond int64, which a uint64 column holds
        array = pa.array(values, pa.uint64())
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # several Python types in one field: their texts

        def text(value: object) -> object:
            return None if value is None else str(value)

        values = [[text(t) for t in v] if isinstance(v, (list, tuple)) else text(v) for v in values]
        array = pa.array(values)
    if pa.types.is_null(array.type):  # every value missing, or no value
        array = pa.array([None] * len(array), pa.list_(pa.string()) if sequence else pa.string())
    return array
