"""The LLaCTR and ELEC tables: the settings picked on validation are the ones reported, and the relative gains
(per backbone, their mean, on cold items, vs the gain network) are those of the summarized test means."""

import argparse
import json
import os

import pytest

import experiments.elec as elec_driver
import experiments.llactr as llactr_driver
from experiments.common import RunCounter, summarize


def _runs(test_aucs, cold_aucs=None):
    """``{variant: [results per seed]}`` with fixed test AUCs (and cold-item AUCs) per seed."""
    return {variant: [{"valid": {"auc": 0.7}, "test": {"auc": auc, "logloss": 0.5,
                                                        **({"cold/auc": cold_aucs[variant][i], "cold/logloss": 0.6}
                                                           if cold_aucs else {})}}
                      for i, auc in enumerate(aucs)]
            for variant, aucs in test_aucs.items()}


def test_llactr_reports_gains_of_the_test_means_and_their_mean_over_backbones(tmp_path) -> None:
    tables = {
        "fm": summarize(_runs({"plain": [0.70, 0.70], "+FRE": [0.77, 0.77], "+FIE": [0.70, 0.70], "+both": [0.63, 0.63]},
                              {"plain": [0.50, 0.50], "+FRE": [0.55, 0.55], "+FIE": [0.60, 0.60], "+both": [0.50, 0.50]})),
        "deepfm": summarize(_runs({"plain": [0.80, 0.80], "+FRE": [0.80, 0.80], "+FIE": [0.88, 0.88], "+both": [0.80, 0.80]},
                                  {"plain": [0.60, 0.60], "+FRE": [0.60, 0.60], "+FIE": [0.60, 0.60], "+both": [0.54, 0.54]})),
    }
    choices = {b: {v: {"setting": f"{v}_x"} for v in llactr_driver.VARIANTS} for b in tables}
    ssft = tmp_path / "ssft.json"
    ssft.write_text(json.dumps({"before": {"accuracy": 0.5, "count": 8}, "after": {"accuracy": 0.75, "count": 8}}))
    args = argparse.Namespace(data="synthetic", seeds=[0, 1], tune_on="all-seeds", field_vectors="llm", quick=True,
                              fre_field_reduction="sum", ssft_budget=None, out=str(tmp_path), tables_out=None)
    llactr_driver.report(args, "llactr_test", tables, choices, "fields.safetensors", str(ssft), 0.0, [])
    payload = json.loads((tmp_path / "llactr_test.json").read_text())
    gains = payload["relative_auc_gain_vs_plain"]
    assert gains["+FRE"] == pytest.approx({"fm": 0.1, "deepfm": 0.0})
    assert gains["+FIE"] == pytest.approx({"fm": 0.0, "deepfm": 0.1})
    assert gains["+both"] == pytest.approx({"fm": -0.1, "deepfm": 0.0})
    # cold items: the gains of the cold-item AUC, not of the AUC over all rows
    assert gains["+FRE (cold items)"] == pytest.approx({"fm": 0.1, "deepfm": 0.0})
    assert gains["+both (cold items)"] == pytest.approx({"fm": 0.0, "deepfm": -0.1})
    assert set(gains) == {"+FRE", "+FIE", "+both"} | {f"{v} (cold items)" for v in ("+FRE", "+FIE", "+both")}
    assert payload["mean_relative_auc_gain_vs_plain"]["+FRE"] == pytest.approx(0.05)  # the mean over backbones
    assert payload["mean_relative_auc_gain_vs_plain"]["+both (cold items)"] == pytest.approx(-0.05)
    markdown = (tmp_path / "llactr_test.md").read_text()
    assert "| +FRE | +10.00% | +0.00% | +5.00% |" in markdown
    assert "| +both | -10.00% | +0.00% | -5.00% |" in markdown


def test_elec_reports_gains_vs_plain_and_vs_the_gain_network(tmp_path) -> None:
    tables = {
        "fm": summarize(_runs({"plain": [0.50, 0.50], "gain": [0.60, 0.60], "student (joint)": [0.66, 0.66]})),
        "deepfm": summarize(_runs({"plain": [0.80, 0.80], "gain": [0.80, 0.80], "student (joint)": [0.80, 0.80]})),
    }
    choices = {b: {"student (joint)": {"setting": "joint_a0.5_b0"}} for b in tables}
    args = argparse.Namespace(data="synthetic", seeds=[0, 1], tune_on="all-seeds", granularity="entity",
                              row_fields=["user_id", "item_id"], max_length=None, quick=True, out=str(tmp_path),
                              tables_out=None)
    elec_driver.report(args, "elec_test", tables, choices, "schema.json", ["item_id"], 256, 8, 0.0, [])
    payload = json.loads((tmp_path / "elec_test.json").read_text())
    assert set(payload["relative_auc_gain_vs_plain"]) == {"gain", "student (joint)"}  # plain is no row
    assert payload["relative_auc_gain_vs_plain"]["gain"] == pytest.approx({"fm": 0.2, "deepfm": 0.0})
    assert payload["relative_auc_gain_vs_plain"]["student (joint)"] == pytest.approx({"fm": 0.32, "deepfm": 0.0})
    assert set(payload["relative_auc_vs_gain"]) == {"student (joint)"}  # the gain network itself is no row
    assert payload["relative_auc_vs_gain"]["student (joint)"] == pytest.approx({"fm": 0.1, "deepfm": 0.0})
    markdown = (tmp_path / "elec_test.md").read_text()
    assert "| student (joint) | +32.00% | +0.00% | +16.00% | +5.00% |" in markdown
    assert "| gain | +20.00% | +0.00% | +10.00% | – |" in markdown


def _run_variant_by_setting(valid_auc, labels):
    """A ``run_variant`` that trains nothing: the validation AUC of a run is ``valid_auc(setting)`` (its run
    directory's setting); its test AUC ranks the settings the other way round."""
    def run_variant(config_path, overrides, run_dir, prepare=None, reuse=(), counter=None):
        labels.append(counter.next_label())
        setting = os.path.basename(os.path.dirname(run_dir))
        valid = valid_auc(setting)
        return {"valid": {"auc": valid}, "test": {"auc": 1.4 - valid, "logloss": 0.5}}

    return run_variant


def test_llactr_reports_the_lambdas_of_the_setting_picked_on_validation(tmp_path, monkeypatch) -> None:
    best = {"fre_fre0.1": 0.8, "fie_fie0.5": 0.8, "both_fre0.01_fie0.5": 0.8}
    labels = []
    monkeypatch.setattr(llactr_driver, "run_variant", _run_variant_by_setting(lambda s: best.get(s, 0.6), labels))
    _, choices = llactr_driver.run_backbone("synthetic", "fm", "schema.json", "fields.safetensors", [0, 1],
                                            str(tmp_path / "work"), quick=True, counter=RunCounter(1000))
    assert {v: (c["setting"], c["lambda_fre"], c["lambda_fie"]) for v, c in choices.items()} == {
        "+FRE": ("fre_fre0.1", 0.1, None), "+FIE": ("fie_fie0.5", None, 0.5),
        "+both": ("both_fre0.01_fie0.5", 0.01, 0.5)}


def test_elec_reports_the_kd_weights_of_the_setting_picked_on_validation(tmp_path, monkeypatch) -> None:
    labels = []
    monkeypatch.setattr(elec_driver, "run_variant",
                        _run_variant_by_setting(lambda s: 0.8 if s.endswith("_a0.5_b0.1") else 0.6, labels))
    monkeypatch.setattr(elec_driver, "export_frozen_teacher", lambda gain_dir, state_dir: None)
    import recsys_llm.train.teacher_outputs
    monkeypatch.setattr(recsys_llm.train.teacher_outputs, "write_teacher_outputs",
                        lambda config, gain_dir, out_dir, progress: {"schema": "teacher_schema.json"})
    _, choices = elec_driver.run_backbone("synthetic", "deepfm", "schema.json", "base_schema.json", [0, 1],
                                          str(tmp_path / "work"), quick=True, counter=RunCounter(1000))
    assert choices and all((c["alpha"], c["beta"]) == (0.5, 0.1) and c["setting"].endswith("_a0.5_b0.1")
                           for c in choices.values()), choices
