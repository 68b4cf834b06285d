"""Parquet I/O: a split writer for ``prepare`` and the streaming, rank-sharded batch reader.

The reader never loads a whole file: it reads one row group (or a slice of one) at a
time, converts it to numpy with vectorised pyarrow/numpy calls, validates it against
the schema (:mod:`recsys_llm.data.validation`) and cuts it into
:class:`~recsys_llm.data.batch.Batch` objects whose size does not depend on the row
group size (leftover rows carry over into the next row group).

**Equal batch counts across ranks.** Under ``DistributedModelParallel`` every rank
runs the same collectives per batch, so a rank that runs out of data early makes the
others hang. The reader therefore computes every rank's row count from the Parquet
footers (no data read) and gives *all* ranks ``min_r(batches_r)`` batches, where
``batches_r = ceil(rows_r / B)`` (``floor`` with ``drop_last``). Rows past that cap on
the larger shards are skipped in that epoch. Because the split's rows (files, then row
groups, in order) are cut into ``world_size`` contiguous ranges whose sizes differ by at
most one row, that is at most one row per rank (plus the partial last batch with
``drop_last``). A rank reads its row groups whole except the (at most two) groups at
the ends of its range, of which it keeps a slice; a split with fewer row groups than
ranks is thus still spread evenly. ``reader.dropped_rows`` says how many rows a rank
skips per epoch. Passes that must see every row (evaluation, teacher outputs) use
``equal_batches=False`` and iterate :meth:`ParquetBatchReader.padded`: every row once, and
ranks with one batch fewer repeat one, marked as padding.
"""

import bisect
import dataclasses
import glob
import hashlib
import json
import os
import queue
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.atomic_dir import atomic_directory
from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.validation import (
    DataError,
    check_dense,
    check_file_schema,
    check_finite_extra,
    check_ids,
    check_labels,
    check_no_null_elements,
    check_no_nulls,
    field_specs_metadata,
    offsets_from_lengths,
    open_parquet,
    read_row_group,
)

ROW_ID_EXTRA = "row_id"


# =================================================================================================
# writing
# =================================================================================================
def arrow_schema_for(schema: DatasetSchema, extra_types: Optional[Dict[str, pa.DataType]] = None) -> pa.Schema:
    """The Arrow schema ``prepare`` writes for a data set (row key, fields, label, extras).

    Types: sparse int64, sequence list<int64>, dense float32, label int8, row key int64.
    The field specs are recorded in the metadata so a reader can detect a schema/data mismatch.
    """
    columns: List[pa.Field] = []
    if schema.row_key:
        columns.append(pa.field(schema.row_key, pa.int64(), nullable=False))
    kind_types = {FieldKind.SPARSE: pa.int64(), FieldKind.SEQUENCE: pa.list_(pa.int64()), FieldKind.DENSE: pa.float32()}
    columns += [pa.field(f.name, kind_types[f.kind]) for f in schema.fields]
    columns.append(pa.field(schema.label, pa.int8()))
    for name, dtype in (extra_types or {}).items():
        columns.append(pa.field(name, dtype))
    return pa.schema(columns, metadata=field_specs_metadata(schema.fields))


def list_array(lengths: np.ndarray, values: np.ndarray) -> pa.Array:
    """A list<int64> Arrow array from per-row ``lengths`` (N,) and flat ``values`` (sum(lengths),)."""
    offsets = np.zeros(len(lengths) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    return pa.ListArray.from_arrays(pa.array(offsets), pa.array(np.asarray(values, dtype=np.int64)))


class SplitWriter:
    """Streams chunks of rows into one Parquet file with fixed-size row groups.

    Args:
        path (str): output file (written to ``path + ".tmp"`` and renamed on ``close``).
        arrow_schema (pa.Schema): see :func:`arrow_schema_for`.
        row_group_size (int): rows per row group.
        compression (str): Parquet codec; lz4 decodes about twice as fast as zstd for
            id columns, which matters when training is fed from Parquet.

    Example::

        with SplitWriter("out/train.parquet", arrow_schema_for(schema), 65536) as writer:
            writer.write({"row_id": ids, "user_id": users, ..., "label": labels})
    """

    def __init__(self, path: str, arrow_schema: pa.Schema, row_group_size: int = 65536, compression: str = "lz4") -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._path = path
        self._tmp = f"{path}.tmp"
        self._schema = arrow_schema
        self._row_group_size = row_group_size
        self._writer = pq.ParquetWriter(self._tmp, arrow_schema, compression=compression)
        self._pending: List[pa.Table] = []
        self._pending_rows = 0
        self.num_rows = 0

    def write(self, columns: Dict[str, Union[np.ndarray, pa.Array]]) -> None:
        """Appends rows given as column name -> array (cast to the writer's Arrow types)."""
        arrays = []
        for field in self._schema:
            if field.name not in columns:
                raise DataError(f"{self._path}: chunk lacks column {field.name!r}; expected {self._schema.names}")
            arrays.append(pa.array(columns[field.name]).cast(field.type) if not isinstance(columns[field.name], pa.Array)
                          else columns[field.name].cast(field.type))
        table = pa.Table.from_arrays(arrays, schema=self._schema)
        self._pending.append(table)
        self._pending_rows += table.num_rows
        self.num_rows += table.num_rows
        if self._pending_rows >= self._row_group_size:
            self._flush(final=False)

    def _flush(self, final: bool) -> None:
        table = pa.concat_tables(self._pending) if self._pending else self._schema.empty_table()
        full = (table.num_rows // self._row_group_size) * self._row_group_size
        cut = table.num_rows if final else full
        if cut:
            self._writer.write_table(table.slice(0, cut), row_group_size=self._row_group_size)
        rest = table.slice(cut)
        self._pending = [rest] if rest.num_rows else []
        self._pending_rows = rest.num_rows

    def close(self) -> None:
        self._flush(final=True)
        self._writer.close()
        os.replace(self._tmp, self._path)

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._writer.close()
            if os.path.exists(self._tmp):
                os.remove(self._tmp)


#: files every directory written by ``prepare`` holds; only such a directory is replaced
PREPARED_MARKER_FILES = ("schema.json", "train.parquet", "valid.parquet", "test.parquet")
PREPARED_KIND = "prepared data set"


def check_inputs_outside(out_dir: str, inputs: Sequence[str]) -> None:
    """Raises if an input lies in ``out_dir`` (or its ``.old`` copy), which the swap would delete."""
    for directory in (out_dir, f"{out_dir}.old"):
        root = os.path.realpath(directory)
        for path in inputs:
            real = os.path.realpath(path)
            if real == root or real.startswith(root + os.sep):
                raise ValueError(
                    f"{out_dir}: the output directory holds the input {path}; writing the data set there would "
                    "delete it; choose another output directory"
                )


def check_split_rows(schema: DatasetSchema, source: str) -> None:
    """Raises unless every split of a just-written data set (``schema.root``) has rows and fits ``schema``.

    Raises:
        DataError: an empty split (naming ``source`` and the split), or a footer mismatch.
    """
    rows = {split: sum(open_parquet(path).metadata.num_rows for path in resolve_paths(schema, split))
            for split in schema.splits}
    for split, count in rows.items():
        if count == 0:
            raise DataError(f"{source}: split {split!r} received no rows of {sum(rows.values())}; "
                            "use more data or other split_fractions")
    for split in schema.splits:
        read_schema_and_check(schema, split)


def write_prepared(
    out_dir: str, source: str, inputs: Sequence[str], write: Callable[[str], DatasetSchema]
) -> DatasetSchema:
    """Writes a data set whole or not at all: ``write(tmp)`` fills a temp directory, which
    replaces ``out_dir`` only after every split has rows and fits the schema.

    A failure (or interrupt) leaves an earlier ``out_dir`` as it was; a non-empty ``out_dir``
    that is not an earlier data set (no :data:`PREPARED_MARKER_FILES`), or one holding an
    input, is refused before ``write`` runs.

    Args:
        out_dir (str): the final directory.
        source (str): the raw data, named in error messages.
        inputs (Sequence[str]): files/directories the conversion reads.
        write (Callable[[str], DatasetSchema]): writes splits, value text etc. into the given
            directory and returns the schema; ``schema.json`` is saved here, after the checks.

    Returns:
        DatasetSchema: the schema, rooted at ``out_dir``.
    """
    out_dir = os.path.realpath(out_dir)  # "out/", "." and a symlinked output name the real directory
    if os.path.ismount(out_dir):
        raise ValueError(
            f"{out_dir}: is a mount point, and a data set is swapped in whole (a failed run keeps the earlier "
            "one), which a mount point cannot be; write it into a directory inside the volume, e.g. "
            f"{os.path.join(out_dir, 'data')}"
        )
    check_inputs_outside(out_dir, inputs)
    with atomic_directory(out_dir, PREPARED_KIND, PREPARED_MARKER_FILES) as tmp:
        schema = write(tmp)
        schema.root = tmp
        check_split_rows(schema, source)
        schema.save(os.path.join(tmp, "schema.json"))
    schema.root = out_dir
    return schema


# =================================================================================================
# reading: columnar chunks
# =================================================================================================
@dataclasses.dataclass
class _Chunk:
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

    def slice(self, start: int, stop: int) -> "_Chunk":
        ids, offsets = [], []
        for values, off in zip(self.ids, self.offsets):
            if off is None:
                ids.append(values[start:stop])
                offsets.append(None)
            else:
                ids.append(values[off[start] : off[stop]])
                offsets.append(off[start : stop + 1] - off[start])
        return _Chunk(
            self.dense[start:stop], ids, offsets, self.labels[start:stop], {k: v[start:stop] for k, v in self.extras.items()}
        )

    def take(self, rows: np.ndarray) -> "_Chunk":
        ids, offsets = [], []
        for values, off in zip(self.ids, self.offsets):
            if off is None:
                ids.append(values[rows])
                offsets.append(None)
                continue
            lengths = (off[1:] - off[:-1])[rows]
            new_off = offsets_from_lengths(lengths)
            # position of every kept id in the old values: old row start + rank within its row
            gather = np.arange(new_off[-1], dtype=np.int64) - np.repeat(new_off[:-1] - off[rows], lengths)
            ids.append(values[gather])
            offsets.append(new_off)
        return _Chunk(self.dense[rows], ids, offsets, self.labels[rows], {k: v[rows] for k, v in self.extras.items()})

    @staticmethod
    def concat(chunks: List["_Chunk"]) -> "_Chunk":
        if len(chunks) == 1:
            return chunks[0]
        ids, offsets = [], []
        for k, first in enumerate(chunks[0].offsets):
            ids.append(np.concatenate([c.ids[k] for c in chunks]))
            if first is None:
                offsets.append(None)
            else:
                offsets.append(offsets_from_lengths(np.concatenate([np.diff(c.offsets[k]) for c in chunks])))
        return _Chunk(
            np.concatenate([c.dense for c in chunks]),
            ids,
            offsets,
            np.concatenate([c.labels for c in chunks]),
            {k: np.concatenate([c.extras[k] for c in chunks]) for k in chunks[0].extras},
        )

    def to_batch(self, keys: List[str]) -> Batch:
        n = self.num_rows
        lengths = [np.ones(n, dtype=np.int32) if off is None else np.diff(off).astype(np.int32) for off in self.offsets]
        values = np.concatenate(self.ids) if self.ids else np.zeros(0, dtype=np.int64)
        kjt = KeyedJaggedTensor(
            keys=keys,
            values=torch.from_numpy(_writable(values, np.int64)),
            lengths=torch.from_numpy(np.concatenate(lengths) if lengths else np.zeros(0, dtype=np.int32)),
            stride=n,
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


# =================================================================================================
# reading: conversion of one Arrow table (row group slice) to a chunk
# =================================================================================================
def sequence_ids(array: pa.Array, spec: FieldSpec) -> Tuple[np.ndarray, np.ndarray]:
    """Flat ids and (N + 1,) offsets of a list column, null lists as empty, truncated to max_length."""
    lengths = pc.fill_null(pc.list_value_length(array), 0).to_numpy().astype(np.int64)
    values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
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
    values = array.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
    if validate:
        check_dense(path, spec.name, values, row_offset)
    return values


def categorical_column(
    path: str, spec: FieldSpec, array: pa.Array, row_offset: int, validate: bool = True
) -> Tuple[np.ndarray, Optional[np.ndarray]]:
    """Ids of a sparse or sequence column, checked (``check_ids``, folded if hashed).

    A null inside a sequence's list is refused even without ``validate`` (it has no id, and
    the check reads only the null count).

    Returns:
        Tuple: flat int64 ids and, for a sequence, its (N + 1,) offsets (None for a sparse field).
    """
    what = f"an id in [0, {spec.cardinality})"
    if spec.kind == FieldKind.SPARSE:
        if validate:
            check_no_nulls(path, spec.name, array, row_offset, what)
        values = array.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
        return check_ids(path, spec, values, None, row_offset), None
    check_no_null_elements(path, spec.name, array, row_offset, what)
    values, offsets = sequence_ids(array, spec)
    return check_ids(path, spec, values, offsets, row_offset), offsets


class _Converter:
    """Converts Arrow tables of one file to :class:`_Chunk` s, validating values on the way."""

    def __init__(self, schema: DatasetSchema, extras: Sequence[str], row_key: Optional[str], validate: bool) -> None:
        self._schema = schema
        self._extras = list(extras)
        self._row_key = row_key
        self._validate = validate

    def columns(self) -> List[str]:
        names = [f.name for f in self._schema.fields] + [self._schema.label]
        if self._row_key:
            names.append(self._row_key)
        return names + [e for e in self._extras if e not in names]

    def convert(self, table: pa.Table, path: str, row_offset: int) -> _Chunk:
        n = table.num_rows
        dense_cols = []
        for spec in self._schema.dense_fields:
            dense_cols.append(dense_column(path, spec, table.column(spec.name).combine_chunks(), row_offset,
                                           self._validate))
        dense = np.stack(dense_cols, axis=1) if dense_cols else np.zeros((n, 0), dtype=np.float32)

        ids, offsets = [], []
        for spec in self._schema.categorical_fields:
            values, off = categorical_column(path, spec, table.column(spec.name).combine_chunks(), row_offset,
                                             self._validate)
            ids.append(values)
            offsets.append(off)

        label_array = table.column(self._schema.label).combine_chunks()
        if self._validate:
            check_no_nulls(path, self._schema.label, label_array, row_offset, "0 or 1")
        labels = label_array.to_numpy(zero_copy_only=False)
        if self._validate:
            check_labels(path, self._schema.label, labels, row_offset)

        extras: Dict[str, np.ndarray] = {}
        if self._row_key:
            extras[ROW_ID_EXTRA] = self._extra(table, self._row_key, path, row_offset)
        for name in self._extras:
            extras[name] = self._extra(table, name, path, row_offset)
        return _Chunk(dense, ids, offsets, labels.astype(np.float32, copy=False), extras)

    def _extra(self, table: pa.Table, name: str, path: str, row_offset: int) -> np.ndarray:
        """(N,) int64 / float32 or (N, w) float32 values of an extra column; with ``validate``,
        float values (e.g. an attached ``llm_vector``) must be finite, like dense features."""
        array = table.column(name).combine_chunks()
        check_no_nulls(path, name, array, row_offset, "a value in every row")
        dtype = array.type
        if pa.types.is_fixed_size_list(dtype) or pa.types.is_list(dtype) or pa.types.is_large_list(dtype):
            lengths = pc.list_value_length(array).to_numpy()
            width = int(lengths[0]) if lengths.size else 0
            if lengths.size and (lengths != width).any():
                raise DataError(f"{path}: extra column {name!r}: rows have different vector lengths; expected a fixed size")
            values = pc.list_flatten(array).to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            values = values.reshape(-1, width)  # (N, w)
            if self._validate:
                check_finite_extra(path, name, values, row_offset)
            return values
        values = array.to_numpy(zero_copy_only=False)
        if values.dtype.kind in "iub":
            return values.astype(np.int64, copy=False)
        if values.dtype.kind == "f":
            values = values.astype(np.float32, copy=False)
            if self._validate:
                check_finite_extra(path, name, values[:, None], row_offset)
            return values
        raise DataError(f"{path}: extra column {name!r} has Arrow type {dtype}; expected numbers or fixed-size float lists")


# =================================================================================================
# reading: planning and sharding
# =================================================================================================
@dataclasses.dataclass(frozen=True)
class _Unit:
    """A contiguous row range ``[start, stop)`` of one row group of one file."""

    file: int
    row_group: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def parquet_files(path: str) -> List[str]:
    """A Parquet file, or the sorted ``*.parquet`` files directly in a directory (what a
    split directory holds; other files, such as ``*.tmp`` leftovers, are not data).

    Raises:
        DataError: no such file or directory, or a directory without ``*.parquet`` files.
    """
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.parquet")))
        if not found:
            raise DataError(f"{path}: directory holds no *.parquet files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: no such Parquet file or directory")
    return [path]


def resolve_paths(schema: DatasetSchema, split_or_paths: Union[str, Sequence[str]]) -> List[str]:
    """Split name, file, directory of ``*.parquet`` or list of those -> sorted list of files."""
    items = [split_or_paths] if isinstance(split_or_paths, str) else list(split_or_paths)
    paths: List[str] = []
    for item in items:
        if isinstance(item, str) and item in schema.splits:
            item = schema.split_path(item)
        if not os.path.exists(item):
            raise DataError(
                f"{item}: no such Parquet file or directory (and not a split of schema {schema.name!r}: {sorted(schema.splits)})"
            )
        paths += parquet_files(item)
    return paths


def split_fingerprint(schema: DatasetSchema, split: str) -> str:
    """A hash of the Parquet footers of ``split``'s files (row counts, row groups, sizes, column
    statistics), read without any row data: the same for a copy or an identical re-preparation
    of the data, different for other rows (new data behind the same fields and sizes)."""
    digest = hashlib.sha256()
    root = schema.split_path(split)
    for path in resolve_paths(schema, split):
        metadata = pq.ParquetFile(path).metadata.to_dict()
        digest.update(os.path.relpath(path, root).encode())
        digest.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def read_schema_and_check(schema: DatasetSchema, path: str, extras: Sequence[str] = ()) -> int:
    """Cheap footer-only check of a split, file or directory against ``schema``.

    Checks that every file opens, is not empty, has the schema's columns with the right
    Arrow types and was written for the same field specs; reads no row data.

    Returns:
        int: total number of rows.

    Raises:
        DataError: naming the file and column.
    """
    total = 0
    for file_path in resolve_paths(schema, path):
        handle = open_parquet(file_path)
        check_file_schema(file_path, schema, handle.schema_arrow, handle.metadata.num_rows, extras)
        total += handle.metadata.num_rows
    return total


def _balanced_ranges(units: List[_Unit], world_size: int) -> List[List[_Unit]]:
    """Cuts the split's rows (files and row groups in order) into ``world_size`` contiguous
    ranges of ``N // world_size`` or ``N // world_size + 1`` rows; returns each rank's pieces.

    A rank reads whole row groups except at most two at its range's ends, which it
    shares with its neighbours (each decodes that group and keeps its own slice).
    """
    total = sum(u.rows for u in units)
    bounds = [total * r // world_size for r in range(world_size + 1)]
    shards: List[List[_Unit]] = [[] for _ in range(world_size)]
    start = 0  # global index of the unit's first row
    for unit in units:
        stop = start + unit.rows
        first = bisect.bisect_right(bounds, start) - 1
        for rank in range(max(first, 0), world_size):
            lo, hi = max(start, bounds[rank]), min(stop, bounds[rank + 1])
            if lo >= stop:
                break
            if lo < hi:
                shards[rank].append(_Unit(unit.file, unit.row_group, unit.start + lo - start, unit.start + hi - start))
        start = stop
    return shards


# =================================================================================================
# the reader
# =================================================================================================
class ParquetBatchReader(torch.utils.data.IterableDataset):
    """Streams :class:`~recsys_llm.data.batch.Batch` es from Parquet, sharded by rank.

    Every rank yields exactly ``len(reader)`` batches (see the module docstring for the cap
    that guarantees it); with ``equal_batches=False``, every row of its range instead, and
    :meth:`padded` keeps the ranks in step. A batch holds::

        dense_features   (B, Dd) float32, dense fields in schema order
        sparse_features  KeyedJaggedTensor, keys = schema.sparse_feature_names; sparse fields
                         have length-1 bags, sequences variable lengths (<= max_length)
        labels           (B,) float32
        extras           "row_id" (B,) int64 when the files have the schema's row key, and
                         each requested extra column: scalars (B,), fixed-size lists (B, d)

    Args:
        schema (DatasetSchema): fields, label and row key.
        split_or_paths (str | Sequence[str]): a split name of the schema, a Parquet file,
            a directory of ``*.parquet`` files, or a list of files/directories.
        batch_size (int): rows per batch (independent of the row group size).
        rank (int): this process's rank.
        world_size (int): number of ranks sharing the data.
        extras (Sequence[str]): extra columns to carry in ``batch.extras``.
        shuffle (bool): shuffle row-group order and rows within a buffer, seeded by
            ``(seed, epoch, rank)``; call :meth:`set_epoch` every epoch.
        seed (int): shuffle seed.
        drop_last (bool): drop the last partial batch (on all ranks alike).
        validate (bool): run the value checks of :mod:`recsys_llm.data.validation` on every
            row group (NaN/inf, id ranges, labels). Footer checks always run.
        prefetch (int): batches prepared ahead by a background thread (0: none).
        pin_memory (bool): page-locked batches (CUDA only; pinned in the prefetch thread), so
            the training pipeline's ``non_blocking`` host-to-GPU copies overlap with compute.
        shuffle_buffer_rows (Optional[int]): rows mixed together when shuffling
            (default ``max(8 * batch_size, 65536)``).
        transform (Optional[Callable[[Batch, int, int], Batch]]): ``transform(batch, epoch,
            index)`` for every batch, run in the prefetch thread before pinning (e.g.
            :class:`~recsys_llm.data.pair_swap.SwappedPairs`, which appends swapped rows), so
            the batch the trainer copies is the one that is pinned.
        equal_batches (bool): cap every rank at the smallest rank's batch count (default).
            ``False``: every row of this rank's range, so batch counts may differ by one
            across ranks; iterate :meth:`padded` to keep the ranks in step.

    Example::

        schema = DatasetSchema.load("data/synthetic")
        reader = ParquetBatchReader(schema, "train", 4096, rank=rank, world_size=world)
        for epoch in range(3):
            reader.set_epoch(epoch)
            for batch in reader:
                ...
    """

    def __init__(
        self,
        schema: DatasetSchema,
        split_or_paths: Union[str, Sequence[str]],
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        extras: Sequence[str] = (),
        shuffle: bool = False,
        seed: int = 0,
        drop_last: bool = False,
        validate: bool = True,
        prefetch: int = 2,
        shuffle_buffer_rows: Optional[int] = None,
        pin_memory: bool = False,
        transform: Optional[Callable[[Batch, int, int], Batch]] = None,
        equal_batches: bool = True,
    ) -> None:
        super().__init__()
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (page-locked memory speeds up copies to a GPU); none is visible")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        self._schema = schema
        self._extras = list(extras)
        self._transform = transform
        self._equal_batches = equal_batches
        self._batch_size = batch_size
        self._rank = rank
        self._world_size = world_size
        self._shuffle = shuffle
        self._seed = seed
        self._drop_last = drop_last
        self._prefetch = prefetch
        self._pin_memory = pin_memory
        self._buffer_rows = shuffle_buffer_rows or max(8 * batch_size, 65536)
        self._epoch = 0
        self._keys = schema.sparse_feature_names
        self._paths = resolve_paths(schema, split_or_paths)

        units: List[_Unit] = []
        self._group_starts: List[np.ndarray] = []  # per file: (num_row_groups + 1,) first row of each group
        row_key_present = None
        for index, path in enumerate(self._paths):
            handle = open_parquet(path)
            check_file_schema(path, schema, handle.schema_arrow, handle.metadata.num_rows, extras)
            has_key = bool(schema.row_key) and schema.row_key in handle.schema_arrow.names
            if row_key_present is None:
                row_key_present = has_key
            elif has_key != row_key_present:
                raise DataError(
                    f"{path}: schema/data mismatch: row key column {schema.row_key!r} is "
                    f"{'present' if has_key else 'absent'} here but not in {self._paths[0]}"
                )
            meta = handle.metadata
            self._group_starts.append(offsets_from_lengths(np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)])))
            units += [_Unit(index, g, 0, meta.row_group(g).num_rows) for g in range(meta.num_row_groups)]
        shards = _balanced_ranges([u for u in units if u.rows], world_size)
        self._units = shards[rank]
        self._rank_rows = [sum(u.rows for u in shard) for shard in shards]
        self._batches_per_rank = [(rows // batch_size if drop_last else -(-rows // batch_size)) for rows in self._rank_rows]
        self._num_batches = min(self._batches_per_rank) if equal_batches else self._batches_per_rank[rank]
        self._converter = _Converter(schema, extras, schema.row_key if row_key_present else None, validate)

    # ---- sizes ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        """Batches of this rank (the same on every rank unless ``equal_batches=False``)."""
        return self._num_batches

    @property
    def rows_per_rank(self) -> List[int]:
        """Rows assigned to each rank before the equal-batch-count cap."""
        return list(self._rank_rows)

    @property
    def batches_per_rank(self) -> List[int]:
        """Batches each rank's rows make before the equal-batch-count cap."""
        return list(self._batches_per_rank)

    @property
    def padded_len(self) -> int:
        """Steps of :meth:`padded` (the same on every rank)."""
        return self._num_batches if self._equal_batches else max(self._batches_per_rank)

    def padded(self) -> Iterator[Tuple[Batch, bool]]:
        """``(batch, real)``: this rank's batches, then repeats of its last one with
        ``real=False`` until it has run :attr:`padded_len` steps, so that every rank runs
        DMP's per-step collectives equally often. A rank whose range is empty repeats the
        split's first row. Skip the outputs of ``real=False`` batches."""
        last: Optional[Batch] = None
        for last in self:
            yield last, True
        for _ in range(self.padded_len - self._num_batches):
            if last is None:
                first = ParquetBatchReader(self._schema, self._paths, 1, extras=self._extras, prefetch=0,
                                           transform=self._transform)
                last = next(iter(first))
            yield last, False

    @property
    def dropped_rows(self) -> int:
        """Rows of this rank skipped per epoch by the equal-batch-count cap (and ``drop_last``)."""
        used = min(self._rank_rows[self._rank], self._num_batches * self._batch_size)
        return self._rank_rows[self._rank] - used

    @property
    def paths(self) -> List[str]:
        return list(self._paths)

    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch that seeds the shuffle (call before iterating each epoch)."""
        self._epoch = epoch

    # ---- iteration -----------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        worker = torch.utils.data.get_worker_info()
        if worker is not None and worker.num_workers > 1:
            raise ValueError(
                "ParquetBatchReader shards by rank itself and must not be split over DataLoader workers "
                "(use num_workers <= 1 and batch_size=None, or its prefetch thread)"
            )
        batches = self._batches()
        if self._transform is not None:
            transform, epoch = self._transform, self._epoch
            batches = (transform(batch, epoch, index) for index, batch in enumerate(batches))
        if self._pin_memory:
            batches = (batch.pin_memory() for batch in batches)
        if self._prefetch > 0:
            return _prefetched(batches, self._prefetch)
        return batches

    def _chunks(self, rng: Optional[np.random.Generator]) -> Iterator[_Chunk]:
        units = list(self._units)
        if rng is not None:
            units = [units[i] for i in rng.permutation(len(units))]
        handles: Dict[int, pq.ParquetFile] = {}
        columns = self._converter.columns()
        for unit in units:
            path = self._paths[unit.file]
            if unit.file not in handles:
                handles = {unit.file: open_parquet(path)}  # keep one file open at a time
            handle = handles[unit.file]
            table = read_row_group(handle, path, unit.row_group, columns)
            if unit.start or unit.stop < table.num_rows:
                table = table.slice(unit.start, unit.rows)
            row_offset = int(self._group_starts[unit.file][unit.row_group]) + unit.start
            yield self._converter.convert(table, path, row_offset)

    def _mixed(self, rng: Optional[np.random.Generator]) -> Iterator[_Chunk]:
        """Chunks in order, or (shuffling) buffers of ~shuffle_buffer_rows rows in random order."""
        if rng is None:
            yield from self._chunks(None)
            return
        buffer: List[_Chunk] = []
        rows = 0
        for chunk in self._chunks(rng):
            buffer.append(chunk)
            rows += chunk.num_rows
            if rows >= self._buffer_rows:
                merged = _Chunk.concat(buffer)
                yield merged.take(rng.permutation(merged.num_rows))
                buffer, rows = [], 0
        if buffer:
            merged = _Chunk.concat(buffer)
            yield merged.take(rng.permutation(merged.num_rows))

    def _batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng([self._seed, self._epoch, self._rank]) if self._shuffle else None
        size = self._batch_size
        emitted = 0
        pending: List[_Chunk] = []
        pending_rows = 0
        if self._num_batches == 0:
            return
        for chunk in self._mixed(rng):
            pending.append(chunk)
            pending_rows += chunk.num_rows
            if pending_rows < size:
                continue
            merged = _Chunk.concat(pending)
            start = 0
            while merged.num_rows - start >= size:
                yield merged.slice(start, start + size).to_batch(self._keys)
                start += size
                emitted += 1
                if emitted == self._num_batches:
                    return
            rest = merged.slice(start, merged.num_rows)
            pending, pending_rows = ([rest], rest.num_rows) if rest.num_rows else ([], 0)
        if pending_rows and not self._drop_last and emitted < self._num_batches:
            yield _Chunk.concat(pending).to_batch(self._keys)


# =================================================================================================
# background prefetch
# =================================================================================================
_END = object()


class _Failure:
    def __init__(self, error: BaseException) -> None:
        self.error = error


def _prefetched(source: Iterator[Batch], depth: int) -> Iterator[Batch]:
    """Runs ``source`` in a daemon thread, ``depth`` items ahead; errors re-raise in the consumer.

    pyarrow decoding and most numpy work release the GIL, so reading overlaps training.
    """
    items: "queue.Queue[object]" = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                items.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def work() -> None:
        try:
            for batch in source:
                if not put(batch):
                    return
            put(_END)
        except BaseException as error:  # re-raised in the consumer thread
            put(_Failure(error))

    thread = threading.Thread(target=work, name="parquet-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = items.get()
            if item is _END:
                return
            if isinstance(item, _Failure):
                raise item.error
            yield item  # type: ignore[misc]
    finally:
        stop.set()
        thread.join(timeout=5.0)
