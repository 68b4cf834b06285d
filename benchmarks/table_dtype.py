"""FP16 vs FP32 tables in training, INT8 and INT4 vs FP32 tables in serving: samples/s, table memory, artifact size.

Training: two copies of the project's stack train the same model side by side in one process, in
interleaved rounds (as in ``train_throughput.py``): torchrec's ``DLRM_DCN`` (26 tables x 100k rows x 16,
batch 4096, fused RowWiseAdagrad for the tables, Adam for the dense part, ``TrainPipelineSparseDist``,
``DistributedModelParallel`` over 1 rank), built by ``build_task`` / ``shard_model`` /
``build_optimizer`` and trained by ``recsys_llm.train.pipeline.train_epoch`` on the same prebuilt
batches; one with FP32 tables, one with FP16 tables.

Serving: the FP32-tables model, as trained by those rounds, is gathered unsharded
(``serving.unsharded_state_dict``) into the same task built on CPU and exported three times with
``serving.export_task``: ``table_dtype="trained"`` (FP32 tables, eager EBC), ``"int8"`` (rows
quantized to 8 bits with a float16 scale and bias, torchrec's quantized EBC; ``recsys-llm export
--table-dtype int8``) and ``"int4"`` (4 bits, two values a byte, the same way). The artifacts are loaded with
``ServedModel`` and ``ServedModel.logits`` is timed on CPU (where the exported artifacts serve, whatever
``--device`` trained) over the same prebuilt request batches (the training batches), in interleaved rounds.

Figures (top level of the JSON):

* ``ratio_fp16_vs_fp32_tables``: training samples/s of the FP16 tables' run / the FP32 tables' run (best rounds);
* ``table_bytes_ratio_fp16_vs_fp32``: bytes of the sharded tables' weights, FP16 / FP32 (the
  optimizer state, float32 in both, is in ``details``);
* ``serve_ratio_int8_vs_fp32_tables``: ``ServedModel.logits`` samples/s of the INT8 artifact / the FP32
  one (best rounds);
* ``artifact_bytes_ratio_int8_vs_fp32``: bytes of the artifacts' ``model.safetensors``, INT8 / FP32;
* ``serve_ratio_int4_vs_fp32_tables``, ``artifact_bytes_ratio_int4_vs_fp32``: the same for the INT4 artifact.

``details.serve`` holds the served tables' bytes in memory and their ratios to FP32's (``quantized_tables.table_bytes``:
FBGEMM pads each quantized row, D (INT8) or D / 2 (INT4) bytes + a 4-byte scale and bias, to its alignment of 16
bytes), the max and mean |logit difference| of each quantized served model and the FP32 one over the request batches
(``logit_abs_difference``: INT8's; ``logit_abs_difference_int4``), and the per-round samples/s and ratios
(``ratio_rounds``: INT8 / FP32; ``ratio_rounds_int4``).

FP16 tables halve the weights' memory; FBGEMM converts each row it reads and writes, which the
ratio of samples/s shows (on CPU that conversion costs time; on CUDA it is expected to be near free).
INT8 and INT4 serving tables cut the artifact and the tables' memory; on CPU the dequantizing lookup is not faster.

Usage::

    python benchmarks/table_dtype.py [--quick|--smoke] [--json PATH] [--plot PATH]
"""

import dataclasses
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RATIO_METHOD,
    best_of_rounds_ratio,
    cycling_step,
    device_synchronize,
    interleaved_repeats,
    median,
    parse_args,
    per_round_ratios,
    phase_round_bars,
    print_summary,
    ratio_bars,
    replot_json,
    result_payload,
    run_main,
    samples_per_second,
    single_rank_context,
    two_panel_figure,
    value_bars,
    write_result,
)
from benchmarks.train_throughput import (  # noqa: E402
    LEARNING_RATES,
    SIZES,
    ProjectLoop,
    Sizes,
    build_project_model,
    make_batches,
    make_schema,
    project_config,
)

NAME = "table_dtype"
DTYPES = ("fp32", "fp16")
# served contender -> export_task's keyword arguments (the baseline, "fp32", exports as trained)
SERVE_VARIANTS: Dict[str, Dict[str, str]] = {"fp32": {}, "int8": {"table_dtype": "int8"},
                                             "int4": {"table_dtype": "int4"}}


@dataclasses.dataclass(frozen=True)
class ServeSizes:
    """Serving measurement of one mode (the requests are the mode's prebuilt training batches, cycled).

    Args:
        warmup_steps (int): untimed ``ServedModel.logits`` calls before each measurement.
        measured_steps (int): timed calls per measurement.
        repeats (int): interleaved rounds.
    """

    warmup_steps: int = 10
    measured_steps: int = 100
    repeats: int = 8


SERVE_SIZES: Dict[str, ServeSizes] = {
    "full": ServeSizes(),
    "quick": ServeSizes(warmup_steps=4, measured_steps=32, repeats=6),
    "smoke": ServeSizes(warmup_steps=1, measured_steps=2, repeats=2),
}


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


def served_task(model: Any, schema: Any, sizes: Sizes) -> Any:
    """The trained FP32-tables model gathered unsharded into the same task built on CPU, in eval mode, as
    ``recsys-llm export`` builds it (``serving.unsharded_state_dict``, ``materialize_meta``, ``load_state_dict``).

    Args:
        model: the DMP-wrapped task trained with FP32 tables.
        schema: the data's ``DatasetSchema``.
        sizes (Sizes): the mode's sizes.

    Returns:
        CTRTask: unsharded, on CPU.
    """
    import torch

    from recsys_llm.serving import materialize_meta, unsharded_state_dict
    from recsys_llm.train.task_builder import build_task

    cpu = torch.device("cpu")
    state = unsharded_state_dict(model)
    task = materialize_meta(build_task(project_config(sizes, LEARNING_RATES, "fp32"), schema, cpu).task, cpu)
    task.load_state_dict(state, assign=True)
    return task.eval()


def export_and_load(task: Any, schema: Any, example: Any, work_dir: str, variants: Dict[str, Dict[str, str]]
                    ) -> Tuple[Dict[str, Any], Dict[str, int]]:
    """Exports ``task`` once per entry of ``variants`` and loads each artifact with ``ServedModel``.

    Args:
        task: the unsharded CPU task (:func:`served_task`).
        schema: the data's ``DatasetSchema`` (its id rules go into the artifacts).
        example: a ``Batch`` for ``torch.export``.
        work_dir (str): where the artifacts go.
        variants (Dict[str, Dict[str, str]]): contender name -> ``export_task`` keyword arguments
            (:data:`SERVE_VARIANTS`).

    Returns:
        Tuple: ``({name: ServedModel}, {name: bytes of its model.safetensors})``.

    Raises:
        RuntimeError: ``torch.export`` could not capture the dense part (nothing to serve).
    """
    from recsys_llm.serving import STATE_FILE, ServedModel, export_task

    served, artifact_bytes = {}, {}
    for name, options in variants.items():
        directory = os.path.join(work_dir, f"export_{name}")
        config = export_task(task, directory, example.dense_features, example.sparse_features, schema=schema,
                             **options)
        if config["dense_program"] is None:
            raise RuntimeError(f"{NAME}: torch.export did not capture the dense part ({config}); nothing to serve")
        served[name] = ServedModel.load(directory, trust_program=True)
        artifact_bytes[name] = os.path.getsize(os.path.join(directory, STATE_FILE))
    return served, artifact_bytes


def logit_differences(served: Dict[str, Any], batches: List[Any], name: str) -> Dict[str, float]:
    """Max and mean |logit difference| of the served model ``name`` (``"int8"``, ``"int4"``, ...) and the
    ``"fp32"`` one over ``batches`` (all rows), and the mean |logit| of the ``"fp32"`` one, their scale."""
    import torch

    baseline = torch.cat([served["fp32"].logits(b.dense_features, b.sparse_features) for b in batches])
    differences = (torch.cat([served[name].logits(b.dense_features, b.sparse_features) for b in batches])
                   - baseline).abs()
    return {"max": float(differences.max()), "mean": float(differences.mean()), "rows": int(differences.numel()),
            "fp32_abs_mean": float(baseline.abs().mean())}


def serve_comparison(model: Any, schema: Any, sizes: Sizes, serve_sizes: ServeSizes, batches: List[Any],
                     variants: Dict[str, Dict[str, str]] = SERVE_VARIANTS, name: str = NAME) -> Dict[str, Any]:
    """Exports the trained FP32-tables ``model`` once per entry of ``variants`` (here: FP32, INT8 and INT4 tables),
    times ``ServedModel.logits`` of each over ``batches`` in interleaved rounds and compares their tables, artifacts
    and logits with the ``"fp32"`` entry's; ``name``: the benchmark's, in the progress bar.

    Returns:
        Dict[str, Any]: ``rounds`` (name -> samples/s per round), ``artifact_bytes``, ``table_bytes`` (in memory,
        name -> bytes), ``logit_abs_difference`` (quantized name -> ``max``, ``mean``, ``rows``).
    """
    from recsys_llm.serving.quantized_tables import table_bytes as served_table_bytes

    task = served_task(model, schema, sizes)
    with tempfile.TemporaryDirectory(prefix=f"{name}_") as work_dir:  # the artifacts stay until the rounds end
        served, artifact_bytes = export_and_load(task, schema, batches[0], work_dir, variants)
        del task

        def step(contender: str) -> Callable[[], Any]:
            served_model = served[contender]
            return cycling_step(lambda batch: served_model.logits(batch.dense_features, batch.sparse_features),
                                batches)

        rounds = interleaved_repeats(
            {contender: samples_per_second(step(contender), sizes.batch_size, serve_sizes.warmup_steps,
                                           serve_sizes.measured_steps) for contender in served},
            serve_sizes.repeats, f"{name} serve")
        return {
            "rounds": rounds,
            "artifact_bytes": artifact_bytes,
            "table_bytes": {contender: served_table_bytes(s.embedding_bag_collection)
                            for contender, s in served.items()},
            "logit_abs_difference": {contender: logit_differences(served, batches, contender) for contender in served
                                     if contender != "fp32"},
        }


def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload``: samples/s of the five contenders (train FP32 / FP16, serve FP32 / INT8 /
    INT4; median, bars min-max of rounds) and the ratios to FP32 tables. Drawn from the JSON alone, by a run and
    by ``--replot``."""
    details, serve = payload["details"], payload["details"]["serve"]
    sizes = details["sizes"]
    bars, spans = phase_round_bars({"train": details["samples_per_second_rounds"],
                                    "serve": serve["samples_per_second_rounds"]})
    ratios = {"train\nspeed\nfp16": payload["ratio_fp16_vs_fp32_tables"],
              "tables\nbytes\nfp16": payload["table_bytes_ratio_fp16_vs_fp32"]}
    for name in ("int8", "int4"):  # short labels: eight bars share the panel
        ratios.update({f"serve\nspeed\n{name}": payload[f"serve_ratio_{name}_vs_fp32_tables"],
                       f"tables\nin mem.\n{name}": serve[f"table_bytes_ratio_{name}_vs_fp32"],
                       f"artifact\nbytes\n{name}": payload[f"artifact_bytes_ratio_{name}_vs_fp32"]})
    two_panel_figure(
        png_path,
        lambda left: value_bars(
            left, bars, ylabel="samples/s: median, bars min-max of rounds", log=True, errors=spans,
            title=f"DLRM_DCN {sizes['num_tables']}x{sizes['rows_per_table']}x{sizes['embedding_dim']}, batch "
                  f"{sizes['batch_size']}; train {payload['device']}, serve {serve['device']}; {payload['mode']}"),
        lambda right: ratio_bars(right, ratios, {}, "FP16 (train) / INT8, INT4 (serve) tables vs FP32 tables: "
                                                     "samples/s (speed), bytes"),
    )


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(NAME, __doc__, argv)
    if args.replot:
        return replot_json(args, replot)
    sizes = SIZES[args.mode]

    import torch

    from recsys_llm.train.distributed import teardown_distributed

    context = single_rank_context(args)
    device = context.device
    synchronize = device_synchronize(device)
    schema = make_schema(sizes)
    batches = make_batches(schema, sizes, args.seed, pin_memory=device.type == "cuda")

    loops, memory, models = {}, {}, {}
    for dtype in DTYPES:
        torch.manual_seed(args.seed)
        model, optimizer = build_project_model(schema, sizes, device, LEARNING_RATES, embedding_dtype=dtype)
        memory[dtype] = table_bytes(model)
        models[dtype] = model
        loops[f"{dtype}_tables"] = ProjectLoop(model, optimizer, device, itertools.cycle(batches), sizes, synchronize)
    rounds = interleaved_repeats(loops, sizes.repeats, f"{NAME} train")
    serve_sizes = SERVE_SIZES[args.mode]
    serve = serve_comparison(models["fp32"], schema, sizes, serve_sizes, batches)
    serve_rounds = {f"{name}_tables": values for name, values in serve["rounds"].items()}

    medians = {name: median(values) for name, values in rounds.items()}
    serve_medians = {name: median(values) for name, values in serve_rounds.items()}
    served_bytes, artifact_bytes = serve["table_bytes"], serve["artifact_bytes"]
    payload = result_payload(
        args,
        {"ratio_fp16_vs_fp32_tables": best_of_rounds_ratio(rounds["fp16_tables"], rounds["fp32_tables"]),
         "table_bytes_ratio_fp16_vs_fp32": memory["fp16"]["weights"] / memory["fp32"]["weights"],
         "serve_ratio_int8_vs_fp32_tables": best_of_rounds_ratio(serve_rounds["int8_tables"],
                                                                 serve_rounds["fp32_tables"]),
         "artifact_bytes_ratio_int8_vs_fp32": artifact_bytes["int8"] / artifact_bytes["fp32"],
         "serve_ratio_int4_vs_fp32_tables": best_of_rounds_ratio(serve_rounds["int4_tables"],
                                                                 serve_rounds["fp32_tables"]),
         "artifact_bytes_ratio_int4_vs_fp32": artifact_bytes["int4"] / artifact_bytes["fp32"]},
        details={
            "samples_per_second_median": medians,
            "samples_per_second_rounds": rounds,
            "table_bytes": memory,
            "serve": {
                "samples_per_second_median": serve_medians,
                "samples_per_second_rounds": serve_rounds,
                "ratio_rounds": per_round_ratios(serve_rounds["int8_tables"], serve_rounds["fp32_tables"]),
                "ratio_rounds_int4": per_round_ratios(serve_rounds["int4_tables"], serve_rounds["fp32_tables"]),
                "table_bytes": served_bytes,
                "table_bytes_ratio_int8_vs_fp32": served_bytes["int8"] / served_bytes["fp32"],
                "table_bytes_ratio_int4_vs_fp32": served_bytes["int4"] / served_bytes["fp32"],
                "artifact_bytes": artifact_bytes,
                "logit_abs_difference": serve["logit_abs_difference"]["int8"],
                "logit_abs_difference_int4": serve["logit_abs_difference"]["int4"],
                "sizes": dataclasses.asdict(serve_sizes),
                "device": "cpu",  # exported artifacts are unsharded and served on CPU, whatever --device trained
                "setup": "the FP32-tables model as trained above -> unsharded_state_dict -> the same CTRTask on CPU "
                         "-> export_task(table_dtype='trained' | 'int8' | 'int4') -> ServedModel.load -> "
                         "ServedModel.logits on the prebuilt training batches (cycled)",
            },
            "ratio_method": RATIO_METHOD,
            "sizes": dataclasses.asdict(sizes),
            "model": "torchrec DLRM_DCN, fused RowWiseAdagrad (tables) + Adam (dense), TrainPipelineSparseDist, "
                     "DMP 1 rank; model.embedding_dtype fp32 vs fp16; served: export_task trained (fp32) vs int8 "
                     "vs int4",
        },
        table=[{"phase": "train", "tables": name.split("_")[0], "samples/s (median)": round(medians[name], 1),
                "table weights (MB)": round(memory[name.split("_")[0]]["weights"] / 2**20, 2)} for name in medians]
        + [{"phase": "serve", "tables": name.split("_")[0], "samples/s (median)": round(serve_medians[name], 1),
            "table weights (MB)": round(served_bytes[name.split("_")[0]] / 2**20, 2),
            "model.safetensors (MB)": round(artifact_bytes[name.split("_")[0]] / 2**20, 2)} for name in serve_medians],
    )
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
