"""torchx component: run one of the project's benchmarks (``benchmarks/<name>.py``).

Built on :func:`torchx.components.dist.ddp` with one torchrun worker: every benchmark
compares single-rank runs, and ``scaling``'s table growth starts its own 2 ranks. Each
script writes a JSON (with machine and version info) and a PNG under ``results_dir``
(``benchmarks/results/torchx``, left out of git and images). Launch::

    torchx run -s local_cwd torchx_components/bench.py:bench \\
        --name train_throughput -- --quick

This file is loaded by torchx with ``exec`` (not imported), so it depends on torchx only.
"""

import inspect
import posixpath
import re
from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components.dist import ddp

# the scripts benchmarks/run_all.py runs (those defining main(argv)): the ones that take --json and --plot
BENCHMARKS = ("elec", "llactr", "mixed_precision", "peers", "scaling", "table_dtype", "train_throughput")


def bench(
    name: str,
    *script_args: str,
    results_dir: str = "benchmarks/results/torchx",
    nnodes: int = 1,
    nproc_per_node: int = 1,
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 16384,
    named_resource: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    job_name: str = "",
) -> specs.AppDef:
    """
    Runs ``python benchmarks/NAME.py --json RESULTS_DIR/NAME.json --plot RESULTS_DIR/NAME.png
    [script_args ...]`` on one torchrun worker (torchx dist.ddp).
    Benchmarks compare side by side within one run, so figures are ratios on the same host.

    Args:
        name: benchmark script name without .py: elec, llactr, mixed_precision, peers, scaling, table_dtype or
            train_throughput
        script_args: extra script arguments, after -- (e.g. -- --quick --device cuda)
        results_dir: directory for the JSON and PNG results (not benchmarks/results, whose committed
            figures the README quotes)
        nnodes: number of hosts (replicas of the role): 1, every benchmark runs as one process
        nproc_per_node: worker processes per host: 1 (scaling starts its own ranks)
        cpu: CPUs per host
        gpu: GPUs per host
        memMB: host memory in MB per host
        named_resource: a torchx named resource; takes precedence over cpu, gpu and memMB
        image: container image with the project installed (ignored by local_cwd)
        env: extra environment variables
        mounts: mounts in the container, e.g. type=bind,src=/data,dst=/data
        job_name: job name as {experiment}/{run}; defaults to recsys_llm/bench-NAME
    """
    if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name):
        raise ValueError(f"name must be a benchmark script name without .py (e.g. train_throughput), got {name!r}")
    if name not in BENCHMARKS:  # run_all.py refuses --json/--plot, and a helper module would run and write nothing
        raise ValueError(f"name {name!r} is no benchmark: expected one of {list(BENCHMARKS)} (benchmarks/run_all.py, "
                         "which runs them all, is run on a host as it is: python benchmarks/run_all.py ...)")
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(
            f"nnodes and nproc_per_node must be >= 1, got nnodes={nnodes}, nproc_per_node={nproc_per_node}"
        )
    if named_resource:  # it sets the host's GPUs, whatever --gpu says
        gpus = specs.resource(h=named_resource).gpu
        if 0 < gpus < nproc_per_node:
            raise ValueError(f"named_resource={named_resource} has {gpus} GPU(s) per host for nproc_per_node="
                             f"{nproc_per_node} workers: each worker needs a GPU of its own; pass --nproc_per_node "
                             f"{gpus}, or a named resource with {nproc_per_node} GPUs")
    elif 0 < gpu < nproc_per_node:  # two NCCL ranks on one GPU fail at their first collective
        raise ValueError(f"gpu={gpu} per host for nproc_per_node={nproc_per_node} workers: each worker needs a GPU of "
                         f"its own; pass --gpu {nproc_per_node}, or --nproc_per_node {gpu}")
    if nnodes * nproc_per_node > 1:  # each worker would stop at once: "NAME compares single-rank runs"
        raise ValueError(
            "the benchmarks run as one process (scaling starts its own 2 ranks for table growth) and refuse "
            f"several torchrun workers: use nnodes=1 nproc_per_node=1, got {nnodes}x{nproc_per_node}"
        )
    own_options = {f"--{name}" for name in inspect.signature(bench).parameters}
    misplaced = [arg for arg in script_args if arg.split("=", 1)[0] in own_options]
    if misplaced:
        raise ValueError(
            f"{misplaced} among the job's arguments never reach the component: torchx hands the job every argument "
            "after the first positional one (or --); put the component's options before them"
        )
    negative = [f"{name}={value}" for name, value in {"cpu": cpu, "gpu": gpu, "memMB": memMB}.items() if value < 0]
    if negative:  # a negative request reached the scheduler as none (Volcano: limits {})
        raise ValueError(f"{', '.join(negative)}: expected >= 0")
    host_gpus = specs.resource(h=named_resource).gpu if named_resource else gpu
    if host_gpus > 0 and not any(arg.split("=", 1)[0] == "--device" for arg in script_args):
        # GPUs asked for: a host whose torch sees none fails at once, not benchmarks its CPUs (--device auto)
        script_args = ("--device", "cuda", *script_args)
    results = results_dir or "."  # joined below: "/" stays the root, "out/" gives out/NAME.json
    worker_env = dict(env or {})
    app = ddp(
        "--json",
        posixpath.join(results, f"{name}.json"),
        "--plot",
        posixpath.join(results, f"{name}.png"),
        *script_args,
        script=f"benchmarks/{name}.py",
        image=image,
        name=job_name or f"recsys_llm/bench-{name}",
        h=named_resource,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=worker_env,
        mounts=mounts,
    )
    # the role name must be [a-z0-9]+: on kubernetes replicas 1.. reach rank 0 through ${VC_<ROLE>_0_HOSTS}, which
    # torchx spells with the role name as it is and Volcano with '-' turned into '_' (a '-' also breaks bash)
    app.roles[0].name = "bench"
    return app
