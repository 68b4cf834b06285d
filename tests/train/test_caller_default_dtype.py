"""A notebook's float64 default dtype and the in-process entry points ``run_training`` and ``run_evaluation``."""

import os
from typing import Iterator, List

import pytest
import torch

from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.train.config import load_config
from recsys_llm.train.distributed import teardown_distributed
from recsys_llm.train.runner import run_training
from recsys_llm.train.trained_run import run_evaluation

CONFIG = os.path.join(os.path.dirname(__file__), "..", "..", "configs", "synthetic_deepfm.yaml")


@pytest.fixture
def float64_default() -> Iterator[None]:
    """torch's default dtype as a scientific notebook sets it; torch's own default again after the test."""
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def _overrides(schema: str, run_dir: str) -> List[str]:
    return [f"data.schema={schema}", "data.batch_size=256", "data.eval_batch_size=512", "data.synthetic_rows=0",
            "train.epochs=1", "train.progress=false", "train.device=cpu", f"train.run_dir={run_dir}",
            "model.mlp_layer_sizes=[16]", "model.embedding_dim=4"]


def test_a_run_and_its_evaluation_in_a_float64_program_train_in_float32_and_keep_its_default(
        tmp_path, float64_default: None) -> None:
    """Called directly (a notebook cell), the run built float64 dense layers beside float32 tables and failed in
    its first step ("addmv input tensors must have the same dtype"), as its evaluation did; ``recsys_llm.cli.main``
    already ran its commands in float32."""
    generate_synthetic(str(tmp_path / "data"), 1_500, seed=0, rows_per_group=512)
    config = load_config(CONFIG, _overrides(str(tmp_path / "data" / "schema.json"), str(tmp_path / "run")))
    try:
        results = run_training(config)
        assert torch.get_default_dtype() == torch.float64  # the caller's, back
        metrics = run_evaluation(config, str(tmp_path / "run"))
        assert torch.get_default_dtype() == torch.float64
    finally:
        teardown_distributed()
    assert metrics["auc"] == results["test"]["auc"]
