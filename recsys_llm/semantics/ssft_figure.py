"""The picture of an SSFT run: each field's held-out retrieval accuracy before and after tuning.

``semantics tune`` writes it beside ``metrics.json``::

    output_dir/field_retrieval.png   one pair of bars per field (before, after), the chance line

Example::

    path = plot_field_retrieval(metrics, "runs/ssft/field_retrieval.png")  # None without matplotlib or values
"""

from typing import Any, Dict, Optional

from recsys_llm.atomic_dir import save_figure_atomically

FIGURE_FILE = "field_retrieval.png"


def plot_field_retrieval(metrics: Dict[str, Any], path: str) -> Optional[str]:
    """Writes ``path`` (atomically) from SSFT's metrics (``SSFTTrainer.run``'s ``before`` and ``after``).

    Returns:
        Optional[str]: the path, or None when matplotlib is not installed or no held-out value was scored.
    """
    before, after = metrics["before"].get("per_field") or {}, metrics["after"].get("per_field") or {}
    fields = [name for name in metrics["fields"] if name in after]
    if not fields:
        return None
    try:  # a Figure of its own, not pyplot: the calling program's backend and figures are left alone
        from matplotlib.figure import Figure
    except ImportError:
        return None
    figure = Figure(figsize=(max(6.0, 0.55 * len(fields) + 2.0), 4.2))
    axis = figure.subplots()
    positions = range(len(fields))
    width = 0.4
    for offset, (label, scores, color) in enumerate(
            (("before tuning", before, "tab:gray"), ("after tuning", after, "tab:blue"))):
        axis.bar([p + (offset - 0.5) * width for p in positions], [scores.get(name, 0.0) for name in fields],
                 width, label=f"{label}: {metrics[label.split()[0]]['accuracy']:.3f} overall", color=color)
    axis.axhline(metrics["after"]["chance"], color="tab:red", linestyle="--", linewidth=1,
                 label=f"chance (1 / {len(metrics['fields'])} fields)")
    axis.set_xticks(list(positions), fields, rotation=45, ha="right", fontsize=8)
    # room above 1 for the legend
    axis.set(ylim=(0, 1.5), yticks=[0, 0.2, 0.4, 0.6, 0.8, 1.0], ylabel="held-out field retrieval accuracy")
    axis.set_title(f"SSFT: the field each of {metrics['num_valid']} held-out prompts retrieves", fontsize=10)
    axis.legend(fontsize=8, loc="upper right")
    axis.grid(alpha=0.3, axis="y")
    figure.tight_layout()
    save_figure_atomically(figure, path, dpi=100)
    return path
