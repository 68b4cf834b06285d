"""Writing a prepared data set: one Parquet file per split with fixed-size row groups, the Arrow
schema ``prepare`` writes, and the whole-or-nothing swap of the output directory."""

import contextlib
import json
import os
import uuid
from types import TracebackType
from typing import Callable, Dict, List, Optional, Sequence, Type, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from recsys_llm.atomic_dir import (atomic_directory, fsync_directory, fsync_file, holds_files, link_into_place,
                                   name_written_file, swapped_out_path)
from recsys_llm.data.parquet_files import read_schema_and_check, resolve_paths
from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.validation import DataError, field_specs_metadata, open_parquet


def arrow_schema_for(schema: DatasetSchema, extra_types: Optional[Dict[str, pa.DataType]] = None,
                     with_label: bool = True) -> pa.Schema:
    """The Arrow schema ``prepare`` writes for a data set (row key, fields, label, extras); without the
    label column when not ``with_label`` (rows to score).

    Types: sparse int64, sequence list<int64>, dense float32, label int8, row key int64.
    The field specs are recorded in the metadata so a reader can detect a schema/data mismatch.
    """
    columns: List[pa.Field] = []
    if schema.row_key:
        columns.append(pa.field(schema.row_key, pa.int64(), nullable=False))
    kind_types = {FieldKind.SPARSE: pa.int64(), FieldKind.SEQUENCE: pa.list_(pa.int64()), FieldKind.DENSE: pa.float32()}
    columns += [pa.field(f.name, kind_types[f.kind]) for f in schema.fields]
    if with_label:
        columns.append(pa.field(schema.label, pa.int8()))
    for name, dtype in (extra_types or {}).items():
        columns.append(pa.field(name, dtype))
    return pa.schema(columns, metadata=field_specs_metadata(schema.fields))


def numpy_dtype(value_type: pa.DataType) -> np.dtype:
    """The NumPy dtype of an Arrow primitive type, without pandas: ``DataType.to_pandas_dtype`` imports pandas
    on pyarrow < 26 (what Python 3.10 gets), which the project does not install."""
    return pa.array([], type=value_type).to_numpy(zero_copy_only=False).dtype


def vector_array(rows: np.ndarray, value_type: pa.DataType = pa.float32()) -> pa.FixedSizeListArray:
    """A fixed_size_list<``value_type``>[d] Arrow array of the vectors ``rows`` (N, d), one per row."""
    flat = np.ascontiguousarray(rows, dtype=numpy_dtype(value_type)).reshape(-1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat, type=value_type), rows.shape[1])


LIST_IDS_PER_ARRAY = int(np.iinfo(np.int32).max)  # a list<...> array's offsets are int32


def list_array(lengths: np.ndarray, values: np.ndarray,
               max_ids_per_array: int = LIST_IDS_PER_ARRAY) -> Union[pa.Array, pa.ChunkedArray]:
    """A list<int64> Arrow array from per-row ``lengths`` (N,) and flat ``values`` (sum(lengths),).

    Arrow's list offsets are int32: more than ``max_ids_per_array`` ids in all (e.g. a long
    history per row of MovieLens-32M) come as a ChunkedArray of pieces of whole rows, each under
    the limit, instead of offsets that wrap.

    Raises:
        ValueError: one row alone holds more than ``max_ids_per_array`` ids.
    """
    offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    flat = pa.array(np.asarray(values, dtype=np.int64))
    if offsets[-1] <= max_ids_per_array:
        return pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), flat)
    pieces, start = [], 0
    while start < len(lengths):
        stop = int(np.searchsorted(offsets, offsets[start] + max_ids_per_array, side="right")) - 1
        if stop == start:
            raise ValueError(f"row {start} holds {int(lengths[start])} ids, more than a list array holds "
                             f"({max_ids_per_array})")
        piece = offsets[start : stop + 1] - offsets[start]  # (rows + 1,)
        pieces.append(pa.ListArray.from_arrays(pa.array(piece.astype(np.int32)),
                                               flat.slice(int(offsets[start]), int(piece[-1]))))
        start = stop
    return pa.chunked_array(pieces)


class SplitWriter:
    """Streams chunks of rows into one Parquet file with fixed-size row groups.

    Args:
        path (str): output file (written to a temp file of this writer's own, ``<path>.<id>.tmp``, and renamed on
            ``close``).
        arrow_schema (pa.Schema): see :func:`arrow_schema_for`.
        row_group_size (int): rows per row group.
        compression (str): Parquet codec; lz4 decodes about twice as fast as zstd for
            id columns, which matters when training is fed from Parquet.
        replace (bool): an existing ``path`` is replaced; False: ``close`` raises FileExistsError when ``path``
            exists by then (written meanwhile by another process), and leaves it as it is.

    Example::

        with SplitWriter("out/train.parquet", arrow_schema_for(schema), 65536) as writer:
            writer.write({"row_id": ids, "user_id": users, ..., "label": labels})
    """

    def __init__(self, path: str, arrow_schema: pa.Schema, row_group_size: int = 65536, compression: str = "lz4",
                 replace: bool = True) -> None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        self._path = path
        self._replace = replace
        self._tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"  # its own: two writers of one path never share it
        self._schema = arrow_schema
        self._row_group_size = row_group_size
        try:
            self._writer = pq.ParquetWriter(self._tmp, arrow_schema, compression=compression)
        except BaseException as error:
            # the temp file is made before its header is written: a full disk leaves it empty beside the output
            with contextlib.suppress(OSError):
                os.remove(self._tmp)
            if isinstance(error, OSError):
                name_written_file(error, path)
            raise
        self._pending: List[pa.Table] = []
        self._pending_rows = 0
        self.num_rows = 0

    def write(self, columns: Dict[str, Union[np.ndarray, pa.Array, pa.ChunkedArray]]) -> None:
        """Appends rows given as column name -> array (cast to the writer's Arrow types)."""
        arrays = []
        for field in self._schema:
            if field.name not in columns:
                raise DataError(f"{self._path}: chunk lacks column {field.name!r}; expected {self._schema.names}")
            column = columns[field.name]
            if not isinstance(column, (pa.Array, pa.ChunkedArray)):
                column = pa.array(column)
            arrays.append(column.cast(field.type))
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
        try:
            self._flush(final=True)
            self._writer.close()
            fsync_file(self._tmp)  # its content on disk before a name publishes it (a power loss: not an empty file)
            if self._replace:
                os.replace(self._tmp, self._path)
            elif not link_into_place(self._tmp, self._path):
                raise FileExistsError(f"{self._path}: appeared while this file was written (another process's?); "
                                      "left as it is, and this one not written")
            fsync_directory(os.path.dirname(os.path.abspath(self._path)))
        finally:
            # renamed: gone; linked: a second name of the output. Failed or interrupted while the last row group
            # and the footer were written (Ctrl-C, a full disk): a half-written file no one reads, left beside the
            # output (`recsys-llm score --output`) for the user to delete
            if self._writer.is_open:
                with contextlib.suppress(Exception):
                    self._writer.close()
            with contextlib.suppress(OSError):
                os.remove(self._tmp)

    def __enter__(self) -> "SplitWriter":
        return self

    def __exit__(self, exc_type: Optional[Type[BaseException]], exc: Optional[BaseException],
                 tb: Optional[TracebackType]) -> None:
        if exc_type is None:
            self.close()
        else:
            try:  # the footer of rows no one reads: a full disk failing it again must not keep the temp file
                with contextlib.suppress(Exception):
                    self._writer.close()
            finally:
                with contextlib.suppress(OSError):
                    os.remove(self._tmp)


def open_split_writers(
    stack: contextlib.ExitStack, schema: DatasetSchema, arrow_schema: pa.Schema, row_group_size: int
) -> List[SplitWriter]:
    """One :class:`SplitWriter` per split of ``schema`` (in ``schema.splits`` order), each entered
    into ``stack`` as it opens: leaving the stack closes them all, or after an error removes
    their temporary files."""
    return [stack.enter_context(SplitWriter(schema.split_path(split), arrow_schema, row_group_size))
            for split in schema.splits]


#: files every directory written by ``prepare`` holds; only such a directory is replaced
PREPARED_MARKER_FILES = ("schema.json", "train.parquet", "valid.parquet", "test.parquet")
# every item with its item fields, cold items included (synthetic, movielens): ``elec.distill.swap_catalog``
ITEM_CATALOG = "item_catalog.parquet"
PREPARED_KIND = "prepared data set"


def check_inputs_outside(out_dir: str, inputs: Sequence[str]) -> None:
    """Raises if an input lies in ``out_dir`` (or the copy an earlier swap left, ``.<name>.old``), which the
    swap would delete."""
    for directory in (out_dir, swapped_out_path(out_dir)):
        root = os.path.realpath(directory)
        for path in inputs:
            real = os.path.realpath(path)
            if real == root and directory == out_dir and not os.path.isdir(real):
                raise ValueError(f"{out_dir}: the output is the input file {path} itself; expected a directory for "
                                 "the prepared data set (e.g. data/NAME)")
            if real == root or real.startswith(root + os.sep):
                raise ValueError(
                    f"{out_dir}: the output directory holds the input {path}; writing the data set there would "
                    "delete it; choose another output directory"
                )


def _prepared_entries(out_dir: str) -> Optional[set]:
    """Top-level entries of the earlier data set in ``out_dir`` that ``prepare`` wrote: ``schema.json``, what it
    names (splits, split directories, value texts) and the item catalogue (not other Parquet files: a scores file,
    the user's raw rows); None when that ``schema.json`` cannot be read (nothing to tell them by)."""
    try:
        with open(os.path.join(out_dir, "schema.json"), encoding="utf-8") as handle:
            raw = json.load(handle)
        named = list(raw["splits"].values()) + [f.get("value_text") for f in raw["fields"]]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    tops = {os.path.normpath(path).split(os.sep)[0] for path in named if isinstance(path, str) and path}
    return tops | {"schema.json", ITEM_CATALOG}


def check_nothing_else_in(out_dir: str, marker_files: Sequence[str] = PREPARED_MARKER_FILES) -> None:
    """Raises when the earlier data set in ``out_dir`` (one holding ``marker_files``) also holds entries
    ``prepare`` did not write (notes, vectors, runs put there): replacing the data set would delete them.

    Raises:
        FileExistsError: naming ``out_dir`` and those entries.
    """
    if not (os.path.isdir(out_dir) and holds_files(out_dir, marker_files)):
        return  # absent, empty or not a data set: atomic_directory's own check
    own = _prepared_entries(out_dir)
    if own is None:
        return
    foreign = sorted(name for name in os.listdir(out_dir) if name not in own)
    if foreign:
        shown = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        raise FileExistsError(
            f"{out_dir}: holds an earlier {PREPARED_KIND} and also {shown}, which prepare did not write; the data set "
            "is replaced whole, which would delete them: move them out, or choose another output directory"
        )


def check_split_rows(schema: DatasetSchema, source: str, with_label: bool = True) -> None:
    """Raises unless every split of a just-written data set (``schema.root``) has rows and fits ``schema``
    (``with_label``: with its label column; False: rows to score, written without one).

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
        read_schema_and_check(schema, split, with_label=with_label)


def write_prepared(
    out_dir: str, source: str, inputs: Sequence[str], write: Callable[[str], DatasetSchema], with_label: bool = True,
    marker_files: Sequence[str] = PREPARED_MARKER_FILES,
) -> DatasetSchema:
    """Writes a data set whole or not at all: ``write(tmp)`` fills a temp directory, which
    replaces ``out_dir`` only after every split has rows and fits the schema.

    A failure (or interrupt) leaves an earlier ``out_dir`` as it was; a non-empty ``out_dir``
    that is not an earlier data set (no :data:`PREPARED_MARKER_FILES`), one holding an input, or
    one (or the hidden ``.<name>.old`` copy an earlier swap left, which this swap puts back or removes) holding entries the earlier
    data set did not write, is refused before ``write`` runs.

    Args:
        out_dir (str): the final directory.
        source (str): the raw data, named in error messages.
        inputs (Sequence[str]): files/directories the conversion reads.
        write (Callable[[str], DatasetSchema]): writes splits, value text etc. into the given
            directory and returns the schema; ``schema.json`` is saved here, after the checks.
        with_label (bool): the splits hold the label column (False: rows to score, without one).
        marker_files (Sequence[str]): files an earlier output of this kind holds, which may be replaced
            (:data:`PREPARED_MARKER_FILES`; ``prepare tabular --like`` writes ``schema.json`` and one split).

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
    check_nothing_else_in(out_dir, marker_files)
    check_nothing_else_in(swapped_out_path(out_dir), marker_files)  # an earlier swap's copy: put back, or removed
    with atomic_directory(out_dir, PREPARED_KIND, marker_files) as tmp:
        schema = write(tmp)
        schema.root = tmp
        check_split_rows(schema, source, with_label)
        schema.save(os.path.join(tmp, "schema.json"))
    schema.root = out_dir
    return schema
