"""Train and eval loops: ``TrainPipelineSparseDist`` for training; for eval a plain loop or ``EvalPipelineSparseDist``.

Training runs on torchrec's ``TrainPipelineSparseDist``: while batch *i* runs forward and
backward, the sparse all-to-all of batch *i+1* is already in flight. Each call of
:func:`train_epoch` builds a fresh pipeline over a fresh iterator and detaches it at the
end, restoring the model's original forwards. That avoids the known desync of one pipeline
switched between train and eval (its prefetched batches belong to the old iterator), and
lets :func:`evaluate` run on the same DMP model as a plain ``torch.no_grad()`` loop or, with
``pipelined=True``, through a fresh ``EvalPipelineSparseDist`` of its own, detached the same way
(:mod:`recsys_llm.train.eval_forwards`).

The pipeline finds the sharded modules by fx-tracing the model; a module whose KJT input is
modified on the way is silently run unpipelined (torchrec logs "will NOT be pipelined").
:func:`train_epoch` reports which sharded modules were pipelined so tests can assert all were.

Example::

    stats = train_epoch(model, optimizer, reader, device, on_step=save_every_100)
    print(stats.samples_per_second)
    results = evaluate(model, valid_reader, device, CTRMetrics())
"""

import collections
import dataclasses
import itertools
import math
import time
from typing import Any, Callable, Deque, Dict, Iterable, Iterator, List, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardedModule
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from recsys_llm.data.batch import Batch, batch_extras
from recsys_llm.data.pair_swap import LABEL_WEIGHT_KEY
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.models.base import BatchFeatureCheck
from recsys_llm.progress import bar_options
from recsys_llm.train.checkpoint import table_step_counters_kept
from recsys_llm.train.distributed import all_ranks_true, is_main_process
from recsys_llm.train.eval_forwards import pipelined_forwards, plain_forwards
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.mixed_precision import autocast_forward
from recsys_llm.train.train_metrics import WindowedTrainMetrics

# the progress bar's names of the windowed training metrics (train_metrics.WindowedTrainMetrics)
WINDOW_BAR_KEYS = {"auc": "auc_w", "ne": "ne_w", "calibration": "cal_w"}
# on_step(step_in_epoch, loss) -> True to stop the epoch now (max_steps reached, ...). ``loss`` is
# the step's detached 0-dim loss tensor, still on the device: reading it (``float(loss)``) waits
# for the step to finish, so callbacks read it only when they log.
StepCallback = Callable[[int, torch.Tensor], bool]
# Steps between two updates of the progress bar's loss (its mean over those steps).
LOSS_READ_EVERY = 20


class NonFiniteLossError(ValueError):
    """The training loss became NaN or inf: training stops before a checkpoint keeps the
    diverged weights."""


# what to do with checkpoints saved after the weights diverged, which a resume would go on from
DIVERGED_REMEDY = ("resume from an earlier checkpoint by deleting the later ones, or start over in a new "
                   "train.run_dir")


def check_finite_loss(loss: torch.Tensor, where: str) -> None:
    """Raises :class:`NonFiniteLossError` on every rank unless ``loss`` (a step's loss, or a
    running sum of them) is finite on every rank (collective; reading it waits for the device).

    Args:
        loss (torch.Tensor): 0-dim, on the process group's device.
        where (str): names the step in the message.
    """
    value = float(loss)
    if not all_ranks_true(math.isfinite(value), loss.device):
        shown = f"is {value}" if not math.isfinite(value) else "is NaN or inf on another rank"
        raise NonFiniteLossError(
            f"{where}: training loss {shown}; stopped before a checkpoint of this step keeps the diverged weights "
            f"(a checkpoint saved at an earlier step, after the update that diverged, holds them: "
            f"{DIVERGED_REMEDY}). Try a lower learning rate, and check the input vectors and dense features for "
            "NaN/inf or huge values"
        )


@dataclasses.dataclass
class EpochStats:
    """What one :func:`train_epoch` call did (this rank's view).

    Args:
        steps (int): optimizer steps taken in this call.
        samples (int): samples trained on by this rank.
        seconds (float): wall time of the loop.
        first_step_seconds (float): wall time of the first step, which also fills the pipeline
            and traces the model (seconds with large models or entity tables); on GPU, as the
            host saw it.
        first_step_samples (int): samples of the first step.
        mean_loss (float): mean training loss over the steps.
        pipelined_modules (List[str]): sharded modules the pipeline overlaps.
        sharded_modules (List[str]): all sharded modules of the model.
        stopped_early (bool): ``on_step`` asked to stop before the data ended.
        unused_batches (List[Batch]): when ``on_step`` stopped the epoch, the batches the pipeline had already read
            (up to two ahead of the step) from an iterator the caller passed, and not trained on, in order, as the
            iterator gave them; ``itertools.chain(stats.unused_batches, iterator)`` goes on from the first of them.
            Empty otherwise (an iterable passed in: its iterator is closed here).
    """

    steps: int
    samples: int
    seconds: float
    first_step_seconds: float
    first_step_samples: int
    mean_loss: float
    pipelined_modules: List[str]
    sharded_modules: List[str]
    stopped_early: bool
    unused_batches: List[Batch] = dataclasses.field(default_factory=list)

    @property
    def samples_per_second(self) -> float:
        """Throughput after the first step (the pipeline's set-up); of the one step if only one."""
        samples, seconds = self.samples, self.seconds
        if self.steps > 1:
            samples, seconds = samples - self.first_step_samples, seconds - self.first_step_seconds
        return samples / seconds if seconds > 0 else 0.0


def sharded_module_names(model: nn.Module) -> List[str]:
    """Paths of the torchrec sharded modules (sharded EBCs) inside a DMP model."""
    return [name for name, module in model.named_modules() if isinstance(module, ShardedModule)]


class _Counting(Iterator[Batch]):
    """Wraps an iterator and counts the samples it hands to the pipeline; with ``keep_weights``, also queues
    each batch's ``label_weight`` extra (None without one), in the order the pipeline's outputs come back.

    With ``check_features`` (:class:`~recsys_llm.models.base.BatchFeatureCheck`), a batch whose KeyedJaggedTensor
    lacks a feature, or has its keys in another order than the sharded tables' first batch, is refused naming it
    before the pipeline distributes its ids: torchrec's sharded input distribution failed first, with "Number of KJT
    dists (1) does not match number of kjt dist forwards", or read other features' ids."""

    def __init__(self, batches: Iterator[Batch], keep_weights: bool = False,
                 check_features: Optional[Callable[[KeyedJaggedTensor], None]] = None,
                 keep_batches: bool = False) -> None:
        self._batches = batches
        self._keep_weights = keep_weights
        self._check_features = check_features
        self._keep_batches = keep_batches
        self.samples_seen: List[int] = []
        self.label_weights: Deque[Optional[torch.Tensor]] = collections.deque()
        # with keep_batches: the batches handed to the pipeline whose step has not come back yet, oldest first
        self.ahead: Deque[Batch] = collections.deque()

    def __next__(self) -> Batch:
        batch = next(self._batches)
        if self._check_features is not None:
            self._check_features(batch.sparse_features)
        self.samples_seen.append(batch.labels.size(0))  # torchrec's own Batch has no batch_size
        if self._keep_batches:
            self.ahead.append(batch)
        if self._keep_weights:
            self.label_weights.append(batch_extras(batch).get(LABEL_WEIGHT_KEY))
        return batch


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[Batch],
    device: torch.device,
    *,
    skip_batches: int = 0,
    on_step: Optional[StepCallback] = None,
    total: Optional[int] = None,
    description: str = "train",
    progress: bool = True,
    window_metrics: Optional[WindowedTrainMetrics] = None,
    autocast_dtype: Optional[torch.dtype] = None,
) -> EpochStats:
    """Trains over ``batches`` with a fresh ``TrainPipelineSparseDist``.

    Every rank must see the same number of batches (the sharded forward is collective).

    Args:
        model (nn.Module): the DMP-wrapped task; ``model(batch) -> (loss, (loss, logits, labels))``.
        optimizer (torch.optim.Optimizer): the combined optimizer (fused tables + dense).
        batches (Iterable[Batch]): this rank's batches for the epoch. The iterator made here from an
            iterable (a reader: its epoch's generator) is closed when the epoch ends, finished, stopped by
            ``on_step`` or left by an exception: its prefetch thread, buffers and file go at once. An
            iterator passed in is the caller's, left open (an endless stream may feed the next call); the
            pipeline reads up to two batches ahead of its step, so when ``on_step`` stops the epoch those come
            back in ``EpochStats.unused_batches`` (chain them before the iterator for the next call).
        device (torch.device): where batches are copied.
        skip_batches (int): batches to pass over first (resuming mid-epoch); not trained on.
        on_step (Optional[StepCallback]): called after each step with the step index within
            the epoch (1-based, counting skipped batches) and the loss; returns True to stop.
        total (Optional[int]): batches in the epoch, for the progress bar.
        description (str): progress bar label.
        progress (bool): show a tqdm bar (rank 0 only).
        window_metrics (Optional[WindowedTrainMetrics]): updated with every step's logits and labels (weighted
            by the batch's ``label_weight`` where it has one) before ``on_step``; its computes (collective, every
            ``train.metrics_every`` steps) show on the bar. None: no logits read, no cost.
        autocast_dtype (Optional[torch.dtype]): each forward under ``torch.autocast`` of this dtype
            (``torch.bfloat16``; :mod:`recsys_llm.train.mixed_precision`); None: float32.

    Returns:
        EpochStats: steps, samples, throughput, mean loss, pipelined modules.

    Raises:
        NonFiniteLossError: on every rank, when a step's loss is NaN or inf on any: in one CPU
            process before ``on_step`` is called for it; on GPU or several ranks (each check
            waits for the device and the other ranks) within ``LOSS_READ_EVERY`` steps and at
            the epoch's end (the runner's ``on_step`` checks its step's loss before it saves).
    """
    model.train()
    iterator = iter(batches)
    # this function's own iterator is closed at the end: an exception's traceback would keep a reader's
    # prefetch thread alive; one the caller passed is the caller's to close
    source = iterator if iterator is not batches else None
    if skip_batches:
        # Consume (and drop) batches already trained on before the interruption.
        iterator = itertools.islice(iterator, skip_batches, None)
    # a caller's iterator outlives the call: the batches read ahead of a stopping step go back to the caller
    counting = _Counting(iterator, keep_weights=window_metrics is not None, check_features=BatchFeatureCheck(model),
                         keep_batches=source is None)
    forward = None if autocast_dtype is None else autocast_forward(model, device, autocast_dtype)
    pipeline = TrainPipelineSparseDist(model, optimizer, device, execute_all_batches=True, custom_model_fwd=forward)
    bar = tqdm(
        total=None if total is None else max(0, total - skip_batches),
        desc=description,
        disable=not (progress and is_main_process()),
        dynamic_ncols=True,
        leave=False,
        **bar_options(),
    )
    step = skip_batches
    steps = 0
    loss_sum = torch.zeros((), device=device)
    window: List[torch.Tensor] = []
    postfix: Dict[str, str] = {}  # the bar's: the loss, then the windowed training metrics
    # a NaN loss makes NaN weights, which a checkpoint would keep: one CPU process checks every
    # step (free); on GPU or several ranks, where a check waits for the device or the other
    # ranks, the running sum every LOSS_READ_EVERY steps and at the end, and the runner checks
    # the step's loss before it saves a checkpoint
    single_cpu = device.type == "cpu" and not (dist.is_initialized() and dist.get_world_size() > 1)
    check_every = 1 if single_cpu else LOSS_READ_EVERY
    stopped = False
    first_step_seconds = 0.0
    start = time.perf_counter()
    try:
        while True:
            try:
                loss, logits, labels = pipeline.progress(counting)
            except StopIteration:
                break
            step += 1
            steps += 1
            if counting.ahead:
                counting.ahead.popleft()  # this step's batch, trained on
            if steps == 1:
                first_step_seconds = time.perf_counter() - start
            loss_value = loss.detach().mean()
            loss_sum += loss_value
            if steps % check_every == 0:
                check_finite_loss(loss_sum, f"{description}: step {step}")
            bar.update(1)
            if window_metrics is not None:  # the batch's label weights are pinned on CUDA: an async copy
                weights = counting.label_weights.popleft()
                weights = None if weights is None else weights.to(labels.device, non_blocking=True)
                computed = window_metrics.update(logits, labels, weights)
                if computed is not None and not bar.disable:
                    # short keys: beside tqdm's own ~50 columns the bar fits a 100-column terminal
                    postfix.update({key: f"{computed[name]:.3f}" for name, key in WINDOW_BAR_KEYS.items()})
                    bar.set_postfix(postfix, refresh=False)
            if not bar.disable:  # a hidden bar reads no loss (no device sync)
                window.append(loss_value)
                if len(window) == LOSS_READ_EVERY:
                    postfix = {"loss": f"{float(torch.stack(window).mean()):.4f}",
                               **{key: text for key, text in postfix.items() if key != "loss"}}
                    bar.set_postfix(postfix, refresh=False)
                    window.clear()
            if on_step is not None and on_step(step, loss_value):
                stopped = True
                break
        if device.type == "cuda":  # the clock stops when the queued steps are done, not when they are queued
            torch.cuda.synchronize(device)
    finally:
        seconds = time.perf_counter() - start
        bar.close()
        pipelined_ids = {id(m) for m in pipeline._pipelined_modules}  # noqa: SLF001 (no public accessor)
        pipelined = [name for name, m in model.named_modules() if id(m) in pipelined_ids]
        pipeline.detach()
        _close(source)
    if steps:
        check_finite_loss(loss_sum, f"{description}: by step {step}")
    trained_samples = sum(counting.samples_seen[:steps])
    return EpochStats(
        steps=steps,
        samples=trained_samples,
        seconds=seconds,
        first_step_seconds=first_step_seconds,
        first_step_samples=counting.samples_seen[0] if steps else 0,
        mean_loss=float(loss_sum) / steps if steps else float("nan"),
        pipelined_modules=pipelined,
        sharded_modules=sharded_module_names(model),
        stopped_early=stopped,
        unused_batches=list(counting.ahead) if stopped else [],
    )


def _close(batches: Optional[Iterator[Any]]) -> None:
    """Closes a generator of batches (a reader's: its prefetch thread ends, its buffers and file go), which a
    loop left by an exception would otherwise keep alive as long as the exception's traceback lives."""
    close = getattr(batches, "close", None)
    if close is not None:
        close()


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Batch],
    device: torch.device,
    metrics: CTRMetrics,
    *,
    total: Optional[int] = None,
    description: str = "eval",
    progress: bool = True,
    pipelined: bool = False,
) -> dict:
    """Evaluation loop; returns ``metrics.compute()`` over all ranks.

    Args:
        model (nn.Module): the DMP-wrapped task (not attached to a pipeline).
        batches (Iterable[Batch]): this rank's batches (same count on every rank), or a
            ``ParquetBatchReader``: with ``equal_batches=False`` every row is scored once
            (:meth:`~recsys_llm.data.parquet.ParquetBatchReader.padded`).
        device (torch.device): where batches are copied.
        metrics (CTRMetrics): reset, filled and computed here.
        total (Optional[int]): batches, for the progress bar (a reader knows its own).
        description (str): progress bar label.
        progress (bool): show a tqdm bar (rank 0 only).
        pipelined (bool): the forwards run through torchrec's ``EvalPipelineSparseDist``
            (:func:`~recsys_llm.train.eval_forwards.pipelined_forwards`; the same results), else one by one.

    Returns:
        dict: AUC, LogLoss, NE, ... (see :class:`CTRMetrics`) plus ``loss`` (BCE + terms, each
        batch's weighted by its rows: the mean over every rank's rows, whatever the batch size
        and the number of ranks).
    """
    was_training = model.training
    model.eval()
    metrics.reset()
    # summed on the device: no host sync per batch
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    rows = 0
    if isinstance(batches, ParquetBatchReader):
        pairs, total = batches.padded(), batches.padded_len
    else:
        pairs = ((batch, True) for batch in batches)
    # the pipelined loop copies each batch's extras to the device a second time: only the metrics' masks
    steps = (pipelined_forwards(model, pairs, device, metrics.extra_keys) if pipelined
             else plain_forwards(model, pairs, device))
    with table_step_counters_kept(model):  # FBGEMM counts these forwards as optimizer steps otherwise
        try:
            for step in tqdm(steps, total=total, desc=description, disable=not (progress and is_main_process()),
                             dynamic_ncols=True, leave=False, **bar_options()):
                if not step.real:  # a repeat that keeps this rank's collectives in step with the others
                    continue
                metrics.update(step.logits, step.labels, step.extras)
                # a batch's loss is its rows' mean: weighted by its rows, a partial batch counts as its rows do
                loss_sum += step.loss.detach().double().sum() * step.labels.numel()
                rows += step.labels.numel()
        finally:
            _close(steps)  # first: the pipeline's loading thread may be reading the pairs
            _close(pairs)
    results = metrics.compute()
    totals = torch.stack([loss_sum, torch.tensor(float(rows), dtype=torch.float64, device=device)])
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(totals)  # every rank reports the same loss, like the other metrics
    results["loss"] = float(totals[0] / totals[1]) if totals[1] > 0 else float("nan")
    model.train(was_training)
    return results
