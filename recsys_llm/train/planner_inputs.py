"""What torchrec's planner is given: the model's tables, their constraints, the topology and the proposers.

:func:`find_tables` (table name -> module path and EBC), :func:`table_weights`, :func:`frozen_table_names`,
:func:`build_constraints` (a :class:`~recsys_llm.train.sharding_config.ShardingConfig` as torchrec's per-table
``ParameterConstraints``, with the features' pooling factors), :func:`planner_host_memory` and
:func:`build_topology` (the ranks and their memory), :func:`planner_proposers`.
:func:`recsys_llm.train.sharding.shard_model` plans with them.

Example::

    sharding = ShardingConfig(sharding_types=["table_wise"])
    planner = EmbeddingShardingPlanner(topology=build_topology(2, "cpu"),
                                       constraints=build_constraints(task, sharding, "cpu"),
                                       proposer=planner_proposers(sharding.proposer_patience))
"""

from typing import Any, Dict, List, Mapping, Optional, Set, Tuple

from torch import nn
from torchrec.distributed.planner import Topology
from torchrec.distributed.planner.proposers import GreedyProposer, GridSearchProposer, UniformProposer
from torchrec.distributed.planner.types import (
    HardwareConfig,
    KernelConfig,
    ParameterConstraints,
    Proposer,
    TopologyFactory,
    TrainerConfig,
)
from torchrec.modules.embedding_configs import DataType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.host_memory import host_memory
from recsys_llm.train.pooling_factors import ONE_ID_PER_BAG, table_pooling_factors
from recsys_llm.train.sharding_config import (
    COLUMN_SHARDING_TYPES,
    FBGEMM_CUDA_MAX_DIM,
    SHARDING_TYPES,
    ShardingConfig,
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


def planner_proposers(patience: int) -> List[Proposer]:
    """torchrec's default proposers (grid search, greedy by depth and by sum, uniform), the greedy ones
    stopping after ``patience`` proposals in a row rated worse than their best (0: never, as torchrec reads
    a threshold of 0)."""
    return [GridSearchProposer(), GreedyProposer(threshold=patience),
            GreedyProposer(use_depth=False, threshold=patience), UniformProposer()]
