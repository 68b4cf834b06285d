"""Shared driver for the accuracy tables: run variants x seeds, aggregate, write JSON, Markdown, PNG.

Every variant is a list of config overrides on one base config; every run is a full
``run_training`` (sharded DMP, TrainPipelineSparseDist, early stopping on validation AUC),
in this process, one after the other. Runs already finished (``results.json`` in their run
directory) are reused, so an interrupted table resumes where it stopped.
"""

import argparse
import importlib
import json
import math
import os
import statistics
import time
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import yaml

from recsys_llm.atomic_dir import save_figure_atomically, write_text_atomically
from recsys_llm.train.config import PLUGINS_FILE, ExperimentConfig, config_differences, load_config
from recsys_llm.train.run_records import (
    RESULTS_FILE,
    changed_entity_vectors,
    changed_field_vectors,
    changed_frozen_teacher,
    data_differences,
    finished_results,
    read_run_record,
)
from recsys_llm.train.runner import run_training

ML100K_RAW = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ml-100k"))
SYNTHETIC_ROWS = 200_000  # the embedded data of the tables (``--data synthetic``), generated with seed 0
# the backbones with a config (``configs/ml100k_{backbone}.yaml``), the choices of ``--backbones``
BACKBONES = ("fm", "fwfm", "deepfm", "dcnv2", "finalmlp", "dlrm")


class _DistinctSeeds(argparse.Action):
    """``--seeds``, refused when a seed repeats: its run would count twice in the mean and std."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: List[int],
                 option_string: Optional[str] = None) -> None:
        repeated = sorted({seed for seed in values if values.count(seed) > 1})
        if repeated:
            parser.error(f"{option_string}: seed(s) {repeated} given more than once; each seed is one run of the "
                         "mean and std over seeds")
        setattr(namespace, self.dest, values)


def experiment_args(description: str, default_out: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--data", choices=("ml100k", "synthetic"), default="ml100k")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], action=_DistinctSeeds)
    parser.add_argument("--backbones", nargs="+", choices=BACKBONES, default=None)
    parser.add_argument("--out", default=default_out, help="results directory (JSON, Markdown, PNG, run dirs)")
    parser.add_argument("--tables-out", default=None,
                        help="where the JSON, Markdown and PNG go instead (default: --out); runs stay under --out, "
                             "so a second table over the same runs (another --tune-on, where the script has it) "
                             "reuses them without overwriting the first")
    parser.add_argument("--raw", default=ML100K_RAW, help="raw ML-100K (RecBole atomic files)")
    parser.add_argument("--data-dir", default="data", help="where prepared data sets live")
    parser.add_argument("--quick", action="store_true", help="fewer epochs, for a smoke run")
    return parser


def tables_dir(args: argparse.Namespace) -> str:
    """Where the result tables go: ``--tables-out``, else ``--out``."""
    return args.tables_out or args.out


def check_tables_replaceable(args: argparse.Namespace, name: str, backbones: List[str]) -> None:
    """Refuses, before any work, to write ``<name>.json / .md / .png`` over a table of other settings:
    a ``--quick`` smoke run, other seeds, another ``--mixed-precision``, or backbones this run leaves out (a
    committed table of ``results/`` would become a smoke run's, or one backbone's, without a word).

    Raises:
        SystemExit: naming the file, what differs, and where this run's table can go instead.
    """
    path = os.path.join(tables_dir(args), f"{name}.json")
    try:
        with open(path, encoding="utf-8") as handle:
            recorded = json.load(handle)
    except (OSError, ValueError):
        return  # none yet (or unreadable: the run replaces it)
    differences = []
    if bool(recorded.get("quick", False)) != bool(args.quick):
        differences.append(f"quick {bool(recorded.get('quick', False))} -> {bool(args.quick)}")
    if recorded.get("seeds") is not None and list(recorded["seeds"]) != list(args.seeds):
        differences.append(f"seeds {recorded['seeds']} -> {list(args.seeds)}")
    precision = getattr(args, "mixed_precision", "fp32")
    if recorded.get("mixed_precision", "fp32") != precision:
        differences.append(f"mixed precision {recorded.get('mixed_precision', 'fp32')} -> {precision}")
    left_out = sorted(set(recorded.get("table") or {}) - set(backbones))
    if left_out:
        differences.append(f"backbones {left_out} of it not run here")
    if differences:
        raise SystemExit(f"{path}: holds a table of other settings ({'; '.join(differences)}); this run's table would "
                         "replace it: give --tables-out DIR (or another --out) for this one, or delete that table")


def add_tune_on_argument(parser: argparse.ArgumentParser) -> None:
    """``--tune-on``, for the tables that pick weights with :func:`tune_on_validation`."""
    parser.add_argument(
        "--tune-on", choices=TUNE_ON, default="all-seeds",
        help="weights picked by the mean validation AUC over every seed (all-seeds: each setting runs on "
             "each seed) or by the first seed's alone (first-seed: the others run only the pick)",
    )


def prepared_schema(data: str, data_dir: str, raw: str, with_history: bool = False) -> str:
    """Prepares ML-100K (or the embedded synthetic data) once; returns the schema path.

    Data written before the item catalogue existed is prepared again: the same rows, plus
    the catalogue. Synthetic data already there with another row count than the tables'
    (``SYNTHETIC_ROWS``; e.g. a ``prepare synthetic --rows ...`` of one's own) is refused, and so is ML-100K
    prepared with a ``history`` field (``prepare movielens --history-length``, the docs' own example) unless
    ``with_history`` (the ELEC table whose row text holds the history): every model would read one more field, and
    the table would be of another protocol than it says.
    """
    from recsys_llm.data.synthetic import ITEM_CATALOG

    out = os.path.join(data_dir, "ml-100k" if data == "ml100k" else "synthetic")
    if all(os.path.exists(os.path.join(out, name)) for name in ("schema.json", ITEM_CATALOG)):
        if data == "synthetic":
            _check_synthetic_rows(out)
        elif not with_history and _has_history(out):
            raise SystemExit(
                f"{out}: ML-100K prepared with a history field (prepare movielens --history-length); these tables "
                "are of the default conversion, whose models read no history: give --data-dir a directory without "
                "one (prepare movielens without --history-length there), or name history in elec's --row-fields"
            )
        return os.path.join(out, "schema.json")
    if data == "ml100k":
        from recsys_llm.data.movielens import prepare_movielens

        if os.path.exists(os.path.join(out, "schema.json")):
            _check_default_conversion(out)  # prepared again below with the defaults: never over other settings' data

        if not os.path.exists(os.path.join(raw, "ml-100k.inter")):
            raise SystemExit(f"ML-100K raw files not found in {raw} (RecBole atomic format expected); pass --raw "
                             "DIR, the directory holding ml-100k.inter, .item and .user")
        prepare_movielens(raw, out, progress=True)
    else:
        from recsys_llm.data.synthetic import generate_synthetic

        generate_synthetic(out, SYNTHETIC_ROWS, seed=0, progress=True)
    return os.path.join(out, "schema.json")


def _has_history(data_dir: str) -> bool:
    """Whether the ML-100K in ``data_dir`` was prepared with a ``history`` field."""
    from recsys_llm.data.schema import DatasetSchema

    return any(field.name == "history" for field in DatasetSchema.load(os.path.join(data_dir, "schema.json")).fields)


def _check_default_conversion(data_dir: str) -> None:
    """Raises ``SystemExit`` when ``data_dir`` holds ML-100K prepared with other settings than the defaults
    (a ``history`` field: ``prepare movielens --history-length``), which preparing it again would replace."""
    if _has_history(data_dir):
        raise SystemExit(
            f"{data_dir}: ML-100K prepared with a history field (prepare movielens --history-length) and no item "
            "catalogue; preparing it again here would write the default conversion over it: prepare it again with its "
            f"own settings (`recsys-llm prepare movielens --input RAW --out {data_dir} --history-length N`)"
        )


def _check_synthetic_rows(data_dir: str) -> None:
    """Raises ``SystemExit`` unless the synthetic data in ``data_dir`` has ``SYNTHETIC_ROWS`` rows."""
    from recsys_llm.data.parquet_files import read_schema_and_check
    from recsys_llm.data.schema import DatasetSchema

    schema = DatasetSchema.load(os.path.join(data_dir, "schema.json"))
    rows = sum(read_schema_and_check(schema, split) for split in schema.splits)  # footers alone
    if rows != SYNTHETIC_ROWS:
        raise SystemExit(
            f"{data_dir}: synthetic data of {rows} rows; the tables are for {SYNTHETIC_ROWS} rows (seed 0). "
            f"Remove {data_dir} to have it generated again, or give --data-dir another directory"
        )


def base_config_path(data: str, backbone: str) -> str:
    root = os.path.join(os.path.dirname(__file__), "..", "configs")
    name = f"ml100k_{backbone}.yaml" if data == "ml100k" else "synthetic_deepfm.yaml"
    return os.path.abspath(os.path.join(root, name))


def model_overrides(data: str, backbone: str) -> List[str]:
    """Overrides that make ``base_config_path(data, backbone)`` train ``backbone``.

    ML-100K has one config per backbone (no overrides). The synthetic data has one DeepFM
    config: there the ``model`` section of ``configs/ml100k_{backbone}.yaml`` is applied to it,
    so every backbone has the same architecture on both data sets.
    """
    if data == "ml100k":
        return []
    with open(base_config_path("ml100k", backbone), encoding="utf-8") as handle:
        model = yaml.safe_load(handle)["model"]
    return [f"model.{key}={json.dumps(value)}" for key, value in model.items()]


def run_cli_step(argv: Sequence[str], done_file: Optional[str]) -> None:
    """Runs ``recsys-llm ARGV`` in this process unless ``done_file`` exists (resumable steps).

    A finished step records its command beside ``done_file`` (``<done_file>.command.json``);
    a later call skips it only with the same command, so a rerun with other LLM settings into
    the same ``--out`` cannot take the old LLM and, through its vector paths, the old runs.
    ``done_file=None`` always runs the command: for steps that resume by themselves and skip
    finished work (``semantics export``).

    Raises:
        SystemExit: the command returned a non-zero status, or the step was done with another command.
    """
    record = f"{done_file}.command.json" if done_file is not None else None
    if done_file is not None and os.path.exists(done_file):
        if os.path.exists(record):
            with open(record, encoding="utf-8") as handle:
                done_with = json.load(handle)
            if done_with != list(argv):
                raise SystemExit(
                    f"{done_file}: done by `recsys-llm {' '.join(done_with)}`, not by `recsys-llm {' '.join(argv)}`; "
                    "its results would be reported under the new settings. Use another --out for them"
                )
        print(f"[skip] {' '.join(argv[:2])}: {done_file} exists", flush=True)
        return
    from recsys_llm.cli import main as cli_main

    print(f"[run] recsys-llm {' '.join(argv)}", flush=True)
    status = cli_main(list(argv))
    if status != 0:
        raise SystemExit(f"recsys-llm {' '.join(argv[:2])} failed with status {status}")
    if record is not None:  # whole or absent: a kill while writing it must not leave a record that fails every rerun
        write_text_atomically(record, json.dumps(list(argv), indent=1))


TUNE_ON = ("all-seeds", "first-seed")


class RunCounter:
    """Numbers a table's training runs as they come, ``k/N`` with ``N`` planned up front
    (runs finished earlier and runs reused from another table count too)."""

    def __init__(self, total: int) -> None:
        self._total = total
        self._count = 0

    @property
    def total(self) -> int:
        """``N``, the runs planned."""
        return self._total

    def next_label(self) -> str:
        """The next run's ``k/N``."""
        self._count += 1
        return f"{self._count}/{self._total}"


def tuning_runs(num_settings: int, num_seeds: int, tune_on: str) -> int:
    """How many runs :func:`tune_on_validation` makes for ``num_settings`` settings and ``num_seeds`` seeds."""
    tune_seeds = num_seeds if tune_on == "all-seeds" else min(num_seeds, 1)
    return num_settings * tune_seeds + num_seeds - tune_seeds


def tune_on_validation(
    settings: Sequence[str], seeds: Sequence[int], run: Callable[[str, int], Dict], tune_on: str
) -> Tuple[str, List[Dict], Dict[str, Optional[float]]]:
    """Picks one of ``settings`` by validation AUC and returns its runs on every seed.

    Args:
        settings (Sequence[str]): candidate setting names, in grid order (ties: first).
        seeds (Sequence[int]): the table's seeds.
        run (Callable[[str, int], Dict]): ``(setting, seed) -> results`` of one training run.
        tune_on (str): ``all-seeds``: every setting runs on every seed and the pick has the best
            mean validation AUC; ``first-seed``: every setting runs on the first seed, the pick
            has its best validation AUC and only the pick runs on the other seeds.

    Returns:
        Tuple: ``(picked setting, its results per seed, {setting: validation AUC it was picked
        by, None when a run has none})``. Test metrics never take part.
    """
    if tune_on not in TUNE_ON:
        raise ValueError(f"tune_on: expected one of {TUNE_ON}, got {tune_on!r}")
    if not settings or not seeds:
        raise ValueError(f"tune_on_validation: no settings ({list(settings)}) or no seeds ({list(seeds)})")
    tune_seeds = list(seeds) if tune_on == "all-seeds" else list(seeds[:1])
    tried = {setting: [run(setting, seed) for seed in tune_seeds] for setting in settings}
    # a run without a validation AUC (None) ranks last and is reported as None
    valid_auc = {
        setting: None if any(r["valid"]["auc"] is None for r in results)
        else statistics.fmean(r["valid"]["auc"] for r in results)
        for setting, results in tried.items()
    }
    best = max(valid_auc, key=lambda setting: float("-inf") if valid_auc[setting] is None else valid_auc[setting])
    return best, tried[best] + [run(best, seed) for seed in seeds[len(tune_seeds):]], valid_auc


def selection_text(tune_on: str, what: str) -> str:
    """How ``tune_on_validation`` picked ``what``, for a table's notes."""
    if tune_on == "all-seeds":
        return (f"{what} picked by the best mean validation AUC (early-stopping AUC on the valid split) over "
                "all seeds, every setting trained on every seed; the picked setting's runs are the result; "
                "test metrics are never used to choose")
    return (f"{what} picked by the best validation AUC (early-stopping AUC on the valid split) of the first "
            "seed; that run is reused as the first seed's result and the other seeds run the picked setting; "
            "test metrics are never used to choose")


def tuned_on(args: argparse.Namespace) -> str:
    """The seeds the validation pick looked at, for a table's notes."""
    return f"mean over seeds {args.seeds}" if args.tune_on == "all-seeds" else f"seed {args.seeds[0]}"


def relative_gain(table: Dict[str, Dict], variant: str, baseline: str, metric: str = "auc") -> float:
    """``(mean(variant) - mean(baseline)) / mean(baseline)`` of one summarized metric."""
    base = table[baseline][metric]["mean"]
    return (table[variant][metric]["mean"] - base) / base


def run_variant(
    config_path: str,
    overrides: Sequence[str],
    run_dir: str,
    prepare: Optional[Callable[[], None]] = None,
    reuse: Sequence[str] = (),
    counter: Optional[RunCounter] = None,
) -> Dict:
    """One training run (or its saved results when ``run_dir/results.json`` exists).

    Args:
        config_path (str): base config file.
        overrides (Sequence[str]): ``section.key=value`` overrides.
        run_dir (str): the run's directory.
        prepare (Optional[Callable[[], None]]): called before training (not when skipped).
        reuse (Sequence[str]): finished run directories of other tables; one whose saved
            ``config.yaml`` equals this run's config (run dir and progress bar aside) is
            reused instead of training again.
        counter (Optional[RunCounter]): numbers the run in its progress line (``[run 7/120]``).
    """
    number = f" {counter.next_label()}" if counter is not None else ""
    config = load_config(config_path, list(overrides) + [f"train.run_dir={run_dir}", "train.progress=false"])
    finished = finished_results(run_dir)
    if finished is not None:
        differences = _differences(config, run_dir)
        if differences:
            raise SystemExit(
                f"{run_dir}: holds a finished run of other settings ({'; '.join(differences)}); "
                "remove it or pass another --out"
            )
        print(f"[done{number}] {run_dir}: finished earlier", flush=True)
        return finished
    for other in reuse:
        if _same_experiment(config, other):
            print(f"[reuse{number}] {run_dir}: identical finished run {other}", flush=True)
            return finished_results(other)
    if prepare is not None:
        prepare()
    started = time.perf_counter()
    # the upstream notices `recsys-llm train` hides (torchrec's planner, torch's checkpoint writer), which would
    # otherwise print several lines around each run's one line
    from recsys_llm.cli import quiet_upstream_notices

    restore_notices = quiet_upstream_notices()
    try:
        results = run_training(config)
    finally:
        restore_notices()
    # one line per run: the drivers train with the progress bar off, and a table is up to hundreds of runs
    aucs = [results.get(split, {}).get("auc") for split in ("valid", "test")]
    valid, test = (f"{auc:.4f}" if isinstance(auc, float) else str(auc) for auc in aucs)  # None: never validated
    seconds = time.perf_counter() - started
    print(f"[run{number}] {run_dir}: valid AUC {valid}, test AUC {test} ({seconds:.0f} s)", flush=True)
    return results


def _differences(config: ExperimentConfig, run_dir: str) -> List[str]:
    """How the config saved in ``run_dir`` differs from ``config`` (run dir and progress bar aside),
    and the data the run trained on from what ``config``'s data directory holds now."""
    other = load_config(os.path.join(run_dir, "config.yaml"))
    differences = config_differences(other, config, ("train.run_dir", "train.progress", "data.schema"))
    if os.path.abspath(config.data.schema) != os.path.abspath(other.data.schema):
        differences.append(f"data.schema: {other.data.schema} -> {config.data.schema}")
    return (differences + data_differences(config, run_dir) + _teacher_differences(config, run_dir)
            + _field_vector_differences(config, run_dir) + _entity_vector_differences(config, run_dir))


def _field_vector_differences(config: ExperimentConfig, run_dir: str) -> List[str]:
    """Whether an LLaCTR run's ``llactr.vectors_path`` still holds the vectors the finished run in
    ``run_dir`` trained with (``plugins.json``: ``llactr``, their provenance: model, SSFT adapter,
    template, schema); the same path written again by another model or adapter is another
    experiment. Where the file was and when it was written do not count."""
    from recsys_llm.semantics.store import load_vectors

    vectors, plugins = (config.llactr or {}).get("vectors_path"), os.path.join(run_dir, PLUGINS_FILE)
    if not vectors or not os.path.isfile(vectors) or not os.path.isfile(plugins):
        return []
    saved = read_run_record(plugins)
    # as plugins.json stores it
    current = json.loads(json.dumps(load_vectors(vectors).provenance.to_dict(), default=str))
    differing = [f"{key} {saved['llactr'][key]!r} -> {current[key]!r}"
                 for key in changed_field_vectors(saved, {"llactr": current})]
    return [f"the field vectors in {vectors}: {', '.join(differing)}"] if differing else []


def _entity_vector_differences(config: ExperimentConfig, run_dir: str) -> List[str]:
    """Whether an entity-table run's exports (``elec.entity_tables``) still hold the vectors the
    finished run in ``run_dir`` trained with (``plugins.json``: ``elec.entity_vectors``); the same
    directories exported again from a re-adapted LLM are another experiment."""
    from recsys_llm.modules.elec import ELECConfig, entity_vectors_record

    plugins = os.path.join(run_dir, PLUGINS_FILE)
    if not config.elec or not os.path.isfile(plugins):
        return []
    current = {"elec": {"entity_vectors": entity_vectors_record(ELECConfig.from_dict(config.elec, source="elec"))}}
    changes = changed_entity_vectors(read_run_record(plugins), current)
    return [f"the entity vectors: {', '.join(changes)}"] if changes else []


def _teacher_differences(config: ExperimentConfig, run_dir: str) -> List[str]:
    """Whether a frozen-teacher run's ``elec.teacher_checkpoint`` still holds the export of the
    trained teacher the run in ``run_dir`` learned from (``plugins.json``: ``elec.frozen_teacher``);
    the same path re-exported from a retrained gain network is another experiment."""
    from recsys_llm.modules.elec import frozen_teacher_record

    teacher, plugins = (config.elec or {}).get("teacher_checkpoint"), os.path.join(run_dir, PLUGINS_FILE)
    if not teacher or not os.path.isfile(plugins):
        return []
    change = changed_frozen_teacher(read_run_record(plugins), {"elec": {"frozen_teacher": frozen_teacher_record(teacher)}})
    return [f"the frozen teacher: {change}"] if change else []


def _same_experiment(config: ExperimentConfig, other_run_dir: str) -> bool:
    """Whether ``other_run_dir`` finished a run of the same config (run dir and progress bar aside)."""
    return os.path.exists(os.path.join(other_run_dir, RESULTS_FILE)) and not _differences(config, other_run_dir)


def mean_std(values: List[float]) -> Dict[str, float]:
    """Mean and sample standard deviation (n - 1 in the denominator; 0 for one value) of the
    values that are not None / NaN; ``n`` says how many there were."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return {"mean": float("nan"), "std": float("nan"), "n": 0}
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": statistics.fmean(values), "std": std, "n": len(values)}


def summarize(runs: Dict[str, List[Dict]], metrics: Sequence[str] = ("auc", "logloss")) -> Dict[str, Dict]:
    """``{variant: [results per seed]}`` -> ``{variant: {metric: {mean, std, n}}}`` over test metrics."""
    table = {}
    for variant, seeds in runs.items():
        row = {}
        for metric in metrics:
            row[metric] = mean_std([r["test"].get(metric) for r in seeds])
            cold = [r["test"].get(f"cold/{metric}") for r in seeds if f"cold/{metric}" in r["test"]]
            if cold:
                row[f"cold/{metric}"] = mean_std(cold)
        row["valid_auc"] = mean_std([r["valid"]["auc"] for r in seeds])
        table[variant] = row
    return table


def markdown_table(table: Dict[str, Dict], columns: Sequence[str], baseline: Optional[str] = None) -> str:
    """Rows = variants; cells = mean ± std (the mean alone over one seed); ``Δ AUC`` relative to ``baseline`` when
    given."""
    header = ["variant"] + list(columns) + (["Δ AUC vs " + baseline] if baseline else [])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    # a cell over fewer values than the others (a seed's metric missing) says so
    most = max((row[c].get("n", 0) for row in table.values() for c in columns if row.get(c)), default=0)
    for variant, row in table.items():
        cells = [variant]
        for column in columns:
            cell = row.get(column)
            fewer = f" (n={cell['n']})" if cell is not None and cell.get("n", most) < most else ""
            if cell is None:
                cells.append("–")
            else:  # one seed has no spread to show (its std is 0 by definition, not measured)
                spread = f" ± {cell['std']:.4f}" if cell.get("n", 2) > 1 else ""
                cells.append(f"{cell['mean']:.4f}{spread}{fewer}")
        if baseline:
            base = table.get(baseline, {}).get("auc", {}).get("mean")
            mine = row.get("auc", {}).get("mean")
            # an AUC undefined over every seed (a one-class test split) is NaN, which is truthy: "+nan%" was shown
            known = all(isinstance(v, (int, float)) and math.isfinite(v) for v in (base, mine)) and base != 0
            cells.append(f"{100 * (mine - base) / base:+.2f}%" if known else "–")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine_record() -> Dict:
    """The machine a table was computed on (:func:`~recsys_llm.env.machine_description`) and its torch, fbgemm-gpu
    and torchrec versions: the same code and seeds gave +both +0.49% on an Intel Xeon and +0.59% on an AMD EPYC
    (docs/results.md), and the tables' JSONs named only the commit."""
    from recsys_llm.env import installed_versions, machine_description

    return {**machine_description(), "versions": {name: v for name, v in installed_versions().items() if v}}


def write_outputs(out_dir: str, name: str, payload: Dict, markdown: str) -> None:
    """``<name>.json`` (with the code's commit, ``git_commit``, and the machine, ``machine``: CPU, platform and
    library versions) and ``<name>.md`` in ``out_dir``."""
    from recsys_llm.env import source_commit

    payload = {**payload, "git_commit": source_commit(ignore=("results",)), "machine": machine_record()}
    os.makedirs(out_dir, exist_ok=True)
    write_text_atomically(os.path.join(out_dir, f"{name}.json"), json.dumps(payload, indent=2, sort_keys=True, default=float))
    write_text_atomically(os.path.join(out_dir, f"{name}.md"), markdown + "\n")
    print(markdown)


def write_table(out_dir: str, name: str, payload: Dict, markdown: str) -> None:
    """:func:`write_outputs`, then ``<name>.png`` drawn by :func:`draw_table` from the JSON just written, as
    :mod:`experiments.replot` draws it again later: a run and a replot give the same figure."""
    write_outputs(out_dir, name, payload, markdown)
    json_path = os.path.join(out_dir, f"{name}.json")
    with open(json_path, encoding="utf-8") as handle:
        draw_table(os.path.join(out_dir, f"{name}.png"), json.load(handle), json_path)


def draw_table(png_path: str, payload: Mapping[str, Any], source: str) -> None:
    """Draws the PNG of a table JSON's ``payload`` (read from ``source``) with :func:`plot_auc`: the tables and the
    title are those of ``table_figure`` in the ``experiments.<name>`` that its ``command`` names.

    Raises:
        SystemExit: ``payload`` is no experiment table (a demo's results, say) or lacks a key the plot needs; the
            message names ``source`` and the key.
    """
    for key in ("table", "command"):
        if key not in payload:
            raise SystemExit(f"{source}: no key '{key}': not a table of experiments/ (a demo's demo_results.json "
                             "has its own plot, drawn by `recsys-llm demo`); skipped")
    words = str(payload["command"]).split()
    module = words[2] if len(words) > 2 and words[:2] == ["python", "-m"] else ""
    try:
        table_figure = importlib.import_module(module).table_figure if module.startswith("experiments.") else None
    except (ImportError, AttributeError):
        table_figure = None
    if table_figure is None:
        raise SystemExit(f"{source}: its 'command' ({payload['command']!r}) names no experiment that draws a table")
    tables, title = table_figure(payload, source)
    plot_auc(png_path, tables, title)


def table_key(payload: Mapping[str, Any], path: str, source: str) -> Any:
    """``payload``'s value at the dotted ``path`` (``table.fm.plain.auc``).

    Raises:
        SystemExit: naming ``source`` and the missing key (a JSON of an older version of the script).
    """
    value: Any = payload
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            raise SystemExit(f"{source}: no key '{path}', which the plot needs (written by an older version of "
                             "the experiment); rerun the experiment to draw it")
        value = value[key]
    return value


def table_backbones(payload: Mapping[str, Any], source: str) -> List[str]:
    """The backbones of ``payload['table']`` in the order the run built it, which the JSON's sorted keys lost: as
    ``backbones_done`` lists them, else as the ``--backbones`` of ``command`` (else :data:`BACKBONES`) do.

    Raises:
        SystemExit: no ``table`` (see :func:`table_key`).
    """
    table = table_key(payload, "table", source)
    order = payload.get("backbones_done")
    if order is None:
        words = str(payload.get("command", "")).split()
        order = list(BACKBONES)
        if "--backbones" in words:
            given = words[words.index("--backbones") + 1:]
            order = given[:next((i for i, word in enumerate(given) if word.startswith("-")), len(given))]
    return [b for b in order if b in table] + sorted(set(table) - set(order))


def auc_row(payload: Mapping[str, Any], path: str, source: str) -> Dict:
    """The row at ``path`` of ``payload`` (``table.fm.plain``), which :func:`plot_auc` reads the AUC mean and std of.

    Raises:
        SystemExit: it lacks either (see :func:`table_key`).
    """
    for stat in ("mean", "std"):
        table_key(payload, f"{path}.auc.{stat}", source)
    return table_key(payload, path, source)


def ordered_table(payload: Mapping[str, Any], source: str, variants: Sequence[str]) -> Dict[str, Dict[str, Dict]]:
    """``payload['table']`` (``{backbone: {variant: row}}``) as the run built it: backbones in
    :func:`table_backbones`' order, variants in ``variants``' (any other after them).

    Raises:
        SystemExit: a key the plot needs is missing (see :func:`table_key`).
    """
    ordered = {}
    for backbone in table_backbones(payload, source):
        row = table_key(payload, f"table.{backbone}", source)
        names = [v for v in variants if v in row] + [v for v in row if v not in variants]
        ordered[backbone] = {v: auc_row(payload, f"table.{backbone}.{v}", source) for v in names}
    return ordered


def plot_auc(out_path: str, tables: Dict[str, Dict[str, Dict]], title: str) -> None:
    """Grouped bars: one group per backbone, one bar per variant, error bars = std over seeds; the AUC axis starts
    near the lowest bar (its label says where: the gains are a fraction of a percent) and holds every error bar."""
    from matplotlib.figure import Figure

    backbones = list(tables)
    variants = list(next(iter(tables.values())))
    width = 0.8 / max(1, len(variants))
    fig = Figure(figsize=(max(6, 1.6 * len(backbones)), 4.6))
    ax = fig.subplots()
    for i, variant in enumerate(variants):
        means = [tables[b][variant]["auc"]["mean"] for b in backbones]
        stds = [tables[b][variant]["auc"]["std"] for b in backbones]
        ax.bar([x + i * width for x in range(len(backbones))], means, width, yerr=stds, label=variant, capsize=2)
    spans = [(tables[b][v]["auc"]["mean"], tables[b][v]["auc"]["std"]) for b in backbones for v in variants]
    spans = [(mean, std) for mean, std in spans if math.isfinite(mean) and math.isfinite(std)] or [(0.5, 0.0)]
    bottom = min(mean - std for mean, std in spans) - 0.01
    ax.set_ylim(bottom, max(mean + std for mean, std in spans) + 0.01)
    ax.set_xticks([x + width * (len(variants) - 1) / 2 for x in range(len(backbones))])
    ax.set_xticklabels(backbones)
    ax.set_ylabel(f"test AUC, mean ± std over seeds\n(axis from {bottom:.3f})")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1), ncol=min(len(variants), 4), frameon=False)
    fig.tight_layout()
    save_figure_atomically(fig, out_path, dpi=120, bbox_inches="tight")  # a legend wider than the axes (6 variants)
