"""SHA-256 of a file's bytes, read in blocks (model files, checkpoints, exports, data splits)."""

import hashlib
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence

from tqdm import tqdm

from recsys_llm.host_memory import ranks_on_host
from recsys_llm.progress import bar_options

# files this large hashed with a description show a bar (an 8B model's weights take about 35 s on one core)
BAR_BYTES = 1 << 30


def file_sha256(path: str, chunk: int = 1 << 22, description: Optional[str] = None) -> str:
    """Hex SHA-256 of a file's bytes, read ``chunk`` bytes at a time.

    Args:
        description (Optional[str]): the label of a bar over the bytes, shown (on the launcher's rank 0) for a
            file of ``BAR_BYTES`` or more; None: no bar.
    """
    return files_sha256([path], description, chunk)[0]


def files_sha256(paths: Sequence[str], description: Optional[str] = None, chunk: int = 1 << 22) -> List[str]:
    """Hex SHA-256 of each file of ``paths``, in their order, hashed side by side on this rank's share of the
    CPUs: hashlib hashes a large block without the GIL, so a model's weight shards take about the time of one.

    Args:
        paths (Sequence[str]): the files.
        description (Optional[str]): the label of one bar over all their bytes, shown (on the launcher's rank 0)
            when they add up to ``BAR_BYTES`` or more; None: no bar.
        chunk (int): bytes read at a time.
    """
    sizes = [os.path.getsize(path) for path in paths]
    shown = description is not None and sum(sizes) >= BAR_BYTES and os.environ.get("RANK", "0") == "0"
    # the ranks of one host hash the same files at the same time: each takes its share of the cores
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    threads = min(len(paths), max(1, cores // ranks_on_host()))
    with tqdm(total=sum(sizes), desc=description, unit="B", unit_scale=True, leave=False, disable=not shown,
              **bar_options()) as bar:
        if threads <= 1:
            return [_sha256(path, chunk, bar.update) for path in paths]
        lock = threading.Lock()  # tqdm's update adds to its count unlocked: threads would lose blocks

        def counted(size: int) -> None:
            with lock:
                bar.update(size)

        with ThreadPoolExecutor(threads, thread_name_prefix="sha256") as pool:
            return list(pool.map(lambda path: _sha256(path, chunk, counted), paths))


def _sha256(path: str, chunk: int, on_block: Callable[[int], object]) -> str:
    """Hex SHA-256 of the file at ``path``; ``on_block(n)`` after each block of ``n`` bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(chunk), b""):
            digest.update(block)
            on_block(len(block))
    return digest.hexdigest()
