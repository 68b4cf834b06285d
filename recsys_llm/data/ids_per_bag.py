"""The mean number of ids per row (per bag) of each sequence field of a split: what torchrec's planner reads as a
feature's pooling factor (``ParameterConstraints.pooling_factors``), which it otherwise takes to be 1.0.

A sparse field has one id per row; a sequence (multi-hot) field's bags are as long as its lists, cut to the
field's ``max_length`` as the reader cuts them, a null list counting as empty. The lengths come from the list
columns of the split alone, read one row group at a time; a split of more than ``max_rows`` rows is measured on
row groups spread evenly over it.

Example::

    mean_ids_per_bag(DatasetSchema.load("data/ml-1m"), "train")   # {"genres": 1.7, "history": 20.0}
"""

import math
from typing import Dict, List, Tuple

import numpy as np
import pyarrow.compute as pc

from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.validation import open_parquet, read_row_group

# rows measured at most (whole row groups spread over the split): the mean of 2M bags is good to well under 1%
DEFAULT_MAX_ROWS = 2_000_000


def mean_ids_per_bag(schema: DatasetSchema, split: str, max_rows: int = DEFAULT_MAX_ROWS) -> Dict[str, float]:
    """Mean ids per row of every sequence field of ``split`` (a split name, file or directory).

    Args:
        schema (DatasetSchema): the data's schema.
        split (str): the split measured (the training split: the batches the plan is for).
        max_rows (int): a larger split is measured on every k-th row group, about ``max_rows`` rows.

    Returns:
        Dict[str, float]: sequence field -> mean ids per row (0.0 in a split without rows); empty when the
        schema has no sequence field.

    Raises:
        DataError: a file of the split is missing or cannot be read, naming it.
    """
    names = [spec.name for spec in schema.fields if spec.kind == FieldKind.SEQUENCE]
    if not names:
        return {}
    cut = {spec.name: spec.max_length for spec in schema.fields if spec.kind == FieldKind.SEQUENCE}
    groups = _row_groups(schema, split)
    total = sum(rows for _, _, rows in groups)
    step = max(1, math.ceil(total / max_rows)) if max_rows > 0 else 1
    ids = dict.fromkeys(names, 0)
    rows = 0
    handles = {}
    for path, group, _ in groups[::step]:
        handle = handles.setdefault(path, open_parquet(path))
        table = read_row_group(handle, path, group, names)
        for name in names:
            lengths = pc.fill_null(pc.list_value_length(table.column(name)), 0).to_numpy().astype(np.int64)
            if cut[name]:
                lengths = np.minimum(lengths, cut[name])
            ids[name] += int(lengths.sum())
        rows += table.num_rows
    return {name: ids[name] / rows if rows else 0.0 for name in names}


def _row_groups(schema: DatasetSchema, split: str) -> List[Tuple[str, int, int]]:
    """``(file, row group, rows)`` of every row group of ``split``, in file order (footers only)."""
    groups = []
    for path in resolve_paths(schema, split):
        meta = open_parquet(path).metadata
        groups += [(path, group, meta.row_group(group).num_rows) for group in range(meta.num_row_groups)]
    return groups
