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

import math
import numbers
import re
from collections.abc import Mapping, Set
from typing import Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa

from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.tabular.tokens import (ID_WAY_OF_PLAN, INTEGER_PATTERN, NULL_MARKERS, FieldPlan, field_tokens,
                                            token_ids, without_unknown_tokens)
from recsys_llm.data.validation import DataError, check_ids, describe_row, offsets_from_lengths, row_of_value

_PLAN_OF_ID_WAY = {way: mode for mode, way in ID_WAY_OF_PLAN.items()}


def raw_value_ids(
    schema: DatasetSchema,
    field: str,
    values: Sequence[object],
    sequence_separator: str = "|",
    *,
    plan: Optional[FieldPlan] = None,
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """The ids ``prepare tabular`` gives the raw values of one sparse or sequence field.

    Values are what the source held: strings (trimmed of surrounding white space as the
    conversion trims them) or integers, None (or a blank string) for a missing value; for a
    sequence field, a list of such values or one string joined by ``sequence_separator`` (the
    one the data was prepared with, ``TabularConfig.sequence_separator``). A value or a sequence's token the
    preparation took as missing (``TabularConfig.missing_tokens``) is passed as None, or left out of the sequence:
    through a vocabulary it gets id 0 (or is dropped) anyway, but a hashed field would hash it.

    Args:
        schema (DatasetSchema): the prepared schema; its ``ids`` names the field's way.
        field (str): a sparse or sequence field of ``schema``.
        values (Sequence[object]): one raw value per row.
        sequence_separator (str): separator of a sequence's tokens in one string.
        plan (Optional[FieldPlan]): the field's :func:`prepared_plan`, built once by a caller that converts many
            requests (``ServedModel`` builds every field's at load); None: built here, reading the field's
            value-text file.

    Returns:
        Tuple[np.ndarray, Optional[np.ndarray]]: ``(ids, None)`` for a sparse field, ids (N,) int64
        with 0 for a missing value or, through a vocabulary, a value it does not hold; for a sequence
        field ``(flat ids, lengths)``, lengths (N,) int64, missing tokens and tokens the vocabulary does
        not hold dropped (in the prepared data no sequence holds id 0, so its table row 0 is untrained;
        not cut to ``max_length``: the reader and ``ServedModel`` keep the first ``max_length``).

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
    if plan is None:
        plan = prepared_plan(schema, field, "raw_value_ids")
    where = f"raw values of field {field!r}"
    array = _arrow_values(values, where, sequence=spec.kind == FieldKind.SEQUENCE)
    flat, lengths = field_tokens(array, spec, sequence_separator, where, 0, plan.missing)
    offsets = None if lengths is None else offsets_from_lengths(lengths)
    try:
        ids = token_ids(flat, plan, spec, salt=[f.name for f in schema.fields].index(field))
    except pa.ArrowInvalid:  # a value that is no integer (or beyond int64), for a field prepared from integer ids
        texts = flat.cast(pa.string()).to_pylist()
        index, what = _first_bad_integer(texts)
        raise DataError(f"{where}, {describe_row(row_of_value(offsets, index))}: {texts[index]!r} {what}, the way "
                        f"schema {schema.name!r} records for the field (ids: integer)") from None
    ids = check_ids(where, spec, ids, offsets, 0).astype(np.int64, copy=False)
    if lengths is not None and plan.mode == "vocab":
        ids, lengths = without_unknown_tokens(ids, lengths)
    return ids, lengths


def prepared_plan(schema: DatasetSchema, field: str, caller: str = "prepared_plan") -> FieldPlan:
    """The plan that turns raw values of ``field`` into the ids ``prepare tabular`` gave them, rebuilt from the
    way the prepared ``schema`` records for it (``DatasetSchema.ids``): its vocabulary (the field's value-text
    file, id 0 for a value it does not hold), hashing as text, or integer ids (any of the CSV reader's
    missing-value markers missing).

    Args:
        schema (DatasetSchema): a schema written by ``prepare tabular``.
        field (str): a sparse or sequence field of ``schema``.
        caller (str): what asks, named in the message (``raw_value_ids``, ``prepare tabular --like``).

    Returns:
        FieldPlan: the plan for :func:`~recsys_llm.data.tabular.tokens.token_ids`.

    Raises:
        ValueError: ``schema`` does not record the field's way (data prepared by another source, or by
            ``prepare tabular`` before it recorded it).
    """
    way = schema.ids.get(field)
    if way is None:
        raise ValueError(
            f"{caller}: schema {schema.name!r} ({schema.root}) does not record how field {field!r}'s values "
            "became ids (its 'ids' key): it is written by `recsys-llm prepare tabular`; prepare the data again with "
            "it, or see docs/usage.md for the other sources' ids"
        )
    plan = FieldPlan(_PLAN_OF_ID_WAY[way])
    if plan.mode == "vocab":
        texts = schema.load_value_text(field).sort_by("id")
        plan.vocabulary = texts.column("text").combine_chunks()[1:]  # id 0: unknown
    elif plan.mode == "ids":
        plan.missing = pa.array(sorted(NULL_MARKERS), pa.string())
    return plan


def _first_bad_integer(texts: Sequence[Optional[str]]) -> Tuple[int, str]:
    """Index of the first text that an int64 id cannot hold, and why."""
    for index, text in enumerate(texts):
        if text is not None and not re.match(INTEGER_PATTERN, text):
            return index, "is not an integer id"
    for index, text in enumerate(texts):
        if text is not None and not -2**63 <= int(text) < 2**64:
            return index, "is beyond 64 bits (expected an int64 id, or a uint64 one where no id is negative)"
    for index, text in enumerate(texts):
        if text is not None and not -2**63 <= int(text) < 2**63:
            return index, "is beyond int64 (beside a negative id, so not read as uint64)"
    return 0, "cannot be read as int64 ids"


def _arrow_values(values: Sequence[object], where: str, sequence: bool) -> pa.Array:
    """``values`` as one Arrow array, as a column of the source would hold them: pyarrow's own type when it
    infers one (uint64 for integers beyond int64); the values' texts when they are of several Python types
    (:func:`_token_text`); strings (lists of strings for a sequence field) when every value is missing."""
    if isinstance(values, (str, bytes)):
        raise TypeError(f"{where}: expected one value per row (a list or array), got one {type(values).__name__} "
                        f"{values!r:.40}; pass [{values!r:.40}] for one row")
    if isinstance(values, (Mapping, Set)):  # a dict's keys, or a set's values in no row order
        raise TypeError(f"{where}: expected one value per row in row order (a list or array), got a "
                        f"{type(values).__name__}, which holds no rows in order; pass list(...) of the rows' values")
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if isinstance(values, pa.Array):
        array = values
    else:
        try:
            array = pa.array(values)
        except OverflowError:  # integers beyond int64, which a uint64 column holds; else their texts
            try:
                array = pa.array(values, pa.list_(pa.uint64()) if sequence else pa.uint64())
            except (OverflowError, pa.ArrowInvalid, pa.ArrowTypeError):
                array = _texts(values, where, sequence)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            # several Python types in one field; NumPy arrays of several dtypes (a sequence's rows, an empty one
            # float64)
            array = _texts(values, where, sequence)
    if pa.types.is_null(array.type):  # every value missing, or no value
        array = pa.array([None] * len(array), pa.list_(pa.string()) if sequence else pa.string())
    elif sequence and pa.types.is_list(array.type) and pa.types.is_null(array.type.value_type):
        array = array.cast(pa.list_(pa.string()))  # only empty or missing lists
    return array


def _texts(values: Sequence[object], where: str, sequence: bool) -> pa.Array:
    """Values of several Python types as the strings a CSV would hold (lists of them for a sequence given
    as lists, tuples or NumPy arrays)."""
    values = list(values)  # by position (a pandas Series' labels may be other numbers)
    rows = (list, tuple, np.ndarray)  # a sequence's row of tokens: a list, a tuple or a NumPy array (pandas' cells)
    if sequence and any(isinstance(v, rows) for v in values):
        joined = [row for row, v in enumerate(values) if not isinstance(v, rows) and v is not None]
        if joined:
            raise DataError(f"{where}, {describe_row(joined[0])}: {values[joined[0]]!r} is not a list, and other rows "
                            "are; give a sequence field's rows all as lists or all as joined strings")
        return pa.array([None if v is None else [_token_text(t, where, row) for t in v] for row, v in enumerate(values)],
                        pa.list_(pa.string()))
    return pa.array([_token_text(v, where, row) for row, v in enumerate(values)], pa.string())


def _token_text(value: object, where: str, row: int) -> Optional[str]:
    """A value's text as the conversion reads a typed column: an integer or a whole float as its digits (a float
    column's ``42.0`` is id or token ``42``), NaN and None missing; a fraction or a bool is refused, as there."""
    if value is None or (isinstance(value, numbers.Real) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):  # numpy's numbers count
        raise DataError(f"{where}, {describe_row(row)}: {value!r} ({type(value).__name__}); expected an integer id, "
                        "a whole number or a string")
    if not isinstance(value, numbers.Integral) and not float(value).is_integer():
        raise DataError(f"{where}, {describe_row(row)}: {value!r} is not a whole number; expected an integer id or "
                        "a string")
    return str(int(value))
