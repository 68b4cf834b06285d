"""CTR backbones on EmbeddingBagCollection (FM, FwFM, DeepFM, DCNv2, FinalMLP, DLRM).

Every backbone is a :class:`CTRBackbone`: ``forward(dense (B, Dd), kjt, extra_fields
(B, E, D) | None) -> CTROutput(logits (B,), representation (B, H), pooled embeddings)``.
Build one by name with :func:`build_backbone` (``SMOKE_CONFIGS`` holds tiny ones);
:class:`CTRTask` adds the loss (BCE plus any loss terms) and extra logit terms.

=========  ==========================================  ==============================
model      dense features enter as                      representation (H)
=========  ==========================================  ==============================
fm         linear term + fields x_j v_j (optional)      second-order vector (D)
fwfm       linear term + fields x_j v_j (optional)      weighted pair vector (D)
deepfm     FM as above + raw values into the MLP         last MLP hidden
dcnv2      raw values concatenated to x0                 MLP out (stacked) / [x_L; MLP]
finalmlp   raw values concatenated to both streams       [o_1; o_2]
dlrm(_dcn) torchrec's dense arch (an MLP to D)          over-arch MLP before last Linear
=========  ==========================================  ==============================

Extra fields join the F sparse fields everywhere (pairs, cross input, streams, DLRM
interaction). First-order terms use a learned vector per field instead of dim-1
tables (FBGEMM under DistributedModelParallel needs dims divisible by 4).
"""

from recsys_llm.models.base import CTRBackbone, CTROutput, stack_fields
from recsys_llm.models.dcnv2 import DCNv2, DCNv2Config
from recsys_llm.models.deepfm import DeepFM, DeepFMConfig
from recsys_llm.models.dlrm import DLRMBackbone, build_dlrm
from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.finalmlp import FinalMLP, FinalMLPConfig
from recsys_llm.models.fm import FM, FMConfig
from recsys_llm.models.fwfm import FwFM, FwFMConfig
from recsys_llm.models.registry import MODEL_NAMES, SMOKE_CONFIGS, ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask

__all__ = [
    "CTRBackbone",
    "CTROutput",
    "CTRTask",
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
