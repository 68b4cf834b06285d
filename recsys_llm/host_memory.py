"""How much memory this process's host (or its container) has, and how many ranks share the host: what the
planner and the size checks of large plug-in terms plan against, and what each rank takes of the host's cores."""

import os
from typing import Optional

CGROUP_MEMORY_LIMITS = ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes")


def host_memory() -> Optional[int]:
    """Bytes of memory this process's host (or container: its cgroup's limit, where lower) has, or None
    where the OS does not say (the planner then assumes its default, 128 GB per rank)."""
    try:
        physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None
    for path in CGROUP_MEMORY_LIMITS:
        try:
            with open(path, encoding="utf-8") as handle:
                limit = handle.read().strip()
        except OSError:
            continue
        if limit.isdigit():
            return min(physical, int(limit))
    return physical


def ranks_on_host() -> int:
    """The ranks torchrun started on this host (``LOCAL_WORLD_SIZE``), each with its own share of the host's
    memory and cores; 1 without torchrun."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
