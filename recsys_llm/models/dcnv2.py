"""DCN-V2 on an EmbeddingBagCollection, with torchrec's cross networks."""

import dataclasses
from typing import Optional, Tuple

import torch
from torch import nn
from torchrec.modules.crossnet import CrossNet, LowRankCrossNet
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.models.base import CTRBackbone, built_on, stack_fields
from recsys_llm.models.fields import resolve_extra_fields
from recsys_llm.data.validation import check_number
from recsys_llm.models.mlp import build_mlp, check_layer_sizes

STRUCTURES = ("stacked", "parallel")


class LinearCrossNet(CrossNet):
    """torchrec's full-rank :class:`CrossNet` (same parameters, same state dict), each layer's
    :math:`W_l x_l + b_l` computed as ``F.linear`` on (B, K) rows rather than ``torch.matmul`` of the (K, K) kernel
    with (B, K, 1) columns. The float32 logits are the same; what differs is the kernel: outside autograd, torch
    may run that matmul as a ``bmm`` over the kernel expanded to (B, K, K), which a ``torch.export`` program does,
    and in bfloat16 (``export --mixed-precision bf16``) that copy and ``bmm`` made DCNv2's program ~30x slower
    than its float32 one at batch 4096; ``F.linear`` is one GEMM in either precision.

    Args:
        in_features (int): K, the width of the input x_0.
        num_layers (int): L, the number of cross layers.

    Example::

        from recsys_llm.models.dcnv2 import LinearCrossNet
        cross = LinearCrossNet(in_features=10, num_layers=2)
        x_L = cross(torch.rand(3, 10))  # (3, 10)
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        """(B, K) -> (B, K): :math:`x_{l+1} = x_0 \\odot (W_l x_l + b_l) + x_l`."""
        x_l = input
        for layer in range(self._num_layers):
            x_l = input * nn.functional.linear(x_l, self.kernels[layer], self.bias[layer].squeeze(1)) + x_l
        return x_l


@dataclasses.dataclass(frozen=True)
class DCNv2Config:
    """
    Args:
        cross_layers (int): number of cross layers L (>= 1).
        low_rank (int): 0 for full-rank ``CrossNet``, r > 0 for ``LowRankCrossNet`` with
            rank r (the paper's low-rank cross layer, section 5).
        structure (str): ``"stacked"`` (MLP on the cross output) or ``"parallel"`` (cross
            and MLP side by side on x0, outputs concatenated).
        mlp_layer_sizes (Tuple[int, ...]): hidden sizes of the deep part.
        dropout (float): dropout after each hidden layer.
    """

    cross_layers: int = 3
    low_rank: int = 0
    structure: str = "stacked"
    mlp_layer_sizes: Tuple[int, ...] = (256, 128)
    dropout: float = 0.0

    def __post_init__(self) -> None:
        if self.structure not in STRUCTURES:
            raise ValueError(f"DCNv2Config.structure must be one of {STRUCTURES}, got {self.structure!r}")
        check_number("DCNv2Config.cross_layers", self.cross_layers, integer=True, minimum=1)
        check_number("DCNv2Config.low_rank (0 = full rank)", self.low_rank, integer=True, minimum=0)
        check_layer_sizes("DCNv2Config.mlp_layer_sizes", self.mlp_layer_sizes)
        check_number("DCNv2Config.dropout", self.dropout, minimum=0, below=1)  # as model.dropout


class DCNv2(CTRBackbone):
    r"""DCN-V2 (Wang et al., "DCN V2: Improved Deep & Cross Network and Practical Lessons
    for Web-scale Learning to Rank Systems", WWW 2021).

    The input :math:`x_0 = [e_1; \dots; e_{F+E}; x]` concatenates the F + E field
    embeddings and the raw dense features (K = (F + E) D + Dd). Cross layers (torchrec
    :class:`CrossNet`, or :class:`LowRankCrossNet` with :math:`W_l = U_l V_l^\top`):

    .. math::

        x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l

    stacked: :math:`h = \mathrm{MLP}(x_L)`; parallel: :math:`h = [x_L; \mathrm{MLP}(x_0)]`;
    :math:`\hat y = w^\top h + b`. Representation: ``h`` (B, H) with H = last MLP size
    (stacked) or K + last MLP size (parallel).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field, dim D.
        num_dense_features (int): Dd.
        config (Optional[DCNv2Config]): model options (defaults if None).
        num_extra_fields (int): E extra fields passed to ``forward`` as (B, E, D).
        device (Optional[torch.device]): where the dense weights live.

    Example::

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=100, feature_names=[name])
            for name in ("user_id", "item_id")])
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        model = DCNv2(ebc, num_dense_features=2, config=DCNv2Config(cross_layers=2, low_rank=8))
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 128)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        config: Optional[DCNv2Config] = None,
        num_extra_fields: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(embedding_bag_collection, num_dense_features, num_extra_fields)
        self._config = config if config is not None else DCNv2Config()
        cfg = self._config
        in_features = self.num_fields * self.embedding_dim + num_dense_features  # K
        # built on the dense device (torchrec's cross nets take none): its start draws from that device's
        # random stream, as the MLP's and the head's do
        with built_on(device):
            if cfg.low_rank > 0:
                self.crossnet: nn.Module = LowRankCrossNet(in_features, cfg.cross_layers, low_rank=cfg.low_rank)
            else:
                self.crossnet = LinearCrossNet(in_features, cfg.cross_layers)
        self.mlp = build_mlp(in_features, cfg.mlp_layer_sizes, cfg.dropout, device)
        self._parallel = cfg.structure == "parallel"
        self._representation_dim = cfg.mlp_layer_sizes[-1] + (in_features if self._parallel else 0)
        self.head = nn.Linear(self._representation_dim, 1, device=device)

    @property
    def representation_dim(self) -> int:
        return self._representation_dim

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "DCNv2")
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        x0 = torch.cat([fields.flatten(1), dense_features], dim=1)  # (B, K)
        crossed = self.crossnet(x0)  # (B, K)
        if self._parallel:
            hidden = torch.cat([crossed, self.mlp(x0)], dim=1)  # (B, K + H)
        else:
            hidden = self.mlp(crossed)  # (B, H)
        return self.head(hidden).squeeze(-1), hidden
