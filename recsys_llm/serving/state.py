"""State dicts for serving: gathering a sharded model's tensors, and reading an artifact's
weights file safely (``weights_only``, finite values, lazily per shard)."""

import contextlib
import numbers
import os
import pickle
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import nn
from torch.distributed._shard.sharded_tensor import ShardedTensor

from recsys_llm.error_text import telling_line, weights_only_reason
from recsys_llm.semantics.store import first_non_finite_row
from recsys_llm.serving.artifact import EXPORT_ID_KEY, STATE_FILE
from recsys_llm.train.distributed import collective_device


def strip_wrappers(key: str) -> str:
    """``key`` without DMP's ``_dmp_wrapped_module.`` and DDP's ``module.`` prefixes."""
    for wrapper in ("_dmp_wrapped_module.", "module."):
        if key.startswith(wrapper):
            key = key[len(wrapper) :]
    return key


def _gather_shards_to_cpu(value: ShardedTensor, dst: int) -> Optional[torch.Tensor]:
    """``value`` as one full CPU tensor on global rank ``dst`` (``None`` on the other ranks).

    Shard by shard: each owner sends its shard to ``dst``, which receives it into a buffer
    of that shard's size on the collective device (NCCL takes CUDA tensors only) and copies
    it into the CPU result. ``ShardedTensor.gather`` instead holds one buffer per rank plus
    the full tensor on ``dst``'s device, which does not fit for a table near GPU memory.
    Every rank of the tensor's process group must call it.
    """
    import torch.distributed as dist

    group = value._process_group
    rank = dist.get_rank()
    full = torch.empty(value.size(), dtype=value.dtype) if rank == dst else None
    local = {tuple(shard.metadata.shard_offsets): shard.tensor for shard in value.local_shards()}
    device = collective_device()
    for meta in value.metadata().shards_metadata:
        owner = dist.get_global_rank(group, meta.placement.rank())
        offsets = tuple(meta.shard_offsets)
        if 0 in meta.shard_sizes or rank not in (owner, dst):
            continue
        if rank == owner and rank != dst:
            dist.send(local[offsets].detach().to(device).contiguous(), dst, group=group)
            continue
        if owner == dst:
            received = local[offsets]
        else:
            received = torch.empty(meta.shard_sizes, dtype=value.dtype, device=device)
            dist.recv(received, owner, group=group)
        full[tuple(slice(o, o + n) for o, n in zip(offsets, meta.shard_sizes))].copy_(received)
    return full


def unsharded_state_dict(model: nn.Module, *, dst: int = 0, prefix: str = "") -> Dict[str, torch.Tensor]:
    """The full state dict of a (possibly DMP-sharded) model, gathered on rank ``dst``.

    Every rank must call it (the gather is collective). Sharded tables travel one shard at
    a time into CPU memory on ``dst`` (a table need not fit on one GPU); plain tensors are
    cloned; wrapper prefixes (``_dmp_wrapped_module.``, DDP's ``module.``) are removed.
    ``prefix``: only the tensors whose name (wrappers removed) starts with it are gathered,
    e.g. ``"student."`` of a teacher-student task (its teacher's tables never reach ``dst``).

    Returns:
        Dict[str, torch.Tensor]: full CPU tensors on ``dst``; an empty dict on other ranks.
    """
    import torch.distributed as dist

    if isinstance(dst, bool) or not isinstance(dst, numbers.Integral) or dst < 0:  # a numpy integer is one
        raise ValueError(f"unsharded_state_dict: dst must be a rank (an integer >= 0), got {dst!r}")
    dst = int(dst)
    if not isinstance(prefix, str):
        raise TypeError(f"unsharded_state_dict: prefix must be a string of a name's start, got {prefix!r}")
    rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
    out: Dict[str, torch.Tensor] = {}
    for key, value in model.state_dict().items():
        name = strip_wrappers(key)
        if not name.startswith(prefix):  # the same names on every rank: each skips the same gathers
            continue
        if isinstance(value, ShardedTensor):
            full = _gather_shards_to_cpu(value, dst)
            if rank == dst:
                out[name] = full
        elif hasattr(value, "full_tensor"):  # DTensor
            full = value.full_tensor()
            if rank == dst:
                out[name] = full.detach().cpu().clone()
        elif rank == dst:
            out[name] = value.detach().cpu().clone()
    return out


def materialize_meta(module: nn.Module, device: torch.device) -> nn.Module:
    """Gives every parameter and buffer still on ``meta`` uninitialised storage on ``device``.

    Tensors already on a real device are left as they are. ``nn.Module.to_empty`` would
    empty them too, including non-persistent buffers that no state dict restores (torchrec
    DLRM's ``triu_indices``), so a model whose tables were built on ``meta`` is made
    loadable with this, then filled by ``load_state_dict``.

    Returns:
        nn.Module: ``module``, changed in place.

    Raises:
        ValueError: a non-persistent buffer is on ``meta`` (e.g. the ``triu_indices`` of a
            torchrec DLRM built entirely under ``torch.device("meta")``): no state dict holds it, so
            it would keep uninitialised values; ``module`` is left unchanged.
    """
    unfillable = [f"{prefix}.{name}" if prefix else name for prefix, submodule in module.named_modules()
                  for name, buffer in submodule._buffers.items()
                  if buffer is not None and buffer.is_meta and name in submodule._non_persistent_buffers_set]
    if unfillable:
        raise ValueError(
            f"materialize_meta: the non-persistent buffer(s) {unfillable} are on the meta device; no state dict "
            "restores them, so they would hold uninitialised memory: build the dense layers on a real device "
            "(e.g. under `with torch.device(\"cpu\")`) and only the tables (EmbeddingBagCollection(..., "
            "device=torch.device(\"meta\"))) on meta"
        )
    for submodule in module.modules():
        for name, param in list(submodule._parameters.items()):
            if param is not None and param.is_meta:
                submodule._parameters[name] = nn.Parameter(
                    torch.empty_like(param, device=device), requires_grad=param.requires_grad
                )
        for name, buffer in list(submodule._buffers.items()):
            if buffer is not None and buffer.is_meta:
                submodule._buffers[name] = torch.empty_like(buffer, device=device)
    return module


def sub_state(state: Dict[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """Keys under ``prefix`` with the prefix removed (e.g. ``student.`` of a TeacherStudentTask)."""
    picked = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
    if not picked:
        prefixes = sorted({key.split(".")[0] for key in state})
        raise KeyError(f"no state under prefix {prefix!r}; prefixes present: {prefixes}")
    return picked


def _state_path(path: str) -> str:
    if os.path.isdir(path):
        path = os.path.join(path, STATE_FILE)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: state file not found")
    return path


def _is_safetensors(path: str) -> bool:
    """Whether ``path`` is a safetensors file: by its name, else by its first bytes (an 8-byte
    little-endian header length within the file, then the JSON header's ``{``), so a
    safetensors file named ``.pt`` or ``.bin`` is read as one and not refused as a ``torch.save`` file."""
    if path.endswith(".safetensors"):
        return True
    with open(path, "rb") as handle:
        start = handle.read(9)
    return len(start) == 9 and start[8:] == b"{" and int.from_bytes(start[:8], "little") <= os.path.getsize(path) - 8


def _torch_load(path: str, mmap: bool) -> Any:
    """``torch.load(path, weights_only=True)`` on CPU; a refused or unreadable file is named.

    ``mmap``: memory-map the file (the legacy non-zip ``torch.save`` format cannot be mapped
    and is read whole).

    Raises:
        pickle.UnpicklingError: the file holds objects other than tensors and containers
            (nothing from it runs).
        ValueError: the file is damaged (truncated, not a ``torch.save`` file: the unpickler fails on
            other bytes with KeyError, IndexError or UnicodeDecodeError).
    """
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
        except RuntimeError as error:
            if not mmap or "mmap" not in str(error):
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        if (weights_only_reason(error) or "").startswith("Unsupported operand"):  # no object refused: other bytes
            raise _damaged_torch_save_file(path, error, old_protocol=True) from error
        raise pickle.UnpicklingError(
            f"{path}: refused: the file holds objects other than tensors ({telling_line(error)}); expected a state "
            "dict of tensors only (torch.load with weights_only=True, no code runs): write it with "
            "`recsys-llm export --state-only` or safetensors"
        ) from error
    except (RuntimeError, EOFError, KeyError, IndexError, ValueError) as error:
        raise _damaged_torch_save_file(path, error) from error


def _damaged_torch_save_file(path: str, error: BaseException, old_protocol: bool = False) -> ValueError:
    """The error for a file that is no complete ``torch.save`` file; ``old_protocol``: or one of a pickle
    protocol torch's weights-only unpickler does not read (0 or 1)."""
    also, protocol = ("", "")
    if old_protocol:
        also, protocol = ", or a torch.save of pickle protocol 0 or 1", " (default protocol)"
    return ValueError(
        f"{path}: damaged or incomplete state file{also} ({telling_line(error)}); expected a complete "
        f"torch.save{protocol} or .safetensors file of tensors: write it again (`recsys-llm export --state-only`)"
    )


def _damaged_state_file(path: str, error: BaseException) -> ValueError:
    """The error for a safetensors file that cannot be read."""
    return ValueError(
        f"{path}: damaged or incomplete state file ({telling_line(error)}); expected a complete .safetensors file: "
        "write it again (`recsys-llm export`)"
    )


def require_finite(path: str, key: str, tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` itself; raises when a floating-point ``tensor`` holds NaN or +-inf.

    Args:
        path (str): the file ``tensor`` comes from, for the message.
        key (str): its key in that file.
        tensor (torch.Tensor): any shape; integer and bool tensors pass unchecked.

    Raises:
        ValueError: names ``path``, ``key`` and the first non-finite value.
    """
    if (tensor.is_floating_point() or tensor.is_complex()) and tensor.numel():
        bad = _first_non_finite_value(tensor.reshape(-1))
        if bad is not None:
            first, count, value = bad
            raise ValueError(
                f"{path}: tensor {key!r} holds {count} non-finite value(s) (first: {value} at flat index {first}); "
                "expected finite weights: the model that wrote it diverged or the file is damaged (train it again, "
                "or take an earlier checkpoint)"
            )
    return tensor


FINITE_CHECK_CHUNK = 1 << 20  # values checked at a time by require_finite: torch.isfinite holds an abs() copy and
# bool masks of what it checks (about 1.7x a float32 tensor's bytes), so a whole 10^7-row table doubled the peak memory


def _first_non_finite_value(flat: torch.Tensor) -> Optional[Tuple[int, int, object]]:
    """``(flat index, number of non-finite values, the first one)`` of a 1-D tensor, None when all are finite;
    checked :data:`FINITE_CHECK_CHUNK` values at a time, so the memory beyond ``flat`` is one chunk's masks."""
    first, count = None, 0
    for start in range(0, flat.numel(), FINITE_CHECK_CHUNK):
        bad = first_non_finite_row(flat[start : start + FINITE_CHECK_CHUNK].reshape(-1, 1))  # one row per value
        if bad is not None:
            if first is None:
                first = (start + bad[0], bad[2])
            count += bad[1]
    return None if first is None else (first[0], count, first[1])


def _require_tensor_dict(path: str, state: Any) -> Dict[str, torch.Tensor]:
    """``state`` itself when it is a ``{name: tensor}`` dict, else a ValueError naming ``path`` and what it holds."""
    if not isinstance(state, dict):
        raise ValueError(f"{path}: holds an object of type {type(state).__name__}, expected a state dict "
                         "{name: tensor} (model.state_dict(), or `recsys-llm export --state-only`)")
    for key, value in state.items():
        if not isinstance(key, str) or not isinstance(value, torch.Tensor):
            raise ValueError(
                f"{path}: entry {key!r} is of type {type(value).__name__}, expected a state dict {{name: tensor}} "
                "only (a checkpoint that keeps the state dict under a key beside other things: save that dict alone)"
            )
    return state


def load_state_file(path: str) -> Dict[str, torch.Tensor]:
    """A state dict from an export directory or a ``.safetensors`` / ``torch.save`` file (weights only, no code).

    Raises:
        FileNotFoundError: no such file, or a directory without ``model.safetensors``.
        pickle.UnpicklingError: a ``torch.save`` file holding objects ``torch.load(weights_only=True)``
            refuses (named; nothing from it runs).
        ValueError: a damaged file, contents other than a ``{name: tensor}`` dict, or a tensor with NaN /
            inf values (named with its key).
    """
    path = _state_path(path)
    if _is_safetensors(path):
        try:
            state = load_file(path)
        except SafetensorError as error:
            raise _damaged_state_file(path, error) from error
    else:
        state = _require_tensor_dict(path, _torch_load(path, mmap=False))
    for key, value in state.items():
        require_finite(path, key, value)
    return state


class _SafetensorsSlice:
    """One tensor of an open safetensors file: ``shape``, and ``[index]`` reads only that part
    (refused when it holds NaN / inf: :func:`require_finite`)."""

    def __init__(self, handle: Any, key: str, path: str) -> None:
        self._slice = handle.get_slice(key)
        self._key = key
        self._path = path
        self.shape = torch.Size(self._slice.get_shape())

    def __getitem__(self, index: Any) -> torch.Tensor:
        try:
            part = self._slice[index]
        except SafetensorError as error:
            raise _damaged_state_file(self._path, error) from error
        return require_finite(self._path, self._key, part)


class _CheckedTensor:
    """One tensor of a (memory-mapped) ``torch.save`` file: ``shape``, and ``[index]`` gives that
    part, refused when it holds NaN / inf (:func:`require_finite`)."""

    def __init__(self, tensor: torch.Tensor, key: str, path: str) -> None:
        self._tensor = tensor
        self._key = key
        self._path = path
        self.shape = tensor.shape

    def __getitem__(self, index: Any) -> torch.Tensor:
        return require_finite(self._path, self._key, self._tensor[index])


@contextlib.contextmanager
def open_state_file(path: str) -> Iterator[Mapping[str, Any]]:
    """A state file's tensors, read when indexed (weights only, no code).

    ``state[key]`` has ``shape``, and ``state[key][index]`` reads only the rows and columns
    of ``index`` (``[...]`` for all): a rank that copies its shards of a large table out of
    a full state dict never holds the whole table. Safetensors files are sliced in place;
    ``torch.save`` files are memory-mapped (``mmap=True``; files of the legacy non-zip format
    are read whole).

    Every part read is checked: NaN or inf in it is a ValueError naming the file and the
    tensor's key (a frozen teacher that diverged would give NaN losses without an error).

    Args:
        path (str): an export directory or a ``.safetensors`` / ``torch.save`` file.

    Raises:
        FileNotFoundError: no such file, or a directory without ``model.safetensors``.
        pickle.UnpicklingError: a ``torch.save`` file holding objects ``torch.load(weights_only=True)``
            refuses (named; nothing from it runs).
        ValueError: a damaged file, contents other than a ``{name: tensor}`` dict, or a part read that
            holds NaN / inf values.
    """
    path = _state_path(path)
    if not _is_safetensors(path):
        state = _require_tensor_dict(path, _torch_load(path, mmap=True))
        yield {key: _CheckedTensor(value, key, path) for key, value in state.items()}
        return
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except SafetensorError as error:
        raise _damaged_state_file(path, error) from error
    with handle:
        yield {key: _SafetensorsSlice(handle, key, path) for key in handle.keys()}


def check_same_export(config_path: str, config: Mapping[str, Any], path: str, export_id: Optional[str]) -> None:
    """Raises when ``path`` was written by another export than ``config.json`` (files of two
    artifacts copied together); artifacts written before export ids are not checked.

    Raises:
        ValueError: naming both files and their export ids.
    """
    expected = config.get(EXPORT_ID_KEY)
    if expected is not None and export_id != expected:
        raise ValueError(
            f"{path}: written by another export ({EXPORT_ID_KEY} {export_id}) than {config_path} ({expected}); "
            "the artifact mixes files of two exports. Export again, or copy the whole directory of one export"
        )
