"""Rows of one Parquet row group (or a slice of one) as numpy arrays, validated against the schema on
the way, and cut, taken, concatenated and turned into a :class:`~recsys_llm.data.batch.Batch`."""

import dataclasses
import itertools
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import (
    DataError,
    check_dense,
    check_float32_range,
    check_finite_extra,
    check_ids,
    check_labels,
    check_no_null_elements,
    check_no_nulls,
    describe_row,
    offsets_from_lengths,
    row_of_value,
)

ROW_ID_EXTRA = "row_id"  # the extra key of the row keys in a Batch


@dataclasses.dataclass
class RowChunk:
    """Rows of a row group converted to numpy.

    ``ids[k]`` holds the ids of categorical key ``k`` (one per row for sparse fields, the
    flat values for sequences); ``offsets[k]`` is None for sparse keys and (N + 1,) row
    offsets into ``ids[k]`` for sequences.
    """

    dense: np.ndarray  # (N, Dd) float32
    ids: List[np.ndarray]
    offsets: List[Optional[np.ndarray]]
    labels: np.ndarray  # (N,) float32
    extras: Dict[str, np.ndarray]  # (N,) or (N, d)

    @property
    def num_rows(self) -> int:
        return self.labels.shape[0]

    def slice(self, start: int, stop: int) -> "RowChunk":
        """Rows ``[start, stop)`` of this chunk (views of its arrays; bag offsets re-based to 0)."""
        ids, offsets = [], []
        for values, off in zip(self.ids, self.offsets):
            if off is None:
                ids.append(values[start:stop])
                offsets.append(None)
            else:
                ids.append(values[off[start] : off[stop]])
                offsets.append(off[start : stop + 1] - off[start])
        return RowChunk(
            self.dense[start:stop], ids, offsets, self.labels[start:stop], {k: v[start:stop] for k, v in self.extras.items()}
        )

    def take(self, rows: np.ndarray) -> "RowChunk":
        """The rows at indices ``rows`` (N',), in that order (``np.take``: a few times faster than
        fancy indexing on the (N, Dd) dense rows, a fifth on the 1-D id columns)."""
        ids, offsets = [], []
        for values, off in zip(self.ids, self.offsets):
            if off is None:
                ids.append(np.take(values, rows))
                offsets.append(None)
                continue
            starts = np.take(off, rows)
            lengths = np.take(off, rows + 1) - starts
            new_off = offsets_from_lengths(lengths)
            # position of every kept id in the old values: old row start + rank within its row
            gather = np.arange(new_off[-1], dtype=np.int64) - np.repeat(new_off[:-1] - starts, lengths)
            ids.append(np.take(values, gather))
            offsets.append(new_off)
        return RowChunk(np.take(self.dense, rows, axis=0), ids, offsets, np.take(self.labels, rows),
                        {k: np.take(v, rows, axis=0) for k, v in self.extras.items()})

    @staticmethod
    def concat(chunks: List["RowChunk"]) -> "RowChunk":
        """The rows of ``chunks`` one after another (the one chunk itself when given one)."""
        if len(chunks) == 1:
            return chunks[0]
        ids, offsets = [], []
        for k, first in enumerate(chunks[0].offsets):
            ids.append(np.concatenate([c.ids[k] for c in chunks]))
            if first is None:
                offsets.append(None)
            else:
                offsets.append(offsets_from_lengths(np.concatenate([np.diff(c.offsets[k]) for c in chunks])))
        return RowChunk(
            np.concatenate([c.dense for c in chunks]),
            ids,
            offsets,
            np.concatenate([c.labels for c in chunks]),
            {k: np.concatenate([c.extras[k] for c in chunks]) for k in chunks[0].extras},
        )

    def to_batch(self, keys: List[str]) -> Batch:
        """The rows as one :class:`~recsys_llm.data.batch.Batch`: dense (B, num_dense), a KJT over ``keys`` (in
        ``self.ids``' order), labels (B,) and the extras."""
        n = self.num_rows
        lengths = [np.ones(n, dtype=np.int32) if off is None else np.diff(off).astype(np.int32) for off in self.offsets]
        values = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        # ids per key, known here for free: without them torchrec computes them from the lengths at the sharded
        # input distribution, a device-to-host copy (.tolist()) per batch once the batch is on a GPU
        length_per_key = [int(key_lengths.sum()) for key_lengths in lengths]
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(_writable(values, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)),
            stride=n,
            length_per_key=length_per_key,
            offset_per_key=[0, *itertools.accumulate(length_per_key)],
        )
        return Batch(
            dense_features=torch.from_numpy(_writable(self.dense)),
            sparse_features=kjt,
            labels=torch.from_numpy(_writable(self.labels)),
            extras={k: torch.from_numpy(_writable(v)) for k, v in self.extras.items()},
        )


def _writable(array: np.ndarray, dtype: Optional[type] = None) -> np.ndarray:
    """C-contiguous, writable array (copies only arrays that share read-only Arrow buffers)."""
    return np.require(array, dtype=dtype, requirements=["C", "W"])


def _id_array(values: np.ndarray) -> np.ndarray:
    """Ids as int64, except uint64 ones, which stay unsigned for :func:`check_ids` (an id above
    ``2**63 - 1`` would wrap to a negative one: named wrongly, or folded as another value if hashed)."""
    return values if values.dtype == np.uint64 else values.astype(np.int64, copy=False)


def sequence_ids(array: pa.Array, spec: FieldSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Flat ids (int64, or uint64 from a uint64 column) and (N + 1,) offsets of a list column, null
    lists as empty, truncated to max_length."""
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    values = _id_array(pc.list_flatten(array).to_numpy(zero_copy_only=False))
    off = offsets_from_lengths(lengths)
    if spec.max_length and lengths.size and lengths.max() > spec.max_length:
        # keep the first max_length ids of every row
        position = np.arange(values.size) - np.repeat(off[:-1], lengths)
        values = values[position < spec.max_length]
        off = offsets_from_lengths(np.minimum(lengths, spec.max_length))
    return values, off


def dense_column(path: str, spec: FieldSpec, array: pa.Array, row_offset: int, validate: bool = True) -> np.ndarray:
    """(N,) float32 values of a dense column; with ``validate``, a null or non-finite value raises."""
    if validate:
        check_no_nulls(path, spec.name, array, row_offset, "a finite float")
    raw = array.to_numpy(zero_copy_only=False)
    if validate:
        check_dense(path, spec.name, raw, row_offset)
        if raw.dtype == np.float64:  # named as stored: 1e300 is no inf, it only becomes one in float32
            check_float32_range(path, spec.name, raw, row_offset)
    with np.errstate(over="ignore"):  # unvalidated: beyond float32 is inf, as the cast makes it
        return raw.astype(np.float32, copy=False)


def categorical_column(
    path: str, spec: FieldSpec, array: pa.Array, row_offset: int
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Ids of a sparse or sequence column, checked (``check_ids``, folded if hashed), whatever the
    reader's ``validate``: a null id (of a sparse field, or inside a sequence's list) has no id (numpy
    would make it the int64 minimum, named as a negative id or, if hashed, folded into a real one),
    and the check reads only the null count.

    Returns:
        Tuple: flat int64 ids and, for a sequence, its (N + 1,) offsets (None for a sparse field).
    """
    what = f"an id in [0, {spec.cardinality})"
    if spec.kind == FieldKind.SPARSE:
        check_no_nulls(path, spec.name, array, row_offset, what)
        values = _id_array(array.to_numpy(zero_copy_only=False))
        return check_ids(path, spec, values, None, row_offset), None
    check_no_null_elements(path, spec.name, array, row_offset, what)
    values, offsets = sequence_ids(array, spec)
    return check_ids(path, spec, values, offsets, row_offset), offsets


def extra_kind(dtype: pa.DataType) -> str:
    """What a batch carries of an extra column of Arrow type ``dtype``: ``"integer"`` (int64),
    ``"float"`` (float32) or ``"vector"`` (float32 (B, d)); ``"other"`` is refused when read."""
    if pa.types.is_integer(dtype) or pa.types.is_boolean(dtype):
        return "integer"
    if pa.types.is_floating(dtype):
        return "float"
    if pa.types.is_list(dtype) or pa.types.is_large_list(dtype) or pa.types.is_fixed_size_list(dtype):
        return "vector"
    return "other"


#: integers of magnitude up to this are exact in float32 (its 24-bit significand); 2**24 + 1 is not
_FLOAT32_EXACT_INTEGERS = 2**24


def _check_exact_in_float32(path: str, name: str, flat: np.ndarray, lengths: np.ndarray, row_offset: int) -> None:
    """Raises if an integer of a list extra (carried as a float32 vector) would change in float32.

    Args:
        flat (np.ndarray): (sum of lengths,) the integers of the lists, row after row.
        lengths (np.ndarray): (N,) per-row list lengths, to name the row.
    """
    outside = flat > _FLOAT32_EXACT_INTEGERS
    if flat.dtype.kind == "i":  # not np.abs: the int64 minimum is its own absolute value
        outside |= flat < -_FLOAT32_EXACT_INTEGERS
    if flat.size and outside.any():
        first = int(np.argmax(outside))
        row = row_of_value(offsets_from_lengths(lengths.astype(np.int64)), first)
        raise DataError(
            f"{path}: column {name!r}, row {row_offset + row}: value {flat[first].item()} of the integer list is not "
            f"exact in float32, as which batches carry list extras (as vectors); expected integers within "
            f"+-2**24 ({_FLOAT32_EXACT_INTEGERS}) in a list extra (carry larger ids one per column, as int64)"
        )


class ChunkConverter:
    """Converts Arrow tables of one file to :class:`RowChunk` s, validating values on the way."""

    def __init__(self, schema: DatasetSchema, extras: Sequence[str], row_key: Optional[str], validate: bool,
                 with_label: bool = True) -> None:
        self._schema = schema
        self._with_label = with_label
        self._extras = list(extras)
        self._row_key = row_key
        self._validate = validate
        self._widths: Dict[str, Tuple[int, str]] = {}  # vector extra -> (width, file it was first read from)

    def columns(self) -> List[str]:
        """The Parquet columns :meth:`convert` reads: every field, the label, the row key, the extras."""
        names = [f.name for f in self._schema.fields] + [self._schema.label] * self._with_label
        if self._row_key:
            names.append(self._row_key)
        return names + [e for e in self._extras if e not in names]

    def convert(self, table: pa.Table, path: str, row_offset: int) -> RowChunk:
        """``table`` (rows ``row_offset``... of ``path``, named in errors) as a :class:`RowChunk` in the schema's
        dtypes (its values checked where the converter validates)."""
        n = table.num_rows
        dense_cols = []
        for spec in self._schema.dense_fields:
            dense_cols.append(dense_column(path, spec, table.column(spec.name).combine_chunks(), row_offset,
                                           self._validate))
        dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), dtype=np.float32)

        ids, offsets = [], []
        for spec in self._schema.categorical_fields:
            values, off = categorical_column(path, spec, table.column(spec.name).combine_chunks(), row_offset)
            ids.append(values)
            offsets.append(off)

        if self._with_label:
            label_array = table.column(self._schema.label).combine_chunks()
            if self._validate:
                check_no_nulls(path, self._schema.label, label_array, row_offset, "0 or 1")
            labels = label_array.to_numpy(zero_copy_only=False)
            if self._validate:
                check_labels(path, self._schema.label, labels, row_offset)
        else:  # rows to score: no label read
            labels = np.full(n, np.nan, dtype=np.float32)

        extras: Dict[str, np.ndarray] = {}
        if self._row_key:
            extras[ROW_ID_EXTRA] = self._extra(table, self._row_key, path, row_offset)
        for name in self._extras:
            extras[name] = self._extra(table, name, path, row_offset)
        return RowChunk(dense, ids, offsets, labels.astype(np.float32, copy=False), extras)

    def _extra(self, table: pa.Table, name: str, path: str, row_offset: int) -> np.ndarray:
        """(N,) int64 / float32 or (N, w) float32 values of an extra column; with ``validate``,
        float values (e.g. an attached ``llm_vector``) must be finite, like dense features."""
        array = table.column(name).combine_chunks()
        check_no_nulls(path, name, array, row_offset, "a value in every row")
        dtype = array.type
        if extra_kind(dtype) == "vector":
            lengths = pc.list_value_length(array).to_numpy()
            width = int(lengths[0]) if lengths.size else 0
            if lengths.size and (lengths != width).any():
                first = int(np.argmax(lengths != width))
                raise DataError(f"{path}: extra column {name!r}, {describe_row(row_offset + first)}: a vector of "
                                f"length {int(lengths[first])}, where row {row_offset} has {width}; expected one size "
                                "in every row")
            flat = pc.list_flatten(array).to_numpy(zero_copy_only=False)
            if flat.dtype.kind in "iu":
                _check_exact_in_float32(path, name, flat, lengths, row_offset)
            values = flat.astype(np.float32, copy=False)
            seen = self._widths.setdefault(name, (width, path)) if lengths.size else (width, path)
            if seen[0] != width:
                # batches would mix (B, w) shapes, or concatenating two row groups would fail unnamed
                raise DataError(f"{path}: extra column {name!r}: rows {row_offset}.. hold vectors of length {width}, "
                                f"but those read before from {seen[1]} hold {seen[0]}; expected one vector size "
                                "in every file of the split")
            values = values.reshape(len(lengths), width)  # (N, w)
            if self._validate:
                check_finite_extra(path, name, values, row_offset)
            return values
        values = array.to_numpy(zero_copy_only=False)
        if values.dtype == np.uint64 and values.size and values.max() > np.iinfo(np.int64).max:
            row = int(np.argmax(values > np.iinfo(np.int64).max))
            raise DataError(f"{path}: extra column {name!r}, row {row_offset + row}: value {values[row]} is above "
                            f"2**63 - 1; expected integers that fit int64 (batches carry them as int64)")
        if values.dtype.kind in "iub":
            return values.astype(np.int64, copy=False)
        if values.dtype.kind == "f":
            values = values.astype(np.float32, copy=False)
            if self._validate:
                check_finite_extra(path, name, values[:, None], row_offset)
            return values
        raise DataError(f"{path}: extra column {name!r} has Arrow type {dtype}; expected numbers or fixed-size float lists")
