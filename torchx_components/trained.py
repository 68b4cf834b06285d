"""torchx component: the sharded jobs on a trained run (``recsys-llm evaluate|export|teacher-outputs``).

Built on :func:`torchx.components.dist.ddp`, like ``train``: the checkpoint is loaded into the
tables sharded over every worker (any number of workers: the shards are re-cut), then

* ``evaluate`` scores a split (every row once) and prints its metrics;
* ``export`` gathers the model shard by shard and writes the servable artifact (rank 0);
* ``teacher-outputs`` runs the trained teacher sharded, each worker over its share of the
  rows, and writes the split copies with its logits and representations (rank 0).

Launch::

    torchx run -s local_cwd torchx_components/trained.py:trained --job teacher-outputs \\
        --checkpoint runs/gain --nproc_per_node 2 -- --output-dir data/synthetic-teacher

This file is loaded by torchx with ``exec`` (not imported), so it depends on torchx
only: no project imports, no helper modules.
"""

import inspect
from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components.dist import ddp

TRAINED_JOBS = ("evaluate", "export", "teacher-outputs")

# the rendezvous backends dist.ddp can point torchrun at: it gives every backend the endpoint rank 0's
# host:rdzv_port (localhost:0 on one host), where only c10d and static have a store; etcd and etcd-v2 need an
# etcd server there (and the python-etcd package), so they failed in torchrun on the cluster
RDZV_BACKENDS = ("c10d", "static")


def trained(
    job: str,
    checkpoint: str,
    *job_args: str,
    config: Optional[str] = None,
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
    job_name: str = "",
) -> specs.AppDef:
    """
    Runs ``python -m recsys_llm.cli JOB --checkpoint CHECKPOINT [--config CONFIG] [job_args ...]``
    on nnodes x nproc_per_node torchrun workers (torchx dist.ddp), the trained tables sharded
    over all of them. Finished teacher-output files are skipped, so a retried job resumes.

    Args:
        job: evaluate (metrics of a split), export (the servable artifact) or teacher-outputs (split copies with the teacher's logits and representations)
        checkpoint: a checkpoint directory, or a run directory (its best checkpoint)
        job_args: the job's own arguments and config overrides, after -- (e.g. -- --output-dir data/teacher elec.task=gain)
        config: the run's config (YAML), relative to the working directory / image; default: the run's own config.yaml
        nnodes: number of hosts (replicas of the role)
        nproc_per_node: worker processes per host; 0 (the default): one per GPU of the host (gpu, or the
            named resource's), 1 on a CPU host
        cpu: CPUs per host; 0 (the default): 2 per worker
        gpu: GPUs per host
        memMB: host memory in MB per host; 0 (the default): 8192 per worker
        named_resource: a torchx named resource; takes precedence over cpu, gpu and memMB
        image: container image with the project installed (ignored by local_cwd)
        env: extra environment variables (e.g. NCCL_DEBUG=INFO,OMP_NUM_THREADS=4); with several workers per
            host, OMP_NUM_THREADS defaults to cpu / nproc_per_node
        max_retries: scheduler retries of the whole job
        rdzv_backend: torchrun rendezvous backend (c10d or static)
        rdzv_port: port on rank 0's host for the c10d store (multi-host only)
        mounts: mounts in the container, e.g. type=bind,src=/data,dst=/data
        job_name: job name as {experiment}/{run}; defaults to recsys_llm/JOB
    """
    if not checkpoint.strip():  # every worker stopped at its start with `--checkpoint ''`, after scheduling
        raise ValueError(f"checkpoint={checkpoint!r}: expected a checkpoint directory or a run directory")
    if job not in TRAINED_JOBS:
        raise ValueError(f"job must be one of {list(TRAINED_JOBS)}, got {job!r}")
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
    # the jobs take --checkpoint and --config themselves (a second one replaces the component's)
    own_options = {f"--{name}" for name in inspect.signature(trained).parameters} - {"--checkpoint", "--config"}
    misplaced = [arg for arg in job_args if arg.split("=", 1)[0] in own_options]
    if misplaced:
        raise ValueError(
            f"{misplaced} among the job's arguments never reach the component: torchx hands the job every argument "
            "after the first positional one (or --); put the component's options before them"
        )
    if host_gpus > 0 and not any(arg.split("=", 1)[0] == "train.device" for arg in job_args):
        # GPUs asked for: a host without a usable one (a CPU build of torch in the image) fails at once, not
        # runs on the CPU with the GPUs idle
        # after a `--` where teacher-outputs' --splits (which takes every word after it) may end the arguments
        separator = ["--"] if "--splits" in job_args and "--" not in job_args else []
        job_args = (*job_args, *separator, "train.device=cuda")
    worker_env = dict(env or {})
    if nproc_per_node > 1:  # torchrun would give each worker one CPU thread: give it its share of the host's CPUs
        host_cpus = specs.resource(h=named_resource).cpu if named_resource else cpu
        worker_env.setdefault("OMP_NUM_THREADS", str(max(1, host_cpus // nproc_per_node)))
    app = ddp(
        job,
        "--checkpoint",
        checkpoint,
        *(["--config", config] if config else []),
        *job_args,
        m="recsys_llm.cli",
        image=image,
        name=job_name or f"recsys_llm/{job}",
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
    app.roles[0].name = {"teacher-outputs": "teacher"}.get(job, job)
    if rdzv_backend == "static":
        # dist.ddp single-quotes --node_rank '${replica_id}', which AWS Batch fills with $AWS_BATCH_JOB_NODE_INDEX:
        # bash then handed torchrun that text ("invalid int value") on every node; in double quotes bash expands it
        # (the other schedulers fill in the replica's number)
        role = app.roles[0]
        rank = specs.macros.replica_id
        role.args = [arg.replace(f"--node_rank '{rank}'", f'--node_rank "{rank}"') for arg in role.args]
    return app
