"""torchx component: the offline LLM jobs (``recsys-llm semantics tune|encode|adapt|export``).

Built on :func:`torchx.components.dist.ddp`. ``tune`` is LLaCTR's SSFT, ``encode`` writes
LLaCTR's field/feature vectors, ``adapt`` fine-tunes ELEC's CTR-adapted LLM and ``export``
writes ELEC's vectors for every row (or entity) in resumable chunks, split over the
workers by torchrun's ``RANK``/``WORLD_SIZE``: more workers encode more rows at once.
Launch::

    torchx run -s local_cwd torchx_components/encode.py:encode --job export --nproc_per_node 2 \\
        -- --schema data/synthetic/schema.json --llm runs/elec_llm --output-dir runs/elec_vectors

This file is loaded by torchx with ``exec`` (not imported), so it depends on torchx only.
"""

import inspect
from typing import Dict, List, Optional

import torchx
from torchx import specs
from torchx.components.dist import ddp

SEMANTICS_JOBS = ("tune", "encode", "adapt", "export")

# the rendezvous backends dist.ddp can point torchrun at: it gives every backend the endpoint rank 0's
# host:rdzv_port (localhost:0 on one host), where only c10d and static have a store; etcd and etcd-v2 need an
# etcd server there (and the python-etcd package), so they failed in torchrun on the cluster
RDZV_BACKENDS = ("c10d", "static")


def encode(
    job: str,
    *job_args: str,
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
    Runs an offline LLM job, ``python -m recsys_llm.cli semantics JOB [job_args ...]``, on
    nnodes x nproc_per_node torchrun workers (torchx dist.ddp). export splits its row chunks
    over the workers by RANK/WORLD_SIZE and skips finished chunks, so a retried job resumes.

    Args:
        job: which semantics sub-command to run: tune (SSFT), encode (field vectors), adapt (CTR-adapted LLM) or export (row/entity vectors)
        job_args: arguments of the sub-command, after -- (e.g. -- --schema data/x/schema.json --llm runs/llm --output-dir runs/vectors)
        nnodes: number of hosts (replicas of the role)
        nproc_per_node: worker processes per host; 0 (the default): for export one per GPU of the host (gpu, or
            the named resource's), 1 on a CPU host; tune, encode and adapt take 1
        cpu: CPUs per host; 0 (the default): 4 per worker
        gpu: GPUs per host
        memMB: host memory in MB per host; 0 (the default): 16384 per worker
        named_resource: a torchx named resource; takes precedence over cpu, gpu and memMB
        image: container image with the project and the LLM weights (ignored by local_cwd)
        env: extra environment variables (e.g. HF_HOME=/models,HF_HUB_OFFLINE=1); with several workers per
            host, OMP_NUM_THREADS defaults to cpu / nproc_per_node
        max_retries: scheduler retries of the whole job
        rdzv_backend: torchrun rendezvous backend (c10d or static)
        rdzv_port: port on rank 0's host for the c10d store (multi-host only)
        mounts: mounts in the container, e.g. type=bind,src=/models,dst=/models,readonly
        job_name: job name as {experiment}/{run}; defaults to recsys_llm/semantics-JOB
    """
    if job not in SEMANTICS_JOBS:
        raise ValueError(f"job must be one of {list(SEMANTICS_JOBS)}, got {job!r}")
    host_gpus = specs.resource(h=named_resource).gpu if named_resource else gpu
    if nproc_per_node == 0:  # an export worker per GPU: one would leave the host's other GPUs idle
        nproc_per_node = max(1, host_gpus) if job == "export" else 1
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
    cpu = cpu or 4 * nproc_per_node
    memMB = memMB or 16384 * nproc_per_node
    if job != "export" and nnodes * nproc_per_node > 1:
        raise ValueError(
            f"job {job!r} runs as one process (only export splits its work over workers); every extra worker "
            f"would redo it and write the same output: use nnodes=1 nproc_per_node=1, got {nnodes}x{nproc_per_node}"
        )
    if job != "export" and gpu > 1 and not named_resource:  # it loads the LLM on one device (cuda:0)
        raise ValueError(f"job {job!r} runs the LLM on one GPU; gpu={gpu} would hold {gpu - 1} more idle for the "
                         "whole job: pass --gpu 1")
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
    elif 0 < gpu < nproc_per_node:  # each export worker encodes on cuda:LOCAL_RANK
        raise ValueError(f"gpu={gpu} per host for nproc_per_node={nproc_per_node} workers: each worker needs a GPU of "
                         f"its own; pass --gpu {nproc_per_node}, or --nproc_per_node {gpu}")
    own_options = {f"--{name}" for name in inspect.signature(encode).parameters}
    misplaced = [arg for arg in job_args if arg.split("=", 1)[0] in own_options]
    if misplaced:
        raise ValueError(
            f"{misplaced} among the job's arguments never reach the component: torchx hands the job every argument "
            "after the first positional one (or --); put the component's options before them"
        )
    if host_gpus > 0 and not any(arg.split("=", 1)[0] == "--device" for arg in job_args):
        # GPUs asked for: a host whose torch sees none (a CPU build in the image) fails at once, not runs the LLM on
        # its CPUs for hours with the GPUs idle; a bare cuda is each worker's own GPU (cuda:LOCAL_RANK)
        job_args = ("--device", "cuda", *job_args)
    worker_env = dict(env or {})
    if nproc_per_node > 1:  # torchrun would give each worker one CPU thread: give it its share of the host's CPUs
        host_cpus = specs.resource(h=named_resource).cpu if named_resource else cpu
        worker_env.setdefault("OMP_NUM_THREADS", str(max(1, host_cpus // nproc_per_node)))
    app = ddp(
        "semantics",
        job,
        *job_args,
        m="recsys_llm.cli",
        image=image,
        name=job_name or f"recsys_llm/semantics-{job}",
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
    app.roles[0].name = "semantics"
    if rdzv_backend == "static":
        # dist.ddp single-quotes --node_rank '${replica_id}', which AWS Batch fills with $AWS_BATCH_JOB_NODE_INDEX:
        # bash then handed torchrun that text ("invalid int value") on every node; in double quotes bash expands it
        # (the other schedulers fill in the replica's number)
        role = app.roles[0]
        rank = specs.macros.replica_id
        role.args = [arg.replace(f"--node_rank '{rank}'", f'--node_rank "{rank}"') for arg in role.args]
    return app
