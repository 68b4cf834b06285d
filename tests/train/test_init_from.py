"""``train.init_from``: a new run starts from another run's weights (and optimizer state)."""

import contextlib
import glob
import io
import json
import os
import shutil
from typing import Any, Dict, List
from unittest import mock

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.file_hash import file_sha256
from recsys_llm.serving.state import unsharded_state_dict
from recsys_llm.train import runner
from recsys_llm.train.checkpoint import DIGESTS_FILE
from recsys_llm.train.checkpoint_reader import SafeFileSystemReader, WeightsOnlyLoadPlanner
from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.init_from import INIT_FROM_KEY, _check_optimizer_state_fits, start_line
from recsys_llm.train.resume import stateful_tables
from recsys_llm.train.init_tables import TableShape, shared_tables, trained_tables
from recsys_llm.train.runner import run_training
from tests.entity_vectors import export_entity_table
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _run(schema_dir: str, run_dir: str, extra: List[str] = ()) -> Dict[str, Any]:
    """One epoch of DeepFM in a fixed row order, scored on the test split with its last weights (no validation)."""
    return run_training(load_config(DEEPFM_CONFIG, [
        f"data.schema={schema_dir}", "data.batch_size=1024", "data.eval_batch_size=1024", "data.synthetic_rows=0",
        "data.shuffle=false", "data.valid_split=", "train.epochs=1", "train.checkpoint_every=0",
        "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}", *extra,
    ]))


def _record(run_dir: str) -> Dict[str, Any]:
    with open(os.path.join(run_dir, "plugins.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _events(run_dir: str) -> List[Dict[str, Any]]:
    with open(os.path.join(run_dir, "metrics.jsonl"), encoding="utf-8") as handle:
        return [json.loads(line) for line in handle]


def _continue_on_the_next_day(schema_dir: str, root: str) -> Dict[str, Any]:
    day1, day2 = os.path.join(root, "day1"), os.path.join(root, "day2")
    out = {"day1": _run(schema_dir, day1)}
    out["two_epochs"] = _run(schema_dir, os.path.join(root, "two_epochs"), ["train.epochs=2"])
    out["day2"] = _run(schema_dir, day2, [f"train.init_from={day1}"])
    out["day2_record"] = _record(day2)[INIT_FROM_KEY]
    out["day2_started"] = _events(day2)[0]
    out["weights_only"] = _run(schema_dir, os.path.join(root, "weights_only"),
                               [f"train.init_from={day1}", "train.init_optimizer=false"])
    out["weights_only_record"] = _record(os.path.join(root, "weights_only"))[INIT_FROM_KEY]
    out["fresh"] = _run(schema_dir, os.path.join(root, "fresh"))
    # the finished run given a second epoch goes on from its own checkpoint, not from train.init_from again
    out["day2_extended"] = _run(schema_dir, day2, [f"train.init_from={day1}", "train.epochs=2"])
    out["day2_extended_record"] = _record(day2)[INIT_FROM_KEY]
    out["day2_events"] = [event["event"] for event in _events(day2)]
    return out


@pytest.mark.multiprocess
def test_a_run_started_from_another_runs_weights_and_optimizer_state_goes_on_as_that_run_would(
        synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_continue_on_the_next_day, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    steps = out["day1"]["global_step"]
    # one more epoch of the same rows from day 1's weights and optimizer state is day 1's second epoch
    assert out["day2"]["test"] == out["two_epochs"]["test"]
    assert out["day2"]["global_step"] == steps  # its own position: step 0, epoch 0
    assert out["weights_only"]["test"] != out["two_epochs"]["test"]  # Adagrad's step sizes start again
    assert out["weights_only"]["test"]["auc"] > out["fresh"]["test"]["auc"]
    record = out["day2_record"]
    assert record["checkpoint"] == os.path.join(str(tmp_path), "day1", "checkpoints", f"ckpt-{steps:08d}")
    assert record["global_step"] == steps and record["optimizer"] is True
    assert out["weights_only_record"]["optimizer"] is False
    assert set(record["digests"]) and all(len(digest) == 64 for digest in record["digests"].values())
    started = {key: value for key, value in out["day2_started"].items() if key not in ("time", "versions", "command")}
    assert started == {"event": "started", "global_step": 0, "epoch": 0, "mixed_precision": "fp32",
                       INIT_FROM_KEY: record["checkpoint"]}
    assert out["day2_extended"]["global_step"] == 2 * steps
    assert out["day2_extended"]["test"] != out["two_epochs"]["test"]  # three epochs in all
    assert out["day2_events"].count("started") == 1 and out["day2_events"].count("resumed") == 1
    assert out["day2_extended_record"] == record


def _start_on_two_ranks(schema_dir: str, run_dir: str, init_from: str) -> Dict[str, Any]:
    # a learning rate too small to move any weight: the test split is scored with the weights it started from
    return _run(schema_dir, run_dir, [f"train.init_from={init_from}", "train.init_optimizer=false", "train.max_steps=1",
                                      "optim.sparse=sgd", "optim.dense=sgd", "optim.sparse_lr=1e-30",
                                      "optim.dense_lr=1e-30"])


@pytest.mark.multiprocess
def test_a_run_on_two_ranks_starts_from_the_weights_of_a_one_rank_run(synthetic_dir: str, tmp_path) -> None:
    day1 = str(tmp_path / "day1")
    (trained,) = run_multiprocess(_run, world_size=1, schema_dir=synthetic_dir, run_dir=day1)
    started = run_multiprocess(_start_on_two_ranks, world_size=2, schema_dir=synthetic_dir,
                               run_dir=str(tmp_path / "day2"), init_from=day1)
    fresh = run_multiprocess(_start_on_two_ranks, world_size=2, schema_dir=synthetic_dir,
                             run_dir=str(tmp_path / "fresh"), init_from="")
    for rank in started:
        assert rank["test"]["auc"] == pytest.approx(trained["test"]["auc"], abs=1e-6)
        assert rank["test"]["logloss"] == pytest.approx(trained["test"]["logloss"], abs=1e-6)
    assert abs(fresh[0]["test"]["auc"] - trained["test"]["auc"]) > 0.01


def _refusals(schema_dir: str, root: str) -> Dict[str, str]:
    day1 = os.path.join(root, "day1")
    _run(schema_dir, day1)
    bare = shutil.copytree(os.path.join(day1, "best" if os.path.isdir(os.path.join(day1, "best")) else "checkpoints"),
                           os.path.join(root, "copied"))
    bare = os.path.join(bare, os.listdir(bare)[0])
    other_schema = shutil.copytree(schema_dir, os.path.join(root, "other_schema"))
    schema_file = os.path.join(other_schema, "schema.json")
    with open(schema_file, encoding="utf-8") as handle:
        schema = json.load(handle)
    schema["fields"][0]["description"] = "another meaning"
    with open(schema_file, "w", encoding="utf-8") as handle:
        json.dump(schema, handle)
    split = shutil.copytree(day1, os.path.join(root, "split"))  # as if its plan had split a table's columns
    with open(os.path.join(split, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    table = plan["t_device"]
    rows, dim = table["shards"][0]["sizes"]
    table["sharding_type"] = "column_wise"
    table["shards"] = [{"offsets": [0, col], "rank": 0, "sizes": [rows, dim // 2]} for col in (0, dim // 2)]
    with open(os.path.join(split, "sharding_plan.json"), "w", encoding="utf-8") as handle:
        json.dump(plan, handle)
    cases = {
        "model": (schema_dir, [f"train.init_from={day1}", "model.embedding_dim=8"]),
        "optimizer": (schema_dir, [f"train.init_from={day1}", "optim.sparse=adagrad"]),
        "dense_optimizer": (schema_dir, [f"train.init_from={day1}", "optim.dense=adagrad"]),
        "column_split": (schema_dir, [f"train.init_from={split}"]),
        "schema": (other_schema, [f"train.init_from={day1}"]),
        "bare": (schema_dir, [f"train.init_from={bare}"]),
        "missing": (schema_dir, [f"train.init_from={os.path.join(root, 'nowhere')}"]),
    }
    errors = {}
    for name, (data, extra) in cases.items():
        run_dir = os.path.join(root, name)
        try:
            _run(data, run_dir, extra)
        except (ConfigError, FileNotFoundError) as error:
            errors[name] = f"{type(error).__name__}: {error}"
        errors[f"{name}_left"] = str(os.path.exists(run_dir))
    return errors


@pytest.mark.multiprocess
def test_a_run_that_cannot_start_from_train_init_from_is_refused_before_it_writes(synthetic_dir: str,
                                                                                tmp_path) -> None:
    (errors,) = run_multiprocess(_refusals, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert "model.embedding_dim: 16 -> 8" in errors["model"] and "train.init_from unset" in errors["model"]
    assert "optim.sparse: 'row_wise_adagrad' -> 'adagrad'" in errors["optimizer"]
    assert "train.init_optimizer=false" in errors["optimizer"]
    assert "optim.dense: 'adam' -> 'adagrad'" in errors["dense_optimizer"]
    assert "column shards" in errors["column_split"] and "set train.init_optimizer=false" in errors["column_split"]
    assert "resume" not in errors["column_split"]  # a new run
    assert "schema fingerprint" in errors["schema"] and "train.init_from=" in errors["schema"]
    assert errors["bare"].startswith("FileNotFoundError") and "outside its run directory" in errors["bare"]
    nowhere = os.path.join(str(tmp_path), "nowhere")
    assert f"train.init_from={nowhere}: {nowhere}: no such checkpoint or run directory; expected" in errors["missing"]
    assert all(errors[f"{name}_left"] == "False"
               for name in ("model", "optimizer", "dense_optimizer", "column_split", "schema", "bare", "missing"))


def _frozen_tables(schema_dir: str, root: str) -> Dict[str, str]:
    day1 = os.path.join(root, "day1")
    _run(schema_dir, day1, ["sharding.frozen_tables=[t_item_id]"])
    out = {}
    try:
        _run(schema_dir, os.path.join(root, "thawed"), [f"train.init_from={day1}"])
    except ConfigError as error:
        out["thawed"] = str(error)
    out["thawed_left"] = str(os.path.exists(os.path.join(root, "thawed")))
    weights_only = _run(schema_dir, os.path.join(root, "weights_only"),
                        [f"train.init_from={day1}", "train.init_optimizer=false"])
    out["weights_only"] = str(weights_only["global_step"])
    # a table trained there and frozen here: its optimizer state is not needed
    frozen = _run(schema_dir, os.path.join(root, "frozen"), [f"train.init_from={day1}",
                                                             "sharding.frozen_tables=[t_item_id,t_user_id]"])
    out["frozen"] = str(frozen["global_step"])
    sgd = ["optim.sparse=sgd", "optim.sparse_lr=0.1"]
    _run(schema_dir, os.path.join(root, "day1_sgd"), ["sharding.frozen_tables=[t_item_id]", *sgd])
    thawed_sgd = _run(schema_dir, os.path.join(root, "thawed_sgd"),
                      [f"train.init_from={os.path.join(root, 'day1_sgd')}", *sgd])
    out["thawed_sgd"] = str(thawed_sgd["global_step"])
    return out


@pytest.mark.multiprocess
def test_a_run_that_trains_a_table_its_init_run_kept_frozen_takes_no_optimizer_state_for_it(
        synthetic_dir: str, tmp_path) -> None:
    """A frozen table has no optimizer state: taking the others' is refused up front, not by a failed load."""
    (out,) = run_multiprocess(_frozen_tables, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert "sharding.frozen_tables: t_item_id frozen there" in out["thawed"]
    assert "train.init_optimizer=false" in out["thawed"] and out["thawed_left"] == "False"
    assert int(out["weights_only"]) > 0 and int(out["frozen"]) > 0
    assert int(out["thawed_sgd"]) > 0  # table SGD keeps no state to miss


def _resume_without_init_source(schema_dir: str, root: str) -> Dict[str, Any]:
    day1, day2 = os.path.join(root, "day1"), os.path.join(root, "day2")
    steps = _run(schema_dir, day1)["global_step"]
    os.chdir(root)  # a relative train.init_from: the record names the checkpoint wherever the next job runs
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        _run(schema_dir, day2, ["train.init_from=day1"])
    record = _record(day2)[INIT_FROM_KEY]
    shutil.move(day1, os.path.join(root, "moved"))  # yesterday's run cleaned up
    resumed = _run(schema_dir, day2, ["train.init_from=day1", "train.epochs=2"])  # not read: the run is gone
    again = _run(schema_dir, day2, ["train.epochs=3"])  # train.init_from no longer given
    return {"steps": steps, "record": record, "resumed": resumed["global_step"], "again": again["global_step"],
            "kept": _record(day2)[INIT_FROM_KEY],
            "printed": printed.getvalue()}


@pytest.mark.multiprocess
def test_a_started_run_resumes_from_its_own_checkpoints_once_its_init_run_is_gone(synthetic_dir: str,
                                                                                   tmp_path) -> None:
    """A resume reads neither train.init_from nor the run it names, and keeps the record of its start."""
    (out,) = run_multiprocess(_resume_without_init_source, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["resumed"] == 2 * out["steps"] and out["again"] == 3 * out["steps"]
    assert out["kept"] == out["record"] and out["record"]["checkpoint"].startswith(str(tmp_path / "day1"))
    assert (f"from the weights and optimizer state of {out['record']['checkpoint']} (its step {out['steps']})"
            in out["printed"])


def _method_run(schema: str, run_dir: str, extra: List[str]) -> Dict[str, Any]:
    return run_training(load_config(DEEPFM_CONFIG, [
        f"data.schema={schema}", "data.batch_size=256", "data.eval_batch_size=512", "data.synthetic_rows=0",
        "data.valid_split=", "train.epochs=1", "train.checkpoint_every=0", "train.progress=false",
        "train.device=cpu", f"train.run_dir={run_dir}", "model.mlp_layer_sizes=[16]", "model.embedding_dim=8",
        *extra,
    ]))


def _llactr_vectors(root: str) -> Dict[str, str]:
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.semantics.store import VectorProvenance, save_vectors

    data = os.path.join(root, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    schema = DatasetSchema.load(os.path.join(data, "schema.json"))
    names = schema.sparse_feature_names
    vectors = torch.randn(len(names), 12, generator=torch.Generator().manual_seed(0))
    files = {}
    for name, model_id in (("trained", "encoder-a"), ("other", "encoder-b")):
        provenance = VectorProvenance(model_id=model_id, model_hash=model_id, pooling="mean", template="{name}")
        files[name] = os.path.join(root, f"{name}.safetensors")
        save_vectors(files[name], vectors, names, provenance.for_schema(schema))
    files["moved"] = shutil.copy(files["trained"], os.path.join(root, "moved.safetensors"))
    llactr = ["llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1"]
    day1 = os.path.join(root, "day1")
    _method_run(data, day1, [f"llactr.vectors_path={files['trained']}", *llactr])
    out = {}
    for name in ("moved", "other"):
        try:
            _method_run(data, os.path.join(root, name),
                        [f"llactr.vectors_path={files[name]}", *llactr, f"train.init_from={day1}"])
            out[name] = "started"
        except ConfigError as error:
            out[name] = str(error)
        out[f"{name}_left"] = str(os.path.exists(os.path.join(root, name)))
    return out


@pytest.mark.multiprocess
def test_a_run_with_other_llactr_field_vectors_than_its_init_run_is_refused(tmp_path) -> None:
    """The checkpoint's FRE / FIE buffers hold the vectors that run trained with: a moved file is fine."""
    (out,) = run_multiprocess(_llactr_vectors, world_size=1, root=str(tmp_path))
    assert out["moved"] == "started"
    assert "other field vectors" in out["other"] and "model_id" in out["other"]
    assert "leave train.init_from unset to train on the new vectors from fresh weights" in out["other"]
    assert out["other_left"] == "False"


def _frozen_teacher(root: str) -> Dict[str, Any]:
    import numpy as np

    from recsys_llm.cli.export import export_run
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.serving import load_state_file

    data = os.path.join(root, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    items = DatasetSchema.load(os.path.join(data, "schema.json")).field("item_id").cardinality
    entity = os.path.join(root, "items")
    export_entity_table(entity, np.random.default_rng(0).normal(size=(items, 8)))
    elec = ["elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={entity}"]
    teachers = []
    for seed in (0, 1):
        gain = [*elec, "elec.task=gain", f"train.seed={seed}"]
        _method_run(data, os.path.join(root, f"gain{seed}"), gain)
        teachers.append(os.path.join(root, f"teacher{seed}"))
        export_run(load_config(DEEPFM_CONFIG, [f"data.schema={data}", "model.mlp_layer_sizes=[16]",
                                               "model.embedding_dim=8", *gain]),
                   os.path.join(root, f"gain{seed}"), teachers[-1], state_only=True)
    weights = {}
    for day, teacher, extra in (("day1", teachers[0], []), ("day2", teachers[1], [f"train.init_from={root}/day1"])):
        frozen = [*elec, "elec.task=distill", "elec.distill.mode=frozen", f"elec.teacher_checkpoint={teacher}"]
        _method_run(data, os.path.join(root, day), [*frozen, *extra])
        export_run(load_config(DEEPFM_CONFIG, [f"data.schema={data}", "model.mlp_layer_sizes=[16]",
                                               "model.embedding_dim=8", *frozen]),
                   os.path.join(root, day), os.path.join(root, f"{day}_state"), state_only=True)
        weights[day] = load_state_file(os.path.join(root, f"{day}_state"))
    second = load_state_file(teachers[1])
    names = [name for name in weights["day2"] if name.startswith("teacher.")]
    return {"teacher_tensors": len(names),
            "own_teacher": all(torch.equal(weights["day2"][name], second[name[len("teacher."):]]) for name in names),
            "init_runs_teacher": all(torch.equal(weights["day2"][name], weights["day1"][name]) for name in names)}


@pytest.mark.multiprocess
def test_a_frozen_teacher_comes_from_the_new_runs_teacher_checkpoint_not_from_its_init_run(tmp_path) -> None:
    """train.init_from loads before the plug-in weights: the frozen teacher (entity table included) is the one named."""
    (out,) = run_multiprocess(_frozen_teacher, world_size=1, root=str(tmp_path))
    assert out["teacher_tensors"] > 0
    assert out["own_teacher"] and not out["init_runs_teacher"]


def _from_runs_with_other_rng_states(schema_dir: str, root: str) -> Dict[str, Any]:
    day1 = os.path.join(root, "day1")
    dropout = ["model.dropout=0.3"]
    _run(schema_dir, day1, dropout)
    other = shutil.copytree(day1, os.path.join(root, "other_rng"))  # the same weights, another RNG state saved
    for rng_file in glob.glob(os.path.join(other, "*", "*", "rank*.pt")):
        state = torch.load(rng_file, weights_only=True)
        state["torch"] = torch.Generator().manual_seed(12345).get_state()
        torch.save(state, rng_file)
        digests_file = os.path.join(os.path.dirname(rng_file), DIGESTS_FILE)  # as that run's save would record it
        with open(digests_file, encoding="utf-8") as handle:
            digests = json.load(handle)
        digests[os.path.basename(rng_file)] = file_sha256(rng_file)
        with open(digests_file, "w", encoding="utf-8") as handle:
            json.dump(digests, handle)
    return {name: _run(schema_dir, os.path.join(root, f"from_{name}"), [f"train.init_from={source}", *dropout])["test"]
            for name, source in (("day1", day1), ("other", other))}


@pytest.mark.multiprocess
def test_a_run_started_from_another_run_draws_its_own_dropout_masks(synthetic_dir: str, tmp_path) -> None:
    """The RNG states of the run it starts from are not restored: train.seed alone decides the new run's draws."""
    (out,) = run_multiprocess(_from_runs_with_other_rng_states, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["day1"] == out["other"]


def _entity_vectors_of_the_next_day(root: str) -> Dict[str, Any]:
    import numpy as np

    from recsys_llm.cli.export import export_run
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.serving import load_state_file

    data = os.path.join(root, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    items = DatasetSchema.load(os.path.join(data, "schema.json")).field("item_id").cardinality
    tables, weights = {}, {}
    for day, seed in (("day1", 0), ("day2", 1)):  # the next day's export: other vectors, in another directory
        tables[day] = export_entity_table(os.path.join(root, f"items_{day}"),
                                          np.random.default_rng(seed).normal(size=(items, 8)))
        gain = ["elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
                f"elec.entity_vectors={root}/items_{day}", "elec.task=gain"]
        init = [f"train.init_from={root}/day1"] if day == "day2" else []
        _method_run(data, os.path.join(root, day), [*gain, *init])
        export_run(load_config(DEEPFM_CONFIG, [f"data.schema={data}", "model.mlp_layer_sizes=[16]",
                                               "model.embedding_dim=8", *gain]),
                   os.path.join(root, day), os.path.join(root, f"{day}_state"), state_only=True)
        state = load_state_file(os.path.join(root, f"{day}_state"))
        (weights[day],) = [tensor for name, tensor in state.items() if "semantic_item_id" in name]
    out: Dict[str, Any] = {day: np.allclose(weights["day2"].numpy(), tables[day]) for day in tables}
    # the next day's export by another adapted LLM: vectors of another space than the one day 1's weights learned
    export_entity_table(os.path.join(root, "items_other_llm"), np.random.default_rng(2).normal(size=(items, 8)),
                        model="another_llm")
    try:
        _method_run(data, os.path.join(root, "day2_other_llm"), [
            "elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={root}/items_other_llm", "elec.task=gain", f"train.init_from={root}/day1"])
        out["other_llm"] = None
    except ConfigError as error:
        out["other_llm"] = str(error)
    return out


@pytest.mark.multiprocess
def test_a_run_started_from_another_reads_its_own_days_entity_vectors(tmp_path) -> None:
    """elec.entity_vectors may name the next day's export (vectors for its new items): its frozen table is that
    file's, not the init run's."""
    (out,) = run_multiprocess(_entity_vectors_of_the_next_day, world_size=1, root=str(tmp_path))
    assert {day: out[day] for day in ("day1", "day2")} == {"day1": False, "day2": True}
    assert out["other_llm"] is not None and "item_id (model: 'random' -> 'another_llm')" in out["other_llm"], out
    assert not os.path.exists(tmp_path / "day2_other_llm" / "checkpoints")


def test_a_run_whose_entity_vectors_come_from_another_llm_than_its_init_runs_is_refused(tmp_path) -> None:
    """The next day's export may cover other ids (its grown vocabulary), but vectors of another adapted LLM live in
    another space than the one the init run's projection learned: refused, naming what differs."""
    from recsys_llm.train.run_records import check_same_entity_vector_source

    def plugins(**provenance: Any) -> Dict[str, Any]:
        record = {"model": "llm", "weights_sha256": "a", "dim": "8", "keys_sha256": "k1", "num_rows": 250,
                  "vocabulary": '{"ids": 251}', **provenance}
        return {"elec": {"entity_vectors": {"item": record}}}

    run_dir = tmp_path / "day1"
    (run_dir / "best" / "ckpt-00000003").mkdir(parents=True)
    (run_dir / "plugins.json").write_text(json.dumps(plugins()))
    checkpoint = str(run_dir / "best" / "ckpt-00000003")
    # the day's export: more ids, the same LLM (encoded afresh, or reusing day 1's vectors: semantics export --reuse)
    for reused in ({}, {"reused_from": '{"keys_sha256": "k1", "num_rows": 250}'}):
        check_same_entity_vector_source(
            checkpoint, plugins(keys_sha256="k2", num_rows=300, vocabulary='{"ids": 301}', **reused), "advice")
    with pytest.raises(ConfigError, match=r"item \(weights_sha256: 'a' -> 'b'\).*advice"):
        check_same_entity_vector_source(checkpoint, plugins(weights_sha256="b", num_rows=300), "advice")


NEW_FIELD = "item_seller"
TABLES = "model.embedding_bag_collection.embedding_bags"  # where DeepFM's state dict keeps its tables


def _with_a_new_field(schema_dir: str, out: str, embedding_dim: int = 0) -> str:
    """A copy of the data with one more sparse field (the next day's new feature column), every field of
    ``embedding_dim`` where given."""
    shutil.copytree(schema_dir, out)
    schema_file = os.path.join(out, "schema.json")
    with open(schema_file, encoding="utf-8") as handle:
        schema = json.load(handle)
    for split in schema["splits"].values():
        table = pq.read_table(os.path.join(out, split))
        sellers = pc.bit_wise_and(table.column("item_id"), pa.scalar(7, pa.int64()))
        pq.write_table(table.append_column(NEW_FIELD, sellers), os.path.join(out, split), row_group_size=1024)
    schema["fields"].append({"name": NEW_FIELD, "kind": "sparse", "cardinality": 8, "description": "who sells it"})
    for field in schema["fields"]:
        if embedding_dim and field["kind"] != "dense":
            field["embedding_dim"] = embedding_dim
    with open(schema_file, "w", encoding="utf-8") as handle:
        json.dump(schema, handle)
    return out


def _saved_tables(checkpoint: str, names: List[str]) -> Dict[str, torch.Tensor]:
    """``{table: weight}`` and ``{table.momentum1: row-wise Adagrad state}`` as ``checkpoint`` holds them."""
    reader = SafeFileSystemReader(checkpoint)
    saved = reader.read_metadata().state_dict_metadata
    state: Dict[str, Any] = {"model": {}, "optim": {}}
    for name in names:
        key = f"{TABLES}.{name}.weight"
        state["model"][key] = torch.empty(saved[f"model.{key}"].size)
        state["optim"][key] = {f"{name}.momentum1": torch.empty(saved[f"optim.{key}.{name}.momentum1"].size)}
    dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner())
    return {**{key.split(".")[-2]: value for key, value in state["model"].items()},
            **{name: value for states in state["optim"].values() for name, value in states.items()}}


@contextlib.contextmanager
def _weights_as_started(into: Dict[str, Dict[str, torch.Tensor]], name: str) -> Any:
    """Keeps under ``into[name]`` the model's full weights (rank 0) as the run starts training (after
    ``train.init_from``), and its tables' optimizer states as ``train.init_from`` left them (one rank), and under
    ``into[name + "_dense_state"]`` the dense parameters that hold optimizer state by then."""
    plugin_state, init_source = runner.load_plugin_state, runner.load_init_source

    def weights(model: torch.nn.Module, *args: Any) -> Any:
        into[name] = unsharded_state_dict(model)
        return plugin_state(model, *args)

    def states(source: Any, model: torch.nn.Module, optimizer: Any) -> Any:
        record = init_source(source, model, optimizer)
        into[f"{name}_momentum"] = {
            state_name: state.local_shards()[0].tensor.clone()
            for key, param_state in optimizer.state_dict()["state"].items() if ".embedding_bags." in key
            for state_name, state in param_state.items() if state.local_shards()}
        into[f"{name}_dense_state"] = sorted(key for key, param_state in optimizer.state_dict()["state"].items()
                                             if ".embedding_bags." not in key and param_state)
        return record

    with mock.patch.object(runner, "load_plugin_state", weights), mock.patch.object(runner, "load_init_source",
                                                                                    states):
        yield


def _start_on_a_day_with_a_new_field(schema_dir: str, root: str) -> Dict[str, Any]:
    day1 = os.path.join(root, "day1")
    steps = _run(schema_dir, day1)["global_step"]
    checkpoint = os.path.join(day1, "checkpoints", f"ckpt-{steps:08d}")
    day2 = _with_a_new_field(schema_dir, os.path.join(root, "data_day2"))
    shared = [f"t_{name}" for name in ("user_id", "item_id", "item_category", "item_tags", "user_age_bucket",
                                        "user_gender", "user_occupation", "hour_of_day", "device")]
    saved = _saved_tables(checkpoint, shared)
    started: Dict[str, Dict[str, torch.Tensor]] = {}
    tables = [f"train.init_from={day1}", "train.init_scope=tables", "train.max_steps=1"]
    with _weights_as_started(started, "tables"):
        _run(day2, os.path.join(root, "tables"), tables)
    with _weights_as_started(started, "fresh"):
        _run(day2, os.path.join(root, "fresh"), ["train.max_steps=1"])
    new_key = f"{TABLES}.t_{NEW_FIELD}.weight"
    dense = [key for key in started["fresh"] if not key.startswith(TABLES)]
    out: Dict[str, Any] = {
        "shared_as_saved": all(torch.equal(started["tables"][f"{TABLES}.{name}.weight"], saved[name]) for name in shared),
        "momenta_as_saved": all(torch.equal(started["tables_momentum"][f"{name}.momentum1"], saved[f"{name}.momentum1"])
                                for name in shared),
        "shared_trained": all(saved[f"{name}.momentum1"].any() for name in shared),
        "new_table_fresh": torch.equal(started["tables"][new_key], started["fresh"][new_key]),
        "new_momentum_fresh": not started["tables_momentum"][f"t_{NEW_FIELD}.momentum1"].any(),
        "dense": dense,
        "dense_fresh": all(torch.equal(started["tables"][key], started["fresh"][key]) for key in dense),
        "dense_optimizer_state": started["tables_dense_state"],
        "shared_not_fresh": not any(torch.equal(started["tables"][f"{TABLES}.{name}.weight"],
                                                started["fresh"][f"{TABLES}.{name}.weight"]) for name in shared),
        "record": _record(os.path.join(root, "tables"))[INIT_FROM_KEY],
        "started": _events(os.path.join(root, "tables"))[0], "checkpoint": checkpoint, "shared": shared,
    }
    with _weights_as_started(started, "weights_only"):  # train.init_optimizer=false: the tables' weights alone
        _run(day2, os.path.join(root, "weights_only"), [*tables, "train.init_optimizer=false"])
    out["weights_only_as_saved"] = all(torch.equal(started["weights_only"][f"{TABLES}.{name}.weight"], saved[name])
                                       for name in shared)
    out["weights_only_momenta_fresh"] = not any(started["weights_only_momentum"][f"{name}.momentum1"].any()
                                                for name in shared)
    out["weights_only_record"] = _record(os.path.join(root, "weights_only"))[INIT_FROM_KEY]
    # the dense optimizer's state is not taken: another optim.dense is fine
    out["dense_sgd"] = _run(day2, os.path.join(root, "dense_sgd"), [*tables, "optim.dense=sgd"])["global_step"]
    refused = {
        "all": (day2, [f"train.init_from={day1}"]),
        "field_dim": (_with_a_new_field(schema_dir, os.path.join(root, "data_dim8"), embedding_dim=8), tables),
        "model_dim": (day2, [*tables, "model.embedding_dim=8"]),
        "sparse": (day2, [*tables, "optim.sparse=adagrad"]),
    }
    for name, (data, extra) in refused.items():
        try:
            _run(data, os.path.join(root, name), extra)
        except ConfigError as error:
            out[name] = str(error)
        out[f"{name}_left"] = os.path.exists(os.path.join(root, name))
    # another backbone keeping its tables where DeepFM does: its dense layers differ, which tables allows
    out["dlrm"] = _run(day2, os.path.join(root, "dlrm"), [*tables, "model.name=dlrm"])["global_step"]
    for name, table in (("shape", TableShape(f"{TABLES}.t_device.weight", 4, 8, torch.float32)),
                        ("none_shared", TableShape("elsewhere.t_device.weight", 4, 16, torch.float32))):
        try:  # what the checks before it leave to the checkpoint: a table of another shape, none where this has them
            shared_tables(checkpoint, {"t_device": table}, "train.init_from=day1")
        except ConfigError as error:
            out[name] = str(error)
    return out


@pytest.mark.multiprocess
def test_a_run_on_data_with_a_new_field_takes_the_shared_tables_and_starts_the_rest_fresh(synthetic_dir: str,
                                                                                          tmp_path) -> None:
    """``train.init_scope=tables``: the shared fields' tables and their Adagrad states come bit for bit from the
    checkpoint; the new field's table, its state and the dense layers are those of a fresh run."""
    (out,) = run_multiprocess(_start_on_a_day_with_a_new_field, world_size=1, schema_dir=synthetic_dir,
                              root=str(tmp_path))
    assert out["shared_as_saved"] and out["momenta_as_saved"] and out["shared_trained"]
    assert out["new_table_fresh"] and out["new_momentum_fresh"]
    assert "model.head.weight" in out["dense"] and out["dense_fresh"] and out["shared_not_fresh"]
    # the dense optimizer starts fresh too: a materialised Adam state (one zero step) changed its first steps' sizes
    assert out["dense_optimizer_state"] == []
    new_table = f"t_{NEW_FIELD}"
    assert out["record"]["scope"] == "tables" and out["record"]["checkpoint"] == out["checkpoint"]
    assert "table_sources" not in out["record"]  # every table under its own key: none matched by field
    assert out["record"]["tables"] == sorted(out["shared"]) and out["record"]["fresh_tables"] == [new_table]
    assert out["started"]["init_tables"] == sorted(out["shared"]) and out["started"]["fresh_tables"] == [new_table]
    assert f"field '{NEW_FIELD}' only in the current schema" in out["all"] and "train.init_scope=tables" in out["all"]
    assert "item_id: embedding_dim unset -> 8" in out["field_dim"] and "shared field" in out["field_dim"]
    assert "model.embedding_dim: 16 -> 8" in out["model_dim"]
    assert not any(out[f"{name}_left"] for name in ("all", "field_dim", "model_dim", "sparse"))
    # train.init_optimizer=false: the shared tables' weights, their optimizer states fresh
    assert out["weights_only_as_saved"] and out["weights_only_momenta_fresh"]
    assert out["weights_only_record"]["optimizer"] is False and out["weights_only_record"]["scope"] == "tables"
    assert "optim.sparse: 'row_wise_adagrad' -> 'adagrad'" in out["sparse"]
    assert "train.init_optimizer=false" in out["sparse"]
    assert out["dense_sgd"] == 1
    assert out["dlrm"] == 1
    assert "t_device: 4 x 16 float32 there, 4 x 8 float32 here" in out["shape"]
    assert "holds none of this model's tables (t_device)" in out["none_shared"]


def _start_tables_on_two_ranks(schema_dir: str, day1: str, run_dir: str) -> Dict[str, Any]:
    started: Dict[str, Dict[str, torch.Tensor]] = {}
    with _weights_as_started(started, "tables"):
        _run(schema_dir, run_dir, [f"train.init_from={day1}", "train.init_scope=tables", "train.max_steps=1"])
    return {key: value for key, value in started.get("tables", {}).items() if key.startswith(TABLES)}


@pytest.mark.multiprocess
def test_a_run_on_two_ranks_takes_the_shared_tables_of_a_one_rank_run(synthetic_dir: str, tmp_path) -> None:
    day1 = str(tmp_path / "day1")
    (trained,) = run_multiprocess(_run, world_size=1, schema_dir=synthetic_dir, run_dir=day1)
    day2 = _with_a_new_field(synthetic_dir, str(tmp_path / "data_day2"))
    first, second = run_multiprocess(_start_tables_on_two_ranks, world_size=2, schema_dir=day2, day1=day1,
                                     run_dir=str(tmp_path / "day2"))
    checkpoint = os.path.join(day1, "checkpoints", f"ckpt-{trained['global_step']:08d}")
    shared = sorted(key.split(".")[-2] for key in first if not key.endswith(f"t_{NEW_FIELD}.weight"))
    saved = _saved_tables(checkpoint, shared)
    assert len(shared) == 9 and second == {}  # gathered on rank 0
    assert all(torch.equal(first[f"{TABLES}.{name}.weight"], saved[name]) for name in shared)
    assert _record(str(tmp_path / "day2"))[INIT_FROM_KEY]["fresh_tables"] == [f"t_{NEW_FIELD}"]


def test_the_tables_of_frozen_plugin_ebcs_are_not_taken_from_the_init_run() -> None:
    """``trained_tables``: ELEC's entity tables and a frozen teacher's (EBCs marked ``frozen``) come from their own
    files; taken from the init run too, the next day's entity table (more rows) would be refused as another shape, or
    the earlier day's vectors loaded where the new day's belong."""
    trained = EmbeddingBagCollection([EmbeddingBagConfig(name="t_user_id", embedding_dim=4, num_embeddings=3,
                                                         feature_names=["user_id"])], device=torch.device("meta"))
    entity = EmbeddingBagCollection([EmbeddingBagConfig(name="entity_item_id", embedding_dim=8, num_embeddings=5,
                                                        feature_names=["item_id"])], device=torch.device("meta"))
    entity.frozen = True
    shapes = trained_tables({"t_user_id": ("model.embedding_bag_collection", trained),
                             "entity_item_id": ("model.elec.embedding_bag_collection", entity)})
    assert shapes == {"t_user_id": TableShape("model.embedding_bag_collection.embedding_bags.t_user_id.weight", 3, 4,
                                              torch.float32, ("user_id",))}


def test_a_frozen_table_of_the_init_run_that_this_run_does_not_take_needs_no_optimizer_state() -> None:
    """``train.init_scope=tables`` checks the optimizer states of the tables it takes alone: a table the earlier run
    kept frozen (no state) whose field this run dropped takes none, and would be refused as 'frozen there, trained
    here'. One it takes is still refused."""
    saved = load_config(DEEPFM_CONFIG, ["sharding.frozen_tables=[t_device]"])
    config = load_config(DEEPFM_CONFIG, ["train.init_from=runs/day1", "train.init_scope=tables"])
    with mock.patch("recsys_llm.train.init_from.check_same_table_state_layout"):
        _check_optimizer_state_fits(config, saved, None, "runs/day1/sharding_plan.json", kinds=("sparse",),
                                    origins={"t_user_id": "t_user_id"})
        with pytest.raises(ConfigError, match=r"sharding\.frozen_tables: t_device frozen there"):
            _check_optimizer_state_fits(config, saved, None, "runs/day1/sharding_plan.json", kinds=("sparse",),
                                        origins={"t_user_id": "t_user_id", "t_device": "t_device"})
def _placement(sharding_type: str, column_shards: int) -> Dict[str, Any]:
    """A ``sharding_plan.json`` entry of a 10 x 8 table cut into ``column_shards`` column ranges."""
    width = 8 // column_shards
    return {"sharding_type": sharding_type, "shards": [{"offsets": [0, n * width], "rank": n, "sizes": [10, width]}
                                                       for n in range(column_shards)]}


def test_only_the_tables_whose_optimizer_state_is_taken_must_keep_their_column_split(tmp_path) -> None:
    """Row-wise Adagrad's state holds one value per row of each column shard, so a table whose state is taken must
    keep its column split; a frozen table keeps no state (an ELEC entity table, not taken at all, or one this run
    freezes), so its placement may change with the world size: the earlier run's 2-rank column-wise entity table
    on 1 rank was refused, although nothing of it loads, and so was a table replicated there that this run freezes
    (frozen tables are never replicated)."""
    saved_plan = str(tmp_path / "sharding_plan.json")
    with open(saved_plan, "w", encoding="utf-8") as handle:
        json.dump({"t_city": _placement("table_wise", 1), "t_age": _placement("column_wise", 2),
                   "t_user": {"sharding_type": "data_parallel", "shards": []},
                   "semantic_item": _placement("column_wise", 2)}, handle)
    saved = load_config(DEEPFM_CONFIG)
    config = load_config(DEEPFM_CONFIG, ["train.init_from=runs/day1", "train.init_scope=tables",
                                         "sharding.frozen_tables=[teacher_age,teacher_user]"])
    taken = {"teacher_city": "t_city", "teacher_age": "t_age", "teacher_user": "t_user"}
    now = {"teacher_city": _placement("table_wise", 1), "teacher_age": _placement("table_wise", 1),
           "teacher_user": _placement("table_wise", 1), "semantic_item": _placement("table_wise", 1)}
    with mock.patch("recsys_llm.train.resume.table_placements", return_value=now):
        _check_optimizer_state_fits(config, saved, None, saved_plan, kinds=("sparse",), origins=taken,
                                    stateful=stateful_tables(taken, config.sharding.frozen_tables))
        # every table checked: the frozen one replicated there refused first
        with pytest.raises(ConfigError, match=r"'teacher_user \(from t_user\)' data_parallel -> table_wise"):
            _check_optimizer_state_fits(config, saved, None, saved_plan, kinds=("sparse",), origins=taken)
    now["teacher_city"] = _placement("column_wise", 2)  # a table whose state is taken: still refused
    with mock.patch("recsys_llm.train.resume.table_placements", return_value=now):
        with pytest.raises(ConfigError, match=r"'teacher_city \(from t_city\)' 1 \(table_wise\) -> 2"):
            _check_optimizer_state_fits(config, saved, None, saved_plan, kinds=("sparse",), origins=taken,
                                        stateful=stateful_tables(taken, config.sharding.frozen_tables))
    assert stateful_tables(taken, config.sharding.frozen_tables) == ["teacher_city"]


def test_a_checkpoint_whose_tables_are_kept_under_other_names_is_refused_naming_where_each_keeps_them(
        tmp_path) -> None:
    """A plain day 1 run and an ELEC gain network on day 2 (or a gain network and a student) share no table key:
    ELEC names its tables after their network. The refusal names where each run keeps them (the checkpoint's frozen
    entity tables left out: never taken) and the kinds of run tables pass between, not another backbone."""
    checkpoint = str(tmp_path / "ckpt")
    dcp.save({"model": {f"{TABLES}.teacher_city.weight": torch.zeros(4, 4),
                        "model.semantic_table.embedding_bag_collection.embedding_bags.semantic_item.weight":
                            torch.zeros(3, 8)}}, checkpoint_id=checkpoint, no_dist=True)
    with pytest.raises(ConfigError) as refused:
        shared_tables(checkpoint, {"t_city": TableShape(f"{TABLES}.t_city.weight", 4, 4, torch.float32)},
                       "train.init_from=runs/gain")
    message = str(refused.value)
    assert f"holds none of this model's tables (t_city) under {TABLES}" in message
    assert f"that run keeps teacher_city under {TABLES})" in message and "semantic_item" not in message
    assert "an ELEC gain network as teacher_<field>" in message and "to the table of its field" in message


def _all_saved_tables(checkpoint: str) -> Dict[str, torch.Tensor]:
    """``{table: weight}`` and ``{table.momentum1: its row-wise Adagrad state}`` of every table ``checkpoint`` holds
    (its frozen tables' states, where it keeps none, left out)."""
    reader = SafeFileSystemReader(checkpoint)
    saved = reader.read_metadata().state_dict_metadata
    state: Dict[str, Any] = {"model": {}, "optim": {}}
    for full_key, item in saved.items():
        key = full_key[len("model."):]
        if full_key.startswith("model.") and ".embedding_bags." in key and key.endswith(".weight"):
            name = key.split(".")[-2]
            state["model"][key] = torch.empty(item.size)
            if f"optim.{key}.{name}.momentum1" in saved:
                state["optim"][key] = {f"{name}.momentum1": torch.empty(saved[f"optim.{key}.{name}.momentum1"].size)}
    dcp.load(state, storage_reader=reader, planner=WeightsOnlyLoadPlanner(), no_dist=True)
    return {**{key.split(".")[-2]: value for key, value in state["model"].items()},
            **{name: value for states in state["optim"].values() for name, value in states.items()}}


def _latest_checkpoint(run_dir: str) -> str:
    return sorted(glob.glob(os.path.join(run_dir, "checkpoints", "ckpt-*")))[-1]


def _started_tables(started: Dict[str, Dict[str, torch.Tensor]], name: str) -> Dict[str, torch.Tensor]:
    """``{table: weight}`` of the run ``started[name]`` (:func:`_weights_as_started`) as it started training."""
    return {key.split(".")[-2]: value for key, value in started[name].items()
            if ".embedding_bags." in key and key.endswith(".weight")}


def _elec_data(root: str) -> List[str]:
    """Data of 1000 rows and ELEC's settings reading an entity table of its items (the gain runs' vectors)."""
    import numpy as np

    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.data.synthetic import generate_synthetic

    data = os.path.join(root, "data")
    generate_synthetic(data, 1_000, seed=1, rows_per_group=512)
    items = DatasetSchema.load(os.path.join(data, "schema.json")).field("item_id").cardinality
    export_entity_table(os.path.join(root, "items"), np.random.default_rng(0).normal(size=(items, 8)))
    return [data, "elec.vector_dim=8", "elec.vector_source=entity_table", "elec.entity_field=item_id",
            f"elec.entity_vectors={root}/items"]


def _tables_across_network_kinds(root: str) -> Dict[str, Any]:
    from recsys_llm.cli.export import export_run

    data, *elec = _elec_data(root)
    gain, joint = [*elec, "elec.task=gain"], [*elec, "elec.task=distill", "elec.distill.mode=joint"]
    plain = os.path.join(root, "plain")
    _method_run(data, plain, [])
    saved = {"plain": _all_saved_tables(_latest_checkpoint(plain))}
    fields = sorted(name[len("t_"):] for name in saved["plain"] if not name.endswith(".momentum1"))
    tables = ["train.init_scope=tables", "train.max_steps=1"]
    started: Dict[str, Dict[str, torch.Tensor]] = {}
    runs = {  # run: (its settings, the run it starts from or "")
        "gain": (gain, plain), "gain_fresh": (gain, ""), "joint": (joint, plain), "joint_fresh": (joint, ""),
        "joint_from_gain": (joint, os.path.join(root, "gain")),
    }
    out: Dict[str, Any] = {"fields": fields}
    for name, (extra, init) in runs.items():
        with _weights_as_started(started, name):
            _method_run(data, os.path.join(root, name), [*extra, *(tables if init else ["train.max_steps=1"]),
                                                         *([f"train.init_from={init}"] if init else [])])
        if init:
            out[f"{name}_record"] = _record(os.path.join(root, name))[INIT_FROM_KEY]
            out[f"{name}_started"] = _events(os.path.join(root, name))[0]
    saved["gain"] = _all_saved_tables(_latest_checkpoint(os.path.join(root, "gain")))

    def same(run: str, prefix: str, source: str, source_prefix: str) -> bool:
        tables_now = _started_tables(started, run)
        return all(torch.equal(tables_now[prefix + field], saved[source][source_prefix + field]) for field in fields)

    def momenta(run: str, prefix: str, source: str, source_prefix: str) -> bool:
        return all(torch.equal(started[f"{run}_momentum"][f"{prefix}{field}.momentum1"],
                               saved[source][f"{source_prefix}{field}.momentum1"]) for field in fields)

    def rest_fresh(run: str) -> bool:  # every weight but the tables taken: as a fresh run of the same settings
        return all(torch.equal(value, started[f"{run}_fresh"][key]) for key, value in started[run].items()
                   if not (".embedding_bags." in key and key.split(".")[-2].startswith(("teacher_", "student_"))))

    out.update({
        "gain_tables": same("gain", "teacher_", "plain", "t_"), "gain_momenta": momenta("gain", "teacher_", "plain", "t_"),
        "gain_rest_fresh": rest_fresh("gain"),
        "gain_tables_trained": not any(torch.equal(_started_tables(started, "gain")[f"teacher_{field}"],
                                                   _started_tables(started, "gain_fresh")[f"teacher_{field}"])
                                       for field in fields),
        "joint_student": same("joint", "student_", "plain", "t_"), "joint_teacher": same("joint", "teacher_", "plain", "t_"),
        "joint_momenta": momenta("joint", "student_", "plain", "t_") and momenta("joint", "teacher_", "plain", "t_"),
        "joint_rest_fresh": rest_fresh("joint"),
        "joint_from_gain": same("joint_from_gain", "student_", "gain", "teacher_")
                           and same("joint_from_gain", "teacher_", "gain", "teacher_"),
    })
    # a student trained against a frozen teacher (the gain network's export) starts a plain run: student_x -> t_x
    export_run(load_config(DEEPFM_CONFIG, [f"data.schema={data}", "model.mlp_layer_sizes=[16]",
                                           "model.embedding_dim=8", *gain]),
               os.path.join(root, "gain"), os.path.join(root, "teacher"), state_only=True)
    student = os.path.join(root, "student")
    _method_run(data, student, [*elec, "elec.task=distill", "elec.distill.mode=frozen",
                                f"elec.teacher_checkpoint={root}/teacher"])
    saved["student"] = _all_saved_tables(_latest_checkpoint(student))
    with _weights_as_started(started, "plain_from_student"):
        _method_run(data, os.path.join(root, "plain_from_student"), [*tables, f"train.init_from={student}"])
    out["plain_from_student"] = same("plain_from_student", "t_", "student", "student_")
    out["plain_from_student_momenta"] = momenta("plain_from_student", "t_", "student", "student_")
    out["plain_from_student_record"] = _record(os.path.join(root, "plain_from_student"))[INIT_FROM_KEY]
    # a joint pair from that student: its teacher's tables, the frozen teacher's export there, are not taken
    with _weights_as_started(started, "joint_from_student"):
        _method_run(data, os.path.join(root, "joint_from_student"), [*joint, *tables, f"train.init_from={student}"])
    out["joint_from_student"] = same("joint_from_student", "student_", "student", "student_") and \
        same("joint_from_student", "teacher_", "student", "student_")
    out["joint_from_student_record"] = _record(os.path.join(root, "joint_from_student"))[INIT_FROM_KEY]
    # a joint pair's checkpoint holds two trained tables of each field: a plain run cannot tell which to take
    try:
        _method_run(data, os.path.join(root, "plain_from_joint"), [*tables, f"train.init_from={root}/joint"])
    except ConfigError as error:
        out["plain_from_joint"] = str(error)
    out["plain_from_joint_left"] = os.path.exists(os.path.join(root, "plain_from_joint"))
    return out


@pytest.mark.multiprocess
def test_tables_pass_by_field_between_plain_runs_gain_networks_and_students(tmp_path) -> None:
    """``train.init_scope=tables`` matches a table the checkpoint keeps under another key by its field: a plain run's
    ``t_<field>`` starts a gain network's ``teacher_<field>``, both networks of a joint pair, and a frozen-teacher
    student's ``student_<field>`` a plain run's; weights and row-wise Adagrad states bit for bit, the rest fresh."""
    (out,) = run_multiprocess(_tables_across_network_kinds, world_size=1, root=str(tmp_path))
    fields = out["fields"]
    assert len(fields) == 9
    assert out["gain_tables"] and out["gain_momenta"] and out["gain_rest_fresh"] and out["gain_tables_trained"]
    assert out["joint_student"] and out["joint_teacher"] and out["joint_momenta"] and out["joint_rest_fresh"]
    assert out["joint_from_gain"]
    assert out["plain_from_student"] and out["plain_from_student_momenta"]
    # the pair's teacher took the frozen teacher's tables under the same keys (an export, no optimizer state: the
    # load failed as "a checkpoint of another model"); both networks take that run's trained student tables
    from_student = out["joint_from_student_record"]
    assert out["joint_from_student"] and from_student["fresh_tables"] == []
    assert from_student["table_sources"] == {**{f"student_{field}": f"student_{field}" for field in fields},
                                             **{f"teacher_{field}": f"student_{field}" for field in fields}}
    record = out["gain_record"]
    assert record["scope"] == "tables" and record["optimizer"] is True and record["fresh_tables"] == []
    assert record["tables"] == [f"teacher_{field}" for field in fields]
    assert record["table_sources"] == {f"teacher_{field}": f"t_{field}" for field in fields}
    assert out["gain_started"]["init_table_sources"] == record["table_sources"]
    # the start line names where each table came from (guards a line claiming the tables by their own names)
    assert f"tables teacher_{fields[0]} (from t_{fields[0]})," in start_line("runs/gain", record)
    assert out["joint_record"]["table_sources"] == {
        **{f"student_{field}": f"t_{field}" for field in fields}, **{f"teacher_{field}": f"t_{field}" for field in fields}}
    assert out["joint_from_gain_record"]["table_sources"] == {
        **{f"student_{field}": f"teacher_{field}" for field in fields},
        **{f"teacher_{field}": f"teacher_{field}" for field in fields}}
    assert out["plain_from_student_record"]["table_sources"] == {f"t_{field}": f"student_{field}" for field in fields}
    assert "several tables of the field" in out["plain_from_joint"]
    assert ("t_device (field device): student.model.embedding_bag_collection.embedding_bags.student_device.weight, "
            "teacher.model.embedding_bag_collection.embedding_bags.teacher_device.weight") in out["plain_from_joint"]
    assert not out["plain_from_joint_left"]



def _gain_tables_on_two_ranks(data: str, elec: List[str], plain: str, run_dir: str) -> Dict[str, Any]:
    started: Dict[str, Dict[str, torch.Tensor]] = {}
    with _weights_as_started(started, "gain"):
        _method_run(data, run_dir, [*elec, "elec.task=gain", f"train.init_from={plain}", "train.init_scope=tables",
                                    "train.max_steps=1"])
    return {"tables": _started_tables(started, "gain") if started.get("gain") else {},
            "momenta": started.get("gain_momentum", {})}


@pytest.mark.multiprocess
def test_a_gain_network_on_two_ranks_takes_the_tables_of_a_one_rank_plain_run_by_field(tmp_path) -> None:
    data, *elec = _elec_data(str(tmp_path))
    plain = str(tmp_path / "plain")
    run_multiprocess(_method_run, world_size=1, schema=data, run_dir=plain, extra=[])
    first, second = run_multiprocess(_gain_tables_on_two_ranks, world_size=2, data=data, elec=elec, plain=plain,
                                     run_dir=str(tmp_path / "gain"))
    saved = _all_saved_tables(_latest_checkpoint(plain))
    fields = sorted(name[len("t_"):] for name in saved if not name.endswith(".momentum1"))
    assert second["tables"] == {} and len(fields) == 9  # gathered on rank 0
    assert sorted(first["tables"]) == sorted([f"teacher_{field}" for field in fields] + ["semantic_item_id"])
    assert all(torch.equal(first["tables"][f"teacher_{field}"], saved[f"t_{field}"]) for field in fields)
    # the row-wise Adagrad states, renamed with their tables, as saved (the whole table's on the rank holding it)
    whole = [(name, state) for rank in (first, second) for name, state in rank["momenta"].items()
             if state.shape == saved[f"t_{name[len('teacher_'):]}"].shape]
    assert whole and all(torch.equal(state, saved[f"t_{name[len('teacher_'):]}"]) for name, state in whole)
    assert {name for rank in (first, second) for name in rank["momenta"]} == {f"teacher_{f}.momentum1" for f in fields}
    assert _record(str(tmp_path / "gain"))[INIT_FROM_KEY]["table_sources"] == {
        f"teacher_{field}": f"t_{field}" for field in fields}


def test_a_table_matched_by_field_of_another_shape_is_refused_naming_both_tables(tmp_path) -> None:
    """Matching by field checks each pair's shape and dtype before anything loads, naming this model's table and the
    checkpoint's; a field the runs do not share (``fields``) is not matched, and the same key comes first."""
    checkpoint = str(tmp_path / "ckpt")
    dcp.save({"model": {f"{TABLES}.t_city.weight": torch.zeros(4, 4), f"{TABLES}.t_age.weight": torch.zeros(3, 8)}},
             checkpoint_id=checkpoint, no_dist=True)
    student = "student.model.embedding_bag_collection.embedding_bags"
    tables = {"student_city": TableShape(f"{student}.student_city.weight", 4, 8, torch.float32, ("city",)),
              "student_age": TableShape(f"{student}.student_age.weight", 3, 8, torch.float32, ("age",))}
    with pytest.raises(ConfigError, match=r"student_city from t_city: 4 x 4 float32 there, 4 x 8 float32 here"):
        shared_tables(checkpoint, tables, "train.init_from=runs/day1", fields=["city", "age"])
    assert shared_tables(checkpoint, tables, "train.init_from=runs/day1", fields=["age"]) == {
        "student_age": f"{TABLES}.t_age.weight"}
    same_key = {"t_age": TableShape(f"{TABLES}.t_age.weight", 3, 8, torch.float32, ("age",))}
    assert shared_tables(checkpoint, same_key, "train.init_from=runs/day1", fields=[]) == {
        "t_age": f"{TABLES}.t_age.weight"}


def test_a_gain_networks_table_takes_the_pairs_teacher_table_of_its_name_and_multi_feature_tables_are_not_matched(
        tmp_path) -> None:
    """Matching by field (``shared_tables``): of a joint pair's two tables of a field, a gain network's
    ``teacher_city`` takes the one of its name (the pair's teacher's), not the student's (guards taking the other
    network's table); a table of several features is not matched by its first feature (guards starting a shared
    table from one field's table); without ``fields`` nothing is matched by field; and a table under the same key of
    another dtype is refused (guards comparing sizes alone)."""
    checkpoint = str(tmp_path / "ckpt")
    pair = "embedding_bag_collection.embedding_bags"
    dcp.save({"model": {f"student.model.{pair}.student_city.weight": torch.zeros(4, 8),
                        f"teacher.model.{pair}.teacher_city.weight": torch.ones(4, 8),
                        f"{TABLES}.t_age.weight": torch.zeros(3, 8)}}, checkpoint_id=checkpoint, no_dist=True)
    gain = {"teacher_city": TableShape(f"{TABLES}.teacher_city.weight", 4, 8, torch.float32, ("city",))}
    assert shared_tables(checkpoint, gain, "train.init_from=runs/joint", fields=["city"]) == {
        "teacher_city": f"teacher.model.{pair}.teacher_city.weight"}
    with pytest.raises(ConfigError, match=r"holds none of this model's tables \(teacher_city\)"):
        shared_tables(checkpoint, gain, "train.init_from=runs/joint")  # fields unknown: no match by field
    two_features = {"t_place": TableShape(f"{TABLES}.t_place.weight", 4, 8, torch.float32, ("city", "town"))}
    with pytest.raises(ConfigError, match=r"holds none of this model's tables \(t_place\)"):
        shared_tables(checkpoint, two_features, "train.init_from=runs/joint", fields=["city", "town"])
    other_dtype = {"t_age": TableShape(f"{TABLES}.t_age.weight", 3, 8, torch.bfloat16, ("age",))}
    with pytest.raises(ConfigError, match=r"t_age: 3 x 8 float32 there, 3 x 8 bfloat16 here"):
        shared_tables(checkpoint, other_dtype, "train.init_from=runs/day1", fields=["age"])


def _gain_from_a_plain_run_with_a_frozen_table(root: str) -> Dict[str, str]:
    data, *elec = _elec_data(root)
    plain = os.path.join(root, "plain")
    _method_run(data, plain, ["sharding.frozen_tables=[t_device]"])
    out = {}
    try:
        _method_run(data, os.path.join(root, "gain"), [*elec, "elec.task=gain", f"train.init_from={plain}",
                                                       "train.init_scope=tables", "train.max_steps=1"])
    except ConfigError as error:
        out["refusal"] = str(error)
    out["left"] = str(os.path.exists(os.path.join(root, "gain")))
    return out


@pytest.mark.multiprocess
def test_a_table_matched_by_field_to_one_its_init_run_kept_frozen_takes_no_optimizer_state_for_it(tmp_path) -> None:
    """A gain network's ``teacher_device`` matched to a plain run's frozen ``t_device`` (no optimizer state there):
    refused up front naming both tables, not by DCP's missing key as 'a checkpoint of another model' (guards the
    frozen-table check seeing the tables by this run's names, under which that run froze none)."""
    (out,) = run_multiprocess(_gain_from_a_plain_run_with_a_frozen_table, world_size=1, root=str(tmp_path))
    assert "sharding.frozen_tables: t_device (for teacher_device) frozen there" in out.get("refusal", ""), out
    assert "train.init_optimizer=false" in out["refusal"] and out["left"] == "False"


def test_the_optimizer_state_of_a_table_matched_by_field_is_checked_under_its_saved_tables_name() -> None:
    """``_check_optimizer_state_fits(origins={table: the saved table it comes from})``: a saved table kept frozen (no
    state) that a table of another name takes is refused naming both, and the column-split check is told which
    saved table each one's state comes from (guards both checks looking the tables up by this run's names)."""
    config = load_config(DEEPFM_CONFIG, ["train.init_from=runs/day1", "train.init_scope=tables"])
    frozen = load_config(DEEPFM_CONFIG, ["sharding.frozen_tables=[t_device]"])
    with mock.patch("recsys_llm.train.init_from.check_same_table_state_layout"):
        with pytest.raises(ConfigError, match=r"sharding\.frozen_tables: t_device \(for teacher_device\) frozen there"):
            _check_optimizer_state_fits(config, frozen, None, "runs/day1/sharding_plan.json", kinds=("sparse",),
                                        origins={"teacher_device": "t_device", "teacher_user_id": "t_user_id"})
    with mock.patch("recsys_llm.train.init_from.check_same_table_state_layout") as layout:
        _check_optimizer_state_fits(config, load_config(DEEPFM_CONFIG), None, "runs/day1/sharding_plan.json",
                                    kinds=("sparse",), origins={"teacher_device": "t_device", "t_age": "t_age"})
    assert layout.call_args.kwargs["renamed"] == {"teacher_device": "t_device"}
