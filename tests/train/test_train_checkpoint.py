"""DCP checkpoints: atomic directory protocol, exact continuation, resharding 2 -> 1 rank."""

import dataclasses
import json
import os
import re
import shutil
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional
from unittest import mock

import pytest
import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.data.batch import Batch
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.embedding import embedding_bag_configs
from recsys_llm.train.checkpoint import (
    DIGESTS_FILE,
    TRAIN_STATE_FILE,
    CheckpointManager,
    TrainState,
    is_complete,
    load_checkpoint,
    read_train_state,
)
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import evaluate, train_epoch
from recsys_llm.train.sharding import build_optimizer, embedding_kernels, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess

OPTIM = OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=0.1, dense="adam", dense_lr=0.01)
# a frozen table too: its stateless optimizer keeps an empty state per table, which DCP does not save
SHARDING = ShardingConfig(sharding_types=["table_wise", "row_wise"], frozen_tables=["t_device"])


class _DLRMTask(nn.Module):
    """torchrec's own DLRM, unmodified, in the (loss, (loss, logits, labels)) training shape.

    Dropout on the dense input makes the RNG part of the state a resume must restore.
    """

    def __init__(self, schema: DatasetSchema) -> None:
        super().__init__()
        ebc = EmbeddingBagCollection(embedding_bag_configs(schema, 8), device=torch.device("meta"))
        self.dropout = nn.Dropout(0.2)
        self.dlrm = DLRM(ebc, len(schema.dense_fields), [16, 8], [16, 1])

    def forward(self, batch: Batch):  # noqa: ANN201
        logits = self.dlrm(self.dropout(batch.dense_features), batch.sparse_features).squeeze(-1)  # (B,)
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


# stateless optimizers everywhere (no optimizer state to save at all), tables replicated where
# the planner likes (their unfused table optimizer, DDP gradients)
SGD_OPTIM = OptimizerConfig(sparse="sgd", sparse_lr=0.5, dense="sgd", dense_lr=0.05)
SGD_SHARDING = ShardingConfig(sharding_types=["data_parallel", "table_wise"],
                              table_constraints={"t_user_id": {"sharding_types": ["data_parallel"]}})


def _fresh(schema: DatasetSchema, seed: int, stateless: bool = False, sharding: Optional[ShardingConfig] = None,
           optim: Optional[OptimizerConfig] = None):
    ctx = init_distributed("cpu")
    torch.manual_seed(seed)
    task = _DLRMTask(schema)
    default_optim, default_sharding = (SGD_OPTIM, SGD_SHARDING) if stateless else (OPTIM, SHARDING)
    optim = optim or default_optim
    sharding = sharding or default_sharding
    model, _ = shard_model(task, ctx.device, ctx.world_size, sharding, optim, batch_size=64)
    return ctx, model, build_optimizer(model, optim)


def _losses(model, optimizer, reader, skip: int, stop: int) -> List[float]:
    losses: List[float] = []

    def on_step(step: int, loss: float) -> bool:
        losses.append(loss)
        return step >= stop

    train_epoch(model, optimizer, reader, torch.device("cpu"), skip_batches=skip, on_step=on_step, progress=False)
    return losses


def _save_continue_resume(schema_path: str, ckpt_dir: str, stateless: bool = False,
                          sharding: Optional[ShardingConfig] = None,
                          optim: Optional[OptimizerConfig] = None) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0, stateless=stateless, sharding=sharding, optim=optim)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=5)
    manager = CheckpointManager(ckpt_dir, keep=1)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=5, global_step=5, world_size=ctx.world_size, batch_size=64))
    valid = ParquetBatchReader(schema, "valid", 256, rank=ctx.rank, world_size=ctx.world_size)
    at_save = evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)
    continued = _losses(model, optimizer, reader, skip=5, stop=12)

    # A new model with other initial weights and a perturbed RNG, then the checkpoint.
    _, model2, optimizer2 = _fresh(schema, seed=123, stateless=stateless, sharding=sharding, optim=optim)
    torch.rand(7)
    state = load_checkpoint(manager.latest(), model2, optimizer2)
    resumed = _losses(model2, optimizer2, reader, skip=state.step_in_epoch, stop=12)
    return {"continued": continued, "resumed": resumed, "at_save": at_save, "state": state}


@pytest.mark.multiprocess
def test_resume_restores_the_dense_adam_state_inside_the_gradient_clipping_wrapper(synthetic_dir: str,
                                                                                  tmp_path) -> None:
    """With ``optim.max_grad_norm`` the dense Adam sits inside torchrec's ``GradientClippingOptimizer``: its
    moments must be loaded too (they were left empty, so a resumed run restarted Adam: inexact)."""
    clipped = dataclasses.replace(OPTIM, max_grad_norm=0.05)
    results = run_multiprocess(_save_continue_resume, world_size=1, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"), optim=clipped)
    for result in results:
        assert len(result["continued"]) == 7
        assert result["resumed"] == result["continued"]


@pytest.mark.multiprocess
def test_resume_is_exact_without_any_optimizer_state(synthetic_dir: str, tmp_path) -> None:
    """SGD for tables and dense parts keeps no state: the checkpoint has no optimizer entry at all."""
    results = run_multiprocess(_save_continue_resume, world_size=2, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"), stateless=True)
    for result in results:
        assert len(result["continued"]) == 7
        assert result["resumed"] == result["continued"]


def _load_on_one_rank(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _fresh(schema, seed=99)
    load_checkpoint(CheckpointManager(ckpt_dir).latest(), model, None)
    valid = ParquetBatchReader(schema, "valid", 256, rank=ctx.rank, world_size=ctx.world_size)
    return evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)


@pytest.mark.multiprocess
def test_resume_is_exact_and_reshards_to_one_rank(synthetic_dir: str, tmp_path) -> None:
    ckpt_dir = str(tmp_path / "checkpoints")
    results = run_multiprocess(_save_continue_resume, world_size=2, schema_path=synthetic_dir, ckpt_dir=ckpt_dir)
    for result in results:
        assert len(result["continued"]) == 7
        # Same model, fused + dense optimizer state, RNG (dropout) and data position: same losses.
        assert result["resumed"] == result["continued"]
        assert result["state"].global_step == 5 and result["state"].step_in_epoch == 5
    # Resharding: the 2-rank checkpoint loads on 1 rank and gives the same validation metrics.
    (single,) = run_multiprocess(_load_on_one_rank, world_size=1, schema_path=synthetic_dir, ckpt_dir=ckpt_dir)
    at_save = results[0]["at_save"]
    for key in ("auc", "logloss", "ne", "num_samples"):
        assert single[key] == pytest.approx(at_save[key], abs=1e-6), key


def _save_after_three_steps_on_one_rank(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=3)
    CheckpointManager(ckpt_dir, keep=1).save(model, optimizer, TrainState(epoch=1, global_step=3, world_size=1,
                                                                          batch_size=64))
    valid = ParquetBatchReader(schema, "valid", 256, rank=ctx.rank, world_size=ctx.world_size)
    return evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)


def _resume_with_optimizer(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=99)
    state = load_checkpoint(CheckpointManager(ckpt_dir).latest(), model, optimizer)  # restore_rng as the runner's
    valid = ParquetBatchReader(schema, "valid", 256, rank=ctx.rank, world_size=ctx.world_size)
    return {"state": state, "valid": evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)}


@pytest.mark.multiprocess
def test_a_one_rank_checkpoint_resumes_on_two_ranks(synthetic_dir: str, tmp_path) -> None:
    """A run scaled up at an epoch boundary: the checkpoint holds ``rank00000.pt`` only, and under another world
    size no rank's RNG file is read (the ranks reseed), so rank 1 must not ask for a ``rank00001.pt`` and refuse
    the checkpoint as damaged; the tables and their optimizer state are re-cut to 2 ranks' shards."""
    ckpt_dir = str(tmp_path / "checkpoints")
    (at_save,) = run_multiprocess(_save_after_three_steps_on_one_rank, world_size=1, schema_path=synthetic_dir,
                                  ckpt_dir=ckpt_dir)
    resumed = run_multiprocess(_resume_with_optimizer, world_size=2, schema_path=synthetic_dir, ckpt_dir=ckpt_dir)
    for result in resumed:
        assert (result["state"].epoch, result["state"].global_step, result["state"].world_size) == (1, 3, 1)
        for key in ("auc", "logloss", "ne", "num_samples"):
            assert result["valid"][key] == pytest.approx(at_save[key], abs=1e-6), key


def _flip_a_byte(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.seek(os.path.getsize(path) // 2)
        byte = handle.read(1)
        handle.seek(-1, os.SEEK_CUR)
        handle.write(bytes([byte[0] ^ 0x40]))


def _save_flip_load(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    """Saves on every rank, flips a byte of rank 1's tensor file (rank 0), loads on every rank: what each says."""
    import torch.distributed as dist

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    path = CheckpointManager(ckpt_dir, keep=1).save(model, optimizer, TrainState(global_step=1, world_size=2))
    with open(os.path.join(path, DIGESTS_FILE), encoding="utf-8") as handle:
        recorded = sorted(json.load(handle))
    if ctx.rank == 0:
        _flip_a_byte(os.path.join(path, "__1_0.distcp"))
    dist.barrier()
    try:
        load_checkpoint(path, model, optimizer)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    return {"recorded": recorded, "refusal": refusal, "path": path}


@pytest.mark.multiprocess
def test_a_byte_flipped_in_one_ranks_file_is_refused_on_every_rank(synthetic_dir: str, tmp_path) -> None:
    """The ranks hash a share of the files each, at save and at load; the one that finds the damage tells them all."""
    results = run_multiprocess(_save_flip_load, world_size=2, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"))
    assert {".metadata", "__0_0.distcp", "__1_0.distcp", "rank00000.pt", "rank00001.pt"} <= set(results[0]["recorded"])
    damaged = os.path.join(results[0]["path"], "__1_0.distcp")
    for result in results:
        assert result["refusal"] is not None and result["refusal"].startswith(f"{damaged}: cannot be read back"), result
        assert "its sha256 differs from the one files.sha256.json recorded" in result["refusal"]


class _LateTermTask(_DLRMTask):
    """A logit shift that joins the loss only once ``use_shift`` is set: no gradient reaches it before."""

    def __init__(self, schema: DatasetSchema) -> None:
        super().__init__(schema)
        self.shift = nn.Parameter(torch.zeros(()))
        self.use_shift = False

    def forward(self, batch: Batch):  # noqa: ANN201
        logits = self.dlrm(self.dropout(batch.dense_features), batch.sparse_features).squeeze(-1)  # (B,)
        if self.use_shift:
            logits = logits + self.shift
        loss = nn.functional.binary_cross_entropy_with_logits(logits, batch.labels)
        return loss, (loss.detach(), logits.detach(), batch.labels)


def _resume_before_a_parameter_is_first_used(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx = init_distributed("cpu")

    def fresh(seed: int):  # noqa: ANN202
        torch.manual_seed(seed)
        task = _LateTermTask(schema)
        model, _ = shard_model(task, ctx.device, ctx.world_size, SHARDING, OPTIM, batch_size=64)
        return task, model, build_optimizer(model, OPTIM)

    task, model, optimizer = fresh(0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=5)
    manager = CheckpointManager(ckpt_dir, keep=1)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=5, global_step=5, world_size=1, batch_size=64))
    task.use_shift = True
    continued = _losses(model, optimizer, reader, skip=5, stop=12)
    task2, model2, optimizer2 = fresh(123)
    state = load_checkpoint(manager.latest(), model2, optimizer2)
    task2.use_shift = True
    resumed = _losses(model2, optimizer2, reader, skip=state.step_in_epoch, stop=12)
    return {"continued": continued, "resumed": resumed}


@pytest.mark.multiprocess
def test_resume_is_exact_when_a_parameter_had_no_gradient_before_the_checkpoint(synthetic_dir: str, tmp_path) -> None:
    """Adam keeps no state for a parameter no gradient has reached, so the checkpoint holds none for it;
    the resume asked for one (and failed as "a checkpoint of another model") and, given one, would have
    stepped it from a state the uninterrupted run never had."""
    (result,) = run_multiprocess(_resume_before_a_parameter_is_first_used, world_size=1, schema_path=synthetic_dir,
                                 ckpt_dir=str(tmp_path / "checkpoints"))
    assert len(result["continued"]) == 7
    assert result["resumed"] == result["continued"]


def _table_optimizer_steps(model: nn.Module) -> List[int]:
    """FBGEMM's step counter (``iter``) of each fused table kernel of this rank."""
    return [int(kernel.emb_module.iter) for _, kernel in embedding_kernels(model)]


def _table_optimizer_step_across_resume(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=5)
    valid = ParquetBatchReader(schema, "valid", 256, rank=ctx.rank, world_size=ctx.world_size, equal_batches=False)
    evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)  # its forwards do not count
    manager = CheckpointManager(ckpt_dir, keep=1)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=5, global_step=5, world_size=ctx.world_size,
                                              batch_size=64))
    at_save = _table_optimizer_steps(model)
    _, model2, optimizer2 = _fresh(schema, seed=123)
    load_checkpoint(manager.latest(), model2, optimizer2)
    return {"at_save": at_save, "loaded": _table_optimizer_steps(model2), "forwards": 5}


def _table_step_counters(model: nn.Module) -> List[List[int]]:
    """FBGEMM's step counter of each fused table kernel of this rank: ``iter`` and the host copy ``iter_cpu``
    that the next training forward adds 1 to and hands the optimizer."""
    return [[int(kernel.emb_module.iter), int(kernel.emb_module.iter_cpu)] for _, kernel in embedding_kernels(model)]


def _table_step_counters_around_an_evaluation(schema_path: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=5)
    trained = _table_step_counters(model)
    valid = ParquetBatchReader(schema, "valid", 64, rank=ctx.rank, world_size=ctx.world_size, equal_batches=False)
    evaluate(model, valid, ctx.device, CTRMetrics(), progress=False)
    return {"trained": trained, "evaluated": _table_step_counters(model), "eval_batches": valid.padded_len}


@pytest.mark.multiprocess
def test_an_evaluation_leaves_the_fused_table_optimizers_step_counter_as_it_was(synthetic_dir: str) -> None:
    """FBGEMM counts every forward of a fused table kernel, evaluation included, in the step counter that fused
    Adam's bias correction reads: a validation of N batches made the training steps after it take the step size
    of N steps later, so trained tables depended on data.eval_batch_size, train.eval_every and the valid split."""
    (result,) = run_multiprocess(_table_step_counters_around_an_evaluation, world_size=1, schema_path=synthetic_dir)
    assert result["eval_batches"] > 1
    assert [5, 5] in result["trained"]  # the row-wise Adagrad kernel counted its 5 steps (frozen SGD's stays 0)
    assert result["evaluated"] == result["trained"]


@pytest.mark.multiprocess
def test_the_fused_table_optimizers_step_counter_is_restored(synthetic_dir: str, tmp_path) -> None:
    """FBGEMM counts the steps of a fused table optimizer in ``iter`` (one per forward), which fused
    Adam's bias correction reads and no state dict holds: a resume restarting it at 0 took other steps."""
    results = run_multiprocess(_table_optimizer_step_across_resume, world_size=2, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"))
    for result in results:
        counted = result["forwards"]
        assert counted in result["at_save"]  # the row-wise Adagrad kernel counted (frozen SGD's stays 0)
        assert result["loaded"] == [counted] * len(result["at_save"])


def _table_optimizer_step_counted_on_rank_1_only(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    import json

    from recsys_llm.train.plan_report import describe_plan

    schema = DatasetSchema.load(schema_path)
    ctx = init_distributed("cpu")
    planned = ShardingConfig(sharding_types=["table_wise"], frozen_tables=["t_device"])
    _, plan = shard_model(_DLRMTask(schema), ctx.device, ctx.world_size, planned, OPTIM, batch_size=64)
    placements = json.loads(describe_plan(plan))
    for table, placement in placements.items():  # rank 0 holds the frozen table only, rank 1 the trained ones
        rank = 0 if table == "t_device" else 1
        placement["ranks"] = [rank]
        for shard in placement["shards"]:
            shard["rank"] = rank
    plan_file = os.path.join(os.path.dirname(ckpt_dir), f"plan_{ctx.rank}.json")
    with open(plan_file, "w", encoding="utf-8") as handle:
        json.dump(placements, handle)
    pinned = ShardingConfig(sharding_types=["table_wise"], frozen_tables=["t_device"], plan_file=plan_file)

    def fresh(seed: int):  # noqa: ANN202
        torch.manual_seed(seed)
        model, _ = shard_model(_DLRMTask(schema), ctx.device, ctx.world_size, pinned, OPTIM, batch_size=64)
        return model, build_optimizer(model, OPTIM)

    model, optimizer = fresh(0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    _losses(model, optimizer, reader, skip=0, stop=3)
    manager = CheckpointManager(ckpt_dir, keep=1)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=3, global_step=3, world_size=ctx.world_size,
                                              batch_size=64))
    at_save = _table_optimizer_steps(model)
    model2, optimizer2 = fresh(123)
    state = load_checkpoint(manager.latest(), model2, optimizer2)
    return {"at_save": at_save, "loaded": _table_optimizer_steps(model2), "saved": state.table_optimizer_step}


@pytest.mark.multiprocess
def test_the_table_optimizers_step_counter_is_saved_when_rank_0_holds_no_trained_table(synthetic_dir: str,
                                                                                     tmp_path) -> None:
    """Rank 0 writes ``train_state.json``, and the step counter it records is the largest over the ranks: a rank 0
    holding only a frozen table (whose counter stays 0) recorded 0, and the resumed fused optimizers restarted
    their bias correction at step 0."""
    at_save, at_load = run_multiprocess(_table_optimizer_step_counted_on_rank_1_only, world_size=2,
                                        schema_path=synthetic_dir, ckpt_dir=str(tmp_path / "checkpoints"))
    assert at_save["at_save"] == [0] and 3 in at_load["at_save"]  # the placement the test is about
    assert at_save["saved"] == at_load["saved"] == 3
    assert at_load["loaded"] == [3] * len(at_load["at_save"])


def _write_fake(directory: str, name: str, complete: bool) -> str:
    path = os.path.join(directory, name)
    os.makedirs(path)
    with open(os.path.join(path, ".metadata"), "wb") as handle:
        handle.write(b"partial")
    if complete:
        with open(os.path.join(path, "train_state.json"), "w", encoding="utf-8") as handle:
            handle.write(TrainState(global_step=int(name.split("-")[1].split(".")[0])).to_json())
    return path


class TestCheckpointDirectory:
    def test_half_written_checkpoints_are_ignored(self, tmp_path) -> None:
        directory = str(tmp_path)
        good = _write_fake(directory, "ckpt-00000010", complete=True)
        _write_fake(directory, "ckpt-00000020.tmp", complete=True)  # killed before the rename
        _write_fake(directory, "ckpt-00000030", complete=False)  # no train_state.json
        manager = CheckpointManager(directory)
        assert manager.latest() == good
        # A pointer to something incomplete falls back to the newest complete checkpoint.
        with open(os.path.join(directory, "latest"), "w", encoding="utf-8") as handle:
            handle.write("ckpt-00000030\n")
        assert manager.latest() == good
        assert [os.path.basename(p) for p in manager.list_complete()] == ["ckpt-00000010"]
        assert read_train_state(good).global_step == 10
        with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
            read_train_state(os.path.join(directory, "ckpt-00000030"))

    def test_a_pointer_left_behind_by_a_kill_does_not_hide_the_newest_checkpoint(self, tmp_path) -> None:
        directory = str(tmp_path)
        _write_fake(directory, "ckpt-00000020", complete=True)
        newest = _write_fake(directory, "ckpt-00000030", complete=True)  # renamed; killed before the pointer
        with open(os.path.join(directory, "latest"), "w", encoding="utf-8") as handle:
            handle.write("ckpt-00000020\n")
        assert CheckpointManager(directory).latest() == newest

    def test_what_a_save_killed_after_its_rename_left_undone_is_completed(self, tmp_path) -> None:
        directory = str(tmp_path)
        _write_fake(directory, "ckpt-00000010", complete=True)
        _write_fake(directory, "ckpt-00000020.prev", complete=True)  # set aside; killed before the new one's rename
        _write_fake(directory, "ckpt-00000020.tmp", complete=True)
        with open(os.path.join(directory, "latest"), "w", encoding="utf-8") as handle:
            handle.write("ckpt-00000010\n")
        # the temp file of a latest rewrite a kill left (rmtree refused the file, so it stayed for good)
        with open(os.path.join(directory, "latest.1a2b3c4d.tmp"), "w", encoding="utf-8") as handle:
            handle.write("ckpt-0000")
        outside = tmp_path.parent / f"{tmp_path.name}-outside"  # a link among the leftovers: the link goes, not its target
        outside.mkdir()
        (outside / "keep").write_text("x")
        os.symlink(outside, os.path.join(directory, "ckpt-00000030.tmp"))
        CheckpointManager(directory, keep=1).complete_interrupted_save()
        assert (outside / "keep").exists()
        assert sorted(os.listdir(directory)) == ["ckpt-00000020", "latest"]
        assert open(os.path.join(directory, "latest"), encoding="utf-8").read() == "ckpt-00000020\n"
        assert read_train_state(os.path.join(directory, "ckpt-00000020")).global_step == 20

    def test_empty_directory(self, tmp_path) -> None:
        assert CheckpointManager(str(tmp_path / "none")).latest() is None

    def test_a_checkpoint_argument_names_what_it_is_when_it_holds_none(self, tmp_path) -> None:
        from recsys_llm.train.checkpoint import resolve_checkpoint

        run = tmp_path / "run"
        best = _write_fake(str(run / "best"), "ckpt-00000010", complete=True)
        newest = _write_fake(str(run / "checkpoints"), "ckpt-00000020", complete=True)
        assert resolve_checkpoint(str(run)) == best  # a run directory: its best model
        assert resolve_checkpoint(str(run / "checkpoints")) == newest  # a directory of checkpoints: its newest
        assert resolve_checkpoint(newest) == newest
        untrained = tmp_path / "untrained"
        untrained.mkdir()
        (untrained / "config.yaml").write_text("model: {}\n", encoding="utf-8")
        with pytest.raises(FileNotFoundError, match=r"untrained: run directory holds no checkpoint .* train it first"):
            resolve_checkpoint(str(untrained))
        # a checkpoint copied out of its run, beside some unrelated config.yaml: no run config is guessed
        from recsys_llm.train.checkpoint import trained_run_config

        copied = _write_fake(str(tmp_path / "proj" / "ckpts"), "ckpt-00000038", complete=True)
        (tmp_path / "proj" / "config.yaml").write_text("model: {name: fm}\n", encoding="utf-8")
        with pytest.raises(FileNotFoundError, match="pass the run's config with --config"):
            trained_run_config(copied)
        (run / "config.yaml").write_text("model: {name: fm}\n", encoding="utf-8")
        assert trained_run_config(str(run)) == str(run / "config.yaml")
        (tmp_path / "other").mkdir()
        with pytest.raises(FileNotFoundError, match=r"other: neither a checkpoint \(a ckpt-N directory with "
                                                    r"train_state.json\), a directory of them, nor a run directory"):
            resolve_checkpoint(str(tmp_path / "other"))
        (tmp_path / "model.safetensors").write_bytes(b"")  # an export's state file is no checkpoint
        with pytest.raises(FileNotFoundError, match=r"model.safetensors: a file, not a checkpoint or run directory "
                                                    r"\(an export's state file"):
            resolve_checkpoint(str(tmp_path / "model.safetensors"))

    def test_train_state_json_round_trip_and_errors(self) -> None:
        state = TrainState(epoch=2, step_in_epoch=3, global_step=40, best_metric=0.7, bad_evals=1)
        assert TrainState.from_json(state.to_json(), "x") == state
        assert TrainState.from_json(TrainState().to_json(), "x").best_metric == float("-inf")
        with pytest.raises(ValueError, match="unknown train-state keys"):
            TrainState.from_json('{"epochs": 1}', "state.json")
        # JSON's true is a Python int too: a step or an epoch that is a bool is a damaged file, not step 1
        with pytest.raises(ValueError, match="train-state key 'global_step' must be int, got True"):
            TrainState.from_json('{"global_step": true}', "state.json")


class _RunsCodeWhenUnpickled:
    """What a crafted ``.metadata`` holds: unpickling it would call ``open(marker, "w")``."""

    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self):  # noqa: ANN204
        return (open, (self.marker, "w"))


def test_crafted_metadata_is_refused_without_running_code(tmp_path) -> None:
    import pickle

    path = tmp_path / "ckpt-00000001"
    path.mkdir()
    marker = tmp_path / "code_ran"
    with open(path / ".metadata", "wb") as handle:
        pickle.dump(_RunsCodeWhenUnpickled(str(marker)), handle)
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata: refers to (builtins|_?io)\.open"):
        load_checkpoint(str(path), nn.Linear(2, 2))
    assert not marker.exists()


def test_metadata_written_on_python_3_13_loads_on_every_python() -> None:
    """Python 3.13 pickles DCP's ``StorageMeta.checkpoint_id`` as ``pathlib._local.PosixPath``: every checkpoint
    written there (each run's best one, reloaded at the end of ``train``) was refused as foreign code."""
    import io
    import pathlib
    import pickle

    from recsys_llm.train.checkpoint_reader import MetadataUnpickler

    as_on_3_13 = b"cpathlib._local\nPosixPath\n(Vruns/x/ckpt-00000001\ntR."
    assert MetadataUnpickler(io.BytesIO(as_on_3_13), "x").load() == pathlib.PosixPath("runs/x/ckpt-00000001")
    # a round trip on this Python, whatever module it names the class by
    written = pickle.dumps(pathlib.PurePosixPath("ckpt"))
    assert MetadataUnpickler(io.BytesIO(written), "x").load() == pathlib.PurePosixPath("ckpt")
    with pytest.raises(pickle.UnpicklingError, match=r"refers to pathlib\._local\.Path,"):
        MetadataUnpickler(io.BytesIO(b"cpathlib._local\nPath\n(Vx\ntR."), "x").load()


def _checkpoint_and_another_beside_it(tmp_path: Path) -> Path:
    """A DCP checkpoint ``tmp_path/ckpt-00000001`` of a Linear(2, 2) and, beside it, ``tmp_path/elsewhere``: another
    one whose weights are all 7."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt-00000001"
    dcp.save({"model": nn.Linear(2, 2).state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    other = nn.Linear(2, 2)
    nn.init.constant_(other.weight, 7.0)
    dcp.save({"model": other.state_dict()}, checkpoint_id=str(tmp_path / "elsewhere"), no_dist=True)
    return path


def _refused_leaving_the_weights(path: Path, message: str) -> None:
    """Loading the checkpoint ``path`` into a Linear(2, 2) raises ValueError matching ``message``, its weights
    as they were."""
    target = nn.Linear(2, 2)
    before = target.weight.detach().clone()
    with pytest.raises(ValueError, match=message):
        load_checkpoint(str(path), target, restore_rng=False)
    assert torch.equal(target.weight, before)


@pytest.mark.parametrize("where", ["absolute", "parent"])
def test_metadata_naming_a_data_file_outside_the_checkpoint_is_refused(tmp_path, where) -> None:
    """A crafted ``.metadata`` (only DCP's own classes) whose items point at another file: DCP would
    read that file's bytes into the weights."""
    import pickle

    from recsys_llm.train.checkpoint_reader import MetadataUnpickler

    path = _checkpoint_and_another_beside_it(tmp_path)
    with open(path / ".metadata", "rb") as handle:
        metadata = MetadataUnpickler(handle, "x").load()
    for info in metadata.storage_data.values():
        outside = tmp_path / "elsewhere" / info.relative_path
        info.relative_path = str(outside) if where == "absolute" else os.path.relpath(outside, path)
    with open(path / ".metadata", "wb") as handle:
        pickle.dump(metadata, handle)
    _refused_leaving_the_weights(path, r"ckpt-00000001/\.metadata: names the data file .*elsewhere/__0_0\.distcp'?, "
                                       r"outside the checkpoint directory")


def test_a_data_file_linked_to_a_file_outside_the_checkpoint_is_refused(tmp_path) -> None:
    """A checkpoint whose ``__0_0.distcp`` is a symbolic link to another checkpoint's file (or any file the user
    can read): DCP would read that file's bytes into the weights, as a ``..`` in ``.metadata`` would."""
    path = _checkpoint_and_another_beside_it(tmp_path)
    os.remove(path / "__0_0.distcp")
    os.symlink(tmp_path / "elsewhere" / "__0_0.distcp", path / "__0_0.distcp")
    _refused_leaving_the_weights(path, r"ckpt-00000001/__0_0\.distcp: a symbolic link to .*elsewhere/__0_0\.distcp, "
                                       r"outside the checkpoint directory")


def test_a_data_file_linked_inside_the_checkpoint_still_loads(tmp_path) -> None:
    """A link whose target lies in the checkpoint directory itself reads the checkpoint's own bytes."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt-00000001"
    saved = nn.Linear(2, 2)
    dcp.save({"model": saved.state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    os.rename(path / "__0_0.distcp", path / "data.bin")
    os.symlink("data.bin", path / "__0_0.distcp")
    target = nn.Linear(2, 2)
    load_checkpoint(str(path), target, restore_rng=False)
    assert torch.equal(target.weight, saved.weight)


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_a_data_file_that_is_a_fifo_is_refused_not_waited_on(tmp_path) -> None:
    """A named pipe in place of ``__0_0.distcp`` (inside the checkpoint directory, so no link leaves it): DCP's
    ``open`` would block until a writer opened the pipe, a job hung for good; it is refused, naming the file."""
    path = _checkpoint_and_another_beside_it(tmp_path)
    os.remove(path / "__0_0.distcp")
    os.mkfifo(path / "__0_0.distcp")
    _refused_leaving_the_weights(path, r"ckpt-00000001/__0_0\.distcp: is a named pipe \(FIFO\), not a file")


@pytest.mark.parametrize("kind", ["directory", "dangling link"])
def test_a_digests_file_that_is_no_file_is_refused_not_skipped(tmp_path, monkeypatch, kind) -> None:
    """files.sha256.json as a directory or a dangling link is damage, not a checkpoint saved without digests:
    the check of every file's bytes is not skipped in silence."""
    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    path = manager.save(nn.Linear(2, 1), None, TrainState(global_step=1))
    digests = os.path.join(path, DIGESTS_FILE)
    os.remove(digests)
    os.mkdir(digests) if kind == "directory" else os.symlink(str(tmp_path / "gone"), digests)
    expected = "a directory" if kind == "directory" else r"a dangling symbolic link \(to .*gone\)"
    with pytest.raises(ValueError, match=rf"{re.escape(digests)}: cannot be read back \({expected}, expected the "
                                         r"file of the checkpoint's digests\)"):
        load_checkpoint(path, nn.Linear(2, 1))


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_a_resume_passing_over_a_newer_damaged_checkpoint_says_so(tmp_path, monkeypatch) -> None:
    """A ``ckpt-N`` whose train_state.json was deleted or replaced (by a FIFO) is no interrupted save (a save
    renames its directory whole): the resume goes on from the one before, and warns, naming it, that its next
    save of that step replaces it."""
    from recsys_llm.train.resume import resume_point

    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path / "checkpoints"), keep=0)
    older = manager.save(nn.Linear(2, 1), None, TrainState(global_step=1))
    newer = manager.save(nn.Linear(2, 1), None, TrainState(global_step=2))
    os.remove(os.path.join(newer, TRAIN_STATE_FILE))
    os.mkfifo(os.path.join(newer, TRAIN_STATE_FILE))
    with pytest.warns(UserWarning, match=rf"{re.escape(newer)}: newer than the checkpoint this run resumes from "
                                         rf"\({re.escape(older)}\), but incomplete"):
        assert resume_point(manager, CheckpointManager(str(tmp_path / "best"))) == older
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second look of the same start (the run directory's lock) says nothing
        assert resume_point(manager, CheckpointManager(str(tmp_path / "best")), warn=False) == older
    best = CheckpointManager(str(tmp_path / "best"), keep=1)
    damaged_best = best.save(nn.Linear(2, 1), None, TrainState(global_step=3))
    os.remove(os.path.join(damaged_best, TRAIN_STATE_FILE))
    with pytest.warns(UserWarning, match=rf"{re.escape(newer)}, {re.escape(damaged_best)}: newer than"):
        assert resume_point(manager, best) == older


def test_a_damaged_first_checkpoint_is_named_when_the_run_starts_again(tmp_path, monkeypatch) -> None:
    """No complete checkpoint: the run starts again, and the damaged ``ckpt-00000000`` it passes over is named."""
    from recsys_llm.train.resume import resume_point

    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path / "checkpoints"), keep=0)
    damaged = manager.save(nn.Linear(2, 1), None, TrainState(global_step=0))
    os.remove(os.path.join(damaged, TRAIN_STATE_FILE))
    with pytest.warns(UserWarning, match=rf"{re.escape(damaged)}: newer than the checkpoint this run resumes from "
                                         r"\(none: it starts again\)"):
        assert resume_point(manager, CheckpointManager(str(tmp_path / "best"))) is None


def test_a_crafted_rng_file_is_refused_without_advice_to_load_it(tmp_path, monkeypatch) -> None:
    """rank<N>.pt is read with torch.load(weights_only=True); its refusal names the file and the reason,
    not torch's first line ("... Re-running torch.load with weights_only set to False will likely succeed")."""
    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    path = manager.save(nn.Linear(2, 1), None, TrainState(global_step=1))
    marker = tmp_path / "code_ran"
    torch.save({"cpu": _RunsCodeWhenUnpickled(str(marker))}, os.path.join(path, "rank00000.pt"))
    os.remove(os.path.join(path, DIGESTS_FILE))  # a crafted checkpoint records no digests to catch it by
    with pytest.raises(ValueError) as refused:
        load_checkpoint(path, nn.Linear(2, 1))
    message = str(refused.value)
    assert message.startswith(f"{os.path.join(path, 'rank00000.pt')}: refused: holds objects other than tensors ("), \
        message
    assert "open" in message and "weights_only" not in message and "still be loaded" not in message, message
    assert not marker.exists()


def test_a_crafted_dcp_payload_is_refused_without_running_code(tmp_path) -> None:
    """DCP keeps what is not a tensor as a pickle in its data files and hands it to the load planner: a crafted
    checkpoint whose weight is such a payload must be read by ``torch.load(weights_only=True)``, which refuses it
    before anything in it runs."""
    import torch.distributed.checkpoint as dcp

    path = tmp_path / "ckpt-00000001"
    marker = tmp_path / "code_ran"
    dcp.save({"model": {"weight": _RunsCodeWhenUnpickled(str(marker)), "bias": torch.zeros(1)}},
             checkpoint_id=str(path), no_dist=True)
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    with pytest.raises(ValueError) as refused:
        load_checkpoint(str(path), nn.Linear(2, 1), restore_rng=False)
    assert str(refused.value).startswith(f"{path}: refused: holds objects other than tensors ("), refused.value
    assert not marker.exists()


def test_crafted_metadata_naming_a_torch_function_is_refused_without_running_it(tmp_path) -> None:
    """Of ``torch``'s own names the metadata unpickler takes its dtypes only: ``torch.load`` (which would unpickle
    any file with ``weights_only=False``) or ``torch.save`` (which writes any file) named by a crafted ``.metadata``
    must be refused before it is called."""
    import pickle

    path = tmp_path / "ckpt-00000001"
    path.mkdir()
    marker = tmp_path / "code_ran"
    # protocol 0 by hand: torch.save({}, marker), named as the global ``torch.save``
    (path / ".metadata").write_bytes(b"ctorch\nsave\n(}V" + str(marker).encode() + b"\ntR.")
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    with pytest.raises(pickle.UnpicklingError, match=r"\.metadata: refers to torch\.save, which is not part of"):
        load_checkpoint(str(path), nn.Linear(2, 2), restore_rng=False)
    assert not marker.exists()


def _state_only_dcp(monkeypatch: pytest.MonkeyPatch) -> None:
    """Saves and loads a plain module's weights through the real protocol (no optimizer)."""
    from recsys_llm.train import checkpoint

    monkeypatch.setattr(checkpoint, "_dcp_state", lambda model, optimizer: {"model": model.state_dict()})


class _KilledMidSave(BaseException):
    """Stands in for a SIGKILL inside ``CheckpointManager.save``."""


class TestSameStepResave:
    """A step saved twice (mid-epoch checkpoint on an epoch's last step, then the epoch end)."""

    def test_a_kill_between_the_renames_leaves_the_steps_earlier_checkpoint(self, tmp_path, monkeypatch) -> None:
        from recsys_llm.train import checkpoint

        _state_only_dcp(monkeypatch)
        manager = CheckpointManager(str(tmp_path), keep=1)
        model = nn.Linear(2, 1)
        manager.save(model, None, TrainState(global_step=10, epoch=0, step_in_epoch=10))
        rename = os.rename

        def killed_before_the_new_one_is_in_place(src: Any, dst: Any) -> None:
            if os.fspath(src).endswith(".tmp") and os.path.basename(os.fspath(dst)) == "ckpt-00000010":
                raise _KilledMidSave(dst)
            rename(src, dst)

        monkeypatch.setattr(checkpoint.os, "rename", killed_before_the_new_one_is_in_place)
        with pytest.raises(_KilledMidSave):
            manager.save(model, None, TrainState(global_step=10, epoch=1, step_in_epoch=0, finished=True))
        monkeypatch.setattr(checkpoint.os, "rename", rename)

        kept = manager.latest()
        assert kept == str(tmp_path / "ckpt-00000010.prev")
        assert load_checkpoint(kept, nn.Linear(2, 1)).epoch == 0  # loadable: what a restart resumes from
        # the interrupted save again: the new checkpoint takes the name, the set-aside one goes
        manager.save(model, None, TrainState(global_step=10, epoch=1, step_in_epoch=0, finished=True))
        assert manager.list_complete() == [str(tmp_path / "ckpt-00000010")]
        assert read_train_state(manager.latest()).epoch == 1
        assert sorted(os.listdir(tmp_path)) == ["ckpt-00000010", "latest"]

    def test_a_step_saved_again_replaces_its_checkpoint(self, tmp_path, monkeypatch) -> None:
        _state_only_dcp(monkeypatch)
        manager = CheckpointManager(str(tmp_path), keep=1)
        model = nn.Linear(2, 1)
        for epoch in (0, 1):
            manager.save(model, None, TrainState(global_step=10, epoch=epoch))
        assert sorted(os.listdir(tmp_path)) == ["ckpt-00000010", "latest"]
        assert read_train_state(manager.latest()).epoch == 1

    def test_a_set_aside_checkpoint_counts_only_without_its_successor(self, tmp_path) -> None:
        directory = str(tmp_path)
        _write_fake(directory, "ckpt-00000010.prev", complete=True)
        assert CheckpointManager(directory).list_complete() == [os.path.join(directory, "ckpt-00000010.prev")]
        # but the step is not saved: a run's final save of it must still be made (a .prev may be the step's
        # mid-epoch checkpoint, set aside by the epoch-end save a kill cut short)
        assert not CheckpointManager(directory).holds_step(10)
        final = _write_fake(directory, "ckpt-00000010", complete=True)  # renamed in; killed before the removal
        older = _write_fake(directory, "ckpt-00000005.prev", complete=True)
        assert CheckpointManager(directory).list_complete() == [older, final]
        assert CheckpointManager(directory).holds_step(10)


class TestSameStateAs:
    """``save(..., same_state_as=best_checkpoint)``: the state a validation just saved to ``best/`` is linked into
    ``checkpoints/``, not written a second time (1.7 GB a save at 416M table weights)."""

    @staticmethod
    def _inodes(path: str) -> Dict[str, int]:
        return {name: os.stat(os.path.join(path, name)).st_ino for name in os.listdir(path)}

    def test_the_same_state_is_linked(self, tmp_path, monkeypatch) -> None:
        _state_only_dcp(monkeypatch)
        model, state = nn.Linear(2, 1), TrainState(global_step=10, best_metric=0.7, best_step=10)
        best = CheckpointManager(str(tmp_path / "best"), keep=1).save(model, None, state)
        saved = CheckpointManager(str(tmp_path / "checkpoints")).save(model, None, state, same_state_as=best)
        assert self._inodes(saved) == self._inodes(best) and DIGESTS_FILE in self._inodes(saved)
        assert load_checkpoint(saved, nn.Linear(2, 1)) == state

    def test_another_state_is_written(self, tmp_path, monkeypatch) -> None:
        _state_only_dcp(monkeypatch)
        model = nn.Linear(2, 1)
        best = CheckpointManager(str(tmp_path / "best")).save(model, None, TrainState(global_step=10, best_step=10))
        later = TrainState(global_step=10, best_step=10, bad_evals=1)
        saved = CheckpointManager(str(tmp_path / "checkpoints")).save(model, None, later, same_state_as=best)
        assert not set(self._inodes(saved).values()) & set(self._inodes(best).values())
        assert read_train_state(saved) == later

    def test_a_file_system_without_hard_links_gets_the_state_written(self, tmp_path, monkeypatch) -> None:
        import errno

        from recsys_llm.train import checkpoint

        _state_only_dcp(monkeypatch)
        model, state = nn.Linear(2, 1), TrainState(global_step=10, best_step=10)
        best = CheckpointManager(str(tmp_path / "best")).save(model, None, state)
        links: List[str] = []

        def refused(source: str, target: str) -> None:
            links.append(target)
            if len(links) == 2:  # refused part-way: the one made is taken back
                raise OSError(errno.EPERM, os.strerror(errno.EPERM), target)
            os.link(source, target)

        monkeypatch.setattr(checkpoint.os, "link", refused)
        saved = CheckpointManager(str(tmp_path / "checkpoints")).save(model, None, state, same_state_as=best)
        assert len(links) == 2 and not set(self._inodes(saved).values()) & set(self._inodes(best).values())
        model_out = nn.Linear(2, 1)
        assert load_checkpoint(saved, model_out) == state
        assert torch.equal(model_out.weight, model.weight)
        assert sorted(os.listdir(tmp_path / "checkpoints")) == ["ckpt-00000010", "latest"]

    def test_a_damaged_linked_file_is_said_to_be_shared(self, tmp_path, monkeypatch) -> None:
        """A byte flipped in a linked checkpoint's file is flipped in best/'s too: the error says so, or "delete its
        checkpoint directory to resume from the one before" sends the user to best/ckpt-N, the same damaged bytes."""
        from recsys_llm.train.checkpoint import verify_digests

        _state_only_dcp(monkeypatch)
        model, state = nn.Linear(2, 1), TrainState(global_step=10, best_step=10)
        best = CheckpointManager(str(tmp_path / "best"), keep=1).save(model, None, state)
        saved = CheckpointManager(str(tmp_path / "checkpoints")).save(model, None, state, same_state_as=best)
        name = next(name for name in json.load(open(os.path.join(saved, DIGESTS_FILE))))
        with open(os.path.join(saved, name), "r+b") as handle:
            first = handle.read(1)
            handle.seek(0)
            handle.write(bytes([first[0] ^ 0xFF]))
        for path in (saved, best):
            with pytest.raises(ValueError, match="hard-linked into 1 other checkpoint"):
                verify_digests(path)
        shutil.rmtree(best)  # the other name gone: nothing shared left to mention
        with pytest.raises(ValueError, match="sha256 differs") as caught:
            verify_digests(saved)
        assert "hard-linked" not in str(caught.value)


def test_a_save_that_fails_on_a_full_disk_gives_its_space_back_and_keeps_the_earlier_checkpoint(
        tmp_path, monkeypatch) -> None:
    """A save that ran out of space left its half-written ``ckpt-N.tmp`` holding that space until the next save: a
    rerun on the still-full disk failed again before it came to save."""
    import errno

    from recsys_llm.train import checkpoint

    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=2)
    model = nn.Linear(2, 1)
    manager.save(model, None, TrainState(global_step=2))
    before = {name: (tmp_path / "ckpt-00000002" / name).read_bytes() for name in os.listdir(tmp_path / "ckpt-00000002")}
    save_synced = checkpoint._save_synced

    def full_disk(tensors: Any, path: str) -> None:
        save_synced(tensors, path)  # some bytes written, then the disk is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(checkpoint, "_save_synced", full_disk)
    with pytest.raises(OSError):
        manager.save(model, None, TrainState(global_step=4))
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000002", "latest"]
    assert {name: (tmp_path / "ckpt-00000002" / name).read_bytes()
            for name in os.listdir(tmp_path / "ckpt-00000002")} == before
    assert manager.latest() == str(tmp_path / "ckpt-00000002")


def test_rng_files_are_synced_to_disk(tmp_path, monkeypatch) -> None:
    from recsys_llm.train import checkpoint

    if not os.path.isdir("/proc/self/fd"):
        pytest.skip("needs /proc/self/fd to name a synced descriptor")
    _state_only_dcp(monkeypatch)
    synced: List[str] = []
    fsync = os.fsync

    def recording_fsync(fd: int) -> None:
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        fsync(fd)

    monkeypatch.setattr(checkpoint.os, "fsync", recording_fsync)
    CheckpointManager(str(tmp_path)).save(nn.Linear(2, 1), None, TrainState(global_step=3))
    assert any(path.endswith(os.path.join("ckpt-00000003.tmp", "rank00000.pt")) for path in synced), synced


def test_a_save_syncs_each_directory_before_what_follows_depends_on_it(tmp_path, monkeypatch) -> None:
    """A new name (a file's, a rename's) reaches the disk only with its directory's fsync: ``ckpt-N.tmp`` is synced
    holding ``train_state.json`` before it is renamed ``ckpt-N`` (else a power cut could keep the rename and lose
    that file: the step's checkpoint looks half written), and the checkpoint directory after that rename, while the
    step's earlier copy ``ckpt-N.prev`` still exists (else a power cut could keep the earlier copy's removal and
    lose the new name: no checkpoint of the step at all)."""
    from recsys_llm.train import checkpoint

    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    model = nn.Linear(2, 1)
    manager.save(model, None, TrainState(global_step=10, epoch=0, step_in_epoch=10))
    synced: List[Any] = []
    fsync_directory = checkpoint.fsync_directory

    def recording_fsync_directory(path: str) -> None:
        synced.append((os.path.normpath(path), sorted(os.listdir(path))))
        fsync_directory(path)

    monkeypatch.setattr(checkpoint, "fsync_directory", recording_fsync_directory)
    manager.save(model, None, TrainState(global_step=10, epoch=1))  # the same step again: its checkpoint set aside
    tmp = str(tmp_path / "ckpt-00000010.tmp")
    assert any(path == tmp and "train_state.json" in names for path, names in synced), synced
    assert any(path == str(tmp_path) and {"ckpt-00000010", "ckpt-00000010.prev"} <= set(names)
               for path, names in synced), synced


def _truncate(path: str) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(max(1, os.path.getsize(path) // 2))


@pytest.mark.parametrize("damage", ["distcp", "metadata", "rng", "rng_missing", "rng_garbage", "train_state_type"])
def test_a_damaged_checkpoint_is_a_one_line_error_naming_its_file(tmp_path, monkeypatch, damage: str) -> None:
    _state_only_dcp(monkeypatch)
    checkpoint = CheckpointManager(str(tmp_path)).save(nn.Linear(2, 1), None, TrainState(global_step=3))
    files = {name.split(".")[-1] if "." in name else name: os.path.join(checkpoint, name)
             for name in os.listdir(checkpoint)}
    if damage == "distcp":
        _truncate(files["distcp"])
    elif damage == "metadata":
        with open(files["metadata"], "wb") as handle:
            handle.write(b"\x80\x04garbage")
    elif damage == "rng":
        _truncate(files["pt"])
    elif damage == "rng_missing":  # the resume would go on without this rank's RNG state: not exact
        os.remove(files["pt"])
    elif damage == "rng_garbage":
        torch.save({"torch": torch.zeros(3)}, files["pt"])  # loads, but is no RNG state
    else:
        with open(files["json"], "w", encoding="utf-8") as handle:
            handle.write(TrainState(global_step=3).to_json().replace('"global_step": 3', '"global_step": "3"'))
    with pytest.raises(ValueError) as error:
        load_checkpoint(checkpoint, nn.Linear(2, 1))
    message = str(error.value)
    assert checkpoint in message and "\n" not in message
    assert "delete it" in message or "delete its checkpoint directory" in message
    if damage == "distcp":  # the failing rank's own error, not DCP's "CheckpointException ranks:..."
        assert "CheckpointException" not in message


def test_a_checkpoint_of_another_model_is_named_as_such_not_as_damaged(tmp_path, monkeypatch) -> None:
    _state_only_dcp(monkeypatch)
    checkpoint = CheckpointManager(str(tmp_path)).save(nn.Linear(2, 1), None, TrainState(global_step=3))
    with pytest.raises(ValueError) as error:
        load_checkpoint(checkpoint, nn.Linear(3, 1))
    message = str(error.value)
    assert "another model or code version (Size mismatch between saved torch.Size([1, 2])" in message
    assert "delete" not in message


class _BackboneWithTerm(nn.Module):
    """A backbone and a logit term beside it (as LLaCTR's FIE is)."""

    def __init__(self) -> None:
        super().__init__()
        self.backbone = nn.Linear(2, 1)
        self.term = nn.Linear(2, 1)


def test_a_checkpoint_with_weights_the_model_lacks_is_refused_not_loaded_in_part(tmp_path, monkeypatch) -> None:
    """DCP loads only the keys it is asked for: a checkpoint of a model with a term more (an LLaCTR
    run evaluated with a plain backbone's config) loaded the backbone and dropped the term silently."""
    _state_only_dcp(monkeypatch)
    checkpoint = CheckpointManager(str(tmp_path)).save(_BackboneWithTerm(), None, TrainState(global_step=3))
    backbone_only = nn.Module()
    backbone_only.backbone = nn.Linear(2, 1)
    before = backbone_only.backbone.weight.detach().clone()
    with pytest.raises(ValueError) as error:
        load_checkpoint(checkpoint, backbone_only, restore_rng=False)
    message = str(error.value)
    assert message.startswith(f"{checkpoint}: holds a checkpoint of another model or code version (weights this "
                              "model does not have: term.bias, term.weight)"), message
    assert torch.equal(backbone_only.backbone.weight, before)
    assert load_checkpoint(checkpoint, _BackboneWithTerm(), restore_rng=False).global_step == 3  # its own model loads


def test_missing_optimizer_state_names_the_table_optimizer_as_the_likely_cause() -> None:
    from recsys_llm.train.checkpoint_reader import damaged_checkpoint_error

    error = RuntimeError("Missing key in checkpoint state_dict: optim.model.ebc.embedding_bags.t_item.weight.momentum1.")
    message = str(damaged_checkpoint_error("runs/x/ckpt-00000005", error))
    assert "another model or code version" in message
    assert "another optim.sparse, or a table replicated (data_parallel)" in message
    assert "another optim.sparse" not in str(damaged_checkpoint_error("p", RuntimeError("Missing key in checkpoint state_dict: model.w.")))


class _WideTable(nn.Module):
    """One 256-wide table: the planner may split it into two column shards (each at least 128 wide)."""

    def __init__(self) -> None:
        super().__init__()
        from torchrec.modules.embedding_configs import EmbeddingBagConfig

        self.ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_a", embedding_dim=256, num_embeddings=12,
                                                              feature_names=["a"])], device=torch.device("meta"))

    def forward(self, batch: Batch) -> Any:
        loss = self.ebc(batch.sparse_features).values().square().mean()
        return loss, (loss.detach(), loss.detach().expand(batch.labels.size(0)), batch.labels)


def _row_wise_adagrad_saved_column_wise_loaded_table_wise(ckpt_dir: str, load: bool) -> str:
    """Column-wise on 2 ranks: one step of row-wise Adagrad and a save; table-wise on 1 rank: the load's error."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    ctx = init_distributed("cpu")
    optim = OptimizerConfig(sparse="row_wise_adagrad", sparse_lr=0.1, dense="sgd", dense_lr=0.1)
    sharding = ShardingConfig(sharding_types=["table_wise" if load else "column_wise"])
    model, _ = shard_model(_WideTable(), ctx.device, ctx.world_size, sharding, optim, batch_size=4)
    optimizer = build_optimizer(model, optim)
    if load:
        try:
            load_checkpoint(os.path.join(ckpt_dir, "ckpt-00000001"), model, optimizer)
        except ValueError as error:
            return str(error)
        return "loaded"
    ids = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.tensor([1, 2]), lengths=torch.ones(2).int())
    model(Batch(torch.zeros(2, 0), ids, torch.zeros(2), {}))[0].backward()
    optimizer.step()
    CheckpointManager(ckpt_dir).save(model, optimizer, TrainState(global_step=1))
    return "saved"


@pytest.mark.multiprocess
def test_row_wise_state_of_other_column_shards_is_named_as_such(tmp_path) -> None:
    """A column-wise table's row-wise Adagrad state holds rows x column shards values (torchrec's layout), so a plan
    that splits the table's columns otherwise met DCP's size mismatch, reported as "a checkpoint of another model"."""
    ckpt_dir = str(tmp_path / "checkpoints")
    assert run_multiprocess(_row_wise_adagrad_saved_column_wise_loaded_table_wise, world_size=2, ckpt_dir=ckpt_dir,
                            load=False) == ["saved"] * 2
    (message,) = run_multiprocess(_row_wise_adagrad_saved_column_wise_loaded_table_wise, world_size=1,
                                  ckpt_dir=ckpt_dir, load=True)
    assert "one value per row of each column shard" in message and "sharding.plan_file" in message, message
    assert "another model" not in message, message


@pytest.mark.multiprocess
def test_resume_is_exact_on_three_ranks(synthetic_dir: str, tmp_path) -> None:
    """On 3+ ranks the order of a gradient's sum depends on its offset in DDP's bucket, and DDP
    rebuilds its buckets after a model's first step: the first step after a resume must still
    reduce as the uninterrupted run's step did (it drifted in the last bits before)."""
    results = run_multiprocess(_save_continue_resume, world_size=3, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"))
    for result in results:
        assert len(result["continued"]) == 7
        assert result["resumed"] == result["continued"]


@pytest.mark.multiprocess
def test_resume_is_exact_on_three_ranks_with_replicated_tables(synthetic_dir: str, tmp_path) -> None:
    """data_parallel tables' gradients are all-reduced by a DDP of torchrec's own, inside the sharded
    EBC's lookups, which rebuilds its buckets too: the resumed run drifted in the last bits there."""
    results = run_multiprocess(_save_continue_resume, world_size=3, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"),
                               sharding=ShardingConfig(sharding_types=["data_parallel"]))
    for result in results:
        assert len(result["continued"]) == 7
        assert result["resumed"] == result["continued"]


def _dense_comm_hooks(schema_path: str) -> Dict[bool, int]:
    """Comm hooks on the dense part's DDP, with ``sharding.exact_dense_reduction`` on and off."""
    schema = DatasetSchema.load(schema_path)
    ctx = init_distributed("cpu")
    hooks = {}
    for exact in (True, False):
        sharding = ShardingConfig(sharding_types=["table_wise"], exact_dense_reduction=exact)
        model, _ = shard_model(_DLRMTask(schema), ctx.device, ctx.world_size, sharding, OPTIM, batch_size=64)
        hooks[exact] = sum(len(m._comm_hooks) for m in model.modules() if isinstance(m, nn.parallel.DistributedDataParallel))
    return hooks


def _comm_hook_kinds_with_replicated_tables(schema_path: str) -> List[bool]:
    """``per_parameter`` of every CanonicalAllReduce on a model whose tables are all ``data_parallel``."""
    from recsys_llm.train.dense_reduction import CanonicalAllReduce

    ctx = init_distributed("cpu")
    sharding = ShardingConfig(sharding_types=["data_parallel"], exact_dense_reduction=True)
    model, _ = shard_model(_DLRMTask(DatasetSchema.load(schema_path)), ctx.device, ctx.world_size, sharding, OPTIM,
                           batch_size=64)
    wrappers = {id(m): m for m in model.modules() if isinstance(m, nn.parallel.DistributedDataParallel)}
    wrappers.update({id(lookup): lookup for m in model.modules() for lookup in getattr(m, "_lookups", None) or []
                     if isinstance(lookup, nn.parallel.DistributedDataParallel)})
    return sorted(state.per_parameter for ddp in wrappers.values() for _, state in ddp._comm_hooks
                  if isinstance(state, CanonicalAllReduce))


@pytest.mark.multiprocess
def test_replicated_tables_ddps_reduce_each_gradient_on_its_own(synthetic_dir: str) -> None:
    """The dense part's DDP (one bucket) reduces its bucket in parameter order; torchrec's DDP of the replicated
    lookups, of DDP's default bucket caps, each gradient on its own."""
    kinds = run_multiprocess(_comm_hook_kinds_with_replicated_tables, world_size=3, schema_path=synthetic_dir)
    assert kinds == [[False, True]] * 3


class _LayersLastFirst(nn.Module):
    """Layers run from the last registered to the first: their gradients become ready in parameter order, so DDP
    rebuilds its bucket (first laid out in reverse parameter order) in another order after the first step."""

    def __init__(self, *layers: nn.Module) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in reversed(self.layers):
            x = layer(x).tanh()
        return x


def _grads_with_and_without_canonical_all_reduce(per_parameter: bool = False) -> List[bool]:
    """Each step's gradients under DDP's own all-reduce and under CanonicalAllReduce, of a module with a frozen
    layer between trained ones (no gradient in the bucket), over steps in which DDP rebuilds its bucket(s).
    ``per_parameter``: buckets of at most 10 floats (as torchrec's DDPs of ``data_parallel`` lookups, several
    buckets, regrouped by the rebuild), each gradient reduced on its own; the last item then says that each
    all-reduce of the last step took exactly one parameter's gradient."""
    from recsys_llm.train.dense_reduction import ONE_BUCKET_MB, CanonicalAllReduce, _hook, reduce_in_parameter_order

    ctx = init_distributed("cpu")
    grads: Dict[bool, List[List[torch.Tensor]]] = {}
    reduced_sizes: List[int] = []
    real_all_reduce = torch.distributed.all_reduce

    def recording_all_reduce(tensor: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        reduced_sizes.append(tensor.numel())
        return real_all_reduce(tensor, *args, **kwargs)

    for canonical in (False, True):
        torch.manual_seed(0)
        module = _LayersLastFirst(nn.Linear(4, 2), nn.Linear(5, 4), nn.Linear(3, 5))
        module.layers[1].requires_grad_(False)
        ddp = nn.parallel.DistributedDataParallel(module, bucket_cap_mb=40 / 2**20 if per_parameter else ONE_BUCKET_MB)
        if canonical and per_parameter:
            ddp.register_comm_hook(CanonicalAllReduce(ddp, per_parameter=True), _hook)
        elif canonical:
            reduce_in_parameter_order(ddp)
        torch.manual_seed(1 + ctx.rank)  # each rank its own batches
        grads[canonical] = []
        for _ in range(3):
            ddp.zero_grad()
            with mock.patch.object(torch.distributed, "all_reduce", recording_all_reduce):
                ddp(torch.randn(6, 3)).square().sum().backward()
            grads[canonical].append([p.grad.clone() for p in module.parameters() if p.requires_grad])
    hooked = len(ddp._comm_hooks) == 1
    same = all(torch.equal(a, b) for plain, exact in zip(grads[False], grads[True]) for a, b in zip(plain, exact))
    if not per_parameter:
        return [hooked, same]
    trained_sizes = sorted(p.numel() for p in module.parameters() if p.requires_grad)
    return [hooked, same, sorted(reduced_sizes[-len(trained_sizes):]) == trained_sizes]


@pytest.mark.multiprocess
def test_canonical_all_reduce_gives_each_parameter_ddps_average_of_its_gradients() -> None:
    """On two ranks a sum is exact whatever its order: CanonicalAllReduce must give every trained parameter the
    same mean gradient as DDP's own all-reduce, also once DDP rebuilt its bucket in another order."""
    assert run_multiprocess(_grads_with_and_without_canonical_all_reduce, world_size=2) == [[True, True]] * 2


@pytest.mark.multiprocess
def test_canonical_all_reduce_of_several_buckets_reduces_each_gradient_on_its_own() -> None:
    """torchrec wraps each data_parallel lookup in a DDP of default bucket caps, whose rebuild may regroup the
    gradients (another offset in another bucket: another order of the sum on 3+ ranks): each gradient alone."""
    assert run_multiprocess(_grads_with_and_without_canonical_all_reduce, world_size=2,
                            per_parameter=True) == [[True, True, True]] * 2


@pytest.mark.multiprocess
def test_exact_dense_reduction_can_be_switched_off_for_ddps_own_buckets(synthetic_dir: str) -> None:
    """``sharding.exact_dense_reduction=false`` keeps DDP's buckets (their all-reduces overlap the
    backward) on 3 ranks; on 2 a sum of two is exact whatever the order, so no hook is needed."""
    assert run_multiprocess(_dense_comm_hooks, world_size=3, schema_path=synthetic_dir) == [{True: 1, False: 0}] * 3
    assert run_multiprocess(_dense_comm_hooks, world_size=2, schema_path=synthetic_dir) == [{True: 0, False: 0}] * 2


def test_a_checkpoint_past_step_99_999_999_is_found_and_resumed_from(tmp_path, monkeypatch) -> None:
    """``ckpt-N`` pads N to 8 digits; a step of 9 digits must still name a complete checkpoint,
    else a long run's newest checkpoints are invisible (a resume restarts from an older one) and
    the pruning never removes them."""
    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    model = nn.Linear(2, 1)
    manager.save(model, None, TrainState(global_step=99_999_999))
    newest = manager.save(model, None, TrainState(global_step=100_000_000))
    assert manager.latest() == newest
    assert manager.list_complete() == [newest]  # the older one pruned (keep=1)
    assert manager.holds_step(100_000_000)
    assert load_checkpoint(newest, nn.Linear(2, 1)).global_step == 100_000_000


def test_keep_checkpoints_0_keeps_every_checkpoint(tmp_path, monkeypatch) -> None:
    """``train.keep_checkpoints=0`` documents "every one": none may be pruned (and the config accepts 0), while
    ``keep=1`` still keeps the newest only."""
    from recsys_llm.train.config import TrainConfig

    _state_only_dcp(monkeypatch)
    keep = TrainConfig(keep_checkpoints=0, run_dir=str(tmp_path / "run")).keep_checkpoints
    manager = CheckpointManager(str(tmp_path / "all"), keep=keep)
    model = nn.Linear(2, 1)
    saved = [manager.save(model, None, TrainState(global_step=step)) for step in (1, 2, 3)]
    assert manager.list_complete() == saved and manager.latest() == saved[-1]
    newest_only = CheckpointManager(str(tmp_path / "one"), keep=1)
    last = [newest_only.save(model, None, TrainState(global_step=step)) for step in (1, 2, 3)][-1]
    assert newest_only.list_complete() == [last]


@pytest.mark.parametrize("text", ["[]", "null", "7"])
def test_a_train_state_that_is_no_json_object_is_named_as_damaged(tmp_path, text: str) -> None:
    path = _write_fake(str(tmp_path), "ckpt-00000010", complete=True)
    state_file = os.path.join(path, "train_state.json")
    with open(state_file, "w", encoding="utf-8") as handle:
        handle.write(text)
    with pytest.raises(ValueError) as info:
        read_train_state(path)
    assert str(info.value).startswith(f"{state_file}: "), str(info.value)


def test_a_checkpoint_copied_under_another_name_loads(tmp_path, monkeypatch) -> None:
    """``cp -r runs/x/best/ckpt-00000003 models/deepfm_v1``: a complete checkpoint under a name of its
    own loads (``evaluate`` / ``export --checkpoint models/deepfm_v1``); it was refused as "missing
    train_state.json or a .tmp directory" while holding train_state.json. A ``.tmp`` directory (a save
    in progress) is still refused."""
    import shutil

    _state_only_dcp(monkeypatch)
    model = nn.Linear(2, 1)
    checkpoint = CheckpointManager(str(tmp_path / "run")).save(model, None, TrainState(global_step=3))
    copy = shutil.copytree(checkpoint, str(tmp_path / "models" / "deepfm_v1"))
    loaded = nn.Linear(2, 1)
    assert load_checkpoint(copy, loaded, restore_rng=False).global_step == 3
    assert torch.equal(loaded.weight, model.weight)
    in_progress = shutil.copytree(checkpoint, str(tmp_path / "run" / "ckpt-00000004.tmp"))
    with pytest.raises(FileNotFoundError, match=r"ckpt-00000004\.tmp: not a complete checkpoint"):
        load_checkpoint(in_progress, nn.Linear(2, 1))


@pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
def test_a_checkpoint_without_its_hidden_metadata_file_says_so(tmp_path, monkeypatch) -> None:
    """``cp ckpt/* copy/`` leaves the hidden ``.metadata`` behind: the error names the file, says what
    it is and how the copy lost it, not only "[Errno 2] No such file or directory"."""
    _state_only_dcp(monkeypatch)
    checkpoint = CheckpointManager(str(tmp_path)).save(nn.Linear(2, 1), None, TrainState(global_step=3))
    os.remove(os.path.join(checkpoint, ".metadata"))
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(checkpoint, nn.Linear(2, 1))
    message = str(error.value)
    assert message.startswith(os.path.join(checkpoint, ".metadata") + ": missing") and "\n" not in message
    assert "cp -r" in message and "delete its checkpoint directory" in message
    os.mkfifo(os.path.join(checkpoint, ".metadata"))  # a read would wait for good: named as what it is
    with pytest.raises(ValueError, match=rf"^{re.escape(os.path.join(checkpoint, '.metadata'))}: cannot be read back "
                                         r"\(a named pipe \(FIFO\), expected the checkpoint's index of its tensors"):
        load_checkpoint(checkpoint, nn.Linear(2, 1))
    os.remove(os.path.join(checkpoint, ".metadata"))
    os.symlink(str(tmp_path / "gone"), os.path.join(checkpoint, ".metadata"))  # damage, not a copy that left it out
    with pytest.raises(ValueError, match=rf"^{re.escape(os.path.join(checkpoint, '.metadata'))}: cannot be read back "
                                         rf"\(a dangling symbolic link \(to {re.escape(str(tmp_path / 'gone'))}\)"):
        load_checkpoint(checkpoint, nn.Linear(2, 1))


def test_an_rng_file_that_is_no_file_is_named_as_what_it_is(tmp_path, monkeypatch) -> None:
    """rank<N>.pt as a directory or a dangling link was reported "missing"."""
    _state_only_dcp(monkeypatch)
    path = CheckpointManager(str(tmp_path), keep=1).save(nn.Linear(2, 1), None, TrainState(global_step=1))
    rng_file = os.path.join(path, "rank00000.pt")
    os.remove(rng_file)
    os.symlink(str(tmp_path / "gone.pt"), rng_file)
    os.remove(os.path.join(path, DIGESTS_FILE))
    with pytest.raises(ValueError, match=rf"^{re.escape(rng_file)}: cannot be read back \(a dangling symbolic link \(to "
                                         rf"{re.escape(str(tmp_path / 'gone.pt'))}\)\)"):
        load_checkpoint(path, nn.Linear(2, 1))


def test_a_kill_while_pruning_leaves_no_half_deleted_checkpoint_that_looks_complete(tmp_path, monkeypatch) -> None:
    """Pruning removed ``ckpt-N`` in place: a kill after its shards but before ``train_state.json``
    were gone left a checkpoint that loaders took as complete (and that nothing removed)."""
    from recsys_llm.train import checkpoint

    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    model = nn.Linear(2, 1)
    manager.save(model, None, TrainState(global_step=10))
    rmtree = shutil.rmtree

    def killed_after_the_shards(path: Any, ignore_errors: bool = False) -> None:
        for name in os.listdir(path):
            if name != "train_state.json":
                os.remove(os.path.join(path, name))
        raise _KilledMidSave(path)

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed_after_the_shards)
    with pytest.raises(_KilledMidSave):
        manager.save(model, None, TrainState(global_step=20))
    monkeypatch.setattr(checkpoint.shutil, "rmtree", rmtree)
    assert manager.list_complete() == [str(tmp_path / "ckpt-00000020")]
    assert not is_complete(str(tmp_path / "ckpt-00000010"))
    manager.save(model, None, TrainState(global_step=30))  # the next save removes the leftover
    assert sorted(os.listdir(tmp_path)) == ["ckpt-00000030", "latest"]


def test_a_cpu_checkpoint_resumed_on_gpus_gives_each_ranks_gpu_a_stream_of_its_own(monkeypatch) -> None:
    """A CPU job's RNG files hold no CUDA state: the GPU job that resumed it kept every rank's GPU stream at
    train.seed's, so all ranks drew the same dropout masks. The GPU stream is now seeded from the rank's own CPU
    state (no GPU here: torch.cuda's two calls are stood in for)."""
    from recsys_llm.train import checkpoint

    states = []
    for rank_seed in (0, 1):  # two ranks' CPU states
        torch.manual_seed(rank_seed)
        states.append(checkpoint._rng_state())
    seeds = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda state: pytest.fail("a CPU checkpoint has no CUDA state"))
    for state in states + states[:1]:
        checkpoint._set_rng_state(state)
    assert seeds[0] != seeds[1] and seeds[0] == seeds[2]  # per rank, and the same on a second resume
    assert torch.equal(torch.get_rng_state(), states[0]["torch"])  # the CPU stream is the saved one, no draw taken


def test_a_checkpoint_pruned_while_it_loads_is_named_as_removed_not_damaged(tmp_path, monkeypatch) -> None:
    """`evaluate` / `export` of a run still training: its trainer pruned the checkpoint they had resolved, and the
    load said 'a damaged or incomplete checkpoint; delete its checkpoint directory'."""
    from recsys_llm.train import checkpoint as module

    _state_only_dcp(monkeypatch)
    saved = CheckpointManager(str(tmp_path)).save(nn.Linear(2, 1), None, TrainState(global_step=3))
    read_metadata = module.SafeFileSystemReader.read_metadata

    def pruned_meanwhile(reader):
        shutil.rmtree(saved)  # what the trainer's prune does between the command's resolve and its read
        return read_metadata(reader)

    monkeypatch.setattr(module.SafeFileSystemReader, "read_metadata", pruned_meanwhile)
    with pytest.raises(FileNotFoundError) as error:
        load_checkpoint(saved, nn.Linear(2, 1))
    message = str(error.value)
    assert message.startswith(f"{saved}: removed while this job read it, by the training job"), message
    assert "damaged" not in message and "delete" not in message
    with pytest.raises(FileNotFoundError) as error:  # gone before the load starts: maybe never there (a typo)
        load_checkpoint(saved, nn.Linear(2, 1))
    assert str(error.value).startswith(f"{saved}: no such checkpoint directory (if a training job runs"), error.value


def test_a_cpu_checkpoint_of_a_later_step_gives_the_gpu_another_stream(monkeypatch) -> None:
    """Two resumes of one rank at other steps (its CPU stream advanced) seed its GPU stream otherwise: a seed of the
    rank alone (torch.initial_seed()) replayed the same dropout masks after every resume."""
    from recsys_llm.train import checkpoint

    torch.manual_seed(0)
    early = checkpoint._rng_state()
    torch.rand(100)
    later = checkpoint._rng_state()
    seeds = []
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "manual_seed", seeds.append)
    for state in (early, later):
        checkpoint._set_rng_state(state)
    assert seeds[0] != seeds[1], seeds


def test_a_resume_restores_the_numpy_and_python_rng_streams_too(tmp_path, monkeypatch) -> None:
    """Exact continuation restores every RNG a training step may draw from (a data transform or a plug-in drawing
    from numpy's or Python's global RNG drew other numbers after a resume), with the second Gaussian of a pair
    that numpy and Python keep for their next Gaussian draw."""
    import random

    import numpy as np

    _state_only_dcp(monkeypatch)
    saved_model, loaded_model = nn.Linear(2, 1), nn.Linear(2, 1)
    random.seed(1)
    np.random.seed(2)
    torch.manual_seed(3)
    random.gauss(0.0, 1.0)  # each leaves its pair's second value for the next Gaussian draw
    np.random.standard_normal()
    checkpoint = CheckpointManager(str(tmp_path)).save(saved_model, None, TrainState(global_step=1))

    def draws() -> List[Any]:
        return [random.gauss(0.0, 1.0), random.random(), float(np.random.standard_normal()), float(np.random.rand()),
                torch.rand(2).tolist()]

    expected = draws()
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)
    load_checkpoint(checkpoint, loaded_model)
    assert draws() == expected


@pytest.mark.parametrize("name", ["__0_0.distcp", "rank00000.pt", ".metadata"])
def test_a_flipped_byte_in_a_saved_file_is_refused_naming_it(tmp_path, monkeypatch, name) -> None:
    """DCP keeps no checksums: a byte flipped in a tensor's bytes would load as a wrong weight. The sha256 of
    every file, recorded at save, catches it before anything loads."""
    _state_only_dcp(monkeypatch)
    manager = CheckpointManager(str(tmp_path), keep=1)
    path = manager.save(nn.Linear(2, 1), None, TrainState(global_step=1))
    target = os.path.join(path, name)
    if not os.path.isfile(target):
        pytest.skip(f"no {name} in this checkpoint")
    _flip_a_byte(target)
    with pytest.raises(ValueError, match="sha256 differs from the one files.sha256.json recorded") as refused:
        load_checkpoint(path, nn.Linear(2, 1))
    assert str(refused.value).startswith(f"{target}: cannot be read back"), refused.value


def test_a_checkpoint_missing_its_rng_file_is_refused_not_resumed_with_other_random_streams(tmp_path,
                                                                                            monkeypatch) -> None:
    """Every rank writes rank<N>.pt: a checkpoint without this rank's (a partial copy) would resume with the
    random streams of the new process, not the saved ones: the resume is not exact, so it is refused, naming it."""
    _state_only_dcp(monkeypatch)
    path = CheckpointManager(str(tmp_path), keep=1).save(nn.Linear(2, 1), None, TrainState(global_step=1))
    os.remove(os.path.join(path, "rank00000.pt"))
    os.remove(os.path.join(path, DIGESTS_FILE))  # a copy without the file records no digest of it either
    with pytest.raises(ValueError, match=re.escape(os.path.join(path, "rank00000.pt"))):
        load_checkpoint(path, nn.Linear(2, 1))
    load_checkpoint(path, nn.Linear(2, 1), restore_rng=False)  # asked not to restore them: loads


def test_a_set_aside_copy_whose_step_was_saved_again_is_removed_by_the_next_start(tmp_path) -> None:
    """Killed after the new ckpt-N's rename but before the removal of ckpt-N.prev: the copy set aside is superseded
    (the whole ckpt-N is there) and goes, not left to hold a checkpoint's disk space for good."""
    directory = str(tmp_path)
    final = _write_fake(directory, "ckpt-00000010", complete=True)
    _write_fake(directory, "ckpt-00000010.prev", complete=True)
    CheckpointManager(directory).complete_interrupted_save()
    assert sorted(os.listdir(directory)) == ["ckpt-00000010", "latest"]
    assert CheckpointManager(directory).latest() == final


def test_checkpoint_manager_options_are_keyword_only_and_checked(tmp_path):
    """CheckpointManager(dir, True) / (dir, "3") / (dir, print) kept any value as keep."""
    with pytest.raises(TypeError, match="positional"):
        CheckpointManager(str(tmp_path), 3)
    for bad in (True, -1, "3"):
        with pytest.raises(ValueError, match="CheckpointManager: keep must be an integer >= 0"):
            CheckpointManager(str(tmp_path), keep=bad)
    with pytest.raises(TypeError, match="CheckpointManager: before_save must be a callable"):
        CheckpointManager(str(tmp_path), before_save="note")


def _save_without_world_size_then_resume(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    """Saves ``TrainState(global_step=1)`` as usage.md's example builds it (no ``world_size``), then loads it into a
    fresh model with its RNG moved on: the next draws must be those after the save."""
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    _losses(model, optimizer, reader, skip=0, stop=1)
    CheckpointManager(ckpt_dir, keep=1).save(model, optimizer, TrainState(step_in_epoch=1, global_step=1))
    after_save = torch.rand(4)
    _, model2, optimizer2 = _fresh(schema, seed=123)
    state = load_checkpoint(CheckpointManager(ckpt_dir).latest(), model2, optimizer2)
    return {"world_size": state.world_size, "same_draws": torch.equal(torch.rand(4), after_save)}


@pytest.mark.multiprocess
def test_a_save_records_the_ranks_that_wrote_it_so_a_resume_restores_their_rng(synthetic_dir: str,
                                                                                tmp_path) -> None:
    """A TrainState built without ``world_size`` (default 1) on 2 ranks was saved as a 1-rank checkpoint, and its
    resume on the same 2 ranks silently skipped the RNG states: dropout drew otherwise than the uninterrupted run."""
    results = run_multiprocess(_save_without_world_size_then_resume, world_size=2, schema_path=synthetic_dir,
                               ckpt_dir=str(tmp_path / "checkpoints"))
    assert [(r["world_size"], r["same_draws"]) for r in results] == [(2, True), (2, True)]


def test_checkpoint_manager_keeps_every_checkpoint_with_keep_zero(tmp_path):
    """keep=0 is a setting of its own (every checkpoint kept), not refused; a numpy integer is stored as an int."""
    import numpy as np

    assert CheckpointManager(str(tmp_path), keep=0)._keep == 0
    kept = CheckpointManager(str(tmp_path), keep=np.int64(2))._keep
    assert kept == 2 and type(kept) is int


def _resume_from_a_checkpoint_before_the_first_step(schema_path: str, ckpt_dir: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _fresh(schema, seed=0)
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True, seed=3)
    manager = CheckpointManager(ckpt_dir, keep=1)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=0, global_step=0, world_size=ctx.world_size,
                                              batch_size=64))
    continued = _losses(model, optimizer, reader, skip=0, stop=4)
    _, model2, optimizer2 = _fresh(schema, seed=123)
    state = load_checkpoint(manager.latest(), model2, optimizer2)
    resumed = _losses(model2, optimizer2, reader, skip=state.step_in_epoch, stop=4)
    sgd_manager = CheckpointManager(os.path.join(ckpt_dir, "sgd"), keep=1)
    _, sgd_model, sgd_optimizer = _fresh(schema, seed=0, optim=dataclasses.replace(OPTIM, dense="sgd"))
    _losses(sgd_model, sgd_optimizer, reader, skip=0, stop=2)
    sgd_manager.save(sgd_model, sgd_optimizer, TrainState(epoch=0, step_in_epoch=2, global_step=2,
                                                          world_size=ctx.world_size, batch_size=64))

    def refusal(path: str) -> Optional[str]:  # of a load with the default (Adam) dense optimizer
        _, model, optimizer = _fresh(schema, seed=123)
        try:
            load_checkpoint(path, model, optimizer)
        except ValueError as error:
            return str(error)
        return None

    # a loop of one's own that never sets global_step (TrainState defaults it to 0), after steps
    own_manager = CheckpointManager(os.path.join(ckpt_dir, "own"), keep=1)
    own_manager.save(sgd_model, sgd_optimizer, TrainState(epoch=0, step_in_epoch=2, world_size=ctx.world_size,
                                                          batch_size=64))
    return {"continued": continued, "resumed": resumed, "refusal": refusal(sgd_manager.latest()),
            "sgd_path": sgd_manager.latest(), "own_refusal": refusal(own_manager.latest()),
            "own_path": own_manager.latest()}


@pytest.mark.multiprocess
def test_a_checkpoint_written_before_the_first_optimizer_step_resumes_exactly(synthetic_dir: str, tmp_path) -> None:
    """Adam had no state at all before its first step: the load asked for it anyway and called the checkpoint one
    of another model. After steps, a dense optimizer without any saved state is named as such."""
    (result,) = run_multiprocess(_resume_from_a_checkpoint_before_the_first_step, world_size=1,
                                 schema_path=synthetic_dir, ckpt_dir=str(tmp_path / "checkpoints"))
    assert len(result["continued"]) == 4
    assert result["resumed"] == result["continued"]
    assert result["refusal"] is not None and result["refusal"].startswith(f"{result['sgd_path']}: holds no optimizer "
                                                                          "state for 'dlrm.")
    assert "that this job's Adam keeps state for, although it was written after optimizer steps" in result["refusal"]
    assert "another optim.dense or optim.sparse, such as sgd" in result["refusal"]
    assert "no gradient had reached any of these parameters by the save" in result["refusal"]


@pytest.mark.multiprocess
def test_a_checkpoint_without_global_step_after_steps_is_not_taken_for_one_before_the_first_step(
        synthetic_dir: str, tmp_path) -> None:
    """``TrainState(epoch=0, step_in_epoch=2)`` of a loop of one's own leaves ``global_step`` at its default 0: the
    load took that for a checkpoint written before the first step and gave an SGD-trained checkpoint fresh Adam
    state without a word."""
    (result,) = run_multiprocess(_resume_from_a_checkpoint_before_the_first_step, world_size=1,
                                 schema_path=synthetic_dir, ckpt_dir=str(tmp_path / "checkpoints"))
    assert result["own_refusal"] is not None
    assert result["own_refusal"].startswith(f"{result['own_path']}: holds no optimizer state for 'dlrm.")


def test_dcp_coordinates_on_the_host_group(tmp_path, monkeypatch) -> None:
    """DCP's plans and metadata are object collectives: under NCCL they go over ``host_group()`` (gloo, in host
    memory), not pickled onto each rank's GPU through the default NCCL group at every save and load."""
    from recsys_llm.train import checkpoint

    _state_only_dcp(monkeypatch)
    host = object()  # stands in for the gloo group host_group() makes under NCCL
    monkeypatch.setattr(checkpoint, "host_group", lambda: host)
    groups: List[Any] = []
    save, load = checkpoint.dcp.save, checkpoint.dcp.load

    def recording(real: Callable[..., Any]) -> Callable[..., Any]:
        def call(*args: Any, process_group: Any = None, **kwargs: Any) -> Any:
            groups.append(process_group)
            return real(*args, **kwargs)  # the one process's own default
        return call

    monkeypatch.setattr(checkpoint.dcp, "save", recording(save))
    monkeypatch.setattr(checkpoint.dcp, "load", recording(load))
    model = nn.Linear(2, 1)
    path = CheckpointManager(str(tmp_path), keep=1).save(model, None, TrainState(global_step=1))
    load_checkpoint(path, nn.Linear(2, 1), restore_rng=False)
    assert groups == [host, host]


class _LinearWithScale(nn.Linear):
    """A Linear(2, 2) with one more weight, ``scale``, that a checkpoint of a plain Linear(2, 2) lacks."""

    def __init__(self) -> None:
        super().__init__(2, 2)
        self.scale = nn.Parameter(torch.full((2,), 3.0))


def test_load_checkpoint_only_loads_the_keys_asked_for_and_names_the_ones_it_cannot(tmp_path) -> None:
    """``load_checkpoint(only=...)`` (``train.init_scope=tables``): the keys of ``only`` come from the checkpoint, the
    model's other weights stay as they were. A key the model lacks was dropped silently (nothing loaded, the run
    starting from fresh weights it took for trained ones); a key the checkpoint lacks, likewise."""
    import torch.distributed.checkpoint as dcp

    saved = nn.Linear(2, 2)
    path = tmp_path / "ckpt-00000001"
    dcp.save({"model": saved.state_dict()}, checkpoint_id=str(path), no_dist=True)
    (path / "train_state.json").write_text(TrainState(global_step=1).to_json(), encoding="utf-8")
    target = _LinearWithScale()
    bias, scale = target.bias.detach().clone(), target.scale.detach().clone()
    load_checkpoint(str(path), target, restore_rng=False, only=["weight"])
    assert torch.equal(target.weight, saved.weight) and not torch.equal(target.bias, saved.bias)
    assert torch.equal(target.bias, bias) and torch.equal(target.scale, scale)
    with pytest.raises(ValueError, match=r"asked to load \['nope'\], which this model does not have"):
        load_checkpoint(str(path), target, restore_rng=False, only=["weight", "nope"])
    with pytest.raises(ValueError, match=r"holds no \['scale'\] to load \(a checkpoint of another model\)"):
        load_checkpoint(str(path), target, restore_rng=False, only=["scale"])
    assert torch.equal(target.scale, scale) and torch.equal(target.bias, bias)
