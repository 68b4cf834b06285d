"""A damaged or incomplete saved CTR-adapted LLM (``semantics adapt``'s output directory) is named:
each of its files, truncated, missing or holding what does not fit, ends ``semantics export``
with one ``error:`` line naming that file and saying to run ``semantics adapt`` again."""

import json
import os
import re
import shutil
import warnings
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import load_file, save_file

from recsys_llm.cli import main
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.semantics.ctr_llm_store import load_ctr_llm
from tests.tiny_models import save_tiny_bert

ADVICE = "is a damaged or incomplete CTR-adapted LLM: run `recsys-llm semantics adapt` again"


@pytest.fixture(scope="module")
def adapted(tmp_path_factory) -> Dict[str, str]:
    """A data set and a CTR-adapted tiny BERT (LoRA, so ``llm_tuned.safetensors`` holds tensors)."""
    root = tmp_path_factory.mktemp("damaged")
    data = str(root / "data")
    os.makedirs(data)
    rng = np.random.default_rng(0)
    pq.write_table(pa.table({
        "user_id": pa.array(rng.integers(0, 3, 16), pa.int64()),
        "item_id": pa.array(rng.integers(0, 5, 16), pa.int64()),
        "label": pa.array(rng.integers(0, 2, 16), pa.int64()),
    }), os.path.join(data, "train.parquet"))
    DatasetSchema("t", [FieldSpec("user_id", "sparse", 3, description="user id"),
                        FieldSpec("item_id", "sparse", 5, description="item id")],
                  splits={"train": "train.parquet"}, root=data).save(os.path.join(data, "schema.json"))
    llm = str(root / "llm")
    assert main(["semantics", "adapt", "--schema", data, "--output-dir", llm, "--model",
                 save_tiny_bert(str(root / "bert")), "--representation-dim", "4", "--hidden-dim", "8",
                 "--batch-size", "8", "--max-length", "16"]) == 0
    assert load_file(os.path.join(llm, "llm_tuned.safetensors"))  # LoRA tensors
    return {"data": data, "llm": llm}


@pytest.fixture()
def copy(adapted, tmp_path) -> str:
    """A copy of the saved CTR-adapted LLM, to damage."""
    return shutil.copytree(adapted["llm"], str(tmp_path / "llm"))


def _export_error(adapted: Dict[str, str], llm: str, tmp_path, capsys) -> str:
    """The one error line of ``semantics export`` with ``llm`` (exit code 2, no traceback, no output)."""
    vectors = str(tmp_path / "vectors")
    code = main(["semantics", "export", "--schema", adapted["data"], "--llm", llm, "--output-dir", vectors,
                 "--granularity", "entity", "--entity-field", "item_id"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "Traceback" not in err
    # after the base model's progress bar, when it loaded
    lines = [line for line in err.splitlines() if line.strip() and "Loading weights" not in line]
    assert len(lines) == 2 and lines[1].startswith("(set RECSYS_LLM_TRACEBACK"), err
    assert lines[0].startswith("recsys-llm semantics export: error: "), err
    assert not os.path.exists(vectors)
    return lines[0][len("recsys-llm semantics export: error: "):]


def _truncate(path: str, size: int) -> None:
    with open(path, "r+b") as handle:
        handle.truncate(size if size >= 0 else os.path.getsize(path) + size)


@pytest.mark.parametrize("name,size,reason", [
    ("llm_tuned.safetensors", 20, "invalid header length"),
    ("llm_tuned.safetensors", 1000, "invalid header length"),
    ("llm_tuned.safetensors", -10, "incomplete metadata, file not fully covered"),
    ("heads.safetensors", 5, "header too small"),
    ("heads.safetensors", 1000, "incomplete metadata, file not fully covered"),
    ("heads.safetensors", 0, "header too small"),
])
def test_a_truncated_safetensors_file_is_named(adapted, copy, tmp_path, capsys, name, size, reason) -> None:
    path = os.path.join(copy, name)
    _truncate(path, size)
    expected = (f"{path}: not a complete safetensors file (Error while deserializing header: {reason}); "
                f"{copy} {ADVICE}")
    assert _export_error(adapted, copy, tmp_path, capsys) == expected
    with pytest.raises(ValueError, match=f"^{re.escape(expected)}$"):  # the library says the same
        load_ctr_llm(copy)


@pytest.mark.parametrize("name", ["config.json", "provenance.json", "row_text.json", "adapted_on.json"])
def test_a_truncated_json_file_is_named(adapted, copy, tmp_path, capsys, name) -> None:
    path = os.path.join(copy, name)
    _truncate(path, 20)
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error.startswith(f"{path}: not valid JSON (") and error.endswith(f"; {copy} {ADVICE}")


@pytest.mark.parametrize("name,content,message", [
    ("row_text.json", [1, 2], "expected a JSON object, got list"),
    ("row_text.json", {"template": "{description} is {value}.", "colour": 1},
     "unknown keys ['colour']; row-text settings are ['dense_decimals', 'empty_sequence_text', 'fields', "),
    ("adapted_on.json", {"schema": "t"}, "expected the list of fields the LLM was adapted on under 'fields', got None"),
])
def test_a_json_file_of_other_content_is_named(adapted, copy, tmp_path, capsys, name, content, message) -> None:
    path = os.path.join(copy, name)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error.startswith(f"{path}: {message}") and error.endswith(f"; {copy} {ADVICE}")


def test_a_missing_tuned_tensor_file_is_named(adapted, copy, tmp_path, capsys) -> None:
    path = os.path.join(copy, "llm_tuned.safetensors")
    os.remove(path)
    assert _export_error(adapted, copy, tmp_path, capsys) == f"{path}: missing; {copy} {ADVICE}"


def test_tuned_tensors_that_do_not_fit_are_named(adapted, copy, tmp_path, capsys) -> None:
    path = os.path.join(copy, "llm_tuned.safetensors")
    tuned = load_file(path)
    first = sorted(tuned)[0]
    save_file({k: v for k, v in tuned.items() if k != first}, path)  # one LoRA tensor left out
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error == f"{path}: no tensors ['{first}'] of the tuned LLM; {copy} {ADVICE}"
    save_file({**tuned, first: torch.zeros(3, 3)}, path)  # one of another shape
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error == (f"{path}: tensor '{first}' has shape (3, 3), the model's {tuple(tuned[first].shape)}; "
                     f"{copy} {ADVICE}")
    save_file({**tuned, "not.a.tensor": torch.zeros(3)}, path)  # one the model does not have
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error.startswith(f"{copy}: tuned tensors ['not.a.tensor'] do not exist in "), error


def test_head_tensors_that_do_not_fit_are_named(adapted, copy, tmp_path, capsys) -> None:
    path = os.path.join(copy, "heads.safetensors")
    heads = load_file(path)
    name = sorted(k for k in heads if k.startswith("predict."))[0]
    save_file({**heads, name: torch.zeros(2, 2, 2)}, path)
    error = _export_error(adapted, copy, tmp_path, capsys)
    assert error.startswith(f"{path}: does not fit the heads of config.json (Error(s) in loading state_dict")
    assert error.endswith(f"; {copy} {ADVICE}")
    save_file({k: v for k, v in heads.items() if k != name}, path)
    assert "Missing key(s)" in _export_error(adapted, copy, tmp_path, capsys)


def test_the_undamaged_llm_still_exports(adapted, tmp_path, capsys) -> None:
    """... and says how a gain network reads the entity vectors."""
    out = str(tmp_path / "vectors")
    assert main(["semantics", "export", "--schema", adapted["data"], "--llm", adapted["llm"], "--output-dir",
                 out, "--granularity", "entity", "--entity-field", "item_id"]) == 0
    captured = capsys.readouterr()
    json.loads(captured.out)  # stdout is the JSON alone
    assert re.search(rf"semantics export: \d+ item_id vectors of (\d+) dims in {re.escape(out)}; a gain network reads "
                     rf"them with elec.task=gain elec.vector_source=entity_table elec.vector_dim=\1 "
                     rf"elec.entity_tables.item_id={re.escape(out)}", captured.err), captured.err


def test_adapt_help_says_which_modules_lora_targets_by_default(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["semantics", "adapt", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: peft's)" not in text
    assert ("--target-modules TARGET_MODULES [TARGET_MODULES ...] --tuning lora: LoRA target modules (default: the attention "
            "query/value projections as the model names them: q_proj v_proj / query value / c_attn / query_key_value / Wqkv / "
            "q_lin v_lin / query_proj value_proj / qkv_proj / q v; else peft's default for the architecture)") in text


def test_target_modules_without_names_is_refused_by_the_parser(capsys) -> None:
    """A bare ``--target-modules`` (no names) used to pass [] on and be reported as a model without
    attention projections; like ``semantics tune``, it now takes at least one name."""
    with pytest.raises(SystemExit):
        main(["semantics", "adapt", "--schema", "s", "--output-dir", "o", "--target-modules"])
    assert "--target-modules: expected at least one argument" in capsys.readouterr().err


def test_adapting_on_a_held_out_split_is_warned_of(tmp_path) -> None:
    """`--split valid` tuned the LLM on the labels the CTR models are validated on, without a word (its help says
    never to)."""
    data = str(tmp_path / "data")
    os.makedirs(data)
    rng = np.random.default_rng(0)
    for split in ("train", "valid"):
        pq.write_table(pa.table({"user_id": pa.array(rng.integers(0, 3, 8), pa.int64()),
                                 "label": pa.array(rng.integers(0, 2, 8), pa.int64())}),
                       os.path.join(data, f"{split}.parquet"))
    DatasetSchema("t", [FieldSpec("user_id", "sparse", 3, description="user id")],
                  splits={"train": "train.parquet", "valid": "valid.parquet"}, root=data).save(
        os.path.join(data, "schema.json"))
    bert = save_tiny_bert(str(tmp_path / "bert"))
    for split, warned in (("valid", True), ("train", False)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert main(["semantics", "adapt", "--schema", data, "--split", split, "--output-dir",
                         str(tmp_path / split), "--model", bert, "--representation-dim", "4", "--hidden-dim", "8",
                         "--batch-size", "8", "--max-length", "16"]) == 0
        said = [str(w.message) for w in caught if "labels reach the LLM" in str(w.message)]
        assert bool(said) == warned, said
        assert not said or said[0].startswith("--split valid: its labels reach the LLM")
