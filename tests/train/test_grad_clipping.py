"""``optim.max_grad_norm``: the dense step clips the dense gradients' global L2 norm; the tables are not clipped."""

import os
from typing import Any, Dict

import pytest
import torch
from torchrec.optim.optimizers import in_backward_optimizer_filter

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.pipeline import train_epoch
from recsys_llm.train.sharding import build_optimizer, dense_gradient_norm, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess
from tests.train.test_train_runner import DEEPFM_CONFIG

LR = 0.5


def _local_tables(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """This rank's shards of every table weight, as plain tensors."""
    tables = {}
    for key, value in model.state_dict().items():
        if "embedding_bags" in key and key.endswith(".weight"):
            shards = value.local_shards() if hasattr(value, "local_shards") else []
            tables[key] = torch.cat([shard.tensor.flatten() for shard in shards]) if shards else torch.empty(0)
    return tables


def _one_step(schema_dir: str, max_grad_norm: float) -> Dict[str, Any]:
    """One SGD step (lr ``LR``) of a sharded DeepFM: the L2 norm of its dense weights' change, and its tables."""
    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    optim = OptimizerConfig(sparse="sgd", sparse_lr=LR, dense="sgd", dense_lr=LR, max_grad_norm=max_grad_norm)
    model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(), optim, batch_size=64)
    optimizer = build_optimizer(model, optim)
    norm_before_any_step = dense_gradient_norm(optimizer)
    dense = {name: param for name, param in in_backward_optimizer_filter(model.named_parameters())
             if param.requires_grad and "embedding_bags" not in name}
    before = {name: param.detach().clone() for name, param in dense.items()}
    reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    train_epoch(model, optimizer, list(reader)[:1], ctx.device, progress=False)
    change = torch.cat([(dense[name].detach() - before[name]).flatten() for name in dense])
    return {"dense_change_norm": float(change.norm()), "tables": _local_tables(model),
            "grad_norm": dense_gradient_norm(optimizer), "grad_norm_before_any_step": norm_before_any_step}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2])
def test_the_dense_step_is_clipped_to_max_grad_norm_and_the_tables_are_not(synthetic_dir: str,
                                                                          world_size: int) -> None:
    """With SGD a step moves the dense weights by lr x the gradient: by lr x max_grad_norm when clipped. The
    gradients are the ranks' average (DDP), so every rank clips alike. The tables' fused SGD steps in the backward,
    before and outside the clipping: they end the step as without it."""
    clipped = run_multiprocess(_one_step, world_size=world_size, schema_dir=synthetic_dir, max_grad_norm=1e-3)
    free = run_multiprocess(_one_step, world_size=world_size, schema_dir=synthetic_dir, max_grad_norm=0.0)
    for rank in range(world_size):
        assert free[rank]["dense_change_norm"] > 10 * LR * 1e-3  # the gradient is far above the bound
        assert clipped[rank]["dense_change_norm"] == pytest.approx(LR * 1e-3, rel=1e-3)
        tables = clipped[rank]["tables"]
        assert tables and tables.keys() == free[rank]["tables"].keys()
        assert all(torch.equal(tables[key], free[rank]["tables"][key]) for key in tables)
        # the recorded norm is the gradient's before clipping: the unclipped SGD step is lr x that gradient
        assert clipped[rank]["grad_norm"] == pytest.approx(free[rank]["dense_change_norm"] / LR, rel=1e-3)
        assert clipped[rank]["grad_norm_before_any_step"] is None
        assert free[rank]["grad_norm"] is None and free[rank]["grad_norm_before_any_step"] is None


def test_max_grad_norm_must_be_a_finite_number_at_least_0() -> None:
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match=r"optim.max_grad_norm must be a finite number >= 0"):
            OptimizerConfig(max_grad_norm=bad)


def _train_records(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.config import load_config
    from recsys_llm.train.run_records import read_metrics
    from recsys_llm.train.runner import run_training

    out = {}
    for name, bound in (("clipped", 0.05), ("free", 0.0)):
        run_dir = os.path.join(root, name)
        run_training(load_config(DEEPFM_CONFIG, [
            f"data.schema={schema_dir}", "data.batch_size=128", "data.synthetic_rows=0", "train.epochs=1",
            "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}", f"optim.max_grad_norm={bound}"]))
        out[name] = [e for e in read_metrics(run_dir) if e["event"] == "train"]
    return out


@pytest.mark.multiprocess
def test_a_clipped_run_records_the_dense_gradient_norm(synthetic_dir: str, tmp_path) -> None:
    """metrics.jsonl's train records carry the step's dense gradient norm before clipping (Hugging Face's
    grad_norm), where clipping computes it."""
    (out,) = run_multiprocess(_train_records, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert out["clipped"] and all(0 < record["grad_norm"] < float("inf") for record in out["clipped"]), out
    assert out["free"] and not any("grad_norm" in record for record in out["free"])
