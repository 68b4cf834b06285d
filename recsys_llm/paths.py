"""Names read from files that must stay inside their directory."""

from typing import Any


def is_plain_file_name(name: Any) -> bool:
    """Whether ``name`` is a string naming an entry of a directory itself: not empty, not ``.`` or
    ``..``, without a path separator (``/`` or ``\\``) or NUL. A name read from a file (a manifest, a
    config) and joined to a directory must be one, or it could name a file outside that directory."""
    return isinstance(name, str) and name not in ("", ".", "..") and not any(c in name for c in "/\\\0")
