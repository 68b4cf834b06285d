"""Process-group set-up from ``torchrun`` environment variables: gloo on CPU, nccl on CUDA.

``torchrun`` (and ``torchx dist.ddp``, and ``tests/multiprocess.py``) export ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. A plain
``python -m recsys_llm.cli train ...`` has none of them and runs as a world of one
(a group over an in-memory store, no port to take, so DMP, the planner and DCP take the same
code path; two such runs on one machine never meet).

Example::

    ctx = init_distributed()          # DistContext(rank=0, world_size=2, device=cpu, ...)
    if ctx.is_main:
        print("only rank 0 prints")
    teardown_distributed()
"""

import dataclasses
import datetime
import itertools
import os
import re
import sys
import warnings
from typing import Any, Callable, List, Optional, Sequence, Tuple, TypeVar

import torch
import torch.distributed as dist

from recsys_llm.env import env_int

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Args:
        rank (int): global rank.
        world_size (int): number of processes.
        local_rank (int): rank on this host (selects the GPU).
        device (torch.device): ``cuda:{local_rank}`` (``cuda:0`` when the process sees one GPU) or ``cpu``.
        backend (str): ``nccl`` or ``gloo``.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        """True on rank 0, the process that prints, shows progress and writes run files."""
        return self.rank == 0


def select_device(local_rank: int, device: str = "auto") -> torch.device:
    """``auto`` picks ``cuda:{local_rank}`` when CUDA is available, else ``cpu``.

    Raises:
        ValueError: ``cuda`` was asked for and no GPU (or not enough GPUs) is visible.
    """
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if device == "cpu" or (device == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"device 'cuda' (train.device) requested, but torch ({torch.__version__}, {build}) sees no "
                         "GPU; use device 'auto' or 'cpu', or install the CUDA variant (RECSYS_LLM_VARIANT=cuda make install)")
    local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    under_torchrun = TORCHRUN_RUN_ID in os.environ
    return torch.device("cuda", gpu_index(local_rank, local_world_size, count, under_torchrun))


def gpu_index(local_rank: int, local_world_size: int, visible: int, under_torchrun: bool) -> int:
    """The index of this process's GPU among the ``visible`` ones: local rank r takes GPU r.

    One visible GPU is this process's own (a launcher that gives each rank its own GPU, e.g.
    through ``CUDA_VISIBLE_DEVICES``, or a single-GPU host), except under torchrun, whose
    local ranks all see the same GPUs.

    Raises:
        ValueError: a local rank without a GPU of its own; under torchrun, more local ranks
            than visible GPUs, on every rank (NCCL would refuse ranks sharing one GPU at the
            first collective, "Duplicate GPU detected", and a rank without one would hang the rest).
    """
    shared = under_torchrun and local_world_size > 1
    if visible == 1 and not shared:
        return 0
    if local_rank >= visible or (shared and local_world_size > visible):
        raise ValueError(
            f"device 'cuda' requested for local rank {local_rank} of {local_world_size} on this host, but "
            f"{visible} GPU(s) are visible; start at most {visible} processes per host "
            "(torchrun --nproc-per-node), or give each its own GPU"
        )
    return local_rank


# seconds a collective may wait for the slowest rank (NCCL's own default is 10 minutes): rank 0
# alone writes data, exports and teacher outputs while the others wait at a barrier
TIMEOUT_ENV = "RECSYS_LLM_DIST_TIMEOUT_S"
DEFAULT_TIMEOUT_S = 3600


def _collective_timeout() -> datetime.timedelta:
    """How long a collective waits: ``RECSYS_LLM_DIST_TIMEOUT_S`` seconds (default 1 h)."""
    raw = os.environ.get(TIMEOUT_ENV, str(DEFAULT_TIMEOUT_S))
    try:
        seconds = float(raw)
        timeout = datetime.timedelta(seconds=seconds) if seconds > 0 else None  # inf, nan and 1e15 raise here
    except (ValueError, OverflowError):
        timeout = None
    if timeout is None:
        raise ValueError(f"{TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0, finite and below "
                         f"{int(datetime.timedelta.max.total_seconds()):,}")
    return timeout


def collective_device() -> torch.device:
    """The device whose tensors the default process group's collectives take: the current
    CUDA device under NCCL, else CPU."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


_GROUP_NUMBERS = itertools.count(1)  # of the process groups this process starts (each rank starts as many)


def _rendezvous_store(rank: int, world_size: int) -> dist.Store:
    """Where the ranks meet, with a key prefix of its own for each process group this process starts.

    A lone process without a rendezvous address meets no one: an in-memory store, no port (a
    free port looked up first could be taken by another process before the bind). Otherwise the
    ``env://`` store of ``torchrun`` (its agent's, or rank 0's): a process that starts a group
    again after tearing one down (export, then train) would find the last group's keys there,
    gloo's peer addresses included, so every start gets a fresh prefix.
    """
    if world_size == 1 and "MASTER_PORT" not in os.environ:
        return dist.HashStore()
    timeout = _collective_timeout()
    store, _, _ = next(dist.rendezvous("env://", rank, world_size, timeout=timeout))
    store.set_timeout(timeout)
    return dist.PrefixStore(f"recsys_llm/group{next(_GROUP_NUMBERS)}", store)


TORCHRUN_RUN_ID = "TORCHELASTIC_RUN_ID"  # set by torchrun's agent (and so torchx) in each worker it starts


def started_by_torchrun_on_each_rank() -> bool:
    """Whether torchrun started this process as one of its workers and no process group exists yet: the
    command itself is every rank's program (a program that set up its ranks' group and calls a command on
    the ranks it chooses is not)."""
    return TORCHRUN_RUN_ID in os.environ and not (dist.is_available() and dist.is_initialized())


def launch_ranks() -> Tuple[int, int, int]:
    """``(RANK, WORLD_SIZE, LOCAL_RANK)`` from the ``torchrun`` environment; ``(0, 1, 0)`` outside it
    (``LOCAL_RANK`` defaults to ``RANK``).

    Raises:
        ValueError: a variable that is not an integer, a world size below 1, a negative rank, or a
            rank not below the world size, naming the variables (torch would fail on them deep in
            gloo, or wait for ranks that never come).
    """
    world_size = env_int("WORLD_SIZE", 1, minimum=1)
    rank = env_int("RANK", 0, minimum=0)
    if rank >= world_size:
        raise ValueError(f"environment variables RANK={rank} and WORLD_SIZE={world_size}: the rank must be below the "
                         f"world size (ranks 0..{world_size - 1})")
    return rank, world_size, env_int("LOCAL_RANK", rank, minimum=0)


# the variables other launchers give the ranks per host in (torchrec's get_local_size reads the first
# three after LOCAL_WORLD_SIZE; Slurm's is "8" or "8(x2)")
LOCAL_SIZE_VARIABLES = ("MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE",
                        "SLURM_NTASKS_PER_NODE")


def ranks_per_host(world_size: int) -> int:
    """The ranks per host when ``LOCAL_WORLD_SIZE`` (torchrun's) is not set: another launcher's
    variable (``LOCAL_SIZE_VARIABLES``), else ``world_size`` (one host), with a warning when that
    is more than one rank. The planner groups a host's ranks (hierarchical sharding types), and
    torchrec's runtime reads ``LOCAL_WORLD_SIZE`` for the same groups."""
    for name in LOCAL_SIZE_VARIABLES:
        match = re.fullmatch(r"\s*(\d+)(\(x\d+\))?\s*", os.environ.get(name, ""))
        if match and 0 < int(match.group(1)) <= world_size and world_size % int(match.group(1)) == 0:
            return int(match.group(1))
    if world_size > 1:
        warnings.warn(f"LOCAL_WORLD_SIZE is not set (a launcher other than torchrun): the sharding planner takes all "
                      f"{world_size} ranks for one host; set LOCAL_WORLD_SIZE to the ranks per host", stacklevel=3)
    return world_size


def init_distributed(device: str = "auto", backend: Optional[str] = None) -> DistContext:
    """Initialises the default process group (idempotent) and returns this rank's context.

    Args:
        device (str): ``auto`` | ``cpu`` | ``cuda``.
        backend (Optional[str]): override; default ``nccl`` for CUDA, ``gloo`` for CPU.

    Returns:
        DistContext: rank, world size, device and backend.

    Raises:
        ValueError: bad ``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` (:func:`launch_ranks`).

    A collective waits up to ``RECSYS_LLM_DIST_TIMEOUT_S`` seconds (default 3600) for the
    slowest rank, on gloo and NCCL alike.
    """
    rank, world_size, local_rank = launch_ranks()
    torch_device = select_device(local_rank, device)
    if torch_device.type == "cuda":
        torch.cuda.set_device(torch_device)
    chosen_backend = backend or ("nccl" if torch_device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        set_local_world_size = "LOCAL_WORLD_SIZE" not in os.environ  # torchrun's, when it launched
        if set_local_world_size:  # (setdefault would ask, and warn)
            os.environ["LOCAL_WORLD_SIZE"] = str(ranks_per_host(world_size))
        # NCCL bound to this rank's GPU: the communicator forms at once, and no collective has to guess
        # the device from the global rank (wrong where a launcher maps ranks to GPUs otherwise)
        bound_device = torch_device if chosen_backend == "nccl" else None
        start_process_group(backend=chosen_backend, rank=rank, world_size=world_size,
                            store=_rendezvous_store(rank, world_size), timeout=_collective_timeout(),
                            device_id=bound_device, set_env=["LOCAL_WORLD_SIZE"] if set_local_world_size else [])
    else:
        rank, world_size = dist.get_rank(), dist.get_world_size()
        existing = str(dist.get_backend())
        if chosen_backend not in re.split(r"[:,]", existing):  # "gloo", "nccl", or "cpu:gloo,cuda:nccl"
            raise ValueError(
                f"this process already has a process group of backend {existing!r} (an earlier run's in the same "
                f"process, or the caller's), but this one computes on {torch_device.type} and needs "
                f"{chosen_backend!r}: call recsys_llm.train.distributed.leave_process_group() (an earlier run's) or "
                "torch.distributed.destroy_process_group() (your own) before it, or run it in a new process"
            )
        chosen_backend = existing
    return DistContext(rank, world_size, local_rank, torch_device, chosen_backend)


@dataclasses.dataclass
class _StartedGroup:
    """The default process group this module started (:func:`start_process_group`), and what starting it changed
    in the process, put back when it goes: a program running several jobs (the CLI called in-process, a notebook, a
    search loop) keeps its own state, and a group of its own is never ended here."""

    group: Optional[object] = None
    # torch's init_process_group wraps sys.excepthook to prefix tracebacks with "[rank<N>]: " and never unwraps it:
    # each group of such a process would add a prefix more
    excepthook: Optional[Callable[..., object]] = None
    set_env: List[str] = dataclasses.field(default_factory=list)  # variables init_distributed set (no launcher did)


_started = _StartedGroup()


def start_process_group(set_env: Sequence[str] = (), **init_kwargs: Any) -> None:
    """``torch.distributed.init_process_group(**init_kwargs)``, the group recorded as this module's own:
    :func:`teardown_distributed` and :func:`leave_process_group` end it, and no group they did not start;
    ``set_env``: environment variables the caller set for it, removed with it."""
    global _started
    excepthook = sys.excepthook
    dist.init_process_group(**init_kwargs)
    _started = _StartedGroup(group=dist.group.WORLD, excepthook=excepthook, set_env=list(set_env))


def _started_here() -> bool:
    """Whether the default process group is the one :func:`start_process_group` started."""
    return dist.is_initialized() and _started.group is not None and dist.group.WORLD is _started.group


def _forget_started_group() -> None:
    """Puts back what starting the group changed (the excepthook, the variables init_distributed set)."""
    global _started
    if _started.excepthook is not None:
        sys.excepthook = _started.excepthook
    for name in _started.set_env:
        os.environ.pop(name, None)
    _started = _StartedGroup()


def leave_existing_group_be() -> Callable[[], None]:
    """Until the returned function is called, :func:`teardown_distributed` and :func:`leave_process_group` leave
    the process group that exists now as it is, even one this module started: a command run inside a program's
    group (``recsys_llm.cli.main`` called by the examples, the demo, a job of one's own) ends only a group it starts
    itself. The returned function gives the group back to this module where it still stands."""
    global _started
    if not dist.is_initialized():
        return lambda: None
    kept, _started = _started, _StartedGroup()

    def give_back() -> None:
        global _started
        if kept.group is not None and dist.is_initialized() and dist.group.WORLD is kept.group:
            _started = kept

    return give_back


def teardown_distributed() -> None:
    """Destroys the default process group if this module started it (a group the caller made stays)."""
    if _started_here():
        dist.barrier()
        dist.destroy_process_group()
        _forget_started_group()


def leave_process_group() -> None:
    """Destroys the default process group this module started, if any, without waiting for the other ranks: after
    an error, which they may never reach. A process that exits with a live gloo group can abort in
    the group's destructor ("terminate called without an active exception", exit code 134)
    instead of exiting with its own code. A group the caller made stays."""
    if _started_here():
        dist.destroy_process_group()
        _forget_started_group()


_host_group: "Optional[tuple]" = None  # (the default group it was made for, the gloo group)


def host_group() -> Optional[dist.ProcessGroup]:
    """A group over every rank whose collectives keep objects in host memory.

    ``gather_object`` / ``broadcast_object_list`` on an NCCL group stage the pickled bytes on
    the GPU (rank 0 holds world size x the largest); on this gloo group they stay on the
    host. Under gloo it is the default group (``None``). Every rank must make the first call
    (``new_group`` is collective).
    """
    global _host_group
    if not dist.is_initialized() or dist.get_backend() == "gloo":
        return None
    if _host_group is None or _host_group[0] is not dist.group.WORLD:
        _host_group = (dist.group.WORLD, dist.new_group(backend="gloo", timeout=_collective_timeout()))
    return _host_group[1]


def barrier() -> None:
    """``dist.barrier()`` when a group exists, else nothing."""
    if dist.is_initialized():
        dist.barrier()


def _reduced(value: float, dtype: torch.dtype, op: "dist.ReduceOp", device: Optional[torch.device]) -> float:
    """``value`` all-reduced with ``op`` over every rank (collective); ``value`` itself outside a group."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    reduced = torch.tensor([value], dtype=dtype, device=device or collective_device())
    dist.all_reduce(reduced, op=op)
    return reduced.item()


def all_ranks_true(flag: bool, device: Optional[torch.device] = None) -> bool:
    """True when ``flag`` is true on every rank (collective: every rank calls it at the same point);
    ``flag`` itself outside a process group.

    Args:
        flag (bool): this rank's answer.
        device (Optional[torch.device]): where the reduced tensor lives; None: the default
            group's device (:func:`collective_device`: CUDA for NCCL).
    """
    return bool(_reduced(1 if flag else 0, torch.int32, dist.ReduceOp.MIN, device))


def sum_over_ranks(value: int, device: Optional[torch.device] = None) -> int:
    """The sum of ``value`` over every rank (collective, as :func:`all_ranks_true`); ``value`` itself
    outside a process group.

    Args:
        value (int): this rank's count.
        device (Optional[torch.device]): as in :func:`all_ranks_true`.
    """
    return int(_reduced(value, torch.int64, dist.ReduceOp.SUM, device))


def mean_over_ranks(value: float, device: Optional[torch.device] = None) -> float:
    """The mean of ``value`` over every rank (collective, as :func:`all_ranks_true`); ``value``
    itself outside a process group. E.g. the training loss: each rank's rows are its own slice
    of the data, so rank 0's loss alone describes only that slice."""
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    return float(_reduced(value, torch.float64, dist.ReduceOp.SUM, device)) / world_size


def run_on_every_rank(action: Callable[[], T], what: str, device: Optional[torch.device] = None) -> T:
    """Runs ``action`` on every rank and fails on every rank if it failed on any: a rank that
    raised alone would leave the others waiting in their next collective until the timeout.

    Raises:
        Exception: this rank's own error, or RuntimeError naming ``what`` when another rank failed.
    """
    try:
        result, error = action(), None
    except Exception as exc:  # re-raised below, after every rank has said whether it failed
        result, error = None, exc
    if not all_ranks_true(error is None, device):
        if error is not None:
            raise error
        raise RuntimeError(f"{what} failed on another rank (its error is in that rank's output)")
    return result  # type: ignore[return-value]


def is_main_process() -> bool:
    """True on rank 0 or outside a process group."""
    return not dist.is_initialized() or dist.get_rank() == 0
