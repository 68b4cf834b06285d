"""Every method mode of ``recsys-llm train`` resumes exactly: LLaCTR (FRE + FIE), the ELEC gain
network (entity vectors in frozen tables) and the ELEC students (joint, frozen teacher,
offline teacher columns, swapped pairs within the batch and from the item catalogue).

One process trains each mode twice on a small data set: straight through, and killed right
after a mid-epoch checkpoint of its second epoch, then resumed. Both end with the same test
metrics and the same final weights, bit for bit (a state-only export of the last checkpoint).
"""

import json
import os
from typing import Any, Dict, List

import numpy as np
import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS, generate_synthetic
from recsys_llm.train.checkpoint import TrainState
from recsys_llm.train.config import load_config
from recsys_llm.train.run_records import METRICS_FILE, current_records
from recsys_llm.train.runner import run_training
from tests.entity_vectors import export_entity_table
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")
KILL_AT = 20  # 13 steps per epoch of 1,600 rows at 128: mid epoch 1, right after its step-20 checkpoint

MODES = ["llactr", "gain", "joint", "frozen", "offline", "swap_fields", "swap_catalog"]


class _Killed(BaseException):
    """Stands in for a SIGKILL right after the step's checkpoint was written."""


def _kill_at(state: TrainState) -> None:
    if state.global_step == KILL_AT:
        raise _Killed()


def _common(schema: str, run_dir: str, device: str = "cpu", mixed_precision: str = "fp32") -> List[str]:
    return [f"train.mixed_precision={mixed_precision}",
        f"data.schema={schema}", "data.batch_size=128", "data.eval_batch_size=512", "data.synthetic_rows=0",
        "train.epochs=2", "train.patience=0", "train.progress=false", f"train.device={device}", f"train.run_dir={run_dir}",
        "train.checkpoint_every=5", "model.mlp_layer_sizes=[16]", "model.embedding_dim=8", "model.dropout=0.1",
    ]


def _final_weights(overrides: List[str], run_dir: str, out: str) -> Dict[str, torch.Tensor]:
    from recsys_llm.serving import load_state_file
    from recsys_llm.cli.export import export_run
    from recsys_llm.train.checkpoint import CheckpointManager

    latest = CheckpointManager(os.path.join(run_dir, "checkpoints")).latest()
    export_run(load_config(CONFIG, overrides), latest, out, state_only=True)
    return load_state_file(out)


def _straight_and_resumed(name: str, overrides: List[str], work: str) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for how in ("straight", "killed"):
        run_dir = os.path.join(work, f"{name}_{how}")
        run = overrides + [f"train.run_dir={run_dir}"]
        if how == "killed":
            try:
                run_training(load_config(CONFIG, run), on_step=_kill_at)
                raise AssertionError(f"{name}: the run was not killed")
            except _Killed:
                pass
        result = run_training(load_config(CONFIG, run))
        with open(os.path.join(run_dir, METRICS_FILE), encoding="utf-8") as handle:
            events = [json.loads(line) for line in handle]
        weights = _final_weights(run, run_dir, os.path.join(work, f"{name}_{how}_w"))
        out[how] = {"result": result, "weights": weights, "events": events}
    return out


def _all_modes(work: str, device: str = "cpu", mixed_precision: str = "fp32") -> Dict[str, Any]:
    from recsys_llm.semantics.store import VectorProvenance, save_vectors
    from recsys_llm.cli.export import export_run
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    data = os.path.join(work, "data")
    generate_synthetic(data, 2_000, seed=1, rows_per_group=512)
    schema_path = os.path.join(data, "schema.json")
    schema = DatasetSchema.load(schema_path)
    base = _common(schema_path, os.path.join(work, "unused"), device, mixed_precision)

    names = schema.sparse_feature_names
    fields = os.path.join(work, "fields.safetensors")
    provenance = VectorProvenance(model_id="test", model_hash="h", pooling="mean", template="{name}: {description}")
    save_vectors(fields, torch.randn(len(names), 12, generator=torch.Generator().manual_seed(0)), names,
                 provenance.for_schema(schema))
    items = schema.field("item_id").cardinality
    entity = os.path.join(work, "items")
    export_entity_table(entity, np.random.default_rng(0).normal(size=(items, 8)))

    elec = ["elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={entity}"]
    gain = base + ["elec.task=gain", *elec]
    joint = base + ["elec.task=distill", *elec, "elec.distill.mode=joint", "elec.distill.alpha=2"]
    swap = [f"elec.distill.swap_fields=[{','.join(ITEM_FIELDS)}]"]
    results = {"gain": _straight_and_resumed("gain", gain, work)}

    teacher_run = os.path.join(work, "gain_straight")
    teacher_state = os.path.join(work, "teacher_state")
    export_run(load_config(CONFIG, gain + [f"train.run_dir={teacher_run}"]), teacher_run, teacher_state,
               state_only=True)
    teacher_data = os.path.join(work, "teacher_data")
    write_teacher_outputs(load_config(CONFIG, gain + [f"train.run_dir={teacher_run}"]), teacher_run, teacher_data,
                          batch_size=512, progress=False)
    modes = {
        "llactr": base + [f"llactr.vectors_path={fields}", "llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1"],
        "joint": joint,
        "frozen": base + ["elec.task=distill", *elec, "elec.distill.mode=frozen",
                          f"elec.teacher_checkpoint={teacher_state}"],
        "offline": _common(os.path.join(teacher_data, "schema.json"), os.path.join(work, "unused"), device,
                           mixed_precision) + [
            "elec.task=distill", "elec.vector_dim=8", "elec.distill.mode=offline", "elec.distill.beta=0.1"],
        "swap_fields": joint + swap,
        "swap_catalog": joint + swap + [f"elec.distill.swap_catalog={os.path.join(data, ITEM_CATALOG)}"],
    }
    for name, overrides in modes.items():
        results[name] = _straight_and_resumed(name, overrides, work)
    return results


@pytest.fixture(scope="module")
def trained_modes(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    (results,) = run_multiprocess(_all_modes, world_size=1, work=str(tmp_path_factory.mktemp("modes")))
    return results


@pytest.fixture(scope="module")
def trained_modes_bf16(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    (results,) = run_multiprocess(_all_modes, world_size=1, work=str(tmp_path_factory.mktemp("modes_bf16")),
                                  mixed_precision="bf16")
    return results


def check_resumed_like_straight(runs: Dict[str, Any], mode: str) -> None:
    """The killed-and-resumed run of ``mode`` ends as the straight one: metrics, and weights bit for bit."""
    straight, resumed = runs["straight"], runs["killed"]
    assert straight["result"]["global_step"] == resumed["result"]["global_step"] > KILL_AT
    assert [e["global_step"] for e in resumed["events"] if e["event"] == "resumed"] == [KILL_AT]
    assert [e.get("resumed_at_step_in_epoch") for e in resumed["events"] if e["event"] == "epoch"][-1] > 0  # mid epoch
    assert resumed["result"]["test"] == straight["result"]["test"], mode
    losses = [[(e["global_step"], e["mean_loss"], e["loss_steps"]) for e in current_records(run["events"])
               if e["event"] == "epoch"] for run in (resumed, straight)]
    assert losses[0] == losses[1], mode  # the resumed epoch's mean loss counts the steps before the kill
    assert resumed["result"]["valid"] == straight["result"]["valid"], mode
    assert sorted(resumed["weights"]) == sorted(straight["weights"])
    differ = [key for key, value in straight["weights"].items() if not torch.equal(value, resumed["weights"][key])]
    assert not differ, f"{mode}: weights differ after the resume: {differ}"


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_a_method_run_killed_mid_epoch_resumes_to_the_uninterrupted_run(trained_modes: Dict[str, Any],
                                                                       mode: str) -> None:
    check_resumed_like_straight(trained_modes[mode], mode)


@pytest.mark.multiprocess
@pytest.mark.parametrize("mode", MODES)
def test_a_method_run_under_bf16_autocast_trains_and_resumes_exactly(trained_modes_bf16: Dict[str, Any],
                                                                    trained_modes: Dict[str, Any], mode: str) -> None:
    """train.mixed_precision=bf16 in every method mode: FRE / FIE's kernels, the KD losses, the frozen teacher
    and entity tables under autocast; the resume bit for bit, the metrics near float32's but not the same."""
    check_resumed_like_straight(trained_modes_bf16[mode], mode)
    bf16, fp32 = trained_modes_bf16[mode]["straight"]["result"], trained_modes[mode]["straight"]["result"]
    assert bf16["test"] != fp32["test"], mode
    assert bf16["test"]["auc"] == pytest.approx(fp32["test"]["auc"], abs=0.03), mode


def _item_export(directory: str, items: int, model: str, seed: int) -> None:
    export_entity_table(directory, np.random.default_rng(seed).normal(size=(items, 8)), model)


def _resume_over_entity_vectors_exported_again(work: str) -> Dict[str, Any]:
    import shutil

    from recsys_llm.train.config import ConfigError

    data = os.path.join(work, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    schema_path = os.path.join(data, "schema.json")
    items = DatasetSchema.load(schema_path).field("item_id").cardinality
    entity = os.path.join(work, "items")
    _item_export(entity, items, "a", seed=0)
    gain = _common(schema_path, os.path.join(work, "run")) + [
        "elec.task=gain", "elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id"]
    run_training(load_config(CONFIG, gain + [f"elec.entity_vectors={entity}", "train.max_steps=1"]))
    with open(os.path.join(work, "run", "plugins.json"), encoding="utf-8") as handle:
        recorded = json.load(handle)["elec"]["entity_vectors"]
    shutil.rmtree(entity)
    _item_export(entity, items, "a", seed=0)  # exported again alike: the resume goes on
    again = run_training(load_config(CONFIG, gain + [f"elec.entity_vectors={entity}", "train.max_steps=2"]))
    shutil.rmtree(entity)
    _item_export(entity, items, "b", seed=1)  # exported again by another model
    try:
        run_training(load_config(CONFIG, gain + [f"elec.entity_vectors={entity}", "train.max_steps=3"]))
        refusal = None
    except ConfigError as error:
        refusal = str(error)
    return {"recorded": recorded, "again_step": again["global_step"], "refusal": refusal}


@pytest.mark.multiprocess
def test_a_resume_over_entity_vectors_exported_again_by_another_model_is_refused(tmp_path) -> None:
    (out,) = run_multiprocess(_resume_over_entity_vectors_exported_again, world_size=1, work=str(tmp_path))
    assert out["recorded"]["item_id"]["model"] == "a" and out["recorded"]["item_id"]["keys_sha256"]
    assert out["again_step"] == 2
    assert out["refusal"] is not None and "the entity vector exports now hold other vectors" in out["refusal"]
    assert "item_id (model: 'a' -> 'b')" in out["refusal"]


def test_a_run_recorded_before_exports_wrote_their_vocabulary_resumes_over_the_same_vectors_exported_again() -> None:
    """A gain run of a version before 2026-12-06 recorded its entity export without ``vocabulary``; the same vectors
    exported again by this version carry it. That is no change (the keys' hash and count still pin the ids), while
    another model, or a vocabulary that both records hold and that differs, still is."""
    from recsys_llm.train.run_records import changed_entity_vectors

    old = {"model": "a", "keys_sha256": "k1", "num_rows": "100"}
    again = dict(old, vocabulary='{"digest": "d1", "ids": 101}')

    def plugins(record: Dict[str, str]) -> Dict[str, Any]:
        return {"elec": {"entity_vectors": {"item_id": record}}}

    assert changed_entity_vectors(plugins(old), plugins(again)) == []
    assert changed_entity_vectors(plugins(old), plugins(dict(again, model="b"))) == ["item_id (model: 'a' -> 'b')"]
    assert changed_entity_vectors(plugins(again), plugins(dict(again, vocabulary="other"))) == [
        "item_id (vocabulary: '{\"digest\": \"d1\", \"ids\": 101}' -> 'other')"]
    assert changed_entity_vectors(plugins(again), plugins(old)) == [
        "item_id (vocabulary: '{\"digest\": \"d1\", \"ids\": 101}' -> None)"]
