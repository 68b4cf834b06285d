"""End-to-end training runs: ``run_training`` on 1 and 2 gloo ranks, and SIGKILL + resume.

These are the foundation's acceptance tests: DeepFM on the embedded data, tables sharded
over both ranks (read from the run's own ``sharding_plan.json``), held-out AUC clearly above
chance, 1-rank and 2-rank results close; a training process killed mid-epoch resumes from
its last checkpoint and ends with the metrics of an uninterrupted run.
"""

import contextlib
import io
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from typing import Any, Dict, Iterator, List, Optional

import pytest

from recsys_llm.cli import main as cli_main
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.train.checkpoint import STOP_BUDGET, STOP_PATIENCE, TrainState
from recsys_llm.train.config import ConfigError, TrainConfig, load_config
from recsys_llm.train.curves import CURVES_FILE, training_curves
from recsys_llm.train.resume import reopen_for_budget
from recsys_llm.train.run_records import current_records, finished_results, read_metrics
from recsys_llm.train.runner import StepHook, run_training
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


def _dropout_draws(overrides: List[str]) -> List[List[float]]:
    """What the RNG would draw next (dropout's source) after each of the run's steps."""
    import torch

    draws: List[List[float]] = []

    def peek(_state: TrainState) -> None:
        state = torch.get_rng_state()
        draws.append(torch.rand(4).tolist())
        torch.set_rng_state(state)

    run_training(load_config(DEEPFM_CONFIG, overrides), on_step=peek)
    return draws


@pytest.mark.multiprocess
def test_ranks_draw_dropout_masks_of_their_own(synthetic_dir: str, tmp_path) -> None:
    """Every rank is seeded with train.seed; ranks past 0 draw their table shards from forked streams and so drew
    alike up to training: ranks 1 and 2 drew the same dropout masks at every step, for other rows."""
    overrides = _overrides(synthetic_dir, str(tmp_path / "run"), 128, ["model.dropout=0.2", "train.max_steps=2",
                                                                       "train.epochs=1"])
    draws = run_multiprocess(_dropout_draws, world_size=3, overrides=overrides)
    assert [len(d) for d in draws] == [2, 2, 2]
    for a in range(3):
        for b in range(a + 1, 3):
            assert all(x != y for x, y in zip(draws[a], draws[b])), (a, b, draws)


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
        synthetic_dir, run_dir, 64, ["train.epochs=2", "train.checkpoint_every=15"]  # no step of 50 before 150
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
    # the resumed run's picture is the straight run's: the killed job's steps after its checkpoint are not drawn
    curves = [training_curves(read_metrics(d)) for d in (killed_dir, straight_dir)]
    assert sorted(curves[0]) == sorted(curves[1]) == ["epoch loss", "loss", "valid auc", "valid logloss"]
    assert curves[0]["valid auc"] == curves[1]["valid auc"] and curves[0]["valid logloss"] == curves[1]["valid logloss"]
    # a loss record is the mean of its 50 steps, and the checkpoint carried the sums of those before the kill:
    # the resumed job's records are the straight run's, to the bit on one rank
    assert resumes[0]["global_step"] % 50 != 0  # the kill cut a 50-step window (and the epoch)
    assert curves[0]["loss"] == curves[1]["loss"]
    assert curves[0]["epoch loss"] == curves[1]["epoch loss"]
    assert all(os.path.isfile(os.path.join(d, CURVES_FILE)) for d in (killed_dir, straight_dir))

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


# --- resumes at the edges of the budget (one rank, 1024-row batches: a few steps per epoch) ---


class _Killed(BaseException):
    """Stands in for a SIGKILL right after the step's checkpoint was written."""


def _kill_at(global_step: int) -> StepHook:
    def hook(state: TrainState) -> None:
        if state.global_step == global_step:
            raise _Killed()

    return hook


def _run(schema_dir: str, run_dir: str, extra: List[str], on_step: Optional[StepHook] = None) -> Dict[str, Any]:
    return run_training(load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, 1024, extra)), on_step=on_step)


def _run_killed(schema_dir: str, run_dir: str, extra: List[str], global_step: int) -> None:
    with pytest.raises(_Killed):
        _run(schema_dir, run_dir, extra, on_step=_kill_at(global_step))


def _events(run_dir: str) -> List[Dict[str, Any]]:
    """``metrics.jsonl`` read as strict JSON (NaN / Infinity refused)."""
    def refuse(constant: str) -> None:
        raise ValueError(f"{run_dir}/metrics.jsonl: {constant} is not JSON")

    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line, parse_constant=refuse) for line in handle]


def _after_last_resume(events: List[Dict[str, Any]]) -> List[Dict[str, Any]]:
    starts = [i for i, event in enumerate(events) if event["event"] == "resumed"]
    assert starts, "the run did not resume"
    return events[starts[-1] + 1:]


def _loss_records(schema_dir: str, root: str, batch_size: int, budget: List[str], kill_at: int) -> Dict[str, Any]:
    """``(event, global_step, loss or mean_loss, steps, loss_steps)`` of the ``train`` and ``epoch`` records of a
    straight run and of one killed after step ``kill_at`` and resumed."""
    out = {}
    for how in ("straight", "resumed"):
        run_dir = os.path.join(root, how)
        config = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, batch_size, budget))
        if how == "resumed":
            with pytest.raises(_Killed):
                run_training(config, on_step=_kill_at(kill_at))
        run_training(config)
        out[how] = [(e["event"], e["global_step"], e.get("loss", e.get("mean_loss")), e.get("steps"),
                     e.get("loss_steps")) for e in read_metrics(run_dir) if e["event"] in ("train", "epoch")]
    return out


def _loss_records_straight_and_resumed(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=2", "train.checkpoint_every=60", "train.patience=0"]  # 75 steps an epoch on 2 ranks
    return _loss_records(schema_dir, root, 64, budget, kill_at=60)  # cuts epoch 0 and the window of steps 51-100


@pytest.mark.multiprocess
def test_loss_records_of_a_run_resumed_on_two_ranks_are_the_uninterrupted_runs(synthetic_dir: str, tmp_path) -> None:
    """The checkpoint carries the mean over the ranks of each rank's loss sums since the last records."""
    out, _ = run_multiprocess(_loss_records_straight_and_resumed, world_size=2, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    straight, resumed = out["straight"], out["resumed"]
    assert [r[:2] for r in straight] == [r[:2] for r in resumed] == [
        ("train", 50), ("epoch", 75), ("train", 100), ("train", 150), ("epoch", 150)]
    assert [r[2] for r in resumed] == pytest.approx([r[2] for r in straight], rel=1e-6)
    assert [r[4] for r in resumed if r[0] == "epoch"] == [75, 75]  # the epoch's steps, before the kill included
    assert [r[3] for r in resumed] == [50, 15, 50, 50, 75]  # the train records' window; the job's own epoch steps


def _loss_records_with_dropout_straight_and_resumed(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=1", "train.checkpoint_every=10", "model.dropout=0.2"]  # 38 steps an epoch on 2 ranks
    return _loss_records(schema_dir, root, 128, budget, kill_at=10)


@pytest.mark.multiprocess
def test_a_run_with_dropout_resumed_on_two_ranks_draws_the_uninterrupted_runs_masks(synthetic_dir: str,
                                                                                    tmp_path) -> None:
    """A resume on the world size of its checkpoint restores every rank's RNG state from it: the masks dropout
    draws after the resume, and so the epoch's losses, are the uninterrupted run's (a rank reseeded after the
    load, as a new run seeds ranks past 0, drew others)."""
    out, _ = run_multiprocess(_loss_records_with_dropout_straight_and_resumed, world_size=2, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    straight, resumed = out["straight"], out["resumed"]
    assert [r[:2] for r in straight] == [r[:2] for r in resumed] == [("epoch", 38)]
    assert [r[2] for r in resumed] == pytest.approx([r[2] for r in straight], rel=1e-6)


def _kill_after_the_max_steps_checkpoint(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=1", "train.checkpoint_every=5"]
    killed, lower = os.path.join(root, "killed"), os.path.join(root, "lower")
    out = {"straight": _run(schema_dir, os.path.join(root, "straight"), budget + ["train.max_steps=5"])}
    _run_killed(schema_dir, killed, budget + ["train.max_steps=5"], global_step=5)
    shutil.copytree(killed, lower)
    out["resumed"] = _run(schema_dir, killed, budget + ["train.max_steps=5"])
    out["resumed_events"] = _after_last_resume(_events(killed))
    out["lower"] = _run(schema_dir, lower, budget + ["train.max_steps=3"])  # below the checkpoint's step
    out["lower_events"] = _after_last_resume(_events(lower))
    return out


@pytest.mark.multiprocess
def test_a_run_killed_after_its_max_steps_checkpoint_resumes_without_another_step(synthetic_dir: str,
                                                                                 tmp_path) -> None:
    (out,) = run_multiprocess(_kill_after_the_max_steps_checkpoint, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    straight = out["straight"]
    assert straight["global_step"] == 5
    for name in ("resumed", "lower"):
        assert out[name]["global_step"] == 5, name
        assert out[name]["test"] == straight["test"] and out[name]["valid"] == straight["valid"], name
        assert not [e for e in out[f"{name}_events"] if e["event"] in ("train", "epoch")], name


def _resume_a_validated_epoch_end_with_a_spent_budget(schema_dir: str, root: str) -> Dict[str, Any]:
    killed, straight = os.path.join(root, "killed"), os.path.join(root, "straight")
    probe = _run(schema_dir, os.path.join(root, "probe"), ["train.epochs=1"])  # the steps of one epoch
    # killed in epoch 1: its newest checkpoint is epoch 0's end, taken after that epoch's validation
    _run_killed(schema_dir, killed, ["train.patience=1"], global_step=probe["global_step"] + 1)
    out = {"lowered": _run(schema_dir, killed, ["train.patience=1", "train.epochs=1"])}
    out["lowered_events"] = _after_last_resume(_events(killed))
    out["extended"] = _run(schema_dir, killed, ["train.patience=1", "train.epochs=2"])
    out["straight"] = _run(schema_dir, straight, ["train.patience=1", "train.epochs=1"])
    out["steps_per_epoch"] = probe["global_step"]
    return out


@pytest.mark.multiprocess
def test_a_resume_at_a_validated_step_with_its_budget_spent_does_not_validate_again(synthetic_dir: str,
                                                                                  tmp_path) -> None:
    """Resumed at a validated epoch end with the budget lowered to it, a job validated the same weights again: a
    second valid record, an evaluation "without a better AUC" that used up patience 1, and a run stopped early for
    good (a later, larger budget trained nothing)."""
    (out,) = run_multiprocess(_resume_a_validated_epoch_end_with_a_spent_budget, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path))
    lowered, straight = out["lowered"], out["straight"]
    assert not [e for e in out["lowered_events"] if e["event"] in ("valid", "early_stop")], out["lowered_events"]
    assert lowered["stopped_early"] is False and lowered["valid"] == straight["valid"]
    assert lowered["test"] == straight["test"]
    assert out["extended"]["global_step"] == 2 * out["steps_per_epoch"] and out["extended"]["epochs"] == 2


def _kill_while_validating_at_max_steps(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train import runner

    budget = ["train.epochs=1", "train.checkpoint_every=5", "train.max_steps=5"]  # step 5 of 10 in the epoch
    straight, killed = os.path.join(root, "straight"), os.path.join(root, "killed")
    out = {"straight": _run(schema_dir, straight, budget), "straight_standing": read_metrics(straight)}
    validate = runner._validate  # noqa: SLF001
    runner._validate = lambda *args, **kwargs: (_ for _ in ()).throw(_Killed())  # after the epoch record
    try:
        with pytest.raises(_Killed):
            _run(schema_dir, killed, budget)
    finally:
        runner._validate = validate
    out["resumed"] = _run(schema_dir, killed, budget)
    out["standing"] = read_metrics(killed)
    return out


@pytest.mark.multiprocess
def test_a_run_killed_after_its_max_steps_epoch_record_keeps_it(synthetic_dir: str, tmp_path) -> None:
    """The resume (at max_steps: no step) marked that epoch record redone but wrote none: the run's
    records had no epoch, and results.json no samples/s."""
    (out,) = run_multiprocess(_kill_while_validating_at_max_steps, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    events = [e["event"] for e in out["standing"]]
    assert events == ["started", "epoch", "resumed", "valid", "test", "finished"], events
    assert [e["event"] for e in out["straight_standing"]] == ["started", "epoch", "valid", "test", "finished"]
    (epoch,) = [e for e in out["standing"] if e["event"] == "epoch"]
    assert (epoch["global_step"], epoch["steps"]) == (5, 5)
    assert out["resumed"]["samples_per_second"] == pytest.approx(epoch["samples_per_second"])
    assert out["resumed"]["test"] == out["straight"]["test"]


def _kill_after_a_max_steps_checkpoint_on_an_epochs_last_step(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=2", "train.patience=1", "train.checkpoint_every=10"]  # 10 steps an epoch
    _run_killed(schema_dir, root, budget + ["train.max_steps=10"], global_step=10)
    return {"resumed": _run(schema_dir, root, budget + ["train.max_steps=10"]),
            "extended": _run(schema_dir, root, budget + ["train.max_steps=0"])}


@pytest.mark.multiprocess
def test_a_run_killed_after_its_max_steps_checkpoint_on_an_epochs_last_step_resumes_past_that_epoch(
        synthetic_dir: str, tmp_path) -> None:
    """It stayed in the epoch it had finished: an extension validated that step again, which
    train.patience counted as an evaluation without a better AUC, and stopped early."""
    (out,) = run_multiprocess(_kill_after_a_max_steps_checkpoint_on_an_epochs_last_step, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path / "run"))
    assert (out["resumed"]["global_step"], out["resumed"]["epochs"]) == (10, 1)
    extended = out["extended"]
    assert (extended["global_step"], extended["epochs"], extended["stopped_early"]) == (20, 2, False)


def _max_steps_on_an_epochs_last_step(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=2", "train.patience=1"]  # 10 steps an epoch
    first = _run(schema_dir, root, budget + ["train.max_steps=10"])
    return {"first": first, "events": _events(root), "extended": _run(schema_dir, root, budget + ["train.max_steps=0"])}


@pytest.mark.multiprocess
def test_a_run_whose_max_steps_end_an_epoch_counts_that_epoch_done(synthetic_dir: str, tmp_path) -> None:
    """max_steps reached on an epoch's last step stops the epoch (on_step asks to) at its end: the epoch is done,
    as one that ran out of batches is; its extension trains the next epoch, not an empty rest of this one."""
    (out,) = run_multiprocess(_max_steps_on_an_epochs_last_step, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path / "run"))
    assert (out["first"]["global_step"], out["first"]["epochs"]) == (10, 1)
    assert [e["epoch"] for e in out["events"] if e["event"] == "valid"] == [1]
    extended = out["extended"]
    assert (extended["global_step"], extended["epochs"], extended["stopped_early"]) == (20, 2, False)


def _extend_a_run_finished_mid_epoch(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=1"]
    out = {"first": _run(schema_dir, root, budget + ["train.max_steps=5"])}  # step 5 of the epoch: validated there
    out["extended"] = _run(schema_dir, root, budget + ["train.max_steps=0"])
    out["standing"] = read_metrics(root)
    out["curves"] = training_curves(out["standing"])
    return out


@pytest.mark.multiprocess
def test_a_run_finished_mid_epoch_and_extended_keeps_the_validation_it_finished_with(synthetic_dir: str,
                                                                                     tmp_path) -> None:
    """The extension marked the step-5 epoch, valid and test records redone but wrote none at step 5:
    the validation that could be the run's best (results.json's best_step) left metrics.jsonl and the curves."""
    (out,) = run_multiprocess(_extend_a_run_finished_mid_epoch, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path / "run"))
    end = out["extended"]["global_step"]
    standing = [(e["event"], e["global_step"]) for e in out["standing"] if e["event"] in ("epoch", "valid")]
    assert standing == [("epoch", 5), ("valid", 5), ("epoch", end), ("valid", end)]
    steps, aucs = out["curves"]["valid auc"]
    assert steps == [5, end]
    assert aucs[steps.index(out["extended"]["best_step"])] == out["extended"]["valid"]["auc"] == max(aucs)


def _extend_a_finished_run(schema_dir: str, root: str) -> Dict[str, Any]:
    extended = os.path.join(root, "extended")
    out = {"one": _run(schema_dir, extended, ["train.epochs=1"])}
    out["extended"] = _run(schema_dir, extended, ["train.epochs=2"])
    out["extended_events"] = _after_last_resume(_events(extended))
    # a job SIGKILLed while writing its figure and results left their temp files; a user's own file stays
    for name in ("training_curves.png.547e65ab.tmp", "results.json.tmp", "notes.txt.547e65ab.tmp"):
        open(os.path.join(extended, name), "w", encoding="utf-8").close()
    out["again"] = _run(schema_dir, extended, ["train.epochs=2"])  # finished: trains no step
    out["left_temp_files"] = sorted(name for name in os.listdir(extended) if name.endswith(".tmp"))
    out["fresh"] = _run(schema_dir, os.path.join(root, "fresh"), ["train.epochs=2"])
    return out


@pytest.mark.multiprocess
def test_a_finished_run_resumed_with_more_epochs_trains_them(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_extend_a_finished_run, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    steps_per_epoch = out["one"]["global_step"]
    assert out["extended"]["global_step"] == out["fresh"]["global_step"] == 2 * steps_per_epoch
    assert out["extended"]["epochs"] == 2
    assert out["extended"]["test"] == out["fresh"]["test"]
    assert [e["epoch"] for e in out["extended_events"] if e["event"] == "epoch"] == [1]
    # the same command on the finished run keeps its throughput figure (it trained no step itself)
    assert out["again"]["samples_per_second"] == out["extended"]["samples_per_second"] is not None
    assert out["left_temp_files"] == ["notes.txt.547e65ab.tmp"]  # the killed job's temp files removed


@pytest.mark.multiprocess
def test_a_finished_run_run_again_on_other_ranks_keeps_its_plan_and_the_ranks_it_trained_on(synthetic_dir: str,
                                                                                            tmp_path) -> None:
    """Run again on 1 rank, a run trained on 2 trains nothing: it rewrote sharding_plan.json with its own 1-rank plan
    and results.json said world_size 1 beside the 2-rank throughput."""
    run_dir = str(tmp_path / "run")
    trained = run_multiprocess(_run, world_size=2, schema_dir=synthetic_dir, run_dir=run_dir, extra=["train.epochs=1"])
    with open(os.path.join(run_dir, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = handle.read()
    (again,) = run_multiprocess(_run, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir, extra=["train.epochs=1"])
    with open(os.path.join(run_dir, "sharding_plan.json"), encoding="utf-8") as handle:
        assert handle.read() == plan
    assert again["world_size"] == trained[0]["world_size"] == 2
    assert again["samples_per_second"] == trained[0]["samples_per_second"]
    assert trained[0]["best_step"] == trained[0]["global_step"]  # one epoch: its state saved once, on both ranks
    assert _final_checkpoint_linked_to_best(run_dir, trained[0]["global_step"])


@pytest.mark.parametrize(
    "state, finished",
    [
        (TrainState(epoch=1, finished=True, stop_reason=STOP_BUDGET), False),  # 1 of 2 epochs done
        (TrainState(epoch=2, finished=True, stop_reason=STOP_BUDGET), True),  # budget still used up
        (TrainState(epoch=1, finished=True, stop_reason=STOP_PATIENCE), True),  # early stop is final
        (TrainState(epoch=1, finished=True), True),  # written before the reason was recorded
    ],
)
def test_a_resume_reopens_only_a_run_that_used_up_its_budget(state: TrainState, finished: bool) -> None:
    reopened = reopen_for_budget(state, TrainConfig(epochs=2))
    assert reopened.finished is finished
    assert reopened.stop_reason == ("" if not finished else state.stop_reason)


@pytest.mark.parametrize("bad_evals, patience, stopped", [(2, 2, True), (3, 2, True), (1, 2, False), (5, 0, False)])
def test_a_checkpoint_without_a_stop_reason_stopped_early_once_its_patience_was_used_up(
        bad_evals: int, patience: int, stopped: bool) -> None:
    """A run written before ``stop_reason`` was recorded stopped on patience when its evaluations without a better
    AUC reached ``train.patience`` (the run stops at that evaluation: bad_evals == patience)."""
    from recsys_llm.train.runner import _stopped_early

    state = TrainState(epoch=3, finished=True, bad_evals=bad_evals)
    assert _stopped_early(state, TrainConfig(patience=patience)) is stopped
    assert _stopped_early(TrainState(bad_evals=bad_evals, stop_reason=STOP_BUDGET), TrainConfig(patience=patience)) \
        is False


def _train_without_improving(schema_dir: str, root: str) -> Dict[str, Any]:
    run_dir = os.path.join(root, "run")
    # steps too small to change a float32 weight: every validation gives exactly the first one's AUC
    still = ["optim.sparse_lr=1e-30", "optim.dense_lr=1e-30"]
    return {"results": _run(schema_dir, run_dir, ["train.epochs=4", "train.patience=2", "data.batch_size=4096", *still]),
            "events": _events(run_dir)}


@pytest.mark.multiprocess
def test_a_run_whose_validation_auc_stops_improving_stops_early_after_patience_evaluations(synthetic_dir: str,
                                                                                         tmp_path) -> None:
    (out,) = run_multiprocess(_train_without_improving, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    results, events = out["results"], out["events"]
    valid = [e for e in events if e["event"] == "valid"]
    assert len({e["auc"] for e in valid}) == 1, valid  # no validation improves on the first
    steps_per_epoch = valid[0]["global_step"]
    # the first evaluation is the best; the 2nd and 3rd are not better: patience 2 is used up after epoch 3 of 4
    assert [e["epoch"] for e in valid] == [1, 2, 3]
    assert results["stopped_early"] is True and results["epochs"] == 3
    assert results["global_step"] == 3 * steps_per_epoch and results["best_step"] == steps_per_epoch
    assert [(e["global_step"], e["best_step"]) for e in events if e["event"] == "early_stop"] == [
        (3 * steps_per_epoch, steps_per_epoch)]


def _validated_every_second_epoch(schema_dir: str, root: str) -> Dict[str, Any]:
    run_dir = os.path.join(root, "run")
    results = _run(schema_dir, run_dir, ["train.epochs=5", "train.eval_every=2", "data.batch_size=4096"])
    return {"results": results, "events": _events(run_dir)}


@pytest.mark.multiprocess
def test_a_run_validates_every_eval_every_epochs_and_after_its_last(synthetic_dir: str, tmp_path) -> None:
    """train.eval_every=2 over 5 epochs: validations after epochs 2 and 4, and after the last one (its best/ and
    results need one), not after every epoch."""
    (out,) = run_multiprocess(_validated_every_second_epoch, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    epochs = [e["epoch"] for e in out["events"] if e["event"] == "epoch"]
    assert len(epochs) == 5
    steps_per_epoch = out["results"]["global_step"] // 5
    valid = [e for e in out["events"] if e["event"] == "valid"]
    assert [e["global_step"] for e in valid] == [2 * steps_per_epoch, 4 * steps_per_epoch, 5 * steps_per_epoch]


def _patience_used_up_at_the_last_epoch(schema_dir: str, root: str) -> Dict[str, Any]:
    run_dir = os.path.join(root, "run")
    still = ["optim.sparse_lr=1e-30", "optim.dense_lr=1e-30", "train.patience=2", "data.batch_size=4096"]
    finished = _run(schema_dir, run_dir, ["train.epochs=3", *still])
    events = _events(run_dir)
    extended = _run(schema_dir, run_dir, ["train.epochs=5", *still])
    return {"finished": finished, "events": events, "extended": extended}


@pytest.mark.multiprocess
def test_a_run_whose_patience_runs_out_at_its_last_epoch_did_not_stop_early(synthetic_dir: str, tmp_path) -> None:
    """The 2nd and 3rd validations are not better and train.epochs=3 ends there: the run used up its budget, it
    did not stop early (a one-class validation split, whose AUC is never defined, always ends so); given 5 epochs it
    trains on, and its 4th validation, again not better, stops it early (before the 5th epoch)."""
    (out,) = run_multiprocess(_patience_used_up_at_the_last_epoch, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["finished"]["stopped_early"] is False and out["finished"]["epochs"] == 3
    assert not [e for e in out["events"] if e["event"] == "early_stop"]
    assert out["extended"]["epochs"] == 4 and out["extended"]["stopped_early"] is True


def _best_before_the_last_epoch(schema_dir: str, root: str) -> Dict[str, Any]:
    # the data with one more split, "seen": the training rows again
    with open(os.path.join(schema_dir, "schema.json"), encoding="utf-8") as handle:
        raw = json.load(handle)
    raw["splits"] = {name: os.path.join(schema_dir, path) for name, path in raw["splits"].items()}
    raw["splits"]["seen"] = raw["splits"]["train"]
    data = os.path.join(root, "data")
    os.makedirs(data)
    with open(os.path.join(data, "schema.json"), "w", encoding="utf-8") as handle:
        json.dump(raw, handle)
    run_dir = os.path.join(root, "run")
    # validated on the rows it trained on, epoch 1 sets a best AUC that epoch 2 on held-out rows does not reach
    first = _run(data, run_dir, ["train.epochs=1", "data.valid_split=seen", "data.batch_size=4096"])
    resumed = _run(data, run_dir, ["train.epochs=2", "data.batch_size=4096"])
    return {"first": first, "resumed": resumed, "events": _events(run_dir)}


@pytest.mark.multiprocess
def test_the_test_split_is_scored_with_the_best_checkpoint_not_the_last_weights(synthetic_dir: str,
                                                                               tmp_path) -> None:
    (out,) = run_multiprocess(_best_before_the_last_epoch, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    first, resumed = out["first"], out["resumed"]
    valid = [e for e in out["events"] if e["event"] == "valid"]
    assert len(valid) == 2 and valid[1]["auc"] < valid[0]["auc"], valid
    assert resumed["global_step"] == 2 * first["global_step"] and resumed["best_step"] == first["global_step"]
    assert resumed["valid"] == first["valid"]
    # scored with the weights of the best step, as the first job scored them, not those of step 2N
    assert resumed["test"] == first["test"]


def _lose_the_periodic_checkpoints(schema_dir: str, root: str) -> Dict[str, Any]:
    run_dir = os.path.join(root, "run")
    out = {"first": _run(schema_dir, run_dir, ["train.epochs=1"])}
    shutil.rmtree(os.path.join(run_dir, "checkpoints"))  # what a kill in a keep=1 same-step re-save used to do
    try:
        _run(schema_dir, run_dir, ["train.epochs=1", "model.embedding_dim=8"])
    except ConfigError as error:
        out["changed_error"] = str(error)
    out["again"] = _run(schema_dir, run_dir, ["train.epochs=1"])
    out["again_events"] = _after_last_resume(_events(run_dir))
    return out


@pytest.mark.multiprocess
def test_a_run_with_only_its_best_checkpoint_resumes_from_it(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_lose_the_periodic_checkpoints, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    # not a silent fresh start: the run's settings are checked against the resumed checkpoint ...
    assert "model.embedding_dim: 16 -> 8" in out.get("changed_error", ""), out.get("changed_error")
    assert os.path.join(str(tmp_path), "run") in out["changed_error"]
    # ... and it continues from best/ (here: already finished, so it only tests again)
    assert out["again"]["global_step"] == out["first"]["global_step"]
    assert out["again"]["test"] == out["first"]["test"]
    assert not [e for e in out["again_events"] if e["event"] in ("train", "epoch")]


# --- kills in the run's final saves (best/ckpt-N, then checkpoints/ckpt-N): the resume completes them ---

# (directory, whether the kill comes after the rename of its ckpt-N.tmp) of the final saves
FINAL_SAVE_KILLS = [("best", True), ("checkpoints", False), ("checkpoints", True)]


@contextlib.contextmanager
def _killed_in_a_save(directory: str, global_step: int, after_rename: bool) -> Iterator[None]:
    """Raises ``_Killed`` in the save of ``directory/ckpt-<global_step>``, just before or after its rename
    (before its ``latest`` and pruning)."""
    from recsys_llm.train import checkpoint

    swap = checkpoint._swap_into_place

    def killed(tmp: str, final: str) -> None:
        hit = final.endswith(os.path.join(directory, f"ckpt-{global_step:08d}"))
        if hit and not after_rename:
            raise _Killed()
        swap(tmp, final)
        if hit:
            raise _Killed()

    checkpoint._swap_into_place = killed
    try:
        yield
    finally:
        checkpoint._swap_into_place = swap


def _saved_files(run_dir: str) -> Dict[str, str]:
    """Path -> content hash of every file of ``checkpoints/`` and ``best/`` but DCP's ``.metadata`` (it
    records where the checkpoint was written), and of the files' digests less that file's."""
    from recsys_llm.train.checkpoint import DIGESTS_FILE

    found = {}
    for sub in ("checkpoints", "best"):
        for root, _, files in os.walk(os.path.join(run_dir, sub)):
            for name in files:
                path = os.path.join(root, name)
                if name == DIGESTS_FILE:
                    with open(path, encoding="utf-8") as handle:
                        digests = {file: digest for file, digest in json.load(handle).items() if file != ".metadata"}
                    found[os.path.relpath(path, run_dir)] = json.dumps(digests, sort_keys=True)
                elif name != ".metadata":
                    found[os.path.relpath(path, run_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return found


def _final_checkpoint_linked_to_best(run_dir: str, global_step: int) -> bool:
    """Whether ``checkpoints/ckpt-N`` holds ``best/ckpt-N``'s files, hard-linked, not written a second time."""
    name = f"ckpt-{global_step:08d}"
    best, last = os.path.join(run_dir, "best", name), os.path.join(run_dir, "checkpoints", name)
    return sorted(os.listdir(best)) == sorted(os.listdir(last)) and all(
        os.path.samefile(os.path.join(best, file), os.path.join(last, file)) for file in os.listdir(best))


def _kill_in_the_final_saves(schema_dir: str, root: str) -> Dict[str, Any]:
    steps_per_epoch = len(ParquetBatchReader(DatasetSchema.load(schema_dir), "train", 1024))
    # checkpoints/ holds a mid-epoch checkpoint before the final one, and none mid-epoch at the final step
    budget = ["train.epochs=2", f"train.checkpoint_every={steps_per_epoch - 1}"]
    straight = os.path.join(root, "straight")
    out: Dict[str, Any] = {"straight": _run(schema_dir, straight, budget), "straight_files": _saved_files(straight)}
    out["straight_events"] = _events(straight)
    final_step = out["straight"]["global_step"]
    for directory, after_rename in FINAL_SAVE_KILLS:
        run_dir = os.path.join(root, f"{directory}-{after_rename}")
        with _killed_in_a_save(directory, final_step, after_rename), pytest.raises(_Killed):
            _run(schema_dir, run_dir, budget)
        killed_events = _events(run_dir)
        out[run_dir] = {"left": _saved_files(run_dir), "results": _run(schema_dir, run_dir, budget),
                        "files": _saved_files(run_dir), "killed_events": killed_events, "events": _events(run_dir)}
    return out


@pytest.mark.multiprocess
def test_a_run_killed_in_its_final_saves_resumes_to_the_run_directory_of_an_uninterrupted_run(
        synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_kill_in_the_final_saves, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    straight, files = out["straight"], out["straight_files"]
    assert straight["best_step"] == straight["global_step"]  # the last validation saves best/ckpt-N
    assert sum(path.startswith("best/ckpt-") for path in files) > 0
    assert _final_checkpoint_linked_to_best(straight["run_dir"], straight["global_step"])
    for directory, after_rename in FINAL_SAVE_KILLS:
        run = out[os.path.join(str(tmp_path), f"{directory}-{after_rename}")]
        assert _final_checkpoint_linked_to_best(run["results"]["run_dir"], straight["global_step"])
        assert run["left"] != files, (directory, after_rename)  # the kill left the run directory behind
        assert run["files"] == files, (directory, after_rename)  # the same checkpoints, latest files, pruning
        results = run["results"]
        assert {**results, "run_dir": "", "samples_per_second": 0} == {**straight, "run_dir": "",
                                                                        "samples_per_second": 0}
        # the resumed job trained no step: its figure is that of the killed job, which trained them all
        killed = [e["samples_per_second"] for e in run["killed_events"] if e["event"] == "epoch"]
        assert results["samples_per_second"] == pytest.approx(sum(killed) / len(killed))
        resumed = _after_last_resume(run["events"])
        assert [e["event"] for e in resumed] == ["test", "finished"]


# --- metrics.jsonl: every job starts with a record that says which earlier records it supersedes ---


def _one_epoch(schema_dir: str, run_dir: str) -> List[Dict[str, Any]]:
    _run(schema_dir, run_dir, ["train.epochs=1"])
    return _events(run_dir)


@pytest.mark.multiprocess
def test_an_epoch_record_counts_the_rows_every_rank_trained_on(tmp_path) -> None:
    """It was rank 0's rows times the number of ranks: 102 of 103 rows when rank 0 holds 51 and rank 1 52."""
    from recsys_llm.data.synthetic import generate_synthetic

    schema_dir, run_dir = str(tmp_path / "data"), str(tmp_path / "run")
    generate_synthetic(schema_dir, 129, seed=0, rows_per_group=8)
    train_rows = ParquetBatchReader(DatasetSchema.load(schema_dir), "train", 1024).rows_per_rank[0]
    assert train_rows % 2 == 1, train_rows
    events, _ = run_multiprocess(_one_epoch, world_size=2, schema_dir=schema_dir, run_dir=run_dir)
    assert [e["samples"] for e in events if e["event"] == "epoch"] == [train_rows]


def _kill_before_the_first_checkpoint_then_start_again(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.checkpoint import CheckpointManager

    run_dir = os.path.join(root, "run")
    save = CheckpointManager.save
    CheckpointManager.save = lambda *args, **kwargs: (_ for _ in ()).throw(_Killed())  # after epoch 0 is logged
    try:
        with pytest.raises(_Killed):
            _run(schema_dir, run_dir, ["train.epochs=1"])
    finally:
        CheckpointManager.save = save
    killed = _events(run_dir)
    # nothing to resume, so nothing is checked: the new job may train with other settings
    _run(schema_dir, run_dir, ["train.epochs=1", "optim.dense_lr=0.01"])
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as handle:
        results = json.load(handle)
    return {"killed": killed, "events": _events(run_dir), "standing": read_metrics(run_dir), "results": results}


@pytest.mark.multiprocess
def test_a_job_after_one_killed_before_its_first_checkpoint_marks_the_earlier_records_superseded(
        synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_kill_before_the_first_checkpoint_then_start_again, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path))
    killed, events = out["killed"], out["events"]
    assert [e["event"] for e in killed] == ["started", "epoch", "valid"]
    assert events[:len(killed)] == killed
    assert events[len(killed)]["event"] == "started"  # the new job's first record
    assert out["standing"] == events[len(killed):]
    assert [e["event"] for e in out["standing"]] == ["started", "epoch", "valid", "test", "finished"]
    # the finished record says where the job ended as results.json does (a monitor reads it instead)
    finished, results = out["standing"][-1], out["results"]
    assert (finished["global_step"], finished["epoch"], finished["best_step"]) == (
        results["global_step"], results["epochs"], results["best_step"])


def test_metrics_records_superseded_by_a_later_job_are_skipped_and_old_files_stay_readable(tmp_path) -> None:
    from recsys_llm.train.runner import _RunLog

    def record(event: str, step: int) -> Dict[str, Any]:
        return {"event": event, "global_step": step}

    # written before jobs logged `started`: nothing tells a killed first job's records apart
    old = [record("epoch", 10), record("valid", 10), record("epoch", 20), record("resumed", 10), record("epoch", 20)]
    assert current_records(old) == old[:2] + old[3:]
    new = [record("started", 0), record("epoch", 10), record("started", 0), record("epoch", 10), record("train", 50),
           record("resumed", 10), record("epoch", 20)]
    assert current_records(new) == new[2:4] + new[5:]
    # resumed from a checkpoint taken on the epoch's last step (checkpoint_every): the killed job's epoch-end records
    # at that step came after it, and the resumed job writes them again; its train record at that step came before
    on_last_step = [record("started", 0), record("train", 50), record("epoch", 50), record("valid", 50),
                    {**record("resumed", 50), "redone": ["epoch", "valid", "early_stop", "test"]},
                    record("epoch", 50), record("valid", 50)]
    assert current_records(on_last_step) == on_last_step[:2] + on_last_step[4:]
    path = tmp_path / "metrics.jsonl"
    path.write_text(json.dumps(record("started", 0)) + "\n" + '{"event": "epo')  # a record cut off by a kill
    _RunLog(str(path), enabled=True).write(record("started", 0))
    assert [{k: v for k, v in r.items() if k != "time"} for r in read_metrics(str(tmp_path))] == [record("started", 0)]


def _resume_on_an_epochs_last_step(schema_dir: str, root: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    steps_per_epoch = len(ParquetBatchReader(schema, "train", 1024))
    budget = ["train.epochs=2", f"train.checkpoint_every={steps_per_epoch}"]
    run_dir = os.path.join(root, "run")
    _run_killed(schema_dir, run_dir, budget, global_step=steps_per_epoch)  # mid-epoch checkpoint, no epoch end
    out = {"steps_per_epoch": steps_per_epoch, "resumed": _run(schema_dir, run_dir, budget)}
    out["events"] = _after_last_resume(_events(run_dir))
    _run(schema_dir, os.path.join(root, "straight"), budget)
    out["straight_events"] = _events(os.path.join(root, "straight"))
    return out


@pytest.mark.multiprocess
def test_an_epoch_resumed_at_its_end_counts_in_no_throughput_and_keeps_its_loss(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_resume_on_an_epochs_last_step, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["resumed"]["global_step"] == 2 * out["steps_per_epoch"]
    empty, trained = [e for e in out["events"] if e["event"] == "epoch"]
    assert (empty["steps"], empty["samples_per_second"]) == (0, None)
    # the epoch's mean loss over its steps, all of them the killed job's, carried by the checkpoint
    straight = [e for e in out["straight_events"] if e["event"] == "epoch"]
    assert [(e["mean_loss"], e["loss_steps"]) for e in (empty, trained)] == [
        (e["mean_loss"], out["steps_per_epoch"]) for e in straight]
    assert trained["steps"] == out["steps_per_epoch"] and trained["mean_loss"] > 0
    assert out["resumed"]["samples_per_second"] == pytest.approx(trained["samples_per_second"])


def _kill_after_validating_on_a_checkpointed_last_step(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.checkpoint import CheckpointManager

    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    steps_per_epoch = len(ParquetBatchReader(schema, "train", 1024))
    budget = ["train.epochs=2", f"train.checkpoint_every={steps_per_epoch}"]
    run_dir = os.path.join(root, "run")
    save = CheckpointManager.save

    def killed_at_the_epoch_end(self, model, optimizer, state):  # the periodic save on the last step is written
        if state.step_in_epoch == 0:
            raise _Killed()
        return save(self, model, optimizer, state)

    CheckpointManager.save = killed_at_the_epoch_end
    try:
        with pytest.raises(_Killed):
            _run(schema_dir, run_dir, budget)
    finally:
        CheckpointManager.save = save
    _run(schema_dir, run_dir, budget)
    return {"steps_per_epoch": steps_per_epoch, "events": _events(run_dir), "standing": read_metrics(run_dir)}


@pytest.mark.multiprocess
def test_epoch_end_records_written_after_the_checkpoint_resumed_from_stand_once(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_kill_after_validating_on_a_checkpointed_last_step, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path))
    step = out["steps_per_epoch"]
    written = [(e["event"], e["global_step"]) for e in out["events"] if e["event"] in ("epoch", "valid")]
    assert written.count(("valid", step)) == 2  # the killed job's and the resumed job's
    standing = [(e["event"], e["global_step"]) for e in out["standing"] if e["event"] in ("epoch", "valid")]
    assert standing == [("epoch", step), ("valid", step), ("epoch", 2 * step), ("valid", 2 * step)]


def _resume_with_another_batch_size(schema_dir: str, root: str) -> Dict[str, Any]:
    run_dir = os.path.join(root, "run")
    first = _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=4"])  # stops 4 x 1024 rows into the epoch
    resumed = _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=0", "data.batch_size=512"])
    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema

    batches_of_512 = len(ParquetBatchReader(DatasetSchema.load(schema_dir), "train", 512))  # as the trainer reads
    return {"first": first, "resumed": resumed, "events": _after_last_resume(_events(run_dir)),
            "batches_of_512": batches_of_512}


@pytest.mark.multiprocess
def test_a_resume_with_another_batch_size_goes_on_from_the_same_row(synthetic_dir: str, tmp_path) -> None:
    """4 steps of 1024 rows are 8 steps of 512: the resumed epoch skips exactly those rows."""
    (out,) = run_multiprocess(_resume_with_another_batch_size, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["first"]["global_step"] == 4
    (epoch,) = [e for e in out["events"] if e["event"] == "epoch"]
    assert epoch["resumed_at_step_in_epoch"] == 8
    assert epoch["steps"] == out["batches_of_512"] - 8
    assert out["resumed"]["global_step"] == 4 + out["batches_of_512"] - 8


def _resume_on_data_prepared_again(root: str, rows: int, seed: int, moved: bool) -> Dict[str, Any]:
    """``moved``: the data is prepared again in another directory, which the resume names."""
    from recsys_llm.data.synthetic import generate_synthetic

    data, run_dir = os.path.join(root, "data"), os.path.join(root, "run")
    generate_synthetic(data, 2000, seed=0)
    _run(data, run_dir, ["train.epochs=1", "train.max_steps=1"])
    run_files = ("config.yaml", "plugins.json", "sharding_plan.json", "metrics.jsonl")

    def contents() -> Dict[str, bytes]:
        return {name: open(os.path.join(run_dir, name), "rb").read() for name in run_files}

    before = contents()
    shutil.rmtree(data)
    if moved:
        data = os.path.join(root, "moved", "data")
    generate_synthetic(data, rows, seed=seed)  # the same directory, prepared again (or another one)
    try:
        _run(data, run_dir, ["train.epochs=1", "train.max_steps=2"])
        error = None
    except ConfigError as exc:
        error = str(exc)
    return {"error": error, "run_files_unchanged": contents() == before}


@pytest.mark.parametrize("rows, seed, refusal", [
    (20_000, 0, "trained on data with schema fingerprint"),  # larger id tables: another schema, named below
    # same fields and sizes, other rows: each user and item id another one (their value texts)
    (2000, 1, "the vocabulary of field(s) ['item_id', 'user_id'] in"),
    (2000, 0, None),  # the same data written again: the run goes on
])
@pytest.mark.parametrize("moved", [False, True])  # the data directory moved: the same checks of what it holds
@pytest.mark.multiprocess
def test_a_resume_on_data_prepared_again_is_refused_before_anything_is_written(tmp_path, rows, seed, refusal,
                                                                               moved) -> None:
    """A run whose data directory moved went on only from a symbolic link at the old path (a data.schema naming
    the new one was "other settings"): it goes on where the data's record (plugins.json) vouches for it."""
    (out,) = run_multiprocess(_resume_on_data_prepared_again, world_size=1, root=str(tmp_path), rows=rows, seed=seed,
                              moved=moved)
    if refusal is None:
        assert out["error"] is None
        return
    assert out["error"] is not None and refusal in out["error"]
    if rows == 20_000:  # the record of the schema's contents names what differs
        assert re.search(r"\(user_id: cardinality \d+ -> \d+; item_id: cardinality \d+ -> \d+", out["error"])
    if seed == 1:  # synthetic data has no --like: the way out named is its own
        assert "(data generated or converted again otherwise: another seed, other rows or another source file); " \
            "use the data the model trained on" in out["error"]
    assert out["run_files_unchanged"]


def _resume_from_an_edited_config_file(schema_dir: str, root: str) -> Dict[str, Any]:
    """A run of one step, its config.yaml edited (a learning rate, then only its epochs), resumed from that file."""
    run_dir = os.path.join(root, "run")
    _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=1"])
    saved = os.path.join(run_dir, "config.yaml")
    original = open(saved, encoding="utf-8").read()

    def resume(text: str) -> Optional[str]:
        with open(saved, "w", encoding="utf-8") as handle:
            handle.write(text)
        try:
            run_training(load_config(saved, ["train.max_steps=2"]))
        except ConfigError as exc:
            return str(exc)
        return None

    lr = re.search(r"dense_lr: (\S+)", original).group(1)
    return {"edited": resume(original.replace(f"dense_lr: {lr}", "dense_lr: 0.5")),
            "epochs": resume(original.replace("epochs: 1", "epochs: 2")), "lr": lr}


@pytest.mark.multiprocess
def test_a_resume_from_an_edited_config_file_is_refused(synthetic_dir: str, tmp_path) -> None:
    """``train --config RUN/config.yaml`` after an edit of a setting that must not change (the learning rate) resumed
    with it: the file the resume is compared with was the edited one. plugins.json records what the run wrote."""
    (out,) = run_multiprocess(_resume_from_an_edited_config_file, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["edited"] is not None and out["edited"].startswith(
        f"{tmp_path / 'run' / 'config.yaml'}: edited after the run wrote it (optim.dense_lr: {float(out['lr'])!r} -> "
        "0.5; plugins.json records what it held)"), out["edited"]
    assert out["epochs"] is None  # a setting a resume may change may be edited there too


def _llactr_on_grown_tables(root: str) -> Dict[str, Any]:
    import torch

    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.semantics.store import VectorProvenance, save_vectors

    data, fields = os.path.join(root, "data"), os.path.join(root, "fields.safetensors")
    generate_synthetic(data, 2000, seed=0)
    before = DatasetSchema.load(data)
    names = before.sparse_feature_names
    provenance = VectorProvenance(model_id="test", model_hash="h", pooling="mean", template="{name}: {description}")
    save_vectors(fields, torch.randn(len(names), 12, generator=torch.Generator().manual_seed(0)), names,
                 provenance.for_schema(before))
    llactr = [f"llactr.vectors_path={fields}", "llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1", "train.epochs=1"]
    first, second = os.path.join(root, "first"), os.path.join(root, "second")
    _run(data, first, [*llactr, "train.max_steps=1"])
    shutil.rmtree(data)
    generate_synthetic(data, 20_000, seed=0)  # prepared again for a retrain: larger id tables
    grown = DatasetSchema.load(data)
    _run(data, second, [*llactr, "train.max_steps=1"])
    with open(os.path.join(second, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    with open(os.path.join(second, "plugins.json"), encoding="utf-8") as handle:
        plugins = json.load(handle)
    try:  # the first run's checkpoint holds tables of the old sizes
        _run(data, first, [*llactr, "train.max_steps=2"])
        error = None
    except ConfigError as exc:
        error = str(exc)
    return {"before": before.to_dict(), "grown": grown.to_dict(), "plan": plan, "plugins": plugins, "error": error,
            "fingerprints": [before.fingerprint(), grown.fingerprint()]}


@pytest.mark.multiprocess
def test_field_vectors_train_a_new_run_on_grown_tables_but_no_resume_of_the_old_one(tmp_path) -> None:
    """Field vectors encoded before the id tables grew train a new run on the grown data (its tables of the new
    sizes), without encoding again; the run that trained on the old tables still does not resume on the new."""
    (out,) = run_multiprocess(_llactr_on_grown_tables, world_size=1, root=str(tmp_path))
    before, grown = ({f["name"]: f for f in schema["fields"]} for schema in (out["before"], out["grown"]))
    assert grown["item_id"]["cardinality"] > before["item_id"]["cardinality"]
    sizes = {table: [shard["sizes"] for shard in placement["shards"]] for table, placement in out["plan"].items()}
    for name in ("user_id", "item_id"):
        assert sum(rows for rows, _ in sizes[f"t_{name}"]) == grown[name]["cardinality"], sizes
    assert out["plugins"]["schema_fingerprint"] == out["fingerprints"][1]  # the run's schema: the grown one
    assert out["plugins"]["llactr"]["schema_fingerprint"] == out["fingerprints"][0]  # the file's, as it was made
    assert out["plugins"]["llactr"]["fields_used"]
    assert out["error"] is not None and "trained on data with schema fingerprint" in out["error"]
    assert re.search(r"item_id: cardinality \d+ -> \d+", out["error"])


def _second_job_in_a_run_dir(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.atomic_dir import TryAgainLater
    from recsys_llm.train.run_records import lock_run_dir

    run_dir = os.path.join(root, "run")
    _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=1"])
    first_job = lock_run_dir(run_dir)  # as a job training there holds it
    error, try_again = None, False
    try:
        _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=2"])
    except ConfigError as exc:
        error = str(exc)
        try_again = isinstance(exc, TryAgainLater)  # the command line exits 75 (EX_TEMPFAIL) for it, not 2
    first_job.close()
    again = _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=2"])  # the lock is gone with its job
    return {"error": error, "try_again": try_again, "steps_after": again["global_step"]}


@pytest.mark.multiprocess
def test_a_second_job_in_a_run_dir_in_use_is_refused(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_second_job_in_a_run_dir, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert out["error"] is not None and "another job is training in this train.run_dir" in out["error"]
    assert out["try_again"] and out["steps_after"] == 2


def _job_ending_while_another_starts(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train import runner

    run_dir, other = os.path.join(root, "run"), os.path.join(root, "other")
    _run(schema_dir, other, ["train.epochs=1", "train.max_steps=3", "optim.dense_lr=0.01"])
    real_lock = runner.lock_run_dir

    def lock_after_the_other_job(path: str) -> Any:
        # the job launched beside this one in the same run_dir ends (its checkpoints written) before this one
        # locks it: this one's checks saw an empty directory
        shutil.copytree(other, path, dirs_exist_ok=True)
        return real_lock(path)

    runner.lock_run_dir = lock_after_the_other_job
    try:
        _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=1", "train.resume=false"])
        error = None
    except ConfigError as exc:
        error = str(exc)
    finally:
        runner.lock_run_dir = real_lock
    left = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    def config(directory: str) -> bytes:
        return open(os.path.join(directory, "config.yaml"), "rb").read()

    return {"error": error, "checkpoints": left, "other_config_kept": config(run_dir) == config(other)}


@pytest.mark.multiprocess
def test_a_job_whose_run_dir_got_checkpoints_between_its_checks_and_its_lock_is_refused(synthetic_dir: str,
                                                                                          tmp_path) -> None:
    """Two jobs launched at once into one run_dir: the first ends before the second takes the lock. The second
    (train.resume=false, checked on an empty directory) trained beside the first's checkpoints, overwrote its
    config.yaml, and tested the first job's best/ as its own."""
    (out,) = run_multiprocess(_job_ending_while_another_starts, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["error"] is not None and "another job changed this train.run_dir's checkpoints" in out["error"]
    assert out["checkpoints"] == ["ckpt-00000003", "latest"]
    assert out["other_config_kept"]


def _schema_seen_late_by_rank_1(schema_dir: str, run_dir: str) -> float:
    import torch
    import torch.distributed as dist

    from recsys_llm.train.distributed import TIMEOUT_ENV, init_distributed
    from recsys_llm.train.run_data import load_or_generate_schema

    os.environ[TIMEOUT_ENV] = "60"
    config = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, 256, ["data.synthetic_rows=2000"]))
    ctx = init_distributed("cpu")
    if ctx.rank == 1:  # a slow rank: rank 0 has generated the data before this one looks
        while not os.path.exists(os.path.join(schema_dir, "schema.json")):
            time.sleep(0.05)
    load_or_generate_schema(config, ctx)
    total = torch.tensor([float(ctx.rank + 1)])
    dist.all_reduce(total)  # pairs with the other rank's all_reduce only if both met at the same barrier
    return float(total)


@pytest.mark.multiprocess
def test_a_rank_that_finds_the_generated_schema_already_there_still_meets_rank_0(tmp_path) -> None:
    schema_dir = str(tmp_path / "generated")
    assert run_multiprocess(_schema_seen_late_by_rank_1, world_size=2, schema_dir=schema_dir,
                            run_dir=str(tmp_path / "run")) == [3.0, 3.0]


def _train_two_steps(schema_dir: str, run_dir: str) -> Dict[str, Any]:
    return _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=2", "data.batch_size=512"])


def _resume_on_one_rank(schema_dir: str, run_dir: str, extra: List[str]) -> Dict[str, Any]:
    run_files = ("config.yaml", "plugins.json", "sharding_plan.json", "metrics.jsonl")

    def contents() -> Dict[str, bytes]:
        return {name: open(os.path.join(run_dir, name), "rb").read() for name in run_files}

    before = contents()
    try:
        result = _run(schema_dir, run_dir, ["train.epochs=1", "data.batch_size=512", *extra])
        return {"result": result, "events": _after_last_resume(_events(run_dir))}
    except ConfigError as exc:
        return {"error": str(exc), "run_files_unchanged": contents() == before}


@pytest.mark.multiprocess
def test_a_mid_epoch_checkpoint_of_two_ranks_resumes_on_one_only_when_told_to(synthetic_dir: str, tmp_path) -> None:
    """Each rank reads its own rows: 2 ranks' position has no exact place on 1 rank."""
    run_dir = str(tmp_path / "run")
    run_multiprocess(_train_two_steps, world_size=2, schema_dir=synthetic_dir, run_dir=run_dir)
    (refused,) = run_multiprocess(_resume_on_one_rank, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir,
                                  extra=[])
    assert "2 steps into epoch 0 by 2 rank(s)" in refused["error"] and "train.reshard_mid_epoch" in refused["error"]
    assert refused["run_files_unchanged"]

    (resumed,) = run_multiprocess(_resume_on_one_rank, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir,
                                  extra=["train.reshard_mid_epoch=true"])
    (epoch,) = [e for e in resumed["events"] if e["event"] == "epoch"]
    assert epoch["resumed_at_step_in_epoch"] == 4  # 2 steps x 512 rows x 2 ranks = 4 steps of 512 on 1 rank


def _killed_on_the_epochs_last_step(schema_dir: str, run_dir: str) -> None:
    # 4,800 rows a rank: 5 steps of 1024; killed after that step's checkpoint, before the epoch-end one
    _run_killed(schema_dir, run_dir, ["train.epochs=1", "train.checkpoint_every=5"], global_step=5)


@pytest.mark.multiprocess
def test_a_checkpoint_of_two_ranks_last_step_in_an_epoch_resumes_on_one_at_that_epochs_end(synthetic_dir: str,
                                                                                         tmp_path) -> None:
    """Every row of the epoch was trained on: no position is lost on another number of ranks."""
    run_dir = str(tmp_path / "run")
    run_multiprocess(_killed_on_the_epochs_last_step, world_size=2, schema_dir=synthetic_dir, run_dir=run_dir)
    (resumed,) = run_multiprocess(_resume_on_one_rank, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir,
                                  extra=["data.batch_size=1024"])
    assert "error" not in resumed, resumed.get("error")
    (epoch,) = [e for e in resumed["events"] if e["event"] == "epoch"]
    assert (epoch["steps"], epoch["resumed_at_step_in_epoch"]) == (0, 10)  # 9,600 rows: 10 steps of 1024 on 1 rank
    assert resumed["result"]["global_step"] == 5


def test_a_checkpoint_of_an_epochs_last_step_goes_on_at_its_end_under_another_batch_or_world_size(
        synthetic_schema: DatasetSchema, capsys) -> None:
    """The epoch's last batch may be partial: its step counts fewer rows than ``batch_size``."""
    import torch

    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.resume import check_resumable_position, state_for_world

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    reader = ParquetBatchReader(synthetic_schema, "train", 1000, prefetch=0)
    assert len(reader) == 10 and reader.batches_with(1, 256) == 38 and reader.batches_with(2, 1000) == 5
    # 9,600 rows in 37 batches of 256 and one of 128: all of them, not 9 batches of 1000 and 728 rows
    whole = state_for_world(TrainState(step_in_epoch=38, global_step=38, world_size=1, batch_size=256), ctx, 1000,
                            seed=0, reader=reader)
    assert whole.step_in_epoch == 10 and "read again" not in capsys.readouterr().err
    last_of_two = TrainState(step_in_epoch=5, global_step=5, world_size=2, batch_size=1000)
    check_resumable_position(last_of_two, ctx, TrainConfig(epochs=2), reader, shuffle=True)  # not refused
    with pytest.raises(ConfigError, match="4 steps into epoch 0 by 2 rank"):
        check_resumable_position(TrainState(step_in_epoch=4, global_step=4, world_size=2, batch_size=1000), ctx,
                                 TrainConfig(epochs=2), reader, shuffle=True)


def _refusals(schema_dir: str, root: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for name, extra in (("valid_typo", ["data.valid_split=vaild"]), ("test_typo", ["data.test_split=tset"]),
                        ("train_typo", ["data.train_split=trian"]), ("train_empty", ["data.train_split="])):
        run_dir = os.path.join(root, name)
        try:
            _run(schema_dir, run_dir, ["train.max_steps=1", *extra])
            out[name] = None
        except ConfigError as exc:
            out[name] = str(exc)
        out[f"{name}_left_a_run_dir"] = os.path.exists(run_dir)
    foreign = os.path.join(root, "foreign")  # a directory of the user's: config.yaml is a common name
    os.makedirs(foreign)
    for name, text in (("config.yaml", "foo: bar\n"), ("results.json", '{"k": 1}')):
        with open(os.path.join(foreign, name), "w", encoding="utf-8") as handle:
            handle.write(text)
    try:
        _run(schema_dir, foreign, ["train.max_steps=1"])
        out["foreign"] = None
    except ConfigError as exc:
        out["foreign"] = str(exc)
    out["foreign_after"] = {name: open(os.path.join(foreign, name), encoding="utf-8").read()
                            for name in sorted(os.listdir(foreign))}
    no_valid = os.path.join(root, "no_valid")
    out["no_valid"] = _run(schema_dir, no_valid, ["train.max_steps=2", "data.valid_split=''"])
    os.remove(os.path.join(no_valid, "config.yaml"))
    try:
        _run(schema_dir, no_valid, ["train.max_steps=3"])
        out["no_config"] = None
    except ConfigError as exc:
        out["no_config"] = str(exc)
    return out


@pytest.mark.multiprocess
def test_a_mistyped_split_and_a_run_dir_without_its_config_are_refused_and_leave_nothing(synthetic_dir: str,
                                                                                       tmp_path) -> None:
    (out,) = run_multiprocess(_refusals, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert "data.valid_split='vaild'" in out["valid_typo"] and "'valid'" in out["valid_typo"]
    assert "data.test_split='tset'" in out["test_typo"]
    assert not out["valid_typo_left_a_run_dir"] and not out["test_typo_left_a_run_dir"]
    # named as the setting, as valid and test are: not "trian: no such Parquet file or directory"
    assert out["train_typo"].startswith("data.train_split='trian': ") and "'train'" in out["train_typo"], out
    assert out["train_empty"].startswith("data.train_split='': ") and "'train'" in out["train_empty"], out
    assert not out["train_typo_left_a_run_dir"] and not out["train_empty_left_a_run_dir"]
    assert out["no_valid"]["global_step"] == 2 and out["no_valid"]["test"]  # '' trains without validation
    assert "no config.yaml" in out["no_config"]
    assert out["foreign"] is not None and "train.run_dir is not empty and holds no run" in out["foreign"], out
    assert "config.yaml, results.json" in out["foreign"]
    assert out["foreign_after"] == {"config.yaml": "foo: bar\n", "results.json": '{"k": 1}'}  # untouched


def test_a_resume_whose_vector_file_now_holds_other_vectors_is_refused() -> None:
    from recsys_llm.train.run_records import check_same_field_vectors

    saved = {"llactr": {"config": {"lambda_fre": 0.1}, "vectors": "v.safetensors", "created_at": "a",
                        "fields_used": ["user_id", "item_id"], "extra": {"templates": {"field": "{name}"}}}}
    moved = {"llactr": {**saved["llactr"], "vectors": "elsewhere/v.safetensors", "created_at": "b",
                        "fields_used": ("user_id", "item_id"), "left_out": []}}  # a newer record's extra entry
    check_same_field_vectors(saved, moved, "run/plugins.json")  # moved, or written again: the same vectors
    other = {"llactr": {**moved["llactr"], "extra": {"templates": {"field": "{name}: {description}"}}}}
    with pytest.raises(ConfigError, match=r"run/plugins.json: this run trained with other field vectors than "
                                          r"elsewhere/v.safetensors holds now \(differing: extra \{'templates': "
                                          r"\{'field': '\{name\}'\}\} -> \{'templates': \{'field': "
                                          r"'\{name\}: \{description\}'\}\}\); "
                                          r"its checkpoint .* Pass the vector file the run started with"):
        check_same_field_vectors(saved, other, "run/plugins.json")
    check_same_field_vectors({}, other, "run/plugins.json")  # a run without llactr: nothing to compare


def test_vectors_encoded_again_from_the_same_model_files_at_another_path_are_the_same_vectors() -> None:
    """model_id and extra.ssft_adapter name where the model and the adapter lay (MiniLM's is inside the
    venv); model_hash says which files they were: the same files elsewhere give the same vectors."""
    from recsys_llm.train.run_records import check_same_field_vectors

    saved = {"llactr": {"vectors": "v.safetensors", "model_id": "/old/venv/minilm+ssft:ab12", "model_hash": "h+ab12+f1",
                        "extra": {"ssft_adapter": "/old/runs/ssft/adapter", "dtype": "float32"}}}
    elsewhere = {"llactr": {**saved["llactr"], "model_id": "/new/venv/minilm+ssft:ab12",
                            "extra": {"ssft_adapter": "/new/runs/ssft/adapter", "dtype": "float32"}}}
    check_same_field_vectors(saved, elsewhere, "run/plugins.json")
    other_files = {"llactr": {**saved["llactr"], "model_hash": "h+ab12+f2"}}  # adapter files changed in place
    with pytest.raises(ConfigError, match=r"\(differing: model_hash 'h\+ab12\+f1' -> 'h\+ab12\+f2'\)"):
        check_same_field_vectors(saved, other_files, "run/plugins.json")
    other_dtype = {"llactr": {**elsewhere["llactr"], "extra": {"ssft_adapter": "/new/a", "dtype": "bfloat16"}}}
    with pytest.raises(ConfigError, match=r"\(differing: extra \{.*'float32'\} -> \{.*'bfloat16'\}\)"):
        check_same_field_vectors(saved, other_dtype, "run/plugins.json")
    unhashed = {"llactr": {key: value for key, value in saved["llactr"].items() if key != "model_hash"}}
    # no hash to say they are the same files
    with pytest.raises(ConfigError, match=r"\(differing: model_id '/old/venv/minilm\+ssft:ab12' -> '/new'\)"):
        check_same_field_vectors(unhashed, {"llactr": {**unhashed["llactr"], "model_id": "/new"}}, "run/plugins.json")


def test_evaluate_and_export_check_the_vectors_against_the_run_they_load(tmp_path) -> None:
    """A vector file of the run's fields in another order would match its trained pair weights to the
    wrong fields: refused like a resume's; a moved copy is fine."""
    from recsys_llm.train.run_records import check_trained_with_these_vectors

    run = tmp_path / "run"
    checkpoint = run / "best" / "ckpt-00000010"
    checkpoint.mkdir(parents=True)
    trained = {"vectors": "v.safetensors", "fields_used": ["user_id", "item_id"], "model": "minilm"}
    (run / "plugins.json").write_text(json.dumps({"llactr": trained}), encoding="utf-8")
    check_trained_with_these_vectors(str(checkpoint), {"llactr": {**trained, "vectors": "moved/v.safetensors"}})
    reordered = {"llactr": {**trained, "fields_used": ["item_id", "user_id"]}}
    with pytest.raises(ConfigError, match=r"run/plugins.json: this run trained with other field vectors than "
                                          r"v.safetensors holds now \(differing: fields_used "
                                          r"\['user_id', 'item_id'\] -> "
                                          r"\['item_id', 'user_id'\]\); its checkpoint .* the run trained with "
                                          r"\(llactr.vectors_path; moved is fine\)"):
        check_trained_with_these_vectors(str(checkpoint), reordered)
    check_trained_with_these_vectors(str(tmp_path / "bare" / "ckpt-1"), reordered)  # no run record: nothing to check


def test_field_vectors_loaded_under_grown_tables_are_the_vectors_the_run_trained_with(tmp_path) -> None:
    """The same file read under a schema whose table grew records what it recorded (the same vectors: a run's
    vector check passes), while evaluate and export still refuse the grown schema (the checkpoint's tables have the
    old sizes); so does the file encoded again after the table grew; a file encoded with another field text is other
    vectors."""
    import dataclasses

    import torch

    from recsys_llm.data.schema import FieldSpec
    from recsys_llm.semantics.store import VectorProvenance, load_vectors, save_vectors
    from recsys_llm.train.run_records import check_same_field_vectors, check_trained_on

    schema = DatasetSchema("toy", [FieldSpec("user_id", cardinality=20, description="user id"),
                                   FieldSpec("item_id", cardinality=20, description="item id")])
    grown = dataclasses.replace(schema, fields=[schema.fields[0],
                                                dataclasses.replace(schema.fields[1], cardinality=90)])
    path = str(tmp_path / "v.safetensors")
    provenance = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="{name}: {description}")
    save_vectors(path, torch.randn(2, 4), ["user_id", "item_id"], provenance.for_schema(schema))

    def record(schema_now: DatasetSchema, vectors: str = path) -> Dict[str, Any]:
        return {"llactr": {"vectors": vectors, **load_vectors(vectors, schema=schema_now).provenance.to_dict()}}

    saved = json.loads(json.dumps(record(schema)))  # as plugins.json holds it
    check_same_field_vectors(saved, record(grown), "run/plugins.json")
    encoded_again = str(tmp_path / "again.safetensors")  # a daily job encoding the same fields after a table grew
    save_vectors(encoded_again, torch.randn(2, 4), ["user_id", "item_id"], provenance.for_schema(grown))
    check_same_field_vectors(saved, record(schema, encoded_again), "run/plugins.json")
    check_same_field_vectors(saved, record(grown, encoded_again), "run/plugins.json")
    described = dataclasses.replace(grown, fields=[schema.fields[0], dataclasses.replace(grown.fields[1],
                                                                                         description="the item")])
    other = str(tmp_path / "other.safetensors")
    save_vectors(other, torch.randn(2, 4), ["user_id", "item_id"], provenance.for_schema(described))
    with pytest.raises(ConfigError, match=r"other field vectors .*\(differing: .*schema_semantic_fingerprint"):
        check_same_field_vectors(saved, record(described, other), "run/plugins.json")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n", encoding="utf-8")
    trained_on = {"schema_fingerprint": schema.fingerprint(), "schema_contents": schema.fingerprinted()}
    (run / "plugins.json").write_text(json.dumps({**trained_on, **saved}), encoding="utf-8")
    check_trained_on(schema, str(run / "config.yaml"), "ckpt")
    with pytest.raises(ConfigError, match=r"ckpt: trained on data with schema fingerprint .*\(item_id: cardinality "
                                          r"20 -> 90\)"):
        check_trained_on(grown, str(run / "config.yaml"), "ckpt")



def test_vectors_of_records_without_a_semantic_fingerprint_still_compare_the_schema_fingerprint(tmp_path) -> None:
    """The full schema fingerprint is passed over only where both records hold the same semantic fingerprint: records
    of an older version (no ``schema_semantic_fingerprint``), or one record lacking it, still compare the schema's."""
    import dataclasses

    import torch

    from recsys_llm.data.schema import FieldSpec
    from recsys_llm.semantics.store import VectorProvenance, load_vectors, save_vectors
    from recsys_llm.train.run_records import changed_field_vectors

    schema = DatasetSchema("toy", [FieldSpec("user_id", cardinality=20, description="user id"),
                                   FieldSpec("item_id", cardinality=20, description="item id")])
    grown = dataclasses.replace(schema, fields=[schema.fields[0],
                                                dataclasses.replace(schema.fields[1], cardinality=90)])
    provenance = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="{name}: {description}")
    records = {}
    for name, schema_now in (("old", schema), ("grown", grown)):
        path = str(tmp_path / f"{name}.safetensors")
        save_vectors(path, torch.randn(2, 4), ["user_id", "item_id"], provenance.for_schema(schema_now))
        records[name] = json.loads(json.dumps({"llactr": load_vectors(path, schema=schema_now).provenance.to_dict()}))
    assert records["old"]["llactr"]["schema_semantic_fingerprint"] == \
        records["grown"]["llactr"]["schema_semantic_fingerprint"]
    assert changed_field_vectors(records["old"], records["grown"]) == []  # the same fields' texts

    def older(record: Dict[str, Any]) -> Dict[str, Any]:
        return {"llactr": {key: value for key, value in record["llactr"].items()
                           if key != "schema_semantic_fingerprint"}}

    assert "schema_fingerprint" in changed_field_vectors(older(records["old"]), older(records["grown"]))
    assert "schema_fingerprint" in changed_field_vectors(older(records["old"]), records["grown"])


@pytest.mark.multiprocess
def test_a_finished_mid_epoch_run_of_two_ranks_evaluates_on_one(synthetic_dir: str, tmp_path) -> None:
    """A run that stopped at max_steps mid-epoch trains no further row: another world size is fine."""
    run_dir = str(tmp_path / "run")
    run_multiprocess(_train_two_steps, world_size=2, schema_dir=synthetic_dir, run_dir=run_dir)
    (again,) = run_multiprocess(_resume_on_one_rank, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir,
                                extra=["train.max_steps=2"])
    assert "error" not in again and again["result"]["global_step"] == 2


def _resume_without_a_valid_split(schema_dir: str, root: str) -> Dict[str, Any]:
    data, run_dir = os.path.join(root, "data"), os.path.join(root, "run")
    shutil.copytree(schema_dir, data)
    schema = DatasetSchema.load(data)
    del schema.splits["valid"]
    schema.save(os.path.join(data, "schema.json"))
    _run(data, run_dir, ["train.epochs=1", "train.max_steps=1", "data.valid_split="])
    # the evaluation splits may change on resume (a run of older code named a split the data lacks)
    return _run(data, run_dir, ["train.epochs=1", "train.max_steps=2", "data.valid_split=", "data.test_split="])


@pytest.mark.multiprocess
def test_a_run_without_a_valid_split_resumes_with_other_evaluation_splits(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_resume_without_a_valid_split, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["global_step"] == 2 and not out.get("test")


def test_flush_denormal_makes_cpu_math_treat_subnormal_floats_as_zero() -> None:
    import torch

    from recsys_llm.train.process import set_cpu_float_mode

    if not torch.set_flush_denormal(False):  # it answers whether the CPU has the mode at all
        pytest.skip("this CPU cannot flush subnormal floats (torch.set_flush_denormal is unsupported)")
    subnormal = torch.tensor([1e-39])  # below float32's smallest normal number, 1.18e-38
    assert (subnormal * 1.0).item() != 0.0
    assert set_cpu_float_mode(TrainConfig()) is True  # on by default
    assert (subnormal * 1.0).item() == 0.0
    assert set_cpu_float_mode(TrainConfig(flush_denormal=False)) is False  # turns a flush before off
    assert (subnormal * 1.0).item() != 0.0


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_the_float_mode_is_set_before_the_process_group_and_any_torch_work(command, monkeypatch) -> None:
    """Before init_distributed: torch's worker threads inherit the mode only if no op ran before."""
    from recsys_llm.train import runner, trained_run

    calls: List[str] = []

    class Stop(Exception):
        pass

    def init_distributed(device: str) -> None:
        calls.append("init_distributed")
        raise Stop()

    module = runner if command == "train" else trained_run
    monkeypatch.setattr(module, "set_cpu_float_mode", lambda train_cfg: calls.append(f"flush={train_cfg.flush_denormal}"))
    monkeypatch.setattr(module, "init_distributed", init_distributed)
    monkeypatch.setattr(trained_run, "resolve_checkpoint", lambda path: path)
    monkeypatch.setattr(trained_run, "run_config_of", lambda path: None)
    monkeypatch.setattr(trained_run, "check_same_model", lambda config, saved: None)
    config = load_config(None, ["train.flush_denormal=false"])
    with pytest.raises(Stop):
        runner.run_training(config) if command == "train" else trained_run.run_evaluation(config, "some/run")
    assert calls == ["flush=False", "init_distributed"]


def test_a_resume_with_a_batch_size_that_splits_a_batch_says_which_rows_repeat(capsys) -> None:
    import torch

    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.resume import state_for_world

    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    exact = state_for_world(TrainState(step_in_epoch=4, world_size=1, batch_size=1024), ctx, 512, seed=0)
    assert exact.step_in_epoch == 8 and capsys.readouterr().err == ""
    split = state_for_world(TrainState(step_in_epoch=100, world_size=1, batch_size=256), ctx, 300, seed=0)
    assert split.step_in_epoch == 85  # 25,600 rows read: 85 batches of 300, and 100 rows read again
    assert "100 of them do not fill a batch and are read again" in capsys.readouterr().err  # a notice: stderr


def test_a_resume_under_another_world_size_gives_each_rank_a_stream_of_its_own() -> None:
    """Under another world size no rank's RNG state is restored (its ranks are others than the checkpoint's): each
    rank is reseeded from train.seed, the step and its rank, so the ranks draw dropout masks of their own, not all
    train.seed's alike, and a second resume at the same step draws the same ones again."""
    import torch

    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.resume import state_for_world

    def draws(rank: int, global_step: int) -> List[float]:
        torch.manual_seed(0)  # every rank starts from train.seed alike
        ctx = DistContext(rank=rank, world_size=2, local_rank=rank, device=torch.device("cpu"), backend="gloo")
        state_for_world(TrainState(epoch=1, global_step=global_step, world_size=1, batch_size=64), ctx, 64, seed=5)
        return torch.rand(4).tolist()

    assert draws(0, 30) != draws(1, 30)
    assert draws(0, 30) == draws(0, 30)
    assert draws(0, 30) != draws(0, 31)  # a later resume goes on from another stream, not the first one's again


def _resume_with_a_batch_size_that_shuffles_otherwise(root: str) -> Optional[str]:
    from recsys_llm.data.synthetic import generate_synthetic

    data, run_dir = os.path.join(root, "data"), os.path.join(root, "run")
    generate_synthetic(data, 90_000, seed=0)  # 72,000 training rows: more than a shuffle buffer of 65,536
    _run(data, run_dir, ["train.epochs=1", "train.max_steps=1", "data.batch_size=16384", "data.test_split="])
    try:
        _run(data, run_dir, ["train.epochs=1", "train.max_steps=0", "data.batch_size=8192", "data.test_split="])
    except ConfigError as error:
        return str(error)
    return None


@pytest.mark.multiprocess
def test_a_mid_epoch_resume_with_a_batch_size_that_shuffles_otherwise_is_refused_unless_told(tmp_path, capsys) -> None:
    """Above 8,192 rows a batch size sets the shuffle buffer (``max(8 x batch, 65,536)`` rows), so the epoch's
    rows come in another order: the rows a resume skips would be others than those trained on."""
    import torch

    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.resume import check_resumable_position

    (refusal,) = run_multiprocess(_resume_with_a_batch_size_that_shuffles_otherwise, world_size=1, root=str(tmp_path))
    assert refusal is not None and "1 steps into epoch 0 with data.batch_size=16384" in refusal
    assert "Resume with data.batch_size=16384, or set train.reshard_mid_epoch=true" in refusal
    schema = DatasetSchema.load(str(tmp_path / "data" / "schema.json"))

    def first_rows(batch_size: int, batches: int):  # noqa: ANN202
        reader = ParquetBatchReader(schema, "train", batch_size, shuffle=True, seed=0, prefetch=0)
        batch_iter = iter(reader)
        return reader, torch.cat([next(batch_iter).extras["row_id"] for _ in range(batches)])

    _, trained = first_rows(16_384, 1)
    reader, skipped = first_rows(8192, 2)
    assert not torch.equal(trained.sort().values, skipped.sort().values)  # other rows than those trained on
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    state = TrainState(step_in_epoch=1, global_step=1, world_size=1, batch_size=16_384)
    check_resumable_position(state, ctx, TrainConfig(epochs=1, reshard_mid_epoch=True), reader, shuffle=True)
    assert "goes on in another row order" in capsys.readouterr().err
    check_resumable_position(state, ctx, TrainConfig(epochs=1), reader, shuffle=False)  # read in file order
    smaller, rows = first_rows(4096, 4)
    assert torch.equal(rows, skipped)  # both buffers of 65,536 rows: the same order, the position is exact
    check_resumable_position(TrainState(step_in_epoch=2, global_step=2, world_size=1, batch_size=8192), ctx,
                             TrainConfig(epochs=1), smaller, shuffle=True)


def _evaluate_on_missing_data(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.trained_run import run_evaluation

    run_dir, missing = os.path.join(root, "run"), os.path.join(root, "not_there")
    _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=1"])
    config = load_config(DEEPFM_CONFIG, _overrides(missing, run_dir, 1024) + ["data.synthetic_rows=500"])
    try:
        run_evaluation(config, run_dir)
        error = None
    except FileNotFoundError as exc:
        error = str(exc)
    return {"error": error, "generated": os.path.exists(missing)}


@pytest.mark.multiprocess
def test_a_trained_run_is_not_evaluated_on_data_generated_for_it(synthetic_dir: str, tmp_path) -> None:
    """data.synthetic_rows generates data for training; a trained run reads the data it trained on."""
    (out,) = run_multiprocess(_evaluate_on_missing_data, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert out["error"] is not None and "is not generated here: point data.schema at it" in out["error"]
    assert not out["generated"]


def test_each_epoch_ends_with_a_line_of_its_loss_throughput_and_valid_auc() -> None:
    """The epoch's bar is cleared when it ends (``leave=False``): rank 0 prints what it showed and the
    validation that followed, so a run of many epochs leaves a record of each on the terminal."""
    from recsys_llm.train.pipeline import EpochStats
    from recsys_llm.train.runner import epoch_line

    stats = EpochStats(steps=16, samples=4000, seconds=0.5, first_step_seconds=0.1, first_step_samples=256,
                       mean_loss=0.65671, pipelined_modules=[], sharded_modules=[], stopped_early=False)
    cfg = TrainConfig(patience=2)
    state = TrainState(global_step=16, best_metric=0.57971, best_step=16)
    line = epoch_line(0, stats, 2, {"auc": 0.57971}, state, cfg)
    assert line == f"epoch 0: loss 0.6567, {stats.samples_per_second * 2:,.0f} samples/s; valid AUC 0.5797 (best)", line
    worse = TrainState(global_step=32, best_metric=0.57971, best_step=16, stop_reason=STOP_PATIENCE)
    line = epoch_line(1, stats, 1, {"auc": 0.55}, worse, cfg)
    assert line.endswith("valid AUC 0.5500 (best 0.5797 at step 16); no better valid AUC in 2 evaluation(s): "
                         "stopping early (train.patience)"), line
    assert epoch_line(2, stats, 1, None, state, cfg).startswith("epoch 2: loss 0.6567, ")  # no validation this epoch
    no_auc = epoch_line(3, None, 1, {"auc": float("nan")}, TrainState(), cfg)
    assert no_auc == "epoch 3: valid AUC nan (no valid AUC yet)", no_auc


def _run_with_a_failing_picture(schema_dir: str, run_dir: str) -> Dict[str, Any]:
    import warnings

    from recsys_llm.train import runner

    def no_space(path: str) -> None:
        raise OSError(28, "No space left on device")

    runner.plot_training_curves = no_space
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=2"])
    return {"results": results, "warnings": [str(w.message) for w in caught]}


@pytest.mark.multiprocess
def test_a_picture_that_cannot_be_drawn_does_not_fail_the_run(synthetic_dir: str, tmp_path) -> None:
    """The run is finished when the picture is drawn: a failure there is a warning on rank 0, and
    every rank still meets the others at the end."""
    run_dir = str(tmp_path / "run")
    outs = run_multiprocess(_run_with_a_failing_picture, world_size=2, schema_dir=synthetic_dir, run_dir=run_dir)
    assert [out["results"]["global_step"] for out in outs] == [2, 2]
    assert os.path.isfile(os.path.join(run_dir, "results.json"))
    assert any("training_curves.png not written: OSError" in message for message in outs[0]["warnings"]), outs[0]


def _one_class_run(schema_dir: str, root: str) -> Dict[str, Any]:
    import warnings

    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from recsys_llm.data.parquet_files import parquet_files

    data = os.path.join(root, "data")
    shutil.copytree(schema_dir, data)
    schema = DatasetSchema.load(os.path.join(data, "schema.json"))
    for split in ("valid", "test"):
        for path in parquet_files(schema.split_path(split)):
            table = pq.read_table(path)
            index = table.schema.get_field_index(schema.label)
            pq.write_table(table.set_column(index, schema.label, pc.multiply(table.column(index), 0)), path)
    run_dir = os.path.join(root, "run")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        results = _run(data, run_dir, ["train.epochs=1", "train.max_steps=2"])
    with open(os.path.join(run_dir, "results.json"), encoding="utf-8") as handle:
        written = json.load(handle, parse_constant=lambda constant: f"bare {constant}")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert cli_main(["evaluate", "--checkpoint", run_dir, "--split", "test"]) == 0  # no best/: no valid AUC
    evaluated = json.loads(printed.getvalue(), parse_constant=lambda constant: f"bare {constant}")
    return {"results": results, "written": written, "warnings": [str(w.message) for w in caught],
            "reused": finished_results(run_dir), "evaluated": evaluated}


@pytest.mark.multiprocess
def test_a_one_class_validation_split_is_warned_about_and_results_json_stays_strict_json(synthetic_dir: str,
                                                                                           tmp_path) -> None:
    """Valid and test splits of one class: the undefined valid AUC ended runs on patience without a word,
    and results.json held a bare NaN (not JSON for jq or JavaScript) where metrics.jsonl holds null."""
    (out,) = run_multiprocess(_one_class_run, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert math.isnan(out["results"]["test"]["auc"])  # the returned figures keep NaN
    assert out["written"]["test"]["auc"] is None and out["written"]["valid"]["auc"] is None
    assert "bare" not in json.dumps(out["written"]) and out["evaluated"]["auc"] is None  # and evaluate's JSON
    # read back (a finished run reused by the demo or the experiments) as run_training returned it
    reused = out["reused"]["test"]
    assert math.isnan(reused["auc"]) and reused["logloss"] == out["written"]["test"]["logloss"]
    assert any("valid AUC at step 2 is undefined: the validation split holds rows of one class only" in w
               for w in out["warnings"]), out["warnings"]


def _evaluate_as_trained_with_cuda_adam(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.trained_run import run_evaluation

    run_dir = os.path.join(root, "run")
    _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=2", "optim.sparse=sgd"])
    # the config of a run trained on CUDA with fused Adam tables, which FBGEMM's CPU kernels lack
    as_trained = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, 1024, ["optim.sparse=sgd"]))
    config = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, 1024, ["optim.sparse=adam"]))
    # and with sharding settings only CUDA plans: row-wise types, unified-memory kernels
    cuda_sharding = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, 1024, [
        "optim.sparse=adam", "sharding.sharding_types=[row_wise]", "sharding.compute_kernels=[fused_uvm_caching]",
        "sharding.table_constraints={t_user_id: {sharding_types: [table_row_wise, table_wise]}}",
        "sharding.compute_device=cuda"]))
    return {"adam": run_evaluation(config, run_dir), "sgd": run_evaluation(as_trained, run_dir),
            "cuda_sharding": run_evaluation(cuda_sharding, run_dir)}


@pytest.mark.multiprocess
def test_a_run_trained_with_cuda_only_settings_evaluates_on_cpu(synthetic_dir: str, tmp_path) -> None:
    """Evaluation and export never step the tables, yet were refused with 'pick one of those, or train on CUDA'
    (a CUDA-only table optimizer) and 'torchrec's CPU sharder offers only ...' (row-wise types, uvm kernels)."""
    (results,) = run_multiprocess(_evaluate_as_trained_with_cuda_adam, world_size=1, schema_dir=synthetic_dir,
                                  root=str(tmp_path))
    assert results["adam"] == results["sgd"] == results["cuda_sharding"]


def _data_replaced_after_the_first_epoch(schema_dir: str, root: str, epochs: int = 2) -> str:
    import shutil

    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.data.validation import DataError

    data, other = os.path.join(root, "data"), os.path.join(root, "other")
    shutil.copytree(schema_dir, data)
    generate_synthetic(other, 12_000, seed=1, rows_per_group=1024)  # the same fields and sizes, other rows

    def replace_at_the_last_step_of_epoch_0(state: TrainState) -> None:
        assert state.epoch == 0, "a step of the next epoch ran on the replaced data"
        if state.global_step == 9:  # 9.6k rows / 1,024: 9 steps an epoch
            shutil.copyfile(os.path.join(other, "train.parquet"), os.path.join(data, "train.parquet"))

    try:
        _run(data, os.path.join(root, "run"), [f"train.epochs={epochs}"], on_step=replace_at_the_last_step_of_epoch_0)
    except DataError as error:
        return str(error)
    return "trained on"


@pytest.mark.multiprocess
@pytest.mark.parametrize("epochs", [2, 1])  # 1: the last epoch's change is caught before the test
def test_data_replaced_while_the_run_trains_stops_it_at_the_next_epoch(synthetic_dir: str, tmp_path,
                                                                       epochs: int) -> None:
    """A split prepared again (or its files replaced) mid-run: the run trained its next epochs and tested on the new
    rows without a word, under plugins.json's record of the old ones (a smaller file left a rank without rows, and
    the ranks waited on each other until the collective timeout)."""
    (message,) = run_multiprocess(_data_replaced_after_the_first_epoch, world_size=1, schema_dir=synthetic_dir,
                                  root=str(tmp_path), epochs=epochs)
    assert message.startswith(f"{tmp_path / 'data'}: the data of split(s) ['train'] changed while this run trained"), \
        message


def _valid_split_replaced_during_the_first_epoch(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.data.validation import DataError

    data, other = os.path.join(root, "data"), os.path.join(root, "other")
    shutil.copytree(schema_dir, data)
    generate_synthetic(other, 12_000, seed=1, rows_per_group=1024)  # the same fields and sizes, other rows

    def replace_valid_at_the_last_step_of_epoch_0(state: TrainState) -> None:
        if state.global_step == 9:  # 9.6k rows / 1,024: 9 steps an epoch
            shutil.copyfile(os.path.join(other, "valid.parquet"), os.path.join(data, "valid.parquet"))

    run_dir = os.path.join(root, "run")
    try:
        _run(data, run_dir, ["train.epochs=2"], on_step=replace_valid_at_the_last_step_of_epoch_0)
        message = "trained on"
    except DataError as error:
        message = str(error)
    return {"message": message, "events": [e["event"] for e in _events(run_dir)],
            "best": os.listdir(os.path.join(run_dir, "best")) if os.path.isdir(os.path.join(run_dir, "best")) else []}


@pytest.mark.multiprocess
def test_valid_split_replaced_during_an_epoch_is_not_validated_on(synthetic_dir: str, tmp_path) -> None:
    """valid.parquet prepared again during epoch 0: the validation after it scored the new rows, wrote a `valid`
    record, could save best/ and spend patience under the record of the old data, and the run stopped only at the
    start of epoch 1 (the checkpoint it saved then carried that validation into the resume)."""
    (found,) = run_multiprocess(_valid_split_replaced_during_the_first_epoch, world_size=1, schema_dir=synthetic_dir,
                                root=str(tmp_path))
    assert found["message"].startswith(f"{tmp_path / 'data'}: the data of split(s) ['valid'] changed while this run "
                                       "trained"), found["message"]
    assert "valid" not in found["events"], found["events"]
    assert not [name for name in found["best"] if name.startswith("ckpt-")], found["best"]


def _full_data_checks_of_a_three_epoch_run(schema_dir: str, root: str) -> int:
    from recsys_llm.train import runner

    calls = []
    full_check = runner.check_data_unchanged
    runner.check_data_unchanged = lambda *args: calls.append(1) or full_check(*args)
    _run(schema_dir, os.path.join(root, "run"), ["train.epochs=3"])
    return len(calls)


@pytest.mark.multiprocess
def test_unchanged_data_is_fingerprinted_once_more_not_every_epoch(synthetic_dir: str, tmp_path) -> None:
    """Each check between epochs read every split's footers and up to 256 MiB of its bytes: the files' stats come
    first now, and the fingerprint only when they moved (or at the first check, which takes their baseline)."""
    (calls,) = run_multiprocess(_full_data_checks_of_a_three_epoch_run, world_size=1, schema_dir=synthetic_dir,
                                root=str(tmp_path))
    assert calls == 1, calls


def _loss_records_of_one_epoch_of_50_steps(schema_dir: str, run_dir: str) -> List[Dict[str, Any]]:
    _run(schema_dir, run_dir, ["train.epochs=1", "data.batch_size=192"])  # 9,600 train rows: 50 steps
    return [e for e in _events(run_dir) if e["event"] in ("train", "epoch")]


@pytest.mark.multiprocess
def test_a_train_record_holds_the_mean_loss_of_its_50_steps(synthetic_dir: str, tmp_path) -> None:
    """It held the loss of its one step: the curve of training_curves.png was single-batch noise (it could rise
    while the epoch's mean fell)."""
    (records,) = run_multiprocess(_loss_records_of_one_epoch_of_50_steps, world_size=1, schema_dir=synthetic_dir,
                                  run_dir=str(tmp_path / "run"))
    (train,) = [r for r in records if r["event"] == "train"]
    (epoch,) = [r for r in records if r["event"] == "epoch"]
    assert train["global_step"] == 50 and train["steps"] == 50 and epoch["steps"] == 50
    assert train["loss"] == pytest.approx(epoch["mean_loss"], rel=1e-5)  # equal batches: the epoch's mean


def _stderr_of_a_run_whose_saves_count_as_slow(schema_dir: str, run_dir: str) -> str:
    import contextlib
    import io

    from recsys_llm.train import runner

    runner.SLOW_SAVE_SECONDS = 0.0
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _run(schema_dir, run_dir, ["train.epochs=1", "train.checkpoint_every=4", "train.progress=true"])
    return err.getvalue()


@pytest.mark.multiprocess
def test_a_slow_mid_epoch_checkpoint_save_is_named_under_the_bar(synthetic_dir: str, tmp_path) -> None:
    """At scale a save takes minutes, and the bar stood still without a word."""
    (err,) = run_multiprocess(_stderr_of_a_run_whose_saves_count_as_slow, world_size=1, schema_dir=synthetic_dir,
                              run_dir=str(tmp_path / "run"))
    assert re.search(rf"step 4: checkpoint saved in \d+ s \({re.escape(str(tmp_path / 'run'))}/checkpoints/", err), err
    assert "step 8: checkpoint saved in" in err
    # and before the first step, how the tables were sharded
    assert re.search(r"sharding: \d+ table\(s\) over 1 rank\(s\) \([^;]+; [\d,.]+ (M )?weights in shards\); "
                     rf"the plan: {re.escape(str(tmp_path / 'run' / 'sharding_plan.json'))}", err), err


def _two_epochs_of_one_loss_window_each(schema_dir: str, root: str) -> List[Any]:
    run_dir = os.path.join(root, "run")
    _train(_overrides(schema_dir, run_dir, 192, ["train.epochs=2"]))  # 9,600 rows: 50 steps an epoch
    return [(e["event"], e["global_step"], e.get("loss", e.get("mean_loss")), e.get("steps"))
            for e in _events(run_dir) if e["event"] in ("train", "epoch")]


@pytest.mark.multiprocess
def test_a_loss_record_is_the_mean_of_its_own_window_not_of_every_step_before(synthetic_dir: str, tmp_path) -> None:
    """Epochs of 50 steps, the record's window: each ``train`` record is its epoch's ``mean_loss``. A window sum
    that was not emptied at its record made every later record the sum since the start over 50 steps."""
    (records,) = run_multiprocess(_two_epochs_of_one_loss_window_each, world_size=1, schema_dir=synthetic_dir,
                                  root=str(tmp_path))
    assert [(event, step, steps) for event, step, _, steps in records] == [
        ("train", 50, 50), ("epoch", 50, 50), ("train", 100, 50), ("epoch", 100, 50)]
    window_means, epoch_means = [r[2] for r in records if r[0] == "train"], [r[2] for r in records if r[0] == "epoch"]
    assert window_means == pytest.approx(epoch_means, rel=1e-6)
    assert window_means[1] < 0.9 * 2 * window_means[0]  # not the first window's sum counted again


def _resume_at_an_epochs_end_from_a_checkpoint_without_loss_sums(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.train.checkpoint import TRAIN_STATE_FILE

    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    steps_per_epoch = len(ParquetBatchReader(schema, "train", 1024))
    budget = ["train.epochs=2", f"train.checkpoint_every={steps_per_epoch}"]
    run_dir = os.path.join(root, "run")
    _run_killed(schema_dir, run_dir, budget, global_step=steps_per_epoch)  # a checkpoint of epoch 0's last step
    path = os.path.join(run_dir, "checkpoints", f"ckpt-{steps_per_epoch:08d}", TRAIN_STATE_FILE)
    with open(path, encoding="utf-8") as handle:
        state = json.load(handle)
    for key in ("loss_window_sum", "loss_window_steps", "epoch_loss_sum", "epoch_loss_steps"):
        del state[key]  # as a checkpoint written before they were carried
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    _run(schema_dir, run_dir, budget)
    return {"steps_per_epoch": steps_per_epoch, "events": _after_last_resume(_events(run_dir))}


@pytest.mark.multiprocess
def test_an_epoch_resumed_at_its_end_from_a_checkpoint_without_loss_sums_has_no_mean_loss(synthetic_dir: str,
                                                                                          tmp_path) -> None:
    """An older checkpoint carries no loss sums: the resumed epoch has no step to average, and its record says
    so (mean_loss null over 0 loss_steps), not a mean loss of 0; the next epoch's mean is over its own steps."""
    (out,) = run_multiprocess(_resume_at_an_epochs_end_from_a_checkpoint_without_loss_sums, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path))
    empty, trained = [e for e in out["events"] if e["event"] == "epoch"]
    assert (empty["epoch"], empty["steps"], empty["mean_loss"], empty["loss_steps"]) == (0, 0, None, 0)
    assert (trained["epoch"], trained["loss_steps"]) == (1, out["steps_per_epoch"]) and trained["mean_loss"] > 0


def _loss_records_resumed_from_an_epoch_end_checkpoint(schema_dir: str, root: str) -> Dict[str, Any]:
    budget = ["train.epochs=2", "train.checkpoint_every=0"]  # 38 steps an epoch: checkpoints at epoch ends only
    return _loss_records(schema_dir, root, 256, budget, kill_at=45)  # resumes from step 38's, in the window 1-50


@pytest.mark.multiprocess
def test_an_epoch_end_checkpoint_carries_the_loss_window_that_runs_on_past_it(synthetic_dir: str, tmp_path) -> None:
    """The loss window crosses the epoch boundary: the checkpoint at the epoch's end carries its steps so far
    (the sums as they stand after the epoch record), so the record at step 50 after a resume from it is the
    uninterrupted run's, not the mean of the steps after the resume."""
    (out,) = run_multiprocess(_loss_records_resumed_from_an_epoch_end_checkpoint, world_size=1,
                              schema_dir=synthetic_dir, root=str(tmp_path))
    assert [r[:2] for r in out["resumed"]] == [("epoch", 38), ("train", 50), ("epoch", 76)]
    assert out["resumed"] == out["straight"]


def _train_a_large_model_in_the_log(schema_dir: str, run_dir: str) -> str:
    """What rank 0 prints while a model above the noted sizes (here: any) shards and saves."""
    import contextlib
    import io

    from recsys_llm.train import runner

    runner.NOTED_STATE_BYTES, runner.NOTED_TABLE_WEIGHTS = 0, 0
    shown = io.StringIO()
    with contextlib.redirect_stderr(shown):
        _run(schema_dir, run_dir, ["train.epochs=1", "train.max_steps=3", "train.checkpoint_every=2",
                                   "train.progress=true"])
    return shown.getvalue()


def _table_weights_of_the_run(schema_dir: str) -> str:
    """The weights of the tables the DeepFM of ``_run`` builds, as the runner's note writes them."""
    import torch

    from recsys_llm.train.plan_report import weights_text
    from recsys_llm.train.planner_inputs import find_tables, table_weights
    from recsys_llm.train.task_builder import build_task

    config = load_config(DEEPFM_CONFIG, _overrides(schema_dir, "unused", 1024, []))
    task = build_task(config, DatasetSchema.load(os.path.join(schema_dir, "schema.json")), torch.device("cpu")).task
    return weights_text(table_weights(find_tables(task)))


@pytest.mark.multiprocess
def test_a_large_models_sharding_and_checkpoint_saves_are_said_before_they_take_their_time(synthetic_dir: str,
                                                                                            tmp_path) -> None:
    """A 1.6 GB model's log stood at 'valid:   0%' through 18 s of saves, and said nothing while it sharded."""
    run_dir = str(tmp_path / "run")
    (shown,) = run_multiprocess(_train_a_large_model_in_the_log, world_size=1, schema_dir=synthetic_dir,
                                run_dir=run_dir)
    lines = shown.splitlines()
    weights = re.escape(_table_weights_of_the_run(synthetic_dir))  # each table once (an EBC of T tables counted T times)
    assert any(re.fullmatch(rf"sharding: planning \d+ tables \({weights} weights\) on 1 rank\(s\) and building "
                            r"their shards", line) for line in lines), shown
    saves = [line for line in lines if line.startswith("saving ")]
    assert [line.split()[1] for line in saves] == [
        os.path.join(run_dir, "checkpoints", "ckpt-00000002"), os.path.join(run_dir, "best", "ckpt-00000003"),
        os.path.join(run_dir, "checkpoints", "ckpt-00000003")], saves
    assert all(re.search(r" \(\d+\.\d GiB on rank 0\)$", line) for line in saves), saves
    assert shown.index("sharding: planning") < shown.index("sharding:", shown.index("sharding: planning") + 1)


def _evaluate_a_run_pinned_to_a_plan_file(schema_dir: str, root: str) -> Dict[str, Any]:
    import shutil

    from recsys_llm.train.trained_run import run_evaluation

    planned, pinned = os.path.join(root, "planned"), os.path.join(root, "pinned")
    _run(schema_dir, planned, ["train.epochs=1", "train.max_steps=2"])
    plan_file = os.path.join(root, "plan.json")
    shutil.copy(os.path.join(planned, "sharding_plan.json"), plan_file)
    extra = ["train.epochs=1", "train.max_steps=2", f"sharding.plan_file={plan_file}"]
    _run(schema_dir, pinned, extra)
    config = load_config(os.path.join(pinned, "config.yaml"))  # what evaluate / export read: the run's own
    assert config.sharding.plan_file == plan_file
    results = {"own": run_evaluation(config, pinned)}
    with open(plan_file, encoding="utf-8") as handle:  # as a plan of a 2-rank run: every table on rank 1
        placements = json.load(handle)
    for placement in placements.values():
        placement["ranks"] = [1]
        for shard in placement["shards"]:
            shard["rank"] = 1
    with open(plan_file, "w", encoding="utf-8") as handle:
        json.dump(placements, handle)
    results["two_ranks"] = run_evaluation(config, pinned)
    os.remove(plan_file)
    results["moved"] = run_evaluation(config, pinned)
    return results


@pytest.mark.multiprocess
def test_a_run_pinned_to_a_plan_file_evaluates_on_other_ranks_and_without_the_file(synthetic_dir: str,
                                                                                    tmp_path) -> None:
    """evaluate / export of a run trained with sharding.plan_file (kept in its config.yaml) applied that plan:
    a 2-rank run's was refused on 1 rank ('on ranks [1], but the job has 1 rank(s)'), and a moved file was
    refused too, though the checkpoint loads on any number of ranks."""
    (results,) = run_multiprocess(_evaluate_a_run_pinned_to_a_plan_file, world_size=1, schema_dir=synthetic_dir,
                                  root=str(tmp_path))
    assert results["own"] == results["two_ranks"] == results["moved"]


def test_a_job_on_a_finished_run_says_it_trains_nothing_and_how_to_go_on() -> None:
    """Running a finished run's command again trains nothing: the line says so instead of 'resuming'."""
    from recsys_llm.train.runner import _resume_line

    going_on = _resume_line("runs/a", "runs/a/checkpoints/ckpt-10", TrainState(epoch=1, global_step=10))
    assert going_on == "resuming runs/a from runs/a/checkpoints/ckpt-10: epoch 1, step 10"
    spent = _resume_line("runs/a", "c", TrainState(epoch=2, global_step=20, finished=True, stop_reason=STOP_BUDGET))
    assert spent.startswith("runs/a is finished (its train.epochs / train.max_steps used up, epoch 2, step 20): "
                            "nothing to train") and "raise train.epochs or train.max_steps" in spent
    patient = _resume_line("runs/a", "c", TrainState(epoch=2, global_step=20, finished=True, stop_reason=STOP_PATIENCE))
    assert "stopped early: train.patience" in patient and "raise" not in patient
    assert "another train.run_dir for a new run" in patient


def _diverging_and_short_runs(schema_dir: str, root: str) -> Dict[str, List[str]]:
    import warnings

    messages = {}
    for name, extra in (("diverged", ["train.epochs=3", "optim.dense_lr=50", "optim.sparse_lr=50"]),
                        ("short", ["train.epochs=1", "train.max_steps=3"])):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            _run(schema_dir, os.path.join(root, name), extra)
        messages[name] = [str(w.message) for w in caught if "diverged" in str(w.message)]
    return messages


@pytest.mark.multiprocess
def test_a_diverged_model_is_warned_about_at_validation_and_a_short_run_is_not(synthetic_dir: str, tmp_path) -> None:
    """A DeepFM on unstandardised dense values (Criteo's) ended with test LogLoss 3.2 and no word; a model only
    undertrained (a few steps, near 0.5 for every row) is not called diverged. Said once a job: it was said at every
    validation (187 times in a 200-epoch run)."""
    (out,) = run_multiprocess(_diverging_and_short_runs, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert len(out["diverged"]) == 1 and re.match(r"valid LogLoss at step \d+ is \d+\.\d{4} \(NE \d+\.\d\d\), far worse "
                                                  r"than the click rate alone", out["diverged"][0]), out
    assert "model.dense_as_fields=false" in out["diverged"][0]
    assert out["short"] == []
