"""A split's Parquet files, found and checked from their footers alone: no row data and no torch,
so converters and the command line's ``--help`` stay light (the reader is :mod:`recsys_llm.data.parquet`)."""

import glob
import hashlib
import json
import os
from typing import Iterator, List, Sequence, Tuple, Union

import pyarrow as pa
import pyarrow.parquet as pq

from recsys_llm.data.schema import DatasetSchema, schema_file
from recsys_llm.data.validation import (
    DataError,
    check_file_schema,
    check_labels,
    check_no_nulls,
    check_split_has_rows,
    open_parquet,
    read_row_group,
)
from recsys_llm.file_hash import file_sha256


def parquet_files(path: str) -> List[str]:
    """A Parquet file, or the sorted ``*.parquet`` files directly in a directory (what a
    split directory holds; other files, such as ``*.tmp`` leftovers, are not data).

    Raises:
        DataError: no such file or directory, a directory without ``*.parquet`` files, or a
            prepared data set's directory that holds several of its splits' files (read as one
            split, they would be mixed).
    """
    if os.path.isdir(path):
        found = sorted(glob.glob(os.path.join(path, "*.parquet")))
        partitions, unnamed = _data_left_unread(path)
        if partitions:  # Hive/Spark partitionBy: its rows (and the partition column, in the names) would be lost
            raise DataError(f"{path}: holds Hive-style partition directories {partitions[:3]}"
                            f"{' ...' if len(partitions) > 3 else ''}, which are not read (only the *.parquet files "
                            "directly in the directory are, and a partition column lives only in the directory "
                            "names); expected the files directly in it, with the partition column written into them "
                            "(e.g. pyarrow.dataset.dataset(path, partitioning='hive') written out as one directory)")
        if unnamed:  # a Parquet file of another name would be silently left out of the split
            raise DataError(f"{path}: {os.path.join(path, unnamed[0])} is a Parquet file not named *.parquet"
                            f"{f' (and {len(unnamed) - 1} more)' if len(unnamed) > 1 else ''}, which a directory's "
                            "reading would leave out; expected every data file of the directory named *.parquet "
                            "(rename it, or move it out)")
        if not found:
            raise DataError(f"{path}: directory holds no *.parquet files")
        splits = _splits_filed_in(path)
        if len(splits) > 1:
            raise DataError(f"{path}: a prepared data set's directory, holding the files of its splits {splits} "
                            "(its schema.json); read as one split they would be mixed: name one split (e.g. "
                            f"{splits[-1]!r}) or one of the files")
        return found
    if not os.path.exists(path):
        raise DataError(f"{path}: no such Parquet file or directory")
    return [path]


def _data_left_unread(directory: str) -> Tuple[List[str], List[str]]:
    """Entries of ``directory`` that look like data but are not among its ``*.parquet`` files: Hive-style
    partition directories (``dt=2026-12-01``), and files of another name that start and end with Parquet's magic
    bytes (``*.pq``, ``*.PARQUET``, Hive's ``000000_0``). Names starting with ``.`` or ``_`` (Spark's ``_SUCCESS``,
    ``.crc`` files, ``_temporary``) and ``*.tmp`` leftovers are not data."""
    partitions, unnamed = [], []
    for name in sorted(os.listdir(directory)):
        if name.startswith((".", "_")) or name.endswith((".parquet", ".tmp")):
            continue
        full = os.path.join(directory, name)
        if os.path.isdir(full):
            if "=" in name.strip("="):
                partitions.append(name)
            continue
        try:
            with open(full, "rb") as handle:
                head = handle.read(4)
                handle.seek(-4, os.SEEK_END)
                if head == b"PAR1" and handle.read(4) == b"PAR1":
                    unnamed.append(name)
        except OSError:  # unreadable or shorter than 4 bytes: no Parquet file
            continue
    return partitions, unnamed


def _splits_filed_in(directory: str) -> List[str]:
    """The splits that ``directory/schema.json`` places as files directly in ``directory`` (none without one)."""
    try:
        with open(schema_file(directory), encoding="utf-8") as handle:
            splits = json.load(handle).get("splits", {})
    except (OSError, ValueError, AttributeError, RecursionError):  # no schema.json, or not one: no data set's
        return []
    if not isinstance(splits, dict):
        return []
    here = os.path.realpath(directory)
    return sorted(name for name, path in splits.items() if isinstance(path, str)
                  and os.path.isfile(os.path.join(directory, path))
                  and os.path.realpath(os.path.dirname(os.path.join(directory, path))) == here)


def resolve_paths(schema: DatasetSchema, split_or_paths: Union[str, Sequence[str]]) -> List[str]:
    """Split name, file, directory of ``*.parquet`` or list of those -> their files (a directory's sorted), in
    the order named; a file named twice (a directory and a file in it) is a DataError."""
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
    named = {}
    for path in paths:
        real = os.path.realpath(path)
        if real in named:  # its rows would be read twice (a directory and a file in it, one file named twice)
            raise DataError(f"{path}: named twice among the split's files {items} (also as {named[real]}); expected "
                            "each file once")
        named[real] = path
    return paths


def label_row_groups(schema: DatasetSchema, split: Union[str, Sequence[str]]) -> Iterator[Tuple[str, int, pa.Array]]:
    """``(file, its row of the group's first label, the group's labels)`` of every row group of ``split`` (a split
    name, file or directory: :func:`resolve_paths`), read one row group at a time."""
    for path in resolve_paths(schema, split):
        handle = open_parquet(path)
        offset = 0
        for group in range(handle.num_row_groups):
            labels = read_row_group(handle, path, group, [schema.label]).column(0).combine_chunks()
            yield path, offset, labels
            offset += len(labels)


def check_split_labels(schema: DatasetSchema, split: str) -> None:
    """Raises unless every label of ``split`` is 0 or 1 (no null), as training reads them; one row group at a time.

    Raises:
        DataError: naming the file, the label column and the row of the first bad label.
    """
    for path, offset, labels in label_row_groups(schema, split):
        check_no_nulls(path, schema.label, labels, offset, "0 or 1")
        check_labels(path, schema.label, labels.to_numpy(zero_copy_only=False), offset)


# splits up to this size are also fingerprinted by their bytes (about 0.3 s at most)
CONTENT_FINGERPRINT_MAX_BYTES = 256 * 2**20


def split_fingerprint(schema: DatasetSchema, split: str,
                      content_max_bytes: int = CONTENT_FINGERPRINT_MAX_BYTES) -> str:
    """A hash of the Parquet footers of ``split``'s files (row counts, row groups, sizes, column
    statistics), read without any row data, and for a split of at most ``content_max_bytes``
    ``+`` a hash of its files' bytes: the same for a copy or an identical re-preparation of the
    data, different for other rows (new data behind the same fields and sizes). The footers alone
    miss rows changed within the same statistics (two labels swapped); the bytes do not, where
    reading them is cheap. Compare two with :func:`same_split_fingerprint`. ``split``: a split name of ``schema``, or
    a Parquet file or directory of its columns (:func:`resolve_paths`)."""
    footers, contents = hashlib.sha256(), hashlib.sha256()
    root = schema.split_path(split) if split in schema.splits else split
    paths = resolve_paths(schema, split)
    for path in paths:
        metadata = pq.ParquetFile(path).metadata.to_dict()
        footers.update(os.path.relpath(path, root).encode())
        footers.update(json.dumps(metadata, sort_keys=True, default=str).encode())
    if sum(os.path.getsize(path) for path in paths) > content_max_bytes:
        return footers.hexdigest()[:16]
    for path in paths:
        contents.update(f"{os.path.relpath(path, root)}:{file_sha256(path)}\n".encode())
    return f"{footers.hexdigest()[:16]}+{contents.hexdigest()[:16]}"


def same_split_fingerprint(first: str, second: str) -> bool:
    """Whether two :func:`split_fingerprint` values say the same data: their footer hashes agree, and their
    content hashes too where both have one (a split over the size limit, or a record of an older version,
    has none)."""
    first_footers, _, first_contents = str(first).partition("+")
    second_footers, _, second_contents = str(second).partition("+")
    return first_footers == second_footers and (not first_contents or not second_contents
                                                or first_contents == second_contents)


def first_file_columns(schema: DatasetSchema, split_or_paths: Union[str, Sequence[str]]) -> List[str]:
    """The column names of the first file of a split (name, file, directory or list, as :func:`resolve_paths`
    takes it), from its footer: whether the split has labels or row keys (its files agree, as the reader checks)."""
    return list(open_parquet(resolve_paths(schema, split_or_paths)[0]).schema_arrow.names)


def read_schema_and_check(
    schema: DatasetSchema, path: str, extras: Sequence[str] = (), with_label: bool = True
) -> int:
    """Cheap footer-only check of a split, file or directory against ``schema`` (``with_label``: with its label
    column; False: rows to score, with or without one).

    Checks that every file opens, has the schema's columns with the right Arrow types and was
    written for the same field specs, and that the split has rows (a file of it may be empty);
    reads no row data.

    Returns:
        int: total number of rows.

    Raises:
        DataError: naming the file and column.
    """
    total = 0
    paths = resolve_paths(schema, path)
    for file_path in paths:
        handle = open_parquet(file_path)
        check_file_schema(file_path, schema, handle.schema_arrow, extras, with_label=with_label)
        total += handle.metadata.num_rows
    check_split_has_rows(paths, total)
    return total
