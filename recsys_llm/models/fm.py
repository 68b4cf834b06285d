"""Factorization Machine on an EmbeddingBagCollection."""

import dataclasses
from typing import Optional, Tuple

import torch
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import CTRBackbone, stack_fields
from recsys_llm.models.fields import DenseFieldEmbedding, resolve_extra_fields
from recsys_llm.models.first_order import FirstOrder
from recsys_llm.models.pairwise import PairWeightFolding, weighted_pair_sum
from recsys_llm.typed_config import check_bool_settings

# a leaf of the training pipeline's fx trace (it picks its kernel by whether gradients are needed)
torch.fx.wrap("weighted_pair_sum")


class _SumSquareInteraction(torch.autograd.Function):
    """The sum-square trick with a one-expression backward: d/de_i = g * (sum_j e_j - e_i).

    Autograd's backward of the trick walks five (B, N, D) intermediates (two expands, two
    power rules, their sum); this one makes one: about a third less time forward + backward on CPU.
    The backward is itself differentiable (gradient penalties, ``create_graph=True``), and
    ``setup_context`` + ``generate_vmap_rule`` let ``torch.func`` transform it.
    """

    generate_vmap_rule = True

    @staticmethod
    def forward(fields: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor]":  # (B, N, D) -> (B, D), (B, D)
        total = fields.sum(dim=-2)  # (B, D), kept for the backward
        return (total.square() - fields.square().sum(dim=-2)).mul_(0.5), total

    @staticmethod
    def setup_context(ctx, inputs: "tuple[torch.Tensor]", output: "tuple[torch.Tensor, torch.Tensor]") -> None:
        ctx.mark_non_differentiable(output[1])
        ctx.save_for_backward(inputs[0], output[1])

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _: Optional[torch.Tensor]) -> torch.Tensor:  # (B, D) -> (B, N, D)
        fields, total = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: the gradient's own graph runs through fields
            return (fields.sum(dim=-2, keepdim=True) - fields) * grad.unsqueeze(-2)
        return (total.unsqueeze(-2) - fields) * grad.unsqueeze(-2)  # sum_j e_j - e_i, times g


@torch.fx.wrap
def fm_interaction(fields: torch.Tensor) -> torch.Tensor:
    r"""Second-order FM interaction vector by the sum-square trick (Rendle 2010, eq. 5).

    .. math::

        v = \sum_{i<j} e_i \odot e_j
          = \tfrac{1}{2}\Big[\big(\sum_i e_i\big)^{2} - \sum_i e_i^{2}\Big]

    Summing ``v`` over its D entries gives :math:`\sum_{i<j}\langle e_i, e_j\rangle`. With
    gradients needed it is one autograd node; a leaf of the training pipeline's fx trace, so
    the choice is made at run time.

    Args:
        fields (torch.Tensor): (B, N, D).

    Returns:
        torch.Tensor: (B, D), in ``fields``' dtype; float16 / bfloat16 fields are summed and squared in float32
        (in float16 the square of a sum beyond 256 overflows, and inf - inf gave NaN for a finite result).
    """
    if fields.dtype in (torch.float16, torch.bfloat16):
        return fm_interaction(fields.float()).to(fields.dtype)
    if torch.is_grad_enabled() and fields.requires_grad:
        return _SumSquareInteraction.apply(fields)[0]
    square_of_sum = fields.sum(dim=1).pow(2)  # (B, D)
    sum_of_square = fields.pow(2).sum(dim=1)  # (B, D)
    return 0.5 * (square_of_sum - sum_of_square)  # (B, D)


@dataclasses.dataclass(frozen=True)
class FMConfig:
    """
    Args:
        dense_as_fields (bool): dense features also join the second order as fields
            :math:`x_j v_j` (see :class:`DenseFieldEmbedding`); they always have a linear term.
    """

    dense_as_fields: bool = True

    def __post_init__(self) -> None:
        check_bool_settings(self, ("dense_as_fields",), "FMConfig")  # "false" would count as True


class FM(PairWeightFolding, CTRBackbone):
    r"""Factorization Machine (Rendle, "Factorization Machines", ICDM 2010).

    Fields are the F pooled EBC embeddings, the E extra fields and (with
    ``dense_as_fields``) one field :math:`x_j v_j` per dense feature, N in all.

    .. math::

        \hat y = b + \sum_{f \le F+E} \langle w_f, e_f \rangle + \sum_j u_j x_j
                 + \sum_{i<j \le N} \langle e_i, e_j \rangle

    First order: no dim-1 table (FBGEMM under DMP needs dims divisible by 4); an id's
    weight is :math:`\langle w_f, e_f \rangle` with a learned vector per field (see
    :class:`FirstOrder`). Dense features enter the linear term with scalar weights
    :math:`u_j`. Representation: the (B, D) second-order vector
    :math:`\sum_{i<j} e_i \odot e_j`, whose sum is the second-order logit.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field, dim D.
        num_dense_features (int): Dd.
        config (Optional[FMConfig]): model options (defaults if None).
        num_extra_fields (int): E extra fields passed to ``forward`` as (B, E, D).
        device (Optional[torch.device]): where the dense weights live.

    Example::

        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        schema = DatasetSchema(name="toy", fields=[  # two id fields, two dense features
            FieldSpec("user_id", cardinality=10), FieldSpec("item_id", cardinality=10),
            FieldSpec("x1", "dense"), FieldSpec("x2", "dense")])
        ebc = build_embedding_bag_collection(schema, 16, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        model = FM(ebc, num_dense_features=2)
        out = model(torch.rand(3, 2), kjt)  # out.logits (3,), out.representation (3, 16)
    """

    constant_own_pair_weights = True  # ones: r + c is formed once, when folded

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        config: Optional[FMConfig] = None,
        num_extra_fields: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(embedding_bag_collection, num_dense_features, num_extra_fields)
        self._config = config if config is not None else FMConfig()
        self.first_order = FirstOrder(self.num_fields, self.embedding_dim, num_dense_features, device)
        self.dense_fields: Optional[DenseFieldEmbedding] = None
        if self._config.dense_as_fields and num_dense_features > 0:
            self.dense_fields = DenseFieldEmbedding(num_dense_features, self.embedding_dim, device)
        self.register_buffer("folded_pair_weight", None, persistent=False)

    @property
    def representation_dim(self) -> int:
        return self.embedding_dim

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "FM")
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        linear = self.first_order(fields, dense_features)  # (B,)
        if self.dense_fields is not None:
            fields = torch.cat([fields, self.dense_fields(dense_features)], dim=1)  # (B, N, D)
        representation = fm_interaction(fields)  # (B, D)
        if self.folded_pair_weight is not None:  # serving with constant pair weights folded in
            return linear + weighted_pair_sum(fields, self.folded_pair_weights()), representation
        return linear + representation.sum(dim=-1), representation
