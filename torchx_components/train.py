"""torchx component: distributed CTR training with ``recsys-llm train``.

Built on :func:`torchx.components.dist.ddp`: one role, ``nnodes`` replicas, each
running ``torchrun --nproc_per_node N -m recsys_llm.cli train --config ... overrides``.
torchrun sets ``RANK``/``WORLD_SIZE``/``MASTER_ADDR`` and the trainer picks gloo on
CPU and nccl on GPU. Launch::

    torchx run -s local_cwd torchx_components/train.py:train \\
        --config configs/synthetic_deepfm.yaml --nproc_per_node 2 train.epochs=1

This file is loaded by torchx with ``exec`` (not imported), so it depends on torchx
only: no project imports, no helper modules.
"""

from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components.dist import ddp

# the rendezvous backends dist.ddp can point torchrun at: it gives every backend the endpoint rank 0's
# host:rdzv_port (localhost:0 on one host), where only c10d and static have a store; etcd and etcd-v2 need an
# etcd server there (and the python-etcd package), so they failed in torchrun on the cluster
RDZV_BACKENDS = ("c10d", "static")


def train(
    config: str,
    *overrides: str,
    nnodes: int = 1,
    nproc_per_node: int = 0,
    cpu: int = 0,
    gpu: int = 0,
    memMB: int = 0,
    named_resource: Optional[str] = None,
    image: str = torchx.IMAGE,
    env: Optional[Dict[str, str]] = None,
    max_retries: int = 0,
    rdzv_backend: str = "c10d",
    rdzv_port: int = 29500,
    mounts: Optional[List[str]] = None,
    job_name: str = "recsys_llm/train",
) -> specs.AppDef:
    """
    Trains a CTR model with ``python -m recsys_llm.cli train --config CONFIG [key=value ...]``
    on nnodes x nproc_per_node torchrun workers (torchx dist.ddp). Tables are sharded over
    all workers by torchrec's planner; the run directory (config, metrics.jsonl, sharding
    plan, checkpoints) is the one named by the config.

    Args:
        config: path of the training config file (YAML), relative to the working directory / image
        overrides: config overrides as key=value (e.g. train.epochs=1 data.batch_size=4096)
        nnodes: number of hosts (replicas of the role)
        nproc_per_node: worker processes per host; 0 (the default): one per GPU of the host (gpu, or the
            named resource's), 1 on a CPU host
        cpu: CPUs per host; 0 (the default): 2 per worker
        gpu: GPUs per host
        memMB: host memory in MB per host; 0 (the default): 8192 per worker
        named_resource: a torchx named resource (e.g. aws_p4d.24xlarge); takes precedence over cpu, gpu and memMB
        image: container image with the project installed (ignored by local_cwd, which runs the current directory)
        env: extra environment variables (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4); with several workers per
            host, OMP_NUM_THREADS defaults to cpu / nproc_per_node
        max_retries: scheduler retries of the whole job (resume comes from the run directory's checkpoints)
        rdzv_backend: torchrun rendezvous backend (c10d, or static with one fixed rank-0 host)
        rdzv_port: port on rank 0's host for the c10d store (multi-host only)
        mounts: mounts in the container, e.g. type=bind,src=/data,dst=/data[,readonly]
        job_name: job name as {experiment}/{run}; "" is the default, recsys_llm/train
    """
    if not config.strip():  # every worker stopped at its start with `--config ''`, after the job was scheduled
        raise ValueError(f"config={config!r}: expected the path of the training config file (YAML)")
    host_gpus = specs.resource(h=named_resource).gpu if named_resource else gpu
    if nproc_per_node == 0:  # a worker per GPU: one would leave the host's other GPUs idle
        nproc_per_node = max(1, host_gpus)
    if nnodes < 1 or nproc_per_node < 1:
        raise ValueError(
            f"nnodes and nproc_per_node must be >= 1, got nnodes={nnodes}, nproc_per_node={nproc_per_node}"
        )
    counts = {"cpu": cpu, "gpu": gpu, "memMB": memMB, "max_retries": max_retries}
    negative = [f"{name}={value}" for name, value in counts.items() if value < 0]
    if negative:  # a negative request reached the scheduler as none (Volcano: limits {}, maxRetry -1)
        raise ValueError(f"{', '.join(negative)}: expected >= 0 (0: the default)")
    if rdzv_backend not in RDZV_BACKENDS:
        raise ValueError(f"rdzv_backend={rdzv_backend!r}: expected one of {RDZV_BACKENDS} (dist.ddp points torchrun at "
                         "rank 0's host, where no etcd server runs)")
    if nnodes > 1 and not 0 < rdzv_port < 65536:  # the other hosts dialed rank 0 on no port until a timeout
        raise ValueError(f"rdzv_port={rdzv_port}: expected a TCP port in 1..65535 on rank 0's host (nnodes={nnodes})")
    # sized for the host's workers: fixed defaults gave --gpu 8 alone the CPUs and memory of one worker
    cpu = cpu or 2 * nproc_per_node
    memMB = memMB or 8192 * nproc_per_node
    if rdzv_backend == "static" and nnodes == 1:
        # on one host torchx hands torchrun port 0 (any free port), which static rendezvous passes on to the
        # workers as MASTER_PORT=0: they wait to connect to it until the collective timeout (an hour by default)
        raise ValueError("rdzv_backend=static on one host (nnodes=1): torchx starts torchrun on port 0 there, which "
                         "the static rendezvous gives the workers as MASTER_PORT=0, and they never reach its store; "
                         "use rdzv_backend=c10d on one host (static is for nnodes > 1, on rdzv_port of rank 0's host)")
    if named_resource:  # it sets the host's GPUs, whatever --gpu says
        if 0 < host_gpus < nproc_per_node:
            raise ValueError(f"named_resource={named_resource} has {host_gpus} GPU(s) per host for nproc_per_node="
                             f"{nproc_per_node} workers: each worker needs a GPU of its own; pass --nproc_per_node "
                             f"{host_gpus}, or a named resource with {nproc_per_node} GPUs")
    elif 0 < gpu < nproc_per_node:  # two NCCL ranks on one GPU fail at their first collective
        raise ValueError(f"gpu={gpu} per host for nproc_per_node={nproc_per_node} workers: each worker needs a GPU of "
                         f"its own; pass --gpu {nproc_per_node}, or --nproc_per_node {gpu}")
    misplaced = [item for item in overrides if item.startswith("-")]
    if misplaced:
        raise ValueError(f"{misplaced} among the config overrides never reach the component: torchx hands the job "
                         "every argument after the first override; put the component's options before them")
    bad = [item for item in overrides if "=" not in item or item.startswith("=")]
    if bad:
        raise ValueError(f"config overrides must look like key=value, got {bad}")
    if host_gpus > 0 and not any(item.split("=", 1)[0] == "train.device" for item in overrides):
        # GPUs asked for: a host without a usable one (a CPU build of torch in the image) fails at once, not
        # trains on the CPU with the GPUs idle
        overrides = (*overrides, "train.device=cuda")
    worker_env = dict(env or {})
    if nproc_per_node > 1:  # torchrun would give each worker one CPU thread: give it its share of the host's CPUs
        host_cpus = specs.resource(h=named_resource).cpu if named_resource else cpu
        worker_env.setdefault("OMP_NUM_THREADS", str(max(1, host_cpus // nproc_per_node)))
    app = ddp(
        "train",
        "--config",
        config,
        *overrides,
        m="recsys_llm.cli",
        image=image,
        name=job_name or "recsys_llm/train",
        h=named_resource,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=f"{nnodes}x{nproc_per_node}",
        env=worker_env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        rdzv_backend=rdzv_backend,
        mounts=mounts,
    )
    # the role name must be [a-z0-9]+: on kubernetes replicas 1.. reach rank 0 through ${VC_<ROLE>_0_HOSTS}, which
    # torchx spells with the role name as it is and Volcano with '-' turned into '_' (a '-' also breaks bash)
    app.roles[0].name = "trainer"
    if rdzv_backend == "static":
        # dist.ddp single-quotes --node_rank '${replica_id}', which AWS Batch fills with $AWS_BATCH_JOB_NODE_INDEX:
        # bash then handed torchrun that text ("invalid int value") on every node; in double quotes bash expands it
        # (the other schedulers fill in the replica's number)
        role = app.roles[0]
        rank = specs.macros.replica_id
        role.args = [arg.replace(f"--node_rank '{rank}'", f'--node_rank "{rank}"') for arg in role.args]
    return app
