"""A small DeepFM trained a few steps on a prepared data set and exported, for the tests that score artifacts."""

import torch

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.elec import build_student
from recsys_llm.serving import export_task


def export_small_deepfm(schema: DatasetSchema, artifact: str, batch_size: int, steps: int) -> CTRTask:
    """Trains the registry's smoke DeepFM of ``schema`` (seed 0, Adam) on ``steps`` train batches of ``batch_size``
    rows, exports it into ``artifact`` and returns it in eval mode."""
    torch.manual_seed(0)
    task = build_student(schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    optimizer = torch.optim.Adam(task.parameters(), lr=0.01)
    for batch in list(ParquetBatchReader(schema, "train", batch_size))[:steps]:
        loss, _ = task(batch)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.eval()
    example = next(iter(ParquetBatchReader(schema, "train", 8)))
    export_task(task, artifact, example.dense_features, example.sparse_features, {}, schema)
    return task
