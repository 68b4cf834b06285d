"""torchrec's own DLRM / DLRM_DCN behind the backbone contract, unmodified."""

from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.models.dlrm import DLRM, DLRM_DCN, InteractionArch, InteractionDCNArch, OverArch, choose
from torchrec.modules.crossnet import LowRankCrossNet
from torchrec.modules.embedding_configs import DataType
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.base import CTRBackbone, built_on, stack_fields
from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.fields import resolve_extra_fields


def require_dlrm(model: nn.Module, user: str) -> None:
    """Raises TypeError unless ``model`` is torchrec's ``DLRM`` (or a subclass: ``DLRM_DCN``, ``DLRM_Projection``)."""
    if not isinstance(model, DLRM):
        raise TypeError(
            f"{user} wraps torchrec's DLRM (or DLRM_DCN / DLRM_Projection), got {type(model).__name__}; a model of "
            "your own becomes a backbone by subclassing recsys_llm.models.base.CTRBackbone "
            "(examples/plug_into_own_model.py)"
        )


def dense_input_width(dlrm: DLRM) -> int:
    """The features a DLRM's bottom MLP (``dense_arch``) reads: its ``dense_in_features``."""
    return next(m for m in dlrm.dense_arch.modules() if isinstance(m, nn.Linear)).in_features


class DLRMBackbone(CTRBackbone):
    r"""Adapter running an unmodified torchrec ``DLRM`` (or ``DLRM_DCN``) as a backbone.

    DLRM (Naumov et al., "Deep Learning Recommendation Model for Personalization and
    Recommendation Systems", 2019) embeds dense features with the dense arch
    :math:`z = \mathrm{MLP}_d(x)` (B, D), interacts :math:`[z; e_1; \dots; e_{F+E}]`
    in its ``inter_arch`` (pairwise dots, or a low-rank cross net for DLRM_DCN), and
    predicts with the over arch. The adapter calls the DLRM's own submodules in the
    order of ``DLRM.forward``, so the logits equal ``dlrm(dense, sparse).squeeze(1)``;
    it splits the over arch into its MLP and last Linear to expose the representation.

    The adapter registers the DLRM's ``dense_arch``, ``inter_arch`` and ``over_arch``
    and its EBC (``dlrm.sparse_arch.embedding_bag_collection``) as its own children:
    the parameters are shared, not copied, and each module has one FQN for the planner.
    After DistributedModelParallel wraps the adapter, call the adapter, not ``dlrm``.

    Extra fields (B, E, D) are concatenated after the F sparse embeddings before
    ``inter_arch``, whose sizes depend on the field count: the DLRM must be built for
    F + E fields, as :func:`build_dlrm` does (checked here).

    Args:
        dlrm (DLRM): a torchrec ``DLRM`` or ``DLRM_DCN`` (any ``inter_arch`` with ``F``).
        num_dense_features (int): Dd, the DLRM's ``dense_in_features``.
        num_extra_fields (int): E extra fields passed to ``forward``.

    Example::

        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        schema = DatasetSchema(name="toy", fields=[  # two id fields, two dense features
            FieldSpec("user_id", cardinality=10), FieldSpec("item_id", cardinality=10),
            FieldSpec("x1", "dense"), FieldSpec("x2", "dense")])
        dlrm = build_dlrm(schema, 16, [32, 16], [32, 16, 1], dcn=True, device=torch.device("cpu"))
        model = DLRMBackbone(dlrm, num_dense_features=len(schema.dense_fields))
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 16)
    """

    # a subclass whose DLRM reads more than the data's dense features (an injected vector) checks the width itself
    _dense_input_is_data: bool = True

    def __init__(self, dlrm: DLRM, num_dense_features: int, num_extra_fields: int = 0) -> None:
        require_dlrm(dlrm, type(self).__name__)
        super().__init__(dlrm.sparse_arch.embedding_bag_collection, num_dense_features, num_extra_fields)
        if self._dense_input_is_data and dense_input_width(dlrm) != num_dense_features:
            raise ValueError(
                f"{type(self).__name__}: num_dense_features={num_dense_features}, but the DLRM's dense_arch reads "
                f"{dense_input_width(dlrm)} features (its dense_in_features); give the data's dense feature count "
                "and build the DLRM with it"
            )
        expected_fields = len(self.feature_names) + num_extra_fields
        inter_fields = getattr(dlrm.inter_arch, "F", None)
        if inter_fields != expected_fields:
            raise ValueError(
                f"DLRMBackbone: the DLRM's inter_arch interacts {inter_fields} fields but the adapter needs "
                f"{len(self.feature_names)} sparse + {num_extra_fields} extra = {expected_fields}; "
                "build it with recsys_llm.models.dlrm.build_dlrm(..., num_extra_fields=E)"
            )
        if not isinstance(dlrm.over_arch, OverArch) or len(dlrm.over_arch.model) != 2:
            raise ValueError("DLRMBackbone needs torchrec's OverArch (MLP followed by a Linear) as over_arch")
        if dlrm.over_arch.model[1].out_features != 1:
            raise ValueError(
                f"DLRMBackbone needs one logit per row; over_arch ends in {dlrm.over_arch.model[1].out_features}"
            )
        self.dense_arch = dlrm.dense_arch
        self.inter_arch = dlrm.inter_arch
        self.over_arch = dlrm.over_arch
        self._representation_dim: int = dlrm.over_arch.model[1].in_features

    @property
    def representation_dim(self) -> int:
        return self._representation_dim

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "DLRMBackbone")
        embedded_dense = self.dense_arch(dense_features)  # (B, D)
        # SparseArch's (B, F, D) view of the pooled embeddings: same order, same values.
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        interactions = self.inter_arch(dense_features=embedded_dense, sparse_features=fields)  # (B, I)
        hidden = self.over_arch.model[0](interactions)  # (B, H)
        logits = self.over_arch.model[1](hidden)  # (B, 1)
        return logits.squeeze(-1), hidden


def build_dlrm(
    schema: DatasetSchema,
    embedding_dim: int,
    dense_arch_layer_sizes: Sequence[int],
    over_arch_layer_sizes: Sequence[int],
    *,
    dcn: bool = False,
    dcn_num_layers: int = 3,
    dcn_low_rank_dim: int = 16,
    num_extra_fields: int = 0,
    device: Optional[torch.device] = torch.device("meta"),
    dense_device: Optional[torch.device] = None,
    table_prefix: str = "t_",
    embedding_init_scale: Optional[float] = None,
    embedding_data_type: DataType = DataType.FP32,
) -> DLRM:
    """Builds torchrec's ``DLRM`` (or ``DLRM_DCN``) for a data set, sized for E extra fields.

    With ``num_extra_fields == 0`` this is exactly the torchrec constructor. With E > 0 the
    interaction and over arches are rebuilt from torchrec's own classes for F + E fields,
    the same way ``DLRM_DCN.__init__`` replaces the arches of ``DLRM``; the model then
    expects its input through :class:`DLRMBackbone`.

    Args:
        schema (DatasetSchema): the data set (one table per categorical field).
        embedding_dim (int): D (multiple of 4).
        dense_arch_layer_sizes (Sequence[int]): dense arch sizes; the last must equal D.
        over_arch_layer_sizes (Sequence[int]): over arch sizes, ending in 1 (at least two).
        dcn (bool): ``DLRM_DCN`` (low-rank cross net interaction) instead of dot products.
        dcn_num_layers (int): cross layers of DLRM_DCN.
        dcn_low_rank_dim (int): rank of DLRM_DCN's cross layers.
        num_extra_fields (int): E.
        device (Optional[torch.device]): device of the EBC (``meta`` for sharding).
        dense_device (Optional[torch.device]): device of the dense arches.
        table_prefix (str): table name prefix.
        embedding_init_scale (Optional[float]): uniform init bound of the tables (None: torchrec's default).
        embedding_data_type (DataType): the tables' weight dtype (``FP32`` or ``FP16``).

    Returns:
        DLRM: a torchrec ``DLRM`` or ``DLRM_DCN``.
    """
    dense_sizes: List[int] = [int(s) for s in dense_arch_layer_sizes]
    over_sizes: List[int] = [int(s) for s in over_arch_layer_sizes]
    if not dense_sizes or dense_sizes[-1] != embedding_dim:
        raise ValueError(f"build_dlrm: dense_arch_layer_sizes {dense_sizes} must end in embedding_dim={embedding_dim}")
    if len(over_sizes) < 2 or over_sizes[-1] != 1:
        raise ValueError(f"build_dlrm: over_arch_layer_sizes {over_sizes} needs >= 2 sizes ending in 1")
    # torchrec's DLRM takes one width from its tables: a field's own width failed there with a bare
    # AssertionError (widths differ) or a message that printed "{dense_arch_layer_sizes[-1]}" (all alike)
    own_widths = {spec.name: spec.embedding_dim for spec in schema.categorical_fields
                  if spec.embedding_dim is not None and spec.embedding_dim != embedding_dim}
    if own_widths:
        raise ValueError(
            f"build_dlrm: DLRM interacts fields of one width, embedding_dim={embedding_dim} (the dense arch's last "
            f"size), but schema {schema.name!r} gives fields an embedding_dim of their own: {own_widths}; remove it "
            "from those fields, or make it the model's embedding_dim"
        )
    ebc = build_embedding_bag_collection(schema, embedding_dim, device=device, table_prefix=table_prefix,
                                         init_scale=embedding_init_scale, data_type=embedding_data_type)
    dense_in = len(schema.dense_fields)
    # on the dense device: torchrec builds the interaction (DCN's cross net, DLRM's triu_indices) without one, and
    # the cross net's start then drew from the CPU's random stream while the MLPs drew from the dense device's
    arch = dict(embedding_bag_collection=ebc, dense_in_features=dense_in, dense_arch_layer_sizes=dense_sizes,
                over_arch_layer_sizes=over_sizes, dense_device=dense_device)
    with built_on(dense_device):
        if dcn:
            dlrm: DLRM = DLRM_DCN(**arch, dcn_num_layers=dcn_num_layers, dcn_low_rank_dim=dcn_low_rank_dim)
        else:
            dlrm = DLRM(**arch)
        if num_extra_fields > 0:
            num_fields = len(dlrm.sparse_arch.sparse_feature_names) + num_extra_fields
            if dcn:
                crossnet = LowRankCrossNet(
                    in_features=(num_fields + 1) * embedding_dim, num_layers=dcn_num_layers, low_rank=dcn_low_rank_dim
                )
                dlrm.inter_arch = InteractionDCNArch(num_sparse_features=num_fields, crossnet=crossnet)
                over_in = (num_fields + 1) * embedding_dim
            else:
                dlrm.inter_arch = InteractionArch(num_sparse_features=num_fields)
                over_in = embedding_dim + choose(num_fields, 2) + num_fields
            dlrm.over_arch = OverArch(in_features=over_in, layer_sizes=over_sizes, device=dense_device)
    return dlrm
