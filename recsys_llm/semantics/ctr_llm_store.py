"""A saved CTR-adapted LLM: writing it (:func:`save_ctr_llm`, atomically), reading it back
(:func:`load_ctr_llm`), and the checks that it is whole and sits on the base model, tokenizer and code it was
adapted on."""

import dataclasses
import json
import os
from typing import Any, Callable, Dict, Optional, Tuple

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from recsys_llm.atomic_dir import atomic_directory
from recsys_llm.error_text import one_line
from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig, heads_state
from recsys_llm.semantics.model_dir import model_weights_fingerprint, read_json_file, tokenizer_fingerprint
from recsys_llm.semantics.model_loading import runs_own_code
from recsys_llm.semantics.ssft_adapter import save_peft_adapter

# in provenance.json: the fingerprint of the base model's config and weights (check_base_model)
BASE_WEIGHTS_KEY = "base_weights"
# and that of the tokenizer it tuned on (check_base_tokenizer)
BASE_TOKENIZER_KEY = "base_tokenizer"
CTR_LLM_FILES = ("config.json", "heads.safetensors")  # every saved CTR-adapted LLM has them
PEFT_ADAPTER_DIR = "adapter"  # with LoRA: peft's adapter directory of the tuned LLM (save_ctr_llm)


def save_ctr_llm(model: CTRAdaptedLLM, directory: str, extra_json: Optional[Dict[str, Any]] = None,
                 extra_files: Optional[Dict[str, Callable[[str], Any]]] = None) -> None:
    """Saves config, heads and tuned LLM tensors atomically (temp dir renamed into place).

    Files: ``config.json``, ``heads.safetensors``, ``llm_tuned.safetensors`` (LoRA adapters
    or the unfrozen layers, by parameter name), with LoRA ``adapter/`` too (the same LoRA tensors as
    peft's own adapter directory, ``adapter_config.json`` and ``adapter_model.safetensors``, which
    ``peft.PeftModel.from_pretrained(AutoModel.from_pretrained(base), "<dir>/adapter")`` loads without
    recsys_llm; :func:`load_ctr_llm` reads ``llm_tuned.safetensors``), ``provenance.json``, one JSON file per
    ``extra_json`` entry (file name -> content, e.g. the row-text settings) and one file per
    ``extra_files`` entry (file name -> a function writing the path it is given, e.g. a picture),
    in the same swap.
    """
    with atomic_directory(directory, "saved CTR-adapted LLM", CTR_LLM_FILES) as tmp:
        for name, content in (extra_json or {}).items():
            with open(os.path.join(tmp, name), "w", encoding="utf-8") as handle:
                json.dump(content, handle, indent=2)
        for name, write in (extra_files or {}).items():
            write(os.path.join(tmp, name))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(dataclasses.asdict(model.config), handle, indent=2)
        save_file(heads_state(model), os.path.join(tmp, "heads.safetensors"))
        save_file(model.trainable_llm_state(), os.path.join(tmp, "llm_tuned.safetensors"))
        if model.config.tuning == "lora":  # the LoRA part as peft writes it, for peft and transformers users
            save_peft_adapter(model.llm, os.path.join(tmp, PEFT_ADAPTER_DIR))
        base = model.config.model_path
        base_weights = {BASE_WEIGHTS_KEY: model_weights_fingerprint(base)} if os.path.isdir(base) else {}
        base_tokenizer = {BASE_TOKENIZER_KEY: tokenizer_fingerprint(model.tokenizer)}
        with open(os.path.join(tmp, "provenance.json"), "w", encoding="utf-8") as handle:
            json.dump({**model.provenance(), **base_weights, **base_tokenizer}, handle, indent=2)


def ctr_llm_damage(directory: str) -> str:
    """What to say after naming a damaged or incomplete file of the CTR-adapted LLM saved in ``directory``."""
    return f"; {directory} is a damaged or incomplete CTR-adapted LLM: run `recsys-llm semantics adapt` again"


def read_ctr_llm_json(directory: str, name: str) -> Dict[str, Any]:
    """The JSON object in the file ``name`` of a saved CTR-adapted LLM.

    Raises:
        ValueError: the file is not valid JSON, or not a JSON object (named, with what to do).
    """
    path = os.path.join(directory, name)
    content = read_json_file(path, ctr_llm_damage(directory))
    if not isinstance(content, dict):
        raise ValueError(f"{path}: expected a JSON object, got {type(content).__name__}{ctr_llm_damage(directory)}")
    return content


def _read_ctr_llm_tensors(directory: str, name: str) -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``name`` of a saved CTR-adapted LLM.

    Raises:
        FileNotFoundError: the file is missing (named, with what to do).
        ValueError: the file is damaged or truncated (named, with what to do).
    """
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing{ctr_llm_damage(directory)}")
    try:
        return load_file(path)
    except SafetensorError as error:
        raise ValueError(
            f"{path}: not a complete safetensors file ({one_line(error)}){ctr_llm_damage(directory)}"
        ) from error


def read_ctr_llm_config(directory: str) -> CTRLLMConfig:
    """The :class:`CTRLLMConfig` saved in ``directory/config.json``.

    Raises:
        ValueError: the file is not JSON, has unknown or missing keys, or invalid settings.
    """
    config_path = os.path.join(directory, "config.json")
    saved = read_json_file(config_path, ctr_llm_damage(directory))
    if not isinstance(saved, dict):
        raise ValueError(f"{config_path}: expected a JSON object of CTRLLMConfig settings, got {type(saved).__name__}")
    fields = {f.name: f for f in dataclasses.fields(CTRLLMConfig)}
    unknown = sorted(set(saved) - set(fields))
    if unknown:
        raise ValueError(f"{config_path}: unknown keys {unknown}; a CTRLLMConfig has {sorted(fields)}")
    required = [n for n, f in fields.items()
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    missing = [n for n in required if n not in saved]
    if missing:
        raise ValueError(f"{config_path}: missing keys {missing}")
    try:
        return CTRLLMConfig(**saved)
    except ValueError as error:
        raise ValueError(f"{config_path}: {error}") from error


def check_base_model(directory: str, model_path: str) -> None:
    """Refuses a base model other than the one the CTR-adapted LLM in ``directory`` was tuned on.

    The tuned heads and LoRA tensors only mean something on the base model they were tuned with:
    ``provenance.json`` records the fingerprint of its config and weights
    (:func:`~recsys_llm.semantics.model_dir.model_weights_fingerprint`), which must match the
    files at ``model_path`` now. Saves written before it was recorded are not checked.

    Raises:
        ValueError: the fingerprints differ (the base model was replaced, or ``model_path`` names
            another model).
    """
    recorded, base = _recorded_base(directory, BASE_WEIGHTS_KEY)
    if recorded is None:
        return
    current = model_weights_fingerprint(model_path)
    if current != recorded:
        raise ValueError(
            f"{directory}: adapted on base model {base!r} whose config and weights have "
            f"fingerprint {recorded}, but those at {model_path} have {current} (replaced, or another model); give the "
            "model it was adapted on (semantics export --model), or run `semantics adapt` again"
        )


def replaced_base_note(directory: str, model_path: str) -> Optional[str]:
    """A note where ``directory`` holds a CTR-adapted LLM tuned on another base model than ``model_path``'s files
    (a fresh ``semantics adapt`` there replaces it when it ends); None where it holds none, its own base, a save
    that records no base fingerprint, a damaged one, or ``model_path`` is no directory (named when it loads)."""
    if not os.path.isdir(model_path):
        return None
    try:
        recorded, base = _recorded_base(directory, BASE_WEIGHTS_KEY)
    except ValueError:  # a damaged save is replaced as any earlier one
        return None
    if recorded is None:
        return None
    current = model_weights_fingerprint(model_path)
    if current == recorded:
        return None
    return (f"--output-dir {directory} holds a CTR-adapted LLM of another base model ({base!r}, fingerprint "
            f"{recorded}; this adapt's {model_path} has {current}): it is replaced when this adapt ends, and the entity "
            "and row exports made from it can then be neither resumed nor --reuse'd; give another --output-dir to "
            "keep it")


def _recorded_base(directory: str, key: str) -> Tuple[Optional[str], str]:
    """``provenance.json``'s fingerprint ``key`` of the base model in ``directory`` (None: a save written before
    it was recorded) and the base model's name."""
    provenance_path = os.path.join(directory, "provenance.json")
    if not os.path.isfile(provenance_path):
        return None, "?"
    provenance = read_json_file(provenance_path, ctr_llm_damage(directory))
    if not isinstance(provenance, dict) or not isinstance(provenance.get(key), str):
        return None, "?"
    return provenance[key], str(provenance.get("model", "?"))


def check_base_code(directory: str, model: CTRAdaptedLLM) -> None:
    """Refuses a base model computed by other code than the CTR-adapted LLM in ``directory`` was tuned on: the
    model directory's own code (``trust_remote_code``) and transformers' class for its model type give other
    hidden states from the same files, so the tuned tensors would meet another model. ``provenance.json``
    records ``own_code`` when the own code ran (saves without ``provenance.json`` are not checked).

    Raises:
        ValueError: naming the code it was tuned on and how to load that one.
    """
    provenance_path = os.path.join(directory, "provenance.json")
    if not os.path.isfile(provenance_path):
        return
    provenance = read_json_file(provenance_path, ctr_llm_damage(directory))
    tuned_with_own_code = isinstance(provenance, dict) and provenance.get("own_code") == "true"
    if runs_own_code(model.llm) != tuned_with_own_code:
        raise ValueError(
            f"{directory}: adapted on "
            + ("the base model directory's own code (--trust-remote-code), and transformers' own class is loaded "
               "now: pass --trust-remote-code (trust_remote_code=True) to run the model it was adapted on"
               if tuned_with_own_code else
               "transformers' own class for the base model, and the directory's own code is loaded now "
               "(--trust-remote-code): leave it out to run the model it was adapted on")
        )


def check_base_tokenizer(directory: str, model: CTRAdaptedLLM) -> None:
    """Refuses a tokenizer of the base model other than the one the CTR-adapted LLM in ``directory`` was
    tuned with: its heads and LoRA tensors were tuned on that tokenizer's ids, and the same weights
    given other tokens (a cased vocabulary, other special tokens saved over it) make other vectors.
    ``provenance.json`` records :func:`~recsys_llm.semantics.model_dir.tokenizer_fingerprint`; saves
    written before it was recorded are not checked.

    Raises:
        ValueError: the fingerprints differ, naming both and the base model directory.
    """
    recorded, base = _recorded_base(directory, BASE_TOKENIZER_KEY)
    if recorded is None:
        return
    current = tokenizer_fingerprint(model.tokenizer)
    if current != recorded:
        raise ValueError(
            f"{directory}: adapted on base model {base!r} whose tokenizer has fingerprint "
            f"{recorded}, but the one at {model.config.model_path} has {current} (another vocabulary, casing or "
            "special tokens: the same texts give other tokens); point model_path in config.json at the model it was "
            "adapted on, or run `semantics adapt` again"
        )


def load_ctr_llm(directory: str, model_path: Optional[str] = None, trust_remote_code: bool = False,
                 device: Optional[torch.device] = None) -> CTRAdaptedLLM:
    """Rebuilds a saved CTR-adapted LLM (weights only; nothing executed unless ``trust_remote_code``).

    Args:
        directory (str): written by :func:`save_ctr_llm`.
        model_path (Optional[str]): override of the base model location (e.g. another machine);
            its files must be those the LLM was adapted on (same fingerprint).
        trust_remote_code (bool): run the base model directory's own code if its config asks
            for it (off: such a model is refused).
        device (Optional[torch.device]): where the model loads (the base model's weights straight
            from their files, no copy in host memory first); None: the CPU.

    Raises:
        FileNotFoundError: ``directory`` is not a saved CTR-adapted LLM, ``llm_tuned.safetensors`` is
            missing, or the base model is gone.
        ValueError: a damaged (truncated, not JSON / safetensors, tensors that do not fit) file of
            ``directory``, named with what to do, or a base model (its files, its code or its tokenizer)
            other than the one it was adapted on.
    """
    if not all(os.path.isfile(os.path.join(directory, name)) for name in CTR_LLM_FILES):
        raise FileNotFoundError(
            f"{directory}: not a CTR-adapted LLM saved by `recsys-llm semantics adapt` (no config.json and "
            "heads.safetensors); a plain Hugging Face model directory goes to `semantics adapt --model` first"
        )
    config = read_ctr_llm_config(directory)
    if model_path is not None:
        config.model_path = model_path
    elif not os.path.isdir(config.model_path):
        raise FileNotFoundError(
            f"{directory}: the base model it was adapted on, {config.model_path} (config.json model_path), is not "
            "there; if it moved (or the adapted LLM was copied to another machine), give its directory now "
            "(semantics export --model; model_path= in Python): its files are checked against the adapted LLM's"
        )
    check_base_model(directory, config.model_path)
    # both files are read before the base model loads: a damaged one is named at once
    tuned = _read_ctr_llm_tensors(directory, "llm_tuned.safetensors")
    heads = _read_ctr_llm_tensors(directory, "heads.safetensors")
    model = CTRAdaptedLLM.from_config(config, trust_remote_code=trust_remote_code, device=device)
    check_base_code(directory, model)
    check_base_tokenizer(directory, model)
    named = dict(model.llm.named_parameters())
    unknown = sorted(set(tuned) - set(named))
    if unknown:
        raise ValueError(f"{directory}: tuned tensors {unknown[:5]} do not exist in {config.model_path}")
    tuned_path = os.path.join(directory, "llm_tuned.safetensors")
    missing = sorted({n for n, p in named.items() if p.requires_grad} - set(tuned))
    if missing:
        raise ValueError(f"{tuned_path}: no tensors {missing[:5]} of the tuned LLM{ctr_llm_damage(directory)}")
    with torch.no_grad():
        for name, tensor in tuned.items():
            if tensor.shape != named[name].shape:
                raise ValueError(
                    f"{tuned_path}: tensor {name!r} has shape {tuple(tensor.shape)}, the model's "
                    f"{tuple(named[name].shape)}{ctr_llm_damage(directory)}"
                )
            named[name].copy_(tensor)
    try:
        model.transform.load_state_dict(
            {k[len("transform.") :]: v for k, v in heads.items() if k.startswith("transform.")})
        model.predict.load_state_dict({k[len("predict.") :]: v for k, v in heads.items() if k.startswith("predict.")})
    except RuntimeError as error:  # missing, unexpected or misshapen head tensors
        raise ValueError(
            f"{os.path.join(directory, 'heads.safetensors')}: does not fit the heads of config.json "
            f"({one_line(error)[:300]}){ctr_llm_damage(directory)}"
        ) from error
    model.eval()
    return model
