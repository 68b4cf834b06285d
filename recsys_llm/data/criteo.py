"""Criteo display-ads logs (TSV/CSV) -> Parquet splits + schema, streamed in blocks.

Each line holds ``label, I1..I13, C1..C26``: a 0/1 click label, 13 integer count
features and 26 categorical features as hex strings, any of them possibly empty. As in
DLRM's preprocessing:

* dense ``I_k`` -> ``log(1 + max(x, 0))`` as float32, missing -> 0; a cell that is not a
  number, or not a whole one (``3.5``, ``inf``), is an error naming its line and column;
* categorical ``C_k`` -> FNV-1a hash of the string into ``[1, hash_size)`` (0 = missing; one
  ``hash_size`` for every field, or one per field), so the schema marks them ``hashed`` with
  ``cardinality = hash_size``; a cell that is not hex digits is an error naming its line and
  column;
* rows keep file order (the public Criteo files are ordered by time) and are split
  into train/valid/test by ``split_fractions`` of the line count;
* the output is written whole or not at all: a failed run leaves an earlier one untouched.

The file is read with ``pyarrow.csv.open_csv`` block by block, so memory stays bounded
for the 45M-line Kaggle set or a 4 billion-line Terabyte day; a compressed file (``day_0.gz``,
also ``.bz2``, ``.zst``, ``.lz4``) is decompressed as it is read. A first pass counts the lines
(for the split bounds) with a progress bar over the bytes; with ``max_rows`` it stops there. A
header line is recognised (and skipped) when its label and I1..I13 cells are names (none empty or
a number), e.g. Kaggle's ``Id,Label,I1,...`` (a leading ``Id`` column is dropped). A leading UTF-8 byte order mark
is ignored; blank lines at the end of the file are too, and one before a data line is an error
that names it (skipping it would shift the line numbers of later errors and the split counts).
"""

import contextlib
import dataclasses
import os
import re
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm import tqdm

from recsys_llm.data.compressed import COMPRESSED_SUFFIXES, open_text
from recsys_llm.data.hashing import hash_strings
from recsys_llm.data.parquet_writer import arrow_schema_for, open_split_writers, write_prepared
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.tabular.splits import split_bounds
from recsys_llm.data.validation import DataError, check_labels, check_number, check_split_fractions, reads_as_number
from recsys_llm.progress import bar_options

NUM_DENSE = 13
NUM_SPARSE = 26
DENSE_NAMES: List[str] = [f"I{i}" for i in range(1, NUM_DENSE + 1)]
SPARSE_NAMES: List[str] = [f"C{i}" for i in range(1, NUM_SPARSE + 1)]


@dataclasses.dataclass(frozen=True)
class CriteoConfig:
    """Options of the Criteo conversion.

    Args:
        hash_size (Union[int, Tuple[int, ...]]): rows of every categorical table (ids are hashed
            into it), or 26 sizes, one per ``C1..C26`` (as torchrec's DLRM example's
            ``--num_embeddings_per_feature``: small fields need no table of the largest one's size).
        delimiter (Optional[str]): ``"\\t"`` or ``","``; None guesses from the file name
            (``.csv``, ``.csv.gz`` -> comma, else tab).
        split_fractions (Tuple[float, float, float]): train/valid/test shares, in file order.
        rows_per_group (int): Parquet row group size.
        block_bytes (int): bytes parsed per block.
        max_rows (Optional[int]): convert only the first rows (for a quick look).
    """

    hash_size: Union[int, Tuple[int, ...]] = 1_000_000
    delimiter: Optional[str] = None
    split_fractions: Tuple[float, float, float] = (0.8, 0.1, 0.1)
    rows_per_group: int = 65536
    block_bytes: int = 16 << 20
    max_rows: Optional[int] = None

    def __post_init__(self) -> None:
        check_split_fractions(self.split_fractions, "CriteoConfig.split_fractions")
        if isinstance(self.hash_size, (list, tuple)):
            if len(self.hash_size) != NUM_SPARSE:
                raise ValueError(f"CriteoConfig.hash_size: expected one size or {NUM_SPARSE} (one per C1..C{NUM_SPARSE}), "
                                 f"got {len(self.hash_size)} sizes")
            object.__setattr__(self, "hash_size", tuple(self.hash_size))
            for name, size in zip(SPARSE_NAMES, self.hash_size):  # id 0 is kept for missing values
                check_number(f"CriteoConfig.hash_size of {name}", size, integer=True, minimum=2)
        else:
            check_number("CriteoConfig.hash_size", self.hash_size, integer=True, minimum=2)
        check_number("CriteoConfig.rows_per_group", self.rows_per_group, integer=True, minimum=1)
        check_number("CriteoConfig.block_bytes", self.block_bytes, integer=True, minimum=1)
        check_number("CriteoConfig.max_rows", self.max_rows, integer=True, minimum=1, optional=True)
        if self.delimiter is not None and not (isinstance(self.delimiter, str) and len(self.delimiter) == 1):
            raise ValueError(f"CriteoConfig.delimiter={self.delimiter!r}: expected one character, e.g. ',' or '\\t', "
                             "or None (from the file name)")

    def field_hash_sizes(self) -> Tuple[int, ...]:
        """(26,) rows of each categorical table, ``C1..C26``."""
        if isinstance(self.hash_size, tuple):
            return self.hash_size
        return (self.hash_size,) * NUM_SPARSE


def criteo_schema(config: CriteoConfig) -> DatasetSchema:
    """The schema of a converted Criteo data set (anonymised features: no value text)."""
    fields = [
        FieldSpec(name, FieldKind.DENSE, description=f"anonymised integer count feature {name}, as log(1 + x)")
        for name in DENSE_NAMES
    ] + [
        FieldSpec(name, FieldKind.SPARSE, size, hashed=True,
                  description=f"anonymised categorical feature {name} (hashed hex token)")
        for name, size in zip(SPARSE_NAMES, config.field_hash_sizes())
    ]
    return DatasetSchema(
        name="criteo",
        fields=fields,
        label="label",
        row_key="row_id",
        splits={"train": "train.parquet", "valid": "valid.parquet", "test": "test.parquet"},
    )


def _read(handle: pa.NativeFile, size: int, path: str) -> bytes:
    """Up to ``size`` bytes of ``handle``; a decompression failure (pyarrow's bare ``OSError: Truncated
    compressed stream`` of a cut-short ``day_0.gz``) becomes a :class:`DataError` naming the file."""
    try:
        return handle.read(size)
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error}); expected a complete file (a compressed one cut short, "
                        "e.g. by an interrupted download, or not in the format its suffix names)") from error


def default_delimiter(path: str) -> str:
    """``","`` for a ``.csv`` file (also ``.csv.gz`` etc.), else tab."""
    name = path
    for suffix in COMPRESSED_SUFFIXES:
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return "," if name.lower().endswith(".csv") else "\t"


def _count_data_lines(path: str, limit: Optional[int] = None, progress: bool = False, block: int = 1 << 24) -> int:
    """Lines up to the file's last non-blank one (blank lines at its end, e.g. from ``cat``, are not counted).

    One streaming pass, decompressing a compressed file. With ``limit`` it stops as soon as
    ``limit`` lines are known to come before a non-blank one and returns ``limit``, so
    ``--max-rows`` does not read the rest of a large file. ``progress`` shows the bytes of the file
    read (compressed ones for a compressed file, so the bar has its total there too).
    """
    lines = last = 0  # newlines seen; number of the last line holding a non-blank byte
    raw = pa.OSFile(path)  # its position: the bytes of the file read, also of a compressed one
    bar = tqdm(total=os.path.getsize(path), desc="counting lines", unit="B", unit_scale=True, disable=not progress,
               **bar_options())
    try:
        with raw, open_text(path, raw) as handle:
            while limit is None or last < limit:
                chunk = _read(handle, block, path)
                if not chunk:
                    break
                end = len(chunk.rstrip())  # the chunk's last non-blank byte ends line lines + newlines before it + 1
                if end:
                    last = lines + chunk.count(b"\n", 0, end) + 1
                lines += chunk.count(b"\n")
                bar.update(raw.tell() - bar.n)
    finally:
        bar.close()
    return last if limit is None else min(last, limit)


def _layout(path: str, delimiter: str) -> Tuple[bool, bool]:
    """(has_header, has_id_column) from the first line.

    A UTF-8 byte order mark is dropped (``utf-8-sig``), as pyarrow's CSV reader drops it from the
    data: else a first row ``\ufeff0 ...`` would look like a header and be skipped."""
    head = b""
    with open_text(path) as handle:
        while b"\n" not in head and len(head) < (1 << 20):
            chunk = _read(handle, 1 << 16, path)
            if not chunk:
                break
            head += chunk
    first = head.split(b"\n", 1)[0].decode("utf-8-sig", errors="replace").rstrip("\r").split(delimiter)
    columns = len(first)
    if columns not in (1 + NUM_DENSE + NUM_SPARSE, 2 + NUM_DENSE + NUM_SPARSE):
        raise DataError(
            f"{path}, line 1: {columns} {delimiter!r}-separated columns; expected {1 + NUM_DENSE + NUM_SPARSE} "
            f"(label, I1..I13, C1..C26), optionally after an Id column"
        )
    has_id = columns == 2 + NUM_DENSE + NUM_SPARSE
    # a header names label and I1..I13 (no cell empty or a number); a data line with a bad label
    # (``x``) is not one: it is converted, and refused naming its line, not skipped unseen
    first_numbers = first[int(has_id) : int(has_id) + 1 + NUM_DENSE]
    header = all(cell.strip() and not reads_as_number(cell) for cell in first_numbers)
    return header, has_id


#: pyarrow's message for a cell it cannot convert; its column index counts every column of the
#: line (an Id column too) from 0, and its row number is the line number in the file
_CONVERSION_ERROR = re.compile(r"In CSV column #(\d+): Row #(\d+): CSV conversion error to \w+: invalid value '(.*)'")


class _FirstLines:
    """The first ``lines`` lines of a byte stream (a read-only file object for ``pyarrow.csv``).

    The CSV reader parses whole blocks: without the cut, a line after the last one converted (beyond
    ``max_rows``, or a blank line of spaces or tabs at the end, which the line count leaves out) would
    fail the conversion of lines it keeps."""

    def __init__(self, stream: pa.NativeFile, lines: int, path: str) -> None:
        self._stream = stream
        self._path = path  # named in errors
        self._left = lines  # newlines still to pass on
        self.closed = False

    def read(self, size: int = -1) -> bytes:
        if self._left <= 0:
            return b""
        chunk = _read(self._stream, size, self._path)
        newlines = chunk.count(b"\n")
        if newlines < self._left:
            self._left -= newlines
            return chunk
        end = -1
        for _ in range(self._left):
            end = chunk.index(b"\n", end + 1)
        self._left = 0
        return chunk[: end + 1]

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def close(self) -> None:
        self.closed = True


def _batches(path: str, config: CriteoConfig, delimiter: str, lines: int) -> Iterator[Tuple[int, pa.RecordBatch]]:
    """Yields (first line number, record batch) with columns label, I1..I13 (float64), C1..C26 (string), of the
    file's first ``lines`` lines (a header line included); later lines are not parsed."""
    header, has_id = _layout(path, delimiter)
    names = (["Id"] if has_id else []) + ["label"] + DENSE_NAMES + SPARSE_NAMES
    types = {"label": pa.float64(), **{n: pa.float64() for n in DENSE_NAMES}, **{n: pa.string() for n in SPARSE_NAMES}}
    if has_id:
        types["Id"] = pa.string()
    bad: List[str] = []
    layout = "Id, label, I1..I13, C1..C26" if has_id else "label, I1..I13, C1..C26"

    def on_invalid(row: pacsv.InvalidRow) -> str:
        bad.append(f"{path}, line {row.number}: {row.actual_columns} columns, expected {row.expected_columns} "
                   f"({layout}): {row.text[:80]!r}")
        return "error"

    with open_text(path) as stream:
        try:
            reader = pacsv.open_csv(
                _FirstLines(stream, lines, path),
                read_options=pacsv.ReadOptions(column_names=names, skip_rows=int(header),
                                               block_size=config.block_bytes, use_threads=False),
                parse_options=pacsv.ParseOptions(delimiter=delimiter, quote_char=False, invalid_row_handler=on_invalid,
                                                 ignore_empty_lines=False),
                # only an empty cell is missing: pyarrow's other null markers (NA, NULL, nan, ...) are not
                # Criteo's and would turn a garbled cell into a silent 0 or an empty token
                convert_options=pacsv.ConvertOptions(column_types=types, include_columns=names[int(has_id):],
                                                     null_values=[""], strings_can_be_null=True,
                                                     quoted_strings_can_be_null=True),
            )
            line = 1 + int(header)
            for batch in reader:
                yield line, batch
                line += batch.num_rows
        except pa.ArrowInvalid as error:
            if bad:
                raise DataError(bad[0]) from error
            cell = _CONVERSION_ERROR.search(str(error))
            if cell and int(cell.group(1)) < len(names):
                name = names[int(cell.group(1))]
                expected = "0 or 1" if name == "label" else "an integer count or an empty cell"
                raise DataError(f"{path}, line {cell.group(2)}, column {name}: {cell.group(3)!r} is not a number; "
                                f"expected {expected}") from error
            raise DataError(f"{path}: cannot parse as Criteo {delimiter!r}-separated text "
                            f"(expected numbers in label and I1..I13): {error}") from error


def prepare_criteo(path: str, out_dir: str, config: Optional[CriteoConfig] = None, progress: bool = False) -> DatasetSchema:
    """Converts one Criteo TSV/CSV file into Parquet splits + ``schema.json`` in ``out_dir``.

    The output is built in a temp directory and replaces ``out_dir`` only when complete and
    checked: a failed conversion leaves an earlier output as it was
    (:func:`~recsys_llm.data.parquet_writer.write_prepared`).

    Args:
        path (str): the raw file (e.g. Kaggle ``train.txt`` or a Terabyte ``day_0``).
        out_dir (str): output directory; absent, empty or an earlier prepared data set.
        config (Optional[CriteoConfig]): hashing, delimiter and split options.
        progress (bool): show a tqdm bar over rows.

    Returns:
        DatasetSchema: the written schema.

    Example::

        schema = prepare_criteo("train.txt", "data/criteo", CriteoConfig(hash_size=100_000))
    """
    config = config or CriteoConfig()
    if not os.path.exists(path):
        raise DataError(f"{path}: Criteo file not found")
    return write_prepared(out_dir, path, [path], lambda tmp: _write(path, tmp, config, progress))


def _write(path: str, out_dir: str, config: CriteoConfig, progress: bool) -> DatasetSchema:
    """The conversion into the fresh directory ``out_dir``; returns the schema rooted there (not yet saved)."""
    delimiter = config.delimiter or default_delimiter(path)
    header, has_id = _layout(path, delimiter)
    limit = None if config.max_rows is None else config.max_rows + int(header)
    total = _count_data_lines(path, limit, progress) - int(header)
    if total < 1:
        raise DataError(f"{path}: the file has no data lines; expected label, I1..I13, C1..C26 per line")
    bounds = [0, *split_bounds(config.split_fractions, total), total]  # exact: not the floor of a float sum

    schema = criteo_schema(config)
    schema.root = os.path.abspath(out_dir)
    arrow_schema = arrow_schema_for(schema)
    bar = tqdm(total=total, desc="criteo rows", unit="row", disable=not progress, **bar_options())
    done = 0
    try:
        with contextlib.ExitStack() as open_writers:  # each writer is closed, or on an error its .tmp removed
            writers = open_split_writers(open_writers, schema, arrow_schema, config.rows_per_group)
            for line, batch in _batches(path, config, delimiter, total + int(header)):
                if done >= total:
                    break
                batch = batch.slice(0, total - done)
                columns = _convert(batch, path, line, config, done)
                n = batch.num_rows
                for split, (start, stop) in enumerate(zip(bounds[:-1], bounds[1:])):
                    lo, hi = max(start, done), min(stop, done + n)
                    if lo < hi:
                        writers[split].write({k: v[lo - done : hi - done] for k, v in columns.items()})
                done += n
                bar.update(n)
    except DataError as error:
        if not has_id or header:
            raise  # a header (Kaggle's Id,Label,I1,...) names its Id column: the columns are as the file says
        # else a line ending in a delimiter reads as a shifted line: "column I13: '68fd1e64' is not a number"
        raise DataError(f"{error} (line 1 has {2 + NUM_DENSE + NUM_SPARSE} {delimiter!r}-separated columns, so every "
                        "line is read as Id, label, I1..I13, C1..C26 and its first column dropped as an Id; a line "
                        f"ending in {delimiter!r} has one column too many)") from error
    finally:
        bar.close()
    return schema


def _convert(batch: pa.RecordBatch, path: str, line: int, config: CriteoConfig, row_start: int) -> dict:
    """One parsed block -> output columns (numpy)."""
    label_array = batch.column("label")
    if label_array.null_count:
        first = int(np.argmax(~np.asarray(label_array.is_valid())))
        if all(not column[first].is_valid for column in batch.columns):
            raise DataError(f"{path}, line {line + first}: blank line, or every cell empty; expected label, "
                            "I1..I13, C1..C26")
        raise DataError(f"{path}, line {line + first}: column 'label' is empty; expected 0 or 1")
    labels = label_array.to_numpy(zero_copy_only=False)
    try:
        check_labels(path, "label", labels, line, remedy="the first column of a Criteo line is the click label")
    except DataError as error:
        raise DataError(str(error).replace(": column 'label', row ", ": column 'label', line ")) from error
    columns = {"row_id": np.arange(row_start, row_start + batch.num_rows, dtype=np.int64), "label": labels.astype(np.int8)}
    for name in DENSE_NAMES:
        values = pc.fill_null(batch.column(name), 0.0).to_numpy(zero_copy_only=False)
        whole = np.isfinite(values) & (values == np.floor(values))  # "nan", "inf" and "3.5" parse as doubles
        if not whole.all():
            first = int(np.argmin(whole))
            value = values[first].item()
            # a cell of over 308 digits reads as inf: its text is not the word inf the message would show
            sign = "-" if value < 0 else ""
            shown = (f"'{sign}inf', or a number beyond {sign}1.8e308 (a float64's range)," if np.isinf(value)
                     else repr(value))
            raise DataError(f"{path}, line {line + first}, column {name}: {shown} is not an integer count; expected "
                            "an integer or an empty cell")
        columns[name] = np.log1p(np.maximum(values, 0.0)).astype(np.float32)
    for index, (name, size) in enumerate(zip(SPARSE_NAMES, config.field_hash_sizes())):
        _check_hex(batch.column(name), path, line, name)
        # 68FD1E64 is the token 68fd1e64 (Criteo writes lower case; a re-export may not)
        columns[name] = hash_strings(pc.ascii_lower(batch.column(name)), size, salt=index)
    return columns


_HEX_BYTES = np.zeros(256, dtype=bool)
_HEX_BYTES[np.frombuffer(b"0123456789abcdefABCDEF", dtype=np.uint8)] = True


def _check_hex(array: pa.Array, path: str, line: int, name: str) -> None:
    """Raises unless every cell of a categorical column is a hex token or empty.

    A cell such as ``3.5`` or ``a|b`` means a shifted or garbled line, or a file that is not in
    Criteo's format; it would be hashed like any token and train on it silently.
    """
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    array = pc.fill_null(array.cast(pa.large_string()), "")
    offsets = np.frombuffer(array.buffers()[1], dtype=np.int64)[array.offset : array.offset + len(array) + 1]
    if array.buffers()[2] is None or offsets[-1] == offsets[0]:
        return
    data = np.frombuffer(array.buffers()[2], dtype=np.uint8)[offsets[0] : offsets[-1]]
    ok = _HEX_BYTES[data]
    if not ok.all():
        row = int(np.searchsorted(offsets, offsets[0] + int(np.argmin(ok)), side="right")) - 1
        raise DataError(f"{path}, line {line + row}, column {name}: {array[row].as_py()!r} is not a hex token; "
                        "expected hex digits (e.g. 68fd1e64) or an empty cell (for other tokens: prepare tabular "
                        "with hashed fields)")

