"""FinalMLP on an EmbeddingBagCollection: two gated MLP streams fused bilinearly."""

import dataclasses
from typing import List, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.data.validation import check_number
from recsys_llm.models.base import CTRBackbone, stack_fields
from recsys_llm.models.fields import resolve_extra_fields
from recsys_llm.models.mlp import build_mlp, check_layer_sizes


class FeatureGate(nn.Module):
    r"""Stream-specific feature selection of FinalMLP (section 3.2).

    .. math::

        g = 2\,\sigma(\mathrm{MLP}(c)), \qquad \tilde x = g \odot x

    The context :math:`c` is the concatenation of chosen field embeddings, or a learned
    vector (the official code's default when no context field is given) so the gate
    is then a learned per-input-dimension weight. The context fields are the backbone's
    own pooled embeddings, so the gate's gradient also trains them; FuxiCTR's
    ``FeatureSelection`` embeds its context fields with tables of their own.

    Args:
        in_features (int): K, width of x.
        context_fields (Sequence[int]): indices (into the stacked fields) of the context
            fields; empty for a learned context vector.
        embedding_dim (int): D.
        hidden_sizes (Sequence[int]): hidden sizes of the gate MLP.
        device (Optional[torch.device]): where the weights live.

    Example::

        from recsys_llm.models.finalmlp import FeatureGate
        gate = FeatureGate(in_features=24, context_fields=[0], embedding_dim=8, hidden_sizes=[16])
        x_gated = gate(torch.rand(4, 24), torch.rand(4, 3, 8))  # (4, 24)
    """

    def __init__(
        self,
        in_features: int,
        context_fields: Sequence[int],
        embedding_dim: int,
        hidden_sizes: Sequence[int],
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        self._context_fields: List[int] = list(context_fields)
        context_dim = embedding_dim * max(1, len(self._context_fields))
        self.context: Optional[nn.Parameter] = None
        if not self._context_fields:
            self.context = nn.Parameter(torch.zeros(1, embedding_dim, device=device))
        layers: List[nn.Module] = []
        if hidden_sizes:
            layers.append(build_mlp(context_dim, hidden_sizes, 0.0, device))
            context_dim = hidden_sizes[-1]
        layers.append(nn.Linear(context_dim, in_features, device=device))
        self.gate = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor, fields: torch.Tensor) -> torch.Tensor:
        """
        Args:
            features (torch.Tensor): (B, K) stream input.
            fields (torch.Tensor): (B, N, D) stacked fields to read the context from.

        Returns:
            torch.Tensor: (B, K) gated input.
        """
        if self.context is not None:
            context = self.context  # (1, D)
        else:
            context = fields[:, self._context_fields].flatten(1)  # (B, C * D)
        return features * (2.0 * torch.sigmoid(self.gate(context)))  # (B, K)


class BilinearFusion(nn.Module):
    r"""Multi-head bilinear fusion of two stream outputs (FinalMLP, section 3.3).

    Each stream output is split into k heads; head :math:`i` contributes a bilinear form:

    .. math::

        \hat y = b + w_1^\top o_1 + w_2^\top o_2
                 + \sum_{i=1}^{k} o_{1,i}^\top W_{3,i}\, o_{2,i}

    Args:
        dim1 (int): width of stream 1's output (divisible by ``num_heads``).
        dim2 (int): width of stream 2's output (divisible by ``num_heads``).
        num_heads (int): k.
        device (Optional[torch.device]): where the weights live.

    Example::

        from recsys_llm.models.finalmlp import BilinearFusion
        fusion = BilinearFusion(dim1=32, dim2=16, num_heads=4)
        logits = fusion(torch.rand(8, 32), torch.rand(8, 16))  # (8,)
    """

    def __init__(self, dim1: int, dim2: int, num_heads: int, device: Optional[torch.device] = None) -> None:
        super().__init__()
        if num_heads < 1 or dim1 % num_heads or dim2 % num_heads:
            raise ValueError(
                f"BilinearFusion: both stream widths ({dim1}, {dim2}) must be divisible by num_heads={num_heads}"
            )
        self._num_heads = num_heads
        self.linear1 = nn.Linear(dim1, 1, bias=True, device=device)
        self.linear2 = nn.Linear(dim2, 1, bias=False, device=device)
        self.bilinear = nn.Parameter(torch.empty(num_heads, dim1 // num_heads, dim2 // num_heads, device=device))
        nn.init.xavier_normal_(self.bilinear)

    def forward(self, stream1: torch.Tensor, stream2: torch.Tensor) -> torch.Tensor:
        """
        Args:
            stream1 (torch.Tensor): (B, H1).
            stream2 (torch.Tensor): (B, H2).

        Returns:
            torch.Tensor: (B,) logits.
        """
        heads1 = stream1.view(stream1.size(0), self._num_heads, -1)  # (B, k, H1 / k)
        heads2 = stream2.view(stream2.size(0), self._num_heads, -1)  # (B, k, H2 / k)
        bilinear = torch.einsum("bki,kij,bkj->b", heads1, self.bilinear, heads2)  # (B,)
        return self.linear1(stream1).squeeze(-1) + self.linear2(stream2).squeeze(-1) + bilinear


@dataclasses.dataclass(frozen=True)
class FinalMLPConfig:
    """
    Args:
        mlp1_layer_sizes (Tuple[int, ...]): hidden sizes of stream 1.
        mlp2_layer_sizes (Tuple[int, ...]): hidden sizes of stream 2.
        dropout (float): dropout after each stream layer.
        num_heads (int): heads of the bilinear fusion (divides both last sizes).
        gate_hidden_sizes (Tuple[int, ...]): hidden sizes of each feature-gate MLP.
        context1 (Tuple[str, ...]): sparse field names forming stream 1's gate context
            (empty: learned context vector).
        context2 (Tuple[str, ...]): same for stream 2.
    """

    mlp1_layer_sizes: Tuple[int, ...] = (256, 128)
    mlp2_layer_sizes: Tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    num_heads: int = 1
    gate_hidden_sizes: Tuple[int, ...] = (64,)
    context1: Tuple[str, ...] = ()
    context2: Tuple[str, ...] = ()

    def __post_init__(self) -> None:
        # named here: the three MLPs' sizes would otherwise fail alike in build_mlp, and a context
        # given as one string would be read as its characters
        check_layer_sizes("FinalMLPConfig.mlp1_layer_sizes", self.mlp1_layer_sizes)
        check_layer_sizes("FinalMLPConfig.mlp2_layer_sizes", self.mlp2_layer_sizes)
        check_layer_sizes("FinalMLPConfig.gate_hidden_sizes", self.gate_hidden_sizes, allow_empty=True)
        check_number("FinalMLPConfig.dropout", self.dropout, minimum=0, below=1)  # as model.dropout
        check_number("FinalMLPConfig.num_heads", self.num_heads, integer=True, minimum=1)
        for key in ("context1", "context2"):
            if isinstance(getattr(self, key), str):
                raise ValueError(f"FinalMLPConfig.{key}: expected a tuple of field names, got the string "
                                 f"{getattr(self, key)!r} (write ({getattr(self, key)!r},))")


class FinalMLP(CTRBackbone):
    r"""FinalMLP (Mao et al., "FinalMLP: An Enhanced Two-Stream MLP Model for CTR
    Prediction", AAAI 2023).

    Input :math:`x = [e_1; \dots; e_{F+E}; x_{dense}]` (K = (F + E) D + Dd: field
    embeddings then raw dense features). Two streams with their own feature gates
    (:class:`FeatureGate`), fused by :class:`BilinearFusion`:

    .. math::

        o_1 = \mathrm{MLP}_1(g_1 \odot x), \quad o_2 = \mathrm{MLP}_2(g_2 \odot x), \quad
        \hat y = \mathrm{BF}(o_1, o_2)

    Representation: :math:`[o_1; o_2]` (B, H1 + H2).

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field, dim D.
        num_dense_features (int): Dd.
        config (Optional[FinalMLPConfig]): model options (defaults if None).
        num_extra_fields (int): E extra fields passed to ``forward`` as (B, E, D).
        device (Optional[torch.device]): where the dense weights live.

    Example::

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=16, num_embeddings=100, feature_names=[name])
            for name in ("user_id", "item_id")])
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        model = FinalMLP(ebc, 2, FinalMLPConfig(num_heads=2, context1=("user_id",)))
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 256)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        config: Optional[FinalMLPConfig] = None,
        num_extra_fields: int = 0,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__(embedding_bag_collection, num_dense_features, num_extra_fields)
        self._config = config if config is not None else FinalMLPConfig()
        cfg = self._config
        dim = self.embedding_dim
        in_features = self.num_fields * dim + num_dense_features  # K
        self.gate1 = FeatureGate(in_features, self._field_indices(cfg.context1, "context1"), dim, cfg.gate_hidden_sizes,
                                 device)
        self.gate2 = FeatureGate(in_features, self._field_indices(cfg.context2, "context2"), dim, cfg.gate_hidden_sizes,
                                 device)
        self.mlp1 = build_mlp(in_features, cfg.mlp1_layer_sizes, cfg.dropout, device)
        self.mlp2 = build_mlp(in_features, cfg.mlp2_layer_sizes, cfg.dropout, device)
        self.fusion = BilinearFusion(cfg.mlp1_layer_sizes[-1], cfg.mlp2_layer_sizes[-1], cfg.num_heads, device)

    def _field_indices(self, names: Sequence[str], setting: str) -> List[int]:
        """Positions of a gate's context fields; ``setting``: ``context1`` / ``context2``, named in errors."""
        unknown = [n for n in names if n not in self.feature_names]
        if unknown:
            raise ValueError(f"model.finalmlp_{setting} (FinalMLPConfig.{setting}): gate context fields {unknown} are "
                             f"not sparse features {self.feature_names}")
        return [self.feature_names.index(n) for n in names]

    @property
    def representation_dim(self) -> int:
        return self._config.mlp1_layer_sizes[-1] + self._config.mlp2_layer_sizes[-1]

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        extra_fields = resolve_extra_fields(extra_fields, self._num_extra_fields, "FinalMLP")
        fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
        x = torch.cat([fields.flatten(1), dense_features], dim=1)  # (B, K)
        stream1 = self.mlp1(self.gate1(x, fields))  # (B, H1)
        stream2 = self.mlp2(self.gate2(x, fields))  # (B, H2)
        logits = self.fusion(stream1, stream2)  # (B,)
        return logits, torch.cat([stream1, stream2], dim=1)  # (B, H1 + H2)
