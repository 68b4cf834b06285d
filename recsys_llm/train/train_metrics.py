"""Windowed training metrics from torchrec's metric stack: AUC, NE, calibration and click rate of the last N samples.

``train.metrics_window`` > 0 turns them on: :func:`~recsys_llm.train.pipeline.train_epoch` hands every
step's logits and labels to a torchrec ``RecMetricModule`` (built by ``generate_metric_module`` from a
``MetricsConfig`` of one ``RecTaskInfo``, with ``RecMetricDef(window_size=train.metrics_window)`` for
torchrec's ``AUCMetric``, ``NEMetric`` and ``CalibrationMetric``), and every ``train.metrics_every`` global
steps the window's metrics are computed over all ranks (torchrec's states, all-gathered / summed by
torchmetrics' sync) and shown on the progress bar and written to ``metrics.jsonl``.

The window is torchrec's: ``train.metrics_window`` samples over all ranks, each rank keeping its last
``ceil(window / world_size)`` (at least one batch). AUC keeps exactly those samples; NE and calibration keep
whole batches (those that fit), so a window that is a multiple of ``data.batch_size`` x ranks makes the three
cover the same rows. Predictions are ``sigmoid(logits)``; weights are the batch's ``label_weight`` extra
where it has one (0 for the label-free rows of swapped pairs), else ones. torchrec's AUC ranks by the float32
probability and orders ties as the sort leaves them (not counted half as :mod:`recsys_llm.train.metrics`
does); held-out metrics stay exact there.

Why not ``RecMetricModule.compute()``: with torchmetrics 1.9.0 (what ``scripts/install.sh``'s ``torchmetrics>=1.0.3``
installed beside torchrec 1.8.0, which itself asks for 1.0.3), torchmetrics' compute wrapper squeezes the result
through lightning-utilities' ``apply_to_collection``, which refuses torchrec's frozen ``MetricComputationReport``
(``ValueError: A frozen dataclass was passed to `apply_to_collection` but this is not allowed.``; torchmetrics 1.0.3
has an ``apply_to_collection`` of its own that passes it through). :func:`window_values` does what that wrapper does
(torchmetrics' ``sync_context`` around each computation's own ``_compute``) without the squeeze: the same numbers
as ``RecMetricModule.compute()`` under torchmetrics 1.0.3, on 1 and 2 gloo ranks.

Example::

    metrics = WindowedTrainMetrics(window=40_960, every=50, batch_size=1024, world_size=2, rank=0,
                                   device=torch.device("cpu"))
    for logits, labels in steps:              # (B,) each
        values = metrics.update(logits, labels)
        if values is not None:                # every 50 steps, on every rank (collective)
            print(values["auc"], values["ne"], values["calibration"])
"""

import math
from typing import Dict, Optional

import torch
from torchrec.metrics.metric_module import RecMetricModule, generate_metric_module
from torchrec.metrics.metrics_config import MetricsConfig, RecMetricDef, RecMetricEnum, RecTaskInfo
from torchrec.metrics.metrics_namespace import MetricPrefix

from recsys_llm.typed_config import ConfigError

TASK = RecTaskInfo(name="train", label_name="label", prediction_name="prediction", weight_name="weight")
WINDOW_METRICS = (RecMetricEnum.AUC, RecMetricEnum.NE, RecMetricEnum.CALIBRATION, RecMetricEnum.CTR)


def check_window(window: int, batch_size: int, world_size: int) -> None:
    """Raises unless each rank's share of ``train.metrics_window`` holds one batch (torchrec's condition).

    Args:
        window (int): ``train.metrics_window``, samples over all ranks.
        batch_size (int): rows of one rank's training batch (twice ``data.batch_size`` with swapped pairs).
        world_size (int): ranks.

    Raises:
        ConfigError: naming ``train.metrics_window`` and the least value that fits.
    """
    if -(-window // world_size) < batch_size:
        raise ConfigError(f"train.metrics_window={window} is less than one training batch on each of {world_size} "
                         f"rank(s) ({batch_size} rows per rank): torchrec's window must hold one; use at least "
                         f"{batch_size * world_size} samples, or 0 for no windowed training metrics")


def window_values(module: RecMetricModule) -> Dict[str, float]:
    """The window's metrics of ``module`` over all ranks (collective): torchrec's states synced by torchmetrics,
    its formulas; the local states are restored after.

    Returns:
        Dict[str, float]: ``auc``, ``ne``, ``calibration``, ``ctr`` (one task).
    """
    values: Dict[str, float] = {}
    for metric in module.rec_metrics.rec_metrics:
        for computation in metric._metrics_computations:  # noqa: SLF001 (unfused: one per task, here one)
            computation.pre_compute()
            with computation.sync_context(dist_sync_fn=computation.dist_sync_fn, should_sync=True,
                                          should_unsync=True):
                reports = computation._compute()  # noqa: SLF001 (compute() without torchmetrics' squeeze)
            for report in reports:
                if report.metric_prefix == MetricPrefix.WINDOW:
                    values[str(report.name)] = float(report.value.reshape(-1)[0])
    return values


class WindowedTrainMetrics:
    """torchrec's windowed AUC / NE / calibration of the training stream, computed every ``every`` steps.

    Args:
        window (int): samples over all ranks (``train.metrics_window``; at least ``batch_size`` x ``world_size``).
        every (int): compute every this many steps, counted as ``start_step`` + updates (``train.metrics_every``).
        batch_size (int): rows of one rank's training batch.
        world_size (int): ranks (each keeps ``ceil(window / world_size)`` samples).
        rank (int): this rank.
        device (torch.device): where the states live (the logits' device).
        start_step (int): steps taken before the first update (the resumed global step), so the computes fall
            on the global steps that are multiples of ``every``; ``steps`` may be set later instead.
    """

    def __init__(self, window: int, every: int, batch_size: int, world_size: int, rank: int, device: torch.device,
                 start_step: int = 0) -> None:
        check_window(window, batch_size, world_size)
        if every < 1:
            raise ConfigError(f"train.metrics_every={every} (must be >= 1 step)")
        config = MetricsConfig(
            rec_tasks=[TASK],
            rec_metrics={name: RecMetricDef(rec_task_indices=[0], window_size=window) for name in WINDOW_METRICS},
            compute_on_all_ranks=True,  # every rank gets the numbers (and every rank takes part in the sync)
            compute_interval_steps=every,
        )
        self._module = generate_metric_module(RecMetricModule, config, batch_size=batch_size, world_size=world_size,
                                              my_rank=rank, state_metrics_mapping={}, device=device)
        self._every = every
        self.steps = start_step
        self.computed: Optional[Dict[str, float]] = None  # the last update's values, when it computed

    def update(self, logits: torch.Tensor, labels: torch.Tensor,
               weights: Optional[torch.Tensor] = None) -> Optional[Dict[str, float]]:
        """Adds one step's rows; at every ``every``-th step computes the window over all ranks (collective:
        every rank updates alike). No host sync otherwise.

        Args:
            logits (torch.Tensor): (B,) logits.
            labels (torch.Tensor): (B,) 0/1 labels (any dtype).
            weights (Optional[torch.Tensor]): (B,) row weights (0: not counted); None: ones.

        Returns:
            Optional[Dict[str, float]]: ``auc``, ``ne``, ``calibration`` and ``ctr`` (its click rate) of the window at
            a computing step, else None; a window of one class (``ctr`` 0 or 1) has no AUC or NE (NaN), and one
            without a click no calibration (NaN).
        """
        predictions = torch.sigmoid(logits.detach().reshape(-1).float())  # (B,)
        labels = labels.detach().reshape(-1).float()  # (B,)
        weights = torch.ones_like(labels) if weights is None else weights.detach().reshape(-1).float()  # (B,)
        self._module.update({TASK.prediction_name: predictions, TASK.label_name: labels, TASK.weight_name: weights})
        self.steps += 1
        self.computed = window_values(self._module) if self.steps % self._every == 0 else None
        if self.computed is not None and self.computed["ctr"] in (0.0, 1.0):
            # one class: torchrec gives AUC 0.5 and an NE of ~1e12 (its entropy term is 0), held-out metrics NaN
            self.computed.update(auc=math.nan, ne=math.nan)
        if self.computed is not None and self.computed["ctr"] == 0.0:
            # no click to divide by: torchrec gives 0.0 (as if nothing were predicted), held-out metrics NaN
            self.computed["calibration"] = math.nan
        return self.computed
