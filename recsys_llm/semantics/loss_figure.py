"""The picture of a CTR-adapted LLM's tuning: its BCE per step and per epoch.

``semantics adapt`` writes it into the adapted LLM's directory::

    tuning_loss.png   BCE of every step (thin), its running mean over about a tenth of the steps, each epoch's mean

Example::

    plot_tuning_loss(losses, steps_per_epoch=32, path="runs/ctr_llm/tuning_loss.png")
"""

from typing import Optional, Sequence

import numpy as np

from recsys_llm.atomic_dir import save_figure_atomically

LOSS_FIGURE_FILE = "tuning_loss.png"


def plot_tuning_loss(losses: Sequence[float], steps_per_epoch: int, path: str) -> Optional[str]:
    """Writes ``path`` (atomically) from the tuning's per-step losses.

    Args:
        losses (Sequence[float]): the BCE of each step, in order.
        steps_per_epoch (int): steps of one epoch (the last epoch may have fewer).
        path (str): the image file.

    Returns:
        Optional[str]: the path, or None when matplotlib is not installed or no step was taken.
    """
    if not losses:
        return None
    try:  # a Figure of its own, not pyplot: the calling program's backend and figures are left alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    values = np.asarray(losses, dtype=np.float64)
    steps = np.arange(1, len(values) + 1)
    window = max(1, len(values) // 10)
    running = np.convolve(values, np.ones(window) / window, mode="valid")  # (N - window + 1,)
    figure = Figure(figsize=(7, 3.8))
    axis = figure.subplots()
    if window > 1:
        axis.plot(steps, values, color="tab:blue", linewidth=0.5, alpha=0.4, label="BCE of a step")
        axis.plot(steps[window - 1:], running, color="tab:blue", linewidth=1.5, label=f"mean of {window} steps")
    else:  # under 20 steps: each step's own
        axis.plot(steps, values, color="tab:blue", linewidth=1, marker=".", label="BCE of a step")
    epochs = [values[start:start + steps_per_epoch] for start in range(0, len(values), max(1, steps_per_epoch))]
    ends = np.cumsum([len(epoch) for epoch in epochs])
    axis.plot(ends, [epoch.mean() for epoch in epochs], "o", color="tab:orange", label="epoch mean")
    axis.set(xlabel="step", ylabel="BCE on clicks", title="semantics adapt: the CTR-adapted LLM's tuning loss")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=100)
    return path
