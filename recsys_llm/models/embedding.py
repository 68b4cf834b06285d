"""Builds the EmbeddingBagCollection of a data set: one table per categorical field."""

from typing import Any, Iterable, List, Mapping, Optional

import torch
from torch import nn
from torchrec.modules.embedding_configs import DataType, EmbeddingBagConfig, PoolingType
from torchrec.modules.embedding_modules import EmbeddingBagCollection

from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.validation import check_number

# FBGEMM's table-batched kernels (used for every table under DistributedModelParallel)
# need the local column count to be a multiple of 4.
EMBEDDING_DIM_MULTIPLE = 4
# ``model.embedding_dtype`` -> the tables' torchrec ``data_type``. FBGEMM's CPU kernels take FP16 weights
# (optimizer state stays float32) but not BF16 ("split_embedding_cpu_forward_2" not implemented for 'BFloat16')
EMBEDDING_DTYPES = {"fp32": DataType.FP32, "fp16": DataType.FP16}


def embedding_bag_configs(
    schema: DatasetSchema,
    embedding_dim: int,
    table_prefix: str = "t_",
    init_scale: Optional[float] = None,
    data_type: DataType = DataType.FP32,
) -> List[EmbeddingBagConfig]:
    """One ``EmbeddingBagConfig`` per categorical field of ``schema``, in schema order.

    Sparse fields pool with SUM (one id per row, so SUM is the id's vector), multi-hot
    sequence fields with MEAN (so a long history does not dominate by its length).
    A field's ``embedding_dim`` in the schema overrides ``embedding_dim``.

    Args:
        schema (DatasetSchema): the data set.
        embedding_dim (int): D, a multiple of 4.
        table_prefix (str): table name = prefix + field name.
        init_scale (Optional[float]): initialise every table uniform in [-s, s] (torchrec's
            ``weight_init_min/max``, honoured by sharded FBGEMM tables too); None keeps
            torchrec's default of ±sqrt(1 / rows), which is large for small tables.
        data_type (DataType): the weights' dtype, ``FP32`` or ``FP16`` (half the table memory;
            see ``model.embedding_dtype``).

    Returns:
        List[EmbeddingBagConfig]: ``feature_names == [field.name]`` for each table.
    """
    fields = schema.categorical_fields
    if not fields:
        raise ValueError(f"schema {schema.name!r} has no sparse or sequence field to embed")
    check_number("embedding init_scale (None: torchrec's default)", init_scale, above=0, optional=True)
    bounds = {} if init_scale is None else {"weight_init_min": -init_scale, "weight_init_max": init_scale}
    configs = []
    for spec in fields:
        dim = spec.embedding_dim if spec.embedding_dim is not None else embedding_dim
        if dim <= 0 or dim % EMBEDDING_DIM_MULTIPLE != 0:
            source = (
                f"schema {schema.name!r}, field {spec.name!r}: its embedding_dim" if spec.embedding_dim is not None
                else "model.embedding_dim"
            )
            raise ValueError(
                f"{source} must be a positive multiple of {EMBEDDING_DIM_MULTIPLE} (FBGEMM kernels under "
                f"DistributedModelParallel need it), got {dim}"
            )
        pooling = PoolingType.MEAN if spec.kind == FieldKind.SEQUENCE else PoolingType.SUM
        configs.append(
            EmbeddingBagConfig(
                name=f"{table_prefix}{spec.name}",
                embedding_dim=dim,
                num_embeddings=spec.cardinality,
                feature_names=[spec.name],
                pooling=pooling,
                data_type=data_type,
                **bounds,
            )
        )
    return configs


def build_embedding_bag_collection(
    schema: DatasetSchema,
    embedding_dim: int,
    device: Optional[torch.device] = torch.device("meta"),
    table_prefix: str = "t_",
    init_scale: Optional[float] = None,
    data_type: DataType = DataType.FP32,
) -> EmbeddingBagCollection:
    """The EBC of a backbone; on ``meta`` by default so the planner allocates shards only.

    Args:
        schema (DatasetSchema): the data set; every categorical field gets a table.
        embedding_dim (int): D, a multiple of 4.
        device (Optional[torch.device]): ``meta`` for DistributedModelParallel, ``cpu`` (or
            None) for an unsharded model.
        table_prefix (str): table name = prefix + field name (distinct prefixes keep a
            teacher's and a student's tables apart).
        init_scale (Optional[float]): uniform init bound of every table (None: torchrec's default).
        data_type (DataType): the weights' dtype, ``FP32`` or ``FP16``.

    Returns:
        EmbeddingBagCollection: pooled output keys = ``schema.sparse_feature_names``.

    Example::

        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        schema = DatasetSchema(name="toy", fields=[  # two id fields, two dense features
            FieldSpec("user_id", cardinality=10), FieldSpec("item_id", cardinality=10),
            FieldSpec("x1", "dense"), FieldSpec("x2", "dense")])
        ebc = build_embedding_bag_collection(schema, embedding_dim=16, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        pooled = ebc(kjt)  # KeyedTensor, each key (3, 16)
    """
    configs = embedding_bag_configs(schema, embedding_dim, table_prefix, init_scale, data_type)
    return EmbeddingBagCollection(tables=configs, device=device)


def require_allocated(key: str, destination: object, action: str) -> None:
    """Raises when ``destination`` (a tensor ``action`` is about to fill) is still on the meta device.

    Copying into a meta tensor is a silent no-op, and ``shard_model`` allocates and initialises
    every table afresh (on meta or not), so table weights are filled only after sharding.

    Raises:
        RuntimeError: naming ``key`` and ``action``.
    """
    if isinstance(destination, torch.Tensor) and destination.is_meta:
        raise RuntimeError(
            f"{action}: {key!r} is on the meta device, not allocated yet; call it after shard_model (or, "
            "without sharding, after moving the module to a real device): a copy into a meta tensor does nothing"
        )


# set on an unsharded EBC whose table weights were filled (``load_full_state``, ``load_semantic_vectors``, or
# ``load_state_dict`` into a backbone's or entity table's EBC: :func:`mark_tables_on_load`);
# ``shard_model`` refuses it, as DMP allocates and initialises every table afresh
FILLED_BEFORE_SHARDING = "_recsys_llm_filled_by"


def mark_tables_on_load(module: nn.Module, state_dict: Mapping[str, Any], prefix: str, *_: Any) -> None:
    """A ``load_state_dict`` pre-hook of an unsharded ``EmbeddingBagCollection``: records that a state
    holding its table weights was loaded into it, for ``shard_model`` to refuse (DMP would initialise the
    tables afresh and keep only the dense weights loaded with them, e.g. a trained frozen teacher's)."""
    if any(key.startswith(f"{prefix}embedding_bags.") for key in state_dict):
        setattr(module, FILLED_BEFORE_SHARDING, "load_state_dict")


def mark_filled_tables(model: nn.Module, keys: Iterable[str], action: str) -> None:
    """Records on each unsharded ``EmbeddingBagCollection`` of ``model`` whose table weights are among
    ``keys`` (``model.state_dict()`` keys) that ``action`` filled them, for ``shard_model`` to refuse."""
    keys = list(keys)
    for path, module in model.named_modules():
        if isinstance(module, EmbeddingBagCollection):
            tables = f"{path}.embedding_bags." if path else "embedding_bags."
            if any(key.startswith(tables) for key in keys):
                setattr(module, FILLED_BEFORE_SHARDING, action)
