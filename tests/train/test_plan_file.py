"""``sharding.plan_file``: a run's ``sharding_plan.json`` sharded as it says instead of planned."""

import json
import os
from typing import Any, Dict, List

import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.plan_report import describe_plan, table_placements
from recsys_llm.train.sharding import OptimizerConfig, ShardingConfig, shard_model
from tests.multiprocess import run_multiprocess

TABLE_WISE = ShardingConfig(sharding_types=["table_wise"])  # plans whose tables have shards to rewrite


def _task(schema: DatasetSchema, config: ModelConfig = SMOKE_CONFIGS["fm"]) -> CTRTask:
    return CTRTask(build_backbone(config, schema, device=torch.device("meta")))


def _write(path: str, placements: Dict[str, Any]) -> str:
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(placements, handle)
    return path


def test_a_plan_written_by_a_run_shards_the_same_way(tmp_path, synthetic_schema: DatasetSchema) -> None:
    """Each restart planned again: another torchrec or proposer patience could place tables otherwise than the
    checkpoints were saved under, and planning 500 tables took seconds to minutes."""
    init_distributed()
    for sharding in (ShardingConfig(), TABLE_WISE):  # replicated tables, and tables with shards
        _, planned = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, sharding, OptimizerConfig(),
                                 batch_size=8)
        path = str(tmp_path / "sharding_plan.json")
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(describe_plan(planned))
        _, loaded = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, ShardingConfig(plan_file=path),
                                OptimizerConfig(), batch_size=8)
        assert describe_plan(loaded) == describe_plan(planned)


def _shard_as_written(schema_path: str, plan_path: str) -> Dict[str, Any]:
    init_distributed("cpu")
    schema = DatasetSchema.load(os.path.join(schema_path, "schema.json"))
    model, plan = shard_model(_task(schema), torch.device("cpu"), 2, ShardingConfig(plan_file=plan_path),
                              OptimizerConfig(), batch_size=8)
    local = {name: param.numel() for name, param in model.named_parameters()
             if "embedding_bags" in name and param.numel()}
    return {"plan": json.loads(describe_plan(plan)), "local": local}


@pytest.mark.multiprocess
def test_two_ranks_shard_as_the_file_says(tmp_path, synthetic_dir: str, synthetic_schema: DatasetSchema) -> None:
    init_distributed()
    _, planned = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, TABLE_WISE, OptimizerConfig(),
                             batch_size=8)
    placements = json.loads(describe_plan(planned))
    tables = sorted(placements)
    width = placements[tables[0]]["shards"][0]["sizes"][1]
    rows = placements[tables[0]]["shards"][0]["sizes"][0]
    written = {}
    for index, name in enumerate(tables):  # every table on rank 1, the first split into two column shards
        placement = {"module": placements[name]["module"], "compute_kernel": "fused"}
        if index == 0:
            written[name] = {**placement, "sharding_type": "column_wise", "ranks": [0, 1], "shards": [
                {"rank": 1, "offsets": [0, 0], "sizes": [rows, width // 2]},
                {"rank": 0, "offsets": [0, width // 2], "sizes": [rows, width // 2]}]}
        else:
            sizes = placements[name]["shards"][0]["sizes"]
            written[name] = {**placement, "sharding_type": "table_wise", "ranks": [1],
                             "shards": [{"rank": 1, "offsets": [0, 0], "sizes": sizes}]}
    path = _write(str(tmp_path / "plan.json"), written)
    first, second = run_multiprocess(_shard_as_written, world_size=2, schema_path=synthetic_dir, plan_path=path)
    assert first["plan"] == second["plan"] == written
    assert len(first["local"]) == 1 and len(second["local"]) == len(tables)  # rank 0 holds one column shard


def _refusal(schema: DatasetSchema, path: str, world_size: int = 1, config: ModelConfig = SMOKE_CONFIGS["fm"]) -> str:
    with pytest.raises(ValueError) as refused:
        shard_model(_task(schema, config), torch.device("cpu"), world_size, ShardingConfig(plan_file=path),
                    OptimizerConfig(), batch_size=8)
    return str(refused.value)


def test_a_plan_file_that_does_not_fit_the_model_or_job_is_refused_naming_the_table(
        tmp_path, synthetic_schema: DatasetSchema) -> None:
    init_distributed()
    _, planned = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, TABLE_WISE, OptimizerConfig(),
                             batch_size=8)
    placements = json.loads(describe_plan(planned))
    name = sorted(placements)[0]
    assert "no such file" in _refusal(synthetic_schema, str(tmp_path / "absent.json"))
    # a run directory given for its plan: "[Errno 21] Is a directory" named neither the setting nor the file
    assert _refusal(synthetic_schema, str(tmp_path)) == (f"sharding.plan_file {tmp_path}: a directory, not a file "
                                                         f"(a run's plan is {tmp_path / 'sharding_plan.json'})")
    assert "not valid JSON" in _refusal(synthetic_schema, _bad_json(tmp_path))
    fewer = {key: value for key, value in placements.items() if key != name}
    assert f"the model's tables it lacks: [{name!r}]" in _refusal(synthetic_schema, _write(str(tmp_path / "a"), fewer))
    elsewhere = {**placements, name: {**placements[name], "ranks": [3],
                                      "shards": [{**placements[name]["shards"][0], "rank": 3}]}}
    assert f"table {name!r}: on ranks [3], but the job has 1 rank(s)" in _refusal(
        synthetic_schema, _write(str(tmp_path / "b"), elsewhere))
    nested = {**placements, name: {**placements[name], "sharding_type": "table_column_wise"}}
    assert "a table_column_wise placement, which cannot be rebuilt" in _refusal(
        synthetic_schema, _write(str(tmp_path / "c"), nested))
    fp16 = ModelConfig(**{**SMOKE_CONFIGS["fm"].__dict__, "embedding_dtype": "fp16"})
    replicated = {**placements, name: {**placements[name], "sharding_type": "data_parallel", "compute_kernel": "dense"}}
    assert f"table {name!r}: data_parallel, which its settings do not allow" in _refusal(
        synthetic_schema, _write(str(tmp_path / "d"), replicated), config=fp16)


def _bad_json(tmp_path) -> str:
    path = tmp_path / "bad.json"
    path.write_text("{not json", encoding="utf-8")
    return str(path)


def test_a_plan_file_whose_shards_torchrec_splits_otherwise_is_refused(
        tmp_path, synthetic_schema: DatasetSchema) -> None:
    """torchrec splits a table's columns evenly over its column shards' ranks: a file that says otherwise (shards
    of another job, or edited by hand) is refused, not rebuilt into other shards silently."""
    init_distributed()
    _, planned = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, TABLE_WISE, OptimizerConfig(),
                             batch_size=8)
    placements = json.loads(describe_plan(planned))
    name = sorted(placements)[0]
    rows, width = placements[name]["shards"][0]["sizes"]
    half: List[Dict[str, Any]] = [{"rank": 0, "offsets": [0, 0], "sizes": [rows, width // 2]}]  # half the columns
    written = {**placements, name: {**placements[name], "sharding_type": "column_wise", "compute_kernel": "fused",
                                    "ranks": [0], "shards": half}}
    message = _refusal(synthetic_schema, _write(str(tmp_path / "e"), written))
    assert f"table {name!r}'s placement (column_wise on ranks [0]) cannot be rebuilt as written" in message
    assert table_placements(planned)  # the planner's own plan was untouched
