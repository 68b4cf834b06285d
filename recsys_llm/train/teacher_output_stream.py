"""The teacher's outputs on their way into a copy of a split: each rank's a batch a step
(:func:`predict_steps`), sent to rank 0 (:func:`send_step` / :func:`receive_step`), which writes its own into
the copy as they come and spills the other ranks' beside it (:class:`OutputSpill`, an Arrow IPC stream) until
the copy reaches their rows (:func:`write_on_rank_0`, :class:`TeacherColumnsWriter`)."""

import contextlib
import errno
import os
import re
from typing import Callable, Iterable, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from recsys_llm.atomic_dir import fsync_file, name_written_file
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_writer import vector_array
from recsys_llm.data.row_chunks import ROW_ID_EXTRA
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.progress import bar_options

LOGITS_COLUMN = "teacher_logits"
REPRESENTATION_COLUMN = "teacher_representation"

# (logits (n,), representations (n, H), row keys (n,) or None) of n rows
Outputs = Tuple[np.ndarray, np.ndarray, Optional[np.ndarray]]

# each step's outputs on one rank, and whether they are real (a rank with a batch fewer repeats one as padding)
Step = Tuple[Outputs, bool]


@torch.no_grad()
def predict_steps(
    teacher: nn.Module,
    schema: DatasetSchema,
    path: str,
    extras: Sequence[str],
    batch_size: int,
    progress: bool,
    device: torch.device = torch.device("cpu"),
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[Step]:
    """This rank's teacher outputs for its contiguous range of the file's rows, in file order, a batch a step.

    Collective when ``world_size > 1``: every rank runs the (sharded) teacher the same number of steps; a
    rank with one batch fewer repeats one, marked as padding (``ParquetBatchReader.padded``).

    Yields:
        Step: ``((logits (B,) float32, representations (B, H) float32, row keys (B,) int64 or None), real)``.
    """
    reader = ParquetBatchReader(schema, path, batch_size, rank=rank, world_size=world_size, extras=extras,
                                shuffle=False, prefetch=2, equal_batches=False, pin_memory=device.type == "cuda")
    label = os.path.basename(path) + (f": rank {rank}'s share" if world_size > 1 else "")
    for batch, real in tqdm(reader.padded(), total=reader.padded_len, desc=label, unit="batch", disable=not progress,
                            **bar_options()):
        output = teacher.predict(batch.to(device, non_blocking=True))
        keys = batch.extras[ROW_ID_EXTRA].numpy().astype(np.int64, copy=False) if ROW_ID_EXTRA in batch.extras else None
        yield (output.logits.float().cpu().numpy(), output.representation.float().cpu().numpy(), keys), real


def send_step(step: Step, group: Optional[dist.ProcessGroup]) -> None:
    """Sends one step's outputs to rank 0 (:func:`receive_step`) over ``group``: a header
    ``[n, H, has keys, real]``, then the arrays (none for padding)."""
    (logits, representations, keys), real = step
    header = torch.tensor([len(logits), representations.shape[1], int(keys is not None), int(real)], dtype=torch.int64)
    dist.send(header, dst=0, group=group)
    if real:
        dist.send(torch.from_numpy(np.ascontiguousarray(logits, dtype=np.float32)), dst=0, group=group)
        dist.send(torch.from_numpy(np.ascontiguousarray(representations, dtype=np.float32)), dst=0, group=group)
        if keys is not None:
            dist.send(torch.from_numpy(np.ascontiguousarray(keys, dtype=np.int64)), dst=0, group=group)


def receive_step(source_rank: int, group: Optional[dist.ProcessGroup]) -> Optional[Outputs]:
    """Rank 0's side of :func:`send_step`: the outputs of ``source_rank``'s step, None for padding."""
    header = torch.zeros(4, dtype=torch.int64)
    dist.recv(header, src=source_rank, group=group)
    rows, width, has_keys, real = (int(v) for v in header)
    if not real:
        return None
    logits, representations = torch.zeros(rows, dtype=torch.float32), torch.zeros(rows, width, dtype=torch.float32)
    keys = torch.zeros(rows, dtype=torch.int64) if has_keys else None
    for tensor in (logits, representations) + ((keys,) if keys is not None else ()):
        dist.recv(tensor, src=source_rank, group=group)
    return logits.numpy(), representations.numpy(), keys.numpy() if keys is not None else None


class OutputSpill:
    """Another rank's outputs, kept on rank 0's disk beside the copy until the copy reaches that rank's
    rows (they come after rank 0's own, which the teacher computes at the same time): an Arrow IPC stream
    at ``path``, written and read back a batch at a time, so rank 0 holds one batch of them, not the file's.
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._sink: Optional[pa.NativeFile] = None
        self._writer: Optional[pa.ipc.RecordBatchStreamWriter] = None

    def append(self, outputs: Outputs) -> None:
        """Adds ``outputs``: logits (n,), representations (n, H), row keys (n,) or None."""
        logits, representations, keys = outputs
        batch = pa.record_batch({
            "logits": pa.array(logits, pa.float32()),
            "representations": vector_array(representations),
            "keys": pa.nulls(len(logits), pa.int64()) if keys is None else pa.array(keys, pa.int64()),
        })
        if self._writer is None:
            self._sink = pa.OSFile(self.path, "wb")
            self._writer = pa.ipc.new_stream(self._sink, batch.schema)
        self._writer.write_batch(batch)

    def outputs(self) -> Iterator[Outputs]:
        """The outputs appended, in order, a batch at a time (the spill is closed for writing first)."""
        self._close()
        if not os.path.exists(self.path):
            return
        with pa.OSFile(self.path, "rb") as source, pa.ipc.open_stream(source) as reader:
            for batch in reader:
                width = batch.schema.field("representations").type.list_size
                representations = batch.column("representations").flatten().to_numpy().reshape(-1, width)
                keys = batch.column("keys")
                yield (batch.column("logits").to_numpy(), representations,
                       None if keys.null_count else keys.to_numpy())

    def remove(self) -> None:
        """Closes and deletes the spill file."""
        self._close()
        with contextlib.suppress(FileNotFoundError):
            os.remove(self.path)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._sink.close()
            self._writer = self._sink = None


_SPILL_SUFFIX = r"\.rank\d+\.tmp"  # what a spill's name adds to its copy's (a pattern)


def spill_path(target: str, rank: int) -> str:
    """Where rank 0 keeps ``rank``'s outputs for the copy ``target`` until it writes them (``_SPILL_SUFFIX``)."""
    return f"{target}.rank{rank}.tmp"


class TeacherColumnsWriter:
    """Writes a copy of ``source`` with the two teacher columns appended (in place of an earlier
    teacher's that it holds), row group by row group, as the outputs arrive in file order (atomic:
    ``target`` appears at :meth:`finish`).

    A row group is written as soon as its outputs are all there, so besides the outputs it
    is given, the writer holds one row group of the source. Row keys, when given, must
    equal the source's ``row_key`` column (the reader's order is the file's).

    Args:
        source (str): the split file.
        target (str): the copy.
        row_key (Optional[str]): the schema's row key column, checked against the outputs' keys.
    """

    def __init__(self, source: str, target: str, row_key: Optional[str]) -> None:
        self._source, self._target, self._row_key = source, target, row_key
        self._handle = pq.ParquetFile(source)
        self._rows = self._handle.metadata.num_rows
        self._tmp = f"{target}.tmp"
        self._writer: Optional[pq.ParquetWriter] = None
        self._next_group = 0
        self._received = 0
        self._pending: List[Outputs] = []
        self._pending_rows = 0
        self._width = 0

    @property
    def rows_to_come(self) -> int:
        """Rows of the source whose outputs were not given yet."""
        return self._rows - self._received

    @property
    def pending_rows(self) -> int:
        """Outputs given but not yet written (less than the next row group's rows)."""
        return self._pending_rows

    def add(self, logits: np.ndarray, representations: np.ndarray, keys: Optional[np.ndarray] = None) -> None:
        """Takes the next ``n`` outputs: logits (n,), representations (n, H), row keys (n,) or None.

        Raises:
            ValueError: more outputs than the source has rows, or row keys out of the file's order.
        """
        self._received += len(logits)
        if self._received > self._rows:
            raise ValueError(f"{self._source}: {self._rows} rows, but the teacher produced more outputs "
                             f"({self._received} so far)")
        self._width = representations.shape[1] or self._width  # a rank that ran no batch reports H = 0
        if len(logits):  # a rank without rows has no keys: its empty share must not hide the others' from the check
            self._pending.append((logits, representations, keys))
            self._pending_rows += len(logits)
        metadata = self._handle.metadata
        while self._next_group < self._handle.num_row_groups:
            size = metadata.row_group(self._next_group).num_rows
            if size > self._pending_rows:
                break
            self._write_group(self._next_group, *self._take(size))
            self._next_group += 1

    def finish(self) -> None:
        """Moves the finished copy into place, flushed to disk first (fsync).

        Raises:
            ValueError: fewer outputs than the source has rows.
        """
        if self._received != self._rows:
            raise ValueError(f"{self._source}: {self._rows} rows, but the teacher produced {self._received} outputs")
        while self._next_group < self._handle.num_row_groups:  # empty row groups after the last row
            self._write_group(self._next_group, *self._take(0))
            self._next_group += 1
        if self._writer is None:  # a file without row groups: the copy has none either
            logits, representations, _ = self._take(0)
            empty = self._with_columns(self._handle.schema_arrow.empty_table(), logits, representations)
            self._writer = pq.ParquetWriter(self._tmp, empty.schema, compression="lz4")
        self._close()
        fsync_file(self._tmp)  # on disk before its name: a resume takes the copy as finished
        os.replace(self._tmp, self._target)

    def abort(self) -> None:
        """Drops the unfinished copy (``target`` is never touched)."""
        self._close()
        if os.path.exists(self._tmp):
            os.remove(self._tmp)

    def _close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None

    def _take(self, count: int) -> Outputs:
        """The next ``count`` pending outputs, as one (logits, representations, keys)."""
        if not count:  # an empty row group
            return np.zeros(0, np.float32), np.zeros((0, self._width), np.float32), None
        parts: List[Outputs] = []
        while count:
            logits, representations, keys = self._pending[0]
            if len(logits) <= count:
                parts.append(self._pending.pop(0))
                count -= len(logits)
            else:
                parts.append((logits[:count], representations[:count], None if keys is None else keys[:count]))
                self._pending[0] = (logits[count:], representations[count:], None if keys is None else keys[count:])
                count = 0
        self._pending_rows -= sum(len(part[0]) for part in parts)
        keys = None if any(part[2] is None for part in parts) else np.concatenate([part[2] for part in parts])
        return (np.concatenate([part[0] for part in parts]), np.concatenate([part[1] for part in parts]), keys)

    @staticmethod
    def _with_columns(table: pa.Table, logits: np.ndarray, representations: np.ndarray) -> pa.Table:
        """``table`` (n rows) with the logits (n,) and representations (n, H) appended, in place of
        an earlier teacher's columns of those names (a teacher trained on teacher-outputs copies)."""
        earlier = [name for name in (LOGITS_COLUMN, REPRESENTATION_COLUMN) if name in table.column_names]
        table = table.drop_columns(earlier)
        table = table.append_column(LOGITS_COLUMN, pa.array(logits.astype(np.float32)))
        return table.append_column(REPRESENTATION_COLUMN, vector_array(representations))

    def _write_group(
        self, group: int, logits: np.ndarray, representations: np.ndarray, keys: Optional[np.ndarray]
    ) -> None:
        table = self._handle.read_row_group(group)
        if keys is not None and self._row_key is not None:
            expected = table.column(self._row_key).to_numpy(zero_copy_only=False)
            if not np.array_equal(expected, keys):
                raise ValueError(f"{self._source}: row group {group}: row keys {self._row_key!r} differ from the "
                                 "reader's order")
        table = self._with_columns(table, logits, representations)
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._tmp, table.schema, compression="lz4")
        self._writer.write_table(table)


def write_with_columns(
    source: str, target: str, logits: np.ndarray, representations: np.ndarray, row_key: Optional[str],
    keys: Optional[np.ndarray],
) -> None:
    """Copies ``source`` with the two teacher columns of all its rows appended (atomic)."""
    writer = TeacherColumnsWriter(source, target, row_key)
    try:
        writer.add(logits, representations, keys)
        writer.finish()
    except BaseException:
        writer.abort()
        raise


def write_on_rank_0(source: str, target: str, row_key: Optional[str], own: Iterable[Step], world_size: int,
                    group: Optional[dist.ProcessGroup], progress: bool = False) -> Optional[Exception]:
    """Rank 0 writes the copy as the steps come: its own outputs straight into the copy, every other rank's
    (received each step) into that rank's :class:`OutputSpill`, whose outputs follow rank 0's, rank by rank,
    once the teacher is done. Rank 0 thus holds a batch of each rank and a row group, not the file's outputs.
    Every step of every rank is received even after an error, so no rank is left waiting in its send.

    Args:
        own (Iterable[Step]): rank 0's steps (:func:`predict_steps`); the other ranks send theirs
            (:func:`send_step`) as they compute them.
        progress (bool): a bar over the rows read back from the spills (most of the file's on many ranks).

    Returns:
        Optional[Exception]: what went wrong (the copy is then not written, and no spill is left), or None.
    """
    error: Optional[Exception] = None
    writer: Optional[TeacherColumnsWriter] = None
    spills: List[OutputSpill] = []

    def attempt(action: Callable[[], None]) -> None:
        nonlocal error
        if error is None:
            try:
                action()
            except Exception as caught:
                if isinstance(caught, OSError) and caught.errno in (errno.ENOSPC, errno.EDQUOT):
                    name_written_file(caught, target)  # the copy being written, not the whole --output-dir
                error = caught

    def open_copy() -> None:
        nonlocal writer
        os.makedirs(os.path.dirname(target), exist_ok=True)
        writer = TeacherColumnsWriter(source, target, row_key)
        spills.extend(OutputSpill(spill_path(target, rank)) for rank in range(1, world_size))

    def add_spilled() -> None:
        with tqdm(total=writer.rows_to_come, desc=f"{os.path.basename(target)}: other ranks' rows", unit="row",
                  disable=not (progress and spills), **bar_options()) as bar:
            for spill in spills:
                for outputs in spill.outputs():
                    writer.add(*outputs)
                    bar.update(len(outputs[0]))
                spill.remove()

    try:
        attempt(open_copy)
        for outputs, real in own:
            if real:
                attempt(lambda: writer.add(*outputs))
            for rank in range(1, world_size):
                theirs = receive_step(rank, group)  # even after an error: no rank waits in its send
                if theirs is not None:
                    attempt(lambda: spills[rank - 1].append(theirs))
        attempt(add_spilled)
        attempt(lambda: writer.finish())
    except BaseException:  # KeyboardInterrupt, SystemExit: no partial copy is left behind either
        _drop(writer, spills)
        raise
    if error is not None:
        _drop(writer, spills)
    return error


def _drop(writer: Optional[TeacherColumnsWriter], spills: Sequence[OutputSpill]) -> None:
    """Removes an unfinished copy's temp file and spills."""
    if writer is not None:
        writer.abort()
    for spill in spills:
        spill.remove()


def remove_spills(output_dir: str, schema: DatasetSchema) -> None:
    """Removes the spills (:func:`spill_path`) a killed run left in ``output_dir`` and its split directories,
    of any split and world size: a run over other splits would keep them, each up to a copy's outputs."""
    directories = [output_dir] + [os.path.join(output_dir, split) for split in schema.splits]
    for directory in filter(os.path.isdir, directories):
        for entry in os.listdir(directory):
            if re.fullmatch(r".+\.parquet" + _SPILL_SUFFIX, entry):
                os.remove(os.path.join(directory, entry))


def is_spill_of(entry: str, name: str) -> bool:
    """Whether the directory entry ``entry`` is a spill (:func:`spill_path`) of the copy named ``name``."""
    return re.fullmatch(re.escape(name) + _SPILL_SUFFIX, entry) is not None
