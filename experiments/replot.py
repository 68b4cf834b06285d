"""Redraws a table's PNG from its JSON with the current plot, running nothing else.

Run: ``.venv/bin/python -m experiments.replot results/llactr_ml100k.json [more JSONs] [--plot PATH]``. Each
PNG goes beside its JSON (``--plot``: elsewhere, for one JSON), drawn by the function a run of the experiment
its ``command`` names draws with (``experiments.common.draw_table``). A JSON that is no experiment table (a
demo's results) or lacks a key the plot needs is refused, naming the file and the key; the others are drawn.
"""

import argparse
import json
import os
import sys
from typing import List, Optional

from experiments.common import draw_table


def replot(json_path: str, png_path: Optional[str] = None) -> str:
    """Draws the PNG of the table JSON at ``json_path`` to ``png_path`` (default: beside it); returns its path.

    Raises:
        SystemExit: the file is unreadable, no experiment table, or lacks a key the plot needs (named).
    """
    try:
        with open(json_path, encoding="utf-8") as handle:
            payload = json.load(handle)
    except (OSError, ValueError) as error:
        raise SystemExit(f"{json_path}: cannot read it as JSON ({error})") from None
    if not isinstance(payload, dict):
        raise SystemExit(f"{json_path}: not a table (a JSON object)")
    png_path = png_path or os.path.splitext(json_path)[0] + ".png"
    draw_table(png_path, payload, json_path)
    return png_path


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="a table's JSON (results/*.json, results/*/*.json)")
    parser.add_argument("--plot", default=None, help="where the PNG goes (one JSON only; default: beside it)")
    args = parser.parse_args(argv)
    if args.plot is not None and len(args.json) > 1:
        parser.error("--plot: one JSON only")
    refused = 0
    for path in args.json:
        try:
            print(f"[replot] {replot(path, args.plot)} redrawn from {path}", flush=True)
        except SystemExit as error:
            print(f"[replot] error: {error}", file=sys.stderr, flush=True)
            refused += 1
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
