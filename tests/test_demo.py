"""``recsys-llm demo`` end to end on a small synthetic set with a tiny random BERT as the LLM."""

import json
import os
from typing import Any, Dict

import pyarrow.parquet as pq
import pytest

from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS
from recsys_llm.demo import ELEC, LLACTR, PLAIN, STUDENT, comparison_table, run_demo, write_outputs
from tests.multiprocess import run_multiprocess
from tests.tiny_models import save_tiny_bert

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_deepfm.yaml")
SMALL = ["data.batch_size=128", "data.eval_batch_size=512", "train.epochs=1", "train.progress=false",
         "train.device=cpu", "model.mlp_layer_sizes=[32,16]", "model.embedding_dim=8"]


def _demo(data_dir: str, run_root: str, llm: str) -> Dict[str, Any]:
    results = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, llm=llm)
    return {"results": results, "written": write_outputs(results, run_root), "table": comparison_table(results)}


@pytest.mark.multiprocess
def test_demo_generates_data_trains_four_variants_and_reports_cold_items(tmp_path) -> None:
    llm = save_tiny_bert(str(tmp_path / "llm"))
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    (out,) = run_multiprocess(_demo, world_size=1, data_dir=data_dir, run_root=run_root, llm=llm)
    assert os.path.exists(os.path.join(data_dir, "schema.json"))
    assert list(out["results"]) == [PLAIN, LLACTR, ELEC, STUDENT]
    for name, result in out["results"].items():
        assert result["test"]["auc"] > 0.5 and "cold/auc" in result["test"], name
    assert all(name in out["table"] for name in (PLAIN, LLACTR, ELEC, STUDENT))
    with open(os.path.join(run_root, "demo_results.json"), encoding="utf-8") as handle:
        assert set(json.load(handle)) == {PLAIN, LLACTR, ELEC, STUDENT}
    assert os.path.exists(os.path.join(run_root, "demo_results.png"))
    plugins = json.load(open(os.path.join(run_root, "elec_gain", "plugins.json"), encoding="utf-8"))
    assert plugins["elec"]["vector_source"] == "entity_table"
    student = json.load(open(os.path.join(run_root, "elec_student", "plugins.json"), encoding="utf-8"))
    assert student["elec"]["distill"]["mode"] == "frozen"
    assert student["elec"]["distill"]["swap_fields"] == list(ITEM_FIELDS)
    assert student["elec"]["distill"]["swap_catalog"] == os.path.join(data_dir, ITEM_CATALOG)
    events = [json.loads(line) for line in open(os.path.join(run_root, "elec_student", "metrics.jsonl"), encoding="utf-8")]
    epoch = next(e for e in events if e["event"] == "epoch")
    train_rows = pq.ParquetFile(os.path.join(data_dir, "train.parquet")).metadata.num_rows
    assert epoch["samples"] == 2 * train_rows  # every training row plus one catalogue pair per row


def test_plot_labels_are_wrapped_so_neighbours_do_not_overlap() -> None:
    from recsys_llm.demo import tick_label

    for name in (PLAIN, LLACTR, ELEC, STUDENT):
        label = tick_label(name)
        assert label.replace("\n", " ") == name  # every word kept, in order
        assert all(len(line) <= 20 for line in label.split("\n")), label
    assert tick_label(STUDENT) == "DeepFM ELEC student\n(no LLM at serving)"
    assert tick_label(LLACTR) == "DeepFM\n+ LLaCTR (FRE + FIE)"
