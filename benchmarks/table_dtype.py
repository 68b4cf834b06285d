"""Training with FP16 tables (``model.embedding_dtype=fp16``) vs FP32 tables: samples/s and table memory.

Two copies of the project's stack train the same model side by side in one process, in interleaved
rounds (as in ``train_throughput.py``): torchrec's ``DLRM_DCN`` (26 tables x 100k rows x 16, batch
4096, fused RowWiseAdagrad for the tables, Adam for the dense part, ``TrainPipelineSparseDist``,
``DistributedModelParallel`` over 1 rank), built by ``build_task`` / ``shard_model`` /
``build_optimizer`` and trained by ``recsys_llm.train.pipeline.train_epoch`` on the same prebuilt
batches; one with FP32 tables, one with FP16 tables.

Figures (top level of the JSON):

* ``ratio_fp16_vs_fp32_tables``: samples/s of the FP16 tables' run / the FP32 tables' run (best rounds);
* ``table_bytes_ratio_fp16_vs_fp32``: bytes of the sharded tables' weights, FP16 / FP32 (the
  optimizer state, float32 in both, is in ``details``).

FP16 tables halve the weights' memory; FBGEMM converts each row it reads and writes, which the
ratio of samples/s shows (on CPU that conversion costs time; on CUDA it is expected to be near free).

Usage::

    python benchmarks/table_dtype.py [--quick|--smoke] [--json PATH] [--plot PATH]
"""

import dataclasses
import itertools
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RATIO_METHOD,
    best_of_rounds_ratio,
    device_synchronize,
    interleaved_repeats,
    median,
    parse_args,
    print_summary,
    ratio_bars,
    result_payload,
    single_rank_context,
    two_panel_figure,
    value_bars,
    write_json,
)
from benchmarks.train_throughput import (  # noqa: E402
    LEARNING_RATES,
    SIZES,
    ProjectLoop,
    build_project_model,
    make_batches,
    make_schema,
)

NAME = "table_dtype"
DTYPES = ("fp32", "fp16")


def table_bytes(model: Any) -> Dict[str, int]:
    """Bytes of this rank's sharded table weights and of their optimizer state.

    Args:
        model: the DMP-wrapped task.

    Returns:
        Dict[str, int]: ``{"weights": ..., "optimizer_state": ...}``.
    """
    from recsys_llm.train.sharding import embedding_kernels

    weights = state = 0
    for _, kernel in embedding_kernels(model):
        weights += sum(w.numel() * w.element_size() for w in kernel.split_embedding_weights())
        for per_table in kernel.emb_module.split_optimizer_states():
            state += sum(s.numel() * s.element_size() for s in per_table)
    return {"weights": weights, "optimizer_state": state}


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(NAME, __doc__, argv)
    sizes = SIZES[args.mode]

    import torch

    from recsys_llm.train.distributed import teardown_distributed

    context = single_rank_context(args)
    device = context.device
    synchronize = device_synchronize(device)
    schema = make_schema(sizes)
    batches = make_batches(schema, sizes, args.seed, pin_memory=device.type == "cuda")

    loops, memory = {}, {}
    for dtype in DTYPES:
        torch.manual_seed(args.seed)
        model, optimizer = build_project_model(schema, sizes, device, LEARNING_RATES, embedding_dtype=dtype)
        memory[dtype] = table_bytes(model)
        loops[f"{dtype}_tables"] = ProjectLoop(model, optimizer, device, itertools.cycle(batches), sizes, synchronize)
    rounds = interleaved_repeats(loops, sizes.repeats)

    medians = {name: median(values) for name, values in rounds.items()}
    payload = result_payload(
        args,
        {"ratio_fp16_vs_fp32_tables": best_of_rounds_ratio(rounds["fp16_tables"], rounds["fp32_tables"]),
         "table_bytes_ratio_fp16_vs_fp32": memory["fp16"]["weights"] / memory["fp32"]["weights"]},
        details={
            "samples_per_second_median": medians,
            "samples_per_second_rounds": rounds,
            "table_bytes": memory,
            "ratio_method": RATIO_METHOD,
            "sizes": dataclasses.asdict(sizes),
            "model": "torchrec DLRM_DCN, fused RowWiseAdagrad (tables) + Adam (dense), TrainPipelineSparseDist, "
                     "DMP 1 rank; model.embedding_dtype fp32 vs fp16",
        },
        table=[{"tables": name, "samples/s (median)": round(medians[name], 1),
                "table weights (MB)": round(memory[name.split("_")[0]]["weights"] / 2**20, 2)} for name in medians],
    )
    write_json(args.json, payload)
    two_panel_figure(
        args.plot,
        lambda left: value_bars(
            left, medians, ylabel="samples/s: median, bars min-max of rounds",
            title=f"DLRM_DCN {sizes.num_tables}x{sizes.rows_per_table}x{sizes.embedding_dim}, batch "
                  f"{sizes.batch_size}; {device.type}, {args.mode}",
            errors={name: (min(values), max(values)) for name, values in rounds.items()}),
        lambda right: ratio_bars(right, {"samples/s\nfp16 vs fp32": payload["ratio_fp16_vs_fp32_tables"],
                                         "table bytes\nfp16 vs fp32": payload["table_bytes_ratio_fp16_vs_fp32"]},
                                 {}, "FP16 tables / FP32 tables"),
    )
    print_summary(NAME, payload)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    main()
