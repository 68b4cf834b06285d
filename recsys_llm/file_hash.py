"""SHA-256 of a file's bytes, read in blocks (model files, checkpoints, exports, data splits)."""

import hashlib


def file_sha256(path: str, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()
