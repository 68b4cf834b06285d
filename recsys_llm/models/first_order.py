"""The first-order (linear) term of factorization machines, without dim-1 tables."""

from typing import Optional

import torch
from torch import nn


class FirstOrder(nn.Module):
    r"""Linear term of FM-style models: field-weighted linear on embeddings plus dense linear.

    Textbook FM keeps a scalar weight per id, i.e. a second embedding table of dim 1.
    FBGEMM's kernels under DistributedModelParallel need dims divisible by 4, so the scalar
    is read from the id's own embedding instead: each field :math:`f` has a learned vector
    :math:`w_f` and the id's weight is :math:`\langle w_f, e_f \rangle` (the "field-level
    linear vector" of FwFM, Pan et al. WWW 2018, FwFM_FiLV). Since :math:`e_f` is learned
    freely, this is a per-id weight lying in the embedding's span at no extra table cost.

    .. math::

        y_1 = b + \sum_f \langle w_f, e_f \rangle + \sum_j u_j x_j

    Args:
        num_fields (int): N, fields whose embeddings get a linear vector.
        embedding_dim (int): D.
        num_dense_features (int): Dd, dense features with a scalar weight each (0 for none).
        device (Optional[torch.device]): where the weights live.

    Example::

        from recsys_llm.models.first_order import FirstOrder
        first_order = FirstOrder(num_fields=3, embedding_dim=8, num_dense_features=2)
        y1 = first_order(torch.rand(4, 3, 8), torch.rand(4, 2))  # (4,)
    """

    def __init__(
        self,
        num_fields: int,
        embedding_dim: int,
        num_dense_features: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self.field_weight = nn.Parameter(torch.zeros(num_fields, embedding_dim, device=device))
        self.bias = nn.Parameter(torch.zeros(1, device=device))
        self.dense_weight: Optional[nn.Parameter] = None
        if num_dense_features > 0:
            self.dense_weight = nn.Parameter(torch.zeros(num_dense_features, device=device))

    def forward(self, fields: torch.Tensor, dense_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            fields (torch.Tensor): (B, N, D) field embeddings.
            dense_features (torch.Tensor): (B, Dd).

        Returns:
            torch.Tensor: (B,) linear logit term, bias included.
        """
        linear = (fields * self.field_weight).sum(dim=(1, 2)) + self.bias  # (B,)
        if self.dense_weight is not None:
            linear = linear + dense_features @ self.dense_weight  # (B,)
        return linear
