"""A program that runs the project's jobs in its own long-lived process (a notebook, a search loop, a script
calling ``recsys_llm.cli.main`` several times) keeps its own state: random streams, float mode, default dtype,
environment, excepthook and process group."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r"""
import os, random, sys
import numpy as np
import torch
import torch.distributed as dist

from recsys_llm.cli import main
from recsys_llm.train.config import load_config
from recsys_llm.train.runner import run_training

work = sys.argv[1]
assert main(["prepare", "synthetic", "--out", f"{work}/data", "--rows", "3000", "--quiet"]) == 0
train = ["train", "--config", "recsys_llm/configs/synthetic_deepfm.yaml", f"data.schema={work}/data/schema.json",
         "train.epochs=1", "train.progress=false"]


def state():
    return {"random": random.random(), "numpy": float(np.random.rand()), "torch": float(torch.rand(1)),
            "subnormal": 1e-320 * 1.0 != 0.0, "dtype": str(torch.get_default_dtype()),
            "excepthook": sys.excepthook is sys.__excepthook__, "LOCAL_WORLD_SIZE": os.environ.get("LOCAL_WORLD_SIZE")}


def seeded():
    random.seed(7), np.random.seed(7), torch.manual_seed(7)


torch.set_default_dtype(torch.float64)  # a scientific notebook's
seeded()
before = state()
seeded()
assert main(train + [f"train.run_dir={work}/run1"]) == 0
after = state()
print("after main:", after == before, "" if after == before else f"{before} -> {after}")

store = dist.HashStore()
dist.init_process_group("gloo", store=store, rank=0, world_size=1)
own = dist.group.WORLD
assert main(train + [f"train.run_dir={work}/run2"]) == 0
print("own group kept by main:", dist.is_initialized() and dist.group.WORLD is own)
bad = load_config("recsys_llm/configs/synthetic_deepfm.yaml", [f"data.schema={work}/data/schema.json",
                                                                f"train.run_dir={work}/run3", "data.valid_split=/nope"])
try:
    run_training(bad)
except Exception:
    pass
print("own group kept by a failed run:", dist.is_initialized() and dist.group.WORLD is own)
dist.destroy_process_group()
try:
    run_training(bad)
except Exception:
    pass
print("no group left by a failed run:", not dist.is_initialized())

from recsys_llm.train.distributed import init_distributed, teardown_distributed

init_distributed("cpu")  # a program's group, started as the examples start theirs
started = dist.group.WORLD
assert main(train + [f"train.run_dir={work}/run4"]) == 0
assert main(train + [f"train.run_dir={work}/run5", "data.valid_split=/nope"]) == 2
try:
    run_training(bad)
except Exception:
    pass
print("a program's group kept by main:", dist.is_initialized() and dist.group.WORLD is started)
teardown_distributed()
print("and ended by its teardown:", not dist.is_initialized())
"""


def test_jobs_run_in_a_program_leave_its_state_as_it_was(tmp_path) -> None:
    """Found by a review of in-process use: ``train`` reseeded the caller's generators, left subnormals flushed for
    all of its float math and LOCAL_WORLD_SIZE set, could not run under a caller's float64 default dtype, and
    destroyed a process group the caller had made; a failed run_training left its own group behind."""
    env = {k: v for k, v in os.environ.items() if k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE",
                                                            "LOCAL_RANK", "LOCAL_WORLD_SIZE")}
    done = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    checks = [line for line in done.stdout.splitlines()
              if line.startswith(("after main:", "own group", "no group", "a program's", "and ended"))]
    assert checks == ["after main: True ", "own group kept by main: True", "own group kept by a failed run: True",
                      "no group left by a failed run: True", "a program's group kept by main: True",
                      "and ended by its teardown: True"]
