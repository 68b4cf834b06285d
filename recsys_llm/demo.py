"""``recsys-llm demo``: the main job end to end on the embedded synthetic data.

1. generates the data when it is missing (click probability driven by the semantic match
   of user interests and item text; 10% of items never occur in training);
2. trains plain DeepFM (sharded EBCs, pipelined training, early stopping);
3. LLaCTR: encodes one vector per field with the offline LLM (``semantics encode``) and
   trains DeepFM + FRE + FIE (an ``llactr:`` config section);
4. ELEC: adapts the LLM to clicks on a sample of rows (``semantics adapt``), exports one
   vector per user (profile text) and per item (title and description) with
   ``semantics export --granularity entity --output pooled`` and trains the gain network that reads them
   from frozen, sharded tables (an ``elec:`` config section with ``entity_tables``);
5. ELEC's servable student: plain DeepFM distilled from the trained gain network (frozen,
   ``export --state-only``) on the training rows and on as many label-free (user, item)
   pairs, each batch's users with items drawn from the data's item catalogue, cold items
   included (``elec.distill.swap_fields`` / ``swap_catalog``); it serves without any LLM vector;
6. prints AUC / LogLoss overall and on cold items, and writes ``demo_results.{json,png}``.

Every step is skipped when its output already exists, so a second ``make demo`` only
retrains what is missing. Each LLM step prints the equivalent command line.
"""

import json
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence

from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS
from recsys_llm.train.config import load_config
from recsys_llm.train.runner import finished_results, run_training, set_cpu_float_mode

PLAIN = "DeepFM"
LLACTR = "DeepFM + LLaCTR (FRE + FIE)"
ELEC = "DeepFM + ELEC gain (user + item LLM vectors)"
STUDENT = "DeepFM ELEC student (no LLM at serving)"


def _cli(argv: List[str]) -> None:
    from recsys_llm.cli import main as cli_main

    print("$ recsys-llm " + " ".join(argv), flush=True)
    code = cli_main(argv)
    if code:
        raise RuntimeError(f"recsys-llm {' '.join(argv)} exited with {code}")


def _train(config_path: str, overrides: Sequence[str], run_dir: str) -> Dict[str, Any]:
    finished = finished_results(run_dir)
    if finished is not None:
        return finished
    return run_training(load_config(config_path, list(overrides) + [f"train.run_dir={run_dir}"]))


def run_demo(
    config_path: str,
    data_dir: str,
    run_root: str,
    rows: int,
    overrides: Sequence[str] = (),
    llm: Optional[str] = None,
    with_llm: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Trains the demo's variants; returns ``{variant: results of run_training}``.

    Args:
        config_path (str): the DeepFM config (``configs/synthetic_deepfm.yaml``).
        data_dir (str): where the synthetic data lives or is generated.
        run_root (str): one run directory per variant, plus ``llm/`` for the LLM outputs.
        rows (int): rows to generate when the data is missing.
        overrides (Sequence[str]): config overrides applied to every variant.
        llm (Optional[str]): local Hugging Face model directory (default: offline MiniLM).
        with_llm (bool): False trains the plain model only.
    """
    schema = os.path.join(data_dir, "schema.json")
    base = [f"data.schema={schema}", f"data.synthetic_rows={rows}", *overrides]
    # before the LLM steps: a finished plain run would otherwise leave the first training after them
    set_cpu_float_mode(load_config(config_path, base).train)
    results = {PLAIN: _train(config_path, base, os.path.join(run_root, "plain"))}
    if not with_llm:
        return results
    llm_dir = os.path.join(run_root, "llm")
    model_args = ["--model", llm] if llm else []

    field_vectors = os.path.join(llm_dir, "field_vectors.safetensors")
    if not os.path.exists(field_vectors):
        _cli(["semantics", "encode", "--schema", schema, "--output", field_vectors, *model_args])
    results[LLACTR] = _train(config_path, base + [
        f"llactr.vectors_path={field_vectors}", "llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1",
    ], os.path.join(run_root, "llactr"))

    adapted = os.path.join(llm_dir, "ctr_llm")
    if not os.path.exists(os.path.join(adapted, "provenance.json")):
        _cli(["semantics", "adapt", "--schema", schema, "--output-dir", adapted, "--sample-rows", "2000",
              "--representation-dim", "64", "--max-length", "96", *model_args])
    from recsys_llm.semantics.vector_export import vector_dim

    entity_overrides = []
    for entity, text_fields in (("user_id", ["user_id"]), ("item_id", ["item_id", "item_category"])):
        vectors = os.path.join(llm_dir, f"{entity.split('_')[0]}_vectors")  # resumes; finished chunks are kept
        # pooled states of the tuned LLM: r of an LLM tuned on 2,000 rows has lost most of the text's meaning
        _cli(["semantics", "export", "--schema", schema, "--llm", adapted, "--output-dir", vectors,
              "--granularity", "entity", "--entity-field", entity, "--entity-fields", *text_fields,
              "--output", "pooled"])
        entity_overrides.append(f"elec.entity_tables.{entity}={vectors}")
    vector_overrides = ["elec.vector_source=entity_table", f"elec.vector_dim={vector_dim(vectors)}", *entity_overrides]
    gain_dir = os.path.join(run_root, "elec_gain")
    results[ELEC] = _train(config_path, base + ["elec.task=gain", *vector_overrides], gain_dir)

    teacher = os.path.join(llm_dir, "gain_state")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        _cli(["export", "--state-only", "--config", os.path.join(gain_dir, "config.yaml"), "--checkpoint", gain_dir,
              "--output", teacher])
    catalog = os.path.join(data_dir, ITEM_CATALOG)
    if not os.path.exists(catalog):
        print(f"note: {catalog} not found (data generated by an older version): the ELEC student pairs users with the "
              "items of other rows of its batches instead; delete the data directory to generate it again", flush=True)
    results[STUDENT] = _train(config_path, base + [
        "elec.task=distill", *vector_overrides, "elec.distill.mode=frozen", f"elec.teacher_checkpoint={teacher}",
        "elec.distill.alpha=20", "elec.distill.beta=0", f"elec.distill.swap_fields=[{','.join(ITEM_FIELDS)}]",
        *([f"elec.distill.swap_catalog={catalog}"] if os.path.exists(catalog) else []),
    ], os.path.join(run_root, "elec_student"))
    return results


def comparison_table(results: Dict[str, Dict[str, Any]]) -> str:
    """Variants x (AUC, LogLoss) on all test rows and on cold-item rows, with AUC gain vs plain."""
    header = ["variant", "AUC", "AUC cold", "LogLoss", "LogLoss cold", "AUC gain", "AUC gain cold"]
    plain = results[PLAIN]["test"]
    rows = [header]
    for name, result in results.items():
        test = result["test"]
        gain = lambda key: f"{100 * (test[key] / plain[key] - 1):+.2f}%"  # noqa: E731
        rows.append([name, f"{test['auc']:.4f}", f"{test.get('cold/auc', float('nan')):.4f}", f"{test['logloss']:.4f}",
                     f"{test.get('cold/logloss', float('nan')):.4f}", gain("auc"),
                     gain("cold/auc") if "cold/auc" in test else "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def tick_label(name: str, width: int = 20) -> str:
    """``name`` as a plot's x-tick label: a line break before its first " + ", then lines of at
    most ``width`` characters, so a long name does not run into its neighbour's."""
    return "\n".join(line for part in name.replace(" + ", "\n+ ", 1).split("\n")
                     for line in textwrap.wrap(part, width))


def write_outputs(results: Dict[str, Dict[str, Any]], run_root: str) -> List[str]:
    """``demo_results.json`` and, with matplotlib installed, ``demo_results.png``."""
    os.makedirs(run_root, exist_ok=True)
    table = {name: {k: v for k, v in r["test"].items()} for name, r in results.items()}
    json_path = os.path.join(run_root, "demo_results.json")
    with open(json_path, "w", encoding="utf-8") as handle:
        json.dump(table, handle, indent=2, sort_keys=True, default=float)
    written = [json_path]
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return written
    names = list(table)
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.38
    for offset, key, label in ((-width / 2, "auc", "all test rows"), (width / 2, "cold/auc", "cold items")):
        values = [table[n].get(key, float("nan")) for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), [tick_label(n) for n in names], fontsize=8)
    low = min(v for n in names for v in (table[n]["auc"], table[n].get("cold/auc", 1.0)))
    ax.set_ylim(max(0.0, low - 0.05), None)
    ax.set_ylabel("test AUC")
    ax.set_title("Embedded synthetic data: plain vs LLM-enhanced DeepFM")
    ax.legend()
    fig.tight_layout()
    png_path = os.path.join(run_root, "demo_results.png")
    fig.savefig(png_path, dpi=120)
    plt.close(fig)
    return written + [png_path]
