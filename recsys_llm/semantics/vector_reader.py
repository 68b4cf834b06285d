"""Reading a finished vector export (:mod:`recsys_llm.semantics.vector_export`): its chunks, all its
vectors or those of some keys, lookups by key, and attaching the vectors to a split as a column."""

import collections
import json
import logging
import os
import uuid
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from tqdm import tqdm

from recsys_llm.atomic_dir import fsync_directory, fsync_file, name_written_file
from recsys_llm.data.parquet_files import parquet_files
from recsys_llm.data.validation import first_non_finite_row
from recsys_llm.progress import bar_options
from recsys_llm.semantics.vector_export import (
    MANIFEST,
    PROVENANCE_KEY,
    ProvenanceError,
    check_provenance,
    chunk_path,
    keys_sha256,
    read_manifest,
    repeated_in_sorted,
    repeated_keys_error,
    require_unique_keys,
)

logger = logging.getLogger(__name__)

# in the Parquet metadata of a split copy with attached per-row vectors: the export's provenance (which adapted LLM,
# template, schema) and the column, so a model trained on them can tell vectors attached again from another LLM
ROW_VECTORS_METADATA_KEY = b"recsys_llm.row_vectors"


def attached_vectors_provenance(split_files: Sequence[str], column: str) -> Optional[Dict[str, str]]:
    """The provenance of the per-row vectors ``semantics export --attach-dir`` attached as ``column`` to a split
    (read from every file's metadata), with ``column``; None when it records none (attached by an earlier version,
    or by other means).

    Raises:
        ProvenanceError: the split's files record vectors of different exports (days attached with different
            adapted LLMs, gathered in one directory) or one records none, naming two such files and what differs.
    """
    records = [(path, _attached_vectors_record(path, column)) for path in split_files]
    for path, record in records[1:]:
        first_path, first = records[0]
        if (first is None) != (record is None):  # one file records its vectors' export, the other none
            recorded, bare = (first_path, path) if record is None else (path, first_path)
            raise ProvenanceError(
                f"{bare}: records no provenance of its {column!r} vectors (attached by an earlier version, or by "
                f"other means), while {recorded} does: they cannot be told to come from the same adapted LLM. "
                "Attach every file of the split from the same export (semantics export --attach-dir)"
            )
        try:  # where the base model lay is only a name where both record the same files
            check_provenance(record or {}, first or {}, path, complete=True)
        except ProvenanceError as error:
            raise ProvenanceError(
                f"{error}, which {first_path} records: a model would read vectors of two adapted LLMs as one. "
                "Attach every file of the split from the same export (semantics export --attach-dir)"
            ) from error
    return records[0][1] if records else None


def _attached_vectors_record(path: str, column: str) -> Optional[Dict[str, str]]:
    """The row-vectors record of one Parquet file's metadata for ``column``; None where it holds none."""
    raw = (pq.read_schema(path).metadata or {}).get(ROW_VECTORS_METADATA_KEY)
    try:
        record = json.loads(raw) if raw is not None else None
    except ValueError:
        return None
    return record if isinstance(record, dict) and record.get("column") == column else None


def iter_chunks(directory: str, expected: Optional[Dict[str, str]] = None) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """Yields ``(keys (n,) int64 ndarray, vectors (n, d) ndarray)`` per chunk, provenance-checked."""
    manifest = read_manifest(directory, expected)
    for index in range(int(manifest["num_chunks"])):
        yield _read_chunk(directory, manifest, index)


def read_chunk_table(path: str, columns: Optional[List[str]] = None) -> pa.Table:
    """A chunk file's table (or ``columns`` of it).

    Raises:
        ValueError: the file is not a readable Parquet file (truncated, overwritten), naming it
            and how to mend the export.
    """
    try:
        return pq.read_table(path, columns=columns)
    except (pa.ArrowInvalid, OSError) as error:
        raise _damaged_chunk(path, error) from error


def _first_chunk(directory: str, manifest: Dict[str, object]) -> str:
    """The path of an export's first chunk, whose schema gives the vectors' type and width.

    Raises:
        ValueError: the export holds no vector (num_rows 0: written before empty exports were refused).
    """
    if not int(manifest["num_chunks"]):
        raise ValueError(f"{directory}: an export of no vectors (num_rows 0 in its {MANIFEST}); re-export it from "
                         "splits with rows into an empty --output-dir")
    return chunk_path(directory, 0)


def read_chunk_schema(path: str) -> pa.Schema:
    """A chunk file's schema (its footer alone).

    Raises:
        ValueError: as :func:`read_chunk_table`.
    """
    try:
        return pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as error:
        raise _damaged_chunk(path, error) from error


def _damaged_chunk(path: str, error: Exception) -> ValueError:
    """The error of a chunk file that Arrow cannot read, naming it and how to mend the export."""
    return ValueError(
        f"{path}: damaged chunk of a vector export, not readable as Parquet ({' '.join(str(error).split())}); "
        "delete it and re-run the same semantics export: it writes the missing chunk and keeps the others"
    )


def _read_chunk(directory: str, manifest: Dict[str, object], index: int) -> Tuple[np.ndarray, np.ndarray]:
    """Keys (n,) and vectors (n, d) of chunk ``index``, its provenance checked against the manifest's."""
    path = chunk_path(directory, index)
    table = read_chunk_table(path)
    _check_chunk_provenance(table, manifest, path)
    return _columns(table, manifest, path)


def _check_chunk_provenance(table: pa.Table, manifest: Dict[str, object], path: str) -> None:
    """Raises :class:`ProvenanceError` when the chunk ``table`` read from ``path`` was written with
    another provenance than its export's manifest (a chunk of another export copied there)."""
    try:
        stored = json.loads((table.schema.metadata or {}).get(PROVENANCE_KEY, b"{}"))
    except (ValueError, RecursionError) as error:
        raise ProvenanceError(f"{path}: its provenance metadata is not valid JSON ({type(error).__name__}: {error}): "
                              "a damaged chunk; delete it and re-run the export") from error
    if not isinstance(stored, dict):
        raise ProvenanceError(f"{path}: its provenance metadata is a JSON {type(stored).__name__}, expected an "
                              "object: a damaged chunk; delete it and re-run the export")
    check_provenance(stored, manifest["provenance"], path)


def _columns(table: pa.Table, manifest: Dict[str, object], path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Keys (n,) and vectors (n, d) of a chunk's table.

    Raises:
        ValueError: the vector column is no fixed-size list, or a vector holds NaN/inf
            (naming ``path`` and the first such key).
    """
    key_column, vector_column = str(manifest["key_column"]), str(manifest["vector_column"])
    vectors = table.column(vector_column).combine_chunks()
    if not pa.types.is_fixed_size_list(vectors.type) or not pa.types.is_floating(vectors.type.value_type):
        raise ValueError(f"{path}: column {vector_column!r} must be fixed_size_list<float>, got {vectors.type}")
    dim = vectors.type.list_size
    values = vectors.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim)
    keys = table.column(key_column).to_numpy()
    bad = first_non_finite_row(values)
    if bad is not None:
        first, count, value = bad
        raise ValueError(
            f"{path}: column {vector_column!r}, {key_column}={keys[first].item()}: the vector holds "
            f"{value} ({count} of {len(values)} vectors of this chunk "
            "hold NaN/inf); expected finite values: the chunk is damaged or was written without this check, "
            "delete it and re-run the export"
        )
    return keys, values


def read_vectors(directory: str, expected: Optional[Dict[str, str]] = None) -> Tuple[np.ndarray, np.ndarray]:
    """All keys (N,) and vectors (N, d) of a finished export (for small exports and tests)."""
    parts = list(iter_chunks(directory, expected))
    return np.concatenate([k for k, _ in parts]), np.concatenate([v for _, v in parts])


def iter_vector_rows(
    directory: str,
    start: int,
    stop: int,
    dim: int,
    expected: Optional[Dict[str, str]] = None,
    columns: Optional[Tuple[int, int]] = None,
) -> Iterator[Tuple[np.ndarray, np.ndarray]]:
    """The vectors of keys ``[start, stop)``, one chunk at a time.

    Yields ``(positions (n,) int64, vectors (n, c) ndarray)``: each key's row ``key - start``
    and its vector's columns ``columns = (first, stop)`` (default: all ``dim``), in the
    storage dtype (writable, C-contiguous). Only one chunk's rows in range are held at a
    time, so a rank copying them into its shard of an entity table never holds the table,
    nor the rows or columns of other ranks' shards. Keys without a vector are not yielded.

    Raises:
        ValueError: a chunk's vectors are not ``dim`` wide, or ``columns`` lie outside them.
        ProvenanceError: the manifest's provenance differs from ``expected``, or a chunk's
            from the manifest's (a chunk of another export).
    """
    first, last = columns if columns is not None else (0, dim)
    if not 0 <= first <= last <= dim:
        raise ValueError(f"{directory}: columns {first}..{last} lie outside vectors of dim {dim}")
    manifest = read_manifest(directory, expected)
    key_column = str(manifest["key_column"])
    for index in range(int(manifest["num_chunks"])):
        path = chunk_path(directory, index)
        key_table = read_chunk_table(path, columns=[key_column])
        _check_chunk_provenance(key_table, manifest, path)  # as read_vectors does: never another export's chunk
        keys = key_table.column(key_column)
        mask = pc.and_(pc.greater_equal(keys, start), pc.less(keys, stop))
        if not pc.any(mask).as_py():
            continue
        table = read_chunk_table(path).filter(mask)
        chunk_keys, vectors = _columns(table, manifest, path)
        if vectors.shape[1] != dim:
            raise ValueError(f"{path}: vectors have dim {vectors.shape[1]}, the table expects {dim}")
        # writable and contiguous (a copy of the chunk's rows in range at most): ready for torch.from_numpy
        positions = (chunk_keys - start).astype(np.int64, copy=False)
        yield positions, np.require(vectors[:, first:last], requirements=["C", "W"])


def read_vector_rows(
    directory: str,
    start: int,
    stop: int,
    dim: int,
    expected: Optional[Dict[str, str]] = None,
    columns: Optional[Tuple[int, int]] = None,
) -> np.ndarray:
    """Vectors of keys ``[start, stop)`` as a dense (stop - start, c) float32 block.

    ``c`` is the width of ``columns`` (default: all ``dim``). Only the rows in range are
    materialised (chunks are filtered on their key column, see :func:`iter_vector_rows`).
    Keys without a vector stay zero. To fill a table shard, copy chunk by chunk from
    :func:`iter_vector_rows` instead: this block is one more copy of the shard.
    """
    first, last = columns if columns is not None else (0, dim)
    out = np.zeros((stop - start, last - first), dtype=np.float32)
    for positions, vectors in iter_vector_rows(directory, start, stop, dim, expected, columns):
        out[positions] = vectors
    return out


def _chunk_keys(directory: str, manifest: Dict[str, object]) -> List[np.ndarray]:
    """The key column (n_i,) of every chunk, each checked to hold the rows the manifest gives it.

    Raises:
        ValueError: a chunk holds more or fewer rows than ``chunk_rows`` / ``num_rows`` say.
    """
    return list(_iter_chunk_keys(directory, manifest))


def _iter_chunk_keys(directory: str, manifest: Dict[str, object]) -> Iterator[np.ndarray]:
    """:func:`_chunk_keys` one chunk at a time."""
    key_column = str(manifest["key_column"])
    chunk_rows, num_rows = int(manifest["chunk_rows"]), int(manifest["num_rows"])
    for index in range(int(manifest["num_chunks"])):
        path = chunk_path(directory, index)
        column = read_chunk_table(path, columns=[key_column]).column(key_column).to_numpy()
        want = min(chunk_rows, num_rows - index * chunk_rows)
        if len(column) != want:
            raise ValueError(
                f"{path}: holds {len(column)} rows, but the manifest of {directory} (num_rows={num_rows}, "
                f"chunk_rows={chunk_rows}) gives chunk {index} {want}; the export is damaged: re-export it into "
                "an empty --output-dir"
            )
        yield column


def ids_without_vector(directory: str, ids: np.ndarray) -> np.ndarray:
    """The ``ids`` a finished export holds no vector for, sorted (its keys read a chunk at a time)."""
    manifest = read_manifest(directory)
    missing = np.unique(np.asarray(ids, dtype=np.int64))
    for column in _iter_chunk_keys(directory, manifest):
        missing = missing[~np.isin(missing, column)]
    return missing


def key_range(directory: str, expected: Optional[Dict[str, str]] = None) -> Tuple[int, int]:
    """Smallest and largest key of a finished export ((0, -1) when it holds no vector).

    The export is checked on the way: every chunk holds the rows its manifest gives it,
    and no key repeats (a table filled by key would silently keep one of two vectors).
    Keys are read a chunk at a time (twice): memory is one chunk's keys plus one byte per
    id between the smallest and the largest key, not every key of the export (8 bytes
    each, and again sorted) on every rank that loads it. Only an export whose keys are
    spread far wider than its rows (more than 8 ids per row) is checked by sorting all keys.

    Raises:
        ValueError: a chunk with another number of rows than the manifest's, or a repeated
            key, naming the export directory.
    """
    manifest = read_manifest(directory, expected)
    what = f"{directory}: key column {manifest['key_column']!r}"
    low, high = None, None
    for column in _iter_chunk_keys(directory, manifest):
        if len(column):
            low = int(column.min()) if low is None else min(low, int(column.min()))
            high = int(column.max()) if high is None else max(high, int(column.max()))
    if low is None or high is None:
        return 0, -1
    span = high - low + 1
    if span > 8 * int(manifest["num_rows"]) + 4096:  # keys spread far wider than the rows: sort them
        require_unique_keys(np.sort(np.concatenate(_chunk_keys(directory, manifest))), what, is_sorted=True)
        return low, high
    seen = np.zeros(span, dtype=bool)
    repeated: List[np.ndarray] = []
    for column in _iter_chunk_keys(directory, manifest):
        repeated.append(repeated_in_sorted(np.sort(column)))  # twice within the chunk
        offsets = column - low
        repeated.append(column[seen[offsets]])  # in an earlier chunk
        seen[offsets] = True
    found = np.concatenate(repeated)
    if len(found):
        raise repeated_keys_error(found, what)
    return low, high


def vector_dim(directory: str) -> int:
    """d of an export (read from its first chunk).

    Raises:
        ValueError: the export holds no vector (no chunk to read it from), or its first chunk is damaged.
    """
    manifest = read_manifest(directory)
    schema = read_chunk_schema(_first_chunk(directory, manifest))
    return schema.field(str(manifest["vector_column"])).type.list_size


class ExportLookup:
    """Vectors of an export by key, without holding the whole export.

    Every chunk's keys are read and sorted once (about 24 bytes per vector: keys, order,
    sorted keys); vectors are read a chunk at a time (provenance-checked) and kept while
    they fit in ``cache_bytes`` (least recently used chunks are dropped first). While the
    positions asked for never step back (row vectors attached in export order, across
    calls), a chunk is dropped once a later one is read: each chunk is read once and at
    most one is kept. Once they step back, chunks are kept as above: an export within
    ``cache_bytes`` (entity vectors) is read once in all; a larger one looked up in random
    key order is read again for every batch of rows: give it a ``cache_bytes`` above its size.
    """

    def __init__(self, directory: str, manifest: Dict[str, object], cache_bytes: int) -> None:
        self._directory = directory
        self._manifest = manifest
        self._cache_bytes = cache_bytes
        self._cache: "collections.OrderedDict[int, np.ndarray]" = collections.OrderedDict()
        self._in_order = True  # no position asked for so far stepped back: chunks behind the last are done with
        self._last_position = -1
        key_column = str(manifest["key_column"])
        keys = _chunk_keys(directory, manifest)
        self._chunk_starts = np.cumsum([0] + [len(k) for k in keys[:-1]])  # (C,) first position of each chunk
        all_keys = np.concatenate(keys) if keys else np.zeros(0, np.int64)
        self._order = np.argsort(all_keys, kind="stable")
        self._sorted_keys = all_keys[self._order]
        require_unique_keys(self._sorted_keys, f"{directory}: key column {key_column!r}", is_sorted=True)

    def keys_sha256(self) -> str:
        """The hash of the chunks' keys in export order, as the manifest's ``keys_sha256`` records them."""
        in_order = np.empty_like(self._sorted_keys)
        in_order[self._order] = self._sorted_keys
        return keys_sha256(in_order)

    def positions(self, keys: np.ndarray) -> np.ndarray:
        """Export position (N,) of each key; -1 where the export has no vector for it."""
        keys = np.asarray(keys)
        beyond = np.zeros(len(keys), dtype=bool)
        if keys.dtype == np.uint64:  # against the int64 keys numpy compares them as float64: inexact above 2**53
            beyond = keys > np.iinfo(np.int64).max  # no int64 key of the export
            keys = keys.astype(np.int64)  # those wrap: found or not, they are refused below
        found = np.searchsorted(self._sorted_keys, keys)
        inside = (found < len(self._sorted_keys)) & ~beyond
        found[~inside] = 0
        hit = inside & (self._sorted_keys[found] == keys) if len(self._sorted_keys) else np.zeros(len(keys), bool)
        return np.where(hit, self._order[found], -1)

    def vectors(self, positions: np.ndarray) -> np.ndarray:
        """Vectors (N, d) at export ``positions`` (N,), all valid; (0, d) float32 for no positions."""
        if not len(positions):
            return np.zeros((0, vector_dim(self._directory)), np.float32)
        self._note_order(positions)
        chunks = np.searchsorted(self._chunk_starts, positions, side="right") - 1  # (N,)
        order = np.argsort(chunks, kind="stable")  # (N,) positions grouped by chunk, chunks ascending
        touched, counts = np.unique(chunks[order], return_counts=True)  # (T,) each
        out = None
        for chunk, rows in zip(touched, np.split(order, np.cumsum(counts)[:-1])):
            block = self._chunk(int(chunk))
            if out is None:
                out = np.empty((len(positions), block.shape[1]), dtype=block.dtype)
            out[rows] = block[positions[rows] - self._chunk_starts[chunk]]
        return out

    def _note_order(self, positions: np.ndarray) -> None:
        """Leaves in-order reading, for good, when ``positions`` (N,) (N > 0) step back, within
        them or from the last position of the previous call."""
        self._in_order = (self._in_order and int(positions[0]) >= self._last_position
                          and bool(np.all(positions[1:] >= positions[:-1])))
        self._last_position = int(positions[-1])

    def _chunk(self, index: int) -> np.ndarray:
        """Vectors (n, d) of chunk ``index``, from the cache or read (and cached)."""
        if self._in_order:
            for done in [i for i in self._cache if i < index]:
                del self._cache[done]
        if index in self._cache:
            self._cache.move_to_end(index)
            return self._cache[index]
        block = _read_chunk(self._directory, self._manifest, index)[1]
        self._cache[index] = block
        while len(self._cache) > 1 and sum(b.nbytes for b in self._cache.values()) > self._cache_bytes:
            self._cache.popitem(last=False)
        return block


def _files_schema(files: List[str]) -> pa.Schema:
    """The columns of a split's ``files``: the first file's, a column nullable where any file has it so.

    Raises:
        ValueError: a file has other column names, or a column of another type, than the
            first (naming both files, and the column with both types).
    """
    schemas = [pq.read_schema(path) for path in files]
    first = schemas[0]
    for path, other in zip(files[1:], schemas[1:]):
        if other.names != first.names:
            raise ValueError(f"{path}: columns {other.names} differ from {files[0]}'s {first.names}")
        for field, want in zip(other, first):
            if not field.type.equals(want.type):
                raise ValueError(f"{path}: column {field.name!r} is {field.type}, but {files[0]} has it as "
                                 f"{want.type}; every file of a split must store a column with one type")
    # files written by other tools may differ in nullability only (as the splits an export reads)
    return pa.schema([field.with_nullable(any(s.field(i).nullable for s in schemas)) for i, field in enumerate(first)],
                     metadata=first.metadata)


def attach_vectors(
    split_path: str,
    vector_dir: str,
    key_column: str,
    output_path: str,
    column: str = "llm_vector",
    expected: Optional[Dict[str, str]] = None,
    batch_rows: int = 65536,
    cache_bytes: int = 1 << 30,
    progress: bool = False,
) -> int:
    """Writes a copy of a split with the vectors as one more ``fixed_size_list<float>`` column.

    The Parquet reader then yields them as ``batch.extras[column]``. ``key_column`` is the
    row key for per-row vectors, or the entity field (e.g. ``item_id``) for per-entity ones.
    The split is streamed ``batch_rows`` at a time and the export read a chunk at a time,
    so neither is held whole. For several splits, :func:`attach_vectors_to_splits` reads the
    export's keys once for all of them.

    Args:
        split_path (str): the split's Parquet file, or a directory of ``*.parquet`` files
            (read in name order into one copy).
        vector_dir (str): a finished export.
        key_column (str): column of the split matched against the export's keys.
        output_path (str): the copy (written atomically: on an error nothing is left there,
            and an earlier copy stays as it was).
        column (str): name of the new column.
        expected (Optional[Dict[str, str]]): provenance the vectors must have.
        batch_rows (int): split rows per read and write.
        cache_bytes (int): export chunks kept in memory (see ``ExportLookup``).
        progress (bool): a tqdm bar over the split's rows.

    Returns:
        int: number of rows written.

    Raises:
        ValueError: a key of the split has no vector, or the split's files differ in their
            column names or types (nullability alone may differ).
    """
    return attach_vectors_to_splits([(split_path, output_path)], vector_dir, key_column, column, expected,
                                    batch_rows, cache_bytes, progress)[0]


def attach_vectors_to_splits(
    copies: Sequence[Tuple[str, str]],
    vector_dir: str,
    key_column: str,
    column: str = "llm_vector",
    expected: Optional[Dict[str, str]] = None,
    batch_rows: int = 65536,
    cache_bytes: int = 1 << 30,
    progress: bool = False,
) -> List[int]:
    """:func:`attach_vectors` for several splits, in order, with one :class:`ExportLookup`: the
    export's keys are read and sorted once, and per-row vectors attached in export order
    read each chunk once in all (and hold one at a time).

    Args:
        copies (Sequence[Tuple[str, str]]): ``(split_path, output_path)`` of each split.
        vector_dir, key_column, column, expected, batch_rows, cache_bytes, progress: as
            :func:`attach_vectors`.

    Returns:
        List[int]: rows written to each copy.

    Raises:
        ValueError: as :func:`attach_vectors`; every split's columns are checked before the
            export's keys are read.
    """
    manifest = read_manifest(vector_dir, expected)
    split_files = [parquet_files(split_path) for split_path, _ in copies]
    schemas = [_split_schema(files, key_column, column) for files in split_files]
    value_type = read_chunk_schema(_first_chunk(vector_dir, manifest)).field(str(manifest["vector_column"])).type
    export_bytes = int(manifest["num_rows"]) * value_type.list_size * value_type.value_type.bit_width // 8
    if export_bytes > cache_bytes:
        logger.warning("%s: %.1f GiB of vectors, above attach_vectors' cache_bytes (%.1f GiB): keys in random order "
                       "re-read chunks for every batch", vector_dir, export_bytes / 2**30, cache_bytes / 2**30)
    lookup = ExportLookup(vector_dir, manifest, cache_bytes)
    provenance = json.dumps({**dict(manifest.get("provenance") or {}), "column": column}, sort_keys=True).encode()

    def with_vectors(schema: pa.Schema) -> pa.Schema:
        return schema.append(pa.field(column, value_type)).with_metadata(
            {**(schema.metadata or {}), ROW_VECTORS_METADATA_KEY: provenance})

    return [
        _write_copy(files, with_vectors(schema), output_path, lookup, vector_dir, key_column, batch_rows, progress)
        for (_, output_path), files, schema in zip(copies, split_files, schemas)
    ]


def _split_schema(files: List[str], key_column: str, column: str) -> pa.Schema:
    """The columns of a split's ``files`` (see :func:`_files_schema`).

    Raises:
        ValueError: as :func:`_files_schema`, or the split lacks ``key_column`` or already has ``column``.
    """
    schema = _files_schema(files)
    if key_column not in schema.names:
        raise ValueError(f"{files[0]}: no column {key_column!r} to join vectors on; columns {schema.names}")
    if column in schema.names:
        raise ValueError(f"{files[0]}: already has a column {column!r}")
    return schema


def _write_copy(
    files: List[str],
    out_schema: pa.Schema,
    output_path: str,
    lookup: ExportLookup,
    vector_dir: str,
    key_column: str,
    batch_rows: int,
    progress: bool,
) -> int:
    """Writes the rows of a split's ``files`` with their vectors (``out_schema``'s last column) to
    ``output_path``, atomically (see :func:`attach_vectors`); returns the rows written."""
    value_type = out_schema.field(len(out_schema) - 1).type
    tmp = f"{output_path}.{uuid.uuid4().hex[:8]}.tmp"  # its own: two writers of one output never share it
    rows = 0
    total = sum(pq.read_metadata(path).num_rows for path in files) if progress else None  # footers only
    bar = tqdm(total=total, unit="rows", desc=f"attaching vectors to {os.path.basename(output_path)}",
               disable=not progress, **bar_options())
    try:
        with bar, pq.ParquetWriter(tmp, out_schema) as writer:
            for path in files:
                handle = pq.ParquetFile(path)
                row_in_file = 0
                for batch in handle.iter_batches(batch_size=batch_rows, use_threads=False):
                    positions = lookup.positions(batch.column(key_column).to_numpy(zero_copy_only=False))
                    missing = positions < 0
                    if missing.any():
                        first = int(np.argmax(missing))
                        raise ValueError(
                            f"{path}: {int(missing.sum())} rows (of rows {row_in_file}-{row_in_file + batch.num_rows - 1}) "
                            f"have a {key_column!r} with no vector in {vector_dir}; first: row {row_in_file + first}, "
                            f"{key_column}={batch.column(key_column)[first].as_py()}"
                        )
                    values = pa.array(lookup.vectors(positions).reshape(-1), type=value_type.value_type)
                    vectors = pa.FixedSizeListArray.from_arrays(values, value_type.list_size)
                    writer.write_batch(pa.RecordBatch.from_arrays(batch.columns + [vectors], schema=out_schema))
                    row_in_file += batch.num_rows
                    bar.update(batch.num_rows)
                rows += row_in_file
        fsync_file(tmp)  # its content on disk before the rename publishes it
        os.replace(tmp, output_path)
        fsync_directory(os.path.dirname(os.path.abspath(output_path)))
    except OSError as error:
        name_written_file(error, output_path)
        raise
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return rows
