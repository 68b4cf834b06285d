"""ELEC on >= 3 backbones: plain vs gain network vs students (joint, offline, and on label-free pairs).

Run: ``.venv/bin/python -m experiments.elec [--data ml100k|synthetic]`` (a smoke run: ``--quick --out
DIR``; a table of other settings in ``--out``, the committed ones included, is never replaced). Writes
``results/elec_{data}.{json,md,png}``; run directories, the CTR-adapted LLM, its vectors and
the split copies go to ``results/runs/elec_{data}/`` and a rerun skips every finished step.

Steps:

1. ``recsys-llm semantics adapt``: the offline MiniLM with LoRA, mean pooling, a
   transformation MLP giving r (``VECTOR_DIM``) and a prediction layer, tuned with BCE on a
   random sample of training rows (``--sample-rows``; the LLM sees only training labels).
2. ``recsys-llm semantics export``: r for every row (``--granularity row``: text of the user
   and the item, as in the paper) or for every entity (``--granularity entity``, the default
   here: one text per id, reused by each of its rows, **(ours)**, so the export encodes 1.7k
   item texts instead of 73k rows on a 2-core CPU). One entity (``--entities item_id``, the
   ML-100K default) is attached to copies of the splits as column ``llm_vector``; several
   (``user_id item_id``, the synthetic default) go into frozen sharded tables
   (``elec.entity_tables``), each projected to its own field of the gain network.
3. Per backbone, same split and training budget as ``experiments.ml100k_backbones``:

   * ``plain``: the backbone alone (tabular input);
   * ``gain``: the backbone with r projected to the embedding size as one more field;
   * ``student (joint)``: teacher (gain network) and student trained in the same step, the
     student with BCE + alpha * score KD + beta * representation KD; only the student is
     evaluated (it is what would be served);
   * ``student (frozen, swapped pairs)`` **(ours)**, with entity tables only: the trained
     ``gain`` run of the same seed (``recsys-llm export --state-only``) is the frozen teacher,
     and every training batch also carries B label-free rows whose item fields come from
     other rows (``elec.distill.swap_fields`` = ``ITEM_FIELDS``): the student learns the
     teacher's scores on (user, item) pairs nobody labeled;
   * ``student (frozen, catalogue pairs)`` **(ours)**: the same, with the swapped items drawn
     from the data's item catalogue (``item_catalog.parquet``, every item with its fields,
     cold or unrated items included; ``elec.distill.swap_catalog``);
   * ``student (offline)``: the same student loss, with teacher logits / representations
     read from Parquet columns written by the trained ``gain`` run of the same seed
     (``recsys_llm.train.teacher_outputs.write_teacher_outputs``).

   (alpha, beta) are picked from ``ALPHAS x BETAS`` (swapped pairs: ``SWAP_ALPHAS x
   SWAP_BETAS``) on validation AUC, separately per student: by default the mean over every
   seed, each setting trained on each seed (``--tune-on first-seed``: the first seed alone,
   the others run only the pick). Test metrics never take part in a choice.
"""

import argparse
import json
import os
import sys
import time
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

from recsys_llm.cli.data import integer_at_least
from recsys_llm.data.movielens import ITEM_FIELDS as ML100K_ITEM_FIELDS
from recsys_llm.data.synthetic import ITEM_CATALOG
from recsys_llm.data.synthetic import ITEM_FIELDS as SYNTHETIC_ITEM_FIELDS
from recsys_llm.modules.elec import frozen_teacher_record
from recsys_llm.semantics.ctr_llm_checkpoint import adapt_checkpoint_dir, remove_checkpoint
from recsys_llm.train.checkpoint import checkpoint_digests, resolve_checkpoint

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

BACKBONES = ("deepfm", "dcnv2", "dlrm")
# the item side of a (user, item) pair, re-paired by ``elec.distill.swap_fields``
ITEM_FIELDS = {
    "ml100k": ML100K_ITEM_FIELDS,
    "synthetic": SYNTHETIC_ITEM_FIELDS,
}
VECTOR_DIM = 32
ALPHAS = (0.5, 1.0)
BETAS = (0.0, 0.1)
# swapped pairs carry no label: KD is their only signal, so larger weights are tried
SWAP_ALPHAS = (1.0, 5.0, 20.0)
SWAP_BETAS = (0.0,)
ROW_FIELDS = ("user_id", "item_id")
KD_CHOICE = "(alpha, beta) of the student from {0.5, 1.0} x {0.0, 0.1} (swapped pairs: {1, 5, 20} x {0}), per student,"
KD_LOSSES = "score KD = BCE on teacher probabilities (T = 1), representation KD = MSE after a learned projection"


def default_max_length(granularity: str, entities: Sequence[str]) -> int:
    """The LLM's tokens per text when ``--max-length`` is not given: 64 for row text or several
    entities' texts, else 48."""
    return 64 if granularity == "row" or len(entities) > 1 else 48


def llm_steps(schema: str, work: str, granularity: str, entities: Sequence[str], sample_rows: int,
              row_fields: Sequence[str] = ROW_FIELDS, max_length: Optional[int] = None) -> Tuple[str, List[str]]:
    """CTR-adapted LLM and its vectors (each step skipped when done).

    ``row_fields`` are the fields a row's text is made of (row granularity); ``max_length`` is
    the LLM's tokens per text (None: 64 for a row or several entities, else 48).

    Returns:
        Tuple: ``(schema the ELEC runs read, elec overrides that point them at the vectors)``.
        Row vectors and a single entity are attached to copies of the splits (column
        ``llm_vector``, ``vector_source=extras``); several entities (e.g. user and item) are
        each exported once and looked up from frozen sharded tables (``elec.entity_tables``).
    """
    llm_dir = os.path.join(work, "ctr_llm")
    attach_dir = os.path.join(work, "attached")
    fields = list(row_fields) if granularity == "row" else list(entities)
    max_length = max_length or default_max_length(granularity, entities)
    run_cli_step(
        ["semantics", "adapt", "--schema", schema, "--output-dir", llm_dir, "--fields", *fields,
         "--representation-dim", str(VECTOR_DIM), "--hidden-dim", "128", "--sample-rows", str(sample_rows),
         "--epochs", "1", "--batch-size", "32", "--max-length", str(max_length)],
        os.path.join(llm_dir, "row_text.json"),
    )
    # the model is saved: a tuning checkpoint left by a kill between the save and its removal is not needed
    remove_checkpoint(adapt_checkpoint_dir(llm_dir))
    export = ["semantics", "export", "--schema", schema, "--llm", llm_dir, "--granularity", granularity,
              "--batch-size", "64"]
    if granularity == "entity" and len(entities) > 1:
        # the tuned LLM's pooled states: r of an LLM tuned on ~1k rows collapses (on the synthetic
        # data its top 5 of 32 directions hold 68% of the variance and the user-item cosine has
        # AUC 0.52, vs 0.66 for pooled MiniLM states), so the entities keep the text semantics
        from recsys_llm.semantics.vector_reader import vector_dim

        overrides = ["elec.vector_source=entity_table"]
        for entity in entities:
            vectors = os.path.join(work, f"vectors_{entity}")
            # no done file: the export skips its finished chunks itself
            run_cli_step(export + ["--output-dir", vectors, "--entity-field", entity, "--entity-fields", entity,
                                   "--output", "pooled"], None)
            overrides.append(f"elec.entity_tables.{entity}={vectors}")
        overrides.append(f"elec.vector_dim={vector_dim(vectors)}")  # H of the LLM
        return schema, overrides
    entity = ["--entity-field", entities[0], "--entity-fields", entities[0]] if granularity == "entity" else []
    vectors, attached = os.path.join(work, "vectors"), os.path.join(attach_dir, "schema.json")
    if os.path.isfile(attached):
        check_exported_by(vectors, llm_dir, attached)
    run_cli_step(export + ["--output-dir", vectors, *entity, "--attach-dir", attach_dir], attached)
    return attached, []


def check_exported_by(vectors: str, llm_dir: str, attached: str) -> None:
    """Refuses the attached splits (``attached``, their schema) when the export ``vectors`` they were
    made from holds the vectors of another CTR-adapted LLM than ``llm_dir`` holds now (it was removed
    and adapted again): the export step would be skipped, and the runs on them reused, under the new
    LLM's settings. An export without a readable manifest or weights digest is not compared.

    Raises:
        SystemExit: naming both digests and the directories to delete.
    """
    from recsys_llm.semantics.vector_export import read_manifest

    try:
        exported = read_manifest(vectors)["provenance"].get("weights_sha256")
        with open(os.path.join(llm_dir, "provenance.json"), encoding="utf-8") as handle:
            adapted = json.load(handle).get("weights_sha256")
    except (OSError, ValueError, KeyError, AttributeError):
        return
    if exported and adapted and exported != adapted:
        raise SystemExit(
            f"{attached}: the splits there carry vectors exported from another CTR-adapted LLM (weights_sha256 "
            f"{exported}) than {llm_dir} holds now (weights_sha256 {adapted}); the runs on them would be reported "
            f"under the new LLM's settings. To export the new LLM's vectors, delete {vectors} and "
            f"{os.path.dirname(attached)} (the finished runs on the old ones are then refused as of other data); "
            "or use another --out"
        )


def used_vector_dim(vector_overrides: Sequence[str]) -> int:
    """Width of the LLM vectors the ELEC runs read: ``elec.vector_dim`` of ``vector_overrides``
    (entity tables of pooled states: H of the LLM, e.g. 384 for MiniLM), which comes after
    ``VECTOR_DIM`` in every run's overrides and so wins, else ``VECTOR_DIM`` (r as exported)."""
    dims = [int(o.split("=", 1)[1]) for o in vector_overrides if o.startswith("elec.vector_dim=")]
    return dims[-1] if dims else VECTOR_DIM


def export_frozen_teacher(gain_dir: str, state_dir: str) -> None:
    """``recsys-llm export --state-only`` of the gain run ``gain_dir`` into ``state_dir`` unless it holds
    one of that run's trained state now: an export of another trained state (the gain run was removed
    and trained again) or of an older version that recorded none is made again."""
    command = ["export", "--config", os.path.join(gain_dir, "config.yaml"), "--checkpoint", gain_dir,
               "--output", state_dir, "--state-only"]
    done = os.path.join(state_dir, "config.json")
    if os.path.isfile(done) and frozen_teacher_record(state_dir)["checkpoint_sha256"] != checkpoint_digests(
            resolve_checkpoint(gain_dir)):
        print(f"[stale] {state_dir}: not exported from the trained state of {gain_dir} now; exporting again",
              flush=True)
        run_cli_step(command, None)
    else:
        run_cli_step(command, done)


def runs_per_backbone(num_seeds: int, tune_on: str, swap_fields: Sequence[str] = (),
                      swap_catalog: Optional[str] = None) -> int:
    """How many training runs :func:`run_backbone` makes: plain and gain on every seed, then each
    student's grid (joint, the swapped-pair ones, offline)."""
    students = [len(ALPHAS) * len(BETAS)] * 2
    if swap_fields:
        students += [len(SWAP_ALPHAS) * len(SWAP_BETAS)] * (2 if swap_catalog else 1)
    return 2 * num_seeds + sum(tuning_runs(settings, num_seeds, tune_on) for settings in students)


def run_backbone(
    data: str, backbone: str, schema: str, base_schema: str, seeds: Sequence[int], work: str, quick: bool,
    vector_overrides: Sequence[str] = (), swap_fields: Sequence[str] = (), swap_catalog: Optional[str] = None,
    tune_on: str = "all-seeds", counter: Optional[RunCounter] = None,
) -> Tuple[Dict[str, List[Dict]], Dict[str, Dict]]:
    """All variants of one backbone (:func:`runs_per_backbone` runs, numbered by ``counter``); returns
    ``({variant: [results per seed]}, {variant: choice})``.

    With ``swap_fields`` (entity-table vectors only), a student is distilled from the frozen
    gain network on swapped pairs too (``elec.distill.swap_fields``); with ``swap_catalog`` as
    well, one more whose swapped items are drawn from that item catalogue (cold items included).
    """
    config = base_config_path(data, backbone)
    common = model_overrides(data, backbone) + [f"data.schema={schema}"] + (["train.epochs=2"] if quick else [])
    gain = ["elec.task=gain", f"elec.vector_dim={VECTOR_DIM}", *vector_overrides]

    def run(name: str, seed: int, extra: List[str], reuse: Sequence[str] = ()) -> Dict:
        run_dir = os.path.join(work, backbone, name, f"seed{seed}")
        return run_variant(config, common + [f"train.seed={seed}"] + extra, run_dir, reuse=reuse, counter=counter)

    # plain reads only the tabular columns: it trains on the original splits, so the runs of
    # experiments.ml100k_backbones with an identical config are reused
    backbone_runs = os.path.join(os.path.dirname(work), f"{data}_backbones", backbone)
    runs: Dict[str, List[Dict]] = {
        "plain": [run("plain", seed, [f"data.schema={base_schema}"], [os.path.join(backbone_runs, f"seed{seed}")])
                  for seed in seeds],
        "gain": [run("gain", seed, gain) for seed in seeds],
    }
    choices: Dict[str, Dict] = {}

    def frozen_teacher(seed: int) -> List[str]:
        """The gain network of the same seed, exported as the frozen teacher (with its entity tables)."""
        state_dir = os.path.join(work, backbone, "gain_state", f"seed{seed}")
        export_frozen_teacher(os.path.join(work, backbone, "gain", f"seed{seed}"), state_dir)
        return [f"elec.teacher_checkpoint={state_dir}"]

    def student(mode: str, per_seed_extra, variant: str = "", swap: Sequence[str] = (),
                alphas: Sequence[float] = ALPHAS, betas: Sequence[float] = BETAS, catalog: Optional[str] = None) -> None:
        tag = f"{mode}_swap{'_catalog' if catalog else ''}" if swap else mode
        grid = {f"{tag}_a{a:g}_b{b:g}": (a, b) for a in alphas for b in betas}
        swap_override = [f"elec.distill.swap_fields=[{','.join(swap)}]"] if swap else []
        swap_override += [f"elec.distill.swap_catalog={catalog}"] if catalog else []

        def overrides(seed: int, alpha: float, beta: float) -> List[str]:
            # offline: no teacher, no vectors; frozen: the teacher is built from them, its state
            # (entity tables included) comes from the checkpoint
            vectors = list(vector_overrides) if mode != "offline" else []
            return ["elec.task=distill", f"elec.vector_dim={VECTOR_DIM}", f"elec.distill.mode={mode}",
                    f"elec.distill.alpha={alpha}", f"elec.distill.beta={beta}", *vectors, *swap_override] + \
                per_seed_extra(seed)

        variant = variant or f"student ({mode})"
        best, runs[variant], valid_auc = tune_on_validation(
            list(grid), seeds, lambda name, seed: run(name, seed, overrides(seed, *grid[name])), tune_on
        )
        alpha, beta = grid[best]
        choices[variant] = {"setting": best, "alpha": alpha, "beta": beta, "valid_auc_by_setting": valid_auc}
        print(f"[elec] {backbone} {variant}: picked {best} on validation", flush=True)

    student("joint", lambda seed: [])
    if swap_fields:
        student("frozen", frozen_teacher, variant="student (frozen, swapped pairs)",
                swap=swap_fields, alphas=SWAP_ALPHAS, betas=SWAP_BETAS)
    if swap_fields and swap_catalog:
        student("frozen", frozen_teacher, variant="student (frozen, catalogue pairs)",
                swap=swap_fields, alphas=SWAP_ALPHAS, betas=SWAP_BETAS, catalog=swap_catalog)
    from recsys_llm.train.config import load_config
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    def offline_extra(seed: int) -> List[str]:
        gain_dir = os.path.join(work, backbone, "gain", f"seed{seed}")
        out_dir = os.path.join(work, backbone, "teacher_outputs", f"seed{seed}")
        gain_config = load_config(config, common + [f"train.seed={seed}", f"train.run_dir={gain_dir}",
                                                    "train.progress=false"] + gain)
        # copies finished earlier are kept when their teacher.json names this gain checkpoint, refused otherwise
        schema_path = write_teacher_outputs(gain_config, gain_dir, out_dir, progress=False)["schema"]
        # the runner reads the representation width from the teacher_representation column
        return [f"data.schema={schema_path}"]

    student("offline", offline_extra)
    return runs, choices


def main(argv: Optional[List[str]] = None) -> int:
    parser = experiment_args(__doc__.splitlines()[0], "results")
    add_tune_on_argument(parser)
    parser.add_argument("--granularity", choices=("row", "entity"), default="entity",
                        help="LLM vector per row (user + item text) or per item (default, 1.7k texts on ML-100K)")
    parser.add_argument("--entities", nargs="+", default=None,
                        help="entity granularity: id fields with a vector each (default: item_id on ML-100K, "
                             "user_id item_id on the synthetic data, whose clicks follow user-interest and item-topic "
                             "texts)")
    parser.add_argument("--row-fields", nargs="+", default=list(ROW_FIELDS),
                        help="row granularity: the fields of a row's text (default: user_id item_id; add history "
                             "for data prepared with --history-length)")
    parser.add_argument("--max-length", type=integer_at_least(1), default=None,
                        help="tokens per text for the LLM (default 64 for row text or several entities, else 48)")
    parser.add_argument("--sample-rows", type=integer_at_least(1), default=None,
                        help="training rows the LLM is tuned on (default 1000; --quick 256)")
    args = parser.parse_args(argv)
    started = time.time()
    name = f"elec_{args.data}"
    backbones = args.backbones or list(BACKBONES)
    check_tables_replaceable(args, name, backbones)
    work = os.path.abspath(os.path.join(args.out, "runs", name))
    sample_rows = args.sample_rows or (256 if args.quick else 1000)
    base_schema = os.path.abspath(prepared_schema(args.data, args.data_dir, args.raw,
                                                  with_history="history" in args.row_fields))
    entities = args.entities or (["item_id"] if args.data == "ml100k" else ["user_id", "item_id"])
    schema, vector_overrides = llm_steps(base_schema, work, args.granularity, entities, sample_rows, args.row_fields,
                                         args.max_length)
    # swapped pairs need vectors that follow the swapped ids: entity tables (several entities), one of them the item's
    swap_fields = ITEM_FIELDS.get(args.data, ()) if args.granularity == "entity" and len(entities) > 1 \
        and "item_id" in entities else ()
    # both converters write every item with its fields (cold or unrated items too)
    swap_catalog = os.path.join(os.path.dirname(base_schema), ITEM_CATALOG)
    tables: Dict[str, Dict] = {}
    choices: Dict[str, Dict] = {}
    counter = RunCounter(len(backbones) * runs_per_backbone(len(args.seeds), args.tune_on, swap_fields, swap_catalog))
    for backbone in backbones:
        runs, choices[backbone] = run_backbone(args.data, backbone, schema, base_schema, args.seeds, work, args.quick,
                                               vector_overrides, swap_fields, swap_catalog, args.tune_on, counter)
        tables[backbone] = summarize(runs)
        report(args, name, tables, choices, schema, entities, sample_rows, used_vector_dim(vector_overrides), started,
               argv)  # partial tables as they come
    return 0


def report(args: argparse.Namespace, name: str, tables: Dict[str, Dict], choices: Dict[str, Dict], schema: str,
           entities: Sequence[str], sample_rows: int, vector_dim: int, started: float,
           argv: Optional[List[str]]) -> None:
    """Writes ``{name}.{json,md,png}`` for the backbones finished so far (``vector_dim``: the width of
    the LLM vectors the runs read, :func:`used_vector_dim`)."""
    backbones = list(tables)
    variants = [v for v in next(iter(tables.values())) if v != "plain"]
    gains = {v: {b: relative_gain(tables[b], v, "plain") for b in backbones} for v in variants}
    vs_gain = {v: {b: relative_gain(tables[b], v, "gain") for b in backbones} for v in variants if v != "gain"}
    cold = all("cold/auc" in row for table in tables.values() for row in table.values())
    columns = ["auc", "logloss"] + (["cold/auc", "cold/logloss"] if cold else [])
    vectors_per = f"row ({', '.join(args.row_fields)})" if args.granularity == "row" else " and ".join(entities)
    sections = [f"## ELEC on {args.data} (test metrics, mean ± sample std (n - 1) over seeds {args.seeds}; LLM vectors per "
                f"{vectors_per}, LLM tuned on {sample_rows} training rows)", ""]
    for backbone in backbones:
        sections += [f"### {backbone}", "", markdown_table(tables[backbone], columns, baseline="plain"), ""]
        picks = ", ".join(f"{v}: {c['setting']}" for v, c in choices[backbone].items())
        sections += [f"Picked on validation ({tuned_on(args)}): {picks}", ""]
    sections += ["### Relative test AUC: vs plain and vs the gain network", "",
                 "| variant | " + " | ".join(f"{b} vs plain" for b in backbones) + " | mean vs plain | mean vs gain |",
                 "|" + "---|" * (len(backbones) + 3)]
    for v in variants:
        mean_plain = sum(gains[v].values()) / len(backbones)
        mean_gain = f"{100 * sum(vs_gain[v].values()) / len(backbones):+.2f}%" if v in vs_gain else "–"
        sections.append(f"| {v} | " + " | ".join(f"{100 * gains[v][b]:+.2f}%" for b in backbones)
                        + f" | {100 * mean_plain:+.2f}% | {mean_gain} |")
    selection = f"{selection_text(args.tune_on, KD_CHOICE)}; {KD_LOSSES}"
    sections += ["", f"KD weight selection: {selection}"]
    payload = {
        "data": args.data,
        "seeds": args.seeds,
        "backbones_done": backbones,
        "quick": args.quick,
        "granularity": args.granularity,
        "entities": list(entities) if args.granularity == "entity" else None,
        "row_fields": list(args.row_fields) if args.granularity == "row" else None,
        "llm_max_length": args.max_length or default_max_length(args.granularity, entities),  # the one used
        "llm_sample_rows": sample_rows,
        "vector_dim": vector_dim,
        "selection": selection,
        "tune_on": args.tune_on,
        "choices": choices,
        "table": tables,
        "relative_auc_gain_vs_plain": gains,
        "relative_auc_vs_gain": vs_gain,
        "attached_schema": schema,
        "runtime_s": time.time() - started,
        "command": "python -m experiments.elec " + " ".join(sys.argv[1:] if argv is None else argv),
    }
    write_table(tables_dir(args), name, payload, "\n".join(sections))


# the variants in the order run_backbone builds them
VARIANT_ORDER = ("plain", "gain", "student (joint)", "student (frozen, swapped pairs)",
                 "student (frozen, catalogue pairs)", "student (offline)")


def table_figure(payload: Mapping[str, Any], source: str) -> Tuple[Dict[str, Dict[str, Dict]], str]:
    """The tables and title :func:`~experiments.common.plot_auc` draws for the JSON of :func:`report` (read from
    ``source``)."""
    return ordered_table(payload, source, VARIANT_ORDER), f"ELEC on {table_key(payload, 'data', source)}: test AUC"


if __name__ == "__main__":
    sys.exit(main())
