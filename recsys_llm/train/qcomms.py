"""Quantized communication of the model-parallel tables' pooled embeddings (torchrec's qcomms).

A sharded (table-wise, column-wise, row-wise) table sends its pooled embeddings to the ranks that
own the batch in the forward pass (an all-to-all; row-wise: a reduce-scatter) and receives their
gradients back in the backward. torchrec's ``QCommsConfig`` makes both travel in a narrower
float: each message is cast by FBGEMM's codec (``fp32_to_fp16_with_clamp`` /
``fp32_to_bf16_with_clamp``) before it is sent and back to float32 on arrival, so ``fp16`` or
``bf16`` halves the bytes of those collectives. The tables, their optimizer state and the dense
part stay float32; replicated (``data_parallel``) tables send no embeddings and are unaffected.

The codecs reach torchrec through the sharders (``EmbeddingBagCollectionSharder(
qcomm_codecs_registry=...)``), which both the planner (its communication cost estimate reads the
codecs' dtypes: ``planner.utils.extract_comm_data_type_size``) and DMP must be given.

Example::

    qcomms = QCommsSettings(forward_precision="fp16", backward_precision="bf16")
    sharders = qcomm_sharders(qcomms, world_size=2)   # for planner.plan(...) and DistributedModelParallel
"""

import dataclasses
from typing import Dict, List, Optional, cast

from torch import nn
from torchrec.distributed.embedding import EmbeddingCollectionSharder
from torchrec.distributed.embedding_types import QuantizedCommCodecs
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.fbgemm_qcomm_codec import CommType, QCommsConfig, get_qcomm_codecs
from torchrec.distributed.fp_embeddingbag import FeatureProcessedEmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import get_default_sharders
from torchrec.distributed.types import CommOp, ModuleSharder

# the precisions offered: torchrec's fp8 codec fails on CPU (FBGEMM's FloatToHFP8Quantized takes 2-D input, the
# codec passes the flat message), int8 / mx4 need every message to be a multiple of 32 / the group size
COMM_PRECISIONS = ("fp32", "fp16", "bf16")
# the collectives of pooled and sequence embeddings torchrec's sharders quantize
QUANTIZED_COMM_OPS = (CommOp.POOLED_EMBEDDINGS_ALL_TO_ALL, CommOp.POOLED_EMBEDDINGS_REDUCE_SCATTER,
                      CommOp.SEQUENCE_EMBEDDINGS_ALL_TO_ALL)


@dataclasses.dataclass
class QCommsSettings:
    """Precision of the sharded tables' embedding communication (torchrec's ``QCommsConfig`` fields).

    Args:
        forward_precision (str): ``fp32`` | ``fp16`` | ``bf16``: the pooled embeddings' all-to-all /
            reduce-scatter in the forward pass.
        backward_precision (str): ``fp32`` | ``fp16`` | ``bf16``: their gradients in the backward pass
            (``bf16`` keeps float32's range, so small gradients do not underflow as in ``fp16``).
    """

    forward_precision: str = "fp32"
    backward_precision: str = "fp32"

    def __post_init__(self) -> None:
        for name in ("forward_precision", "backward_precision"):
            value = getattr(self, name)
            if value not in COMM_PRECISIONS:
                raise ValueError(f"sharding.qcomms.{name} must be one of {list(COMM_PRECISIONS)}, got {value!r} "
                                 "(torchrec's fp8, int8 and mx4 codecs are not offered: fp8 fails on CPU, int8 and "
                                 "mx4 need messages of whole 32-value groups)")

    @property
    def quantized(self) -> bool:
        """Whether either direction travels narrower than float32."""
        return (self.forward_precision, self.backward_precision) != ("fp32", "fp32")


def comms_text(qcomms: QCommsSettings, world_size: int) -> str:
    """How the sharded tables' embeddings travel, for the plan's log line: ``embeddings sent in fp16, their
    gradients in bf16``; '' where nothing is quantized (float32, or one rank, which sends nothing)."""
    if qcomms_codecs_apply(qcomms, world_size):
        return f"embeddings sent in {qcomms.forward_precision}, their gradients in {qcomms.backward_precision}"
    return ""


def qcomms_codecs_apply(qcomms: QCommsSettings, world_size: int) -> bool:
    """Whether the sharders carry codecs: a narrower precision, and ranks to send to."""
    return qcomms.quantized and world_size > 1


def qcomm_codecs_registry(qcomms: QCommsSettings, world_size: int) -> Optional[Dict[str, QuantizedCommCodecs]]:
    """CommOp name -> FBGEMM codecs of ``qcomms``, for a sharder's ``qcomm_codecs_registry``; None (plain float32
    collectives) where nothing is quantized or one rank has no one to send to.

    Built like torchrec's ``get_qcomm_codecs_registry`` but without its gloo fallback of ``bf16`` to ``fp16``:
    torch's gloo backend sends bfloat16 (two gloo ranks: all-to-all and reduce-scatter, torch 2.13).
    """
    if not qcomms_codecs_apply(qcomms, world_size):
        return None
    config = QCommsConfig(forward_precision=CommType(qcomms.forward_precision),
                          backward_precision=CommType(qcomms.backward_precision))
    return {op.name: get_qcomm_codecs(config) for op in QUANTIZED_COMM_OPS}  # one codec pair per collective


def qcomm_sharders(qcomms: QCommsSettings, world_size: int) -> List[ModuleSharder[nn.Module]]:
    """torchrec's default sharders, those of embedding collections carrying the codecs of ``qcomms``: the list
    the planner plans with and DMP shards with (the same list, so the plan's costs are those DMP runs)."""
    registry = qcomm_codecs_registry(qcomms, world_size)
    if registry is None:
        return get_default_sharders()
    quantized: Dict[type, ModuleSharder[nn.Module]] = {
        EmbeddingBagCollectionSharder: EmbeddingBagCollectionSharder(qcomm_codecs_registry=registry),
        FeatureProcessedEmbeddingBagCollectionSharder:
            FeatureProcessedEmbeddingBagCollectionSharder(qcomm_codecs_registry=registry),
        EmbeddingCollectionSharder: EmbeddingCollectionSharder(qcomm_codecs_registry=registry),
    }
    return [cast(ModuleSharder[nn.Module], quantized.get(type(sharder), sharder)) for sharder in get_default_sharders()]
