"""The compression of an input text file (a CSV, a Criteo TSV): by its name's suffix, as pyarrow's CSV reader
takes it, else by its first bytes, so a ``clicks.csv`` saved from a ``clicks.csv.gz`` download, or a Windows
``CLICKS.CSV.GZ``, is read as the text it holds rather than as columns of binary."""

from typing import Optional

import pyarrow as pa

#: compressed inputs pyarrow opens by their name (Terabyte days are published as ``day_N.gz``)
COMPRESSED_SUFFIXES = (".gz", ".bz2", ".zst", ".lz4")

#: leading bytes of the compressed formats (bzip2's ``BZh`` is followed by its block size, a digit 1-9)
_MAGIC_CODECS = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\x04\x22\x4d\x18", "lz4"))


def codec_of(path: str) -> Optional[str]:
    """pyarrow's name of the compression of the file at ``path`` (``"gzip"``, ``"bz2"``, ``"zstd"``, ``"lz4"``):
    by its suffix (in any case), else by its first bytes; None when plain. A plain file named ``.gz`` is taken
    as gzip (its read fails, naming the file)."""
    lowered = path.lower()
    if lowered.endswith(COMPRESSED_SUFFIXES):
        return pa.Codec.detect(lowered).name
    with open(path, "rb") as handle:
        head = handle.read(4)
    if head[:3] == b"BZh" and head[3:4].isdigit() and head[3:4] != b"0":
        return "bz2"
    return next((codec for magic, codec in _MAGIC_CODECS if head.startswith(magic)), None)


def open_text(path: str, opened: Optional[pa.NativeFile] = None) -> pa.NativeFile:
    """The bytes of the file at ``path`` (read from ``opened``, that file opened, where given), decompressed as
    :func:`codec_of` names."""
    return pa.input_stream(path if opened is None else opened, compression=codec_of(path))
