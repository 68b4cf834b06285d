"""Entity LLM vectors (one per user or item id) as a frozen, sharded embedding table.

With per-entity vectors (``recsys-llm semantics export --granularity entity``) the
vector of a row is a lookup by id (several entities, e.g. user and item, are concatenated),
so 10^7 items are a table the planner shards like any
other instead of a dense column on every rank. The table lives in its **own**
``EmbeddingBagCollection`` marked ``frozen = True``: ``recsys_llm.train.sharding`` then
gives it a fused kernel with stateless SGD at learning rate 0 in a TBE of its own (never
grouped with trained tables) and ``requires_grad=False`` after sharding (see that module).

:func:`load_semantic_vectors` fills the table **after** sharding: each rank walks the
local shards of the table's ``ShardedTensor`` in the model's state dict and copies only
the vector rows ``[offset, offset + rows)`` and columns of its shards from the export,
one export chunk at a time, straight into the shard, so no rank ever materialises the
whole table (nor a second copy of its own shards).

Example::

    table = SemanticTable({"user_id": 944, "item_id": 1683}, dim=64)   # meta device
    task = SemanticTableTask(backbone, table, VectorFieldInjection(2 * 64, 16, num_fields=2))
    model, plan = shard_model(task, device, world_size, ShardingConfig(), OptimizerConfig())
    load_semantic_vectors(model, "semantic_item_id", "vectors/items", expected=provenance)
    load_semantic_vectors(model, "semantic_user_id", "vectors/users", expected=provenance)
"""

from typing import TYPE_CHECKING, Dict, Iterable, List, Mapping, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.models.base import CTRBackbone, CTROutput, check_sharded_key_order, check_weighted_tables
from recsys_llm.models.embedding import mark_filled_tables, mark_tables_on_load, require_allocated
from recsys_llm.models.task import CTRTask
from recsys_llm.semantics.vector_export import read_manifest
from recsys_llm.semantics.vector_reader import iter_vector_rows, key_range

if TYPE_CHECKING:
    from torch.distributed._shard.sharded_tensor import ShardedTensor

TABLE_PREFIX = "semantic_"


def semantic_table_name(feature_name: str) -> str:
    """Name of the frozen table holding the entity vectors of ``feature_name``."""
    return f"{TABLE_PREFIX}{feature_name}"


class SemanticTable(nn.Module):
    """Looks up frozen LLM vectors per entity id, for one or several entity fields.

    Each entity field (e.g. ``user_id`` and ``item_id``) gets its own table
    ``semantic_{field}`` in one frozen EBC; a row's vectors are concatenated in the order
    the entities were given.

    Args:
        entities (Mapping[str, int]): entity field (the KJT key holding its ids) -> number
            of ids (the field's cardinality).
        dim (int): d, vector width of every entity (a multiple of 4 for FBGEMM kernels).
        pooling (PoolingType): SUM for one id per row; MEAN averages a sequence field's vectors.
        device (Optional[torch.device]): ``meta`` (default) lets DMP allocate shards only.
        is_weighted (bool): the table pools the KJT's per-id weights, like the backbone's EBC
            when that is ``is_weighted`` (``SemanticTableTask`` requires the two to agree).

    Example::

        table = SemanticTable({"user_id": 944, "item_id": 1683}, 64, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 10, 20, 30]), torch.ones(6, dtype=torch.long))
        vectors = table(kjt)  # (3, 2 * 64): user vector, then item vector
    """

    def __init__(
        self,
        entities: Mapping[str, int],
        dim: int,
        *,
        pooling: PoolingType = PoolingType.SUM,
        device: Optional[torch.device] = torch.device("meta"),
        is_weighted: bool = False,
    ) -> None:
        super().__init__()
        if not entities:
            raise ValueError("SemanticTable needs at least one entity field")
        if dim % 4 != 0:
            raise ValueError(
                f"SemanticTable {sorted(entities)}: dim {dim} must be a multiple of 4 (FBGEMM kernels); adapt the "
                "LLM with a --representation-dim that is one, or export the vectors with --projection FILE of such a "
                "size (recsys_llm.semantics.vector_projection: fit_projection, save_projection)"
            )
        self._feature_names: List[str] = list(entities)
        self._dim = dim
        configs = [
            EmbeddingBagConfig(
                name=semantic_table_name(name),
                embedding_dim=dim,
                num_embeddings=num_embeddings,
                feature_names=[name],
                pooling=pooling,
            )
            for name, num_embeddings in entities.items()
        ]
        check_weighted_tables(configs, is_weighted, f"SemanticTable {list(entities)}")
        self.embedding_bag_collection = EmbeddingBagCollection(tables=configs, is_weighted=is_weighted, device=device)
        # Read by recsys_llm.train.sharding: no optimizer state, own TBE, no autograd after
        # sharding. The weights keep requires_grad until then (the sharder attaches its
        # optimizer-free in-backward hook to them); ``forward`` detaches in any case.
        self.embedding_bag_collection.frozen = True
        self.embedding_bag_collection.register_load_state_dict_pre_hook(mark_tables_on_load)  # see CTRBackbone

    @property
    def feature_names(self) -> List[str]:
        return list(self._feature_names)

    @property
    def dim(self) -> int:
        """d of one entity's vector."""
        return self._dim

    @property
    def output_dim(self) -> int:
        """K * d: width of the concatenated vectors."""
        return self._dim * len(self._feature_names)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features (KeyedJaggedTensor): keys include every entity field.

        Returns:
            torch.Tensor: (B, K * d) vectors, detached (the table never trains).
        """
        tables = self.embedding_bag_collection
        if isinstance(tables, EmbeddingBagCollection) and any(w.is_meta for w in tables.parameters()):  # unsharded
            raise RuntimeError(
                f"SemanticTable {self._feature_names}: its tables are on the meta device (the default, for "
                "DistributedModelParallel to allocate the shards): shard the model (train.sharding.shard_model), or "
                "build it with device=torch.device('cpu') and load the vectors (load_semantic_vectors) to use it "
                "unsharded; on meta it would give vectors without values"
            )
        if not isinstance(features, torch.fx.Proxy):
            absent = [name for name in self._feature_names if name not in features.keys()]
            if absent:
                raise KeyError(
                    f"SemanticTable {self._feature_names}: the batch's KeyedJaggedTensor has no feature {absent} "
                    f"(its keys: {features.keys()}); every entity field must be a key of the batch"
                )
        if not isinstance(tables, EmbeddingBagCollection) and not isinstance(features, torch.fx.Proxy):
            check_sharded_key_order(features, tables, "SemanticTable")  # eager (traced: the pipeline checks)
        pooled = tables(features).to_dict()
        vectors = [pooled[name] for name in self._feature_names]  # K x (B, d)
        return torch.cat(vectors, dim=1).detach() if len(vectors) > 1 else vectors[0].detach()


class SemanticTableTask(CTRTask):
    """A ``CTRTask`` whose injected vector comes from a :class:`SemanticTable` lookup.

    The gain network of ELEC with per-entity vectors: ``extra_fields =
    field_injection(table(batch.sparse_features))`` instead of ``batch.extras[...]``. The
    table reads the batch's KJT directly, so the pipeline still prefetches its lookup.

    Args:
        model (CTRBackbone): backbone built with ``num_extra_fields = field_injection.num_fields``.
        semantic_table (SemanticTable): the frozen entity vectors.
        field_injection (nn.Module): (B, K * d) -> (B, E, D), e.g. ``VectorFieldInjection(K * d, D, E)``
            (an injection with an ``in_dim`` other than ``semantic_table.output_dim`` is refused).
        logit_terms (Optional[Dict[str, nn.Module]]): as in ``CTRTask``.
        loss_terms (Optional[Dict[str, nn.Module]]): as in ``CTRTask``.
    """

    def __init__(
        self,
        model: CTRBackbone,
        semantic_table: SemanticTable,
        field_injection: nn.Module,
        *,
        logit_terms: Optional[Dict[str, nn.Module]] = None,
        loss_terms: Optional[Dict[str, nn.Module]] = None,
    ) -> None:
        in_dim = getattr(field_injection, "in_dim", None)
        if in_dim is not None and in_dim != semantic_table.output_dim:
            raise ValueError(
                f"SemanticTableTask: the field injection takes vectors of width {in_dim}, the semantic table gives "
                f"{semantic_table.output_dim} ({len(semantic_table.feature_names)} entities "
                f"{semantic_table.feature_names} x dim {semantic_table.dim}, concatenated): build it with "
                f"in_dim={semantic_table.output_dim}"
            )
        check_same_weighting(model, semantic_table)
        super().__init__(model, field_injection=field_injection, logit_terms=logit_terms, loss_terms=loss_terms)
        self.semantic_table = semantic_table

    def predict(self, batch: Batch) -> CTROutput:
        """Backbone output with the logit terms applied, the extra fields projected from the table's
        vectors (B, K * d) rather than read from ``batch.extras``; ``logits`` (B,)."""
        vectors = self.semantic_table(batch.sparse_features)  # (B, K * d)
        extra_fields = self.field_injection(vectors)  # (B, E, D)
        return self.with_logit_terms(self.model(batch.dense_features, batch.sparse_features, extra_fields))


def check_same_weighting(model: nn.Module, semantic_table: SemanticTable) -> None:
    """Raises ValueError unless the backbone's EBC and the entity table agree on ``is_weighted``.

    Both read the same KeyedJaggedTensor. A KJT with per-id weights (which a weighted backbone
    needs) is pooled with those weights by a *sharded* EBC whether it is weighted or not, while an
    unsharded (or served) unweighted EBC ignores them: an unweighted entity table next to a
    weighted backbone would train on weighted entity vectors and serve unweighted ones.
    """
    ebc = getattr(model, "embedding_bag_collection", None)
    if not isinstance(ebc, EmbeddingBagCollection):
        return
    backbone_weighted, table_weighted = ebc.is_weighted(), semantic_table.embedding_bag_collection.is_weighted()
    if backbone_weighted != table_weighted:
        raise ValueError(
            f"SemanticTableTask: the backbone's EmbeddingBagCollection has is_weighted={backbone_weighted} and the "
            f"entity table {semantic_table.feature_names} is_weighted={table_weighted}; both read the batch's "
            "KeyedJaggedTensor, whose per-id weights a sharded table pools whether it is weighted or not (an unsharded "
            "or served unweighted one ignores them): build "
            f"SemanticTable(..., is_weighted={backbone_weighted}) to match the backbone"
        )


def table_weights(model: nn.Module, table_name: str) -> List[Tuple[str, Union[torch.Tensor, "ShardedTensor"]]]:
    """(state-dict key, weight) of every copy of the table ``table_name`` in ``model``: a tensor,
    or on a DMP model a ``ShardedTensor`` of this rank's shards."""
    suffix = f"embedding_bags.{table_name}.weight"
    return [(k, v) for k, v in model.state_dict().items() if k.endswith(suffix)]


@torch.no_grad()
def load_semantic_vectors(
    model: nn.Module, table_name: str, vector_dir: str, expected: Optional[Dict[str, str]] = None
) -> int:
    """Copies exported entity vectors into this rank's shards of a (sharded) table.

    Works on a plain model (the whole table is local) and on a
    ``DistributedModelParallel`` (table-wise, row-wise, column-wise shards: only the
    local shards' rows and columns are copied from the export, a chunk at a time, into
    the shards themselves; memory beyond the shards is one chunk and one byte per id).
    Rows the export has no vector for are zero. A NaN/inf vector found part way leaves the
    shard partly filled (the error stops the run).

    Args:
        model (nn.Module): holds the table (DMP or plain).
        table_name (str): e.g. ``semantic_item_id``.
        vector_dir (str): a finished entity export keyed by id.
        expected (Optional[Dict[str, str]]): provenance the vectors must have.

    Returns:
        int: number of table rows filled on this rank (a row of several local column shards counts once).

    Raises:
        KeyError: the model has no such table.
        RuntimeError: the table is still on the meta device (call it after ``shard_model``).
        ValueError: the export is damaged (a chunk with fewer or more rows than its manifest
            gives it, a repeated id, a NaN/inf vector) or holds ids outside the table, naming
            ``vector_dir``.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    weights = table_weights(model, table_name)
    if not weights:
        suffix = ".weight"
        semantic = sorted({k[: -len(suffix)].rsplit(".", 1)[-1] for k in model.state_dict()
                           if k.endswith(suffix) and f"embedding_bags.{TABLE_PREFIX}" in k})
        hint = (f"; the table of the entity field {table_name!r} is {semantic_table_name(table_name)!r}"
                if semantic_table_name(table_name) in semantic else "")
        raise KeyError(f"model has no embedding table {table_name!r} in its state dict (its entity tables: "
                       f"{semantic}{hint})")
    if table_name.startswith(TABLE_PREFIX) and "entity_field" in read_manifest(vector_dir)["provenance"]:
        # another field's vectors (a user export in the item table) would fill it wherever their ids fit
        expected = {**(expected or {}), "entity_field": table_name[len(TABLE_PREFIX):]}
    num_rows = weights[0][1].size(0)
    # checks row counts against the manifest and that no id repeats (two vectors for one row)
    low, high = key_range(vector_dir, expected)
    if low < 0 or high >= num_rows:
        raise ValueError(
            f"{vector_dir}: holds vectors of ids {low}..{high}, but table {table_name!r} has rows 0..{num_rows - 1}; "
            "a vector outside it would be dropped and ids looked up in the table would find another entity's "
            "(export the entities of the data the model reads, with ids below the field's cardinality)"
        )
    filled: List[Tuple[int, int]] = []  # [start, stop) of the rows of each local shard
    for key, weight in weights:
        if isinstance(weight, ShardedTensor):
            dim = weight.size(1)
            for shard in weight.local_shards():
                row, col = shard.metadata.shard_offsets
                fill_rows(shard.tensor, vector_dir, row, col, dim, expected)
                filled.append((row, row + shard.metadata.shard_sizes[0]))
        elif isinstance(weight, torch.Tensor):
            require_allocated(key, weight, f"load_semantic_vectors({table_name!r})")
            fill_rows(weight, vector_dir, 0, 0, weight.size(1), expected)
            filled.append((0, weight.size(0)))
            mark_filled_tables(model, [key], "load_semantic_vectors")  # shard_model would lose them
        else:
            raise TypeError(f"table {table_name!r}: unsupported weight type {type(weight).__name__}")
    return distinct_rows(filled)


def distinct_rows(row_ranges: Iterable[Tuple[int, int]]) -> int:
    """Rows in the union of ``[start, stop)`` ranges: a row this rank holds in several column shards counts once."""
    count, covered_to = 0, None
    for start, stop in sorted(row_ranges):
        start = start if covered_to is None else max(start, covered_to)
        count += max(0, stop - start)
        covered_to = stop if covered_to is None else max(covered_to, stop)
    return count


@torch.no_grad()
def fill_rows(
    tensor: torch.Tensor, vector_dir: str, row: int, col: int, dim: int, expected: Optional[Dict[str, str]] = None
) -> None:
    """Sets ``tensor`` (a shard: rows ``[row, row + r)``, columns ``[col, col + c)`` of a table
    ``dim`` wide) to the exported vectors of those ids, zero where the export has none.

    Copies one export chunk at a time (:func:`~recsys_llm.semantics.vector_reader.iter_vector_rows`):
    besides the shard itself, memory is one chunk's rows in range.
    """
    rows, cols = tensor.shape
    tensor.zero_()
    for positions, vectors in iter_vector_rows(vector_dir, row, row + rows, dim, expected, columns=(col, col + cols)):
        index = torch.from_numpy(positions).to(tensor.device)
        tensor[index] = torch.from_numpy(vectors).to(device=tensor.device, dtype=tensor.dtype)
