"""The LLM methods through the user's entry points: config sections of ``recsys-llm train``.

* LLaCTR: a field-vector file + an ``llactr:`` section -> FRE/FIE inside the trained task,
  provenance in ``plugins.json``; ``export`` folds FIE into DeepFM's FM part and serves the
  task's logits.
* ELEC, the whole offline-LLM workflow on the embedded data with a tiny random BERT:
  ``semantics adapt`` -> ``semantics export --attach-dir`` -> train the gain network ->
  ``teacher-outputs`` -> train the offline student (no teacher, no LLM vector read), the
  joint student and the student of the frozen gain network (``export --state-only``) ->
  ``export`` the student -> ``ServedModel`` reproduces its test logits.
"""

import json
import os
import shutil
from typing import Any, Dict, List, Optional, Tuple

import pyarrow.parquet as pq
import pytest
import torch

from recsys_llm.cli import main as cli_main
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import ITEM_CATALOG, generate_synthetic
from recsys_llm.data.synthetic import ITEM_FIELDS as SYNTHETIC_ITEM_FIELDS
from recsys_llm.semantics.store import VectorProvenance, save_vectors
from recsys_llm.serving import ServedModel, load_state_file
from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.runner import run_training
from tests.entity_vectors import export_entity_table
from tests.multiprocess import run_multiprocess
from tests.tiny_models import save_tiny_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


@pytest.fixture(scope="module")
def small_synthetic(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("synthetic_small"))
    generate_synthetic(out, 4_000, seed=1, rows_per_group=1024)
    return os.path.join(out, "schema.json")


def _common(schema: str, run_dir: str) -> List[str]:
    return [
        f"data.schema={schema}", "data.batch_size=128", "data.eval_batch_size=512", "data.synthetic_rows=0",
        "train.epochs=2", "train.patience=0", "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}",
        "model.mlp_layer_sizes=[32,16]", "model.embedding_dim=8",
    ]


def _train_and_export_llactr(schema_path: str, run_dir: str, vectors: str, export_dir: str) -> Dict[str, Any]:
    """Trains DeepFM + FRE + FIE, exports it, and compares the served logits with the task's."""
    from recsys_llm.serving import materialize_meta, unsharded_state_dict
    from recsys_llm.train.task_builder import build_task
    from recsys_llm.train.trained_run import load_trained_model, open_trained_run

    overrides = _common(schema_path, run_dir) + [
        f"llactr.vectors_path={vectors}", "llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1",
    ]
    result = run_training(load_config(CONFIG, overrides))
    assert cli_main(["export", "--config", CONFIG, "--checkpoint", run_dir, "--output", export_dir, *overrides]) == 0
    config, schema = load_config(CONFIG, overrides), DatasetSchema.load(schema_path)
    task = materialize_meta(build_task(config, schema, torch.device("cpu")).task, torch.device("cpu"))
    # the checkpoint the export read, as the trainer's sharded model predicts with it
    trained = load_trained_model(config, open_trained_run(config, run_dir)).eval()
    # the run's whole state, as export gathers it (the artifact leaves FRE and the folded FIE out): FIE unfrozen,
    # unfolded, computed from its Linear
    task.load_state_dict(unsharded_state_dict(trained))
    result["artifact_keys"] = sorted(load_state_file(export_dir))
    batch = next(iter(ParquetBatchReader(schema, "test", 64)))
    with torch.no_grad():
        result["task_logits"] = task.eval().predict(batch).logits
        result["plain_logits"] = task.model(batch.dense_features, batch.sparse_features).logits
    result["served_logits"] = ServedModel.load(export_dir, trust_program=True).logits(batch.dense_features, batch.sparse_features)
    with torch.no_grad():
        result["checkpoint_logits"] = trained.module.predict(batch).logits
    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as handle:
        result["id_rules"] = json.load(handle)["id_rules"]
    # evaluate with the vector file moved (fine), and with the same fields in another order (refused:
    # the trained pair weights would meet other fields)
    from recsys_llm.semantics.store import load_vectors
    from recsys_llm.train.trained_run import run_evaluation

    stored = load_vectors(vectors)
    moved, reordered = os.path.join(export_dir + "_v", "moved.safetensors"), export_dir + "_reordered.safetensors"
    os.makedirs(os.path.dirname(moved))
    shutil.copyfile(vectors, moved)
    result["moved_auc"] = run_evaluation(load_config(CONFIG, overrides + [f"llactr.vectors_path={moved}"]), run_dir)["auc"]
    order = list(range(len(stored.keys)))[::-1]
    save_vectors(reordered, stored.vectors[order], [stored.keys[i] for i in order], stored.provenance)
    try:
        run_evaluation(load_config(CONFIG, overrides + [f"llactr.vectors_path={reordered}"]), run_dir)
    except ConfigError as error:
        result["reordered_error"] = str(error)
    # the run as one written before llactr.fre_field_reduction existed (FRE then averaged over fields)
    plugins_path = os.path.join(run_dir, "plugins.json")
    with open(plugins_path, encoding="utf-8") as handle:
        plugins = json.load(handle)
    del plugins["llactr"]["config"]["fre_field_reduction"]
    with open(plugins_path, "w", encoding="utf-8") as handle:
        json.dump(plugins, handle)
    try:
        run_training(load_config(CONFIG, overrides + ["train.epochs=3"]))
    except ConfigError as error:
        result["older_run_resume_error"] = str(error)
    return result


@pytest.mark.multiprocess
def test_llactr_section_trains_fre_and_fie_and_records_provenance(small_synthetic: str, tmp_path) -> None:
    schema = DatasetSchema.load(small_synthetic)
    names = schema.sparse_feature_names
    vectors = str(tmp_path / "fields.safetensors")
    provenance = VectorProvenance(model_id="test", model_hash="h", pooling="mean", template="{name}: {description}")
    save_vectors(vectors, torch.randn(len(names), 24, generator=torch.Generator().manual_seed(0)), names,
                 provenance.for_schema(schema))
    run_dir, export_dir = str(tmp_path / "run"), str(tmp_path / "export")
    (result,) = run_multiprocess(_train_and_export_llactr, world_size=1, schema_path=small_synthetic, run_dir=run_dir,
                                 vectors=vectors, export_dir=export_dir)
    assert result["test"]["auc"] > 0.5
    with open(os.path.join(export_dir, "config.json"), encoding="utf-8") as handle:
        exported = json.load(handle)
    assert exported["folded_logit_terms"] == ["fie"]  # DeepFM: FIE inside its FM part
    # the LLM its field vectors came from, told from the artifact alone (an LLM upgrade's record)
    llm = exported["metadata"]["llm_provenance"]["llactr"]
    assert (llm["model_id"], llm["model_hash"], llm["pooling"]) == ("test", "h", "mean")
    # training-only: FRE, and the FIE folded into the program's backbone
    assert not [key for key in result["artifact_keys"] if key.startswith(("loss_terms.", "logit_terms."))]
    torch.testing.assert_close(result["served_logits"], result["task_logits"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(result["served_logits"], result["checkpoint_logits"], rtol=1e-5, atol=1e-5)
    schema_fields = {f.name: f for f in schema.fields}
    assert result["id_rules"] == {  # recsys-llm export records the reader's rules
        name: {"hashed": schema_fields[name].hashed, "max_length": schema_fields[name].max_length,
               "single_id": schema_fields[name].kind.value == "sparse"}
        for name in names
    }
    assert not torch.allclose(result["task_logits"], result["plain_logits"], atol=1e-4)
    with open(os.path.join(run_dir, "plugins.json"), encoding="utf-8") as handle:
        plugins = json.load(handle)
    assert plugins["llactr"]["fields_used"] == names
    assert plugins["llactr"]["schema_fingerprint"] == schema.fingerprint()
    events = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    assert any(e["event"] == "valid" for e in events)
    assert "trained before llactr.fre_field_reduction existed" in result["older_run_resume_error"]
    assert result["moved_auc"] == result["test"]["auc"]  # a moved copy evaluates as the original
    assert "this run trained with other field vectors than" in result["reordered_error"]
    assert "fields_used" in result["reordered_error"]


def _elec_workflow(schema_path: str, work: str, llm: str) -> Dict[str, Any]:
    adapted, vectors, attached = (os.path.join(work, n) for n in ("adapted", "vectors", "attached"))
    assert cli_main(["semantics", "adapt", "--schema", schema_path, "--output-dir", adapted, "--model", llm,
                     "--representation-dim", "16", "--hidden-dim", "32", "--sample-rows", "256",
                     "--batch-size", "32", "--max-length", "64"]) == 0
    assert cli_main(["semantics", "export", "--schema", schema_path, "--llm", adapted, "--output-dir", vectors,
                     "--chunk-rows", "1024", "--batch-size", "128", "--attach-dir", attached]) == 0
    attached_schema = os.path.join(attached, "schema.json")
    gain_dir = os.path.join(work, "gain")
    gain_overrides = _common(attached_schema, gain_dir) + ["elec.task=gain", "elec.vector_dim=16"]
    gain = run_training(load_config(CONFIG, gain_overrides))
    # a gain network reading per-row vectors needs the LLM at inference: refused before anything is loaded
    import contextlib
    import io

    from recsys_llm.cli.export import export_run

    progress = io.StringIO()
    try:
        with contextlib.redirect_stderr(progress):
            export_run(load_config(CONFIG, gain_overrides), gain_dir, os.path.join(work, "gain_served"))
        gain["export_refusal"] = None
    except ValueError as error:
        gain["export_refusal"] = (str(error), progress.getvalue(), os.path.exists(os.path.join(work, "gain_served")))

    teacher_data = os.path.join(work, "teacher")
    assert cli_main(["teacher-outputs", "--config", CONFIG, "--checkpoint", gain_dir, "--output-dir", teacher_data,
                     *gain_overrides]) == 0
    teacher_schema = os.path.join(teacher_data, "schema.json")
    from recsys_llm.train.teacher_outputs import TEACHER_FILE, check_same_teacher

    record = json.load(open(os.path.join(teacher_data, TEACHER_FILE), encoding="utf-8"))
    assert set(record["sha256"]) == {"train_state.json", ".metadata"}
    assert cli_main(["teacher-outputs", "--config", CONFIG, "--checkpoint", gain_dir, "--output-dir", teacher_data,
                     *gain_overrides]) == 0  # the same teacher: a resume with nothing left to write
    data_before = {name: os.stat(os.path.join(attached, name)).st_mtime_ns for name in os.listdir(attached)}
    into_the_data = io.StringIO()
    link_to_the_data = os.path.join(work, "link_to_attached")
    os.symlink(attached, link_to_the_data)
    with contextlib.redirect_stderr(into_the_data):  # the input data's own directory, by another path
        code = cli_main(["teacher-outputs", "--config", CONFIG, "--checkpoint", gain_dir, "--output-dir",
                         link_to_the_data, *gain_overrides])
    data_after = {name: os.stat(os.path.join(attached, name)).st_mtime_ns for name in os.listdir(attached)}
    into_data = (code, into_the_data.getvalue(), data_after == data_before)
    other_teacher = {**record, "sha256": {**record["sha256"], "train_state.json": "0" * 64}}
    try:
        check_same_teacher(teacher_data, other_teacher)
        other_teacher_refusal = ""
    except ValueError as error:
        other_teacher_refusal = str(error)
    # each row's teacher_logits are the gain network's own prediction for that row
    from recsys_llm.train.trained_run import load_trained_model, open_trained_run

    gain_config = load_config(CONFIG, gain_overrides)
    gain_model = load_trained_model(gain_config, open_trained_run(gain_config, gain_dir)).eval()
    rows = next(iter(ParquetBatchReader(DatasetSchema.load(teacher_schema), "test", 64,
                                        extras=["llm_vector", "teacher_logits"])))
    with torch.no_grad():
        teacher_check = (gain_model.module.predict(rows).logits, rows.extras["teacher_logits"])
    offline_dir = os.path.join(work, "offline")
    offline_overrides = _common(teacher_schema, offline_dir) + [
        "elec.task=distill", "elec.vector_dim=16", "elec.distill.mode=offline", "elec.distill.beta=0.1",
    ]
    offline = run_training(load_config(CONFIG, offline_overrides))
    try:  # a declared width other than the column's is named before anything is written
        run_training(load_config(CONFIG, _common(teacher_schema, os.path.join(work, "offline_wrong_dim")) + [
            *offline_overrides[-4:], "elec.distill.teacher_representation_dim=7"]))
        offline["wrong_dim_error"] = None
    except ValueError as error:
        offline["wrong_dim_error"] = str(error)
    joint_dir = os.path.join(work, "joint")
    joint = run_training(load_config(CONFIG, _common(attached_schema, joint_dir) + [
        "elec.task=distill", "elec.vector_dim=16", "elec.distill.mode=joint",
    ]))
    teacher_state = os.path.join(work, "teacher_state")
    assert cli_main(["export", "--state-only", "--config", CONFIG, "--checkpoint", gain_dir, "--output", teacher_state,
                     *gain_overrides]) == 0
    frozen_overrides = _common(attached_schema, os.path.join(work, "frozen")) + [
        "elec.task=distill", "elec.vector_dim=16", "elec.distill.mode=frozen", f"elec.teacher_checkpoint={teacher_state}",
    ]
    frozen = run_training(load_config(CONFIG, frozen_overrides))
    # resumed with one more epoch after the teacher's file moved: the checkpoint holds the teacher
    os.rename(teacher_state, f"{teacher_state}.moved")
    frozen["resumed_without_teacher_file"] = run_training(load_config(CONFIG, frozen_overrides + ["train.epochs=3"]))
    os.rename(f"{teacher_state}.moved", teacher_state)
    served = os.path.join(work, "served")
    assert cli_main(["export", "--config", CONFIG, "--checkpoint", offline_dir, "--output", served,
                     *offline_overrides]) == 0
    assert cli_main(["evaluate", "--checkpoint", offline_dir, "--student", *offline_overrides]) == 0
    other_vectors = _other_llms_vectors(gain_config, gain_dir, gain_overrides, frozen_overrides, work, attached)
    offline["students_on_plain_rows"] = _students_on_plain_rows(
        schema_path, {"offline": (load_config(CONFIG, offline_overrides), offline_dir),
                      "joint": (load_config(CONFIG, _common(attached_schema, joint_dir) + [
                          "elec.task=distill", "elec.vector_dim=16", "elec.distill.mode=joint"]), joint_dir),
                      "gain": (gain_config, gain_dir)})
    return {"gain": gain, "offline": offline, "joint": joint, "frozen": frozen, "teacher_schema": teacher_schema,
            "served": served, "teacher_check": teacher_check, "other_teacher_refusal": other_teacher_refusal, "into_data": into_data,
            "other_vectors": other_vectors}


def _students_on_plain_rows(schema_path: str, runs: Dict[str, Tuple[Any, str]]) -> Dict[str, Any]:
    """`evaluate --student` of each run on the plain test split (no LLM vector, no teacher output), and what a whole
    distillation run's evaluation (or a gain network's --student) says of it."""
    from recsys_llm.train.trained_run import run_evaluation

    plain_test = DatasetSchema.load(schema_path).split_path("test")
    result: Dict[str, Any] = {}
    for name, (config, run_dir) in runs.items():
        for student in (True, False):
            try:
                result[name, student] = run_evaluation(config, run_dir, plain_test, student=student)
            except ValueError as error:  # ConfigError is one
                result[name, student] = str(error)
    config, run_dir = runs["offline"]
    result["offline", "its test split"] = run_evaluation(config, run_dir, student=True)  # a split named, not a path
    return result


def _other_llms_vectors(gain_config: Any, gain_dir: str, gain_overrides: List[str], frozen_overrides: List[str],
                        work: str, attached: str) -> Dict[str, Any]:
    """What evaluate and a frozen student say of the data with per-row vectors of another adapted LLM attached (the
    attached copies' record of the export's provenance, as `semantics export --attach-dir` of another LLM writes)."""
    from recsys_llm.semantics.vector_reader import ROW_VECTORS_METADATA_KEY
    from recsys_llm.train.teacher_outputs import write_teacher_outputs
    from recsys_llm.train.trained_run import run_evaluation

    other = os.path.join(work, "attached_other_llm")
    shutil.copytree(attached, other)
    for name in os.listdir(other):
        if name.endswith(".parquet"):
            path = os.path.join(other, name)
            table = pq.read_table(path)
            record = json.loads(table.schema.metadata[ROW_VECTORS_METADATA_KEY])
            record["weights_sha256"] = "another_adapted_llm"
            metadata = {**table.schema.metadata, ROW_VECTORS_METADATA_KEY: json.dumps(record).encode()}
            pq.write_table(table.replace_schema_metadata(metadata), path)
    with open(os.path.join(gain_dir, "plugins.json"), encoding="utf-8") as handle:
        result: Dict[str, Any] = {"recorded": json.load(handle)["elec"].get("row_vectors")}
    data = [f"data.schema={os.path.join(other, 'schema.json')}"]
    mixed = os.path.join(work, "attached_mixed")  # an attach stopped part-way: train's vectors, another LLM's valid
    shutil.copytree(attached, mixed)
    shutil.copy(os.path.join(other, "valid.parquet"), os.path.join(mixed, "valid.parquet"))
    attempts = {"evaluate": lambda: run_evaluation(load_config(CONFIG, gain_overrides + data), gain_dir),
                "evaluate_file": lambda: run_evaluation(gain_config, gain_dir, os.path.join(other, "test.parquet")),
                "mixed": lambda: run_training(load_config(CONFIG, gain_overrides + [
                    f"data.schema={os.path.join(mixed, 'schema.json')}",
                    f"train.run_dir={os.path.join(work, 'gain_mixed')}"])),
                "teacher_outputs_mixed": lambda: write_teacher_outputs(
                    load_config(CONFIG, gain_overrides + [f"data.schema={os.path.join(mixed, 'schema.json')}"]),
                    gain_dir, os.path.join(work, "teacher_mixed")),
                "frozen": lambda: run_training(load_config(CONFIG, frozen_overrides + data + [
                    f"train.run_dir={os.path.join(work, 'frozen_other_llm')}"]))}
    for name, attempt in attempts.items():
        try:
            attempt()
            result[name] = None
        except ConfigError as error:
            result[name] = str(error)
    result["evaluate_same"] = run_evaluation(gain_config, gain_dir)["auc"]  # the vectors it trained on: evaluated
    return result


@pytest.mark.multiprocess
def test_elec_workflow_from_llm_to_served_student(small_synthetic: str, tmp_path) -> None:
    llm = save_tiny_bert(str(tmp_path / "tiny_bert"))
    work = str(tmp_path / "work")
    (out,) = run_multiprocess(_elec_workflow, world_size=1, schema_path=small_synthetic, work=work, llm=llm)

    teacher_schema = DatasetSchema.load(out["teacher_schema"])
    assert {"llm_vector", "teacher_logits", "teacher_representation"} <= set(teacher_schema.extra_columns)
    test_file = teacher_schema.split_path("test")
    columns = pq.read_table(test_file, columns=["teacher_logits", "teacher_representation"])
    assert columns.num_rows == pq.ParquetFile(DatasetSchema.load(small_synthetic).split_path("test")).metadata.num_rows
    assert columns.schema.field("teacher_representation").type.list_size > 0
    predicted, written = out["teacher_check"]
    torch.testing.assert_close(written.float(), predicted.float(), rtol=1e-4, atol=1e-4)  # row by row
    code, message, data_unchanged = out["into_data"]
    assert code == 2 and "is the input data's own directory; the copies with teacher columns need another" in message
    assert data_unchanged
    assert "holds teacher outputs of another teacher checkpoint" in out["other_teacher_refusal"]
    assert "(differing: train_state.json)" in out["other_teacher_refusal"]

    for name in ("gain", "offline", "joint", "frozen"):
        assert out[name]["test"]["auc"] > 0.5, (name, out[name]["test"])
    refusal, progress, written = out["gain"]["export_refusal"]
    assert refusal.startswith("export: the task injects per-row LLM vectors") and "export the student" in refusal
    assert "loading" not in progress and "writing" not in progress and not written, progress
    width = columns.schema.field("teacher_representation").type.list_size
    assert out["offline"]["wrong_dim_error"] == (
        f"elec.distill.teacher_representation_dim=7, but the column 'teacher_representation' holds {width}-d "
        f"teacher representations; set it to {width} or leave it out (0: read from the column)")
    assert not os.path.exists(os.path.join(work, "offline_wrong_dim"))
    resumed = out["frozen"]["resumed_without_teacher_file"]
    assert resumed["epochs"] == 3 and resumed["global_step"] > out["frozen"]["global_step"]
    other = out["other_vectors"]
    assert other["recorded"]["column"] == "llm_vector" and other["recorded"]["granularity"] == "row"
    assert other["evaluate"].startswith(f"{os.path.join(work, 'gain', 'plugins.json')}: the data's per-row LLM "
                                        "vectors are not the ones this run's network trained on (weights_sha256: ")
    assert "-> 'another_adapted_llm'); attach the vectors it trained on" in other["evaluate"]
    assert other["frozen"].startswith("elec.teacher_checkpoint=") and "the frozen teacher trained on other per-row " \
        "LLM vectors than" in other["frozen"], other["frozen"]
    assert not os.path.exists(os.path.join(work, "frozen_other_llm", "checkpoints")) and other["evaluate_same"] > 0.5
    assert other["evaluate_file"].startswith(f"split {os.path.join(work, 'attached_other_llm', 'test.parquet')}: "
                                             "its per-row LLM vectors are not the ones the run of "), other
    assert "-> 'another_adapted_llm')" in other["evaluate_file"]
    assert "split 'valid' holds other per-row LLM vectors than split 'train'" in other["mixed"], other["mixed"]
    assert not os.path.exists(os.path.join(work, "gain_mixed", "checkpoints"))
    # the run's data mixed after training: teacher-outputs reads every split, and refuses before writing
    assert other["teacher_outputs_mixed"].startswith("split valid: its per-row LLM vectors are not the ones the run "
                                                     "of "), other["teacher_outputs_mixed"]
    assert not os.path.exists(os.path.join(work, "teacher_mixed"))
    # the students alone on rows without LLM vectors or teacher outputs, as the served artifact scores them
    from recsys_llm.serving.scoring import score_split

    evaluated = out["offline"]["students_on_plain_rows"]
    served_report = score_split(ServedModel.load(out["served"], trust_program=True),
                                DatasetSchema.load(small_synthetic), "test", progress=False)
    assert evaluated["offline", True]["model"] == "student"
    assert evaluated["offline", True]["auc"] == pytest.approx(served_report["auc"], abs=1e-6)
    assert evaluated["offline", True]["logloss"] == pytest.approx(served_report["logloss"], abs=1e-5)
    assert evaluated["offline", True]["loss"] == pytest.approx(served_report["logloss"], abs=1e-5)  # no KD term
    assert evaluated["offline", "its test split"]["auc"] == evaluated["offline", True]["auc"]  # the same rows
    assert "no column(s) ['teacher_logits', 'teacher_representation'], which the distillation's teacher side reads; " \
        "evaluate the student alone, as it serves, with evaluate --student" in evaluated["offline", False]
    assert evaluated["joint", True]["auc"] > 0.5 and "no column(s) ['llm_vector']" in evaluated["joint", False]
    assert evaluated["joint", True]["loss"] == pytest.approx(evaluated["joint", True]["logloss"], abs=1e-5)
    assert evaluated["gain", True].startswith("--student: ")
    assert "is no ELEC distillation run" in evaluated["gain", True]
    state = load_state_file(out["served"])
    assert state and not any(("teacher" in k) or ("injection" in k) or ("semantic" in k) for k in state), sorted(state)
    served = ServedModel.load(out["served"], trust_program=True)
    batch = next(iter(ParquetBatchReader(DatasetSchema.load(small_synthetic), "test", 64)))
    logits = served.logits(batch.dense_features, batch.sparse_features)
    assert logits.shape == (64,) and torch.isfinite(logits).all()


ITEM_FIELDS = list(SYNTHETIC_ITEM_FIELDS)


def _swapped_pairs_student(schema_path: str, run_dir: str, vectors: str) -> Dict[str, Any]:
    from recsys_llm.train.task_builder import build_task, swapped_pairs

    overrides = _common(schema_path, run_dir) + [
        "elec.task=distill", "elec.vector_dim=16", "elec.vector_source=entity_table", "elec.entity_field=item_id",
        f"elec.entity_vectors={vectors}", "elec.distill.mode=joint", "elec.distill.alpha=5",
        f"elec.distill.swap_fields=[{','.join(ITEM_FIELDS)}]",
        f"elec.distill.swap_catalog={os.path.join(os.path.dirname(schema_path), ITEM_CATALOG)}",
    ]
    config = load_config(CONFIG, overrides)
    schema = DatasetSchema.load(schema_path)
    swap = swapped_pairs(build_task(config, schema, torch.device("cpu")), schema, config.train.seed)
    result = run_training(config)
    result["swap_sparse_fields"] = swap.sparse_fields
    result["catalog_rows"] = swap.catalog.num_rows
    return result


@pytest.mark.multiprocess
def test_elec_student_learns_on_catalogue_pairs_with_two_ranks(small_synthetic: str, tmp_path) -> None:
    import numpy as np

    schema = DatasetSchema.load(small_synthetic)
    items = schema.field("item_id").cardinality
    vectors = str(tmp_path / "items")
    export_entity_table(vectors, np.random.default_rng(0).normal(size=(items, 16)))
    run_dir = str(tmp_path / "run")
    results = run_multiprocess(_swapped_pairs_student, world_size=2, schema_path=small_synthetic, run_dir=run_dir,
                               vectors=vectors)
    for result in results:
        assert result["world_size"] == 2 and result["test"]["auc"] > 0.5, result["test"]
        assert result["swap_sparse_fields"] == ["item_id", "item_category", "item_tags"]
        assert result["catalog_rows"] == items - 1  # every item id but 0 (unknown), cold items included
    with open(os.path.join(run_dir, "plugins.json"), encoding="utf-8") as handle:
        assert json.load(handle)["elec"]["distill"]["swap_fields"] == ITEM_FIELDS
    events = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8")]
    epoch = next(e for e in events if e["event"] == "epoch")
    # the runner trained on doubled batches: every training row plus one catalogue pair per row
    train_rows = pq.ParquetFile(schema.split_path("train")).metadata.num_rows
    assert epoch["samples"] == 2 * train_rows


def _train_plain(overrides: List[str]) -> Dict[str, Any]:
    return run_training(load_config(CONFIG, overrides))


def _evaluate(overrides: List[str], checkpoint: str) -> Dict[str, Any]:
    from recsys_llm.train.trained_run import run_evaluation

    return run_evaluation(load_config(CONFIG, overrides), checkpoint)


def _teacher_outputs(overrides: List[str], checkpoint: str, output_dir: str, batch_size: int,
                     splits: Optional[List[str]] = None) -> Dict[str, Any]:
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    return write_teacher_outputs(load_config(CONFIG, overrides), checkpoint, output_dir, batch_size=batch_size,
                                 progress=False, splits=splits)


def _teacher_outputs_failing_on_rank_0(overrides: List[str], checkpoint: str, output_dir: str, batch_size: int) -> str:
    """The error each rank ends with when rank 0 cannot write a copy (a full disk, simulated)."""
    os.environ["RECSYS_LLM_DIST_TIMEOUT_S"] = "120"  # a rank left waiting fails the test instead of hanging it
    from recsys_llm.train import teacher_output_stream

    if os.environ["RANK"] == "0":
        def disk_full(*args: Any, **kwargs: Any) -> None:
            raise OSError(28, "No space left on device")

        # at rank 0's own outputs, before rank 1's are received: rank 1 must not be left in its send
        teacher_output_stream.TeacherColumnsWriter.add = disk_full
    try:
        _teacher_outputs(overrides, checkpoint, output_dir, batch_size)
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


def _teacher_outputs_error(overrides: List[str], checkpoint: str, output_dir: str, batch_size: int) -> str:
    """The error a rank ends with (``"no error"`` if none)."""
    os.environ["RECSYS_LLM_DIST_TIMEOUT_S"] = "120"  # a rank left waiting fails the test instead of hanging it
    try:
        _teacher_outputs(overrides, checkpoint, output_dir, batch_size)
    except Exception as error:  # noqa: BLE001 - the message is the result
        return f"{type(error).__name__}: {error}"
    return "no error"


@pytest.mark.multiprocess
def test_teacher_outputs_of_two_sharded_ranks_match_one_rank(tmp_path) -> None:
    """Each rank runs its shards over its rows; rank 0 with one batch fewer pads the collectives
    (so does the validation of the 2-rank training run, which still scores every row)."""
    generate_synthetic(str(tmp_path / "data"), 3_010, seed=2, rows_per_group=256)
    schema_path = str(tmp_path / "data" / "schema.json")
    schema = DatasetSchema.load(schema_path)
    valid_rows = pq.ParquetFile(schema.split_path("valid")).metadata.num_rows
    assert valid_rows % 2 == 1  # ranks get (N - 1) / 2 and (N + 1) / 2 rows
    batch_size = valid_rows // 2  # so rank 0 runs 1 batch and rank 1 runs 2 on the valid split
    overrides = _common(schema_path, str(tmp_path / "run")) + ["train.epochs=1", f"data.eval_batch_size={batch_size}"]
    trained = run_multiprocess(_train_plain, world_size=2, overrides=overrides)
    test_rows = pq.ParquetFile(schema.split_path("test")).metadata.num_rows
    assert trained[0]["test"]["num_samples"] == trained[1]["test"]["num_samples"] == test_rows
    events = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8")]
    assert [e["num_samples"] for e in events if e["event"] == "valid"] == [valid_rows]
    # `recsys-llm evaluate` of the run's best checkpoint, on 2 ranks and on 1 (shards re-cut), gives its test metrics
    for world_size in (2, 1):
        evaluated = run_multiprocess(_evaluate, world_size=world_size, overrides=overrides, checkpoint=str(tmp_path / "run"))
        assert evaluated[0]["num_samples"] == test_rows
        assert evaluated[0]["auc"] == pytest.approx(trained[0]["test"]["auc"], abs=1e-6)
        assert evaluated[0]["logloss"] == pytest.approx(trained[0]["test"]["logloss"], abs=1e-6)
    # data of another schema (here: a field described otherwise) is refused before any model is built
    other = tmp_path / "other_data"
    shutil.copytree(tmp_path / "data", other)
    raw = json.loads((other / "schema.json").read_text())
    raw["fields"][0]["description"] = "something else"
    (other / "schema.json").write_text(json.dumps(raw))
    other_overrides = [o for o in overrides if not o.startswith("data.schema=")] + [f"data.schema={other / 'schema.json'}"]
    with pytest.raises(RuntimeError, match="trained on data with schema fingerprint .* use data prepared like"):
        run_multiprocess(_evaluate, world_size=1, overrides=other_overrides, checkpoint=str(tmp_path / "run"))
    outputs = {}
    for world_size in (2, 1):
        out = str(tmp_path / f"teacher_{world_size}")
        (report, *_) = run_multiprocess(_teacher_outputs, world_size=world_size, overrides=overrides,
                                        checkpoint=str(tmp_path / "run"), output_dir=out, batch_size=batch_size)
        outputs[world_size] = report
        assert not [name for name in os.listdir(out) if name.endswith(".tmp")]  # rank 1's spills are gone
    assert len(outputs[2]["files"]) == 3
    for split, sharded_file, single_file in zip(sorted(schema.splits), outputs[2]["files"], outputs[1]["files"]):
        sharded, single = pq.read_table(sharded_file), pq.read_table(single_file)
        assert sharded.num_rows == single.num_rows == pq.ParquetFile(schema.split_path(split)).metadata.num_rows
        assert sharded.drop_columns(["teacher_logits", "teacher_representation"]).equals(
            single.drop_columns(["teacher_logits", "teacher_representation"]))
        for column in ("teacher_logits", "teacher_representation"):
            got = torch.tensor(sharded.column(column).to_pylist())
            torch.testing.assert_close(got, torch.tensor(single.column(column).to_pylist()), rtol=1e-5, atol=1e-5)
    # rank 0 fails to write the first copy: every rank stops there with the reason
    failed = run_multiprocess(_teacher_outputs_failing_on_rank_0, world_size=2, overrides=overrides,
                              checkpoint=str(tmp_path / "run"), output_dir=str(tmp_path / "failed"), batch_size=batch_size)
    copy = str(tmp_path / "failed" / "test.parquet")  # the copy being written is named
    assert failed[0] == f"OSError: [Errno 28] No space left on device: {copy!r}", failed
    assert failed[1].startswith("RuntimeError: rank 0 failed to write") and "Errno 28" in failed[1], failed
    # finished copies of another trained teacher: rank 0 alone reads teacher.json, and every rank stops with its refusal
    from recsys_llm.train.teacher_outputs import TEACHER_FILE

    record_path = tmp_path / "teacher_2" / TEACHER_FILE
    record = json.loads(record_path.read_text(encoding="utf-8"))
    record["sha256"] = {name: "0" * 64 for name in record["sha256"]}  # as a teacher trained again records it
    record_path.write_text(json.dumps(record), encoding="utf-8")
    refused = run_multiprocess(_teacher_outputs_error, world_size=2, overrides=overrides,
                               checkpoint=str(tmp_path / "run"), output_dir=str(tmp_path / "teacher_2"),
                               batch_size=batch_size)
    assert refused[0] == refused[1] and refused[0].startswith("ValueError: "), refused
    assert "holds teacher outputs of another teacher checkpoint" in refused[0], refused
    # a schema whose valid and test splits name one file: each split gets its copy (one was never written)
    shared = dict(json.loads((tmp_path / "data" / "schema.json").read_text()))
    shared["splits"] = {**shared["splits"], "valid": shared["splits"]["test"]}
    (tmp_path / "data" / "shared_file.json").write_text(json.dumps(shared))
    shared_overrides = [o for o in overrides if not o.startswith("data.schema=")] + [
        f"data.schema={tmp_path / 'data' / 'shared_file.json'}"]
    (report, *_) = run_multiprocess(_teacher_outputs, world_size=1, overrides=shared_overrides,
                                    checkpoint=str(tmp_path / "run"), output_dir=str(tmp_path / "shared_out"),
                                    batch_size=batch_size)
    copied = DatasetSchema.load(report["schema"])
    assert pq.read_table(copied.split_path("valid")).equals(pq.read_table(copied.split_path("test")))
    # a later run over the train split alone keeps valid / test pointing at their copies, not at the source data
    (report, *_) = run_multiprocess(_teacher_outputs, world_size=1, overrides=overrides, checkpoint=str(tmp_path / "run"),
                                    output_dir=str(tmp_path / "teacher_1"), batch_size=batch_size, splits=["train"])
    again = DatasetSchema.load(report["schema"])
    assert all(os.path.dirname(again.split_path(split)) == str(tmp_path / "teacher_1") for split in schema.splits)

