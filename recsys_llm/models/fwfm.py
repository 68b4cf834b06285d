"""Field-weighted Factorization Machine on an EmbeddingBagCollection."""

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import CTRBackbone, stack_fields
from recsys_llm.models.fields import DenseFieldEmbedding, resolve_extra_fields
from recsys_llm.models.first_order import FirstOrder
from recsys_llm.models.pairwise import PairWeightFolding
from recsys_llm.typed_config import check_bool_settings


def fwfm_interaction(fields: torch.Tensor, pair_weight: torch.Tensor) -> torch.Tensor:
    r"""Field-weighted pairwise interaction vector.

    .. math::

        v = \sum_{i<j} r_{ij}\, e_i \odot e_j = \sum_i e_i \odot \sum_j R_{ij} e_j,
        \quad R = \mathrm{triu}(r, 1)

    computed without materialising the (B, N, N, D) pair tensor.

    Args:
        fields (torch.Tensor): (B, N, D).
        pair_weight (torch.Tensor): (N, N); only the strict upper triangle is used.

    Returns:
        torch.Tensor: (B, D); its sum is :math:`\sum_{i<j} r_{ij}\langle e_i, e_j\rangle`.
    """
    upper = torch.triu(pair_weight, diagonal=1)  # (N, N)
    mixed = torch.einsum("ij,bjd->bid", upper, fields)  # (B, N, D)
    return (fields * mixed).sum(dim=1)  # (B, D)


@dataclasses.dataclass(frozen=True)
class FwFMConfig:
    """
    Args:
        dense_as_fields (bool): dense features also join the pairs as fields :math:`x_j v_j`.
    """

    dense_as_fields: bool = True

    def __post_init__(self) -> None:
        check_bool_settings(self, ("dense_as_fields",), "FwFMConfig")  # "false" would count as True


class FwFM(PairWeightFolding, CTRBackbone):
    r"""Field-weighted FM (Pan et al., "Field-weighted Factorization Machines for
    Click-Through Rate Prediction in Display Advertising", WWW 2018).

    Every field pair (i, j) has a learned strength :math:`r_{ij}` (initialised to 1,
    i.e. FwFM starts as FM):

    .. math::

        \hat y = b + \sum_{f \le F+E} \langle w_f, e_f \rangle + \sum_j u_j x_j
                 + \sum_{i<j \le N} r_{ij} \langle e_i, e_j \rangle

    The linear term is the paper's field-level linear vector variant (FiLV), which also
    avoids dim-1 tables (see :class:`FirstOrder`). Fields: F EBC fields, E extra fields,
    and with ``dense_as_fields`` one field :math:`x_j v_j` per dense feature; dense
    features also have scalar linear weights. Representation: the (B, D) vector
    :math:`\sum_{i<j} r_{ij} e_i \odot e_j` whose sum is the interaction logit.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field, dim D.
        num_dense_features (int): Dd.
        config (Optional[FwFMConfig]): model options (defaults if None).
        num_extra_fields (int): E extra fields passed to ``forward`` as (B, E, D).
        device (Optional[torch.device]): where the dense weights live.

    Example::

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=100, feature_names=[name])
            for name in ("user_id", "item_id")])
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        model = FwFM(ebc, num_dense_features=2)
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 16)
        model.pair_weights()  # (N, N) strict upper triangle r_ij
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        config: Optional[FwFMConfig] = None,
        num_extra_fields: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(embedding_bag_collection, num_dense_features, num_extra_fields)
        self._config = config if config is not None else FwFMConfig()
        self.first_order = FirstOrder(self.num_fields, self.embedding_dim, num_dense_features, device)
        self.dense_fields: Optional[DenseFieldEmbedding] = None
        if self._config.dense_as_fields and num_dense_features > 0:
            self.dense_fields = DenseFieldEmbedding(num_dense_features, self.embedding_dim, device)
        self.pair_weight = nn.Parameter(torch.ones(self.num_pair_fields, self.num_pair_fields, device=device))
        self.register_buffer("folded_pair_weight", None, persistent=False)

    @property
    def representation_dim(self) -> int:
        return self.embedding_dim

    def own_pair_weights(self, like: torch.Tensor) -> torch.Tensor:
        """(N, N) learned r (``like`` is not read; the kernel uses the strict upper triangle)."""
        return self.pair_weight

    def pair_weights(self) -> torch.Tensor:
        """(N, N) field-pair strengths, zero outside the strict upper triangle."""
        return torch.triu(self.pair_weight, diagonal=1)

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "FwFM")
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        linear = self.first_order(fields, dense_features)  # (B,)
        if self.dense_fields is not None:
            fields = torch.cat([fields, self.dense_fields(dense_features)], dim=1)  # (B, N, D)
        pair_weight = self.pair_weight
        if self.folded_pair_weight is not None:  # serving with constant pair weights folded in
            pair_weight = self.folded_pair_weights()  # (N, N)
        representation = fwfm_interaction(fields, pair_weight)  # (B, D)
        return linear + representation.sum(dim=-1), representation
