"""``train.mixed_precision=bf16``: training forwards under bfloat16 autocast, float32 weights and evaluation."""

import os
from types import SimpleNamespace
from typing import Any, Dict, List

import pytest
import torch

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.config import ConfigError, TrainConfig, load_config
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.mixed_precision import autocast_dtype
from recsys_llm.train.pipeline import evaluate, train_epoch
from recsys_llm.train.run_records import read_metrics
from recsys_llm.train.runner import run_training
from recsys_llm.train.sharding import build_optimizer, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess
from tests.train.test_train_runner import _kill_at, _Killed

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def test_mixed_precision_names_its_choices(tmp_path) -> None:
    assert autocast_dtype("fp32", torch.device("cpu")) is None
    assert autocast_dtype("bf16", torch.device("cpu")) is torch.bfloat16
    with pytest.raises(ValueError, match=r"train.mixed_precision='fp16' \(must be one of fp32, bf16; fp16 would need a "
                                         r"gradient scaler"):
        TrainConfig(mixed_precision="fp16")
    with pytest.raises(ConfigError, match=r"train.mixed_precision='float16' \(must be one of fp32, bf16\)"):
        load_config(DEEPFM_CONFIG, ["train.mixed_precision=float16", f"train.run_dir={tmp_path / 'run'}"])


def test_bf16_is_refused_on_a_gpu_that_only_emulates_it(monkeypatch) -> None:
    # a V100 / T4 (compute capability 7.x): torch.cuda.is_bf16_supported() says True by default there (bfloat16
    # tensors can be made), but it has no bfloat16 arithmetic; an A100 (8.0) has
    major = {"value": 7}
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
                        or major["value"] >= 8)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: SimpleNamespace(major=major["value"]))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    with pytest.raises(ConfigError, match=r"train.mixed_precision=bf16: Tesla V100-SXM2-16GB has no bfloat16 "):
        autocast_dtype("bf16", torch.device("cuda", 0))
    assert autocast_dtype("fp32", torch.device("cuda", 0)) is None
    major["value"] = 8
    assert autocast_dtype("bf16", torch.device("cuda", 0)) is torch.bfloat16


def _one_epoch(schema_dir: str, dtype: Any, device: str = "cpu") -> Dict[str, Any]:
    """One epoch of a 1-rank sharded DeepFM with ``autocast_dtype=dtype``, then an evaluation: the dtypes of its
    Linear layers' outputs in training and in evaluation, of the weights and of the dense optimizer's state."""
    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    ctx = init_distributed(device)
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=128)
    optimizer = build_optimizer(model, OptimizerConfig())
    seen: Dict[str, List[torch.dtype]] = {"train": [], "eval": []}

    def record(module: torch.nn.Module, inputs: Any, output: Any) -> None:
        if isinstance(output, torch.Tensor):  # not the pipeline's fx trace
            seen["train" if module.training else "eval"].append(output.dtype)

    linears = [m for m in model.module.model.modules() if isinstance(m, torch.nn.Linear)]
    assert linears
    for linear in linears:
        linear.register_forward_hook(record)
    stats = train_epoch(model, optimizer, list(ParquetBatchReader(schema, "train", 128))[:20], ctx.device,
                        progress=False, autocast_dtype=dtype)
    results = evaluate(model, ParquetBatchReader(schema, "valid", 512), ctx.device, CTRMetrics(), progress=False)
    dense_state = [value.dtype for state in optimizer.state.values() for value in state.values()
                   if isinstance(value, torch.Tensor) and value.is_floating_point() and value.dim() > 0]
    return {"train": set(seen["train"]), "eval": set(seen["eval"]), "loss": stats.mean_loss, "auc": results["auc"],
            "weights": {p.dtype for p in model.parameters()}, "optimizer_state": set(dense_state)}


def check_autocast_in_training_only(bf16: Dict[str, Any], fp32: Dict[str, Any]) -> None:
    """What :func:`_one_epoch` gives with ``torch.bfloat16`` and with None: the CPU test's and the CUDA test's."""
    assert bf16["train"] == {torch.bfloat16} and fp32["train"] == {torch.float32}
    assert bf16["eval"] == fp32["eval"] == {torch.float32}
    assert bf16["weights"] == bf16["optimizer_state"] == {torch.float32}, bf16
    assert bf16["loss"] != fp32["loss"] and bf16["loss"] == pytest.approx(fp32["loss"], abs=0.01)
    assert bf16["auc"] == pytest.approx(fp32["auc"], abs=0.02)


@pytest.mark.multiprocess
def test_train_epoch_runs_its_forwards_under_autocast_and_evaluates_in_float32(synthetic_dir: str) -> None:
    (bf16,) = run_multiprocess(_one_epoch, world_size=1, schema_dir=synthetic_dir, dtype=torch.bfloat16)
    (fp32,) = run_multiprocess(_one_epoch, world_size=1, schema_dir=synthetic_dir, dtype=None)
    check_autocast_in_training_only(bf16, fp32)


def _straight_resumed_and_fp32(schema_dir: str, root: str) -> Dict[str, Any]:
    """Epoch losses of a bf16 run, of one killed mid-epoch and resumed, and of an fp32 run; the refusal of a
    resume in fp32."""
    def overrides(run_dir: str, precision: str) -> List[str]:
        return [f"data.schema={schema_dir}", "data.batch_size=128", "data.eval_batch_size=1024",
                "data.synthetic_rows=0", "train.epochs=2", "train.patience=0", "train.checkpoint_every=10",
                "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}",
                f"train.mixed_precision={precision}"]

    out: Dict[str, Any] = {}
    for how, precision in (("straight", "bf16"), ("resumed", "bf16"), ("fp32", "fp32")):
        run_dir = os.path.join(root, how)
        config = load_config(DEEPFM_CONFIG, overrides(run_dir, precision))
        if how == "resumed":
            with pytest.raises(_Killed):
                run_training(config, on_step=_kill_at(20))
        results = run_training(config)
        out[f"{how}_auc"], out[f"{how}_recorded"] = results["test"]["auc"], results["mixed_precision"]
        out[how] = [e["mean_loss"] for e in read_metrics(run_dir) if e["event"] == "epoch"]
        out[f"{how}_started"] = [e.get("mixed_precision") for e in read_metrics(run_dir) if e["event"] == "started"]
    from recsys_llm.cli.export import export_run

    exported = export_run(load_config(DEEPFM_CONFIG, overrides(os.path.join(root, "straight"), "bf16")),
                          os.path.join(root, "straight"), os.path.join(root, "export"))
    out["export"] = {"program": exported.get("mixed_precision"),
                     "trained": exported.get("metadata", {}).get("training_mixed_precision")}
    exported = export_run(load_config(DEEPFM_CONFIG, overrides(os.path.join(root, "straight"), "bf16")),
                          os.path.join(root, "straight"), os.path.join(root, "export_bf16"), mixed_precision="bf16")
    out["export_bf16"] = exported.get("mixed_precision")
    try:
        run_training(load_config(DEEPFM_CONFIG, overrides(os.path.join(root, "straight"), "fp32")
                                 + ["train.epochs=3"]))
        out["refusal"] = ""
    except ConfigError as error:
        out["refusal"] = str(error)
    return out


@pytest.mark.multiprocess
def test_a_bf16_run_on_two_ranks_resumes_exactly_and_keeps_its_precision(synthetic_dir: str, tmp_path) -> None:
    out, _ = run_multiprocess(_straight_resumed_and_fp32, world_size=2, schema_dir=synthetic_dir, root=str(tmp_path))
    assert len(out["straight"]) == 2 and out["resumed"] == out["straight"], out
    assert out["straight"] != out["fp32"] and out["straight"] == pytest.approx(out["fp32"], abs=0.01), out
    assert out["straight_auc"] == pytest.approx(out["fp32_auc"], abs=0.02) and out["straight_auc"] > 0.55, out
    assert "train.mixed_precision: 'bf16' -> 'fp32'" in out["refusal"], out["refusal"]
    # results.json and the started event say what the run's samples/s were trained in
    assert out["straight_recorded"] == out["resumed_recorded"] == "bf16" and out["fp32_recorded"] == "fp32"
    assert out["straight_started"] == ["bf16"] and out["fp32_started"] == ["fp32"], out
    assert out["export"] == {"program": "fp32", "trained": "bf16"}  # served in float32 unless asked
    assert out["export_bf16"] == "bf16"  # export_run hands --mixed-precision on to export_task


def test_a_run_on_a_gpu_without_bf16_arithmetic_is_refused_before_anything_is_written(tmp_path, monkeypatch) -> None:
    """``run_training`` checks ``bf16`` against the device the run trains on (the rank's GPU), not the CPU."""
    import recsys_llm.semantics.model_loading as model_loading
    import recsys_llm.train.runner as runner

    monkeypatch.setattr(runner, "init_distributed", lambda device: SimpleNamespace(
        device=torch.device("cuda", 0), rank=0, world_size=1, is_main=True))
    monkeypatch.setattr(model_loading, "computes_in_bf16", lambda device: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla T4")
    config = load_config(DEEPFM_CONFIG, ["train.mixed_precision=bf16", f"train.run_dir={tmp_path / 'run'}"])
    with pytest.raises(ConfigError, match=r"train.mixed_precision=bf16: Tesla T4 has no bfloat16 arithmetic"):
        run_training(config)
    assert not (tmp_path / "run").exists()
