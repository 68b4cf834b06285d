"""Planner + DMP sharding on 2 gloo ranks: placement, fused optimizers, frozen tables, pipelining."""

import dataclasses
import logging
import re
from typing import Any, Dict, List

import pytest
import torch
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.embedding import FILLED_BEFORE_SHARDING, embedding_bag_configs
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.pipeline import train_epoch
from recsys_llm.train.plan_report import ranks_holding_tables, table_placements
from recsys_llm.train.planner_inputs import (
    build_constraints,
    build_topology,
    find_tables,
    frozen_table_names,
    table_weights,
)
from recsys_llm.train.sharding import build_optimizer, embedding_kernels, shard_model
from recsys_llm.train.sharding_config import FusedParamsConfig, OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess

NOT_PIPELINED = "will NOT be pipelined"


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _local_table(model: torch.nn.Module, table: str) -> torch.Tensor:
    """This rank's shard of ``table`` (empty tensor when it holds none)."""
    for key, value in model.state_dict().items():
        if key.endswith(f"embedding_bags.{table}.weight"):
            shards = value.local_shards()
            return shards[0].tensor.detach().clone() if shards else torch.empty(0)
    raise KeyError(table)


def _shard_and_train(schema_path: str, model_name: str, frozen: List[str], steps: int,
                     device: str = "cpu") -> Dict[str, Any]:
    ctx = init_distributed(device)
    collect = _Collect()
    logging.getLogger("torchrec").addHandler(collect)
    torch.manual_seed(0)
    schema = DatasetSchema.load(schema_path)
    task = CTRTask(build_backbone(SMOKE_CONFIGS[model_name], schema, device=torch.device("meta"),
                                  dense_device=ctx.device))
    sharding = ShardingConfig(sharding_types=["table_wise", "row_wise"], frozen_tables=frozen)
    optim = OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=0.1, dense="adam", dense_lr=0.01)
    model, plan = shard_model(task, ctx.device, ctx.world_size, sharding, optim, batch_size=64)
    optimizer = build_optimizer(model, optim)
    tables = list(table_placements(plan))
    before = {t: _local_table(model, t) for t in tables}
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    stats = train_epoch(model, optimizer, reader, ctx.device, on_step=lambda step, loss: step >= steps, progress=False)
    after = {t: _local_table(model, t) for t in tables}
    state = optimizer.state_dict()["state"]
    return {
        "backend": ctx.backend,
        "holding": ranks_holding_tables(plan, ctx.world_size),
        "placements": {t: (p["sharding_type"], p["compute_kernel"]) for t, p in table_placements(plan).items()},
        "changed": {t: bool(before[t].numel()) and not torch.equal(before[t], after[t]) for t in tables},
        "local": {t: before[t].numel() > 0 for t in tables},
        "optimizer_state": {
            t: sorted(v) for k, v in state.items() for t in tables if k.endswith(f"embedding_bags.{t}.weight")
        },
        "pipelined": stats.pipelined_modules,
        "sharded": stats.sharded_modules,
        "steps": stats.steps,
        "dense_fused": [group.get("fused") for group in optimizer.optimizers[-1][1].param_groups],  # dense is last
        "not_pipelined_logs": [m for m in collect.messages if NOT_PIPELINED in m],
        # tables whose fused kernel runs no backward on this rank
        "no_backward": sorted(c.name for _, kernel in embedding_kernels(model)
                              if not kernel.emb_module.placeholder_autograd_tensor.requires_grad
                              for c in kernel.config.embedding_tables),
    }


def check_rank_trained_and_froze(result: Dict[str, Any], frozen: str, steps: int) -> None:
    """One rank's ``_shard_and_train``: every step ran, fused and pipelined, and of the tables the rank
    holds, ``frozen`` stayed as it was (no optimizer state, no backward) while the others got fused
    optimizer state."""
    assert result["steps"] == steps
    assert result["dense_fused"] == [True]  # the dense Adam runs torch's fused kernel
    # Every sharded EBC is overlapped by the pipeline; torchrec never logged a fallback.
    assert result["pipelined"] == result["sharded"] and result["sharded"]
    assert result["not_pipelined_logs"] == []
    for table, local in result["local"].items():
        if not local:
            continue
        if table == frozen:
            assert not result["changed"][table], "the frozen table was updated"
            assert result["optimizer_state"][table] == [], "the frozen table holds optimizer state"
            assert result["no_backward"] == [frozen], "the frozen table's kernel still runs its backward"
        else:
            assert result["optimizer_state"][table], f"no fused optimizer state for {table}"


@pytest.mark.multiprocess
def test_two_ranks_shard_train_and_freeze(synthetic_dir: str) -> None:
    frozen = "t_item_category"
    results = run_multiprocess(
        _shard_and_train, world_size=2, schema_path=synthetic_dir, model_name="deepfm", frozen=[frozen], steps=4
    )
    holding = results[0]["holding"]
    assert holding == results[1]["holding"]
    # Tables are sharded across both ranks (no replication was allowed).
    assert holding[0] and holding[1], holding
    assert all(t != "data_parallel" for t, _ in results[0]["placements"].values())
    assert results[0]["placements"][frozen][1] == "fused"
    for result in results:
        check_rank_trained_and_froze(result, frozen, steps=4)
    # Trained tables that received ids changed on the rank holding them.
    changed = {t for r in results for t, c in r["changed"].items() if c}
    assert {"t_user_id", "t_item_id"} <= changed


def _train_replicated(schema_path: str, steps: int) -> Dict[str, Any]:
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    schema = DatasetSchema.load(schema_path)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    # the table optimizer is plain SGD at lr 1; the dense optimizer barely moves anything
    optim = OptimizerConfig(sparse="sgd", sparse_lr=1.0, dense="sgd", dense_lr=1e-12)
    sharding = ShardingConfig(sharding_types=["table_wise"],
                              table_constraints={"t_user_id": {"sharding_types": ["data_parallel"]}})
    model, plan = shard_model(task, ctx.device, ctx.world_size, sharding, optim, batch_size=64)
    optimizer = build_optimizer(model, optim)
    before = {t: _local_table(model, t) if t != "t_user_id" else _replicated_table(model, t) for t in table_placements(plan)}
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    train_epoch(model, optimizer, reader, ctx.device, on_step=lambda step, loss: step >= steps, progress=False)
    after = {t: _local_table(model, t) if t != "t_user_id" else _replicated_table(model, t) for t in before}
    return {
        "placements": {t: p["sharding_type"] for t, p in table_placements(plan).items()},
        "moved": {t: float((after[t] - before[t]).abs().max()) if before[t].numel() else None for t in before},
        "optimizers": [type(part).__name__ + ":" + type(getattr(part, "_optimizer", part)).__name__
                       for _, part in optimizer.optimizers],
    }


def _replicated_table(model: torch.nn.Module, table: str) -> torch.Tensor:
    for key, value in model.state_dict().items():
        if key.endswith(f"embedding_bags.{table}.weight"):
            return value.detach().clone()
    raise KeyError(table)


@pytest.mark.multiprocess
def test_replicated_tables_train_with_the_table_optimizer(synthetic_dir: str) -> None:
    """A data_parallel table has no fused kernel; it must still follow optim.sparse, not optim.dense."""
    results = run_multiprocess(_train_replicated, world_size=2, schema_path=synthetic_dir, steps=3)
    for result in results:
        assert result["placements"]["t_user_id"] == "data_parallel"
        assert "KeyedOptimizerWrapper:SGD" in result["optimizers"]
        # lr 1 SGD on the table (a dense-lr step of 1e-12 would leave it unchanged in float32)
        assert result["moved"]["t_user_id"] > 1e-4
    # the two ranks hold the same replicated table after the all-reduced updates
    assert results[0]["moved"]["t_user_id"] == results[1]["moved"]["t_user_id"]


class _TablesOnly(torch.nn.Module):
    """Matrix factorisation of a kind: the logit is the sum of the pooled embeddings, no dense weight."""

    def __init__(self, schema: DatasetSchema) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(embedding_bag_configs(schema, 4), device=torch.device("meta"))

    def forward(self, batch):  # noqa: ANN001, ANN201
        logits = self.ebc(batch.sparse_features).values().sum(-1)  # (B,)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _train_tables_only(schema_path: str) -> Dict[str, Any]:
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    schema = DatasetSchema.load(schema_path)
    optim = OptimizerConfig()
    model, _ = shard_model(_TablesOnly(schema), ctx.device, ctx.world_size, ShardingConfig(), optim, batch_size=64)
    optimizer = build_optimizer(model, optim)
    before = _local_table(model, "t_item_id")
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    stats = train_epoch(model, optimizer, reader, ctx.device, on_step=lambda step, loss: step >= 3, progress=False)
    return {"steps": stats.steps, "moved": not torch.equal(before, _local_table(model, "t_item_id"))}


@pytest.mark.multiprocess
def test_a_model_of_tables_only_gets_an_optimizer_and_trains(synthetic_dir: str) -> None:
    """Without a dense weight the dense optimizer had an empty parameter list, which torch refuses."""
    (result,) = run_multiprocess(_train_tables_only, world_size=1, schema_path=synthetic_dir)
    assert result == {"steps": 3, "moved": True}


def _table_kernel_eps(schema_path: str) -> Dict[str, float]:
    ctx = init_distributed("cpu")
    schema = DatasetSchema.load(schema_path)
    epsilons = {}
    for sparse in ("row_wise_adagrad", "adagrad"):
        torch.manual_seed(0)
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], schema, device=torch.device("meta")))
        optim = OptimizerConfig(sparse=sparse, sparse_lr=0.1, eps=0.25)
        model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(sharding_types=["table_wise"]), optim,
                               batch_size=64)
        epsilons[sparse] = sorted({kernel.emb_module.optimizer_args.eps for _, kernel in embedding_kernels(model)})
    return epsilons


@pytest.mark.multiprocess
def test_the_fused_table_optimizers_take_optim_eps(synthetic_dir: str) -> None:
    """optim.eps is the table optimizer's as well as the dense one's, row-wise Adagrad's included."""
    (result,) = run_multiprocess(_table_kernel_eps, world_size=1, schema_path=synthetic_dir)
    assert result == {"row_wise_adagrad": [0.25], "adagrad": [0.25]}


def _one_step_with_weight_decay(schema_path: str) -> Dict[str, Any]:
    ctx = init_distributed("cpu")
    schema = DatasetSchema.load(schema_path)
    batch = next(iter(ParquetBatchReader(schema, "train", 64)))
    after: Dict[Any, Dict[str, torch.Tensor]] = {}
    for placement in ("table_wise", "data_parallel"):
        for decay in (0.0, 0.5):
            torch.manual_seed(0)
            task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], schema, device=torch.device("meta")))
            optim = OptimizerConfig(sparse="adagrad", sparse_lr=0.1, weight_decay=decay)
            model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(sharding_types=[placement]), optim,
                                   batch_size=64)
            optimizer = build_optimizer(model, optim)
            loss = model(batch)[0]
            loss.backward()
            optimizer.step()
            after[placement, decay] = {
                "table": _replicated_table(model, "t_user_id") if placement == "data_parallel"
                else _local_table(model, "t_user_id"),
                "dense": torch.cat([p.detach().flatten().clone() for n, p in model.named_parameters()
                                    if "embedding_bags" not in n]),
            }
    return {f"{placement}/{part}": torch.equal(after[placement, 0.0][part], after[placement, 0.5][part])
            for placement in ("table_wise", "data_parallel") for part in ("table", "dense")}


@pytest.mark.multiprocess
def test_weight_decay_leaves_every_table_alone_whatever_its_placement(synthetic_dir: str) -> None:
    """FBGEMM's fused CPU kernels ignore weight decay; a replicated table decayed through its unfused optimizer,
    so the same table trained otherwise by its placement. Now only the dense parameters decay."""
    (same,) = run_multiprocess(_one_step_with_weight_decay, world_size=1, schema_path=synthetic_dir)
    assert same == {"table_wise/table": True, "table_wise/dense": False,
                    "data_parallel/table": True, "data_parallel/dense": False}


class _TwinTables(torch.nn.Module):
    """Tables of one shape: ``a`` and ``b`` (table-wise on two ranks, one on each) and ``c`` (replicated)."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name=name, embedding_dim=8, num_embeddings=10, feature_names=[name]) for name in "abc"],
            device=torch.device("meta"))

    def forward(self, batch):  # noqa: ANN001, ANN201
        return self.ebc(batch)


def _initial_shards() -> Dict[str, torch.Tensor]:
    ctx = init_distributed("cpu")
    torch.manual_seed(0)  # train.seed: the same on every rank
    sharding = ShardingConfig(sharding_types=["table_wise"], table_constraints={"c": {"sharding_types": ["data_parallel"]}})
    model, _ = shard_model(_TwinTables(), ctx.device, ctx.world_size, sharding, OptimizerConfig(), batch_size=8)
    shards = {table: _local_table(model, table) for table in "ab" if _local_table(model, table).numel()}
    return {**shards, "c": _replicated_table(model, "c")}


@pytest.mark.multiprocess
def test_ranks_initialise_their_tables_from_streams_of_their_own() -> None:
    """Every rank starts from train.seed, and each drew its shards' initial values from the same stream: the
    table on rank 1 began as a copy of the one on rank 0 (rows of different tables, and the column shards of
    one table, alike)."""
    rank0, rank1 = run_multiprocess(_initial_shards, world_size=2)
    assert torch.equal(rank0.pop("c"), rank1.pop("c"))  # a replicated table is rank 0's on every rank
    (first,), (second,) = rank0.values(), rank1.values()
    assert set(rank0) | set(rank1) == {"a", "b"}
    assert not torch.equal(first, second)
    bound = 10 ** -0.5  # torchrec's default init: uniform in +-sqrt(1 / rows)
    assert first.abs().max() <= bound and second.abs().max() <= bound


class _ModifiesKJT(torch.nn.Module):
    """Negative control: changes the KJT before the EBC, which torchrec cannot pipeline."""

    def __init__(self, backbone: torch.nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(self, batch):  # noqa: ANN001
        kjt = batch.sparse_features
        shifted = KeyedJaggedTensor(kjt.keys(), kjt.values() * 1, lengths=kjt.lengths())
        output = self.backbone(batch.dense_features, shifted)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(output.logits, batch.labels)
        return loss, (loss.detach(), output.logits.detach(), batch.labels)


def _all_backbones_pipelined(schema_path: str) -> Dict[str, Any]:
    results = {name: _shard_and_train(schema_path, name, [], steps=2) for name in SMOKE_CONFIGS}
    # The control: same harness, a model that modifies its KJT input.
    collect = _Collect()
    logging.getLogger("torchrec").addHandler(collect)
    schema = DatasetSchema.load(schema_path)
    task = _ModifiesKJT(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    model, _ = shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(), batch_size=64)
    reader = ParquetBatchReader(schema, "train", 64)
    stats = train_epoch(model, build_optimizer(model, OptimizerConfig()), reader, torch.device("cpu"),
                        on_step=lambda step, loss: step >= 2, progress=False)
    results["control"] = {
        "pipelined": stats.pipelined_modules,
        "sharded": stats.sharded_modules,
        "not_pipelined_logs": [m for m in collect.messages if NOT_PIPELINED in m],
        # tables whose fused kernel runs no backward on this rank
        "no_backward": sorted(c.name for _, kernel in embedding_kernels(model)
                              if not kernel.emb_module.placeholder_autograd_tensor.requires_grad
                              for c in kernel.config.embedding_tables),
    }
    return results


@pytest.mark.multiprocess
def test_every_backbone_is_fully_pipelined(synthetic_dir: str) -> None:
    (results,) = run_multiprocess(_all_backbones_pipelined, world_size=1, schema_path=synthetic_dir)
    control = results.pop("control")
    assert control["not_pipelined_logs"] and control["pipelined"] != control["sharded"], control
    assert set(results) == set(SMOKE_CONFIGS)
    for name, result in results.items():
        assert result["not_pipelined_logs"] == [], name
        assert result["pipelined"] == result["sharded"] and result["sharded"], name


class TestConstraints:
    def test_frozen_and_table_overrides(self, synthetic_schema: DatasetSchema) -> None:
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        config = ShardingConfig(
            sharding_types=["table_wise"],
            table_constraints={"t_user_id": {"sharding_types": ["row_wise"]}},
            frozen_tables=["t_item_id"],
        )
        constraints = build_constraints(task, config)
        assert constraints["t_user_id"].sharding_types == ["row_wise"]
        assert constraints["t_device"].sharding_types == ["table_wise"]
        assert constraints["t_item_id"].compute_kernels == ["fused"]
        # the global kernel list is for trained tables: a frozen one keeps 'fused' (its own override may not drop it)
        uvm = build_constraints(task, ShardingConfig(compute_kernels=["fused_uvm_caching"], frozen_tables=["t_item_id"]))
        assert uvm["t_item_id"].compute_kernels == ["fused"] and uvm["t_user_id"].compute_kernels == ["fused_uvm_caching"]
        with pytest.raises(ValueError, match=r"^sharding\.table_constraints\.t_item_id\.compute_kernels="
                                             r"\['fused_uvm'\]: 't_item_id' is a frozen table \(never trained\), "
                                             r"which runs on the 'fused' kernel; add 'fused' or drop the setting$"):
            build_constraints(task, ShardingConfig(table_constraints={"t_item_id": {"compute_kernels": ["fused_uvm"]}},
                                                   frozen_tables=["t_item_id"]))

    def test_the_tables_of_an_ebc_marked_frozen_are_frozen_as_listed_ones(self) -> None:
        model = _WideTables()
        model.ebc.frozen = True  # as a semantic table's or a teacher's EBC is marked
        assert frozen_table_names(model, ShardingConfig()) == {"t_item_vector", "t_user"}
        constraints = build_constraints(model, ShardingConfig(), "cpu")
        assert {name: c.compute_kernels for name, c in constraints.items()} == {"t_item_vector": ["fused"],
                                                                                 "t_user": ["fused"]}
        assert "data_parallel" not in constraints["t_user"].sharding_types

    def test_errors_name_the_table(self, synthetic_schema: DatasetSchema) -> None:
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        with pytest.raises(ValueError, match=r"frozen_tables names unknown tables \['t_nope'\]"):
            build_constraints(task, ShardingConfig(frozen_tables=["t_nope"]))
        with pytest.raises(ValueError, match=r"^sharding\.sharding_types allows only data_parallel for the frozen "
                                             r"table 't_item_id', which is never trained"):
            build_constraints(task, ShardingConfig(sharding_types=["data_parallel"], frozen_tables=["t_item_id"]))
        with pytest.raises(ValueError, match=r"^sharding\.table_constraints\.t_item_id\.sharding_types allows only "
                                             r"data_parallel for the frozen table 't_item_id'"):
            only_replicated = {"t_item_id": {"sharding_types": ["data_parallel"]}}
            build_constraints(task, ShardingConfig(table_constraints=only_replicated, frozen_tables=["t_item_id"]))
        with pytest.raises(ValueError, match="table_constraints.t_x: unknown keys"):
            ShardingConfig(table_constraints={"t_x": {"kernel": ["fused"]}})
        with pytest.raises(ValueError, match=r"^sharding\.table_constraints names unknown tables \['t_nope'\]"):
            build_constraints(task, ShardingConfig(table_constraints={"t_nope": {"sharding_types": ["table_wise"]}}))

    def test_a_table_name_two_ebcs_use_is_refused_naming_both_paths(self) -> None:
        model = _WideTables()
        model.other = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["other_user"])], device=torch.device("meta"))
        with pytest.raises(ValueError, match=r"^table name 't_user' is used by both 'ebc' and 'other'; table names "
                                             r"must be unique across the model$"):
            find_tables(model)

    def test_an_ebc_registered_at_two_paths_is_refused(self, synthetic_schema: DatasetSchema) -> None:
        """An adapter that keeps a torchrec model whole and also holds its EBC: one table, two paths."""
        from torchrec.models.deepfm import SimpleDeepFMNN

        backbone = build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta"))
        ebc = backbone.embedding_bag_collection
        backbone.wrapped = SimpleDeepFMNN(len(synthetic_schema.dense_fields), ebc, 8, 4)
        task = CTRTask(backbone)
        with pytest.raises(ValueError, match=r"registered twice, at 'model.embedding_bag_collection' and "
                                             r"'model.wrapped.sparse_arch.embedding_bag_collection'"):
            shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(), batch_size=8)
        del backbone.wrapped
        assert set(find_tables(task)) == {c.name for c in ebc.embedding_bag_configs()}

    def test_table_weights_count_each_table_once(self) -> None:
        """The runner's 'sharding: planning N tables (XM weights)' summed each table's EBC: an EBC of T tables
        T times (500 fields: 500x the weights, and the note shown for models far below its threshold)."""
        def ebc(prefix: str, rows: List[int]) -> EmbeddingBagCollection:
            tables = [EmbeddingBagConfig(name=f"{prefix}{k}", embedding_dim=8, num_embeddings=n,
                                         feature_names=[f"{prefix}{k}"]) for k, n in enumerate(rows)]
            return EmbeddingBagCollection(tables=tables, device=torch.device("meta"))

        model = torch.nn.ModuleDict({"a": ebc("a", [4, 5, 6]), "b": ebc("b", [10])})
        assert table_weights(find_tables(model)) == (4 + 5 + 6 + 10) * 8

    def test_a_dense_buffer_on_meta_is_refused_before_sharding(self, synthetic_schema: DatasetSchema) -> None:
        """A torchrec DLRM built whole under ``torch.device("meta")``: DMP gave its interaction's ``triu_indices``
        uninitialised memory (zeros) and the model trained on the wrong pairs without an error."""
        with torch.device("meta"):
            task = CTRTask(build_backbone(SMOKE_CONFIGS["dlrm"], synthetic_schema, device=torch.device("meta")))
        with pytest.raises(ValueError, match=r"shard_model: the buffer\(s\) \['model.inter_arch.triu_indices'\] "
                                             r"outside the EmbeddingBagCollections are on the meta device"):
            shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(), batch_size=8)
        assert not any(hasattr(p, "_in_backward_optimizers") for p in task.parameters())  # left unchanged

    def test_tables_filled_before_sharding_are_refused(self, synthetic_schema: DatasetSchema) -> None:
        """load_full_state into the unsharded task, then shard_model: DMP initialised the tables afresh and kept the
        dense weights, so a "loaded" (e.g. frozen teacher) model trained with random tables without an error."""
        from recsys_llm.modules.teacher_student import load_full_state

        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("cpu")))
        load_full_state(task, {key: value.clone() for key, value in task.state_dict().items()})
        with pytest.raises(ValueError, match=r"shard_model: the tables of \['model.embedding_bag_collection "
                                             r"\(load_full_state\)'\] were filled before sharding"):
            shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(), batch_size=8)

    def test_tables_loaded_with_load_state_dict_before_sharding_are_refused(self, synthetic_schema) -> None:
        """A trained gain network's state loaded into the teacher (load_state_dict), then frozen KD sharded: DMP
        initialised the teacher's tables afresh and kept its dense weights, so the student distilled a teacher with
        random tables without an error."""
        from recsys_llm.modules.semantic_table import SemanticTable
        from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask

        cpu = torch.device("cpu")
        trained = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=cpu, table_prefix="teacher_"))
        teacher = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=cpu, table_prefix="teacher_"))
        teacher.load_state_dict(trained.state_dict())
        student = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta"),
                                         table_prefix="student_"))
        task = TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="frozen", beta=0.0))
        with pytest.raises(ValueError, match=r"shard_model: the tables of \['teacher.model.embedding_bag_collection "
                                             r"\(load_state_dict\)'\] were filled before sharding"):
            shard_model(task, cpu, 1, ShardingConfig(), OptimizerConfig(), batch_size=8)
        table = SemanticTable({"item_id": 10}, 4, device=cpu)
        table.load_state_dict(table.state_dict())
        assert getattr(table.embedding_bag_collection, FILLED_BEFORE_SHARDING) == "load_state_dict"
        # a state without table weights fills none
        fresh = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=cpu))
        fresh.load_state_dict({k: v for k, v in fresh.state_dict().items() if "embedding_bags" not in k}, strict=False)
        assert not hasattr(fresh.model.embedding_bag_collection, FILLED_BEFORE_SHARDING)

    def test_a_table_optimizer_the_cpu_kernels_lack_is_refused_before_sharding(self, synthetic_schema) -> None:
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        with pytest.raises(ValueError, match=r"optim.sparse='adam': FBGEMM's CPU embedding kernels implement only"):
            shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(sparse="adam"), batch_size=8)

    def test_without_a_process_group_init_distributed_is_named_and_the_task_left_unchanged(
        self, synthetic_schema, monkeypatch
    ) -> None:
        """A notebook shards in one process without torchrun: torchrec's planner failed with an AssertionError."""
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        with pytest.raises(RuntimeError, match=r"shard_model: no default process group; call "
                                               r"recsys_llm.train.distributed.init_distributed\(\) first"):
            shard_model(task, torch.device("cpu"), 1, ShardingConfig(), OptimizerConfig(), batch_size=8)
        assert not any(hasattr(p, "_in_backward_optimizers") for p in task.parameters())  # no fused optimizer yet


def _outputs_under_two_plans(schema_path: str) -> Dict[str, float]:
    """Same weights, two plans (mixed sharding types change the EBC output key order)."""
    init_distributed("cpu")
    schema = DatasetSchema.load(schema_path)
    batch = next(iter(ParquetBatchReader(schema, "valid", 128)))
    out = {}
    models = []
    key_orders = []
    for mixed in (False, True):
        torch.manual_seed(0)
        task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
        column_wise = {"t_device": {"sharding_types": ["column_wise"]}}
        sharding = ShardingConfig(sharding_types=["table_wise"], table_constraints=column_wise if mixed else {})
        model, _ = shard_model(task, torch.device("cpu"), 1, sharding, OptimizerConfig(), batch_size=128)
        models.append(model)
    models[1].load_state_dict(models[0].state_dict())
    for model, name in zip(models, ("table_wise", "mixed")):
        model.eval()
        with torch.no_grad():
            out[name] = model(batch)[1][1]
            key_orders.append(model.module.model.embedding_bag_collection(batch.sparse_features).keys())
    return {"max_abs_diff": float((out["table_wise"] - out["mixed"]).abs().max()), "key_orders": key_orders}


@pytest.mark.multiprocess
def test_backbone_output_does_not_depend_on_the_plan(synthetic_dir: str) -> None:
    """A sharded EBC groups its output keys by sharding type; fields are read by name."""
    (result,) = run_multiprocess(_outputs_under_two_plans, world_size=1, schema_path=synthetic_dir)
    table_wise_keys, mixed_keys = result["key_orders"]
    assert table_wise_keys != mixed_keys and sorted(table_wise_keys) == sorted(mixed_keys)
    assert result["max_abs_diff"] < 1e-5


def test_collective_timeout_setting_is_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    from recsys_llm.train.distributed import TIMEOUT_ENV, _collective_timeout

    monkeypatch.delenv(TIMEOUT_ENV, raising=False)
    assert _collective_timeout().total_seconds() == 3600
    monkeypatch.setenv(TIMEOUT_ENV, "120")
    assert _collective_timeout().total_seconds() == 120
    for bad in ("1h", "0", "inf", "nan", "1e15"):  # inf: an OverflowError traceback, nan: a message without the name
        monkeypatch.setenv(TIMEOUT_ENV, bad)
        with pytest.raises(ValueError, match=f"{TIMEOUT_ENV}='{bad}': expected a number of seconds > 0"):
            _collective_timeout()


def _gathered_and_loaded_shard_by_shard(schema_path: str, state_path: str) -> Dict[str, Any]:
    """``unsharded_state_dict`` against torch's ``ShardedTensor.gather`` (table- and column-wise;
    torchrec's CPU sharder has no row-wise), then ``load_full_state`` of a file back into the shards."""
    from safetensors.torch import save_file
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys_llm.modules.teacher_student import load_full_state
    from recsys_llm.serving import open_state_file, unsharded_state_dict

    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    schema = DatasetSchema.load(schema_path)
    wide = dataclasses.replace(SMOKE_CONFIGS["fm"], embedding_dim=256)  # two column shards (torchrec splits by 128)
    task = CTRTask(build_backbone(wide, schema, device=torch.device("meta")))
    types = {"t_user_id": "column_wise", "t_item_id": "column_wise"}
    sharding = ShardingConfig(sharding_types=["table_wise", "column_wise"],
                              table_constraints={t: {"sharding_types": [kind]} for t, kind in types.items()})
    model, plan = shard_model(task, ctx.device, ctx.world_size, sharding, OptimizerConfig(), batch_size=64)
    reference = {}
    for key, value in model.state_dict().items():
        if isinstance(value, ShardedTensor):
            full = torch.empty(value.size(), dtype=value.dtype) if ctx.rank == 1 else None
            value.gather(dst=1, out=full)
            reference[key.removeprefix("_dmp_wrapped_module.")] = full
        else:
            reference[key.removeprefix("_dmp_wrapped_module.")] = value
    on_rank_0 = unsharded_state_dict(model)
    on_rank_1 = unsharded_state_dict(model, dst=1)
    result = {
        "shards": {t: sorted(s["rank"] for s in p["shards"]) for t, p in table_placements(plan).items() if t in types},
        "empty_elsewhere": (on_rank_0 if ctx.rank else on_rank_1) == {},
        "keys": sorted(reference if ctx.rank else on_rank_0),
    }
    if ctx.rank == 1:
        result["gathered_equal"] = all(
            torch.equal(on_rank_1[k], reference[k]) and on_rank_1[k].device.type == "cpu" for k in reference
        )
    else:  # another full state, written to a file, to be read back into the shards
        new_state = {k: torch.randn(v.shape, generator=torch.Generator().manual_seed(i)) if v.is_floating_point() else v
                     for i, (k, v) in enumerate(sorted(on_rank_0.items()))}
        save_file(new_state, state_path)
    torch.distributed.barrier()
    with open_state_file(state_path) as state:
        result["copied"] = load_full_state(model, state, source=state_path)
    reloaded = unsharded_state_dict(model)
    if ctx.rank == 0:
        result["loaded_equal"] = all(torch.equal(reloaded[k], new_state[k]) for k in new_state)
    return result


@pytest.mark.multiprocess
def test_full_state_gathers_and_loads_shard_by_shard(synthetic_dir: str, tmp_path) -> None:
    state_path = str(tmp_path / "full.safetensors")
    rank_0, rank_1 = run_multiprocess(_gathered_and_loaded_shard_by_shard, world_size=2, schema_path=synthetic_dir,
                                      state_path=state_path)
    assert rank_0["shards"] == {"t_user_id": [0, 1], "t_item_id": [0, 1]}, rank_0["shards"]  # column shards on both
    assert rank_1["gathered_equal"], "the shard-by-shard gather differs from ShardedTensor.gather"
    assert rank_0["keys"] == rank_1["keys"] and rank_0["empty_elsewhere"] and rank_1["empty_elsewhere"]
    assert rank_0["loaded_equal"], "load_full_state of the file did not land in the right shards"
    assert rank_0["copied"] == rank_1["copied"] == len(rank_0["keys"])


def _shard_with(schema_path: str, sharding: ShardingConfig) -> str:
    ctx = init_distributed("cpu")
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], DatasetSchema.load(schema_path), device=torch.device("meta")))
    try:
        shard_model(task, ctx.device, ctx.world_size, sharding, OptimizerConfig())
    except ValueError as error:
        return str(error)
    return "sharded"


@pytest.mark.parametrize("sharding, message", [
    (ShardingConfig(sharding_types=["row_wise"]), "sharding.sharding_types=['row_wise']: torchrec's CPU sharder offers only"),
    (ShardingConfig(table_constraints={"t_user_id": {"sharding_types": ["table_row_wise"]}}),
     "sharding.table_constraints.t_user_id.sharding_types=['table_row_wise']"),
    (ShardingConfig(compute_device="cuda"), "sharding.compute_device='cuda', but this rank computes on cpu"),
    (ShardingConfig(compute_kernels=["fused_uvm_caching"]),
     "sharding.compute_kernels=['fused_uvm_caching']: unified-memory kernels run on CUDA only"),
    (ShardingConfig(table_constraints={"t_user_id": {"compute_kernels": ["fused_uvm"]}}),
     "sharding.table_constraints.t_user_id.compute_kernels=['fused_uvm']: unified-memory kernels"),
    # each list has a type the CPU runs, but not for this table: torchrec's planner failed with a RuntimeError
    (ShardingConfig(sharding_types=["data_parallel", "row_wise"], frozen_tables=["t_item_id"]),
     "frozen table 't_item_id' (the 'fused' kernel, never data_parallel): no allowed sharding type runs on cpu "
     "with an allowed compute kernel (sharding types ['row_wise'], compute kernels ['fused'])"),
    (ShardingConfig(table_constraints={"t_user_id": {"sharding_types": ["table_wise"], "compute_kernels": ["dense"]}}),
     "table 't_user_id': no allowed sharding type runs on cpu with an allowed compute kernel (sharding types "
     "['table_wise'], compute kernels ['dense']); data_parallel runs only the 'dense' kernel"),
])
@pytest.mark.multiprocess
def test_a_plan_the_cpu_cannot_run_is_named(synthetic_dir: str, sharding: ShardingConfig, message: str) -> None:
    (error,) = run_multiprocess(_shard_with, world_size=1, schema_path=synthetic_dir, sharding=sharding)
    assert message in error


def test_dense_tensors_off_the_ranks_device_are_named() -> None:
    """One rank has no DDP to move dense modules: a term left on CPU would meet CUDA inputs (meta
    stands for the GPU here; EBC tables, which DMP places itself, are not named)."""
    from recsys_llm.train.sharding import dense_tensors_elsewhere

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("age", "dense")])
    task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], schema, device=torch.device("meta"),
                                  dense_device=torch.device("meta")))
    assert dense_tensors_elsewhere(task, torch.device("meta")) == []
    task.extra_head = torch.nn.Linear(2, 1)  # built on CPU
    assert dense_tensors_elsewhere(task, torch.device("meta")) == ["extra_head.weight", "extra_head.bias"]
    assert dense_tensors_elsewhere(task, torch.device("cpu")) == []


class _WideTables(torch.nn.Module):
    """One table wider than FBGEMM's CUDA kernels take (an LLM's hidden width) and one narrow."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_item_vector", embedding_dim=4096, num_embeddings=1000, feature_names=["item"]),
            EmbeddingBagConfig(name="t_user", embedding_dim=16, num_embeddings=1000, feature_names=["user"]),
        ], device=torch.device("meta"))


def test_on_cuda_a_table_wider_than_fbgemm_takes_is_split_by_columns() -> None:
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.sharding_plan import get_default_sharders

    from recsys_llm.train.sharding_config import FBGEMM_CUDA_MAX_DIM

    model = _WideTables()
    assert build_constraints(model, ShardingConfig(), "cpu") == {}  # no limit on CPU
    constraints = build_constraints(model, ShardingConfig(), "cuda")
    assert set(constraints) == {"t_item_vector"}
    assert constraints["t_item_vector"].sharding_types == ["column_wise", "table_column_wise"]
    narrowed = build_constraints(model, ShardingConfig(sharding_types=["table_wise", "column_wise"]), "cuda")
    assert narrowed["t_item_vector"].sharding_types == ["column_wise"]
    assert narrowed["t_user"].sharding_types == ["table_wise", "column_wise"]
    with pytest.raises(ValueError, match=r"table 't_item_vector' is 4096 wide, and FBGEMM's CUDA kernels take at most "
                                         r"2048 columns: allow a column-wise type for it \(sharding.table_constraints."
                                         r"t_item_vector.sharding_types=\[column_wise\]\)"):
        build_constraints(model, ShardingConfig(sharding_types=["table_wise"]), "cuda")
    # the CUDA plan (planned here without a GPU) splits the table into shards the kernels take
    planner = EmbeddingShardingPlanner(topology=build_topology(2, "cuda"), constraints=constraints)
    plan = planner.plan(model, get_default_sharders())
    shards = plan.plan["ebc"]["t_item_vector"].sharding_spec.shards
    assert len(shards) > 1 and max(shard.shard_sizes[1] for shard in shards) <= FBGEMM_CUDA_MAX_DIM


def test_on_cuda_a_table_as_wide_as_fbgemm_takes_is_left_to_the_planner() -> None:
    from recsys_llm.train.sharding_config import FBGEMM_CUDA_MAX_DIM

    model = _WideTables()
    model.ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_item_vector", embedding_dim=FBGEMM_CUDA_MAX_DIM, num_embeddings=1000, feature_names=["item"])],
        device=torch.device("meta"))
    assert build_constraints(model, ShardingConfig(), "cuda") == {}


@pytest.mark.parametrize("compute_device, hbm_cap, local_world_size", [("cpu", None, None), ("cuda", 80 * 1024**3, 2)])
def test_build_topology_is_the_factory_s_and_matches_a_direct_one(
    caplog: pytest.LogCaptureFixture, compute_device: str, hbm_cap: Any, local_world_size: Any,
) -> None:
    """``shard_model``'s topology comes from ``TopologyFactory`` (a direct ``Topology(...)`` logs
    "The topology was constructed directly ... otherwise, the job will fail" to a library user),
    with the same devices, capacities and bandwidths as the direct one."""
    from torchrec.distributed.planner import Topology

    with caplog.at_level(logging.WARNING):
        topology = build_topology(4, compute_device, hbm_cap=hbm_cap, local_world_size=local_world_size)
    assert not [r for r in caplog.records if "constructed directly" in r.getMessage()]
    direct = Topology(world_size=4, compute_device=compute_device, hbm_cap=hbm_cap, local_world_size=local_world_size)
    assert topology.world_size == 4 and topology.compute_device == compute_device
    assert topology.local_world_size == direct.local_world_size
    assert [d.storage for d in topology.devices] == [d.storage for d in direct.devices]
    assert topology.hbm_mem_bw == direct.hbm_mem_bw and topology.ddr_mem_bw == direct.ddr_mem_bw
    assert topology.intra_host_bw == direct.intra_host_bw and topology.inter_host_bw == direct.inter_host_bw


def _split_changes(schema_path: str, out_dir: str) -> Dict[str, Any]:
    """A table-wise plan's record against a column-wise plan of the same wide tables, as a resume compares them."""
    import json
    import os

    from recsys_llm.train.config import ConfigError
    from recsys_llm.train.resume import check_same_table_state_layout
    from recsys_llm.train.plan_report import describe_plan

    ctx = init_distributed("cpu")
    schema = DatasetSchema.load(schema_path)
    wide = dataclasses.replace(SMOKE_CONFIGS["fm"], embedding_dim=256)  # two column shards (torchrec splits by 128)

    def plan_with(kind: str) -> Any:
        task = CTRTask(build_backbone(wide, schema, device=torch.device("meta")))
        sharding = ShardingConfig(sharding_types=["table_wise", "column_wise"],
                                  table_constraints={"t_user_id": {"sharding_types": [kind]}})
        return shard_model(task, ctx.device, ctx.world_size, sharding, OptimizerConfig(), batch_size=64)[1]

    table_wise, column_wise = plan_with("table_wise"), plan_with("column_wise")
    saved = os.path.join(out_dir, "sharding_plan.json")  # the test's tmp_path: nothing left in the system's /tmp
    with open(saved, "w", encoding="utf-8") as handle:
        handle.write(describe_plan(table_wise))
    outcome: Dict[str, Any] = {"same": None, "adagrad": None}
    check_same_table_state_layout(saved, table_wise, "row_wise_adagrad")  # the same split resumes
    check_same_table_state_layout(saved, column_wise, "adagrad")  # element-wise state reshards like the table
    try:
        check_same_table_state_layout(saved, column_wise, "row_wise_adagrad")
    except ConfigError as error:
        outcome["refused"] = str(error)
    # a frozen table keeps no state: the resume checks the others alone (runner passes stateful_tables)
    check_same_table_state_layout(saved, column_wise, "row_wise_adagrad", tables=["t_item_id"])
    outcome["record"] = {t: p["sharding_type"] for t, p in json.loads(describe_plan(column_wise)).items()}
    replicated = plan_with("data_parallel")
    check_same_table_state_layout(saved, replicated, "sgd")  # SGD keeps no state: any placement loads
    for optimizer in ("adagrad", "row_wise_adagrad"):
        try:
            check_same_table_state_layout(saved, replicated, optimizer)
        except ConfigError as error:
            outcome[f"replicated {optimizer}"] = str(error)
    return outcome


@pytest.mark.multiprocess
def test_a_resume_whose_plan_splits_a_tables_columns_otherwise_is_refused_naming_the_table(synthetic_dir: str,
                                                                                          tmp_path) -> None:
    """row_wise_adagrad keeps one value per row of each column shard: DCP failed to load it into another split with
    "a checkpoint of another model or code version (Size mismatch ...)", where only the plan had changed (another
    world size or device: on CUDA a table wider than FBGEMM's kernels take is always column-wise)."""
    outcome, = run_multiprocess(_split_changes, world_size=1, schema_path=synthetic_dir, out_dir=str(tmp_path))
    assert outcome["record"]["t_user_id"] == "column_wise"
    message = outcome["refused"]
    assert "'t_user_id' 1 (table_wise) -> 2 (column_wise) column shards" in message, message
    assert "t_item_id" not in message and "row_wise_adagrad" in message
    assert "resume on the world size and device the run was saved on" in message
    assert "sharding.proposer_patience=0" in message  # what planned the runs saved before the patience
    for optimizer in ("adagrad", "row_wise_adagrad"):  # a table replicated in one plan, sharded in the other
        message = outcome[f"replicated {optimizer}"]
        assert "'t_user_id' table_wise -> data_parallel" in message and optimizer in message, message
        assert "t_item_id" not in message


class _BigTable(torch.nn.Module):
    """One table of 4M x 16 float32 (256 MB), on meta: the planner sizes it without it being allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="big", embedding_dim=16, num_embeddings=4_000_000, feature_names=["big"])],
            device=torch.device("meta"))

    def forward(self, batch):  # noqa: ANN001, ANN201
        return self.ebc(batch)


def _planned_on_a_small_host(host_bytes: int = 64 * 2**20) -> str:
    from recsys_llm.train import planner_inputs

    ctx = init_distributed("cpu")
    planner_inputs.host_memory = lambda: host_bytes  # a host of 64 MB by default
    try:
        shard_model(_BigTable(), ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=8)
    except ValueError as error:
        return str(error)
    return "planned"


@pytest.mark.multiprocess
def test_tables_larger_than_the_hosts_memory_are_refused_by_the_planner_naming_them() -> None:
    """On CPU the planner took torchrec's 128 GB per rank, whatever the host had: a table larger than the host
    planned, and the run died allocating it; one over 128 GB failed with the planner's traceback."""
    (message,) = run_multiprocess(_planned_on_a_small_host, world_size=1)
    assert re.match(r"sharding: the planner found no room for the tables on 1 rank\(s\) of 0\.1 GiB host memory "
                    r"each \(the tables' weights 0\.24 GiB in all, before optimizer state; the largest: big 0\.24 "
                    r"GiB; the planner's totals: Storage\(hbm = 0\.0 GB, ddr = 0\.06\d* GB\) available to the tables "
                    r"after its reserve, Storage\(hbm = 0\.0 GB, ddr = 0\.2\d* GB\) needed with optimizer state and "
                    r"lookup buffers\); "
                    r"use more hosts", message), message


def _planner_refusing_the_settings() -> Any:
    """shard_model whose planner refuses with another error than no room (as for constraints no plan meets)."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import PlannerError, PlannerErrorType

    def refuse(self, module, sharders):
        raise PlannerError("Unable to find a plan for the model", PlannerErrorType.OTHER)

    ctx = init_distributed("cpu")
    EmbeddingShardingPlanner.plan = refuse
    try:
        shard_model(_BigTable(), ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=8)
    except ValueError as error:
        return str(error), type(error.__cause__).__name__
    return "planned"


@pytest.mark.multiprocess
def test_a_planner_refusal_other_than_no_room_is_one_error_naming_the_settings() -> None:
    """torchrec's PlannerError was raised as it came: a traceback, where the user's sharding settings are the cause."""
    (outcome,) = run_multiprocess(_planner_refusing_the_settings, world_size=1)
    assert outcome == ("sharding: torchrec's planner found no plan (other): Unable to find a plan for the model; "
                       "change sharding.sharding_types, sharding.compute_kernels or sharding.table_constraints",
                       "PlannerError"), outcome


def _host_memory_asked() -> List[Any]:
    from recsys_llm.train import sharding

    ctx = init_distributed("cpu")
    asked = []
    planner_host_memory = sharding.planner_host_memory

    def recorded(compute_device, local_world_size):
        asked.append((compute_device, local_world_size))
        return planner_host_memory(compute_device, local_world_size)

    sharding.planner_host_memory = recorded
    shard_model(_WideTable(16), ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=8)
    return asked


@pytest.mark.multiprocess
def test_shard_model_asks_the_planners_host_memory_for_the_ranks_of_its_host() -> None:
    """The host's memory is shared by its ranks (torchrun's LOCAL_WORLD_SIZE): a share of one rank gave each of
    8 GPUs the whole host for unified-memory tables."""
    assert run_multiprocess(_host_memory_asked, world_size=2) == [[("cpu", 2)], [("cpu", 2)]]


class _WideTable(torch.nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            [EmbeddingBagConfig(name="wide", embedding_dim=width, num_embeddings=1000, feature_names=["wide"])],
            device=torch.device("meta"))


@pytest.mark.parametrize("sharding_type, width, refused", [
    ("column_wise", 2053, True), ("column_wise", 4096, False), ("column_wise", 2000, False),
    ("table_wise", 2048, False), ("table_wise", 2049, True),  # one shard, the whole table: at FBGEMM's limit
])
def test_a_cuda_plan_with_a_shard_wider_than_fbgemm_takes_is_refused(sharding_type: str, width: int,
                                                                     refused: bool) -> None:
    """Planned for CUDA (no GPU needed to plan): a 2,053-wide table allowed only column-wise stays one shard, as
    torchrec splits columns into equal shards dividing the width; FBGEMM failed on it inside its kernels."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import ParameterConstraints

    from recsys_llm.train.planner_inputs import build_topology
    from recsys_llm.train.sharding import check_shard_widths

    constraints = {"wide": ParameterConstraints(sharding_types=[sharding_type])}
    planner = EmbeddingShardingPlanner(topology=build_topology(2, "cuda", hbm_cap=80 << 30), batch_size=256,
                                       constraints=constraints)
    plan = planner.plan(_WideTable(width), [EmbeddingBagCollectionSharder()])
    if refused:
        with pytest.raises(ValueError,
                           match=rf"^table 'wide': the plan gives it shards \[{width}\] wide \({sharding_type}\)"):
            check_shard_widths(plan)
    else:
        check_shard_widths(plan)


@pytest.mark.multiprocess
def test_on_two_ranks_a_table_that_fits_one_rank_plans_and_one_that_fits_none_is_refused() -> None:
    """A table up to 128 columns wide is never split on CPU: each rank may take the whole host (a host's memory
    divided by its ranks refused a table one rank could hold), and a table no rank can hold is the planner's
    'strict constraints ... does not fit on any rank', which was its traceback."""
    fits = run_multiprocess(_planned_on_a_small_host, world_size=2, host_bytes=2**30)
    assert fits == ["planned", "planned"], fits
    refused = run_multiprocess(_planned_on_a_small_host, world_size=2)
    for message in refused:
        assert message.startswith("sharding: the planner found no room for the tables on 2 rank(s) of 0.1 GiB host "
                                  "memory each"), refused
    # 200 MB a rank: the ranks together could hold the 0.24 GiB table, neither alone; torchrec refuses that under
    # strict constraints ('does not fit on any rank'), not as short storage
    strict = run_multiprocess(_planned_on_a_small_host, world_size=2, host_bytes=200 * 2**20)
    for message in strict:
        assert message.startswith("sharding: the planner found no room for the tables on 2 rank(s) of 0.2 GiB"), strict


def _cuda_plan_of_a_wide_table(width: int) -> str:
    from types import SimpleNamespace

    ctx = init_distributed("cpu")
    # the plan is made for an 80 GB GPU, which this host need not have: shard_model refuses before DMP places anything
    torch.cuda.get_device_properties = lambda device: SimpleNamespace(total_memory=80 << 30)
    constraints = {"wide": {"sharding_types": ["column_wise"]}}
    try:
        shard_model(_WideTable(width), torch.device("cuda"), ctx.world_size,
                    ShardingConfig(table_constraints=constraints), OptimizerConfig(), batch_size=8)
    except ValueError as error:
        return str(error)
    return "planned"


@pytest.mark.multiprocess
def test_shard_model_checks_the_shard_widths_of_a_cuda_plan() -> None:
    (message,) = run_multiprocess(_cuda_plan_of_a_wide_table, world_size=1, width=2053)
    assert message.startswith("table 'wide': the plan gives it shards [2053] wide (column_wise)"), message


def test_a_plan_loadable_on_cpu_keeps_only_what_cpu_plans_take_table_by_table() -> None:
    from recsys_llm.train.sharding_config import loadable_on_cpu

    gpu_only = ShardingConfig(table_constraints={"t": {"sharding_types": ["row_wise", "table_wise"],
                                                       "compute_kernels": ["fused_uvm", "fused"]}},
                              compute_device="cuda")
    on_cpu = loadable_on_cpu(gpu_only)
    assert on_cpu.table_constraints == {"t": {"sharding_types": ["table_wise"], "compute_kernels": ["fused"]}}
    assert on_cpu.compute_device == "auto"
    # the kernels' settings stay the run's own (the CPU kernels take the bounds checks and ignore the cache size)
    fused = FusedParamsConfig(cache_load_factor=0.1, stochastic_rounding=False, bounds_check_mode="fatal")
    assert loadable_on_cpu(dataclasses.replace(gpu_only, fused_params=fused)).fused_params == fused
    own = {"t": {"compute_kernels": ["fused_uvm_caching"], "fused_params": {"cache_load_factor": 0.05}}}
    assert loadable_on_cpu(ShardingConfig(table_constraints=own)).table_constraints == {
        "t": {"compute_kernels": [], "fused_params": FusedParamsConfig(cache_load_factor=0.05)}}


@pytest.mark.parametrize("limit, expected", [("1048576\n", 1048576), ("max\n", None), ("{physical_times_4}", None)])
def test_host_memory_is_the_cgroup_limit_where_lower_than_the_hosts(tmp_path, monkeypatch, limit: str,
                                                                    expected: Any) -> None:
    """A container's limit (cgroup v2 ``memory.max``, v1 ``memory.limit_in_bytes``) where it is below the host's
    memory; ``max`` (none) and a limit above the host's leave the host's."""
    import os

    from recsys_llm import host_memory

    physical = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    limit_file = tmp_path / "memory.limit_in_bytes"
    limit_file.write_text(limit.format(physical_times_4=physical * 4))
    monkeypatch.setattr(host_memory, "CGROUP_MEMORY_LIMITS", (str(tmp_path / "absent"), str(limit_file)))
    assert host_memory.host_memory() == (physical if expected is None else expected)


def test_gpu_ranks_plan_unified_memory_tables_in_their_share_of_the_host(monkeypatch) -> None:
    """On CUDA the planner's default host memory (128 GB per rank) let an 8-GPU host plan 1 TB of fused_uvm
    tables, which failed only when DMP allocated them; on CPU each rank may take the whole host."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.constants import BATCH_SIZE
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError

    from recsys_llm.train import planner_inputs

    monkeypatch.setattr(planner_inputs, "host_memory", lambda: 64 * 2**30)
    assert planner_inputs.planner_host_memory("cuda", 8) == 8 * 2**30
    assert planner_inputs.planner_host_memory("cpu", 8) == 64 * 2**30
    monkeypatch.setattr(planner_inputs, "host_memory", lambda: None)  # a host that does not say: torchrec's default
    assert planner_inputs.planner_host_memory("cuda", 8) is None
    # an 82 GB unified-memory table, row-wise on 8 GPUs: 10 GB a rank, more than an 8 GB share of a 64 GB host
    table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=160_000_000, feature_names=["f"])
    ebc = EmbeddingBagCollection(tables=[table], device=torch.device("meta"))
    constraints = {"t": ParameterConstraints(sharding_types=["row_wise"], compute_kernels=["fused_uvm"])}
    for share, plans in ((8 * 2**30, False), (64 * 2**30, True)):
        topology = planner_inputs.build_topology(8, "cuda", hbm_cap=2**30, local_world_size=8, ddr_cap=share)
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=BATCH_SIZE, constraints=constraints)
        try:
            planner.plan(ebc, [EmbeddingBagCollectionSharder()])
            planned = True
        except PlannerError:
            planned = False
        assert planned is plans, share


def test_the_plan_line_counts_tables_by_sharding_type_and_their_weights() -> None:
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.types import ParameterConstraints

    from recsys_llm.train.plan_report import plan_line

    planner = EmbeddingShardingPlanner(topology=build_topology(2, "cuda", hbm_cap=80 << 30), batch_size=256,
                                       constraints={"wide": ParameterConstraints(sharding_types=["column_wise"])})
    plan = planner.plan(_WideTable(512), [EmbeddingBagCollectionSharder()])
    assert plan_line(plan, 2, "runs/x/sharding_plan.json") == (
        "sharding: 1 table(s) over 2 rank(s) (1 column-wise; 512,000 weights in shards); the plan: "
        "runs/x/sharding_plan.json")
    # billions of weights (it said "20480.0 M")
    table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=160_000_000, feature_names=["f"])
    planner = EmbeddingShardingPlanner(topology=build_topology(8, "cuda", hbm_cap=80 << 30), batch_size=256,
                                       constraints={"t": ParameterConstraints(sharding_types=["row_wise"])})
    plan = planner.plan(EmbeddingBagCollection(tables=[table], device=torch.device("meta")),
                        [EmbeddingBagCollectionSharder()])
    assert plan_line(plan, 8, "p.json") == "sharding: 1 table(s) over 8 rank(s) (1 row-wise; 20.5 B weights in " \
                                           "shards); the plan: p.json"
    from recsys_llm.train.plan_report import weights_text

    assert [weights_text(n) for n in (999_999, 10**6, 10**9)] == ["999,999", "1.0 M", "1.0 B"]
    from recsys_llm.train.qcomms import QCommsSettings, comms_text

    quantized = QCommsSettings(forward_precision="fp16", backward_precision="bf16")
    assert plan_line(plan, 8, "p.json", comms_text(quantized, 8)) == (
        "sharding: 1 table(s) over 8 rank(s) (1 row-wise; 20.5 B weights in shards; embeddings sent in fp16, their "
        "gradients in bf16); the plan: p.json")
    assert comms_text(quantized, 1) == "" and comms_text(QCommsSettings(), 8) == ""


class _ManyTables(torch.nn.Module):
    """``count`` tables of 10 to 10^7 rows and 16 / 32 / 64 columns (drawn with ``seed``), on meta."""

    def __init__(self, count: int, seed: int = 0) -> None:
        super().__init__()
        import random

        draw = random.Random(seed)
        self.ebc = EmbeddingBagCollection([
            EmbeddingBagConfig(name=f"t{k}", embedding_dim=draw.choice([16, 32, 64]),
                               num_embeddings=int(10 ** draw.uniform(1, 7)), feature_names=[f"f{k}"])
            for k in range(count)], device=torch.device("meta"))


@pytest.mark.parametrize("world_size, device, hbm_gib", [(2, "cpu", None), (8, "cuda", 80), (8, "cuda", 1.6)])
def test_patient_proposers_find_the_exhaustive_plan_in_fewer_proposals(world_size: int, device: str,
                                                                       hbm_gib: float) -> None:
    """torchrec's greedy proposers try every option of every table: planning grew with the square of the table
    count (500 tables: 92 s on one core, before the first step). With a patience of 10 they stop early."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.perf_models import NoopPerfModel

    from recsys_llm.train.planner_inputs import planner_proposers
    from recsys_llm.train.sharding_config import DEFAULT_PROPOSER_PATIENCE

    topology = build_topology(world_size, device, hbm_cap=int(hbm_gib * 2**30) if hbm_gib else None,
                              local_world_size=world_size)
    found = {}
    for patience in (0, DEFAULT_PROPOSER_PATIENCE):
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=4096, proposer=planner_proposers(patience))
        plan = planner.plan(_ManyTables(60), [EmbeddingBagCollectionSharder()])
        found[patience] = (planner._num_proposals, NoopPerfModel(topology).rate(planner._best_plan), plan)
    assert found[DEFAULT_PROPOSER_PATIENCE][0] * 4 < found[0][0], found
    assert found[DEFAULT_PROPOSER_PATIENCE][1] == pytest.approx(found[0][1], rel=1e-9)
    assert str(found[DEFAULT_PROPOSER_PATIENCE][2]) == str(found[0][2])


def test_shard_model_plans_with_the_configured_patience(monkeypatch, synthetic_schema: DatasetSchema) -> None:
    with pytest.raises(ValueError, match=r"sharding.proposer_patience"):
        ShardingConfig(proposer_patience=-1)
    from recsys_llm.train import sharding

    asked = []
    original = sharding.planner_proposers
    monkeypatch.setattr(sharding, "planner_proposers", lambda patience: asked.append(patience) or original(patience))
    init_distributed()
    task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
    shard_model(task, torch.device("cpu"), 1, ShardingConfig(proposer_patience=3), OptimizerConfig(), batch_size=8)
    assert asked == [3]


def test_planner_proposers_are_torchrecs_own_with_the_greedy_ones_patient() -> None:
    """The same proposers, in the same order, as the planner builds without ``proposer=`` (grid search finds the
    best plan of few tables, uniform the all-of-one-type plans); patience 0 leaves the greedy ones exhaustive."""
    from torchrec.distributed.planner import EmbeddingShardingPlanner

    from recsys_llm.train.planner_inputs import planner_proposers

    default = EmbeddingShardingPlanner(topology=build_topology(1, "cpu"))._proposers
    for patience, threshold in ((0, None), (7, 7)):
        proposers = planner_proposers(patience)
        assert [type(p) for p in proposers] == [type(p) for p in default]
        assert [(p._use_depth, p._threshold) for p in proposers[1:3]] == [(True, threshold), (False, threshold)]


class _Tables(torch.nn.Module):
    """An EBC alone, its pooled embeddings the output."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.ebc = ebc

    def forward(self, features: KeyedJaggedTensor) -> Any:
        return self.ebc(features)


class TestFusedParams:
    """``sharding.fused_params``: FBGEMM kernel settings that reach the plan, the planner's sizes and the kernels."""

    def test_settings_reach_every_tables_fbgemm_kernel(self, synthetic_schema: DatasetSchema) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        def kernels(fused: FusedParamsConfig) -> Dict[str, Any]:
            init_distributed()
            task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
            sharding = ShardingConfig(sharding_types=["table_wise"], fused_params=fused)
            model, plan = shard_model(task, torch.device("cpu"), 1, sharding, OptimizerConfig(), batch_size=8)
            found = [kernel.emb_module for _, kernel in embedding_kernels(model)]
            assert found
            return {"plan": plan, "rounding": {m.stochastic_rounding for m in found},
                    "bounds": {BoundsCheckMode(m.bounds_check_mode_int) for m in found}}

        default = kernels(FusedParamsConfig())
        assert default["rounding"] == {True} and default["bounds"] == {BoundsCheckMode.WARNING}  # FBGEMM's own
        assert all(p.stochastic_rounding is None for m in default["plan"].plan.values() for p in m.values())
        chosen = kernels(FusedParamsConfig(stochastic_rounding=False, bounds_check_mode="fatal", cache_load_factor=0.5))
        assert chosen["rounding"] == {False} and chosen["bounds"] == {BoundsCheckMode.FATAL}
        shardings = [p for module in chosen["plan"].plan.values() for p in module.values()]
        assert shardings and all(p.cache_params.load_factor == 0.5 and p.stochastic_rounding is False
                                 and p.bounds_check_mode == BoundsCheckMode.FATAL for p in shardings)

    def test_fatal_bounds_checks_stop_an_id_outside_its_table(self) -> None:
        init_distributed()
        table = EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=10, feature_names=["f"])
        for mode, raises in (("", False), ("fatal", True)):
            # FBGEMM's warning mode rewrites an id outside the table to 0 in the batch itself: a fresh batch each time
            outside = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([3, 10]),
                                                          lengths=torch.tensor([1, 1]))
            task = _Tables(EmbeddingBagCollection(tables=[table], device=torch.device("meta")))
            sharding = ShardingConfig(sharding_types=["table_wise"],
                                      fused_params=FusedParamsConfig(bounds_check_mode=mode))
            model, _ = shard_model(task, torch.device("cpu"), 1, sharding, OptimizerConfig(), batch_size=2)
            if raises:
                with pytest.raises(RuntimeError, match="idx < num_rows"):
                    model(outside).values()  # the lookup runs when the output is read
            else:
                assert model(outside).values().shape == (2, 8)  # FBGEMM's default looks up row 0 instead

    def test_a_smaller_uvm_cache_plans_a_table_the_default_cache_does_not_fit(self) -> None:
        """On CUDA (planned here without a GPU) a ``fused_uvm_caching`` table takes GPU memory for its cache:
        torchrec's default of a fifth of a 4 GB table does not fit in 0.5 GB, a twentieth does."""
        from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
        from torchrec.distributed.planner import EmbeddingShardingPlanner
        from torchrec.distributed.planner.types import PlannerError

        table = EmbeddingBagConfig(name="t", embedding_dim=128, num_embeddings=8_000_000, feature_names=["f"])
        model = _Tables(EmbeddingBagCollection(tables=[table], device=torch.device("meta")))

        def plan(cache_load_factor: float) -> Any:
            sharding = ShardingConfig(sharding_types=["table_wise"], compute_kernels=["fused_uvm_caching"],
                                      fused_params=FusedParamsConfig(cache_load_factor=cache_load_factor))
            planner = EmbeddingShardingPlanner(topology=build_topology(1, "cuda", hbm_cap=2**29), batch_size=512,
                                               constraints=build_constraints(model, sharding, "cuda"))
            return planner.plan(model, [EmbeddingBagCollectionSharder()])

        with pytest.raises(PlannerError, match="insufficient storage"):
            plan(0.0)
        assert plan(0.05).plan["ebc"]["t"].cache_params.load_factor == 0.05

    def test_every_table_gets_them_beside_its_frozen_and_wide_table_constraints(self, synthetic_schema: DatasetSchema
                                                                                  ) -> None:
        """A table with no other constraint gets one of its own for the settings (torchrec's ``fused_params``
        reach a table only through its constraint); a frozen table keeps its 'fused' kernel and a table wider than
        FBGEMM's CUDA kernels its column-wise types, each with the settings too."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        fused = FusedParamsConfig(cache_load_factor=0.1, stochastic_rounding=False, bounds_check_mode="fatal")

        def with_settings(constraints: Dict[str, Any]) -> bool:
            return all(c.cache_params.load_factor == 0.1 and c.stochastic_rounding is False
                       and c.bounds_check_mode == BoundsCheckMode.FATAL for c in constraints.values())

        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        constraints = build_constraints(task, ShardingConfig(frozen_tables=["t_item_id"], fused_params=fused))
        assert set(constraints) == set(find_tables(task)) and with_settings(constraints)
        assert constraints["t_item_id"].compute_kernels == ["fused"]
        assert "data_parallel" not in constraints["t_item_id"].sharding_types
        assert all(c.sharding_types is None and c.compute_kernels is None
                   for name, c in constraints.items() if name != "t_item_id")  # the planner's choice, as without
        wide = build_constraints(_WideTables(), ShardingConfig(fused_params=fused), "cuda")
        assert set(wide) == {"t_item_vector", "t_user"} and with_settings(wide)
        assert wide["t_item_vector"].sharding_types == ["column_wise", "table_column_wise"]
        assert wide["t_item_vector"].cache_params is not wide["t_user"].cache_params  # one CacheParams per table

    def test_a_tables_own_settings_replace_the_global_ones_for_that_table_alone(self, synthetic_schema: DatasetSchema
                                                                               ) -> None:
        """``sharding.table_constraints.<table>.fused_params``: torchrec's per-table ``ParameterConstraints``; each
        setting a table's block sets replaces the global one for that table, one it leaves at its default keeps the
        global one, and the other tables keep the global ones."""
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        def settings(constraint: Any) -> Any:
            cache = constraint.cache_params.load_factor if constraint.cache_params else None
            return cache, constraint.stochastic_rounding, constraint.bounds_check_mode

        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        glob = FusedParamsConfig(cache_load_factor=0.2, stochastic_rounding=False, bounds_check_mode="fatal")
        own = {"t_item_id": {"fused_params": {"cache_load_factor": 0.05, "stochastic_rounding": True,
                                              "bounds_check_mode": "none"}},
               "t_user_id": {"sharding_types": ["table_wise"], "fused_params": {"bounds_check_mode": "ignore"}}}
        constraints = build_constraints(task, ShardingConfig(fused_params=glob, table_constraints=own))
        assert settings(constraints["t_item_id"]) == (0.05, True, BoundsCheckMode.NONE)
        assert settings(constraints["t_user_id"]) == (0.2, False, BoundsCheckMode.IGNORE)
        assert constraints["t_user_id"].sharding_types == ["table_wise"]
        others = [name for name in find_tables(task) if name not in own]
        assert others and all(settings(constraints[name]) == (0.2, False, BoundsCheckMode.FATAL) for name in others)
        # without global settings only the table with its own has a constraint (the others: the planner's defaults)
        alone = build_constraints(task, ShardingConfig(table_constraints={"t_item_id": own["t_item_id"]}))
        assert set(alone) == {"t_item_id"} and settings(alone["t_item_id"]) == (0.05, True, BoundsCheckMode.NONE)

    def test_a_tables_own_settings_reach_the_plan_and_its_fbgemm_kernel(self, synthetic_schema: DatasetSchema
                                                                        ) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        init_distributed()
        task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
        own = {"t_item_id": {"fused_params": {"stochastic_rounding": False, "bounds_check_mode": "fatal",
                                              "cache_load_factor": 0.5}}}
        sharding = ShardingConfig(sharding_types=["table_wise"], table_constraints=own)
        model, plan = shard_model(task, torch.device("cpu"), 1, sharding, OptimizerConfig(), batch_size=8)
        shardings = {name: p for module in plan.plan.values() for name, p in module.items()}
        assert shardings["t_item_id"].cache_params.load_factor == 0.5
        assert shardings["t_item_id"].stochastic_rounding is False
        assert shardings["t_item_id"].bounds_check_mode == BoundsCheckMode.FATAL
        others = [p for name, p in shardings.items() if name != "t_item_id"]
        assert others and all(p.cache_params is None and p.stochastic_rounding is None
                              and p.bounds_check_mode is None for p in others)
        kernels = {name: kernel.emb_module for _, kernel in embedding_kernels(model)
                   for name in (config.name for config in kernel.config.embedding_tables)}
        assert BoundsCheckMode(kernels["t_item_id"].bounds_check_mode_int) == BoundsCheckMode.FATAL
        assert kernels["t_item_id"].stochastic_rounding is False
        assert all(BoundsCheckMode(kernels[name].bounds_check_mode_int) == BoundsCheckMode.WARNING
                   and kernels[name].stochastic_rounding is True for name in shardings if name != "t_item_id")

    def test_a_tables_own_settings_are_checked_naming_their_full_key(self) -> None:
        key = r"sharding\.table_constraints\.t_item_id\.fused_params"
        for settings, message in (
                ({"cache_load_factor": 1}, rf"^{key}\.cache_load_factor must be a finite number >= 0 and < 1, got 1"),
                ({"bounds_check_mode": "strict"}, rf"^{key}\.bounds_check_mode must be '' \(FBGEMM's default\)"),
                ({"stochastic_rounding": "maybe"}, rf"^{key}\.stochastic_rounding: expected true/false, got 'maybe'"),
                ({"cache_size": 0.1}, rf"^{key}: unknown keys \['cache_size'\]; allowed: \['bounds_check_mode', "
                                      r"'cache_load_factor', 'stochastic_rounding'\]"),
                (0.1, rf"^{key}: expected a mapping, got 0.1")):
            with pytest.raises(ValueError, match=message):
                ShardingConfig(table_constraints={"t_item_id": {"fused_params": settings}})
        with pytest.raises(ValueError, match=r"^sharding\.table_constraints\.t_item_id: unknown keys \['cache'\]; "
                                             r"allowed: \['compute_kernels', 'fused_params', 'sharding_types'\]"):
            ShardingConfig(table_constraints={"t_item_id": {"cache": {"cache_load_factor": 0.1}}})
        # a table's block that is no mapping is named as such (not read as a set of unknown keys)
        with pytest.raises(ValueError, match=r"^sharding\.table_constraints\.t_item_id: expected a mapping, "
                                             r"got \['table_wise'\]$"):
            ShardingConfig(table_constraints={"t_item_id": ["table_wise"]})
        parsed = ShardingConfig(table_constraints={"t": {"fused_params": {"stochastic_rounding": "false"},
                                                         "sharding_types": "table_wise"}})
        assert parsed.table_constraints == {"t": {"fused_params": FusedParamsConfig(stochastic_rounding=False),
                                                  "sharding_types": ["table_wise"]}}

    def test_global_settings_given_as_a_mapping_in_python_are_held_as_a_fused_params_config(self) -> None:
        """A config built in Python may give ``fused_params`` as a mapping, as a table's own may be: it is checked
        and held as a ``FusedParamsConfig``, which a table's own settings fall back to."""
        sharding = ShardingConfig(fused_params={"bounds_check_mode": "fatal", "stochastic_rounding": False},
                                  table_constraints={"t": {"fused_params": {"cache_load_factor": 0.05}}})
        assert sharding.fused_params == FusedParamsConfig(stochastic_rounding=False, bounds_check_mode="fatal")
        assert sharding.fused_params_of("t") == FusedParamsConfig(cache_load_factor=0.05, stochastic_rounding=False,
                                                                  bounds_check_mode="fatal")
        assert sharding.fused_params_of("u") == sharding.fused_params
        assert ShardingConfig(fused_params=None).fused_params == FusedParamsConfig()
        with pytest.raises(ValueError, match=r"^sharding\.fused_params\.bounds_check_mode must be ''"):
            ShardingConfig(fused_params={"bounds_check_mode": "strict"})
        with pytest.raises(ValueError, match=r"^sharding\.fused_params: unknown keys \['cache'\]"):
            ShardingConfig(fused_params={"cache": 0.1})

    @pytest.mark.parametrize("mode", ["fatal", "warning", "ignore", "none"])
    def test_each_bounds_check_mode_is_fbgemms_of_that_name(self, mode: str) -> None:
        from fbgemm_gpu.split_table_batched_embeddings_ops_common import BoundsCheckMode

        assert FusedParamsConfig(bounds_check_mode=mode).constraint_kwargs() == {
            "bounds_check_mode": BoundsCheckMode[mode.upper()]}

    def test_settings_are_checked(self) -> None:

        with pytest.raises(ValueError, match=r"sharding.fused_params.cache_load_factor must be a finite number >= 0 "
                                             r"and < 1, got 1"):
            FusedParamsConfig(cache_load_factor=1)
        with pytest.raises(ValueError, match=r"bounds_check_mode must be '' \(FBGEMM's default\) or one of \['fatal', "
                                             r"'warning', 'ignore', 'none'\], got 'strict'"):
            FusedParamsConfig(bounds_check_mode="strict")
        assert FusedParamsConfig().constraint_kwargs() == {}


def test_the_storage_reservation_is_the_share_of_memory_the_planner_keeps_free(monkeypatch,
                                                                               synthetic_schema: DatasetSchema) -> None:
    """torchrec's planner keeps 15% of each GPU's memory free beyond its estimates; a table that fits the rest
    is planned with less reserved and refused with more (``sharding.storage_reservation``)."""
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.planner import EmbeddingShardingPlanner
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.planner.types import ParameterConstraints, PlannerError

    from recsys_llm.train import sharding

    with pytest.raises(ValueError, match=r"sharding.storage_reservation"):
        ShardingConfig(storage_reservation=1.0)
    table = torch.nn.ModuleDict({"ebc": EmbeddingBagCollection([EmbeddingBagConfig(
        name="t", embedding_dim=64, num_embeddings=100_000, feature_names=["f"])], device=torch.device("meta"))})
    # planned for one GPU of 40 MB (no GPU needed to plan): the table's 25.6 MB and its optimizer state
    topology = build_topology(1, "cuda", hbm_cap=40 << 20)

    def plan(reserved: float) -> Any:
        planner = EmbeddingShardingPlanner(topology=topology, batch_size=256,
                                           storage_reservation=HeuristicalStorageReservation(percentage=reserved),
                                           constraints={"t": ParameterConstraints(compute_kernels=["fused"])})
        return planner.plan(table, [EmbeddingBagCollectionSharder()])

    assert plan(0.15) is not None
    with pytest.raises(PlannerError):
        plan(0.5)
    asked = []
    original = sharding.HeuristicalStorageReservation
    monkeypatch.setattr(sharding, "HeuristicalStorageReservation",
                        lambda percentage: asked.append(percentage) or original(percentage=percentage))
    init_distributed()
    task = CTRTask(build_backbone(SMOKE_CONFIGS["fm"], synthetic_schema, device=torch.device("meta")))
    shard_model(task, torch.device("cpu"), 1, ShardingConfig(storage_reservation=0.3), OptimizerConfig(), batch_size=8)
    assert asked == [0.3]


def test_sharding_config_refuses_a_non_string_plan_file():
    from recsys_llm.train.sharding_config import ShardingConfig

    with pytest.raises(ValueError, match=r"sharding.plan_file: expected a string or None, got True"):
        ShardingConfig(plan_file=True)
    assert ShardingConfig(plan_file=None).plan_file == ""  # off, as its default


def test_the_plan_is_broadcast_on_the_host_group(monkeypatch):
    """Under NCCL broadcast_object_list staged the pickled plan on the GPU: it goes over host_group()'s gloo group."""
    from recsys_llm.train import sharding

    host = object()
    calls = []
    monkeypatch.setattr(sharding, "host_group", lambda: host)
    monkeypatch.setattr(sharding.dist, "get_rank", lambda *args, **kwargs: 0)
    monkeypatch.setattr(sharding.dist, "broadcast_object_list",
                        lambda objects, src=0, group=None, **kwargs: calls.append((src, group)))
    assert sharding._plan_on_rank_0(lambda: "the plan") == ("the plan", None)
    assert calls == [(0, host)]


def test_a_table_matched_by_field_is_compared_with_the_saved_tables_placement_it_takes_state_from(tmp_path) -> None:
    """``check_same_table_state_layout(renamed=...)``: a gain network's ``teacher_user_id`` takes the row-wise Adagrad
    state of the plain run's ``t_user_id``, so their column splits are compared, and the refusal names both tables
    (guards a renamed table skipped as one the saved plan lacks, its state failing to load later)."""
    import json
    from unittest import mock

    from recsys_llm.train.config import ConfigError
    from recsys_llm.train.resume import check_same_table_state_layout

    def placement(kind: str, columns: List[int]) -> Dict[str, Any]:
        return {"sharding_type": kind, "shards": [{"offsets": [0, column], "sizes": [10, 4]} for column in columns]}

    saved = tmp_path / "sharding_plan.json"
    saved.write_text(json.dumps({"t_user_id": placement("table_wise", [0])}), encoding="utf-8")
    now = {"teacher_user_id": placement("column_wise", [0, 4])}
    with mock.patch("recsys_llm.train.resume.table_placements", return_value=now):
        check_same_table_state_layout(str(saved), None, "row_wise_adagrad")  # no state of that name taken
        with pytest.raises(ConfigError, match=r"'teacher_user_id \(from t_user_id\)' 1 \(table_wise\) -> 2 "):
            check_same_table_state_layout(str(saved), None, "row_wise_adagrad", renamed={"teacher_user_id": "t_user_id"})
