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
from recsys_llm.train.pooling_factors import table_pooling_factors
from recsys_llm.train.runner import run_training
from recsys_llm.train.sharding import ShardingConfig, build_constraints, build_topology, find_tables
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
