"""Every backbone trains on MovieLens-100K with its repository config (skips without ../shared/data)."""

import os
from typing import Any, Dict

import pytest

from recsys_llm.data.movielens import prepare_movielens
from recsys_llm.models.registry import MODEL_NAMES
from recsys_llm.train.config import load_config
from recsys_llm.train.runner import run_training
from tests.multiprocess import run_multiprocess

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "configs")


@pytest.fixture(scope="module")
def ml100k_schema(ml100k_raw_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("ml100k"))
    prepare_movielens(ml100k_raw_dir, out)
    return os.path.join(out, "schema.json")


def _train(backbone: str, schema: str, run_dir: str) -> Dict[str, Any]:
    path = os.path.join(CONFIGS, f"ml100k_{backbone}.yaml")
    if not os.path.exists(path):  # dlrm_dcn: torchrec's DLRM_DCN with the DLRM config
        path = os.path.join(CONFIGS, "ml100k_dlrm.yaml")
    config = load_config(path, [
        f"model.name={backbone}", f"data.schema={schema}", "train.epochs=1", "train.patience=0", "train.progress=false",
        "train.device=cpu", f"train.run_dir={run_dir}",
    ])
    return run_training(config)


@pytest.mark.multiprocess
@pytest.mark.parametrize("backbone", sorted(MODEL_NAMES))
def test_backbone_learns_ml100k_in_one_epoch(backbone: str, ml100k_schema: str, tmp_path) -> None:
    (result,) = run_multiprocess(_train, world_size=1, backbone=backbone, schema=ml100k_schema,
                                 run_dir=str(tmp_path / backbone))
    test = result["test"]
    assert test["num_samples"] > 7_000
    # The label base rate alone gives AUC 0.5 and NE 1.0; one epoch must do clearly better.
    assert test["auc"] > 0.70, test
    assert test["ne"] < 0.97, test
