"""``model.embedding_dtype=fp16``: the backbone's tables train, checkpoint, resume and serve as FP16 tables.

FBGEMM's fused CPU kernels take FP16 weights with float32 optimizer state and give float32 pooled
embeddings; replicated (``data_parallel``) FP16 tables are never planned (a torch optimizer stepped
them in float16 into NaN).
"""

import json
import os
from typing import Any, Dict, List

import pytest
import torch
from torch.distributed.checkpoint import FileSystemReader
from torchrec.modules.embedding_configs import DataType

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.checkpoint import CheckpointManager
from recsys_llm.train.config import ConfigError, load_config
from recsys_llm.train.planner_inputs import build_constraints
from recsys_llm.train.run_records import read_metrics
from recsys_llm.train.runner import run_training
from recsys_llm.train.sharding_config import ShardingConfig
from tests.multiprocess import run_multiprocess

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DEEPFM_CONFIG = os.path.join(REPO, "configs", "synthetic_deepfm.yaml")


def _overrides(schema_dir: str, run_dir: str, dtype: str, extra: List[str] = ()) -> List[str]:
    return [f"data.schema={schema_dir}", "data.batch_size=256", "data.eval_batch_size=1024", "data.synthetic_rows=0",
            "train.epochs=2", "train.patience=0", "train.progress=false", "train.device=cpu",
            f"train.run_dir={run_dir}", f"model.embedding_dtype={dtype}", *extra]


def _table_dtypes(checkpoint: str) -> Dict[str, torch.dtype]:
    """Checkpoint key -> dtype of the backbone's table weights and their optimizer state."""
    metadata = FileSystemReader(checkpoint).read_metadata().state_dict_metadata
    return {key: value.properties.dtype for key, value in metadata.items()
            if "embedding_bags" in key and hasattr(value, "properties")}


def test_embedding_dtype_sets_the_tables_data_type(synthetic_schema: DatasetSchema) -> None:
    for name in ("deepfm", "dlrm"):
        backbone = build_backbone(ModelConfig(name=name, embedding_dtype="fp16", dense_arch_hidden=(16,)),
                                  synthetic_schema, device=torch.device("cpu"))
        configs = backbone.embedding_bag_collection.embedding_bag_configs()
        assert {c.data_type for c in configs} == {DataType.FP16}
        assert {p.dtype for p in backbone.embedding_bag_collection.parameters()} == {torch.float16}
    with pytest.raises(ValueError, match=r"model.embedding_dtype: expected one of \['fp32', 'fp16'\], got 'bf16'"):
        ModelConfig(name="deepfm", embedding_dtype="bf16")


def test_an_unsharded_backbone_of_fp16_tables_computes_its_dense_part_in_float32(synthetic_dir: str,
                                                                               synthetic_schema: DatasetSchema) -> None:
    """Unsharded (as export and evaluation run it), torchrec's EBC gives the float32 sums of float16 rows: the
    dense part computes in float32 as under DMP, whose FBGEMM kernels give float32 too."""
    torch.manual_seed(0)
    backbone = build_backbone(ModelConfig(name="deepfm", embedding_dtype="fp16"), synthetic_schema,
                              device=torch.device("cpu")).eval()
    batch = next(iter(ParquetBatchReader(synthetic_schema, "test", 8)))
    with torch.no_grad():
        output = backbone(batch.dense_features, batch.sparse_features)
    assert output.logits.dtype == torch.float32 and output.embeddings.values().dtype == torch.float32
    assert torch.isfinite(output.logits).all()


def test_fp16_tables_are_never_replicated(synthetic_schema: DatasetSchema) -> None:
    task = CTRTask(build_backbone(ModelConfig(name="deepfm", embedding_dtype="fp16"), synthetic_schema))
    constraints = build_constraints(task, ShardingConfig())
    assert constraints and all("data_parallel" not in c.sharding_types for c in constraints.values())
    with pytest.raises(ValueError, match=r"sharding.sharding_types allows only data_parallel for 't_user_id', a table of "
                                         r"FP16 weights \(model.embedding_dtype\)"):
        build_constraints(task, ShardingConfig(sharding_types=["data_parallel"]))
    fp32 = CTRTask(build_backbone(ModelConfig(name="deepfm"), synthetic_schema))
    assert build_constraints(fp32, ShardingConfig()) == {}  # fp32 tables: the planner's choice, as before


def _train_export_and_resume(schema_dir: str, root: str) -> Dict[str, Any]:
    from recsys_llm.cli.export import export_run
    from recsys_llm.serving import ServedModel
    from recsys_llm.train.trained_run import load_trained_model, open_trained_run

    run_dir, out = os.path.join(root, "run"), os.path.join(root, "export")
    config = load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, "fp16"))
    results = run_training(config)
    losses = [r["mean_loss"] for r in read_metrics(run_dir) if r.get("event") == "epoch"]
    dtypes = _table_dtypes(CheckpointManager(os.path.join(run_dir, "checkpoints")).latest())
    export_run(config, run_dir, out)
    with open(os.path.join(out, "tables.json"), encoding="utf-8") as handle:
        tables = json.load(handle)
    served = ServedModel.load(out, trust_program=True)
    batch = next(iter(ParquetBatchReader(DatasetSchema.load(os.path.join(schema_dir, "schema.json")), "test", 64)))
    trained = load_trained_model(config, open_trained_run(config, run_dir)).eval()
    with torch.no_grad():
        served_logits = served.logits(batch.dense_features, batch.sparse_features)
        trained_logits = trained.module.predict(batch).logits
    try:  # the same run directory in float32 tables: refused, naming the setting
        run_training(load_config(DEEPFM_CONFIG, _overrides(schema_dir, run_dir, "fp32", ["train.epochs=3"])))
        refusal = ""
    except ConfigError as error:
        refusal = str(error)
    return {"test_auc": results["test"]["auc"], "losses": losses, "dtypes": dtypes,
            "tables": [t["data_type"] for t in tables], "served_dtypes": {p.dtype for p in served.parameters()},
            "served": served_logits, "trained": trained_logits, "refusal": refusal}


@pytest.mark.multiprocess
def test_fp16_tables_train_checkpoint_serve_and_refuse_a_resume_in_fp32(synthetic_dir: str, tmp_path) -> None:
    (out,) = run_multiprocess(_train_export_and_resume, world_size=1, schema_dir=synthetic_dir, root=str(tmp_path))
    assert out["losses"][1] < out["losses"][0] - 0.05, out["losses"]
    assert out["test_auc"] > 0.55
    weights = {key: dtype for key, dtype in out["dtypes"].items() if key.endswith(".weight")}
    assert weights and set(weights.values()) == {torch.float16}, out["dtypes"]
    state = {key: dtype for key, dtype in out["dtypes"].items() if key not in weights}  # row-wise Adagrad's momentum
    assert state and set(state.values()) == {torch.float32}, out["dtypes"]
    assert set(out["tables"]) == {"FP16"} and torch.float16 in out["served_dtypes"]
    # served: an unsharded EBC that pools in float16; trained: FBGEMM's kernels sum the float16 rows in float32
    torch.testing.assert_close(out["served"], out["trained"], atol=2e-3, rtol=0)
    assert "model.embedding_dtype: 'fp16' -> 'fp32'" in out["refusal"], out["refusal"]


@pytest.mark.multiprocess
def test_two_ranks_train_fp16_tables_sharded_over_both(synthetic_dir: str, tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    overrides = _overrides(synthetic_dir, run_dir, "fp16", ["train.epochs=1", "train.max_steps=12"])
    run_multiprocess(_train, world_size=2, overrides=overrides)
    with open(os.path.join(run_dir, "sharding_plan.json"), encoding="utf-8") as handle:
        plan = json.load(handle)
    assert {rank for placement in plan.values() for rank in placement["ranks"]} == {0, 1}
    assert "data_parallel" not in {placement["sharding_type"] for placement in plan.values()}
    dtypes = _table_dtypes(CheckpointManager(os.path.join(run_dir, "checkpoints")).latest())
    assert {dtype for key, dtype in dtypes.items() if key.endswith(".weight")} == {torch.float16}
    losses = [r["mean_loss"] for r in read_metrics(run_dir) if r.get("event") == "epoch"]
    assert losses and all(loss == loss and loss < 0.7 for loss in losses), losses


def _train(overrides: List[str]) -> float:
    return float(run_training(load_config(DEEPFM_CONFIG, overrides))["test"]["auc"])
