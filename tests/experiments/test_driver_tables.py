"""The LLaCTR and ELEC drivers refuse, before any work, to write their tables over a table of other settings
(as ``ml100k_backbones`` does: tests/experiments/test_ml100k_backbones.py)."""

import json

import pytest


@pytest.mark.parametrize("driver, table", [("llactr", "llactr_ml100k"), ("elec", "elec_ml100k")])
def test_a_quick_run_is_refused_over_a_full_table_before_any_work(tmp_path, monkeypatch, driver, table) -> None:
    import importlib

    script = importlib.import_module(f"experiments.{driver}")

    def work_started(*args, **kwargs):
        raise AssertionError("work started")

    monkeypatch.setattr(script, "prepared_schema", work_started)
    monkeypatch.setattr(script, "llm_steps", work_started)
    recorded = {"quick": False, "seeds": [0, 1, 2], "table": {"deepfm": {}, "dcnv2": {}}}
    (tmp_path / f"{table}.json").write_text(json.dumps(recorded), encoding="utf-8")
    with pytest.raises(SystemExit) as refused:
        script.main(["--quick", "--backbones", "deepfm", "dcnv2", "--out", str(tmp_path)])
    assert str(refused.value).startswith(f"{tmp_path / f'{table}.json'}: holds a table of other settings (quick "
                                         "False -> True"), refused.value
    assert json.loads((tmp_path / f"{table}.json").read_text(encoding="utf-8")) == recorded
