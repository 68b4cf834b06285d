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
import errno
import fcntl
import os
import re
import shutil
import signal
import stat
import sys
import tempfile
import threading
import uuid
import warnings
from typing import IO, Any, Callable, Dict, Iterator, List, Optional, Sequence


def write_file_atomically(path: str, write: Callable[[IO[Any]], object], binary: bool = True) -> None:
    """Calls ``write`` on ``<path>.<id>.tmp`` (bytes, or text in UTF-8), flushes and fsyncs it, and renames it
    over ``path``; a failure (a full disk, Ctrl-C) removes the temp file and leaves ``path`` as it was.
    The temp file is the writer's own: two processes writing ``path`` at once leave one's content whole
    (the last renamed), never a mix of both. A ``path`` that is a symbolic link is written where it points,
    the link kept (as ``open(path, "w")`` and :func:`atomic_directory` do).

    Example::

        write_file_atomically("split.parquet", lambda handle: pq.write_table(table, handle))
    """
    if os.path.islink(path):  # ``current.safetensors -> v3.safetensors``: v3 is rewritten
        path = os.path.realpath(path)
    tmp = f"{path}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        with open(tmp, "wb") if binary else open(tmp, "w", encoding="utf-8") as handle:
            write(handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        if isinstance(error, OSError):
            name_written_file(error, path)  # the file meant (a cache beside the output), not the command's output
        raise


def name_written_file(error: OSError, path: str) -> None:
    """Puts ``path`` on the OSError of a write that names no file (a full disk in ``write`` or ``fsync``,
    pyarrow's "Error writing bytes to file"), so its one line says which file. One without an errno (a
    library's ``OSError("message")``) is left as it is: a file name would replace its message."""
    if error.filename is None and error.strerror is not None:
        error.filename = path


def link_into_place(tmp: str, path: str) -> bool:
    """Gives the finished file ``tmp`` the name ``path`` unless ``path`` exists by then (another process's file,
    written at the same time): False then, both left as they are. Linked, not renamed, so an existing ``path`` is
    never replaced; on a file system without hard links (some network and FUSE ones) renamed over it, after a
    check that it is not there. The caller removes ``tmp`` (linked, it is a second name of ``path``)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    except OSError:  # no hard links
        if os.path.lexists(path):
            return False
        os.replace(tmp, path)
    return True


def is_temp_file_of(name: str, file_name: str) -> bool:
    """Whether the entry ``name`` is a temp file :func:`write_file_atomically` of ``file_name`` (in the same
    directory) leaves when killed outright: ``<file_name>.<id>.tmp``, or ``<file_name>.tmp`` of older versions."""
    return name == f"{file_name}.tmp" or re.fullmatch(re.escape(file_name) + r"\.[0-9a-f]{8}\.tmp", name) is not None


def write_text_atomically(path: str, text: str) -> None:
    """Writes ``path`` through a flushed and fsynced temp file renamed over it: a reader sees
    the old content or the new, never a part. A write that fails (a full disk, Ctrl-C) removes the
    temp file: a re-run would find it as an entry of something else in ``path``'s directory."""
    write_file_atomically(path, lambda handle: handle.write(text), binary=False)


def write_bytes_atomically(path: str, payload: bytes) -> None:
    """Writes ``payload`` to ``path`` as :func:`write_text_atomically` writes text (e.g. the bytes of
    ``safetensors.torch.save``): readable as the umask allows, fsynced, renamed over ``path``."""
    write_file_atomically(path, lambda handle: handle.write(payload), binary=True)


def save_figure_atomically(figure: Any, path: str, **savefig_kwargs: Any) -> None:
    """Saves a matplotlib ``figure`` to ``path`` as :func:`write_text_atomically` writes text (the format
    follows ``path``'s suffix, matplotlib's default without one): a failed save keeps an earlier ``path`` whole.

    Args:
        figure (matplotlib.figure.Figure): the figure.
        path (str): the image file.
        **savefig_kwargs: passed to ``figure.savefig`` (dpi, bbox_inches, ...).
    """
    image_format = os.path.splitext(path)[1][1:] or None
    write_file_atomically(path, lambda handle: figure.savefig(handle, format=image_format, **savefig_kwargs), binary=True)


DEFERRED_SIGNALS = (signal.SIGINT, signal.SIGTERM)
REMOVING_SUFFIX = ".removing-"  # hidden name of a directory being deleted: .<name>.removing-<id>


@contextlib.contextmanager
def signals_deferred() -> Iterator[None]:
    """Ctrl-C and SIGTERM that arrive in the block take effect when it ends.

    Python runs signal handlers between any two bytecodes: a SIGTERM turned into an exception
    between the two renames of a swap would leave neither the old nor the new directory in
    place. Handlers can only be changed from the main thread; elsewhere the block runs as is.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    arrived: List[int] = []
    previous: Dict[int, object] = {}
    for number in DEFERRED_SIGNALS:
        handler = signal.getsignal(number)
        if handler not in (signal.SIG_IGN, None):
            previous[number] = signal.signal(number, lambda received, frame: arrived.append(received))
    try:
        yield
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)
        for number in dict.fromkeys(arrived):
            signal.raise_signal(number)


# flock(2)'s errors on a file system that has no locks (not another holder's: BlockingIOError)
UNLOCKABLE_ERRNOS = frozenset({errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP})
LOCK_FILE = ".lock"  # in an output a job fills in place: locked by the job writing there (directory_locked)
SWAP_LOCK_SUFFIX = ".lock"  # beside an output swapped in whole: ``.<name>.lock``, held by its writer (atomic_directory)


class TryAgainLater(Exception):
    """A mark of the errors that the input did not cause: another job holds a lock on what this one would write, or
    changed it while this one started. The same command, once that job has ended, goes on (``recsys-llm`` exits with
    ``EX_TEMPFAIL``, 75, for them, as for a full disk)."""


class LockHeldError(FileExistsError, TryAgainLater):
    """Another process holds the lock of what this one would write (:func:`file_locked`)."""


def try_lock(path: str, wait: bool = False) -> Optional[IO[str]]:
    """The file ``path`` (created) opened with an exclusive flock(2) lock on it, held until the
    handle is closed or its process ends (even by SIGKILL); None when another process holds it
    (``wait``: once the other process lets it go)."""
    try:
        handle = open(path, "a", encoding="utf-8")
    except PermissionError:
        if not os.path.isfile(path):
            raise
        # another user's lock file (a killed job's, or a run's ``.lock``, made under a umask that gave others no
        # write): flock(2) takes an exclusive lock on a file opened for reading too
        handle = open(path, encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    except OSError as error:
        if error.errno == errno.EBADF and "r" in handle.mode:
            # an NFS client emulates flock(2) with byte-range locks, which need the file open for writing
            handle.close()
            raise PermissionError(errno.EACCES, "another user's lock file, which this user can neither write nor "
                                  "lock here; its owner (or an administrator) may delete it once no job runs", path)
        if error.errno not in UNLOCKABLE_ERRNOS:
            handle.close()
            raise
        # Lustre without its flock option, NFSv3 without lockd: the job goes on unguarded
        warnings.warn(f"{path}: this file system takes no locks ({os.strerror(error.errno)}); nothing stops a "
                      "second job from writing the same output at the same time", stacklevel=3)
    return handle


@contextlib.contextmanager
def directory_locked(directory: str, refusal: str) -> Iterator[None]:
    """Creates ``directory`` and holds an exclusive lock on its ``.lock`` file in the block
    (:func:`file_locked`).

    Raises:
        LockHeldError: ``refusal``, when another process holds the lock.
    """
    os.makedirs(directory, exist_ok=True)
    with file_locked(os.path.join(directory, LOCK_FILE), refusal):
        yield


@contextlib.contextmanager
def file_locked(path: str, refusal: str, wait: bool = False) -> Iterator[None]:
    """Holds an exclusive lock on the file ``path`` (created) in the block, removing the file at its
    end. The lock is flock(2)'s: its process ending (even by SIGKILL) releases it, so the file a
    killed job leaves is no lock; other hosts see it on NFSv4, maybe not on other network file systems.

    Args:
        wait (bool): wait for another process holding the lock to let it go, instead of refusing.

    Raises:
        LockHeldError: ``refusal``, when another process holds the lock (and ``wait`` is False).
    """
    while True:
        handle = try_lock(path, wait)
        if handle is None:
            raise LockHeldError(refusal)
        try:
            if os.path.samestat(os.fstat(handle.fileno()), os.stat(path)):
                break
        except FileNotFoundError:
            pass
        handle.close()  # the file the job before removed as it ended: lock the one at the path now
    try:
        yield
    finally:
        try:
            os.remove(path)  # while still locked: a job that opened it meanwhile locks it and tries again
        except PermissionError:
            pass  # another user's file in a sticky directory: left, no lock once closed (the next job locks it)
        finally:
            handle.close()


def remove_directory(path: str, owner: Optional[str] = None) -> None:
    """Removes the directory ``path``, if any, by renaming it to a hidden name beside it first:
    a kill during the deletion leaves a hidden ``.<owner>.removing-*`` directory that the next
    run names, never a partly deleted ``path``. ``owner``: the output the leftover is named
    after (default: ``path``'s name without a ``.old`` suffix)."""
    if os.path.islink(path):  # the link alone (rmtree refuses links; what it points at is not ours to delete)
        os.unlink(path)
        return
    if not os.path.exists(path):
        return
    parent, name = os.path.split(os.path.abspath(path))
    trash = os.path.join(parent, f".{owner or name.removesuffix('.old')}{REMOVING_SUFFIX}{uuid.uuid4().hex[:8]}")
    os.replace(path, trash)
    shutil.rmtree(trash)


def is_removal_leftover(name: str, directory_name: str) -> bool:
    """Whether ``name`` is what :func:`remove_directory` of ``directory_name`` (or of its
    ``.old``) leaves when killed."""
    return name.startswith(f".{directory_name}{REMOVING_SUFFIX}")


def fsync_directory(path: str) -> None:
    """Flushes the directory ``path``'s entries (names created, renamed or removed) to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str) -> None:
    """Flushes the closed file ``path``'s content to disk (before a rename publishes it)."""
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def fsync_tree(path: str) -> None:
    """Flushes every file under ``path`` and the directories themselves to disk, so a rename that
    publishes ``path`` cannot outlive its content in a power loss."""
    for root, _, files in os.walk(path):
        for name in files:
            fsync_file(os.path.join(root, name))
        fsync_directory(root)


def swapped_out_path(directory: str) -> str:
    """Where :func:`atomic_directory` keeps the previous ``directory`` during its swap: the hidden
    ``.<name>.old`` beside it (a visible ``<name>.old`` may be a user's own backup copy)."""
    parent, name = os.path.split(os.path.normpath(os.path.abspath(directory)))
    return os.path.join(parent, f".{name}.old")


def replace_directory(tmp: str, final: str, old: Optional[str] = None) -> None:
    """Moves the finished directory ``tmp`` to ``final``, with the permissions the umask gives
    new files and directories (``safetensors.save_file`` and ``mkdtemp`` make owner-only ones).

    The previous ``final`` is renamed to ``old`` (default ``final.old``) first and removed only
    after the swap, so a reader (e.g. a resuming job) finds a complete copy at one of the two paths
    at any moment; Ctrl-C and SIGTERM wait until both renames are done. An ``old``
    without ``final`` (a process killed outright between the renames) is the previous copy and
    goes back to ``final`` first; beside ``final`` it is a finished swap's, and is removed.
    ``tmp``'s files are flushed to disk before the swap, and the parent's entries after it.
    """
    final = os.path.normpath(final)  # ``out/``: its ``.old`` is ``out.old``, not ``out/.old`` (a rename into itself)
    old = old or f"{final}.old"
    owner = os.path.basename(final)
    _readable_by_umask(tmp)
    fsync_tree(tmp)
    if os.path.exists(old):
        if os.path.exists(final):
            remove_directory(old, owner)
        else:
            os.replace(old, final)
    with signals_deferred():
        swapped_out = os.path.exists(final)
        if swapped_out:
            os.replace(final, old)
        try:
            os.replace(tmp, final)
        except BaseException:
            # the new copy could not take its name (EIO, ENOSPC of a full directory): the previous one
            # goes back to ``final``, not left under its hidden name until the next run puts it back
            if swapped_out:
                with contextlib.suppress(OSError):
                    os.replace(old, final)
            raise
    fsync_directory(os.path.dirname(os.path.abspath(final)))
    remove_directory(old, owner)


def holds_files(directory: str, marker_files: Sequence[str]) -> bool:
    """Whether ``directory`` holds every one of ``marker_files`` (an earlier output of their kind)."""
    return all(os.path.isfile(os.path.join(directory, name)) for name in marker_files)


def check_writable(path: str, in_place: bool = False) -> None:
    """Raises when ``path`` cannot be written where it goes: the nearest existing directory of its parent
    (where a temp file or directory is made and renamed), or with ``in_place`` of ``path`` itself (a
    directory filled in place), refuses this user's writes, or lies on a read-only mount, which a
    command would otherwise find only once its work is done.

    Raises:
        PermissionError: naming ``path`` and that directory.
    """
    parent = os.path.abspath(path) if in_place else os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise PermissionError(f"{path}: cannot be written: {parent} is not writable here (permissions, or a "
                              "read-only mount); choose another path")


def check_no_file_above(directory: str) -> str:
    """Raises when the nearest existing directory above ``directory`` (absent) is a file, where
    making ``directory`` would fail only once its contents are ready ('[Errno 17] File exists').

    Returns:
        str: that nearest existing directory (where the missing ones would be made).

    Raises:
        FileExistsError: naming ``directory`` and the file in its way.
    """
    parent = os.path.dirname(os.path.abspath(directory))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    if not os.path.isdir(parent):
        raise FileExistsError(f"{directory}: {parent} is a file, not a directory; choose another output path")
    return parent


def check_replaceable(directory: str, kind: str, marker_files: Sequence[str]) -> None:
    """Raises unless ``directory`` is absent, empty, or an earlier ``kind`` (holds ``marker_files``).

    Raises:
        FileExistsError: ``directory`` holds other files, which replacing it would delete, or is
            (or lies under) a file.
        PermissionError: the directory it is swapped in from cannot be written (:func:`check_writable`), or
            the earlier ``kind`` cannot be deleted (a directory of it this user cannot write in).
    """
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise FileExistsError(f"{directory}: exists and is not a directory; choose another output path")
        check_no_file_above(directory)
        check_writable(os.path.realpath(directory))  # a link to an output is written where it points
        return
    check_writable(os.path.realpath(directory))
    entries = os.listdir(directory)
    if entries and not holds_files(directory, marker_files):
        raise FileExistsError(
            f"{directory}: not empty and not an earlier {kind} (no {', '.join(marker_files)}): writing the "
            f"{kind} there would replace its {len(entries)} entries ({', '.join(sorted(entries)[:5])}"
            f"{', ...' if len(entries) > 5 else ''}); choose another output directory"
        )
    for root, _, _ in os.walk(directory) if entries else ():
        # the swap renames the earlier copy aside, then deletes it: another user's copy (made under umask 022 in a
        # group-shared directory) would be replaced, and the command fail after its work, leaving it there hidden
        if not os.access(root, os.W_OK | os.X_OK):
            raise PermissionError(
                f"{directory}: an earlier {kind} that this user cannot replace: deleting it needs writing in {root} "
                "(another user's output?); ask its owner to remove it, or choose another output directory"
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
        FileExistsError: ``directory`` is (or lies under) a file, or holds an entry of something
            else (the first, by name, is named).
        PermissionError: ``directory`` cannot be written in (:func:`check_writable`).
    """
    if not os.path.isdir(directory):
        if os.path.exists(directory):
            raise FileExistsError(f"{directory}: exists and is not a directory; choose another output path")
        check_no_file_above(directory)
        check_writable(os.path.realpath(directory), in_place=True)
        return
    check_writable(os.path.realpath(directory), in_place=True)
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


def _readable_by_umask(tmp: str) -> None:
    """``mkdtemp`` makes a 0700 directory: give it (and what is in it) the permissions of a
    directory created with ``os.makedirs``, so other users may read the result as usual. A directory's
    set-group-ID bit (inherited from a group-shared parent, as ``os.makedirs`` would have it) is kept: files
    written there later go on taking the directory's group."""
    umask = current_umask()
    _chmod_keeping_setgid(tmp, 0o777 & ~umask)
    for root, dirs, files in os.walk(tmp):
        for name, mode in [(d, 0o777) for d in dirs] + [(f, 0o666) for f in files]:
            path = os.path.join(root, name)
            if not os.path.islink(path):  # chmod would change a link's target
                _chmod_keeping_setgid(path, mode & ~umask)


def _chmod_keeping_setgid(path: str, mode: int) -> None:
    """``os.chmod(path, mode)``, keeping the set-group-ID bit of a directory that has it (a plain chmod clears it)."""
    current = os.lstat(path).st_mode
    if stat.S_ISDIR(current):
        mode |= current & stat.S_ISGID
    os.chmod(path, mode)


@contextlib.contextmanager
def atomic_directory(directory: str, kind: str, marker_files: Sequence[str]) -> Iterator[str]:
    """Yields a fresh temp directory beside ``directory``, swapped into place on success.

    Args:
        directory (str): the final directory.
        kind (str): what is written (for messages), e.g. "export".
        marker_files (Sequence[str]): files every ``kind`` directory has; an existing
            non-empty ``directory`` without them is refused (:func:`check_replaceable`).

    The writer holds ``.<name>.lock`` beside ``directory`` in the block: a second writer of the same
    output is refused (``FileExistsError``) before it starts. On an exception inside the block
    (Ctrl-C, and SIGTERM in the ``recsys-llm`` commands, included) the temp directory is removed
    and ``directory`` is left as it was. A process killed outright (SIGKILL, a lost machine) leaves
    its temp directory: the next run names such leftovers.
    """
    directory = os.path.normpath(directory)  # ``out/`` is ``out``: its earlier copy goes to ``.out.old`` beside it
    if os.path.islink(directory):  # ``current -> v3``: written at v3, the link kept (as open() writes a link's file)
        directory = os.path.realpath(directory)
    check_replaceable(directory, kind, marker_files)  # again once locked; here before anything is made
    parent = os.path.dirname(os.path.abspath(directory))
    os.makedirs(parent, exist_ok=True)
    name = os.path.basename(directory)
    lock = os.path.join(parent, f".{name}{SWAP_LOCK_SUFFIX}")
    # two writers of one output would interleave their checks and renames (a finished output thrown
    # away, a swap reported failed that had succeeded): the second is refused before any work
    with file_locked(lock, f"{directory}: another {kind} is writing it (it holds {lock}); wait for it to end, or "
                           "write elsewhere"):
        old = swapped_out_path(directory)
        if os.path.isdir(old) and holds_files(old, marker_files):
            if os.path.exists(directory):
                remove_directory(old, name)  # a finished swap's, killed before it removed the previous copy
            else:
                os.replace(old, directory)  # a process killed between the two renames of its swap
                print(f"[recsys_llm] {directory}: put back from {old}, where an earlier {kind} killed while swapping "
                      "in its output had left it", file=sys.stderr)
        check_replaceable(directory, kind, marker_files)
        try:
            check_replaceable(old, kind, marker_files)  # the swap removes it too
        except FileExistsError as error:
            raise FileExistsError(f"{error}; if it is what is left of an earlier {kind} killed while it swapped "
                                  "its output in, delete it") from None
        legacy = f"{directory}.old"  # where versions before 2026-12-05 kept the previous output during a swap
        if os.path.isdir(legacy) and holds_files(legacy, marker_files):
            print(f"[recsys_llm] {legacy}: an earlier {kind}, left alone (a copy of your own, or what a version "
                  f"before 2026-12-05 left when killed while swapping {directory} in); delete it if you do not "
                  "need it", file=sys.stderr)
        prefix = f".{name}."
        # its temp dirs (prefix + mkdtemp's letters) and removal leftovers, not its swapped-out copy (removed by
        # the swap) nor those of a sibling named like it plus a suffix (``<directory>.checkpoint``:
        # ``.<name>.checkpoint.removing-*``)
        own_leftover = re.compile(re.escape(prefix) + r"\w+(-\w+)?")
        leftovers = sorted(name for name in os.listdir(parent) if own_leftover.fullmatch(name)
                           and os.path.join(parent, name) != old and os.path.isdir(os.path.join(parent, name)))
        if leftovers:
            print(f"[recsys_llm] {parent}: {', '.join(leftovers)} left by an earlier {kind} of {directory} that was "
                  f"killed; delete {'them' if len(leftovers) > 1 else 'it'}", file=sys.stderr)
        tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
        try:
            yield tmp
            replace_directory(tmp, directory, old)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
