"""Bad input on the command line ends with one line naming it (exit code 2), before any work."""

import os

import pytest
import torch

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
    assert _error_line(capsys) == f"recsys-llm semantics adapt: error: {missing}: model directory not found " \
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
                 "--output-dir", str(tmp_path / "vectors"), "--granularity", "entity", "--entity-field", "color"])
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
    assert _error_line(capsys) == ("recsys-llm semantics adapt: error: CTRLLMConfig.representation_dim "
                                   "(semantics adapt --representation-dim) must be an integer >= 1, got -3")
    assert not os.path.exists(tmp_path / "out")


def test_a_bad_tune_option_is_named(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "tune", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "out"), "--lr", "-1"])
    assert code == 2
    assert "SSFTConfig.learning_rate (semantics tune --lr) must be a finite number > 0, got -1.0" in _error_line(capsys)


@pytest.mark.parametrize("command", [["tune", "--output-dir", "out"], ["encode", "--output", "v.safetensors"]])
def test_an_unknown_dtype_is_named_by_its_flag_before_any_work(tmp_path, command, capsys) -> None:
    """It was refused only as the model loaded, after the schema and its values were read, as 'dtype must be
    ...' (naming no flag)."""
    with pytest.raises(SystemExit) as exit_info:
        main(["semantics", *command, "--schema", str(tmp_path / "none"), "--dtype", "fp64"])
    assert exit_info.value.code == 2
    assert "argument --dtype/--llm-dtype: invalid choice: 'fp64' (choose from" in capsys.readouterr().err
    # --llm-dtype, as adapt names it, is the same option
    with pytest.raises(SystemExit):
        main(["semantics", *command, "--schema", str(tmp_path / "none"), "--llm-dtype", "fp64"])
    assert "argument --dtype/--llm-dtype: invalid choice: 'fp64'" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["adapt", "--output-dir", "out"], ["export", "--llm", "m", "--output-dir", "v"]])
def test_fields_without_a_field_name_are_named_by_the_flag(tmp_path, command, capsys) -> None:
    """A bare --fields (an empty shell variable after it) was 'row-text config selects no fields', naming no flag."""
    with pytest.raises(SystemExit) as exit_info:
        main(["semantics", *command, "--schema", str(tmp_path / "none"), "--fields"])
    assert exit_info.value.code == 2
    assert "argument --fields: expected at least one argument" in capsys.readouterr().err


def test_an_unknown_row_text_placeholder_is_refused(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(tmp_path / "out"), "--template", "{descr} is {value}"])
    assert code == 2
    assert _error_line(capsys) == ("recsys-llm semantics adapt: error: row-text template '{descr} is {value}': unknown "
                                   "placeholder {descr}; use {description} and {value}")


def test_an_unknown_field_template_placeholder_is_refused(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output", str(tmp_path / "f.safetensors"), "--field-template", "{descr}"])
    assert code == 2
    assert "PromptTemplates.field (--field-template) '{descr}': unknown placeholder {descr}" in _error_line(capsys)


@pytest.mark.parametrize("case", ["no_tokenizer", "empty", "data"])
def test_a_model_directory_that_is_not_a_whole_model_is_named(tmp_path, tiny_schema, tiny_bert_dir, case,
                                                               capsys) -> None:
    """Without tokenizer files transformers builds an empty tokenizer (every word [UNK]): refused first."""
    import shutil

    model = str(tmp_path / "model")
    if case == "no_tokenizer":
        shutil.copytree(tiny_bert_dir, model)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            os.remove(os.path.join(model, name))
        expected = f"{model}: no tokenizer files (looked for tokenizer.json, tokenizer_config.json, vocab.txt"
    else:
        model = tiny_schema.root if case == "data" else model
        os.makedirs(model, exist_ok=True)
        expected = f"{model}: not a Hugging Face model directory (no config.json)"
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", model,
                 "--output", str(tmp_path / "f.safetensors")])
    assert code == 2
    assert _error_line(capsys).startswith(f"recsys-llm semantics encode: error: {expected}")
    assert not os.path.exists(tmp_path / "f.safetensors")


@pytest.mark.parametrize("case", ["yaml", "foreign_safetensors", "directory"])
def test_an_encode_output_of_something_else_is_refused_before_encoding(tmp_path, tiny_schema, tiny_bert_dir, case,
                                                                        capsys, monkeypatch) -> None:
    from safetensors.torch import save_file

    from recsys_llm.semantics import field_vectors

    output = tmp_path / ("keep" if case == "directory" else "keep.txt")
    if case == "yaml":
        output.write_text("train:\n  epochs: 3\n", encoding="utf-8")
        expected = "exists and is not a field-vector file written by `recsys-llm semantics encode`"
    elif case == "foreign_safetensors":
        save_file({"weight": torch.ones(2, 3)}, str(output), metadata={"format": "pt"})
        expected = "exists and is not a field-vector file written by `recsys-llm semantics encode`"
    else:
        output.mkdir()
        (output / "notes.txt").write_text("mine", encoding="utf-8")
        expected = "is a directory; expected a .safetensors file path"
    before = {p: p.read_bytes() for p in [output, *output.glob("*")] if p.is_file()}
    monkeypatch.setattr(field_vectors, "build_field_encoder", _no_work)
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output", str(output)])
    assert code == 2
    assert _error_line(capsys) == f"recsys-llm semantics encode: error: {output}: {expected}" + (
        "" if case == "directory" else " (no vector provenance in its metadata); writing the vectors there would "
                                       "replace it: choose another --output path, or delete the file first")
    assert {p: p.read_bytes() for p in [output, *output.glob("*")] if p.is_file()} == before


@pytest.mark.parametrize("under", ["", "sub"])
def test_an_encode_output_under_a_file_is_refused_before_encoding(tmp_path, tiny_schema, tiny_bert_dir, capsys,
                                                                   monkeypatch, under) -> None:
    """It was '[Errno 17] File exists: ...' after the model had loaded and encoded every field."""
    from recsys_llm.semantics import field_vectors

    (tmp_path / "afile").write_text("mine", encoding="utf-8")
    output = os.path.join(tmp_path, "afile", under, "v.safetensors")
    monkeypatch.setattr(field_vectors, "build_field_encoder", _no_work)
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output", output])
    assert code == 2
    assert _error_line(capsys) == (f"recsys-llm semantics encode: error: {output}: {tmp_path / 'afile'} is a file, not a "
                                   "directory; choose another output path")
    assert (tmp_path / "afile").read_text(encoding="utf-8") == "mine"


def _no_work(*args, **kwargs):
    raise AssertionError("the model was loaded before the output was checked")


def test_encode_replaces_its_own_earlier_vector_file_and_refuses_other_vectors_over_it(tmp_path, tiny_schema, tiny_bert_dir, capsys) -> None:
    from recsys_llm.semantics.store import load_vectors

    output = str(tmp_path / "fields.safetensors")
    args = ["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output", output]
    assert main(args) == 0
    first = load_vectors(output, schema=tiny_schema).provenance.created_at
    assert main(args) == 0  # the same vectors again replace it
    assert load_vectors(output, schema=tiny_schema).provenance.created_at >= first
    capsys.readouterr()
    # other settings give other vectors, which runs trained on the file's would no longer find
    assert main(args + ["--pooling", "cls"]) == 2
    refusal = _error_line(capsys)
    assert "holds other field vectors" in refusal and "differing: pooling" in refusal, refusal
    assert load_vectors(output, schema=tiny_schema).provenance.pooling != "cls"
    os.remove(output)
    assert main(args + ["--pooling", "cls"]) == 0
    assert load_vectors(output, schema=tiny_schema).provenance.pooling == "cls"


def test_a_tune_output_dir_of_other_files_is_refused_before_any_work(tmp_path, tiny_schema, tiny_bert_dir, capsys,
                                                                     monkeypatch) -> None:
    from recsys_llm.semantics import ssft

    work = tmp_path / "mf"
    work.mkdir()
    (work / "metrics.json").write_text("{}", encoding="utf-8")  # a name SSFT writes too: not what is named
    (work / "notes.txt").write_text("mine", encoding="utf-8")
    monkeypatch.setattr(ssft, "load_model", _no_work)
    code = main(["semantics", "tune", "--schema", tiny_schema.root, "--model", tiny_bert_dir,
                 "--output-dir", str(work), "--epochs", "1"])
    assert code == 2
    assert _error_line(capsys) == (
        f"recsys-llm semantics tune: error: {work}: not empty and not an earlier SSFT output: 'notes.txt' is not one of "
        "its entries (adapter/, checkpoint/, metrics.json and field_retrieval.png); writing the SSFT output there "
        "would mix it with "
        "other files; choose another (or an empty) output directory")
    assert sorted(os.listdir(work)) == ["metrics.json", "notes.txt"]
    assert (work / "notes.txt").read_text(encoding="utf-8") == "mine"


def _help(command: str, capsys) -> str:
    with pytest.raises(SystemExit):
        main(["semantics", command, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults(capsys) -> None:
    adapt = _help("adapt", capsys)
    assert "--representation-dim REPRESENTATION_DIM size of r (multiple of 4 for tables) (default: 128)" in adapt
    assert "--lora-r LORA_R --tuning lora: LoRA rank (default: 8)" in adapt
    assert "--epochs EPOCHS passes over the sampled rows (default: 1)" in adapt
    assert "(default: None)" not in adapt and "(default: False)" not in adapt
    tune = _help("tune", capsys)
    for text in ("--epochs EPOCHS passes over the training prompts (default: 2)",
                 "--lr LR AdamW learning rate of the LoRA weights (default: 0.0001)",
                 "--batch-size BATCH_SIZE prompts per step (default: 16)",
                 "--max-length MAX_LENGTH tokens per text (default: 256)"):
        assert text in tune
    assert "--batch-size BATCH_SIZE texts per forward pass (default: 64)" in _help("encode", capsys)
    assert "(default: all rows)" in adapt
    assert "fields written into an entity's text (default: the --entity-field alone)" in _help("export", capsys)


def test_entity_export_without_entity_field_is_refused_before_the_llm_loads(tmp_path, tiny_schema, capsys) -> None:
    missing_llm = str(tmp_path / "no_llm")  # loading it would fail with another message
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--llm", missing_llm,
                 "--output-dir", str(tmp_path / "vectors"), "--granularity", "entity"])
    assert code == 2
    assert _error_line(capsys) == ("recsys-llm semantics export: error: --granularity entity needs "
                                   "--entity-field, the user or item id field whose ids get a vector each "
                                   "(e.g. --entity-field item_id)")
    assert not os.path.exists(tmp_path / "vectors")


@pytest.mark.parametrize("flags, named", [(["--entity-field", "color"], "--entity-field"),
                                          (["--entity-field", "color", "--entity-fields", "city"],
                                           "--entity-field and --entity-fields")])
def test_entity_flags_without_entity_granularity_are_refused_before_the_llm_loads(tmp_path, tiny_schema, capsys,
                                                                                 flags, named) -> None:
    """They were ignored: a forgotten --granularity entity exported a vector per row (an LLM pass per row)."""
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--llm", str(tmp_path / "no_llm"),
                 "--output-dir", str(tmp_path / "vectors"), *flags])
    assert code == 2
    assert _error_line(capsys) == (f"recsys-llm semantics export: error: {named}: only with --granularity "
                                   "entity; --granularity row (the default) gives every row a vector: add "
                                   "--granularity entity, or leave them out")
    assert not os.path.exists(tmp_path / "vectors")


def test_the_library_names_the_flag_of_a_missing_entity_field(tmp_path, tiny_schema) -> None:
    from recsys_llm.semantics.row_text import RowTextRenderer
    from recsys_llm.semantics.schema_export import export_schema_vectors
    from recsys_llm.semantics.vector_export import VectorExportConfig

    with pytest.raises(ValueError, match=r"needs entity_field \(semantics export --entity-field\)"):
        export_schema_vectors(tiny_schema, ["train"], RowTextRenderer(tiny_schema),
                              lambda texts: torch.zeros(len(texts), 4), str(tmp_path / "vectors"), {},
                              VectorExportConfig(), granularity="entity")


def test_a_model_with_its_own_code_runs_only_with_trust_remote_code(tmp_path, tiny_schema, tiny_bert_dir) -> None:
    """config.json's auto_map names Python files of the model directory: refused unless asked."""
    import json
    import shutil
    import subprocess
    import sys

    model = str(tmp_path / "custom")
    shutil.copytree(tiny_bert_dir, model)
    with open(os.path.join(model, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config.update(model_type="my_custom_bert", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                         "AutoModel": "modeling_custom.CustomModel"})
    with open(os.path.join(model, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    with open(os.path.join(model, "configuration_custom.py"), "w", encoding="utf-8") as handle:
        handle.write("from transformers import BertConfig\n\n\nclass CustomConfig(BertConfig):\n"
                     "    model_type = 'my_custom_bert'\n")
    with open(os.path.join(model, "modeling_custom.py"), "w", encoding="utf-8") as handle:
        handle.write("from transformers import BertModel\n\nfrom .configuration_custom import CustomConfig\n\n\n"
                     "class CustomModel(BertModel):\n    config_class = CustomConfig\n")
    # transformers copies the model's code into HF_MODULES_CACHE: keep it inside the test
    env = dict(os.environ, HF_MODULES_CACHE=str(tmp_path / "modules"))
    command = [sys.executable, "-m", "recsys_llm.cli", "semantics", "encode", "--schema", tiny_schema.root,
               "--model", model, "--output", str(tmp_path / "v.safetensors")]
    refused = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2, refused.stderr[-2000:]
    assert "model_type 'my_custom_bert' is not in this transformers" in refused.stderr
    assert "--trust-remote-code" in refused.stderr and not (tmp_path / "v.safetensors").exists()
    trusted = subprocess.run(command + ["--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert (tmp_path / "v.safetensors").exists()
    adapt = [sys.executable, "-m", "recsys_llm.cli", "semantics", "adapt", "--schema", tiny_schema.root, "--model",
             model, "--output-dir", str(tmp_path / "ctr_llm"), "--sample-rows", "8", "--batch-size", "4",
             "--max-length", "16", "--representation-dim", "8", "--hidden-dim", "8", "--tuning", "heads"]
    refused = subprocess.run(adapt, capture_output=True, text=True, env=env, timeout=300)
    assert refused.returncode == 2 and "--trust-remote-code" in refused.stderr, refused.stderr[-2000:]
    trusted = subprocess.run(adapt + ["--trust-remote-code"], capture_output=True, text=True, env=env, timeout=300)
    assert trusted.returncode == 0, trusted.stderr[-2000:]


@pytest.mark.parametrize("rank", ["0", "1"])
def test_only_rank_0_shows_transformers_loading_bar(tmp_path, tiny_schema, tiny_bert_dir, rank) -> None:
    """Under torchrun every rank loads the LLM (``semantics export``): transformers' "Loading weights"
    bar is drawn by rank 0 alone, not once per rank over the others' line."""
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = {k: v for k, v in os.environ.items() if k != "HF_HUB_DISABLE_PROGRESS_BARS"}
    # bars drawn as on a terminal (in a log, RECSYS_LLM_PROGRESS_LINES on, the bar is left out on every rank)
    env.update(PYTHONPATH=repo, RANK=rank, WORLD_SIZE="2", RECSYS_LLM_PROGRESS_LINES="0")
    done = subprocess.run([sys.executable, "-m", "recsys_llm.cli", "semantics", "encode", "--schema", tiny_schema.root,
                           "--output", str(tmp_path / "v.safetensors"), "--model", tiny_bert_dir],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert ("Loading weights" in done.stderr) == (rank == "0"), done.stderr


def _missing_gpu() -> str:
    """A CUDA device this machine does not have (``cuda:0`` on a CPU-only machine)."""
    return f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"


@pytest.mark.parametrize("command", ["tune", "encode", "adapt", "export"])
@pytest.mark.parametrize("device", ["gpu0", "missing", "cuda"])
def test_a_device_this_machine_lacks_is_one_line_naming_the_flag(tmp_path, tiny_schema, tiny_bert_dir, capsys,
                                                                  command, device) -> None:
    """``--device`` takes what ``--help`` shows (e.g. cuda:0): a name torch does not know, or a GPU the
    machine lacks, is a user error of the flag (exit code 2), not a traceback from deep in torch, and
    adapt / export name it before the LLM loads (export's --llm here is no CTR-adapted LLM at all)."""
    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU for a bare cuda")
    device = _missing_gpu() if device == "missing" else device
    out = str(tmp_path / "out")
    argv = {
        "tune": ["--model", tiny_bert_dir, "--output-dir", out, "--samples-train", "4", "--samples-valid", "2"],
        "encode": ["--model", tiny_bert_dir, "--output", out + ".safetensors"],
        "adapt": ["--model", tiny_bert_dir, "--output-dir", out],
        "export": ["--llm", tiny_bert_dir, "--output-dir", out],
    }[command]
    code = main(["semantics", command, "--schema", tiny_schema.root, "--device", device, *argv])
    line = _error_line(capsys)
    assert code == 2, line
    assert line.startswith(f"recsys-llm semantics {command}: error: --device {device!r}: "), line
    assert "train.device" not in line
    assert not os.path.exists(out) and not os.path.exists(out + ".safetensors")


@pytest.mark.parametrize("label, expected", [(lambda i: i % 5, "label 2 is not a click label; expected 0 or 1"),
                                             (lambda i: None if i == 3 else i % 2, "null value; expected 0 or 1")])
def test_adapt_refuses_labels_that_are_not_clicks_before_the_llm_loads(tmp_path, tiny_schema, tiny_bert_dir, capsys,
                                                                        monkeypatch, label, expected) -> None:
    """train refuses them when it reads the split; adapt tuned BCE on ratings (targets up to 4) or NaN silently."""
    import shutil

    import pyarrow as pa
    import pyarrow.parquet as pq

    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM

    root = str(tmp_path / "ratings")
    shutil.copytree(tiny_schema.root, root)
    split = os.path.join(root, "train.parquet")
    table = pq.read_table(split)
    labels = pa.array([label(i) for i in range(table.num_rows)], pa.int64())
    pq.write_table(table.set_column(table.column_names.index("label"), "label", labels), split)
    monkeypatch.setattr(CTRAdaptedLLM, "from_config", lambda *args: pytest.fail("the LLM was loaded"))
    code = main(["semantics", "adapt", "--schema", root, "--model", tiny_bert_dir, "--output-dir",
                 str(tmp_path / "out"), "--sample-rows", "50"])
    assert code == 2
    line = _error_line(capsys)
    assert f"{split}: column 'label', row " in line and expected in line, line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("flags, expected", [  # (--chunk-rows 0: refused by argparse, tests/test_cli.py)
    (["--projection", "missing.safetensors"], r"missing\.safetensors: no projection file there"),
])
def test_a_bad_export_setting_is_named_before_the_llm_loads(tmp_path, tiny_schema, capsys, flags, expected) -> None:
    """A --projection path with no projection file (a typo) was named only after the LLM had loaded
    and the splits were read."""
    import re

    missing_llm = str(tmp_path / "no_llm")  # loading it would fail with another message
    flags = [str(tmp_path / flag) if flag.endswith(".safetensors") else flag for flag in flags]
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--llm", missing_llm,
                 "--output-dir", str(tmp_path / "vectors"), *flags])
    line = _error_line(capsys)
    assert code == 2 and re.search(expected, line), line
    assert not os.path.exists(tmp_path / "vectors")


@pytest.mark.parametrize("flags, expected", [
    (["--splits", "valid"], "--splits valid: not splits of schema 'tiny' (splits: train) nor Parquet files or "
                            "directories"),
    (["--fields", "color", "colour"], "row-text fields (semantics adapt / export --fields) ['colour']: no fields of "
                                      "schema 'tiny'"),
    ([], "train.parquet: no column(s) ['row_id'] for the row key / row text fields"),
    (["--granularity", "entity", "--entity-field", "colour"], "no column(s) ['colour'] for the entity field"),
    (["--granularity", "entity", "--entity-field", "price"], "entity field 'price' (semantics export --entity-field) "
                                                             "is a dense field"),
    (["--granularity", "entity", "--entity-field", "color", "--entity-fields", "color", "label"],
     "schema 'tiny' has no field 'label'"),
    (["--granularity", "entity", "--entity-field", "color", "--entity-fields", "color", "price", "price"],
     "entity text fields ['color', 'price', 'price'] (semantics export --entity-fields) name 'price' more than once"),
])
def test_the_splits_and_fields_an_export_reads_are_checked_before_the_llm_loads(tmp_path, tiny_schema, capsys,
                                                                                monkeypatch, flags, expected) -> None:
    """A split name, row key column or entity field the data lacks (a typo) was named only after the LLM had
    loaded."""
    from recsys_llm.semantics import ctr_llm_store

    monkeypatch.setattr(ctr_llm_store, "load_ctr_llm", lambda *args, **kwargs: pytest.fail("the LLM was loaded"))
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--llm", str(tmp_path / "llm"),
                 "--output-dir", str(tmp_path / "vectors"), *flags])
    line = _error_line(capsys)
    assert code == 2 and expected in line, line
    assert not os.path.exists(tmp_path / "vectors")


@pytest.mark.parametrize("change, expected", [
    (lambda table: table.slice(0, 0), "the file is empty (0 rows); expected at least one row"),
    (lambda table: table.drop_columns(["city"]), "missing column(s) ['city'] required by schema 'tiny'; file columns: "),
])
def test_adapt_checks_its_split_as_train_does_before_the_llm_loads(tmp_path, tiny_schema, tiny_bert_dir, capsys,
                                                                  monkeypatch, change, expected) -> None:
    """An empty split loaded the LLM, tuned no step and saved the untrained heads as an adapted LLM (exit 0, losses
    NaN); a split without a field's column failed in pyarrow ('No match for FieldRef.Name(city) in ...', over
    several lines, naming no file)."""
    import shutil

    import pyarrow.parquet as pq

    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM

    root = str(tmp_path / "changed")
    shutil.copytree(tiny_schema.root, root)
    split = os.path.join(root, "train.parquet")
    pq.write_table(change(pq.read_table(split)), split)
    monkeypatch.setattr(CTRAdaptedLLM, "from_config", lambda *args: pytest.fail("the LLM was loaded"))
    code = main(["semantics", "adapt", "--schema", root, "--model", tiny_bert_dir, "--output-dir",
                 str(tmp_path / "out")])
    assert code == 2
    line = _error_line(capsys)
    assert f"error: {split}: {expected}" in line, line
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("tuning, options, named", [
    ("lora", ["--last-k", "2"], "--last-k"),
    ("last_k", ["--lora-r", "4", "--target-modules", "query"], "--lora-r --target-modules"),
    ("heads", ["--last-k", "1"], "--last-k"),
])
def test_adapt_refuses_options_of_another_tuning_mode(tmp_path, tiny_schema, tiny_bert_dir, capsys, monkeypatch,
                                                     tuning, options, named) -> None:
    """``--last-k 2`` with LoRA tuning (the default) was silently ignored: the run tuned LoRA adapters."""
    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM

    monkeypatch.setattr(CTRAdaptedLLM, "from_config", lambda *args: pytest.fail("the LLM was loaded"))
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output-dir",
                 str(tmp_path / "out"), "--tuning", tuning, *options])
    assert code == 2
    assert f"error: {named}: not used by --tuning {tuning}" in _error_line(capsys)
    assert not os.path.exists(tmp_path / "out")


def test_a_second_adapt_into_the_same_output_is_refused_before_the_llm_loads(tmp_path, tiny_schema, tiny_bert_dir,
                                                                            capsys, monkeypatch) -> None:
    """Two adapts into one --output-dir shared the checkpoint beside it and swapped their files over each other's."""
    from recsys_llm.atomic_dir import file_locked
    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM

    out = tmp_path / "out"
    monkeypatch.setattr(CTRAdaptedLLM, "from_config", lambda *args: pytest.fail("the LLM was loaded"))
    with file_locked(f"{out}.lock", "held by the first adapt"):  # the first adapt, still running
        code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output-dir",
                     str(out)])
    assert code == 75  # EX_TEMPFAIL: the same command goes on once the other adapt has ended
    assert f"error: {out}: another semantics adapt is writing this output" in _error_line(capsys)
    assert not os.path.exists(out) and not os.path.exists(f"{out}.checkpoint")


def test_one_gpu_named_for_several_ranks_of_a_host_is_refused(tiny_schema, tiny_bert_dir, tmp_path, capsys,
                                                               monkeypatch) -> None:
    """`torchrun --nproc_per_node 8 ... semantics export --device cuda:1` put all eight ranks on GPU 1 (a bare cuda
    gives each rank its own)."""
    from recsys_llm.semantics.model_loading import resolve_device

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setenv("LOCAL_RANK", "3")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    import torch.distributed

    # as in a fresh torchrun worker (an earlier test of this process may have left its group of one)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    out = str(tmp_path / "out")
    code = main(["semantics", "export", "--schema", tiny_schema.root, "--device", "cuda:1", "--llm", tiny_bert_dir,
                 "--output-dir", out])
    line = _error_line(capsys)
    assert code == 2 and line == ("recsys-llm semantics export: error: --device 'cuda:1' names one GPU for all 8 ranks torchrun "
                                  "started on this host: pass cuda, which gives each rank its own (cuda:LOCAL_RANK)"), line
    assert not os.path.exists(out)
    # this rank's own GPU (cuda:$LOCAL_RANK), and outside torchrun, are no such mistake: the GPU's presence is checked
    if torch.cuda.is_available() and torch.cuda.device_count() > 3:
        return  # a host with those GPUs serves them
    for env, device in (({}, "cuda:3"), ({"TORCHELASTIC_RUN_ID": None}, "cuda:1")):
        for name, value in env.items():
            monkeypatch.delenv(name)
        with pytest.raises(ValueError) as error:
            resolve_device(device)
        assert "names one GPU" not in str(error.value) and "GPU(s)" in str(error.value), error.value


def test_a_gpu_named_under_torchrun_with_one_rank_per_host_is_no_such_mistake(monkeypatch) -> None:
    """`torchrun --nproc_per_node 1 ... --device cuda:1`: one rank on the host takes GPU 1 alone; only several
    ranks of one host sharing GPU N is refused."""
    import torch.distributed

    from recsys_llm.semantics.model_loading import resolve_device

    if torch.cuda.is_available() and torch.cuda.device_count() > 1:
        pytest.skip("a host with that GPU serves it")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    with pytest.raises(ValueError) as error:
        resolve_device("cuda:1")
    assert "names one GPU" not in str(error.value) and "GPU(s)" in str(error.value), error.value
