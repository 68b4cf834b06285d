"""The forwards of an evaluation: a plain loop, or torchrec's ``EvalPipelineSparseDist``.

Both take ``(batch, real)`` pairs (:meth:`~recsys_llm.data.parquet.ParquetBatchReader.padded`: every rank
runs as many collective forwards, and a ``real=False`` repeat is run but not scored) and yield one
:class:`EvalStep` per pair, in order, for :func:`~recsys_llm.train.pipeline.evaluate` to score.

The pipelined one overlaps the next batch's copy to the device (in torchrec's loading thread) and its
sparse input all-to-all with the current forward. Its outputs are the model's alone, so the pair's
``real`` flag and the batch's extras (the metric subsets' masks) travel beside the pipeline in a queue,
appended in the order the loading thread reads the pairs: the order the outputs come back. The pipeline
is built per call and detached at the end (the model's own forwards back, ready for the next
``TrainPipelineSparseDist``), as :func:`~recsys_llm.train.pipeline.train_epoch` does with its own.

Example::

    steps = pipelined_forwards(model, reader.padded(), device)
    for step in steps:
        if step.real:
            metrics.update(step.logits, step.labels, step.extras)
    steps.close()   # stops the loading thread, detaches the pipeline
"""

import collections
import threading
from typing import Callable, Collection, Deque, Dict, Iterator, NamedTuple, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.distributed.train_pipeline import EvalPipelineSparseDist
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import batch_extras
from recsys_llm.models.base import BatchFeatureCheck


class EvalStep(NamedTuple):
    """One evaluation forward.

    Args:
        loss (torch.Tensor): 0-dim, the batch's mean loss.
        logits (torch.Tensor): (B,) logits.
        labels (torch.Tensor): (B,) 0/1 labels.
        extras (Dict[str, torch.Tensor]): the batch's extras (each (B, ...)), on the device of ``labels``
            (:func:`pipelined_forwards`: those it was asked for).
        real (bool): False for a repeat that only keeps this rank's collectives in step: not scored.
    """

    loss: torch.Tensor
    logits: torch.Tensor
    labels: torch.Tensor
    extras: Dict[str, torch.Tensor]
    real: bool


def use_pipelined_eval(setting: Union[str, bool], device: torch.device) -> bool:
    """``train.pipelined_eval`` for ``device``: ``auto`` is on for CUDA only (on CPU the plain loop was faster)."""
    return device.type == "cuda" if setting == "auto" else bool(setting)


def plain_forwards(model: nn.Module, pairs: Iterator[Tuple[TorchRecBatch, bool]],
                   device: torch.device) -> Iterator[EvalStep]:
    """The model's forward of each pair's batch, one after the other (call under ``torch.no_grad()``)."""
    for batch, real in pairs:
        batch = batch.to(device, non_blocking=True)
        _, (loss, logits, labels) = model(batch)
        yield EvalStep(loss, logits, labels, batch_extras(batch), real)


class _Tagged(Iterator[TorchRecBatch]):
    """Hands the pairs' batches to the pipeline (its loading thread calls ``next``) and queues each pair's
    ``real`` flag and CPU extras, in the order the pipeline's outputs come back. A batch that ``check_features``
    refuses (:class:`~recsys_llm.models.base.BatchFeatureCheck`: a feature missing, keys in another order than the
    sharded tables' first batch) is a read error, named before the pipeline distributes its ids (torchrec's sharded
    input distribution failed first, naming none, or read other features' ids)."""

    def __init__(self, pairs: Iterator[Tuple[TorchRecBatch, bool]],
                 check_features: Optional[Callable[[KeyedJaggedTensor], None]] = None,
                 extras: Optional[Collection[str]] = None) -> None:
        self._pairs = pairs
        self._check_features = check_features
        self._extras = None if extras is None else frozenset(extras)  # the extras kept (None: all)
        self._lock = threading.Lock()
        self._closed = False
        self.tags: Deque[Tuple[bool, Dict[str, torch.Tensor]]] = collections.deque()  # appends are thread-safe
        # what reading the pairs raised (a data error, say): kept for the main thread to raise once the batches read
        # before it have run, as the plain loop would; torchrec's loading thread would log it as an ERROR line first
        self.error: Optional[Exception] = None

    def __next__(self) -> TorchRecBatch:
        with self._lock:
            if self._closed or self.error is not None:
                raise StopIteration
            try:
                batch, real = next(self._pairs)
                if self._check_features is not None:
                    self._check_features(batch.sparse_features)
            except StopIteration:
                raise
            except Exception as error:  # noqa: BLE001 - raised again in the main thread
                self.error = error
                raise StopIteration from None
            kept = batch_extras(batch)
            # a batch without an extra asked for keeps them all: the metrics' KeyError then names the extras the
            # batch has, as the plain loop's does, not an empty list
            if self._extras is not None and self._extras.issubset(kept):
                kept = {key: value for key, value in kept.items() if key in self._extras}
            self.tags.append((real, kept))
        return batch

    def close(self) -> None:
        """Waits for a ``next`` in progress in the loading thread, then reads no further pair: the pairs may be
        closed after it (a generator another thread runs cannot be)."""
        with self._lock:
            self._closed = True


def pipelined_forwards(model: nn.Module, pairs: Iterator[Tuple[TorchRecBatch, bool]],
                       device: torch.device, extras: Optional[Collection[str]] = None) -> Iterator[EvalStep]:
    """The model's forwards of the pairs' batches through a fresh ``EvalPipelineSparseDist`` (call under
    ``torch.no_grad()``, the model in eval mode). Its end, an exception or closing the generator stops the
    pipeline's loading thread and waits out a read of ``pairs`` it may be doing (``pairs`` may be closed next),
    then detaches the pipeline: the model's sharded modules get their own forwards back. An exception reading
    ``pairs`` (a data error) is raised here, in the caller's thread, after the steps of the pairs read before it, as
    the plain loop raises it (torchrec's loading thread, left to catch it, would log it as an ERROR line too).

    The extras of an :class:`EvalStep` are the batch's CPU tensors copied to the device once more (the
    pipeline's copy of the batch stays inside it): only those named in ``extras`` (None, or a batch lacking
    one of them: every one, so that the metrics' KeyError names what the batch has), so that
    wide extras the caller does not read (a gain network's ``llm_vector`` (B, d), an offline student's teacher
    representations (B, H)) do not cross to the GPU a second time per batch. torchrec's loading thread never
    sees such an exception, so it cannot skip the batch of one marked retryable (``is_retryable``), as it would:
    the plain loop's rows are scored, or its error raised."""
    tagged = _Tagged(pairs, BatchFeatureCheck(model), extras)
    # the optimizer is only stepped in training: EvalPipelineSparseDist.progress never reads it
    pipeline = EvalPipelineSparseDist(model, None, device)  # type: ignore[arg-type]
    try:
        while True:
            try:
                loss, logits, labels = pipeline.progress(tagged)
            except StopIteration:
                break
            real, extras = tagged.tags.popleft()
            # the CPU extras (pinned on CUDA): an async copy, as the batch's own were
            extras = {key: value.to(labels.device, non_blocking=True) for key, value in extras.items()}
            yield EvalStep(loss, logits, labels, extras, real)
        if tagged.error is not None:  # the pairs failed: the batches before ran, as in the plain loop
            raise tagged.error  # outside the except block: with its own cause, not chained to the StopIteration
    finally:
        # torchrec's DataLoadingThread cannot be joined (its ``_stop`` flag shadows the method Thread.join calls):
        # stopped, it ends on its own, and the closed tags wait for a read of the pairs it may be doing
        pipeline.reset()
        tagged.close()
        pipeline.detach()
