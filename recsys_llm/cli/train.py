"""``recsys-llm train | evaluate | demo``: sharded training runs driven by a config file.

* ``train --config X [section.key=value ...]``: one run (alone, or on every rank under
  ``torchrun --nproc_per_node N -m recsys_llm.cli train ...``); resumes from the run
  directory's latest checkpoint; prints the results on rank 0.
* ``evaluate --checkpoint C [--config X]``: metrics of a checkpoint (or run directory) on a split;
  the config defaults to the run's own ``config.yaml``.
* ``demo``: generates the embedded synthetic data if missing and trains DeepFM on it plain,
  with LLaCTR, with ELEC's gain network and as ELEC's student (``recsys_llm.demo``), exports the
  student and scores the test split with it as served, then prints the comparison.

Example::

    recsys-llm train --config configs/synthetic_deepfm.yaml train.epochs=1 data.batch_size=512
    recsys-llm evaluate --checkpoint runs/synthetic_deepfm
    recsys-llm demo
"""

import argparse
import json
import math
import os
import warnings
from typing import Any, Dict, List

from recsys_llm import PACKAGED_CONFIGS
from recsys_llm.cli.data import integer_at_least
from recsys_llm.cli.semantics import show_defaults

# the package's copy of configs/synthetic_deepfm.yaml (package data, so a non-editable install has it too)
DEMO_CONFIG = os.path.join(PACKAGED_CONFIGS, "synthetic_deepfm.yaml")


def _format_value(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return "-" if value is None else str(value)


def results_table(results: Dict[str, Any]) -> str:
    """A small text table: split/subset rows x AUC, LogLoss, NE, calibration, samples."""
    rows: List[List[str]] = [["set", "AUC", "LogLoss", "NE", "Calibration", "samples"]]
    test = results.get("test", {})
    for prefix, label in (("", "test (all)"), ("cold/", "test (cold items)")):
        if f"{prefix}auc" in test:
            metrics = ("auc", "logloss", "ne", "calibration")  # calibration: '-' in results saved before it
            rows.append([label] + [_format_value(test.get(f"{prefix}{m}")) for m in metrics]
                        + [_format_value(int(test.get(f"{prefix}num_samples", 0)))])
    if results.get("valid", {}).get("auc") is not None:
        rows.append(["valid (best)", _format_value(results["valid"]["auc"]), "-", "-", "-", "-"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    if len(rows) == 1:  # a run without valid and test splits (a day's data, prepared --like, to train on)
        lines = ["no valid or test split: evaluate the run on another split with `recsys-llm evaluate --split`"]
    throughput = results.get("samples_per_second")
    throughput = f"{throughput:,.0f}" if isinstance(throughput, float) and math.isfinite(throughput) else "-"
    precision = " (bf16 autocast)" if results.get("mixed_precision") == "bf16" else ""
    footer = (f"steps {results.get('global_step')}, epochs {results.get('epochs')}, ranks {results.get('world_size')}, "
              f"{throughput} samples/s{precision}, run dir {results.get('run_dir')} "
              "(results.json, training_curves.png)")
    return "\n".join(lines + [footer])


def _train(args: argparse.Namespace) -> int:
    from recsys_llm.env import check_versions
    from recsys_llm.train.config import load_config
    from recsys_llm.train.distributed import is_main_process, teardown_distributed
    from recsys_llm.train.runner import run_training

    config = load_config(args.config, args.overrides)
    if args.print_config:  # what config.yaml would hold; nothing is trained or written
        from recsys_llm.train.config import config_text

        print(config_text(config), end="")
        return 0
    check_versions()
    args.run_dir = config.train.run_dir  # named by an error of the disk it writes to (full, read-only)
    results = run_training(config)
    if is_main_process():
        print(results_table(results))
    teardown_distributed()
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    from recsys_llm.env import check_versions
    from recsys_llm.train.checkpoint import trained_run_config
    from recsys_llm.train.config import load_config
    from recsys_llm.train.distributed import is_main_process, teardown_distributed
    from recsys_llm.train.run_records import strict_json
    from recsys_llm.train.trained_run import run_evaluation

    check_versions()
    config = load_config(args.config or trained_run_config(args.checkpoint), args.overrides)
    results = run_evaluation(config, args.checkpoint, args.split, student=args.student)
    if is_main_process():
        from recsys_llm.train.runner import non_finite_logits_note

        note = non_finite_logits_note(results, "evaluated")
        if note is not None:  # null LogLoss / NE in the JSON, not without a word
            warnings.warn(note, stacklevel=1)
        print(json.dumps(strict_json(results), indent=2, sort_keys=True, default=float))  # NaN AUC: null
    teardown_distributed()
    return 0


def _demo(args: argparse.Namespace) -> int:
    from recsys_llm.demo import comparison_table, run_demo, write_outputs
    from recsys_llm.env import check_versions
    from recsys_llm.train.distributed import is_main_process, teardown_distributed

    check_versions(verbose=True)
    if args.no_llm and args.llm is not None:  # the LLM asked for would be ignored
        raise ValueError(f"--llm {args.llm} with --no-llm: --no-llm trains the plain DeepFM only, which reads no LLM; "
                         "pass one of them")
    if os.path.isdir(args.config):
        raise ValueError(f"--config {args.config}: a directory; expected the demo's YAML config file")
    if not os.path.isfile(args.config):
        raise FileNotFoundError(f"--config {args.config}: demo config not found")
    results = run_demo(args.config, args.data_dir, args.run_dir, args.rows, args.overrides, llm=args.llm,
                       with_llm=not args.no_llm)
    if is_main_process():
        written = write_outputs(results, args.run_dir)
        print("\nThe embedded synthetic data (cold items never occur in training):")
        print(comparison_table(results))
        print("results: " + ", ".join(written))
    teardown_distributed()
    return 0


# --config of a job on a trained run (evaluate, export, teacher-outputs)
RUN_CONFIG_HELP = ("the YAML config of the run (default: the run's own config.yaml; its relative paths are read from "
                   "the working directory, as in training)")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``train``, ``evaluate`` and ``demo``."""
    overrides_help = "config overrides section.key=value (value parsed as YAML), e.g. train.epochs=2"

    train = subparsers.add_parser("train", help="train a model from a config file (torchrun-ready)")
    train.add_argument("--config", required=True, help="YAML config (see configs/)")
    train.add_argument("--print-config", action="store_true",
                       help="print the effective config (overrides applied, every default filled in: what the run "
                            "directory's config.yaml would hold) as YAML and exit without training")
    train.add_argument("overrides", nargs="*", help=overrides_help)
    train.set_defaults(func=_train)

    evaluate = subparsers.add_parser("evaluate", help="evaluate a checkpoint on a split")
    evaluate.add_argument("--config", default=None, help=RUN_CONFIG_HELP)
    evaluate.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    evaluate.add_argument("--split", default=None,
                          help="split name, or a Parquet file or directory of the schema's columns (default: data.test_split)")
    evaluate.add_argument("--student", action="store_true",
                          help="of an ELEC distillation run: the student alone, as it serves (the split needs no LLM "
                               "vectors or teacher outputs; loss without the KD terms)")
    evaluate.add_argument("overrides", nargs="*", help=overrides_help)
    evaluate.set_defaults(func=_evaluate)

    demo = subparsers.add_parser(
        "demo",
        help="generate the synthetic data if missing; train DeepFM plain, with LLaCTR, with ELEC and as ELEC student; "
             "export and score the student as served; compare",
    )
    demo.add_argument("--config", default=DEMO_CONFIG,
                      help="demo config (default: the package's copy of configs/synthetic_deepfm.yaml)")
    demo.add_argument("--data-dir", default="data/synthetic", help="where the synthetic data lives / is generated")
    demo.add_argument("--rows", type=integer_at_least(10), default=200_000,
                      help="rows to generate when the data is missing (at least 10)")
    demo.add_argument("--run-dir", default="runs/demo",
                      help="one run directory per variant goes here; outputs already there are reused only when "
                           "made with the same settings, data and LLM, else refused")
    demo.add_argument("--llm", "--model", dest="llm", default=None, help="local Hugging Face model directory (default: offline MiniLM)")
    demo.add_argument("--no-llm", action="store_true", help="train the plain DeepFM only")
    demo.add_argument("overrides", nargs="*", help=overrides_help)
    demo.set_defaults(func=_demo)
    show_defaults(demo)  # --data-dir, --rows, --run-dir
