"""A local Hugging Face model directory: the checks made before transformers reads it (config, weight
files, code it would run) and the fingerprints that tie vectors to the exact model that made them."""

import fnmatch
import hashlib
import json
import os
import struct
import warnings
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from recsys_llm.file_hash import files_sha256


# (absolute path, size, mtime in ns, device, inode, ctime in ns) -> sha256 of the files hashed in this process
_FILE_HASHES: Dict[Tuple[str, int, int, int, int, int], str] = {}


def _file_hashes(paths: Sequence[str], what: str) -> List[str]:
    """sha256 of each of ``paths``, memoised on its size, mtime, inode and ctime; those not hashed before in this
    process are hashed side by side (:func:`recsys_llm.file_hash.files_sha256`) under a bar naming ``what``.

    Size and mtime alone do not tell two files apart that a copy keeping times made (``cp -a``, ``rsync -a``,
    ``shutil.copytree``, a tar archive's whole-second times): another model of the same architecture put at the same
    path would get the first one's fingerprint, and an encode cache would serve the first model's vectors for it.
    A replaced file has another inode, and a rewritten one a new ctime, which no copy can set."""
    keys = []
    for path in paths:
        stat = os.stat(path)
        keys.append((os.path.abspath(path), stat.st_size, stat.st_mtime_ns, stat.st_dev, stat.st_ino,
                     stat.st_ctime_ns))
    missing = [key for key in dict.fromkeys(keys) if key not in _FILE_HASHES]
    if missing:
        found = files_sha256([key[0] for key in missing], description=f"hashing {what} (the vectors' provenance)")
        _FILE_HASHES.update(zip(missing, found))
    return [_FILE_HASHES[key] for key in keys]


def file_fingerprint(path: str) -> str:
    """sha256 of one file's bytes (memoised on its size, mtime, inode and ctime, as :func:`model_dir_fingerprint`)."""
    return _file_hashes([path], os.path.basename(path))[0]


# Files whose content defines what a model directory computes (weights, config, tokenizer).
# weights, config and tokenizer files, and a remote-code model's own Python code
_FINGERPRINT_SUFFIXES = (".safetensors", ".bin", ".json", ".model", ".txt", ".tiktoken", ".py")


def require_model_dir(model_path: str) -> None:
    """Raises FileNotFoundError naming ``model_path`` unless it is a local directory (a file, such as the
    model's ``config.json``, is named as a file, with the directory that holds it)."""
    if os.path.isfile(model_path):
        raise FileNotFoundError(
            f"{model_path}: is a file, not a model directory; pass the directory that holds config.json, the "
            f"weights and the tokenizer files (e.g. {os.path.dirname(os.path.abspath(model_path))})"
        )
    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"{model_path}: model directory not found (models load offline from a local path)")


def read_json_file(path: str, damage: str = "") -> Any:
    """The parsed JSON of the file at ``path``.

    Raises:
        ValueError: ``"{path}: not valid JSON ({error})"`` followed by ``damage``, when it does not parse.
    """
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{path}: not valid JSON ({error}){damage}") from error


def read_model_config(model_path: str) -> dict:
    """The ``config.json`` of a Hugging Face model directory, checked before transformers reads it.

    Raises:
        FileNotFoundError: no directory, or no ``config.json`` in it (e.g. an empty or a data directory).
        ValueError: ``config.json`` is not a JSON object with a ``model_type``.
    """
    require_model_dir(model_path)
    path = os.path.join(model_path, "config.json")
    if not os.path.isfile(path):
        if os.path.isfile(os.path.join(model_path, "adapter_config.json")):
            raise FileNotFoundError(
                f"{model_path}: a PEFT adapter directory (adapter_config.json), not a model; an SSFT adapter goes "
                "to `semantics encode --adapter`, which loads the base model it names"
            )
        inner = _sentence_transformers_model_dir(model_path)
        if inner is not None:
            raise FileNotFoundError(
                f"{model_path}: a sentence-transformers directory whose model lies in {inner} (modules.json), not "
                f"beside it: pass {inner}, and --pooling as its Pooling module declares (this directory's "
                "pooling is read only where the model lies at its top)"
            )
        raise FileNotFoundError(
            f"{model_path}: not a Hugging Face model directory (no config.json); pass the directory that holds "
            "config.json, the weights and the tokenizer files"
        )
    config = read_json_file(path, "; the model directory is damaged")
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise ValueError(
            f"{path}: not a Hugging Face model config (expected a JSON object with a 'model_type'; a directory "
            "saved by `semantics adapt` goes to `semantics export --llm`)"
        )
    return config


def sentence_transformers_modules(model_path: str, kind: Optional[str] = None) -> List[str]:
    """The paths (relative to ``model_path``; ``""`` for the directory itself) of the modules that a
    sentence-transformers ``modules.json`` lists, in its order: those of type
    ``sentence_transformers.models.{kind}`` (``Transformer``, ``Pooling``, ``Dense``, ...), or all (None);
    [] without one.

    Raises:
        ValueError: ``modules.json`` is not valid JSON.
    """
    modules_path = os.path.join(model_path, "modules.json")
    if not os.path.isfile(modules_path):
        return []
    modules = read_json_file(modules_path, "; the model directory is damaged")
    return [m.get("path", "") for m in (modules if isinstance(modules, list) else [])
            if isinstance(m, dict) and isinstance(m.get("path", ""), str)
            and (kind is None or str(m.get("type", "")).endswith(f".{kind}"))]


def _sentence_transformers_model_dir(model_path: str) -> Optional[str]:
    """The sub-directory holding the model of a sentence-transformers directory of the older layout
    (``modules.json`` listing a Transformer module at ``0_Transformer``), when it has a ``config.json``."""
    try:
        paths = sentence_transformers_modules(model_path, "Transformer")
    except (OSError, ValueError):  # the error at hand is the missing config.json, not this file
        return None
    inner = [os.path.join(model_path, path) for path in paths if path]
    return next((path for path in inner if os.path.isfile(os.path.join(path, "config.json"))), None)


def config_vocab_size(config: dict) -> Optional[int]:
    """``vocab_size`` of a model config (or of its ``text_config``), None when it has none."""
    for source in (config, config.get("text_config") or {}):
        size = source.get("vocab_size") if isinstance(source, dict) else None
        if isinstance(size, int) and not isinstance(size, bool) and size > 0:
            return size
    return None


# the largest header the safetensors library reads (its MAX_HEADER_SIZE)
SAFETENSORS_HEADER_LIMIT = 100_000_000


def safetensors_damage(path: str) -> Optional[str]:
    """Why a ``.safetensors`` file cannot be read (truncated, bad header), or None when it looks whole.

    Reads only the header: 8 bytes of header length, the JSON header, then the byte ranges it names.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            return f"{size} bytes, too short for a safetensors header"
        header_size = struct.unpack("<Q", prefix)[0]
        if 8 + header_size > size:
            return f"truncated: header of {header_size} bytes, file of {size} bytes"
        if header_size > SAFETENSORS_HEADER_LIMIT:  # safetensors refuses it too; read, it would fill the memory
            return f"header of {header_size} bytes, beyond safetensors' limit of {SAFETENSORS_HEADER_LIMIT}"
        try:
            header = json.loads(handle.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    offsets = [entry.get("data_offsets") for key, entry in header.items() if key != "__metadata__" and isinstance(entry, dict)]
    ends = [pair[1] for pair in offsets if isinstance(pair, list) and len(pair) == 2 and isinstance(pair[1], int)]
    expected = 8 + header_size + max(ends, default=0)
    if size < expected:
        return f"truncated: {size} bytes, its header names {expected}"
    return None


def require_weight_files(model_path: str) -> None:
    """Checks that a model directory holds its weights and that its safetensors files are whole.

    Raises:
        FileNotFoundError: no weight file, or a shard named by an index file is missing.
        ValueError: a ``.safetensors`` file is truncated or its header is damaged, or an index names
            a shard outside the directory (an absolute path, ``..``).
    """
    names = set(os.listdir(model_path))
    shards: List[str] = []
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        if index_name in names:
            index_path = os.path.join(model_path, index_name)
            try:
                with open(index_path, encoding="utf-8") as handle:
                    weight_map = json.load(handle)["weight_map"]
                shards = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
                raise ValueError(f"{index_path}: not a weight index (expected JSON with a 'weight_map')") from error
            outside = [s for s in shards if not isinstance(s, str) or os.path.isabs(s)
                       or os.path.normpath(s).split(os.sep)[0] == ".."]
            if outside:
                raise ValueError(
                    f"{index_path}: names weight files outside the model directory {outside[:5]}; expected the "
                    "directory's own shard files (e.g. model-00001-of-00002.safetensors)"
                )
            missing = [s for s in shards if not os.path.isfile(os.path.join(model_path, s))]
            if missing:
                raise FileNotFoundError(f"{model_path}: weight shards {missing[:5]} named by {index_name} are missing")
            break
    else:
        shards = sorted(n for n in names if n.endswith((".safetensors", ".bin")) and not n.startswith("."))
    if not shards:
        raise FileNotFoundError(
            f"{model_path}: no model weights (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
        )
    for name in shards:
        if name.endswith(".safetensors"):
            damage = safetensors_damage(os.path.join(model_path, name))
            if damage is not None:
                raise ValueError(f"{os.path.join(model_path, name)}: damaged weight file ({damage})")


def model_module_dirs(model_path: str) -> List[str]:
    """The subdirectories of a model directory that belong to the model: those of the modules its
    sentence-transformers ``modules.json`` lists (e.g. ``1_Pooling``), sorted; none without one (or with one
    that is not a list of modules). Any other subdirectory (``onnx/``, ``openvino/`` of a hub download, or
    outputs kept in the model directory) is not read when the model loads.
    """
    try:
        paths = sentence_transformers_modules(model_path)
    except ValueError:  # a damaged modules.json is hashed as it is, and named where the pooling is read
        return []
    names = set()
    for sub in paths:
        if not sub or os.path.isabs(sub):
            continue
        sub = os.path.normpath(sub)
        if sub.split(os.sep)[0] not in ("..", ".") and os.path.isdir(os.path.join(model_path, sub)):
            names.add(sub)
    return sorted(names)


def model_dir_fingerprint(model_path: str, subdirectories: bool = True) -> str:
    """sha256 over the config, tokenizer and weight files of a model directory.

    Every weight file is hashed in full once per process (memoised on size, mtime, inode and ctime),
    so a changed checkpoint under the same path gives a different fingerprint. The files are those at
    the top of the directory and, with ``subdirectories``, those of its sentence-transformers modules
    (:func:`model_module_dirs`): what else is below it (an SSFT output, a vector export, a CTR-adapted
    LLM kept there, a hub download's ``onnx/``) does not change it.

    Args:
        model_path (str): the model directory.
        subdirectories (bool): also the files of the model's sentence-transformers modules (a
            ``1_Pooling/config.json``); off: its top-level files only, which are all a Hugging Face model
            and tokenizer load from (the same fingerprint for a directory without such modules).

    Returns:
        str: 16 hex digits.
    """
    require_model_dir(model_path)
    modules = model_module_dirs(model_path) if subdirectories else []
    return _walk_fingerprint(model_path, lambda rel: any(  # a module's folder, one in it, or one above it
        rel == module or rel.startswith(module + os.sep) or module.startswith(rel + os.sep) for module in modules))


def model_dir_walk_fingerprint(model_path: str) -> str:
    """The fingerprint :func:`model_dir_fingerprint` gave before 2026-12-05: over the files of every
    subdirectory too (the same for a directory whose only subdirectories are its modules'). For
    fingerprints recorded then (an SSFT adapter's base model hash).

    Returns:
        str: 16 hex digits.
    """
    require_model_dir(model_path)
    return _walk_fingerprint(model_path, lambda rel: True)


def _walk_fingerprint(model_path: str, descend: Callable[[str], bool]) -> str:
    """sha256 over the fingerprinted files of ``model_path`` and of the subdirectories (by relative path,
    hidden ones never) ``descend`` takes, walked in sorted order."""
    files = []
    for root, dirs, names in os.walk(model_path):
        dirs[:] = sorted(d for d in dirs if not d.startswith(".")
                         and descend(os.path.relpath(os.path.join(root, d), model_path)))
        files += [os.path.join(root, name) for name in sorted(names)
                  if name.endswith(_FINGERPRINT_SUFFIXES) and not name.startswith(".") and name != "README.md"]
    return _files_fingerprint(model_path, files)


def _files_fingerprint(model_path: str, files: Sequence[str]) -> str:
    """16 hex digits of sha256 over ``files`` (paths in ``model_path``, in this order) and their paths in it."""
    digest = hashlib.sha256()
    what = f"{len(files)} files of {os.path.basename(os.path.abspath(model_path))}"
    for path, sha256 in zip(files, _file_hashes(files, what)):
        digest.update(f"{os.path.relpath(path, model_path)}:{sha256}\n".encode())
    return digest.hexdigest()[:16]


# what transformers loads of a model: its config and weights (not README, licence or the
# sentence-transformers files beside them)
_WEIGHT_FILE_PATTERNS = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                         "pytorch_model.bin.index.json")


def model_weights_fingerprint(model_path: str) -> str:
    """sha256 over the ``config.json`` and weight files at the top of a model directory: the
    same for a copy that lacks or adds other files (a licence, a trimmed sentence-transformers
    export), unlike :func:`model_dir_fingerprint`.

    Returns:
        str: 16 hex digits.
    """
    require_model_dir(model_path)
    files = [os.path.join(model_path, name) for name in sorted(os.listdir(model_path))
             if any(fnmatch.fnmatch(name, pattern) for pattern in _WEIGHT_FILE_PATTERNS)]
    return _files_fingerprint(model_path, [path for path in files if os.path.isfile(path)])


# text whose tokens tell tokenizers apart beyond their vocabularies: case, accents, digits, punctuation,
# CJK and runs of spaces (normaliser, pre-tokenizer), and the special tokens added around it (post-processor)
_TOKENIZER_PROBE = "The Item: Café DÉJÀ-vu, 12.50 $ per #3 東京 \t two  spaces\nline"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over what a loaded tokenizer makes of text: its vocabulary (token -> id) and the ids it gives
    a probe text. The same for its files saved again or edited where tokens do not change (a chat
    template), other for another vocabulary, casing or special tokens.

    Returns:
        str: 16 hex digits.
    """
    digest = hashlib.sha256()
    digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update(json.dumps(list(tokenizer(_TOKENIZER_PROBE)["input_ids"])).encode())
    return digest.hexdigest()[:16]


def module_fingerprint(model: nn.Module, trainable_only: bool = False) -> str:
    """sha256 over a module's config and parameter values (for models loaded in memory).

    Args:
        model (nn.Module): e.g. a peft-tuned model.
        trainable_only (bool): hash only parameters with ``requires_grad`` (cheap for LoRA
            adapters; combine with the base directory's fingerprint).

    Returns:
        str: 16 hex digits.
    """
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "to_json_string"):
        digest.update(config.to_json_string(use_diff=False).encode())
    for name, param in sorted(model.state_dict(keep_vars=True).items()):
        if trainable_only and not (isinstance(param, nn.Parameter) and param.requires_grad):
            continue
        tensor = param.detach().to("cpu", torch.float32).contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def require_native_model(model_path: str, config: Mapping[str, Any], trust_remote_code: bool) -> None:
    """Raises when the ``model_type`` is not this transformers' own and either the model needs code
    from its own directory (``auto_map`` in ``config.json``) that ``trust_remote_code`` does not
    allow, or it brings none. Warns when the directory brings code (``auto_map``) for a model type
    transformers knows and ``trust_remote_code`` is off: transformers' own class is loaded instead.

    Raises:
        ValueError: naming ``config.json``, the model type and how to allow it.
    """
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    if model_type in CONFIG_MAPPING and "auto_map" in config and not trust_remote_code:
        warnings.warn(
            f"{os.path.join(model_path, 'config.json')}: the directory's own code (auto_map: "
            f"{sorted(config['auto_map'])}) is not run: transformers' own {model_type!r} model is loaded, and its "
            "vectors may differ from that code's; pass --trust-remote-code (semantics tune, encode, adapt, export), "
            "or trust_remote_code=True in Python, to run that code if you trust it"
        )
    # no model_type at all (old checkpoints): transformers guesses it from the path, as it always did here
    if model_type is None or model_type in CONFIG_MAPPING or (trust_remote_code and "auto_map" in config):
        return
    if "auto_map" not in config:
        import transformers

        raise ValueError(
            f"{os.path.join(model_path, 'config.json')}: model_type {model_type!r} is not one transformers "
            f"{transformers.__version__} knows, and the directory brings no code for it (no auto_map): a newer "
            "transformers may have it, or the config.json belongs to another library"
        )
    raise ValueError(
        f"{os.path.join(model_path, 'config.json')}: model_type {model_type!r} is not in this transformers; the "
        f"directory's own code would define it (auto_map: {sorted(config['auto_map'])}), and code from a model "
        "directory runs only when asked: if you trust it, pass --trust-remote-code (semantics tune, encode, "
        "adapt, export), or trust_remote_code=True in Python"
    )


def requested_attention(config: Any) -> List[str]:
    """Every ``attn_implementation`` that ``config.json`` (a mapping) or its sub-configs name (alone, or
    per sub-config in a dict)."""
    if not isinstance(config, dict):
        return []
    found = []
    for key, value in config.items():
        if key == "attn_implementation":
            found += [v for v in (value.values() if isinstance(value, dict) else [value]) if isinstance(v, str)]
        found += requested_attention(value)
    return found


def require_no_hub_kernel(model_path: str, config: Mapping[str, Any], trust_remote_code: bool) -> None:
    """Raises when ``config.json`` (or one of its sub-configs) sets ``attn_implementation`` to an attention
    kernel of the Hugging Face Hub (``org/repo[@revision][:function]``, alone or per sub-config in a
    dict) and ``trust_remote_code`` does not allow it: transformers would download that kernel's code
    and import it, a model directory's ``auto_map`` being refused the same way. ``sdpa``, ``eager``,
    ``flash_attention_2`` and the like are transformers' own and pass.

    Raises:
        ValueError: naming ``config.json``, the kernel and how to allow it.
    """
    if trust_remote_code:
        return
    try:
        from transformers.integrations.hub_kernels import is_kernel
    except ImportError:  # a transformers without hub kernels
        return
    kernels = [name for name in requested_attention(dict(config)) if is_kernel(name.split("|")[-1])]
    if kernels:
        raise ValueError(
            f"{os.path.join(model_path, 'config.json')}: attn_implementation names the attention kernel "
            f"{kernels[0]!r} of the Hugging Face Hub, whose code transformers would download and run; code from "
            "outside transformers runs only when asked: if you trust it, pass --trust-remote-code (semantics tune, "
            "encode, adapt, export), or trust_remote_code=True in Python; else remove attn_implementation"
        )
