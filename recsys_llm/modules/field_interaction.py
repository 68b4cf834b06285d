"""FIE: field-level interaction enhancement (LLaCTR, Cui et al., "Field Matters").

The cosine similarities of the field vectors, S_ij for the P = N(N-1)/2 field pairs
i < j, pass through a learned Linear(P, P) to give pair weights w = Linear(S). The
logit gains a weighted sum of field-pair inner products:

.. math::

    \\Delta y_b = \\lambda \\sum_{i<j} w_{ij} \\langle e_{b,i}, e_{b,j} \\rangle

The weights depend on fields only: they are computed once per step (not per sample)
and :meth:`FieldInteractionEnhancement.freeze` turns them into a constant buffer for
evaluation and serving. Fields without a vector take no part.
"""

from typing import List

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import CTROutput, fields_in_key_order

# a leaf of the training pipeline's fx trace (it reads the KeyedTensor's key order)
torch.fx.wrap("fields_in_key_order")


class _WeightedPairSum(torch.autograd.Function):
    """sum_ij M_ij <x_{b,i}, x_{b,j}> per sample, with a hand-written backward.

    Autograd's backward of the per-sample Gram takes two batched matmuls; this one takes
    one (about 40% less time forward + backward on CPU) and reuses the forward's Gram:

    * d/dx_b = g_b (M + M^T) x_b
    * d/dM = sum_b g_b G_b, G_b = x_b x_b^T
    """

    @staticmethod
    def forward(ctx, fields: torch.Tensor, pair_matrix: torch.Tensor) -> torch.Tensor:  # (B, K, D), (K, K) -> (B,)
        gram = torch.bmm(fields, fields.transpose(1, 2)).reshape(fields.size(0), -1)  # (B, K * K)
        ctx.save_for_backward(fields, pair_matrix, gram)
        return gram @ pair_matrix.reshape(-1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":
        fields, pair_matrix, gram = ctx.saved_tensors
        symmetric = pair_matrix + pair_matrix.t()  # (K, K)
        grad_fields = torch.matmul(symmetric, fields).mul_(grad.view(-1, 1, 1))  # (B, K, D)
        grad_matrix = (grad @ gram).view_as(pair_matrix)  # (K, K)
        return grad_fields, grad_matrix


@torch.fx.wrap
def weighted_pair_sum(fields: torch.Tensor, pair_matrix: torch.Tensor) -> torch.Tensor:
    """(B,) sum over field pairs of ``pair_matrix[i, j] * <fields[:, i], fields[:, j]>``.

    Args:
        fields (torch.Tensor): (B, K, D).
        pair_matrix (torch.Tensor): (K, K), any matrix (FIE: w_ij at one of (i, j), (j, i)).
    """
    return _WeightedPairSum.apply(fields, pair_matrix)


class FieldInteractionEnhancement(nn.Module):
    """FIE logit term: semantic pair weights on field-pair inner products.

    Args:
        field_vectors (torch.Tensor): (N, d_llm) LLM vectors, row i for ``feature_names[i]``.
        feature_names (List[str]): N >= 2 keys of the pooled embeddings that have a vector.
        weight (float): lambda_FIE.

    Example::

        fie = FieldInteractionEnhancement(torch.randn(3, 384), ["user_id", "item_id", "genre"], 0.1)
        extra_logit = fie.logit(ebc(kjt))  # (B,)
        logits = logits + fie(output)      # as a CTRTask logit term
        fie.freeze()                       # constant pair weights for serving
    """

    def __init__(self, field_vectors: torch.Tensor, feature_names: List[str], weight: float = 0.1) -> None:
        super().__init__()
        num_fields = len(feature_names)
        if field_vectors.dim() != 2 or field_vectors.size(0) != num_fields or num_fields < 2:
            raise ValueError(
                f"FIE needs >= 2 fields and field_vectors of shape (len(feature_names)={num_fields}, d_llm), "
                f"got {tuple(field_vectors.shape)}"
            )
        self._feature_names: List[str] = list(feature_names)
        self._weight = float(weight)
        self._frozen = False
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)  # (P,), (P,)
        normed = F.normalize(field_vectors.detach().float(), dim=-1)  # (N, d_llm)
        similarity = (normed @ normed.t())[rows, cols]  # (P,)
        num_pairs = rows.numel()
        self.register_buffer("pair_rows", rows)
        self.register_buffer("pair_cols", cols)
        self.register_buffer("pair_similarity", similarity)
        self.register_buffer("frozen_pair_weights", torch.zeros(num_pairs))
        self.pair_weight = nn.Linear(num_pairs, num_pairs)

    @property
    def feature_names(self) -> List[str]:
        return self._feature_names

    @property
    def frozen(self) -> bool:
        return self._frozen

    def pair_weights(self) -> torch.Tensor:
        """w = Linear(S): (P,), pairs in ``torch.triu_indices`` order (or the frozen copy)."""
        if self._frozen:
            return self.frozen_pair_weights
        return self.pair_weight(self.pair_similarity)  # (P,)

    @torch.no_grad()
    def freeze(self) -> None:
        """Stores the current pair weights as a constant buffer (eval / serving)."""
        self.frozen_pair_weights.copy_(self.pair_weight(self.pair_similarity))
        self._frozen = True

    def unfreeze(self) -> None:
        """Back to computing pair weights from the trainable Linear."""
        self._frozen = False

    def logit(self, embeddings: KeyedTensor) -> torch.Tensor:
        """
        Args:
            embeddings (KeyedTensor): keys ⊇ ``feature_names``, each (B, D).

        Returns:
            torch.Tensor: (B,) weighted logit term.
        """
        # fields in the embeddings' own key order (a view, no copy); the pair weights are
        # permuted into that order instead, and keys without a vector get zero weight
        fields, positions = fields_in_key_order(embeddings, self._feature_names)  # (B, K, D), (N,)
        num_keys = fields.size(1)
        pair_matrix = fields.new_zeros(num_keys, num_keys).index_put(
            (positions[self.pair_rows], positions[self.pair_cols]), self.pair_weights()
        )  # (K, K), w_ij at (pos_i, pos_j)
        # the Gram against a (K, K) weight matrix instead of gathering (B, P) pairs
        return self._weight * weighted_pair_sum(fields, pair_matrix)  # (B,)

    def forward(self, output: CTROutput) -> torch.Tensor:
        """CTRTask logit term: ``logit(output.embeddings)``."""
        return self.logit(output.embeddings)
