"""Atomic, resumable checkpoints with ``torch.distributed.checkpoint`` (DCP).

Layout of a checkpoint directory::

    checkpoints/
      ckpt-00000120/          a finished checkpoint (global step 120)
        .metadata, __0_0.distcp, __1_0.distcp   DCP: model + optimizer state, every rank's shards
        rank00000.pt, rank00001.pt               per-rank RNG states (tensors only)
        files.sha256.json                        the SHA-256 of each file above, checked before a load
        train_state.json                         epoch, step in epoch, best AUC, ... (written last)
      ckpt-00000160.tmp/      a checkpoint being written: ignored, removed by the next save
      ckpt-00000120.prev/     a complete checkpoint of step 120 set aside while a new one of the
                              same step takes its name; loaded only while ``ckpt-00000120`` is missing
      ckpt-00000080.deleting/ an old checkpoint being pruned (renamed first, so a kill never leaves a
                              half-deleted ``ckpt-*`` that looks complete): removed by the next save
      latest                  "ckpt-00000120", replaced atomically (write + os.replace), for people

What is saved: the DMP model ``state_dict()`` (sharded tables as ShardedTensors, dense
weights), the **fused table optimizer state** (e.g. RowWiseAdagrad's ``momentum1`` shards,
from ``model.fused_optimizer``) and the dense optimizer state -- both through the
``CombinedOptimizer``'s keyed ``state`` -- plus epoch / step / reader position (batches
consumed in the epoch), early-stopping state, the fused table optimizers' step counter
(FBGEMM's ``iter``, which fused Adam's bias correction reads and which no ``state_dict``
holds) and every rank's torch, numpy and Python RNG states. Every rank writes its own
shards; rank 0 writes ``train_state.json`` and then renames ``ckpt-N.tmp`` to ``ckpt-N``
and replaces ``latest``. A crash at any moment leaves either the previous checkpoint or
the new one, never a half one: loaders take the newest complete ``ckpt-*`` (one with
``train_state.json``). They do not trust ``latest``, which a kill between the rename and
its replacement leaves one checkpoint behind.

A step saved twice (a mid-epoch checkpoint on the epoch's last step, then the epoch-end one)
never leaves a moment without a complete checkpoint of that step: the old ``ckpt-N`` is
renamed ``ckpt-N.prev``, the new one renamed into place, and only then is ``.prev`` removed.
A kill in between leaves ``ckpt-N.prev``, which loaders take as that step's checkpoint.

A checkpoint of a state another directory already holds (``checkpoints/ckpt-N`` after the validation of step N
saved ``best/ckpt-N``) hard-links that one's files (``same_state_as``): a checkpoint's files are never changed
in place, so two names of one file are as safe as two copies, and the model is written once.

Loading never executes code: DCP's ``.metadata`` pickle is read by an unpickler that
knows only DCP's own metadata classes (plain ``pickle.load`` in DCP's reader would run any
callable a crafted file names), DCP's non-tensor payloads by a load planner that calls
``torch.load(weights_only=True)``, the per-rank files likewise, and the train state is JSON.
Only tensors go into the DCP state (optimizer hyper-parameters come from the config).

**Resharding.** DCP stores every shard with its global offsets, so a checkpoint loads into
a different plan or a different world size: tables and their optimizer state (e.g.
RowWiseAdagrad's per-row momentum) are re-cut to the new shards (tested on CPU: a 2-rank
table-wise plan -> 1 rank; row-wise shards exist only on CUDA). Exact continuation
(bit-identical to an uninterrupted run) needs the same world size: with another one the per-rank RNG
states are not restored (ranks reseed from ``seed + global_step + rank``) and the reader
position is converted in samples (``step * batch * old_world / (batch * new_world)``),
which is exact at an epoch boundary; mid-epoch the ranks' row shares differ, so the runner
refuses it unless ``train.reshard_mid_epoch`` accepts some rows of that epoch repeating.

Example::

    manager = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep=2)
    manager.save(model, optimizer, TrainState(epoch=0, step_in_epoch=40, global_step=40))
    path = manager.latest()
    state = load_checkpoint(path, model, optimizer)
"""

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import re
import shutil
from typing import Any, Callable, Collection, Dict, Iterator, List, Mapping, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fbgemm_gpu.split_embedding_configs import EmbOptimType
from torch import nn
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.api import CheckpointException
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper, OptimizerWrapper

from recsys_llm.atomic_dir import fsync_directory, write_text_atomically
from recsys_llm.data.validation import check_number
from recsys_llm.file_hash import file_sha256, files_sha256
from recsys_llm.paths import file_problem, is_plain_file_name
from recsys_llm.train.checkpoint_reader import (
    SafeFileSystemReader,
    WeightsOnlyLoadPlanner,
    damaged_checkpoint_error,
    require_no_weights_beyond,
)
from recsys_llm.train.distributed import all_ranks_true, barrier, collective_device, host_group
from recsys_llm.train.sharding import embedding_kernels

PREVIOUS_SUFFIX = ".prev"  # a complete checkpoint set aside while one of the same step replaces it
DELETING_SUFFIX = ".deleting"  # a pruned checkpoint, renamed before it is removed
_CKPT_RE = re.compile(r"^ckpt-(\d{8,})(\.prev)?$")  # 8 digits, more past step 99,999,999
TRAIN_STATE_FILE = "train_state.json"
#: ``{file: sha256}`` of every other file of a checkpoint, written before ``train_state.json`` and checked on load:
#: DCP keeps no checksums, so a flipped byte in a ``.distcp`` or rank file would otherwise load as a wrong weight
DIGESTS_FILE = "files.sha256.json"
LATEST_FILE = "latest"
# what tells one trained state from another (step, best metric, the tensors' storage layout), small
# enough to hash whole: teacher.json of teacher outputs and an export's config.json record their sha256
IDENTITY_FILES = (TRAIN_STATE_FILE, ".metadata")
# TrainState.stop_reason: why a finished run stopped
STOP_PATIENCE = "patience"  # early stopping: final whatever the budget of a resume
STOP_BUDGET = "budget"  # train.epochs or train.max_steps used up: a resume with more budget goes on


@dataclasses.dataclass
class TrainState:
    """Where training stands; stored as JSON next to the tensors.

    Args:
        epoch (int): current epoch (0-based).
        step_in_epoch (int): batches this rank has consumed (and trained on) in ``epoch``.
        global_step (int): optimizer steps since the start.
        best_metric (float): best validation AUC so far (``-inf`` before the first eval).
        best_step (int): global step of the best evaluation.
        bad_evals (int): evaluations since the best one (early-stopping patience counter).
        world_size (int): ranks that wrote the checkpoint (set by :meth:`CheckpointManager.save`).
        batch_size (int): per-rank batch size when it was written.
        finished (bool): training ended (early stop, or the budget of epochs / max_steps used up).
        stop_reason (str): why it finished: ``STOP_PATIENCE``, ``STOP_BUDGET``, or ``""`` (not
            finished, or a checkpoint written before the reason was recorded).
        table_optimizer_step (int): the fused table kernels' step counter (FBGEMM's ``iter``:
            one per training forward, as evaluation puts it back; fused Adam's bias correction
            reads it), set by :meth:`CheckpointManager.save` and restored by :func:`load_checkpoint`.
        validated_step (int): global step of the last validation (-1: none yet, or a checkpoint written
            before it was recorded): a job resumed at that step trains nothing new to validate.
        loss_window_sum (float): the sum of the batch losses since the last ``train`` record of
            ``metrics.jsonl`` (their mean over the ranks), ``loss_window_steps`` steps of them.
        epoch_loss_sum (float): the sum of the batch losses of ``epoch`` so far (their mean over the ranks),
            ``epoch_loss_steps`` steps of them. These four let a resumed job's loss records be the
            uninterrupted run's (:mod:`recsys_llm.train.loss_sums`); 0 in checkpoints written before
            2026-12-06, whose resumed records count only the steps after the resume.
    """

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    best_metric: float = float("-inf")
    best_step: int = -1
    bad_evals: int = 0
    world_size: int = 1
    batch_size: int = 0
    finished: bool = False
    stop_reason: str = ""
    table_optimizer_step: int = 0
    validated_step: int = -1
    loss_window_sum: float = 0.0
    loss_window_steps: int = 0
    epoch_loss_sum: float = 0.0
    epoch_loss_steps: int = 0

    def to_json(self) -> str:
        raw = dataclasses.asdict(self)
        raw["best_metric"] = None if raw["best_metric"] == float("-inf") else raw["best_metric"]
        return json.dumps(raw, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainState":
        try:
            raw = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"{source}: not valid JSON: {error}") from error
        if not isinstance(raw, dict):
            raise ValueError(f"{source}: holds a JSON {type(raw).__name__}, expected an object of train-state keys; "
                             "the checkpoint is damaged: delete it to resume from the one before")
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise ValueError(f"{source}: unknown train-state keys {sorted(unknown)}")
        if raw.get("best_metric") is None:
            raw["best_metric"] = float("-inf")
        for spec in dataclasses.fields(cls):
            value = raw.get(spec.name, spec.default)
            expected = (int, float) if spec.type is float else spec.type
            if not isinstance(value, expected) or (isinstance(value, bool) and spec.type is not bool):
                raise ValueError(f"{source}: train-state key {spec.name!r} must be {spec.type.__name__}, got "
                                 f"{value!r}; the checkpoint is damaged: delete it to resume from the one before")
        return cls(**raw)


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def _rng_state() -> Dict[str, torch.Tensor]:
    """Torch (CPU, CUDA), numpy and Python RNG states, all as tensors."""
    np_state = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_meta": torch.tensor([np_state[2], np_state[3]], dtype=torch.int64),
        "numpy_gauss": torch.tensor([np_state[4]], dtype=torch.float64),
        "python": torch.tensor(py_state, dtype=torch.int64),
        "python_meta": torch.tensor([py_version], dtype=torch.int64),
    }
    if py_gauss is not None:
        state["python_gauss"] = torch.tensor([py_gauss], dtype=torch.float64)
    if torch.cuda.is_initialized():  # a CUDA run (a CPU run on a GPU host opens no CUDA context for it)
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: Dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch"])
    meta = state["numpy_meta"].tolist()
    np.random.set_state(("MT19937", state["numpy_keys"].numpy().astype(np.uint32), meta[0], meta[1], float(state["numpy_gauss"][0])))
    gauss = float(state["python_gauss"][0]) if "python_gauss" in state else None
    random.setstate((int(state["python_meta"][0]), tuple(int(v) for v in state["python"].tolist()), gauss))
    if torch.cuda.is_initialized():  # the model is on the GPU by now
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"])
        else:  # saved by a CPU job: every rank's GPU stream is still train.seed's, and would draw the same dropout
            cpu_state = state["torch"].numpy().tobytes()  # each rank's own (give_rank_its_own_stream)
            torch.cuda.manual_seed(int.from_bytes(hashlib.sha256(cpu_state).digest()[:8], "little") >> 1)


def _counting_kernels(model: nn.Module) -> List[Any]:
    """The FBGEMM modules of the model's fused table kernels that keep a step counter (``iter``)."""
    modules = [kernel.emb_module for _, kernel in embedding_kernels(model)]
    return [module for module in modules if isinstance(getattr(module, "iter", None), torch.Tensor)]


def _table_optimizer_step(model: nn.Module) -> int:
    """The fused table optimizers' step counter: the largest ``iter`` of any kernel on any rank
    (collective). Every kernel whose optimizer counts (Adam, row-wise Adagrad) counts every forward
    alike; SGD's stays 0, and a rank may hold no kernel."""
    local = max((int(module.iter.max()) for module in _counting_kernels(model)), default=0)
    step = torch.tensor([local], dtype=torch.int64, device=collective_device())
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(step, op=dist.ReduceOp.MAX)
    return int(step.item())


def _set_table_optimizer_step(model: nn.Module, step: int) -> None:
    """Sets every fused table kernel's step counter to ``step`` (also its host copy, which FBGEMM
    otherwise takes from ``iter`` only while it is 0), as an uninterrupted run has it."""
    for module in _counting_kernels(model):
        if module.optimizer == EmbOptimType.NONE:  # no optimizer: nothing counts
            continue
        module.iter.fill_(step)
        if isinstance(getattr(module, "iter_cpu", None), torch.Tensor):
            module.iter_cpu.fill_(step)


@contextlib.contextmanager
def table_step_counters_kept(model: nn.Module) -> Iterator[None]:
    """Puts the fused table kernels' step counters (``iter`` and its host copy) back after the block.

    FBGEMM adds one per forward, evaluation included, and fused Adam's bias correction reads the
    count: without this, the training steps after a validation of N batches took the step size of
    N steps later, so the trained tables depended on ``data.eval_batch_size``, ``train.eval_every``
    and the size of the valid split. :func:`~recsys_llm.train.pipeline.evaluate` runs in it.
    """
    saved = []
    for module in _counting_kernels(model):
        host = getattr(module, "iter_cpu", None)
        saved.append((module, module.iter.clone(), host.clone() if isinstance(host, torch.Tensor) else None))
    try:
        yield
    finally:
        for module, step, host in saved:
            module.iter.copy_(step)
            if host is not None:  # FBGEMM moves its host copy to the CPU at the first forward: copy into that one
                module.iter_cpu.copy_(host)


def _dcp_state(model: nn.Module, optimizer: CombinedOptimizer) -> Dict[str, Any]:
    """The tensors DCP saves/loads in place: model state and optimizer ``state``.

    Empty per-parameter states (a frozen table's stateless optimizer) are left out: DCP
    saves nothing for them, and asking for them at load fails once ranks hold different
    tables. So is ``optim`` itself when no state is left (SGD everywhere): DCP saves no key
    for an empty dict, and a load asking for one fails.
    """
    state = {k: v for k, v in optimizer.state_dict()["state"].items() if not (isinstance(v, dict) and not v)}
    return {"model": model.state_dict(), "optim": state} if state else {"model": model.state_dict()}


def _materialise_dense_optimizer_state(optimizer: CombinedOptimizer) -> List[KeyedOptimizerWrapper]:
    """Creates lazy dense optimizer state (Adam moments) so DCP can load into it in place.

    Runs one zero-gradient step on the dense ``KeyedOptimizerWrapper`` parts only (also inside an
    ``OptimizerWrapper``: ``optim.max_grad_norm``'s ``GradientClippingOptimizer``, whose state is its
    inner optimizer's; skipped, the load found no state to fill and the dense optimizer restarted
    fresh); whatever it changes is overwritten by the load that follows.

    Returns:
        List[KeyedOptimizerWrapper]: the parts whose state it created.
    """
    materialised = []
    for _, part in optimizer.optimizers:
        while isinstance(part, OptimizerWrapper):
            part = part._optimizer  # noqa: SLF001 (torchrec has no public accessor)
        if isinstance(part, KeyedOptimizerWrapper) and not part.state:
            part.init_state()
            part.zero_grad(set_to_none=True)
            materialised.append(part)
    return materialised


def _never_stepped(
    path: str, metadata: Metadata, optimizer: CombinedOptimizer, materialised: List[KeyedOptimizerWrapper],
    before_first_step: bool,
) -> Dict[str, Dict[str, Any]]:
    """The states :func:`_materialise_dense_optimizer_state` created for parameters that had none
    when the checkpoint was written (no gradient yet: unused by the loss so far), by optimizer key.

    Within a part whose other parameters' states the checkpoint holds, or in any part when the
    checkpoint was written before the first optimizer step (``before_first_step``). Otherwise a part
    without any saved state was another (stateless) optimizer, or no gradient had reached any of its
    parameters by the save (which the checkpoint cannot tell apart), and the load refuses it.

    Raises:
        ValueError: an unfused optimizer part keeps state here and the checkpoint, written after steps, holds none.
    """
    key_of = {id(param): key for key, param in optimizer.params.items()}
    saved = sorted({key.rsplit(".", 1)[0] for key in metadata.state_dict_metadata if key.startswith("optim.")})
    saved_set = set(saved)

    def in_checkpoint(key: str) -> bool:  # ``optim.<key>.<state>``, or a state DCP flattened further
        return f"optim.{key}" in saved_set or any(name.startswith(f"optim.{key}.") for name in saved)

    missing: Dict[str, Dict[str, Any]] = {}
    for part in materialised:
        keys = [key_of[id(param)] for param in part.params.values() if param in part.state]
        absent = [key for key in keys if not in_checkpoint(key)]
        if absent and len(absent) == len(keys) and not before_first_step:
            others = f" nor for the {len(absent) - 1} other parameters" if len(absent) > 1 else ""
            kind = type(part._optimizer).__name__  # noqa: SLF001 (torchrec has no public accessor)
            raise ValueError(
                f"{path}: holds no optimizer state for {absent[0]!r}{others} that this job's "
                f"{kind} keeps state for, although it was written after optimizer steps: "
                "it was trained with a stateless optimizer for them (another optim.dense or optim.sparse, such as "
                "sgd), or with those tables sharded where this plan replicates them (data_parallel); load it with "
                "the config it was trained with (or, where no gradient had reached any of these parameters by the "
                "save, e.g. an optimizer of your own loop for a module that joins the loss later, save after it does)"
            )
        missing.update({key: part.state[optimizer.params[key]] for key in absent})
    return missing


def _written_before_first_step(state: TrainState) -> bool:
    """Whether a checkpoint of ``state`` was written before any training step: no optimizer step, and no batch of
    any epoch consumed. ``global_step`` alone is not enough: ``TrainState`` defaults it to 0, so a loop of one's own
    that never sets it (``TrainState(epoch=e, step_in_epoch=s)``) would pass a checkpoint of another (stateless)
    optimizer as one written before its first step."""
    return state.global_step == 0 and state.epoch == 0 and state.step_in_epoch == 0


def _checkpoint_name(global_step: int) -> str:
    return f"ckpt-{global_step:08d}"


def is_complete(path: str) -> bool:
    """A finished checkpoint: named ``ckpt-N`` or ``ckpt-N.prev`` (not ``.tmp``) and holding
    ``train_state.json``."""
    return bool(_CKPT_RE.match(os.path.basename(os.path.abspath(path)))) and os.path.isfile(
        os.path.join(path, TRAIN_STATE_FILE)
    )


class CheckpointManager:
    """Writes checkpoints atomically into ``directory`` and finds the latest complete one.

    Args:
        directory (str): the run's checkpoint directory (created if missing).
        keep (int): complete checkpoints to keep (older ones are deleted; 0 keeps all).
        before_save (Optional[Callable[[str], None]]): called on every rank with the checkpoint's path
            before it is written (a note in the log: a large model's save takes minutes).
    """

    def __init__(self, directory: str, *, keep: int = 2, before_save: Optional[Callable[[str], None]] = None) -> None:
        check_number("CheckpointManager: keep", keep, integer=True, minimum=0)  # True or "3" was kept as it was
        if before_save is not None and not callable(before_save):
            raise TypeError(f"CheckpointManager: before_save must be a callable of the checkpoint's path, got "
                            f"{before_save!r}")
        self._directory = directory
        self._keep = int(keep)
        self._before_save = before_save

    @property
    def directory(self) -> str:
        return self._directory

    def list_complete(self) -> List[str]:
        """Complete checkpoints, one per step, oldest first (``.tmp`` and half-written directories
        ignored; a step's ``ckpt-N.prev`` only when its ``ckpt-N`` is not complete)."""
        if not os.path.isdir(self._directory):
            return []
        by_step: Dict[int, str] = {}
        for name in sorted(os.listdir(self._directory)):  # "ckpt-N" sorts before "ckpt-N.prev"
            match = _CKPT_RE.match(name)
            path = os.path.join(self._directory, name)
            if match and is_complete(path):
                by_step.setdefault(int(match.group(1)), path)
        return [by_step[step] for step in sorted(by_step)]

    def incomplete_after(self, global_step: int) -> List[str]:
        """``ckpt-N`` directories past ``global_step`` that are not complete checkpoints (no regular
        ``train_state.json``). A save fills ``ckpt-N.tmp`` and renames it whole, so such a directory is damage
        (a file deleted or replaced by hand), not an interrupted save: a resume that passes over it says so."""
        if not os.path.isdir(self._directory):
            return []
        return [os.path.join(self._directory, name) for name in sorted(os.listdir(self._directory))
                if (match := _CKPT_RE.match(name)) and not match.group(2) and int(match.group(1)) > global_step
                and os.path.isdir(os.path.join(self._directory, name))
                and not is_complete(os.path.join(self._directory, name))]

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint, else None.

        Not the one the ``latest`` file names: that file is rewritten after the rename, so a
        process killed in between leaves it one checkpoint behind.
        """
        complete = self.list_complete()
        return complete[-1] if complete else None

    def holds_step(self, global_step: int) -> bool:
        """Whether ``ckpt-<global_step>`` is complete here (a set-aside ``.prev`` of the step does not count)."""
        return is_complete(os.path.join(self._directory, _checkpoint_name(global_step)))

    def complete_interrupted_save(self) -> None:
        """Does what a save killed after its rename left undone (collective; a no-op after a whole save).

        Removes its leftovers, renames a set-aside ``ckpt-N.prev`` without a complete ``ckpt-N`` back
        into place, points ``latest`` at the newest complete checkpoint and prunes.
        """
        if _rank() == 0 and os.path.isdir(self._directory):
            self._remove_leftovers()
            for path in self.list_complete():
                if path.endswith(PREVIOUS_SUFFIX):
                    _swap_into_place(path, path[: -len(PREVIOUS_SUFFIX)])
            newest = self.latest()
            if newest is not None and self._latest_file() != os.path.basename(newest):
                self._point_latest_at(os.path.basename(newest))
            self._prune()
        barrier()

    def _point_latest_at(self, name: str) -> None:
        """Rewrites the ``latest`` file to name the checkpoint ``name`` (atomically, directory synced)."""
        write_text_atomically(os.path.join(self._directory, LATEST_FILE), name + "\n")
        fsync_directory(self._directory)

    def _latest_file(self) -> Optional[str]:
        """The name the ``latest`` file holds (None without one)."""
        path = os.path.join(self._directory, LATEST_FILE)
        if not os.path.isfile(path):
            return None
        with open(path, encoding="utf-8") as handle:
            return handle.read().strip()

    def save(self, model: nn.Module, optimizer: CombinedOptimizer, state: TrainState,
             same_state_as: Optional[str] = None) -> str:
        """Saves a checkpoint (collective: every rank calls it at the same step).

        Args:
            model (nn.Module): the DMP model.
            optimizer (CombinedOptimizer): its table and dense optimizers.
            state (TrainState): where training stands; the copy written gets this job's ``world_size`` and the
                tables' ``table_optimizer_step`` (``state`` itself is left as it is).
            same_state_as (Optional[str]): a complete checkpoint saved at this step with nothing trained since
                (``best/``'s of the evaluation just made): where its ``train_state.json`` is the one this save
                writes, its files are hard-linked here instead of the state being written again (a file system
                without hard links gets the state written).

        Returns:
            str: the final checkpoint directory.
        """
        name = _checkpoint_name(state.global_step)
        final = os.path.join(self._directory, name)
        tmp = final + ".tmp"
        if self._before_save is not None:
            self._before_save(final)
        # the ranks that write it, whatever the caller's TrainState says: TrainState() defaults to 1, and a 2-rank
        # checkpoint recorded so would resume without its RNG states (load_checkpoint restores them per rank only
        # when the world size matches)
        saved = dataclasses.replace(state, table_optimizer_step=_table_optimizer_step(model),  # collective
                                    world_size=_world_size())
        if _rank() == 0:
            os.makedirs(self._directory, exist_ok=True)
            self._remove_leftovers()
            os.makedirs(tmp)
        linked = same_state_as is not None and all_ranks_true(
            _rank() != 0 or _linked_if_same_state(same_state_as, tmp, saved))
        if not linked:
            self._write(model, optimizer, saved, tmp)
        if _rank() == 0:
            _swap_into_place(tmp, final)
            self._point_latest_at(name)
            self._prune()
        barrier()
        return final

    def _write(self, model: nn.Module, optimizer: CombinedOptimizer, saved: TrainState, tmp: str) -> None:
        """Writes the checkpoint of ``saved`` into the empty directory ``tmp`` (collective)."""
        barrier()
        try:
            # DCP's coordination (plans, metadata, its barrier) is object collectives: on the host group, not
            # pickled and staged on this rank's GPU through NCCL at every checkpoint (None under gloo: the default)
            dcp.save(_dcp_state(model, optimizer), checkpoint_id=tmp, process_group=host_group())
            _save_synced(_rng_state(), os.path.join(tmp, f"rank{_rank():05d}.pt"))
            barrier()
            _write_digests(tmp)  # collective: every rank hashes a share of the files
            if _rank() == 0:
                write_text_atomically(os.path.join(tmp, TRAIN_STATE_FILE), saved.to_json())
                fsync_directory(tmp)
        except BaseException:
            # a failed save (a full disk, Ctrl-C) of one rank gives its space back at once: the half-written
            # directory would hold it until the next save, and a rerun on that full disk fails before saving
            if _world_size() == 1:
                shutil.rmtree(tmp, ignore_errors=True)
            raise

    def _remove_leftovers(self) -> None:
        """Removes what an interrupted save left: ``.tmp`` and ``.deleting`` directories, the temp
        file of a ``latest`` rewrite (``latest.<id>.tmp``), and ``ckpt-N.prev`` whose ``ckpt-N`` is
        complete (a ``.prev`` without one is that step's checkpoint and stays)."""
        for name in os.listdir(self._directory):
            path = os.path.join(self._directory, name)
            superseded = name.endswith(PREVIOUS_SUFFIX) and is_complete(path[: -len(PREVIOUS_SUFFIX)])
            if not (name.endswith((".tmp", DELETING_SUFFIX)) or superseded):
                continue
            if os.path.isdir(path) and not os.path.islink(path):
                shutil.rmtree(path, ignore_errors=True)
            else:  # rmtree refuses a file, and ignore_errors kept it there for good
                with contextlib.suppress(OSError):
                    os.remove(path)

    def _prune(self) -> None:
        """Removes all but the newest ``keep`` complete checkpoints, each renamed out of the
        ``ckpt-*`` names first: a kill inside the removal leaves no checkpoint missing some
        shards but holding ``train_state.json`` (which loaders would take as complete)."""
        if self._keep <= 0:
            return
        for old in self.list_complete()[: -self._keep]:
            doomed = old + DELETING_SUFFIX
            os.rename(old, doomed)
            shutil.rmtree(doomed, ignore_errors=True)


def _linked_if_same_state(source: str, tmp: str, saved: TrainState) -> bool:
    """Hard-links the files of the complete checkpoint ``source`` into the empty ``tmp`` when ``source`` holds
    ``saved`` (its ``train_state.json`` reads the same); False, ``tmp`` emptied, where it does not or the file
    system refuses a link. A checkpoint's files are never changed in place (saves write new directories and
    rename them), so the two names of a file hold the same bytes for as long as both exist."""
    try:
        if not is_complete(source) or read_train_state(source).to_json() != saved.to_json():
            return False
        names = os.listdir(source)
        if not all(os.path.isfile(os.path.join(source, name)) for name in names):
            return False  # a layout of subdirectories this does not know: written afresh
        for name in names:
            os.link(os.path.join(source, name), os.path.join(tmp, name))
    except (OSError, ValueError):  # EPERM / EXDEV / ENOTSUP where links are refused; an unreadable state
        for name in os.listdir(tmp):
            os.remove(os.path.join(tmp, name))
        return False
    fsync_directory(tmp)
    return True


def _swap_into_place(tmp: str, final: str) -> None:
    """Renames the written ``tmp`` to ``final``; an existing ``final`` (the same step saved
    before) is set aside as ``final.prev`` first and removed last, so at every moment one
    complete checkpoint of the step is there to load."""
    previous = final + PREVIOUS_SUFFIX
    if is_complete(final):
        if os.path.exists(previous):  # an older copy of the step, superseded by the complete final
            shutil.rmtree(previous)
        os.rename(final, previous)
        fsync_directory(os.path.dirname(final))
    elif os.path.exists(final):
        shutil.rmtree(final)  # not loadable: nothing to keep
    os.rename(tmp, final)
    fsync_directory(os.path.dirname(final))
    if os.path.exists(previous):
        shutil.rmtree(previous)


def _shared_sha256(directory: str, names: List[str]) -> Dict[str, str]:
    """SHA-256 of the files ``names`` of ``directory``, each rank hashing its share, every rank getting them all
    (collective): a checkpoint of many GB is read once over the ranks, not once per rank."""
    mine = names[_rank()::_world_size()]
    digests = dict(zip(mine, files_sha256([os.path.join(directory, name) for name in mine])))
    if _world_size() == 1:
        return digests
    shares: List[Any] = [None] * _world_size()
    dist.all_gather_object(shares, digests, group=host_group())
    return {name: digest for share in shares for name, digest in share.items()}


def _write_digests(directory: str) -> None:
    """Writes ``DIGESTS_FILE`` into the checkpoint being written in ``directory`` (rank 0): the SHA-256 of every
    plain file its ranks wrote (collective)."""
    names: List[Any] = [None]
    if _rank() == 0:  # one listing for every rank
        names[0] = sorted(name for name in os.listdir(directory) if name not in (TRAIN_STATE_FILE, DIGESTS_FILE)
                          and os.path.isfile(os.path.join(directory, name)))
    if _world_size() > 1:
        dist.broadcast_object_list(names, src=0, group=host_group())
    digests = _shared_sha256(directory, names[0])
    if _rank() == 0:
        text = json.dumps(digests, indent=1, sort_keys=True) + "\n"
        write_text_atomically(os.path.join(directory, DIGESTS_FILE), text)


def verify_digests(path: str) -> None:
    """Checks the files of the checkpoint ``path`` against its ``DIGESTS_FILE`` (collective; a checkpoint saved
    without one passes unchecked).

    Raises:
        ValueError: a file whose bytes differ from those saved (a damaged checkpoint), on every rank.
    """
    digests_file = os.path.join(path, DIGESTS_FILE)
    problem = file_problem(digests_file)
    if problem == "missing":  # a checkpoint saved without digests
        return
    if problem is not None:  # a directory, FIFO or dangling link: damage, not a checkpoint saved without one
        raise damaged_checkpoint_error(digests_file, ValueError(f"{problem}, expected the file of the checkpoint's "
                                                                "digests"))
    try:
        with open(digests_file, encoding="utf-8") as handle:
            recorded = json.load(handle)
        if not isinstance(recorded, dict) or not all(
                isinstance(name, str) and is_plain_file_name(name) and isinstance(digest, str)
                for name, digest in recorded.items()):
            raise ValueError("not a {file: sha256} object")
    except (OSError, ValueError) as error:
        raise damaged_checkpoint_error(digests_file, error) from error
    # a missing file is left to the readers, whose errors say what it is (a copy without the hidden .metadata)
    names = sorted(name for name in recorded if os.path.isfile(os.path.join(path, name)))
    for name, digest in sorted(_shared_sha256(path, names).items()):
        if digest != recorded[name]:
            links = _link_count(os.path.join(path, name))
            shared = (f"; the file is hard-linked into {links - 1} other checkpoint(s) of the run (best/ and "
                      "checkpoints/ of one step share their files), which hold the same damaged bytes" if links > 1
                      else "")
            differs = ValueError(f"its sha256 differs from the one {DIGESTS_FILE} recorded{shared}")
            raise damaged_checkpoint_error(os.path.join(path, name), differs)


def _link_count(path: str) -> int:
    """The names ``path``'s file has (1 where it cannot be read)."""
    try:
        return os.stat(path).st_nlink
    except OSError:
        return 1


def _save_synced(tensors: Dict[str, torch.Tensor], path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk like the checkpoint's other files."""
    with open(path, "wb") as handle:
        torch.save(tensors, handle)
        handle.flush()
        os.fsync(handle.fileno())


def read_train_state(path: str) -> TrainState:
    """The ``TrainState`` of a complete checkpoint."""
    state_file = os.path.join(path, TRAIN_STATE_FILE)
    if not os.path.isfile(state_file):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (no {TRAIN_STATE_FILE})")
    with open(state_file, encoding="utf-8") as handle:
        return TrainState.from_json(handle.read(), state_file)


def load_checkpoint(
    path: str,
    model: nn.Module,
    optimizer: Optional[CombinedOptimizer] = None,
    *,
    restore_rng: bool = True,
    only: Optional[Collection[str]] = None,
    sources: Optional[Mapping[str, str]] = None,
) -> TrainState:
    """Loads a checkpoint into a sharded model (and optimizer) in place (collective).

    Args:
        path (str): a complete checkpoint directory (holding ``train_state.json``; named ``ckpt-N`` in a
            run, or anything but ``*.tmp`` once copied out of it).
        model (nn.Module): the DMP model (any plan / world size: shards are re-cut).
        optimizer (Optional[CombinedOptimizer]): also restores fused + dense optimizer state (re-cut as the
            weights, except row-wise Adagrad's: one value per row of each column shard, refused where this plan
            splits a table's columns into another number of shards than the run's; a table replicated in one plan
            and sharded in the other is refused too).
        restore_rng (bool): restore this rank's RNG states (only when the world size matches).
        only (Optional[Collection[str]]): load these model state-dict keys alone (and, with ``optimizer``, the
            optimizer states of these parameters alone; the table step counter too): the model's other weights
            and states stay as they are, the checkpoint's other tensors unread (``train.init_scope=tables``).
            None: everything, the checkpoint holding no weights this model lacks.
        sources (Optional[Mapping[str, str]]): with ``only``, the checkpoint's key each of these keys loads from
            where it differs (a table the checkpoint keeps under another name: ``train.init_scope=tables`` matching
            tables by field; one checkpoint key may feed several of them); their optimizer states come from that
            key's, renamed alike (``<table>.momentum1``). None: each key from the same key.

    Returns:
        TrainState: the saved training position.

    Raises:
        ValueError: a key of ``only`` that the model or the checkpoint lacks.
    """
    # a copy under a name of its own (``models/deepfm_v1``) loads too; a ``.tmp`` directory is a save in progress
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint directory (if a training job runs in its run directory, "
                                "it may have removed it since: it keeps only its newest checkpoints; run again)")
    if os.path.normpath(path).endswith(".tmp") or not os.path.isfile(os.path.join(path, TRAIN_STATE_FILE)):
        raise FileNotFoundError(f"{path}: not a complete checkpoint (missing {TRAIN_STATE_FILE} or a .tmp directory)")
    try:
        return _load_complete_checkpoint(path, model, optimizer, restore_rng, only, sources or {})
    except (Exception, CheckpointException) as error:
        if not os.path.isdir(path):
            raise _removed_while_read(path) from error
        raise


def _only_keys(path: str, metadata: Metadata, target: Dict[str, Any], only: Collection[str],
               sources: Mapping[str, str]) -> Dict[str, Any]:
    """``target`` (:func:`_dcp_state`) restricted to the model keys ``only`` and their parameters' optimizer states
    (keyed alike); ``optim`` left out where none is left (DCP saves no key for an empty dict).

    Raises:
        ValueError: a key of ``only`` that the model or the checkpoint ``path`` (its ``metadata``) lacks (under
            its key of ``sources``, where given).
    """
    lacking = sorted(key for key in only if key not in target["model"])
    if lacking:
        raise ValueError(f"{path}: asked to load {lacking}, which this model does not have")
    unsaved = sorted(sources.get(key, key) for key in only
                     if f"model.{sources.get(key, key)}" not in metadata.state_dict_metadata)
    if unsaved:
        raise ValueError(f"{path}: holds no {unsaved} to load (a checkpoint of another model)")
    kept: Dict[str, Any] = {"model": {key: value for key, value in target["model"].items() if key in only}}
    optim = {key: value for key, value in target.get("optim", {}).items() if key in only}
    if optim:
        kept["optim"] = optim
    return kept


def table_of(key: str) -> str:
    """The table name of a table weight's state-dict key (``...embedding_bags.t_city.weight``: ``t_city``)."""
    return key.split(".")[-2]


def _renamed_rounds(target: Dict[str, Any], sources: Mapping[str, str]) -> List[Dict[str, Any]]:
    """``target`` keyed by the checkpoint's keys (``sources``: this model's key -> the checkpoint's, where they
    differ), holding this model's tensors, for DCP to load in place: a parameter's optimizer states renamed from
    its table's name to the checkpoint table's (``student_x.momentum1`` <- ``t_x.momentum1``). A checkpoint key that
    feeds several of this model's keys needs one load for each: one dict per round, each checkpoint key once in it.
    The rounds follow the model keys alone, which every rank holds (their optimizer states may differ by rank).

    Raises:
        ValueError: an optimizer state that is no tensor (DCP would load it into the round's dict alone).
    """
    rounds: List[Dict[str, Any]] = []
    optim = target.get("optim", {})
    # DCP loads tensors in place but puts other values into the round's dict, which would drop them unseen
    other = sorted(f"{key}: {name}" for key in target["model"] for name, state in optim.get(key, {}).items()
                   if not isinstance(state, torch.Tensor))
    if other:
        raise ValueError(f"optimizer states that are no tensors ({', '.join(other)}) cannot be loaded under another "
                         "table's name; set train.init_optimizer=false to take the tables' weights alone")
    for key in sorted(target["model"]):
        source = sources.get(key, key)
        part = next((part for part in rounds if source not in part["model"]), None)
        if part is None:
            part = {"model": {}}
            rounds.append(part)
        part["model"][source] = target["model"][key]
        if key in optim:
            table, source_table = table_of(key), table_of(source)
            part.setdefault("optim", {})[source] = {
                (f"{source_table}.{name[len(table) + 1:]}" if name.startswith(f"{table}.") else name): state
                for name, state in optim[key].items()}
    return rounds


def _removed_while_read(path: str) -> FileNotFoundError:
    """The error for a checkpoint directory gone while a job loaded it: a training job still running in
    its run directory prunes all but its newest checkpoints (and replaces its best one)."""
    return FileNotFoundError(f"{path}: removed while this job read it, by the training job still running in its run "
                             "directory (which keeps only its newest checkpoints, train.keep_checkpoints, and its "
                             "best one); run again, which reads the newest, or copy a checkpoint out of the run first")


def _load_complete_checkpoint(path: str, model: nn.Module, optimizer: Optional[CombinedOptimizer],
                              restore_rng: bool, only: Optional[Collection[str]],
                              sources: Mapping[str, str]) -> TrainState:
    """:func:`load_checkpoint` of a directory that holds a complete checkpoint (``sources``: {} for none)."""
    state = read_train_state(path)
    verify_digests(path)
    materialised: List[KeyedOptimizerWrapper] = []
    if optimizer is not None:
        if only is None:  # the dense states ``only`` leaves out stay as they are (none yet in a new run)
            materialised = _materialise_dense_optimizer_state(optimizer)
        target = _dcp_state(model, optimizer)
    else:
        target = {"model": model.state_dict()}
    model_state = target["model"]  # loaded back whole: the keys left out of ``only`` as they were
    reader = SafeFileSystemReader(path)
    metadata = reader.read_metadata()  # a refused .metadata raises here, not inside DCP's per-rank retry
    if only is None:
        require_no_weights_beyond(path, metadata, target["model"])  # DCP would skip them silently
    else:
        target = _only_keys(path, metadata, target, only, sources)
    # parameters no gradient had reached by the save have no state there, as in the run that wrote it
    never_stepped: Dict[str, Dict[str, Any]] = {}
    if optimizer is not None:
        never_stepped = _never_stepped(path, metadata, optimizer, materialised,
                                       before_first_step=_written_before_first_step(state))
    for key in never_stepped:  # the states of the part's other parameters stay in target["optim"]
        del target["optim"][key]
    # keyed by the checkpoint's keys where this model keeps a table under another (``sources``): loaded in place
    rounds = _renamed_rounds(target, sources) if sources else [target]
    try:
        for part in rounds:
            dcp.load(part, storage_reader=reader, planner=WeightsOnlyLoadPlanner(), process_group=host_group())
    except (Exception, CheckpointException) as error:  # CheckpointException is a BaseException
        if isinstance(error, pickle.UnpicklingError) and path in str(error):
            raise
        raise damaged_checkpoint_error(path, error) from error
    model.load_state_dict(model_state)
    if optimizer is not None:
        full = optimizer.state_dict()
        full["state"].update(target.get("optim", {}))  # the empty states stay as they are
        optimizer.load_state_dict(full)
        for param_state in never_stepped.values():
            param_state.clear()  # created lazily at its first gradient, as without the interruption
        _set_table_optimizer_step(model, state.table_optimizer_step)
    rng_file = os.path.join(path, f"rank{_rank():05d}.pt")
    if restore_rng and state.world_size == _world_size():
        problem = file_problem(rng_file)
        if problem is not None:  # every rank writes one: without it the resume is not exact
            raise damaged_checkpoint_error(rng_file, FileNotFoundError(problem))
        try:
            rng_state = torch.load(rng_file, weights_only=True)
            _set_rng_state(rng_state)
        except (RuntimeError, OSError, EOFError, pickle.UnpicklingError, KeyError, ValueError, TypeError,
                IndexError) as error:  # the weights-only unpickler's errors, and a state of the wrong shape
            raise damaged_checkpoint_error(rng_file, error) from error
    return state


def resolve_checkpoint(path: str) -> str:
    """A checkpoint directory (``ckpt-N``, holding ``train_state.json``), a directory of them (a
    run's ``best/`` or ``checkpoints/``: its newest complete one), or a run directory (its best,
    else latest, complete checkpoint).

    Raises:
        FileNotFoundError: no such directory, or none of these with a complete checkpoint (says
            which it looks like and what to pass instead).
    """
    if os.path.isfile(path):
        hint = (" (an export's state file: evaluate and export read a run or its ckpt-N directory)"
                if path.endswith((".safetensors", ".pt")) else "")
        raise FileNotFoundError(f"{path}: a file, not a checkpoint or run directory{hint}; pass the run directory")
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: no such checkpoint or run directory")
    if os.path.isfile(os.path.join(path, TRAIN_STATE_FILE)):
        return path  # a checkpoint (load_checkpoint checks the rest)
    if os.path.isdir(os.path.join(path, "best")) or os.path.isdir(os.path.join(path, "checkpoints")):
        found = CheckpointManager(os.path.join(path, "best")).latest() or CheckpointManager(
            os.path.join(path, "checkpoints")
        ).latest()
        if found is None:
            raise FileNotFoundError(f"{path}: run directory holds no complete checkpoint (its training saved none yet)")
        return found
    found = CheckpointManager(path).latest()  # a run's best/ or checkpoints/ itself
    if found is not None:
        return found
    if any(os.path.exists(os.path.join(path, name)) for name in ("config.yaml", "metrics.jsonl")):
        raise FileNotFoundError(f"{path}: run directory holds no checkpoint (no best/ or checkpoints/): its training "
                                "saved none; train it first")
    raise FileNotFoundError(
        f"{path}: neither a checkpoint (a ckpt-N directory with {TRAIN_STATE_FILE}), a directory of them, nor a run "
        "directory of `recsys-llm train` (with best/ or checkpoints/); pass the run directory"
    )


def checkpoint_digests(checkpoint: str) -> Dict[str, str]:
    """``{file: sha256}`` of each of ``IDENTITY_FILES`` in the checkpoint directory ``checkpoint``
    that exists: two records of the same checkpoint agree, a retrained one's differ."""
    paths = {name: os.path.join(checkpoint, name) for name in IDENTITY_FILES}
    return {name: file_sha256(path) for name, path in paths.items() if os.path.isfile(path)}


def trained_run_config(checkpoint: str) -> str:
    """The ``config.yaml`` of the run behind ``checkpoint`` (a checkpoint, a directory of them, or a
    run directory): the config a job on a trained run uses when given none.

    Raises:
        FileNotFoundError: no checkpoint there (:func:`resolve_checkpoint`), or a bare checkpoint
            outside a run directory, which has no run config (pass ``--config``).
    """
    resolved = resolve_checkpoint(checkpoint)
    path = run_config_of(resolved)
    if path is None:
        raise FileNotFoundError(f"{checkpoint}: no config.yaml of its run beside {resolved} (a checkpoint outside its "
                                "run directory); pass the run's config with --config")
    return path


#: the directories of a run directory that hold its checkpoints
RUN_CHECKPOINT_DIRS = ("best", "checkpoints")


def run_dir_of(checkpoint: str) -> Optional[str]:
    """The run directory of ``checkpoint`` when it lies where training writes one
    (``run_dir/{best,checkpoints}/ckpt-N``), else None (a checkpoint copied elsewhere)."""
    parent = os.path.dirname(os.path.normpath(os.path.abspath(checkpoint)))
    return os.path.dirname(parent) if os.path.basename(parent) in RUN_CHECKPOINT_DIRS else None


def run_config_of(checkpoint: str) -> Optional[str]:
    """The ``config.yaml`` of the run that wrote ``checkpoint`` (``run_dir/{checkpoints,best}/ckpt-N``), if any."""
    run_dir = run_dir_of(checkpoint)
    path = os.path.join(run_dir, "config.yaml") if run_dir is not None else None
    return path if path is not None and os.path.isfile(path) else None
