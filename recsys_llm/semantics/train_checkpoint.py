"""What the resumable LLM tunings share: a checkpoint directory swapped in whole, RNG states,
and reading its files back without running code, each damaged file named with its remedy.

``semantics tune`` (SSFT, ``ssft.py``) and ``semantics adapt`` (ELEC, ``ctr_llm.py``) keep a
checkpoint directory of safetensors tensors, a ``torch.save``-d optimizer state read with
``torch.load(weights_only=True)``, and a JSON state. torch, transformers and peft have no helper
that fits: transformers' ``Trainer`` and accelerate's ``save_state`` pickle Python's and NumPy's
RNG states (loading them needs ``weights_only=False``), and peft saves adapters only.

Example::

    owner = CheckpointOwner("SSFT", "tune")
    with checkpoint_swap("runs/ssft/checkpoint") as tmp:
        save_file(rng_state(device), os.path.join(tmp, "rng.safetensors"))
    rng = load_checkpoint_tensors("runs/ssft/checkpoint/rng.safetensors", owner)
"""

import contextlib
import os
import pickle
import shutil
from typing import Any, Dict, Iterator, List, Mapping, NamedTuple, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from recsys_llm.atomic_dir import replace_directory
from recsys_llm.error_text import one_line
from recsys_llm.semantics.model_dir import safetensors_damage
from recsys_llm.semantics.precision import LowPrecisionSteps


# the files every tuning checkpoint holds beside its trained tensors' (SSFT's adapter, adapt's LLM and heads)
CHECKPOINT_STATE_FILE = "state.json"  # position, losses, loss scale and the resume signature
CHECKPOINT_OPTIMIZER_FILE = "optimizer.pt"
CHECKPOINT_RNG_FILE = "rng.safetensors"


class CheckpointOwner(NamedTuple):
    """Who writes a checkpoint, for its messages.

    Args:
        name (str): what is tuned, e.g. ``SSFT``.
        command (str): the ``recsys-llm semantics`` sub-command (and verb) that tunes it, e.g. ``tune``.
    """

    name: str
    command: str

    def remedy(self, directory: str) -> str:
        """What to do about a damaged checkpoint ``directory``."""
        return (f"delete {directory} to {self.command} again from scratch, or run `recsys-llm semantics "
                f"{self.command}` with --no-resume")


def damaged_checkpoint_file(path: str, detail: str, owner: CheckpointOwner) -> ValueError:
    """The error for a file of a checkpoint directory that cannot be read back: names it, why, and the remedy."""
    return ValueError(f"{path}: damaged or incomplete {owner.name} checkpoint file ({detail}); "
                      f"{owner.remedy(os.path.dirname(path))}")


def find_checkpoint(directory: str, state_file: str) -> Optional[str]:
    """``directory``, else ``directory.old`` (a kill during :func:`checkpoint_swap`), whichever holds
    ``state_file`` first; None when neither does."""
    for path in (directory, f"{directory}.old"):
        if os.path.exists(os.path.join(path, state_file)):
            return path
    return None


@contextlib.contextmanager
def checkpoint_swap(directory: str) -> Iterator[str]:
    """Yields an empty ``directory.tmp`` to fill, then swaps it in for ``directory``
    (:func:`~recsys_llm.atomic_dir.replace_directory`: a complete copy is at ``directory`` or
    ``directory.old`` at every moment). An exception in the block (Ctrl-C, SIGTERM in the ``recsys-llm``
    commands) leaves ``directory`` as it was and removes the half-written ``directory.tmp``."""
    tmp = f"{directory}.tmp"
    if os.path.exists(tmp):
        shutil.rmtree(tmp)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_directory(tmp, directory)


def rng_state(device: torch.device) -> Dict[str, torch.Tensor]:
    """torch's global RNG states that dropout draws from: the CPU one (``torch``) and, on CUDA,
    the device's (``cuda``); uint8 tensors, for a safetensors file."""
    state = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state: Dict[str, torch.Tensor], device: torch.device) -> bool:
    """Restores what :func:`rng_state` saved; False when it lacks the CUDA state a run on ``device`` needs.

    Raises:
        RuntimeError, KeyError, TypeError: ``state`` is not such a state (a damaged file).
    """
    torch.set_rng_state(state["torch"])
    if device.type != "cuda":
        return True
    if "cuda" not in state:
        return False
    torch.cuda.set_rng_state(state["cuda"], device)
    return True


def restore_rng_state(path: str, state: Dict[str, torch.Tensor], device: torch.device,
                      owner: CheckpointOwner) -> bool:
    """:func:`set_rng_state` of the tensors read from ``path``; a state that is none is
    :func:`damaged_checkpoint_file`'s error."""
    try:
        return set_rng_state(state, device)
    except (RuntimeError, KeyError, TypeError, ValueError) as error:
        raise damaged_checkpoint_file(path, f"not a torch RNG state: {one_line(error) or type(error).__name__}",
                                      owner) from error


def check_tensor_file(path: str, owner: CheckpointOwner) -> None:
    """Raises :func:`damaged_checkpoint_file`'s error for a missing safetensors file, or one whose
    header does not describe its bytes (read: the header only)."""
    if not os.path.isfile(path):
        raise damaged_checkpoint_file(path, "missing", owner)
    damage = safetensors_damage(path)
    if damage is not None:
        raise damaged_checkpoint_file(path, damage, owner)


def load_checkpoint_tensors(path: str, owner: CheckpointOwner, device: str = "cpu") -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file of a checkpoint; a missing or damaged one is
    :func:`damaged_checkpoint_file`'s error."""
    check_tensor_file(path, owner)
    try:
        return load_file(path, device=device)
    except (SafetensorError, OSError) as error:
        raise damaged_checkpoint_file(path, one_line(error), owner) from error


def check_checkpoint_tensors(path: str, found: Mapping[str, Any], expected: Mapping[str, Any], what: str,
                             owner: CheckpointOwner) -> None:
    """Raises when the tensors read from ``path`` (``found``: name -> shape, or shape and dtype) are
    not those the model trains (``expected``), naming how many differ and one of them.

    Args:
        what (str): the mismatch, e.g. ``"LoRA tensor(s) missing, unknown or of other shapes"``.
    """
    if found != expected:
        differing = sorted(key for key in set(found) | set(expected) if found.get(key) != expected.get(key))
        raise damaged_checkpoint_file(path, f"{len(differing)} {what}, e.g. {differing[0]}", owner)


def torch_load_detail(error: BaseException) -> str:
    """Why ``torch.load(weights_only=True)`` refused a file, in one line."""
    if isinstance(error, pickle.UnpicklingError):
        return "holds objects other than tensors, refused unread: loading them could run code"
    # torch's own text goes on with advice after its first sentence ("... central directory. This is ...")
    return one_line(error).split(". ")[0][:300] or type(error).__name__


def load_optimizer_file(path: str, owner: CheckpointOwner) -> Dict[str, Any]:
    """An optimizer state saved with ``torch.save``, read with ``weights_only=True`` onto the CPU.

    ``load_state_dict`` moves the moments to their parameters' device, and AdamW's step counts
    stay on the CPU (a CUDA step is read back to the host for every parameter).

    Raises:
        ValueError: the file is missing, damaged, or holds more than tensors and containers (named).
        torch.OutOfMemoryError: as raised (a RuntimeError, but no sign of a damaged file).
    """
    if not os.path.isfile(path):
        raise damaged_checkpoint_file(path, "missing", owner)
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except torch.OutOfMemoryError:
        raise
    except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, ValueError) as error:
        raise damaged_checkpoint_file(path, torch_load_detail(error), owner) from error


def restore_optimizer(steps: LowPrecisionSteps, state: Dict[str, Any], path: str, what: str,
                      owner: CheckpointOwner) -> None:
    """Loads the optimizer ``state`` read from ``path`` into ``steps.optimizer``; one of other
    parameters is :func:`damaged_checkpoint_file`'s error (``what``: e.g. "AdamW state of this adapter")."""
    try:
        steps.optimizer.load_state_dict(state)
    except torch.OutOfMemoryError:
        raise
    except (ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        raise damaged_checkpoint_file(path, f"not an {what}: {one_line(error)}", owner) from error


GRAD_SCALER_KEY = "grad_scaler"  # in a checkpoint's state.json: the float16 loss scale and its growth counter


def grad_scaler_state(steps: LowPrecisionSteps) -> Dict[str, Any]:
    """``{GRAD_SCALER_KEY: the loss scaler's state}`` for a float16 model's ``state.json``, else ``{}``."""
    return {GRAD_SCALER_KEY: steps.scaler.state_dict()} if steps.scaler.is_enabled() else {}


def restore_grad_scaler(steps: LowPrecisionSteps, state: Dict[str, Any], state_file: str,
                        owner: CheckpointOwner) -> None:
    """Pops :data:`GRAD_SCALER_KEY` from ``state`` (read from ``state_file``) into the loss scaler,
    when both have one; a value that is no scaler state is :func:`damaged_checkpoint_file`'s error."""
    scaler_state = state.pop(GRAD_SCALER_KEY, None)
    if scaler_state is None or not steps.scaler.is_enabled():
        return
    try:
        steps.scaler.load_state_dict(scaler_state)
    except (RuntimeError, KeyError, TypeError, AttributeError) as error:
        raise damaged_checkpoint_file(state_file, f"{GRAD_SCALER_KEY} is not a loss-scaler state: {one_line(error)}",
                                      owner) from error


def setting_differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> List[str]:
    """``key: saved -> current`` for every key whose value differs (a missing key reads as None), sorted."""
    return [f"{key}: {saved.get(key)!r} -> {current.get(key)!r}"
            for key in sorted(set(saved) | set(current)) if saved.get(key) != current.get(key)]
