"""From a model's last-layer token states to one vector per text: which pooling a model gets, and the pooling.

Decoder LLMs (Llama, Qwen, Mistral, GPT-2, ...) are pooled at the last real token; encoders (BERT, MiniLM,
RoBERTa, the encoder of T5, ...) mean-pool over the attention mask; a sentence-transformers directory
declares its own (BGE: the CLS token). :func:`hidden_states` and :func:`pool` also serve training (SSFT, the
CTR-adapted LLM), with gradients.

Example::

    hidden = hidden_states(model, input_ids, attention_mask)  # (B, L, H)
    vectors = pool(hidden, attention_mask, resolve_pooling("auto", model.config))  # (B, H)
"""

import contextlib
import os
import re
import warnings
from typing import Any, Iterator, Optional

import torch
from torch import nn

from recsys_llm.semantics.model_dir import read_json_file, sentence_transformers_modules


POOLINGS = ("auto", "mean", "last_token", "cls")


# Model types whose base model is a causal (decoder-only) LM: pooled at the last token.
CAUSAL_MODEL_TYPES = frozenset(
    {
        "llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "gemma", "gemma2",
        "gemma3", "gemma3_text", "phi", "phi3", "gpt2", "gpt_neo", "gpt_neox", "gptj", "opt", "bloom",
        "falcon", "mpt", "olmo", "olmo2", "starcoder2", "stablelm", "cohere", "granite", "smollm3",
        "deepseek_v2", "deepseek_v3", "internlm2", "baichuan", "chatglm", "codegen",
    }
)


# Model types that are bidirectional encoders (mean pooling), even without a mask token; with the encoder
# stacks of T5Gemma and T5Gemma 2, whose own configs are not marked encoder-decoder (T5Gemma's decoder stack,
# of the same type, is marked is_decoder)
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
     "mpnet", "camembert", "ernie", "modernbert", "nomic_bert", "e5", "xlm", "t5", "t5_gemma_module",
     "t5gemma2_encoder"}
)


def resolve_pooling(pooling: str, config: Any, tokenizer: Any = None) -> str:
    """Chooses the pooling for ``pooling="auto"`` from a model config.

    Decoders (``config.is_decoder``, an ``*ForCausalLM`` architecture, a known causal
    model type, or an unknown type whose tokenizer has no mask token) -> ``last_token``;
    encoders (a known encoder model type, the encoder of an encoder-decoder model such as
    mT5 or UMT5, an ``*EncoderModel`` architecture, a model of a causal type configured with
    ``use_bidirectional_attention`` such as EmbeddingGemma) and everything else -> ``mean``.

    Args:
        pooling (str): one of ``auto``, ``mean``, ``last_token``, ``cls``.
        config (transformers.PretrainedConfig): the model's config.
        tokenizer (Optional[PreTrainedTokenizerBase]): used only as the last hint.

    Returns:
        str: ``mean``, ``last_token`` or ``cls``.
    """
    if pooling not in POOLINGS:
        raise ValueError(f"pooling must be one of {POOLINGS}, got {pooling!r}")
    if pooling != "auto":
        return pooling
    model_type = getattr(config, "model_type", "") or ""
    architectures = getattr(config, "architectures", None) or []
    if getattr(config, "is_decoder", False) or any(a.endswith("ForCausalLM") for a in architectures):
        return "last_token"
    if getattr(config, "use_bidirectional_attention", False) is True:  # e.g. EmbeddingGemma: a gemma3_text encoder
        return "mean"
    if model_type in CAUSAL_MODEL_TYPES:
        return "last_token"
    if model_type in ENCODER_MODEL_TYPES or getattr(config, "is_encoder_decoder", False):
        return "mean"
    if any(a.endswith("EncoderModel") for a in architectures):  # e.g. T5EncoderModel: is_encoder_decoder is false
        return "mean"
    if tokenizer is not None and getattr(tokenizer, "mask_token", None) is None:
        return "last_token"
    return "mean"


# sentence-transformers pooling mode (as newer versions name it in "pooling_mode") -> the pooling computed
# here (max, weighted mean... are not)
SENTENCE_TRANSFORMERS_POOLINGS = {"cls": "cls", "mean": "mean", "lasttoken": "last_token"}


# the boolean key of each mode in the older config format
SENTENCE_TRANSFORMERS_MODE_KEYS = {
    "pooling_mode_cls_token": "cls", "pooling_mode_mean_tokens": "mean", "pooling_mode_lasttoken": "lasttoken",
}


def _pooling_config_path(model_path: str) -> Optional[str]:
    """The ``config.json`` of the Pooling module a sentence-transformers ``modules.json`` lists, when both exist."""
    pooling = sentence_transformers_modules(model_path, "Pooling")[:1]
    path = os.path.join(model_path, pooling[0], "config.json") if pooling else None
    return path if path is not None and os.path.isfile(path) else None


def sentence_transformers_pooling(model_path: str) -> Optional[str]:
    """The pooling a sentence-transformers directory declares in its Pooling module's config
    (e.g. ``1_Pooling/config.json``; BGE: ``cls``, all-MiniLM-L6-v2: ``mean``).

    Returns:
        Optional[str]: ``cls``, ``mean`` or ``last_token``; None without ``modules.json`` or a Pooling
        module, or for a mode not computed here (max, mean_sqrt_len, weighted mean, or several modes).
    """
    path = _pooling_config_path(model_path)
    config = read_json_file(path, "; the model directory is damaged") if path else None
    if not isinstance(config, dict):
        return None
    mode = config.get("pooling_mode")  # newer sentence-transformers write the mode's name
    if isinstance(mode, list) and len(mode) == 1:
        mode = mode[0]
    if not isinstance(mode, str):
        modes = [key for key, value in config.items() if key.startswith("pooling_mode") and value is True]
        mode = SENTENCE_TRANSFORMERS_MODE_KEYS.get(modes[0]) if len(modes) == 1 else None
    return SENTENCE_TRANSFORMERS_POOLINGS.get(mode) if mode is not None else None


def warn_of_modules_not_applied(model_path: str) -> None:
    """Warns, naming ``modules.json``, when a sentence-transformers directory lists a ``Dense`` module (sentence-t5,
    LaBSE, distiluse): the vectors are the pooled hidden states before it, not what the model's ``encode`` gives."""
    dense = sentence_transformers_modules(model_path, "Dense")
    if dense:
        warnings.warn(
            f"{os.path.join(model_path, 'modules.json')}: lists Dense module(s) {dense}, which are not applied: the vectors are the model's "
            "pooled hidden states (its hidden size), not the projected ones sentence-transformers' encode gives",
            stacklevel=3,
        )


def warn_of_longer_max_length(model_path: str, max_length: int) -> None:
    """Warns, naming ``sentence_bert_config.json``, when a sentence-transformers directory declares a
    ``max_seq_length`` below ``max_length`` (``--max-length``): its own ``encode`` cuts texts at the declared
    length (the length the model was tuned for), and here they are read up to ``max_length`` tokens, so the
    vectors of longer texts differ from its own."""
    path = os.path.join(model_path, "sentence_bert_config.json")
    if not os.path.isfile(path):
        return
    config = read_json_file(path, "; the model directory is damaged")
    declared = config.get("max_seq_length") if isinstance(config, dict) else None
    if isinstance(declared, int) and not isinstance(declared, bool) and 0 < declared < max_length:
        warnings.warn(
            f"{path}: declares max_seq_length {declared}, below --max-length {max_length}: texts are read up to "
            f"{max_length} tokens, past the length the model was tuned for (sentence-transformers' encode cuts them "
            f"at {declared}); pass --max-length {declared} (max_length={declared}) for its own vectors",
            stacklevel=3,
        )


def directory_pooling(pooling: str, model_path: str) -> str:
    """``pooling``; for ``auto``, the pooling a sentence-transformers directory declares, when it declares one
    computed here (:func:`sentence_transformers_pooling`), else ``auto`` (left to :func:`resolve_pooling`).
    Warns when the directory lists modules after pooling that are not applied (:func:`warn_of_modules_not_applied`)."""
    warn_of_modules_not_applied(model_path)
    if pooling != "auto":
        return pooling
    declared = sentence_transformers_pooling(model_path)
    config_path = _pooling_config_path(model_path) if declared is None else None
    if config_path is not None:
        warnings.warn(
            f"{config_path}: the pooling it declares (max, mean_sqrt_len, weighted mean, or several modes) is not "
            "computed here: the model's default pooling is used (mean for an encoder, the last token for a decoder), "
            "so the vectors differ from the model's own encode; pass --pooling mean|last_token|cls to choose",
            stacklevel=2,
        )
    return declared or pooling


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """Pools token states into one vector per text; works with left or right padding.

    Args:
        hidden (torch.Tensor): (B, L, H) last-layer hidden states.
        attention_mask (torch.Tensor): (B, L) 1 for real tokens, 0 for padding.
        pooling (str): ``mean``, ``last_token`` or ``cls`` (first real token).

    Returns:
        torch.Tensor: (B, H), in ``hidden``'s dtype (a mean is divided in float32: a bfloat16 sum
        of hundreds of token states would be rounded before the division).
    """
    if pooling == "mean":
        mask = attention_mask.to(hidden.dtype)  # (B, L), 0 / 1: the masked states are exact
        summed = (hidden * mask.unsqueeze(-1)).sum(dim=1, dtype=torch.float32)  # (B, H)
        return (summed / mask.sum(dim=1, keepdim=True, dtype=torch.float32).clamp_min(1.0)).to(hidden.dtype)
    length = attention_mask.size(1)
    rows = torch.arange(hidden.size(0), device=hidden.device)
    if pooling == "last_token":
        # index of the last real token: L - 1 - (first 1 from the right)
        last = length - 1 - torch.argmax(attention_mask.flip(dims=[1]).int(), dim=1)  # (B,)
        return hidden[rows, last]  # (B, H)
    if pooling == "cls":
        first = torch.argmax(attention_mask.int(), dim=1)  # (B,)
        return hidden[rows, first]  # (B, H)
    raise ValueError(f"pooling must be 'mean', 'last_token' or 'cls' here, got {pooling!r}")


def _is_base_model(model: nn.Module) -> bool:
    """Whether the model (under a peft wrapper) returns ``last_hidden_state``: not one with a head, which
    transformers names ``*For<Task>`` (ForCausalLM, ForMaskedLM, ForSequenceClassification, ...) or ``*LMHeadModel``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    name = type(base).__name__
    return not re.search(r"[a-z0-9]For[A-Z]", name) and not name.endswith("LMHeadModel")  # not RoFormerModel


@contextlib.contextmanager
def _no_kv_cache(model: nn.Module) -> Iterator[None]:
    """The model's config (and its text config) with ``use_cache`` off within, put back after: a decoder's forward
    otherwise keeps every layer's keys and values in a ``DynamicCache`` until it returns (Llama, GPT-2, Mistral,
    Qwen: ``use_cache`` is true in their configs), memory that pooling never reads (2 x layers x B x L x the
    key/value width: GBs for a 7B model's batch of 64 texts of 256 tokens). Set on the config rather than passed to
    the forward, which not every model's forward takes."""
    config = getattr(model, "config", None)
    configs = [config] if config is not None else []
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else None
    if text_config is not None and text_config is not config:
        configs.append(text_config)
    switched = [c for c in configs if getattr(c, "use_cache", None) is True]
    for c in switched:
        c.use_cache = False
    try:
        yield
    finally:
        for c in switched:
            c.use_cache = True


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of a base model, a model with a head (``*ForCausalLM``, ``*ForSequenceClassification``,
    ...) or a peft wrapper of either; no key/value cache is kept (:func:`_no_kv_cache`).

    Returns:
        torch.Tensor: (B, L, H).
    """
    with _no_kv_cache(model):
        return _last_hidden_states(model, input_ids, attention_mask)


def _last_hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    if _is_base_model(model):
        out = model(input_ids=input_ids, attention_mask=attention_mask)
        hidden = getattr(out, "last_hidden_state", None)
        if hidden is not None:
            return hidden
        # a class of the directory's own code (--trust-remote-code) named like a base model but with a head
    out = model(input_ids=input_ids, attention_mask=attention_mask, output_hidden_states=True)
    return out.hidden_states[-1]


def hidden_width(model: nn.Module) -> int:
    """Width H of the hidden states :func:`hidden_states` returns: the ``hidden_size`` of the model's text
    config (a multimodal config such as Gemma-3's keeps it under ``text_config``), or OPT's
    ``word_embed_proj_dim``, to which OPT projects its last hidden states (opt-350m: 512, hidden_size 1024); of
    an encoder-decoder config with an ``encoder`` sub-config (T5Gemma), the encoder's."""
    encoder = getattr(model.config, "encoder", None)  # T5Gemma: get_text_config() would give its decoder's
    config = encoder if hasattr(encoder, "hidden_size") else model.config.get_text_config()
    projected = getattr(config, "word_embed_proj_dim", None)
    return int(projected or config.hidden_size)
