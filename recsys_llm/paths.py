"""Paths read from files and given by users: names that must stay inside their directory, and what a path is
when it is no regular file to read (a FIFO, a directory, a dangling link)."""

import os
import stat
from typing import Any, Optional


def is_plain_file_name(name: Any) -> bool:
    """Whether ``name`` is a string naming an entry of a directory itself: not empty, not ``.`` or
    ``..``, without a path separator (``/`` or ``\\``) or NUL. A name read from a file (a manifest, a
    config) and joined to a directory must be one, or it could name a file outside that directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")


def not_a_regular_file(path: str) -> Optional[str]:
    """What ``path`` is when it exists but is no regular file (a link followed): ``"a directory"``, ``"a named
    pipe (FIFO)"``, ``"a device"``, ``"a socket"``; None for a regular file or a path that does not exist (a
    dangling link included). Opening a FIFO for reading blocks until a writer opens it, and a device such as
    ``/dev/zero`` reads without end: a reader of a file it expects checks this first, and names what it found."""
    try:
        mode = os.stat(path).st_mode
    except OSError:
        return None
    if stat.S_ISREG(mode):
        return None
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a named pipe (FIFO)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "a socket" if stat.S_ISSOCK(mode) else "not a regular file"


def file_problem(path: str) -> Optional[str]:
    """Why ``path`` is no regular file to read (a link followed): ``"missing"``, ``"a dangling symbolic link (to
    <target>)"`` (or a loop of links), or what :func:`not_a_regular_file` names; None for a regular
    file. For an error that names the cause a bare "missing" would hide."""
    found = not_a_regular_file(path)
    if found is not None:
        return found
    if os.path.isfile(path):
        return None
    if os.path.islink(path):
        return f"a dangling symbolic link (to {os.readlink(path)})"
    return "missing"
