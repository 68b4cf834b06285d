"""The ``recsys-llm`` entry point itself (sub-commands have their own tests)."""

import contextlib
import io
import json
import os
import re
import signal
import subprocess
import sys
from typing import List, Sequence

import pytest
from safetensors import SafetensorError

from recsys_llm.cli import PROGRESS_INTERVAL_ENV, main, traceback_asked

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _environment_inside_a_command(monkeypatch) -> dict:
    """Runs ``recsys-llm prepare synthetic`` with its work replaced by a look at the environment;
    returns what it saw."""
    from recsys_llm.cli import data

    seen = {}

    def look(*args, **kwargs):
        seen.update({key: os.environ.get(key) for key in
                     (PROGRESS_INTERVAL_ENV, "TQDM_MAXINTERVAL", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE",
                      "RECSYS_LLM_PROGRESS_LINES")})
        raise ValueError("looked")  # a user error: the command ends with exit code 2

    monkeypatch.setattr(data, "prepare_dataset", look)
    assert main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"]) == 2
    return seen


def test_progress_bars_written_to_a_log_update_every_30_s_a_line_each(monkeypatch) -> None:
    for key in (PROGRESS_INTERVAL_ENV, "TQDM_MAXINTERVAL", "HF_HUB_OFFLINE", "RECSYS_LLM_PROGRESS_LINES"):
        monkeypatch.delenv(key, raising=False)  # restored after the test
    seen = _environment_inside_a_command(monkeypatch)  # pytest's captured stderr is not a terminal
    assert seen[PROGRESS_INTERVAL_ENV] == "30"
    assert seen["TQDM_MAXINTERVAL"] == "30"  # tqdm's monitor would otherwise refresh every 10 s
    assert seen["RECSYS_LLM_PROGRESS_LINES"] == "1"
    assert seen["HF_HUB_OFFLINE"] == "1"
    # the calling program's environment is its own again
    assert not {PROGRESS_INTERVAL_ENV, "TQDM_MAXINTERVAL", "HF_HUB_OFFLINE", "RECSYS_LLM_PROGRESS_LINES"} & set(
        os.environ)


def test_a_bar_in_a_log_writes_each_update_as_a_line_of_its_own(monkeypatch, capsys) -> None:
    """tqdm redraws a bar in place: in a log file a whole epoch's updates were one line, which tail, grep and log
    collectors saw only when the epoch ended (and a nested bar's cursor moves were left in it)."""
    import tqdm

    from recsys_llm.progress import bar_options

    monkeypatch.setenv("RECSYS_LLM_PROGRESS_LINES", "1")
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "0")
    with tqdm.tqdm(total=3, desc="outer", leave=False, **bar_options()) as outer:
        for _ in range(3):
            with tqdm.tqdm(total=2, desc="inner", leave=False, position=1, **bar_options()) as inner:
                inner.update(2)
            outer.update(1)
    err = capsys.readouterr().err
    assert "\r" not in err and "\x1b" not in err
    lines = err.splitlines()
    assert all(line.strip() for line in lines) and lines[0].startswith("outer:   0%")
    assert any(line.startswith("outer: 100%") and "3/3" in line for line in lines), lines
    monkeypatch.delenv("RECSYS_LLM_PROGRESS_LINES")
    assert "file" not in bar_options()  # a terminal, or a notebook: tqdm's own redraws


def test_a_chosen_progress_interval_is_kept(monkeypatch) -> None:
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "5")
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.delenv("TQDM_MAXINTERVAL", raising=False)
    seen = _environment_inside_a_command(monkeypatch)
    assert seen[PROGRESS_INTERVAL_ENV] == "5" and seen["TQDM_MAXINTERVAL"] == "5" and seen["HF_HUB_OFFLINE"] == "0"
    assert os.environ[PROGRESS_INTERVAL_ENV] == "5" and os.environ["HF_HUB_OFFLINE"] == "0"  # left as they were
    assert "TQDM_MAXINTERVAL" not in os.environ


def test_the_projects_bars_take_the_interval_set_after_tqdm_was_imported(monkeypatch) -> None:
    """tqdm reads TQDM_MININTERVAL once, when imported: after torchrec had imported it (the examples, the
    experiments' in-process commands), the command's 30 s never reached a bar, which updated ten times a
    second in the log; and a program whose ``main`` had imported it kept 30 s after the command."""
    import ast

    import tqdm

    from recsys_llm.progress import bar_options

    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "30")
    monkeypatch.setenv("TQDM_MAXINTERVAL", "30")
    with tqdm.tqdm([], **bar_options()) as bar:
        assert (bar.mininterval, bar.maxinterval) == (30.0, 30.0)
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV)
    monkeypatch.delenv("TQDM_MAXINTERVAL")
    assert bar_options() == {"mininterval": 0.1, "maxinterval": 10.0}  # tqdm's, whatever it read at import
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "soon")
    with pytest.raises(ValueError, match=r"TQDM_MININTERVAL is 'soon'; expected seconds"):
        bar_options()
    # every bar of the package takes them
    bars = 0
    for folder, _, files in os.walk(os.path.join(REPO, "recsys_llm")):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                with open(path, encoding="utf-8") as handle:
                    tree = ast.parse(handle.read())
                for node in ast.walk(tree):
                    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "tqdm":
                        bars += 1
                        spread = [k.value for k in node.keywords if k.arg is None]
                        assert any(isinstance(v, ast.Call) and getattr(v.func, "id", "") == "bar_options"
                                   for v in spread), f"{path}:{node.lineno}"
    assert bars >= 10


def _teacher_outputs_up_to_the_model(tmp_path, monkeypatch, output_dir, extra: Sequence[str] = (),
                                     more_fields: Sequence[object] = ()) -> int:
    """``teacher-outputs`` on a stand-in trained run whose model load fails with 'model loaded'."""
    import torch

    from recsys_llm.data.schema import DatasetSchema, FieldSpec
    from recsys_llm.train import teacher_outputs
    from recsys_llm.train.distributed import DistContext
    from recsys_llm.train.trained_run import TrainedRun

    import pyarrow as pa
    import pyarrow.parquet as pq

    data = tmp_path / "data"
    (data / "valid").mkdir(parents=True, exist_ok=True)
    for path in (data / "train.parquet", data / "valid" / "part-0.parquet"):
        pq.write_table(pa.table({"user_id": pa.array([1, 2], pa.int64()), "label": pa.array([0, 1], pa.int8())}), path)
    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), *more_fields],
                           splits={"train": "train.parquet", "valid": "valid"}, root=str(data))
    ctx = DistContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    monkeypatch.setattr(teacher_outputs, "open_trained_run", lambda config, checkpoint: TrainedRun(checkpoint, ctx, schema))

    def load_trained_model(config, run):
        raise ValueError("model loaded")

    monkeypatch.setattr(teacher_outputs, "load_trained_model", load_trained_model)
    return main(["teacher-outputs", "--config", "configs/synthetic_deepfm.yaml", "--checkpoint", str(tmp_path / "run"),
                 "--output-dir", str(output_dir), *extra])


def test_an_unknown_split_is_refused_before_teacher_json_is_written_and_the_teacher_loaded(tmp_path, monkeypatch,
                                                                                          capsys) -> None:
    out = tmp_path / "out"
    assert _teacher_outputs_up_to_the_model(tmp_path, monkeypatch, out, ["--splits", "train", "test"]) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        "recsys-llm teacher-outputs: error: --splits: ['test'] are no splits of schema 't'; expected "
        "names among ['train', 'valid']")
    assert not out.exists()


def test_a_field_named_like_a_teacher_column_is_refused_before_the_teacher_is_loaded(tmp_path, monkeypatch,
                                                                                     capsys) -> None:
    """Its copies had the field's values replaced by the teacher's logits, and a schema that did not load."""
    from recsys_llm.data.schema import FieldSpec

    out = tmp_path / "out"
    assert _teacher_outputs_up_to_the_model(tmp_path, monkeypatch, out,
                                            more_fields=[FieldSpec("teacher_logits", "dense")]) == 2
    assert capsys.readouterr().err.splitlines()[0].startswith(
        f"recsys-llm teacher-outputs: error: {tmp_path / 'data'}: schema 't' has a field, label or row key named "
        "'teacher_logits'")
    assert not out.exists()


def test_a_teacher_outputs_dir_of_other_files_is_refused_before_the_teacher_is_loaded(tmp_path, monkeypatch,
                                                                                      capsys) -> None:
    from recsys_llm.train import teacher_outputs

    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine", encoding="utf-8")
    (junk / "train.parquet").write_bytes(b"an earlier copy")
    assert _teacher_outputs_up_to_the_model(tmp_path, monkeypatch, junk) == 2
    assert capsys.readouterr().err.splitlines()[0] == (
        f"recsys-llm teacher-outputs: error: {junk}: not empty and not an earlier data set with teacher outputs: "
        "'notes.txt' is not one of its entries (schema.json, teacher.json and the split copies ['train', "
        "'valid']); writing the data set with teacher outputs there would mix it with other files; choose another (or an empty) output "
        "directory")
    assert sorted(os.listdir(junk)) == ["notes.txt", "train.parquet"]
    os.remove(junk / "notes.txt")  # an unfinished run of its own: resumed
    (junk / "train.parquet.tmp").write_bytes(b"")  # a copy being written when it stopped
    (junk / "valid").mkdir()  # a split of several files: a directory of copies
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "train_state.json").write_text('{"global_step": 3}', encoding="utf-8")
    (junk / "teacher.json").write_text(json.dumps(teacher_outputs.teacher_record(str(tmp_path / "run"))),
                                       encoding="utf-8")  # written by the same teacher checkpoint
    assert _teacher_outputs_up_to_the_model(tmp_path, monkeypatch, junk) == 2
    assert capsys.readouterr().err.splitlines()[:2] == [  # it went on to load the teacher
        f"[recsys_llm] teacher-outputs: loading {tmp_path / 'run'} on 1 rank(s)",
        "recsys-llm teacher-outputs: error: model loaded"]


def test_overrides_among_the_options_are_named_with_where_they_go(capsys) -> None:
    argv = ["teacher-outputs", "--config", "c.yaml", "data.schema=x", "--checkpoint", "runs/x", "--output-dir", "o",
            "elec.task=gain"]
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert ("unrecognized arguments: elec.task=gain (section.key=value overrides go after all options"
            in capsys.readouterr().err)
    with pytest.raises(SystemExit):
        main(["train", "--config", "c.yaml", "--bogus"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --bogus" in err and "overrides go after" not in err
    # the sub-command's own usage and name (it was the top level's list of commands)
    assert err.startswith("usage: recsys-llm train [-h] --config CONFIG") and "recsys-llm train: error:" in err
    with pytest.raises(SystemExit):
        main(["semantics", "encode", "--schema", "s", "--output", "o", "--bogus"])
    assert "recsys-llm semantics encode: error: unrecognized arguments: --bogus" in capsys.readouterr().err


def test_sigterm_during_prepare_removes_the_half_written_output(tmp_path) -> None:
    """A timeout or a scheduler's cancel sends SIGTERM: the command ends as on Ctrl-C, leaving no
    hidden temp directory beside the output and the earlier output intact."""
    import signal
    import sys
    import time

    out = tmp_path / "data"
    out.mkdir()
    (out / "earlier.txt").write_text("kept")  # not an output of prepare: the run must not touch it
    target = tmp_path / "synthetic"
    process = subprocess.Popen([sys.executable, "-m", "recsys_llm.cli", "prepare", "synthetic", "--rows", "3000000",
                                "--out", str(target)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while time.time() < deadline and not any(p.name.startswith(".synthetic.") for p in tmp_path.iterdir()):
        time.sleep(0.05)
    assert any(p.name.startswith(".synthetic.") for p in tmp_path.iterdir()), "prepare wrote no temp directory"
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"], err[-2000:]
    assert (out / "earlier.txt").read_text() == "kept"


def _help(argv, capsys) -> str:
    with pytest.raises(SystemExit):
        main([*argv, "--help"])
    return " ".join(capsys.readouterr().out.split())


def test_help_shows_the_defaults_outside_the_semantics_group_too(capsys) -> None:
    synthetic = _help(["prepare", "synthetic"], capsys)
    for text in ("--rows ROWS impressions over all splits (at least 10) (default: 200000)",
                 "--rows-per-group ROWS_PER_GROUP Parquet row group size (default: 65536)",
                 "(default: 0.1)", "--seed SEED", "(default: 0)"):
        assert text in synthetic
    assert "--rows-per-group ROWS_PER_GROUP Parquet row group size (default: 8192)" in _help(["prepare", "movielens"],
                                                                                             capsys)
    assert ("--hash-size HASH_SIZE rows per categorical table: one size, or 26 comma- separated sizes for C1..C26 "
            "(default: 1000000)") in _help(["prepare", "criteo"], capsys)
    assert "--batch-size BATCH_SIZE rows per call of the artifact (default: 8192)" in _help(["score"], capsys)
    tabular = _help(["prepare", "tabular"], capsys)
    assert "train,valid,test shares, divided by their sum, 8,1,1 as 0.8,0.1,0.1 (default: 0.8,0.1,0.1)" in tabular
    assert "CSV delimiter (default: ',')" in tabular
    demo = _help(["demo"], capsys)
    for text in ("(default: data/synthetic)", "--rows ROWS rows to generate when the data is missing (at least 10) (default: 200000)",
                 "(default: runs/demo)"):
        assert text in demo
    assert "rows per teacher call (default: 4096)" in _help(["teacher-outputs"], capsys)
    for text in (synthetic, tabular, demo):
        for unhelpful in ("(default: None)", "(default: False)", "(default: [])", "(default: (0.8"):
            assert unhelpful not in text


def _train_that_fails_after_the_group_starts(run_dir: str) -> "tuple[int, bool]":
    import torch.distributed as dist

    code = main(["train", "--config", os.path.join(REPO, "configs", "synthetic_deepfm.yaml"),
                 "data.schema=/nonexistent/schema.json", "data.synthetic_rows=0", f"train.run_dir={run_dir}"])
    return code, dist.is_initialized()


@pytest.mark.multiprocess
def test_a_command_that_fails_leaves_no_process_group_behind(tmp_path) -> None:
    """A process that exits with a live gloo group can abort in its destructor ("terminate called
    without an active exception", exit code 134 instead of 2)."""
    from tests.multiprocess import run_multiprocess

    (result,) = run_multiprocess(_train_that_fails_after_the_group_starts, world_size=1, run_dir=str(tmp_path / "run"))
    assert result == (2, False)


@pytest.mark.parametrize("failure, line", [
    (OSError(30, "Read-only file system", "/data/out"), "[Errno 30] Read-only file system: '/data/out'"),
    (OSError(28, "No space left on device"), "[Errno 28] No space left on device (writing /nonexistent/out)"),
    # past ``ulimit -f`` (Python ignores SIGXFSZ): pyarrow's text, as prepare got it
    (OSError(27, "Error writing bytes to file. Detail: [errno 27] File too large"),
     "[Errno 27] Error writing bytes to file. Detail: [errno 27] File too large (writing /nonexistent/out)"),
    # safetensors' save_file (export's model.safetensors on a full disk) raises no OSError
    (SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)"),
     "Error while serializing: I/O error: No space left on device (os error 28) (writing /nonexistent/out)"),
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598"),
     "a file could not be written whole ([enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598): "
     "check the free space, quota and file-size limit (ulimit -f) where the command writes (/nonexistent/out)"),
])
def test_a_disk_that_takes_no_more_writes_is_one_line(monkeypatch, capsys, failure, line) -> None:
    from recsys_llm.cli import data

    def fails(*args, **kwargs):
        raise failure

    monkeypatch.setattr(data, "prepare_dataset", fails)
    assert main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"]) == 75  # EX_TEMPFAIL
    err = capsys.readouterr().err
    assert f"recsys-llm prepare synthetic: error: {line}\n" in err and "Traceback" not in err


@pytest.mark.parametrize("failure", [ValueError("bad.csv: column 'x': expected numbers"), KeyboardInterrupt()])
def test_an_error_or_interruption_under_a_progress_bar_starts_a_line_of_its_own(monkeypatch, capsys, failure) -> None:
    """The bar's carriage return left the cursor at its end: the line read ``movielens:   0%|    | 0/4 [00:00<?,
    ?it/s]recsys-llm prepare movielens: error: ...``."""
    from tqdm import tqdm

    from recsys_llm.cli import data

    def fails_under_a_bar(*args, **kwargs):
        bar = tqdm(total=4, desc="movielens", file=sys.stderr)
        bar.update()
        raise failure

    monkeypatch.setattr(data, "prepare_dataset", fails_under_a_bar)
    with pytest.raises(SystemExit) if isinstance(failure, KeyboardInterrupt) else contextlib.nullcontext():
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    lines = re.split(r"[\r\n]", capsys.readouterr().err)
    assert any(line.startswith(("recsys-llm prepare synthetic: error: bad.csv",
                                "recsys-llm prepare synthetic: interrupted (Ctrl-C)")) for line in lines), lines


def test_a_program_calling_main_keeps_its_warning_filters_and_log_levels(tmp_path) -> None:
    """``main`` hid torchrec's advisories (warning filters, three loggers at ERROR) for the rest of the process."""
    import logging
    import warnings

    from recsys_llm.cli import UPSTREAM_ADVISORY_LOGGERS, UPSTREAM_NOTICES

    def hiding_a_notice() -> list:  # the filters of UPSTREAM_NOTICES (imports of torch and numpy add their own)
        return [f for f in warnings.filters if f[1] is not None and any(f[1].search(m) for m, _ in UPSTREAM_NOTICES)]

    levels = {name: logging.getLogger(name).level for name in UPSTREAM_ADVISORY_LOGGERS}
    assert hiding_a_notice() == []
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "data"), "--rows", "300", "--quiet"]) == 0
    assert {name: logging.getLogger(name).level for name in UPSTREAM_ADVISORY_LOGGERS} == levels
    assert hiding_a_notice() == []


def _checkpoint_failure(*failures: BaseException) -> BaseException:
    """What torch.distributed.checkpoint raises when ranks fail to save: its text holds every rank's traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("save failed", {rank: (failure, "Traceback ...\n" * 40)
                                               for rank, failure in enumerate(failures)})


def _checkpoint_failure_with_tracebacks(*failures: BaseException) -> BaseException:
    """As :func:`_checkpoint_failure`, each rank's traceback ending in its error's text, as torch formats them."""
    from torch.distributed.checkpoint.api import CheckpointException

    return CheckpointException("save failed", {
        rank: (failure, "Traceback ...\n" * 40 + f"{type(failure).__name__}: {failure}\n")
        for rank, failure in enumerate(failures)})


@pytest.mark.parametrize("failure, line", [
    (lambda: _checkpoint_failure(RuntimeError("unexpected pos 704 vs 598"),
                                 OSError(28, "No space left on device", "/runs/r/best/ckpt-00000032.tmp/__0_0.distcp")),
     "[Errno 28] No space left on device: '/runs/r/best/ckpt-00000032.tmp/__0_0.distcp'"),
    (lambda: _checkpoint_failure(RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598")),
     "a file could not be written whole ([enforce fail at inline_container.cc:672] . unexpected pos 704 vs 598): "
     "check the free space, quota and file-size limit (ulimit -f) where the command writes (/nonexistent/out)"),
    (lambda: _checkpoint_failure_with_tracebacks(SafetensorError("Error while serializing: I/O error: No space left "
                                                                 "on device (os error 28)")),
     "Error while serializing: I/O error: No space left on device (os error 28) (writing /nonexistent/out)"),
], ids=["a rank's full disk", "a short write", "a rank's full disk in safetensors"])
def test_a_full_disk_in_a_checkpoint_save_is_the_failing_ranks_line(monkeypatch, capsys, failure, line) -> None:
    """The CheckpointException's own text (every rank's traceback, 3,000 characters) was the 'one line'."""
    from recsys_llm.cli import data

    def fails(*args, **kwargs):
        raise failure()

    monkeypatch.setattr(data, "prepare_dataset", fails)
    assert main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"]) == 75  # EX_TEMPFAIL
    err = capsys.readouterr().err
    assert f"recsys-llm prepare synthetic: error: {line}\n" in err and "Traceback" not in err, err


@pytest.mark.parametrize("failure, timed_out", [
    ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 30000ms for recv operation to "
     "complete", True),
    ("[../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234", False),
    ("NCCL communicator was aborted on rank 1. Original reason for failure was: Watchdog caught collective operation "
     "timeout", True),
    ("Application timeout caused pair closure", True),  # gloo's all-to-all in torchrec's backward, a SIGSTOPped peer
])
def test_a_collective_that_gave_up_on_another_rank_is_one_line(monkeypatch, capsys, failure, timed_out) -> None:
    """A stalled rank: the rank that waited for it printed gloo's traceback as the root cause, naming no timeout.
    A peer that died (its connection closed at once) is no wait of the timeout: the line names none then."""
    from recsys_llm.cli import data

    def fails(*args, **kwargs):
        raise RuntimeError(failure)

    monkeypatch.setattr(data, "prepare_dataset", fails)
    monkeypatch.setenv("RECSYS_LLM_DIST_TIMEOUT_S", "30")
    # not EX_TEMPFAIL: the rank that died may have died of its own bad input
    assert main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"]) == 2
    err = capsys.readouterr().err
    cause = ("which stalled past RECSYS_LLM_DIST_TIMEOUT_S=30 s (torchrun's summary names this rank, the one that "
             "waited; the stalled rank is the one whose output stopped first, and `py-spy dump --pid` on it shows "
             "where it waits)") if timed_out else "which died (torchrun's summary names it)"
    assert f"recsys-llm prepare synthetic: error: a collective gave up waiting for another rank, {cause}: {failure}" \
        in err, err
    assert "Traceback" not in err


def test_a_message_of_the_project_quoting_a_peer_failure_is_kept_whole(monkeypatch) -> None:
    """An export's own error says more than the collective's (its finished chunks are kept): it is not replaced."""
    from recsys_llm.cli import data

    own = ("semantics export --attach-dir: another rank failed or did not finish within --attach-timeout 60 s "
           "([../third_party/gloo/gloo/transport/tcp/pair.cc:534] Connection closed by peer [127.0.0.1]:41234); its "
           "finished chunks are kept: run the export again to finish it and attach")

    def fails(*args, **kwargs):
        raise RuntimeError(own)

    monkeypatch.setattr(data, "prepare_dataset", fails)
    with pytest.raises(RuntimeError, match="its finished chunks are kept"):
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])


def test_a_full_disk_under_training_names_the_run_directory(monkeypatch, capsys, tmp_path) -> None:
    """`recsys-llm train: error: [Errno 28] No space left on device`: train has no --output, so nothing was named."""
    from recsys_llm.train import runner

    def fails(config):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runner, "run_training", fails)
    run_dir = str(tmp_path / "run")
    assert main(["train", "--config", os.path.join(REPO, "configs", "synthetic_deepfm.yaml"),
                 f"train.run_dir={run_dir}"]) == 75  # EX_TEMPFAIL
    assert f"recsys-llm train: error: [Errno 28] No space left on device (writing {run_dir})\n" in capsys.readouterr().err


def test_ctrl_c_inside_a_distributed_checkpoint_save_exits_as_ctrl_c(monkeypatch) -> None:
    """torch.distributed.checkpoint wraps a SIGTERM's SystemExit (and Ctrl-C) into its CheckpointException."""
    from torch.distributed.checkpoint.api import CheckpointException

    from recsys_llm.cli import data

    def interrupted(*args, **kwargs):
        raise CheckpointException("save failed", {0: (SystemExit(143), None)})

    monkeypatch.setattr(data, "prepare_dataset", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    assert exited.value.code == 143


@pytest.mark.parametrize("wrapped", [False, True])
def test_sigterm_ends_with_one_line_and_its_code(monkeypatch, capsys, wrapped) -> None:
    """A scheduler's cancel or a timeout ended the command with 143 and no word in its log."""
    from torch.distributed.checkpoint.api import CheckpointException

    from recsys_llm.cli import Terminated, data

    def terminated(*args, **kwargs):
        raise CheckpointException("save failed", {0: (Terminated(143), None)}) if wrapped else Terminated(143)

    monkeypatch.setattr(data, "prepare_dataset", terminated)
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    assert exited.value.code == 143
    err = capsys.readouterr().err
    assert "recsys-llm prepare synthetic: stopped (SIGTERM); what it had written whole stays" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("wrapped", [False, True])
def test_ctrl_c_ends_with_one_line_and_the_code_of_sigint(monkeypatch, capsys, wrapped) -> None:
    """It ended with a traceback and exit code 1, a crash's; SIGTERM ends with 143 and its own line."""
    from torch.distributed.checkpoint.api import CheckpointException

    from recsys_llm.cli import data

    def interrupted(*args, **kwargs):
        raise CheckpointException("save failed", {0: (KeyboardInterrupt(), None)}) if wrapped else KeyboardInterrupt()

    monkeypatch.setattr(data, "prepare_dataset", interrupted)
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    assert exited.value.code == 130
    err = capsys.readouterr().err
    assert "recsys-llm prepare synthetic: interrupted (Ctrl-C)" in err and "Traceback" not in err
    monkeypatch.setenv("RANK", "1")  # torchrun's other ranks get the same Ctrl-C: rank 0 alone says so
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    assert exited.value.code == 130 and "interrupted" not in capsys.readouterr().err


@pytest.mark.parametrize("command, line", [
    (["train"], "train a model from a config file (torchrun-ready)"),
    (["prepare", "movielens"], "MovieLens in RecBole atomic format (.inter/.item/.user)"),
    (["semantics", "encode"], "one vector per field (tuned or untuned model), with provenance"),
    (["semantics", "export"], "export CTR-adapted LLM vectors per row or entity (ELEC)"),
])
def test_a_sub_command_help_says_what_it_does(command, line, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    assert line in capsys.readouterr().out.splitlines()


def test_the_top_level_help_lists_the_workflows(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "LLaCTR:  prepare -> semantics tune -> semantics encode" in out


def test_the_train_footer_gives_whole_samples_per_second() -> None:
    """Throughput is a rate of thousands: '12,005 samples/s', not '12005.1439 samples/s'."""
    from recsys_llm.cli.train import results_table

    results = {"global_step": 16, "epochs": 1, "world_size": 1, "samples_per_second": 12005.1439, "run_dir": "runs/x",
               "test": {"auc": 0.64016, "logloss": 0.62, "ne": 0.98, "num_samples": 500.0}, "valid": {"auc": 0.58}}
    footer = results_table(results).splitlines()[-1]
    assert footer == ("steps 16, epochs 1, ranks 1, 12,005 samples/s, run dir runs/x (results.json, "
                      "training_curves.png)"), footer
    assert "0.6402" in results_table(results)  # the metrics keep four decimals
    assert "nan samples/s" not in results_table({**results, "samples_per_second": float("nan")})
    bf16 = results_table({**results, "mixed_precision": "bf16"}).splitlines()[-1]
    assert "12,005 samples/s (bf16 autocast), run dir runs/x" in bf16, bf16
    assert results_table({**results, "mixed_precision": "fp32"}).splitlines()[-1] == footer


def test_the_train_table_gives_each_test_sets_calibration() -> None:
    """Calibration (predicted over actual clicks) beside AUC, LogLoss and NE, for all test rows and cold items."""
    from recsys_llm.cli.train import results_table

    test = {"auc": 0.64, "logloss": 0.62, "ne": 0.98, "calibration": 1.2345, "num_samples": 500.0,
            "cold/auc": 0.6, "cold/logloss": 0.7, "cold/ne": 0.99, "cold/calibration": 0.8765, "cold/num_samples": 20.0}
    lines = results_table({"test": test, "valid": {"auc": 0.58}}).splitlines()
    assert lines[0].split() == ["set", "AUC", "LogLoss", "NE", "Calibration", "samples"]
    assert lines[2].split()[-2:] == ["1.2345", "500"] and lines[3].split()[-2:] == ["0.8765", "20"]
    assert lines[4].split() == ["valid", "(best)", "0.5800", "-", "-", "-", "-"]


def test_the_train_table_of_a_run_without_valid_and_test_splits_says_so() -> None:
    from recsys_llm.cli.train import results_table

    results = {"global_step": 40, "epochs": 2, "world_size": 1, "samples_per_second": 1000.0, "run_dir": "runs/day2",
               "valid": {"auc": None}}
    lines = results_table(results).splitlines()
    assert len(lines) == 2 and "no valid or test split" in lines[0] and "evaluate --split" in lines[0]
    assert lines[1].startswith("steps 40, epochs 2")


def test_a_program_that_calls_main_gets_its_own_sigterm_handler_back(monkeypatch, tmp_path) -> None:
    """The examples and the demo call main() inside a running program (a notebook's kernel, a
    script): SIGTERM ends the command, then the program's own handler is back in place."""
    import recsys_llm.cli.data as data

    monkeypatch.setattr(data, "_prepare", lambda args: 0)  # the command itself is beside the point

    def own_handler(signum: int, frame: object) -> None:
        pass

    previous = signal.signal(signal.SIGTERM, own_handler)
    try:
        assert main(["prepare", "synthetic", "--out", str(tmp_path / "out")]) == 0
        assert signal.getsignal(signal.SIGTERM) is own_handler
    finally:
        signal.signal(signal.SIGTERM, previous)


WARNING_SCRIPT = r"""
import sys, warnings
import recsys_llm.cli as cli
import recsys_llm.cli.data as data
from recsys_llm.data import validation

def _prepare(args):
    warnings.warn_explicit("3 of 3 row texts are cut", UserWarning, validation.__file__, 10)
    warnings.warn_explicit("a library's notice", UserWarning, "/elsewhere/library.py", 20)
    return 0

data._prepare = _prepare
code = cli.main(["prepare", "synthetic", "--out", sys.argv[1]])
assert warnings.formatwarning is warnings._formatwarning_orig  # put back for the program that called main()
sys.exit(code)
"""


@pytest.mark.parametrize("traceback", ["", "1"])
def test_the_project_s_own_warnings_are_one_line_and_a_library_s_keep_their_form(tmp_path, traceback) -> None:
    """A warning of this package reads ``recsys-llm prepare synthetic: warning: ...``, not a file path and the
    source line that raised it; a library's warning is left as Python prints it (and so is the
    project's with RECSYS_LLM_TRACEBACK=1)."""
    import sys

    env = {**os.environ, "PYTHONPATH": REPO, "RECSYS_LLM_TRACEBACK": traceback}
    done = subprocess.run([sys.executable, "-c", WARNING_SCRIPT, str(tmp_path / "out")], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    err = done.stderr
    assert "/elsewhere/library.py:20: UserWarning: a library's notice" in err, err
    if traceback:
        assert "validation.py:10: UserWarning: 3 of 3 row texts are cut" in err, err
    else:
        assert "recsys-llm prepare synthetic: warning: 3 of 3 row texts are cut\n" in err, err
        assert "validation.py" not in err, err


def _launcher_failure(error_file: str, exitcode: int = 2) -> str:
    """What torchrun's failure summary (and so ``torchx status``) shows for a worker that left ``error_file``."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    failure = ProcessFailure(local_rank=0, pid=1, exitcode=exitcode, error_file=error_file)
    return ChildFailedError("recsys_llm.cli", {0: failure}).format_msg()


def test_a_user_error_under_torchrun_is_its_one_line_in_the_launcher_s_summary(monkeypatch, tmp_path) -> None:
    error_file = str(tmp_path / "error.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", error_file)
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    summary = _launcher_failure(error_file)
    assert "traceback : recsys-llm train: error: " in summary and "missing.yaml" in summary


def test_an_argument_error_under_torchrun_is_in_the_launcher_s_summary(monkeypatch, tmp_path) -> None:
    error_file = str(tmp_path / "error.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", error_file)
    with pytest.raises(SystemExit):
        main(["train", "--config"])
    assert "traceback : recsys-llm train: error: argument --config: expected one argument" in _launcher_failure(
        error_file
    )


def test_an_unexpected_failure_under_torchrun_leaves_its_traceback_for_the_launcher(monkeypatch, tmp_path) -> None:
    from recsys_llm.cli import data

    def fails(*args, **kwargs):
        raise RuntimeError("a bug")

    error_file = str(tmp_path / "error.json")
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", error_file)
    monkeypatch.setattr(data, "prepare_dataset", fails)
    with pytest.raises(RuntimeError):
        main(["prepare", "synthetic", "--out", str(tmp_path / "out"), "--rows", "10"])
    summary = _launcher_failure(error_file, exitcode=1)
    assert "Traceback (most recent call last)" in summary and "RuntimeError: a bug" in summary


def test_without_a_launcher_no_error_file_is_written(monkeypatch, tmp_path) -> None:
    monkeypatch.delenv("TORCHELASTIC_ERROR_FILE", raising=False)
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--config", "missing.yaml"]) == 2
    assert os.listdir(tmp_path) == []


def test_a_torch_fbgemm_torchrec_set_that_does_not_import_is_one_line_before_any_command(monkeypatch, capsys) -> None:
    """Before any work of the command (its config is not even read); ``--help`` still prints, needing none of them."""
    monkeypatch.setitem(sys.modules, "fbgemm_gpu", None)
    monkeypatch.delenv("RECSYS_LLM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as helped:
        main(["train", "--help"])
    assert helped.value.code == 0 and capsys.readouterr().out.startswith("usage: recsys-llm train")
    assert main(["train", "--config", "no_such_config.yaml"]) == 2
    first = capsys.readouterr().err.splitlines()[0]
    assert first.startswith("recsys-llm: error: torch/fbgemm-gpu/torchrec do not import together (torch ")
    assert "known to work: torch 2.13 + fbgemm-gpu 1.8.0 + torchrec 1.8.0" in first


@pytest.mark.parametrize("where", ["file", "override"])
def test_a_config_that_is_not_valid_yaml_is_one_line(tmp_path, capsys, where) -> None:
    """A broken config file or override value ends with the command's one error line (PyYAML's
    message spans several lines: its problem, then the mark with the text and a caret)."""
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  epochs: [1\n" if where == "file" else "train:\n  epochs: 1\n", encoding="utf-8")
    overrides = ["train.epochs=[1"] if where == "override" else []
    code = main(["train", "--config", str(config), *overrides])
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert err[0].startswith("recsys-llm train: error: ") and "not valid YAML" in err[0], err
    assert err[1:] == ["(set RECSYS_LLM_TRACEBACK=1 for the traceback)"], err


def test_demo_rows_below_10_names_the_flag(capsys) -> None:
    """It named ``data.synthetic_rows`` (the setting --rows becomes), which the user never wrote."""
    with pytest.raises(SystemExit) as exited:
        main(["demo", "--rows", "-5", "--data-dir", "/nonexistent/data", "--run-dir", "/nonexistent/runs"])
    assert exited.value.code == 2
    assert "argument --rows: expected an integer >= 10, got '-5'" in capsys.readouterr().err


def test_demo_llm_with_no_llm_is_refused_before_any_work(tmp_path, monkeypatch, capsys) -> None:
    """The --llm asked for was ignored: the plain DeepFM alone was trained, as if the LLM had been checked."""
    from recsys_llm import demo

    monkeypatch.setattr(demo, "run_demo", lambda *args, **kwargs: pytest.fail("the demo ran"))
    assert main(["demo", "--no-llm", "--llm", str(tmp_path / "model"), "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / "runs")]) == 2
    assert (f"recsys-llm demo: error: --llm {tmp_path / 'model'} with --no-llm: --no-llm trains the plain DeepFM "
            "only, which reads no LLM; pass one of them") in capsys.readouterr().err


def test_the_demo_s_default_config_ships_with_the_package(tmp_path) -> None:
    """After a non-editable ``pip install .`` ``recsys-llm demo`` refused with 'demo config not found': its default
    config was the repository's ``configs/synthetic_deepfm.yaml``, which the wheel does not hold. The default is the
    package's own copy (the same file as the repository's, which ``--config configs/...`` still reads)."""

    from recsys_llm.cli.train import DEMO_CONFIG

    subprocess.run([sys.executable, "setup.py", "-q", "build_py", "--build-lib", str(tmp_path)], cwd=REPO, check=True,
                   capture_output=True)
    shipped = tmp_path / os.path.relpath(DEMO_CONFIG, REPO)  # what the wheel installs, by its path in the checkout
    assert shipped.is_file(), f"{os.path.relpath(DEMO_CONFIG, REPO)} is not in the built package"
    with open(os.path.join(REPO, "configs", "synthetic_deepfm.yaml"), encoding="utf-8") as handle:
        assert shipped.read_text(encoding="utf-8") == handle.read()


def test_a_demo_config_that_is_a_directory_is_named_as_one(tmp_path, capsys) -> None:
    """It said 'demo config not found', though the path exists (a directory)."""
    assert main(["demo", "--config", str(tmp_path), "--data-dir", str(tmp_path / "data"),
                 "--run-dir", str(tmp_path / "runs")]) == 2
    assert f"recsys-llm demo: error: --config {tmp_path}: a directory; expected the demo's YAML config file" in \
        capsys.readouterr().err
    assert sorted(os.listdir(tmp_path)) == []


@pytest.mark.parametrize("argv, flag", [
    (["teacher-outputs", "--checkpoint", "runs/x", "--output-dir", "o", "--batch-size", "0"], "--batch-size"),
    (["semantics", "export", "--schema", "s", "--llm", "m", "--output-dir", "o", "--chunk-rows", "0"], "--chunk-rows"),
    (["semantics", "export", "--schema", "s", "--llm", "m", "--output-dir", "o", "--batch-size", "-1"], "--batch-size"),
])
def test_a_count_below_one_is_named_by_its_flag(capsys, argv, flag) -> None:
    """Not by the config field it fills (``VectorExportConfig.chunk_rows``, ``batch_size must be positive``)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    assert f"argument {flag}: expected an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("value", ["0", "-5", "nan"])
def test_an_attach_timeout_that_is_no_positive_number_is_named_by_its_flag(capsys, value) -> None:
    """It was taken as it came: under several ranks the gloo group failed with 'cannot convert float NaN to
    integer' (naming no flag) or a traceback ('The client socket has timed out after -5000ms')."""
    with pytest.raises(SystemExit) as exit_info:
        main(["semantics", "export", "--schema", "s", "--llm", "m", "--output-dir", "o", "--attach-dir", "a",
              "--attach-timeout", value])
    assert exit_info.value.code == 2
    assert f"argument --attach-timeout: expected a finite number > 0, got '{value}'" in capsys.readouterr().err


def test_overrides_swallowed_by_splits_are_named_before_any_work(capsys) -> None:
    """argparse gives ``--splits`` every word up to the next option: an override there became a split
    named ``data.batch_size=3``, refused only after the teacher had loaded."""
    assert main(["teacher-outputs", "--checkpoint", "/nonexistent/run", "--output-dir", "o",
                 "--splits", "train", "data.batch_size=3"]) == 2
    err = capsys.readouterr().err
    assert "['data.batch_size=3'] look like config overrides, not splits; end --splits with --" in err, err
    assert main(["teacher-outputs", "--checkpoint", "/nonexistent/run", "--output-dir", "o",
                 "--splits", "train", "--", "data.batch_size=3"]) == 2  # as told: on to the next check
    assert "/nonexistent/run: no such checkpoint or run directory" in capsys.readouterr().err


@pytest.mark.parametrize("variable", ["RANK", "WORLD_SIZE"])
def test_a_launch_variable_that_is_no_integer_is_a_one_line_error_naming_it(monkeypatch, capsys, tmp_path,
                                                                            variable) -> None:
    """The entry point read RANK / WORLD_SIZE before its error handling: a raw ValueError traceback."""
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(variable, "abc")
    code = main(["train", "--config", os.path.join(REPO, "configs", "synthetic_deepfm.yaml"),
                 f"train.run_dir={tmp_path / 'run'}", "train.device=cpu"])
    assert code == 2
    assert f"environment variable {variable}='abc': expected an integer" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "run")


@pytest.mark.parametrize("environment, message", [
    ({"RANK": "abc"}, "environment variable RANK='abc': expected an integer"),
    ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK=2 and WORLD_SIZE=2: the rank must be below the world size"),
])
def test_semantics_export_and_the_demo_name_a_bad_launch_variable(monkeypatch, environment, message) -> None:
    """Both read RANK themselves: with a bare int() (naming no variable), and without the rank < world check."""
    from recsys_llm import demo
    from recsys_llm.semantics.vector_export import rank_and_world

    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in environment.items():
        monkeypatch.setenv(key, value)
    for call in (rank_and_world, lambda: demo._say("a line")):
        with pytest.raises(ValueError, match=re.escape(message)):
            call()


def test_help_imports_no_torch() -> None:
    """Every ``--help`` took ~3 s (more on a loaded machine): the version check and the converters' imports
    loaded torch, fbgemm and torchrec before argparse printed a line."""

    probe = ("import sys\nfrom recsys_llm.cli import main\n"
             "for argv in (['--help'], ['train', '--help'], ['prepare', 'synthetic', '--help'], "
             "['semantics', 'export', '--help'], ['export', '--help']):\n"
             "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
             "print('loaded:', sorted(m for m in ('torch', 'torchrec', 'fbgemm_gpu', 'transformers') if m in sys.modules),"
             " file=sys.stderr)\n")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stderr.strip().splitlines()[-1] == "loaded: []"


@pytest.mark.parametrize("argv, command", [
    (["semantics", "tune", "--schema", "none", "--output-dir", "out"], "semantics tune"),
    (["semantics", "encode", "--schema", "none", "--output", "out.safetensors"], "semantics encode"),
    (["semantics", "adapt", "--schema", "none", "--output-dir", "out"], "semantics adapt"),
    (["demo", "--data-dir", "data", "--run-dir", "runs"], "demo"),
    # every rank prepared into the same --out: one won its lock, the other failed as "another prepared data set is
    # writing it", and torchrun stopped the winner, part-way on a larger data set
    (["prepare", "synthetic", "--out", "data", "--rows", "100"], "prepare synthetic"),
])
def test_one_process_llm_commands_refuse_several_ranks_before_any_work(argv, command, monkeypatch, tmp_path,
                                                                        capsys) -> None:
    """Under `torchrun --nproc_per_node 2`, every rank ran the whole tune / encode / adapt (the demo's too) and wrote the
    same output (adapt's second rank then failed on the first one's lock, as "another semantics adapt")."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job")  # torchrun started the command on each rank

    import torch.distributed

    # as in a fresh torchrun worker (an earlier test of this process may have left its group of one)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"recsys-llm {command}: error: ") and "under torchrun each of the 2 ranks" in error, error
    assert "without torchrun" in error
    advice = {"prepare synthetic": "once, before the jobs that read the data on every rank",
              "demo": "or with --no-llm"}.get(command, "`semantics export` is the LLM step that splits its rows over ranks")
    assert advice in error, error
    assert os.listdir(tmp_path) == []  # nothing written
    if command != "demo":  # a program that set up its ranks' group calls the command on the ranks it chooses
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        main(argv)
        assert "under torchrun each" not in capsys.readouterr().err
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
        monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun with one rank: the command runs
        monkeypatch.setenv("RANK", "0")
        main(argv)
        assert "under torchrun each" not in capsys.readouterr().err


def test_a_home_tilde_after_an_options_equals_sign_is_expanded(tmp_path, monkeypatch, capsys) -> None:
    """bash leaves `--out=~/data` unexpanded: prepare made a directory named `~` in the working directory (whose
    `rm -rf ~` then removes the home directory)."""
    home, work = tmp_path / "home", tmp_path / "work"
    home.mkdir()
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    assert main(["prepare", "synthetic", "--rows", "100", "--out=~/data"]) == 0
    assert (home / "data" / "schema.json").is_file() and not (work / "~").exists()


def test_expand_home_takes_a_bare_tilde_and_list_values_and_leaves_other_tildes() -> None:
    import argparse

    from recsys_llm.cli import expand_home

    home = os.path.expanduser("~")
    args = argparse.Namespace(out="~", splits=["~/a", "b", "~user"], llm="x~/y", steps=3, fields=None)
    expand_home(args)
    assert vars(args) == {"out": home, "splits": [os.path.join(home, "a"), "b", "~user"], "llm": "x~/y", "steps": 3,
                          "fields": None}


def test_ctrl_c_while_torch_imports_is_one_line(monkeypatch, capsys) -> None:
    """The version check imports torch, fbgemm and torchrec (seconds): a Ctrl-C there printed a traceback."""
    import recsys_llm.env

    def interrupted(**_: object) -> None:
        raise KeyboardInterrupt()

    monkeypatch.setattr(recsys_llm.env, "check_versions", interrupted)
    monkeypatch.delenv("RECSYS_LLM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "synthetic", "--rows", "100", "--out", "never"])
    assert exit_info.value.code == 128 + signal.SIGINT
    assert capsys.readouterr().err == "recsys-llm prepare synthetic: interrupted (Ctrl-C) before it began\n"


def test_version_is_printed_without_a_command(capsys) -> None:
    from recsys_llm import __version__

    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out == f"recsys-llm {__version__}\n"


@pytest.mark.parametrize("kind, extra", [("criteo", []), ("movielens", []), ("tabular", ["--schema", "s.yaml"])])
def test_a_second_input_is_refused_not_dropped(tmp_path, capsys, kind, extra) -> None:
    """argparse kept the last --input: `prepare criteo --input day_0 --input day_1` converted day_1 alone."""
    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", kind, "--input", "day_0", "--out", str(tmp_path / "out"), *extra, "--input", "day_1"])
    assert exit_info.value.code == 2
    line = capsys.readouterr().err.splitlines()[-1]
    assert line.startswith(f"recsys-llm prepare {kind}: error: --input given twice (day_0, day_1); this converter "
                           "reads one input: "), line
    assert not (tmp_path / "out").exists()


def test_the_semantics_group_alone_reports_a_user_error_in_one_line(tmp_path, capsys) -> None:
    """`python -m recsys_llm.cli.semantics encode ...` (its documented entry point) printed a traceback for a
    missing schema, where `recsys-llm semantics encode ...` prints one line and exits with 2."""
    from recsys_llm.cli.semantics import main as semantics_main

    missing = tmp_path / "nowhere" / "schema.json"
    assert semantics_main(["encode", "--schema", str(missing), "--output", str(tmp_path / "v.safetensors")]) == 2
    assert f"recsys-llm semantics encode: error: {missing}: schema file not found" in capsys.readouterr().err


def test_the_planner_names_no_data_parallel_table_as_lacking_a_sharding_spec(caplog) -> None:
    """torchrec's check of its plan logged one root-logger warning per data-parallel table ("Sharding spec not
    found for model.embedding_bag_collection.t_f7.weight"): 500 lines before the first step with 500 fields."""
    import logging

    from torchrec.distributed.planner.planners import validate_rank_assignment
    from torchrec.distributed.planner.types import Topology
    from torchrec.distributed.types import ParameterSharding, ShardingPlan

    from recsys_llm.cli import quiet_upstream_notices

    replicated = ParameterSharding(sharding_type="data_parallel", compute_kernel="dense", ranks=[0])
    plan = ShardingPlan({"model.embedding_bag_collection": {f"t_f{k}": replicated for k in range(3)}})
    topology = Topology(world_size=1, compute_device="cpu")
    caplog.clear()  # the Topology's own advice to build it through TopologyFactory
    restore = quiet_upstream_notices()
    try:
        with caplog.at_level(logging.WARNING):
            validate_rank_assignment(plan, topology)
            logging.warning("a line of the caller's own")
    finally:
        restore()
    assert [record.getMessage() for record in caplog.records] == ["a line of the caller's own"]
    caplog.clear()
    with caplog.at_level(logging.WARNING):  # the caller's root logger is its own again
        validate_rank_assignment(plan, topology)
    assert len(caplog.records) == 3


@pytest.mark.parametrize("text", [
    "Error while deserializing header: I/O error: No such file or directory (os error 2)",
    "Error while serializing: I/O error: Permission denied (os error 13)",
])
def test_a_rust_io_error_of_another_errno_is_no_disk_line(text) -> None:
    """Only a full disk, a quota, a read-only file system or a file past the size limit is about where the command
    writes; safetensors' other I/O errors (a missing or unreadable file) are not given the disk's one line."""
    from recsys_llm.cli import _environment_error_line

    assert _environment_error_line(SafetensorError(text)) is None
    assert _environment_error_line(SafetensorError(text.replace("(os error 2)", "(os error 122)")
                                                   .replace("(os error 13)", "(os error 27)"))) is not None



def test_a_message_that_names_its_command_is_not_prefixed_twice(capsys) -> None:
    """export_task's errors and warnings start with 'export: ' for Python callers; the CLI's line names the
    command once (a message naming another command keeps its prefix)."""
    from recsys_llm.cli import _error_exit, project_warning_format

    assert _error_exit("export", ValueError("export: table_dtype (--table-dtype) is 'int2'")) == 2
    assert capsys.readouterr().err.splitlines()[0] == "recsys-llm export: error: table_dtype (--table-dtype) is 'int2'"
    _error_exit("evaluate", ValueError("export: kept"))
    assert capsys.readouterr().err.splitlines()[0] == "recsys-llm evaluate: error: export: kept"
    formatted = project_warning_format("semantics encode", None)(
        "semantics encode: the text of field(s) ['a'] is longer", UserWarning, cli_init_file(), 1)
    assert formatted == "recsys-llm semantics encode: warning: the text of field(s) ['a'] is longer\n"


def test_the_error_line_is_one_write_so_ranks_failing_together_keep_their_lines_apart(monkeypatch) -> None:
    """Under torchrun every rank writes its error line to one unbuffered stderr: a line and its line end written
    separately ran into another rank's line ("...on CPUrecsys-llm train: error: ...")."""
    from recsys_llm.cli import _error_exit

    writes: List[str] = []

    class RecordingStream(io.StringIO):
        def write(self, text: str) -> int:
            writes.append(text)
            return len(text)

    monkeypatch.setattr(sys, "stderr", RecordingStream())
    _error_exit("train", ValueError("sharding: row-wise types need CUDA"))
    assert len(writes) == 1 and writes[0].startswith("recsys-llm train: error: sharding: row-wise types need CUDA\n")
    assert writes[0].endswith("\n") and writes[0].count("\n") == 2


def cli_init_file() -> str:
    import recsys_llm.cli

    return recsys_llm.cli.__file__


def test_a_full_disk_line_names_a_path_not_a_choice():
    """``semantics export --output`` is representation or pooled: a full ``--attach-dir`` read "(writing
    representation)"."""
    import argparse

    from recsys_llm.cli import _environment_error_line

    args = argparse.Namespace(output="representation", output_dir="/runs/vec", attach_dir="/data/llm")
    line = _environment_error_line(OSError(28, "Error writing bytes to file"), args)
    assert line is not None and line.endswith("(writing /runs/vec)")


@pytest.mark.parametrize("module", ["recsys_llm", "recsys_llm.cli"])
def test_python_dash_m_runs_the_command(module: str) -> None:
    """``python -m recsys_llm`` said "No module named recsys_llm.__main__" (a user's first guess at the command)."""
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "usage: recsys-llm" in done.stdout and "train" in done.stdout


def test_a_jupyter_kernel_gets_redrawn_bars_not_log_lines(monkeypatch) -> None:
    """ipykernel's stderr is no TTY, yet a notebook applies carriage returns as a terminal does: treated as a log,
    every training, valid and test bar left its first "0%" line in the cell (leave=False bars never ended it) and
    updated only every 30 s."""
    for key in (PROGRESS_INTERVAL_ENV, "TQDM_MAXINTERVAL", "HF_HUB_OFFLINE", "RECSYS_LLM_PROGRESS_LINES"):
        monkeypatch.delenv(key, raising=False)
    kernel_stream = type("OutStream", (), {"__module__": "ipykernel.iostream", "isatty": lambda self: False,
                                           "write": lambda self, text: len(text), "flush": lambda self: None})
    monkeypatch.setattr(sys, "stderr", kernel_stream())
    seen = _environment_inside_a_command(monkeypatch)
    assert seen["RECSYS_LLM_PROGRESS_LINES"] is None
    assert seen[PROGRESS_INTERVAL_ENV] is None
    assert seen["HF_HUB_OFFLINE"] == "1"


def test_no_module_draws_notebook_widget_bars() -> None:
    """``tqdm.auto`` in a Jupyter kernel draws ipywidgets bars where ipywidgets exist, which ignore
    ``bar_options``' file and differ from every other bar of the package (``tqdm.tqdm``); without ipywidgets
    it falls back to tqdm's own after a TqdmWarning: every bar of the package is tqdm's own."""
    import recsys_llm

    package = os.path.dirname(recsys_llm.__file__)
    widget_bars = [os.path.relpath(os.path.join(root, name), package)
                   for root, _, names in os.walk(package) for name in names if name.endswith(".py")
                   if re.search(r"tqdm\.(auto|notebook|autonotebook)", open(os.path.join(root, name)).read())]
    assert widget_bars == []


@pytest.mark.parametrize("signal_error", ["sigterm", "ctrl_c"])
def test_an_interruption_that_a_cleanup_failure_replaced_still_exits_as_the_interruption(
        monkeypatch, capsys, signal_error) -> None:
    """A SIGTERM inside torchrec's pipeline fill made ``train_epoch``'s ``pipeline.detach()`` (in its ``finally``)
    raise "AssertionError: Number of KJT dists (1) does not match ...": the job of a 30-kill loop exited 1 with a
    traceback of 60 lines, a crash to a scheduler, instead of 143 and the one line of a SIGTERM."""
    from recsys_llm.cli import Terminated, data

    def interrupted_then_cleanup_fails(*args, **kwargs):
        try:
            raise Terminated(143) if signal_error == "sigterm" else KeyboardInterrupt()
        finally:
            raise AssertionError("Number of KJT dists (1) does not match number of kjt dist forwards provided (0)")

    monkeypatch.setattr(data, "prepare_dataset", interrupted_then_cleanup_fails)
    with pytest.raises(SystemExit) as exited:
        main(["prepare", "synthetic", "--out", "/nonexistent/out", "--rows", "10"])
    assert exited.value.code == (143 if signal_error == "sigterm" else 130)
    err = capsys.readouterr().err
    assert "Traceback" not in err and "AssertionError" not in err
    assert ("stopped (SIGTERM)" if signal_error == "sigterm" else "interrupted (Ctrl-C)") in err


def test_a_tqdm_variable_that_is_no_number_is_one_line_naming_it(tmp_path) -> None:
    """tqdm converts its TQDM_* variables when first imported (the sub-commands' modules import it): a value that is
    no number ended every command, ``--help`` too, with a traceback of its import."""
    env = {**os.environ, "PYTHONPATH": REPO, "TQDM_MININTERVAL": "soon"}
    env.pop("RECSYS_LLM_TRACEBACK", None)
    done = subprocess.run([sys.executable, "-m", "recsys_llm", "prepare", "synthetic", "--out", str(tmp_path / "out"),
                           "--rows", "10"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    # the user's variable, not the TQDM_MAXINTERVAL the command copies from it for a log
    assert done.stderr.startswith("recsys-llm: error: tqdm cannot read its environment variables "
                                  "(TQDM_MININTERVAL='soon')"), done.stderr
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("name, value", [("RECSYS_LLM_TRACEBACK", "full"), ("RECSYS_LLM_PROGRESS_LINES", "maybe")])
def test_an_on_off_variable_of_neither_value_is_one_line_naming_it(monkeypatch, capsys, tmp_path, name, value) -> None:
    """Any RECSYS_LLM_TRACEBACK but "" and "0" turned tracebacks on (``=false`` too), and with them exit code 1 for
    bad input, where a wrapper reads 2 and 75; a RECSYS_LLM_PROGRESS_LINES but "1" was read as off without a word,
    leaving a log's bars redrawn in place on one line."""
    monkeypatch.setenv(name, value)
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "out"), "--rows", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"recsys-llm: error: environment variable {name}={value!r}: expected 1 (or true, yes, on) "
                          "or 0 (or false, no, off)"), err
    assert "Traceback" not in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("value, on", [("false", False), ("No", False), ("0", False), ("", False), ("1", True),
                                       ("true", True), ("ON", True)])
def test_on_off_variables_read_the_usual_words(monkeypatch, value, on) -> None:
    from recsys_llm.progress import bar_options

    monkeypatch.setenv("RECSYS_LLM_TRACEBACK", value)
    monkeypatch.setenv("RECSYS_LLM_PROGRESS_LINES", value)
    assert traceback_asked() is on
    assert ("file" in bar_options()) is on


@pytest.mark.parametrize("name, value", [("LOCAL_WORLD_SIZE", "abc"), ("LOCAL_RANK", "x"), ("LOCAL_WORLD_SIZE", "0")])
def test_a_torchrun_variable_that_is_no_integer_is_named(monkeypatch, capsys, tmp_path, name, value) -> None:
    """LOCAL_RANK and LOCAL_WORLD_SIZE were read with a bare int() (torchmetrics, the host-memory check):
    ``error: invalid literal for int() with base 10: 'abc'`` named no variable."""
    monkeypatch.delenv("RECSYS_LLM_TRACEBACK", raising=False)
    monkeypatch.setenv(name, value)
    assert main(["prepare", "synthetic", "--out", str(tmp_path / "out"), "--rows", "10"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"recsys-llm prepare synthetic: error: environment variable {name}={value!r}: expected an "
                          "integer >= "), err
    assert not (tmp_path / "out").exists()


def test_an_error_file_that_cannot_be_written_leaves_the_error_line(monkeypatch, capsys, tmp_path) -> None:
    """A TORCHELASTIC_ERROR_FILE in a directory that is gone (left over from another job's environment) replaced
    the one-line error, usage errors too, with the traceback of its open()."""
    monkeypatch.delenv("RECSYS_LLM_TRACEBACK", raising=False)
    monkeypatch.setenv("TORCHELASTIC_ERROR_FILE", str(tmp_path / "gone" / "error.json"))
    assert main(["train", "--config", str(tmp_path / "missing.yaml")]) == 2
    err = capsys.readouterr().err
    assert "recsys-llm train: error: " in err and "Traceback" not in err
    assert "warning: TORCHELASTIC_ERROR_FILE=" in err
    with pytest.raises(SystemExit) as exit_:
        main(["prepare", "synthetic", "--rows", "10"])  # argparse's usage error: --out is missing
    assert exit_.value.code == 2
    assert "error: the following arguments are required: --out" in capsys.readouterr().err


def test_another_jobs_lock_exits_to_try_again_not_as_bad_input(tmp_path, capsys) -> None:
    """A prepare into an output another job is writing exited 2, as a mistyped option: a wrapper could not tell
    "retry later" (EX_TEMPFAIL, 75, as for a full disk) from "the input is wrong"."""
    from recsys_llm.atomic_dir import try_lock

    out = str(tmp_path / "data")
    held = try_lock(os.path.join(str(tmp_path), ".data.lock"))  # another prepare writing there
    try:
        assert main(["prepare", "synthetic", "--out", out, "--rows", "10"]) == 75
    finally:
        held.close()
    assert "another prepared data set is writing it" in capsys.readouterr().err
    assert main(["prepare", "synthetic", "--out", out, "--rows", "10"]) == 0  # once it has ended


@pytest.mark.parametrize("value, on", [("off", False), (" OFF ", False), ("yes\n", True), (" on", True)])
def test_on_off_words_are_read_in_any_case_and_spacing(monkeypatch, value, on) -> None:
    from recsys_llm.progress import env_flag

    monkeypatch.setenv("RECSYS_LLM_PROGRESS_LINES", value)
    assert env_flag("RECSYS_LLM_PROGRESS_LINES") is on


def test_a_traceback_variable_of_neither_value_asks_for_no_traceback(monkeypatch) -> None:
    """``main`` refuses it at its start; read elsewhere before (a warning's format, a benchmark's Ctrl-C) it is off."""
    monkeypatch.setenv("RECSYS_LLM_TRACEBACK", "full")
    assert traceback_asked() is False
