"""Process-group set-up of a lone process (no torchrun environment)."""

import os
import subprocess
import sys
from typing import List

import pytest

LONE_PROCESS = """
import os
import torch
import torch.distributed as dist
from recsys_llm.train.distributed import init_distributed, teardown_distributed

ctx = init_distributed("cpu")
total = torch.ones(1)
dist.all_reduce(total)
dist.barrier()
print(ctx.rank, ctx.world_size, ctx.backend, int(total.item()), "MASTER_PORT" in os.environ)
teardown_distributed()  # a process that exits with a live gloo group can abort in its destructor
"""


def test_lone_processes_take_no_port() -> None:
    """Several single-process runs on one machine start together, each a world of one over an
    in-memory store: no MASTER_PORT is set (a free port looked up before binding could be taken
    by another process)."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = "1"
    processes = [subprocess.Popen([sys.executable, "-c", LONE_PROCESS], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True) for _ in range(3)]
    for process in processes:
        out, err = process.communicate(timeout=120)
        assert process.returncode == 0, err[-2000:]
        assert out.split() == ["0", "1", "gloo", "1", "False"]


def _start_three_times() -> List[int]:
    import torch
    import torch.distributed as dist

    from recsys_llm.train.distributed import init_distributed, teardown_distributed

    totals = []
    for _ in range(3):  # e.g. an export, then a training, in one process
        init_distributed("cpu")
        total = torch.ones(1)
        dist.all_reduce(total)
        totals.append(int(total.item()))
        teardown_distributed()
    return totals


@pytest.mark.multiprocess
def test_ranks_start_a_process_group_again_after_a_teardown() -> None:
    """The rendezvous store outlives a group (torchrun's agent hosts it): a second group must not
    read the first one's keys (gloo would connect to the old peer addresses)."""
    from tests.multiprocess import run_multiprocess

    assert run_multiprocess(_start_three_times, world_size=2) == [[2, 2, 2], [2, 2, 2]]


@pytest.mark.parametrize("env, message", [
    ({"RANK": ""}, r"environment variable RANK='': expected an integer >= 0"),  # e.g. RANK=$SLURM_PROCID outside Slurm
    ({"RANK": "one", "WORLD_SIZE": "2"}, r"environment variable RANK='one': expected an integer >= 0"),
    ({"WORLD_SIZE": "0"}, r"environment variable WORLD_SIZE='0': expected an integer >= 1"),
    ({"RANK": "-1", "WORLD_SIZE": "2"}, r"environment variable RANK='-1': expected an integer >= 0"),
    ({"RANK": "1", "WORLD_SIZE": "1"}, r"RANK=1 and WORLD_SIZE=1: the rank must be below the world size"),
    ({"LOCAL_RANK": "x"}, r"environment variable LOCAL_RANK='x': expected an integer >= 0"),
])
def test_a_bad_launch_environment_is_named_before_the_rendezvous(monkeypatch, env, message) -> None:
    """``int()``'s message named no variable; a rank not below the world size failed deep in gloo
    ("rank < size"), a negative one waited for the rendezvous timeout, a world size of 0 asked for MASTER_ADDR."""
    import torch.distributed as dist

    from recsys_llm.train.distributed import init_distributed

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ValueError, match=message):
        init_distributed("cpu")
    assert not dist.is_initialized()


def _rank_counts_and_losses() -> List[float]:
    import torch.distributed as dist

    from recsys_llm.train.distributed import init_distributed, mean_over_ranks, sum_over_ranks, teardown_distributed

    init_distributed("cpu")
    rank = dist.get_rank()
    values = [float(sum_over_ranks(51 + rank)), mean_over_ranks(0.25 + rank)]  # e.g. rows and loss of each rank
    teardown_distributed()
    return values


@pytest.mark.multiprocess
def test_training_figures_are_taken_over_every_rank() -> None:
    """The training loss logged in metrics.jsonl (and plotted) was rank 0's: with the data cut into one
    slice per rank, it described only the first slice of the rows."""
    from tests.multiprocess import run_multiprocess

    assert run_multiprocess(_rank_counts_and_losses, world_size=2) == [[103.0, 0.75], [103.0, 0.75]]


@pytest.mark.parametrize("env, expected, warned", [
    ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, 4, False),  # mpirun
    ({"SLURM_NTASKS_PER_NODE": "8(x2)"}, 8, False),  # srun, 2 nodes x 8
    ({"SLURM_NTASKS_PER_NODE": "3"}, 16, True),  # does not divide the world: not this job's layout
    ({}, 16, True),  # nothing says: one host, and the user is told
])
def test_the_ranks_per_host_come_from_the_launcher_when_torchrun_gives_none(monkeypatch, env, expected, warned) -> None:
    """Before, a launcher other than torchrun (srun, mpirun) got LOCAL_WORLD_SIZE = WORLD_SIZE: all ranks on one host,
    so hierarchical plans (table_row_wise) grouped ranks of several hosts as one host's."""
    import warnings

    from recsys_llm.train.distributed import LOCAL_SIZE_VARIABLES, ranks_per_host

    for name in LOCAL_SIZE_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert ranks_per_host(16) == expected
    assert any("set LOCAL_WORLD_SIZE to the ranks per host" in str(w.message) for w in caught) == warned
    assert ranks_per_host(1) == 1


def test_a_torchrun_launch_is_not_warned_of_as_another_launcher() -> None:
    """`setdefault("LOCAL_WORLD_SIZE", str(ranks_per_host(...)))` asked ranks_per_host, which warned on every rank of a
    torchrun or torchx launch that LOCAL_WORLD_SIZE was not set, though torchrun had set it."""
    code = (
        "import os, warnings\n"
        "os.environ.update(RANK='0', WORLD_SIZE='2', LOCAL_RANK='0', LOCAL_WORLD_SIZE='2')\n"
        "from recsys_llm.train import distributed\n"
        "distributed.dist.init_process_group = lambda **kwargs: None  # the rendezvous of the other rank is not the test\n"
        "distributed._rendezvous_store = lambda rank, world_size: None\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    distributed.init_distributed('cpu')\n"
        "print([str(w.message) for w in caught if 'LOCAL_WORLD_SIZE' in str(w.message)])\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "[]", done.stdout


def test_init_distributed_sets_local_world_size_from_another_launchers_variable() -> None:
    """srun / mpirun set no LOCAL_WORLD_SIZE: init_distributed had it be WORLD_SIZE (every rank on one host), which
    ranks_per_host alone (tested above) does not show: the process group's set-up must use it."""
    code = (
        "import os\n"
        "os.environ.pop('LOCAL_WORLD_SIZE', None)\n"
        "os.environ.update(RANK='0', WORLD_SIZE='4', LOCAL_RANK='0', SLURM_NTASKS_PER_NODE='2(x2)')\n"
        "from recsys_llm.train import distributed\n"
        "distributed.dist.init_process_group = lambda **kwargs: None  # the other ranks' rendezvous is not the test\n"
        "distributed._rendezvous_store = lambda rank, world_size: None\n"
        "distributed.init_distributed('cpu')\n"
        "print(os.environ['LOCAL_WORLD_SIZE'])\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS",
                                                            "OMPI_COMM_WORLD_LOCAL_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**env, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.dirname(
                              os.path.abspath(__file__))))})
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "2", done.stdout


ANOTHER_BACKEND = """
from recsys_llm.train.distributed import init_distributed, leave_process_group

init_distributed("cpu")
init_distributed("cpu")  # the same backend: the group is reused
try:
    init_distributed("cpu", backend="nccl")
except ValueError as error:
    print(error)
leave_process_group()
print(init_distributed("cpu", backend="gloo").backend)
leave_process_group()
"""


def test_a_group_of_another_backend_in_the_process_is_refused_not_reused() -> None:
    """A CPU run then a CUDA run in one process (a notebook): the second took the first's gloo group for NCCL's."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", ANOTHER_BACKEND], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    refusal, backend = done.stdout.strip().splitlines()
    assert refusal == ("this process already has a process group of backend 'gloo' (an earlier run's in the same "
                       "process, or the caller's), but this one computes on cpu and needs 'nccl': call "
                       "recsys_llm.train.distributed.leave_process_group() (an earlier run's) or "
                       "torch.distributed.destroy_process_group() (your own) before it, or run it in a new process")
    assert backend == "gloo"


RANK_PREFIXES = """
import io
import sys

from recsys_llm.train.distributed import init_distributed, teardown_distributed


def last_traceback_line() -> str:
    caught, stderr = io.StringIO(), sys.stderr
    sys.stderr = caught
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            sys.excepthook(*sys.exc_info())
    finally:
        sys.stderr = stderr
    return caught.getvalue().strip().splitlines()[-1]


for _ in range(3):  # e.g. a script calling the CLI three times in one process
    init_distributed("cpu")
    inside = last_traceback_line()
    teardown_distributed()
print(inside)
print(last_traceback_line())
"""


def test_each_process_group_prefixes_tracebacks_once() -> None:
    """torch's init_process_group wraps sys.excepthook to prefix "[rank0]: ", and never unwraps it: a script that
    ran seven commands in one process printed "[rank0]: " seven times on every line of a traceback."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK")}
    done = subprocess.run([sys.executable, "-c", RANK_PREFIXES], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.splitlines() == ["[rank0]: ValueError: boom", "ValueError: boom"]
