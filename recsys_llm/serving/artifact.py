"""File names, keys and format constants of a serving artifact (see :mod:`recsys_llm.serving`)."""

import hashlib
import json
from typing import Any, Mapping

import torch


FORMAT_VERSION = 1
STATE_FILE = "model.safetensors"
EXPORT_MARKER_FILES = ("config.json", STATE_FILE)  # every export has them (state-only ones too)
STATE_ONLY_PROGRAM = "none (state only)"  # config.json's dense_program of a `recsys-llm export --state-only`
SEMANTIC_TABLES_FILE = "semantic_tables.json"  # frozen entity-vector tables of a gain network
TABLES_FILE = "tables.json"
PROGRAM_FILE = "dense_program.pt2"
INFERENCE_FILE = "INFERENCE.md"
# every file an export (or a state-only export) writes: a re-export replaces these, and refuses a directory with others
RAW_IDS_DIR = "ids"  # an export of `prepare tabular` data: each field's raw value -> id (ServedModel.raw_value_ids)
EXPORT_FILES = ("config.json", STATE_FILE, TABLES_FILE, SEMANTIC_TABLES_FILE, PROGRAM_FILE, INFERENCE_FILE,
                RAW_IDS_DIR)
ID_RULES_KEY = "id_rules"  # config.json: per feature, hashed / max_length / single_id (None: not recorded)
EXPORT_ID_KEY = "export_id"  # ties an artifact's files together (absent from artifacts before 2026-12)
VERSIONS_KEY = "versions"  # config.json: torch, torchrec, fbgemm_gpu, recsys_llm that exported (absent before 2026-12)
VERSION_CHECKED = ("torch", "torchrec", "fbgemm_gpu")  # ServedModel.load warns when these differ
# config.json: the tables (and entity tables) pool per-id weights (is_weighted EBCs; absent: False)
WEIGHTED_KEY = "weighted"
# config.json: the tables' serving dtype, `export --table-dtype` ("trained", "int8", "int4"; absent before 2026-12:
# "trained")
TABLE_DTYPE_KEY = "table_dtype"
# config.json: the dense program's precision, `export --mixed-precision` ("fp32", or "bf16": captured under CPU
# bfloat16 autocast; absent before 2026-12-06: "fp32")
MIXED_PRECISION_KEY = "mixed_precision"
DENSE_NAMES_KEY = "dense_feature_names"  # config.json: the dense features in column order (absent from older artifacts)
DIGESTS_KEY = "sha256"  # config.json: file name -> SHA-256 of its bytes as exported (absent from older artifacts)
# config.json: the SHA-256 of its other keys (config_digest), and the state file's metadata key that says the export
# wrote one (both absent before 2026-12-06)
CONFIG_DIGEST_KEY = "config_sha256"
TABLES_PREFIX = "model.embedding_bag_collection."  # state-dict prefix of the backbone's tables (tables.json)
SEMANTIC_TABLES_PREFIX = "semantic_table.embedding_bag_collection."  # of a gain network's entity tables
DENSE_DTYPE = torch.float32  # the dense features' dtype in training (ParquetBatchReader) and in the program
FORBIDDEN_PARTS = ("teacher", "field_injection", "semantic_table", "llm", "repr_kd", "score_kd")


def config_digest(config: Mapping[str, Any]) -> str:
    """SHA-256 of ``config.json``'s keys other than :data:`CONFIG_DIGEST_KEY`, as canonical JSON (sorted keys, no
    spaces): the same for the dict written and the dict read back."""
    body = {key: value for key, value in config.items() if key != CONFIG_DIGEST_KEY}
    # as JSON reads it back: a non-string key (a metadata dict keyed by ints) is a string there, sorted as one
    body = json.loads(json.dumps(body))
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
