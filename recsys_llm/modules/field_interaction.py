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

import contextlib
import weakref
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedTensor

from recsys_llm.data.validation import check_number
from recsys_llm.models.base import CTROutput, fields_in_key_order, has_one_dim, key_positions
from recsys_llm.models.once_differentiable import first_order_only
from recsys_llm.modules.field_semantics import check_feature_name_list, check_finite_vectors
from recsys_llm.models.pairwise import PairWeightFolding, pair_sum_backward, pair_sum_forward, weighted_pair_sum

# a leaf of the training pipeline's fx trace (it reads the KeyedTensor's key order)
torch.fx.wrap("fields_in_key_order")
# a leaf too (it picks its kernel by whether gradients are needed)
torch.fx.wrap("weighted_pair_sum")


def _semantic_pair_matrix(
    fields: torch.Tensor,
    similarity: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    flat_pairs: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(K, K) in ``fields``' dtype: ``scale * (weight @ similarity + bias)`` at ``flat_pairs``, zeros elsewhere."""
    num_keys = fields.size(1)
    # float32 under autocast too: CUDA's casts addmv to bf16 / fp16 (CPU's does not); a device without autocast
    # (meta: a shape-only forward) has none to leave, and torch.autocast refuses it
    device_type = fields.device.type
    no_autocast = torch.autocast(device_type, enabled=False) if device_type != "meta" else contextlib.nullcontext()
    with no_autocast:
        pair_weights = torch.addmv(bias, weight, similarity).mul_(scale).to(fields.dtype)  # (P,)
    pair_matrix = fields.new_zeros(num_keys * num_keys).index_copy_(0, flat_pairs, pair_weights)
    return pair_matrix.view(num_keys, num_keys)


class _SemanticPairSum(torch.autograd.Function):
    """lambda * sum_{i<j} w_ij <x_{b,i}, x_{b,j}> with w = W S + c, as one autograd node.

    The pair weights are computed inside: Linear(P, P) on the similarities and the scatter
    into a (K, K) matrix would otherwise be four autograd nodes for a few hundred numbers,
    each costing more in bookkeeping than in arithmetic on CPU. Backward:

    * d/dx: as :func:`~recsys_llm.models.pairwise.pair_sum_backward`
    * d/dw_p = lambda * (d/dM)[flat_p]; d/dW = (d/dw) S^T; d/dc = d/dw
    """

    @staticmethod
    def forward(
        ctx,
        fields: torch.Tensor,  # (B, K, D)
        similarity: torch.Tensor,  # (P,)
        weight: torch.Tensor,  # (P, P)
        bias: torch.Tensor,  # (P,)
        flat_pairs: torch.Tensor,  # (P,) index of each pair (i, j) in the flattened (K, K) matrix
        scale: float,
    ) -> torch.Tensor:
        pair_matrix = _semantic_pair_matrix(fields, similarity, weight, bias, flat_pairs, scale)  # (K, K)
        out, gram = pair_sum_forward(fields, pair_matrix)  # (B,), (B, K * K)
        ctx.save_for_backward(fields, pair_matrix, gram, similarity, flat_pairs, weight, bias)
        ctx.scale = scale
        return out

    @staticmethod
    @first_order_only("FIE's pair-sum kernel (semantic_pair_sum)")
    def backward(ctx, grad: torch.Tensor) -> "tuple[Optional[torch.Tensor], ...]":
        fields, pair_matrix, gram, similarity, flat_pairs, _, _ = ctx.saved_tensors
        grad_fields, grad_matrix = pair_sum_backward(grad, fields, pair_matrix, gram)
        grad_pairs = grad_matrix.view(-1).index_select(0, flat_pairs).mul_(ctx.scale).to(similarity.dtype)  # (P,)
        return grad_fields, None, torch.outer(grad_pairs, similarity), grad_pairs, None, None


@torch.fx.wrap
def semantic_pair_sum(
    fields: torch.Tensor,
    similarity: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor,
    flat_pairs: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """(B,) ``scale * sum_p w_p <fields[:, i_p], fields[:, j_p]>``, w = weight @ similarity + bias.

    With gradients needed it is one autograd node; without, the pair weights are computed
    once and the sum is :func:`~recsys_llm.models.pairwise.weighted_pair_sum`'s inference kernel.
    The choice is made here, at run time (this is an fx leaf), not where the caller is traced.

    Args:
        fields (torch.Tensor): (B, K, D).
        similarity (torch.Tensor): (P,) constant pair similarities.
        weight (torch.Tensor): (P, P) weight of the Linear(P, P) giving the pair weights.
        bias (torch.Tensor): (P,) its bias.
        flat_pairs (torch.Tensor): (P,) distinct ``i_p * K + j_p``, the place of pair p in a flattened (K, K) matrix.
        scale (float): lambda.

    Returns:
        torch.Tensor: (B,).
    """
    if torch.is_grad_enabled() and (fields.requires_grad or weight.requires_grad or bias.requires_grad):
        return _SemanticPairSum.apply(fields, similarity, weight, bias, flat_pairs, scale)
    with torch.no_grad():
        pair_matrix = _semantic_pair_matrix(fields, similarity, weight, bias, flat_pairs, scale)
    return weighted_pair_sum(fields, pair_matrix)


def _refreeze_after_load(module: "FieldInteractionEnhancement", incompatible_keys: object) -> None:
    """Load-state-dict post hook: :func:`refresh_after_load`."""
    refresh_after_load(module)


def refresh_after_load(module: nn.Module) -> None:
    """After its state was loaded (``load_state_dict``, ``teacher_student.load_full_state``, an in-place
    ``torch.distributed.checkpoint.load``): a frozen term keeps the frozen weights loaded with it, those of a
    run that froze, or takes them from the loaded Linear where they are zeros (a run that never froze); its
    serving matrix and what it folded into a backbone (frozen or not) follow. ``module``: an FIE term, or a
    model holding any (a ``DistributedModelParallel``, a ``TeacherStudentTask``): each of its terms."""
    if not isinstance(module, FieldInteractionEnhancement):
        for term in [m for m in module.modules() if isinstance(m, FieldInteractionEnhancement)]:
            refresh_after_load(term)
        return
    if module.frozen and not module.frozen_pair_weights.any():
        module.freeze()  # refreshes the serving matrix and the fold too
    else:
        module._follow_weights()


class FieldInteractionEnhancement(nn.Module):
    r"""FIE logit term of LLaCTR (Cui et al., "Field Matters"): semantic pair weights on
    field-pair inner products.

    The cosine similarities :math:`S_{ij}` of the N field vectors, for the P = N(N-1)/2
    pairs i < j, pass through a Linear(P, P) to give pair weights :math:`w = W S + c`:

    .. math::

        \Delta y_b = \lambda \sum_{i<j} w_{ij} \langle e_{b,i}, e_{b,j} \rangle

    The weights depend on the fields only (computed once per call, not per sample);
    :meth:`freeze` makes them a constant buffer for evaluation and serving, and
    :meth:`fold_into` adds them to the pairwise term of an FM-style backbone, which then
    serves backbone + FIE at the cost of the backbone alone.

    Args:
        field_vectors (torch.Tensor): (N, d_llm) LLM vectors, row i for ``feature_names[i]``.
        feature_names (List[str]): N >= 2 keys of the pooled embeddings that have a vector.
        weight (float): lambda_FIE.

    Its state dict is positional over ``feature_names`` (pair p of ``torch.triu_indices`` order is
    the p-th pair of those names): load it into a term built with the same names in the same
    order (``build_llactr_terms`` keeps the vector file's order, and a trained run checks it
    against its ``plugins.json``).

    Example::

        names = ["user_id", "item_id", "genre"]
        fie = FieldInteractionEnhancement(torch.randn(3, 384), names, weight=0.1)
        pooled = KeyedTensor.from_tensor_list(names, [torch.randn(4, 16) for _ in names])  # ebc(kjt)
        extra_logit = fie.logit(pooled)  # (4,); fie(output) is the same as a CTRTask logit term
        fie.freeze()                     # constant pair weights for serving
    """

    def __init__(self, field_vectors: torch.Tensor, feature_names: List[str], weight: float = 0.1) -> None:
        super().__init__()
        check_feature_name_list("FIE", feature_names)
        num_fields = len(feature_names)
        if field_vectors.dim() != 2 or field_vectors.size(0) != num_fields or num_fields < 2:
            raise ValueError(
                f"FIE needs >= 2 fields and field_vectors of shape (len(feature_names)={num_fields}, d_llm), "
                f"got {tuple(field_vectors.shape)}"
            )
        if len(set(feature_names)) != num_fields:
            raise ValueError(f"FIE feature_names must be distinct, got {list(feature_names)}")
        check_number("FIE weight (lambda_fie)", weight, minimum=0)  # NaN: NaN logits
        check_finite_vectors("FIE", field_vectors, feature_names)
        self._feature_names: List[str] = list(feature_names)
        self._weight = float(weight)
        self._frozen = False
        self._serving_keys: Optional[Tuple[str, ...]] = None
        self._folded_into: Optional["weakref.ref[nn.Module]"] = None  # a weak reference: not a submodule
        self._folded_matrix: Optional[torch.Tensor] = None  # what fold_into added to that backbone
        self._folded_generation = 0  # that backbone's fold_generation then: a later removal took the fold out
        # the constant buffers on the vectors' own device, also under torch.device("meta"): DMP zero-fills
        # a buffer on meta (every pair would become (0, 0))
        device = field_vectors.device
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1, device=device)  # (P,), (P,)
        normed = F.normalize(field_vectors.detach().float(), dim=-1)  # (N, d_llm)
        similarity = (normed @ normed.t())[rows, cols]  # (P,)
        self._similarity_on_cpu = similarity.cpu().clone()  # what reset_parameters writes back
        num_pairs = rows.numel()
        # copies: the two rows of triu_indices' (2, P) tensor share its storage, which torch.export.load of a served
        # program warned of ("No complete tensor found in the group")
        self.register_buffer("pair_rows", rows.clone())
        self.register_buffer("pair_cols", cols.clone())
        self.register_buffer("pair_similarity", similarity)
        self.register_buffer("frozen_pair_weights", torch.zeros(num_pairs, device=device))
        self.pair_weight = nn.Linear(num_pairs, num_pairs)
        self.register_buffer("serving_pair_matrix", None, persistent=False)
        self.register_load_state_dict_post_hook(_refreeze_after_load)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Writes the constant buffers back (pair indices and similarities; zero frozen weights):
        ``nn.Module.to_empty`` (meta-device initialisation) leaves every buffer uninitialised. The
        pair-weight Linear resets itself; the term is unfrozen."""
        num_fields = len(self._feature_names)
        rows, cols = torch.triu_indices(num_fields, num_fields, offset=1)
        self.pair_rows.copy_(rows)
        self.pair_cols.copy_(cols)
        self.pair_similarity.copy_(self._similarity_on_cpu)
        self.frozen_pair_weights.zero_()
        self.unfreeze()

    @property
    def feature_names(self) -> List[str]:
        return self._feature_names

    @property
    def frozen(self) -> bool:
        return self._frozen

    @property
    def serving_key_order(self) -> Optional[Tuple[str, ...]]:
        """The key order :meth:`set_serving_key_order` precomputed the serving matrix for; None: none."""
        return self._serving_keys

    def pair_weights(self) -> torch.Tensor:
        """w = Linear(S): (P,), pairs in ``torch.triu_indices`` order (or the frozen copy)."""
        if self._frozen:
            return self.frozen_pair_weights
        return self.pair_weight(self.pair_similarity)  # (P,)

    def _load_from_state_dict(self, state_dict: Dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        """A frozen term loaded with zero frozen weights (a run that never froze) takes them from the Linear's
        weights being loaded, here: loads that call each module's ``_load_from_state_dict``
        (``DistributedModelParallel.load_state_dict``) run no ``load_state_dict`` hook, and load the Linear
        only after this module. Non-zero ones (a run that froze) stay: its Linear may have moved since
        (momentum or weight decay on zero gradients)."""
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        weight, bias = state_dict.get(f"{prefix}pair_weight.weight"), state_dict.get(f"{prefix}pair_weight.bias")
        if (self._frozen and not self.frozen_pair_weights.any()
                and isinstance(weight, torch.Tensor) and isinstance(bias, torch.Tensor)):
            with torch.no_grad():
                loaded = torch.addmv(
                    bias.to(self.pair_similarity), weight.to(self.pair_similarity), self.pair_similarity
                )
                self.frozen_pair_weights.copy_(loaded)

    @torch.no_grad()
    def weighted_pair_matrix(self, names: Sequence[str]) -> torch.Tensor:
        """lambda * w_ij at (index of field i, index of field j) in ``names``: (K, K), constant.

        Raises:
            KeyError: a field of this FIE is not in ``names``.
        """
        missing = [name for name in self._feature_names if name not in names]
        if missing:
            raise KeyError(f"FIE fields {missing} are not among {list(names)}")
        positions = key_positions(tuple(names), tuple(self._feature_names), self.pair_rows.device)
        weights = self._weight * self.pair_weights()  # (P,)
        return self._scatter_pairs(weights, positions, len(names), weights)

    def _scatter_pairs(
        self, like: torch.Tensor, positions: torch.Tensor, num_keys: int, weights: torch.Tensor
    ) -> torch.Tensor:
        """(K, K) zeros like ``like`` with ``weights`` (P,) at (positions[i], positions[j]) of each pair i < j."""
        return like.new_zeros(num_keys, num_keys).index_put(
            (positions[self.pair_rows], positions[self.pair_cols]), weights
        )

    @torch.no_grad()
    def freeze(self) -> None:
        """Stores the current pair weights as a constant buffer (eval / serving).

        The frozen flag is not part of the state dict: a term frozen before ``load_state_dict`` (or
        ``DistributedModelParallel.load_state_dict``) keeps the frozen copy it loads, that of a run that froze,
        and takes the loaded Linear's weights where that copy is zeros (the trained weights of a run that never
        froze). An in-place ``torch.distributed.checkpoint.load`` runs no module code: call
        :func:`refresh_after_load` after it. A module traced by ``torch.fx`` keeps the branch (frozen or not)
        it was traced in: trace it again after freezing (``torch.compile`` recompiles by itself).
        A serving matrix (:meth:`set_serving_key_order`) and a fold (:meth:`fold_into`) follow
        ``load_state_dict`` and :func:`refresh_after_load`: set them after other loads. Under DMP training,
        freeze before ``shard_model`` if the weights should stay fixed: DDP's static graph expects the same
        parameters to get gradients at every step.
        """
        self.frozen_pair_weights.copy_(self.pair_weight(self.pair_similarity))
        self._frozen = True
        self._follow_weights()

    def _follow_weights(self) -> None:
        """The serving matrix (set only while frozen) and what :meth:`fold_into` added to a backbone, made
        from the weights before, follow the current ones."""
        if self._serving_keys is not None:
            self.set_serving_key_order(self._serving_keys)
        self._refresh_fold()

    def unfreeze(self) -> None:
        """Back to computing pair weights from the trainable Linear."""
        self._frozen = False
        self.set_serving_key_order(None)

    def set_serving_key_order(self, key_order: Optional[Sequence[str]]) -> None:
        """Precomputes the frozen (K, K) weight matrix for pooled embeddings with these keys
        (an unsharded EBC's feature order), so an exported program builds none per call;
        None drops it. ``serving.export_task`` sets it for the export only.

        Raises:
            RuntimeError: the term is not frozen.
        """
        if key_order is None:
            self._serving_keys, self.serving_pair_matrix = None, None
            return
        if not self._frozen:
            raise RuntimeError("FIE: freeze() before setting a serving key order")
        self._serving_keys = tuple(key_order)
        self.serving_pair_matrix = self.weighted_pair_matrix(key_order)

    def fold_into(self, backbone: nn.Module) -> bool:
        """Adds the (frozen) weighted pair weights to ``backbone``'s own pairwise term.

        For serving: afterwards ``backbone`` alone gives the logits of backbone + this term,
        at the cost of the backbone alone. Undo with ``backbone.fold_pair_weights(None)``.
        While folded, :meth:`logit` refuses to run (it would count the term twice).

        Raises:
            RuntimeError: the term is already folded into ``backbone``.

        Returns:
            bool: False (nothing done) when the backbone has no pairwise term to fold into
            (:class:`~recsys_llm.models.pairwise.PairWeightFolding`).
        """
        if not isinstance(backbone, PairWeightFolding):
            return False
        if self._folded_backbone() is backbone:
            raise RuntimeError(
                f"FIE is already folded into this {type(backbone).__name__}; folding it again would count it twice "
                "(undo with backbone.fold_pair_weights(None) first)"
            )
        folded = self.weighted_pair_matrix(backbone.feature_names)
        backbone.fold_pair_weights(folded)
        self._folded_into = weakref.ref(backbone)
        self._folded_matrix = folded
        self._folded_generation = backbone.fold_generation
        return True

    @torch.no_grad()
    def _refresh_fold(self) -> None:
        """Replaces what :meth:`fold_into` added to its backbone (if still folded) by the current weights."""
        backbone = self._folded_backbone()
        if backbone is None or self._folded_matrix is None:
            return
        folded = self.weighted_pair_matrix(backbone.feature_names)
        backbone.fold_pair_weights(folded - self._folded_matrix)  # the fold is additive: swap old for new
        self._folded_matrix = folded

    def _folded_backbone(self) -> Optional[nn.Module]:
        """The backbone this term is folded into, while its folded weights are in place."""
        backbone = self._folded_into() if self._folded_into is not None else None
        # gone, or its folds removed since (this term's with them, whatever was folded after)
        if (backbone is None or backbone.folded_pair_weight is None
                or backbone.fold_generation != self._folded_generation):
            self._folded_into, self._folded_matrix = None, None
            return None
        return backbone

    def logit(self, embeddings: KeyedTensor) -> torch.Tensor:
        """
        Args:
            embeddings (KeyedTensor): keys ⊇ ``feature_names``, each (B, D).

        Returns:
            torch.Tensor: (B,) weighted logit term.

        Raises:
            RuntimeError: the term is folded into a backbone, whose logits already hold it.
        """
        folded_into = self._folded_backbone()
        if folded_into is not None:
            raise RuntimeError(
                f"FIE is folded into {type(folded_into).__name__}, whose logits already include it: serve that "
                "backbone without this logit term, or undo the fold with backbone.fold_pair_weights(None)"
            )
        # fields in the embeddings' own key order (a view, no copy); the pair weights are
        # permuted into that order instead, and keys without a vector get zero weight
        fields, positions = fields_in_key_order(embeddings, self._feature_names)  # (B, K, D), (N,)
        if (
            self.serving_pair_matrix is not None
            and not isinstance(embeddings, torch.fx.Proxy)  # fx tracing: the frozen path below, the same numbers
            and has_one_dim(embeddings)
            and tuple(embeddings.keys()) == self._serving_keys
        ):
            # (B,), lambda included; in the embeddings' dtype, as the frozen path below
            return weighted_pair_sum(fields, self.serving_pair_matrix.to(fields.dtype))
        num_keys = fields.size(1)
        if self._frozen:
            pair_matrix = self._scatter_pairs(fields, positions, num_keys, self.frozen_pair_weights.to(fields.dtype))
            # the Gram against a (K, K) weight matrix instead of gathering (B, P) pairs
            return self._weight * weighted_pair_sum(fields, pair_matrix)  # (B,)
        flat_pairs = positions[self.pair_rows] * num_keys + positions[self.pair_cols]  # (P,)
        linear = self.pair_weight
        return semantic_pair_sum(fields, self.pair_similarity, linear.weight, linear.bias, flat_pairs, self._weight)

    def forward(self, output: CTROutput) -> torch.Tensor:
        """CTRTask logit term: ``logit(output.embeddings)``, (B,)."""
        return self.logit(output.embeddings)
