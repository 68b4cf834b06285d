"""Checks whose memory must not grow with the size of what they check: an artifact's tables (``require_finite``, which
``ServedModel.load`` runs on every weight) and a vocabulary's digest (``DatasetSchema.vocabulary_records``, which
``train``, ``export``, ``score`` and resumes run). Measured by what each step touches, not by time."""

import hashlib
import tracemalloc

import numpy as np
import pyarrow as pa
import pytest
import torch

import recsys_llm.data.schema as schema_module
import recsys_llm.serving.state as state_module
from recsys_llm.serving.state import require_finite


def test_require_finite_checks_a_table_a_chunk_at_a_time(monkeypatch) -> None:
    """torch.isfinite holds an abs() copy and bool masks of all it is given (1.7x a float32 table: a 10^7-row table
    loaded at 2.5x its bytes), so the check sees a chunk at a time, and still names the first bad value and counts
    them all."""
    monkeypatch.setattr(state_module, "FINITE_CHECK_CHUNK", 8)
    seen = []
    check = state_module.first_non_finite_row
    monkeypatch.setattr(state_module, "first_non_finite_row", lambda values: seen.append(values.numel()) or check(values))
    table = torch.zeros(10, 5)
    assert require_finite("model.safetensors", "tables.t", table) is table
    assert max(seen) == 8 and sum(seen) == 50
    table.view(-1)[[13, 30, 31]] = torch.tensor([float("inf"), float("nan"), float("-inf")])
    with pytest.raises(ValueError, match=r"'tables\.t' holds 3 non-finite value\(s\) \(first: inf at flat index 13\)"):
        require_finite("model.safetensors", "tables.t", table)


def _digest_of_all_rows(table: pa.Table, count: int) -> str:
    """The digest as it was computed before it read a chunk at a time (digests recorded by runs must not change)."""
    digest = hashlib.sha256()
    head = table.slice(0, count)
    for value_id, text in zip(head.column("id").to_pylist(), head.column("text").to_pylist()):
        digest.update(f"{value_id}\t{text}\n".encode("utf-8", "surrogatepass"))
    return digest.hexdigest()[:16]


def test_a_vocabulary_digest_holds_one_chunk_of_python_values(monkeypatch) -> None:
    """The digest of 100k values makes Python strings of 1,000 at a time (all at once: about 230 bytes a value,
    2.3 GB for 10^7), and is the digest of all rows at once, for any count."""
    values = 100_000
    table = pa.table({"id": pa.array(np.arange(values, dtype=np.int64)),
                      "text": pa.array([f"value number {i}" for i in range(values)])})
    monkeypatch.setattr(schema_module, "VOCABULARY_DIGEST_ROWS", 1000)
    tracemalloc.start()
    try:
        digest = schema_module._vocabulary_digest(table, values)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 1_000_000, peak  # all at once: about 10 MB of Python objects
    assert digest == _digest_of_all_rows(table, values)
    for count in (0, 1, 999, 1000, 1001, 54_321, values + 5):
        assert schema_module._vocabulary_digest(table, count) == _digest_of_all_rows(table, count), count
