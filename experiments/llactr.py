"""LLaCTR on every backbone: plain vs +FRE vs +FIE vs +both, 3 seeds, lambdas tuned on validation.

Run: ``.venv/bin/python -m experiments.llactr [--data ml100k|synthetic]`` (a smoke run: ``--quick --out
DIR``; a table of other settings in ``--out``, the committed ones included, is never replaced). Writes
``results/llactr_{data}.{json,md,png}``; run directories go to ``results/runs/llactr_{data}/``
and a rerun skips every finished step (SSFT, field vectors, training runs).

Steps:

1. SSFT (``recsys-llm semantics tune``): LoRA + InfoNCE field retrieval on the offline MiniLM,
   S values per field sampled from the schema's value texts (``--ssft-budget``: S_train, S_valid
   and epochs, by default the method's 1000, 100 and 2; field-retrieval accuracy on held-out
   values before/after is recorded in the JSON).
2. Field vectors (``recsys-llm semantics encode --adapter``): one vector per field.
3. Per backbone, same split and training budget as ``experiments.ml100k_backbones`` (the
   backbone's config, early stopping on validation AUC):

   * ``plain``: the backbone alone;
   * ``+FRE`` / ``+FIE``: one component, its lambda picked from ``LAMBDAS`` on validation AUC;
   * ``+both``: both components, (lambda_fre, lambda_fie) picked from ``LAMBDAS x LAMBDAS``
     the same way.

   ``--tune-on all-seeds`` (default) trains every setting on every seed and picks the best
   mean validation AUC; ``--tune-on first-seed`` picks on the first seed alone and runs only
   the pick on the others. Test metrics never take part in a choice.

``--field-vectors random`` is a control: FRE and FIE read Gaussian vectors of the LLM vectors'
shape and spread instead (seeded, ``fields_random.safetensors``), so the difference between the
two tables is what the LLM's semantics add. Its runs sit beside the LLM runs with a ``_random``
suffix (plain and the LLM steps are reused) and its tables are ``llactr_{data}_random_vectors.*``.
"""

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from recsys_llm.modules.field_semantics import FIELD_REDUCTIONS
from recsys_llm.semantics.store import load_vectors, save_vectors

from experiments.common import (
    RunCounter,
    add_tune_on_argument,
    base_config_path,
    check_tables_replaceable,
    experiment_args,
    markdown_table,
    model_overrides,
    ordered_table,
    prepared_schema,
    relative_gain,
    run_cli_step,
    run_variant,
    selection_text,
    summarize,
    table_key,
    tables_dir,
    tune_on_validation,
    tuned_on,
    tuning_runs,
    write_table,
)

BACKBONES = ("fm", "fwfm", "deepfm", "dcnv2", "finalmlp", "dlrm")
LAMBDAS = (0.01, 0.1, 0.5)
# SSFT's S_train / S_valid values per field and epochs: the method's (docs/methods.md), as `semantics tune`
SSFT_BUDGET = (1000, 100, 2)
QUICK_SSFT_BUDGET = (16, 8, 1)  # --quick's, unless --ssft-budget is given
# SSFT's --max-length per data set: the prompt with an empty value takes ~70 MiniLM tokens on ML-100K's 7 fields
# and ~126 on the synthetic data's 12, whose values 128 cut to a token or two (tests/experiments/test_llm_steps.py)
SSFT_MAX_LENGTH = {"ml100k": 128, "synthetic": 256}
# variant -> (use_fre, use_fie)
VARIANTS = {"+FRE": (True, False), "+FIE": (False, True), "+both": (True, True)}


def llm_steps(schema: str, work: str, quick: bool, ssft_budget: Optional[Sequence[int]] = None,
              max_length: int = SSFT_MAX_LENGTH["ml100k"]) -> Tuple[str, str]:
    """SSFT then field vectors (each skipped when done; the vectors are encoded again when they are not
    the SSFT adapter's of now, e.g. SSFT tuned again); returns (vectors path, SSFT metrics path).

    ``ssft_budget``: (S_train, S_valid, epochs); None: ``SSFT_BUDGET``, or ``QUICK_SSFT_BUDGET``
    with ``quick``. ``max_length``: SSFT's tokens per prompt (``SSFT_MAX_LENGTH`` of the data).
    """
    ssft_dir = os.path.join(work, "ssft")
    vectors = os.path.join(work, "fields.safetensors")
    if ssft_budget is None:
        ssft_budget = QUICK_SSFT_BUDGET if quick else SSFT_BUDGET
    samples_train, samples_valid, epochs = ssft_budget
    samples = ["--samples-train", str(samples_train), "--samples-valid", str(samples_valid), "--epochs", str(epochs)]
    run_cli_step(
        ["semantics", "tune", "--schema", schema, "--output-dir", ssft_dir, "--max-length", str(max_length),
         "--batch-size", "16", *samples],
        os.path.join(ssft_dir, "metrics.json"),
    )
    adapter = os.path.join(ssft_dir, "adapter")
    encode = ["semantics", "encode", "--schema", schema, "--adapter", adapter, "--output", vectors]
    if os.path.isfile(vectors) and not encoded_with(vectors, adapter):
        # SSFT tuned again (its output removed): the same encode command, but the vectors are the old adapter's
        print(f"[stale] {vectors}: not encoded with the SSFT adapter in {adapter} now; encoding again", flush=True)
        os.remove(vectors)  # encode keeps another adapter's vectors, which runs may have trained on
        run_cli_step(encode, None)
    else:
        run_cli_step(encode, vectors)
    return vectors, os.path.join(ssft_dir, "metrics.json")


def encoded_with(vectors: str, adapter: str) -> bool:
    """Whether the field vectors in ``vectors`` were encoded with the SSFT adapter ``adapter`` holds now:
    ``semantics encode --adapter`` names the adapter's ``adapter_hash`` (``ssft.json``) in their model id."""
    from recsys_llm.semantics.ssft_adapter import ADAPTER_ID_MARK, read_adapter_info

    adapter_id = f"{ADAPTER_ID_MARK}{read_adapter_info(adapter)['adapter_hash']}"
    return load_vectors(vectors).provenance.model_id.endswith(adapter_id)


def random_field_vectors(vectors: str, out: str, seed: int = 0) -> str:
    """Writes ``out``: one Gaussian vector per field of ``vectors``, (F, d) like them, scaled to their
    standard deviation, under the same keys and schema-bound provenance (model named as the control);
    skipped when ``out`` exists. Returns ``out``."""
    if not os.path.exists(out):
        stored = load_vectors(vectors)
        noise = torch.randn(stored.vectors.shape, generator=torch.Generator().manual_seed(seed))
        provenance = dataclasses.replace(stored.provenance, model_id=f"random normal (seed {seed}, control)",
                                         model_hash=f"random-{seed}")
        save_vectors(out, noise * stored.vectors.float().std(), stored.keys, provenance)
    return out


def _setting_name(variant: str, lambda_fre: float, lambda_fie: float) -> str:
    use_fre, use_fie = VARIANTS[variant]
    parts = [variant.lstrip("+").lower()]
    if use_fre:
        parts.append(f"fre{lambda_fre:g}")
    if use_fie:
        parts.append(f"fie{lambda_fie:g}")
    return "_".join(parts)


def _grid(variant: str) -> List[Tuple[float, float]]:
    use_fre, use_fie = VARIANTS[variant]
    fre = LAMBDAS if use_fre else (0.0,)
    fie = LAMBDAS if use_fie else (0.0,)
    return [(a, b) for a in fre for b in fie]


def runs_per_backbone(num_seeds: int, tune_on: str) -> int:
    """How many training runs :func:`run_backbone` makes: plain on every seed, then each variant's grid."""
    return num_seeds + sum(tuning_runs(len(_grid(variant)), num_seeds, tune_on) for variant in VARIANTS)


def run_backbone(
    data: str, backbone: str, schema: str, vectors: str, seeds: Sequence[int], work: str, quick: bool,
    tune_on: str = "all-seeds", fre_field_reduction: str = "sum", run_suffix: str = "",
    counter: Optional[RunCounter] = None,
) -> Tuple[Dict[str, List[Dict]], Dict[str, Dict]]:
    """All variants of one backbone (:func:`runs_per_backbone` runs, numbered by ``counter``); returns
    ``({variant: [results per seed]}, {variant: choice})``. ``run_suffix`` is appended to the variants'
    run names (plain's runs are shared)."""
    config = base_config_path(data, backbone)
    common = model_overrides(data, backbone) + [f"data.schema={schema}"] + (["train.epochs=2"] if quick else [])

    def run(name: str, seed: int, extra: List[str], reuse: Sequence[str] = ()) -> Dict:
        run_dir = os.path.join(work, backbone, name, f"seed{seed}")
        return run_variant(config, common + [f"train.seed={seed}"] + extra, run_dir, reuse=reuse, counter=counter)

    # plain runs of experiments.ml100k_backbones with an identical config are reused
    backbone_runs = os.path.join(os.path.dirname(work), f"{data}_backbones", backbone)
    runs: Dict[str, List[Dict]] = {
        "plain": [run("plain", seed, [], [os.path.join(backbone_runs, f"seed{seed}")]) for seed in seeds]
    }
    choices: Dict[str, Dict] = {}
    for variant, (use_fre, use_fie) in VARIANTS.items():
        def overrides(lambda_fre: float, lambda_fie: float) -> List[str]:
            return [f"llactr.vectors_path={vectors}", f"llactr.use_fre={str(use_fre).lower()}",
                    f"llactr.use_fie={str(use_fie).lower()}", f"llactr.lambda_fre={lambda_fre}",
                    f"llactr.lambda_fie={lambda_fie}", f"llactr.fre_field_reduction={fre_field_reduction}"]

        grid = {_setting_name(variant, a, b) + run_suffix: (a, b) for a, b in _grid(variant)}
        best, runs[variant], valid_auc = tune_on_validation(
            list(grid), seeds, lambda name, seed: run(name, seed, overrides(*grid[name])), tune_on
        )
        lambda_fre, lambda_fie = grid[best]
        choices[variant] = {
            "setting": best,
            "lambda_fre": lambda_fre if use_fre else None,
            "lambda_fie": lambda_fie if use_fie else None,
            "valid_auc_by_setting": valid_auc,
        }
        print(f"[llactr] {backbone} {variant}: picked {best} on validation", flush=True)
    return runs, choices


def main(argv: Optional[List[str]] = None) -> int:
    parser = experiment_args(__doc__.splitlines()[0], "results")
    add_tune_on_argument(parser)
    parser.add_argument("--fre-field-reduction", choices=FIELD_REDUCTIONS, default="sum",
                        help="FRE's KL summed over fields (public code) or averaged (lambda / F)")
    parser.add_argument("--ssft-budget", type=int, nargs=3, default=None,
                        metavar=("S_TRAIN", "S_VALID", "EPOCHS"),
                        help=f"SSFT's values per field (training, held out) and epochs (default: "
                             f"{' '.join(map(str, SSFT_BUDGET))}, the method's, or {' '.join(map(str, QUICK_SSFT_BUDGET))} "
                             "with --quick; the table before 2026-12-04 used 200 50 1)")
    parser.add_argument("--field-vectors", choices=("llm", "random"), default="llm",
                        help="llm: the SSFT-tuned LLM's field vectors; random: the control, Gaussian vectors of "
                             "the same shape (runs and tables named *_random*)")
    args = parser.parse_args(argv)
    started = time.time()
    name, run_suffix = f"llactr_{args.data}", ""
    if args.field_vectors == "random":
        name, run_suffix = f"{name}_random_vectors", "_random"
    backbones = args.backbones or list(BACKBONES)
    check_tables_replaceable(args, name, backbones)
    work = os.path.abspath(os.path.join(args.out, "runs", f"llactr_{args.data}"))
    schema = os.path.abspath(prepared_schema(args.data, args.data_dir, args.raw))
    vectors, ssft_metrics_path = llm_steps(schema, work, args.quick, args.ssft_budget, SSFT_MAX_LENGTH[args.data])
    if args.field_vectors == "random":
        vectors = random_field_vectors(vectors, os.path.join(work, "fields_random.safetensors"))
    tables: Dict[str, Dict] = {}
    choices: Dict[str, Dict] = {}
    counter = RunCounter(len(backbones) * runs_per_backbone(len(args.seeds), args.tune_on))
    for backbone in backbones:
        runs, choices[backbone] = run_backbone(args.data, backbone, schema, vectors, args.seeds, work, args.quick,
                                               args.tune_on, args.fre_field_reduction, run_suffix, counter)
        tables[backbone] = summarize(runs)
        report(args, name, tables, choices, vectors, ssft_metrics_path, started, argv)  # partial tables as they come
    return 0


def report(args: argparse.Namespace, name: str, tables: Dict[str, Dict], choices: Dict[str, Dict], vectors: str,
           ssft_metrics_path: str, started: float, argv: Optional[List[str]]) -> None:
    """Writes ``{name}.{json,md,png}`` for the backbones finished so far."""
    backbones = list(tables)
    selection = selection_text(args.tune_on, LAMBDA_CHOICE)
    gains = {
        variant: {b: relative_gain(tables[b], variant, "plain") for b in backbones} for variant in VARIANTS
    }
    cold = all("cold/auc" in row for table in tables.values() for row in table.values())
    if cold:
        gains.update({
            f"{variant} (cold items)": {b: relative_gain(tables[b], variant, "plain", "cold/auc") for b in backbones}
            for variant in VARIANTS
        })
    mean_gains = {variant: sum(per.values()) / len(per) for variant, per in gains.items()}
    with open(ssft_metrics_path, encoding="utf-8") as handle:
        ssft = json.load(handle)
    accuracy = {when: math.nan if ssft[when]["accuracy"] is None else ssft[when]["accuracy"]  # no held-out values
                for when in ("before", "after")}
    columns = ["auc", "logloss"] + (["cold/auc", "cold/logloss"] if cold else [])
    control = " with random field vectors (control)" if args.field_vectors == "random" else ""
    sections = [f"## LLaCTR on {args.data}{control} (test metrics, mean ± sample std (n - 1) over seeds {args.seeds})",
                ""]
    for backbone in backbones:
        sections += [f"### {backbone}", "", markdown_table(tables[backbone], columns, baseline="plain"), ""]
        picks = ", ".join(f"{v}: {c['setting']}" for v, c in choices[backbone].items())
        sections += [f"Picked on validation ({tuned_on(args)}): {picks}", ""]
    sections += ["### Relative test AUC gain vs plain, per backbone and averaged", "",
                 "| variant | " + " | ".join(backbones) + " | mean |", "|" + "---|" * (len(backbones) + 2)]
    for variant, per in gains.items():
        sections.append(f"| {variant} | " + " | ".join(f"{100 * per[b]:+.2f}%" for b in backbones)
                        + f" | {100 * mean_gains[variant]:+.2f}% |")
    sections += ["", f"SSFT (offline MiniLM, LoRA, InfoNCE): held-out field-retrieval accuracy "
                 f"{accuracy['before']:.3f} before, {accuracy['after']:.3f} after tuning "
                 f"({ssft['before']['count']} held-out values)."
                 + (" FRE and FIE read random normal vectors of the same shape instead of that model's." if control
                    else ""), "", f"Lambda selection: {selection}"]
    payload = {
        "data": args.data,
        "seeds": args.seeds,
        "backbones_done": backbones,
        "quick": args.quick,
        "selection": selection,
        "tune_on": args.tune_on,
        "fre_field_reduction": args.fre_field_reduction,
        "lambda_grid": list(LAMBDAS),
        "choices": choices,
        "table": tables,
        "relative_auc_gain_vs_plain": gains,
        "mean_relative_auc_gain_vs_plain": mean_gains,
        "ssft": {k: ssft.get(k) for k in ("before", "after", "epochs", "num_train", "num_valid")},
        # the settings whose defaults changed since tables were made: the command alone no longer says them
        "ssft_budget": list(args.ssft_budget or (QUICK_SSFT_BUDGET if args.quick else SSFT_BUDGET)),
        "ssft_max_length": SSFT_MAX_LENGTH[args.data],
        "field_vectors": vectors,
        "field_vectors_kind": args.field_vectors,
        "runtime_s": time.time() - started,
        "command": "python -m experiments.llactr " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_table(tables_dir(args), name, payload, "\n".join(sections))


def table_figure(payload: Mapping[str, Any], source: str) -> Tuple[Dict[str, Dict[str, Dict]], str]:
    """The tables and title :func:`~experiments.common.plot_auc` draws for the JSON of :func:`report` (read from
    ``source``). A JSON from before the random control (no ``field_vectors_kind``) is of the LLM's vectors unless
    its ``command`` says ``--field-vectors random``."""
    kind = payload.get("field_vectors_kind")
    if kind is None:
        command = " ".join(str(table_key(payload, "command", source)).split())
        kind = "random" if "--field-vectors random" in command else "llm"
    control = " with random field vectors (control)" if kind == "random" else ""
    return (ordered_table(payload, source, ["plain", *VARIANTS]),
            f"LLaCTR on {table_key(payload, 'data', source)}{control}: test AUC")


LAMBDA_CHOICE = "lambda_fre / lambda_fie from {0.01, 0.1, 0.5} (the range the paper tunes; for +both the 3x3 grid)"


if __name__ == "__main__":
    sys.exit(main())
