"""``shard_model`` called again and again in one process (``evaluate`` / ``train`` from a Python loop, a daily job)
leaves nothing of the models it built behind: torch's ``_apply_optimizer_in_backward`` keeps each table parameter
it is given in module-level maps whose values (the parameter's ``AccumulateGrad`` node, the hook) hold the parameter,
so every build kept its unsharded tables and their optimizers for the life of the process."""

import gc
import os
import weakref
from typing import Any, Dict, List

import pytest
import torch
from torch.distributed.optim import apply_optimizer_in_backward as in_backward

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.train.distributed import init_distributed
from recsys_llm.train.sharding import shard_model
from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
from tests.multiprocess import run_multiprocess


def _builds(schema_dir: str, times: int) -> Dict[str, Any]:
    schema = DatasetSchema.load(os.path.join(schema_dir, "schema.json"))
    ctx = init_distributed("cpu")
    registered: List[int] = []
    unsharded: List[weakref.ref] = []
    for _ in range(times):
        task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("meta")))
        unsharded.extend(weakref.ref(p) for name, p in task.named_parameters() if "embedding_bags" in name)
        model, _ = shard_model(task, ctx.device, ctx.world_size, ShardingConfig(), OptimizerConfig(), batch_size=64)
        del task, model
        gc.collect()
        registered.append(len(in_backward.param_to_acc_grad_map) + len(in_backward.param_to_optim_hook_handle_map))
    return {"registered": registered, "tables": len(unsharded), "alive": sum(ref() is not None for ref in unsharded)}


@pytest.mark.multiprocess
def test_sharding_again_and_again_keeps_no_unsharded_table(synthetic_dir: str) -> None:
    (out,) = run_multiprocess(_builds, world_size=1, schema_dir=synthetic_dir, times=3)
    assert out["tables"] > 0
    assert out["alive"] == 0  # every build's unsharded table parameters were freed
    assert out["registered"] == [out["registered"][0]] * 3  # torch's registry does not grow build after build
