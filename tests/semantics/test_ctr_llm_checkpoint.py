"""`semantics adapt` checkpoints: a tuning killed after a mid-epoch checkpoint and resumed ends with
the trained tensors and losses of an uninterrupted one, bit for bit; a resume with other settings
is refused naming them, and a damaged checkpoint file is named with its remedy, nothing changed."""

import json
import os
import shutil
from typing import Dict, Iterator, List, Tuple

import pytest
import torch
from safetensors.torch import load_file

from recsys_llm.cli import main
from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig, tune_ctr_llm
from recsys_llm.semantics.ctr_llm_checkpoint import TuneCheckpoint, adapt_checkpoint_dir
from recsys_llm.semantics.precision import LowPrecisionSteps
from tests.semantics.conftest import make_schema

# 16 rows in batches of 4: 4 steps an epoch; saves after steps 3 (mid-epoch), 4 (epoch end), 6, 8
ADAPT_ARGS = ["--sample-rows", "16", "--batch-size", "4", "--max-length", "16", "--representation-dim", "4",
              "--hidden-dim", "8", "--epochs", "2", "--checkpoint-every", "3", "--lr", "0.001"]


class _Killed(BaseException):
    """A kill (SIGKILL) right after a step: nothing after it runs, no handler, no cleanup."""


@pytest.fixture()
def kill_after(monkeypatch):
    """``kill_after(n)``: the n-th optimizer step from now is the process's last (0: none is)."""
    original = LowPrecisionSteps.step

    def arm(steps: int) -> None:
        count = [0]

        def step(self) -> None:
            original(self)
            count[0] += 1
            if count[0] == steps:
                raise _Killed(f"killed after step {steps}")

        monkeypatch.setattr(LowPrecisionSteps, "step", step)

    yield arm
    monkeypatch.undo()


def _state(checkpoint_dir: str) -> Dict:
    with open(os.path.join(checkpoint_dir, "state.json"), encoding="utf-8") as handle:
        return json.load(handle)


def _trained(model: CTRAdaptedLLM) -> Dict[str, torch.Tensor]:
    heads = {f"transform.{k}": v for k, v in model.transform.state_dict().items()}
    heads.update({f"predict.{k}": v for k, v in model.predict.state_dict().items()})
    return {**model.trainable_llm_state(), **{k: v.clone() for k, v in heads.items()}}


def _assert_bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert a[key].dtype == b[key].dtype and torch.equal(a[key], b[key]), key


def _snapshot(*roots: str) -> Dict[str, Tuple[bytes, int]]:
    files = {}
    for root in roots:
        for folder, _, names in os.walk(root):
            for name in names:
                path = os.path.join(folder, name)
                with open(path, "rb") as handle:
                    files[path] = (handle.read(), os.stat(path).st_mtime_ns)
    return files


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if "error:" in line)


@pytest.mark.parametrize("tuning,llm_dtype", [("lora", "float32"), ("last_k", "bfloat16")])
def test_killed_after_a_mid_epoch_checkpoint_and_resumed_is_bit_identical(tmp_path, tiny_bert_dir, kill_after,
                                                                         tuning, llm_dtype) -> None:
    """last_k in bfloat16 steps float32 master copies: the checkpoint holds those, not the rounded weights.
    Killed once after an epoch-end checkpoint and once after a mid-epoch one."""
    texts = [f"user id is {i % 7}. genre is {['comedy', 'horror', 'drama'][i % 3]}." for i in range(16)]
    labels = [float(i % 3 == 0) for i in range(16)]
    config = CTRLLMConfig(model_path=tiny_bert_dir, representation_dim=4, hidden_dim=8, batch_size=4, max_length=16,
                          epochs=2, tuning=tuning, llm_dtype=llm_dtype)

    def tune(directory: str) -> Tuple[CTRAdaptedLLM, List[float]]:
        model = CTRAdaptedLLM.from_config(config)
        checkpoint = TuneCheckpoint(directory, every_steps=3)
        return model, tune_ctr_llm(model, texts, labels, config, progress=False, checkpoint=checkpoint)

    straight, straight_losses = tune(str(tmp_path / "straight"))
    resumed_dir = str(tmp_path / "resumed")
    for kill, position in ((5, [1, 0]), (3, [1, 2])):  # steps 5 (after the step-4 save), then 7 (after step 6's)
        kill_after(kill)
        with pytest.raises(_Killed):
            tune(resumed_dir)
        assert [_state(resumed_dir)[key] for key in ("epoch", "step")] == position
        torch.manual_seed(12345)  # another process's RNG: the checkpoint's must count
    assert len(_state(resumed_dir)["losses"]) == 6
    kill_after(0)
    resumed, resumed_losses = tune(resumed_dir)
    assert resumed_losses == straight_losses and len(resumed_losses) == 8
    _assert_bit_identical(_trained(resumed), _trained(straight))


def test_a_float16_tuning_resumes_with_its_loss_scale(tmp_path, tiny_bert_dir, monkeypatch) -> None:
    """float16 scales the loss; a scale started too high (2**24) overflows the first step, which is
    skipped while the scaler halves the scale, so a resume only goes on like the uninterrupted run
    when the checkpoint's scale comes back with it (a fresh scaler would skip another step)."""
    import functools

    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0 ** 24))
    texts = [f"user id is {i % 7}. genre is {['comedy', 'horror', 'drama'][i % 3]}." for i in range(16)]
    labels = [float(i % 3 == 0) for i in range(16)]
    config = CTRLLMConfig(model_path=tiny_bert_dir, representation_dim=4, hidden_dim=8, batch_size=4, max_length=16,
                          epochs=2, llm_dtype="float16")
    scales: List[float] = []
    kill_at = [0]  # the step after which the process dies (0: none)
    original_step = LowPrecisionSteps.step

    def step(self) -> None:
        original_step(self)
        scales.append(self.scaler.get_scale())
        if len(scales) == kill_at[0]:
            raise _Killed(f"killed after step {kill_at[0]}")

    monkeypatch.setattr(LowPrecisionSteps, "step", step)

    def tune(directory: str) -> Tuple[CTRAdaptedLLM, List[float]]:
        scales.clear()
        model = CTRAdaptedLLM.from_config(config)
        losses = tune_ctr_llm(model, texts, labels, config, progress=False,
                              checkpoint=TuneCheckpoint(directory, every_steps=3))
        return model, losses

    straight, straight_losses = tune(str(tmp_path / "straight"))
    straight_scales = list(scales)
    assert straight_scales[0] < 2.0 ** 24, straight_scales  # the first step overflowed and was skipped
    resumed_dir = str(tmp_path / "resumed")
    kill_at[0] = 5  # after step 5: the checkpoint of step 4 (epoch end) holds a scale below a fresh scaler's
    with pytest.raises(_Killed):
        tune(resumed_dir)
    saved = _state(resumed_dir)
    assert saved["grad_scaler"]["scale"] < 2.0 ** 24 and len(saved["losses"]) == 4
    kill_at[0] = 0
    resumed, resumed_losses = tune(resumed_dir)
    assert scales == straight_scales[4:]
    assert resumed_losses == straight_losses
    _assert_bit_identical(_trained(resumed), _trained(straight))


@pytest.fixture(scope="module")
def killed_adapt(tmp_path_factory, tiny_bert_dir) -> Iterator[Tuple[str, str]]:
    """A schema and the output path of a `semantics adapt` killed after step 7: its checkpoint is
    the mid-epoch one of step 6 (epoch 1 done, 2 steps into epoch 2)."""
    root = tmp_path_factory.mktemp("adapt_killed")
    schema = make_schema(str(root / "data"))
    out = str(root / "ctr_llm")
    with pytest.MonkeyPatch.context() as patch:
        original, count = LowPrecisionSteps.step, [0]

        def step(self) -> None:
            original(self)
            count[0] += 1
            if count[0] == 7:
                raise _Killed

        patch.setattr(LowPrecisionSteps, "step", step)
        with pytest.raises(_Killed):
            main(["semantics", "adapt", "--schema", schema.root, "--model", tiny_bert_dir, "--output-dir", out,
                  *ADAPT_ARGS])
    assert not os.path.exists(out)
    assert [_state(adapt_checkpoint_dir(out))[key] for key in ("epoch", "step")] == [1, 2]
    yield schema.root, out


def _copy_killed(killed_adapt, tmp_path) -> Tuple[str, str, str]:
    schema_root, out = killed_adapt
    copy = str(tmp_path / "ctr_llm")
    shutil.copytree(adapt_checkpoint_dir(out), adapt_checkpoint_dir(copy))
    return schema_root, copy, adapt_checkpoint_dir(copy)


def test_the_cli_resumes_a_killed_adapt_to_the_uninterrupted_model(tmp_path, killed_adapt, tiny_bert_dir,
                                                                    capsys) -> None:
    schema_root, out, checkpoint = _copy_killed(killed_adapt, tmp_path)
    straight = str(tmp_path / "straight")
    adapt = ["semantics", "adapt", "--schema", schema_root, "--model", tiny_bert_dir, *ADAPT_ARGS]
    capsys.readouterr()
    assert main([*adapt, "--output-dir", straight]) == 0
    straight_report = json.loads(capsys.readouterr().out)
    assert main([*adapt, "--output-dir", out]) == 0
    captured = capsys.readouterr()
    resumed_report = json.loads(captured.out)
    for key in ("steps", "loss_first", "loss_last", "provenance"):
        assert resumed_report[key] == straight_report[key], key
    # every step's loss, the killed job's with the resumed one's, is kept and drawn
    with open(os.path.join(out, "tuning.json"), encoding="utf-8") as handle:
        tuning = json.load(handle)
    with open(os.path.join(straight, "tuning.json"), encoding="utf-8") as handle:
        assert json.load(handle) == tuning and len(tuning["losses"]) == resumed_report["steps"]
    with open(os.path.join(out, "tuning_loss.png"), "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert (f"semantics adapt: BCE {resumed_report['loss_first']:.4f} -> {resumed_report['loss_last']:.4f}"
            in captured.err)
    for name in ("llm_tuned.safetensors", "heads.safetensors"):
        _assert_bit_identical(load_file(os.path.join(out, name)), load_file(os.path.join(straight, name)))
    # the checkpoint goes once the model is saved
    assert not os.path.exists(checkpoint) and not os.path.exists(adapt_checkpoint_dir(straight))


def test_an_adapt_written_inside_its_model_directory_resumes(tmp_path, killed_adapt, tiny_bert_dir, kill_after,
                                                             capsys) -> None:
    """``--output-dir <model>/ctr_llm`` puts the checkpoint inside the model directory: its files are not the
    model's, and a resume was refused as if the base model had changed (base_model_fingerprint)."""
    from tests.tiny_models import copy_model_dir

    schema_root, _ = killed_adapt
    model = copy_model_dir(tiny_bert_dir, tmp_path / "model")
    adapt = ["semantics", "adapt", "--schema", schema_root, "--model", model, *ADAPT_ARGS]
    out, straight = os.path.join(model, "ctr_llm"), str(tmp_path / "straight")
    kill_after(5)
    with pytest.raises(_Killed):
        main([*adapt, "--output-dir", out])
    kill_after(0)
    assert main([*adapt, "--output-dir", out]) == 0, _error_line(capsys)
    assert main([*adapt, "--output-dir", straight]) == 0
    for name in ("llm_tuned.safetensors", "heads.safetensors"):
        _assert_bit_identical(load_file(os.path.join(out, name)), load_file(os.path.join(straight, name)))


def test_an_adapt_resumes_after_its_base_model_moved(tmp_path, killed_adapt, tiny_bert_dir, capsys) -> None:
    """The same files at another path (``base_model_fingerprint``): the resume was refused (model_path: a -> b)."""
    from tests.tiny_models import copy_model_dir

    schema_root, out, _ = _copy_killed(killed_adapt, tmp_path)
    moved = copy_model_dir(tiny_bert_dir, tmp_path / "moved" / "bert")
    adapt = ["semantics", "adapt", "--schema", schema_root, *ADAPT_ARGS]
    assert main([*adapt, "--model", moved, "--output-dir", out]) == 0, _error_line(capsys)
    straight = str(tmp_path / "straight")
    assert main([*adapt, "--model", tiny_bert_dir, "--output-dir", straight]) == 0
    for name in ("llm_tuned.safetensors", "heads.safetensors"):
        _assert_bit_identical(load_file(os.path.join(out, name)), load_file(os.path.join(straight, name)))


@pytest.mark.parametrize("change,expected", [
    (["--lr", "0.002"], "other settings (learning_rate: 0.001 -> 0.002)"),
    (["--sample-rows", "12"], "rows_sha256: "),
    (["--fields", "color", "city"], "fields: ['color', 'city', 'user_id', 'C1', 'price'] -> ['color', 'city']"),
    (["--template", "{description}: {value}."], "row_text.template: '{description} is {value}.' -> "),
    (["--epochs", "1"], "already tuned for 1 epoch(s) and 2 step(s), more than the --epochs 1 asked for; ask for "
                        "--epochs 2 or more"),
])
def test_a_resume_with_other_settings_is_refused_naming_them(tmp_path, killed_adapt, tiny_bert_dir, capsys,
                                                             monkeypatch, change, expected) -> None:
    from recsys_llm.semantics import ctr_llm

    monkeypatch.setattr(ctr_llm, "load_model", _no_model)  # refused before the LLM loads
    schema_root, out, checkpoint = _copy_killed(killed_adapt, tmp_path)
    before = _snapshot(checkpoint)
    args = dict(zip(ADAPT_ARGS[::2], ADAPT_ARGS[1::2]))
    args.update({change[0]: change[1:]})
    flat = [item for key, value in args.items() for item in [key, *([value] if isinstance(value, str) else value)]]
    capsys.readouterr()
    code = main(["semantics", "adapt", "--schema", schema_root, "--model", tiny_bert_dir, "--output-dir", out, *flat])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith(f"recsys-llm semantics adapt: error: {checkpoint}: "), line
    assert expected in line and "--no-resume" in line, line
    assert _snapshot(checkpoint) == before and not os.path.exists(out)


def test_no_resume_adapts_from_scratch_over_a_checkpoint_of_other_settings(tmp_path, killed_adapt,
                                                                            tiny_bert_dir) -> None:
    schema_root, out, checkpoint = _copy_killed(killed_adapt, tmp_path)
    adapt = ["semantics", "adapt", "--schema", schema_root, "--model", tiny_bert_dir, *ADAPT_ARGS, "--lr", "0.002"]
    assert main([*adapt, "--output-dir", out, "--no-resume"]) == 0
    assert not os.path.exists(checkpoint)
    assert main([*adapt, "--output-dir", str(tmp_path / "straight")]) == 0
    for name in ("llm_tuned.safetensors", "heads.safetensors"):
        _assert_bit_identical(load_file(os.path.join(out, name)),
                              load_file(os.path.join(str(tmp_path / "straight"), name)))


def test_a_checkpoint_path_holding_other_files_is_refused_before_any_work(tmp_path, tiny_schema, tiny_bert_dir,
                                                                          capsys) -> None:
    out = str(tmp_path / "ctr_llm")
    os.makedirs(adapt_checkpoint_dir(out))
    notes = os.path.join(adapt_checkpoint_dir(out), "notes.txt")
    with open(notes, "w", encoding="utf-8") as handle:
        handle.write("mine")
    code = main(["semantics", "adapt", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output-dir", out])
    assert code == 2
    assert "not an earlier CTR-adapted LLM tuning checkpoint: 'notes.txt'" in _error_line(capsys)
    assert os.listdir(adapt_checkpoint_dir(out)) == ["notes.txt"] and not os.path.exists(out)


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the checkpoint was refused")


@pytest.mark.parametrize("name,before_the_model", [
    ("llm_tuned.safetensors", True), ("heads.safetensors", True), ("rng.safetensors", True), ("state.json", True),
    ("optimizer.pt", False),
])
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_changed(tmp_path, killed_adapt, tiny_bert_dir, capsys,
                                                                   monkeypatch, name, before_the_model) -> None:
    from recsys_llm.semantics import ctr_llm

    if before_the_model:  # found by reading headers and JSON
        monkeypatch.setattr(ctr_llm, "load_model", _no_model)
    schema_root, out, checkpoint = _copy_killed(killed_adapt, tmp_path)
    damaged = os.path.join(checkpoint, name)
    with open(damaged, "r+b") as handle:  # a write cut short
        handle.truncate(max(1, os.path.getsize(damaged) // 3))
    before = _snapshot(checkpoint)
    capsys.readouterr()
    code = main(["semantics", "adapt", "--schema", schema_root, "--model", tiny_bert_dir, "--output-dir", out,
                 *ADAPT_ARGS])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith(f"recsys-llm semantics adapt: error: {damaged}: "), line
    assert "damaged" in line and f"delete {checkpoint} to adapt again from scratch" in line, line
    assert "`recsys-llm semantics adapt` with --no-resume" in line, line
    assert _snapshot(checkpoint) == before and not os.path.exists(out)


def test_tune_checkpoint_refuses_a_non_string_directory():
    from recsys_llm.semantics.ctr_llm_checkpoint import TuneCheckpoint

    with pytest.raises(ValueError, match=r"TuneCheckpoint.directory: expected a string, got True"):
        TuneCheckpoint(True)
