"""Planner + DistributedModelParallel + fused table optimizers + dense optimizer.

The recipe torchrec's own DLRM example follows, packaged so every task of the
project (plain backbones, LLaCTR, ELEC teacher-student pairs) is sharded the same way
(its settings: :mod:`recsys_llm.train.sharding_config`; what the planner is given:
:mod:`recsys_llm.train.planner_inputs`):

1. fused table optimizers are attached to every trainable EBC table with
   ``_apply_optimizer_in_backward`` *before* sharding, so the sharder builds FBGEMM
   TBEs that update the rows inside the backward pass (no gradient tensors for tables);
2. ``EmbeddingShardingPlanner`` proposes a plan for a ``Topology(world_size, compute_device)``
   built by torchrec's ``TopologyFactory`` (``planner_inputs.build_topology``),
   optionally constrained per table (sharding types, compute kernels);
3. ``DistributedModelParallel`` shards the EBCs and materialises any table that was
   created on the ``meta`` device shard by shard (each rank allocates only its own shards; a
   table-wise shard is a whole table, and a ``data_parallel`` one is whole on every rank),
   then wraps the remaining dense part in DDP;
4. the dense parameters get a ``KeyedOptimizerWrapper`` (Adam, Adagrad, SGD; clipping their gradients
   first with ``optim.max_grad_norm``), combined with ``model.fused_optimizer`` into one
   ``CombinedOptimizer`` the pipeline steps.
   Tables the plan replicates (``data_parallel``) or puts on the ``dense`` kernel have no
   fused optimizer (DDP all-reduces their gradients); they get the table optimizer
   (``optim.sparse``, its lr and eps; no weight decay, as no table gets any) as a non-fused
   torch optimizer of their own, so a table trains the same way whichever placement the
   planner picks. Unlike the fused kernels, which touch only the rows of the batch, it steps
   whole tables (Adam's moments then move rows the batch did not use). One exception is torchrec's:
   row-wise Adagrad on a table split by columns (``column_wise``, ``table_column_wise``, in shards
   at least 128 wide) keeps one accumulator per row *of each column shard* (the mean of that
   shard's squared gradients), so such a table takes other steps than whole (on 2 CPU ranks, a 256-wide
   table after 2 steps: up to 0.1 apart); ``adagrad`` and ``sgd`` train it alike in every placement.

**Frozen tables** (pretrained or LLM-derived vectors that must not train) are the tables
named in ``ShardingConfig.frozen_tables`` plus every table of an EBC module carrying the
attribute ``frozen = True``. In torchrec 1.8 a sharded (non-replicated) table always uses a
fused FBGEMM kernel (the ``dense`` kernel exists only for ``data_parallel``), and FBGEMM's
optimizer-free mode (``OptimType.NONE``) is CUDA-only. So a frozen table gets the fused
kernel with plain SGD at ``lr = 0`` -- SGD keeps **no optimizer state**, and the different
fused parameters make the sharder put frozen tables in their own TBE -- and after sharding
each all-frozen TBE's autograd placeholder gets ``requires_grad=False``, so autograd never
calls its backward: **no gradient, no update, no backward time**. Replication
(``data_parallel``) is refused for frozen tables (DDP would need their gradients). Keep
frozen tables in their own EmbeddingBagCollection (DESIGN.md); each rank holds only its
shards, which a loader can fill from ``model.state_dict()`` shard by shard.

Example::

    model, plan = shard_model(task, torch.device("cpu"), world_size=2,
                              sharding=ShardingConfig(), optim=OptimizerConfig())
    optimizer = build_optimizer(model, OptimizerConfig())
    print(describe_plan(plan))   # recsys_llm.train.plan_report: which ranks hold which table shards
"""

import contextlib
import os
import re
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Set, Tuple

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torch.distributed.optim import apply_optimizer_in_backward as _in_backward_registry
from torchrec import optim as trec_optim
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbeddingBag
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import ParameterConstraints, PlannerError, PlannerErrorType
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.clipping import GradientClipping, GradientClippingOptimizer
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_llm.models.embedding import FILLED_BEFORE_SHARDING
from recsys_llm.modules.random_stream import give_rank_its_own_stream
from recsys_llm.train.dense_reduction import ONE_BUCKET_MB, reduce_in_parameter_order
from recsys_llm.train.distributed import host_group
from recsys_llm.train.plan_file import read_plan_file, with_constraint_settings
from recsys_llm.train.plan_report import table_placements
from recsys_llm.train.planner_inputs import (
    build_constraints,
    build_topology,
    find_tables,
    frozen_table_names,
    planner_host_memory,
    planner_proposers,
)
from recsys_llm.train.qcomms import qcomm_sharders
from recsys_llm.train.sharding_config import (
    COMPUTE_KERNELS,
    CPU_SHARDING_TYPES,
    CPU_SPARSE_OPTIMIZERS,
    CUDA_ONLY_KERNELS,
    DENSE_OPTIMIZERS,
    FBGEMM_CUDA_MAX_DIM,
    FUSED_DENSE_DEVICES,
    SHARDING_TYPES,
    SPARSE_OPTIMIZERS,
    UNFUSED_SPARSE_OPTIMIZERS,
    OptimizerConfig,
    ShardingConfig,
)


def _sharder_kernels(sharding_type: str, compute_device: str) -> Tuple[str, ...]:
    """The compute kernels torchrec 1.8's EBC sharder runs a ``sharding_type`` with on ``compute_device``:
    ``dense`` for data_parallel only, ``fused`` (and on CUDA the unified-memory kernels) for the sharded
    types, none for a row-wise type on CPU."""
    if sharding_type == "data_parallel":
        return ("dense",)
    if compute_device == "cpu":
        return ("fused",) if sharding_type in CPU_SHARDING_TYPES else ()
    return ("fused",) + CUDA_ONLY_KERNELS


def _plan_on_rank_0(make_plan: Callable[[], ShardingPlan]) -> Tuple[Optional[ShardingPlan], Optional[Tuple[str, str]]]:
    """``make_plan()`` (the planner's ``plan``, or :func:`~recsys_llm.train.plan_file.read_plan_file`) on rank 0,
    broadcast to every rank, as ``collective_plan`` does, its refusal too: ``collective_plan`` raised it on rank
    0 alone, the other ranks waiting in the broadcast.

    Returns:
        Tuple: the plan, or None and the planner's refusal as ``(PlannerErrorType value, message)``.

    Raises:
        ValueError: on every rank, a plan file refused on rank 0 (its message).
    """
    outcome: List[Any] = [None]
    if dist.get_rank() == 0:
        try:
            outcome = [("plan", make_plan())]
        except PlannerError as error:
            outcome = [("refused", (error.error_type.value, str(error)))]
        except (OSError, ValueError) as error:  # a plan file missing or refused
            outcome = [("error", str(error))]
    dist.broadcast_object_list(outcome, src=0, group=host_group())  # kept off the GPU under NCCL
    kind, value = outcome[0]
    if kind == "error":
        raise ValueError(value)
    return (value, None) if kind == "plan" else (None, value)


def _no_room_message(task: nn.Module, world_size: int, compute_device: str, capacity: Optional[int],
                     error: str) -> str:
    """What a plan that found no room says: the largest tables' sizes against the memory of the ranks."""
    sizes = {config.name: config.num_embeddings * config.embedding_dim * DATA_TYPE_NUM_BITS[config.data_type] // 8
             for _, ebc in find_tables(task).values() for config in ebc.embedding_bag_configs()}
    largest = sorted(sizes.items(), key=lambda item: -item[1])[:3]
    where = "host memory" if compute_device == "cpu" else "GPU memory"
    each = f" of {capacity / 2**30:.1f} GiB {where} each" if capacity else ""
    shown = ", ".join(f"{name} {size / 2**30:.2f} GiB" for name, size in largest)
    first = error.strip().splitlines()[0] if error.strip() else "PlannerError"
    # the planner's own totals: the ranks' memory less its reserve for dense parts and buffers, and what the tables
    # need with optimizer state and their lookups' input / output buffers at this batch size (device and host memory,
    # GB), which the weights and the ranks' memory alone hide
    totals = {what: found.group(1) for what in ("available", "requirement")
              if (found := re.search(rf"Global storage {what} for model parallel: (Storage\([^)]*\))", error))}
    planned = (f"; the planner's totals: {totals['available']} available to the tables after its reserve, "
               f"{totals['requirement']} needed with optimizer state and lookup buffers" if len(totals) == 2 else "")
    more = "more hosts" if compute_device == "cpu" else "more GPUs"  # on CPU a host's ranks share its memory
    return (f"sharding: the planner found no room for the tables on {world_size} rank(s){each} (the tables' weights "
            f"{sum(sizes.values()) / 2**30:.2f} GiB in all, before optimizer state; the largest: {shown}{planned}); "
            f"use {more}, or smaller tables (fewer rows: --hash-size, the schema's cardinality; a smaller "
            f"model.embedding_dim) (torchrec: {first})")


def _table_optimizer_kwargs(optim: OptimizerConfig) -> Dict[str, Any]:
    """lr and eps (not SGD) of the table optimizer; no weight decay: FBGEMM's fused CPU kernels
    ignore it, so a table would decay or not by its placement (``optim.weight_decay`` is the dense
    parameters')."""
    kwargs: Dict[str, Any] = {"lr": optim.sparse_lr}
    if optim.sparse != "sgd":
        kwargs["eps"] = optim.eps
    return kwargs


def _apply_fused_optimizers(model: nn.Module, frozen: Set[str], optim: OptimizerConfig) -> List[nn.Parameter]:
    """Attaches the table optimizer to every trainable table (must run before DMP); returns the tables' parameters
    it registered (for :func:`release_in_backward_registrations` once DMP has replaced them)."""
    optimizer_class = SPARSE_OPTIMIZERS[optim.sparse]
    kwargs = _table_optimizer_kwargs(optim)
    registered: List[nn.Parameter] = []
    for ebc in {id(m): m for _, m in find_tables(model).values()}.values():
        for table_name, bag in ebc.embedding_bags.items():
            params = list(bag.parameters())
            registered.extend(params)
            if table_name in frozen:
                # SGD holds no state; lr 0 makes even a stray backward a no-op.
                _apply_optimizer_in_backward(trec_optim.SGD, params, {"lr": 0.0})
            else:
                _apply_optimizer_in_backward(optimizer_class, params, kwargs)
    return registered


def release_in_backward_registrations(params: List[nn.Parameter], kept: Optional[nn.Module] = None) -> int:
    """Drops torch's registrations of ``_apply_optimizer_in_backward`` for ``params`` that ``kept`` (the sharded
    model) no longer holds: its module-level maps are keyed weakly by the parameter, but the value (the parameter's
    ``AccumulateGrad`` node) and the hook it holds keep the parameter alive, so every unsharded table parameter
    (with its optimizer) passed to it lived as long as the process: a process that builds models in a loop
    (``evaluate`` / ``train`` called from Python, a daily job) grew at every build. Returns how many were released."""
    live = {id(p) for p in kept.parameters()} if kept is not None else set()
    # torch's own maps (absent from another torch version: nothing to release there, and sharding goes on)
    hook_handles = getattr(_in_backward_registry, "param_to_optim_hook_handle_map", {})
    grad_accumulators = getattr(_in_backward_registry, "param_to_acc_grad_map", {})
    released = 0
    for param in params:
        if id(param) in live:
            continue
        handles = hook_handles.pop(param, None) or []
        for handle in handles:
            handle.remove()
        if grad_accumulators.pop(param, None) is not None or handles:
            released += 1
    return released


def embedding_kernels(model: nn.Module) -> Iterator[Tuple[str, BatchedFusedEmbeddingBag]]:
    """Every fused TBE kernel of a sharded model, with a path for messages.

    A sharded EBC keeps its lookups in a plain list (``_lookups``, torchrec 1.8), which
    ``named_modules`` does not walk, so the lookups are searched explicitly.
    """
    for path, module in model.named_modules():
        for index, lookup in enumerate(getattr(module, "_lookups", None) or []):
            for inner, kernel in lookup.named_modules():
                if isinstance(kernel, BatchedFusedEmbeddingBag):
                    yield f"{path}._lookups.{index}.{inner}", kernel


def _freeze_sharded(model: DistributedModelParallel, frozen: Set[str]) -> None:
    """Turns off the backward of every TBE that holds only frozen tables.

    Raises:
        RuntimeError: a TBE mixes frozen and trained tables.
    """
    for path, module in embedding_kernels(model):
        names = [config.name for config in module.config.embedding_tables]
        frozen_here = [n for n in names if n in frozen]
        if not frozen_here:
            continue
        if len(frozen_here) != len(names):
            raise RuntimeError(
                f"{path}: frozen tables {frozen_here} share one fused kernel with trained tables "
                f"{sorted(set(names) - frozen)}; put frozen tables in their own EmbeddingBagCollection"
            )
        module.emb_module.placeholder_autograd_tensor.requires_grad_(False)


def _check_plannable(constraints: Dict[str, ParameterConstraints], frozen: Set[str], compute_device: str) -> None:
    """Refuses a table whose allowed sharding types and compute kernels leave the sharder nothing to run on
    ``compute_device`` (the planner fails with a RuntimeError that sends the user to its log), naming the table.

    Raises:
        ValueError: e.g. ``sharding_types=[table_wise]`` with ``compute_kernels=[dense]`` (dense is for
            data_parallel only), or on CPU a frozen table allowed ``[data_parallel, row_wise]`` (a frozen
            table is never replicated, and row-wise types need CUDA).
    """
    for name, constraint in constraints.items():
        types = constraint.sharding_types or list(SHARDING_TYPES)
        kernels = constraint.compute_kernels or list(COMPUTE_KERNELS)
        if any(kernel in _sharder_kernels(t, compute_device) for t in types for kernel in kernels):
            continue
        table = f"table {name!r}"
        if name in frozen:
            table = f"frozen table {name!r} (the 'fused' kernel, never data_parallel)"
        raise ValueError(
            f"{table}: no allowed sharding type runs on {compute_device} with an allowed compute kernel "
            f"(sharding types {types}, compute kernels {kernels}); data_parallel runs only the 'dense' kernel, the "
            f"sharded types 'fused' (on CUDA also {list(CUDA_ONLY_KERNELS)}), and row-wise types need CUDA: change "
            f"sharding.sharding_types / sharding.compute_kernels, or sharding.table_constraints.{name}"
        )


def shard_model(
    task: nn.Module,
    device: torch.device,
    world_size: int,
    sharding: ShardingConfig,
    optim: OptimizerConfig,
    batch_size: Optional[int] = None,
    ids_per_bag: Optional[Mapping[str, float]] = None,
) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """Plans and shards ``task``; the default process group must exist.

    Args:
        task (nn.Module): unsharded model; its EBCs may live on ``meta`` (recommended: DMP then
            allocates and initialises only this rank's shards), dense parts on ``device``.
            DMP allocates and initialises every table afresh wherever it was built, so table
            weights set before sharding are lost: fill tables afterwards
            (``teacher_student.load_full_state``, ``semantic_table.load_semantic_vectors``). Tables
            filled before by those, or by ``load_state_dict`` into a backbone's or entity table's EBC,
            are refused.
        device (torch.device): this rank's compute device.
        world_size (int): number of ranks in the topology.
        sharding (ShardingConfig): planner constraints and frozen tables.
        optim (OptimizerConfig): the fused table optimizer to attach.
        batch_size (Optional[int]): per-rank batch size for the planner's cost model.
        ids_per_bag (Optional[Mapping[str, float]]): feature -> mean ids per bag for the planner's cost model
            (:func:`build_constraints`); None: one per bag.

    Returns:
        Tuple[DistributedModelParallel, ShardingPlan]: the sharded model and its plan.

    Raises:
        ValueError: no EBC, tables filled before sharding, dense buffers on ``meta``, a
            ``sharding.compute_device`` other than ``device``'s, sharding types / kernels / ``optim.sparse``
            the CPU kernels lack, constraints nothing can run (:func:`_check_plannable`), a plan file refused,
            a planner refusal (no room, or no plan meets the constraints), a CUDA shard wider than
            ``FBGEMM_CUDA_MAX_DIM``, or (one rank) dense tensors on another device.
        RuntimeError: no default process group (``recsys_llm.train.distributed.init_distributed``), a frozen
            table planned on a non-fused kernel, or parameters left on ``meta`` after sharding.
    """
    if not find_tables(task):
        raise ValueError("shard_model: the model has no EmbeddingBagCollection to shard")
    filled = sorted({f"{path} ({getattr(ebc, FILLED_BEFORE_SHARDING)})" for path, ebc in find_tables(task).values()
                     if getattr(ebc, FILLED_BEFORE_SHARDING, None)})
    if filled:
        raise ValueError(
            f"shard_model: the tables of {filled} were filled before sharding, but DMP allocates and initialises "
            "every table afresh, so those weights would be lost (the dense ones kept): shard first, then call "
            "load_full_state / load_semantic_vectors on the sharded model (each rank fills its own shards)"
        )
    buffers_on_meta = dense_buffers_on_meta(task)
    if buffers_on_meta:
        raise ValueError(
            f"shard_model: the buffer(s) {buffers_on_meta[:5]} outside the EmbeddingBagCollections are on the meta "
            "device; DMP would give them uninitialised memory (e.g. a torchrec DLRM built under "
            "`with torch.device(\"meta\")`: its interaction's triu_indices), which nothing fills: build the dense "
            "modules on the real device and only the tables on meta (EmbeddingBagCollection(..., device=...))"
        )
    frozen = frozen_table_names(task, sharding)
    compute_device = sharding.compute_device if sharding.compute_device != "auto" else device.type
    if compute_device != device.type:
        raise ValueError(f"sharding.compute_device={sharding.compute_device!r}, but this rank computes on {device.type} "
                         "(train.device): plan for the device the job runs on ('auto')")
    if compute_device == "cpu":
        for name, allowed in sharding.allowed_lists("sharding_types"):
            if allowed and not set(allowed) & set(CPU_SHARDING_TYPES):
                raise ValueError(f"{name}={list(allowed)}: torchrec's CPU sharder offers only {list(CPU_SHARDING_TYPES)} "
                                 "(row-wise types need CUDA); allow one of those on CPU")
        for name, allowed in sharding.allowed_lists("compute_kernels"):
            if allowed and set(allowed) <= set(CUDA_ONLY_KERNELS):
                raise ValueError(f"{name}={list(allowed)}: unified-memory kernels run on CUDA only; allow 'fused' "
                                 "(or 'dense') on CPU")
    if compute_device == "cpu" and optim.sparse not in CPU_SPARSE_OPTIMIZERS:
        raise ValueError(
            f"optim.sparse={optim.sparse!r}: FBGEMM's CPU embedding kernels implement only "
            f"{sorted(CPU_SPARSE_OPTIMIZERS)}; pick one of those, or train on CUDA"
        )
    constraints = build_constraints(task, sharding, compute_device, ids_per_bag)
    _check_plannable(constraints, frozen, compute_device)
    if not (dist.is_available() and dist.is_initialized()):  # before the task is changed (fused optimizers)
        raise RuntimeError(
            "shard_model: no default process group; call recsys_llm.train.distributed.init_distributed() first "
            "(one process without torchrun: a group of one), or run the script under torchrun"
        )
    registered = _apply_fused_optimizers(task, frozen, optim)
    try:
        return _plan_and_shard(task, device, world_size, sharding, frozen, compute_device, constraints, batch_size)
    finally:  # DMP has read them (the sharded tables' optimizers are its own); parameters the model still holds
        # (a refused plan's unsharded task, a table DMP kept as it was) keep theirs
        release_in_backward_registrations(registered, task)


def _plan_and_shard(task: nn.Module, device: torch.device, world_size: int, sharding: ShardingConfig,
                    frozen: Set[str], compute_device: str, constraints: Dict[str, ParameterConstraints],
                    batch_size: int) -> Tuple[DistributedModelParallel, ShardingPlan]:
    """:func:`shard_model` after the tables' optimizers are attached: plans, shards and checks the model."""
    # the GPU's own memory, not the planner's 32 GB default; ranks per host from torchrun's
    # LOCAL_WORLD_SIZE (hierarchical plans such as table_row_wise group the ranks of one host)
    hbm_cap = torch.cuda.get_device_properties(device).total_memory if device.type == "cuda" else None
    local_world_size = world_size
    if os.environ.get("WORLD_SIZE") == str(world_size):  # torchrun's job, not a smaller world asked for here
        local_world_size = min(int(os.environ.get("LOCAL_WORLD_SIZE", world_size)), world_size)
    ddr_cap = planner_host_memory(compute_device, local_world_size)
    topology = build_topology(world_size, compute_device, hbm_cap=hbm_cap, local_world_size=local_world_size,
                              ddr_cap=ddr_cap)
    # planned and sharded with the same sharders: the planner prices the quantized collectives DMP builds
    sharders = qcomm_sharders(sharding.qcomms, world_size)
    if sharding.plan_file:
        def make_plan() -> ShardingPlan:
            plan = read_plan_file(sharding.plan_file, find_tables(task), world_size, local_world_size, compute_device,
                                  constraints)
            return with_constraint_settings(plan, constraints)
    else:
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=batch_size,
            constraints=constraints,
            proposer=planner_proposers(sharding.proposer_patience),
            storage_reservation=HeuristicalStorageReservation(percentage=sharding.storage_reservation),
            debug=False,
        )

        def make_plan() -> ShardingPlan:
            return planner.plan(task, sharders)
    plan, refusal = _plan_on_rank_0(make_plan)
    if refusal is not None:
        error_type, text = refusal
        if error_type == PlannerErrorType.INSUFFICIENT_STORAGE.value or (
                error_type == PlannerErrorType.STRICT_CONSTRAINTS.value and "does not fit on any rank" in text):
            capacity = ddr_cap if compute_device == "cpu" else hbm_cap
            raise ValueError(_no_room_message(task, world_size, compute_device, capacity, text))
        # a refusal of the settings (constraints no plan meets), not a failure of the program
        raise ValueError(f"sharding: torchrec's planner found no plan ({error_type}): {text}; change "
                         "sharding.sharding_types, sharding.compute_kernels or sharding.table_constraints") \
            from PlannerError(text, PlannerErrorType(error_type))
    if compute_device == "cuda":
        check_shard_widths(plan)
    # one rank has nothing to all-reduce: DDP would only add hooks (~4% of a DeepFM step on CPU)
    # on 3+ ranks one bucket reduced in parameter order: the gradient sums do not depend on DDP's
    # bucket rebuild, so a resumed run is exact (CanonicalAllReduce; a sum of two is exact anyway)
    canonical = world_size > 2 and sharding.exact_dense_reduction
    wrapper = DefaultDataParallelWrapper(bucket_cap_mb=ONE_BUCKET_MB) if canonical else None
    with _table_init_stream_of_this_rank(device):  # DMP initialises this rank's table shards
        model = DistributedModelParallel(task, device=device, plan=plan, init_data_parallel=world_size > 1,
                                         init_parameters=True, data_parallel_wrapper=wrapper, sharders=sharders)
    if canonical:
        reduce_in_parameter_order(model)
    placements = table_placements(plan)
    not_fused = sorted(t for t in frozen if placements[t]["compute_kernel"] != "fused")
    if not_fused:
        raise RuntimeError(f"the plan puts frozen tables {not_fused} on a non-fused kernel; they need 'fused'")
    _freeze_sharded(model, frozen)  # this rank's kernels (a table-wise table lives on one rank)
    left_on_meta = [name for name, p in model.named_parameters() if p.device.type == "meta"]
    if left_on_meta:
        raise RuntimeError(
            f"parameters still on the meta device after sharding: {left_on_meta[:5]}; only EBC tables may be "
            "created on meta (DMP materialises them); build dense modules on the real device"
        )
    # one rank has no DDP to move the dense modules to its device (with several ranks, DDP does)
    elsewhere = dense_tensors_elsewhere(model, device) if world_size == 1 else []
    if elsewhere:
        raise ValueError(
            f"shard_model: {elsewhere[:5]} are not on {device}, where this rank computes; build the dense modules "
            f"and plug-in terms there (`with torch.device({str(device)!r}): ...`, build_llactr_terms(..., device))"
        )
    return model, plan


@contextlib.contextmanager
def _table_init_stream_of_this_rank(device: torch.device) -> Iterator[None]:
    """Rank 0 draws from the RNG as it stands, rank r > 0 from a stream of its own (seeded by a draw from
    the RNG plus r), its RNG restored afterwards.

    Every rank is seeded alike (``train.seed``), and DMP initialises each rank's table shards from
    the rank's RNG: drawn from one stream, the table on rank 1 began as a copy of the one on rank 0
    (proportional rows where the shapes differ; the column shards of one table repeated each other).
    Replicated tables and dense parameters are unaffected: DDP broadcasts rank 0's.
    """
    rank = dist.get_rank()
    if rank == 0:
        yield
        return
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        give_rank_its_own_stream(rank, device)
        yield


def dense_buffers_on_meta(model: nn.Module) -> List[str]:
    """Buffers outside the EBCs that are on ``meta``: DMP allocates them with ``to_empty`` and no
    ``reset_parameters`` or state dict need fill them (a DLRM's non-persistent ``triu_indices``)."""
    in_tables = {id(t) for m in model.modules() if isinstance(m, EmbeddingBagCollection) for t in m.buffers()}
    return [name for name, t in model.named_buffers() if id(t) not in in_tables and t.is_meta]


def dense_tensors_elsewhere(model: nn.Module, device: torch.device) -> List[str]:
    """Parameters and buffers outside the EBCs that are on neither ``device`` nor ``meta``."""
    in_tables = {id(t) for m in model.modules() if isinstance(m, (EmbeddingBagCollection, ShardedEmbeddingBagCollection))
                 for t in [*m.parameters(), *m.buffers()]}
    return [name for name, t in [*model.named_parameters(), *model.named_buffers()]
            if id(t) not in in_tables and t.device.type != "meta"
            and (t.device.type != device.type or (device.index is not None and t.device.index != device.index))]


def build_optimizer(model: DistributedModelParallel, optim: OptimizerConfig) -> CombinedOptimizer:
    """``CombinedOptimizer([fused table optimizer, unfused table optimizer, dense KeyedOptimizerWrapper])``.

    Every trainable parameter without an in-backward optimizer is stepped here: table weights
    the plan left unfused (``data_parallel`` or the ``dense`` kernel) by ``optim.sparse``, the
    rest by ``optim.dense`` (frozen tables have ``requires_grad=False`` and are skipped). The
    unfused table optimizer is left out when the plan fuses every table, the dense one when the
    model trains nothing but tables (torch refuses an optimizer without parameters). With
    ``optim.max_grad_norm`` the dense one clips its gradients first (torchrec's ``GradientClippingOptimizer``;
    the dense parameters are replicated, their gradients already averaged over the ranks, so the local norm
    is the global one).
    """
    table_weights = {id(param) for param in _sharded_table_weights(model)}
    dense_params: Dict[str, nn.Parameter] = {}
    unfused_tables: Dict[str, nn.Parameter] = {}
    for name, param in in_backward_optimizer_filter(model.named_parameters()):
        if param.requires_grad:
            (unfused_tables if id(param) in table_weights else dense_params)[name] = param
    optimizer_class = DENSE_OPTIMIZERS[optim.dense]
    kwargs: Dict[str, Any] = {"lr": optim.dense_lr, "weight_decay": optim.weight_decay}
    if optim.dense != "sgd":
        kwargs["eps"] = optim.eps
    devices = {param.device.type for param in dense_params.values()}
    if devices and devices <= FUSED_DENSE_DEVICES[optim.dense]:
        kwargs["fused"] = True  # one kernel over all parameters: 3-4x faster steps than the per-tensor loop on CPU
    optimizers: List[Any] = [model.fused_optimizer]
    if unfused_tables:
        table_class, table_kwargs = UNFUSED_SPARSE_OPTIMIZERS[optim.sparse], _table_optimizer_kwargs(optim)
        optimizers.append(KeyedOptimizerWrapper(unfused_tables, lambda params: table_class(params, **table_kwargs)))
    if dense_params:
        dense = KeyedOptimizerWrapper(dense_params, lambda params: optimizer_class(params, **kwargs))
        if optim.max_grad_norm > 0:
            dense = GradientClippingOptimizer(dense, clipping=GradientClipping.NORM, max_gradient=optim.max_grad_norm)
        optimizers.append(dense)
    return CombinedOptimizer(optimizers)


def dense_gradient_norm(optimizer: CombinedOptimizer) -> Optional[float]:
    """The L2 norm of the dense gradients of the last step, before clipping (reading it waits for that step); None
    without ``optim.max_grad_norm`` (no norm is computed) or before the first step."""
    for _, part in optimizer.optimizers:
        if isinstance(part, GradientClippingOptimizer) and part.last_total_grad_norm is not None:
            return float(part.last_total_grad_norm)
    return None


def _sharded_table_weights(model: nn.Module) -> Iterator[nn.Parameter]:
    """The table weights a sharded EBC registers (``embedding_bags.<table>.weight``), fused or not."""
    for module in model.modules():
        if isinstance(module, ShardedEmbeddingBagCollection):
            yield from module.embedding_bags.parameters()


def check_shard_widths(plan: ShardingPlan) -> None:
    """Raises when a CUDA plan leaves a shard wider than FBGEMM's CUDA kernels take: torchrec splits a
    table's columns only into equal shards of at least 128 that divide its width, so a table 2,053 wide
    (no such divisor up to 2,048) stays one shard even where it may only be column-wise.

    Raises:
        ValueError: naming the table, its shard widths and what widths split.
    """
    for table, placement in table_placements(plan).items():
        widths = sorted({shard["sizes"][1] for shard in placement["shards"]})
        if widths and widths[-1] > FBGEMM_CUDA_MAX_DIM:
            raise ValueError(
                f"table {table!r}: the plan gives it shards {widths} wide ({placement['sharding_type']}), and "
                f"FBGEMM's CUDA kernels take at most {FBGEMM_CUDA_MAX_DIM} columns; torchrec splits columns only "
                "into equal shards of at least 128 that divide the width: give the table a width with such a "
                "divisor up to 2,048 (e.g. a multiple of 128), e.g. by projecting the vectors it holds"
            )
