"""CTR backbones on EmbeddingBagCollection (FM, FwFM, DeepFM, DCNv2, FinalMLP, DLRM)."""

from recsys_llm.models.base import CTRBackbone, CTROutput, stack_fields
from recsys_llm.models.dcnv2 import DCNv2, DCNv2Config
from recsys_llm.models.deepfm import DeepFM, DeepFMConfig
from recsys_llm.models.dlrm import DLRMBackbone, build_dlrm
from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.finalmlp import FinalMLP, FinalMLPConfig
from recsys_llm.models.fm import FM, FMConfig
from recsys_llm.models.fwfm import FwFM, FwFMConfig
from recsys_llm.models.registry import MODEL_NAMES, SMOKE_CONFIGS, ModelConfig, build_backbone

__all__ = [
    "CTRBackbone",
    "CTROutput",
    "DCNv2",
    "DCNv2Config",
    "DLRMBackbone",
    "DeepFM",
    "DeepFMConfig",
    "FM",
    "FMConfig",
    "FinalMLP",
    "FinalMLPConfig",
    "FwFM",
    "FwFMConfig",
    "MODEL_NAMES",
    "ModelConfig",
    "SMOKE_CONFIGS",
    "build_backbone",
    "build_dlrm",
    "build_embedding_bag_collection",
    "stack_fields",
]
