"""``recsys-llm demo`` end to end on a small synthetic set with a tiny random BERT as the LLM."""

import json
import math
import os
import re
import shutil
from typing import Any, Dict

import pyarrow.parquet as pq
import pytest

from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS
from recsys_llm.demo import (
    ADAPT_FIELDS,
    ELEC,
    LLACTR,
    PLAIN,
    STUDENT,
    auc_standard_error,
    comparison_table,
    run_demo,
    write_outputs,
)
from tests.multiprocess import run_multiprocess
from tests.tiny_models import save_tiny_bert

CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "synthetic_deepfm.yaml")
SMALL = ["data.batch_size=128", "data.eval_batch_size=512", "train.epochs=1", "train.progress=false",
         "train.device=cpu", "model.mlp_layer_sizes=[32,16]", "model.embedding_dim=8"]


def _demo(data_dir: str, run_root: str, llm: str) -> Dict[str, Any]:
    results = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, llm=llm)
    return {"results": results, "written": write_outputs(results, run_root), "table": comparison_table(results)}


@pytest.mark.multiprocess
def test_demo_generates_data_trains_four_variants_and_reports_cold_items(tmp_path) -> None:
    llm = save_tiny_bert(str(tmp_path / "llm"))
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    (out,) = run_multiprocess(_demo, world_size=1, data_dir=data_dir, run_root=run_root, llm=llm)
    assert os.path.exists(os.path.join(data_dir, "schema.json"))
    assert list(out["results"]) == [PLAIN, LLACTR, ELEC, STUDENT]
    for name, result in out["results"].items():
        assert result["test"]["auc"] > 0.5 and "cold/auc" in result["test"], name
    assert all(name in out["table"] for name in (PLAIN, LLACTR, ELEC, STUDENT))
    # the last line says how large a gain 3,000 rows can tell from noise
    assert re.fullmatch(rf"AUC standard error of {re.escape(PLAIN)} .*: ±0\.\d{{4}} on \d+ test rows, ±0\.\d{{4}} on "
                        r"\d+ cold-item rows; gains within about twice that are noise", out["table"].splitlines()[-1])
    with open(os.path.join(run_root, "demo_results.json"), encoding="utf-8") as handle:
        assert set(json.load(handle)) == {PLAIN, LLACTR, ELEC, STUDENT}
    assert os.path.exists(os.path.join(run_root, "demo_results.png"))
    student_test = out["results"][STUDENT]["test"]  # the exported student scored the test split as served
    assert student_test["served/auc"] == pytest.approx(student_test["auc"], abs=1e-6), student_test
    assert student_test["served/cold/auc"] == pytest.approx(student_test["cold/auc"], abs=1e-6), student_test
    assert student_test["served/logloss"] == pytest.approx(student_test["logloss"], abs=1e-5), student_test
    assert student_test["served/cold/logloss"] == pytest.approx(student_test["cold/logloss"], abs=1e-5), student_test
    assert "dense_program.pt2" in os.listdir(os.path.join(run_root, "served"))
    adapted_on = json.load(open(os.path.join(run_root, "llm", "ctr_llm", "adapted_on.json"), encoding="utf-8"))
    assert adapted_on["fields"] == ADAPT_FIELDS  # the text the entity exports read, not every field of the row
    plugins = json.load(open(os.path.join(run_root, "elec_gain", "plugins.json"), encoding="utf-8"))
    assert plugins["elec"]["vector_source"] == "entity_table"
    student = json.load(open(os.path.join(run_root, "elec_student", "plugins.json"), encoding="utf-8"))
    assert student["elec"]["distill"]["mode"] == "frozen"
    assert student["elec"]["distill"]["swap_fields"] == list(ITEM_FIELDS)
    assert student["elec"]["distill"]["swap_catalog"] == os.path.join(data_dir, ITEM_CATALOG)
    events = [json.loads(line) for line in open(os.path.join(run_root, "elec_student", "metrics.jsonl"), encoding="utf-8")]
    epoch = next(e for e in events if e["event"] == "epoch")
    train_rows = pq.ParquetFile(os.path.join(data_dir, "train.parquet")).metadata.num_rows
    assert epoch["samples"] == 2 * train_rows  # every training row plus one catalogue pair per row


def test_writing_the_outputs_leaves_the_calling_program_s_matplotlib_backend_alone(tmp_path) -> None:
    """A notebook calling the demo keeps its inline backend: the picture is drawn on a Figure of its own."""
    import matplotlib  # scripts/install.sh installs it (the bench extra): a broken install fails here, not skips
    results = {name: {"test": {"auc": 0.6 + 0.01 * i, "cold/auc": 0.55}} for i, name in enumerate([PLAIN, STUDENT])}
    backend = matplotlib.get_backend()
    matplotlib.use("svg")  # stands for a notebook's backend
    try:
        written = write_outputs(results, str(tmp_path))
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(backend)
    assert written[-1].endswith("demo_results.png") and os.path.getsize(written[-1]) > 0


def _demo_again(data_dir: str, run_root: str, llm: str, other_llm: str) -> Dict[str, Any]:
    """A demo, then the same again and with other settings / another LLM in its run directory."""
    from recsys_llm.train.config import ConfigError

    first = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, llm=llm)
    stamps = {name: os.stat(os.path.join(run_root, name, "results.json")).st_mtime_ns
              for name in ("plain", "llactr", "elec_gain", "elec_student")}
    again = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, llm=llm)
    refused = {}
    for label, overrides, model, with_llm in (
        ("overrides", SMALL + ["train.epochs=2", "model.name=fm"], llm, True),
        ("no_llm_overrides", SMALL + ["data.batch_size=64"], None, False),
        ("rows", SMALL, llm, True),
        ("llm", SMALL, other_llm, True),
    ):
        try:
            run_demo(CONFIG, data_dir, run_root, 5_000 if label == "rows" else 3_000, overrides, llm=model,
                     with_llm=with_llm)
        except ConfigError as error:
            refused[label] = str(error)
    # a setting that changes no finished result, and the run directory moved: still reused
    eval_batch = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL + ["data.eval_batch_size=64"], llm=llm)
    moved_root = f"{run_root}_moved"
    shutil.copytree(run_root, moved_root)
    moved_stamps = {name: os.stat(os.path.join(moved_root, name, "results.json")).st_mtime_ns for name in stamps}
    moved = run_demo(CONFIG, data_dir, moved_root, 3_000, SMALL, llm=llm)
    shutil.rmtree(data_dir)  # deleted (to save space, say): generated again, and the finished runs reused on it
    regenerated = run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, llm=llm)
    stamps_after = {name: os.stat(os.path.join(run_root, name, "results.json")).st_mtime_ns for name in stamps}
    moved_after = {name: os.stat(os.path.join(moved_root, name, "results.json")).st_mtime_ns for name in stamps}
    return {"first": first, "again": again, "refused": refused, "eval_batch": eval_batch, "moved": moved,
            "regenerated": regenerated, "data_there": os.path.isfile(os.path.join(data_dir, "schema.json")),
            "retrained": stamps != stamps_after or moved_stamps != moved_after}


@pytest.mark.multiprocess
def test_demo_reuses_outputs_only_when_made_with_the_same_inputs(tmp_path) -> None:
    llm = save_tiny_bert(str(tmp_path / "llm"))
    other_llm = save_tiny_bert(str(tmp_path / "other_llm"))
    with open(os.path.join(other_llm, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["hidden_dropout_prob"] = 0.2  # another model under another path
    with open(os.path.join(other_llm, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    run_root = str(tmp_path / "runs")
    (out,) = run_multiprocess(_demo_again, world_size=1, data_dir=str(tmp_path / "data"), run_root=run_root, llm=llm,
                              other_llm=other_llm)
    assert out["again"] == out["first"] and not out["retrained"]  # same inputs: every output reused
    assert out["eval_batch"] == out["first"] and out["moved"] == out["first"]
    assert out["regenerated"] == out["first"] and out["data_there"]  # the ELEC steps failed on the missing schema
    assert set(out["refused"]) == {"overrides", "no_llm_overrides", "rows", "llm"}, out["refused"]
    plain = os.path.join(run_root, "plain")
    assert "train.epochs: 1 -> 2" in out["refused"]["overrides"] and "model.name: 'deepfm' -> 'fm'" in out["refused"]["overrides"]
    assert out["refused"]["overrides"].startswith(plain)  # refused at the first step, before any training
    assert "data.batch_size: 128 -> 64" in out["refused"]["no_llm_overrides"]
    assert "data.synthetic_rows: 3000 -> 5000" in out["refused"]["rows"]
    assert other_llm in out["refused"]["llm"] and llm in out["refused"]["llm"]
    assert all("--run-dir" in message for message in out["refused"].values())


def test_demo_checks_the_llm_before_any_training(tmp_path, capsys) -> None:
    from recsys_llm.cli import main as cli_main

    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", data_dir, "--run-dir", run_root,
                     "--llm", "/nonexistent/model", *SMALL])
    err = capsys.readouterr().err
    assert code == 2
    assert "recsys-llm demo: error: /nonexistent/model: model directory not found" in err, err
    assert "Traceback" not in err and len([line for line in err.splitlines() if "error:" in line]) == 1, err
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)  # nothing generated or trained


def test_an_llm_whose_hidden_states_no_table_can_hold_is_refused_before_any_training(tmp_path, capsys) -> None:
    """A hidden size of 30 went through the plain and LLaCTR runs, adapt and both exports, then failed on the
    entity tables' multiple of 4, suggesting options demo does not have."""
    from transformers import BertConfig, BertModel

    from recsys_llm.cli import main as cli_main
    from tests.tiny_models import make_tokenizer

    llm = str(tmp_path / "bert30")
    tokenizer = make_tokenizer(with_mask=True)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=30, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, pad_token_id=tokenizer.pad_token_id)).save_pretrained(llm)
    tokenizer.save_pretrained(llm)
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", data_dir, "--run-dir", run_root, "--llm", llm, *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and f"--llm {llm}: its hidden states are 30 wide" in err, err
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)  # nothing generated or trained


def test_a_text_image_model_is_refused_before_any_training(tmp_path, capsys) -> None:
    """CLIP passed the demo's first checks and failed only after the plain DeepFM had trained (minutes at 200k rows)."""
    from transformers import CLIPConfig, CLIPModel

    from recsys_llm.cli import main as cli_main
    from tests.tiny_models import save_with_tokenizer, tiny_vocab_size

    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    llm = save_with_tokenizer(CLIPModel(CLIPConfig(text_config=dict(**tower, vocab_size=tiny_vocab_size()),
                                                   vision_config=dict(**tower, image_size=16, patch_size=8))),
                              tmp_path / "clip")
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", data_dir, "--run-dir", run_root, "--llm", llm, *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and f"{llm}: CLIPModel is a text-image dual encoder whose forward needs images" in err, err
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)  # nothing generated or trained


@pytest.mark.parametrize("flag", ["--run-dir", "--data-dir"])
def test_a_directory_under_a_file_is_named_before_any_work(tmp_path, capsys, flag) -> None:
    """A --run-dir under a file failed with '[Errno 20] Not a directory' after the data was generated."""
    from recsys_llm.cli import main as cli_main

    paths = {"--data-dir": str(tmp_path / "data"), "--run-dir": str(tmp_path / "runs")}
    (tmp_path / "afile").write_text("x")
    paths[flag] = str(tmp_path / "afile" / "sub")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", paths["--data-dir"], "--run-dir", paths["--run-dir"],
                     "--no-llm", *SMALL])
    assert code == 2
    assert (f"recsys-llm demo: error: {flag} {paths[flag]}: {tmp_path / 'afile'} is a file, not a directory"
            in capsys.readouterr().err)
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # nothing generated or trained


@pytest.mark.parametrize("flag", ["--run-dir", "--data-dir"])
def test_a_file_where_a_directory_goes_is_named_before_any_work(tmp_path, capsys, flag) -> None:
    """Not ``[Errno 20] Not a directory: 'afile/plain'`` after the data was generated."""
    from recsys_llm.cli import main as cli_main

    paths = {"--data-dir": str(tmp_path / "data"), "--run-dir": str(tmp_path / "runs")}
    (tmp_path / "afile").write_text("x")
    paths[flag] = str(tmp_path / "afile")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", paths["--data-dir"], "--run-dir", paths["--run-dir"],
                     "--no-llm", *SMALL])
    assert code == 2
    assert f"recsys-llm demo: error: {flag} {tmp_path / 'afile'}: a file; expected a directory" in capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == ["afile"]  # nothing generated or trained


def test_a_failing_step_is_one_user_error_with_its_message(tmp_path, capsys) -> None:
    from recsys_llm.cli import USER_ERRORS
    from recsys_llm.demo import _cli

    llm = save_tiny_bert(str(tmp_path / "llm"))
    missing = str(tmp_path / "missing" / "schema.json")
    with pytest.raises(USER_ERRORS) as raised:
        _cli(["semantics", "encode", "--schema", missing, "--output", str(tmp_path / "v.safetensors"), "--model", llm])
    assert str(raised.value).startswith("step `recsys-llm semantics encode` failed: ") and missing in str(raised.value)
    assert "error:" not in capsys.readouterr().err  # the sub-command printed no error line of its own


def test_plot_labels_are_wrapped_so_neighbours_do_not_overlap() -> None:
    from recsys_llm.demo import tick_label

    for name in (PLAIN, LLACTR, ELEC, STUDENT):
        label = tick_label(name)
        assert label.replace("\n", " ") == name  # every word kept, in order
        assert all(len(line) <= 20 for line in label.split("\n")), label
    assert tick_label(STUDENT) == "DeepFM ELEC student\n(no LLM at serving)"
    assert tick_label(LLACTR) == "DeepFM\n+ LLaCTR (FRE + FIE)"


def test_each_variant_says_where_it_trains_before_its_progress_bars(tmp_path, monkeypatch, capsys) -> None:
    """Four trainings show the same "epoch 0" bars: a line before each names the variant and its run
    directory (or that its finished run is reused), and one after gives its test AUC."""
    import recsys_llm.demo as demo

    trained = {"test": {"auc": 0.61234, "cold/auc": 0.59876}}
    monkeypatch.setattr(demo, "run_training", lambda config: trained)
    run_root = str(tmp_path / "runs")
    assert run_demo(CONFIG, str(tmp_path / "data"), run_root, 3_000, SMALL, with_llm=False) == {PLAIN: trained}
    out = capsys.readouterr().out
    plain_dir = os.path.join(run_root, "plain")
    assert f"== {PLAIN}: training into {plain_dir}\n== {PLAIN}: test AUC 0.6123 (cold items 0.5988)\n" in out, out
    monkeypatch.setattr(demo, "finished_results", lambda run_dir: trained)
    run_demo(CONFIG, str(tmp_path / "data"), run_root, 3_000, SMALL, with_llm=False)
    assert capsys.readouterr().out == f"== {PLAIN}: reusing the finished run in {plain_dir}\n"


def test_llm_outputs_adapted_on_other_fields_are_not_reused(tmp_path) -> None:
    """An earlier demo adapted the LLM on every field of the row (its record has no ``adapt_fields``):
    its LLM outputs are refused, naming the fields, not silently reused."""
    from recsys_llm.demo import LLM_RECORD, _check_same_llm
    from recsys_llm.train.config import ConfigError

    llm_dir = tmp_path / "llm"
    (llm_dir / "ctr_llm").mkdir(parents=True)  # an output of the earlier demo
    record = {"llm": "/models/minilm", "fingerprint": "abc", "adapt_fields": ADAPT_FIELDS}
    for saved, named in (({"llm": "/models/minilm", "fingerprint": "abc"}, "every field of the rows"),
                         ({**record, "adapt_fields": ["user_id"]}, "the fields ['user_id']")):
        (llm_dir / LLM_RECORD).write_text(json.dumps(saved), encoding="utf-8")
        with pytest.raises(ConfigError, match=rf"adapted on the text of {re.escape(named)}, not of the fields "
                                              rf"{re.escape(str(ADAPT_FIELDS))}.*--run-dir"):
            _check_same_llm(str(llm_dir), record, str(tmp_path))
    (llm_dir / LLM_RECORD).write_text(json.dumps(record), encoding="utf-8")
    _check_same_llm(str(llm_dir), record, str(tmp_path))  # the same: reused


def test_a_finished_run_is_not_reused_on_data_prepared_again_with_other_rows(tmp_path) -> None:
    """``recsys-llm prepare synthetic --out data/synthetic`` with other ``--rows`` or ``--seed`` after a
    demo keeps the demo's settings (data directory, ``--rows``) but not its data: its finished runs
    are refused, naming the data, before any work (they were reused, and the ELEC step failed later)."""
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.demo import _check_same_run
    from recsys_llm.train.config import ConfigError, load_config, save_config
    from recsys_llm.train.run_records import SCHEMA_FINGERPRINT_KEY, DATA_FINGERPRINTS_KEY, data_fingerprints

    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    run_dir = os.path.join(run_root, "plain")

    def prepare(rows: int, seed: int, **sizes: int) -> Any:
        shutil.rmtree(data_dir, ignore_errors=True)
        return generate_synthetic(data_dir, rows, seed=seed, **sizes)

    schema = prepare(2_000, 0)
    config = load_config(CONFIG, [f"data.schema={data_dir}/schema.json", "data.synthetic_rows=2000",
                                  f"train.run_dir={run_dir}", *SMALL])
    os.makedirs(run_dir)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump({"test": {"auc": 0.6}}, handle)
    with open(os.path.join(run_dir, "plugins.json"), "w", encoding="utf-8") as handle:
        json.dump({SCHEMA_FINGERPRINT_KEY: schema.fingerprint(),
                   DATA_FINGERPRINTS_KEY: data_fingerprints(config, schema)}, handle)
    _check_same_run(config, run_dir, run_root)  # the data it trained on: reused
    for rows, seed, sizes, named in (
        (2_000, 1, {}, f"the data of split(s) ['train', 'valid', 'test'] in {data_dir} changed since the run"),
        (5_000, 0, {}, "the data of split(s)"),
        (2_000, 0, {"num_users": 300}, f"the schema of {data_dir}: fingerprint"),
    ):
        prepare(rows, seed, **sizes)
        with pytest.raises(ConfigError, match=rf"^{re.escape(run_dir)}: .*{re.escape(named)}.*--run-dir"):
            _check_same_run(config, run_dir, run_root)
    prepare(2_000, 0)  # the same data prepared again: reused
    _check_same_run(config, run_dir, run_root)
    shutil.rmtree(data_dir)  # missing (generated next): nothing to compare yet
    _check_same_run(config, run_dir, run_root)


def test_another_llm_may_follow_one_whose_first_step_failed(tmp_path) -> None:
    """The record of a model whose first LLM step failed (``semantics encode`` on a model that does
    not load) guards no output: the demo with another ``--llm`` goes on, keeping the finished plain
    run, instead of asking to delete the whole run directory; once an output is there it is refused."""
    from recsys_llm.demo import LLM_RECORD, _check_same_llm, _write_llm_record
    from recsys_llm.train.config import ConfigError

    llm_dir = str(tmp_path / "llm")
    failed = {"llm": "/models/broken", "fingerprint": "abc", "adapt_fields": ADAPT_FIELDS}
    other = {"llm": "/models/minilm", "fingerprint": "def", "adapt_fields": ADAPT_FIELDS}
    _write_llm_record(llm_dir, failed)
    _check_same_llm(llm_dir, other, str(tmp_path))
    _write_llm_record(llm_dir, other)
    with open(os.path.join(llm_dir, LLM_RECORD), encoding="utf-8") as handle:
        assert json.load(handle) == other
    (tmp_path / "llm" / "field_vectors.safetensors").write_bytes(b"vectors")
    with pytest.raises(ConfigError, match=r"made with the model '/models/minilm' .*not '/models/broken'"):
        _check_same_llm(llm_dir, failed, str(tmp_path))


def test_a_model_directory_without_whole_weights_is_refused_before_any_training(tmp_path, capsys) -> None:
    """A model whose weights are missing (or cut short by an interrupted download) fails at once, not
    after the plain DeepFM has trained, at ``semantics encode``."""
    from recsys_llm.cli import main as cli_main

    llm = save_tiny_bert(str(tmp_path / "llm"))
    weights = os.path.join(llm, "model.safetensors")
    for damage, named in (("truncate", "damaged weight file"), ("remove", "no model weights")):
        if damage == "truncate":
            with open(weights, "r+b") as handle:
                handle.truncate(os.path.getsize(weights) // 2)
        else:
            os.remove(weights)
        data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
        code = cli_main(["demo", "--rows", "3000", "--data-dir", data_dir, "--run-dir", run_root, "--llm", llm, *SMALL])
        err = capsys.readouterr().err
        assert code == 2 and f"recsys-llm demo: error: {llm}" in err and named in err, err
        assert not os.path.exists(data_dir) and not os.path.exists(run_root)  # nothing generated or trained


@pytest.mark.parametrize("damage, named", [("no_tokenizer", "no tokenizer files"),
                                           ("unknown_type", "is not one transformers")])
def test_a_model_directory_whose_tokenizer_cannot_load_is_refused_before_any_training(tmp_path, capsys, damage,
                                                                                    named) -> None:
    """A model saved without its tokenizer files (or of a model type this transformers does not know)
    failed at ``semantics encode``, after the data was generated and the plain DeepFM trained."""
    from recsys_llm.cli import main as cli_main

    llm = save_tiny_bert(str(tmp_path / "llm"))
    if damage == "no_tokenizer":
        for name in os.listdir(llm):
            if name.startswith("tokenizer"):
                os.remove(os.path.join(llm, name))
    else:
        with open(os.path.join(llm, "config.json"), encoding="utf-8") as handle:
            config = json.load(handle)
        with open(os.path.join(llm, "config.json"), "w", encoding="utf-8") as handle:
            json.dump({**config, "model_type": "no_such_model"}, handle)
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    code = cli_main(["demo", "--rows", "3000", "--data-dir", data_dir, "--run-dir", run_root, "--llm", llm, *SMALL])
    err = capsys.readouterr().err
    assert code == 2 and f"recsys-llm demo: error: {llm}" in err and named in err, err
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)  # nothing generated or trained


def test_outputs_that_fail_while_written_keep_the_earlier_ones_whole(tmp_path, monkeypatch) -> None:
    """A full disk (or Ctrl-C) while ``demo_results.{json,png}`` are written again leaves the earlier
    files as they were, not emptied or cut short, and no temp file beside them."""
    import matplotlib.figure as figure
    import recsys_llm.demo as demo

    results = {name: {"test": {"auc": 0.6 + 0.01 * i, "cold/auc": 0.55}} for i, name in enumerate([PLAIN, STUDENT])}
    written = write_outputs(results, str(tmp_path))
    before = {path: open(path, "rb").read() for path in written}
    real_savefig = figure.Figure.savefig

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    def half_png(fig, target, **kwargs):  # the figure is saved into an open temp file: cut it short there
        real_savefig(fig, target, **kwargs)
        target.truncate(100)
        disk_full()

    changed = {name: {"test": {"auc": 0.7, "cold/auc": 0.65}} for name in [PLAIN, STUDENT]}
    for failing in ("json", "png"):
        with monkeypatch.context() as patched:
            if failing == "json":
                patched.setattr(demo.json, "dump", disk_full)
                patched.setattr(demo.json, "dumps", disk_full)
            else:
                patched.setattr(figure.Figure, "savefig", half_png)
            with pytest.raises(OSError, match="No space left"):
                write_outputs(changed, str(tmp_path))
        path = written[0] if failing == "json" else written[1]  # the one that failed (the json before the png is new)
        assert open(path, "rb").read() == before[path], failing
        assert sorted(os.listdir(tmp_path)) == ["demo_results.json", "demo_results.png"], failing


@pytest.mark.parametrize("override, flag", [("data.schema=data/other/schema.json", "--data-dir"),
                                            ("data.synthetic_rows=500", "--rows"), ("train.run_dir=runs/x", "--run-dir")])
def test_an_override_of_a_setting_the_demo_s_flags_make_is_refused(tmp_path, monkeypatch, override, flag) -> None:
    """``data.schema=...`` among the overrides trained every variant on that data while the LLM steps
    read --data-dir's (entity vectors of other users and items): such an override is refused, naming
    the flag, before any work."""
    import recsys_llm.demo as demo
    from recsys_llm.train.config import ConfigError

    monkeypatch.setattr(demo, "run_training", lambda config: pytest.fail("trained"))
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=rf"^the demo's override {re.escape(override)} .*{flag}"):
        run_demo(CONFIG, data_dir, run_root, 3_000, [*SMALL, override], with_llm=False)
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)


@pytest.mark.parametrize("override", ["llactr.lambda_fre=0.5", "elec.distill.alpha=5", "elec.vector_dim=8"])
def test_an_override_of_a_method_s_setting_is_refused(tmp_path, monkeypatch, override) -> None:
    """``llactr.*`` / ``elec.*`` among the overrides made the plain DeepFM a method's run, which failed
    after the data was generated ("llactr: 'vectors_path' ... is required", "no column 'llm_vector'"),
    and the demo's own settings beat it in the method's variant: refused, naming it, before any work."""
    import recsys_llm.demo as demo
    from recsys_llm.train.config import ConfigError

    monkeypatch.setattr(demo, "run_training", lambda config: pytest.fail("trained"))
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    with pytest.raises(ConfigError, match=rf"^the demo's override {re.escape(override)} sets a setting of LLaCTR "
                                          r"or ELEC.*`recsys-llm train`"):
        run_demo(CONFIG, data_dir, run_root, 3_000, [*SMALL, override], with_llm=False)
    assert not os.path.exists(data_dir) and not os.path.exists(run_root)


def test_demo_results_json_is_strict_json_when_a_metric_is_nan(tmp_path) -> None:
    """A test split of one class (e.g. ``demo --rows 10``) has no AUC: null, not NaN (which ``jq`` and
    JavaScript refuse)."""
    import json

    results = {name: {"test": {"auc": float("nan"), "logloss": 0.69}} for name in [PLAIN, STUDENT]}
    (json_path, *_) = write_outputs(results, str(tmp_path))

    def refuse(constant: str) -> None:
        raise ValueError(f"{constant} is not JSON")

    written = json.loads(open(json_path, encoding="utf-8").read(), parse_constant=refuse)
    assert written[PLAIN] == {"auc": None, "logloss": 0.69}


def test_an_unfinished_run_of_other_settings_is_refused_naming_the_demo_s_flag(tmp_path, monkeypatch) -> None:
    """A demo killed mid-training and run again with other settings: the training refused the resume advising
    ``train.run_dir``, which the demo refuses as an override; the advice is the demo's ``--run-dir``."""
    import recsys_llm.demo as demo
    from recsys_llm.train.config import ConfigError, save_config

    def killed_after_its_first_checkpoint(config):
        os.makedirs(os.path.join(config.train.run_dir, "checkpoints"))
        save_config(config, os.path.join(config.train.run_dir, "config.yaml"))
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "run_training", killed_after_its_first_checkpoint)
    data_dir, run_root = str(tmp_path / "data"), str(tmp_path / "runs")
    with pytest.raises(KeyboardInterrupt):
        run_demo(CONFIG, data_dir, run_root, 3_000, SMALL, with_llm=False)
    monkeypatch.setattr(demo, "run_training", lambda config: pytest.fail("trained"))
    with pytest.raises(ConfigError) as refused:
        run_demo(CONFIG, data_dir, run_root, 3_000, [*SMALL, "model.embedding_dim=16"], with_llm=False)
    message = str(refused.value)
    assert "model.embedding_dim: 8 -> 16" in message and "pass another --run-dir" in message, message
    assert "train.run_dir" not in message


def test_the_auc_standard_error_is_the_spread_of_aucs_of_samples_of_that_size() -> None:
    """Hanley & McNeil's value (0.0445 for AUC 0.8 on 50 + 50 rows, their table), and close to the spread of AUCs
    drawn at that size."""
    import torch
    from torchmetrics.functional.classification import binary_auroc

    assert auc_standard_error(0.8, 100, 0.5) == pytest.approx(0.0445, abs=5e-4)
    generator = torch.Generator().manual_seed(0)
    labels = (torch.arange(400) < 120).long()  # 120 clicks, CTR 0.3
    aucs = [float(binary_auroc(torch.randn(400, generator=generator) + 1.2 * labels, labels)) for _ in range(500)]
    mean_auc = sum(aucs) / len(aucs)
    spread = (sum((a - mean_auc) ** 2 for a in aucs) / (len(aucs) - 1)) ** 0.5
    assert auc_standard_error(mean_auc, 400, 0.3) == pytest.approx(spread, rel=0.15)
    assert math.isnan(auc_standard_error(0.7, 10, 0.0)) and math.isnan(auc_standard_error(float("nan"), 10, 0.5))


def _demo_on_the_command_line(argv) -> int:
    from recsys_llm.cli import main as cli_main

    return cli_main(argv)


@pytest.mark.multiprocess
def test_demo_no_llm_on_the_command_line_trains_the_plain_deepfm_alone(tmp_path) -> None:
    run_root = str(tmp_path / "runs")
    argv = ["demo", "--rows", "3000", "--data-dir", str(tmp_path / "data"), "--run-dir", run_root, "--no-llm", *SMALL]
    assert run_multiprocess(_demo_on_the_command_line, world_size=1, argv=argv) == [0]
    assert sorted(name for name in os.listdir(run_root) if os.path.isdir(os.path.join(run_root, name))) == ["plain"]


def test_the_comparison_table_shows_an_undefined_gain_as_unknown() -> None:
    """A plain AUC that is NaN (a one-class test split) printed "+nan%", and a variant with cold-item metrics beside a
    plain model without them raised KeyError."""
    plain = {"auc": math.nan, "logloss": 0.6}
    variant = {"auc": 0.7, "logloss": 0.5, "cold/auc": 0.65, "cold/logloss": 0.55}
    table = comparison_table({PLAIN: {"test": plain}, LLACTR: {"test": variant}})
    assert "nan%" not in table
    assert table.splitlines()[-1].split()[-2:] == ["-", "-"]
    good = comparison_table({PLAIN: {"test": {"auc": 0.5, "logloss": 0.6}},
                             LLACTR: {"test": {"auc": 0.55, "logloss": 0.5}}})
    assert "+10.00%" in good
