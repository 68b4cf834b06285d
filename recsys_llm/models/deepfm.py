"""DeepFM on an EmbeddingBagCollection."""

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import CTRBackbone, stack_fields
from recsys_llm.models.fields import DenseFieldEmbedding, resolve_extra_fields
from recsys_llm.models.first_order import FirstOrder
from recsys_llm.models.fm import fm_interaction
from recsys_llm.models.mlp import build_mlp, check_layer_sizes
from recsys_llm.models.pairwise import PairWeightFolding, weighted_pair_sum
from recsys_llm.data.validation import check_number
from recsys_llm.typed_config import check_bool_settings

# leaves of the training pipeline's fx trace (they pick their kernel by whether gradients are needed)
torch.fx.wrap("weighted_pair_sum")
torch.fx.wrap("fm_interaction")


@dataclasses.dataclass(frozen=True)
class DeepFMConfig:
    """
    Args:
        mlp_layer_sizes (Tuple[int, ...]): hidden sizes of the deep part; H = last.
        dropout (float): dropout after each hidden layer.
        dense_as_fields (bool): dense features also join the FM part as fields :math:`x_j v_j`.
    """

    mlp_layer_sizes: Tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    dense_as_fields: bool = True

    def __post_init__(self) -> None:
        # named here: a float or string size failed in torch's Linear ("empty(): argument 'size' failed to unpack")
        check_layer_sizes("DeepFMConfig.mlp_layer_sizes", self.mlp_layer_sizes)
        check_bool_settings(self, ("dense_as_fields",), "DeepFMConfig")  # "false" would count as True
        check_number("DeepFMConfig.dropout", self.dropout, minimum=0, below=1)  # as model.dropout


class DeepFM(PairWeightFolding, CTRBackbone):
    r"""DeepFM (Guo et al., "DeepFM: A Factorization-Machine based Neural Network for CTR
    Prediction", IJCAI 2017): an FM and an MLP sharing the field embeddings.

    .. math::

        \hat y = \underbrace{b + \sum_f \langle w_f, e_f\rangle + \sum_j u_j x_j
                 + \sum_{i<j} \langle e_i, e_j\rangle}_{\text{FM}}
                 + w_h^\top h + b_h, \qquad
        h = \mathrm{MLP}([e_1; \dots; e_{F+E}; x])

    The FM part is :class:`~recsys_llm.models.fm.FM` (per-field linear vectors instead of dim-1 tables; dense
    features linear and, with ``dense_as_fields``, as fields). The MLP reads the
    concatenated F + E field embeddings and the raw dense features.
    Representation: the last MLP hidden ``h`` (B, H).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field, dim D.
        num_dense_features (int): Dd.
        config (Optional[DeepFMConfig]): model options (defaults if None).
        num_extra_fields (int): E extra fields passed to ``forward`` as (B, E, D).
        device (Optional[torch.device]): where the dense weights live.

    Example::

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=100, feature_names=[name])
            for name in ("user_id", "item_id")])
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        model = DeepFM(ebc, num_dense_features=2, config=DeepFMConfig(mlp_layer_sizes=(64, 32)))
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 32)
    """

    constant_own_pair_weights = True  # ones: r + c is formed once, when folded

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        config: Optional[DeepFMConfig] = None,
        num_extra_fields: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(embedding_bag_collection, num_dense_features, num_extra_fields)
        self._config = config if config is not None else DeepFMConfig()
        dim = self.embedding_dim
        self.first_order = FirstOrder(self.num_fields, dim, num_dense_features, device)
        self.dense_fields: Optional[DenseFieldEmbedding] = None
        if self._config.dense_as_fields and num_dense_features > 0:
            self.dense_fields = DenseFieldEmbedding(num_dense_features, dim, device)
        mlp_in = self.num_fields * dim + num_dense_features
        self.mlp = build_mlp(mlp_in, self._config.mlp_layer_sizes, self._config.dropout, device)
        self.head = nn.Linear(self._config.mlp_layer_sizes[-1], 1, device=device)
        self.register_buffer("folded_pair_weight", None, persistent=False)

    @property
    def representation_dim(self) -> int:
        return self._config.mlp_layer_sizes[-1]

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "DeepFM")
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        linear = self.first_order(fields, dense_features)  # (B,)
        mlp_input = torch.cat([fields.flatten(1), dense_features], dim=1)  # (B, (F + E) * D + Dd)
        hidden = self.mlp(mlp_input)  # (B, H)
        if self.dense_fields is not None:
            fields = torch.cat([fields, self.dense_fields(dense_features)], dim=1)  # (B, N, D)
        if self.folded_pair_weight is not None:  # serving with constant pair weights folded in
            second_order = weighted_pair_sum(fields, self.folded_pair_weights())  # (B,)
        else:
            second_order = fm_interaction(fields).sum(dim=-1)  # (B,)
        logits = linear + second_order + self.head(hidden).squeeze(-1)  # (B,)
        return logits, hidden
