"""The streaming, rank-sharded Parquet batch reader.

(The writing side is :mod:`recsys_llm.data.parquet_writer`; a row group's conversion to numpy,
:mod:`recsys_llm.data.row_chunks`; a split's files, found and checked from their footers,
:mod:`recsys_llm.data.parquet_files`.)

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
import queue
import threading
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from recsys_llm.data.batch import Batch
from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.row_chunks import ROW_ID_EXTRA, ChunkConverter, RowChunk, extra_kind
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.seeding import seed_entropy
from recsys_llm.data.validation import (
    DataError, check_file_schema, check_split_has_rows, offsets_from_lengths, open_parquet, read_row_group
)


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


def _check_extra_kinds(
    path: str, arrow_schema: pa.Schema, extras: Sequence[str], seen: Dict[str, Tuple[str, str, pa.DataType]]
) -> None:
    """Raises if an extra column is of no kind a batch carries (strings), or of another kind (integer, float,
    vector) in ``path`` than in the files before it (recorded in ``seen``): its batches would change dtype (int64 / float32, or
    float64 where a batch mixes rows of both files), or holds fixed-size vectors of another length. Widening
    within a kind (int32, int64) is fine."""
    for name in extras:
        dtype = arrow_schema.field(name).type
        if extra_kind(dtype) == "other":  # the footer says it: refused here, not at the first batch (after sharding)
            raise DataError(f"{path}: extra column {name!r} has Arrow type {dtype}; expected numbers or fixed-size "
                            "float lists")
        kind, first, first_type = seen.setdefault(name, (extra_kind(dtype), path, dtype))
        if extra_kind(dtype) != kind:
            raise DataError(
                f"{path}: extra column {name!r} has Arrow type {dtype} ({extra_kind(dtype)}), but {first} has "
                f"{first_type} ({kind}); expected one kind in every file of the split (batches carry integers "
                "as int64, floats as float32)"
            )
        if pa.types.is_fixed_size_list(dtype) and pa.types.is_fixed_size_list(first_type) \
                and dtype.list_size != first_type.list_size:  # else only the ranks reading this file would fail
            raise DataError(
                f"{path}: extra column {name!r} holds vectors of length {dtype.list_size}, but {first} holds "
                f"{first_type.list_size}; expected one vector size in every file of the split"
            )


def default_shuffle_buffer_rows(batch_size: int) -> int:
    """Rows a shuffling reader of ``batch_size``-row batches mixes at once unless told otherwise:
    ``max(8 * batch_size, 65536)``, so above 8,192 rows a batch size also sets the epoch's row order."""
    return max(8 * batch_size, 65536)


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
        extras (Sequence[str]): extra columns to carry in ``batch.extras``: integers as int64,
            floats as float32, lists as float32 vectors (integer lists: values within +-2**24, exact
            in float32); of one kind in every file.
        shuffle (bool): shuffle row-group order and rows within a buffer, seeded by
            ``(seed, epoch, rank)``; call :meth:`set_epoch` every epoch.
        seed (int): shuffle seed, any integer (like ``train.seed``, which may be negative).
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
        labels (bool): read the label column (default). ``False``: rows to score (``recsys-llm score``), whose
            files need no label column; ``batch.labels`` is NaN.

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
        *,
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
        labels: bool = True,
    ) -> None:
        super().__init__()
        if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if pin_memory and not torch.cuda.is_available():
            raise ValueError("pin_memory=True needs CUDA (page-locked memory speeds up copies to a GPU); none is visible")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0 (batches prepared ahead; 0: none), got {prefetch}")
        if shuffle_buffer_rows is not None and shuffle_buffer_rows <= 0:
            raise ValueError(f"shuffle_buffer_rows must be > 0 (rows mixed together; None: the default), got "
                             f"{shuffle_buffer_rows}")
        if isinstance(extras, (str, bytes)):  # list('ts') would read columns 't' and 's'
            raise TypeError(f"extras={extras!r}: expected a list of column names; pass [{extras!r}] for one column")
        self._schema = schema
        self._extras = list(extras)
        self._labels = labels
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
        self._buffer_rows = shuffle_buffer_rows or default_shuffle_buffer_rows(batch_size)
        self._epoch = 0
        self._keys = schema.sparse_feature_names
        self._paths = resolve_paths(schema, split_or_paths)

        units: List[_Unit] = []
        self._group_starts: List[np.ndarray] = []  # per file: (num_row_groups + 1,) first row of each group
        row_key_present = None
        extra_kinds: Dict[str, Tuple[str, str, pa.DataType]] = {}  # extra -> (kind, first file, its type)
        for index, path in enumerate(self._paths):
            handle = open_parquet(path)
            check_file_schema(path, schema, handle.schema_arrow, extras, with_label=labels)
            _check_extra_kinds(path, handle.schema_arrow, self._extras, extra_kinds)
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
        if row_key_present and schema.row_key != ROW_ID_EXTRA and ROW_ID_EXTRA in self._extras:
            raise ValueError(
                f"{self._paths[0]}: extra column {ROW_ID_EXTRA!r} would replace the row keys (column "
                f"{schema.row_key!r}) that batches carry as extras[{ROW_ID_EXTRA!r}]; expected extras other than "
                f"{ROW_ID_EXTRA!r} (rename that column)"
            )
        check_split_has_rows(self._paths, sum(unit.rows for unit in units))
        shards = _balanced_ranges([u for u in units if u.rows], world_size)
        self._units = shards[rank]
        self._rank_rows = [sum(u.rows for u in shard) for shard in shards]
        self._batches_per_rank = [(rows // batch_size if drop_last else -(-rows // batch_size)) for rows in self._rank_rows]
        self._num_batches = min(self._batches_per_rank) if equal_batches else self._batches_per_rank[rank]
        self._converter = ChunkConverter(schema, extras, schema.row_key if row_key_present else None, validate,
                                         with_label=labels)

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

    def batches_with(self, world_size: int, batch_size: int) -> int:
        """``len()`` of an equal-batch reader of this split on ``world_size`` ranks with ``batch_size``-row
        batches (and this reader's ``drop_last``): the steps an epoch takes in a job of that shape."""
        smallest = sum(self._rank_rows) // world_size  # the ranks' shares differ by a row at most
        return smallest // batch_size if self._drop_last else -(-smallest // batch_size)

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
                                           transform=self._transform, labels=self._labels)
                last = next(iter(first))
            yield last, False

    @property
    def dropped_rows(self) -> int:
        """Rows of this rank skipped per epoch by the equal-batch-count cap (and ``drop_last``)."""
        used = min(self._rank_rows[self._rank], self._num_batches * self._batch_size)
        return self._rank_rows[self._rank] - used

    @property
    def shuffle_buffer_rows(self) -> int:
        """Rows mixed together when shuffling (read and permuted at once, then served batch by batch)."""
        return self._buffer_rows

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

    def _chunks(self, rng: Optional[np.random.Generator]) -> Iterator[RowChunk]:
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

    def _mixed(self, rng: Optional[np.random.Generator]) -> Iterator[RowChunk]:
        """Chunks in order, or (shuffling) buffers of ~shuffle_buffer_rows rows in random order."""
        if rng is None:
            yield from self._chunks(None)
            return
        buffer: List[RowChunk] = []
        rows = 0
        for chunk in self._chunks(rng):
            buffer.append(chunk)
            rows += chunk.num_rows
            if rows >= self._buffer_rows:
                merged = RowChunk.concat(buffer)
                yield merged.take(rng.permutation(merged.num_rows))
                buffer, rows = [], 0
        if buffer:
            merged = RowChunk.concat(buffer)
            yield merged.take(rng.permutation(merged.num_rows))

    def _batches(self) -> Iterator[Batch]:
        rng = np.random.default_rng([seed_entropy(self._seed), self._epoch, self._rank]) if self._shuffle else None
        size = self._batch_size
        emitted = 0
        pending: List[RowChunk] = []
        pending_rows = 0
        if self._num_batches == 0:
            return
        for chunk in self._mixed(rng):
            pending.append(chunk)
            pending_rows += chunk.num_rows
            if pending_rows < size:
                continue
            merged = RowChunk.concat(pending)
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
            yield RowChunk.concat(pending).to_batch(self._keys)


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
