"""``recsys-llm export``: the servable artifact of a trained run (e.g. the ELEC student alone).

Loads the checkpoint into the sharded task exactly as training built it (any world size),
gathers the full state dict into rank 0's memory (one shard at a time), keeps the student's
tensors (``student.*`` of a teacher-student task; the whole task for a plain backbone or an
entity-table gain network), and writes them with a ``torch.export`` program of the dense part
(:mod:`recsys_llm.serving`). A gain network reading per-row vectors (which needs the LLM at
inference) is refused: export its student. One reading frozen entity tables is exported with
those tables (the LLM ran offline, once per entity).

Example::

    recsys-llm export --checkpoint runs/elec_deepfm --output exports/student   # the run's own config.yaml
    torchrun --nproc_per_node 2 -m recsys_llm.cli export --checkpoint ... --output ...
"""

import argparse
import gc
import json
import os
import shlex
import sys
from typing import Any, Dict

import yaml
from tqdm import tqdm

from recsys_llm.cli.data import integer_at_least


def export_run(config: Any, checkpoint: str, output: str, state_only: bool = False,
               table_dtype: str = "trained", mixed_precision: str = "fp32") -> Dict[str, Any]:
    """Exports the served part of a trained run (collective: call on every rank).

    Args:
        config (ExperimentConfig): the run's config.
        checkpoint (str): checkpoint or run directory.
        output (str): export directory (written by rank 0).
        state_only (bool): write the whole trained task's full state dict only
            (``model.safetensors``), e.g. a gain network to load as a frozen teacher
            (``elec.teacher_checkpoint``); no serving program.
        table_dtype (str): the served tables' dtype (``--table-dtype``): ``"trained"`` (as trained), ``"int8"`` or
            ``"int4"`` (quantized rows with a per-row scale and bias, :mod:`recsys_llm.serving.quantized_tables`).
        mixed_precision (str): the dense program's precision (``--mixed-precision``): ``"fp32"``, or ``"bf16"``
            (captured under CPU bfloat16 autocast, :class:`~recsys_llm.serving.export.AutocastHead`).

    Returns:
        Dict[str, Any]: the artifact's ``config.json`` on rank 0, ``{}`` elsewhere.
    """
    import torch

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.modules.elec import ELECConfig, gain_shape_settings
    from recsys_llm.modules.teacher_student import TeacherStudentTask
    from recsys_llm.serving import (
        check_export_output,
        check_servable,
        export_task,
        materialize_meta,
        sub_state,
        unsharded_state_dict,
    )
    from recsys_llm.serving.quantized_tables import TRAINED, check_table_dtype
    from recsys_llm.train.checkpoint import checkpoint_digests
    from recsys_llm.train.run_records import trained_llm_provenance, trained_row_vectors
    from recsys_llm.train.distributed import barrier
    from recsys_llm.train.mixed_precision import autocast_dtype
    from recsys_llm.train.task_builder import build_task
    from recsys_llm.train.trained_run import load_trained_model, open_trained_run

    check_table_dtype(table_dtype)  # before any work (every rank)
    autocast_dtype(mixed_precision, torch.device("cpu"), setting="export: --mixed-precision")
    for option, value, default in (("--table-dtype", table_dtype, TRAINED),
                                   ("--mixed-precision", mixed_precision, "fp32")):
        if state_only and value != default:
            raise ValueError(f"export: {option} {value} applies to a served export; --state-only writes the "
                             "trained task's weights as they are (for elec.teacher_checkpoint): drop one of the two")
    check_export_output(output)  # before any work (every rank)
    run = open_trained_run(config, checkpoint)
    ctx, schema, checkpoint = run.ctx, run.schema, run.checkpoint
    task = None
    if not state_only:  # a task that needs an LLM or a teacher at inference, refused before any loading (every rank)
        task = build_task(config, schema, torch.device("cpu")).task  # tables on meta: nothing allocated yet
        check_servable(task.student if isinstance(task, TeacherStudentTask) else task)
    if ctx.is_main:
        _say(f"loading {checkpoint} on {ctx.world_size} rank(s) and gathering the tables into rank 0")
    # a served student alone: its teacher's tables (entity vectors, ...) are not gathered into rank 0's memory
    served_prefix = "student." if isinstance(task, TeacherStudentTask) else ""
    full = unsharded_state_dict(load_trained_model(config, run), prefix=served_prefix)  # collective
    # the sharded model is garbage now, but reference cycles (DMP's modules and optimizer) kept it, its tables
    # included, beside the gathered copy until the process ended: 2x the tables' memory while the artifact is written
    gc.collect()
    written: Dict[str, Any] = {}
    if ctx.is_main:
        size = sum(v.numel() * v.element_size() for v in full.values())
        row_bytes = {"int8": "D + 4", "int4": "D / 2 + 4"}.get(table_dtype)  # values, then float16 scale and bias
        quantizing = "" if row_bytes is None else (f", the tables quantized to {table_dtype} ({row_bytes} bytes a row "
                                                   "for FP32's 4 D)")
        _say(f"writing {output} ({tqdm.format_sizeof(size, 'B', 1024)} of trained weights{quantizing}"
             f"{'' if state_only else ', then the dense part traced with torch.export'})")
    # which LLM's vectors the model learned from: after an LLM upgrade, told from the artifact alone
    llm_provenance = trained_llm_provenance(checkpoint) if ctx.is_main else None
    llm_entry = {"llm_provenance": llm_provenance} if llm_provenance else {}
    if ctx.is_main and state_only:
        metadata = {"checkpoint": os.path.abspath(checkpoint), "checkpoint_sha256": checkpoint_digests(checkpoint),
                    "model": config.model.to_dict(), "schema_fingerprint": schema.fingerprint(),
                    "vocabularies": schema.vocabulary_records(), **llm_entry}
        if config.elec is not None:  # what shapes the gain network: a frozen-teacher run names what differs
            metadata["elec"] = gain_shape_settings(ELECConfig.from_dict(config.elec, source="elec"))
            row_vectors = trained_row_vectors(checkpoint)
            if row_vectors:  # the per-row LLM vectors it trained on: a frozen-teacher run's data must hold them
                metadata["row_vectors"] = row_vectors
        written = _write_state(full, output, metadata)
    elif ctx.is_main:
        if isinstance(task, TeacherStudentTask):  # its tables on meta, filled below
            served, state = task.student, sub_state(full, "student.")
        else:
            served, state = task, full
        served = materialize_meta(served, torch.device("cpu"))
        # assign: the served task takes the gathered tensors (cloned, on CPU) instead of a copy of them,
        # so the tables are held once more than the checkpoint's, not twice, while the artifact is written
        served.load_state_dict(state, assign=True)
        del full, state
        reader = ParquetBatchReader(schema, config.data.train_split, 8, rank=0, world_size=1)
        example = next(iter(reader))
        metadata = {
            "schema": schema.name,
            "schema_fingerprint": schema.fingerprint(),
            "model": config.model.to_dict(),
            "training_mixed_precision": config.train.mixed_precision,  # the program's own: config.json mixed_precision
            "checkpoint": os.path.abspath(checkpoint),
            "checkpoint_sha256": checkpoint_digests(checkpoint),  # which trained state (a retrained one differs)
            "world_size_at_export": ctx.world_size,
            **llm_entry,
        }
        written = export_task(served, output, example.dense_features, example.sparse_features, metadata=metadata,
                              schema=schema, table_dtype=table_dtype, mixed_precision=mixed_precision)
    barrier()
    return written


def _say(step: str) -> None:
    """One line of progress on stderr (stdout holds the command's JSON summary)."""
    print(f"[recsys_llm] export: {step}", file=sys.stderr, flush=True)


def _write_state(state: Dict[str, Any], output: str, metadata: Dict[str, Any]) -> Dict[str, Any]:
    """``output/model.safetensors`` + ``config.json``, written into a temp directory swapped into place."""
    from safetensors.torch import save_file

    from recsys_llm.atomic_dir import atomic_directory
    from recsys_llm.serving import EXPORT_MARKER_FILES, STATE_FILE, check_export_output
    from recsys_llm.serving.artifact import STATE_ONLY_PROGRAM

    config = {"state": STATE_FILE, "num_state_tensors": len(state), "dense_program": STATE_ONLY_PROGRAM,
              "num_parameters": int(sum(v.numel() for v in state.values())), "feature_names": [], "metadata": metadata}
    check_export_output(output)
    with atomic_directory(output, "export", EXPORT_MARKER_FILES) as tmp:
        save_file({k: v.contiguous() for k, v in state.items()}, os.path.join(tmp, STATE_FILE))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            json.dump(config, handle, indent=2)
    return config


def _export(args: argparse.Namespace) -> int:
    from recsys_llm.env import check_versions
    from recsys_llm.train.checkpoint import trained_run_config
    from recsys_llm.train.config import load_config
    from recsys_llm.train.distributed import is_main_process, teardown_distributed

    check_versions()
    config = load_config(args.config or trained_run_config(args.checkpoint), args.overrides)
    written = export_run(config, args.checkpoint, args.output, state_only=args.state_only,
                         table_dtype=args.table_dtype, mixed_precision=args.mixed_precision)
    if is_main_process():
        keys = ["dense_program", "num_parameters", "num_state_tensors"]
        keys += [] if args.state_only else ["feature_names", "table_dtype", "mixed_precision"]
        print(json.dumps({"output": args.output, **{k: written[k] for k in keys}}, indent=2))
        if not args.state_only:
            # stdout is the JSON alone (``| jq``); the hint goes beside the progress lines
            print(f"inference example: {os.path.join(args.output, 'INFERENCE.md')}", file=sys.stderr)
    teardown_distributed()
    return 0


def _teacher_outputs(args: argparse.Namespace) -> int:
    from recsys_llm.train.checkpoint import trained_run_config
    from recsys_llm.train.config import load_config
    from recsys_llm.train.distributed import is_main_process, teardown_distributed
    from recsys_llm.train.teacher_outputs import write_teacher_outputs

    swallowed = [item for item in args.splits or [] if "=" in item]
    if swallowed:  # argparse gives --splits every word up to the next option
        raise ValueError(f"--splits {' '.join(args.splits)}: {swallowed} look like config overrides, not splits; end "
                         "--splits with -- before the overrides (e.g. --splits train -- data.batch_size=512)")
    config = load_config(args.config or trained_run_config(args.checkpoint), args.overrides)
    report = write_teacher_outputs(config, args.checkpoint, args.output_dir, splits=args.splits,
                                   batch_size=args.batch_size, progress=config.train.progress)
    if is_main_process():
        print(json.dumps(report, indent=2))
        print(f"offline student: {override_text('data.schema', report['schema'])} elec.task=distill "
              "elec.distill.mode=offline", file=sys.stderr)
    teardown_distributed()
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    """Adds ``export`` and ``teacher-outputs``."""
    from recsys_llm.cli.semantics import show_defaults
    from recsys_llm.cli.train import RUN_CONFIG_HELP

    export = subparsers.add_parser(
        "export",
        help="export the served model of a trained run: a plain or LLaCTR model (FIE frozen), an ELEC student, "
             "or an ELEC gain network on entity tables",
    )
    export.add_argument("--config", default=None, help=RUN_CONFIG_HELP)
    export.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    export.add_argument("--output", required=True, help="export directory")
    export.add_argument("--state-only", action="store_true",
                        help="write the whole task's state dict only (e.g. a gain network for elec.teacher_checkpoint)")
    export.add_argument("--table-dtype", default="trained", metavar="{trained,int8,int4}",
                        help="the served tables' dtype: trained (default: as trained, FP32 or FP16), int8 (8-bit "
                             "rows with a per-row scale and bias, served by torchrec's quantized "
                             "EmbeddingBagCollection on CPU: D + 4 bytes a row for FP32's 4 D) or int4 (4-bit "
                             "values, two a byte, the same way: D / 2 + 4 bytes a row)")
    export.add_argument("--mixed-precision", default="fp32", metavar="{fp32,bf16}",
                        help="the dense program's precision: fp32 (default: as `evaluate` computes), or bf16 (its "
                             "matmuls and linears under CPU bfloat16 autocast: faster on CPUs with bfloat16 "
                             "arithmetic, for backbones with MLPs or cross layers, logits within bfloat16's rounding "
                             "of fp32's; served on CPU)")
    export.add_argument("overrides", nargs="*",
                        help="config overrides section.key=value (value parsed as YAML), e.g. data.eval_batch_size=8192")
    export.set_defaults(func=_export)

    outputs = subparsers.add_parser(
        "teacher-outputs",
        help="write split copies with a trained teacher's logits and representations (ELEC offline distillation)",
    )
    outputs.add_argument("--config", default=None, help=RUN_CONFIG_HELP.replace("the run", "the teacher's run", 1))
    outputs.add_argument("--checkpoint", required=True, help="checkpoint directory or run directory")
    outputs.add_argument("--output-dir", required=True, help="where the split copies and schema.json go")
    outputs.add_argument("--splits", nargs="*", default=None, help="splits to cover (default: all)")
    outputs.add_argument("--batch-size", type=integer_at_least(1), default=4096, help="rows per teacher call")
    outputs.add_argument("overrides", nargs="*",
                        help="config overrides section.key=value (value parsed as YAML), e.g. data.eval_batch_size=8192")
    outputs.set_defaults(func=_teacher_outputs)
    show_defaults(outputs)  # --batch-size


def override_text(key: str, value: str) -> str:
    """``key=value`` as a shell word that ``train`` reads back as ``value``: YAML-quoted where YAML would read the
    text otherwise (a ``#`` after a space starts a comment, ``yes`` is a boolean), then shell-quoted (spaces)."""
    try:
        plain = yaml.safe_load(value) == value and " #" not in value and not value.startswith("#")
    except yaml.YAMLError:
        plain = False
    written = value if plain else "'" + value.replace("'", "''") + "'"
    return shlex.quote(f"{key}={written}")
