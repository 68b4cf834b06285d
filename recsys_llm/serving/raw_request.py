"""A whole served request from raw values: ``ServedModel.raw_request``.

A service that receives the source's values (``{"city": ["Paris", "Lyon"], "price": [9.5, 12.0], ...}``)
needs the model's inputs: the dense features in column order and a KeyedJaggedTensor of every feature's ids.
:func:`raw_request` builds both from the artifact alone, each sparse or sequence field through
``ServedModel.raw_value_ids`` (the training data's vocabularies and id ways, ``ids/``).

Example::

    served = ServedModel.load("runs/served", trust_program=True)
    dense, kjt = served.raw_request({"city": ["Paris", None], "categories": ["shoes|bags", ""], "price": [9.5, 12.0]})
    probabilities = served.predict(dense, kjt)  # (2,)
"""

import math
import sys
from collections.abc import Set
from typing import Any, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


def _row_count(columns: Mapping[str, Sequence[object]], names: Sequence[str]) -> int:
    """The rows every column of ``names`` holds alike.

    Raises:
        ValueError: a column is missing, is a single value (a string) or holds another number of rows.
    """
    missing = [name for name in names if name not in columns]
    if missing:
        raise ValueError(f"raw_request: no column for {missing}; expected one raw value per row for every feature "
                         f"of the model, {list(names)} (other columns are ignored)")
    rows: Optional[int] = None
    for name in names:
        column = columns[name]
        if isinstance(column, (str, bytes)) or not hasattr(column, "__len__"):
            raise ValueError(f"raw_request: column {name!r} is {type(column).__name__} {column!r}; expected a "
                             "sequence of one raw value per row (a list of one value for a single row)")
        if isinstance(column, (Mapping, Set)):  # a dict's keys, or a set's values in no row order
            raise ValueError(f"raw_request: column {name!r} is a {type(column).__name__}, which holds no rows in "
                             "order; expected a sequence of one raw value per row (a list or array)")
        if rows is None:
            rows = len(column)
        elif len(column) != rows:
            raise ValueError(f"raw_request: column {name!r} holds {len(column)} rows, column {names[0]!r} {rows}; "
                             "expected one value per row in every column")
    return int(rows or 0)


def _dense_column(name: str, values: Sequence[object]) -> np.ndarray:
    """(N,) float32 of one dense field's raw numbers (a NumPy array of numbers is taken as it is).

    Raises:
        ValueError: a value that is no finite real number (None, a string, a bool, NaN, inf), naming the field and
            row.
    """
    numbers: Sequence[object] = values
    if not (isinstance(values, np.ndarray) and values.ndim == 1 and values.dtype.kind in "iuf"):
        values = list(values)  # by position (a pandas Series' labels may be other numbers)
        for row, value in enumerate(values):
            if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"raw_request: dense field {name!r}, row {row}: {value!r} is not a number; expected "
                                 "a real number in every row (the preparation refuses a missing one unless "
                                 "--fill-missing-dense filled it: send that value)")
        # a Python int beyond float64 (NumPy's conversion raises OverflowError, naming no field): inf, refused below
        numbers = [math.inf if isinstance(value, int) and abs(value) > sys.float_info.max else value
                   for value in values]
    with np.errstate(over="ignore"):  # beyond float32: inf, refused below naming the row
        column = np.asarray(numbers, dtype=np.float32).reshape(len(values))
    bad = np.flatnonzero(~np.isfinite(column))
    if bad.size:  # NaN (a missing value to the preparation), inf, or beyond float32 (the model's input dtype)
        row = int(bad[0])
        raise ValueError(f"raw_request: dense field {name!r}, row {row}: {values[row]!r} is not a finite float32 "
                         "number; expected a finite real number in every row (the preparation refuses a missing "
                         "one unless --fill-missing-dense filled it: send that value)")
    return column


def raw_request(
    served: Any,
    columns: Mapping[str, Sequence[object]],
    *,
    sequence_separator: str = "|",
) -> Tuple[torch.Tensor, KeyedJaggedTensor]:
    """The request of raw values ``columns`` for ``served.predict`` / ``served.logits``.

    Args:
        served (ServedModel): an artifact of data prepared by ``prepare tabular`` (its ``ids/``).
        columns (Mapping[str, Sequence[object]]): field name -> one raw value per row, for every feature of
            ``served.feature_names`` (as :meth:`~recsys_llm.serving.served_model.ServedModel.raw_value_ids` takes
            them: strings, the source's own numbers, None for a missing value; a sequence as a list or one string
            joined by ``sequence_separator``)
            and every dense field of ``served.dense_feature_names`` (real numbers); other keys are ignored.
        sequence_separator (str): separator of a sequence's tokens in one string.

    Returns:
        Tuple[torch.Tensor, KeyedJaggedTensor]: dense (B, num_dense_features) float32 in the artifact's column
        order, and the ids of ``feature_names`` (one per row of a sparse field, 0..n of a sequence; int64 values,
        int32 lengths), on the CPU.

    Raises:
        ValueError: the artifact holds no id ways or no dense field names, its tables take per-id weights, a
            column is missing or holds another number of rows, or a value the preparation would refuse.
    """
    if served.weighted:
        raise ValueError("raw_request: this model's tables pool per-id weights (config.json: weighted), which raw "
                         "values do not give; build its KeyedJaggedTensor with weights as INFERENCE.md shows")
    dense_names: Optional[List[str]] = served.dense_feature_names
    if dense_names is None:
        if served.num_dense_features:
            raise ValueError(f"raw_request: this artifact does not record which fields its "
                             f"{served.num_dense_features} dense features are (config.json: dense_feature_names; "
                             "exported without a schema, or before 2026-12-06); export the run again")
        dense_names = []
    features: List[str] = served.feature_names
    rows = _row_count(columns, list(features) + [name for name in dense_names if name not in features])
    values: List[torch.Tensor] = []
    lengths: List[torch.Tensor] = []
    for feature in features:
        ids, feature_lengths = served.raw_value_ids(feature, columns[feature], sequence_separator)
        values.append(torch.from_numpy(ids))
        lengths.append(torch.ones(rows, dtype=torch.int32) if feature_lengths is None
                       else torch.from_numpy(feature_lengths).to(torch.int32))
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=list(features),
        values=torch.cat(values) if values else torch.empty(0, dtype=torch.int64),
        lengths=torch.cat(lengths) if lengths else torch.empty(0, dtype=torch.int32),
    )
    dense = [_dense_column(name, columns[name]) for name in dense_names]
    dense_features = torch.from_numpy(np.stack(dense, axis=1)) if dense else torch.zeros(rows, 0)  # (B, num_dense)
    return dense_features, kjt
