"""Windowed training metrics (``train.metrics_window``): torchrec's AUC / NE / calibration of the last samples,
equal to the exact metrics of that window, the same on every rank, off by default, refused when mis-set."""

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import pytest
import torch

from recsys_llm.train.config import ConfigError, TrainConfig, load_config
from recsys_llm.train.curves import training_curves
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import binary_metrics
from recsys_llm.train.run_records import TRAIN_WINDOW_EVENT, read_metrics
from recsys_llm.train.train_metrics import WindowedTrainMetrics, check_window
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _stream(batches: int, batch_size: int, seed: int) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(logits (B,), labels (B,)) per step: informative, both classes, no tied probabilities (torchrec's AUC
    orders ties as its sort leaves them, the exact one counts them half)."""
    g = torch.Generator().manual_seed(seed)
    labels = (torch.rand(batches * batch_size, generator=g) < 0.4).float()
    logits = torch.randn(batches * batch_size, generator=g) + 1.5 * labels
    return list(zip(logits.split(batch_size), labels.split(batch_size)))


def _exact(logits: torch.Tensor, labels: torch.Tensor) -> Dict[str, float]:
    """The window's AUC (Mann-Whitney), NE, calibration and click rate, in float64 (:func:`binary_metrics`)."""
    values = binary_metrics(torch.sigmoid(logits.double()), labels, logits)
    return {name: values[name] for name in ("auc", "ne", "calibration", "ctr")}


def _assert_close(got: Dict[str, float], want: Dict[str, float]) -> None:
    assert set(got) == set(want)
    for name in want:  # torchrec keeps float32 probabilities
        assert got[name] == pytest.approx(want[name], rel=1e-5, abs=1e-6), (name, got, want)


class TestWindowedTrainMetrics:
    def test_the_window_of_one_rank_has_the_exact_metrics_of_its_last_samples(self) -> None:
        stream = _stream(batches=7, batch_size=8, seed=0)
        metrics = WindowedTrainMetrics(window=24, every=3, batch_size=8, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        computed = [metrics.update(logits, labels) for logits, labels in stream]
        assert [step for step, values in enumerate(computed, 1) if values is not None] == [3, 6]
        logits, labels = torch.cat([x for x, _ in stream]), torch.cat([y for _, y in stream])
        _assert_close(computed[2], _exact(logits[:24], labels[:24]))
        _assert_close(computed[5], _exact(logits[24:48], labels[24:48]))  # the first batches left the window
        assert metrics.computed is None  # step 7 computed nothing

    def test_a_window_of_one_class_has_no_auc_or_ne(self) -> None:
        """torchrec gives such a window AUC 0.5 and an NE of ~1e12 (its click rate's entropy is 0), which
        metrics.jsonl recorded as numbers; held-out metrics of one class are NaN (null in the records)."""
        metrics = WindowedTrainMetrics(window=8, every=1, batch_size=4, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        values = metrics.update(torch.randn(4), torch.ones(4))
        assert values["ctr"] == 1.0 and math.isnan(values["auc"]) and math.isnan(values["ne"]), values
        assert values["calibration"] > 0
        values = metrics.update(torch.randn(4), torch.zeros(4))  # the window holds both classes now
        assert values["ctr"] == 0.5 and 0.0 <= values["auc"] <= 1.0 and 0.0 < values["ne"] < 100, values

    def test_a_window_without_a_click_has_no_calibration(self) -> None:
        """torchrec gives it 0.0 (as if the model predicted no click), which metrics.jsonl recorded; the held-out
        calibration of a split without a click is NaN (null)."""
        metrics = WindowedTrainMetrics(window=8, every=1, batch_size=4, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        values = metrics.update(torch.randn(4), torch.zeros(4))
        assert values["ctr"] == 0.0 and math.isnan(values["calibration"]), values
        values = metrics.update(torch.randn(4), torch.ones(4))
        assert values["ctr"] == 0.5 and values["calibration"] > 0, values

    def test_auc_keeps_exactly_the_window_when_it_is_no_whole_number_of_batches(self) -> None:
        stream = _stream(batches=5, batch_size=8, seed=1)
        metrics = WindowedTrainMetrics(window=20, every=5, batch_size=8, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        values = [metrics.update(logits, labels) for logits, labels in stream][-1]
        logits, labels = torch.cat([x for x, _ in stream]), torch.cat([y for _, y in stream])
        assert values["auc"] == pytest.approx(_exact(logits[-20:], labels[-20:])["auc"], abs=1e-6)

    def test_rows_of_weight_zero_count_in_no_metric(self) -> None:
        """Swapped pairs' label-free rows carry ``label_weight`` 0 (and label 0): they must not count as negatives."""
        stream = _stream(batches=4, batch_size=8, seed=2)
        metrics = WindowedTrainMetrics(window=32, every=4, batch_size=8, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
        values = [metrics.update(logits, labels * weights, weights) for logits, labels in stream][-1]
        kept = [(x[:4], y[:4]) for x, y in stream]
        _assert_close(values, _exact(torch.cat([x for x, _ in kept]), torch.cat([y for _, y in kept])))

    def test_computes_fall_on_the_global_steps_a_resumed_run_counts_from(self) -> None:
        metrics = WindowedTrainMetrics(window=16, every=4, batch_size=8, world_size=1, rank=0,
                                       device=torch.device("cpu"), start_step=6)
        computed = [metrics.update(logits, labels) is not None for logits, labels in _stream(6, 8, seed=3)]
        assert [7 + i for i, done in enumerate(computed) if done] == [8, 12]

    def test_a_window_smaller_than_a_step_over_the_ranks_is_refused_naming_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"train\.metrics_window=8 .* at least 16 samples"):
            WindowedTrainMetrics(window=8, every=1, batch_size=8, world_size=2, rank=0, device=torch.device("cpu"))
        # each rank's share is rounded up, as torchrec rounds it: 15 samples on 2 ranks keep 8 a rank
        check_window(15, 8, 2)
        with pytest.raises(ConfigError, match=r"train\.metrics_window=14 .* at least 16 samples"):
            check_window(14, 8, 2)

    def test_a_computation_every_zero_steps_is_refused_naming_the_key(self) -> None:
        with pytest.raises(ConfigError, match=r"train\.metrics_every=0 \(must be >= 1 step\)"):
            WindowedTrainMetrics(window=8, every=0, batch_size=8, world_size=1, rank=0, device=torch.device("cpu"))

    def test_a_window_of_one_batch_holds_the_last_batch(self) -> None:
        stream = _stream(batches=3, batch_size=8, seed=4)
        metrics = WindowedTrainMetrics(window=8, every=3, batch_size=8, world_size=1, rank=0,
                                       device=torch.device("cpu"))
        values = [metrics.update(logits, labels) for logits, labels in stream][-1]
        _assert_close(values, _exact(*stream[-1]))


def _two_rank_window(every: int) -> Dict[str, Any]:
    ctx = init_distributed("cpu")
    stream = _stream(batches=6, batch_size=8, seed=10 + ctx.rank)  # each rank its own rows
    metrics = WindowedTrainMetrics(window=32, every=every, batch_size=8, world_size=2, rank=ctx.rank,
                                   device=torch.device("cpu"))
    computed = [metrics.update(logits, labels) for logits, labels in stream]
    return {"computed": computed, "logits": torch.cat([x for x, _ in stream]),
            "labels": torch.cat([y for _, y in stream])}


@pytest.mark.multiprocess
def test_two_ranks_report_the_metrics_of_both_ranks_windows() -> None:
    """A window of 32 samples over 2 ranks: each keeps its last 16 rows; the gloo-reduced metrics are those of
    the 32 rows of both, and both ranks report them."""
    rank0, rank1 = run_multiprocess(_two_rank_window, world_size=2, every=3)
    assert rank0["computed"] == rank1["computed"]
    for step in (3, 6):
        rows = slice(step * 8 - 16, step * 8)
        logits = torch.cat([rank0["logits"][rows], rank1["logits"][rows]])
        labels = torch.cat([rank0["labels"][rows], rank1["labels"][rows]])
        _assert_close(rank0["computed"][step - 1], _exact(logits, labels))
    assert all(values is None for step, values in enumerate(rank0["computed"], 1) if step % 3)


class _Recording(WindowedTrainMetrics):
    """Keeps what :func:`train_epoch` hands over at each step."""

    def __init__(self) -> None:
        super().__init__(window=256, every=2, batch_size=64, world_size=1, rank=0, device=torch.device("cpu"))
        self.seen: List[Tuple[torch.Tensor, Optional[torch.Tensor]]] = []

    def update(self, logits: torch.Tensor, labels: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> Optional[Dict[str, float]]:
        self.seen.append((labels.clone(), None if weights is None else weights.clone()))
        return super().update(logits, labels, weights)


def _one_rank_deepfm(schema: Any) -> Tuple[Any, Any, Any]:
    """``(context, sharded model, optimizer)`` of the smoke DeepFM on one CPU rank, tables planned by default."""
    from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
    from recsys_llm.models.task import CTRTask
    from recsys_llm.train.sharding import build_optimizer, shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=64)
    return ctx, model, build_optimizer(model, OptimizerConfig())


def _steps_handed_to_the_metrics(schema_path: str) -> Dict[str, Any]:
    import dataclasses

    from recsys_llm.data.pair_swap import LABEL_WEIGHT_KEY
    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.train.pipeline import train_epoch

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _one_rank_deepfm(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:5]
    # a weight per batch that tells them apart: the pipeline runs a step behind the batches it has pulled
    batches = [dataclasses.replace(b, extras={**b.extras, LABEL_WEIGHT_KEY: torch.full((64,), float(i + 1))})
               for i, b in enumerate(batches)]
    metrics = _Recording()
    train_epoch(model, optimizer, batches, ctx.device, progress=False, window_metrics=metrics)
    return {"labels": [b.labels for b in batches], "seen": metrics.seen, "steps": metrics.steps}


@pytest.mark.multiprocess
def test_train_epoch_hands_every_steps_rows_and_label_weights_to_the_metrics_in_order(synthetic_dir: str) -> None:
    (result,) = run_multiprocess(_steps_handed_to_the_metrics, world_size=1, schema_path=synthetic_dir)
    assert result["steps"] == 5 and len(result["seen"]) == 5
    for i, (labels, weights) in enumerate(result["seen"]):
        assert torch.equal(labels.float(), result["labels"][i].float())
        assert torch.equal(weights, torch.full((64,), float(i + 1)))


class TestConfig:
    def test_off_by_default(self) -> None:
        assert TrainConfig().metrics_window == 0

    @pytest.mark.parametrize("override, message", [
        ("train.metrics_window=-1", r"train\.metrics_window=-1 \(must be >= 0\)"),
        ("train.metrics_window=abc", r"train\.metrics_window: expected an integer, got 'abc'"),
        ("train.metrics_window=2.5", r"train\.metrics_window: expected an integer, got 2.5"),
        ("train.metrics_every=0", r"train\.metrics_every=0 \(must be >= 1\)"),
    ])
    def test_a_bad_value_is_an_error_naming_the_key(self, override: str, message: str) -> None:
        with pytest.raises(ConfigError, match=message):
            load_config(DEEPFM_CONFIG, [override])


def _train(schema_dir: str, run_dir: str, extra: List[str]) -> List[Dict[str, Any]]:
    from recsys_llm.train.runner import run_training

    overrides = [f"data.schema={schema_dir}", "data.batch_size=512", "data.eval_batch_size=2048",
                 "data.synthetic_rows=0", "train.epochs=1", "train.max_steps=12", "train.patience=0",
                 "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}", *extra]
    run_training(load_config(DEEPFM_CONFIG, overrides))
    return read_metrics(run_dir)


@pytest.mark.multiprocess
def test_a_run_records_the_window_every_metrics_every_steps_and_none_by_default(synthetic_dir: str,
                                                                                 tmp_path) -> None:
    (plain,) = run_multiprocess(_train, world_size=1, schema_dir=synthetic_dir, run_dir=str(tmp_path / "plain"),
                                extra=[])
    (windowed,) = run_multiprocess(_train, world_size=1, schema_dir=synthetic_dir, run_dir=str(tmp_path / "window"),
                                   extra=["train.metrics_window=2048", "train.metrics_every=5"])
    assert not [r for r in plain if r["event"] == TRAIN_WINDOW_EVENT]
    records = [r for r in windowed if r["event"] == TRAIN_WINDOW_EVENT]
    assert [r["global_step"] for r in records] == [5, 10]
    assert all(0.0 < r["auc"] < 1.0 and r["ne"] > 0 and r["calibration"] > 0 for r in records)
    # the other records are a plain run's (the same events at the same steps)
    def others(records: List[Dict[str, Any]]) -> List[Tuple[str, int]]:
        return [(r["event"], r["global_step"]) for r in records if r["event"] != TRAIN_WINDOW_EVENT]
    assert others(windowed) == others(plain)
    assert training_curves(windowed)["train window auc"] == ([5, 10], [r["auc"] for r in records])


def _train_steps(schema_dir: str, run_dir: str, steps: int) -> List[Dict[str, Any]]:
    return _train(schema_dir, run_dir, [f"train.max_steps={steps}", "train.metrics_window=2048",
                                        "train.metrics_every=5"])


@pytest.mark.multiprocess
def test_a_resumed_run_computes_the_window_on_the_same_global_steps(synthetic_dir: str, tmp_path) -> None:
    """The job resumed at step 7 computes at step 10 (a multiple of train.metrics_every), not 5 steps after it."""
    run_dir = str(tmp_path / "run")
    run_multiprocess(_train_steps, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir, steps=7)
    (records,) = run_multiprocess(_train_steps, world_size=1, schema_dir=synthetic_dir, run_dir=run_dir, steps=12)
    assert [r["global_step"] for r in records if r["event"] == TRAIN_WINDOW_EVENT] == [5, 10]


def _bar_postfixes(schema_path: str) -> List[Dict[str, str]]:
    """Every postfix rank 0's progress bar was given over 40 steps (windowed metrics every 3)."""
    from tqdm import tqdm

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.train import pipeline

    postfixes: List[Dict[str, str]] = []

    class Recording(tqdm):
        def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
            postfixes.append(dict(ordered_dict or {}, **kwargs))
            super().set_postfix(ordered_dict, refresh, **kwargs)

    pipeline.tqdm = Recording
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _one_rank_deepfm(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:40]
    metrics = WindowedTrainMetrics(window=256, every=3, batch_size=64, world_size=1, rank=0, device=ctx.device)
    pipeline.train_epoch(model, optimizer, batches, ctx.device, progress=True, window_metrics=metrics)
    return postfixes


@pytest.mark.multiprocess
def test_the_bar_shows_the_loss_beside_the_last_windowed_metrics(synthetic_dir: str) -> None:
    (postfixes,) = run_multiprocess(_bar_postfixes, world_size=1, schema_path=synthetic_dir)
    assert list(postfixes[0]) == ["auc_w", "ne_w", "cal_w"]  # step 3, before any loss read
    at_loss_reads = [p for p in postfixes if "loss" in p]
    assert len(at_loss_reads) >= 2  # steps 20 and 40 (LOSS_READ_EVERY)
    assert all(list(p) == ["loss", "auc_w", "ne_w", "cal_w"] for p in at_loss_reads)
    assert all(list(p)[0] == "loss" for p in postfixes[postfixes.index(at_loss_reads[0]):])  # kept after
