"""Bad input on the command line ends with one line naming it (exit code 2), before any work."""

import os

import pytest

from recsys_llm.cli import main


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()[0]


def test_a_missing_model_directory_is_named(tmp_path, tiny_schema, capsys) -> None:
    missing = str(tmp_path / "no_model")
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--llm", missing,
                 "--output-dir", str(tmp_path / "out")])
    assert code == 2
    assert _error_line(capsys) == f"recsys-llm semantics: error: {missing}: model directory not found " \
                                   "(models load offline from a local path)"
    assert not os.path.exists(tmp_path / "out")


def test_an_output_directory_of_other_files_is_refused_untouched(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("mine", encoding="utf-8")
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(work)])
    assert code == 2
    assert "not empty and not an earlier saved CTR-adapted LLM" in _error_line(capsys)
    assert os.listdir(work) == ["notes.txt"] and (work / "notes.txt").read_text(encoding="utf-8") == "mine"


def test_a_plain_model_is_not_a_ctr_adapted_llm(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--llm", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "vectors")])
    assert code == 2
    assert "not a CTR-adapted LLM saved by `recsys-llm semantics adapt`" in _error_line(capsys)


def test_traceback_on_request(tmp_path, tiny_schema, monkeypatch) -> None:
    monkeypatch.setenv("RECSYS_LLM_TRACEBACK", "1")
    with pytest.raises(FileNotFoundError, match="model directory not found"):
        main(["semantics", "adapt", "--schema", tiny_schema.root, "--llm", str(tmp_path / "none"),
              "--output-dir", str(tmp_path / "out")])


def test_a_negative_representation_dim_is_named_before_any_work(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "out"), "--representation-dim", "-3"])
    assert code == 2
    assert _error_line(capsys) == ("recsys-llm semantics: error: CTRLLMConfig.representation_dim "
                                   "(semantics adapt --representation-dim) must be an integer >= 1, got -3")
    assert not os.path.exists(tmp_path / "out")


def test_a_bad_tune_option_is_named(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "tune", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "out"), "--lr", "-1"])
    assert code == 2
    assert "SSFTConfig.learning_rate (semantics tune --lr) must be a finite number > 0, got -1.0" in _error_line(capsys)


def test_an_unknown_row_text_placeholder_is_refused(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "out"), "--template", "{descr} is {value}"])
    assert code == 2
    assert _error_line(capsys) == ("recsys-llm semantics: error: row-text template '{descr} is {value}': unknown "
                                   "placeholder {descr}; use {description} and {value}")


def test_an_unknown_field_template_placeholder_is_refused(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output", str(tmp_path / "f.safetensors"), "--field-template", "{descr}"])
    assert code == 2
    assert "PromptTemplates.field (--field-template) '{descr}': unknown placeholder {descr}" in _error_line(capsys)


@pytest.mark.parametrize("case", ["no_tokenizer", "empty", "data"])
def test_a_model_directory_that_is_not_a_whole_model_is_named(tmp_path, tiny_schema, tiny_bert_dir, case,
                                                               capsys) -> None:
    """transformers builds an empty tokenizer without tokenizer files (every word [UNK]): refused."""
    import shutil

    model = str(tmp_path / "model")
    if case == "no_tokenizer":
        shutil.copytree(tiny_bert_dir, model)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(model, name))
        expected = f"{model}: tokenizer has 5 tokens but config.json has vocab_size"
    else:
        model = tiny_schema.root if case == "data" else model
        os.makedirs(model, exist_ok=True)
        expected = f"{model}: not a Hugging Face model directory (no config.json)"
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", model,
                 "--output", str(tmp_path / "f.safetensors")])
    assert code == 2
    assert _error_line(capsys).startswith(f"recsys-llm semantics: error: {expected}")
    assert not os.path.exists(tmp_path / "f.safetensors")


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["semantics", command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults(capsys) -> None:
    adapt = _help("adapt", capsys)
    assert "--representation-dim REPRESENTATION_DIM size of r (multiple of 4 for tables) (default: 128)" in adapt
    assert "--lora-r LORA_R LoRA rank (default: 8)" in adapt
    assert "--epochs EPOCHS passes over the sampled rows (default: 1)" in adapt
    assert "(default: None)" not in adapt and "(default: False)" not in adapt
    tune = _help("tune", capsys)
    for text in ("--epochs EPOCHS passes over the training prompts (default: 2)",
                 "--lr LR AdamW learning rate of the LoRA weights (default: 0.0001)",
                 "--batch-size BATCH_SIZE prompts per step (default: 16)",
                 "--max-length MAX_LENGTH tokens per text (default: 256)"):
        assert text in tune
    assert "--batch-size BATCH_SIZE texts per forward pass (default: 64)" in _help("encode", capsys)
