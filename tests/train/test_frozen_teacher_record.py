"""Which trained teacher a frozen-teacher student learned from: ``export`` records the digests of
the checkpoint it exported, the student's ``plugins.json`` records them (``elec.frozen_teacher``),
a resume with the export of another trained teacher at the same path is refused, the experiments
neither take nor reuse such a run, and ``experiments.elec`` exports a stale teacher state again.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Tuple

import numpy as np
import pytest

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.train.checkpoint import TrainState, checkpoint_digests, resolve_checkpoint
from recsys_llm.train.config import PLUGINS_FILE, ConfigError, load_config
from recsys_llm.train.runner import run_training
from tests.entity_vectors import export_entity_table
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


class _Killed(BaseException):
    """Stands in for a SIGKILL right after the step's checkpoint was written."""


def _kill_at_step_5(state: TrainState) -> None:
    if state.global_step == 5:
        raise _Killed()


def _prepared(work: str) -> Tuple[List[str], str, str]:
    """Synthetic data with an entity table, and two trained gain networks (seeds 0 and 1): the
    overrides every run shares and the two gain run directories."""
    data = os.path.join(work, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    schema_path = os.path.join(data, "schema.json")
    items = DatasetSchema.load(schema_path).field("item_id").cardinality
    entity = os.path.join(work, "items")
    export_entity_table(entity, np.random.default_rng(0).normal(size=(items, 8)))
    base = [f"data.schema={schema_path}", "data.batch_size=128", "data.eval_batch_size=512", "data.synthetic_rows=0",
            "train.epochs=1", "train.patience=0", "train.progress=false", "train.device=cpu",
            "train.checkpoint_every=5", "model.mlp_layer_sizes=[16]", "model.embedding_dim=8",
            "elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={entity}"]
    first_gain, other_gain = os.path.join(work, "gain_a"), os.path.join(work, "gain_b")
    for run_dir, seed in ((first_gain, 0), (other_gain, 1)):
        run_training(load_config(CONFIG, base + ["elec.task=gain", f"train.seed={seed}", f"train.run_dir={run_dir}"]))
    return base, first_gain, other_gain


def _export(base: List[str], gain_dir: str, output: str) -> None:
    """``export --state-only`` of the gain run ``gain_dir`` into ``output``."""
    from recsys_llm.cli.export import export_run

    export_run(load_config(CONFIG, base + ["elec.task=gain", f"train.run_dir={gain_dir}"]), gain_dir, output,
               state_only=True)


def _killed_student(base: List[str], teacher: str, student_dir: str, *extra: str) -> List[str]:
    """A frozen-teacher student of the export ``teacher``, killed right after its step-5 checkpoint;
    returns its overrides."""
    student = base + ["elec.task=distill", "elec.distill.mode=frozen", f"elec.teacher_checkpoint={teacher}",
                      f"train.run_dir={student_dir}", *extra]
    try:
        run_training(load_config(CONFIG, student), on_step=_kill_at_step_5)
    except _Killed:
        pass
    return student


def _scenario(work: str) -> Dict[str, Any]:
    from experiments.common import _differences
    from experiments.elec import export_frozen_teacher

    base, first_gain, other_gain = _prepared(work)
    out: Dict[str, Any] = {}
    teacher = os.path.join(work, "teacher_state")
    _export(base, first_gain, teacher)
    with open(os.path.join(teacher, "config.json"), encoding="utf-8") as handle:
        metadata = json.load(handle)["metadata"]
    out["exported_digests"], out["exported_elec"] = metadata["checkpoint_sha256"], metadata["elec"]
    out["first_digests"] = checkpoint_digests(resolve_checkpoint(first_gain))
    out["other_digests"] = checkpoint_digests(resolve_checkpoint(other_gain))

    student_dir = os.path.join(work, "student")
    student = _killed_student(base, teacher, student_dir)
    with open(os.path.join(student_dir, PLUGINS_FILE), encoding="utf-8") as handle:
        out["recorded"] = json.load(handle)["elec"]["frozen_teacher"]

    _export(base, other_gain, teacher)  # the same path now holds the export of the other trained gain network
    try:
        run_training(load_config(CONFIG, student))
        out["resume_with_other_teacher"] = None
    except ConfigError as error:
        out["resume_with_other_teacher"] = str(error)
    _export(base, first_gain, teacher)  # the first one again
    out["resumed_auc"] = run_training(load_config(CONFIG, student))["test"]["auc"]
    student_config = load_config(CONFIG, student)
    out["differences_same_teacher"] = _differences(student_config, student_dir)

    # experiments.elec: the state is kept while it is the gain run's, exported again once the run is retrained
    written = os.stat(os.path.join(teacher, "model.safetensors")).st_ino  # an export swaps in a new directory
    export_frozen_teacher(first_gain, teacher)
    out["kept"] = os.stat(os.path.join(teacher, "model.safetensors")).st_ino == written
    shutil.rmtree(first_gain)
    shutil.copytree(other_gain, first_gain)  # stands in for the gain run trained again after its removal
    export_frozen_teacher(first_gain, teacher)
    out["differences_other_teacher"] = _differences(student_config, student_dir)
    with open(os.path.join(teacher, "config.json"), encoding="utf-8") as handle:
        out["re_exported_digests"] = json.load(handle)["metadata"]["checkpoint_sha256"]
    return out


@pytest.fixture(scope="module")
def scenario(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    (result,) = run_multiprocess(_scenario, world_size=1, work=str(tmp_path_factory.mktemp("frozen_teacher")))
    return result


@pytest.mark.multiprocess
def test_the_export_and_the_student_record_which_trained_teacher(scenario: Dict[str, Any]) -> None:
    assert scenario["exported_digests"] == scenario["first_digests"]
    assert set(scenario["first_digests"]) == {"train_state.json", ".metadata"}
    assert scenario["first_digests"] != scenario["other_digests"]  # another seed: another trained state
    assert scenario["recorded"]["checkpoint_sha256"] == scenario["first_digests"]
    assert scenario["recorded"]["export"].endswith("teacher_state")
    # what shapes the gain network, for a frozen-teacher run of other settings to name
    assert scenario["exported_elec"] == {"vector_source": "entity_table", "entity_fields": ["item_id"],
                                         "vector_dim": 8, "num_injected_fields": 1}


@pytest.mark.multiprocess
def test_a_resume_with_another_teacher_at_the_same_path_is_refused(scenario: Dict[str, Any]) -> None:
    message = scenario["resume_with_other_teacher"]
    assert message is not None, "the resume distilled on although the teacher export changed"
    assert "plugins.json: elec.teacher_checkpoint now holds another trained teacher" in message
    assert "gain_a" in message and "gain_b" in message
    assert 0.0 < scenario["resumed_auc"] < 1.0  # the same teacher exported again resumes


@pytest.mark.multiprocess
def test_the_experiments_neither_reuse_nor_keep_a_stale_teacher(scenario: Dict[str, Any]) -> None:
    assert scenario["differences_same_teacher"] == []
    assert scenario["kept"]
    assert scenario["re_exported_digests"] == scenario["other_digests"]
    (difference,) = scenario["differences_other_teacher"]  # the same path, another trained state
    first, other = (scenario[key]["train_state.json"][:12] for key in ("first_digests", "other_digests"))
    assert difference.startswith("the frozen teacher: exported from") and "gain_a" in difference
    assert first in difference and other in difference


def _resumed_without_the_export(work: str) -> Dict[str, Any]:
    """A frozen-teacher student killed at step 5 resumes after its teacher export was deleted (the
    checkpoint holds the teacher); later another trained teacher is exported to that path."""
    from experiments.common import _differences

    base, first_gain, other_gain = _prepared(work)
    teacher, student_dir = os.path.join(work, "teacher_state"), os.path.join(work, "student")
    _export(base, first_gain, teacher)
    student = _killed_student(base, teacher, student_dir)

    def recorded() -> Dict[str, Any]:
        with open(os.path.join(student_dir, PLUGINS_FILE), encoding="utf-8") as handle:
            return json.load(handle)["elec"]["frozen_teacher"]

    out = {"started": recorded()}
    shutil.rmtree(teacher)
    run_training(load_config(CONFIG, student))
    out["resumed"] = recorded()
    _export(base, other_gain, teacher)
    out["differences_other_teacher"] = _differences(load_config(CONFIG, student), student_dir)
    return out


@pytest.mark.multiprocess
def test_a_resume_without_the_teacher_export_keeps_the_record_of_the_teacher(tmp_path) -> None:
    (result,) = run_multiprocess(_resumed_without_the_export, world_size=1, work=str(tmp_path))
    assert result["started"]["checkpoint_sha256"], result
    assert result["resumed"] == result["started"], "the resume forgot which teacher the run learned from"
    (difference,) = result["differences_other_teacher"]
    assert difference.startswith("the frozen teacher: exported from") and "gain_b" in difference


def test_a_resume_writes_back_the_record_the_run_started_with() -> None:
    from recsys_llm.train.run_records import resumed_frozen_teacher

    started = {"export": "/t", "checkpoint": "/g/best/ckpt-7", "checkpoint_sha256": {"train_state.json": "a"}}
    unreadable = {"export": "/t", "checkpoint": None, "checkpoint_sha256": None}
    current = {"elec": {"task": "distill", "frozen_teacher": unreadable}, "other": 1}
    assert resumed_frozen_teacher({"elec": {"frozen_teacher": started}}, current) == {
        "elec": {"task": "distill", "frozen_teacher": started}, "other": 1}
    # a run started before the record existed: none rather than the current export's, which it may not have learned from
    assert resumed_frozen_teacher({"elec": {"task": "distill"}}, current) == {"elec": {"task": "distill"}, "other": 1}
    assert resumed_frozen_teacher({"elec": {}}, {"llactr": {}}) == {"llactr": {}}  # no frozen teacher: as it is


def _student_of_one_teacher_and_the_export_of_another(work: str) -> List[str]:
    """A frozen-teacher student killed at step 5, and its teacher path re-exported from another
    trained gain network; returns the student's overrides."""
    base, first_gain, other_gain = _prepared(work)
    teacher = os.path.join(work, "teacher_state")
    _export(base, first_gain, teacher)
    student = _killed_student(base, teacher, os.path.join(work, "student"), "train.reshard_mid_epoch=true")
    _export(base, other_gain, teacher)
    return student


def _resume_where_rank_1_cannot_read_the_export(student: List[str]) -> str:
    """The error this rank's resume ends with (``"no error"`` if none); rank 1 reads no ``config.json``
    of the export (as on a host that does not mount it)."""
    from recsys_llm.modules import elec

    os.environ["RECSYS_LLM_DIST_TIMEOUT_S"] = "60"  # a rank left waiting fails the test instead of hanging it
    if os.environ["RANK"] == "1":
        elec._export_metadata = lambda path: {}
    try:
        run_training(load_config(CONFIG, student))
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.multiprocess
def test_a_resume_refused_on_one_rank_stops_every_rank(tmp_path) -> None:
    (student,) = run_multiprocess(_student_of_one_teacher_and_the_export_of_another, world_size=1, work=str(tmp_path))
    errors = run_multiprocess(_resume_where_rank_1_cannot_read_the_export, world_size=2, student=student)
    assert errors[0].startswith("ConfigError: ") and "now holds another trained teacher" in errors[0], errors
    assert errors[1].startswith("RuntimeError: ") and "failed on another rank" in errors[1], errors
