"""bf16 autocast vs float32 training (``train.mixed_precision``): samples/s side by side, and the AUC of both.

Throughput: two copies of the project's stack train the same model side by side in one process, in
interleaved rounds (as in ``train_throughput.py``): torchrec's ``DLRM_DCN`` (26 tables x 100k rows x 16,
batch 4096, fused RowWiseAdagrad for the tables, Adam for the dense part, ``TrainPipelineSparseDist``,
``DistributedModelParallel`` over 1 rank), built by ``build_task`` / ``shard_model`` / ``build_optimizer`` and
trained by ``recsys_llm.train.pipeline.train_epoch`` on the same prebuilt batches; one with every forward under
``torch.autocast(dtype=torch.bfloat16)`` (``train.mixed_precision=bf16``), one in float32.

Serving: the float32 model, as trained by those rounds, is gathered unsharded into the same task on CPU (as
``table_dtype.py`` does) and exported twice with ``serving.export_task``: ``mixed_precision="fp32"`` and ``"bf16"``
(``recsys-llm export --mixed-precision bf16``: the dense program captured under CPU bfloat16 autocast); both are
loaded with ``ServedModel`` and ``ServedModel.logits`` is timed over the same request batches (the training batches)
in interleaved rounds.

Accuracy: ``recsys-llm train``'s runner (``run_training``) trains the packaged DeepFM config on the embedded
synthetic data twice, ``train.mixed_precision`` fp32 and bf16, with the same seed; each run's test AUC and
LogLoss (evaluation computes in float32 in both) and its own training samples/s.

Figures (top level of the JSON):

* ``ratio_bf16_vs_fp32``: DLRM_DCN training samples/s under bf16 autocast / float32 (best rounds);
* ``auc_difference_bf16_vs_fp32``: DeepFM's test AUC trained with bf16 autocast minus float32's;
* ``runner_ratio_bf16_vs_fp32``: the two DeepFM runs' training samples/s (one run each, not interleaved: read
  it beside the ratio above, which is);
* ``serve_ratio_bf16_vs_fp32``: ``ServedModel.logits`` samples/s of the bf16 program's artifact / the float32
  one's (best rounds); ``details.serve.logit_abs_difference``: max and mean |logit difference| of the two.

The gain depends on the hardware's bfloat16 arithmetic: GPUs of compute capability 8.0 or newer and CPUs with
AVX-512 BF16 or AMX multiply in bfloat16 natively; elsewhere autocast converts and can be slower than float32.
``details.machine`` names the CPU.

Usage::

    python benchmarks/mixed_precision.py [--quick|--smoke] [--json PATH] [--plot PATH]
"""

import dataclasses
import itertools
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import (  # noqa: E402
    RATIO_METHOD,
    best_of_rounds_ratio,
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
    single_rank_context,
    two_panel_figure,
    value_bars,
    write_result,
)
from benchmarks.table_dtype import SERVE_SIZES, serve_comparison  # noqa: E402
from benchmarks.train_throughput import (  # noqa: E402
    LEARNING_RATES,
    SIZES,
    ProjectLoop,
    build_project_model,
    make_batches,
    make_schema,
)

NAME = "mixed_precision"
PRECISIONS = ("fp32", "bf16")
SERVE_VARIANTS = {"fp32": {}, "bf16": {"mixed_precision": "bf16"}}  # served contender -> export_task's arguments
REPO = Path(__file__).resolve().parents[1]


@dataclasses.dataclass(frozen=True)
class AccuracySizes:
    """The two DeepFM runs of one mode.

    Args:
        rows (int): rows of the generated synthetic data (train / valid / test 8:1:1).
        epochs (int): training epochs of each run.
    """

    rows: int = 200_000
    epochs: int = 3


ACCURACY_SIZES: Dict[str, AccuracySizes] = {
    "full": AccuracySizes(),
    "quick": AccuracySizes(rows=100_000, epochs=2),
    "smoke": AccuracySizes(rows=4_000, epochs=1),
}


def accuracy_runs(work_dir: str, sizes: AccuracySizes, seed: int, device: str) -> Dict[str, Dict[str, float]]:
    """Trains the packaged DeepFM config on the synthetic data once per precision; returns precision ->
    test AUC, test LogLoss and training samples/s."""
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.train.config import load_config
    from recsys_llm.train.runner import run_training

    data_dir = os.path.join(work_dir, "synthetic")
    generate_synthetic(data_dir, sizes.rows, seed=seed)
    runs = {}
    for precision in PRECISIONS:
        config = load_config(str(REPO / "configs" / "synthetic_deepfm.yaml"), [
            f"data.schema={data_dir}", "data.synthetic_rows=0", f"train.epochs={sizes.epochs}", "train.patience=0",
            f"train.seed={seed}", f"train.device={device}", f"train.mixed_precision={precision}",
            f"train.run_dir={os.path.join(work_dir, 'runs', precision)}"])
        results = run_training(config)
        runs[precision] = {"test_auc": results["test"]["auc"], "test_logloss": results["test"]["logloss"],
                           "samples_per_second": results["samples_per_second"]}
    return runs


def replot(payload: Mapping[str, Any], png_path: Path) -> None:
    """The PNG of a result ``payload``: DLRM_DCN training and serving samples/s per precision (median, bars min-max
    of rounds) and the ratios and AUC of bf16 vs fp32. Drawn from the JSON alone, by a run and by ``--replot``."""
    details = payload["details"]
    sizes = details["sizes"]
    bars, spans = phase_round_bars({"train": details["samples_per_second_rounds"],
                                    "serve": details["serve"]["samples_per_second_rounds"]})
    accuracy = details["accuracy"]
    ratios = {"DLRM_DCN\ntraining\nsamples/s": payload["ratio_bf16_vs_fp32"],
              "DLRM_DCN\nserving\nsamples/s": payload["serve_ratio_bf16_vs_fp32"],
              "DeepFM run\ntraining\nsamples/s": payload["runner_ratio_bf16_vs_fp32"],
              "DeepFM\ntest AUC": accuracy["bf16"]["test_auc"] / accuracy["fp32"]["test_auc"]}
    two_panel_figure(
        png_path,
        lambda left: value_bars(
            left, bars, ylabel="samples/s: median, bars min-max of rounds", log=True, errors=spans,
            title=f"DLRM_DCN {sizes['num_tables']}x{sizes['rows_per_table']}x{sizes['embedding_dim']}, batch "
                  f"{sizes['batch_size']}; {payload['device']}; {payload['mode']}"),
        lambda right: ratio_bars(right, ratios, {}, "bf16 autocast vs float32"),
    )


def main(argv: Optional[List[str]] = None) -> dict:
    args = parse_args(NAME, __doc__, argv)
    if args.replot:
        return replot_json(args, replot)
    sizes = SIZES[args.mode]

    import torch

    from recsys_llm.train.distributed import teardown_distributed
    from recsys_llm.train.mixed_precision import autocast_dtype

    context = single_rank_context(args)
    device = context.device
    bf16 = autocast_dtype("bf16", device)  # refused, as `train` refuses it, on a GPU that only emulates bfloat16
    synchronize = device_synchronize(device)
    schema = make_schema(sizes)
    batches = make_batches(schema, sizes, args.seed, pin_memory=device.type == "cuda")

    loops, models = {}, {}
    for precision, dtype in zip(PRECISIONS, (None, bf16)):
        torch.manual_seed(args.seed)
        model, optimizer = build_project_model(schema, sizes, device, LEARNING_RATES)
        models[precision] = model
        loops[precision] = ProjectLoop(model, optimizer, device, itertools.cycle(batches), sizes, synchronize,
                                       autocast_dtype=dtype)
    rounds = interleaved_repeats(loops, sizes.repeats, f"{NAME} train")
    serve = serve_comparison(models["fp32"], schema, sizes, SERVE_SIZES[args.mode], batches, SERVE_VARIANTS,
                             name=NAME)
    serve_rounds = serve["rounds"]
    with tempfile.TemporaryDirectory() as work_dir:
        accuracy = accuracy_runs(work_dir, ACCURACY_SIZES[args.mode], args.seed, args.resolved_device)

    medians = {name: median(values) for name, values in rounds.items()}
    payload = result_payload(
        args,
        {"ratio_bf16_vs_fp32": best_of_rounds_ratio(rounds["bf16"], rounds["fp32"]),
         "auc_difference_bf16_vs_fp32": accuracy["bf16"]["test_auc"] - accuracy["fp32"]["test_auc"],
         "runner_ratio_bf16_vs_fp32": accuracy["bf16"]["samples_per_second"]
         / accuracy["fp32"]["samples_per_second"],
         "serve_ratio_bf16_vs_fp32": best_of_rounds_ratio(serve_rounds["bf16"], serve_rounds["fp32"])},
        details={
            "samples_per_second_median": medians,
            "samples_per_second_rounds": rounds,
            "ratio_rounds": per_round_ratios(rounds["bf16"], rounds["fp32"]),
            "serve": {
                "samples_per_second_median": {name: median(values) for name, values in serve_rounds.items()},
                "samples_per_second_rounds": serve_rounds,
                "ratio_rounds": per_round_ratios(serve_rounds["bf16"], serve_rounds["fp32"]),
                "logit_abs_difference": serve["logit_abs_difference"]["bf16"],
                "sizes": dataclasses.asdict(SERVE_SIZES[args.mode]),
                "device": "cpu",  # exported artifacts are unsharded and served on CPU, whatever --device trained
                "setup": "the fp32 model as trained above -> unsharded_state_dict -> the same CTRTask on CPU -> "
                         "export_task(mixed_precision='fp32' | 'bf16') -> ServedModel.load -> ServedModel.logits on "
                         "the prebuilt training batches (cycled)",
            },
            "accuracy": accuracy,
            "accuracy_sizes": dataclasses.asdict(ACCURACY_SIZES[args.mode]),
            "ratio_method": RATIO_METHOD,
            "sizes": dataclasses.asdict(sizes),
            "model": "torchrec DLRM_DCN, fused RowWiseAdagrad (tables) + Adam (dense), TrainPipelineSparseDist, "
                     "DMP 1 rank; train_epoch(autocast_dtype=None | torch.bfloat16); accuracy: "
                     "configs/synthetic_deepfm.yaml through run_training, train.mixed_precision fp32 | bf16",
        },
        table=[{"model": "DLRM_DCN training (interleaved rounds)", "precision": name,
                "samples/s (median)": round(medians[name], 1)} for name in PRECISIONS]
        + [{"model": "DLRM_DCN served (interleaved rounds)", "precision": name,
            "samples/s (median)": round(median(serve_rounds[name]), 1)} for name in PRECISIONS]
        + [{"model": "DeepFM run (synthetic data)", "precision": name,
            "samples/s (median)": round(accuracy[name]["samples_per_second"], 1),
            "test AUC": round(accuracy[name]["test_auc"], 4), "test LogLoss": round(accuracy[name]["test_logloss"], 4)}
           for name in PRECISIONS],
    )
    write_result(args, payload, replot)
    print_summary(NAME, payload)
    teardown_distributed()
    return payload


if __name__ == "__main__":
    run_main(main)
