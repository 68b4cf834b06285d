"""Fixtures of the backbone tests (helpers live in ``backbone_inputs.py``)."""

import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.schema import DatasetSchema
from backbone_inputs import TINY_IDS, make_kjt, tiny_schema


@pytest.fixture
def schema() -> DatasetSchema:
    return tiny_schema()


@pytest.fixture
def kjt() -> KeyedJaggedTensor:
    return make_kjt(TINY_IDS)


@pytest.fixture
def dense() -> torch.Tensor:
    return torch.rand(4, 2, generator=torch.Generator().manual_seed(1))
