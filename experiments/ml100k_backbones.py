"""Test AUC / LogLoss of every backbone on ML-100K: same split, 3 seeds, mean ± std.

Run: ``.venv/bin/python -m experiments.ml100k_backbones`` (prepares ``data/ml-100k`` from
``../shared/data/ml-100k`` first). Writes ``results/ml100k_backbones.{json,md,png}``.
"""

import os
import sys
from typing import Any, Dict, List, Mapping, Optional, Tuple

from experiments.common import (
    RunCounter,
    auc_row,
    base_config_path,
    check_tables_replaceable,
    experiment_args,
    markdown_table,
    prepared_schema,
    run_variant,
    summarize,
    table_backbones,
    tables_dir,
    write_table,
)

BACKBONES = ("fm", "fwfm", "deepfm", "dcnv2", "finalmlp", "dlrm")


def main(argv: Optional[List[str]] = None) -> int:
    parser = experiment_args(__doc__.splitlines()[0], "results")
    parser.add_argument("--mixed-precision", choices=("fp32", "bf16"), default="fp32",
                        help="train.mixed_precision of every run (bf16: forwards under bfloat16 autocast)")
    args = parser.parse_args(argv)
    if args.data != "ml100k":  # the shared parser offers the synthetic data too; this table is ML-100K's
        parser.error(f"--data {args.data}: this table trains on ML-100K only (--data ml100k)")
    backbones = args.backbones or list(BACKBONES)
    check_tables_replaceable(args, "ml100k_backbones", backbones)
    schema = prepared_schema("ml100k", args.data_dir, args.raw)
    tables = {}
    counter = RunCounter(len(backbones) * len(args.seeds))
    for backbone in backbones:
        runs = []
        for seed in args.seeds:
            overrides = [f"data.schema={schema}", f"train.seed={seed}", f"train.mixed_precision={args.mixed_precision}"
                         ] + (["train.epochs=2"] if args.quick else [])
            run_dir = os.path.join(args.out, "runs", "ml100k_backbones", backbone, f"seed{seed}")
            runs.append(run_variant(base_config_path("ml100k", backbone), overrides, run_dir, counter=counter))
        tables[backbone] = summarize({backbone: runs})[backbone]
        print(f"[ml100k] {backbone}: AUC {tables[backbone]['auc']['mean']:.4f} ± {tables[backbone]['auc']['std']:.4f}", flush=True)
    markdown = markdown_table(tables, ["auc", "logloss"])
    payload = {"seeds": args.seeds, "quick": args.quick, "mixed_precision": args.mixed_precision, "table": tables,
               "backbones_done": backbones,
               "command": "python -m experiments.ml100k_backbones " + " ".join(sys.argv[1:] if argv is None else argv)}
    write_table(tables_dir(args), "ml100k_backbones", payload, markdown)
    return 0


def table_figure(payload: Mapping[str, Any], source: str) -> Tuple[Dict[str, Dict[str, Dict]], str]:
    """The tables and title :func:`~experiments.common.plot_auc` draws for this script's JSON (read from
    ``source``): one bar per backbone, its test AUC."""
    return ({b: {"test": auc_row(payload, f"table.{b}", source)} for b in table_backbones(payload, source)},
            "ML-100K: backbones")


if __name__ == "__main__":
    sys.exit(main())
