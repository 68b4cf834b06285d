"""The picture of a run: training loss and validation AUC against the global step.

Drawn from the records of ``metrics.jsonl`` that stand (``run_records.read_metrics``: a resumed
job's repeated steps replace the interrupted job's), so a run resumed any number of times gives
one curve (the checkpoint carries the loss sums, so an epoch resumed mid-way and the first 50-step
record after the resume have the uninterrupted run's mean loss: ``train/loss_sums.py``); each resume is a
dotted line on both panels. A step whose value is null / NaN / inf (a diverged loss, a one-class validation) is a
gap in its line, crossed at the foot of the panel; a loss panel whose values span 20x or more is on a log scale; the
title names the model and the data set of the run's ``config.yaml``.
``run_training`` writes it at the end of every run, beside ``results.json``::

    run_dir/training_curves.png   left: loss (the mean of every 50 steps, and each epoch's mean, over the ranks)
                                  and validation LogLoss;
                                  right: validation AUC per evaluation (best marked), test AUC, and
                                  with train.metrics_window the windowed training AUC

Example::

    path = plot_training_curves("runs/deepfm")  # None without matplotlib or without a record
"""

import math
import os
from typing import Any, Dict, List, Optional, Tuple

import yaml

from recsys_llm.atomic_dir import save_figure_atomically
from recsys_llm.train.run_records import RESUMED_EVENT, TRAIN_WINDOW_EVENT, read_metrics

CURVES_FILE = "training_curves.png"

Curve = Tuple[List[int], List[float]]  # (global steps, values)


_WANTED = {"loss": ("train", "loss"), "epoch loss": ("epoch", "mean_loss"), "valid logloss": ("valid", "logloss"),
           "valid auc": ("valid", "auc"), "train window auc": (TRAIN_WINDOW_EVENT, "auc")}
LOG_SCALE_SPAN = 20.0  # a loss panel whose values span this factor or more is drawn on a log scale


def training_curves(records: List[Dict[str, Any]]) -> Dict[str, Curve]:
    """The curves of ``metrics.jsonl`` records: ``loss`` (``train`` events), ``epoch loss``
    (``epoch`` events' mean loss, at the epoch's last step), ``valid logloss``, ``valid auc`` and ``train window
    auc`` (``train_window`` events: ``train.metrics_window``); an empty curve is left out."""
    curves: Dict[str, Curve] = {}
    for name, (event, key) in _WANTED.items():
        points = [(r["global_step"], r[key]) for r in records
                  if r.get("event") == event and _finite(r.get(key)) and "global_step" in r]
        if points:
            curves[name] = ([step for step, _ in points], [float(value) for _, value in points])
    return curves


def non_finite_steps(records: List[Dict[str, Any]]) -> Dict[str, List[int]]:
    """Per curve of :func:`training_curves`, the steps whose record holds the value as null / NaN / inf (a diverged
    loss, a validation split of one class): drawn as gaps in the line and marked, not bridged by a straight line."""
    steps: Dict[str, List[int]] = {}
    for name, (event, key) in _WANTED.items():
        found = sorted({r["global_step"] for r in records if r.get("event") == event and key in r
                        and "global_step" in r and not _finite(r.get(key)) and not isinstance(r.get(key), bool)})
        if found:
            steps[name] = found
    return steps


def _with_gaps(curve: Curve, gaps: List[int]) -> Curve:
    """``curve`` with a NaN at each step of ``gaps`` (matplotlib breaks a line at a NaN)."""
    points = dict(zip(*curve))
    points.update({step: float("nan") for step in gaps if step not in points})
    steps = sorted(points)
    return steps, [points[step] for step in steps]


def _run_title(run_dir: str) -> str:
    """The run directory's name, with the model and the data set its ``config.yaml`` names (when it can be read)."""
    name = os.path.basename(os.path.abspath(run_dir))
    try:
        with open(os.path.join(run_dir, "config.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle) or {}
        model = (config.get("model") or {}).get("name")
        schema = (config.get("data") or {}).get("schema")
    except (OSError, ValueError, AttributeError, yaml.YAMLError):
        return name
    data = os.path.basename(os.path.dirname(os.path.abspath(schema))) if isinstance(schema, str) and schema else None
    what = " on ".join(str(part) for part in (model, data) if part)
    return f"{name}: {what}" if what else name


def _finite(value: Any) -> bool:
    """A number to draw: not null, not NaN / inf (a file written before NaN became null, or edited by hand: a NaN
    best AUC drew no star, labelled "best nan"), not a bool."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


MAX_MARKERS = 40  # per curve: 200 epochs' markers would hide the 50-step loss line beneath them


def _marks(steps: List[int]) -> int:
    """``markevery`` for a curve of these points: every point up to ``MAX_MARKERS`` of them, else evenly thinned (the
    line still goes through every point)."""
    return max(1, -(-len(steps) // MAX_MARKERS))


def plot_training_curves(run_dir: str) -> Optional[str]:
    """Writes ``run_dir/training_curves.png`` (atomically) from the run's ``metrics.jsonl``.

    Returns:
        Optional[str]: the path, or None when matplotlib is not installed or nothing was logged.
    """
    records = read_metrics(run_dir)
    curves = training_curves(records)
    if not curves:
        return None
    try:  # a Figure of its own, not pyplot: the calling program's backend and figures are left alone
        from matplotlib.figure import Figure
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        return None
    test_auc = next((r["auc"] for r in reversed(records)
                     if r.get("event") == "test" and _finite(r.get("auc"))), None)
    gaps = non_finite_steps(records)
    drawn = {name: _with_gaps(curve, gaps.get(name, [])) for name, curve in curves.items()}
    figure = Figure(figsize=(10, 4.6))
    # one step axis for both panels: an AUC panel with no validation point spans the run's steps, not 0 to 1
    loss_axis, auc_axis = figure.subplots(1, 2, sharex=True)
    if "loss" in curves:  # a line through one point draws nothing: a run of 50 to 99 steps has one
        loss_axis.plot(*drawn["loss"], color="tab:blue", linewidth=1,
                       label="training loss, mean of 50 steps (BCE + loss terms)",
                       marker="." if len(curves["loss"][0]) == 1 else None, zorder=3)  # over the epoch means
    if "epoch loss" in curves:
        steps, losses = drawn["epoch loss"]
        thinned = _marks(steps) > 1  # markers alone, thinned, would leave epochs out: a line through them all
        loss_axis.plot(steps, losses, "o-" if thinned else "o", color="tab:orange", label="epoch mean loss",
                       markevery=_marks(steps), markersize=4 if thinned else 6, linewidth=1)
    if "valid logloss" in curves:  # beside the training loss: a gap that opens shows overfitting
        loss_axis.plot(*drawn["valid logloss"], "s--", color="tab:green", label="validation LogLoss",
                       markevery=_marks(curves["valid logloss"][0]))
    loss_values = [value for name in ("loss", "epoch loss", "valid logloss") for value in curves.get(name, ([], []))[1]]
    log_loss = bool(loss_values) and min(loss_values) > 0 and max(loss_values) >= LOG_SCALE_SPAN * min(loss_values)
    if log_loss:  # a spike or a KD term 20x the LogLoss flattened every other curve to a line along the bottom
        loss_axis.set_yscale("log")
    loss_axis.set(xlabel="global step", ylabel="loss (log scale)" if log_loss else "loss", title="loss")
    if "train window auc" in curves:  # beside the validation AUC: a gap that opens shows overfitting
        steps, aucs = drawn["train window auc"]
        auc_axis.plot(steps, aucs, color="tab:blue", linewidth=1, label="training AUC, torchrec window",
                      marker="." if len(steps) == 1 else None)
    if "valid auc" in curves:
        steps, aucs = curves["valid auc"]
        auc_axis.plot(*drawn["valid auc"], "o-", color="tab:green", label="validation AUC", markevery=_marks(steps))
        best = max(range(len(aucs)), key=aucs.__getitem__)  # of the finite values
        auc_axis.plot(steps[best], aucs[best], "*", markersize=14, color="tab:red", label=f"best {aucs[best]:.4f}")
    if test_auc is not None:
        # the best validation AUC's model (best/); without a validation AUC the run tested its final model
        tested = "best model" if "valid auc" in curves else "final model"
        auc_axis.axhline(test_auc, linestyle="--", color="gray", label=f"test AUC {test_auc:.4f} ({tested})")
    if "valid auc" not in curves:  # say why the panel has no curve rather than leave it blank
        if test_auc is not None:  # the test line mid-panel, clear of the note above it
            auc_axis.set_ylim(test_auc - 0.1, test_auc + 0.1)
        auc_axis.text(0.5, 0.92, "no validation AUC\n(no validation split, or one with a single class)",
                      transform=auc_axis.transAxes, ha="center", va="top", fontsize=9, color="dimgray")
    for axis, names, what in ((loss_axis, ("loss", "epoch loss", "valid logloss"), "loss"),
                              (auc_axis, ("valid auc", "train window auc"), "AUC")):
        steps = sorted({step for name in names for step in gaps.get(name, [])})
        if steps:  # a gap in a line says nothing by itself: a cross at the foot of the panel names it
            axis.plot(steps, [0.02] * len(steps), "x", color="black", markersize=7,
                      transform=axis.get_xaxis_transform(), label=f"no finite {what} (NaN / inf / null)")
    resumes = sorted({r["global_step"] for r in records if r.get("event") == RESUMED_EVENT and r.get("global_step")})
    for index, step in enumerate(resumes):  # why a resumed epoch may show two validations or two epoch means
        for axis in (loss_axis, auc_axis):
            axis.axvline(step, linestyle=":", color="dimgray", linewidth=1,
                         label="resumed" if index == 0 and axis is loss_axis else None)
    auc_axis.set(xlabel="global step", ylabel="AUC", title="AUC")
    for axis in (loss_axis, auc_axis):
        if axis.get_legend_handles_labels()[0]:  # beneath the panel: inside it, it hid the curves' last points
            axis.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        axis.grid(alpha=0.3)
        # steps are whole: a one-step run drew ticks 0.96 .. 1.04
        axis.xaxis.set_major_locator(MaxNLocator(nbins="auto", steps=[1, 2, 2.5, 5, 10], integer=True))
    logged_steps = {step for xs, _ in drawn.values() for step in xs}  # a step with no finite value included
    if len(logged_steps) == 1:  # one step logged (train.max_steps=1): room either side of it, whole-step ticks
        (step,) = logged_steps
        loss_axis.set_xlim(step - 1, step + 1)
    figure.suptitle(_run_title(run_dir))
    figure.tight_layout()
    path = os.path.join(run_dir, CURVES_FILE)
    save_figure_atomically(figure, path, dpi=100)
    return path
