"""The planner's pooling factors: each multi-hot feature's mean ids per bag reaches torchrec's cost model."""

import json
import os
from typing import Dict, List, Optional

import pytest
import torch
from torchrec.distributed.planner.enumerators import EmbeddingEnumerator
from torchrec.distributed.planner.shard_estimators import EmbeddingPerfEstimator, EmbeddingStorageEstimator
from torchrec.distributed.planner.storage_reservations import _get_batch_inputs_and_shardable_parameters
from torchrec.distributed.sharding_plan import get_default_sharders

from recsys_llm.data.ids_per_bag import mean_ids_per_bag
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.config import load_config
from recsys_llm.train.plan_report import describe_plan, table_placements
from recsys_llm.train.planner_inputs import build_constraints, build_topology, find_tables
from recsys_llm.train.pooling_factors import table_pooling_factors
from recsys_llm.train.runner import run_training
from recsys_llm.train.sharding_config import ShardingConfig
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
BATCH = 512


def _task(schema: DatasetSchema) -> CTRTask:
    return CTRTask(build_backbone(SMOKE_CONFIGS["fm"], schema, device=torch.device("meta")))


def _table_wise_perf(schema: DatasetSchema, ids_per_bag: Optional[Dict[str, float]]) -> Dict[str, float]:
    """Table -> torchrec's perf estimate (the sum over its shards) of its table-wise option on 2 CPU ranks."""
    task = _task(schema)
    constraints = build_constraints(task, ShardingConfig(sharding_types=["table_wise"]), "cpu", ids_per_bag)
    topology = build_topology(2, "cpu")
    enumerator = EmbeddingEnumerator(topology, BATCH, constraints, estimator=[
        EmbeddingPerfEstimator(topology, constraints), EmbeddingStorageEstimator(topology, constraints)])
    options = enumerator.enumerate(task, get_default_sharders())
    return {option.name: option.total_perf for option in options if option.sharding_type == "table_wise"}


class TestPoolingFactors:
    def test_constraints_carry_the_measured_ids_per_bag_of_a_multi_hot_field(self, synthetic_schema) -> None:
        measured = mean_ids_per_bag(synthetic_schema, "train")
        assert set(measured) == {"item_tags"} and 1.0 < measured["item_tags"] < 1.2  # 0 to 3 tags an item
        task = _task(synthetic_schema)
        constrained = build_constraints(task, ShardingConfig(sharding_types=["table_wise"]), "cpu", measured)
        assert constrained["t_item_tags"].pooling_factors == [measured["item_tags"]]
        assert constrained["t_user_id"].pooling_factors == [1.0]  # one id a row
        # left to the planner's defaults, a one-hot table gets no constraint: torchrec's own 1.0
        default = build_constraints(task, ShardingConfig(), "cpu", measured)
        assert set(default) == {"t_item_tags"} and default["t_item_tags"].pooling_factors == [measured["item_tags"]]
        assert build_constraints(task, ShardingConfig(), "cpu") == {}  # nothing measured: as before

    def test_the_planners_perf_estimate_of_a_multi_hot_table_grows_with_its_factor(self, synthetic_schema) -> None:
        one = _table_wise_perf(synthetic_schema, None)
        four = _table_wise_perf(synthetic_schema, {"item_tags": 4.0})
        assert four["t_item_tags"] > 1.5 * one["t_item_tags"], (one, four)
        assert four["t_user_id"] == one["t_user_id"]

    def test_the_planners_reserve_for_the_batches_ids_counts_them(self, synthetic_schema) -> None:
        task = _task(synthetic_schema)
        for factor in (1.0, 4.0):
            constraints = build_constraints(task, ShardingConfig(), "cpu", {"item_tags": factor})
            inputs, _ = _get_batch_inputs_and_shardable_parameters(task, get_default_sharders(), BATCH, constraints)
            assert factor * BATCH in inputs and sorted(inputs)[:-1] == [float(BATCH)] * (len(inputs) - 1)

    def test_a_table_of_several_features_has_one_factor_each_in_their_order(self, synthetic_schema) -> None:
        from torchrec.modules.embedding_configs import EmbeddingBagConfig
        from torchrec.modules.embedding_modules import EmbeddingBagCollection

        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="shared", embedding_dim=8, num_embeddings=10, feature_names=["user_id", "item_tags"])],
            device=torch.device("meta"))
        assert table_pooling_factors(find_tables(ebc), {"item_tags": 2.5}) == {"shared": [1.0, 2.5]}

    def test_the_plan_report_records_the_factors(self, synthetic_schema) -> None:
        from torchrec.distributed.sharding_plan import construct_module_sharding_plan, table_wise
        from torchrec.distributed.types import ShardingPlan

        backbone = build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta"))
        ebc = backbone.embedding_bag_collection
        plan = ShardingPlan({"ebc": construct_module_sharding_plan(
            ebc, {c.name: table_wise(rank=0) for c in ebc.embedding_bag_configs()}, local_size=1, world_size=1,
            device_type="cpu")})
        factors = table_pooling_factors(find_tables(ebc), {"item_tags": 1.5})
        written = json.loads(describe_plan(plan, factors))
        assert written["t_item_tags"]["pooling_factors"] == [1.5] and written["t_user_id"]["pooling_factors"] == [1.0]
        assert json.loads(describe_plan(plan)) == table_placements(plan)  # without factors: as before
        assert json.loads(describe_plan(plan, {"t_not_planned": [2.0]})) == table_placements(plan)


def _run(overrides: List[str]) -> None:
    run_training(load_config(DEEPFM_CONFIG, overrides))


@pytest.mark.multiprocess
def test_a_runs_sharding_plan_json_holds_the_measured_factors(synthetic_dir: str, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    overrides = [f"data.schema={synthetic_dir}", "data.batch_size=256", "data.eval_batch_size=1024",
                 "data.synthetic_rows=0", "train.epochs=1", "train.max_steps=2", "train.patience=0",
                 "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}"]
    run_multiprocess(_run, world_size=1, overrides=overrides)
    with open(os.path.join(run_dir, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    measured = mean_ids_per_bag(DatasetSchema.load(synthetic_dir), "train")["item_tags"]
    assert plan["t_item_tags"]["pooling_factors"] == [measured]
    assert {tuple(p["pooling_factors"]) for name, p in plan.items() if name != "t_item_tags"} == {(1.0,)}


def test_a_saved_plan_without_factors_is_one_planned_without_them(tmp_path) -> None:
    from recsys_llm.train.pooling_factors import planned_without_pooling_factors

    path = str(tmp_path / "sharding_plan.json")
    assert not planned_without_pooling_factors(path)  # no run yet: a new run measures
    placement = {"module": "model.ebc", "sharding_type": "table_wise", "compute_kernel": "fused", "ranks": [0],
                 "shards": []}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"t_user_id": placement, "t_item_tags": placement}, handle)
    assert planned_without_pooling_factors(path)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump({"t_user_id": {**placement, "pooling_factors": [1.0]}, "t_item_tags": placement}, handle)
    assert not planned_without_pooling_factors(path)
    for damaged in ("{", "[]", "{}"):
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(damaged)
        assert not planned_without_pooling_factors(path)


@pytest.mark.multiprocess
def test_a_resume_plans_with_factors_only_where_its_run_was_planned_with_them(synthetic_dir: str, tmp_path) -> None:
    """A run planned without factors (before sharding.measure_pooling, or with it false) resumes planned without
    them: factors it was not planned with could move a table of its checkpoints (replicated <-> sharded: no load)."""
    def overrides(run_dir: str, steps: int, *extra: str) -> List[str]:
        return [f"data.schema={synthetic_dir}", "data.batch_size=256", "data.eval_batch_size=1024",
                "data.synthetic_rows=0", "train.epochs=1", f"train.max_steps={steps}", "train.patience=0",
                "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}", *extra]

    def saved(run_dir: str) -> Dict[str, dict]:
        with open(os.path.join(run_dir, "sharding_plan.json"), encoding="utf-8") as handle:
            return json.load(handle)

    unmeasured, measured = str(tmp_path / "unmeasured"), str(tmp_path / "measured")
    run_multiprocess(_run, world_size=1, overrides=overrides(unmeasured, 2, "sharding.measure_pooling=false"))
    run_multiprocess(_run, world_size=1, overrides=overrides(measured, 2))
    # a plan read from a file is no plan made with factors: it records none (and measures nothing)
    from_file = str(tmp_path / "from_file")
    plan_file = os.path.join(str(tmp_path), "plan.json")
    with open(plan_file, "w", encoding="utf-8") as handle:
        json.dump(saved(measured), handle)
    run_multiprocess(_run, world_size=1, overrides=overrides(from_file, 2, f"sharding.plan_file={plan_file}"))
    assert not [name for name, p in saved(from_file).items() if "pooling_factors" in p]
    run_multiprocess(_run, world_size=1, overrides=overrides(unmeasured, 3))  # measure_pooling's default: true
    run_multiprocess(_run, world_size=1, overrides=overrides(measured, 3))
    assert not [name for name, p in saved(unmeasured).items() if "pooling_factors" in p]
    assert saved(measured)["t_item_tags"]["pooling_factors"][0] > 1.0


def _planner_constraints(schema_path: str) -> Dict[str, Optional[List[float]]]:
    """Table -> the pooling factors of the constraints shard_model hands torchrec's planner (None: no constraint)."""
    from recsys_llm.train import sharding
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig

    seen: Dict[str, Optional[List[float]]] = {}

    class Recording(sharding.EmbeddingShardingPlanner):
        def __init__(self, *args, constraints=None, **kwargs) -> None:
            seen.update({name: list(c.pooling_factors) for name, c in (constraints or {}).items()})
            super().__init__(*args, constraints=constraints, **kwargs)

    sharding.EmbeddingShardingPlanner = Recording
    ctx = init_distributed("cpu")
    shard_model(_task(DatasetSchema.load(schema_path)), ctx.device, ctx.world_size, ShardingConfig(),
                OptimizerConfig(), batch_size=BATCH, ids_per_bag={"item_tags": 3.0})
    return seen


@pytest.mark.multiprocess
def test_shard_model_hands_the_planner_the_factors(synthetic_dir: str) -> None:
    (seen,) = run_multiprocess(_planner_constraints, world_size=1, schema_path=synthetic_dir)
    assert seen == {"t_item_tags": [3.0]}
