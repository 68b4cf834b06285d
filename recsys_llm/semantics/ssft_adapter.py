"""Using an SSFT adapter: the base model with the adapter merged in, as a :class:`TextEncoder` that
encodes with the pooling and text length it was tuned with, after checks that its files are whole
and its base model is the one it was tuned on.

An adapter directory (``<tune output-dir>/adapter``) holds peft's ``adapter_config.json`` and
``adapter_model.safetensors`` and the tune's ``ssft.json`` (base model and its hash, fields,
templates, pooling, max length).

Example::

    encoder, info = load_tuned_encoder("runs/ssft/adapter")
    vectors = encoder.encode(["user id", "movie title"])  # (2, H)
"""

import hashlib
import json
import os
import pickle
from typing import Any, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError

from recsys_llm.error_text import one_line, telling_line
from recsys_llm.semantics.encoder import TextEncoder
from recsys_llm.semantics.model_dir import (
    file_fingerprint,
    model_dir_fingerprint,
    model_dir_walk_fingerprint,
    read_json_file,
    safetensors_damage,
)
from recsys_llm.semantics.model_loading import (code_mark, load_model, load_tokenizer, resolve_device, resolve_dtype,
                                                runs_own_code)
from recsys_llm.semantics.train_checkpoint import CHECKPOINT_STATE_FILE

SSFT_INFO_FILE = "ssft.json"
# a tuned encoder's model id: the base model's path, this mark, then ssft.json's adapter_hash
ADAPTER_ID_MARK = "+ssft:"


# what ssft.json must name for the adapter to be loaded and used
_ADAPTER_INFO_KEYS = ("base_model_path", "base_model_hash", "adapter_hash", "pooling", "max_length", "fields",
                      "templates")


def canonical_adapter_config(config: Dict[str, Any]) -> Dict[str, Any]:
    """``adapter_config.json`` with ``target_modules`` sorted: peft writes that set in Python's hash
    order, which differs from process to process (PYTHONHASHSEED) for the same adapter."""
    modules = config.get("target_modules")
    if isinstance(modules, list) and all(isinstance(m, str) for m in modules):
        config = {**config, "target_modules": sorted(modules)}
    return config


def save_peft_adapter(model: Any, directory: str) -> None:
    """``model.save_pretrained(directory)`` (a peft model: its adapter), with ``adapter_config.json`` rewritten in
    its canonical form (:func:`canonical_adapter_config`), so every process writes the same bytes for one adapter
    (a rerun after a kill those of an uninterrupted run)."""
    model.save_pretrained(directory)
    config_path = os.path.join(directory, "adapter_config.json")
    with open(config_path, encoding="utf-8") as handle:
        adapter_config = canonical_adapter_config(json.load(handle))
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(adapter_config, handle, indent=2, sort_keys=True)


def _adapter_file_fingerprint(path: str) -> str:
    """:func:`file_fingerprint`, of ``adapter_config.json`` its canonical JSON (:func:`canonical_adapter_config`):
    one adapter gives one hash however peft ordered its set of target modules."""
    if os.path.basename(path) == "adapter_config.json":
        try:
            with open(path, encoding="utf-8") as handle:
                config = json.load(handle)
        except (OSError, ValueError):
            return file_fingerprint(path)
        if isinstance(config, dict):
            text = json.dumps(canonical_adapter_config(config), sort_keys=True)
            return hashlib.sha256(text.encode()).hexdigest()
    return file_fingerprint(path)


def _damaged_adapter_file(path: str, detail: str) -> ValueError:
    """The error for a file of an SSFT ``adapter/`` directory that cannot be read back."""
    adapter_dir = os.path.dirname(os.path.abspath(path))
    output_dir = os.path.dirname(adapter_dir)
    in_tune_output = os.path.basename(adapter_dir) == "adapter" and any(
        os.path.isfile(os.path.join(output_dir, name, CHECKPOINT_STATE_FILE)) for name in ("checkpoint", "checkpoint.old")
    )
    if in_tune_output:
        remedy = (f"run `recsys-llm semantics tune` with the same settings and --output-dir {output_dir} (it rewrites "
                  "adapter/ from its checkpoint), or tune it anew")
    else:  # copied or moved away from its checkpoint
        remedy = "copy it again from the tune output it came from, or tune it anew (`recsys-llm semantics tune`)"
    return ValueError(f"{path}: damaged or incomplete SSFT adapter file ({detail}); write the adapter again: {remedy}")


def read_adapter_info(adapter_dir: str) -> Dict[str, Any]:
    """The ``ssft.json`` of an SSFT adapter directory: base model, pooling, max length, fields, templates.

    Raises:
        FileNotFoundError: the directory has no ``ssft.json``.
        ValueError: ``ssft.json`` is damaged (not JSON, or without what the adapter needs).
    """
    info_path = os.path.join(adapter_dir, SSFT_INFO_FILE)
    if not os.path.exists(info_path):
        inside = os.path.join(adapter_dir, "adapter")  # the tune's --output-dir named instead of its adapter/
        hint = (f"; {inside} is the adapter that tune output directory holds" if os.path.isfile(
            os.path.join(inside, SSFT_INFO_FILE)) else " (run `recsys-llm semantics tune`)")
        raise FileNotFoundError(f"{info_path}: not an SSFT adapter directory{hint}")
    try:
        info = read_json_file(info_path)
    except ValueError as error:
        raise _damaged_adapter_file(info_path, f"not valid JSON: {one_line(error.__cause__ or error)}") from error
    missing = [key for key in _ADAPTER_INFO_KEYS if key not in info] if isinstance(info, dict) else ["a JSON object"]
    if missing:
        raise _damaged_adapter_file(info_path, f"expected {', '.join(missing)}")
    return info


def _check_adapter_files(adapter_dir: str) -> str:
    """Checks that the peft files of an SSFT adapter directory are there and whole (before any model
    loads); returns the path of its weight file.

    Raises:
        FileNotFoundError: no ``adapter_config.json`` or no adapter weights.
        ValueError: one of them is damaged (named).
    """
    config_path = os.path.join(adapter_dir, "adapter_config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{config_path}: missing; the SSFT adapter directory is incomplete (run "
                                "`recsys-llm semantics tune` again)")
    try:
        read_json_file(config_path)
    except ValueError as error:
        raise _damaged_adapter_file(config_path, f"not valid JSON: {one_line(error.__cause__ or error)}") from error
    weights = [name for name in ("adapter_model.safetensors", "adapter_model.bin")
               if os.path.isfile(os.path.join(adapter_dir, name))]
    if not weights:
        raise FileNotFoundError(f"{adapter_dir}: no adapter_model.safetensors; the SSFT adapter directory is "
                                "incomplete (run `recsys-llm semantics tune` again)")
    weight_path = os.path.join(adapter_dir, weights[0])
    if weight_path.endswith(".safetensors"):
        damage = safetensors_damage(weight_path)
        if damage is not None:
            raise _damaged_adapter_file(weight_path, damage)
    return weight_path


def is_tuned_base(model_path: str, info: Dict[str, Any]) -> bool:
    """Whether the model directory ``model_path`` holds the files the SSFT adapter of ``ssft.json`` ``info``
    was tuned on (its ``base_model_hash``), wherever it lies now.

    Raises:
        FileNotFoundError: ``model_path`` is no directory.
    """
    # adapters tuned before 2026-12-05 recorded a hash over every subdirectory too (a hub download's onnx/)
    tuned = info["base_model_hash"]
    return model_dir_fingerprint(model_path) == tuned or model_dir_walk_fingerprint(model_path) == tuned


def load_tuned_encoder(
    adapter_dir: str,
    batch_size: int = 64,
    device: Optional[str] = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
    base_model_path: Optional[str] = None,
) -> Tuple[TextEncoder, Dict[str, Any]]:
    """Loads base model + SSFT adapter (merged) as a :class:`TextEncoder`.

    Args:
        adapter_dir (str): the SSFT adapter directory (``<tune output-dir>/adapter``).
        batch_size (int): texts per forward pass.
        device (Optional[str]): e.g. ``cuda:0``; None -> CUDA if available.
        dtype (str): the base weights' dtype, ``auto`` or a dtype name
            (:func:`~recsys_llm.semantics.model_loading.resolve_dtype`).
        trust_remote_code (bool): run the base model directory's own code if its config asks for it.
        base_model_path (Optional[str]): the base model's directory; None -> the one ``ssft.json`` names.
            Another directory (the model moved, or copied to another machine) is used when it holds the
            files the adapter was tuned on (their hash).

    Returns:
        Tuple[TextEncoder, Dict[str, Any]]: the encoder (pooling and max length as tuned;
        model hash = base hash + adapter hash + a hash of the adapter files as they are now) and the
        adapter's ``ssft.json``.

    Raises:
        FileNotFoundError: no ``ssft.json``, adapter config or weights, or the recorded base model is gone.
        ValueError: a damaged adapter file, a base model with other files than the adapter was tuned on, or
            other code than it ran (``trust_remote_code``).
    """
    from peft import PeftModel

    info = read_adapter_info(adapter_dir)
    weight_path = _check_adapter_files(adapter_dir)
    base_path = base_model_path or info["base_model_path"]
    if base_model_path is None and not os.path.isdir(base_path):
        raise FileNotFoundError(
            f"{adapter_dir}: the base model the adapter was tuned on, {base_path} ({SSFT_INFO_FILE} "
            "base_model_path), is not there; if it moved (or the adapter was copied to another machine), give "
            "its directory now (semantics encode --model): its files are checked against the adapter's"
        )
    base_hash = model_dir_fingerprint(base_path)
    if not is_tuned_base(base_path, info):
        raise ValueError(
            f"{adapter_dir}: adapter was tuned on {info['base_model_path']} with hash {info['base_model_hash']}, "
            f"but the model at {base_path} now has hash {base_hash} (another model, or that one edited in place): "
            "give the model it was tuned on (semantics encode --model, where it moved), or tune the new one "
            "(semantics tune --model) and encode with its adapter"
        )
    torch_device = resolve_device(device)
    tokenizer = load_tokenizer(base_path, trust_remote_code)
    base = load_model(base_path, torch_device, resolve_dtype(dtype, torch_device), trust_remote_code)
    tuned_with_own_code = bool(info.get("own_code", False))
    if runs_own_code(base) != tuned_with_own_code:
        raise ValueError(
            f"{adapter_dir}: the adapter was tuned on "
            + ("the model directory's own code (--trust-remote-code), and transformers' own class is loaded now: pass "
               "--trust-remote-code (trust_remote_code=True) to encode with the model it was tuned on"
               if tuned_with_own_code else
               "transformers' own class for the model, and the directory's own code is loaded now "
               "(--trust-remote-code): leave it out to encode with the model it was tuned on")
        )
    try:
        # torch_device: peft would otherwise load the adapter onto the current CUDA device
        model = PeftModel.from_pretrained(base, adapter_dir, torch_device=str(torch_device)).merge_and_unload()
    except torch.OutOfMemoryError:  # a RuntimeError, but no sign of a damaged file
        raise
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met a callable in adapter_model.bin
        raise ValueError(
            f"{weight_path}: refused: the adapter file holds objects other than tensors ({telling_line(error)}); "
            "nothing from it ran. Use an adapter you tuned (`recsys-llm semantics tune`) or one from a source you trust"
        ) from error
    except (SafetensorError, OSError, RuntimeError) as error:
        raise _damaged_adapter_file(weight_path, one_line(error)[:300]) from error
    except (KeyError, TypeError, ValueError) as error:  # peft cannot build the adapter adapter_config.json describes
        config_path = os.path.join(adapter_dir, "adapter_config.json")
        detail = f"peft cannot build the adapter it describes: {type(error).__name__}: {one_line(error)[:300]}"
        raise _damaged_adapter_file(config_path, detail) from error
    # the files peft built the adapter from as they are now: its weights and adapter_config.json (its
    # lora_alpha scales the weights merged in); ssft.json's adapter_hash says what was tuned, and files
    # copied or edited over it since must not hit the vectors cached for the old ones
    adapter_files = hashlib.sha256("".join(
        f"{name}:{_adapter_file_fingerprint(os.path.join(adapter_dir, name))}\n"
        for name in sorted(os.listdir(adapter_dir))
        if name.endswith((".safetensors", ".bin")) or name == "adapter_config.json").encode()).hexdigest()[:8]
    encoder = TextEncoder.from_model(
        model, tokenizer, pooling=info["pooling"], batch_size=batch_size, max_length=info["max_length"],
        model_id=f"{base_path}{ADAPTER_ID_MARK}{info['adapter_hash']}",
        model_hash=f"{base_hash}+{info['adapter_hash']}+{adapter_files}{code_mark(model, tokenizer)}",
    )
    return encoder, info
