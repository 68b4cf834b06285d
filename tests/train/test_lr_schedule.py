"""optim.lr_warmup_steps / lr_decay_start / lr_decay_steps: torchrec's DLRM example's learning-rate policy, on the
fused table optimizers and the dense one alike, exact across a resume."""

import json
import os
from typing import Any, Dict, List

import pytest
import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

from recsys_llm.train.config import load_config
from recsys_llm.train.lr_schedule import LRSchedule
from recsys_llm.train.runner import run_training
from recsys_llm.train.sharding_config import OptimizerConfig
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCHEDULE = ["optim.lr_warmup_steps=5", "optim.lr_decay_start=12", "optim.lr_decay_steps=8"]
SPARSE_LR, DENSE_LR = 0.05, 0.002


def test_the_factors_warm_up_hold_decay_and_keep_their_last_value() -> None:
    schedule = LRSchedule(warmup_steps=4, decay_start=6, decay_steps=4)
    assert [schedule.scale(step) for step in range(12)] == [
        0.25, 0.5, 0.75, 1.0, 1.0, 1.0, 1.0, 0.5625, 0.25, 0.0625, 0.0625, 0.0625]
    assert LRSchedule().constant and LRSchedule().scale(10**9) == 1.0
    assert [LRSchedule(decay_steps=2).scale(step) for step in range(3)] == [1.0, 0.25, 0.25]


@pytest.mark.parametrize("settings, message", [
    ({"lr_warmup_steps": -1}, r"optim\.lr_warmup_steps must be an integer >= 0, got -1"),
    ({"lr_decay_steps": 1.5}, r"optim\.lr_decay_steps must be an integer"),
    ({"lr_decay_start": 100}, r"optim\.lr_decay_start=100 without optim\.lr_decay_steps: no decay would start"),
    ({"lr_warmup_steps": 10, "lr_decay_start": 5, "lr_decay_steps": 5},
     r"optim\.lr_decay_start=5 is within the warmup \(optim\.lr_warmup_steps=10\)"),
    ({"lr_warmup_steps": 10, "lr_decay_start": 9, "lr_decay_steps": 5},  # the warmup's last step is within it
     r"optim\.lr_decay_start=9 is within the warmup \(optim\.lr_warmup_steps=10\)"),
])
def test_bad_settings_are_named(settings: Dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        OptimizerConfig(**settings)


def test_a_decay_starting_right_after_the_warmup_is_allowed() -> None:
    schedule = OptimizerConfig(lr_warmup_steps=10, lr_decay_start=10, lr_decay_steps=5).lr_schedule
    assert [schedule.scale(step) for step in (8, 9, 10, 11)] == pytest.approx([0.9, 1.0, 1.0, 0.64])


def _run(schema_dir: str, run_dir: str, extra: List[str], on_step=None) -> Dict[str, Any]:
    overrides = [f"data.schema={schema_dir}", "data.batch_size=256", "data.eval_batch_size=1024",
                 "data.synthetic_rows=0", "train.epochs=3", "train.patience=0", "train.progress=false",
                 f"train.run_dir={run_dir}", f"optim.sparse_lr={SPARSE_LR}", f"optim.dense_lr={DENSE_LR}",
                 "optim.dense=adam", *extra]
    return run_training(load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"), overrides),
                        on_step=on_step)


class _Killed(Exception):
    pass


def _scheduled_runs(schema_dir: str, root: str) -> Dict[str, Any]:
    """The rates each training step ran with (the fused kernels' at their forward, which their backward applies;
    the dense Adam's at its step), a straight and a killed-and-resumed scheduled run, and a constant one."""
    from fbgemm_gpu.split_table_batched_embeddings_ops_training import SplitTableBatchedEmbeddingBagsCodegen

    seen: Dict[str, List[float]] = {"tables": [], "dense": []}
    forward = SplitTableBatchedEmbeddingBagsCodegen.forward

    def recording_forward(self, *args: Any, **kwargs: Any) -> Any:
        if self.training:
            seen["tables"].append(self.get_learning_rate())
        return forward(self, *args, **kwargs)

    def recording_step(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        if isinstance(optimizer, torch.optim.Adam):
            seen["dense"].append(optimizer.param_groups[0]["lr"])

    SplitTableBatchedEmbeddingBagsCodegen.forward = recording_forward
    hook = register_optimizer_step_pre_hook(recording_step)
    try:
        out: Dict[str, Any] = {"straight": _run(schema_dir, os.path.join(root, "straight"), SCHEDULE)}
        out["rates"] = {name: list(values) for name, values in seen.items()}

        def killed(state: Any) -> None:
            if state.global_step == 3:  # in the warmup: the resumed job starts at its factor
                raise _Killed()

        resumed_dir = os.path.join(root, "resumed")
        with pytest.raises(_Killed):
            _run(schema_dir, resumed_dir, [*SCHEDULE, "train.checkpoint_every=3"], on_step=killed)
        out["resumed"] = _run(schema_dir, resumed_dir, [*SCHEDULE, "train.checkpoint_every=3"])
        out["constant"] = _run(schema_dir, os.path.join(root, "constant"), [])
        with open(os.path.join(root, "straight", "metrics.jsonl"), encoding="utf-8") as handle:
            records = [json.loads(line) for line in handle]
        out["lr_scales"] = {r["global_step"]: r.get("lr_scale") for r in records if r["event"] == "train"}
    finally:
        SplitTableBatchedEmbeddingBagsCodegen.forward = forward
        hook.remove()
    return out


@pytest.mark.multiprocess
def test_tables_and_dense_step_with_the_scheduled_rates_and_a_resume_is_exact(synthetic_dir: str,
                                                                                tmp_path) -> None:
    (out,) = run_multiprocess(_scheduled_runs, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    steps = out["straight"]["global_step"]
    scales = [LRSchedule(5, 12, 8).scale(step) for step in range(steps)]
    assert scales[0] == 0.2 and 1.0 in scales and scales[-1] == 1 / 64  # warmup, hold, decay, its last value
    assert out["rates"]["dense"] == pytest.approx([DENSE_LR * scale for scale in scales], rel=1e-12)
    tables = out["rates"]["tables"]
    per_step = len(tables) // steps  # every fused kernel's forward of a step
    assert per_step >= 1 and len(tables) == per_step * steps
    expected = [SPARSE_LR * scale for scale in scales for _ in range(per_step)]
    assert tables == pytest.approx(expected, rel=1e-6)  # FBGEMM keeps the rate in float32
    resumed, straight = out["resumed"], out["straight"]
    assert resumed["test"] == straight["test"] and resumed["valid"] == straight["valid"]
    assert out["constant"]["test"] != straight["test"]  # the schedule changed what trained
    # metrics.jsonl's train records (every 50 steps) carry the factor of their step
    assert out["lr_scales"] and all(scale == scales[step - 1] for step, scale in out["lr_scales"].items())
