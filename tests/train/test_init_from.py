"""``train.init_from``: a new run starts from another run's weights (and optimizer state)."""

import json
import os
import shutil
from typing import Any, Dict, List

import pytest

from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.init_from import INIT_FROM_KEY
from recsys_llm.train.runner import run_training
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
    assert set(record["digests"]) and all(len(digest) == 64 for digest in record["digests"].values())
    started = {key: value for key, value in out["day2_started"].items() if key != "time"}
    assert started == {"event": "started", "global_step": 0, "epoch": 0, INIT_FROM_KEY: record["checkpoint"]}
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
    cases = {
        "model": (schema_dir, [f"train.init_from={day1}", "model.embedding_dim=8"]),
        "optimizer": (schema_dir, [f"train.init_from={day1}", "optim.sparse=adagrad"]),
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
    assert "schema fingerprint" in errors["schema"] and "train.init_from=" in errors["schema"]
    assert errors["bare"].startswith("FileNotFoundError") and "outside its run directory" in errors["bare"]
    nowhere = os.path.join(str(tmp_path), "nowhere")
    assert f"train.init_from={nowhere}: {nowhere}: no such checkpoint or run directory; expected" in errors["missing"]
    assert all(errors[f"{name}_left"] == "False" for name in ("model", "optimizer", "schema", "bare", "missing"))
