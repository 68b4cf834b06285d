"""A small DeepFM trained a few steps on a prepared data set and exported, for the tests that score artifacts; and
the rewrite of an artifact's ``config.json`` that tests of its checks make."""

import json
import os
from typing import Any, Dict

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.elec import build_student
from recsys_llm.file_hash import file_sha256
from recsys_llm.serving import export_task
from recsys_llm.serving.artifact import CONFIG_DIGEST_KEY, DIGESTS_KEY, STATE_FILE, config_digest


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
    export_task(task, artifact, example.dense_features, example.sparse_features, schema=schema)
    return task


def write_config_as_exported(path: str, config: Dict[str, Any], **dump_options: Any) -> None:
    """Writes an artifact's ``config.json`` (``path``) holding ``config``, with the ``config_sha256`` an export of these
    keys writes (where it has one): a test of what ``ServedModel.load`` says of some keys reaches that check, not the
    digest's."""
    if CONFIG_DIGEST_KEY in config:
        config = {**config, CONFIG_DIGEST_KEY: config_digest(config)}
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(config, handle, **dump_options)


def as_exported_before_config_digests(directory: str) -> Dict[str, Any]:
    """Makes the artifact in ``directory`` look written before 2026-12-06: no ``config_sha256`` in its ``config.json``
    and no flag of one in its state file's metadata (the file's digest follows). Returns the config written."""
    state_path = os.path.join(directory, STATE_FILE)
    with safe_open(state_path, framework="pt") as handle:
        state = {key: handle.get_tensor(key) for key in handle.keys()}
        metadata = {key: value for key, value in (handle.metadata() or {}).items() if key != CONFIG_DIGEST_KEY}
    save_file(state, state_path, metadata=metadata)
    config_path = os.path.join(directory, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    del config[CONFIG_DIGEST_KEY]
    if STATE_FILE in config.get(DIGESTS_KEY, {}):
        config[DIGESTS_KEY][STATE_FILE] = file_sha256(state_path)
    write_config_as_exported(config_path, config)
    return config
