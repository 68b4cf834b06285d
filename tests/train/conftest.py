"""Fixtures of the training tests: a small embedded synthetic data set, generated once."""

import os

import pytest

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import generate_synthetic


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """12k rows (train 9.6k / valid 1.2k / test 1.2k), several row groups per split."""
    out = str(tmp_path_factory.mktemp("synthetic"))
    generate_synthetic(out, 12_000, seed=0, rows_per_group=1024)
    return out


@pytest.fixture(scope="session")
def synthetic_schema(synthetic_dir: str) -> DatasetSchema:
    return DatasetSchema.load(os.path.join(synthetic_dir, "schema.json"))
