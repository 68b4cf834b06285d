"""``sharding.plan_file``: a run's ``sharding_plan.json`` sharded as it says instead of planned."""

import json
import os
from typing import Any, Dict, List

import pytest
import torch
from torchrec.distributed.planner.types import ParameterConstraints
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.plan_file import read_plan_file
from recsys_llm.train.plan_report import describe_plan, table_placements
from recsys_llm.train.planner_inputs import find_tables
from recsys_llm.train.sharding import shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
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


def test_a_plan_file_takes_each_tables_fbgemm_settings_its_own_or_the_global_ones(
        tmp_path, synthetic_schema: DatasetSchema) -> None:
    """A plan file holds no FBGEMM settings: each table gets those of the config as a planned one would, a table's
    own ``sharding.table_constraints.<table>.fused_params`` over the global ``sharding.fused_params``
    (``plan_file.with_constraint_settings``)."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

    from recsys_llm.train.sharding_config import FusedParamsConfig

    init_distributed()
    _, planned = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, TABLE_WISE, OptimizerConfig(),
                             batch_size=8)
    path = str(tmp_path / "sharding_plan.json")
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(describe_plan(planned))
    own = {"t_item_id": {"fused_params": {"cache_load_factor": 0.05, "stochastic_rounding": True,
                                          "bounds_check_mode": "none"}}}
    sharding = ShardingConfig(plan_file=path, table_constraints=own, fused_params=FusedParamsConfig(
        cache_load_factor=0.2, stochastic_rounding=False, bounds_check_mode="fatal"))
    _, loaded = shard_model(_task(synthetic_schema), torch.device("cpu"), 1, sharding, OptimizerConfig(),
                            batch_size=8)
    assert describe_plan(loaded) == describe_plan(planned)
    settings = {name: (p.cache_params.load_factor, p.stochastic_rounding, p.bounds_check_mode)
                for module in loaded.plan.values() for name, p in module.items()}
    assert settings.pop("t_item_id") == (0.05, True, BoundsCheckMode.NONE)
    assert settings and set(settings.values()) == {(0.2, False, BoundsCheckMode.FATAL)}


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
    nested = {**placements, name: {**placements[name], "sharding_type": "grid_shard"}}
    assert "a grid_shard placement, which cannot be rebuilt" in _refusal(
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


ROWS, WIDTH = 10, 8


class _TwoTables(torch.nn.Module):
    """Tables ``t`` (feature ``f``) and ``u`` (``g``), 10 x 8, on meta: DMP allocates their shards."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t", embedding_dim=WIDTH, num_embeddings=ROWS, feature_names=["f"]),
            EmbeddingBagConfig(name="u", embedding_dim=WIDTH, num_embeddings=ROWS, feature_names=["g"])],
            device=torch.device("meta"))

    def forward(self, features: KeyedJaggedTensor) -> KeyedTensor:
        return self.ebc(features)


def _shard(rank: int, sizes: List[int], offsets: List[int]) -> Dict[str, Any]:
    return {"rank": rank, "offsets": offsets, "sizes": sizes}


def _placement(kind: str, shards: List[Dict[str, Any]], kernel: str = "fused") -> Dict[str, Any]:
    return {"module": "ebc", "sharding_type": kind, "compute_kernel": kernel,
            "ranks": sorted({shard["rank"] for shard in shards}), "shards": shards}


# rows 0-4 on the first rank of the host, 5-9 on the second
TABLE_ROW_WISE_HOST_1 = _placement("table_row_wise", [_shard(2, [5, WIDTH], [0, 0]), _shard(3, [5, WIDTH], [5, 0])])
# columns 0-3 on rank 3, 4-7 on rank 2: out of rank order
TABLE_COLUMN_WISE = _placement("table_column_wise", [_shard(3, [ROWS, 4], [0, 0]), _shard(2, [ROWS, 4], [0, 4])])


class TestHierarchicalPlacements:
    """``table_row_wise`` (torchrec's ``table_row_wise`` generator) and ``table_column_wise`` (its ``column_wise``
    one, renamed) placements of a file, rebuilt and checked like the others."""

    def test_they_are_rebuilt_with_the_files_shards_ranks_and_kernels(self, tmp_path) -> None:
        model = _TwoTables()
        for device, kernel in (("cpu", "fused"), ("cuda", "fused_uvm_caching")):  # plans only: no CUDA needed
            written = {"t": {**TABLE_ROW_WISE_HOST_1, "compute_kernel": kernel},
                       "u": {**TABLE_COLUMN_WISE, "compute_kernel": kernel}}
            path = _write(str(tmp_path / f"{device}.json"), written)
            plan = read_plan_file(path, find_tables(model), 4, 2, device, {})
            assert table_placements(plan) == written

    def test_rows_on_ranks_of_two_hosts_are_refused_naming_the_table_and_hosts(self, tmp_path) -> None:
        across = _placement("table_row_wise", [_shard(1, [5, WIDTH], [0, 0]), _shard(2, [5, WIDTH], [5, 0])])
        path = _write(str(tmp_path / "across.json"), {"t": across, "u": TABLE_COLUMN_WISE})
        with pytest.raises(ValueError, match=r"table 't'.s placement \(table_row_wise on ranks \[1, 2\]\) cannot be "
                                             r"rebuilt as written on 4 rank\(s\), 2 a host"):
            read_plan_file(path, find_tables(_TwoTables()), 4, 2, "cpu", {})

    def test_table_wise_placements_are_rebuilt_on_the_files_ranks(self, tmp_path) -> None:
        written = {"t": _placement("table_wise", [_shard(3, [ROWS, WIDTH], [0, 0])]),
                   "u": _placement("table_wise", [_shard(1, [ROWS, WIDTH], [0, 0])])}
        plan = read_plan_file(_write(str(tmp_path / "plan.json"), written), find_tables(_TwoTables()), 4, 2, "cpu", {})
        assert table_placements(plan) == written

    def test_a_rank_module_or_kernel_other_than_the_jobs_is_refused_naming_the_table(self, tmp_path) -> None:
        tables, u = find_tables(_TwoTables()), _placement("table_wise", [_shard(0, [ROWS, WIDTH], [0, 0])])
        past_the_last = _write(str(tmp_path / "rank.json"), {"t": _placement("table_wise", [_shard(4, [ROWS, WIDTH],
                                                                                                   [0, 0])]), "u": u})
        with pytest.raises(ValueError, match=r"table 't': on ranks \[4\], but the job has 4 rank\(s\) \(0 to 3\)$"):
            read_plan_file(past_the_last, tables, 4, 2, "cpu", {})
        elsewhere = _write(str(tmp_path / "module.json"), {"t": {**TABLE_ROW_WISE_HOST_1, "module": "other"}, "u": u})
        with pytest.raises(ValueError, match=r"table 't': in module 'other', but the model holds it in 'ebc'$"):
            read_plan_file(elsewhere, tables, 4, 2, "cpu", {})
        dense = _write(str(tmp_path / "kernel.json"), {"t": {**TABLE_ROW_WISE_HOST_1, "compute_kernel": "dense"}, "u": u})
        with pytest.raises(ValueError, match=r"table 't': the 'dense' kernel, which its settings do not allow "
                                             r"\(allowed: \['fused'\]\)$"):
            read_plan_file(dense, tables, 4, 2, "cpu", {"t": ParameterConstraints(compute_kernels=["fused"])})

    def test_a_placement_without_every_key_of_a_runs_plan_is_refused(self, tmp_path) -> None:
        shardless = {key: value for key, value in TABLE_ROW_WISE_HOST_1.items() if key != "shards"}
        path = _write(str(tmp_path / "plan.json"), {"t": shardless, "u": TABLE_COLUMN_WISE})
        with pytest.raises(ValueError, match=r"plan\.json: expected a JSON object of table -> placement with "
                                             r"\['module', 'sharding_type', 'compute_kernel', 'ranks', 'shards'\]"):
            read_plan_file(path, find_tables(_TwoTables()), 4, 2, "cpu", {})

    def test_a_type_the_tables_settings_do_not_allow_is_refused(self, tmp_path) -> None:
        path = _write(str(tmp_path / "plan.json"), {"t": TABLE_ROW_WISE_HOST_1, "u": TABLE_COLUMN_WISE})
        allowed = {"t": ParameterConstraints(sharding_types=["table_wise", "row_wise"])}
        with pytest.raises(ValueError, match=r"table 't': table_row_wise, which its settings do not allow"):
            read_plan_file(path, find_tables(_TwoTables()), 4, 2, "cpu", allowed)


def _pooled_before_and_after_a_step(plan_path: str, local_world_size: int) -> Dict[str, torch.Tensor]:
    """Rank r's pooled ``f`` of the bags [r, 9 - r] and [r + 1] with every table row i holding 100 i + column,
    then again after one SGD step (lr 1) on the sum of them; ``local_world_size`` ranks a host."""
    os.environ["LOCAL_WORLD_SIZE"] = str(local_world_size)
    rank = int(os.environ["RANK"])
    os.environ["LOCAL_RANK"] = str(rank % local_world_size)
    init_distributed("cpu")
    model, _ = shard_model(_TwoTables(), torch.device("cpu"), 2, ShardingConfig(plan_file=plan_path),
                           OptimizerConfig(sparse="sgd", sparse_lr=1.0), batch_size=2)
    with torch.no_grad():
        for key, value in model.state_dict().items():
            for shard in value.local_shards() if "embedding_bags" in key else []:
                (row, column), (rows, columns) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                shard.tensor.copy_(torch.arange(row, row + rows)[:, None] * 100.0
                                   + torch.arange(column, column + columns)[None, :])
    bags = [[rank, ROWS - 1 - rank], [rank + 1]]
    features = KeyedJaggedTensor.from_lengths_sync(keys=["f", "g"], values=torch.tensor(sum(bags, []) * 2),
                                                   lengths=torch.tensor([len(bag) for bag in bags] * 2))
    before = model(features).wait().to_dict()["f"]
    before.sum().backward()
    with torch.no_grad():
        after = model(features).wait().to_dict()["f"]
    return {"before": before.detach(), "after": after}


@pytest.mark.multiprocess
@pytest.mark.parametrize("placement, hosts", [
    (_placement("table_row_wise", [_shard(0, [5, WIDTH], [0, 0]), _shard(1, [5, WIDTH], [5, 0])]), 1),
    (_placement("table_row_wise", [_shard(1, [ROWS, WIDTH], [0, 0])]), 2),  # one rank a host: all on host 1
    (_placement("table_column_wise", [_shard(1, [ROWS, 4], [0, 0]), _shard(0, [ROWS, 4], [0, 4])]), 1),
], ids=["table_row_wise-one-host", "table_row_wise-second-of-two-hosts", "table_column_wise"])
def test_two_cpu_ranks_train_a_hierarchical_placement_as_a_table_wise_one(tmp_path, placement: Dict[str, Any],
                                                                          hosts: int) -> None:
    """torchrec's CPU sharder does not offer table_row_wise, so the planner never plans it on CPU, but DMP shards
    a plan of it over gloo (2 ranks, as one host or as two hosts of LOCAL_WORLD_SIZE=1): the pooled embeddings and
    a fused SGD step come out as those of the table placed whole on one rank."""
    whole = _placement("table_wise", [_shard(0, [ROWS, WIDTH], [0, 0])])
    other = _placement("table_wise", [_shard(1, [ROWS, WIDTH], [0, 0])])
    results = {}
    for name, written in (("file", placement), ("whole", whole)):
        path = _write(str(tmp_path / f"{name}.json"), {"t": written, "u": other})
        results[name] = run_multiprocess(_pooled_before_and_after_a_step, world_size=2, plan_path=path,
                                         local_world_size=2 // hosts)
    for rank, (file, table_wise) in enumerate(zip(results["file"], results["whole"])):
        expected = torch.arange(WIDTH) * 2.0 + (rank + ROWS - 1 - rank) * 100.0  # rows r and 9 - r
        assert torch.equal(file["before"][0], expected), (rank, file["before"])
        torch.testing.assert_close(file["before"], table_wise["before"], rtol=0, atol=0)
        torch.testing.assert_close(file["after"], table_wise["after"], rtol=0, atol=0)
        assert not torch.equal(file["after"], file["before"])  # the step moved the rows
