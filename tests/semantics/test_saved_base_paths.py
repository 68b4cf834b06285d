"""What a saved SSFT adapter and CTR-adapted LLM name as their base model, and loading them when it moved."""

import json
import os
import shutil

import pytest
import torch

from recsys_llm.semantics.ctr_llm_store import load_ctr_llm, save_ctr_llm
from recsys_llm.semantics.ssft import SSFTTrainer
from tests.semantics.test_ctr_llm import _tiny_bert_ctr_llm
from tests.semantics.test_ssft import _config


def test_an_ssft_adapter_names_its_base_by_absolute_path_whatever_the_working_directory(
        tmp_path, tiny_llama_dir, tiny_schema, monkeypatch) -> None:
    """peft wrote base_model_name_or_path as --model was typed: a relative path named another directory (or, to
    AutoPeftModel, a Hub id) from any other working directory, unlike ssft.json's and a CTR-adapted LLM's."""
    monkeypatch.chdir(os.path.dirname(tiny_llama_dir))
    relative = os.path.basename(tiny_llama_dir)
    out = str(tmp_path / "ssft")
    SSFTTrainer(_config(relative, epochs=1, samples_train=8, samples_valid=2), tiny_schema, out).run()
    with open(os.path.join(out, "adapter", "adapter_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["base_model_name_or_path"] == os.path.abspath(tiny_llama_dir)
    with open(os.path.join(out, "adapter", "ssft.json"), encoding="utf-8") as handle:
        assert json.load(handle)["base_model_path"] == os.path.abspath(tiny_llama_dir)


def test_a_ctr_adapted_llm_whose_base_moved_is_named_and_loads_from_the_new_place(tmp_path) -> None:
    """With the base model moved, loading failed with "<old path>: model directory not found" and semantics export
    had no way to name the new place short of editing config.json."""
    model, config = _tiny_bert_ctr_llm(tmp_path)
    out = str(tmp_path / "ctr_llm")
    save_ctr_llm(model, out)
    moved = str(tmp_path / "moved")
    shutil.move(config.model_path, moved)
    with pytest.raises(FileNotFoundError, match=r"the base model it was adapted on, .* is not there.*--model"):
        load_ctr_llm(out)
    texts = ["user id is 3. genre is comedy.", "genre is drama."]
    before = model.encode(texts, output="pooled")
    after = load_ctr_llm(out, model_path=moved).encode(texts, output="pooled")
    assert torch.equal(after, before)


def test_semantics_export_takes_the_moved_base_model(tmp_path, capsys) -> None:
    """semantics export had no --model: a CTR-adapted LLM whose base moved (or was copied to another machine) could
    be exported only after editing its config.json."""
    import pyarrow.parquet as pq

    from recsys_llm.cli import main
    from tests.semantics.test_export_attach import _data
    from tests.tiny_models import save_tiny_bert

    data, model = _data(str(tmp_path / "data")), save_tiny_bert(str(tmp_path / "bert"))
    llm = str(tmp_path / "llm")
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model", model, "--tuning", "heads",
                 "--representation-dim", "4", "--hidden-dim", "8", "--batch-size", "8"]) == 0
    export = ["semantics", "export", "--schema", data, "--llm", llm, "--chunk-rows", "8"]
    assert main([*export, "--output-dir", str(tmp_path / "before")]) == 0
    moved = shutil.move(model, str(tmp_path / "moved"))
    capsys.readouterr()
    assert main([*export, "--output-dir", str(tmp_path / "gone")]) == 2
    assert "is not there" in capsys.readouterr().err
    assert main([*export, "--output-dir", str(tmp_path / "after"), "--model", moved]) == 0
    before, after = (pq.read_table(str(tmp_path / name)).sort_by("key") for name in ("before", "after"))
    assert before.column("vector").to_pylist() == after.column("vector").to_pylist()
    assert main([*export, "--output-dir", str(tmp_path / "after"), "--model", str(tmp_path / "data")]) == 2
