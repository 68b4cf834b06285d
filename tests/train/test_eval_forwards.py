"""evaluate(pipelined=True): torchrec's EvalPipelineSparseDist gives the plain loop's metrics, and training after it."""

import json
import logging
import math
import os
import threading
import time
from typing import Any, Dict, List

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.config import ConfigError, TrainConfig, load_config
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.eval_forwards import use_pipelined_eval
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import evaluate, sharded_module_names, train_epoch
from recsys_llm.train.sharding import build_optimizer, embedding_kernels, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SUBSETS = {"cold": "is_cold_item"}
# tables split over the ranks: the evaluation's sparse input all-to-all carries ids between them
SHARDING = ShardingConfig(sharding_types=["table_wise", "row_wise"])


def _model(schema: DatasetSchema, device: str = "cpu"):
    ctx = init_distributed(device)
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    model, _ = shard_model(task, ctx.device, ctx.world_size, SHARDING, OptimizerConfig(), batch_size=64)
    return ctx, model, build_optimizer(model, OptimizerConfig())


def _pipelined_forward_kinds(model: nn.Module) -> List[List[bool]]:
    """Per forward of ``model``: whether each sharded module runs torchrec's PipelinedForward (a hook's record)."""
    seen: List[List[bool]] = []
    modules = [model.get_submodule(name) for name in sharded_module_names(model)]
    model.register_forward_pre_hook(
        lambda module, args: seen.append([type(m.forward).__name__ == "PipelinedForward" for m in modules]))
    return seen


def _same(a: Dict[str, float], b: Dict[str, float]) -> bool:
    """Equal dicts, NaN equal to NaN (a subset of one class has no AUC)."""
    return a.keys() == b.keys() and all(a[k] == b[k] or (math.isnan(a[k]) and math.isnan(b[k])) for k in a)


def _both_ways(schema_path: str, split: str, batch_size: int, device: str = "cpu") -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema, device)
    train = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size)
    train_epoch(model, optimizer, list(train)[:10], ctx.device, progress=False)
    kinds = _pipelined_forward_kinds(model)
    out: Dict[str, Any] = {}
    for pipelined in (False, True, False):
        reader = ParquetBatchReader(schema, split, batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                    extras=["is_cold_item"], equal_batches=False)
        kinds.clear()
        out[f"pipelined={pipelined}"] = evaluate(model, reader, ctx.device, CTRMetrics(SUBSETS), progress=False,
                                                 pipelined=pipelined)
        out[f"kinds pipelined={pipelined}"] = list(kinds)
    out["own_batches"], out["steps"] = len(reader), reader.padded_len
    return out


def _check_identical(results: List[Dict[str, Any]]) -> None:
    for result in results:
        plain, pipelined = result["pipelined=False"], result["pipelined=True"]
        assert _same(plain, pipelined), (plain, pipelined)
        assert plain["num_samples"] > 0 and plain["cold/num_samples"] > 0 and not math.isnan(plain["cold/auc"])
        assert len(result["kinds pipelined=True"]) == result["steps"]  # one forward per step, repeats included
        assert all(all(kinds) and kinds for kinds in result["kinds pipelined=True"]), result["kinds pipelined=True"]
        assert not any(any(kinds) for kinds in result["kinds pipelined=False"])  # the pipeline was detached
        assert _same(results[0]["pipelined=True"], result["pipelined=True"])  # every rank reports the same


@pytest.mark.multiprocess
def test_pipelined_evaluation_gives_the_plain_loops_metrics_on_one_rank(synthetic_dir: str) -> None:
    # batches of 7 rows: a partial last batch of 3
    results = run_multiprocess(_both_ways, world_size=1, schema_path=synthetic_dir, split="valid", batch_size=7)
    _check_identical(results)
    assert results[0]["pipelined=True"]["num_samples"] == 1200


@pytest.mark.multiprocess
def test_pipelined_evaluation_gives_the_plain_loops_metrics_on_two_ranks_of_uneven_rows(synthetic_dir: str,
                                                                                       tmp_path) -> None:
    """The ranks hold 3 and 2 batches: the rank with fewer repeats its last one unscored, which the pipeline's
    outputs (the model's alone) do not tell apart: its flag travels beside them."""
    path = str(tmp_path / "rows.parquet")
    table = pq.read_table(os.path.join(synthetic_dir, "valid.parquet")).slice(0, 401)
    pq.write_table(table, path, row_group_size=128)
    results = run_multiprocess(_both_ways, world_size=2, schema_path=synthetic_dir, split=path, batch_size=100)
    assert {r["steps"] for r in results} == {3} and sorted(r["own_batches"] for r in results) == [2, 3], results
    _check_identical(results)
    assert results[0]["pipelined=True"]["num_samples"] == 401


def _train_eval_train(schema_path: str) -> Dict[str, Any]:
    """Per evaluation path: train 6 steps, validate, train 6 steps, validate; the losses of every step."""
    schema = DatasetSchema.load(schema_path)
    out: Dict[str, Any] = {}
    for pipelined in (False, True):
        ctx, model, optimizer = _model(schema)
        reader = ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size, shuffle=True,
                                    seed=3)
        losses: List[float] = []
        evaluations, counters = [], []
        for epoch in range(2):
            reader.set_epoch(epoch)
            stats = train_epoch(model, optimizer, reader, ctx.device, progress=False,
                                on_step=lambda step, loss: losses.append(float(loss)) or step == 6)
            assert stats.pipelined_modules == stats.sharded_modules and stats.steps == 6
            before = [int(kernel.emb_module.iter) for _, kernel in embedding_kernels(model)]
            valid = ParquetBatchReader(schema, "valid", 100, rank=ctx.rank, world_size=ctx.world_size,
                                       equal_batches=False)
            evaluations.append(evaluate(model, valid, ctx.device, CTRMetrics(), progress=False, pipelined=pipelined))
            counters.append((before, [int(kernel.emb_module.iter) for _, kernel in embedding_kernels(model)]))
            assert model.training
        out[f"pipelined={pipelined}"] = {"losses": losses, "evaluations": evaluations, "counters": counters}
    return out


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2])
def test_training_after_a_pipelined_evaluation_is_training_after_a_plain_one(synthetic_dir: str,
                                                                             world_size: int) -> None:
    """train, evaluate, train, evaluate: the eval pipeline hands the model back to the next training pipeline
    with its own forwards and its tables' step counters as they were, so every loss is the plain path's."""
    for result in run_multiprocess(_train_eval_train, world_size=world_size, schema_path=synthetic_dir):
        plain, pipelined = result["pipelined=False"], result["pipelined=True"]
        assert len(plain["losses"]) == 12 and plain["losses"] == pipelined["losses"], result
        assert all(_same(a, b) for a, b in zip(plain["evaluations"], pipelined["evaluations"])), result
        assert all(before == after and 6 * (i + 1) in before for i, (before, after) in enumerate(pipelined["counters"]))


def _threads_after_a_failed_evaluation(schema_path: str) -> Dict[str, int]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)

    class Failing(CTRMetrics):
        def update(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("metrics failed")

    reader = ParquetBatchReader(schema, "valid", 64, equal_batches=False, prefetch=2)
    with pytest.raises(RuntimeError, match="metrics failed"):
        evaluate(model, reader, ctx.device, Failing(), progress=False, pipelined=True)
    # torchrec's loading thread, stopped, ends on its own (it cannot be joined)
    for _ in range(100):
        names = [thread.name for thread in threading.enumerate()]
        if "DataLoadingThread" not in names:
            break
        time.sleep(0.05)
    # the model is usable again: its forwards are its own
    plain = evaluate(model, ParquetBatchReader(schema, "valid", 64, equal_batches=False), ctx.device, CTRMetrics(),
                     progress=False)
    return {"prefetch": names.count("parquet-prefetch"), "loading": names.count("DataLoadingThread"),
            "rows": int(plain["num_samples"])}


@pytest.mark.multiprocess
def test_a_failed_pipelined_evaluation_stops_its_threads_and_detaches(synthetic_dir: str) -> None:
    (result,) = run_multiprocess(_threads_after_a_failed_evaluation, world_size=1, schema_path=synthetic_dir)
    assert result == {"prefetch": 0, "loading": 0, "rows": 1200}, result


def _evaluations_of_failing_pairs(schema_path: str) -> Dict[str, Any]:
    """Per loop: the forwards run and the warnings and errors logged by torchrec's pipeline module when the data
    fails at its third batch (a data error's ValueError), and the rows of a plain evaluation after it."""
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)
    batches = list(ParquetBatchReader(schema, "valid", 64, equal_batches=False))[:2]
    forwards: List[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    records: List[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    upstream = logging.getLogger("torchrec.distributed.train_pipeline.utils")
    upstream.addHandler(handler)

    def failing():
        yield from batches
        raise ValueError("valid.parquet: column 'item_id', row 130: id 99999 is >= cardinality 101")

    out: Dict[str, Any] = {}
    try:
        for pipelined in (False, True):
            forwards.clear()
            with pytest.raises(ValueError, match="row 130: id 99999"):
                evaluate(model, failing(), ctx.device, CTRMetrics(), progress=False, pipelined=pipelined)
            out[f"pipelined={pipelined}"] = {"forwards": len(forwards), "logged": [
                record.getMessage() for record in records if record.levelno >= logging.WARNING]}
    finally:
        upstream.removeHandler(handler)
    out["rows after"] = int(evaluate(model, ParquetBatchReader(schema, "valid", 64, equal_batches=False), ctx.device,
                                     CTRMetrics(), progress=False)["num_samples"])
    return out


def _a_failure_while_the_loading_thread_reads(schema_path: str) -> str:
    """The metrics fail while torchrec's loading thread is inside a (slow) read of the next batch."""
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)
    batches = list(ParquetBatchReader(schema, "valid", 100, equal_batches=False))[:3]
    reading = threading.Event()

    def slow() -> Any:
        yield from batches[:2]
        reading.set()
        time.sleep(1.0)  # the loading thread is in this read when the metrics fail
        yield batches[2]

    class Failing(CTRMetrics):
        def update(self, *args: Any, **kwargs: Any) -> None:
            assert reading.wait(10)
            raise RuntimeError("metrics failed")

    try:
        evaluate(model, slow(), ctx.device, Failing(), progress=False, pipelined=True)
    except Exception as error:  # noqa: BLE001 (the test reports it)
        return repr(error)
    return "no error"


@pytest.mark.multiprocess
def test_a_failed_pipelined_evaluation_waits_for_a_read_in_progress_before_it_closes_the_batches(
        synthetic_dir: str) -> None:
    """Closing the batches' generator while the loading thread runs it would raise 'generator already executing'
    in place of the evaluation's own error."""
    (error,) = run_multiprocess(_a_failure_while_the_loading_thread_reads, world_size=1, schema_path=synthetic_dir)
    assert error == "RuntimeError('metrics failed')", error


class _Flaky(OSError):
    """A read error marked retryable, as some storage clients' are: torchrec's loading thread skips its batch."""

    is_retryable = True


def _evaluations_of_a_failing_read(schema_path: str) -> Dict[str, str]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)
    batches = list(ParquetBatchReader(schema, "valid", 100, equal_batches=False))

    def failing(cause: bool) -> Any:
        yield batches[0]
        if cause:
            raise ValueError("bad row group") from _Flaky("connection reset")
        raise _Flaky("connection reset")

    out: Dict[str, str] = {}
    for cause in (False, True):
        for pipelined in (False, True):
            try:
                rows = evaluate(model, failing(cause), ctx.device, CTRMetrics(), progress=False, pipelined=pipelined)
                out[f"cause={cause} pipelined={pipelined}"] = f"no error: {rows['num_samples']:.0f} rows"
            except Exception as error:  # noqa: BLE001 (the test reports it)
                out[f"cause={cause} pipelined={pipelined}"] = f"{error!r} <- {error.__cause__!r}"
    return out


@pytest.mark.multiprocess
def test_a_data_error_in_a_pipelined_evaluation_is_raised_as_the_plain_loop_raises_it(synthetic_dir: str) -> None:
    """The pipeline's loading thread reads the data; its error is raised in the caller's thread after the batches
    read before it ran, and torchrec logs no ERROR line of its own first (the CLI shows errors as one line)."""
    (result,) = run_multiprocess(_evaluations_of_failing_pairs, world_size=1, schema_path=synthetic_dir)
    assert result["pipelined=True"] == result["pipelined=False"] == {"forwards": 2, "logged": []}, result
    assert result["rows after"] == 1200, result


@pytest.mark.multiprocess
def test_a_read_error_marked_retryable_fails_the_pipelined_evaluation_as_the_plain_one(synthetic_dir: str) -> None:
    """torchrec's loading thread skips the batch of an error with a true ``is_retryable`` (its own or its cause's)
    and reads on: the evaluation would score the rows before it only, without an error (and on several ranks this
    one would run fewer collective forwards). The pipeline never sees the error: it is raised as the plain loop
    raises it."""
    (out,) = run_multiprocess(_evaluations_of_a_failing_read, world_size=1, schema_path=synthetic_dir)
    assert out["cause=False pipelined=False"] == "_Flaky('connection reset') <- None", out
    assert out["cause=True pipelined=False"] == "ValueError('bad row group') <- _Flaky('connection reset')", out
    for cause in (False, True):
        assert out[f"cause={cause} pipelined=True"] == out[f"cause={cause} pipelined=False"], out


def _grad_mode(schema_path: str) -> List[bool]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)
    seen: List[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_grad_enabled()))
    evaluate(model, ParquetBatchReader(schema, "valid", 256, equal_batches=False), ctx.device, CTRMetrics(),
             progress=False, pipelined=True)
    return seen


@pytest.mark.multiprocess
def test_pipelined_evaluation_builds_no_autograd_graph(synthetic_dir: str) -> None:
    (seen,) = run_multiprocess(_grad_mode, world_size=1, schema_path=synthetic_dir)
    assert seen and not any(seen), seen


class TestPipelinedEvalSetting:
    @pytest.mark.parametrize("text,value", [("auto", "auto"), ("true", True), ("false", False), ("yes", True),
                                            ("0", False)])
    def test_values(self, text: str, value: Any) -> None:
        assert load_config(None, [f"train.pipelined_eval={text}"]).train.pipelined_eval == value

    @pytest.mark.parametrize("text", ["maybe", "Auto", "2", "[true]"])
    def test_a_bad_value_names_the_key(self, text: str) -> None:
        with pytest.raises(ConfigError, match=r"train\.pipelined_eval: expected auto, true or false, got"):
            load_config(None, [f"train.pipelined_eval={text}"])

    def test_a_config_built_in_python_is_checked(self) -> None:
        with pytest.raises(ValueError, match=r"train\.pipelined_eval='on' \(must be 'auto', True or False\)"):
            TrainConfig(pipelined_eval="on")  # type: ignore[arg-type]

    def test_auto_is_on_for_cuda_only(self) -> None:
        assert use_pipelined_eval("auto", torch.device("cuda", 0))
        assert not use_pipelined_eval("auto", torch.device("cpu"))
        assert use_pipelined_eval(True, torch.device("cpu")) and not use_pipelined_eval(False, torch.device("cuda"))

    def test_a_resume_may_change_it(self) -> None:
        from recsys_llm.train.config import RESUME_FREE_KEYS, config_differences

        saved, current = load_config(None), load_config(None, ["train.pipelined_eval=true"])
        assert config_differences(saved, current, RESUME_FREE_KEYS) == []
        assert config_differences(saved, current) == ["train.pipelined_eval: 'auto' -> True"]


def _run(schema_dir: str, run_dir: str, pipelined_eval: str) -> Dict[str, Any]:
    """A short run; records which evaluation forwards it ran."""
    from recsys_llm.train import pipeline
    from recsys_llm.train.runner import run_training
    from recsys_llm.train.trained_run import run_evaluation

    used: List[str] = []
    for name in ("plain_forwards", "pipelined_forwards"):
        original = getattr(pipeline, name)
        setattr(pipeline, name, lambda *args, _name=name, _original=original: used.append(_name) or _original(*args))
    overrides = [f"data.schema={schema_dir}", "data.batch_size=256", "data.eval_batch_size=300",
                 "data.synthetic_rows=0", "train.epochs=2", "train.patience=0", "train.progress=false",
                 "train.device=cpu", f"train.run_dir={run_dir}", f"train.pipelined_eval={pipelined_eval}"]
    config = load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"), overrides)
    results = run_training(config)
    evaluated = run_evaluation(config, run_dir)  # the evaluate command's
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        records = [json.loads(line) for line in handle]
    valid = [{k: v for k, v in r.items() if k not in ("time", "seconds")} for r in records if r["event"] == "valid"]
    epochs = [r["mean_loss"] for r in records if r["event"] == "epoch"]
    return {"test": results["test"], "valid": valid, "epochs": epochs, "used": used, "evaluated": evaluated}


@pytest.mark.multiprocess
def test_a_run_validates_and_tests_through_the_pipeline_the_setting_names(synthetic_dir: str, tmp_path) -> None:
    runs = {setting: run_multiprocess(_run, world_size=2, schema_dir=synthetic_dir, run_dir=str(tmp_path / setting),
                                      pipelined_eval=setting) for setting in ("auto", "true")}
    for setting, used in (("auto", "plain_forwards"), ("true", "pipelined_forwards")):  # auto: plain on CPU
        # 2 validations, 1 test, then the evaluate command's
        assert all(rank["used"] == [used] * 4 for rank in runs[setting]), runs[setting]
    plain, pipelined = runs["auto"][0], runs["true"][0]
    assert len(plain["valid"]) == 2 and plain["valid"] == pipelined["valid"] and plain["epochs"] == pipelined["epochs"]
    assert _same(plain["test"], pipelined["test"])
    assert _same({k: v for k, v in plain["evaluated"].items() if k != "checkpoint"},
                 {k: v for k, v in pipelined["evaluated"].items() if k != "checkpoint"})


class TestTaggedPairs:
    """The pairs' side queue, read by torchrec's loading thread (``next``) and closed by the main thread."""

    @staticmethod
    def _batch(rows: int) -> Any:
        from torchrec.datasets.utils import Batch as TorchRecBatch
        from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

        kjt = KeyedJaggedTensor.from_lengths_sync(keys=["a"], values=torch.zeros(rows, dtype=torch.long),
                                                  lengths=torch.ones(rows, dtype=torch.int32))
        return TorchRecBatch(torch.zeros(rows, 1), kjt, torch.zeros(rows))

    def test_flags_queue_in_read_order_and_a_closed_queue_reads_no_further_pair(self) -> None:
        from recsys_llm.train.eval_forwards import _Tagged

        pairs = iter([(self._batch(1), True), (self._batch(2), False), (self._batch(3), True)])
        tagged = _Tagged(pairs)
        assert [next(tagged).labels.numel() for _ in range(2)] == [1, 2]
        assert [real for real, _ in tagged.tags] == [True, False]
        tagged.close()
        with pytest.raises(StopIteration):
            next(tagged)
        assert next(pairs)[0].labels.numel() == 3  # left unread

    def test_only_the_extras_asked_for_are_kept_for_their_second_copy_to_the_device(self) -> None:
        """The pipelined loop copies the tags' extras to the device beside the pipeline's own copy of the batch:
        a wide extra the metrics never read (a gain network's llm_vector) crossed to the GPU twice per batch."""
        from recsys_llm.data.batch import Batch
        from recsys_llm.train.eval_forwards import _Tagged

        plain = self._batch(2)
        batch = Batch(plain.dense_features, plain.sparse_features, plain.labels,
                      extras={"is_cold_item": torch.ones(2), "llm_vector": torch.zeros(2, 384)})
        every, masks = _Tagged(iter([(batch, True)])), _Tagged(iter([(batch, True)]), extras=["is_cold_item"])
        next(every), next(masks)
        assert sorted(every.tags[0][1]) == ["is_cold_item", "llm_vector"]  # None: every extra, as before
        assert sorted(masks.tags[0][1]) == ["is_cold_item"] and masks.tags[0][1]["is_cold_item"] is batch.extras[
            "is_cold_item"]
        assert CTRMetrics(SUBSETS).extra_keys == ["is_cold_item"] and CTRMetrics().extra_keys == []

    def test_a_batch_without_a_mask_asked_for_keeps_its_extras_for_the_metrics_error(self) -> None:
        """The subset's KeyError names the extras the batch has, as in the plain loop, not an empty list."""
        from recsys_llm.data.batch import Batch
        from recsys_llm.train.eval_forwards import _Tagged

        plain = self._batch(2)
        batch = Batch(plain.dense_features, plain.sparse_features, plain.labels,
                      extras={"llm_vector": torch.zeros(2, 4)})
        tagged = _Tagged(iter([(batch, True)]), extras=CTRMetrics(SUBSETS).extra_keys)
        next(tagged)
        with pytest.raises(KeyError, match=r"needs batch extra 'is_cold_item'; extras present: \['llm_vector'\]"):
            CTRMetrics(SUBSETS).update(torch.zeros(2), torch.zeros(2), tagged.tags[0][1])

    def test_close_waits_for_a_read_in_progress(self) -> None:
        """The pairs may be closed once ``close`` returns: a generator another thread is running cannot be."""
        from recsys_llm.train.eval_forwards import _Tagged

        reading, release = threading.Event(), threading.Event()

        def slow_pairs() -> Any:
            reading.set()
            release.wait(10)
            yield self._batch(1), True

        tagged = _Tagged(slow_pairs())
        loader = threading.Thread(target=lambda: next(tagged))
        loader.start()
        assert reading.wait(10)
        closer = threading.Thread(target=tagged.close)
        closer.start()
        closer.join(0.2)
        assert closer.is_alive()  # waits for the read
        release.set()
        closer.join(10)
        loader.join(10)
        assert not closer.is_alive() and len(tagged.tags) == 1
