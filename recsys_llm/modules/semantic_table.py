"""Entity LLM vectors (one per user or item id) as a frozen, sharded embedding table.

With per-entity vectors (``recsys-llm semantics export --granularity entity``) the
vector of a row is a lookup by id, so 10^7 items are a table the planner shards like any
other instead of a dense column on every rank. The table lives in its **own**
``EmbeddingBagCollection`` marked ``frozen = True``: ``recsys_llm.train.sharding`` then
gives it a fused kernel with stateless SGD at learning rate 0 in a TBE of its own (never
grouped with trained tables) and ``requires_grad=False`` after sharding (see that module).

:func:`load_semantic_vectors` fills the table **after** sharding: each rank walks the
local shards of the table's ``ShardedTensor`` in the model's state dict and reads only
the vector rows ``[offset, offset + rows)`` of its shards from the export, so no rank
ever materialises the whole table.

Example::

    table = SemanticTable("item_id", num_embeddings=1682, dim=64)        # meta device
    task = SemanticTableTask(backbone, table, VectorFieldInjection(64, 16))
    model, plan = shard_model(task, device, world_size, ShardingConfig(), OptimizerConfig())
    load_semantic_vectors(model, table.table_name, "vectors/items", expected=provenance)
"""

from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.models.base import CTRBackbone, CTROutput
from recsys_llm.semantics.vector_export import read_vector_rows
from recsys_llm.train.task import CTRTask

TABLE_PREFIX = "semantic_"


class SemanticTable(nn.Module):
    """Looks up a frozen LLM vector per entity id.

    Args:
        feature_name (str): the KJT key holding the entity ids (e.g. ``item_id``).
        num_embeddings (int): number of ids (the field's cardinality).
        dim (int): d, vector width (a multiple of 4 for FBGEMM kernels).
        pooling (PoolingType): SUM for one id per row; MEAN averages a sequence field's vectors.
        device (Optional[torch.device]): ``meta`` (default) lets DMP allocate shards only.

    Example::

        table = SemanticTable("item_id", 1682, 64, device=torch.device("cpu"))
        vectors = table(kjt)  # (B, 64)
    """

    def __init__(
        self,
        feature_name: str,
        num_embeddings: int,
        dim: int,
        pooling: PoolingType = PoolingType.SUM,
        device: Optional[torch.device] = torch.device("meta"),
    ) -> None:
        super().__init__()
        if dim % 4 != 0:
            raise ValueError(
                f"SemanticTable {feature_name!r}: dim {dim} must be a multiple of 4 (FBGEMM kernels); "
                "export the vectors with a projection of a multiple-of-4 size"
            )
        self._feature_name = feature_name
        self._table_name = f"{TABLE_PREFIX}{feature_name}"
        self._dim = dim
        config = EmbeddingBagConfig(
            name=self._table_name,
            embedding_dim=dim,
            num_embeddings=num_embeddings,
            feature_names=[feature_name],
            pooling=pooling,
        )
        self.embedding_bag_collection = EmbeddingBagCollection(tables=[config], device=device)
        # Read by recsys_llm.train.sharding: no optimizer state, own TBE, no autograd after
        # sharding. The weights keep requires_grad until then (the sharder attaches its
        # optimizer-free in-backward hook to them); ``forward`` detaches in any case.
        self.embedding_bag_collection.frozen = True

    @property
    def table_name(self) -> str:
        return self._table_name

    @property
    def dim(self) -> int:
        return self._dim

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            features (KeyedJaggedTensor): keys include ``feature_name``.

        Returns:
            torch.Tensor: (B, d) vectors, detached (the table never trains).
        """
        return self.embedding_bag_collection(features)[self._feature_name].detach()  # (B, d)


class SemanticTableTask(CTRTask):
    """A ``CTRTask`` whose injected vector comes from a :class:`SemanticTable` lookup.

    The gain network of ELEC with per-entity vectors: ``extra_fields =
    field_injection(table(batch.sparse_features))`` instead of ``batch.extras[...]``. The
    table reads the batch's KJT directly, so the pipeline still prefetches its lookup.

    Args:
        model (CTRBackbone): backbone built with ``num_extra_fields = field_injection.num_fields``.
        semantic_table (SemanticTable): the frozen entity vectors.
        field_injection (nn.Module): (B, d) -> (B, E, D), e.g. ``VectorFieldInjection``.
        logit_terms (Optional[Dict[str, nn.Module]]): as in ``CTRTask``.
        loss_terms (Optional[Dict[str, nn.Module]]): as in ``CTRTask``.
    """

    def __init__(
        self,
        model: CTRBackbone,
        semantic_table: SemanticTable,
        field_injection: nn.Module,
        logit_terms: Optional[Dict[str, nn.Module]] = None,
        loss_terms: Optional[Dict[str, nn.Module]] = None,
    ) -> None:
        super().__init__(model, field_injection=field_injection, logit_terms=logit_terms, loss_terms=loss_terms)
        self.semantic_table = semantic_table

    def predict(self, batch: Batch) -> CTROutput:
        vectors = self.semantic_table(batch.sparse_features)  # (B, d)
        extra_fields = self.field_injection(vectors)  # (B, E, D)
        output = self.model(batch.dense_features, batch.sparse_features, extra_fields)
        logits = output.logits
        for term in self.logit_terms.values():
            logits = logits + term(output)
        return CTROutput(logits, output.representation, output.embeddings)


def _table_weights(model: nn.Module, table_name: str) -> List[Tuple[str, object]]:
    suffix = f"embedding_bags.{table_name}.weight"
    return [(k, v) for k, v in model.state_dict().items() if k.endswith(suffix)]


@torch.no_grad()
def load_semantic_vectors(
    model: nn.Module, table_name: str, vector_dir: str, expected: Optional[Dict[str, str]] = None
) -> int:
    """Copies exported entity vectors into this rank's shards of a (sharded) table.

    Works on a plain model (the whole table is local) and on a
    ``DistributedModelParallel`` (table-wise, row-wise, column-wise shards: only the
    local shards' rows and columns are read from the export).

    Args:
        model (nn.Module): holds the table (DMP or plain).
        table_name (str): e.g. ``semantic_item_id``.
        vector_dir (str): a finished entity export keyed by id.
        expected (Optional[Dict[str, str]]): provenance the vectors must have.

    Returns:
        int: number of rows filled on this rank.

    Raises:
        KeyError: the model has no such table.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    weights = _table_weights(model, table_name)
    if not weights:
        raise KeyError(f"model has no embedding table {table_name!r} in its state dict")
    filled = 0
    for _, weight in weights:
        if isinstance(weight, ShardedTensor):
            dim = weight.size(1)
            for shard in weight.local_shards():
                row, col = shard.metadata.shard_offsets
                rows, cols = shard.metadata.shard_sizes
                block = read_vector_rows(vector_dir, row, row + rows, dim, expected)  # (rows, d)
                shard.tensor.copy_(torch.from_numpy(block[:, col : col + cols]))
                filled += rows
        elif isinstance(weight, torch.Tensor):
            block = read_vector_rows(vector_dir, 0, weight.size(0), weight.size(1), expected)
            weight.copy_(torch.from_numpy(block))
            filled += weight.size(0)
        else:
            raise TypeError(f"table {table_name!r}: unsupported weight type {type(weight).__name__}")
    return filled
