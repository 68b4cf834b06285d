"""A sharding plan read from a file (``sharding.plan_file``) instead of planned: the placements of a run's
``sharding_plan.json`` (:func:`recsys_llm.train.plan_report.describe_plan`), rebuilt with torchrec's own plan
generators (``table_wise``, ``column_wise``, ``row_wise``, ``table_row_wise``, ``data_parallel``; a
``table_column_wise`` placement through ``column_wise``, see :func:`_table_column_wise`) and checked to give the
same shards, ranks and kernels. A job restarted on the same ranks then shards exactly as the file says, whatever
the planner would choose now (another torchrec, another ``sharding.proposer_patience``), and pays no planning.

Example::

    recsys-llm train --config run.yaml sharding.plan_file=runs/big/sharding_plan.json
"""

import json
import os
from typing import Any, Callable, Dict, List, Mapping

from torch import nn
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.distributed.sharding_plan import (
    ParameterShardingGenerator,
    column_wise,
    construct_module_sharding_plan,
    data_parallel,
    row_wise,
    table_row_wise,
    table_wise,
)
from torchrec.distributed.types import EmbeddingModuleShardingPlan, ModuleSharder, ParameterSharding, ShardingPlan

from recsys_llm.train.plan_report import table_placements


def _column_ranks(placement: Mapping[str, Any]) -> List[int]:
    """The rank of each column shard, in column order."""
    return [shard["rank"] for shard in sorted(placement["shards"], key=lambda shard: shard["offsets"][1])]


def _with_kernel(generator: ParameterShardingGenerator, kernel: str, sharding_type: str) -> ParameterShardingGenerator:
    """``generator`` whose placements name ``kernel`` and ``sharding_type``: torchrec's ``table_row_wise`` takes no
    kernel (it picks ``fused`` for a table with a fused optimizer, as every sharded table here has), and it has no
    ``table_column_wise`` generator."""
    def generate(param: nn.Parameter, local_size: int, world_size: int, device_type: str,
                 sharder: ModuleSharder[nn.Module]) -> ParameterSharding:
        sharding = generator(param, local_size, world_size, device_type, sharder)
        sharding.compute_kernel, sharding.sharding_type = kernel, sharding_type
        return sharding

    return generate


def _table_row_wise(placement: Mapping[str, Any], local_world_size: int) -> ParameterShardingGenerator:
    """torchrec's ``table_row_wise`` on the host of the placement's first rank (its rows split over that host's
    ``local_world_size`` ranks; the check of :func:`read_plan_file` refuses ranks it does not give back)."""
    host = min(placement["ranks"], default=0) // local_world_size
    return _with_kernel(table_row_wise(host_index=host), placement["compute_kernel"], "table_row_wise")


def _table_column_wise(placement: Mapping[str, Any]) -> ParameterShardingGenerator:
    """torchrec's ``column_wise`` on the placement's ranks in column order, named ``table_column_wise``: torchrec 1.8
    has no generator of its own for it, and cuts both types' columns alike (``calculate_shard_sizes_and_offsets``;
    its EBC sharder builds both as column-wise shardings, ``TwCwPooledEmbeddingSharding`` being a
    ``CwPooledEmbeddingSharding``). The planner puts such shards on the ranks of one host; the file's ranks are
    rebuilt as written."""
    return _with_kernel(column_wise(ranks=_column_ranks(placement)), placement["compute_kernel"], "table_column_wise")


# sharding type -> the generator that places a table as the file's placement says (given the ranks per host)
_GENERATORS: Dict[str, Callable[[Mapping[str, Any], int], ParameterShardingGenerator]] = {
    "data_parallel": lambda placement, _: data_parallel(),
    "table_wise": lambda placement, _: table_wise(rank=placement["ranks"][0],
                                                  compute_kernel=placement["compute_kernel"]),
    "column_wise": lambda placement, _: column_wise(ranks=_column_ranks(placement),
                                                    compute_kernel=placement["compute_kernel"]),
    "row_wise": lambda placement, _: row_wise(compute_kernel=placement["compute_kernel"]),
    "table_row_wise": _table_row_wise,
    "table_column_wise": lambda placement, _: _table_column_wise(placement),
}
PLACEMENT_KEYS = ("module", "sharding_type", "compute_kernel", "ranks", "shards")


def read_plan_file(path: str, tables: Mapping[str, Any], world_size: int, local_world_size: int, device_type: str,
                   constraints: Mapping[str, ParameterConstraints]) -> ShardingPlan:
    """The plan of ``path`` for the model whose tables are ``tables``.

    Args:
        path (str): a ``sharding_plan.json`` (table -> module, sharding type, compute kernel, ranks, shards).
        tables (Mapping[str, Any]): :func:`recsys_llm.train.planner_inputs.find_tables` of the model.
        world_size (int): ranks of the job.
        local_world_size (int): ranks per host.
        device_type (str): ``cpu`` or ``cuda``.
        constraints (Mapping[str, ParameterConstraints]): the tables' constraints
            (:func:`recsys_llm.train.planner_inputs.build_constraints`): a placement they do not allow is refused.

    Returns:
        ShardingPlan: the file's placements; each table's shards, ranks and kernel as the file gives them.

    Raises:
        FileNotFoundError: no file at ``path``.
        ValueError: naming ``path`` and what differs: not a JSON object of placements, tables the model lacks
            or the file lacks, a module path other than the table's, ranks outside the job, a sharding type or
            kernel the constraints do not allow, a type it cannot rebuild (e.g. ``grid_shard``), or shards that
            torchrec's generators do not give back (a ``table_row_wise`` table's rows on ranks other than one
            host's, as ``local_world_size`` groups them).
    """
    placements = _read_placements(path)
    missing, unknown = sorted(set(tables) - set(placements)), sorted(set(placements) - set(tables))
    if missing or unknown:
        raise ValueError(f"sharding.plan_file {path}: its tables are not the model's (the model's tables it lacks: "
                         f"{missing}; its tables the model lacks: {unknown}); write it from a run of this model")
    by_module: Dict[str, Dict[str, ParameterShardingGenerator]] = {}
    for name, placement in placements.items():
        module_path, ebc = tables[name]
        _check_placement(path, name, placement, module_path, world_size, constraints.get(name))
        generator = _GENERATORS[placement["sharding_type"]](placement, local_world_size)
        by_module.setdefault(module_path, {})[name] = generator
    modules = {module_path: ebc for module_path, ebc in tables.values()}
    plan = ShardingPlan({
        module_path: construct_module_sharding_plan(modules[module_path], generators, local_size=local_world_size,
                                                    world_size=world_size, device_type=device_type)
        for module_path, generators in by_module.items()})
    rebuilt = table_placements(plan)
    for name, placement in placements.items():
        if {key: rebuilt[name][key] for key in PLACEMENT_KEYS} != {key: placement[key] for key in PLACEMENT_KEYS}:
            raise ValueError(
                f"sharding.plan_file {path}: table {name!r}'s placement ({placement['sharding_type']} on ranks "
                f"{placement['ranks']}) cannot be rebuilt as written on {world_size} rank(s), "
                f"{local_world_size} a host (torchrec places it {rebuilt[name]['shards']}); write it from a run on "
                f"{world_size} rank(s) ({local_world_size} a host: LOCAL_WORLD_SIZE)"
            )
    return plan


def _read_placements(path: str) -> Dict[str, Dict[str, Any]]:
    """The JSON object of ``path``, each value a placement with :data:`PLACEMENT_KEYS`."""
    try:
        with open(path, encoding="utf-8") as handle:
            placements = json.load(handle)
    except FileNotFoundError:
        raise FileNotFoundError(f"sharding.plan_file {path}: no such file (a run writes its plan to "
                                "<train.run_dir>/sharding_plan.json)") from None
    except IsADirectoryError:  # a run directory given for its plan
        raise ValueError(f"sharding.plan_file {path}: a directory, not a file (a run's plan is "
                         f"{os.path.join(path, 'sharding_plan.json')})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"sharding.plan_file {path}: not valid JSON ({error})") from error
    if not isinstance(placements, dict) or not all(
            isinstance(p, dict) and set(PLACEMENT_KEYS) <= set(p) for p in placements.values()):
        raise ValueError(f"sharding.plan_file {path}: expected a JSON object of table -> placement with "
                         f"{list(PLACEMENT_KEYS)}, as a run's sharding_plan.json holds")
    return placements


def _check_placement(path: str, name: str, placement: Mapping[str, Any], module_path: str, world_size: int,
                     constraint: Any) -> None:
    """Raises unless ``placement`` of table ``name`` can be rebuilt for this model and job."""
    where = f"sharding.plan_file {path}: table {name!r}"
    kind, kernel, ranks = placement["sharding_type"], placement["compute_kernel"], placement["ranks"]
    if kind not in _GENERATORS:
        raise ValueError(f"{where}: a {kind} placement, which cannot be rebuilt from the file (only "
                         f"{sorted(_GENERATORS)}); let the planner place it (leave sharding.plan_file out)")
    if placement["module"] != module_path:
        raise ValueError(f"{where}: in module {placement['module']!r}, but the model holds it in {module_path!r}")
    if not all(isinstance(rank, int) and 0 <= rank < world_size for rank in ranks):
        raise ValueError(f"{where}: on ranks {ranks}, but the job has {world_size} rank(s) (0 to {world_size - 1})")
    if constraint is not None and constraint.sharding_types and kind not in constraint.sharding_types:
        raise ValueError(f"{where}: {kind}, which its settings do not allow (allowed: {constraint.sharding_types})")
    if constraint is not None and constraint.compute_kernels and kernel not in constraint.compute_kernels:
        raise ValueError(f"{where}: the {kernel!r} kernel, which its settings do not allow (allowed: "
                         f"{constraint.compute_kernels})")


def with_constraint_settings(plan: ShardingPlan, constraints: Mapping[str, ParameterConstraints]) -> ShardingPlan:
    """``plan`` with each table's FBGEMM settings of ``constraints`` (cache size, stochastic rounding, bounds
    checks), as the planner writes them into the placements it plans."""
    for module_plan in plan.plan.values():
        assert isinstance(module_plan, EmbeddingModuleShardingPlan)
        for name, sharding in module_plan.items():
            constraint = constraints.get(name)
            if constraint is None:
                continue
            for key in ("cache_params", "stochastic_rounding", "bounds_check_mode"):
                value = getattr(constraint, key, None)
                if value is not None:
                    setattr(sharding, key, value)
    return plan

