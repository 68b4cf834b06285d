"""CTR metrics over all ranks: exact AUC, LogLoss, NE, calibration, also per subset (e.g. cold items).

Each rank keeps its own predictions and labels; ``compute()`` gathers them on rank 0 (sizes
may differ per rank), which computes the numbers from the full set and sends them to every rank:

* AUC: the Mann-Whitney statistic of the logits over all samples (exact, ties counted half;
  ranked by logit, as probabilities of logits beyond ~37 all round to 1.0 and would tie);
* LogLoss: mean binary cross-entropy in nats, ``-mean(y log p + (1 - y) log(1 - p))``, computed from the
  logits (``softplus(l) - y l``, for a 0/1 label ``softplus(-l)`` or ``softplus(l)``: exact for every logit, an
  infinite one too (0 on its correct side, inf on its wrong one), as the training loss's BCE-with-logits; no clamp);
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
import torch.nn.functional as F
from torchmetrics.utilities.distributed import gather_all_tensors
from torchrec.metrics.ne import compute_ne

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
    probabilities: torch.Tensor, labels: torch.Tensor, logits: Optional[torch.Tensor] = None,
) -> Dict[str, float]:
    """AUC, LogLoss, NE, sample count and mean label of one set.

    Args:
        probabilities (torch.Tensor): (N,) click probabilities.
        labels (torch.Tensor): (N,) 0/1 labels.
        logits (Optional[torch.Tensor]): (N,) the logits of the probabilities: the AUC ranks by them (they keep
            apart probabilities that round to 1.0), and LogLoss and NE's cross-entropy come from them exactly,
            ``softplus(l) - y l`` (the BCE-with-logits of the training loss) for every logit; None: from the
            probabilities, clamped to [1e-12, 1 - 1e-12] (a row's cross-entropy capped at 27.6 nats).

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
    auc = math.nan if one_class else _auc(probabilities if logits is None else logits, labels)
    calibration = float(probabilities.sum() / positives) if positives > 0 else math.nan
    # the summed cross-entropy -(y log p + (1 - y) log(1 - p)) in nats, its terms computed in place: a (N,) float64
    # copy less at a time
    if logits is not None:
        # softplus(l) - y l, written softplus(-l) + (1 - y) l where y > 1/2 and softplus(l) - y l elsewhere: for
        # 0/1 labels each row is a softplus alone, exact for every logit (the correct side of a confident logit
        # keeps its e^-|l|, and an infinite logit, an fp16 overflow, gives 0 or inf rather than inf - inf = NaN)
        x = logits.double()
        upper = labels > 0.5
        terms = F.softplus(torch.where(upper, -x, x), threshold=40.0)  # softplus is x itself past 40
        residual = torch.where(upper, 1.0 - labels, labels)  # 0 for 0/1 labels
        if bool(residual.any()):
            terms.add_(residual.mul_(torch.where(upper, x, -x)))
        del upper, residual
        cross_entropy = terms.sum()
        del terms
    else:
        p = probabilities.clamp(_ETA, 1.0 - _ETA)
        log_q = torch.sub(1.0, p).log_().mul_(torch.sub(1.0, labels))
        cross_entropy = -p.log_().mul_(labels).add_(log_q).sum()
    # torchrec's NE, whose cross-entropy is in bits
    ne = math.nan if one_class else float(compute_ne(cross_entropy / math.log(2.0), labels.new_tensor(float(n)),
                                                     positives, n - positives, _ETA))
    return {"auc": auc, "logloss": float(cross_entropy / n), "ne": ne, "num_samples": float(n),
            "ctr": float(positives / n), "calibration": calibration}


def _auc(scores: torch.Tensor, labels: torch.Tensor) -> float:
    """Exact AUC of a set holding both classes: P(score of a positive > score of a negative), ties
    counted half, from the positives' mean ranks (float64 (N,) 0/1 labels; exact in float64 up to ~10^8 rows:
    the ranks are halves of integers, whose sums are exact below 2^53). Each (N,) temporary is freed as soon
    as it is used: a split of 10^8 rows holds several. NaN when a score is NaN (argsort would rank it above
    every other, and the AUC would look finite), as LogLoss and NE are then."""
    if bool(scores.isnan().any()):
        return math.nan
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


class CTRMetrics:
    """Accumulates (logit, label) pairs on each rank; ``compute`` reduces over all ranks.

    Args:
        subsets (Optional[Mapping[str, str]]): subset name -> ``Batch.extras`` key of a (B,)
            0/1 mask; metrics of the masked samples are reported as ``"{name}/{metric}"``.
            A mask missing from a batch is an error (the data lacks that column), and so is, at ``compute``,
            a mask value other than 0 and 1 (a -1 or 2 would otherwise count as in the subset).
    """

    def __init__(self, subsets: Optional[Mapping[str, str]] = None) -> None:
        if subsets is not None and not isinstance(subsets, Mapping):  # a list of keys failed in dict()
            raise TypeError(f"CTRMetrics: subsets must be a mapping of subset name -> extras key of its 0/1 mask "
                            f"(e.g. {{'cold': 'is_cold_item'}}), got {subsets!r}")
        self._subsets: Dict[str, str] = dict(subsets or {})
        self.reset()

    @property
    def extra_keys(self) -> List[str]:
        """The ``Batch.extras`` keys :meth:`update` reads (the subsets' masks): the pipelined evaluation
        (:func:`~recsys_llm.train.eval_forwards.pipelined_forwards`) copies only these to the device for it. A
        subclass whose ``update`` reads other extras names them here too."""
        return list(self._subsets.values())

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
            marker = extras[key].detach().reshape(-1)
            # 1: in the subset, 0: not, 2: any other value (refused at compute, on every rank: no host sync here)
            self._masks[name].append(torch.where((marker == 0) | (marker == 1), marker, 2).to(torch.uint8))

    def compute(self) -> Dict[str, float]:
        """Metrics over every sample seen by every rank (a collective: call on all ranks; rank 0 computes them)."""
        logits = _gather_variable_to_rank_0(torch.cat(self._logits) if self._logits else torch.zeros(0)).cpu()
        labels = _gather_variable_to_rank_0(torch.cat(self._labels) if self._labels else torch.zeros(0)).cpu()
        markers = {name: _gather_variable_to_rank_0(torch.cat(parts) if parts
                                                    else torch.zeros(0, dtype=torch.uint8)).cpu()
                   for name, parts in self._masks.items()}
        distributed = dist.is_initialized() and dist.get_world_size() > 1
        out: List[Optional[Dict[str, float]]] = [None]
        if not distributed or dist.get_rank() == 0:
            other = [self._subsets[name] for name, marker in markers.items() if bool((marker == 2).any())]
            if other:  # told to every rank below, so that all of them raise (none waits in a collective)
                out[0] = {"error": f"metric subset column(s) {other} hold values other than 0/1; a subset's column "
                                   "marks its rows with 1 and the others with 0"}
            else:
                out[0] = _metrics_with_subsets(logits, labels, {name: marker == 1 for name, marker in markers.items()})
        if distributed:
            dist.broadcast_object_list(out, src=0, group=host_group())
        if "error" in out[0]:
            raise ValueError(out[0]["error"])
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
