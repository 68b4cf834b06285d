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
