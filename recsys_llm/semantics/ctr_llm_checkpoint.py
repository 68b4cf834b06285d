"""Checkpoints of :func:`~recsys_llm.semantics.ctr_llm.tune_ctr_llm`, so ``semantics adapt`` resumes exactly.

Every N steps and at each epoch's end the tuning saves what it needs to go on bit for bit: the
trained tensors (LoRA or last layers, both heads; float32 master copies of low-precision weights),
AdamW's and the loss scaler's state, torch's RNG states, the generator the epoch's order is drawn
from, the position and the losses so far. ``semantics adapt`` keeps the checkpoint beside its
output (:func:`adapt_checkpoint_dir`) and removes it once the model is saved. The files, and what
they share with SSFT's checkpoint, are those of :mod:`recsys_llm.semantics.train_checkpoint`::

    <output-dir>.checkpoint/
      llm_tuned.safetensors  heads.safetensors  optimizer.pt  rng.safetensors  state.json
"""

import dataclasses
import hashlib
import json
import os
import warnings
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from safetensors.torch import save_file
from torch import nn

from recsys_llm.atomic_dir import check_own_entries, remove_directory
from recsys_llm.error_text import one_line
from recsys_llm.semantics.model_dir import model_dir_fingerprint, read_json_file
from recsys_llm.semantics.precision import LowPrecisionSteps
from recsys_llm.typed_config import check_str_settings
from recsys_llm.semantics.train_checkpoint import (
    CHECKPOINT_OPTIMIZER_FILE,
    CHECKPOINT_RNG_FILE,
    CHECKPOINT_STATE_FILE,
    CheckpointOwner,
    check_checkpoint_tensors,
    check_tensor_file,
    checkpoint_swap,
    damaged_checkpoint_file,
    find_checkpoint,
    grad_scaler_state,
    load_checkpoint_tensors,
    load_optimizer_file,
    restore_grad_scaler,
    restore_optimizer,
    restore_rng_state,
    rng_state,
    setting_differences,
)

if TYPE_CHECKING:
    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig

ADAPT_CHECKPOINT = CheckpointOwner("CTR-adapted LLM", "adapt")
CHECKPOINT_SUFFIX = ".checkpoint"  # semantics adapt: <output-dir>.checkpoint, beside the output
# the files of a tuning checkpoint: trained tensors as the optimizer steps them (float32 master copies
# of float16 / bfloat16 weights), beside train_checkpoint's AdamW state, RNG states (with the epoch
# order's generator here) and state
CHECKPOINT_LLM_FILE = "llm_tuned.safetensors"
CHECKPOINT_HEADS_FILE = "heads.safetensors"
CHECKPOINT_FILES = (CHECKPOINT_LLM_FILE, CHECKPOINT_HEADS_FILE, CHECKPOINT_OPTIMIZER_FILE, CHECKPOINT_RNG_FILE,
                    CHECKPOINT_STATE_FILE)
ORDER_RNG_KEY = "order"  # in rng.safetensors: the generator state the epoch's order is drawn from


def adapt_checkpoint_dir(output_dir: str) -> str:
    """Where ``semantics adapt`` keeps the checkpoint of a tuning into ``output_dir``: beside it,
    ``<output_dir>.checkpoint``.

    Not inside: the output directory is written whole at the end
    (:func:`~recsys_llm.semantics.ctr_llm_store.save_ctr_llm`, a swap that replaces every entry of an
    earlier output) and only an earlier saved CTR-adapted LLM may be replaced, so a checkpoint in it
    would be deleted by that swap, and would make a first run's directory look like something else
    when it is killed.
    """
    return os.path.normpath(output_dir) + CHECKPOINT_SUFFIX


@dataclasses.dataclass
class TuneCheckpoint:
    """Where and how often :func:`~recsys_llm.semantics.ctr_llm.tune_ctr_llm` saves what it needs to go on exactly.

    Args:
        directory (str): the checkpoint directory (``semantics adapt``: :func:`adapt_checkpoint_dir`),
            replaced whole at each save.
        every_steps (int): save after every this many steps (counted over all epochs), and at each
            epoch's end; 0: at epoch ends only.
        resume (bool): go on from a checkpoint in ``directory``; off: start over (the first save replaces it).
        settings (Dict[str, Any]): more settings a resumed tuning must share with the checkpoint, besides
            :class:`~recsys_llm.semantics.ctr_llm.CTRLLMConfig` (less ``epochs``), the base model and the
            tuning rows: e.g. the schema, split and row-text settings that made the texts, and ``sample_rows``
            when the caller sampled.

    Example::

        checkpoint = TuneCheckpoint(adapt_checkpoint_dir("runs/ctr_llm"), every_steps=200)
        losses = tune_ctr_llm(llm, texts, labels, config, checkpoint=checkpoint)
    """

    directory: str
    every_steps: int = 200
    resume: bool = True
    settings: Dict[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self) -> None:
        check_str_settings(self, (), "TuneCheckpoint", paths=("directory",))
        if isinstance(self.every_steps, bool) or not isinstance(self.every_steps, int) or self.every_steps < 0:
            raise ValueError("TuneCheckpoint.every_steps (semantics adapt --checkpoint-every) must be an integer >= 0, "
                             f"got {self.every_steps!r}")


def check_checkpoint_dir(directory: str) -> None:
    """Refuses, before any work, a checkpoint path (or its ``.tmp`` / ``.old``) that holds other
    files, which a save would replace.

    Raises:
        FileExistsError: ``directory`` is a file, or holds an entry a checkpoint does not.
    """
    for path in (directory, f"{directory}.tmp", f"{directory}.old"):
        check_own_entries(path, "CTR-adapted LLM tuning checkpoint", CHECKPOINT_FILES.__contains__,
                          ", ".join(CHECKPOINT_FILES))


def remove_checkpoint(directory: str) -> None:
    """Removes a tuning checkpoint (and what a killed swap left of it): once its model is saved it is
    not needed, and the AdamW state of ``last_k`` layers is twice their size."""
    for path in (f"{directory}.tmp", f"{directory}.old", directory):
        remove_directory(path)


def _rows_digest(texts: Sequence[str], labels: np.ndarray) -> str:
    """sha256 (16 hex digits) over the tuning rows' texts and labels, in order."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels):
        digest.update(json.dumps([text, float(label)]).encode("utf-8"))
    return digest.hexdigest()[:16]


# in a resume signature when the base model directory's own code ran (or None: not known yet)
OWN_CODE_KEY = "own_code"


def resume_signature(config: "CTRLLMConfig", texts: Sequence[str], labels: np.ndarray,
                      settings: Dict[str, Any], own_code: Optional[bool] = False) -> Dict[str, Any]:
    """What a resumed tuning must share with its checkpoint: the settings less ``epochs`` (more may
    follow), the base model's files and whether their directory's own code runs (``own_code``:
    ``trust_remote_code``, :func:`~recsys_llm.semantics.model_loading.runs_own_code`), the sampled rows
    (texts and labels) and the caller's ``settings``. ``own_code`` None: not known yet (no model loaded), and
    not compared.

    The base model's files are those at the top of its directory, all that the CTR-adapted LLM loads: a
    checkpoint or output kept in a subdirectory of it (``--output-dir <model>/ctr_llm``) is not the model's.
    """
    signature = dataclasses.asdict(config)
    signature.pop("epochs")
    path = config.model_path
    signature["base_model_fingerprint"] = (model_dir_fingerprint(path, subdirectories=False) if os.path.isdir(path)
                                           else None)
    signature["rows_sha256"] = _rows_digest(texts, labels)
    if own_code is not False:  # True, or None (unknown); not False: checkpoints written before it keep their signature
        signature[OWN_CODE_KEY] = own_code
    return json.loads(json.dumps({**signature, **settings}))  # as state.json gives it back (tuples as lists)


class TuneCheckpointer:
    """Saves and restores one tuning's state in ``checkpoint.directory``.

    The position saved is (``epoch``, ``step``): epochs done and steps done in the next, with the
    generator state that epoch's order is drawn from (a resumed run draws the same order and skips
    ``step`` batches), every loss so far, AdamW's and the loss scaler's state, torch's RNG states
    (dropout), and the trained tensors.
    """

    def __init__(self, checkpoint: TuneCheckpoint, signature: Dict[str, Any], epochs: int) -> None:
        self._checkpoint = checkpoint
        self._signature = signature
        self._epochs = epochs

    @property
    def directory(self) -> str:
        return self._checkpoint.directory

    def due(self, steps_done: int) -> bool:
        """Whether a save is due after ``steps_done`` steps in all (epoch ends aside)."""
        every = self._checkpoint.every_steps
        return every > 0 and steps_done % every == 0

    def save(self, model: "CTRAdaptedLLM", steps: LowPrecisionSteps, position: Tuple[int, int],
             order_state: torch.Tensor, losses: List[float]) -> None:
        """Writes the checkpoint of ``position`` (epochs done, steps done in the next) whole, or leaves the last one."""
        device = next(model.parameters()).device
        with checkpoint_swap(self.directory) as tmp:
            for name, params in _trained_parameters(model).items():
                save_file({key: steps.trained_tensor(p).detach().cpu().contiguous() for key, p in params.items()},
                          os.path.join(tmp, name))
            torch.save(steps.optimizer.state_dict(), os.path.join(tmp, CHECKPOINT_OPTIMIZER_FILE))
            save_file({**rng_state(device), ORDER_RNG_KEY: order_state}, os.path.join(tmp, CHECKPOINT_RNG_FILE))
            state = {"epoch": position[0], "step": position[1], "losses": losses, **grad_scaler_state(steps),
                     "signature": self._signature}
            with open(os.path.join(tmp, CHECKPOINT_STATE_FILE), "w", encoding="utf-8") as handle:
                json.dump(state, handle, indent=2)

    def read_state(self, path: str) -> Dict[str, Any]:
        """``state.json`` of the checkpoint ``path``, checked against these settings and ``epochs``.

        Raises:
            ValueError: a damaged file, other settings (named, with their values), or a checkpoint past ``epochs``.
        """
        state_file = os.path.join(path, CHECKPOINT_STATE_FILE)
        state = read_json_file(state_file, f"; the {ADAPT_CHECKPOINT.name} checkpoint is damaged: "
                                           f"{ADAPT_CHECKPOINT.remedy(path)}")
        if not (isinstance(state, dict) and isinstance(state.get("signature"), dict)
                and all(isinstance(state.get(key), int) and state[key] >= 0 for key in ("epoch", "step"))
                and isinstance(state.get("losses"), list)):
            raise damaged_checkpoint_file(state_file, "expected a JSON object with epoch, step, losses and signature",
                                          ADAPT_CHECKPOINT)
        signature, expected = state.pop("signature"), self._signature
        unknown = [OWN_CODE_KEY] if expected.get(OWN_CODE_KEY, False) is None else []  # before the model loads
        files = signature.get("base_model_fingerprint")
        if files and files == expected.get("base_model_fingerprint"):  # the same files, wherever the model lies now
            unknown.append("model_path")
        signature, expected = ({k: v for k, v in d.items() if k not in unknown} for d in (signature, expected))
        if signature != expected:
            raise ValueError(
                f"{path}: checkpoint was made with other settings "
                f"({'; '.join(setting_differences(signature, expected))}); use the same settings, another "
                "--output-dir, or --no-resume to adapt again from scratch"
            )
        epoch, step = state["epoch"], state["step"]
        if epoch > self._epochs or (epoch == self._epochs and step > 0):
            done = f"{epoch} epoch(s)" + (f" and {step} step(s)" if step else "")
            raise ValueError(
                f"{path}: already tuned for {done}, more than the --epochs {self._epochs} asked for; ask for --epochs "
                f"{epoch + 1 if step else epoch} or more to go on from it, --no-resume to adapt {self._epochs} "
                "epoch(s) again from scratch, or another --output-dir"
            )
        return state

    def precheck(self) -> None:
        """The checks of :meth:`load` that need no model: settings, epochs and whole files."""
        path = find_checkpoint(self.directory, CHECKPOINT_STATE_FILE)
        if path is None:
            return
        self.read_state(path)
        for name in (CHECKPOINT_LLM_FILE, CHECKPOINT_HEADS_FILE, CHECKPOINT_RNG_FILE):
            check_tensor_file(os.path.join(path, name), ADAPT_CHECKPOINT)
        if not os.path.isfile(os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)):
            raise damaged_checkpoint_file(os.path.join(path, CHECKPOINT_OPTIMIZER_FILE), "missing", ADAPT_CHECKPOINT)

    def load(self, model: "CTRAdaptedLLM", steps: LowPrecisionSteps,
             generator: torch.Generator) -> Optional[Tuple[int, int, List[float]]]:
        """Restores the trained tensors, AdamW, loss scaler, RNG states and the order's generator from
        the checkpoint (or its ``.old``); every file is read and checked before any is applied.

        Returns:
            Optional[Tuple[int, int, List[float]]]: epochs done, steps done in the next, and the losses
            so far; None when there is no checkpoint.

        Raises:
            ValueError: a damaged checkpoint file (named, with the remedy), other settings, or a
                checkpoint past ``epochs``.
        """
        path = find_checkpoint(self.directory, CHECKPOINT_STATE_FILE)
        if path is None:
            return None
        state = self.read_state(path)
        tensors = {name: self._read_tensors(path, name, steps, params)
                   for name, params in _trained_parameters(model).items()}
        optimizer_file = os.path.join(path, CHECKPOINT_OPTIMIZER_FILE)
        optimizer_state = load_optimizer_file(optimizer_file, ADAPT_CHECKPOINT)
        rng_file = os.path.join(path, CHECKPOINT_RNG_FILE)
        rng = load_checkpoint_tensors(rng_file, ADAPT_CHECKPOINT)
        order_state = rng.pop(ORDER_RNG_KEY, None)
        if order_state is None:
            raise damaged_checkpoint_file(rng_file, f"no {ORDER_RNG_KEY!r} generator state", ADAPT_CHECKPOINT)
        for name, params in _trained_parameters(model).items():
            for key, param in params.items():
                steps.set_trained_tensor(param, tensors[name][key])
        restore_grad_scaler(steps, state, os.path.join(path, CHECKPOINT_STATE_FILE), ADAPT_CHECKPOINT)
        restore_optimizer(steps, optimizer_state, optimizer_file, "AdamW state of this model's trained tensors",
                          ADAPT_CHECKPOINT)
        device = next(model.parameters()).device
        try:
            generator.set_state(order_state)
        except (RuntimeError, TypeError) as error:
            raise damaged_checkpoint_file(rng_file, f"{ORDER_RNG_KEY!r} is not a generator state: {one_line(error)}",
                                          ADAPT_CHECKPOINT) from error
        if not restore_rng_state(rng_file, rng, device, ADAPT_CHECKPOINT):
            warnings.warn(f"{path}: saved without a CUDA RNG state (tuned on CPU), resumed on {device}: the "
                          "CTR-adapted LLM is not bit-identical to one tuned in one go", stacklevel=3)
        return state["epoch"], state["step"], [float(loss) for loss in state["losses"]]

    @staticmethod
    def _read_tensors(path: str, name: str, steps: LowPrecisionSteps,
                      params: Dict[str, nn.Parameter]) -> Dict[str, torch.Tensor]:
        """The tensors of ``name`` in the checkpoint ``path``: those of ``params``, of their trained shapes
        and dtypes."""
        file = os.path.join(path, name)
        tensors = load_checkpoint_tensors(file, ADAPT_CHECKPOINT)
        expected = {key: (tuple(p.shape), steps.trained_tensor(p).dtype) for key, p in params.items()}
        check_checkpoint_tensors(file, {key: (tuple(t.shape), t.dtype) for key, t in tensors.items()}, expected,
                                 "tensor(s) missing, unknown or of other shapes or dtypes", ADAPT_CHECKPOINT)
        return tensors


def _trained_parameters(model: "CTRAdaptedLLM") -> Dict[str, Dict[str, nn.Parameter]]:
    """The trained parameters by checkpoint file: the LLM's (LoRA or last layers) and the heads'."""
    return {
        CHECKPOINT_LLM_FILE: {n: p for n, p in model.llm.named_parameters() if p.requires_grad},
        CHECKPOINT_HEADS_FILE: {**{f"transform.{n}": p for n, p in model.transform.named_parameters()},
                                **{f"predict.{n}": p for n, p in model.predict.named_parameters()}},
    }
