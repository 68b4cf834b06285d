"""Field helpers shared by the backbones: dense features as fields, extra-field checks."""

from typing import Optional

import torch
from torch import nn


class DenseFieldEmbedding(nn.Module):
    r"""Turns each dense feature into one field embedding, as FM libraries do for numeric fields.

    Each numeric feature :math:`j` owns a vector :math:`v_j \in R^D` and contributes the
    field :math:`e_j = x_j v_j`, so it interacts with the categorical fields through
    :math:`\langle e_i, e_j \rangle = x_j \langle e_i, v_j \rangle` (Rendle 2010, FM with
    real-valued features; the ``numeric`` fields of FuxiCTR and DeepCTR).

    Args:
        num_dense_features (int): Dd, number of dense features.
        embedding_dim (int): D.
        device (Optional[torch.device]): where the vectors live.

    Example::

        from recsys_llm.models.fields import DenseFieldEmbedding
        dense_fields = DenseFieldEmbedding(num_dense_features=3, embedding_dim=8)
        fields = dense_fields(torch.rand(4, 3))  # (4, 3, 8)
    """

    def __init__(self, num_dense_features: int, embedding_dim: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if num_dense_features <= 0:
            raise ValueError(f"DenseFieldEmbedding needs at least one dense feature, got {num_dense_features}")
        self.weight = nn.Parameter(torch.empty(num_dense_features, embedding_dim, device=device))
        nn.init.xavier_normal_(self.weight)

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense_features (torch.Tensor): (B, Dd).

        Returns:
            torch.Tensor: (B, Dd, D).
        """
        return dense_features.unsqueeze(-1) * self.weight  # (B, Dd, 1) * (Dd, D) -> (B, Dd, D)


def resolve_extra_fields(
    extra_fields: Optional[torch.Tensor], num_extra_fields: int, owner: str
) -> Optional[torch.Tensor]:
    """Checks ``extra_fields`` against the count the model was built for.

    Raises when extra fields are declared but missing, given as a tensor to a model built
    without them, or given as a tensor of another number of fields than E. Returns None for a
    model without extra fields, so that tracing such a model with a placeholder for
    ``extra_fields`` (``torch.fx.symbolic_trace`` proxies every argument) yields a graph that
    ignores it. Only static checks: fx-traceable (a proxy's shape is not checked).

    Args:
        extra_fields (Optional[torch.Tensor]): (B, E, D) or None.
        num_extra_fields (int): E the model was built for.
        owner (str): model name for the message.

    Returns:
        Optional[torch.Tensor]: ``extra_fields`` if E > 0, else None.
    """
    if num_extra_fields == 0:
        if isinstance(extra_fields, torch.Tensor):
            raise ValueError(f"{owner} was built with num_extra_fields=0 but got extra_fields; build it with E")
        return None
    if extra_fields is None:
        raise ValueError(f"{owner} was built with num_extra_fields={num_extra_fields} but got extra_fields=None")
    if isinstance(extra_fields, torch.Tensor) and (extra_fields.dim() != 3 or extra_fields.size(1) != num_extra_fields):
        raise ValueError(f"{owner} was built with num_extra_fields={num_extra_fields}: extra_fields must be "
                         f"(B, {num_extra_fields}, D), got {tuple(extra_fields.shape)}")
    return extra_fields
