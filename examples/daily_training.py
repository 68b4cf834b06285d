"""Daily training: yesterday's model goes on with today's rows and scores tomorrow's.

Three days of a shop's clicks are written as CSV files (users' and products' own appeal and the price decide
the clicks, so what a model learns about a product on one day still holds the next; day 2 brings a new
city). Day 1 is prepared as usual, day 2 ``--like`` day 1 (the same ids and schema fingerprint; the new city
takes a free id of its table: ``--grow-vocabulary``), and day 3 ``--like`` day 2.
Three runs, each scored on day 3 with ``recsys-llm evaluate --split``:

* ``day1``: trained on day 1;
* ``day2``: trained on day 2 alone, from fresh weights;
* ``day2_from_day1``: trained on day 2 from day 1's weights and optimizer state (``train.init_from``).

The last one is then exported and serves day 3 as a serving process would: ``recsys-llm score`` over the split,
and ``ServedModel.raw_value_ids`` for raw values (the artifact holds the grown vocabularies).

Run: ``python examples/daily_training.py [--work runs/daily] [--rows 20000] [--epochs 2]``; prints each run's
AUC, LogLoss and NE on day 3, and the served model's, as JSON. A work directory used before is trained again from
scratch.
"""

import argparse
import contextlib
import io
import json
import os
import shutil
from typing import Dict, List

import numpy as np
import yaml

from recsys_llm.cli import main as recsys_llm
from recsys_llm.cli.train import DEMO_CONFIG
from recsys_llm.serving import ServedModel

SCHEMA = {"name": "shop", "label": "clicked", "row_key": "impression", "fields": [
    {"name": "user", "kind": "sparse", "cardinality": 201, "description": "shopper id"},
    {"name": "city", "kind": "sparse", "cardinality": 10, "description": "city of the shopper"},
    {"name": "item", "kind": "sparse", "cardinality": 301, "description": "product"},
    {"name": "price", "kind": "dense", "description": "price"},
]}
CITIES = ["Paris", "Lyon", "Nice", "Lille", "Berlin"]


def write_days(work: str, rows: int) -> List[str]:
    """Three CSV files of ``rows``, ``rows`` and ``rows // 4`` impressions; Berlin appears from day 2 on."""
    rng = np.random.default_rng(0)
    user_appeal, item_appeal = rng.normal(size=200), rng.normal(size=300)
    paths = []
    for day, (count, cities) in enumerate([(rows, 4), (rows, 5), (rows // 4, 5)], start=1):
        user, item, city = rng.integers(0, 200, count), rng.integers(0, 300, count), rng.integers(0, cities, count)
        price = rng.random(count).round(3)
        clicked = rng.random(count) < 1 / (1 + np.exp(0.5 - user_appeal[user] - item_appeal[item] - price))
        paths.append(os.path.join(work, f"day{day}.csv"))
        with open(paths[-1], "w", encoding="utf-8") as handle:
            handle.write("impression,user,city,item,price,clicked\n")
            handle.writelines(f"{day * 10**7 + k},{user[k]},{CITIES[city[k]]},item{item[k]},{price[k]},"
                              f"{int(clicked[k])}\n" for k in range(count))
    return paths


def run(args: List[str]) -> str:
    """One ``recsys-llm`` command; its standard output. A command that fails stops the script (its error is printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = recsys_llm(args)
    if code != 0:
        raise SystemExit(f"`recsys-llm {' '.join(args[:2])}` failed (its error is above)")
    return out.getvalue()


def main(work: str, rows: int, epochs: int) -> Dict[str, Dict[str, float]]:
    if os.path.isdir(work) and os.listdir(work) and not os.path.isfile(os.path.join(work, "shop.yaml")):
        raise SystemExit(f"{work}: a non-empty directory this example did not make (no shop.yaml): pass a new or "
                         "empty --work (the example empties it first)")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "shop.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(SCHEMA, handle)
    day1, day2, day3 = write_days(work, rows)
    run(["prepare", "tabular", "--input", day1, "--schema", f"{work}/shop.yaml", "--out", f"{work}/data/day1",
         "--quiet"])
    # day 2's new city takes a free id of its table; day 3 is prepared like day 2, so it gets the same one
    run(["prepare", "tabular", "--input", day2, "--like", f"{work}/data/day1", "--out", f"{work}/data/day2",
         "--split-name", "train", "--grow-vocabulary", "--quiet"])
    run(["prepare", "tabular", "--input", day3, "--like", f"{work}/data/day2", "--out", f"{work}/data/day3", "--quiet"])
    common = ["--config", DEMO_CONFIG, "data.synthetic_rows=0", f"train.epochs={epochs}", "train.progress=false"]
    day_two = ["data.valid_split=", "data.test_split="]  # the day's data holds one split, train
    runs = {"day1": [f"data.schema={work}/data/day1"],
            "day2": [f"data.schema={work}/data/day2", *day_two],
            "day2_from_day1": [f"data.schema={work}/data/day2", *day_two, f"train.init_from={work}/runs/day1"]}
    scores = {}
    for name, overrides in runs.items():
        run(["train", *common, *overrides, f"train.run_dir={work}/runs/{name}"])
        metrics = json.loads(run(["evaluate", "--checkpoint", f"{work}/runs/{name}", "--split",
                                  f"{work}/data/day3/test.parquet"]))
        scores[name] = {key: metrics[key] for key in ("auc", "logloss", "ne")}
    served = f"{work}/served"
    run(["export", "--checkpoint", f"{work}/runs/day2_from_day1", "--output", served])
    metrics = json.loads(run(["score", "--artifact", served, "--data", f"{work}/data/day3", "--split", "test",
                              "--trust-program"]))
    city_ids, _ = ServedModel.load(served, trust_program=True).raw_value_ids("city", ["Berlin", "Paris", None])
    scores["served"] = {**{key: metrics[key] for key in ("auc", "logloss", "ne")}, "city_ids": city_ids.tolist()}
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/daily", help="work directory (emptied first)")
    parser.add_argument("--rows", type=int, default=20_000, help="impressions of days 1 and 2 (day 3: a quarter)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    cli = parser.parse_args()
    print(json.dumps(main(cli.work, cli.rows, cli.epochs), indent=2))
