"""How much ELEC's row vector r says about clicks by itself, per split and on the LLM's tuning rows.

Per split, and on the rows its CTR-adapted LLM was tuned on versus the other rows of that split
(``train`` unless ``semantics adapt --split`` named another: ``adapted_on.json`` records it).

Run after ``python -m experiments.elec --granularity row ... --out DIR``::

    .venv/bin/python -m experiments.elec_vector_auc --run DIR/runs/elec_ml100k --schema data/ml-100k

It scores every row with the CTR-adapted LLM's own prediction layer applied to its exported r
(no LLM forward pass: the vectors are read from the export) and writes the AUC per group to
``DIR/vector_auc.json`` (``--json`` to choose). A gap between the tuned rows and
the others is label leakage: r of a row the LLM was tuned on has seen that row's label.
"""

import argparse
import json
import os
import sys
from typing import Dict, Optional

import numpy as np
import pyarrow.parquet as pq
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys_llm.atomic_dir import write_text_atomically
from recsys_llm.cli.semantics_export import ADAPTED_ON_FILE
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.env import source_commit
from recsys_llm.semantics.ctr_llm import sample_indices
from recsys_llm.semantics.ctr_llm_store import load_ctr_llm
from recsys_llm.semantics.vector_export import read_manifest
from recsys_llm.semantics.vector_reader import ExportLookup


def tuned_split(llm_dir: str) -> str:
    """The split ``semantics adapt`` tuned the LLM in ``llm_dir`` on (``adapted_on.json``; ``train``
    for an LLM saved before the split was recorded, when ``--split`` could only be ``train`` in the
    experiments)."""
    path = os.path.join(llm_dir, ADAPTED_ON_FILE)
    if not os.path.isfile(path):
        return "train"
    with open(path, encoding="utf-8") as handle:
        return json.load(handle).get("split", "train")


def vector_auc(run: str, schema: DatasetSchema) -> Dict[str, Dict[str, Optional[float]]]:
    """AUC of ``predict(r)`` for the rows the LLM was tuned on, the other rows of that split
    (``train`` unless ``semantics adapt --split`` named another) and each other split:
    ``{group: {"auc", "rows"}}`` (``auc`` None for a group of no rows: an LLM tuned on every row
    of its split leaves none untuned)."""
    model = load_ctr_llm(os.path.join(run, "ctr_llm"))
    tuned_on = tuned_split(os.path.join(run, "ctr_llm"))
    if tuned_on not in schema.splits:
        raise ValueError(f"{run}: the LLM was tuned on split {tuned_on!r}, which {schema.root} does not have")
    directory = os.path.join(run, "vectors")
    manifest = read_manifest(directory)
    provenance = manifest["provenance"]
    if provenance.get("granularity", "row") != "row":  # keyed by entity ids, not row keys
        raise ValueError(
            f"{directory}: one vector per {provenance.get('entity_field', 'entity')} (semantics export --granularity "
            f"{provenance['granularity']}); the AUC per row needs row vectors: experiments.elec --granularity row"
        )
    lookup = ExportLookup(directory, manifest, cache_bytes=1 << 30)
    out: Dict[str, Dict[str, Optional[float]]] = {}
    for split in sorted(schema.splits):
        table = pq.read_table(schema.split_path(split), columns=[schema.row_key, schema.label])
        row_keys = table.column(schema.row_key).to_numpy()
        positions = lookup.positions(row_keys)
        if (positions < 0).any():
            raise ValueError(f"{directory}: some {split} rows have no vector")
        labels = torch.from_numpy(table.column(schema.label).to_numpy().astype(np.int64))
        with torch.no_grad():
            logits = model.predict(torch.from_numpy(lookup.vectors(positions)).float()).squeeze(-1)
        groups = {split: np.ones(len(row_keys), dtype=bool)}
        if split == tuned_on:  # the same rows, in the same order, as `semantics adapt` sampled them from
            tuned = np.zeros(len(row_keys), dtype=bool)
            tuned[sample_indices(len(row_keys), model.config)] = True
            groups = {f"{split} (tuned on)": tuned, f"{split} (not tuned on)": ~tuned}
        for name, mask in groups.items():
            rows = torch.from_numpy(mask)
            auc = float(binary_auroc(logits[rows], labels[rows])) if mask.any() else None
            out[name] = {"auc": auc, "rows": int(mask.sum())}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", required=True, help="the experiment's run directory (holds ctr_llm/ and vectors/)")
    parser.add_argument("--schema", required=True, help="the data set's schema.json (or its directory)")
    parser.add_argument("--json", default=None, help="output (default: vector_auc.json two levels above --run)")
    args = parser.parse_args()
    try:
        result = vector_auc(args.run, DatasetSchema.load(args.schema))
    except (ValueError, FileNotFoundError) as error:  # a run or data set it cannot read: one line, as the CLI's
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    path = args.json or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(args.run))), "vector_auc.json")
    recorded = {**result, "command": "python -m experiments.elec_vector_auc " + " ".join(sys.argv[1:]),
                "git_commit": source_commit(ignore=("results",))}
    write_text_atomically(path, json.dumps(recorded, indent=2))
    for name, value in result.items():
        auc = "–" if value["auc"] is None else f"{value['auc']:.4f}"
        print(f"{name:>22}: AUC {auc} over {value['rows']} rows")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
