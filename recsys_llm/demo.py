"""``recsys-llm demo``: the main job end to end on the embedded synthetic data.

1. generates the data when it is missing (click probability driven by the semantic match
   of user interests and item text; 10% of items never occur in training);
2. trains plain DeepFM (sharded EBCs, pipelined training, early stopping);
3. LLaCTR: encodes one vector per field with the offline LLM (``semantics encode``) and
   trains DeepFM + FRE + FIE (an ``llactr:`` config section);
4. ELEC: adapts the LLM to clicks on a sample of rows (``semantics adapt``), exports one
   vector per user (profile text) and per item (title and description) with
   ``semantics export --granularity entity --output pooled`` and trains the gain network that reads them
   from frozen, sharded tables (an ``elec:`` config section with ``entity_tables``);
5. ELEC's servable student: plain DeepFM distilled from the trained gain network (frozen,
   ``export --state-only``) on the training rows and on as many label-free (user, item)
   pairs, each batch's users with items drawn from the data's item catalogue, cold items
   included (``elec.distill.swap_fields`` / ``swap_catalog``); it serves without any LLM vector;
6. exports the student alone (``export``, into ``served/``) and scores the test split with that artifact as
   serving would (``score``): its AUC beside the trained student's (``served/auc``, ...);
7. prints AUC / LogLoss overall and on cold items, and writes ``demo_results.{json,png}``.

A step's output in the run directory is reused only when it was made with the same inputs, so
a second ``make demo`` only retrains what is missing: each finished variant's run when its
``config.yaml`` has the same settings (config file, overrides, data directory and ``--rows``
included, ``config_differences``; ``REUSE_FREE_KEYS`` may differ) and its ``plugins.json`` records the
data now in the data directory (``run_records.data_differences``: not the directory prepared again with other rows),
the LLM outputs (``llm/``) when
``llm/demo_llm.json`` records the same model (its files' fingerprint); an unfinished run resumes
under ``recsys-llm train``'s rules. A run directory made with other settings or another LLM is
refused, naming what differs (other overrides, data or LLM: before any work): pass another
``--run-dir`` (or delete that one).
Each LLM step prints the equivalent command line, each training a line naming its variant and run
directory (``== DeepFM: training into runs/demo/plain``) and then its test AUC; a step that fails ends the demo with its
one-line error (exit code 2 from the CLI).
"""

import json
import math
import os
import textwrap
from typing import Any, Dict, List, Optional, Sequence

from recsys_llm.atomic_dir import check_no_file_above, save_figure_atomically, write_text_atomically
from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS
from recsys_llm.train.config import ConfigError, check_resumable, config_differences, load_config, schema_json_path
from recsys_llm.train.distributed import init_distributed, launch_ranks
from recsys_llm.train.process import set_cpu_float_mode
from recsys_llm.train.run_data import load_or_generate_schema
from recsys_llm.train.run_records import RESULTS_FILE, data_differences, finished_results, strict_json
from recsys_llm.train.runner import run_training

PLAIN = "DeepFM"
LLACTR = "DeepFM + LLaCTR (FRE + FIE)"
ELEC = "DeepFM + ELEC gain (user + item LLM vectors)"
STUDENT = "DeepFM ELEC student (no LLM at serving)"
# the entities whose LLM vectors the gain network reads, and the fields each one's text is made of
ENTITY_TEXT_FIELDS = {"user_id": ["user_id"], "item_id": ["item_id", "item_category"]}
ADAPT_FIELDS = [field for fields in ENTITY_TEXT_FIELDS.values() for field in fields]  # the LLM adapts on their text

LLM_RECORD = "demo_llm.json"  # in run_root/llm: the model the LLM outputs there were made with
# settings that change no result: a finished run trained with other values is still reused
# settings that change no finished result, and the demo's own LLM outputs under the run directory
# (``llm/demo_llm.json`` guards those; their paths move with a moved run directory)
REUSE_FREE_KEYS = ("train.run_dir", "train.resume", "train.device", "train.progress", "train.keep_checkpoints",
                   "train.checkpoint_every", "data.eval_batch_size", "data.validate", "data.prefetch",
                   "llactr.vectors_path", "elec.entity_tables", "elec.entity_vectors", "elec.teacher_checkpoint")
# settings the demo makes from its own flags (and its LLM steps read): an override of one is refused
FLAG_SETTINGS = {"data.schema": "--data-dir", "data.synthetic_rows": "--rows", "train.run_dir": "--run-dir"}
# the methods' config sections, which the demo sets for its LLaCTR and ELEC variants: an override of one is refused
METHOD_SECTIONS = ("llactr", "elec")
NEW_RUN_DIR = ("pass another --run-dir for this demo (`make demo RUNS_DIR=...`), or delete {run_root} to start it "
               "over")


def _check_overrides(overrides: Sequence[str]) -> None:
    """Raises when an override sets one of ``FLAG_SETTINGS``: it would beat the flag for the training
    runs only (``data.schema``: every variant trained on other data than the LLM steps read); or a
    setting of ``METHOD_SECTIONS``: it would make the plain DeepFM a method's run (which fails on the
    settings the demo gives the method's own variants only), and the demo's settings would beat it there.

    Raises:
        ConfigError: naming the override and the flag to use instead (or what the demo sets).
    """
    for override in overrides:
        key = override.split("=", 1)[0].strip()
        if key.split(".", 1)[0] in METHOD_SECTIONS:
            raise ConfigError(f"the demo's override {override} sets a setting of LLaCTR or ELEC, which the demo sets "
                              "itself for those variants (its overrides apply to every variant, the plain DeepFM "
                              "included); to train a method with other settings, use `recsys-llm train`")
        if key in FLAG_SETTINGS:
            raise ConfigError(f"the demo's override {override} sets what {FLAG_SETTINGS[key]} sets (for the trainings "
                              f"and the LLM steps alike): pass {FLAG_SETTINGS[key]} instead")


class DemoStepError(ValueError):
    """A step of the demo (a ``recsys-llm`` sub-command) refused its input or failed: the CLI
    shows it as one line with exit code 2, as the sub-command's own errors."""


def _cli(argv: List[str]) -> None:
    """Runs ``recsys-llm argv`` in this process.

    Raises:
        DemoStepError: the sub-command's error (a user error of the CLI) with the step's name, or its
            exit code; with ``RECSYS_LLM_TRACEBACK=1`` set, the sub-command's own exception.
    """
    from recsys_llm.cli import TRACEBACK_ENV, USER_ERRORS
    from recsys_llm.cli import main as cli_main

    print("$ recsys-llm " + " ".join(argv), flush=True)
    step = " ".join(arg for arg in argv[:2] if not arg.startswith("-"))
    asked = os.environ.get(TRACEBACK_ENV)
    os.environ[TRACEBACK_ENV] = "1"  # the sub-command raises its error, which the demo reports once
    try:
        code = cli_main(argv)
    except USER_ERRORS as error:
        if asked not in (None, "", "0"):
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        raise DemoStepError(f"step `recsys-llm {step}` failed: {message}") from error
    finally:
        if asked is None:
            del os.environ[TRACEBACK_ENV]
        else:
            os.environ[TRACEBACK_ENV] = asked
    if code:
        raise DemoStepError(f"step `recsys-llm {' '.join(argv)}` exited with {code}")


def _check_same_run(config: Any, run_dir: str, run_root: str) -> None:
    """Raises unless ``run_dir`` is new, an unfinished run ``config`` may resume (what ``recsys-llm train``
    checks) or holds a finished run of ``config``'s settings (``REUSE_FREE_KEYS`` aside).

    Raises:
        ConfigError: naming the settings that differ (``config_differences``) and what to do.
    """
    saved = os.path.join(run_dir, "config.yaml")
    if not os.path.isfile(os.path.join(run_dir, RESULTS_FILE)):
        if os.path.isfile(saved) and os.path.isdir(os.path.join(run_dir, "checkpoints")):
            # the training would refuse to resume it too, but advising train.run_dir, which the demo sets
            check_resumable(config, saved, new_run=NEW_RUN_DIR.format(run_root=run_root))
        return
    if not os.path.isfile(saved):
        raise ConfigError(f"{run_dir}: holds results of a run without its config.yaml, so the demo cannot tell "
                          f"whether they were made with these settings; {NEW_RUN_DIR.format(run_root=run_root)}")
    differences = config_differences(load_config(saved), config, REUSE_FREE_KEYS) or data_differences(config, run_dir)
    if differences:
        raise ConfigError(
            f"{run_dir}: holds a run of an earlier demo made with other settings or data ({'; '.join(differences)}); the "
            f"demo reuses a step's output only when it was made with the same inputs: "
            f"{NEW_RUN_DIR.format(run_root=run_root)}"
        )


def _say(line: str) -> None:
    """Prints ``line`` on rank 0 (the process that prints under torchrun)."""
    if launch_ranks()[0] == 0:
        print(line, flush=True)


def _train(config_path: str, overrides: Sequence[str], run_dir: str, run_root: str, variant: str) -> Dict[str, Any]:
    """Trains ``variant`` into ``run_dir`` (or reuses its finished run there), saying which variant
    the progress bars that follow belong to, and its test AUC once trained."""
    config = load_config(config_path, list(overrides) + [f"train.run_dir={run_dir}"])
    _check_same_run(config, run_dir, run_root)
    if os.path.isfile(os.path.join(run_dir, RESULTS_FILE)) and not os.path.exists(schema_json_path(config.data.schema)):
        # the data deleted since that run: generated again, as the training would, and compared, before the
        # run is reused (the LLM steps and the variants after this one read it)
        load_or_generate_schema(config, init_distributed(config.train.device))
        _check_same_run(config, run_dir, run_root)
    finished = finished_results(run_dir)
    if finished is not None:
        _say(f"== {variant}: reusing the finished run in {run_dir}")
        return finished
    _say(f"== {variant}: training into {run_dir}")
    results = run_training(config)
    test = results.get("test", {})
    if "auc" in test:
        cold = f" (cold items {test['cold/auc']:.4f})" if "cold/auc" in test else ""
        _say(f"== {variant}: test AUC {test['auc']:.4f}{cold}")
    return results


def _llm_record(llm: Optional[str]) -> Dict[str, Any]:
    """``{"llm": real path, "fingerprint": model_dir_fingerprint, "adapt_fields": the fields the LLM
    adapts on}`` of the demo's LLM steps, checked first.

    Raises:
        FileNotFoundError, ValueError: no model directory there (``read_model_config``), its weights
            are missing or damaged (``require_weight_files``), it has no tokenizer that loads (or a
            model type this transformers does not know, ``load_tokenizer``), its config names an
            attention kernel of the Hub (``require_no_hub_kernel``), it is a text-image dual encoder
            (``require_text_forward``), or its hidden states are not a multiple of 4 wide (the demo's
            entity tables hold them).
    """
    import torch
    from transformers import AutoConfig, AutoModel

    from recsys_llm.models.embedding import EMBEDDING_DIM_MULTIPLE
    from recsys_llm.semantics.encoder import default_model_path
    from recsys_llm.semantics.model_dir import (
        model_dir_fingerprint, read_model_config, require_no_hub_kernel, require_weight_files,
    )
    from recsys_llm.semantics.model_loading import load_tokenizer, require_text_forward
    from recsys_llm.semantics.pooling import hidden_width

    path = os.path.realpath(llm or default_model_path())
    config = read_model_config(path)  # before any training: a missing model fails at once
    require_weight_files(path)  # and one without whole weights (an interrupted download)
    load_tokenizer(path)  # and one without its tokenizer files (a model saved without them)
    require_no_hub_kernel(path, config, trust_remote_code=False)
    with torch.device("meta"):  # the model's modules without its weights: what it is, at no cost
        skeleton = AutoModel.from_config(AutoConfig.from_pretrained(path, local_files_only=True))
    require_text_forward(path, skeleton)  # a text-image dual encoder (CLIP) failed after the plain run
    width = hidden_width(skeleton)
    if width % EMBEDDING_DIM_MULTIPLE:
        raise ValueError(
            f"--llm {path}: its hidden states are {width} wide, and the demo puts them into frozen entity tables, "
            f"whose width must be a multiple of {EMBEDDING_DIM_MULTIPLE} (FBGEMM): use another model, or run the "
            "steps by hand (docs/usage.md, section 4) with `semantics export --projection`"
        )
    return {"llm": path, "fingerprint": model_dir_fingerprint(path), "adapt_fields": ADAPT_FIELDS}


def _check_same_llm(llm_dir: str, record: Dict[str, Any], run_root: str) -> None:
    """Raises when the LLM outputs in ``llm_dir`` were made with another model or other adapt fields
    than ``record``'s (or by an earlier version of the demo, which recorded none). A record without
    any output beside it (the first LLM step failed, e.g. on a model that does not load) guards
    nothing: another model may take its place.

    Raises:
        ConfigError: naming both models (or field lists) and what to do.
    """
    path = os.path.join(llm_dir, LLM_RECORD)
    if os.path.isdir(llm_dir) and not [name for name in os.listdir(llm_dir) if name != LLM_RECORD]:
        return
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as handle:
            saved = json.load(handle)
        if saved.get("fingerprint") != record["fingerprint"]:
            raise ConfigError(
                f"{llm_dir}: holds the LLM outputs of an earlier demo made with the model {saved.get('llm')!r} "
                f"(fingerprint {saved.get('fingerprint')}), not {record['llm']!r} (fingerprint "
                f"{record['fingerprint']}); the demo reuses a step's output only when it was made with the same "
                f"inputs: {NEW_RUN_DIR.format(run_root=run_root)}"
            )
        if saved.get("adapt_fields") != record["adapt_fields"]:
            adapted_on = f"the fields {saved['adapt_fields']}" if "adapt_fields" in saved else "every field of the rows"
            raise ConfigError(
                f"{llm_dir}: holds the LLM outputs of an earlier version of the demo, whose LLM adapted on the text of "
                f"{adapted_on}, not of the fields {record['adapt_fields']}; the demo reuses a step's output only when "
                f"it was made with the same inputs: {NEW_RUN_DIR.format(run_root=run_root)}"
            )
    elif os.path.isdir(llm_dir) and os.listdir(llm_dir):
        raise ConfigError(
            f"{llm_dir}: holds LLM outputs of an earlier version of the demo, which did not record the model they "
            f"were made with (no {LLM_RECORD}); {NEW_RUN_DIR.format(run_root=run_root)}"
        )


def _write_llm_record(llm_dir: str, record: Dict[str, Any]) -> None:
    """Writes ``llm_dir/demo_llm.json`` (rank 0, atomically) before the first LLM output."""
    if launch_ranks()[0] != 0:
        return
    os.makedirs(llm_dir, exist_ok=True)
    write_text_atomically(os.path.join(llm_dir, LLM_RECORD), json.dumps(record, indent=2))


def run_demo(
    config_path: str,
    data_dir: str,
    run_root: str,
    rows: int,
    overrides: Sequence[str] = (),
    llm: Optional[str] = None,
    with_llm: bool = True,
) -> Dict[str, Dict[str, Any]]:
    """Trains the demo's variants; returns ``{variant: results of run_training}``.

    Args:
        config_path (str): the DeepFM config (``configs/synthetic_deepfm.yaml``).
        data_dir (str): where the synthetic data lives or is generated.
        run_root (str): one run directory per variant, plus ``llm/`` for the LLM outputs.
        rows (int): rows to generate when the data is missing.
        overrides (Sequence[str]): config overrides applied to every variant.
        llm (Optional[str]): local Hugging Face model directory (default: offline MiniLM).
        with_llm (bool): False trains the plain model only.

    Outputs already in ``run_root`` are reused when they were made with the same inputs (see the
    module's docstring).

    Raises:
        ConfigError: ``run_root`` holds outputs made with other settings or another LLM, or an override
            sets what a flag sets (``FLAG_SETTINGS``).
        ValueError: ``with_llm`` under a launcher of several ranks (the LLM steps run in one process).
        FileNotFoundError: ``llm`` is no model directory (checked before any training).
        NotADirectoryError: ``run_root`` or ``data_dir`` is (or lies under) a file (checked before any work).
        DemoStepError: an LLM step failed.
    """
    _check_overrides(overrides)
    world_size = launch_ranks()[1]
    if with_llm and world_size > 1:
        raise ValueError(f"demo: its LLM steps (semantics encode, adapt) run in one process, and under torchrun each "
                         f"of the {world_size} ranks would run them whole and write the same outputs: run the demo "
                         "without torchrun, or with --no-llm (the plain DeepFM alone trains on every rank)")
    for flag, path in (("--run-dir", run_root), ("--data-dir", data_dir)):
        if os.path.exists(path) and not os.path.isdir(path):
            raise NotADirectoryError(f"{flag} {path}: a file; expected a directory (absent or one of this command's)")
        if not os.path.exists(path):
            try:
                check_no_file_above(path)
            except FileExistsError as error:
                raise NotADirectoryError(f"{flag} {error}") from None
    schema = os.path.join(data_dir, "schema.json")
    base = [f"data.schema={schema}", f"data.synthetic_rows={rows}", *overrides]
    llm_dir = os.path.join(run_root, "llm")
    llm_record = None
    if with_llm:
        llm_record = _llm_record(llm)
        _check_same_llm(llm_dir, llm_record, run_root)
    # before the LLM steps: a finished plain run would otherwise leave the first training after them
    set_cpu_float_mode(load_config(config_path, base).train)
    results = {PLAIN: _train(config_path, base, os.path.join(run_root, "plain"), run_root, PLAIN)}
    if llm_record is None:
        return results
    _write_llm_record(llm_dir, llm_record)
    model_args = ["--model", llm] if llm else []

    field_vectors = os.path.join(llm_dir, "field_vectors.safetensors")
    if not os.path.exists(field_vectors):
        _cli(["semantics", "encode", "--schema", schema, "--output", field_vectors, *model_args])
    results[LLACTR] = _train(config_path, base + [
        f"llactr.vectors_path={field_vectors}", "llactr.lambda_fre=0.1", "llactr.lambda_fie=0.1",
    ], os.path.join(run_root, "llactr"), run_root, LLACTR)

    adapted = os.path.join(llm_dir, "ctr_llm")
    if not os.path.exists(os.path.join(adapted, "provenance.json")):
        # the text of the users' and items' fields the entity exports below read (at most 111 tokens of
        # MiniLM: none is cut at the default --max-length 128); a checkpoint every 16 of its 63 steps (adapt's
        # default, 200, saves only at the end of this one epoch): a Ctrl-C loses minutes less
        _cli(["semantics", "adapt", "--schema", schema, "--output-dir", adapted, "--sample-rows", "2000",
              "--representation-dim", "64", "--fields", *ADAPT_FIELDS, "--checkpoint-every", "16", *model_args])
    from recsys_llm.semantics.vector_reader import vector_dim

    entity_overrides = []
    for entity, text_fields in ENTITY_TEXT_FIELDS.items():
        vectors = os.path.join(llm_dir, f"{entity.split('_')[0]}_vectors")  # resumes; finished chunks are kept
        # pooled states of the tuned LLM: r of an LLM tuned on 2,000 rows has lost most of the text's meaning
        _cli(["semantics", "export", "--schema", schema, "--llm", adapted, "--output-dir", vectors,
              "--granularity", "entity", "--entity-field", entity, "--entity-fields", *text_fields,
              "--output", "pooled"])
        entity_overrides.append(f"elec.entity_tables.{entity}={vectors}")
    vector_overrides = ["elec.vector_source=entity_table", f"elec.vector_dim={vector_dim(vectors)}", *entity_overrides]
    gain_dir = os.path.join(run_root, "elec_gain")
    results[ELEC] = _train(config_path, base + ["elec.task=gain", *vector_overrides], gain_dir, run_root, ELEC)

    teacher = os.path.join(llm_dir, "gain_state")
    if not os.path.exists(os.path.join(teacher, "config.json")):
        _cli(["export", "--state-only", "--config", os.path.join(gain_dir, "config.yaml"), "--checkpoint", gain_dir,
              "--output", teacher])
    catalog = os.path.join(data_dir, ITEM_CATALOG)
    if not os.path.exists(catalog):
        print(f"note: {catalog} not found (data generated by an older version): the ELEC student pairs users with the "
              "items of other rows of its batches instead; delete the data directory to generate it again", flush=True)
    student_dir = os.path.join(run_root, "elec_student")
    results[STUDENT] = _train(config_path, base + [
        "elec.task=distill", *vector_overrides, "elec.distill.mode=frozen", f"elec.teacher_checkpoint={teacher}",
        "elec.distill.alpha=20", "elec.distill.beta=0", f"elec.distill.swap_fields=[{','.join(ITEM_FIELDS)}]",
        *([f"elec.distill.swap_catalog={catalog}"] if os.path.exists(catalog) else []),
    ], student_dir, run_root, STUDENT)
    _serve_student(student_dir, os.path.join(run_root, "served"), data_dir, results[STUDENT])
    return results


def _serve_student(student_dir: str, served_dir: str, data_dir: str, results: Dict[str, Any]) -> None:
    """Exports the trained student alone into ``served_dir`` (an earlier export there is replaced) and
    scores the test split with the artifact, adding its metrics to ``results["test"]`` as ``served/...``."""
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.serving import ServedModel
    from recsys_llm.serving.scoring import score_split

    _cli(["export", "--checkpoint", student_dir, "--output", served_dir])
    print(f"$ recsys-llm score --artifact {served_dir} --data {data_dir} --split test --trust-program", flush=True)
    served = ServedModel.load(served_dir, trust_program=True)  # the program this process just exported
    report = score_split(served, DatasetSchema.load(data_dir), "test", progress=False)
    metrics = {key: report[key] for key in ("auc", "logloss", "cold/auc", "cold/logloss") if key in report}
    results["test"].update({f"served/{key}": value for key, value in metrics.items()})
    _say(f"== the served student ({served_dir}, no LLM, no teacher): test AUC {report['auc']:.4f} (trained "
         f"{results['test']['auc']:.4f}), {report['samples_per_s']:,.0f} samples/s on {report['rows']:,} rows")


def comparison_table(results: Dict[str, Dict[str, Any]]) -> str:
    """Variants x (AUC, LogLoss) on all test rows and on cold-item rows, with AUC gain vs plain."""
    header = ["variant", "AUC", "AUC cold", "LogLoss", "LogLoss cold", "AUC gain", "AUC gain cold"]
    plain = results[PLAIN]["test"]
    rows = [header]
    for name, result in results.items():
        test = result["test"]
        rows.append([name, f"{test['auc']:.4f}", f"{test.get('cold/auc', float('nan')):.4f}", f"{test['logloss']:.4f}",
                     f"{test.get('cold/logloss', float('nan')):.4f}", _gain(test, plain, "auc"),
                     _gain(test, plain, "cold/auc")])
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    noise = noise_line(plain)
    return "\n".join(lines + ([noise] if noise else []))


def _gain(test: Dict[str, Any], plain: Dict[str, Any], key: str) -> str:
    """``test[key]``'s relative gain over ``plain[key]`` as ``+1.23%``; ``-`` where either is absent or not a finite
    number (an AUC of a one-class split is NaN, which printed ``+nan%``) or the plain one is 0."""
    mine, base = test.get(key), plain.get(key)
    if not all(isinstance(v, (int, float)) and math.isfinite(v) for v in (mine, base)) or base == 0:
        return "-"
    return f"{100 * (mine / base - 1):+.2f}%"


def auc_standard_error(auc: float, num_samples: float, ctr: float) -> float:
    """The standard error of an AUC measured on ``num_samples`` rows with click rate ``ctr``
    (Hanley & McNeil, 1982); NaN when it is undefined (one class, no rows)."""
    positives, negatives = num_samples * ctr, num_samples * (1 - ctr)
    if not (positives >= 1 and negatives >= 1) or math.isnan(auc):
        return math.nan
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    variance = (auc * (1 - auc) + (positives - 1) * (q1 - auc * auc) + (negatives - 1) * (q2 - auc * auc))
    return math.sqrt(max(variance, 0.0) / (positives * negatives))


def noise_line(plain: Dict[str, float]) -> str:
    """How large an AUC gain this test split can tell from noise: the plain model's AUC standard error on all
    test rows and on the cold items (a demo of a few thousand ``--rows`` has gains of either sign)."""
    parts = []
    for prefix, rows in (("", "test rows"), ("cold/", "cold-item rows")):
        if f"{prefix}num_samples" in plain:
            error = auc_standard_error(plain[f"{prefix}auc"], plain[f"{prefix}num_samples"], plain[f"{prefix}ctr"])
            parts.append(f"±{error:.4f} on {int(plain[f'{prefix}num_samples']):,} {rows}")
    if not parts:
        return ""
    return (f"AUC standard error of {PLAIN} (Hanley & McNeil): {', '.join(parts)}; gains within about twice that "
            "are noise")


def tick_label(name: str, width: int = 20) -> str:
    """``name`` as a plot's x-tick label: a line break before its first " + ", then lines of at
    most ``width`` characters, so a long name does not run into its neighbour's."""
    return "\n".join(line for part in name.replace(" + ", "\n+ ", 1).split("\n")
                     for line in textwrap.wrap(part, width))


def write_outputs(results: Dict[str, Dict[str, Any]], run_root: str) -> List[str]:
    """``demo_results.json`` and, with matplotlib installed, ``demo_results.png``, each written
    whole or not at all (a failure keeps the earlier file)."""
    os.makedirs(run_root, exist_ok=True)
    table = {name: {k: v for k, v in r["test"].items()} for name, r in results.items()}
    json_path = os.path.join(run_root, "demo_results.json")
    write_text_atomically(json_path, json.dumps(strict_json(table), indent=2, sort_keys=True, default=float))
    written = [json_path]
    try:  # a Figure of its own, not pyplot: the calling program's backend and figures are left alone
        from matplotlib.figure import Figure
    except ImportError:
        return written
    names = list(table)
    fig = Figure(figsize=(8, 4))
    ax = fig.subplots()
    width = 0.38
    for offset, key, label in ((-width / 2, "auc", "all test rows"), (width / 2, "cold/auc", "cold items")):
        values = [table[n].get(key, float("nan")) for n in names]
        bars = ax.bar([i + offset for i in range(len(names))], values, width, label=label)
        ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_xticks(range(len(names)), [tick_label(n) for n in names], fontsize=8)
    low = min(v for n in names for v in (table[n]["auc"], table[n].get("cold/auc", 1.0)))
    bottom = max(0.0, low - 0.05)
    ax.set_ylim(bottom, None)
    ax.set_ylabel(f"test AUC (axis from {bottom:.2f})" if bottom > 0 else "test AUC")  # gaps look larger than at 0
    ax.set_title("Embedded synthetic data: plain vs LLM-enhanced DeepFM")
    ax.legend()
    fig.tight_layout()
    png_path = os.path.join(run_root, "demo_results.png")
    save_figure_atomically(fig, png_path, dpi=120)
    return written + [png_path]
