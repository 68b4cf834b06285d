"""The ``optim`` and ``sharding`` settings of a run, and the names they accept.

:class:`OptimizerConfig` (table and dense optimizers), :class:`FusedParamsConfig` (FBGEMM kernel settings),
:class:`ShardingConfig` (how the planner may place tables, frozen tables, a plan file, quantized collectives) with
their checks, the vocabularies they are checked against (optimizers, sharding types, compute kernels, bounds-check
modes) and :func:`loadable_on_cpu` (a GPU run's settings for loading it on a CPU host).
:mod:`recsys_llm.train.planner_inputs` turns them into the planner's constraints, and
:func:`recsys_llm.train.sharding.shard_model` shards a model as they say.

Example::

    sharding = ShardingConfig(sharding_types=["table_wise"], frozen_tables=["semantic_item_id"])
    optim = OptimizerConfig(sparse="adagrad", sparse_lr=0.01)
"""

import dataclasses
from typing import Any, Dict, FrozenSet, List, Mapping, Optional, Tuple, Type

import torch
from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode
from torchrec import optim as trec_optim
from torchrec.distributed.types import CacheParams

from recsys_llm.data.validation import check_number
from recsys_llm.train.lr_schedule import LRSchedule
from recsys_llm.train.qcomms import QCommsSettings
from recsys_llm.typed_config import (
    ConfigError, build_dataclass, check_bool_settings, check_name_list, check_str_settings, coerce_value,
)

FLOAT32_MAX = float(torch.finfo(torch.float32).max)  # the largest learning rate or eps FBGEMM's float32 takes

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
        max_grad_norm (float): before each dense step, scale the dense parameters' gradients down to this
            L2 norm over all of them when it is above (torchrec's ``GradientClippingOptimizer``, ``NORM``; Hugging
            Face Trainer's ``max_grad_norm``); 0: no clipping. Tables are not clipped: their fused optimizers
            step inside the backward, and a table must train alike whatever its placement.
        lr_warmup_steps (int): the first steps ramp every learning rate (tables and dense) linearly up to the
            configured one (torchrec's DLRM example's ``--lr_warmup_steps``); 0: none.
        lr_decay_start (int): the global step the decay begins at (``--lr_decay_start``).
        lr_decay_steps (int): steps of a polynomial (power 2) decay of every learning rate, which then keeps its
            last value (``--lr_decay_steps``); 0: none. See :mod:`recsys_llm.train.lr_schedule`.
    """

    sparse: str = "row_wise_adagrad"
    sparse_lr: float = 0.05
    dense: str = "adam"
    dense_lr: float = 1e-3
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 0.0
    lr_warmup_steps: int = 0
    lr_decay_start: int = 0
    lr_decay_steps: int = 0

    @property
    def lr_schedule(self) -> LRSchedule:
        """The factors of the learning rates over the global step."""
        return LRSchedule(self.lr_warmup_steps, self.lr_decay_start, self.lr_decay_steps)

    def __post_init__(self) -> None:
        if self.sparse not in SPARSE_OPTIMIZERS:
            raise ValueError(f"optim.sparse must be one of {sorted(SPARSE_OPTIMIZERS)}, got {self.sparse!r}")
        if self.dense not in DENSE_OPTIMIZERS:
            raise ValueError(f"optim.dense must be one of {sorted(DENSE_OPTIMIZERS)}, got {self.dense!r}")
        for name in ("sparse_lr", "dense_lr", "eps"):
            check_number(f"optim.{name}", getattr(self, name), above=0)
            if getattr(self, name) > FLOAT32_MAX:  # overflowed in a traceback of FBGEMM's optimizer
                raise ValueError(f"optim.{name}={getattr(self, name)} is beyond float32's range (at most 3.4e38), "
                                 "in which FBGEMM's table optimizers take it")
        check_number("optim.weight_decay", self.weight_decay, minimum=0)
        check_number("optim.max_grad_norm", self.max_grad_norm, minimum=0)
        _ = self.lr_schedule  # raises naming a bad optim.lr_* setting


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
        frozen_tables (List[str]): table names that never train (see :mod:`recsys_llm.train.sharding`'s docstring).
        compute_device (str): ``auto`` | ``cpu`` | ``cuda`` for the planner's topology.
        exact_dense_reduction (bool): on three or more ranks, all-reduce the dense gradients in
            one bucket in parameter order (:class:`~recsys_llm.train.dense_reduction.CanonicalAllReduce`;
            the gradients of replicated, ``data_parallel``, tables each on its own), so a resumed run goes on
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
        check_bool_settings(self, ("exact_dense_reduction", "measure_pooling"), "sharding")  # "false": True
        check_name_list(self.frozen_tables, "sharding.frozen_tables")
        check_str_settings(self, (), "sharding", paths=("plan_file",))
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
