"""What a sharding plan says, for people and for checks: one line for the log, each table's placement and
shards, the ranks holding each table, and the JSON of ``run_dir/sharding_plan.json``."""

import collections
import json
from typing import Any, Dict, List, Mapping, Optional

from torchrec.distributed.types import ShardingPlan


def plan_line(plan: ShardingPlan, world_size: int, where: str, comms: str = "") -> str:
    """One line on ``plan``: its tables by sharding type, the ranks, the weights in shards (replicated
    tables have none), ``comms`` (how the embeddings travel, where not float32:
    :func:`~recsys_llm.train.qcomms.comms_text`), and ``where`` the plan is kept."""
    placements = table_placements(plan)
    types = collections.Counter(placement["sharding_type"] for placement in placements.values())
    sharded = sum(shard["sizes"][0] * shard["sizes"][1] for placement in placements.values()
                  for shard in placement["shards"])
    by_type = ", ".join(f"{count} {kind.replace('_', '-')}" for kind, count in sorted(types.items()))
    return (f"sharding: {len(placements)} table(s) over {world_size} rank(s) ({by_type}; {weights_text(sharded)} "
            f"weights in shards{'; ' + comms if comms else ''}); the plan: {where}")


def weights_text(count: int) -> str:
    """A count of weights for a log line: ``1.2 B``, ``3.4 M`` or ``12,345``."""
    return f"{count / 1e9:.1f} B" if count >= 10**9 else f"{count / 1e6:.1f} M" if count >= 10**6 else f"{count:,}"


def table_placements(plan: ShardingPlan) -> Dict[str, Dict[str, Any]]:
    """Per table: module path, sharding type, compute kernel, ranks holding shards and shard sizes.

    Returns:
        Dict[str, Dict[str, Any]]: ``{table: {"module", "sharding_type", "compute_kernel",
        "ranks", "shards": [{"rank", "offsets", "sizes"}]}}``. For ``data_parallel`` tables
        ``ranks`` is every rank (replicated).
    """
    out: Dict[str, Dict[str, Any]] = {}
    for module_path, module_plan in plan.plan.items():
        for table, sharding in module_plan.items():  # type: ignore[union-attr]
            shards = []
            if sharding.sharding_spec is not None:
                for shard in sharding.sharding_spec.shards:  # type: ignore[attr-defined]
                    placement = shard.placement
                    rank = placement.rank() if placement is not None else None
                    shards.append({"rank": rank, "offsets": list(shard.shard_offsets), "sizes": list(shard.shard_sizes)})
            ranks = sorted({s["rank"] for s in shards if s["rank"] is not None}) or list(sharding.ranks or [])
            out[table] = {
                "module": module_path,
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": ranks,
                "shards": shards,
            }
    return out


def ranks_holding_tables(plan: ShardingPlan, world_size: int) -> Dict[int, List[str]]:
    """Rank -> tables with at least one shard on it (replicated tables count on every rank)."""
    holding: Dict[int, List[str]] = {rank: [] for rank in range(world_size)}
    for table, info in table_placements(plan).items():
        ranks = range(world_size) if info["sharding_type"] == "data_parallel" else info["ranks"]
        for rank in ranks:
            holding[rank].append(table)
    return holding


def describe_plan(plan: ShardingPlan, pooling_factors: Optional[Mapping[str, List[float]]] = None) -> str:
    """The plan as indented JSON (written to the run directory as ``sharding_plan.json``), each table's
    ``pooling_factors`` (the mean ids per bag of its features the planner priced it by:
    :func:`~recsys_llm.train.pooling_factors.table_pooling_factors`) added where given."""
    placements = table_placements(plan)
    for table, factors in (pooling_factors or {}).items():
        if table in placements:
            placements[table]["pooling_factors"] = list(factors)
    return json.dumps(placements, indent=2, sort_keys=True)
