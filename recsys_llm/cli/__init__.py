"""``recsys-llm`` command line: one sub-command module per job.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-command(s) and sets ``func`` on the parsed namespace.
"""

import argparse
import importlib
import os
import sys
from typing import List, Optional

COMMAND_MODULES = (
    "recsys_llm.cli.data",  # prepare
    "recsys_llm.cli.train",  # train, evaluate, demo
    "recsys_llm.cli.semantics",  # semantics tune | encode | export
    "recsys_llm.cli.export",  # export (serving artifact of a student)
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="recsys-llm", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
