"""Directories (and small text files) written whole or not at all: fill a temp directory,
then swap it into place.

Example::

    with atomic_directory("exports/student", "export", ("config.json", "model.safetensors")) as tmp:
        save_file(state, os.path.join(tmp, "model.safetensors"))
    # exports/student now holds the new files; a crash inside the block left the old ones

Only an earlier directory of the same kind (one holding all ``marker_files``) is replaced:
any other non-empty directory at that path is refused before anything is written. An output
filled and resumed in place checks its directory with :func:`check_own_entries` instead.
"""

import contextlib
import os
import shutil
import sys
import tempfile
from typing import Callable, Iterator, Sequence


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``path`` through a flushed and fsynced temp file renamed over it: a reader sees
    the old content or the new, never a part."""
    tmp = f"{path}.tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def replace_directory(tmp: str, final: str) -> None:
    """Moves the finished directory ``tmp`` to ``final``, with the permissions the umask gives
    new files and directories (``safetensors.save_file`` and ``mkdtemp`` make owner-only ones).

    The previous ``final`` is renamed to ``final.old`` first and removed only after the
    swap, so a reader (e.g. a resuming job) finds a complete copy at one of the two paths
    at any moment.
    """
    _readable_by_umask(tmp)
    old = f"{final}.old"
    if os.path.exists(old):
        shutil.rmtree(old)
    if os.path.exists(final):
        os.replace(final, old)
    os.replace(tmp, final)
    if os.path.exists(old):
        shutil.rmtree(old)


def check_replaceable(directory: str, kind: str, marker_files: Sequence[str]) -> None:
    """Raises unless ``directory`` is absent, empty, or an earlier ``kind`` (holds ``marker_files``).

    Raises:
        FileExistsError: ``directory`` holds other files, which replacing it would delete.
    """
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise FileExistsError(f"{directory}: exists and is not a directory; choose another output path")
        return
    entries = os.listdir(directory)
    if entries and not all(os.path.isfile(os.path.join(directory, name)) for name in marker_files):
        raise FileExistsError(
            f"{directory}: not empty and not an earlier {kind} (no {', '.join(marker_files)}): writing the "
            f"{kind} there would replace its {len(entries)} entries ({', '.join(sorted(entries)[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); choose another output directory"
        )


def check_own_entries(directory: str, kind: str, is_own: Callable[[str], bool], own_files: str) -> None:
    """Raises unless ``directory`` is absent, empty, or holds only entries a ``kind`` writes.

    For outputs filled in place and resumed there (not swapped in whole, so
    :func:`check_replaceable` does not fit): call it before any work.

    Args:
        directory (str): the output directory.
        kind (str): what is written (for messages), e.g. "vector export".
        is_own (Callable[[str], bool]): whether an entry name is one a ``kind`` writes (it
            may raise itself for a file of the right name but not of the ``kind``).
        own_files (str): the entries a ``kind`` holds (for messages).

    Raises:
        FileExistsError: ``directory`` is a file, or holds an entry of something else
            (the first, by name, is named).
    """
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise FileExistsError(f"{directory}: exists and is not a directory; choose another output path")
        return
    foreign = sorted(name for name in os.listdir(directory) if not is_own(name))
    if foreign:
        more = f" (and {len(foreign) - 1} more)" if len(foreign) > 1 else ""
        raise FileExistsError(
            f"{directory}: not empty and not an earlier {kind}: {foreign[0]!r}{more} is not one of its entries "
            f"({own_files}); writing the {kind} there would mix it with other files; choose another (or an "
            "empty) output directory"
        )


def current_umask() -> int:
    """The process umask, read from ``/proc/self/status`` where it is (setting it to read it,
    the fallback, briefly changes it for every thread)."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0)
    os.umask(umask)
    return umask


def chmod_as_created(path: str) -> None:
    """Gives ``path`` the mode ``open()`` would have (``0o666 & ~umask``).

    ``safetensors.save_file`` creates its files with mode 0600, so other users (or pods) of
    a shared cluster could not read them; call this on the temp file before renaming it.
    """
    os.chmod(path, 0o666 & ~current_umask())


def _readable_by_umask(tmp: str) -> None:
    """``mkdtemp`` makes a 0700 directory: give it (and what is in it) the permissions of a
    directory created with ``os.makedirs``, so other users may read the result as usual."""
    umask = current_umask()
    os.chmod(tmp, 0o777 & ~umask)
    for root, dirs, files in os.walk(tmp):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # chmod would change a link's target
                os.chmod(path, mode & ~umask)


@contextlib.contextmanager
def atomic_directory(directory: str, kind: str, marker_files: Sequence[str]) -> Iterator[str]:
    """Yields a fresh temp directory beside ``directory``, swapped into place on success.

    Args:
        directory (str): the final directory.
        kind (str): what is written (for messages), e.g. "export".
        marker_files (Sequence[str]): files every ``kind`` directory has; an existing
            non-empty ``directory`` without them is refused (:func:`check_replaceable`).

    On an exception inside the block (Ctrl-C, and SIGTERM in the ``recsys-llm`` commands,
    included) the temp directory is removed and ``directory`` is left as it was. A process
    killed outright (SIGKILL, a lost machine) leaves its temp directory: the next run names
    such leftovers (it cannot tell them from another run's that is still writing).
    """
    check_replaceable(directory, kind, marker_files)
    check_replaceable(f"{directory}.old", kind, marker_files)  # the swap removes it too
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    prefix = f".{os.path.basename(os.path.normpath(directory))}."
    leftovers = sorted(name for name in os.listdir(parent)
                       if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)))
    if leftovers:
        print(f"[recsys_llm] {parent}: {', '.join(leftovers)} left by an earlier {kind} of {directory} that was "
              "killed (or is still running); delete them once no other run writes there", file=sys.stderr)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
