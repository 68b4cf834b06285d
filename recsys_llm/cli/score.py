"""``recsys-llm score``: a Parquet split through an exported artifact, as serving scores it
(:mod:`recsys_llm.serving.scoring`).

Example::

    recsys-llm score --artifact exports/student --data data/synthetic --split test --output scores.parquet
    torchrun --nproc_per_node 4 -m recsys_llm.cli score --artifact exports/student --data data/synthetic ...
"""

import argparse
import json

from recsys_llm.cli.data import integer_at_least


def _score(args: argparse.Namespace) -> int:
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.env import check_versions
    from recsys_llm.serving import ServedModel
    from recsys_llm.serving.scoring import check_scores_output, score_split
    from recsys_llm.train.config import DEFAULT_COLD_ITEM_COLUMN
    from recsys_llm.train.distributed import (
        init_distributed,
        is_main_process,
        started_by_torchrun_on_each_rank,
        teardown_distributed,
    )
    from recsys_llm.train.run_records import strict_json

    check_versions()
    if started_by_torchrun_on_each_rank():  # each rank scores its share of the rows; rank 0 writes them all
        init_distributed("cpu")
    args.output = args.output or None  # --output '' (an empty $VAR): none, metrics only
    if args.output is not None:
        check_scores_output(args.output)  # before the artifact is loaded
    schema = DatasetSchema.load(args.data)
    try:
        served = ServedModel.load(args.artifact, trust_program=args.trust_program)
    except PermissionError as error:
        raise PermissionError(f"{error}; here: pass --trust-program") from None
    cold_item_column = DEFAULT_COLD_ITEM_COLUMN if args.cold_item_column is None else args.cold_item_column
    report = score_split(served, schema, args.split, batch_size=args.batch_size, output=args.output,
                         progress=args.progress, cold_item_column=cold_item_column)
    if is_main_process():
        # a split of one class has no AUC: null, as `evaluate` prints it (strict JSON has no NaN)
        print(json.dumps(strict_json({"artifact": args.artifact, **report}), indent=2))
    teardown_distributed()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``score``."""
    from recsys_llm.cli.semantics import show_defaults

    score = subparsers.add_parser(
        "score",
        help="score a Parquet split with an exported artifact (no training code, run config or LLM): AUC / LogLoss, "
             "and each row's score to Parquet",
    )
    score.add_argument("--artifact", required=True, help="export directory (`recsys-llm export --output`)")
    score.add_argument("--data", required=True,
                       help="the prepared data: its directory or schema.json, with the features the artifact reads")
    score.add_argument("--split", default="test",
                       help="split name of the schema, or a Parquet file or directory of its columns")
    score.add_argument("--output", default=None,
                       help="a new Parquet file for each row's row key, label, logit and probability (or the one "
                            "this command wrote before, which it replaces; default, or '': none, metrics only); files "
                            "without the label column are scored without metrics")
    score.add_argument("--batch-size", type=integer_at_least(1), default=8192, help="rows per call of the artifact")
    score.add_argument("--cold-item-column", default=None,
                       help="the 0/1 extra column marking cold items, for the cold/... metrics (the run's "
                            "data.cold_item_column; default: is_cold_item where the data has it; '' for none)")
    score.add_argument("--trust-program", action="store_true",
                       help="load the artifact's dense_program.pt2, a torch.export program (code: torch.export.load "
                            "evaluates expressions stored in it); pass it for an artifact you exported or trust")
    score.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                       help="a progress bar on stderr (default: on)")
    score.set_defaults(func=_score)
    show_defaults(score)  # --split, --batch-size
