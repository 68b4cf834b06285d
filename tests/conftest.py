import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

SHARED_DATA = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
ML100K_DIR = os.path.abspath(os.path.join(SHARED_DATA, "ml-100k"))


@pytest.fixture(scope="session")
def ml100k_raw_dir() -> str:
    """Raw RecBole-format ML-100K from ../shared; skips when it is absent (licence: never committed)."""
    if not os.path.exists(os.path.join(ML100K_DIR, "ml-100k.inter")):
        pytest.skip(f"MovieLens-100K not found at {ML100K_DIR}")
    return ML100K_DIR


@pytest.fixture(autouse=True)
def no_flushed_subnormals_after_a_test():
    """``run_training`` and the benchmarks' ``parse_args`` flush subnormal floats for the whole
    process (``train.flush_denormal``); each test starts with torch's default."""
    yield
    torch.set_flush_denormal(False)
