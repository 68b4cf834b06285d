"""``experiments.ml100k_backbones``: its command line."""

import pytest

from experiments.ml100k_backbones import main


def test_another_data_set_is_refused_not_replaced_by_ml100k(tmp_path, capsys) -> None:
    """``--data synthetic`` used to be accepted and ignored: the table trained on ML-100K."""
    with pytest.raises(SystemExit) as exit_info:
        main(["--data", "synthetic", "--data-dir", str(tmp_path / "data"), "--raw", str(tmp_path / "raw"),
              "--out", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    assert "--data synthetic: this table trains on ML-100K only" in capsys.readouterr().err
    assert not (tmp_path / "data").exists()


def test_the_table_records_a_quick_run_and_its_command(tmp_path, monkeypatch) -> None:
    """A ``--quick`` smoke table (2 epochs) used to be written like the real one: nothing in
    ``ml100k_backbones.json`` told them apart."""
    import json

    import experiments.ml100k_backbones as script

    result = {"valid": {"auc": 0.7}, "test": {"auc": 0.75, "logloss": 0.5}}
    monkeypatch.setattr(script, "prepared_schema", lambda data, data_dir, raw: "schema.json")
    monkeypatch.setattr(script, "run_variant", lambda config, overrides, run_dir, counter: result)
    argv = ["--quick", "--backbones", "fm", "--seeds", "0", "1", "--out", str(tmp_path)]
    assert main(argv) == 0
    payload = json.loads((tmp_path / "ml100k_backbones.json").read_text(encoding="utf-8"))
    assert payload["quick"] is True and payload["mixed_precision"] == "fp32"
    assert payload["command"] == "python -m experiments.ml100k_backbones " + " ".join(argv)
    assert payload["table"]["fm"]["auc"] == {"mean": 0.75, "std": 0.0, "n": 2}


def test_a_table_of_other_settings_is_not_replaced_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    """With the default --out, a smoke run (`--quick --backbones fm --seeds 0`) replaced the committed six-backbone,
    three-seed results/ml100k_backbones.* with its one quick row, without a word."""
    import json

    import experiments.ml100k_backbones as script

    result = {"valid": {"auc": 0.7}, "test": {"auc": 0.75, "logloss": 0.5}}
    trained = []
    monkeypatch.setattr(script, "prepared_schema", lambda data, data_dir, raw: "schema.json")
    monkeypatch.setattr(script, "run_variant",
                        lambda config, overrides, run_dir, counter: trained.append(run_dir) or result)
    assert main(["--backbones", "fm", "fwfm", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0
    table = (tmp_path / "ml100k_backbones.json").read_text(encoding="utf-8")
    trained.clear()
    for argv, difference in ((["--quick", "--backbones", "fm", "fwfm", "--seeds", "0", "1"], "quick False -> True"),
                             (["--backbones", "fm", "fwfm", "--seeds", "0"], "seeds [0, 1] -> [0]"),
                             (["--backbones", "fm", "--seeds", "0", "1"], "backbones ['fwfm'] of it not run here"),
                             (["--backbones", "fm", "fwfm", "--seeds", "0", "1", "--mixed-precision", "bf16"],
                              "mixed precision fp32 -> bf16")):
        with pytest.raises(SystemExit) as refused:
            main([*argv, "--out", str(tmp_path)])
        assert str(refused.value).startswith(f"{tmp_path / 'ml100k_backbones.json'}: holds a table of other settings ("
                                             f"{difference})"), refused.value
    assert not trained and (tmp_path / "ml100k_backbones.json").read_text(encoding="utf-8") == table
    # elsewhere it goes, and the same settings (or more backbones) replace it
    assert main(["--quick", "--backbones", "fm", "--seeds", "0", "--out", str(tmp_path), "--tables-out",
                 str(tmp_path / "quick")]) == 0
    assert json.loads((tmp_path / "quick" / "ml100k_backbones.json").read_text(encoding="utf-8"))["quick"] is True
    assert main(["--backbones", "fm", "fwfm", "dcnv2", "--seeds", "0", "1", "--out", str(tmp_path)]) == 0


def test_mixed_precision_reaches_every_run_and_the_table(tmp_path, monkeypatch) -> None:
    import json

    import experiments.ml100k_backbones as script

    result = {"valid": {"auc": 0.7}, "test": {"auc": 0.75, "logloss": 0.5}}
    seen = []
    monkeypatch.setattr(script, "prepared_schema", lambda data, data_dir, raw: "schema.json")
    monkeypatch.setattr(script, "run_variant",
                        lambda config, overrides, run_dir, counter: seen.append(list(overrides)) or result)
    assert main(["--quick", "--backbones", "fm", "--seeds", "0", "--mixed-precision", "bf16", "--out",
                 str(tmp_path)]) == 0
    assert seen and all("train.mixed_precision=bf16" in overrides for overrides in seen), seen
    assert json.loads((tmp_path / "ml100k_backbones.json").read_text(encoding="utf-8"))["mixed_precision"] == "bf16"
