"""Directories written whole or not at all: fill a temp directory, then swap it into place.

Example::

    with atomic_directory("exports/student") as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"))
    # exports/student now holds the new files; a crash inside the block left the old ones
"""

import contextlib
import os
import shutil
import tempfile
from typing import Iterator


def replace_directory(tmp: str, final: str) -> None:
    """Moves the finished directory ``tmp`` to ``final``.

    The previous ``final`` is renamed to ``final.old`` first and removed only after the
    swap, so a reader (e.g. a resuming job) finds a complete copy at one of the two paths
    at any moment.
    """
    old = f"{final}.old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


@contextlib.contextmanager
def atomic_directory(directory: str) -> Iterator[str]:
    """Yields a fresh temp directory beside ``directory``, swapped into place on success.

    On an exception inside the block the temp directory is removed and ``directory`` is
    left as it was.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(os.path.normpath(directory))}.", dir=parent)
    try:
        yield tmp
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
