"""Loading a Hugging Face model and its tokenizer offline from a local directory, with the checks that make
a wrong directory one clear error (no tokenizer files, another model's tokenizer, a text-image dual encoder),
and the device, dtype and text length they run with.

Example::

    device = resolve_device(None)  # CUDA when available (this rank's GPU under torchrun), else CPU
    tokenizer = load_tokenizer(path)
    model = load_model(path, device, resolve_dtype("auto", device))  # base model; an encoder-decoder's encoder
"""

import contextlib
import importlib.util
import json
import os
import pickle
import warnings
from typing import Any, Iterator, Optional, Sequence

import torch
from torch import nn

from recsys_llm.error_text import one_line, telling_line
from recsys_llm.progress import LINES_ENV, env_flag
from recsys_llm.semantics.model_dir import (
    config_vocab_size,
    read_model_config,
    requested_attention,
    require_native_model,
    require_no_hub_kernel,
    require_weight_files,
)
from recsys_llm.semantics.precision import SHORT_DTYPE_NAMES, long_dtype_name
from recsys_llm.train.distributed import select_device, started_by_torchrun_on_each_rank


def computes_in_bf16(device: torch.device) -> bool:
    """Whether the CUDA ``device`` computes in bfloat16 natively: compute capability 8.0 (Ampere) or newer, or a
    ROCm GPU. ``torch.cuda.is_bf16_supported()`` also says yes for older GPUs that only emulate it (V100, T4:
    many times slower than float32), and asks about the current device rather than ``device``."""
    if torch.version.hip:
        return True
    return torch.cuda.get_device_properties(device).major >= 8


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bf16 on a CUDA device that computes in it (:func:`computes_in_bf16`), else fp32; or a named dtype
    (``float32``, ``bfloat16``, ``float16``, or their short names)."""
    if dtype == "auto":
        if device.type == "cuda" and computes_in_bf16(device):
            return torch.bfloat16
        return torch.float32
    names = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if long_dtype_name(dtype) not in names:
        raise ValueError(f"dtype must be 'auto' or one of {sorted([*names, *SHORT_DTYPE_NAMES])}, got {dtype!r}")
    return names[long_dtype_name(dtype)]


def _one_gpu_for_every_rank(index: int) -> bool:
    """Whether torchrun started this command on each of several ranks of this host and the GPU ``index``
    asked for on the command line is not this rank's (``LOCAL_RANK``): every rank would take it. A program
    that set up its ranks' group chooses each rank's device itself."""
    try:
        ranks_here, local_rank = int(os.environ.get("LOCAL_WORLD_SIZE", "1")), int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError:  # the process group's set-up names a malformed launch variable
        return False
    return ranks_here > 1 and index != local_rank and started_by_torchrun_on_each_rank()


def resolve_device(device: Optional[str], setting: str = "--device") -> torch.device:
    """``device`` as given (None: CUDA when available, else CPU). A bare ``cuda`` is this
    process's GPU, chosen as the trainer chooses it (``train.distributed.select_device``):
    ``cuda:{LOCAL_RANK}`` under ``torchrun`` (so ranks do not share GPU 0), or ``cuda:0`` when
    the process sees a single GPU.

    Raises:
        ValueError: naming ``setting``: ``device`` is no device name torch knows, a GPU
            (``cuda``, ``cuda:N``) this process does not see, or one GPU (``cuda:N``) for several
            ranks of a host.
    """
    if not device:
        resolved = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            resolved = torch.device(device)
        except (RuntimeError, ValueError, TypeError):
            raise ValueError(f"{setting} {device!r}: not a device name torch knows; expected e.g. cpu, cuda or "
                             "cuda:0") from None
    if resolved.type != "cuda":
        return resolved
    if resolved.index is not None and _one_gpu_for_every_rank(resolved.index):
        raise ValueError(f"{setting} {device!r} names one GPU for all {os.environ['LOCAL_WORLD_SIZE']} ranks torchrun "
                         "started on this host: pass cuda, which gives each rank its own (cuda:LOCAL_RANK)")
    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if resolved.index is None and visible:
        try:  # the trainer's choice of GPU
            return select_device(int(os.environ.get("LOCAL_RANK", "0")), "cuda")
        except ValueError as error:
            raise ValueError(f"{setting} {device!r}: {error}" if device else str(error)) from None
    if (resolved.index or 0) >= visible:
        build = f"a CUDA {torch.version.cuda} build" if torch.version.cuda else "a CPU-only build"
        raise ValueError(f"{setting} {device!r}: this process sees {visible} GPU(s) (torch {torch.__version__}, "
                         f"{build}); pass a GPU it sees, or cpu")
    return resolved


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


def check_max_length(tokenizer: Any, max_length: int, model_id: str) -> None:
    """Refuses a ``max_length`` (``--max-length``) that leaves no token of text beside the special tokens
    ``tokenizer`` adds to every text: below their number transformers does not cut texts at all, and at
    it every text is the same special tokens (the same vector).

    Raises:
        ValueError: naming ``model_id``, ``--max-length`` and the minimum (special tokens + 1).
    """
    special = tokenizer.num_special_tokens_to_add(pair=False)
    if max_length <= special:
        raise ValueError(
            f"{model_id}: --max-length {max_length} leaves no token of text: the tokenizer adds {special} special "
            f"tokens to every text; expected --max-length >= {special + 1}"
        )


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


def require_attention_mask(tokenizer: Any, where: str) -> None:
    """Refuses a tokenizer that returns no ``attention_mask`` (FNet's): batches are padded, and the model and
    the pooling read the mask to leave the padding out.

    Raises:
        ValueError: ``attention_mask`` is not among the tokenizer's ``model_input_names``, naming ``where``.
    """
    names = list(getattr(tokenizer, "model_input_names", None) or [])
    if "attention_mask" not in names:
        raise ValueError(f"{where}: the tokenizer returns no attention_mask (its model_input_names are {names}); "
                         "expected a model whose tokenizer masks the padding (batches are padded, and the model and "
                         "the pooling leave the padding out by the mask)")


@contextlib.contextmanager
def _no_remote_code_question(trust_remote_code: bool) -> Iterator[None]:
    """Unless ``trust_remote_code``, transformers refuses a model directory's code instead of asking on stdin
    whether to run it: a load nested in another (a RagTokenizer's own tokenizers) gets no ``trust_remote_code``,
    and transformers then asks ``Do you wish to run the custom code? [y/N]`` (15 s) and runs it on a "y" (a pipe,
    a wrapper answering prompts). Here only ``--trust-remote-code`` allows such code."""
    if trust_remote_code:
        yield
        return
    from transformers import dynamic_module_utils

    timeout = dynamic_module_utils.TIME_OUT_REMOTE_CODE
    dynamic_module_utils.TIME_OUT_REMOTE_CODE = 0  # no question: the refusal transformers gives when unattended
    try:
        yield
    finally:
        dynamic_module_utils.TIME_OUT_REMOTE_CODE = timeout


def check_trust_remote_code(trust_remote_code: Any) -> None:
    """Raises TypeError for a ``trust_remote_code`` that is no bool: ``"false"``, a device or a path given by
    position would count as True and run the model directory's own code."""
    if not isinstance(trust_remote_code, bool):
        raise TypeError(f"trust_remote_code must be True or False, got {trust_remote_code!r} (True runs the model "
                        "directory's own code)")


def load_tokenizer(model_path: str, trust_remote_code: bool = False) -> Any:
    """Loads a tokenizer offline and gives it a pad token if it has none (decoder LLMs); a text
    longer than ``max_length`` is cut at its end whatever the tokenizer's config says (some save
    ``truncation_side: left``), as the docs and the cut-off warnings say.

    The directory must be a model directory (``config.json``) with tokenizer files
    (:data:`TOKENIZER_FILES`), and the tokenizer must cover at least half of the config's
    ``vocab_size`` and no more than all of it: without its vocabulary files transformers builds
    an empty tokenizer that maps every word to ``[UNK]`` (byte-level tokenizers such as ByT5's
    need no file and pass), and a larger one is another model's.

    Raises:
        FileNotFoundError: no directory, no ``config.json``, or no tokenizer file.
        ValueError: a damaged ``config.json``, a tokenizer that does not load, one far
            smaller or larger than the model's vocabulary, or one that returns no attention mask.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerBase

    check_trust_remote_code(trust_remote_code)
    config = read_model_config(model_path)
    require_native_model(model_path, config, trust_remote_code)
    _require_tokenizer_files(model_path, config)
    if not trust_remote_code:
        _warn_of_own_tokenizer_code(model_path)
    try:
        with _no_remote_code_question(trust_remote_code):
            tokenizer = AutoTokenizer.from_pretrained(
                model_path, local_files_only=True, trust_remote_code=trust_remote_code
            )
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:  # a damaged tokenizer.json: KeyError
        raise ValueError(f"{model_path}: cannot load the tokenizer ({type(error).__name__}: {one_line(error)}); its "
                         "tokenizer files are damaged or not a tokenizer's") from error
    if not isinstance(tokenizer, PreTrainedTokenizerBase):  # a composite model's (RagTokenizer): no len, no batches
        raise ValueError(f"{model_path}: its tokenizer is a {type(tokenizer).__name__}, not a text tokenizer "
                         "(transformers' PreTrainedTokenizerBase); give the directory of one text model")
    vocab_size = config_vocab_size(config)
    if vocab_size is not None and len(tokenizer) < MIN_TOKENIZER_VOCAB_SHARE * vocab_size:
        raise ValueError(
            f"{model_path}: tokenizer has {len(tokenizer)} tokens but config.json has vocab_size {vocab_size}; "
            "its tokenizer files are missing or belong to another model"
        )
    tokenizer_fits(tokenizer, vocab_size, model_path, "config.json has vocab_size {rows}")
    require_attention_mask(tokenizer, model_path)
    if tokenizer.pad_token is None:
        fallback = tokenizer.eos_token or tokenizer.unk_token
        if fallback is None:
            raise ValueError(f"{model_path}: tokenizer has no pad, eos or unk token to pad batches with")
        tokenizer.pad_token = fallback
    tokenizer.truncation_side = "right"
    return tokenizer


def enable_gradient_checkpointing(model: nn.Module, model_path: str) -> None:
    """Transformers' activation (gradient) checkpointing on ``model`` (a peft wrapper: its base model): in
    training, each layer keeps its input only and is run again in the backward, non-reentrant (the LoRA weights
    inside get their gradients; dropout masks are replayed: the same gradients as without).

    Raises:
        ValueError: the model class does not support it (named with ``model_path``).
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise ValueError(f"{model_path}: --gradient-checkpointing: {type(base).__name__} does not support "
                         "activation checkpointing; leave the option out")
    enable = getattr(base, "activation_checkpointing_enable", None)  # transformers 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


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


def require_text_forward(model_path: str, model: nn.Module) -> None:
    """Refuses a text-image dual encoder (CLIP, SigLIP, ALIGN: a ``text_model``, a ``vision_model`` and
    ``get_text_features``): its forward needs images. Vision-language models whose forward reads text
    alone (Idefics3, SmolVLM) have the two towers but no ``get_text_features``."""
    towers = (getattr(model, "text_model", None), getattr(model, "vision_model", None))
    if all(isinstance(tower, nn.Module) for tower in towers) and hasattr(model, "get_text_features"):
        raise ValueError(
            f"{model_path}: {type(model).__name__} is a text-image dual encoder whose forward needs images; "
            "pass a text model directory"
        )


def _require_loaded_weights(model_path: str, model: nn.Module, used: nn.Module, missing_keys: Sequence[str]) -> None:
    """Refuses weight files that lack tensors of ``used`` (the part of ``model`` whose last hidden states are
    pooled): transformers fills them with random values and only logs it, so the vectors would mean nothing.
    Tensors outside ``used`` (the decoder of a T5 read by its encoder) or under a ``pooler`` (BERT's, which the
    last hidden states do not pass through, and which checkpoints of BertForMaskedLM lack) may be missing."""
    used_tensors = {id(tensor) for tensor in used.state_dict(keep_vars=True).values()}
    lacking = []
    for key in missing_keys:
        if "pooler" in key.split("."):
            continue
        try:
            tensor = model.get_parameter(key)
        except AttributeError:
            try:
                tensor = model.get_buffer(key)
            except AttributeError:
                tensor = None
        if tensor is None or id(tensor) in used_tensors:
            lacking.append(key)
    if lacking:
        raise ValueError(
            f"{model_path}: its weight files lack {len(lacking)} of {type(model).__name__}'s tensors (e.g. "
            f"{sorted(lacking)[:3]}), which transformers would fill with random values; expected the weights of "
            "this config.json's model: the files are incomplete or belong to another model"
        )


#: appended to a model's fingerprint when the model directory's own code computes it (see :func:`runs_own_code`)
OWN_CODE_MARK = "+own-code"
#: appended when the directory's own tokenizer code (tokenizer_config.json's auto_map) tokenizes the texts
OWN_TOKENIZER_CODE_MARK = "+own-tokenizer-code"


def _is_own_code(obj: Any) -> bool:
    """Whether ``obj``'s class comes from a model directory's code (transformers loads it into ``transformers_modules``)."""
    return type(obj).__module__.startswith("transformers_modules")


def runs_own_code(model: nn.Module) -> bool:
    """Whether the model (or a module in it, under a peft wrapper too) is the model directory's own code, loaded
    with ``trust_remote_code`` from its ``auto_map``, rather than transformers' class for its model type: for a
    model type transformers knows, the same files give other vectors either way, so caches, provenance and
    resumes tell the two apart (:data:`OWN_CODE_MARK`)."""
    return any(_is_own_code(module) for module in model.modules())


def code_mark(model: nn.Module, tokenizer: Any = None) -> str:
    """:data:`OWN_CODE_MARK` for a model the directory's own code computes (:func:`runs_own_code`), and
    :data:`OWN_TOKENIZER_CODE_MARK` for a ``tokenizer`` of its own code: the same files tokenized or computed
    otherwise give other vectors, which a cache keyed by the files alone would mix up."""
    return ((OWN_CODE_MARK if runs_own_code(model) else "")
            + (OWN_TOKENIZER_CODE_MARK if tokenizer is not None and _is_own_code(tokenizer) else ""))


def _warn_of_own_tokenizer_code(model_path: str) -> None:
    """Warns, as :func:`~recsys_llm.semantics.model_dir.require_native_model` does of a model's, when
    ``tokenizer_config.json`` brings the directory's own tokenizer code (``auto_map``) that is not run."""
    path = os.path.join(model_path, "tokenizer_config.json")
    try:
        with open(path, encoding="utf-8") as handle:
            auto_map = json.load(handle).get("auto_map")
    except (OSError, ValueError, AttributeError):  # no such file, or none transformers reads either
        return
    if auto_map:
        warnings.warn(
            f"{path}: the directory's own tokenizer code (auto_map: {auto_map}) is not run: a tokenizer transformers "
            "builds from the files is loaded, and may tokenize otherwise; pass --trust-remote-code (semantics tune, "
            "encode, adapt, export), or trust_remote_code=True in Python, to run that code if you trust it"
        )


def _flash_attention_installed(version: int) -> bool:
    """Whether transformers finds the package of flash attention ``version`` (``flash-attn`` for 2), as it checks
    before fetching a kernel from the Hub in its place; a transformers without that table (4.56) fetches none."""
    try:
        from transformers.modeling_flash_attention_utils import FLASH_ATTENTION_COMPATIBILITY_MATRIX
    except ImportError:
        return importlib.util.find_spec("flash_attn") is not None
    known = FLASH_ATTENTION_COMPATIBILITY_MATRIX.get(version)
    return bool(known and known["general_availability_check"]())


def _attention_in_place_of_flash(model_path: str, config: Any, device: torch.device,
                                 trust_remote_code: bool) -> Optional[str]:
    """``"sdpa"`` (warned) when ``config.json`` asks for a flash attention (``flash_attention_2``, ...) that cannot run
    here: on a CPU, or without its ``flash-attn`` package, where transformers would fetch a kernel's code from the
    Hugging Face Hub in its place (code from outside transformers runs only with ``trust_remote_code``). sdpa is the
    same attention, computed by torch. None: the config's own choice stands."""
    for requested in requested_attention(config):
        version = requested.removeprefix("flash_attention_")
        if requested == version or not version.isdigit():
            continue
        installed = _flash_attention_installed(int(version))
        if device.type != "cpu" and (installed or trust_remote_code):
            continue
        why = "on a CPU" if device.type == "cpu" else "without the flash-attn package its version needs"
        warnings.warn(
            f"{os.path.join(model_path, 'config.json')}: attn_implementation {requested!r} cannot run here ({why}; "
            "transformers would fetch a kernel's code from the Hugging Face Hub in its place): the model runs with "
            "'sdpa', the same attention computed by torch",
            stacklevel=3,
        )
        return "sdpa"
    return None


@contextlib.contextmanager
def _transformers_errors_only() -> Iterator[None]:
    """transformers' logging at ERROR within, and its "Loading weights" bar off where progress goes to a log
    (``$RECSYS_LLM_PROGRESS_LINES`` on: the bar ignores it and redraws in place on one line); both put back after."""
    from transformers.utils import logging as transformers_logging

    previous = transformers_logging.get_verbosity()
    bar_was_on = transformers_logging.is_progress_bar_enabled()
    transformers_logging.set_verbosity_error()
    if bar_was_on and _progress_to_a_log():
        transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        transformers_logging.set_verbosity(previous)
        if bar_was_on:
            transformers_logging.enable_progress_bar()


def _progress_to_a_log() -> bool:
    """Whether ``$RECSYS_LLM_PROGRESS_LINES`` is on (a value that is no on/off word counts as off here: the
    commands refuse it at their start)."""
    try:
        return env_flag(LINES_ENV)
    except ValueError:
        return False


def load_model(model_path: str, device: torch.device, dtype: torch.dtype, trust_remote_code: bool = False) -> nn.Module:
    """Loads a base model (no LM head) offline with ``AutoModel`` (or the ``*EncoderModel`` class its config
    names: T5EncoderModel); of an encoder-decoder model (T5, sentence-T5), its encoder.

    Raises:
        FileNotFoundError: no directory, no ``config.json`` or no weight files.
        ValueError: a damaged ``config.json`` or weight file, weights transformers cannot read, a
            ``.bin`` file holding objects other than tensors (refused, nothing runs), an attention kernel
            of the Hub named in ``config.json`` without ``trust_remote_code``, or a text-image
            dual encoder (CLIP), or weight files that lack tensors the model's hidden states need.
    """
    from safetensors import SafetensorError

    check_trust_remote_code(trust_remote_code)
    config = read_model_config(model_path)
    require_native_model(model_path, config, trust_remote_code)
    require_no_hub_kernel(model_path, config, trust_remote_code)
    require_weight_files(model_path)
    attention = _attention_in_place_of_flash(model_path, config, device, trust_remote_code)
    try:
        # transformers' load report (a table, in colour) lists a causal LM's lm_head as UNEXPECTED on every load of
        # its base model; weights the model lacks are checked below (_require_loaded_weights) and named in one line
        with _transformers_errors_only():
            model, loading_info = _model_class(config).from_pretrained(
                model_path, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code,
                # straight onto the device: no whole copy in host memory first (one per rank under torchrun)
                device_map={"": device}, output_loading_info=True,
                **({"attn_implementation": attention} if attention else {}),
            )
    except (OSError, SafetensorError) as error:
        raise ValueError(f"{model_path}: cannot load the model weights ({one_line(error)})") from error
    except ImportError as error:  # a package the model's config asks for (an attention kernel, ...) is missing
        raise ValueError(f"{model_path}: cannot build the model ({one_line(error)})") from error
    except pickle.UnpicklingError as error:  # torch.load(weights_only=True) met a callable in a .bin file
        raise ValueError(
            f"{model_path}: refused its pytorch_model*.bin weights: they hold objects other than tensors "
            f"({telling_line(error)}); nothing from them ran. Use the model's .safetensors weights, or a copy of "
            "the model from a source you trust"
        ) from error
    require_text_forward(model_path, model)
    used = encoder_of(model)
    _require_loaded_weights(model_path, model, used, loading_info.get("missing_keys") or [])
    return used.to(device)
