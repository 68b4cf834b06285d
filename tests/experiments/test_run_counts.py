"""The drivers number their training runs ``k/N``: ``N`` planned up front is the number they make."""

import itertools
import json
import os

import pytest

import experiments.elec as elec_driver
import experiments.llactr as llactr_driver
from experiments.common import RunCounter, base_config_path, run_variant, tune_on_validation, tuning_runs
from recsys_llm.train.config import load_config, save_config


def _counting_run_variant(labels):
    """A ``run_variant`` that trains nothing: it takes its number and returns distinct validation AUCs."""
    auc = itertools.count()

    def run_variant(config_path, overrides, run_dir, prepare=None, reuse=(), counter=None):
        labels.append(counter.next_label())
        value = 0.5 + next(auc) * 1e-4
        return {"valid": {"auc": value}, "test": {"auc": value, "logloss": 0.5}}

    return run_variant


@pytest.mark.parametrize("tune_on", ["all-seeds", "first-seed"])
@pytest.mark.parametrize("num_settings, num_seeds", [(1, 1), (3, 1), (2, 3), (9, 3)])
def test_tuning_runs_counts_the_runs_of_tune_on_validation(tune_on, num_settings, num_seeds) -> None:
    calls = []
    tune_on_validation([f"s{i}" for i in range(num_settings)], list(range(num_seeds)),
                       lambda setting, seed: calls.append(1) or {"valid": {"auc": 0.5}}, tune_on)
    assert tuning_runs(num_settings, num_seeds, tune_on) == len(calls)


@pytest.mark.parametrize("tune_on", ["all-seeds", "first-seed"])
def test_llactr_numbers_every_run_of_a_backbone(tmp_path, monkeypatch, tune_on) -> None:
    labels = []
    monkeypatch.setattr(llactr_driver, "run_variant", _counting_run_variant(labels))
    counter = RunCounter(llactr_driver.runs_per_backbone(2, tune_on))
    llactr_driver.run_backbone("synthetic", "fm", "schema.json", "fields.safetensors", [0, 1], str(tmp_path / "work"),
                               quick=True, tune_on=tune_on, counter=counter)
    assert labels[-1] == f"{counter.total}/{counter.total}"
    assert len(labels) == counter.total


@pytest.mark.parametrize("swap_fields, swap_catalog", [((), None), (("item_id",), None), (("item_id",), "items")])
@pytest.mark.parametrize("tune_on", ["all-seeds", "first-seed"])
def test_elec_numbers_every_run_of_a_backbone(tmp_path, monkeypatch, tune_on, swap_fields, swap_catalog) -> None:
    import recsys_llm.train.teacher_outputs

    labels = []
    monkeypatch.setattr(elec_driver, "run_variant", _counting_run_variant(labels))
    monkeypatch.setattr(elec_driver, "export_frozen_teacher", lambda gain_dir, state_dir: None)
    monkeypatch.setattr(recsys_llm.train.teacher_outputs, "write_teacher_outputs",
                        lambda config, gain_dir, out_dir, progress: {"schema": "teacher_schema.json"})
    counter = RunCounter(elec_driver.runs_per_backbone(2, tune_on, swap_fields, swap_catalog))
    elec_driver.run_backbone("synthetic", "deepfm", "schema.json", "base_schema.json", [0, 1], str(tmp_path / "work"),
                             quick=True, swap_fields=swap_fields, swap_catalog=swap_catalog, tune_on=tune_on,
                             counter=counter)
    assert labels[-1] == f"{counter.total}/{counter.total}"
    assert len(labels) == counter.total


def test_a_run_finished_earlier_is_numbered_and_named(tmp_path, capsys) -> None:
    """A resumed table said nothing of the runs it took from disk: its first line came with the first new run."""
    run_dir = tmp_path / "fm" / "seed0"
    os.makedirs(run_dir)
    config = load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={run_dir}"])
    save_config(config, str(run_dir / "config.yaml"))
    result = {"valid": {"auc": 0.7}, "test": {"auc": 0.7, "logloss": 0.5}}
    (run_dir / "results.json").write_text(json.dumps(result))
    counter = RunCounter(3)
    counter.next_label()
    assert run_variant(base_config_path("ml100k", "fm"), [], str(run_dir), counter=counter) == result
    assert capsys.readouterr().out == f"[done 2/3] {run_dir}: finished earlier\n"


@pytest.mark.parametrize("driver", ["ml100k_backbones", "llactr", "elec"])
def test_a_drivers_runs_are_numbered_over_all_its_backbones(tmp_path, monkeypatch, driver) -> None:
    """``N`` is the whole table's: every backbone's runs, numbered on from one backbone to the next."""
    import importlib

    import recsys_llm.train.teacher_outputs

    script = importlib.import_module(f"experiments.{driver}")
    labels = []
    monkeypatch.setattr(script, "run_variant", _counting_run_variant(labels))
    monkeypatch.setattr(script, "prepared_schema", lambda data, data_dir, raw, with_history=False: "schema.json")
    if driver == "llactr":
        monkeypatch.setattr(script, "llm_steps", lambda *args: ("fields.safetensors", "ssft.json"))
    if driver == "elec":
        monkeypatch.setattr(script, "llm_steps", lambda *args: ("schema.json", []))
        monkeypatch.setattr(script, "export_frozen_teacher", lambda gain_dir, state_dir: None)
        monkeypatch.setattr(recsys_llm.train.teacher_outputs, "write_teacher_outputs",
                            lambda config, gain_dir, out_dir, progress: {"schema": "teacher_schema.json"})
    if driver != "ml100k_backbones":
        monkeypatch.setattr(script, "report", lambda *args: None)  # the tables of runs that trained nothing
    assert script.main(["--quick", "--backbones", "deepfm", "dcnv2", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    per_backbone = {"ml100k_backbones": 2, "llactr": llactr_driver.runs_per_backbone(2, "all-seeds"),
                    "elec": elec_driver.runs_per_backbone(2, "all-seeds")}[driver]  # ML-100K's one entity: no swaps
    total = 2 * per_backbone
    assert labels == [f"{k}/{total}" for k in range(1, total + 1)]


def test_a_reused_run_and_a_new_run_are_numbered(tmp_path, monkeypatch, capsys) -> None:
    """Each kind of run's line carries its ``k/N``: a table taking runs from another said only `[reuse]`."""
    import experiments.common as common

    result = {"valid": {"auc": 0.7}, "test": {"auc": 0.7, "logloss": 0.5}}
    other = tmp_path / "backbones" / "fm" / "seed0"
    os.makedirs(other)
    save_config(load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={other}"]), str(other / "config.yaml"))
    (other / "results.json").write_text(json.dumps(result))
    monkeypatch.setattr(common, "run_training", lambda config: result)
    counter = RunCounter(2)
    run_dir = tmp_path / "llactr" / "plain" / "seed0"
    reused = run_variant(base_config_path("ml100k", "fm"), [], str(run_dir), reuse=[str(other)], counter=counter)
    assert reused == result
    assert run_variant(base_config_path("ml100k", "fm"), ["train.seed=1"], str(tmp_path / "new"), counter=counter) \
        == result
    reuse_line, trained = capsys.readouterr().out.splitlines()
    assert reuse_line == f"[reuse 1/2] {run_dir}: identical finished run {other}"
    assert trained.startswith(f"[run 2/2] {tmp_path / 'new'}: valid AUC 0.7000, test AUC 0.7000 ("), trained
