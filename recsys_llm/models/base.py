"""The backbone contract every CTR model of the project follows.

A backbone maps ``(dense (B, Dd), sparse KeyedJaggedTensor)`` to a ``CTROutput``:
logits, the last hidden representation before the head (for representation-level
distillation and injection) and the pooled embeddings of its EmbeddingBagCollection
(for field-level regularizers such as FRE and FIE). Optional ``extra_fields``
(B, E, D) are additional field embeddings (e.g. a projected LLM vector) that take
part in the feature interactions exactly like EBC fields.
"""

import abc
import contextlib
from typing import ContextManager, Dict, List, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor, KeyedTensor

from recsys_llm.data.validation import check_number
from recsys_llm.models.embedding import mark_tables_on_load


class CTROutput(NamedTuple):
    """What a backbone returns.

    Args:
        logits (torch.Tensor): (B,) click logits.
        representation (torch.Tensor): (B, H) last hidden vector before the head.
        embeddings (KeyedTensor): pooled EBC output, one key per sparse feature, each (B, D_f).
    """

    logits: torch.Tensor
    representation: torch.Tensor
    embeddings: KeyedTensor


class CTRBackbone(nn.Module, abc.ABC):
    """Base of all backbones: owns an EBC, embeds, then interacts.

    Subclasses implement :meth:`interact` and :attr:`representation_dim`; :meth:`forward`
    calls the EBC once so that ``TrainPipelineSparseDist`` can find it by fx tracing. A model
    of your own becomes a backbone by handing its EBC to this constructor and moving what
    follows the lookup into :meth:`interact` (``examples/plug_into_own_model.py``). Tables
    may differ in width; the project's backbones, which pair or stack fields (FM, FwFM,
    DeepFM, DCNv2, FinalMLP), read :attr:`embedding_dim`, which then refuses. A backbone
    that takes injected vectors another way than as fields (e.g. into its dense input)
    overrides :meth:`check_extra_fields`.

    Args:
        embedding_bag_collection (EmbeddingBagCollection): one table per field (dims D_f).
        num_dense_features (int): Dd, width of the dense input.
        num_extra_fields (int): E, extra field embeddings the caller will pass to ``forward``.

    Example::

        from recsys_llm.models.base import CTRBackbone, stack_fields

        class SumOfFields(CTRBackbone):  # logit: the sum of every pooled embedding's entries
            @property
            def representation_dim(self) -> int:
                return self.embedding_dim

            def interact(self, dense_features, embeddings, extra_fields):
                fields = stack_fields(embeddings, self.feature_names, extra_fields)  # (B, F + E, D)
                representation = fields.sum(dim=1)  # (B, D)
                return representation.sum(dim=-1), representation

        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name=f"t_{name}", embedding_dim=8, num_embeddings=100, feature_names=[name])
            for name in ("user_id", "item_id")])
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        out = SumOfFields(ebc, num_dense_features=0)(torch.empty(3, 0), kjt)  # logits (3,), representation (3, 8)
    """

    def __init__(
        self,
        embedding_bag_collection: EmbeddingBagCollection,
        num_dense_features: int,
        num_extra_fields: int = 0,
    ) -> None:
        super().__init__()
        # a device or a config given by position (FM(ebc, n, FMConfig(), device)) is named, True is no count
        check_number(f"{type(self).__name__}: num_extra_fields", num_extra_fields, integer=True, minimum=0)
        self.embedding_bag_collection = embedding_bag_collection
        configs = embedding_bag_collection.embedding_bag_configs()
        check_one_table_per_feature(configs, type(self).__name__)
        check_weighted_tables(configs, bool(embedding_bag_collection.is_weighted()), type(self).__name__)
        self._embedding_dims: Dict[str, int] = {n: c.embedding_dim for c in configs for n in c.feature_names}
        self._feature_names: List[str] = [n for c in configs for n in c.feature_names]
        self._num_dense_features = num_dense_features
        self._num_extra_fields = num_extra_fields
        self._weighted: bool = bool(embedding_bag_collection.is_weighted())
        # tables loaded before sharding would be initialised afresh by DMP: shard_model refuses them
        embedding_bag_collection.register_load_state_dict_pre_hook(mark_tables_on_load)

    @property
    def embedding_dim(self) -> int:
        """D, the width every table shares.

        Raises:
            ValueError: the tables differ in width (see :attr:`embedding_dims`).
        """
        dims = set(self._embedding_dims.values())
        if len(dims) != 1:
            raise ValueError(
                f"{type(self).__name__} needs one embedding dim for all its tables, got {self._embedding_dims}"
            )
        return next(iter(dims))

    @property
    def embedding_dims(self) -> Dict[str, int]:
        """D_f of every sparse feature."""
        return dict(self._embedding_dims)

    @property
    def feature_names(self) -> List[str]:
        """Sparse feature names in the order of the pooled embeddings."""
        return self._feature_names

    @property
    def num_dense_features(self) -> int:
        """Dd, the width of the dense input."""
        return self._num_dense_features

    @property
    @abc.abstractmethod
    def representation_dim(self) -> int:
        """H, the width of ``CTROutput.representation``."""

    @property
    def num_fields(self) -> int:
        """Sparse fields + extra fields (dense features are handled by each backbone)."""
        return len(self._feature_names) + self._num_extra_fields

    @property
    def num_extra_fields(self) -> int:
        """E, the extra field embeddings ``forward`` takes."""
        return self._num_extra_fields

    def check_extra_fields(self, num_fields: int, embedding_dim: int, source: str) -> None:
        """Raises ValueError unless ``source``'s (B, num_fields, embedding_dim) extra fields fit this backbone.

        ``CTRTask`` calls it with its field injection's shape. This default expects E fields of
        the backbone's :attr:`embedding_dim`; override it where the vectors go elsewhere.
        """
        widths = set(self._embedding_dims.values())
        if num_fields != self._num_extra_fields or widths != {embedding_dim}:
            if len(widths) > 1:
                raise ValueError(
                    f"{source} gives {num_fields} extra field(s) of dim {embedding_dim}; "
                    f"{type(self).__name__}'s tables "
                    f"differ in width ({self._embedding_dims}), so the default check_extra_fields cannot tell which "
                    "width its interact takes: override check_extra_fields to accept it"
                )
            raise ValueError(
                f"{source} gives {num_fields} extra field(s) of dim {embedding_dim}; {type(self).__name__} was built "
                f"for {self._num_extra_fields} of its embedding dim {next(iter(widths))} (num_extra_fields; a model "
                "that takes the vector into its dense input overrides check_extra_fields instead)"
            )

    def forward(
        self,
        dense_features: torch.Tensor,
        sparse_features: KeyedJaggedTensor,
        extra_fields: Optional[torch.Tensor] = None,
    ) -> CTROutput:
        """
        Args:
            dense_features (torch.Tensor): (B, Dd).
            sparse_features (KeyedJaggedTensor): keys ⊇ ``feature_names``.
            extra_fields (Optional[torch.Tensor]): (B, E, D) or None.

        Returns:
            CTROutput: logits (B,), representation (B, H), pooled embeddings.
        """
        check_id_weights(sparse_features, self._weighted, type(self).__name__)
        check_feature_keys(sparse_features, self._feature_names, type(self).__name__)
        dense_features = checked_dense_width(checked_dense_dtype(dense_features, type(self).__name__),
                                             self._num_dense_features, type(self).__name__)
        check_batch_rows(dense_features, sparse_features, extra_fields, type(self).__name__)
        if not isinstance(self.embedding_bag_collection, EmbeddingBagCollection):  # sharded
            if not isinstance(sparse_features, torch.fx.Proxy):  # eager (traced: the pipeline checks its batches)
                check_sharded_key_order(sparse_features, self.embedding_bag_collection, type(self).__name__)
        elif self._weighted:
            # unsharded (evaluation, export): torch's embedding_bag takes weights only in the table's dtype;
            # sharded, FBGEMM's kernels take float32 weights for FP16 tables
            sparse_features = weights_in_table_dtype(sparse_features, self.embedding_bag_collection)
        embeddings = self.embedding_bag_collection(sparse_features)
        if not isinstance(embeddings, torch.fx.Proxy) and embeddings.values().is_meta and not dense_features.is_meta:
            # unsharded tables left on meta; torch failed later, in the interaction, naming devices only
            raise RuntimeError(
                f"{type(self).__name__}: its tables are on the meta device (build_backbone's default, and an "
                "EmbeddingBagCollection built with device=torch.device('meta'), for DistributedModelParallel to "
                "allocate the shards): shard the model (train.sharding.shard_model), or build it with "
                "device=torch.device('cpu') (build_backbone, or the EmbeddingBagCollection handed to "
                "CTRBackbone.__init__) to train or run it unsharded"
            )
        logits, representation = self.interact(dense_features, embeddings, extra_fields)
        return CTROutput(one_logit_per_row(logits, type(self).__name__), representation, embeddings)

    @abc.abstractmethod
    def interact(
        self,
        dense_features: torch.Tensor,
        embeddings: KeyedTensor,
        extra_fields: Optional[torch.Tensor],
    ) -> "tuple[torch.Tensor, torch.Tensor]":
        """Returns ``(logits (B,), representation (B, H))``."""


def built_on(device: Optional[torch.device]) -> ContextManager[object]:
    """Builds modules that take no ``device`` (torchrec's cross nets and interaction) on ``device``, so their
    start draws from its random stream as the other dense modules' does; None: the default device."""
    return torch.device(device) if device is not None else contextlib.nullcontext()


def check_one_table_per_feature(configs: "List[EmbeddingBagConfig]", owner: str) -> None:
    """Raises ValueError naming a feature that several tables read.

    One table may serve several features (``feature_names=[a, b]``: keys ``a`` and ``b``), but a
    feature read by several tables gets one pooled embedding per table, which torchrec keys
    ``feature@table``: the contract, FRE / FIE and the export key one pooled embedding per
    feature name, so such an EBC has no place in it.
    """
    tables: Dict[str, List[str]] = {}
    for config in configs:
        for name in config.feature_names:
            tables.setdefault(name, []).append(config.name)
    repeated = {name: names for name, names in tables.items() if len(names) > 1}
    if repeated:
        name, names = next(iter(repeated.items()))
        keys = ", ".join(repr(f"{name}@{table}") for table in names)
        raise ValueError(
            f"{owner}: feature {name!r} is read by several tables of its EmbeddingBagCollection ({names}); torchrec "
            f"then keys its pooled embeddings {keys}, not {name!r}, while a backbone (and FRE / FIE, the export) "
            "keys one pooled embedding per feature name: give the model one table per feature (a second table "
            f"reads a KJT key of its own, e.g. {name + '_2'!r} with the same ids)"
            + (f"; so are {[other for other in repeated if other != name]}" if len(repeated) > 1 else "")
        )


def check_weighted_tables(configs: "List[EmbeddingBagConfig]", weighted: bool, owner: str) -> None:
    """Raises ValueError naming the tables of a weighted EBC (``is_weighted=True``) that pool other than SUM, or
    that hold more than one ``data_type``.

    torch's ``EmbeddingBag`` takes per-id weights in SUM mode only, and in its table's dtype, so an unsharded
    weighted EBC with a MEAN table fails at every lookup (``per_sample_weights is only supported for mode='sum'``),
    as does one whose FP16 and FP32 tables read the one weights tensor of a KeyedJaggedTensor (``weight ...
    HalfTensor does not equal FloatTensor``), while the sharded one trains: the model would train, then fail to
    export, to serve or to run unsharded.
    """
    if not weighted:
        return
    other = {config.name: config.pooling.name for config in configs if config.pooling != PoolingType.SUM}
    if other:
        raise ValueError(
            f"{owner}: its EmbeddingBagCollection is weighted (is_weighted=True), but tables {other} pool other than "
            "SUM; torch's unsharded EmbeddingBag takes per-id weights with SUM only, so the model would train "
            "sharded but fail to export, serve or run unsharded: build them with pooling=PoolingType.SUM (a weighted "
            "mean is SUM with weights 1/n per bag), or the EBC unweighted"
        )
    dtypes = {config.name: config.data_type.name for config in configs}
    if len(set(dtypes.values())) > 1:
        raise ValueError(
            f"{owner}: its EmbeddingBagCollection is weighted (is_weighted=True), and its tables hold several "
            f"data_types {dtypes}; torch's unsharded EmbeddingBag takes per-id weights in its table's dtype, and a "
            "KeyedJaggedTensor has one weights tensor, so the model would train sharded but fail to export, serve or "
            "run unsharded: build the tables with one data_type, or the EBC unweighted"
        )


@torch.fx.wrap
def check_id_weights(features: KeyedJaggedTensor, weighted: bool, model: str) -> None:
    """Raises ValueError when ``features`` carry per-id weights that ``model``'s unweighted EBC would
    pool differently sharded and unsharded, or carry none for its weighted EBC.

    torchrec's sharded EBC pools a KJT's weights whether it was built ``is_weighted`` or not, while
    an unweighted ``EmbeddingBagCollection`` (one rank, evaluation on CPU, the served model)
    ignores them: the same weights would give other embeddings in training than at serving. A
    weighted EBC without weights fails in torchrec with a bare AssertionError.
    A leaf of the training pipeline's fx trace: it reads the KJT at run time and feeds nothing.
    """
    if weighted and features.weights_or_none() is None:
        raise ValueError(
            f"{model}: its EmbeddingBagCollection is weighted (is_weighted=True), but the sparse features carry no "
            "per-id weights: pass weights= (one float per id, in the order of values) in the KeyedJaggedTensor"
        )
    if not weighted and features.weights_or_none() is not None:
        raise ValueError(
            f"{model}: the sparse features carry per-id weights, but its EmbeddingBagCollection is not weighted: "
            "torchrec's sharded lookup would pool the weights and the unsharded (and served) one ignore them; build "
            "the EBC with is_weighted=True to use them, or leave them out of the KeyedJaggedTensor"
        )


@torch.fx.wrap
def check_feature_keys(features: KeyedJaggedTensor, feature_names: List[str], model: str) -> None:
    """Raises ValueError naming the features of ``model``'s tables that ``features`` lack (torchrec's unsharded
    lookup failed with a bare KeyError, the sharded one with "'city' is not in list"). A leaf of the training
    pipeline's fx trace; a pipelined, sharded lookup distributes the ids before the model runs, and fails first."""
    present = set(features.keys())  # a list's `in` per feature made every forward quadratic in the features
    missing = [name for name in feature_names if name not in present]
    if missing:
        raise ValueError(f"{model}: the sparse features lack {missing}, which its tables read; expected a "
                         f"KeyedJaggedTensor with the keys {feature_names} (in any order, the same in every batch "
                         "of a sharded model; others are ignored)")


def check_sharded_key_order(features: KeyedJaggedTensor, tables: nn.Module, model: str) -> None:
    """Raises ValueError when ``tables``, a sharded EBC, would read ``features`` with the key order of an earlier
    batch: torchrec's ``ShardedEmbeddingBagCollection`` fixes at its first batch where each feature stands among the
    keys, and later permutes every batch by those positions, so keys in another order silently read other features'
    ids. Nothing for an unsharded EBC (it looks keys up by name), before the first batch, or where torchrec keeps
    that order in attributes of other names (another release)."""
    if getattr(tables, "_has_uninitialized_input_dist", True) is not False:
        return
    shardings = getattr(tables, "_embedding_shardings", None)
    if shardings is None or not hasattr(tables, "_has_features_permute"):
        return
    names = [name for sharding in shardings for name in sharding.feature_names()]
    keys = features.keys()
    if tables._has_features_permute:
        positions = list(getattr(tables, "_features_order", []))
        if len(positions) != len(names):
            return
    else:  # the first batch's keys were exactly these: its input distribution splits the keys as they come
        positions = list(range(len(names)))
        if len(keys) != len(names):
            positions = []  # a different key count is a different layout
    if positions and all(p < len(keys) and keys[p] == name for p, name in zip(positions, names)):
        return
    expected = ", ".join(f"{name!r} at {p}" for p, name in sorted(zip(positions, names)))
    raise ValueError(f"{model}: its sharded tables read the sparse features by the positions they had among the keys "
                     f"of the first batch (torchrec's ShardedEmbeddingBagCollection fixes them then: {expected}"
                     f"{'' if tables._has_features_permute else f', and no other key'}); this batch's keys are "
                     f"{keys}: build every KeyedJaggedTensor with the keys in one order")


@torch.fx.wrap
def check_batch_rows(dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor,
                     extra_fields: Optional[torch.Tensor], model: str) -> None:
    """Raises ValueError naming the row counts when ``dense_features`` (B, Dd), the KJT's stride B and
    ``extra_fields`` (B, E, D) disagree (torch failed later with a bare "The size of tensor a (5) must match the
    size of tensor b (4)"). Shapes only, no device sync; a KJT of variable stride per feature (VBE) is not
    compared. A leaf of the training pipeline's fx trace.
    """
    rows = {"dense_features": dense_features.size(0)}
    if not sparse_features.variable_stride_per_key():
        rows["sparse_features (the KeyedJaggedTensor's stride)"] = sparse_features.stride()
    if extra_fields is not None:
        rows["extra_fields (the injected LLM vectors)"] = extra_fields.size(0)
    if len(set(rows.values())) > 1:
        counts = ", ".join(f"{name} {count}" for name, count in rows.items())
        raise ValueError(f"{model}: the batch's parts have different row counts: {counts}; each holds one row "
                         "per sample (build the KeyedJaggedTensor with stride=B, lengths of B per key)")


def _unwrapped_path(name: str) -> str:
    """A module path without the leading DMP / DDP wrappers (``_dmp_wrapped_module.module.student.model``:
    ``student.model``)."""
    parts = name.split(".") if name else []
    while parts and parts[0] in ("_dmp_wrapped_module", "module"):
        parts.pop(0)
    return ".".join(parts)


def features_read(model: nn.Module) -> Dict[str, List[str]]:
    """The sparse features each backbone of ``model`` (a ``CTRBackbone``, DMP-wrapped or not) reads, by its
    class and module path without the DMP / DDP wrappers (``DLRMBackbone at student.model``): a teacher-student
    pair has two."""
    found: Dict[str, List[str]] = {}
    for name, module in model.named_modules():
        if isinstance(module, CTRBackbone):
            path = _unwrapped_path(name)  # "": the model is the backbone itself
            found[" at ".join([type(module).__name__] + [path] * bool(path))] = module.feature_names
    return found


class BatchFeatureCheck:
    """Checks each batch's KeyedJaggedTensor against every backbone of ``model`` before a pipeline distributes its
    ids (the checks in ``CTRBackbone.forward`` run too late there): the features each reads
    (:func:`check_feature_keys`) and, for sharded tables, the key order their first batch fixed
    (:func:`check_sharded_key_order`)."""

    def __init__(self, model: nn.Module) -> None:
        self._features = features_read(model)
        # every sharded table collection: the backbones' and the frozen entity tables' (SemanticTable)
        self._sharded = [(_unwrapped_path(name), module) for name, module in model.named_modules()
                         if hasattr(module, "_embedding_shardings")]

    def __call__(self, features: KeyedJaggedTensor) -> None:
        for owner, names in self._features.items():
            check_feature_keys(features, names, owner)
        for owner, tables in self._sharded:
            check_sharded_key_order(features, tables, owner)


@torch.fx.wrap
def checked_dense_dtype(dense_features: torch.Tensor, model: str) -> torch.Tensor:
    """``dense_features`` (B, Dd) as they are; raises TypeError, naming ``model``, when they are not float32
    (e.g. float64 from numpy): the dense layers would fail with torch's bare dtype mismatch.

    A leaf of the training pipeline's fx trace: the dtype is checked at run time.
    """
    if dense_features.dtype != torch.float32:
        raise TypeError(
            f"{model}: dense_features have dtype {dense_features.dtype}; expected torch.float32 (B, Dd), as "
            "ParquetBatchReader gives them: convert them with .float() (numpy arrays are float64 by default)"
        )
    return dense_features


@torch.fx.wrap
def checked_dense_width(dense_features: torch.Tensor, width: int, model: str) -> torch.Tensor:
    """``dense_features`` (B, ``width``) as they are; raises ValueError, naming ``model`` and ``width``, for another
    shape (the dense layers would fail with torch's bare "mat1 and mat2 shapes cannot be multiplied").

    A leaf of the training pipeline's fx trace: the shape is checked at run time.
    """
    if dense_features.dim() != 2 or dense_features.size(1) != width:
        raise ValueError(
            f"{model}: dense_features are {tuple(dense_features.shape)}, expected (B, {width}): it was built with "
            f"num_dense_features={width}, the data's dense features (without an injected LLM vector, which "
            "CTRTask's field_injection adds)"
        )
    return dense_features


def weights_in_table_dtype(features: KeyedJaggedTensor, ebc: nn.Module) -> KeyedJaggedTensor:
    """``features`` with its per-id weights in the dtype of the unsharded ``ebc``'s tables, as torch's
    ``embedding_bag`` takes them (FP16 tables of a weighted EBC refused the reader's float32 weights); as it is
    without weights, when they already are in that dtype, or when the tables hold several dtypes.

    Args:
        features (KeyedJaggedTensor): ids, lengths and per-id weights (N,).
        ebc (nn.Module): an unsharded ``EmbeddingBagCollection`` (a module without parameters: as it is).

    Returns:
        KeyedJaggedTensor: the same ids and lengths.
    """
    dtypes = {p.dtype for p in ebc.parameters()}
    return _weights_in_dtype(features, dtypes.pop() if len(dtypes) == 1 else None)


@torch.fx.wrap
def _weights_in_dtype(features: KeyedJaggedTensor, dtype: Optional[torch.dtype]) -> KeyedJaggedTensor:
    weights = features.weights_or_none()  # (N,)
    if dtype is None or weights is None or weights.dtype == dtype:
        return features
    variable = features.variable_stride_per_key()
    return KeyedJaggedTensor(keys=features.keys(), values=features.values(), weights=weights.to(dtype),
                             lengths=features.lengths(), offsets=features.offsets_or_none(),
                             stride=None if variable else features.stride(),
                             stride_per_key_per_rank=features.stride_per_key_per_rank() if variable else None,
                             inverse_indices=features.inverse_indices_or_none())


@torch.fx.wrap
def one_logit_per_row(logits: torch.Tensor, model: str) -> torch.Tensor:
    """``logits`` (B,) as they are; raises for any other shape, naming ``model``'s ``interact``
    (a (B, 1) output, torchrec DLRM's habit, would broadcast against (B,) labels and terms).

    A leaf of the training pipeline's fx trace: the shape is checked at run time.
    """
    if logits.dim() != 1:
        raise ValueError(f"{model}.interact returned logits of shape {tuple(logits.shape)}; expected (B,), one per row "
                         "(squeeze a (B, 1) output)")
    return logits


def stack_fields(
    embeddings: KeyedTensor, feature_names: List[str], extra_fields: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Pooled embeddings as one tensor, fields in the order of ``feature_names``.

    A sharded EBC returns its keys grouped by sharding type, so the key order of
    ``embeddings`` depends on the plan; fields are therefore looked up by name (one
    split, as torchrec's ``SparseArch`` does), never by position.

    Args:
        embeddings (KeyedTensor): keys ⊇ ``feature_names``, each (B, D).
        feature_names (List[str]): F keys, in the order the model was built with.
        extra_fields (Optional[torch.Tensor]): (B, E, D).

    Returns:
        torch.Tensor: (B, F + E, D).

    Raises:
        ValueError: the named fields differ in width.
    """
    by_name = embeddings.to_dict()
    try:
        fields = torch.stack([by_name[name] for name in feature_names], dim=1)  # (B, F, D)
    except RuntimeError as error:
        widths = {name: by_name[name].size(1) for name in feature_names}
        if len(set(widths.values())) > 1:  # named here, not in the hot path
            raise ValueError(
                f"fields {feature_names} must share one embedding dim to be stacked, got {widths}"
            ) from error
        raise
    if extra_fields is not None:
        fields = torch.cat([fields, extra_fields], dim=1)  # (B, F + E, D)
    return fields


_KEY_POSITIONS: Dict[Tuple[Tuple[str, ...], Tuple[str, ...], torch.device], torch.Tensor] = {}


def key_positions(keys: Tuple[str, ...], feature_names: Tuple[str, ...], device: torch.device) -> torch.Tensor:
    """(F,) index of each feature name among ``keys``, cached per key order and device (eager calls only)."""
    if torch.compiler.is_compiling():
        # a constant of the compiled graph; the cache is not read: torch.compile would guard on its contents and
        # compile again whenever an eager call added an entry, and a tensor made while torch.export traces is fake
        return _key_positions(keys, feature_names, device)
    cache_key = (keys, feature_names, device)
    cached = _KEY_POSITIONS.get(cache_key)
    if cached is None:
        cached = _KEY_POSITIONS[cache_key] = _key_positions(keys, feature_names, device)
    return cached


def check_distinct_keys(keys: Sequence[str], feature_names: Sequence[str]) -> None:
    """Raises ValueError naming the ``feature_names`` that ``keys`` hold more than once.

    A KeyedTensor may repeat a key (``KeyedTensor.from_tensor_list`` of the outputs of two EBCs
    that both embed ``user_id``); a field read by name would then silently be one of them (the
    last, as ``to_dict`` keeps it).
    """
    if len(set(keys)) == len(keys):
        return
    repeated = [name for name in dict.fromkeys(feature_names) if list(keys).count(name) > 1]
    if repeated:
        raise ValueError(
            f"the pooled embeddings hold keys {repeated} more than once (their keys are {list(keys)}), so which "
            "embedding is the field's is ambiguous: give every pooled embedding a key of its own (e.g. when "
            "joining the outputs of several EmbeddingBagCollections with KeyedTensor.from_tensor_list)"
        )


def _key_positions(keys: Tuple[str, ...], feature_names: Tuple[str, ...], device: torch.device) -> torch.Tensor:
    position = {key: i for i, key in enumerate(keys)}
    missing = [name for name in feature_names if name not in position]
    if missing:
        raise KeyError(f"the pooled embeddings have no keys {missing}; their keys are {list(keys)}")
    check_distinct_keys(keys, feature_names)
    return torch.tensor([position[name] for name in feature_names], dtype=torch.long, device=device)


def has_one_dim(embeddings: KeyedTensor) -> bool:
    """True when every key has the same dim: :func:`fields_in_key_order` then gives a view over all keys."""
    return len(set(embeddings.length_per_key())) == 1


@torch.fx.wrap
def fields_in_key_order(embeddings: KeyedTensor, feature_names: List[str]) -> Tuple[torch.Tensor, torch.Tensor]:
    """All pooled fields as one tensor in the KeyedTensor's own key order, and where ``feature_names`` are.

    For terms that are indifferent to field order (FRE, FIE): when every key has the
    same dim, the result is a view of ``embeddings.values()`` (no copy forward, no
    split backward), and the caller permutes its own per-field parameters with
    ``positions`` instead. Otherwise ``feature_names`` are stacked (K = F). The key
    order of a sharded EBC's output depends on the plan, so positions are looked up
    per call (cached per key order).

    Args:
        embeddings (KeyedTensor): keys ⊇ ``feature_names``, each (B, D).
        feature_names (List[str]): F keys.

    Returns:
        Tuple: ``(fields (B, K, D), positions (F,))``, ``fields[:, positions[f]]`` being
        ``feature_names[f]``'s embeddings; K is the number of keys (or F).

    Raises:
        TypeError: ``embeddings`` is the lookup's input (a KeyedJaggedTensor), not its output, or a
            plain tensor without the keys (torchrec DLRM's ``sparse_arch(kjt)``, (B, F, D)).
    """
    if isinstance(embeddings, KeyedJaggedTensor):  # it has keys() and length_per_key() too: a reshape error later
        raise TypeError(
            "expected the pooled embeddings (a KeyedTensor: ebc(kjt), or CTROutput.embeddings), got the "
            "KeyedJaggedTensor of ids; pass it through the EmbeddingBagCollection first"
        )
    if isinstance(embeddings, Mapping):  # else: 'dict' object has no attribute 'length_per_key'
        raise TypeError(
            f"expected the pooled embeddings as a KeyedTensor (ebc(kjt), or CTROutput.embeddings), got a "
            f"{type(embeddings).__name__} of keys {list(embeddings)[:8]}: pass the KeyedTensor itself, not its "
            "to_dict() (its keys and widths are read from it)"
        )
    if isinstance(embeddings, torch.Tensor) and embeddings.dim() == 2:  # KeyedTensor.regroup's output, kt.values()
        raise TypeError(
            f"expected the pooled embeddings as a KeyedTensor (ebc(kjt), or CTROutput.embeddings), whose keys name "
            f"the fields; got a tensor of shape {tuple(embeddings.shape)} without them (KeyedTensor.regroup and "
            "KeyedTensor.values() give the fields side by side, unnamed): pass the KeyedTensor, or name the columns "
            "with KeyedTensor(keys=[...], length_per_key=[...], values=tensor) (KeyedTensor.from_tensor_list joins "
            "the outputs of several EmbeddingBagCollections)"
        )
    if isinstance(embeddings, torch.Tensor):  # else: 'Tensor' object has no attribute 'length_per_key'
        raise TypeError(
            f"expected the pooled embeddings as a KeyedTensor (ebc(kjt), or CTROutput.embeddings), whose keys name "
            f"the fields; got a tensor of shape {tuple(embeddings.shape)} without them (torchrec DLRM's "
            "sparse_arch(kjt) stacks the fields unnamed): wrap the DLRM in models.dlrm.DLRMBackbone, whose "
            "CTROutput.embeddings come from the model's own lookup (calling dlrm.sparse_arch.embedding_bag_collection "
            "again looks every id up twice, which TrainPipelineSparseDist refuses)"
        )
    if has_one_dim(embeddings):
        lengths = embeddings.length_per_key()
        values = embeddings.values()
        fields = values.reshape(values.size(0), len(lengths), lengths[0])  # (B, K, D)
        return fields, key_positions(tuple(embeddings.keys()), tuple(feature_names), values.device)
    dims = dict(zip(embeddings.keys(), embeddings.length_per_key()))
    missing = [name for name in feature_names if name not in dims]
    if missing:
        raise KeyError(f"the pooled embeddings have no keys {missing}; their keys are {list(dims)}")
    if len(dims) < len(embeddings.keys()):
        check_distinct_keys(embeddings.keys(), feature_names)
    wanted = {name: dims[name] for name in feature_names}
    if len(set(wanted.values())) > 1:
        raise ValueError(f"fields {feature_names} must share one embedding dim to be paired or compared, got {wanted}")
    fields = stack_fields(embeddings, feature_names)  # (B, F, D)
    return fields, key_positions(tuple(feature_names), tuple(feature_names), fields.device)
