"""The table driver's helpers: backbone overrides, validation picks, gains, reuse of identical runs."""

import json
import os

import pytest

from experiments.common import (
    _same_experiment,
    base_config_path,
    model_overrides,
    pick_on_validation,
    relative_gain,
    summarize,
)
from recsys_llm.train.config import load_config, save_config


def _result(valid_auc, test_auc):
    return {"valid": {"auc": valid_auc}, "test": {"auc": test_auc, "logloss": 0.5}}


def test_pick_on_validation_ignores_test_metrics():
    candidates = {"a": _result(0.70, 0.90), "b": _result(0.72, 0.60)}
    assert pick_on_validation(candidates) == "b"
    with pytest.raises(ValueError, match="no candidate"):
        pick_on_validation({})


def test_relative_gain_of_summarized_means():
    table = summarize({"plain": [_result(0.7, 0.80), _result(0.7, 0.80)], "x": [_result(0.7, 0.84)]})
    assert relative_gain(table, "x", "plain") == pytest.approx(0.05)


def test_synthetic_model_overrides_give_the_ml100k_architecture():
    config = load_config(base_config_path("synthetic", "dcnv2"), model_overrides("synthetic", "dcnv2"))
    reference = load_config(base_config_path("ml100k", "dcnv2"))
    assert config.model == reference.model
    assert model_overrides("ml100k", "dcnv2") == []


def test_identical_finished_run_is_recognised(tmp_path):
    config = load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={tmp_path / 'a'}"])
    other = tmp_path / "b"
    os.makedirs(other)
    save_config(load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={other}"]), str(other / "config.yaml"))
    assert not _same_experiment(config, str(other))  # not finished yet
    (other / "results.json").write_text(json.dumps(_result(0.7, 0.7)))
    assert _same_experiment(config, str(other))
    changed = load_config(base_config_path("ml100k", "fm"), ["train.seed=1", f"train.run_dir={tmp_path / 'a'}"])
    assert not _same_experiment(changed, str(other))
