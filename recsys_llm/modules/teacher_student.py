"""Gain network (teacher) + vanilla network (student) in one module (ELEC, SIGIR 2025).

One ``TeacherStudentTask`` goes under one ``DistributedModelParallel`` and one
``TrainPipelineSparseDist``: the planner shards the teacher's and the student's tables
(distinct table prefixes) and the pipeline prefetches both lookups from the same batch.

.. math::

    \\mathcal{L} = \\mathrm{BCE}(z_s, y) + \\textstyle\\sum_k \\mathcal{L}^s_k
                 + \\alpha\\, \\mathcal{L}_{score}(z_s, z_t) + \\beta\\, \\mathcal{L}_{repr}(h_s, h_t)
                 \\; [+\\, \\gamma\\, (\\mathrm{BCE}(z_t, y) + \\textstyle\\sum_k \\mathcal{L}^t_k)
                 \\text{ in joint mode}]

(:math:`\\mathcal{L}^s_k`, :math:`\\mathcal{L}^t_k`: the student's and the teacher's ``loss_terms``,
e.g. FRE).

Modes:

* ``joint``: the teacher trains in the same step on its own BCE; its logits and
  representation enter the KD terms detached (no KD gradient reaches the teacher).
* ``frozen``: a trained teacher (loaded with :func:`load_full_state`) runs in eval mode
  under ``no_grad`` and has no trainable dense parameter (its EBCs are marked ``frozen`` so
  the sharder gives them no optimizer state; DDP only sees the student's parameters).
* ``offline``: no teacher module; logits and representations come from
  ``batch.extras["teacher_logits"]`` (B,) and ``["teacher_representation"]`` (B, H_t),
  written beforehand by ``recsys-llm teacher-outputs`` (a trained run), or by
  :func:`~recsys_llm.modules.teacher_columns.write_teacher_columns` +
  :func:`~recsys_llm.modules.teacher_columns.attach_columns` (one's own loop).

``forward`` is torch.fx traceable (the mode is a Python constant, no data-dependent
control flow), as ``TrainPipelineSparseDist`` requires.
"""

import dataclasses
from typing import Any, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.data.batch import Batch, batch_extras
from recsys_llm.data.pair_swap import LABEL_WEIGHT_KEY
from recsys_llm.data.validation import check_number
from recsys_llm.models.embedding import mark_filled_tables, require_allocated
from recsys_llm.models.task import checked_term, required_extra
from recsys_llm.modules.distillation import (
    REPR_KD_KINDS,
    SCORE_KD_KINDS,
    RepresentationDistillation,
    ScoreDistillation,
)
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement, refresh_after_load
from recsys_llm.typed_config import check_bool_settings, check_str_settings

MODES = ("joint", "frozen", "offline")

# leaves of the training pipeline's trace (they look into the batch's extras, or check a term's shape, at run time)
torch.fx.wrap("required_extra")
torch.fx.wrap("checked_term")


@torch.fx.wrap  # a leaf of the pipeline's trace: the shape is checked at run time
def checked_teacher_extra(value: torch.Tensor, rows: torch.Tensor, width: int, key: str) -> torch.Tensor:
    """An offline teacher column as it is when it has one value (``width`` 0) or ``width`` values per row of the
    batch (``rows``: the labels); raises otherwise, naming the extras key and the setting to change (a wrong width
    was reported as the width of a model's ``interact``, a wrong row count by BCE's "Target size")."""
    expected = (rows.size(0),) if width == 0 else (rows.size(0), width)
    if tuple(value.shape) != expected:
        if width == 0 or value.dim() != 2 or value.size(1) == width:
            setting = "one value per row of the batch"
        else:
            setting = f"TeacherStudentConfig.teacher_representation_dim={width}"
        raise ValueError(
            f"offline distillation: the batch's extras[{key!r}] is {tuple(value.shape)}, expected {expected} "
            f"({setting}); write it with write_teacher_columns or `recsys-llm teacher-outputs` for these rows"
        )
    return value


@dataclasses.dataclass
class TeacherStudentConfig:
    """Distillation settings.

    Args:
        mode (str): ``joint``, ``frozen`` or ``offline``.
        alpha (float): weight of score-level KD (>= 0).
        beta (float): weight of representation-level KD (>= 0; 0 disables it).
        temperature (float): score KD temperature T (> 0).
        temperature_scaling (bool): **(ours)** multiply score KD by T² (Hinton et al.), so ``alpha``
            keeps its scale across temperatures.
        score_kd (str): ``bce`` or ``kl``.
        repr_kd (str): ``mse`` or ``cosine``.
        teacher_loss_weight (float): gamma, weight of the teacher's BCE in joint mode (>= 0).
        teacher_representation_dim (int): H_t for offline mode (read from the teacher otherwise).
        teacher_logits_key (str): extras key of offline teacher logits.
        teacher_representation_key (str): extras key of offline teacher representations.

    Label-free rows to distil on are made from the batches, not by the task: see
    :class:`recsys_llm.data.pair_swap.SwappedPairs` (the runner's ``elec.distill.swap_fields``).
    """

    mode: str = "joint"
    alpha: float = 1.0
    beta: float = 0.1
    temperature: float = 1.0
    temperature_scaling: bool = True
    score_kd: str = "bce"
    repr_kd: str = "mse"
    teacher_loss_weight: float = 1.0
    teacher_representation_dim: int = 0
    teacher_logits_key: str = "teacher_logits"
    teacher_representation_key: str = "teacher_representation"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"TeacherStudentConfig.mode must be one of {MODES}, got {self.mode!r}")
        # loss weights: a negative one maximises its term; T and the KD kinds are refused here, not
        # only when the task is built, so a config check (e.g. ``plugin_extras``) catches them too
        for name in ("alpha", "beta", "teacher_loss_weight"):
            check_number(f"TeacherStudentConfig.{name}", getattr(self, name), minimum=0)
        check_number("TeacherStudentConfig.temperature", self.temperature, above=0)
        check_number("TeacherStudentConfig.teacher_representation_dim", self.teacher_representation_dim, integer=True,
                     minimum=0)
        check_bool_settings(self, ("temperature_scaling",), "TeacherStudentConfig")  # "false" would count as True
        check_str_settings(self, ("teacher_logits_key", "teacher_representation_key"), "TeacherStudentConfig")
        if self.score_kd not in SCORE_KD_KINDS:
            raise ValueError(f"TeacherStudentConfig.score_kd must be one of {SCORE_KD_KINDS}, got {self.score_kd!r}")
        if self.repr_kd not in REPR_KD_KINDS:
            raise ValueError(f"TeacherStudentConfig.repr_kd must be one of {REPR_KD_KINDS}, got {self.repr_kd!r}")


def freeze_teacher(teacher: nn.Module) -> None:
    """Freezes a trained teacher: eval mode, no trainable dense parameter, frozen EBCs.

    Dense parameters get ``requires_grad=False`` (DDP then ignores them). EBC tables are
    marked ``frozen = True`` instead: ``recsys_llm.train.sharding`` gives them no optimizer
    state and no autograd after sharding (it needs their ``requires_grad`` until then).
    The teacher also runs under ``no_grad``, so nothing of it is ever updated. Sharded by
    other code (your own planner and ``DistributedModelParallel``), the teacher's tables get
    their fused optimizer's state (e.g. RowWiseAdagrad's per row) all the same, memory that is
    never used: leave them out of the sharders' fused optimizer there, or shard with
    ``recsys_llm.train.sharding.shard_model``.
    """
    table_params = set()
    for module in teacher.modules():
        if isinstance(module, EmbeddingBagCollection):
            module.frozen = True
            table_params |= {id(p) for p in module.parameters()}
    for param in teacher.parameters():
        if id(param) not in table_params:
            param.requires_grad_(False)
    teacher.eval()


def _require_task(module: nn.Module, role: str, loss_terms: bool, representation: bool) -> None:
    """Raises TypeError, naming ``role``, unless ``module`` has what :class:`TeacherStudentTask` reads of a
    ``CTRTask``: ``predict(batch)``, ``loss_terms`` where asked, ``model.representation_dim`` where asked (a
    backbone or a torchrec DLRM passed as it is failed with "object has no attribute 'model'")."""
    lacks = [name for name, needed in (("predict", True), ("loss_terms", loss_terms)) if needed and not
             hasattr(module, name)]
    if representation and not hasattr(getattr(module, "model", None), "representation_dim"):
        lacks.append("model.representation_dim")
    if lacks:
        raise TypeError(
            f"TeacherStudentTask: the {role} is a {type(module).__name__}, which lacks {lacks}; expected a CTRTask: "
            "wrap a backbone as CTRTask(backbone) (a torchrec DLRM as CTRTask(DLRMBackbone(dlrm, num_dense_features)))"
        )


class TeacherStudentTask(nn.Module):
    r"""ELEC's pseudo-siamese training (Dong, Ouyang, Liu, SIGIR 2025): the student (and in
    joint mode the teacher) with score + representation KD.

    .. math::

        \mathcal{L} = \mathrm{BCE}(z_s, y) + \textstyle\sum_k \mathcal{L}^s_k
                     + \alpha\, \mathcal{L}_{score}(z_s, z_t) + \beta\, \mathcal{L}_{repr}(h_s, h_t)
                     \; [+\, \gamma\, (\mathrm{BCE}(z_t, y) + \textstyle\sum_k \mathcal{L}^t_k)]

    with :math:`\mathcal{L}^s_k`, :math:`\mathcal{L}^t_k` the student's and the teacher's
    ``loss_terms`` (e.g. FRE); the bracket in joint mode only.
    Logits :math:`z` (B,), representations :math:`h` (B, H); the teacher's enter detached.

    Teacher and student are ``CTRTask`` s (or modules with the same members): the task reads
    ``predict(batch) -> CTROutput`` and ``loss_terms`` of the student, and of the teacher in
    joint mode, and ``model.representation_dim`` (H) of the teacher (not in offline mode) and
    of the student (when beta > 0). Their tables are sharded side by side under one DMP, so
    they need distinct table names (e.g. ``teacher_user_id`` and ``student_user_id``).

    Args:
        teacher (Optional[nn.Module]): the gain network's ``CTRTask`` (None in offline mode).
        student (nn.Module): the vanilla network's ``CTRTask`` (the only served part).
        config (TeacherStudentConfig): mode and loss weights.

    Example::

        from recsys_llm.data.batch import Batch
        def tables(prefix: str) -> EmbeddingBagCollection:  # teacher and student need distinct names
            return EmbeddingBagCollection(tables=[EmbeddingBagConfig(
                name=prefix + "item_id", embedding_dim=8, num_embeddings=100, feature_names=["item_id"])])
        teacher = CTRTask(FM(tables("teacher_"), 2, num_extra_fields=1), field_injection=VectorFieldInjection(384, 8))
        student = CTRTask(FM(tables("student_"), 2))
        task = TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="joint"))
        kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([3, 7, 1]), torch.tensor([1, 1, 1]))
        batch = Batch(torch.rand(3, 2), kjt, torch.tensor([1.0, 0.0, 1.0]), extras={"llm_vector": torch.randn(3, 384)})
        loss, (loss_detached, student_logits, labels) = task(batch)  # scalar, (3,), (3,)
    """

    def __init__(self, teacher: Optional[nn.Module], student: nn.Module, config: TeacherStudentConfig) -> None:
        super().__init__()
        self._config = config
        if config.mode == "offline":
            if teacher is not None:
                raise ValueError("offline distillation reads teacher outputs from the batch; pass teacher=None")
            teacher_dim = config.teacher_representation_dim
        else:
            if teacher is None:
                raise ValueError(f"{config.mode} distillation needs a teacher module")
            _require_task(teacher, "teacher", loss_terms=config.mode == "joint", representation=True)
            teacher_dim = int(teacher.model.representation_dim)
        _require_task(student, "student", loss_terms=True, representation=config.beta > 0)
        if config.mode == "frozen":
            freeze_teacher(teacher)
        # the student first: DMP materialises tables in module order, so the student's draw from the
        # stream the plain backbone's tables of the same seed draw from (recsys_llm.modules.elec.build_elec_task)
        self.student = student
        self.teacher = teacher
        self.score_kd = ScoreDistillation(config.temperature, config.score_kd, config.temperature_scaling)
        self.repr_kd: Optional[RepresentationDistillation] = None
        if config.beta > 0:
            if teacher_dim <= 0:
                raise ValueError("representation KD in offline mode needs config.teacher_representation_dim > 0")
            self.repr_kd = RepresentationDistillation(
                int(student.model.representation_dim), teacher_dim, config.repr_kd
            )

    @property
    def config(self) -> TeacherStudentConfig:
        return self._config

    def train(self, mode: bool = True) -> "TeacherStudentTask":
        super().train(mode)
        if self._config.mode == "frozen" and self.teacher is not None:
            self.teacher.eval()  # a frozen teacher never leaves eval mode (dropout off)
        return self

    def _teacher_outputs(self, batch: Batch) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Teacher logits (B,), representation (B, H_t) and its own loss (scalar, joint only)."""
        if self._config.mode == "offline":
            extras = batch_extras(batch)
            key = self._config.teacher_logits_key
            logits = checked_teacher_extra(required_extra(extras, key, "offline distillation"), batch.labels, 0,
                                           key)  # (B,)
            representation = logits
            if self.repr_kd is not None:
                key = self._config.teacher_representation_key
                representation = checked_teacher_extra(
                    required_extra(extras, key, "offline representation distillation"), batch.labels,
                    self._config.teacher_representation_dim, key)  # (B, H_t)
            return logits, representation, torch.zeros((), device=logits.device)
        if self._config.mode == "frozen":
            with torch.no_grad():
                output = self.teacher.predict(batch)
            return output.logits, output.representation, torch.zeros((), device=output.logits.device)
        output = self.teacher.predict(batch)
        loss = labeled_bce(output.logits, batch)
        for name, term in self.teacher.loss_terms.items():
            loss = loss + checked_term(term(output, batch), "loss", name)
        return output.logits, output.representation, loss

    def forward(self, batch: Batch) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            batch (Batch): tabular input (+ teacher outputs in ``extras`` in offline mode; +
                ``extras["label_weight"]`` (B,) when swapped rows were appended).

        Returns:
            Tuple: ``(loss, (loss_detached, student_logits, labels))``; in eval mode, logits and
            labels of the labeled rows only (``label_weight`` > 0) when the batch has a weight.
        """
        teacher_logits, teacher_representation, teacher_loss = self._teacher_outputs(batch)
        output = self.student.predict(batch)
        loss = labeled_bce(output.logits, batch)
        for name, term in self.student.loss_terms.items():
            loss = loss + checked_term(term(output, batch), "loss", name)
        if self._config.alpha > 0:
            loss = loss + self._config.alpha * self.score_kd(output.logits, teacher_logits.detach())
        if self.repr_kd is not None:
            loss = loss + self._config.beta * self.repr_kd(output.representation, teacher_representation.detach())
        if self._config.mode == "joint":
            loss = loss + self._config.teacher_loss_weight * teacher_loss
        logits, labels = output.logits.detach(), batch.labels
        weight = batch_extras(batch).get(LABEL_WEIGHT_KEY)
        if weight is not None and not self.training:
            # evaluation metrics must not see label-free rows; training skips the mask (a
            # boolean index is a host-device sync every step, and the train loop reads no metric)
            labeled = weight > 0
            logits, labels = logits[labeled], labels[labeled]
        return loss, (loss.detach(), logits, labels)


def labeled_bce(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """Mean BCE with logits over the labeled rows: all rows, or those whose
    ``extras["label_weight"]`` is > 0 (weighted by it) when the batch carries one.

    Args:
        logits (torch.Tensor): (B,).
        batch (Batch): labels (B,) (0/1, any dtype) and optionally ``extras["label_weight"]`` (B,).
    """
    weight = batch_extras(batch).get(LABEL_WEIGHT_KEY)
    labels = batch.labels.float()  # 0/1 of any dtype, as CTRTask and torchrec's DLRMTrain take them
    if weight is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")  # (B,)
    return (per_row * weight).sum() / weight.sum().clamp_min(1e-12)


class StateMismatchError(ValueError):
    """A full state that does not fit the model :func:`load_full_state` loads it into: a tensor of
    another shape, or tensors the model has no place for (a ValueError subclass)."""


@torch.no_grad()
def load_full_state(model: nn.Module, state: Mapping[str, Any], prefix: str = "", *, source: str = "state") -> int:
    """Copies a full (unsharded) state dict into a possibly sharded model, shard by shard.

    Each ``ShardedTensor`` of ``model.state_dict()`` receives only its local shards'
    slices of the full tensor; plain tensors are copied whole. Used to load a trained
    teacher into a ``TeacherStudentTask`` under DMP (``prefix="teacher."``). With
    ``state`` from :func:`recsys_llm.serving.open_state_file`, a rank reads only its
    shards' rows of each table. Tables of an unsharded model filled here are marked, and
    ``shard_model`` refuses them: DMP initialises every table afresh, so load after sharding.
    A frozen FIE term under ``prefix`` takes its frozen weights from the loaded Linear, as
    with ``load_state_dict`` (:meth:`FieldInteractionEnhancement.freeze`).

    Args:
        model (nn.Module): the destination (DMP or plain).
        state (Mapping[str, Any]): full tensors (or ``open_state_file``'s lazy ones: a
            ``shape`` and slicing), keys relative to ``prefix``.
        prefix (str): prefix of the destination keys.
        source (str): where ``state`` comes from, for error messages.

    Returns:
        int: number of tensors copied.

    Raises:
        KeyError: a destination key under ``prefix`` has no source tensor.
        StateMismatchError: (a ValueError) a source tensor's shape differs from the destination's, or
            ``state`` holds tensors the model has no place for under ``prefix`` (it was saved from
            another model, e.g. a gain network on entity tables loaded into one reading per-row vectors).
        ValueError: a tensor read from ``state`` is refused (``open_state_file``: NaN / inf, a damaged file).
        RuntimeError: a destination is still on the meta device (call it after ``shard_model``).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys_llm.serving import strip_wrappers

    destinations = [(key, dest, strip_wrappers(key)) for key, dest in model.state_dict().items()]
    destinations = [(key, dest, name[len(prefix) :]) for key, dest, name in destinations if name.startswith(prefix)]
    expected = {source_key for _, _, source_key in destinations}
    unused = sorted(key for key in state if key not in expected)
    if unused:  # checked before anything is copied: the model is left as it was
        raise StateMismatchError(f"{source}: holds {len(unused)} tensors the model has no place for under {prefix!r}: "
                         f"{unused[:8]}{'...' if len(unused) > 8 else ''}")
    copied, filled = 0, []
    for key, dest, source_key in destinations:
        if source_key not in state:
            raise KeyError(f"{source}: no tensor {source_key!r} for {key!r}; it has {sorted(state)[:8]}...")
        full = state[source_key]
        if tuple(full.shape) != tuple(dest.size()):
            raise StateMismatchError(f"{source}: tensor {source_key!r} has shape {tuple(full.shape)}, "
                             f"the model's {key!r} expects {tuple(dest.size())}")
        if isinstance(dest, ShardedTensor):
            for shard in dest.local_shards():
                index = tuple(slice(o, o + s) for o, s in zip(shard.metadata.shard_offsets, shard.metadata.shard_sizes))
                shard.tensor.copy_(full[index])
        else:
            require_allocated(key, dest, "load_full_state")
            dest.copy_(full[...])
            filled.append(key)
        copied += 1
    mark_filled_tables(model, filled, "load_full_state")  # an unsharded model's tables: shard_model would lose them
    for name, module in model.named_modules():  # what load_state_dict's post hook does for each loaded FIE
        if isinstance(module, FieldInteractionEnhancement) and f"{strip_wrappers(name)}.".startswith(prefix):
            refresh_after_load(module)
    return copied
