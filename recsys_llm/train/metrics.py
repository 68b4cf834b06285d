"""CTR metrics over all ranks: exact AUC, LogLoss, NE, calibration, also per subset (e.g. cold items).

Each rank keeps its own predictions and labels; ``compute()`` gathers them on rank 0 (sizes
may differ per rank), which computes the numbers from the full set and sends them to every rank:

* AUC: the Mann-Whitney statistic of the logits over all samples (exact, ties counted half;
  ranked by logit, as probabilities of logits beyond ~37 all round to 1.0 and would tie);
* LogLoss: mean binary cross-entropy in nats, ``-mean(y log p + (1 - y) log(1 - p))``;
* NE (normalized entropy, He et al. 2014): cross-entropy divided by the entropy of the
  mean label, computed with ``torchrec.metrics.ne`` (the same definition as torchrec's NE);
  NaN when the labels hold one class (that entropy is 0).

A windowed ``torchrec.metrics.RecMetricModule`` would approximate AUC over a window of
recent batches; a held-out AUC must be exact, so the full set is gathered (8 bytes per
sample: 10^7 validation rows take 80 MB), and ``compute`` takes float64 copies of it
(sorted scores, ranks, the log-loss terms): about 75 bytes per sample at its peak, each temporary
freed once used, on rank 0 only (the other ranks of a host hold their own share).

Example::

    metrics = CTRMetrics(subsets={"cold": "is_cold_item"})
    for batch in loader:
        _, (_, logits, labels) = model(batch)
        metrics.update(logits, labels, batch.extras)
    metrics.compute()   # {"auc": ..., "logloss": ..., "ne": ..., "cold/auc": ..., ...}
"""

import math
from typing import Dict, List, Mapping, Optional

import torch
import torch.distributed as dist
from torchmetrics.utilities.distributed import gather_all_tensors
from torchrec.metrics.ne import compute_cross_entropy, compute_ne

from recsys_llm.train.distributed import collective_device, host_group

_ETA = 1e-12


def _gather_variable_to_rank_0(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0: the concatenation of a 1-d tensor of any length from every rank, in rank order, on ``tensor``'s
    device (the gather itself runs on the process group's device: CUDA under NCCL); other ranks: an empty tensor."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    local = tensor.to(collective_device())
    sizes = [int(size) for size in gather_all_tensors(local.new_tensor([local.numel()], dtype=torch.int64))]
    padded = torch.cat([local, local.new_zeros(max(sizes) - local.numel())])  # gather takes equal sizes
    if dist.get_rank() != 0:
        dist.gather(padded, dst=0)
        return tensor[:0]
    shares = [torch.empty_like(padded) for _ in sizes]
    dist.gather(padded, shares, dst=0)
    return torch.cat([share[:size] for share, size in zip(shares, sizes)]).to(tensor.device)


def binary_metrics(
    probabilities: torch.Tensor, labels: torch.Tensor, scores: Optional[torch.Tensor] = None
) -> Dict[str, float]:
    """AUC, LogLoss, NE, sample count and mean label of one set.

    Args:
        probabilities (torch.Tensor): (N,) click probabilities.
        labels (torch.Tensor): (N,) 0/1 labels.
        scores (Optional[torch.Tensor]): (N,) scores the AUC ranks by, in the order of the
            probabilities (e.g. the logits, which keep apart probabilities that round to 1.0);
            None: the probabilities.

    Returns:
        Dict[str, float]: ``auc`` and ``ne`` (both NaN when only one class is present: the
        entropy NE divides by is 0), ``logloss``, ``num_samples``, ``ctr``, and ``calibration``:
        the predicted clicks over the clicks, sum(p) / sum(y), as torchrec's ``CalibrationMetric``
        (1 when the model predicts as many clicks as there are; NaN without a click).
    """
    n = labels.numel()
    if n == 0:
        return {"auc": math.nan, "logloss": math.nan, "ne": math.nan, "num_samples": 0.0, "ctr": math.nan,
                "calibration": math.nan}
    probabilities = probabilities.double()
    labels = labels.double()
    positives = labels.sum()
    one_class = positives.item() in (0.0, float(n))
    auc = math.nan if one_class else _auc(probabilities if scores is None else scores, labels)
    calibration = float(probabilities.sum() / positives) if positives > 0 else math.nan
    # y log p + (1 - y) log(1 - p), its terms computed in place: a (N,) float64 copy less at a time
    p = probabilities.clamp(_ETA, 1.0 - _ETA)
    log_q = torch.sub(1.0, p).log_().mul_(torch.sub(1.0, labels))
    logloss = float(-p.log().mul_(labels).add_(log_q).mean())
    del log_q
    ne = math.nan if one_class else _normalized_entropy(p, labels)
    return {"auc": auc, "logloss": logloss, "ne": ne, "num_samples": float(n), "ctr": float(positives / n),
            "calibration": calibration}


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUC of a set holding both classes: P(score of a positive > score of a negative), ties
    counted half, from the positives' mean ranks (float64 (N,) 0/1 labels; exact in float64 up to ~10^8 rows:
    the ranks are halves of integers, whose sums are exact below 2^53). Each (N,) temporary is freed as soon
    as it is used: a split of 10^8 rows holds several."""
    order = torch.argsort(scores)
    _, group, counts = torch.unique_consecutive(scores[order], return_inverse=True, return_counts=True)
    positive = labels[order] > 0
    del order
    counts = counts.double()
    mean_ranks = counts.cumsum(0).sub_(counts.sub_(1.0).div_(2.0))  # 1-based, ties share their mean rank
    rank_sum = mean_ranks[group[positive]].sum()
    positives = labels.sum()
    negatives = labels.numel() - positives
    return float((rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives))


def _normalized_entropy(clamped: torch.Tensor, labels: torch.Tensor) -> float:
    """torchrec's NE of a set holding both classes (float64 (N,) labels and probabilities clamped to
    [``_ETA``, 1 - ``_ETA``], which torchrec's in-place clamp then leaves as they are)."""
    positives = labels.sum()
    weight = labels.new_ones(())  # every row weighs 1: a scalar broadcast, not an (N,) tensor of ones
    ce_sum = compute_cross_entropy(labels, clamped, weight, _ETA).sum()
    return float(compute_ne(ce_sum, labels.new_tensor(float(labels.numel())), positives,
                            labels.numel() - positives, _ETA))


class CTRMetrics:
    """Accumulates (logit, label) pairs on each rank; ``compute`` reduces over all ranks.

    Args:
        subsets (Optional[Mapping[str, str]]): subset name -> ``Batch.extras`` key of a (B,)
            0/1 mask; metrics of the masked samples are reported as ``"{name}/{metric}"``.
            A mask missing from a batch is an error (the data lacks that column).
    """

    def __init__(self, subsets: Optional[Mapping[str, str]] = None) -> None:
        self._subsets: Dict[str, str] = dict(subsets or {})
        self.reset()

    def reset(self) -> None:
        self._logits: List[torch.Tensor] = []
        self._labels: List[torch.Tensor] = []
        self._masks: Dict[str, List[torch.Tensor]] = {name: [] for name in self._subsets}

    def update(self, logits: torch.Tensor, labels: torch.Tensor, extras: Optional[Mapping[str, torch.Tensor]] = None) -> None:
        """
        Args:
            logits (torch.Tensor): (B,) logits.
            labels (torch.Tensor): (B,) 0/1 labels.
            extras (Optional[Mapping[str, torch.Tensor]]): the batch extras holding subset masks.
        """
        # kept on their device until compute (a copy to the host here would sync every batch)
        self._logits.append(logits.detach().reshape(-1).float())
        self._labels.append(labels.detach().reshape(-1).float())
        for name, key in self._subsets.items():
            if extras is None or key not in extras:
                raise KeyError(f"metric subset {name!r} needs batch extra {key!r}; extras present: {sorted(extras or {})}")
            self._masks[name].append(extras[key].detach().reshape(-1).bool())

    def compute(self) -> Dict[str, float]:
        """Metrics over every sample seen by every rank (a collective: call on all ranks; rank 0 computes them)."""
        logits = _gather_variable_to_rank_0(torch.cat(self._logits) if self._logits else torch.zeros(0)).cpu()
        labels = _gather_variable_to_rank_0(torch.cat(self._labels) if self._labels else torch.zeros(0)).cpu()
        masks = {name: _gather_variable_to_rank_0(torch.cat(parts).to(torch.uint8) if parts
                                                  else torch.zeros(0, dtype=torch.uint8)).cpu().bool()
                 for name, parts in self._masks.items()}
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        out: List[Optional[Dict[str, float]]] = [None]
        if not distributed or dist.get_rank() == 0:
            out[0] = _metrics_with_subsets(logits, labels, masks)
        if distributed:
            dist.broadcast_object_list(out, src=0, group=host_group())
        return out[0]


def _metrics_with_subsets(logits: torch.Tensor, labels: torch.Tensor,
                          masks: Mapping[str, torch.Tensor]) -> Dict[str, float]:
    """:func:`binary_metrics` of (N,) ``logits`` and ``labels``, and of each subset's (N,) bool mask as
    ``"{name}/{metric}"``."""
    probabilities = torch.sigmoid(logits.double())
    out = binary_metrics(probabilities, labels, logits)
    for name, mask in masks.items():
        for metric, value in binary_metrics(probabilities[mask], labels[mask], logits[mask]).items():
            out[f"{name}/{metric}"] = value
    return out
