"""Score-level and representation-level knowledge distillation (ELEC, SIGIR 2025).

The student (vanilla network) learns the teacher's (gain network's) click probability
and its last hidden representation. Teacher inputs are always detached: distillation
never sends gradients into the teacher.
"""

from typing import Tuple

import torch
import torch.nn.functional as F
from torch import nn

from recsys_llm.data.validation import check_number
from recsys_llm.typed_config import as_bool

SCORE_KD_KINDS = ("bce", "kl")
# |teacher logit / T| beyond it the teacher's entropy is 0 in float32 and float64 alike; the KL term clamps to it
_ENTROPY_LOGIT_LIMIT = 1e4
REPR_KD_KINDS = ("mse", "cosine")


class ScoreDistillation(nn.Module):
    """Score-level KD of ELEC (Dong, Ouyang, Liu, SIGIR 2025): distils the teacher's click
    probability with temperature T.

    With :math:`p = \\sigma(z_t / T)` and :math:`q = \\sigma(z_s / T)`:

    .. math::

        \\mathcal{L}_{bce} = T^2 \\cdot \\overline{-[p \\log q + (1 - p) \\log(1 - q)]}, \\qquad
        \\mathcal{L}_{kl} = T^2 \\cdot \\overline{p \\log\\frac{p}{q} + (1-p)\\log\\frac{1-p}{1-q}}

    (mean over the batch; the :math:`T^2` keeps gradient sizes comparable across T, as in
    Hinton et al. 2015, and is left out with ``scale_by_temperature=False``). KL is BCE minus
    the teacher's entropy: same gradient, zero at :math:`q = p`.

    Args:
        temperature (float): T > 0.
        kind (str): ``bce`` or ``kl``.
        scale_by_temperature (bool): multiply the term by :math:`T^2` **(ours**: the paper names
            no scaling).

    Example::

        kd = ScoreDistillation(temperature=2.0, kind="kl")
        loss = kd(torch.randn(32), torch.randn(32))  # scalar, from student and teacher logits (B,)
    """

    def __init__(self, temperature: float = 1.0, kind: str = "bce", scale_by_temperature: bool = True) -> None:
        super().__init__()
        check_number("ScoreDistillation: temperature", temperature, above=0)  # NaN too: every loss would be NaN
        if kind not in SCORE_KD_KINDS:
            raise ValueError(f"ScoreDistillation: kind must be one of {SCORE_KD_KINDS}, got {kind!r}")
        self._temperature = temperature
        self._kind = kind
        if as_bool(scale_by_temperature) is None:  # "false" would count as True
            raise ValueError(f"ScoreDistillation: scale_by_temperature must be True or False, got "
                             f"{scale_by_temperature!r}")
        self._scale = temperature * temperature if scale_by_temperature else 1.0

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student_logits (torch.Tensor): (B,).
            teacher_logits (torch.Tensor): (B,), detached here.

        Returns:
            torch.Tensor: scalar loss.
        """
        t = self._temperature
        # in float32 at least: under autocast a bf16 student rounded the teacher's target to bf16, and near the
        # teacher the KD gradient q - p was mostly that rounding
        dtype = torch.promote_types(student_logits.dtype, torch.float32)
        student = student_logits.to(dtype) / t  # (B,)
        teacher = teacher_logits.detach().to(dtype) / t  # (B,)
        target = torch.sigmoid(teacher)  # (B,) p
        loss = F.binary_cross_entropy_with_logits(student, target, reduction="none")  # (B,)
        if self._kind == "kl":
            # a teacher logit of +-inf (an fp16 overflow) is p = 1 or 0 with entropy 0, not inf - inf = NaN
            finite = teacher.clamp(-_ENTROPY_LOGIT_LIMIT, _ENTROPY_LOGIT_LIMIT)
            entropy = F.binary_cross_entropy_with_logits(finite, target, reduction="none")  # (B,) H(p)
            loss = loss - entropy
        return loss.mean() * self._scale


@torch.fx.wrap  # a leaf of the pipeline's trace: it reads the widths at run time
def _check_widths(student: torch.Tensor, teacher: torch.Tensor, dims: Tuple[int, int]) -> None:
    """Raises ValueError naming the side whose representation is not as wide as its model declares,
    or when the two are not (B, H) of one B (broadcasting would compare rows of other samples)."""
    for side, tensor, width in (("student", student, dims[0]), ("teacher", teacher, dims[1])):
        if tensor.size(-1) != width:
            raise ValueError(
                f"representation KD: the {side}'s representation is {tuple(tensor.shape)}, but its model declares "
                f"representation_dim {width}; make representation_dim the width of what interact returns"
            )
    if student.dim() != 2 or teacher.dim() != 2 or student.size(0) != teacher.size(0):
        raise ValueError(
            f"representation KD: expected the student's (B, {dims[0]}) and the teacher's (B, {dims[1]}) "
            f"representations of the same B rows, got {tuple(student.shape)} and {tuple(teacher.shape)}"
        )


class RepresentationDistillation(nn.Module):
    """Representation-level KD of ELEC (SIGIR 2025): pulls the student's last hidden
    representation :math:`h_s` (B, H_s) towards the teacher's :math:`h_t` (B, H_t).

    .. math::

        \\mathcal{L}_{mse} = \\overline{\\lVert P h_s - h_t \\rVert^2} / H_t, \\qquad
        \\mathcal{L}_{cos} = \\overline{1 - \\cos(P h_s, h_t)}

    A row where either side is the zero vector (no direction) counts with :math:`\\cos = 0` and
    sends no gradient.

    :math:`P` is a learned linear projection when the sizes differ (it is part of the
    training graph only, never of the served student), the identity otherwise.

    Args:
        student_dim (int): H_s.
        teacher_dim (int): H_t.
        kind (str): ``mse`` or ``cosine``.

    Example::

        kd = RepresentationDistillation(student_dim=64, teacher_dim=128, kind="cosine")
        loss = kd(torch.randn(32, 64), torch.randn(32, 128))  # scalar
    """

    def __init__(self, student_dim: int, teacher_dim: int, kind: str = "mse") -> None:
        super().__init__()
        if kind not in REPR_KD_KINDS:
            raise ValueError(f"RepresentationDistillation: kind must be one of {REPR_KD_KINDS}, got {kind!r}")
        for name, value in (("student_dim", student_dim), ("teacher_dim", teacher_dim)):
            check_number(f"RepresentationDistillation: {name}", value, integer=True, minimum=1)
        self._kind = kind
        self._dims = (student_dim, teacher_dim)
        self.projection: nn.Module = (
            nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()
        )

    def forward(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """
        Args:
            student (torch.Tensor): (B, H_s).
            teacher (torch.Tensor): (B, H_t), detached here.

        Returns:
            torch.Tensor: scalar loss.
        """
        _check_widths(student, teacher, self._dims)
        projected = self.projection(student)  # (B, H_t)
        dtype = torch.promote_types(projected.dtype, torch.float32)  # the targets not rounded to a bf16 student's
        projected, teacher = projected.to(dtype), teacher.detach().to(dtype)
        if self._kind == "mse":
            return F.mse_loss(projected, teacher)
        # F.cosine_similarity clamps each norm to 1e-8: a zero row (a student whose ReLUs are all off) had a
        # gradient of ~1e8 / B, a row below 1e-8 a wrong cosine, and one beyond ~1e19 (its norm overflows) cos = 0
        student_unit, teacher_unit = _unit_rows(projected), _unit_rows(teacher)
        cosine = (student_unit * teacher_unit).sum(dim=-1)  # (B,)
        defined = projected.detach().ne(0).any(dim=-1) & teacher.ne(0).any(dim=-1)
        # a zero vector has no direction: cos = 0 there (F.cosine_similarity's value), with zero gradient
        cosine = torch.where(defined | cosine.isnan(), cosine, torch.zeros_like(cosine))
        return (1.0 - cosine).mean()


def _unit_rows(vectors: torch.Tensor) -> torch.Tensor:
    """``vectors`` (..., H) divided by their L2 norms along the last dim; a zero row stays zero and a NaN row NaN.

    Each row is first divided by its largest absolute entry (a constant to autograd: a cosine does not depend on the
    scale), so that its squared norm neither overflows (entries beyond ~1e19 in float32) nor underflows.
    """
    scale = vectors.detach().abs().amax(dim=-1, keepdim=True)
    scaled = vectors / torch.where(scale != 0, scale, torch.ones_like(scale))  # NaN != 0: a NaN row stays NaN
    # >= 1 for a row with a non-zero entry (its largest is +-1 now), 0 for a zero row
    return scaled / torch.linalg.vector_norm(scaled, dim=-1, keepdim=True).clamp_min(1.0)
