"""A run directory is enough to audit and repeat the run months later: ``config.yaml`` holds every setting at
its effective value (the ``llactr`` / ``elec`` sections' defaults too), and each job's ``started`` /
``resumed`` record of ``metrics.jsonl`` names the code and library versions and the command that ran it."""

import dataclasses
import os
import sys
from typing import List

import pytest
import yaml

from recsys_llm import __version__
from recsys_llm.cli import main as cli_main
from recsys_llm.env import installed_versions, job_provenance
from recsys_llm.modules.elec import ELECConfig
from recsys_llm.modules.llactr import LLaCTRConfig
from recsys_llm.train.config import config_differences, load_config, save_config
from recsys_llm.train.run_records import read_metrics
from recsys_llm.train.runner import run_training

PLUGIN_SECTIONS = [
    ["llactr.vectors_path=runs/fields.safetensors", "llactr.lambda_fre=1e-1"],
    ["elec.task=gain", "elec.vector_dim=16", "elec.vector_source=entity_table", "elec.entity_field=item_id",
     "elec.entity_vectors=runs/item_vectors"],
    ["elec.task=distill", "elec.vector_dim=16", "elec.distill.mode=joint", "elec.distill.alpha=0.5"],
]


@pytest.mark.parametrize("overrides", PLUGIN_SECTIONS, ids=["llactr", "elec_gain", "elec_distill"])
def test_the_saved_config_holds_the_plugin_sections_defaults_and_reads_back_as_the_same_run(
    tmp_path, overrides: List[str],
) -> None:
    config = load_config(None, overrides)
    path = os.path.join(str(tmp_path), "config.yaml")
    save_config(config, path)
    with open(path, encoding="utf-8") as handle:
        saved = yaml.safe_load(handle)
    section = overrides[0].split(".", 1)[0]
    parsed = LLaCTRConfig if section == "llactr" else ELECConfig
    # every setting written out, not only those the user gave: a later default cannot change the run
    assert set(saved[section]) == {field.name for field in dataclasses.fields(parsed)}
    if section == "elec":
        distill = type(ELECConfig.from_dict(config.elec).distill)
        assert set(saved["elec"]["distill"]) == {field.name for field in dataclasses.fields(distill)}
    assert saved[section] != dict(config.to_dict()[section])
    reread = load_config(path)
    assert config_differences(config, reread) == []
    assert config_differences(reread, load_config(path)) == []  # saved again, the same


def test_job_provenance_names_the_versions_and_the_command(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["recsys-llm", "train", "--config", "c.yaml", "train.epochs=2"])
    provenance = job_provenance()
    assert provenance["command"] == ["recsys-llm", "train", "--config", "c.yaml", "train.epochs=2"]
    versions = provenance["versions"]
    assert versions["recsys_llm"] == __version__ and versions["torchrec"] == installed_versions()["torchrec"]
    assert versions["torch"] and versions["fbgemm_gpu"] and versions["python"]
    assert "recsys_llm_commit" in versions


def test_each_job_of_a_run_records_its_versions_and_command(synthetic_dir: str, tmp_path,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    run_dir = os.path.join(str(tmp_path), "run")
    overrides = [f"data.schema={synthetic_dir}", "data.batch_size=2048", "data.synthetic_rows=0", "train.epochs=1",
                 "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}",
                 "model.name=deepfm", "model.mlp_layer_sizes=[8]", "model.embedding_dim=4"]
    monkeypatch.setattr(sys, "argv", ["recsys-llm", "train", *overrides])
    run_training(load_config(None, overrides))
    run_training(load_config(None, [*overrides, "train.epochs=2"]))  # a resume: its own record
    events = [record for record in read_metrics(run_dir) if record.get("event") in ("started", "resumed")]
    assert [record["event"] for record in events] == ["started", "resumed"]
    for record in events:
        assert record["versions"]["recsys_llm"] == __version__ and record["versions"]["torch"]
        assert record["command"] == ["recsys-llm", "train", *overrides]


def test_print_config_shows_the_effective_config_and_trains_nothing(tmp_path,
                                                                     capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "c.yaml"
    run_dir = tmp_path / "run"
    path.write_text(f"train: {{epochs: 1, run_dir: {run_dir}}}\nllactr: {{vectors_path: v.safetensors}}\n")
    assert cli_main(["train", "--print-config", "--config", str(path), "train.epochs=3", "llactr.lambda_fie=0.5"]) == 0
    text = capsys.readouterr().out
    printed = yaml.safe_load(text)
    assert printed["train"]["epochs"] == 3 and printed["data"]["batch_size"] == 1024
    assert printed["llactr"]["lambda_fie"] == 0.5 and printed["llactr"]["fre_field_reduction"] == "sum"
    (tmp_path / "printed.yaml").write_text(text)  # usable as a config: the same run
    assert config_differences(load_config(str(path), ["train.epochs=3", "llactr.lambda_fie=0.5"]),
                              load_config(str(tmp_path / "printed.yaml"))) == []
    assert not run_dir.exists()
