"""The id ways of the training data, inside an export artifact: a serving process that receives raw values
(``"Paris"``, a search query) turns them into the ids the model was trained on from the artifact alone,
without the prepared data directory (whose splits it does not need).

``export`` writes ``ids/schema.json`` (the training data's schema without its splits: its fields, ``ids`` and
row key) and ``ids/text/<field>.parquet`` for each vocabulary field; ``ServedModel.raw_value_ids`` reads them
through :func:`~recsys_llm.data.tabular.raw_values.raw_value_ids`::

    served = ServedModel.load("exports/shop", trust_program=True)
    city_ids, _ = served.raw_value_ids("city", ["Paris", "Berlin", None])   # (3,) int64
"""

import dataclasses
import os
import shutil
from typing import List, Optional

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.tabular.convert import value_text_file
from recsys_llm.serving.artifact import RAW_IDS_DIR

RAW_IDS_KEY = "raw_ids"  # config.json: the artifact's directory of the training data's id ways (RAW_IDS_DIR)


def write_raw_id_ways(schema: DatasetSchema, artifact_dir: str) -> List[str]:
    """Writes ``schema``'s id ways into ``artifact_dir/ids`` when it records them (data prepared by ``prepare
    tabular``); returns the files written, relative to ``artifact_dir`` (none for data of the other sources,
    whose ids :mod:`~recsys_llm.serving.served_model`'s docs describe)."""
    if not schema.ids:
        return []
    out = os.path.join(artifact_dir, RAW_IDS_DIR)
    os.makedirs(out, exist_ok=True)  # also without a vocabulary field (integer or hashed ids only)
    fields, written = [], []
    for spec in schema.fields:
        vocabulary = schema.ids.get(spec.name) == "vocabulary" and schema.value_text_path(spec.name) is not None
        target = value_text_file(spec.name) if vocabulary else None
        if target is not None:
            os.makedirs(os.path.dirname(os.path.join(out, target)), exist_ok=True)
            shutil.copyfile(schema.value_text_path(spec.name), os.path.join(out, target))
            written.append(f"{RAW_IDS_DIR}/{target}")
        fields.append(dataclasses.replace(spec, value_text=target))
    dataclasses.replace(schema, fields=fields, splits={}, extra_columns=[], root=out).save(
        os.path.join(out, "schema.json"))
    return [*written, f"{RAW_IDS_DIR}/schema.json"]


def load_raw_id_ways(artifact_dir: str, recorded: Optional[str]) -> Optional[DatasetSchema]:
    """The id ways an artifact holds (``recorded``: its ``config.json``'s ``raw_ids``), or None without them."""
    return DatasetSchema.load(os.path.join(artifact_dir, recorded)) if recorded else None
