"""semantics adapt into the --output-dir of a CTR-adapted LLM of another base model says so before any work."""

import json
import os
import shutil
import warnings

from recsys_llm.cli import main
from recsys_llm.semantics.ctr_llm_store import replaced_base_note

ADAPT_ARGS = ["--sample-rows", "8", "--batch-size", "4", "--max-length", "16", "--representation-dim", "4",
              "--hidden-dim", "8", "--lr", "0.001"]


def test_adapt_over_an_adapted_llm_of_another_base_warns_naming_both(tmp_path, tiny_schema, tiny_bert_dir,
                                                                        tiny_llama_dir, capsys) -> None:
    out = str(tmp_path / "ctr_llm")
    adapt = ["semantics", "adapt", "--schema", tiny_schema.root, *ADAPT_ARGS, "--output-dir", out]
    assert main([*adapt, "--model", tiny_bert_dir]) == 0
    recorded = json.load(open(os.path.join(out, "provenance.json"), encoding="utf-8"))["base_weights"]
    capsys.readouterr()
    with warnings.catch_warnings(record=True) as caught:  # the same base again: replaced without a word
        warnings.simplefilter("always")
        assert main([*adapt, "--model", tiny_bert_dir]) == 0
    assert not [w for w in caught if "another base model" in str(w.message)]
    assert "another base model" not in capsys.readouterr().err
    assert replaced_base_note(out, tiny_bert_dir) is None
    note = replaced_base_note(out, tiny_llama_dir)
    assert note is not None and recorded in note and tiny_llama_dir in note and "another --output-dir" in note
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*adapt, "--model", tiny_llama_dir]) == 0
    assert [w for w in caught if str(w.message) == note]


def test_a_base_edited_in_place_counts_as_another_model(tmp_path, tiny_schema, tiny_bert_dir) -> None:
    model = str(tmp_path / "bert")
    shutil.copytree(tiny_bert_dir, model)
    out = str(tmp_path / "ctr_llm")
    assert main(["semantics", "adapt", "--schema", tiny_schema.root, *ADAPT_ARGS, "--model", model,
                 "--output-dir", out]) == 0
    assert replaced_base_note(out, model) is None
    assert replaced_base_note(out, os.path.relpath(model)) is None  # a relative path is the same model
    link = str(tmp_path / "link")
    os.symlink(model, link)
    assert replaced_base_note(out, link) is None  # so is a symlink to it
    shutil.copy(os.path.join(tiny_bert_dir, "config.json"), os.path.join(model, "config.json"))
    with open(os.path.join(model, "config.json"), "r+", encoding="utf-8") as file:
        config = json.load(file)
        config["layer_norm_eps"] = 1e-5
        file.seek(0)
        json.dump(config, file)
        file.truncate()
    assert replaced_base_note(out, model) is not None
    assert replaced_base_note(str(tmp_path / "none"), model) is None
