"""The offline LLM jobs both plug-in examples start from, one ``recsys-llm`` command each.

Embedded synthetic data (``prepare synthetic``); ELEC's CTR-adapted LLM (``semantics adapt``,
heads tuned on a sample of rows) and its item vectors joined to every split as the column
``llm_vector`` (``semantics export --attach-dir``); LLaCTR's field vectors (``semantics
encode``). The default LLM is the offline all-MiniLM-L6-v2; ``llm`` takes any local Hugging
Face model. Rank 0 runs them once per work directory, ``rows`` and ``llm`` (each pair gets its
own subdirectory, ``rows<N>-llm<hash of the path>``); later runs with the same ones reuse them.
"""

import hashlib
import os
from typing import Optional

import torch.distributed as dist

from recsys_llm.cli import main as recsys_llm

LLM_DIM = 32  # width of ELEC's vector r


def prepare(work: str, rows: int, llm: Optional[str]) -> None:
    """The offline LLM jobs, each one ``recsys-llm`` shell command; a job that fails (its error
    printed) stops the script there, as ``set -e`` would."""
    data, ctr_llm, model = f"{work}/data", f"{work}/ctr_llm", ["--model", llm] if llm else []
    jobs = [["prepare", "synthetic", "--out", data, "--rows", str(rows), "--quiet"],
            ["semantics", "adapt", "--schema", data, "--output-dir", ctr_llm, "--tuning", "heads",
             "--sample-rows", "512", "--fields", "item_id", "item_category", "--representation-dim", str(LLM_DIM), *model],
            # Item vectors joined to the splits: one chunk holds every item the generator makes (at most 500,000), so
            # rank 0 writes them all alone under torchrun too (a chunk of rank 1's would never come).
            ["semantics", "export", "--schema", data, "--llm", ctr_llm, "--output-dir", f"{work}/vectors", "--granularity",
             "entity", "--entity-field", "item_id", "--chunk-rows", "500000", "--attach-dir", f"{work}/data_llm"],
            # LLaCTR's field vectors, made for the schema training reads (the copy with llm_vector).
            ["semantics", "encode", "--schema", f"{work}/data_llm", "--output", f"{work}/fields.safetensors", *model]]
    for job in jobs:
        if recsys_llm(job) != 0:
            raise SystemExit(f"offline LLM job `recsys-llm {' '.join(job[:2])}` failed (its error is above)")


def offline_outputs(work_dir: str, rows: int, llm: Optional[str], rank: int) -> str:
    """The directory of the jobs' outputs for ``rows`` and ``llm``, made by rank 0 when missing.

    Collective: every rank waits until they exist. Outputs made with other ``rows`` or another
    ``llm`` are never reused (an ``llm`` named relative or absolute is the same model).
    """
    digest = hashlib.sha256(str(llm and os.path.abspath(llm)).encode()).hexdigest()[:8]
    outputs = f"{work_dir}/rows{rows}-llm{digest}"
    if rank == 0 and not os.path.exists(f"{outputs}/fields.safetensors"):  # the last job's output
        prepare(outputs, rows, llm)
    dist.barrier()
    return outputs
