"""SSFT checkpoints: an interrupted and resumed tune gives the adapter of an uninterrupted one
(dropout included), and damaged checkpoint / adapter files end with one line naming the file,
changing nothing already written."""

import json
import os
import re
import shutil
import warnings
from typing import Dict, Tuple

import pytest
import torch
from safetensors.torch import load_file

from recsys_llm.cli import main
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.ssft import SSFTConfig, SSFTTrainer
from recsys_llm.semantics.templates import PromptTemplates
from tests.semantics.conftest import make_schema

SHORT = PromptTemplates(prompt="### Input:\n{input}\n\n### Response:\n")
# tiny BERT: hidden/attention dropout 0.1, plus LoRA dropout: every step draws from torch's RNG
SMALL = dict(samples_train=8, samples_valid=2, batch_size=8, learning_rate=3e-3, lora_dropout=0.1,
             templates=SHORT, max_length=32, seed=0)
# the full Alpaca prompt is 71 tokens of the tiny tokenizer before its value: 96 leaves it whole
TUNE_ARGS = ["--samples-train", "8", "--samples-valid", "2", "--batch-size", "8", "--lr", "3e-3",
             "--max-length", "96", "--lora-dropout", "0.1"]


def _adapter(out_dir: str) -> Dict[str, torch.Tensor]:
    return load_file(os.path.join(out_dir, "adapter", "adapter_model.safetensors"))


def _assert_bit_identical(a: Dict[str, torch.Tensor], b: Dict[str, torch.Tensor]) -> None:
    assert sorted(a) == sorted(b)
    for key in a:
        assert torch.equal(a[key], b[key]), f"{key}: max difference {(a[key] - b[key]).abs().max().item()}"


def _snapshot(root: str) -> Dict[str, Tuple[bytes, int]]:
    """Every file under ``root``: its bytes and modification time."""
    files = {}
    for folder, _, names in os.walk(root):
        for name in names:
            path = os.path.join(folder, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, root)] = (handle.read(), os.stat(path).st_mtime_ns)
    return files


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return next(line for line in err.splitlines() if "error:" in line)


class TestExactResume:
    @pytest.mark.parametrize("dtype", ["float32", "float16"])
    def test_resumed_adapter_is_bit_identical_to_an_uninterrupted_one(self, tmp_path, tiny_bert_dir,
                                                                      tiny_schema, dtype) -> None:
        straight, resumed = str(tmp_path / "straight"), str(tmp_path / "resumed")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, dtype=dtype, **SMALL), tiny_schema,
                        straight).run()
        # float16: the loss scaler skips the first steps, whose gradients overflow; the schedule steps anyway
        assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)]
        first = _adapter(straight)
        SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, dtype=dtype, **SMALL), tiny_schema, resumed).run()
        after_one = _adapter(resumed)
        assert any(not torch.equal(first[k], after_one[k]) for k in first)  # the second epoch changed it
        with open(os.path.join(resumed, "checkpoint", "state.json"), encoding="utf-8") as handle:
            scaler = json.load(handle).get("grad_scaler")
        assert (scaler is not None and scaler["scale"] > 0) == (dtype == "float16")  # float16: the loss scale
        # another process's torch RNG would be anywhere: the checkpoint's state is what counts
        torch.manual_seed(12345)
        metrics = SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, dtype=dtype, **SMALL), tiny_schema,
                              resumed).run()
        assert metrics["epochs"] == 2
        _assert_bit_identical(_adapter(resumed), first)

    def test_a_checkpoint_without_rng_state_resumes_with_a_warning(self, tmp_path, tiny_bert_dir,
                                                                   tiny_schema) -> None:
        out = str(tmp_path / "old")
        SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), tiny_schema, out).run()
        rng_files = [n for n in os.listdir(os.path.join(out, "checkpoint")) if n.startswith("rng")]
        assert rng_files, os.listdir(os.path.join(out, "checkpoint"))
        for name in rng_files:  # as an older version wrote it
            os.remove(os.path.join(out, "checkpoint", name))
        with pytest.warns(UserWarning, match=r"no RNG state.*not bit-identical"):
            metrics = SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, **SMALL), tiny_schema, out).run()
        assert metrics["epochs"] == 2

    def test_the_same_model_by_another_path_resumes(self, tmp_path, tiny_bert_dir, tiny_schema) -> None:
        """The base model is compared by its weights' hash: a relative path, a copy or a moved model
        directory was refused as 'other settings' (model_path as written)."""
        from tests.tiny_models import copy_model_dir

        out = str(tmp_path / "moved")
        SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), tiny_schema, out).run()
        moved = copy_model_dir(tiny_bert_dir, tmp_path / "elsewhere")
        metrics = SSFTTrainer(SSFTConfig(model_path=moved, epochs=2, **SMALL), tiny_schema, out).run()
        assert metrics["epochs"] == 2

    def test_a_tune_written_inside_its_model_directory_resumes_and_encodes(self, tmp_path, tiny_bert_dir,
                                                                             tiny_schema) -> None:
        """``--output-dir <model>/ssft_out``: its checkpoint and adapter changed the base model's hash, so the
        resume was refused as of other settings (base_hash) and encode refused the adapter as tuned on another
        model."""
        from recsys_llm.semantics.ssft_adapter import load_tuned_encoder
        from tests.tiny_models import copy_model_dir

        model = copy_model_dir(tiny_bert_dir, tmp_path / "model")
        out = os.path.join(model, "ssft_out")
        SSFTTrainer(SSFTConfig(model_path=model, epochs=1, **SMALL), tiny_schema, out).run()
        metrics = SSFTTrainer(SSFTConfig(model_path=model, epochs=2, **SMALL), tiny_schema, out).run()
        assert metrics["epochs"] == 2
        encoder, _ = load_tuned_encoder(os.path.join(out, "adapter"))
        assert encoder.encode(["shade 1"], progress=False).shape == (1, 32)

    def test_fewer_epochs_than_done_is_refused_untouched(self, tmp_path, tiny_bert_dir, tiny_schema) -> None:
        out = str(tmp_path / "done")
        first = SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, **SMALL), tiny_schema, out).run()
        adapter, before = _adapter(out), _snapshot(out)
        with pytest.raises(ValueError, match=rf"{re.escape(out)}: .*tuned for 2 epochs.*--epochs 1"):
            SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), tiny_schema, out).run()
        assert _snapshot(out) == before
        with warnings.catch_warnings(record=True) as caught:  # the same number again: nothing to warn about
            warnings.simplefilter("always")
            again = SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, **SMALL), tiny_schema, out).run()
        assert not [w for w in caught if "bit-identical" in str(w.message)]
        assert again["epochs"] == 2 and again["history"] == first["history"]
        _assert_bit_identical(_adapter(out), adapter)


@pytest.fixture(scope="module")
def tuned_once(tmp_path_factory, tiny_bert_dir) -> Tuple[str, str]:
    """The schema directory and an SSFT output directory after 1 of 2 epochs (made by the CLI)."""
    root = tmp_path_factory.mktemp("ssft_damage")
    schema = make_schema(str(root / "data"))
    out = str(root / "ssft")
    assert main(["semantics", "tune", "--schema", schema.root, "--model", tiny_bert_dir, "--output-dir", out,
                 "--epochs", "1", *TUNE_ARGS]) == 0
    return schema.root, out


def _no_model(*args, **kwargs):
    raise AssertionError("the model was loaded before the damaged file was found")


def _damage(path: str) -> None:
    """Cuts the file to a third of its size (a write killed part-way, a full disk)."""
    size = os.path.getsize(path)
    with open(path, "r+b") as handle:
        handle.truncate(max(1, size // 3))


@pytest.mark.parametrize("name,before_the_model", [
    ("adapter.safetensors", True), ("optimizer.pt", False), ("state.json", True), ("rng.safetensors", True),
])
def test_a_damaged_checkpoint_file_is_named_and_nothing_is_changed(tmp_path, tuned_once, tiny_bert_dir, capsys,
                                                                   monkeypatch, name, before_the_model) -> None:
    from recsys_llm.semantics import ssft

    if before_the_model:  # found by reading headers and JSON: no model is loaded first
        monkeypatch.setattr(ssft, "load_model", _no_model)
    schema_root, tuned = tuned_once
    out = str(tmp_path / "ssft")
    shutil.copytree(tuned, out)
    damaged = os.path.join(out, "checkpoint", name)
    assert os.path.isfile(damaged), os.listdir(os.path.join(out, "checkpoint"))
    _damage(damaged)
    line = _refused_resume(out, schema_root, tiny_bert_dir, capsys)
    assert line.startswith(f"recsys-llm semantics tune: error: {damaged}: "), line
    assert "damaged" in line and "--no-resume" in line and "delete" in line, line


def _refused_resume(out: str, schema_root: str, model_dir: str, capsys) -> str:
    """Resumes `semantics tune` into ``out``; checks it is refused (exit code 2) and leaves ``out`` as it
    was, and returns the error line."""
    before = _snapshot(out)
    capsys.readouterr()
    code = main(["semantics", "tune", "--schema", schema_root, "--model", model_dir, "--output-dir", out,
                 "--epochs", "2", *TUNE_ARGS])
    assert code == 2
    assert _snapshot(out) == before
    return _error_line(capsys)


def _lora_of_another_rank(path: str) -> None:
    """Rewrites the checkpoint's LoRA tensors one rank smaller (a checkpoint of another --lora-r), whole files."""
    from safetensors.torch import save_file

    tensors = load_file(path)
    save_file({key: (t[:-1] if "lora_A" in key else t[:, :-1]).contiguous() for key, t in tensors.items()}, path)


def _an_optimizer_state_of_no_groups(path: str) -> None:
    """Replaces the AdamW state by a readable optimizer state of no parameter group (another optimizer's)."""
    torch.save({"state": {}, "param_groups": []}, path)


@pytest.mark.parametrize("name, change, detail", [
    ("adapter.safetensors", _lora_of_another_rank,
     r"\d+ LoRA tensor\(s\) missing, unknown or of other shapes, e\.g\. \S+lora_\w+\.weight"),
    ("optimizer.pt", _an_optimizer_state_of_no_groups,
     r"not an AdamW state of this adapter: loaded state dict has a different number of parameter groups"),
], ids=["LoRA of another rank", "optimizer of other groups"])
def test_a_whole_checkpoint_file_the_model_cannot_take_is_named_and_nothing_is_changed(
        tmp_path, tuned_once, tiny_bert_dir, capsys, name, change, detail) -> None:
    """Files whose headers and pickles read fine but do not fit the model: LoRA tensors of other shapes failed
    inside peft's loader (a size-mismatch RuntimeError), an optimizer state of other groups inside torch's
    load_state_dict; each is the damaged-checkpoint error naming the file, and the tune output stays as it was."""
    schema_root, tuned = tuned_once
    out = str(tmp_path / "ssft")
    shutil.copytree(tuned, out)
    changed = os.path.join(out, "checkpoint", name)
    change(changed)
    line = _refused_resume(out, schema_root, tiny_bert_dir, capsys)
    assert re.match(rf"recsys-llm semantics tune: error: {re.escape(changed)}: damaged or incomplete SSFT checkpoint file "
                    rf"\({detail}.*\); delete {re.escape(os.path.join(out, 'checkpoint'))} to tune again from "
                    r"scratch, or run `recsys-llm semantics tune` with --no-resume$", line), line


def test_an_adapter_recording_the_hash_over_every_subdirectory_of_its_model_still_encodes(tmp_path, tuned_once,
                                                                                           tiny_bert_dir) -> None:
    """Adapters tuned before the base model's hash left out folders the model does not load (a hub download's
    onnx/) recorded a hash over them too: that model, unchanged, is still the one they were tuned on."""
    from recsys_llm.semantics.model_dir import model_dir_fingerprint, model_dir_walk_fingerprint
    from recsys_llm.semantics.ssft_adapter import SSFT_INFO_FILE, load_tuned_encoder
    from tests.tiny_models import copy_model_dir

    _, tuned = tuned_once
    model = copy_model_dir(tiny_bert_dir, tmp_path / "hub")
    os.makedirs(os.path.join(model, "onnx"))
    with open(os.path.join(model, "onnx", "config.json"), "w", encoding="utf-8") as handle:
        handle.write("{}")
    assert model_dir_walk_fingerprint(model) != model_dir_fingerprint(model)
    adapter = shutil.copytree(os.path.join(tuned, "adapter"), str(tmp_path / "adapter"))
    with open(os.path.join(adapter, SSFT_INFO_FILE), encoding="utf-8") as handle:
        info = json.load(handle)
    info.update(base_model_path=model, base_model_hash=model_dir_walk_fingerprint(model))
    with open(os.path.join(adapter, SSFT_INFO_FILE), "w", encoding="utf-8") as handle:
        json.dump(info, handle)
    load_tuned_encoder(adapter)
    with open(os.path.join(model, "onnx", "config.json"), "w", encoding="utf-8") as handle:
        handle.write('{"changed": 1}')  # another model than the one tuned on, as the hash then said
    with pytest.raises(ValueError, match=f"adapter was tuned on {re.escape(model)} with hash"):
        load_tuned_encoder(adapter)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "ssft.json"])
@pytest.mark.parametrize("copied", [True, False])
def test_encode_with_a_damaged_adapter_file_is_named(tmp_path, tuned_once, capsys, name, copied) -> None:
    """The remedy fits where the adapter is: in its tune output, rewrite it from the checkpoint;
    copied away from it (no checkpoint beside it), copy it again or tune anew."""
    schema_root, tuned = tuned_once
    if copied:
        adapter = str(tmp_path / "adapter")
        shutil.copytree(os.path.join(tuned, "adapter"), adapter)
    else:
        shutil.copytree(tuned, str(tmp_path / "ssft"))
        adapter = str(tmp_path / "ssft" / "adapter")
    damaged = os.path.join(adapter, name)
    _damage(damaged)
    before = _snapshot(adapter)
    output = str(tmp_path / "fields.safetensors")
    capsys.readouterr()
    code = main(["semantics", "encode", "--schema", schema_root, "--adapter", adapter, "--output", output])
    assert code == 2
    line = _error_line(capsys)
    assert line.startswith(f"recsys-llm semantics encode: error: {damaged}: "), line
    assert "damaged" in line and "semantics tune" in line, line
    if copied:
        assert "copy it again from the tune output it came from" in line and "--output-dir" not in line, line
    else:
        assert f"--output-dir {tmp_path / 'ssft'} (it rewrites adapter/ from its checkpoint)" in line, line
    assert not os.path.exists(output)
    assert _snapshot(adapter) == before


def test_an_adapter_bin_holding_a_callable_is_refused_not_called_damaged(tmp_path, tuned_once, capsys) -> None:
    """adapter_model.bin is a pickle: peft reads it with torch.load(weights_only=True), which refuses a
    callable. The error names the file and why, without torch's advice to retry with weights_only=False."""
    schema_root, tuned = tuned_once
    adapter = str(tmp_path / "adapter")
    shutil.copytree(os.path.join(tuned, "adapter"), adapter)
    weights = load_file(os.path.join(adapter, "adapter_model.safetensors"))
    os.remove(os.path.join(adapter, "adapter_model.safetensors"))
    marker = tmp_path / "ran"

    class _Payload:
        def __reduce__(self):
            return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

    bin_path = os.path.join(adapter, "adapter_model.bin")
    torch.save({**weights, next(iter(weights)): _Payload()}, bin_path)
    output = str(tmp_path / "fields.safetensors")
    capsys.readouterr()
    assert main(["semantics", "encode", "--schema", schema_root, "--adapter", adapter, "--output", output]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"recsys-llm semantics encode: error: {bin_path}: refused: the adapter file holds objects other "
                           "than tensors (UnpicklingError: "), line
    assert "exec" in line and "weights_only" not in line and "damaged" not in line, line
    assert not marker.exists() and not os.path.exists(output)


@pytest.mark.parametrize("change", [{"peft_type": "NOT_A_PEFT_TYPE"}, {"r": "eight"}, {"task_type": "NOT_A_TASK"},
                                    {"target_modules": ["no_such_module"]}])
def test_encode_with_an_adapter_config_peft_cannot_build_names_the_file(tmp_path, tuned_once, capsys, change) -> None:
    """A damaged or crafted adapter_config.json: peft's KeyError / TypeError / ValueError (a bare ``'EVIL'``,
    a traceback for the TypeError) becomes one line naming the file."""
    schema_root, tuned = tuned_once
    adapter = str(tmp_path / "adapter")
    shutil.copytree(os.path.join(tuned, "adapter"), adapter)
    config_path = os.path.join(adapter, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, **change}, handle)
    output = str(tmp_path / "fields.safetensors")
    capsys.readouterr()
    assert main(["semantics", "encode", "--schema", schema_root, "--adapter", adapter, "--output", output]) == 2
    line = _error_line(capsys)
    assert line.startswith(f"recsys-llm semantics encode: error: {config_path}: damaged or incomplete SSFT adapter file "
                           "(peft cannot build the adapter it describes: "), line
    assert not os.path.exists(output)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_tune_outputs_get_the_modes_the_umask_allows(tmp_path, tiny_bert_dir, tiny_schema, umask: int) -> None:
    """safetensors and peft write owner-only (0600) weight files: on a shared cluster other users
    could not read the adapter. Every file and directory of adapter/ and checkpoint/ gets the
    mode ``open()`` / ``os.makedirs`` would give under the umask."""
    out = str(tmp_path / "ssft")
    old = os.umask(umask)
    try:
        SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), tiny_schema, out).run()
    finally:
        os.umask(old)
    for part in ("adapter", "checkpoint"):
        root = os.path.join(out, part)
        assert os.stat(root).st_mode & 0o777 == 0o777 & ~umask
        for name in os.listdir(root):
            assert os.stat(os.path.join(root, name)).st_mode & 0o777 == 0o666 & ~umask, (part, name)


def test_running_out_of_memory_on_resume_is_not_called_a_damaged_checkpoint(tmp_path, tuned_once, tiny_bert_dir,
                                                                            monkeypatch) -> None:
    """torch.OutOfMemoryError is a RuntimeError, which a damaged optimizer file also raises: it must
    not be reported as damage, whose advice (delete the checkpoint) would throw a good one away."""
    schema_root, tuned = tuned_once
    out = str(tmp_path / "ssft")
    shutil.copytree(tuned, out)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch, "load", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        main(["semantics", "tune", "--schema", schema_root, "--model", tiny_bert_dir, "--output-dir", out,
              "--epochs", "2", *TUNE_ARGS])


def test_what_a_killed_swap_leaves_in_an_ssft_output_does_not_block_the_next_tune() -> None:
    from recsys_llm.semantics.ssft import _is_ssft_entry

    assert _is_ssft_entry(".checkpoint.removing-1a2b3c4d") and _is_ssft_entry("checkpoint.old")
    assert not _is_ssft_entry(".other.removing-1a2b3c4d") and not _is_ssft_entry("notes.txt")


def test_a_checkpoint_whose_auto_pooling_resolved_otherwise_is_refused(tmp_path, tuned_once, tiny_bert_dir,
                                                                         capsys) -> None:
    """``--pooling auto`` is the same option whatever it picks: the signature also records what it
    picked (a change of the code's choice would otherwise resume an adapter tuned under another
    pooling). A checkpoint of an earlier version, without that record, still resumes."""
    schema_root, tuned = tuned_once
    tune = ["semantics", "tune", "--schema", schema_root, "--model", tiny_bert_dir, "--epochs", "2", *TUNE_ARGS]
    for name, recorded in (("other", "last"), ("older", None)):
        out = str(tmp_path / name)
        shutil.copytree(tuned, out)
        state_file = os.path.join(out, "checkpoint", "state.json")
        with open(state_file, encoding="utf-8") as handle:
            state = json.load(handle)
        assert state["signature"]["config"]["pooling"] == "auto" and state["signature"]["resolved_pooling"] == "mean"
        if recorded is None:
            del state["signature"]["resolved_pooling"]
        else:
            state["signature"]["resolved_pooling"] = recorded
        with open(state_file, "w", encoding="utf-8") as handle:
            json.dump(state, handle)
        before = _snapshot(out)
        code = main(["semantics", "tune", "--output-dir", out, *tune[2:]])
        if recorded is None:
            assert code == 0 and json.load(open(os.path.join(out, "metrics.json")))["epochs"] == 2
        else:
            assert code != 0 and _snapshot(out) == before
            line = _error_line(capsys)
            assert "other settings (resolved_pooling: 'last' -> 'mean')" in line, line


def test_a_checkpoint_tuned_on_other_field_texts_or_values_is_refused(tmp_path, tiny_bert_dir) -> None:
    """The signature held the settings and field names only: after a schema's description (a field's key
    text) changed, the tune went on from the old texts' adapter and recorded the new ones in ssft.json.
    A checkpoint of an earlier version, without the record, still resumes."""
    schema = make_schema(str(tmp_path / "data"))
    out = str(tmp_path / "ssft")
    SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), schema, out).run()
    schema_file = os.path.join(schema.root, "schema.json")
    with open(schema_file, encoding="utf-8") as handle:
        original_schema = handle.read()
    with open(schema_file, "w", encoding="utf-8") as handle:
        handle.write(original_schema.replace("colour of the item", "shade of the item"))
    before = _snapshot(out)
    with pytest.raises(ValueError, match=r"other settings \(data_sha256: the field texts or the sampled values"):
        SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, **SMALL), DatasetSchema.load(schema_file), out).run()
    assert _snapshot(out) == before
    state_file = os.path.join(out, "checkpoint", "state.json")
    with open(state_file, encoding="utf-8") as handle:
        state = json.load(handle)
    del state["signature"]["data_sha256"]  # as an earlier version wrote it
    with open(state_file, "w", encoding="utf-8") as handle:
        json.dump(state, handle)
    assert SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=2, **SMALL), schema, out).run()["epochs"] == 2


def test_a_tune_interrupted_while_saving_its_checkpoint_leaves_no_temp_directory(tmp_path, tiny_bert_dir,
                                                                                  monkeypatch) -> None:
    """SIGTERM (SystemExit in the CLI) during a checkpoint save: the earlier state stays, and no
    half-written ``checkpoint.tmp`` is left in the output."""
    schema_root = make_schema(str(tmp_path / "data")).root
    out = str(tmp_path / "ssft")

    def terminated(*args, **kwargs) -> None:
        raise SystemExit(143)

    monkeypatch.setattr(torch, "save", terminated)
    with pytest.raises(SystemExit):
        main(["semantics", "tune", "--schema", schema_root, "--model", tiny_bert_dir, "--output-dir", out,
              "--epochs", "1", *TUNE_ARGS])
    assert sorted(os.listdir(out)) == []


def test_a_tune_interrupted_while_saving_its_adapter_leaves_no_temp_directory(tmp_path, tiny_bert_dir,
                                                                               monkeypatch) -> None:
    """SIGTERM (SystemExit in the CLI) while the final adapter is written: the checkpoint stays for
    the next tune, and no half-written ``adapter.tmp`` is left in the output."""
    import peft

    schema_root = make_schema(str(tmp_path / "data")).root
    out = str(tmp_path / "ssft")

    def terminated(self, directory: str, *args, **kwargs) -> None:
        os.makedirs(directory, exist_ok=True)
        with open(os.path.join(directory, "adapter_config.json"), "w", encoding="utf-8") as handle:
            handle.write("{")  # a part of the adapter, then the signal
        raise SystemExit(143)

    monkeypatch.setattr(peft.PeftModel, "save_pretrained", terminated)
    with pytest.raises(SystemExit):
        main(["semantics", "tune", "--schema", schema_root, "--model", tiny_bert_dir, "--output-dir", out,
              "--epochs", "1", *TUNE_ARGS])
    assert sorted(os.listdir(out)) == ["checkpoint"]


def test_a_second_tune_into_an_output_a_tune_is_writing_is_refused(tmp_path, tiny_bert_dir, tiny_schema,
                                                                   monkeypatch) -> None:
    """Two tunes launched into one output directory (a scheduler's retry): the second, checking the directory
    while the first tuned, removed the first's checkpoint.tmp as a killed run's and swapped in its own, and the
    first wrote the rest of its checkpoint into nothing (or into the second's), its adapter in place."""
    from recsys_llm.semantics import ssft

    out = str(tmp_path / "ssft")
    first = SSFTTrainer(SSFTConfig(model_path=tiny_bert_dir, epochs=1, **SMALL), tiny_schema, out)
    save_file, second = ssft.save_file, []

    def save_while_the_second_tune_runs(tensors, path, *args, **kwargs):
        if not second:
            second.append(None)
            config = SSFTConfig(model_path=tiny_bert_dir, epochs=1, **{**SMALL, "learning_rate": 1e-2})
            try:
                SSFTTrainer(config, tiny_schema, out).run()
                second[0] = "ran"
            except Exception as error:  # noqa: BLE001 - what the second job ends with
                second[0] = str(error)
        save_file(tensors, path, *args, **kwargs)

    monkeypatch.setattr(ssft, "save_file", save_while_the_second_tune_runs)
    metrics = first.run()
    monkeypatch.undo()
    assert second[0].startswith(f"{out}: another semantics tune is writing this SSFT output")
    assert metrics["config"]["learning_rate"] == SMALL["learning_rate"]
    with open(os.path.join(out, "checkpoint", "state.json"), encoding="utf-8") as handle:
        assert json.load(handle)["signature"]["config"]["learning_rate"] == SMALL["learning_rate"]
    assert sorted(os.listdir(out)) == ["adapter", "checkpoint", "field_retrieval.png", "metrics.json"]


def test_a_base_model_edited_in_place_is_named_with_both_hashes_by_resume_and_encode(tmp_path, tiny_bert_dir,
                                                                                     tiny_schema) -> None:
    """Weights replaced under the same path: the resume named only 'base_hash', encode named no way out."""
    from safetensors.torch import load_file, save_file

    from recsys_llm.semantics.model_dir import model_dir_fingerprint
    from recsys_llm.semantics.ssft_adapter import load_tuned_encoder
    from tests.tiny_models import copy_model_dir

    model = copy_model_dir(tiny_bert_dir, tmp_path / "model")
    out = str(tmp_path / "ssft")
    SSFTTrainer(SSFTConfig(model_path=model, epochs=1, **SMALL), tiny_schema, out).run()
    before = model_dir_fingerprint(model)
    weights = os.path.join(model, "model.safetensors")
    state = load_file(weights)
    name = sorted(state)[0]
    state[name] = state[name] + 0.5
    save_file(state, weights, metadata={"format": "pt"})
    after = model_dir_fingerprint(model)
    with pytest.raises(ValueError, match=rf"base_hash: '{before}' -> '{after}' \(the files of {re.escape(model)}: "):
        SSFTTrainer(SSFTConfig(model_path=model, epochs=2, **SMALL), tiny_schema, out).run()
    with pytest.raises(ValueError, match=rf"now has hash {after} \(another model, or that one edited in place\): "
                                         r"give the model it was tuned on .*semantics tune --model"):
        load_tuned_encoder(os.path.join(out, "adapter"))
