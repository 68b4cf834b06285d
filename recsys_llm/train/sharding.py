"""Planner + DistributedModelParallel + fused table optimizers + dense optimizer.

The recipe torchrec's own DLRM example follows, packaged so every task of the
project (plain backbones, LLaCTR, ELEC teacher-student pairs) is sharded the same way:

1. fused table optimizers are attached to every trainable EBC table with
   ``_apply_optimizer_in_backward`` *before* sharding, so the sharder builds FBGEMM
   TBEs that update the rows inside the backward pass (no gradient tensors for tables);
2. ``EmbeddingShardingPlanner`` proposes a plan for a ``Topology(world_size, compute_device)``
   built by torchrec's ``TopologyFactory`` (``build_topology``),
   optionally constrained per table (sharding types, compute kernels);
3. ``DistributedModelParallel`` shards the EBCs and materialises any table that was
   created on the ``meta`` device shard by shard (each rank allocates only its own shards; a
   table-wise shard is a whole table, and a ``data_parallel`` one is whole on every rank),
   then wraps the remaining dense part in DDP;
4. the dense parameters get a ``KeyedOptimizerWrapper`` (Adam, Adagrad, SGD), combined
   with ``model.fused_optimizer`` into one ``CombinedOptimizer`` the pipeline steps.
   Tables the plan replicates (``data_parallel``) or puts on the ``dense`` kernel have no
   fused optimizer (DDP all-reduces their gradients); they get the table optimizer
   (``optim.sparse``, its lr and eps; no weight decay, as no table gets any) as a non-fused
   torch optimizer of their own, so a table trains the same way whichever placement the
   planner picks. Unlike the fused kernels, which touch only the rows of the batch, it steps
   whole tables (Adam's moments then move rows the batch did not use).

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
import dataclasses
import os
import re
from typing import Any, Callable, Dict, FrozenSet, Iterator, List, Mapping, Optional, Set, Tuple, Type

import torch
import torch.distributed as dist
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import optim as trec_optim
from torchrec.distributed.batched_embedding_kernel import BatchedFusedEmbeddingBag
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection
from torchrec.distributed.model_parallel import DefaultDataParallelWrapper, DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner, Topology
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    PlannerError,
    PlannerErrorType,
    Proposer,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.distributed.types import CacheParams, ShardingPlan
from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS, DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_llm.data.validation import check_number
from recsys_llm.host_memory import host_memory
from recsys_llm.models.embedding import FILLED_BEFORE_SHARDING
from recsys_llm.modules.random_stream import give_rank_its_own_stream
from recsys_llm.train.dense_reduction import ONE_BUCKET_MB, reduce_in_parameter_order
from recsys_llm.train.plan_file import read_plan_file, with_constraint_settings
from recsys_llm.train.plan_report import table_placements
from recsys_llm.train.pooling_factors import ONE_ID_PER_BAG, table_pooling_factors
from recsys_llm.train.qcomms import QCommsSettings, qcomm_sharders
from recsys_llm.typed_config import ConfigError, build_dataclass, coerce_value

SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "row_wise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": trec_optim.Adagrad,
    "adam": trec_optim.Adam,
    "sgd": trec_optim.SGD,
}
# the fused table optimizers FBGEMM's CPU kernels implement (exact row-wise Adagrad, Adagrad, SGD)
CPU_SPARSE_OPTIMIZERS = frozenset({"row_wise_adagrad", "adagrad", "sgd"})
# the table optimizers for tables without a fused kernel (torchrec.optim's SGD, Adagrad and
# Adam are placeholders that only name a fused FBGEMM optimizer)
UNFUSED_SPARSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "row_wise_adagrad": trec_optim.RowWiseAdagrad,
    "adagrad": torch.optim.Adagrad,
    "adam": torch.optim.Adam,
    "sgd": torch.optim.SGD,
}
DENSE_OPTIMIZERS: Dict[str, Type[torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adagrad": torch.optim.Adagrad,
    "sgd": torch.optim.SGD,
}
# devices on which torch's fused (single-kernel) implementation of each dense optimizer exists
FUSED_DENSE_DEVICES: Dict[str, FrozenSet[str]] = {
    "adam": frozenset({"cpu", "cuda"}),
    "adagrad": frozenset({"cpu"}),
    "sgd": frozenset({"cpu", "cuda"}),
}
SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "row_wise", "table_row_wise", "table_column_wise")
CPU_SHARDING_TYPES = ("data_parallel", "table_wise", "column_wise", "table_column_wise")  # torchrec 1.8's CPU sharder
COMPUTE_KERNELS = ("dense", "fused", "fused_uvm_caching", "fused_uvm")
# rows in host memory reached over unified memory (with an HBM cache of hot rows): CUDA only
CUDA_ONLY_KERNELS = ("fused_uvm_caching", "fused_uvm")
# FBGEMM's CUDA embedding kernels take tables of at most this many columns (fbgemm_gpu codegen's
# max_embedding_dim); a wider table trains on CUDA only split by columns (torchrec's column-wise
# shards are of equal width, at least 128, dividing the table's: check_shard_widths)
FBGEMM_CUDA_MAX_DIM = 2048
COLUMN_SHARDING_TYPES = ("column_wise", "table_column_wise")


def _sharder_kernels(sharding_type: str, compute_device: str) -> Tuple[str, ...]:
    """The compute kernels torchrec 1.8's EBC sharder runs a ``sharding_type`` with on ``compute_device``:
    ``dense`` for data_parallel only, ``fused`` (and on CUDA the unified-memory kernels) for the sharded
    types, none for a row-wise type on CPU."""
    if sharding_type == "data_parallel":
        return ("dense",)
    if compute_device == "cpu":
        return ("fused",) if sharding_type in CPU_SHARDING_TYPES else ()
    return ("fused",) + CUDA_ONLY_KERNELS


@dataclasses.dataclass
class OptimizerConfig:
    """Table (fused, in-backward) and dense optimizers.

    Args:
        sparse (str): ``row_wise_adagrad`` | ``adagrad`` | ``adam`` | ``sgd`` for EBC tables
            (fused into the backward; replicated tables run it as a torch optimizer).
        sparse_lr (float): learning rate of the table optimizer.
        dense (str): ``adam`` | ``adagrad`` | ``sgd`` for everything else.
        dense_lr (float): learning rate of the dense optimizer.
        eps (float): epsilon of Adagrad/Adam (tables and dense).
        weight_decay (float): L2 weight decay of the dense parameters (tables take none: FBGEMM's
            fused CPU kernels ignore it, and a table must train alike whatever its placement).
    """

    sparse: str = "row_wise_adagrad"
    sparse_lr: float = 0.05
    dense: str = "adam"
    dense_lr: float = 1e-3
    eps: float = 1e-8
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(f"optim.sparse must be one of {sorted(SPARSE_OPTIMIZERS)}, got {self.sparse!r}")
        if self.dense not in DENSE_OPTIMIZERS:
            raise ValueError(f"optim.dense must be one of {sorted(DENSE_OPTIMIZERS)}, got {self.dense!r}")
        for name in ("sparse_lr", "dense_lr", "eps"):
            check_number(f"optim.{name}", getattr(self, name), above=0)
        check_number("optim.weight_decay", self.weight_decay, minimum=0)


# proposals in a row rated worse than the best before a greedy proposer stops (ShardingConfig.proposer_patience)
DEFAULT_PROPOSER_PATIENCE = 10
# the share of a rank's memory the planner leaves free beyond its estimates (torchrec's default)
DEFAULT_STORAGE_RESERVATION = 0.15
# FusedParamsConfig.bounds_check_mode -> FBGEMM's mode ('': FBGEMM's default, WARNING)
BOUNDS_CHECK_MODES: Dict[str, BoundsCheckMode] = {
    "fatal": BoundsCheckMode.FATAL,
    "warning": BoundsCheckMode.WARNING,
    "ignore": BoundsCheckMode.IGNORE,
    "none": BoundsCheckMode.NONE,
}
FUSED_PARAMS_KEY = "sharding.fused_params"  # the global FusedParamsConfig's dotted key
# the keys of one table's block of sharding.table_constraints
TABLE_CONSTRAINT_KEYS = ("compute_kernels", "fused_params", "sharding_types")


@dataclasses.dataclass
class FusedParamsConfig:
    """FBGEMM table-batched-embedding settings of every table (torchrec's ``fused_params``).

    They reach torchrec as per-table ``ParameterConstraints`` (``cache_params``,
    ``stochastic_rounding``, ``bounds_check_mode``), the route torchrec 1.8 prefers to a sharder's
    ``fused_params``: the planner prices them (a UVM-cached table's GPU memory follows its cache
    size), writes them into each ``ParameterSharding`` of the plan, and DMP hands them to the
    tables' FBGEMM kernels. A setting left at its default keeps torchrec's and FBGEMM's own.

    Args:
        cache_load_factor (float): for ``fused_uvm_caching`` tables (CUDA), the share of each
            table's rows the GPU caches, strictly between 0 and 1 (0: torchrec's 0.2). Other kernels
            ignore it.
        stochastic_rounding (Optional[bool]): whether FBGEMM rounds the updates of FP16 tables
            stochastically (``model.embedding_dtype=fp16``; CUDA kernels); None: FBGEMM's default
            (True); False: round to nearest (repeatable).
        bounds_check_mode (str): what FBGEMM does with an id outside its table: ``fatal`` (raise),
            ``warning`` (log once, look up row 0), ``ignore`` (row 0), ``none`` (no check: fastest,
            for ids known to be in range); '': FBGEMM's default (``warning``).
        config_key (str): the dotted key of these settings that errors name (no setting itself):
            ``sharding.fused_params``, or a table's ``sharding.table_constraints.<table>.fused_params``.

    One table's own settings (``sharding.table_constraints.<table>.fused_params``) are a
    ``FusedParamsConfig`` too: each one set there (not at its default) replaces the global one for that
    table (:meth:`ShardingConfig.fused_params_of`).

    Example::

        fused = FusedParamsConfig(cache_load_factor=0.1, bounds_check_mode="fatal")
        fused.constraint_kwargs()   # {"cache_params": CacheParams(load_factor=0.1), "bounds_check_mode": ...}
    """

    cache_load_factor: float = 0.0
    stochastic_rounding: Optional[bool] = None
    bounds_check_mode: str = ""
    config_key: dataclasses.InitVar[str] = FUSED_PARAMS_KEY

    def __post_init__(self, config_key: str) -> None:
        # 0: torchrec's default; torchrec refuses a cache of every row (that is the 'fused' kernel)
        check_number(f"{config_key}.cache_load_factor", self.cache_load_factor, minimum=0, below=1)
        if self.bounds_check_mode not in ("", *BOUNDS_CHECK_MODES):
            raise ValueError(f"{config_key}.bounds_check_mode must be '' (FBGEMM's default) or one of "
                             f"{list(BOUNDS_CHECK_MODES)}, got {self.bounds_check_mode!r}")

    def over(self, default: "FusedParamsConfig") -> "FusedParamsConfig":
        """Each of these settings that is set (not at its default), ``default``'s where it is not: a table's own
        settings over the global ones."""
        return FusedParamsConfig(
            cache_load_factor=self.cache_load_factor or default.cache_load_factor,
            stochastic_rounding=default.stochastic_rounding if self.stochastic_rounding is None
            else self.stochastic_rounding,
            bounds_check_mode=self.bounds_check_mode or default.bounds_check_mode,
        )

    def constraint_kwargs(self) -> Dict[str, Any]:
        """The set settings as keyword arguments of one table's ``ParameterConstraints`` (a fresh
        ``CacheParams`` each call); empty when every setting is at its default."""
        kwargs: Dict[str, Any] = {}
        if self.cache_load_factor > 0:
            kwargs["cache_params"] = CacheParams(load_factor=self.cache_load_factor)
        if self.stochastic_rounding is not None:
            kwargs["stochastic_rounding"] = self.stochastic_rounding
        if self.bounds_check_mode:
            kwargs["bounds_check_mode"] = BOUNDS_CHECK_MODES[self.bounds_check_mode]
        return kwargs


@dataclasses.dataclass
class ShardingConfig:
    """How the planner may place tables.

    Args:
        sharding_types (List[str]): sharding types allowed for every table (empty: planner's
            choice). E.g. ``["table_wise", "row_wise"]`` forbids replication. torchrec's CPU
            sharder offers data_parallel, table_wise, column_wise and table_column_wise only
            (row-wise types need CUDA), so on CPU that example plans table-wise. On CUDA a
            table wider than ``FBGEMM_CUDA_MAX_DIM`` may only be column-wise.
        compute_kernels (List[str]): compute kernels allowed for trained tables (empty: any):
            ``dense``, ``fused``, and on CUDA ``fused_uvm_caching`` / ``fused_uvm`` (tables larger
            than GPU memory, kept in host memory, hot rows cached on the GPU / none cached).
        table_constraints (Dict[str, Dict[str, Any]]): per table name, overrides of
            ``sharding_types`` / ``compute_kernels`` (lists), and ``fused_params``: a mapping of
            :class:`FusedParamsConfig`'s settings that replace the global ones for that table (a huge
            ``fused_uvm_caching`` table with a small cache beside hot tables), as torchrec's per-table
            ``ParameterConstraints`` set them. Held as lists and a ``FusedParamsConfig``.
        frozen_tables (List[str]): table names that never train (see module docstring).
        compute_device (str): ``auto`` | ``cpu`` | ``cuda`` for the planner's topology.
        exact_dense_reduction (bool): on three or more ranks, all-reduce the dense gradients in
            one bucket in parameter order (:class:`~recsys_llm.train.dense_reduction.CanonicalAllReduce`;
            the gradients of replicated, ``data_parallel``, tables in parameter order too), so a resumed run goes on
            bit for bit; False: DDP's own buckets, whose all-reduces overlap the backward but reduce
            in another order after DDP rebuilds them, so a resume drifts in the last bits.
        proposer_patience (int): torchrec's greedy proposers stop after this many proposals in a row
            that rate worse than their best (``GreedyProposer(threshold=...)``); 0: they try every
            option of every table (torchrec's default), a search whose time grows with the square of
            the table count (500 tables on 2 ranks: 16 s, 0.9 s with 10; on 26 to 500 tables, 2 CPU
            and 8 GPU ranks, the plans of 10 rated the same as the exhaustive ones).
        fused_params (FusedParamsConfig): FBGEMM kernel settings of every table (UVM cache size,
            stochastic rounding, bounds checks).
        plan_file (str): a run's ``sharding_plan.json`` to shard as it says instead of planning
            (:mod:`recsys_llm.train.plan_file`); '': the planner's plan.
        storage_reservation (float): the share of each GPU's memory the planner keeps free beyond its
            estimate of the dense parameters and batches (torchrec's ``HeuristicalStorageReservation``;
            0.15, torchrec's default): lower it to fit larger tables where the estimate is known to be
            generous, raise it where other work shares the GPU. torchrec reserves none of the host's
            memory, so on CPU it changes nothing.
        measure_pooling (bool): give the planner each multi-hot (sequence) feature's mean ids per bag, measured
            on the training split (``ParameterConstraints.pooling_factors``; :mod:`recsys_llm.train.pooling_factors`),
            so it prices the lookups and batches of those tables by the ids they pool; False: 1.0 for every
            feature (torchrec's default, as runs were planned before this setting existed). A resume of a run
            planned without them plans without them
            (:func:`~recsys_llm.train.pooling_factors.planned_without_pooling_factors`).
        qcomms (QCommsSettings): precision of the sharded tables' embedding all-to-all / reduce-scatter in the
            forward and of their gradients in the backward (torchrec's ``QCommsConfig``,
            :mod:`recsys_llm.train.qcomms`); ``fp16`` / ``bf16`` halve those bytes. Replicated tables and one
            rank are unaffected.
    """

    sharding_types: List[str] = dataclasses.field(default_factory=list)
    compute_kernels: List[str] = dataclasses.field(default_factory=list)
    table_constraints: Dict[str, Dict[str, Any]] = dataclasses.field(default_factory=dict)
    frozen_tables: List[str] = dataclasses.field(default_factory=list)
    compute_device: str = "auto"
    exact_dense_reduction: bool = True
    proposer_patience: int = DEFAULT_PROPOSER_PATIENCE
    fused_params: FusedParamsConfig = dataclasses.field(default_factory=FusedParamsConfig)
    storage_reservation: float = DEFAULT_STORAGE_RESERVATION
    plan_file: str = ""
    measure_pooling: bool = True
    qcomms: QCommsSettings = dataclasses.field(default_factory=QCommsSettings)

    def __post_init__(self) -> None:
        check_number("sharding.proposer_patience", self.proposer_patience, integer=True, minimum=0)
        check_number("sharding.storage_reservation", self.storage_reservation, minimum=0, below=1)
        if self.compute_device not in ("auto", "cpu", "cuda"):
            raise ValueError(f"sharding.compute_device must be 'auto', 'cpu' or 'cuda', got {self.compute_device!r}")
        # a config built in Python may give a mapping (as a table's own fused_params may be): checked and held as
        # a FusedParamsConfig, which a table's own settings fall back to (fused_params_of)
        self.fused_params = _as_fused_params(self.fused_params, FUSED_PARAMS_KEY)
        self.table_constraints = {table: _table_overrides(table, overrides)
                                  for table, overrides in self.table_constraints.items()}
        for key, known in (("sharding_types", SHARDING_TYPES), ("compute_kernels", COMPUTE_KERNELS)):
            for name, values in self.allowed_lists(key):
                bad = [v for v in values if v not in known]
                if bad:
                    raise ValueError(f"{name}: unknown values {bad}; allowed: {list(known)}")

    def fused_params_of(self, table: str) -> FusedParamsConfig:
        """``table``'s FBGEMM settings: each one its ``table_constraints`` block's ``fused_params`` sets (not at
        its default) over the global ``fused_params``."""
        own = self.table_constraints.get(table, {}).get("fused_params")
        return self.fused_params if own is None else own.over(self.fused_params)

    def allowed_lists(self, key: str) -> List[Tuple[str, List[str]]]:
        """``(config key, values)`` of ``key`` (``sharding_types`` or ``compute_kernels``): the
        global list, then each table's override (empty where a table has none)."""
        return [(f"sharding.{key}", getattr(self, key))] + [
            (f"sharding.table_constraints.{table}.{key}", overrides.get(key, []))
            for table, overrides in self.table_constraints.items()
        ]


def _table_overrides(table: str, overrides: Any) -> Dict[str, Any]:
    """One table's block of ``sharding.table_constraints`` with its lists as lists of strings and its
    ``fused_params`` as a :class:`FusedParamsConfig` (checked as the global one, errors naming the table's key).

    Raises:
        ValueError: not a mapping, an unknown key, or a value of the wrong type or out of range.
    """
    where = f"sharding.table_constraints.{table}"
    if not isinstance(overrides, Mapping):
        raise ConfigError(f"{where}: expected a mapping, got {overrides!r}")
    unknown = set(overrides) - set(TABLE_CONSTRAINT_KEYS)
    if unknown:
        raise ConfigError(f"{where}: unknown keys {sorted(unknown, key=str)}; allowed: {list(TABLE_CONSTRAINT_KEYS)}")
    checked: Dict[str, Any] = {}
    for key, value in overrides.items():
        if key == "fused_params":
            checked[key] = _as_fused_params(value, f"{where}.fused_params")
        else:
            checked[key] = coerce_value(value, List[str], f"{where}.{key}")
    return checked


def _as_fused_params(value: Any, key: str) -> FusedParamsConfig:
    """``value`` as a checked :class:`FusedParamsConfig`: as it is, or built from a mapping (None: the defaults),
    its errors naming ``key`` (``sharding.fused_params`` or a table's ``...<table>.fused_params``).

    Raises:
        ConfigError: not a mapping, an unknown key, or a value of the wrong type or out of range.
    """
    if isinstance(value, FusedParamsConfig):
        return value
    return build_dataclass(FusedParamsConfig, value, key, init_vars={"config_key": key})


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
    dist.broadcast_object_list(outcome, src=0)
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
    # need with optimizer state (device and host memory, GB), which the weights and the ranks' memory alone hide
    totals = {what: found.group(1) for what in ("available", "requirement")
              if (found := re.search(rf"Global storage {what} for model parallel: (Storage\([^)]*\))", error))}
    planned = (f"; the planner's totals: {totals['available']} available to the tables after its reserve, "
               f"{totals['requirement']} needed with optimizer state" if len(totals) == 2 else "")
    more = "more hosts" if compute_device == "cpu" else "more GPUs"  # on CPU a host's ranks share its memory
    return (f"sharding: the planner found no room for the tables on {world_size} rank(s){each} (the tables' weights "
            f"{sum(sizes.values()) / 2**30:.2f} GiB in all, before optimizer state; the largest: {shown}{planned}); "
            f"use {more}, or smaller tables (fewer rows: --hash-size, the schema's cardinality; a smaller "
            f"model.embedding_dim) (torchrec: {first})")


def planner_proposers(patience: int) -> List[Proposer]:
    """torchrec's default proposers (grid search, greedy by depth and by sum, uniform), the greedy ones
    stopping after ``patience`` proposals in a row rated worse than their best (0: never, as torchrec reads
    a threshold of 0)."""
    return [GridSearchProposer(), GreedyProposer(threshold=patience),
            GreedyProposer(use_depth=False, threshold=patience), UniformProposer()]


def loadable_on_cpu(sharding: ShardingConfig) -> ShardingConfig:
    """``sharding`` without what only CUDA plans (row-wise types, unified-memory kernels; a list left empty
    lets the planner choose; ``compute_device="cuda"`` becomes ``auto``), for loading a run trained on GPUs
    on a CPU host: any plan re-cuts its checkpoint, and the tables are never stepped there."""
    cpu_kernels = [kernel for kernel in COMPUTE_KERNELS if kernel not in CUDA_ONLY_KERNELS]
    allowed = {"sharding_types": CPU_SHARDING_TYPES, "compute_kernels": cpu_kernels}

    def on_cpu(key: str, values: List[str]) -> List[str]:
        return [value for value in values if value in allowed[key]]

    return dataclasses.replace(
        sharding,
        sharding_types=on_cpu("sharding_types", sharding.sharding_types),
        compute_kernels=on_cpu("compute_kernels", sharding.compute_kernels),
        table_constraints={table: {key: value if key == "fused_params" else on_cpu(key, value)
                                   for key, value in overrides.items()}
                           for table, overrides in sharding.table_constraints.items()},
        compute_device="auto" if sharding.compute_device == "cuda" else sharding.compute_device,
    )


def find_tables(model: nn.Module) -> Dict[str, Tuple[str, EmbeddingBagCollection]]:
    """Every EBC table of an unsharded model: table name -> (module path, EBC).

    Raises:
        ValueError: two EBCs define a table of the same name (the planner keys constraints by name),
            or one EBC is registered under two module paths (e.g. a torchrec model kept whole
            inside an adapter that also holds its EBC): DMP would shard it once, log errors for
            the other path, and every gathered state dict and export would hold its tables twice.
    """
    paths: Dict[int, str] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        if isinstance(module, EmbeddingBagCollection):
            first = paths.setdefault(id(module), path)
            if first != path:
                raise ValueError(
                    f"one EmbeddingBagCollection is registered twice, at {first!r} and {path!r}; each table needs "
                    "one path for the planner: register the wrapped model's other modules (its arches) instead of "
                    "the whole model, as recsys_llm.models.dlrm.DLRMBackbone does for torchrec's DLRM"
                )
    tables: Dict[str, Tuple[str, EmbeddingBagCollection]] = {}
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            for config in module.embedding_bag_configs():
                if config.name in tables:
                    raise ValueError(
                        f"table name {config.name!r} is used by both {tables[config.name][0]!r} and {path!r}; "
                        "table names must be unique across the model"
                    )
                tables[config.name] = (path, module)
    return tables


def table_weights(tables: Dict[str, Tuple[str, EmbeddingBagCollection]]) -> int:
    """Weights of the tables of :func:`find_tables`, each table once (rows x dim summed over tables): every
    table of an EBC names that EBC, so summing each entry's EBC counted an EBC of T tables T times."""
    ebcs = {id(ebc): ebc for _, ebc in tables.values()}  # each EBC once
    return sum(config.num_embeddings * config.embedding_dim
               for ebc in ebcs.values() for config in ebc.embedding_bag_configs())


def frozen_table_names(model: nn.Module, config: ShardingConfig) -> Set[str]:
    """Tables listed in ``config.frozen_tables`` plus all tables of EBCs with ``frozen = True``.

    Raises:
        ValueError: a listed frozen table does not exist.
    """
    tables = find_tables(model)
    missing = sorted(set(config.frozen_tables) - set(tables))
    if missing:
        raise ValueError(f"sharding.frozen_tables names unknown tables {missing}; tables: {sorted(tables)}")
    frozen = set(config.frozen_tables)
    frozen |= {name for name, (_, ebc) in tables.items() if getattr(ebc, "frozen", False)}
    return frozen


def build_constraints(
    model: nn.Module, config: ShardingConfig, compute_device: str = "cpu",
    ids_per_bag: Optional[Mapping[str, float]] = None,
) -> Dict[str, ParameterConstraints]:
    """Planner constraints per table from the config (frozen tables: fused kernel, never replicated;
    trained FP16 tables: never replicated, as only the fused kernels step them with float32 optimizer
    state; on CUDA, tables wider than FBGEMM's kernels take: split by columns; every table:
    ``config.fused_params``, its own ``table_constraints`` block's over them), each with its features'
    ``pooling_factors``: ``ids_per_bag`` (feature -> mean ids per bag,
    :func:`~recsys_llm.data.ids_per_bag.mean_ids_per_bag`), 1.0 for a feature not in it.
    A table left to the planner's defaults (no setting, one id per bag) gets no constraint.

    Raises:
        ValueError: unknown table names, a frozen table without the fused kernel or a sharded
            type, an FP16 table allowed only ``data_parallel``, or on CUDA a table wider than
            ``FBGEMM_CUDA_MAX_DIM`` whose allowed types include no column-wise one.
    """
    tables = find_tables(model)
    unknown = sorted(set(config.table_constraints) - set(tables))
    if unknown:
        raise ValueError(f"sharding.table_constraints names unknown tables {unknown}; tables: {sorted(tables)}")
    frozen = frozen_table_names(model, config)
    pooling = table_pooling_factors(tables, ids_per_bag or {})
    constraints: Dict[str, ParameterConstraints] = {}
    for name in tables:
        override = config.table_constraints.get(name, {})
        sharding_types = list(override.get("sharding_types", config.sharding_types)) or None
        kernels = list(override.get("compute_kernels", config.compute_kernels)) or None
        if name in frozen:
            kernels = list(override.get("compute_kernels", [])) or None  # the global list is for trained tables
            if kernels is not None and "fused" not in kernels:
                raise ValueError(f"sharding.table_constraints.{name}.compute_kernels={kernels}: {name!r} is a frozen "
                                 "table (never trained), which runs on the 'fused' kernel; add 'fused' or drop the "
                                 "setting")
            kernels = ["fused"]
            # Replicated (data_parallel) tables are trained through DDP, which needs gradients.
            sharding_types = _without_data_parallel(
                sharding_types, override, name, f"the frozen table {name!r}, which is never trained (replicated "
                "tables train through DDP): allow a sharded type, e.g. [table_wise, row_wise]")
        table = next(c for c in tables[name][1].embedding_bag_configs() if c.name == name)
        width = table.embedding_dim
        if table.data_type != DataType.FP32 and name not in frozen:
            # replicated, a table is a plain float16 parameter that DDP and a torch optimizer step in float16
            # (the loss was NaN within the first steps, row-wise Adagrad on CPU); FBGEMM's fused kernels keep
            # float32 optimizer state for FP16 weights
            sharding_types = _without_data_parallel(
                sharding_types, override, name, f"{name!r}, a table of {table.data_type.name} weights "
                "(model.embedding_dtype), which trains only on FBGEMM's fused kernels (float32 optimizer state): "
                "allow a sharded type, e.g. [table_wise, column_wise], or use model.embedding_dtype=fp32")
        if compute_device == "cuda" and width > FBGEMM_CUDA_MAX_DIM:
            sharding_types = [t for t in (sharding_types or SHARDING_TYPES) if t in COLUMN_SHARDING_TYPES]
            if not sharding_types:
                raise ValueError(
                    f"table {name!r} is {width} wide, and FBGEMM's CUDA kernels take at most {FBGEMM_CUDA_MAX_DIM} "
                    f"columns: allow a column-wise type for it (sharding.table_constraints.{name}.sharding_types="
                    "[column_wise]), or make it narrower (LLM vectors: `semantics export --projection`)")
        fused = config.fused_params_of(name).constraint_kwargs()
        one_id = all(factor == ONE_ID_PER_BAG for factor in pooling[name])
        if sharding_types is None and kernels is None and not fused and one_id:
            continue
        constraints[name] = ParameterConstraints(sharding_types=sharding_types, compute_kernels=kernels,
                                                 pooling_factors=pooling[name], **fused)
    return constraints


def _without_data_parallel(sharding_types: Optional[List[str]], override: Mapping[str, Any], name: str,
                           table: str) -> List[str]:
    """The allowed sharding types of table ``name`` (``sharding_types``; None: all) but ``data_parallel``.

    Raises:
        ValueError: ``data_parallel`` was the only one: naming the setting that allows it, then ``table``
            (what the table is and what to change).
    """
    kept = [t for t in (sharding_types or SHARDING_TYPES) if t != "data_parallel"]
    if not kept:
        key = (f"sharding.table_constraints.{name}.sharding_types" if "sharding_types" in override
               else "sharding.sharding_types")
        raise ValueError(f"{key} allows only data_parallel for {table}")
    return kept


def _table_optimizer_kwargs(optim: OptimizerConfig) -> Dict[str, Any]:
    """lr and eps (not SGD) of the table optimizer; no weight decay: FBGEMM's fused CPU kernels
    ignore it, so a table would decay or not by its placement (``optim.weight_decay`` is the dense
    parameters')."""
    kwargs: Dict[str, Any] = {"lr": optim.sparse_lr}
    if optim.sparse != "sgd":
        kwargs["eps"] = optim.eps
    return kwargs


def _apply_fused_optimizers(model: nn.Module, frozen: Set[str], optim: OptimizerConfig) -> None:
    """Attaches the table optimizer to every trainable table (must run before DMP)."""
    optimizer_class = SPARSE_OPTIMIZERS[optim.sparse]
    kwargs = _table_optimizer_kwargs(optim)
    for ebc in {id(m): m for _, m in find_tables(model).values()}.values():
        for table_name, bag in ebc.embedding_bags.items():
            if table_name in frozen:
                # SGD holds no state; lr 0 makes even a stray backward a no-op.
                _apply_optimizer_in_backward(trec_optim.SGD, bag.parameters(), {"lr": 0.0})
            else:
                _apply_optimizer_in_backward(optimizer_class, bag.parameters(), kwargs)


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


def _freeze_sharded(model: DistributedModelParallel, frozen: Set[str]) -> List[str]:
    """Turns off the backward of every TBE that holds only frozen tables; returns those tables.

    Raises:
        RuntimeError: a TBE mixes frozen and trained tables.
    """
    done: List[str] = []
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
        done.extend(names)
    return sorted(set(done))


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


def planner_host_memory(compute_device: str, local_world_size: int) -> Optional[int]:
    """Bytes of host memory per rank the planner may place tables in (None: its default, 128 GB).

    On CPU the tables live in host memory, and each rank may take the whole host: a table up to
    128 columns wide is never split on CPU (row-wise types need CUDA), so a share of the host would
    refuse tables that fit on one rank (the ranks of one host together are not checked against it).
    On CUDA only the unified-memory kernels (``fused_uvm*``) use it, and they split tables by rows:
    each of the host's ``local_world_size`` ranks gets its share (the planner's default let one
    8-GPU host plan 1 TB of such tables). Without the host's size, torchrec's default either way.
    """
    host = host_memory()
    if host is None or compute_device == "cpu":
        return host
    return host // local_world_size


def build_topology(
    world_size: int,
    compute_device: str,
    hbm_cap: Optional[int] = None,
    local_world_size: Optional[int] = None,
    ddr_cap: Optional[int] = None,
) -> Topology:
    """The planner's ``Topology``, built as torchrec asks: through ``TopologyFactory.create_topology``
    (a ``Topology(...)`` constructed directly logs a warning that the job will fail). The same values
    as ``Topology(world_size, compute_device, hbm_cap=..., local_world_size=...)``: torchrec's default
    bandwidths and capacities where none is given.

    Args:
        world_size (int): ranks the plan is for.
        compute_device (str): ``"cpu"`` or ``"cuda"``.
        hbm_cap (Optional[int]): bytes of device memory per rank (default: torchrec's).
        local_world_size (Optional[int]): ranks per host (default: ``world_size``).
        ddr_cap (Optional[int]): bytes of host memory per rank (default: torchrec's, 128 GB).
    """
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(world_size=world_size, local_world_size=local_world_size),
        hardware_config=HardwareConfig(hbm_cap_bytes=hbm_cap, ddr_cap_bytes=ddr_cap),
        kernel_config=KernelConfig(compute_device=compute_device),
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
        RuntimeError: no default process group (``recsys_llm.train.distributed.init_distributed``).
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
    _apply_fused_optimizers(task, frozen, optim)
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
    model trains nothing but tables (torch refuses an optimizer without parameters).
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
        optimizers.append(KeyedOptimizerWrapper(dense_params, lambda params: optimizer_class(params, **kwargs)))
    return CombinedOptimizer(optimizers)


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
