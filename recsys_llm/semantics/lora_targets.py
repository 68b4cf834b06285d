"""Where LoRA goes: by default the attention query / value projections, by each model family's naming.

Example::

    LoraConfig(r=8, target_modules=default_target_modules(model))
    tuned = with_lora(model, "/models/qwen", r=8, alpha=16, dropout=0.05)  # SSFT and the CTR-adapted LLM
"""

import re
from typing import List, Optional, Sequence, Union

from torch import nn


# The attention query/value projections (or the fused projection) by naming family, in the order tried.
QUERY_VALUE_NAMES = (
    ("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",),
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_proj", "value_proj"),  # DeBERTa-v2
    ("qkv_proj",),  # Phi-3
    ("q", "v"),  # T5 family, MPNet
)


def _is_linear(module: nn.Module) -> bool:
    """Whether LoRA can go on ``module``: an ``nn.Linear``, or transformers' ``Conv1D`` (GPT-2's ``c_attn``,
    ``c_proj``, ``c_fc``: a linear layer with its weight transposed, which peft takes too)."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D))


def language_model_name(model: nn.Module) -> Optional[str]:
    """Qualified name of a multimodal model's language model (Gemma-3, LLaVA: ``language_model``; Idefics3,
    SmolVLM: ``text_model``), else None."""
    config = getattr(model, "config", None)
    multimodal = hasattr(config, "get_text_config") and config.get_text_config() is not config
    language = next((getattr(model, name) for name in ("language_model", "text_model")
                     if isinstance(getattr(model, name, None), nn.Module)), None)
    if not multimodal or language is None:
        return None
    return next((name for name, module in model.named_modules() if module is language and name), None)


def _peft_target_modules(model: nn.Module, names: set) -> Optional[List[str]]:
    """peft's own LoRA targets for the model type (as ``LoraConfig(target_modules=None)`` picks), when present."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING

    model_type = getattr(getattr(model, "config", None), "model_type", "")
    targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
    return list(targets) if targets and all(t in names for t in targets) else None


def default_target_modules(model: nn.Module) -> Union[List[str], str]:
    """LoRA targets: the attention query/value projections, by the model's naming (:data:`QUERY_VALUE_NAMES`,
    then peft's table for the model type); of a multimodal model, those of its language model only.

    Returns:
        Union[List[str], str]: module names, or for a multimodal model a regular expression peft matches
        against the qualified module names (``language_model\\..*\\.(q_proj|v_proj)``).

    Raises:
        ValueError: none found; names ``--target-modules`` and the model's Linear module names.
    """
    language = language_model_name(model)
    scope = model.get_submodule(language) if language else model
    names = {name.rsplit(".", 1)[-1] for name, _ in scope.named_modules()}
    found = next((list(c) for c in QUERY_VALUE_NAMES if all(n in names for n in c)), None)
    targets = found or _peft_target_modules(model, names)
    if targets is None:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in scope.named_modules() if _is_linear(m)})
        raise ValueError(
            f"cannot find the attention query/value projections of {type(model).__name__} to put LoRA on; name "
            f"them with --target-modules (lora_target_modules); its Linear modules are {linear}"
        )
    if language:
        return rf"{re.escape(language)}\..*\.({'|'.join(re.escape(t) for t in targets)})"
    return targets


def with_lora(
    model: nn.Module, model_path: str, r: int, alpha: int, dropout: float, targets: Optional[Sequence[str]] = None
) -> nn.Module:
    """``peft.get_peft_model`` with LoRA (rank ``r``, ``alpha``, ``dropout``) on ``targets``.

    Args:
        model (nn.Module): the base model (peft freezes its parameters: only the LoRA weights train).
        model_path (str): where it was loaded from, for the messages.
        targets (Optional[Sequence[str]]): module names; None: :func:`default_target_modules`.

    Raises:
        ValueError: no default target found, or ``targets`` name no module of the model; both name
            ``--target-modules`` and the model's Linear modules.
    """
    from peft import LoraConfig, get_peft_model

    if targets is None:
        try:
            targets = default_target_modules(model)
        except ValueError as error:
            raise ValueError(f"{model_path}: {error}") from error
    lora = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    try:
        return get_peft_model(model, lora)
    except ValueError as error:  # peft: "Target modules [...] not found in the base model", or none given
        if not re.search(r"target[ _]modules", str(error), re.IGNORECASE):
            raise
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if _is_linear(module)})
        raise ValueError(
            f"{model_path}: --target-modules {targets} (lora_target_modules) name no module of "
            f"{type(model).__name__} to put LoRA on; its Linear modules are {linear}"
        ) from error
