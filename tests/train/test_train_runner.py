"""End-to-end training runs: ``run_training`` on 1 and 2 gloo ranks, and SIGKILL + resume.

These are the foundation's acceptance tests: DeepFM on the embedded data, tables sharded
over both ranks (read from the run's own ``sharding_plan.json``), held-out AUC clearly above
chance, 1-rank and 2-rank results close; a training process killed mid-epoch resumes from
its last checkpoint and ends with the metrics of an uninterrupted run.
"""

import json
import math
import os
import signal
import subprocess
import sys
import time
from typing import Any, Dict, List

import pytest

from recsys_llm.train.config import load_config
from recsys_llm.train.runner import run_training
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _overrides(schema_dir: str, run_dir: str, batch_size: int, extra: List[str] = ()) -> List[str]:
    return [
        f"data.schema={schema_dir}",
        f"data.batch_size={batch_size}",
        "data.eval_batch_size=1024",
        "data.synthetic_rows=0",
        "train.epochs=3",
        "train.patience=0",
        "train.checkpoint_every=0",
        "train.progress=false",
        "train.device=cpu",
        f"train.run_dir={run_dir}",
        *extra,
    ]


def _train(overrides: List[str]) -> Dict[str, Any]:
    return run_training(load_config(DEEPFM_CONFIG, overrides))


@pytest.mark.multiprocess
def test_deepfm_two_ranks_shards_tables_over_both_and_agrees_with_one_rank(synthetic_dir: str, tmp_path) -> None:
    two_dir, one_dir = str(tmp_path / "two"), str(tmp_path / "one")
    # Same global batch (2 x 128 = 256) on both sides.
    two = run_multiprocess(_train, world_size=2, overrides=_overrides(synthetic_dir, two_dir, 128))
    (one,) = run_multiprocess(_train, world_size=1, overrides=_overrides(synthetic_dir, one_dir, 256))

    with open(os.path.join(two_dir, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    assert {p["sharding_type"] for p in plan.values()} <= {"table_wise", "row_wise"}
    ranks_used = {rank for placement in plan.values() for rank in placement["ranks"]}
    assert ranks_used == {0, 1}, plan

    assert two[0]["test"]["auc"] == two[1]["test"]["auc"]  # metrics are aggregated over ranks
    auc_two, auc_one = two[0]["test"]["auc"], one["test"]["auc"]
    # 1,200 test rows: the AUC's standard error is ~0.017, so 0.58 is > 4 sigma above chance.
    assert auc_two > 0.58 and auc_one > 0.58, (auc_two, auc_one)
    assert abs(auc_two - auc_one) < 0.015, (auc_two, auc_one)
    assert abs(two[0]["test"]["logloss"] - one["test"]["logloss"]) < 0.02
    assert one["test"]["cold/num_samples"] > 0 and not math.isnan(one["test"]["cold/auc"])
    lines = [json.loads(line) for line in open(os.path.join(two_dir, "metrics.jsonl"), encoding="utf-8")]
    assert [r["epoch"] for r in lines if r["event"] == "valid"] == [1, 2, 3]


def _cli(config: str, overrides: List[str]) -> List[str]:
    return [sys.executable, "-m", "recsys_llm.cli", "train", "--config", config, *overrides]


def _checkpoint_steps(run_dir: str) -> List[int]:
    root = os.path.join(run_dir, "checkpoints")
    if not os.path.isdir(root):
        return []
    return sorted(int(n.split("-")[1]) for n in os.listdir(root) if n.startswith("ckpt-") and "." not in n)


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(synthetic_dir: str, tmp_path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    overrides = lambda run_dir: _overrides(  # noqa: E731
        synthetic_dir, run_dir, 64, ["train.epochs=2", "train.checkpoint_every=10"]
    )
    steps_per_epoch = 9_600 // 64

    killed_dir = str(tmp_path / "killed")
    proc = subprocess.Popen(_cli(DEEPFM_CONFIG, overrides(killed_dir)), env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        steps = _checkpoint_steps(killed_dir)
        if steps and steps[-1] >= 30:  # mid epoch 0 (150 steps per epoch)
            break
        time.sleep(0.02)
    assert proc.poll() is None, f"training ended before it could be killed:\n{proc.stderr.read().decode()[-3000:]}"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = _checkpoint_steps(killed_dir)[-1]
    assert 0 < killed_at < 2 * steps_per_epoch and not os.path.exists(os.path.join(killed_dir, "results.json"))

    resumed = subprocess.run(_cli(DEEPFM_CONFIG, overrides(killed_dir)), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight_dir = str(tmp_path / "straight")
    straight = subprocess.run(_cli(DEEPFM_CONFIG, overrides(straight_dir)), env=env, cwd=REPO,
                              capture_output=True, text=True, timeout=600)
    assert straight.returncode == 0, straight.stderr[-3000:]

    events = [json.loads(line) for line in open(os.path.join(killed_dir, "metrics.jsonl"), encoding="utf-8")]
    resumes = [e for e in events if e["event"] == "resumed"]
    assert len(resumes) == 1 and resumes[0]["global_step"] >= 30
    epochs = [e for e in events if e["event"] == "epoch"]
    assert [e.get("resumed_at_step_in_epoch") for e in epochs][-2:] == [resumes[0]["global_step"], None]
    results = [json.load(open(os.path.join(d, "results.json"), encoding="utf-8")) for d in (killed_dir, straight_dir)]
    assert results[0]["global_step"] == results[1]["global_step"] == 2 * steps_per_epoch
    assert results[0]["test"] == results[1]["test"]
    assert results[0]["valid"] == results[1]["valid"]

    # The same run directory with another setting: refused, naming it, before anything changes.
    saved_config = open(os.path.join(killed_dir, "config.yaml"), encoding="utf-8").read()
    changed = subprocess.run(_cli(DEEPFM_CONFIG, overrides(killed_dir) + ["model.embedding_dim=8"]), env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=600)
    assert changed.returncode == 2, changed.stderr[-3000:]
    assert "model.embedding_dim: 16 -> 8" in changed.stderr and "Traceback" not in changed.stderr
    assert open(os.path.join(killed_dir, "config.yaml"), encoding="utf-8").read() == saved_config
    fresh = subprocess.run(_cli(DEEPFM_CONFIG, overrides(killed_dir) + ["train.resume=false"]), env=env, cwd=REPO,
                           capture_output=True, text=True, timeout=600)
    assert fresh.returncode == 2 and "holds checkpoints of an earlier run" in fresh.stderr, fresh.stderr[-3000:]
