"""The CUDA path: NCCL, FBGEMM's GPU kernels and fused optimizers; skipped where no GPU is visible.

The bodies are the CPU tests' own, run on ``cuda`` with one rank (NCCL refuses two ranks on
one GPU, so a one-GPU machine runs a one-rank NCCL group) in a spawned process (a process
forked after fbgemm-gpu's CUDA build was imported cannot initialise CUDA):

* planner + DMP shard the tables onto the GPU, the fused TBE kernels train them, a frozen
  table stays unchanged and holds no optimizer state, and every sharded EBC is pipelined;
* ``train.mixed_precision=bf16``: the training forwards under CUDA autocast, the weights and evaluation float32;
* ``evaluate(pipelined=True)`` (``train.pipelined_eval=auto`` on CUDA) gives the plain loop's metrics;
* every method mode of ``recsys-llm train`` (LLaCTR, the ELEC gain network, the joint,
  frozen-teacher, offline and swapped-pair students) killed mid-epoch resumes to the
  uninterrupted run, weights bit for bit.

Run them on a GPU host with ``python -m pytest tests/train/test_cuda.py``.
"""

from typing import Any, Dict

import pytest
import torch

from tests.multiprocess import run_multiprocess
from tests.train.test_eval_forwards import _both_ways, _check_identical
from tests.train.test_mixed_precision import _one_epoch, check_autocast_in_training_only
from tests.train.test_method_resume import MODES, _all_modes, check_resumed_like_straight
from tests.train.test_train_sharding import _shard_and_train, check_rank_trained_and_froze

pytestmark = [pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU"), pytest.mark.multiprocess]


def test_nccl_shards_trains_and_freezes_tables_on_the_gpu(synthetic_dir: str) -> None:
    frozen = "t_item_category"
    (result,) = run_multiprocess(_shard_and_train, world_size=1, schema_path=synthetic_dir, model_name="deepfm",
                                 frozen=[frozen], steps=4, device="cuda", start_method="spawn")
    assert result["backend"] == "nccl"
    assert all(result["local"].values())  # one rank holds every table
    assert all(kernel == "fused" for _, kernel in result["placements"].values()), result["placements"]
    check_rank_trained_and_froze(result, frozen, steps=4)
    assert {"t_user_id", "t_item_id"} <= {t for t, changed in result["changed"].items() if changed}


def test_bf16_autocast_trains_on_the_gpu(synthetic_dir: str) -> None:
    (bf16,) = run_multiprocess(_one_epoch, world_size=1, schema_dir=synthetic_dir, dtype=torch.bfloat16,
                               device="cuda", start_method="spawn")
    (fp32,) = run_multiprocess(_one_epoch, world_size=1, schema_dir=synthetic_dir, dtype=None, device="cuda",
                               start_method="spawn")
    check_autocast_in_training_only(bf16, fp32)


def test_pipelined_evaluation_gives_the_plain_loops_metrics_on_the_gpu(synthetic_dir: str) -> None:
    """The CUDA default (train.pipelined_eval=auto): EvalPipelineSparseDist's copy stream and loading thread."""
    results = run_multiprocess(_both_ways, world_size=1, schema_path=synthetic_dir, split="valid", batch_size=7,
                               device="cuda", start_method="spawn")
    _check_identical(results)


@pytest.fixture(scope="module")
def trained_modes_on_cuda(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, Any]:
    (results,) = run_multiprocess(_all_modes, world_size=1, work=str(tmp_path_factory.mktemp("cuda_modes")),
                                  device="cuda", start_method="spawn")
    return results


@pytest.mark.parametrize("mode", MODES)
def test_a_method_run_killed_mid_epoch_resumes_exactly_on_the_gpu(trained_modes_on_cuda: Dict[str, Any],
                                                                  mode: str) -> None:
    check_resumed_like_straight(trained_modes_on_cuda[mode], mode)


def test_fie_pair_weights_are_float32_under_cuda_autocast() -> None:
    """CUDA's autocast casts addmv to bf16 (CPU's does not): FIE's pair weights are computed outside it, so a bf16
    training forward weighs the field pairs as the float32 evaluation does."""
    from recsys_llm.modules.field_interaction import _semantic_pair_matrix

    torch.manual_seed(0)
    num_keys, num_pairs = 9, 36
    fields = torch.randn(4, num_keys, 16, device="cuda")  # (B, K, D)
    similarity, bias = torch.rand(num_pairs, device="cuda"), torch.randn(num_pairs, device="cuda")
    weight = torch.randn(num_pairs, num_pairs, device="cuda")
    rows, cols = torch.triu_indices(num_keys, num_keys, offset=1, device="cuda")
    flat_pairs = rows * num_keys + cols
    expected = _semantic_pair_matrix(fields, similarity, weight, bias, flat_pairs, 0.1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        under_autocast = _semantic_pair_matrix(fields, similarity, weight, bias, flat_pairs, 0.1)
    torch.testing.assert_close(under_autocast, expected, rtol=0, atol=0)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_a_semantics_command_makes_its_gpu_the_current_device() -> None:
    """A kernel that uses the current device, not its tensors', would otherwise open a context on GPU 0 beside
    each rank's own (semantics export under torchrun)."""
    from recsys_llm.cli.semantics import process_device

    previous = torch.cuda.current_device()
    try:
        assert process_device("cuda:1") == torch.device("cuda", 1)
        assert torch.cuda.current_device() == 1
    finally:
        torch.cuda.set_device(previous)
