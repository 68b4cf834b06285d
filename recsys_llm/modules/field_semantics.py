"""FRE: field-level representation enhancement (LLaCTR, Cui et al., "Field Matters").

Pulls every field's pooled embedding toward a projection of the field's LLM vector.
A learned Linear (W, c) (d_llm -> D) projects field vector v_f; for each sample b the
embedding e_{b,f} is compared through softmax-normalised vectors:

.. math::

    L_{FRE} = \\lambda \\cdot \\frac{1}{B} \\sum_{b,f} KL\\big(softmax(W v_f + c) \\,\\|\\, softmax(e_{b,f})\\big)

summed over the F fields as in the public code (``field_reduction="sum"``, so the paper's
lambda range 0.01-0.5 applies), or averaged over them (``"mean"``, lambda divided by F:
comparable across data sets with different field counts **(ours)**). A training-only
regularizer: no serving cost. Fields without a vector are skipped.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.validation import check_number
from recsys_llm.models.base import CTROutput, fields_in_key_order
from recsys_llm.models.once_differentiable import first_order_only
from recsys_llm.semantics.store import first_non_finite_row

# a leaf of the training pipeline's fx trace (it reads the KeyedTensor's key order)
torch.fx.wrap("fields_in_key_order")

FIELD_REDUCTIONS = ("sum", "mean")


class _ProjectedFieldKL(torch.autograd.Function):
    """Weighted mean over (b, f) of KL(p_f || softmax(x_{b,f})), p_f = softmax(W v_f + c), as one autograd node.

    Field f counts with weight m_f in {0, 1} (0: a key without a vector), N = sum_f m_f.
    Autograd's version builds and walks several (B, F, D) intermediates, and the
    projection, log-softmax and permutation of the targets are half a dozen more nodes for
    a few hundred numbers. This one makes two passes over (B, F, D) forward (log softmax,
    its sum over the batch) and, backward, log softmax's own backward kernel (which first makes
    the constant below contiguous) instead of an exp and a multiply-add:

    * d/dx_{b,f} = m_f (softmax(x_{b,f}) - p_f) / (B N), which is log softmax's backward of the
      constant -m_f p_f / (B N) (its sum over the D entries of a field is -m_f / (B N))
    * d/dlog p_f = m_f p_f (log p_f + 1 - mean_b log softmax(x_{b,f})) / N, then through
      the log-softmax and the Linear to W and c

    An empty batch (B = 0) gives 0 and zero gradients: there is no sample to pull toward the
    targets, and a 0 / 0 would put NaN into W's gradient (all-reduced to every rank under DDP).
    """

    @staticmethod
    def forward(
        ctx,
        fields: torch.Tensor,  # (B, F, D)
        field_vectors: torch.Tensor,  # (F, d_llm), rows with m_f = 0 are ignored
        weight: torch.Tensor,  # (D, d_llm)
        bias: torch.Tensor,  # (D,)
        field_weight: torch.Tensor,  # (F,)
    ) -> torch.Tensor:
        batch_size = fields.size(0)
        log_p = F.log_softmax(torch.addmm(bias, field_vectors, weight.t()), dim=-1)  # (F, D)
        weighted_p = log_p.exp().mul_(field_weight.unsqueeze(-1))  # (F, D)
        log_q = F.log_softmax(fields, dim=-1)  # (B, F, D)
        # summed in the projection's precision at least: rounded to bf16, a sum over B rows loses about 1/256
        # of itself, and the mean log q that W's gradient reads would be that far off
        log_q_sum = log_q.sum(dim=0, dtype=torch.promote_types(log_q.dtype, log_p.dtype))  # (F, D)
        gap = torch.sub(log_p * batch_size, log_q_sum)  # (F, D): B (log p_f - mean_b log q_{b,f}); 0 when B = 0
        count = field_weight.sum()
        ctx.save_for_backward(log_q, gap, weighted_p, log_p, count, field_vectors, fields, weight, bias)
        return torch.dot(weighted_p.to(gap.dtype).flatten(), gap.flatten()) / (max(batch_size, 1) * count)

    @staticmethod
    @first_order_only("FRE's KL kernel (projected_field_kl)")
    def backward(ctx, grad: torch.Tensor) -> "tuple[Optional[torch.Tensor], ...]":
        with torch.autocast(grad.device.type, enabled=False):  # a backward run inside autocast: the forward's dtypes
            return _ProjectedFieldKL._gradients(ctx, grad)

    @staticmethod
    def _gradients(ctx, grad: torch.Tensor) -> "tuple[Optional[torch.Tensor], ...]":
        log_q, gap, weighted_p, log_p, count, field_vectors, _, _, _ = ctx.saved_tensors
        batch_size = log_q.size(0)
        if batch_size == 0:  # the loss is 0 whatever W and c are
            grad_weight = field_vectors.new_zeros(log_p.size(1), field_vectors.size(1)).to(log_p.dtype)
            return torch.zeros_like(log_q), None, grad_weight, log_p.new_zeros(log_p.size(1)), None
        per_field = grad / count
        constant = (weighted_p * (per_field / -batch_size)).to(log_q.dtype).expand_as(log_q)  # (B, F, D)
        grad_fields = torch._log_softmax_backward_data(constant, log_q, -1, log_q.dtype)
        grad_log_p = ((gap / batch_size + 1).mul_(weighted_p) * per_field).to(log_p.dtype)  # (F, D)
        grad_logits = torch._log_softmax_backward_data(grad_log_p, log_p, -1, log_p.dtype)  # (F, D)
        return grad_fields, None, grad_logits.t() @ field_vectors, grad_logits.sum(dim=0), None


def check_finite_vectors(term: str, field_vectors: torch.Tensor, feature_names: List[str]) -> None:
    """Raises ValueError naming the first field whose row of ``field_vectors`` (F, d_llm) holds NaN or inf,
    or when the vectors are on the meta device (they hold no values to build the term's constants from)."""
    if field_vectors.is_meta:
        raise ValueError(f"{term}: field_vectors are on the meta device; the term keeps constants computed from "
                         "them: pass real vectors (load_vectors(...).vectors is on the CPU), also when the model is "
                         "built under torch.device('meta')")
    found = first_non_finite_row(field_vectors.detach())
    if found is not None:
        row, count, value = found
        raise ValueError(f"{term}: the vector of field {feature_names[row]!r} holds {value} "
                         f"({count} of {len(feature_names)} field vectors are not finite)")


def check_feature_name_list(term: str, feature_names: List[str]) -> None:
    """Raises TypeError, naming ``term``, when ``feature_names`` is one string: it would be read as one field per
    character (``"item_id"`` as seven fields), with an error about missing keys only at the first batch."""
    if isinstance(feature_names, str):
        raise TypeError(f"{term}: feature_names must be a list of field names, got the string {feature_names!r} "
                        f"(for one field: [{feature_names!r}])")


@torch.fx.wrap
def projected_field_kl(
    fields: torch.Tensor,
    field_vectors: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    positions: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Scalar mean over f and b of KL(softmax(W v_f + c) || softmax(``fields[b, positions[f]]``));
    0, with zero gradients, for an empty batch (B = 0).

    Args:
        fields (torch.Tensor): (B, K, D) pooled embeddings, K >= F.
        field_vectors (torch.Tensor): (F, d_llm) constant, finite vectors v_f (no gradient).
        weight (torch.Tensor): (D, d_llm) W of the projection (an ``nn.Linear``'s weight).
        bias (torch.Tensor): (D,) its bias c.
        positions (Optional[torch.Tensor]): (F,) distinct indices into K of the fields
            that have a vector; the other keys are ignored. None: ``arange(K)``, K = F.
    """
    if fields.size(-1) != weight.size(0):
        raise ValueError(
            f"FRE: the fields have embedding dim {fields.size(-1)}, its projection gives {weight.size(0)} "
            "(FieldRepresentationEnhancement's embedding_dim must be the fields' dim)"
        )
    num_keys = fields.size(1)
    if positions is None:
        if field_vectors.size(0) != num_keys:
            raise ValueError(
                f"FRE: {field_vectors.size(0)} field vectors for {num_keys} fields; pass positions to compare a subset"
            )
        vectors_by_key, key_weight = field_vectors, field_vectors.new_ones(num_keys)
    else:
        vectors_by_key = field_vectors.new_zeros(num_keys, field_vectors.size(1))
        vectors_by_key.index_copy_(0, positions, field_vectors)  # (K, d_llm)
        key_weight = field_vectors.new_zeros(num_keys).index_fill_(0, positions, 1.0)  # (K,)
    # autocast would run the projection in bf16 / fp16 beside the float32 vectors (the backward then mixed dtypes);
    # the kernel computes in float32 there, as autocast runs a log softmax
    device_type = fields.device.type
    if torch.is_autocast_enabled(device_type):
        fields = fields.float()
    with torch.autocast(device_type, enabled=False):
        return _ProjectedFieldKL.apply(fields, vectors_by_key, weight, bias, key_weight)


class FieldRepresentationEnhancement(nn.Module):
    r"""FRE loss term of LLaCTR (Cui et al., "Field Matters"): KL between projected field
    vectors and pooled field embeddings.

    A Linear (W, c) projects the LLM vector :math:`v_f` of each of the F fields to the
    embedding dim D; every sample's pooled embedding :math:`e_{b,f}` is pulled toward it:

    .. math::

        \mathcal{L}_{FRE} = \frac{\lambda}{B R} \sum_{b=1}^{B} \sum_{f=1}^{F}
            \mathrm{KL}\big(\mathrm{softmax}(W v_f + c) \,\|\, \mathrm{softmax}(e_{b,f})\big)

    with R = 1 for ``field_reduction="sum"`` (the public code) and R = F for ``"mean"``.
    Works on any EBC output (a backbone's ``CTROutput.embeddings``; for an unmodified
    torchrec ``DLRM``, that of :class:`~recsys_llm.models.dlrm.DLRMBackbone` wrapping it, whose
    one lookup feeds both the DLRM and this term: calling ``dlrm.sparse_arch.embedding_bag_collection``
    a second time doubles the lookups, and ``TrainPipelineSparseDist`` refuses a sharded EBC called
    twice); keys without a vector are ignored. Its only parameters are a dense Linear, so DMP wraps it in DDP
    like any dense module.

    Args:
        field_vectors (torch.Tensor): (F, d_llm) LLM vectors, row i for ``feature_names[i]``;
            kept as a buffer.
        feature_names (List[str]): F keys of the pooled embeddings that have a vector.
        embedding_dim (int): D, the embedding dim of those features.
        weight (float): lambda_FRE.
        field_reduction (str): ``sum`` (public code) or ``mean`` of the per-field KL terms.

    Its state dict is positional over ``feature_names`` (``field_vectors`` row i is field i): load
    it into a term built with the same names in the same order (``build_llactr_terms`` keeps the
    vector file's order, and a trained run checks it against its ``plugins.json``).

    Example::

        names = ["user_id", "item_id"]
        fre = FieldRepresentationEnhancement(torch.randn(2, 384), names, embedding_dim=16, weight=0.1)
        pooled = KeyedTensor.from_tensor_list(names, [torch.randn(4, 16), torch.randn(4, 16)])  # ebc(kjt)
        loss = fre.loss(pooled)  # scalar; fre(output) is the same as a CTRTask loss term
    """

    def __init__(
        self,
        field_vectors: torch.Tensor,
        feature_names: List[str],
        embedding_dim: int,
        weight: float = 0.1,
        field_reduction: str = "sum",
    ) -> None:
        super().__init__()
        if field_reduction not in FIELD_REDUCTIONS:
            raise ValueError(f"FRE field_reduction: expected one of {FIELD_REDUCTIONS}, got {field_reduction!r}")
        check_feature_name_list("FRE", feature_names)
        if field_vectors.dim() != 2 or field_vectors.size(0) != len(feature_names) or not feature_names:
            raise ValueError(
                f"FRE needs field_vectors of shape (len(feature_names)={len(feature_names)} > 0, d_llm), "
                f"got {tuple(field_vectors.shape)}"
            )
        if len(set(feature_names)) != len(feature_names):
            raise ValueError(f"FRE feature_names must be distinct, got {list(feature_names)}")
        check_number("FRE weight (lambda_fre)", weight, minimum=0)  # NaN: a NaN loss; < 0: KL maximised
        check_finite_vectors("FRE", field_vectors, feature_names)
        self._feature_names: List[str] = list(feature_names)
        # the kernel averages over fields; summing is the same times F
        self._weight = float(weight) * (len(feature_names) if field_reduction == "sum" else 1)
        # on the vectors' own device, also under torch.device("meta") (DMP keeps a buffer that is not on meta)
        self.register_buffer("field_vectors", field_vectors.detach().float().clone())  # (F, d_llm)
        self._vectors_on_cpu = field_vectors.detach().float().cpu().clone()  # what reset_parameters writes back
        self.projection = nn.Linear(field_vectors.size(1), embedding_dim)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Writes the field vectors back into their buffer: ``nn.Module.to_empty`` (meta-device
        initialisation) leaves every buffer uninitialised. The projection resets itself."""
        self.field_vectors.copy_(self._vectors_on_cpu)

    @property
    def feature_names(self) -> List[str]:
        return self._feature_names

    def loss(self, embeddings: KeyedTensor) -> torch.Tensor:
        """
        Args:
            embeddings (KeyedTensor): keys ⊇ ``feature_names``, each (B, D).

        Returns:
            torch.Tensor: weighted scalar loss; 0 (zero gradients) for an empty batch.
        """
        # fields in the embeddings' own key order (a view, no copy); the targets are put
        # in that order instead, and keys without a vector get weight 0
        fields, positions = fields_in_key_order(embeddings, self._feature_names)  # (B, K, D), (F,)
        return self._weight * projected_field_kl(
            fields, self.field_vectors, self.projection.weight, self.projection.bias, positions
        )

    def forward(self, output: CTROutput, batch: Optional[Batch] = None) -> torch.Tensor:
        """CTRTask loss term: ``loss(output.embeddings)``, a scalar (``batch`` is not read)."""
        return self.loss(output.embeddings)
