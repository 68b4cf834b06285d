"""SHA-256 of a file's bytes, read in blocks (model files, checkpoints, exports, data splits)."""

import hashlib
import os
from typing import Optional

from tqdm import tqdm

from recsys_llm.progress import interval_options

# a file this large hashed with a description shows a bar (an 8B model's weights take about 35 s)
BAR_BYTES = 1 << 30


def file_sha256(path: str, chunk: int = 1 << 22, description: Optional[str] = None) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time.

    Args:
        description (Optional[str]): the label of a bar over the bytes, shown (on the launcher's rank 0) for a
            file of ``BAR_BYTES`` or more; None: no bar.
    """
    digest = hashlib.sha256()
    size = os.path.getsize(path)
    shown = description is not None and size >= BAR_BYTES and os.environ.get("RANK", "0") == "0"
    with open(path, "rb") as handle, tqdm(total=size, desc=description, unit="B", unit_scale=True, leave=False,
                                          disable=not shown, **interval_options()) as bar:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
