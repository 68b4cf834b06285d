"""``recsys-llm evaluate --student``: the student of an ELEC distillation run alone, on rows without teacher inputs,
on any number of ranks, as its exported artifact scores them."""

import os
from typing import Any, Dict, List

import numpy as np
import pytest

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.train.config import load_config
from tests.entity_vectors import export_entity_table
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _overrides(schema: str, run_dir: str, items: str) -> List[str]:
    return [f"data.schema={schema}", "data.batch_size=128", "data.eval_batch_size=300", "data.synthetic_rows=0",
            "train.epochs=1", "train.patience=0", "train.progress=false", "train.device=cpu",
            f"train.run_dir={run_dir}", "model.mlp_layer_sizes=[16]", "model.embedding_dim=8",
            "elec.task=distill", "elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={items}", "elec.distill.mode=joint", "elec.distill.alpha=2"]


def _train(overrides: List[str]) -> Dict[str, Any]:
    from recsys_llm.train.runner import run_training

    return run_training(load_config(CONFIG, overrides))


def _evaluate_student(overrides: List[str], run_dir: str) -> Dict[str, Any]:
    from recsys_llm.train.trained_run import run_evaluation

    return run_evaluation(load_config(CONFIG, overrides), run_dir, student=True)


def _evaluate_with_other_settings_on_rank_one(overrides: List[str], run_dir: str, rank_one: List[str]) -> str:
    """What evaluating raises when rank 1 adds ``rank_one`` to the overrides (another config file on its host)."""
    from recsys_llm.train.config import ConfigError

    rank = int(os.environ["RANK"])
    try:
        _evaluate_student(overrides + (rank_one if rank == 1 else []), run_dir)
    except ConfigError as error:
        return str(error)
    return "evaluated"


def _evaluate_through_the_cli(overrides: List[str], run_dir: str, student: bool) -> Dict[str, Any]:
    import contextlib
    import io
    import json

    from recsys_llm.cli import main

    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(["evaluate", "--checkpoint", run_dir, *(["--student"] if student else []), *overrides]) == 0
    return json.loads(printed.getvalue())


@pytest.mark.multiprocess
def test_the_student_alone_is_evaluated_alike_on_any_number_of_ranks_and_as_served(tmp_path) -> None:
    from recsys_llm.cli.export import export_run
    from recsys_llm.serving import ServedModel
    from recsys_llm.serving.scoring import score_split

    data = str(tmp_path / "data")
    generate_synthetic(data, 2_000, seed=1, rows_per_group=512)
    schema = DatasetSchema.load(data)
    items = str(tmp_path / "items")
    export_entity_table(items, np.random.default_rng(0).normal(size=(schema.field("item_id").cardinality, 8)))
    run_dir = str(tmp_path / "joint")
    overrides = _overrides(os.path.join(data, "schema.json"), run_dir, items)
    trained = run_multiprocess(_train, world_size=2, overrides=overrides)[0]
    on_two = run_multiprocess(_evaluate_student, world_size=2, overrides=overrides, run_dir=run_dir)
    (on_one,) = run_multiprocess(_evaluate_student, world_size=1, overrides=overrides, run_dir=run_dir)
    (on_the_command_line,) = run_multiprocess(_evaluate_through_the_cli, world_size=1, overrides=overrides,
                                              run_dir=run_dir, student=True)
    (whole,) = run_multiprocess(_evaluate_through_the_cli, world_size=1, overrides=overrides, run_dir=run_dir,
                                student=False)
    served = str(tmp_path / "served")
    export_run(load_config(CONFIG, overrides), run_dir, served)
    report = score_split(ServedModel.load(served, trust_program=True), schema, "test", progress=False)

    assert on_two[0] == on_two[1]  # every rank reports the metrics over all rows
    assert on_one["model"] == "student" and on_one["num_samples"] == report["rows"] == on_two[0]["num_samples"]
    assert on_two[0]["auc"] == pytest.approx(on_one["auc"], abs=1e-9)
    assert on_one["auc"] == pytest.approx(report["auc"], abs=1e-6)
    # the student's own BCE, without the KD term the run's test loss holds
    assert on_one["loss"] == pytest.approx(on_one["logloss"], abs=1e-5)
    assert trained["test"]["auc"] == pytest.approx(on_one["auc"], abs=1e-6)  # the run reports its student's AUC
    assert trained["test"]["loss"] > on_one["loss"]
    assert on_the_command_line == on_one  # evaluate --student
    # each rank built its evaluation from its own settings: other batch counts wait in collectives the others skip
    refusals = run_multiprocess(_evaluate_with_other_settings_on_rank_one, world_size=2, overrides=overrides,
                                run_dir=run_dir, rank_one=["data.eval_batch_size=100"])
    assert refusals[0] == refusals[1] and refusals[0].startswith(
        "the ranks were started with different settings (rank 0's -> theirs): rank 1: data.eval_batch_size: 300 -> "
        "100."), refusals[0]
    assert whole.get("model") != "student" and whole["loss"] > on_one["loss"]
