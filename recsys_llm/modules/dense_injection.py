"""LLM vectors into a CTR model's input: as extra fields, or as DLRM dense features.

ELEC's gain network (Dong, Ouyang, Liu, SIGIR 2025) reads the CTR-adapted LLM's
representation r next to the tabular input. Three plug-ins:

* :class:`VectorFieldInjection` projects r to ``E`` extra field embeddings that take part
  in the backbone's feature interactions like any EBC field
  (``CTRTask(field_injection=...)``):  :math:`e_j = W_j r + b_j,\\ j = 1..E`.
* :class:`DLRMDenseInjection` feeds an unmodified ``torchrec.models.dlrm.DLRM``: the
  (optionally projected) vector is concatenated to DLRM's dense input,
  :math:`x' = [x; P r]`, so its bottom MLP sees it.
* :class:`DLRMDenseInjectionBackbone` does the same behind the backbone contract
  (``CTROutput`` with representation and pooled embeddings), so an unmodified DLRM fed an
  LLM vector through its dense input works with ``CTRTask``, FRE / FIE and
  ``TeacherStudentTask`` (ELEC's gain network as a teacher).
"""

from typing import Optional

import torch
from torch import nn
from torchrec.models.dlrm import DLRM
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.data.validation import check_number
from recsys_llm.models.base import checked_dense_dtype
from recsys_llm.models.dlrm import DLRMBackbone, dense_input_width, require_dlrm

# a leaf of the training pipeline's fx trace here too (the dtype is read at run time)
torch.fx.wrap("checked_dense_dtype")


@torch.fx.wrap  # a leaf of the pipeline's trace: it reads the vector's width at run time
def _checked_vector(vector: torch.Tensor, width: int, who: str) -> torch.Tensor:
    """``vector`` (B, width); another width is a ValueError naming ``who`` and what ``width`` is."""
    if vector.dim() != 2 or vector.size(1) != width:
        raise ValueError(
            f"{who}: the LLM vector is {tuple(vector.shape)}, expected (B, {width}) (in_dim: the width of the "
            "exported vectors: semantics adapt --representation-dim, or the LLM's hidden size for --output pooled)"
        )
    return vector


@torch.fx.wrap  # a leaf of the pipeline's trace, as _checked_vector
def _checked_dense(dense_features: torch.Tensor, width: int) -> torch.Tensor:
    """``dense_features`` (B, width); another shape is a ValueError naming DLRMDenseInjection's dense width."""
    if dense_features.dim() != 2 or dense_features.size(1) != width:
        raise ValueError(
            f"DLRMDenseInjection: dense features are {tuple(dense_features.shape)}, expected (B, {width}) "
            "(num_dense_features: the DLRM's dense_in_features less the injected width)"
        )
    return dense_features


class VectorFieldInjection(nn.Module):
    r"""Projects an LLM vector to ``num_fields`` extra field embeddings (the gain network's
    input of ELEC, Dong, Ouyang, Liu, SIGIR 2025).

    .. math::

        e_j = W_j r + b_j, \qquad j = 1, \dots, E

    one Linear (d -> E D) whose output is split into the E fields; the backbone interacts
    them like its EBC fields (``CTRTask(field_injection=...)``, backbone built with
    ``num_extra_fields=E``).

    Args:
        in_dim (int): d, width of the LLM vector (``semantics adapt --representation-dim``, or the
            LLM's hidden size for ``semantics export --output pooled``).
        embedding_dim (int): D, the backbone's embedding dim.
        num_fields (int): E, how many extra fields the vector becomes.

    Example::

        injection = VectorFieldInjection(in_dim=384, embedding_dim=16, num_fields=2)
        extra = injection(torch.randn(32, 384))  # (32, 2, 16), a backbone's extra_fields

    Raises:
        ValueError: a width or count that is not an integer >= 1.
    """

    def __init__(self, in_dim: int, embedding_dim: int, num_fields: int = 1) -> None:
        super().__init__()
        for name, value in (("in_dim", in_dim), ("embedding_dim", embedding_dim), ("num_fields", num_fields)):
            check_number(f"VectorFieldInjection.{name}", value, integer=True, minimum=1)
        self._num_fields = num_fields
        self._embedding_dim = embedding_dim
        self.projection = nn.Linear(in_dim, num_fields * embedding_dim)

    @property
    def in_dim(self) -> int:
        """d, the width of the vector it takes."""
        return self.projection.in_features

    @property
    def num_fields(self) -> int:
        return self._num_fields

    @property
    def embedding_dim(self) -> int:
        return self._embedding_dim

    def forward(self, vector: torch.Tensor) -> torch.Tensor:
        """
        Args:
            vector (torch.Tensor): (B, d); float16 vectors are cast to the weights' dtype.

        Returns:
            torch.Tensor: (B, E, D).
        """
        vector = _checked_vector(vector, self.projection.in_features, "VectorFieldInjection")
        projected = self.projection(vector.to(self.projection.weight.dtype))  # (B, E * D)
        return projected.view(-1, self._num_fields, self._embedding_dim)  # (B, E, D)


class DLRMDenseInjection(nn.Module):
    r"""Wraps an unmodified torchrec ``DLRM`` so it also reads an LLM vector r in its dense input:

    .. math::

        x' = [x; P r], \qquad \hat y = \mathrm{DLRM}(x', \mathrm{kjt})

    with P a Linear (d -> ``projected_dim``), or the identity when ``projected_dim`` is None.
    Build the DLRM with ``dense_in_features = num_dense + projected_dim`` (or
    ``num_dense + in_dim`` with ``projected_dim=None``, no projection).

    Args:
        dlrm (DLRM): torchrec's DLRM (or DLRM_DCN / DLRM_Projection).
        in_dim (int): d, width of the LLM vector.
        projected_dim (Optional[int]): width after a linear projection; None concatenates r as is.

    Example::

        from torchrec.models.dlrm import DLRM
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item_id", embedding_dim=16, num_embeddings=100, feature_names=["item_id"])])
        dlrm = DLRM(ebc, dense_in_features=13 + 16, dense_arch_layer_sizes=[64, 16],
                    over_arch_layer_sizes=[64, 1])
        model = DLRMDenseInjection(dlrm, in_dim=384, projected_dim=16)
        kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([3, 7, 1]), torch.tensor([1, 1, 1]))
        logits = model(torch.rand(3, 13), kjt, torch.randn(3, 384))  # (3,)
    """

    def __init__(self, dlrm: DLRM, in_dim: int, projected_dim: Optional[int] = None) -> None:
        super().__init__()
        require_dlrm(dlrm, "DLRMDenseInjection")
        check_number("DLRMDenseInjection.in_dim", in_dim, integer=True, minimum=1)
        check_number("DLRMDenseInjection.projected_dim", projected_dim, integer=True, minimum=1, optional=True)
        self.dlrm = dlrm
        self._in_dim = in_dim
        self.projection = nn.Linear(in_dim, projected_dim) if projected_dim is not None else None
        width = dense_input_width(dlrm)
        self._num_dense = width - (projected_dim if projected_dim is not None else in_dim)
        if self._num_dense < 0:
            raise ValueError(
                f"DLRM dense input has {width} features, fewer than the injected "
                f"{projected_dim if projected_dim is not None else in_dim}; build it with "
                "dense_in_features = num_dense + injected width"
            )

    @property
    def num_dense_features(self) -> int:
        """Width of the original dense input the caller passes."""
        return self._num_dense

    def forward(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor, vector: torch.Tensor
    ) -> torch.Tensor:
        """
        Args:
            dense_features (torch.Tensor): (B, Dd).
            sparse_features (KeyedJaggedTensor): the DLRM's features.
            vector (torch.Tensor): (B, d).

        Returns:
            torch.Tensor: logits (B,).
        """
        dense_features = checked_dense_dtype(_checked_dense(dense_features, self._num_dense), "DLRMDenseInjection")
        vector = _checked_vector(vector, self._in_dim, "DLRMDenseInjection").to(dense_features.dtype)
        if self.projection is not None:
            vector = self.projection(vector)  # (B, P)
        dense = torch.cat([dense_features, vector], dim=1)  # (B, Dd + P)
        return self.dlrm(dense, sparse_features).squeeze(-1)  # (B,)


class DLRMDenseInjectionBackbone(DLRMBackbone):
    r"""An unmodified torchrec ``DLRM`` as a backbone whose injected vector joins the dense input.

    ``CTRTask(field_injection=...)`` turns ``batch.extras[injection_key]`` (B, d) into
    (B, E, P) (e.g. :class:`VectorFieldInjection` with ``embedding_dim=P``); here those E
    vectors are flattened and concatenated to the dense features instead of being interacted
    as fields, :math:`x' = [x; \mathrm{flatten}(P r)]`, so DLRM's bottom MLP reads them (the
    gain-network input of ELEC for a DLRM the user already has). The DLRM only has to be built
    with ``dense_in_features = Dd + E * P``; its arches are called as in ``DLRM.forward``
    (through :class:`~recsys_llm.models.dlrm.DLRMBackbone`), so with the same input the logits
    equal ``dlrm(cat([dense, flatten(P r)]), kjt)``.

    Args:
        dlrm (DLRM): torchrec's ``DLRM`` (or ``DLRM_DCN``), built for F sparse fields.
        num_dense_features (int): Dd, the dense features of the data (without the vector).

    Example::

        from torchrec.models.dlrm import DLRM
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
            name="t_item_id", embedding_dim=16, num_embeddings=100, feature_names=["item_id"])])
        dlrm = DLRM(ebc, dense_in_features=3 + 16, dense_arch_layer_sizes=[32, 16],
                    over_arch_layer_sizes=[32, 16, 1])
        backbone = DLRMDenseInjectionBackbone(dlrm, num_dense_features=3)  # injected_width 16
        injection = VectorFieldInjection(384, backbone.injected_width)  # CTRTask's field_injection
        kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([3, 7, 1]), torch.tensor([1, 1, 1]))
        extra = injection(torch.randn(3, 384))  # (3, 1, 16)
        out = backbone(torch.rand(3, 3), kjt, extra)  # logits (3,), representation (3, 16)
    """

    _dense_input_is_data = False  # the data's dense features and the injected vector: checked here

    def __init__(self, dlrm: DLRM, num_dense_features: int) -> None:
        super().__init__(dlrm, num_dense_features)
        width = dense_input_width(dlrm)
        self._injected_width: int = width - num_dense_features
        if self._injected_width <= 0:
            raise ValueError(
                f"DLRMDenseInjectionBackbone: the DLRM's dense input has {width} features, no room "
                f"beyond the data's {num_dense_features}; build it with dense_in_features = num_dense + injected width"
            )

    @property
    def injected_width(self) -> int:
        """E * P, the width the injected vectors take in the dense input."""
        return self._injected_width

    def check_extra_fields(self, num_fields: int, embedding_dim: int, source: str) -> None:
        """Raises ValueError unless (B, num_fields, embedding_dim) flattens to ``injected_width``."""
        if num_fields * embedding_dim != self._injected_width:
            raise ValueError(
                f"{source} gives {num_fields} x {embedding_dim} = {num_fields * embedding_dim} values per row; the "
                f"DLRM's dense input has room for {self._injected_width} (injected_width)"
            )

    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """
        Args:
            dense_features (torch.Tensor): (B, Dd).
            embeddings (KeyedTensor): pooled EBC output.
            extra_fields (Optional[torch.Tensor]): (B, E, P) with E * P = ``injected_width``.

        Returns:
            Tuple[torch.Tensor, torch.Tensor]: logits (B,), representation (B, H).
        """
        if extra_fields is None:
            raise ValueError("DLRMDenseInjectionBackbone needs the injected vector: give CTRTask a field_injection")
        injected = extra_fields.flatten(1).to(dense_features.dtype)  # (B, E * P)
        dense = torch.cat([dense_features, injected], dim=1)  # (B, Dd + E * P)
        return super().interact(dense, embeddings, None)
