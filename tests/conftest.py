import faulthandler
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


@pytest.fixture
def ends_the_run_if_it_waits():
    """For a test of a named pipe (FIFO) in place of a file: a read of it that a broken check lets through waits for
    a writer for good, and pytest has no timeout here; after 120 s the run ends, printing every thread's traceback
    (exit code 1), instead of hanging CI."""
    faulthandler.dump_traceback_later(120, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


@pytest.fixture(autouse=True)
def no_flushed_subnormals_after_a_test():
    """``run_training`` and the benchmarks' ``parse_args`` flush subnormal floats for the whole
    process (``train.flush_denormal``); each test starts with torch's default."""
    yield
    torch.set_flush_denormal(False)


@pytest.fixture(autouse=True)
def no_process_group_left_after_a_test():
    """An in-process ``run_training`` (``init_distributed``) leaves its 1-rank gloo group and ``LOCAL_WORLD_SIZE``
    in the process, even when it refuses the config; each test starts without them (a test asserting that no
    group was made, e.g. tests/train/test_distributed.py, failed after such a test in another order)."""
    import torch.distributed as dist

    had_group = dist.is_available() and dist.is_initialized()
    local_world_size = os.environ.get("LOCAL_WORLD_SIZE")
    yield
    if not had_group and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if local_world_size is None:
        os.environ.pop("LOCAL_WORLD_SIZE", None)
    else:
        os.environ["LOCAL_WORLD_SIZE"] = local_world_size
