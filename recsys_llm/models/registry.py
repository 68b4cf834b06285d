"""One config for every backbone, a builder by name, and a tiny smoke config per model."""

import dataclasses
from typing import Any, Callable, Dict, Iterable, Mapping, Optional, Tuple

import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.validation import check_number
from recsys_llm.models.base import CTRBackbone
from recsys_llm.models.dcnv2 import STRUCTURES as DCN_STRUCTURES
from recsys_llm.models.dcnv2 import DCNv2, DCNv2Config
from recsys_llm.models.deepfm import DeepFM, DeepFMConfig
from recsys_llm.models.dlrm import DLRMBackbone, build_dlrm
from recsys_llm.models.embedding import EMBEDDING_DIM_MULTIPLE, EMBEDDING_DTYPES, build_embedding_bag_collection
from recsys_llm.models.finalmlp import FinalMLP, FinalMLPConfig
from recsys_llm.models.fm import FM, FMConfig
from recsys_llm.models.fwfm import FwFM, FwFMConfig

MODEL_NAMES = ("fm", "fwfm", "deepfm", "dcnv2", "finalmlp", "dlrm", "dlrm_dcn")
# a config names one of MODEL_NAMES only: there is no registry to add a backbone of one's own to
OWN_BACKBONE_NOTE = (
    "A config (recsys-llm train, evaluate, export, teacher-outputs, an elec section) builds only these: a backbone "
    "of your own (a CTRBackbone subclass) has no name to register there; train it through the Python API instead "
    "(CTRTask, shard_model, train_epoch, export_task: docs/usage.md section 5, examples/plug_into_own_model.py)"
)
# the layer-size lists each model builds an MLP from: they need at least one layer
_MLP_KEYS = {"deepfm": ("mlp_layer_sizes",), "dcnv2": ("mlp_layer_sizes",),
             "finalmlp": ("mlp_layer_sizes", "mlp2_layer_sizes"), "dlrm": ("mlp_layer_sizes",),
             "dlrm_dcn": ("mlp_layer_sizes",)}


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Settings of any backbone; each model reads the fields it uses.

    Args:
        name (str): one of ``MODEL_NAMES``.
        embedding_dim (int): D, a multiple of 4.
        mlp_layer_sizes (Tuple[int, ...]): deep part (DeepFM, DCNv2), stream 1 (FinalMLP),
            over arch without its final 1 (DLRM).
        mlp2_layer_sizes (Tuple[int, ...]): FinalMLP stream 2.
        dropout (float): dropout after hidden layers (DeepFM, DCNv2, FinalMLP).
        dense_as_fields (bool): FM family: dense features also as fields :math:`x_j v_j`.
        cross_layers (int): DCNv2 / DLRM_DCN cross layers.
        low_rank (int): DCNv2: 0 full-rank CrossNet, r > 0 LowRankCrossNet; DLRM_DCN rank
            (0 means 16 there, as DLRM_DCN is always low-rank).
        dcn_structure (str): DCNv2 ``"stacked"`` or ``"parallel"``.
        finalmlp_heads (int): FinalMLP bilinear fusion heads.
        finalmlp_gate_hidden (Tuple[int, ...]): FinalMLP gate MLP hidden sizes.
        finalmlp_context1 (Tuple[str, ...]): FinalMLP stream-1 gate context fields.
        finalmlp_context2 (Tuple[str, ...]): FinalMLP stream-2 gate context fields.
        dense_arch_hidden (Tuple[int, ...]): DLRM dense arch sizes before the final D.
        embedding_init_scale (Optional[float]): tables initialised uniform in [-s, s]
            (e.g. 1.7e-4 for the std 1e-4 of DeepCTR / FuxiCTR); None: torchrec's default
            ±sqrt(1 / rows).
        embedding_dtype (str): the weights' dtype of the backbone's tables: ``fp32``, or ``fp16``
            (torchrec ``DataType.FP16``: half the table memory; FBGEMM's fused kernels keep the
            optimizer state in float32 and give the pooled embeddings in float32; such tables
            are never replicated, ``data_parallel``). Frozen entity tables stay float32.

    Example::

        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        schema = DatasetSchema(name="toy", fields=[  # two id fields, two dense features
            FieldSpec("user_id", cardinality=10), FieldSpec("item_id", cardinality=10),
            FieldSpec("x1", "dense"), FieldSpec("x2", "dense")])
        config = ModelConfig.from_dict({"name": "deepfm", "embedding_dim": 16})
        model = build_backbone(config, schema, device=torch.device("cpu"))
        kjt = KeyedJaggedTensor.from_lengths_sync(  # a batch of B = 3 rows, one id per field
            ["user_id", "item_id"], torch.tensor([1, 2, 3, 7, 8, 9]), torch.ones(6, dtype=torch.int32))
        out = model(torch.rand(3, 2), kjt)  # logits (3,), representation (3, 128): DeepFM's last hidden
    """

    name: str
    embedding_dim: int = 16
    mlp_layer_sizes: Tuple[int, ...] = (256, 128)
    mlp2_layer_sizes: Tuple[int, ...] = (256, 128)
    dropout: float = 0.0
    dense_as_fields: bool = True
    cross_layers: int = 3
    low_rank: int = 0
    dcn_structure: str = "stacked"
    finalmlp_heads: int = 1
    finalmlp_gate_hidden: Tuple[int, ...] = (64,)
    finalmlp_context1: Tuple[str, ...] = ()
    finalmlp_context2: Tuple[str, ...] = ()
    dense_arch_hidden: Tuple[int, ...] = (64,)
    embedding_init_scale: Optional[float] = None
    embedding_dtype: str = "fp32"

    def __post_init__(self) -> None:
        if self.name not in MODEL_NAMES:
            raise ValueError(f"unknown model {self.name!r}; choose one of {list(MODEL_NAMES)}. {OWN_BACKBONE_NOTE}")
        for key in ("mlp_layer_sizes", "mlp2_layer_sizes", "finalmlp_gate_hidden", "dense_arch_hidden",
                    "finalmlp_context1", "finalmlp_context2"):
            value = getattr(self, key)
            if isinstance(value, str):  # tuple() would make it its characters
                raise ValueError(f"model.{key}: expected a list, got the string {value!r} (write [{value!r}])")
            if not isinstance(value, Iterable):
                raise ValueError(f"model.{key}: expected a list, got {value!r}")
            object.__setattr__(self, key, tuple(value))
        # checked here, naming the config key, rather than when a model is built from them
        check_number("model.embedding_dim", self.embedding_dim, integer=True)
        if self.embedding_dim <= 0 or self.embedding_dim % EMBEDDING_DIM_MULTIPLE:
            raise ValueError(
                f"model.embedding_dim must be a positive multiple of {EMBEDDING_DIM_MULTIPLE} (FBGEMM kernels under "
                f"DistributedModelParallel need it), got {self.embedding_dim}"
            )
        for key in ("mlp_layer_sizes", "mlp2_layer_sizes", "finalmlp_gate_hidden", "dense_arch_hidden"):
            for i, size in enumerate(getattr(self, key)):
                check_number(f"model.{key}[{i}]", size, integer=True, minimum=1)
        check_number("model.dropout", self.dropout, minimum=0, below=1)
        if not isinstance(self.dense_as_fields, bool):  # "false" would count as True
            raise ValueError(f"model.dense_as_fields: expected true or false, got {self.dense_as_fields!r}")
        for key in _MLP_KEYS.get(self.name, ()):
            if not getattr(self, key):
                raise ValueError(f"model.{key} is empty; model {self.name!r} builds an MLP from it: expected at "
                                 "least one layer size, e.g. [256, 128]")
        check_number("model.embedding_init_scale", self.embedding_init_scale, above=0, optional=True)
        if self.embedding_dtype not in EMBEDDING_DTYPES:
            raise ValueError(f"model.embedding_dtype: expected one of {list(EMBEDDING_DTYPES)}, got "
                             f"{self.embedding_dtype!r}")
        check_number("model.cross_layers", self.cross_layers, integer=True, minimum=1)
        check_number("model.low_rank", self.low_rank, integer=True, minimum=0)
        if self.dcn_structure not in DCN_STRUCTURES:
            raise ValueError(f"model.dcn_structure: expected one of {list(DCN_STRUCTURES)}, got {self.dcn_structure!r}")
        check_number("model.finalmlp_heads", self.finalmlp_heads, integer=True, minimum=1)
        if self.name == "finalmlp":
            widths = {"mlp_layer_sizes": self.mlp_layer_sizes[-1], "mlp2_layer_sizes": self.mlp2_layer_sizes[-1]}
            if any(width % self.finalmlp_heads for width in widths.values()):
                shown = ", ".join(f"model.{key}[-1] = {width}" for key, width in widths.items())
                raise ValueError(f"model.finalmlp_heads = {self.finalmlp_heads} must divide the width of both "
                                 f"streams' last layers ({shown})")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "<dict>") -> "ModelConfig":
        """From a config-file mapping; unknown keys are an error naming them."""
        allowed = {f.name for f in dataclasses.fields(cls)}
        unknown = set(raw) - allowed
        if unknown:
            raise ValueError(f"{source}: unknown model config keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        if "name" not in raw:
            raise ValueError(f"{source}: model config needs a 'name' ({list(MODEL_NAMES)})")
        return cls(**dict(raw))

    def to_dict(self) -> Dict[str, Any]:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}


def _build_fm_family(
    config: ModelConfig,
    schema: DatasetSchema,
    num_extra_fields: int,
    device: Optional[torch.device],
    dense_device: Optional[torch.device],
    table_prefix: str,
) -> CTRBackbone:
    ebc = build_embedding_bag_collection(schema, config.embedding_dim, device=device, table_prefix=table_prefix,
                                         init_scale=config.embedding_init_scale,
                                         data_type=EMBEDDING_DTYPES[config.embedding_dtype])
    num_dense = len(schema.dense_fields)
    if config.name == "fm":
        return FM(ebc, num_dense, FMConfig(config.dense_as_fields), num_extra_fields, dense_device)
    if config.name == "fwfm":
        return FwFM(ebc, num_dense, FwFMConfig(config.dense_as_fields), num_extra_fields, dense_device)
    if config.name == "deepfm":
        deepfm = DeepFMConfig(config.mlp_layer_sizes, config.dropout, config.dense_as_fields)
        return DeepFM(ebc, num_dense, deepfm, num_extra_fields, dense_device)
    if config.name == "dcnv2":
        dcn = DCNv2Config(config.cross_layers, config.low_rank, config.dcn_structure, config.mlp_layer_sizes,
                          config.dropout)
        return DCNv2(ebc, num_dense, dcn, num_extra_fields, dense_device)
    final = FinalMLPConfig(
        mlp1_layer_sizes=config.mlp_layer_sizes,
        mlp2_layer_sizes=config.mlp2_layer_sizes,
        dropout=config.dropout,
        num_heads=config.finalmlp_heads,
        gate_hidden_sizes=config.finalmlp_gate_hidden,
        context1=config.finalmlp_context1,
        context2=config.finalmlp_context2,
    )
    return FinalMLP(ebc, num_dense, final, num_extra_fields, dense_device)


def _build_dlrm(
    config: ModelConfig,
    schema: DatasetSchema,
    num_extra_fields: int,
    device: Optional[torch.device],
    dense_device: Optional[torch.device],
    table_prefix: str,
) -> CTRBackbone:
    dlrm = build_dlrm(
        schema,
        config.embedding_dim,
        dense_arch_layer_sizes=list(config.dense_arch_hidden) + [config.embedding_dim],
        over_arch_layer_sizes=list(config.mlp_layer_sizes) + [1],
        dcn=config.name == "dlrm_dcn",
        dcn_num_layers=config.cross_layers,
        dcn_low_rank_dim=config.low_rank if config.low_rank > 0 else 16,
        num_extra_fields=num_extra_fields,
        device=device,
        dense_device=dense_device,
        table_prefix=table_prefix,
        embedding_init_scale=config.embedding_init_scale,
        embedding_data_type=EMBEDDING_DTYPES[config.embedding_dtype],
    )
    return DLRMBackbone(dlrm, len(schema.dense_fields), num_extra_fields)


_BUILDERS: Dict[str, Callable[..., CTRBackbone]] = {
    "fm": _build_fm_family,
    "fwfm": _build_fm_family,
    "deepfm": _build_fm_family,
    "dcnv2": _build_fm_family,
    "finalmlp": _build_fm_family,
    "dlrm": _build_dlrm,
    "dlrm_dcn": _build_dlrm,
}


def build_backbone(
    config: ModelConfig,
    schema: DatasetSchema,
    num_extra_fields: int = 0,
    *,
    device: Optional[torch.device] = torch.device("meta"),
    dense_device: Optional[torch.device] = None,
    table_prefix: str = "t_",
) -> CTRBackbone:
    """Builds the backbone ``config.name`` for ``schema``.

    Args:
        config (ModelConfig): model settings.
        schema (DatasetSchema): the data set.
        num_extra_fields (int): E extra field embeddings the caller passes to ``forward``.
        device (Optional[torch.device]): EBC device: ``meta`` (default) for
            DistributedModelParallel to materialise shards, ``cpu`` for a plain model.
        dense_device (Optional[torch.device]): device of the dense weights (None: default).
        table_prefix (str): table name prefix (keeps teacher and student tables apart).

    Returns:
        CTRBackbone: the model; ``model.embedding_bag_collection`` is its EBC.
    """
    check_number("build_backbone: num_extra_fields", num_extra_fields, integer=True, minimum=0)  # not a device
    return _BUILDERS[config.name](config, schema, num_extra_fields, device, dense_device, table_prefix)


SMOKE_CONFIGS: Dict[str, ModelConfig] = {
    "fm": ModelConfig(name="fm", embedding_dim=8),
    "fwfm": ModelConfig(name="fwfm", embedding_dim=8),
    "deepfm": ModelConfig(name="deepfm", embedding_dim=8, mlp_layer_sizes=(16, 8)),
    "dcnv2": ModelConfig(name="dcnv2", embedding_dim=8, mlp_layer_sizes=(16, 8), cross_layers=2, low_rank=4),
    "finalmlp": ModelConfig(
        name="finalmlp", embedding_dim=8, mlp_layer_sizes=(16, 8), mlp2_layer_sizes=(16, 8), finalmlp_heads=2,
        finalmlp_gate_hidden=(8,),
    ),
    "dlrm": ModelConfig(name="dlrm", embedding_dim=8, mlp_layer_sizes=(16, 8), dense_arch_hidden=(8,)),
    "dlrm_dcn": ModelConfig(
        name="dlrm_dcn", embedding_dim=8, mlp_layer_sizes=(16, 8), dense_arch_hidden=(8,), cross_layers=2, low_rank=4
    ),
}
"""Tiny configs per model (FuxiCTR's ``*_test`` configs): seconds to build and train in tests."""
