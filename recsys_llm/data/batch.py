"""The training batch: torchrec's ``Batch`` plus named dense extras (LLM vectors, teacher outputs)."""

import dataclasses
from typing import Dict

import torch
from torchrec.datasets.utils import Batch as TorchRecBatch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor


@dataclasses.dataclass
class Batch(TorchRecBatch):
    """A Pipelineable CTR batch for ``TrainPipelineSparseDist``.

    LLM-derived vectors travel as dense tensors in ``extras``, never as KJT features,
    so the pipeline can still overlap the sparse all-to-all with compute.

    Args:
        dense_features (torch.Tensor): (B, num_dense) float32.
        sparse_features (KeyedJaggedTensor): one key per categorical field.
        labels (torch.Tensor): (B,) float32 in {0, 1}.
        extras (Dict[str, torch.Tensor]): named per-row tensors with leading dim B, e.g.
            ``row_id`` (B,), ``llm_vector`` (B, d), ``teacher_logits`` (B,),
            ``teacher_representation`` (B, H), ``is_cold_item`` (B,).

    Example::

        batch = Batch(dense, kjt, labels, extras={"llm_vector": torch.randn(B, 384)})
        batch = batch.to(torch.device("cuda"), non_blocking=True)
    """

    extras: Dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return self.labels.size(0)

    def to(self, device: torch.device, non_blocking: bool = False) -> "Batch":
        return Batch(
            dense_features=self.dense_features.to(device=device, non_blocking=non_blocking),
            sparse_features=with_key_lengths(self.sparse_features).to(device=device, non_blocking=non_blocking),
            labels=self.labels.to(device=device, non_blocking=non_blocking),
            extras={k: v.to(device=device, non_blocking=non_blocking) for k, v in self.extras.items()},
        )

    def record_stream(self, stream: torch.Stream) -> None:
        super().record_stream(stream)
        for value in self.extras.values():
            value.record_stream(stream)

    def pin_memory(self) -> "Batch":
        return Batch(
            dense_features=self.dense_features.pin_memory(),
            sparse_features=self.sparse_features.pin_memory(),
            labels=self.labels.pin_memory(),
            extras={k: v.pin_memory() for k, v in self.extras.items()},
        )


def with_key_lengths(features: KeyedJaggedTensor) -> KeyedJaggedTensor:
    """``features`` with its ids per key (``length_per_key`` / ``offset_per_key``) computed, while on the CPU.

    ``KeyedJaggedTensor.to`` carries them to the device; a KJT without them (``from_jt_dict``, a batch transform's)
    has them computed from its lengths where torchrec first needs them, in the sharded input distribution's
    ``permute`` / ``split``: on a GPU a device-to-host copy (``.tolist()``) that stalls the host every batch. On
    the CPU they cost a sum over the lengths. A KJT already on a GPU is left as it is (computing them would sync).
    """
    if features.device().type == "cpu":
        features.sync()  # caches both on the KJT itself
    return features


def batch_extras(batch: TorchRecBatch) -> Dict[str, torch.Tensor]:
    """``batch.extras``; none for torchrec's own ``Batch`` (``torchrec.datasets.utils.Batch``)."""
    return getattr(batch, "extras", {})
