"""Batch: its KeyedJaggedTensor reaches the device with its ids per key computed (no device sync in torchrec's
sharded input distribution)."""

from unittest import mock

import numpy as np
import torch
import torchrec.sparse.jagged_tensor as jagged_tensor
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.row_chunks import RowChunk


def _no_lengths_read() -> "mock._patch":
    """Fails any ids-per-key computation from the lengths (on a GPU: a device-to-host copy per batch)."""
    def refuse(*_args, **_kwargs):
        raise AssertionError("length_per_key computed from the lengths")
    return mock.patch.object(jagged_tensor, "_safe_tolist", refuse)


def test_row_chunk_batches_carry_ids_per_key() -> None:
    chunk = RowChunk(
        dense=np.zeros((3, 1), dtype=np.float32),
        ids=[np.array([1, 2, 3], dtype=np.int64), np.array([4, 5, 6, 7], dtype=np.int64)],
        offsets=[None, np.array([0, 2, 2, 4], dtype=np.int64)],
        labels=np.zeros(3, dtype=np.float32),
        extras={},
    )
    for part in (chunk, chunk.slice(1, 3), chunk.take(np.array([2, 0]))):
        features = part.to_batch(["a", "seq"]).sparse_features
        assert features.length_per_key_or_none() is not None
        lengths = features.lengths().view(2, -1).sum(dim=1).tolist()
        assert features.length_per_key() == lengths
        assert features.offset_per_key() == [0, lengths[0], sum(lengths)]
        with _no_lengths_read():  # what a sharded EBC's input distribution does with the batch
            features.to(torch.device("cpu")).permute([1, 0]).split([1, 1])


def test_to_computes_ids_per_key_of_a_kjt_built_from_lengths() -> None:
    # a KJT built from its lengths alone (a dataset or transform of one's own; torchrec's own in-memory Criteo
    # dataset passes length_per_key / offset_per_key for this reason)
    features = KeyedJaggedTensor(keys=["a", "seq"], values=torch.tensor([1, 2, 3, 4, 5]),
                                 lengths=torch.tensor([1, 1, 3, 0], dtype=torch.int32), stride=2)
    assert features.length_per_key_or_none() is None
    batch = Batch(torch.zeros(2, 1), features, torch.zeros(2))
    moved = batch.to(torch.device("cpu"), non_blocking=True).sparse_features
    assert moved.length_per_key_or_none() == [2, 3]
    assert moved.offset_per_key_or_none() == [0, 2, 5]
    with _no_lengths_read():
        moved.permute([1, 0]).split([1, 1])
