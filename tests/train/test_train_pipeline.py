"""train_epoch: a NaN/inf training loss stops training before a checkpoint keeps the diverged weights."""

import itertools
import os
import shutil
from typing import Any, Dict, List, Optional

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import NonFiniteLossError, evaluate, train_epoch
from recsys_llm.train.sharding import build_optimizer, shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _model(schema: DatasetSchema):
    ctx = init_distributed("cpu")
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
    model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=64)
    return ctx, model, build_optimizer(model, OptimizerConfig())


def _nan_at_step(schema_path: str, bad_step: int, value: float) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:8]
    batches[bad_step - 1].dense_features[5, 0] = value  # as an unvalidated input (or a diverged model) gives
    seen: List[int] = []

    def on_step(step: int, loss: torch.Tensor) -> bool:  # the runner writes its checkpoints here
        seen.append(step)
        return False

    try:
        train_epoch(model, optimizer, batches, ctx.device, on_step=on_step, progress=False)
    except NonFiniteLossError as error:
        return {"error": str(error), "seen": seen}
    return {"error": None, "seen": seen}


@pytest.mark.multiprocess
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_before_its_step_callback(synthetic_dir: str, value: float) -> None:
    (result,) = run_multiprocess(_nan_at_step, world_size=1, schema_path=synthetic_dir, bad_step=4, value=value)
    assert result["seen"] == [1, 2, 3], result  # no on_step (no checkpoint) for step 4 or later
    assert result["error"] is not None and result["error"].startswith("train: step 4: training loss is nan;"), result
    assert "learning rate" in result["error"] and "input vectors" in result["error"]


def _train_nan_run(schema_dir: str, run_dir: str) -> Dict[str, Any]:
    from recsys_llm.train.config import load_config
    from recsys_llm.train.runner import run_training

    overrides = [f"data.schema={schema_dir}", "data.batch_size=256", "data.eval_batch_size=1024",
                 "data.synthetic_rows=0", "data.validate=false", "train.epochs=2", "train.patience=0",
                 "train.checkpoint_every=5", "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}"]
    try:
        run_training(load_config(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"), overrides))
    except NonFiniteLossError as error:
        return {"error": str(error)}
    return {"error": None}


@pytest.mark.multiprocess
def test_a_run_with_a_nan_input_ends_with_an_error_and_no_checkpoint_after_it(synthetic_dir: str, tmp_path) -> None:
    """Unvalidated data with one NaN dense value: the run used to finish (exit 0) with NaN metrics
    and a best/ checkpoint of NaN weights."""
    data = str(tmp_path / "data")
    shutil.copytree(synthetic_dir, data)
    schema = DatasetSchema.load(os.path.join(data, "schema.json"))
    path = schema.split_path("train")
    table = pq.read_table(path)
    name = schema.dense_feature_names[0]
    values = table[name].to_numpy().copy()
    values[7000] = np.nan
    pq.write_table(table.set_column(table.schema.get_field_index(name), name, pa.array(values)), path,
                   row_group_size=1024)
    run_dir = str(tmp_path / "run")
    (result,) = run_multiprocess(_train_nan_run, world_size=1, schema_dir=data, run_dir=run_dir)
    assert result["error"] is not None and "training loss is nan" in result["error"], result
    bad_step = int(result["error"].split("step ")[1].split(":")[0])
    assert not os.path.exists(os.path.join(run_dir, "best")) or not os.listdir(os.path.join(run_dir, "best"))
    checkpoints = os.path.join(run_dir, "checkpoints")
    saved = sorted(int(n.split("-")[1]) for n in os.listdir(checkpoints) if n.startswith("ckpt-") and "." not in n) \
        if os.path.isdir(checkpoints) else []
    assert all(step < bad_step for step in saved), (saved, bad_step)
    assert not os.path.exists(os.path.join(run_dir, "results.json"))


def _nan_on_rank_0(schema_path: str) -> Dict[str, Any]:
    from recsys_llm.train.distributed import TIMEOUT_ENV

    os.environ[TIMEOUT_ENV] = "120"  # a rank left waiting fails the test in minutes, not an hour
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64, rank=ctx.rank, world_size=ctx.world_size))[:8]
    if ctx.rank == 0:
        batches[3].dense_features[5, 0] = float("nan")
    try:
        train_epoch(model, optimizer, batches, ctx.device, progress=False)
    except NonFiniteLossError as error:
        return {"error": str(error)}
    return {"error": None}


@pytest.mark.multiprocess
def test_a_nan_loss_on_one_rank_stops_every_rank(synthetic_dir: str) -> None:
    """Only rank 0's batch is bad: rank 1 must not train on and wait in a collective for rank 0."""
    rank0, rank1 = run_multiprocess(_nan_on_rank_0, world_size=2, schema_path=synthetic_dir)
    assert rank0["error"] is not None and "training loss is nan" in rank0["error"], rank0
    # DDP's gradient all-reduce spreads the NaN: rank 1 may see its own NaN loss or rank 0's
    assert rank1["error"] is not None and "training loss" in rank1["error"], rank1


def test_samples_per_second_leaves_out_the_first_step() -> None:
    """The first step also fills the pipeline and traces the model: a short epoch's throughput
    would be mostly that set-up."""
    from recsys_llm.train.pipeline import EpochStats

    stats = EpochStats(steps=5, samples=500, seconds=3.0, first_step_seconds=2.0, first_step_samples=100,
                       mean_loss=0.5, pipelined_modules=[], sharded_modules=[], stopped_early=False)
    assert stats.samples_per_second == pytest.approx(400 / 1.0)
    one = EpochStats(steps=1, samples=100, seconds=2.0, first_step_seconds=2.0, first_step_samples=100,
                     mean_loss=0.5, pipelined_modules=[], sharded_modules=[], stopped_early=False)
    assert one.samples_per_second == pytest.approx(50.0)


def _epoch_stats(schema_path: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:6]
    stats = train_epoch(model, optimizer, batches, ctx.device, progress=False)
    return {"steps": stats.steps, "samples": stats.samples, "first_samples": stats.first_step_samples,
            "first_seconds": stats.first_step_seconds, "seconds": stats.seconds}


@pytest.mark.multiprocess
def test_train_epoch_times_its_first_step(synthetic_dir: str) -> None:
    (result,) = run_multiprocess(_epoch_stats, world_size=1, schema_path=synthetic_dir)
    assert (result["steps"], result["samples"], result["first_samples"]) == (6, 6 * 64, 64), result
    assert 0 < result["first_seconds"] < result["seconds"], result


def _stats_of_an_epoch_stopped_at_step_3(schema_path: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    first = next(iter(ParquetBatchReader(schema, "train", 64, prefetch=0)))
    batches = [first, *list(ParquetBatchReader(schema, "train", 48))[:5]]  # 64, then 48 rows a batch
    stats = train_epoch(model, optimizer, batches, ctx.device, progress=False, on_step=lambda step, _: step >= 3)
    return {"steps": stats.steps, "samples": stats.samples, "first_samples": stats.first_step_samples,
            "stopped": stats.stopped_early}


@pytest.mark.multiprocess
def test_an_epoch_stopped_early_counts_the_samples_of_its_steps_only(synthetic_dir: str) -> None:
    """The pipeline reads batches ahead of its steps: the samples counted are those of the 3 steps taken (not of
    the batches it had read ahead when on_step stopped it), and the first step's are the first batch's."""
    (result,) = run_multiprocess(_stats_of_an_epoch_stopped_at_step_3, world_size=1, schema_path=synthetic_dir)
    assert (result["steps"], result["samples"], result["first_samples"], result["stopped"]) == \
        (3, 64 + 48 + 48, 64, True), result


def _steps_after_skipping_2(schema_path: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:6]
    seen: List[int] = []
    stats = train_epoch(model, optimizer, batches, ctx.device, progress=False, skip_batches=2,
                        on_step=lambda step, _: seen.append(step) is not None)
    return {"seen": seen, "steps": stats.steps, "samples": stats.samples}


@pytest.mark.multiprocess
def test_steps_after_skipped_batches_are_numbered_from_the_epochs_start(synthetic_dir: str) -> None:
    """A resumed epoch skips the batches trained before: on_step numbers its steps within the whole epoch (the runner
    saves that number as step_in_epoch, which the next resume skips), and only the steps taken count."""
    (result,) = run_multiprocess(_steps_after_skipping_2, world_size=1, schema_path=synthetic_dir)
    assert (result["seen"], result["steps"], result["samples"]) == ([3, 4, 5, 6], 4, 4 * 64), result


def _train_on_torchrec_batches(schema_path: str) -> Dict[str, Any]:
    from torchrec.datasets.utils import Batch as TorchRecBatch

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = [TorchRecBatch(b.dense_features, b.sparse_features, b.labels)
               for b in list(ParquetBatchReader(schema, "train", 64))[:6]]
    stats = train_epoch(model, optimizer, batches, ctx.device, progress=False)
    return {"steps": stats.steps, "samples": stats.samples, "pipelined": stats.pipelined_modules,
            "sharded": stats.sharded_modules}


@pytest.mark.multiprocess
def test_torchrecs_own_batches_train(synthetic_dir: str) -> None:
    """A TorchRec user's loader yields torchrec.datasets.utils.Batch (no extras): it trains, pipelined."""
    (result,) = run_multiprocess(_train_on_torchrec_batches, world_size=1, schema_path=synthetic_dir)
    assert result["steps"] == 6 and result["samples"] == 6 * 64
    assert result["pipelined"] == result["sharded"] and result["sharded"]


def _eval_loss_and_logloss(schema_path: str) -> List[Dict[str, float]]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    train_epoch(model, optimizer, list(ParquetBatchReader(schema, "train", 64))[:20], ctx.device, progress=False)
    out = []
    for batch_size in (1000, 7):  # a partial last batch of 200 rows, of 3 rows
        reader = ParquetBatchReader(schema, "valid", batch_size, rank=ctx.rank, world_size=ctx.world_size)
        results = evaluate(model, reader, ctx.device, CTRMetrics(), progress=False)
        out.append({"loss": results["loss"], "logloss": results["logloss"], "rows": results["num_samples"]})
    return out


@pytest.mark.multiprocess
def test_the_evaluation_loss_is_the_mean_over_rows_whatever_the_batches(synthetic_dir: str) -> None:
    """It was the mean of the batch means: a partial last batch (and so the number of ranks and
    the eval batch size) changed it, for the same model and rows."""
    (results,) = run_multiprocess(_eval_loss_and_logloss, world_size=1, schema_path=synthetic_dir)
    for result in results:  # a plain CTRTask's loss is the BCE, which logloss averages over every row
        assert result["loss"] == pytest.approx(result["logloss"], rel=1e-6), result
    assert results[0]["loss"] == pytest.approx(results[1]["loss"], rel=1e-6), results  # float32 batch means


def _threads_kept_by_an_exception(schema_path: str) -> Dict[str, Any]:
    """A training epoch and an evaluation left by an exception, the exceptions kept (as a notebook keeps the last
    one, or a sweep its failures): their readers' prefetch threads (each holding a shuffle buffer and an open
    Parquet file) stayed alive, blocked, as long as the tracebacks did."""
    import threading

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    kept = []

    def interrupted(step: int, loss: torch.Tensor) -> bool:
        raise KeyboardInterrupt()

    reader = ParquetBatchReader(schema, "train", 64, shuffle=True, prefetch=2)
    try:
        train_epoch(model, optimizer, reader, ctx.device, on_step=interrupted, progress=False)
    except KeyboardInterrupt as error:
        kept.append(error)
    after_training = sum(thread.name == "parquet-prefetch" for thread in threading.enumerate())

    class Failing(CTRMetrics):
        def update(self, *args: Any, **kwargs: Any) -> None:
            raise RuntimeError("metrics failed")

    try:
        # with a progress bar: a hidden bar's generator happens to close the reader as the loop unwinds
        evaluate(model, ParquetBatchReader(schema, "valid", 64, equal_batches=False, prefetch=2), ctx.device,
                 Failing(), progress=True)
    except RuntimeError as error:
        kept.append(error)
    after_evaluation = sum(thread.name == "parquet-prefetch" for thread in threading.enumerate())
    return {"after_training": after_training, "after_evaluation": after_evaluation, "kept": len(kept)}


@pytest.mark.multiprocess
def test_loops_left_by_an_exception_stop_their_readers_threads(synthetic_dir: str) -> None:
    (result,) = run_multiprocess(_threads_kept_by_an_exception, world_size=1, schema_path=synthetic_dir)
    assert result == {"after_training": 0, "after_evaluation": 0, "kept": 2}, result


def _steps_of_two_epochs_on_one_stream(schema_path: str) -> List[int]:
    """Two train_epoch calls, each stopped after 3 steps, fed by one endless stream the caller owns (as the
    benchmarks feed their measurements); the second trained no step: the first had closed the stream."""
    import itertools

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    reader = ParquetBatchReader(schema, "train", 64, shuffle=True)

    def endless():
        for epoch in itertools.count():
            reader.set_epoch(epoch)
            yield from reader

    stream = endless()
    steps = [train_epoch(model, optimizer, stream, ctx.device, on_step=lambda step, loss: step == 3,
                         progress=False).steps for _ in range(2)]
    stream.close()
    return steps


@pytest.mark.multiprocess
def test_a_stream_the_caller_passes_is_left_open_for_the_next_epoch(synthetic_dir: str) -> None:
    (steps,) = run_multiprocess(_steps_of_two_epochs_on_one_stream, world_size=1, schema_path=synthetic_dir)
    assert steps == [3, 3], steps


def _a_stream_stopped_and_continued(schema_path: str) -> Dict[str, Any]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:8]
    pulled: List[int] = []

    def stream():  # noqa: ANN202
        for index, batch in enumerate(batches):
            pulled.append(index)
            yield batch

    source = stream()
    first = train_epoch(model, optimizer, source, ctx.device, on_step=lambda step, loss: step == 3, progress=False)
    unused = [next(i for i, batch in enumerate(batches) if batch is left) for left in first.unused_batches]
    second = train_epoch(model, optimizer, itertools.chain(first.unused_batches, source), ctx.device, progress=False)
    # an iterable passed in: its iterator is closed here, and nothing comes back
    stopped_iterable = train_epoch(model, optimizer, batches, ctx.device, on_step=lambda step, loss: step == 3,
                                   progress=False)
    return {"unused": unused, "steps": [first.steps, second.steps], "pulled": len(pulled),
            "whole_epoch_unused": second.unused_batches, "iterable_unused": stopped_iterable.unused_batches}


@pytest.mark.multiprocess
def test_the_batches_read_ahead_of_a_stopping_step_come_back_to_the_caller(synthetic_dir: str) -> None:
    """The pipeline reads two batches ahead of its step: a caller's stream stopped by on_step lost them, so the next
    call on that stream trained from the sixth batch of eight, not the fourth."""
    (result,) = run_multiprocess(_a_stream_stopped_and_continued, world_size=1, schema_path=synthetic_dir)
    # torchrec 1.8's pipeline holds batches 4 and 5 (3 and 4 counted from 0) when step 3 ends
    assert result["unused"] == [3, 4], result
    assert result["steps"] == [3, 5] and result["pulled"] == 8 and result["whole_epoch_unused"] == [], result
    assert result["iterable_unused"] == [], result


def _grad_mode_in_evaluation(schema_path: str) -> List[bool]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, _ = _model(schema)
    seen: List[bool] = []
    model.register_forward_pre_hook(lambda module, args: seen.append(torch.is_grad_enabled()))
    reader = ParquetBatchReader(schema, "valid", 256, equal_batches=False)
    evaluate(model, reader, ctx.device, CTRMetrics(), progress=False)
    return seen


@pytest.mark.multiprocess
def test_evaluation_builds_no_autograd_graph(synthetic_dir: str) -> None:
    """A helper written between evaluate and its @torch.no_grad() took the decorator: every validation and test pass
    built a training step's graph (its memory at data.eval_batch_size)."""
    (seen,) = run_multiprocess(_grad_mode_in_evaluation, world_size=1, schema_path=synthetic_dir)
    assert seen and not any(seen), seen


def _batch_lacking_a_feature(schema_path: str) -> Dict[str, Any]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:3]
    kjt = batches[1].sparse_features
    dropped = kjt.keys()[-1]
    kept = {key: value for key, value in kjt.to_dict().items() if key != dropped}
    batches[1].sparse_features = KeyedJaggedTensor.from_jt_dict(kept)
    return {"errors": _errors_of_each_loop(ctx, model, optimizer, batches), "dropped": dropped}


def _errors_of_each_loop(ctx: Any, model: Any, optimizer: Any, batches: List[Any]) -> Dict[str, Optional[str]]:
    """The ValueError each loop over ``batches`` ends with (None: it ran through): training, pipelined and plain
    evaluation."""
    errors: Dict[str, Optional[str]] = {}
    runs = {"train": lambda: train_epoch(model, optimizer, batches, ctx.device, progress=False),
            "pipelined eval": lambda: evaluate(model, batches, ctx.device, CTRMetrics(), progress=False,
                                               pipelined=True),
            "plain eval": lambda: evaluate(model, batches, ctx.device, CTRMetrics(), progress=False)}
    for name, run in runs.items():
        try:
            run()
            errors[name] = None
        except ValueError as error:
            errors[name] = str(error)
    return errors


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2])  # 2: DDP wraps the task too (_dmp_wrapped_module.module.model)
def test_a_batch_lacking_a_feature_is_named_before_the_sharded_input_distribution(synthetic_dir: str,
                                                                                   world_size: int) -> None:
    """torchrec's pipelines (training and evaluation) distributed the ids first and failed with "Number of KJT dists
    (1) does not match number of kjt dist forwards provided (0)", naming neither the feature nor the model; the model
    is named by its path without the DMP and DDP wrappers."""
    results = run_multiprocess(_batch_lacking_a_feature, world_size=world_size, schema_path=synthetic_dir)
    for result in results:
        lacking = f"the sparse features lack ['{result['dropped']}']"
        assert (result["errors"]["train"] or "").startswith(f"DeepFM at model: {lacking}"), result
        # torchrec's EvalPipelineSparseDist distributes the ids first too; the plain loop's backbone checks them
        assert (result["errors"]["pipelined eval"] or "").startswith(f"DeepFM at model: {lacking}"), result
        assert (result["errors"]["plain eval"] or "").startswith(f"DeepFM: {lacking}"), result


def _batch_with_keys_in_another_order(schema_path: str) -> Dict[str, Any]:
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:4]
    features = batches[3].sparse_features.to_dict()
    batches[3].sparse_features = KeyedJaggedTensor.from_jt_dict({key: features[key] for key in reversed(features)})
    errors = _errors_of_each_loop(ctx, model, optimizer, batches)
    # one more key, unread, after those the tables read: the same positions, so the same ids are read
    longer = dict(batches[0].sparse_features.to_dict())
    longer["unread"] = longer[next(iter(longer))]
    batches[0].sparse_features = KeyedJaggedTensor.from_jt_dict(longer)
    return {"errors": errors, "longer": _errors_of_each_loop(ctx, model, optimizer, batches[:3])}


@pytest.mark.multiprocess
@pytest.mark.parametrize("world_size", [1, 2])
def test_a_batch_with_keys_in_another_order_than_the_first_is_refused_by_the_sharded_model(synthetic_dir: str,
                                                                                          world_size: int) -> None:
    """torchrec's sharded EBC fixes the keys' positions at its first batch and permutes later batches by them: the
    reversed keys of a later batch silently read other features' ids (logits off by 1e-2 in a user's model). Each loop
    now refuses such a batch, naming the sharded tables (pipelines) or the backbone (the plain loop)."""
    results = run_multiprocess(_batch_with_keys_in_another_order, world_size=world_size, schema_path=synthetic_dir)
    for result in results:
        errors = result["errors"]
        assert (errors["train"] or "").startswith("model.embedding_bag_collection: its sharded tables read the sparse "
                                                  "features by the positions they had among the keys of the first "
                                                  "batch"), errors
        assert "build every KeyedJaggedTensor with the keys in one order" in errors["train"]
        assert (errors["pipelined eval"] or "").startswith("model.embedding_bag_collection: its sharded"), errors
        assert (errors["plain eval"] or "").startswith("DeepFM: its sharded tables read"), errors
        if "and no other key" not in errors["train"]:  # positions kept: a key after them is read as one more, unread
            assert result["longer"] == {"train": None, "pipelined eval": None, "plain eval": None}, result


def _batch_of_fewer_dense_rows(schema_path: str) -> Dict[str, Optional[str]]:
    schema = DatasetSchema.load(schema_path)
    ctx, model, optimizer = _model(schema)
    batches = list(ParquetBatchReader(schema, "train", 64))[:3]
    batches[1].dense_features = batches[1].dense_features[:-1]
    return _errors_of_each_loop(ctx, model, optimizer, batches)


@pytest.mark.multiprocess
def test_a_batch_whose_parts_differ_in_rows_is_named_in_the_pipelines(synthetic_dir: str) -> None:
    """63 dense rows beside a KJT of 64 failed inside the backbone with torch's bare "The size of tensor a (64) must
    match the size of tensor b (63)"; the sharded loops, pipelined or not, now name the parts and their row counts."""
    (errors,) = run_multiprocess(_batch_of_fewer_dense_rows, world_size=1, schema_path=synthetic_dir)
    expected = ("DeepFM: the batch's parts have different row counts: dense_features 63, sparse_features (the "
                "KeyedJaggedTensor's stride) 64")
    assert all((error or "").startswith(expected) for error in errors.values()), errors


def test_every_backbone_of_a_pair_has_its_features_checked_and_is_named_by_its_path() -> None:
    """A teacher-student pair has two backbones: a batch lacking a feature that the teacher alone reads is refused
    naming the teacher (every backbone is checked, not the first); a backbone on its own is named without a path."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.models.dlrm import DLRM
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_llm.data.batch import Batch
    from recsys_llm.models.dlrm import DLRMBackbone
    from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask
    from recsys_llm.models.base import BatchFeatureCheck, features_read
    from recsys_llm.train.pipeline import _Counting

    def task(prefix: str, features: List[str]) -> CTRTask:
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"{prefix}{f}", embedding_dim=8, num_embeddings=10,
                                                                feature_names=[f]) for f in features])
        return CTRTask(DLRMBackbone(DLRM(ebc, 2, [8, 8], [8, 1]), num_dense_features=2))

    student = task("student_", ["user_id", "item_id"])
    pair = TeacherStudentTask(task("teacher_", ["user_id", "item_id", "tag"]), student,
                              TeacherStudentConfig(mode="joint"))
    read = features_read(pair)
    assert read == {"DLRMBackbone at student.model": ["user_id", "item_id"],
                    "DLRMBackbone at teacher.model": ["user_id", "item_id", "tag"]}
    assert features_read(student.model) == {"DLRMBackbone": ["user_id", "item_id"]}
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.tensor([1, 2, 3, 4]),
                                              torch.ones(4, dtype=torch.int32))
    batch = Batch(torch.randn(2, 2), kjt, torch.tensor([0.0, 1.0]), {})
    with pytest.raises(ValueError, match=r"^DLRMBackbone at teacher.model: the sparse features lack \['tag'\]"):
        next(_Counting(iter([batch]), check_features=BatchFeatureCheck(pair)))
