"""Three small prepared data sets of a shop's clicks for day-by-day tests: day 1, day 2 grown ``--like`` day 1
(new items), and day 2 prepared afresh (the same fingerprint, ids meaning other values)."""

import os
from typing import Dict, List

import yaml

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.convert import prepare_tabular
from recsys_llm.data.tabular.like import prepare_tabular_like

SHOP_SCHEMA = {"name": "shop", "label": "clicked", "fields": [
    {"name": "user", "kind": "sparse", "cardinality": 10, "description": "shopper id"},
    {"name": "item", "kind": "sparse", "cardinality": 20, "description": "product"},
]}


def clicks_csv(path: str, items: List[str]) -> str:
    """A CSV of one click row per item of ``items`` (users u0-u2 in turn, every other row clicked)."""
    with open(path, "w", encoding="utf-8") as handle:
        handle.write("user,item,clicked\n")
        handle.writelines(f"u{k % 3},{item},{k % 2}\n" for k, item in enumerate(items))
    return path


def grown_days(root: str) -> Dict[str, DatasetSchema]:
    """Day 1 (items b, d, f), day 2 grown --like day 1 (a, c and d: a and c new), day 2 prepared afresh."""
    with open(os.path.join(root, "shop.yaml"), "w", encoding="utf-8") as handle:
        yaml.safe_dump(SHOP_SCHEMA, handle)
    day1 = clicks_csv(os.path.join(root, "day1.csv"), list("bdf" * 14))
    day2 = clicks_csv(os.path.join(root, "day2.csv"), list("acd" * 14))
    out = {"day1": prepare_tabular(day1, os.path.join(root, "shop.yaml"), os.path.join(root, "d1"))}
    out["day2"] = prepare_tabular_like(day2, os.path.join(root, "d1"), os.path.join(root, "d2"), split_name="train",
                                       grow_vocabulary=True)
    out["fresh"] = prepare_tabular(day2, os.path.join(root, "shop.yaml"), os.path.join(root, "fresh"))
    return out
