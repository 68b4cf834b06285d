"""Jobs on a trained run (evaluate, export, teacher outputs): open its checkpoint on every rank,
load the sharded model, evaluate a split."""

import dataclasses
import os
import sys
import warnings
from typing import Any, Dict, NamedTuple, Optional, Sequence

from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_files import first_file_columns
from recsys_llm.data.schema import DatasetSchema, schema_beside
from recsys_llm.train.checkpoint import load_checkpoint, resolve_checkpoint, run_config_of
from recsys_llm.train.config import ConfigError, ExperimentConfig, check_same_model
from recsys_llm.train.distributed import DistContext, init_distributed
from recsys_llm.train.eval_forwards import use_pipelined_eval
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import evaluate
from recsys_llm.train.process import float32_default_dtype, seed_everything, set_cpu_float_mode
from recsys_llm.train.run_data import load_or_generate_schema, metric_subsets
from recsys_llm.train.run_records import (check_same_config_on_every_rank, check_trained_on,
                                          check_trained_with_these_vectors, split_row_vector_changes,
                                          trained_row_vectors, trained_vocabularies)
from recsys_llm.train.sharding import shard_model
from recsys_llm.train.sharding_config import CPU_SPARSE_OPTIMIZERS, loadable_on_cpu
from recsys_llm.train.task_builder import build_task, check_plugin_columns, plugin_extras


class TrainedRun(NamedTuple):
    """A trained run, opened by :func:`open_trained_run` on every rank."""

    checkpoint: str  # the complete checkpoint directory
    ctx: DistContext
    schema: DatasetSchema


def open_trained_run(config: ExperimentConfig, checkpoint: str) -> TrainedRun:
    """For a job on a trained run (evaluate, export, teacher outputs): resolves ``checkpoint``
    (a run directory gives its best, else latest, checkpoint), checks that it was trained with
    ``config``'s model, joins the process group and loads the schema.

    Raises:
        FileNotFoundError: no complete checkpoint there.
        ConfigError: the run that wrote it trained another model, or on a data set of
            another schema (its ``plugins.json`` records the schema fingerprint).
    """
    checkpoint = resolve_checkpoint(checkpoint)
    saved_config = run_config_of(checkpoint)
    check_same_model(config, saved_config)
    set_cpu_float_mode(config.train)
    ctx = init_distributed(config.train.device)
    check_same_config_on_every_rank(config)  # each rank loads and shards the model its own config builds
    schema = load_or_generate_schema(config, ctx, generate=False)
    check_trained_on(schema, saved_config, checkpoint)
    return TrainedRun(checkpoint, ctx, schema)


def load_trained_model(config: ExperimentConfig, run: TrainedRun) -> nn.Module:
    """The DMP-sharded task of ``config`` with the run's checkpoint loaded (collective; any
    world size: the shards are re-cut). Every weight comes from the checkpoint, frozen entity
    tables and a frozen teacher included, so their source files are not read again. The tables
    are never stepped, so a table optimizer that CPU kernels lack (a run trained on CUDA with
    ``optim.sparse=adam``), or sharding types and kernels they lack (row-wise, unified memory), do not
    keep a CPU host from evaluating or exporting the run; nor does the ``sharding.plan_file`` it trained with
    (its ranks, or a file since moved): the tables are planned afresh.

    Raises:
        ConfigError: LLaCTR vectors, or ELEC per-row vectors attached to the train split, other than the run
            trained with (:func:`~recsys_llm.train.run_records.check_trained_with_these_vectors`).
    """
    built = build_task(config, run.schema, run.ctx.device)
    check_trained_with_these_vectors(run.checkpoint, built.plugins)  # a moved vector file, not other vectors
    optim = config.optim
    if run.ctx.device.type == "cpu" and optim.sparse not in CPU_SPARSE_OPTIMIZERS:
        # a run trained on CUDA with a table optimizer FBGEMM's CPU kernels lack: never stepped here
        optim = dataclasses.replace(optim, sparse="sgd")
    sharding = loadable_on_cpu(config.sharding) if run.ctx.device.type == "cpu" else config.sharding
    # planned afresh: the run's sharding.plan_file placed its tables on its training ranks (maybe more than this
    # job's, and the file may have moved since), while any plan re-cuts the checkpoint
    sharding = dataclasses.replace(sharding, plan_file="")
    model, _ = shard_model(built.task, run.ctx.device, run.ctx.world_size, sharding, optim, config.data.batch_size)
    load_checkpoint(run.checkpoint, model, None, restore_rng=False)
    return model


def _check_split_prepared_like(split: str, run: TrainedRun) -> None:
    """Refuses a ``--split`` path beside a ``schema.json`` (a prepared output: the directory, or the one holding
    the file) of another schema or other vocabularies than the run trained on, which would read other rows of its
    tables for the same values (:func:`~recsys_llm.train.run_records.check_trained_on`)."""
    schema = schema_beside(split)
    if schema is not None and os.path.abspath(schema.root) != os.path.abspath(run.schema.root):
        check_trained_on(schema, run_config_of(run.checkpoint), f"--split {split}")
        if run.ctx.rank == 0:
            recorded = trained_vocabularies(run_config_of(run.checkpoint))
            for note in schema.grown_vocabularies(recorded, f"the model of {run.checkpoint}"):
                warnings.warn(note, stacklevel=2)


def check_splits_row_vectors(config: ExperimentConfig, splits: Sequence[str], run: TrainedRun) -> None:
    """Refuses a split of ``splits`` whose attached per-row LLM vectors (``semantics export --attach-dir``) are of
    another provenance than those the run trained on (its ``plugins.json``: ``elec.row_vectors``). The train split's
    are checked when the model is built (and named so there, when they differ too); ``splits`` (of the run's data, or
    a file of another day) are those a job on the trained run reads: their files may have been mixed since.

    Raises:
        ConfigError: naming the split and what differs.
    """
    trained = trained_row_vectors(run.checkpoint)
    changed = {split: split_row_vector_changes(trained, run.schema, split) for split in splits}
    changed = {split: changes for split, changes in changed.items() if changes}
    train_split = config.data.train_split
    if changed and train_split and not split_row_vector_changes(trained, run.schema, train_split):
        split, changes = next(iter(changed.items()))
        raise ConfigError(
            f"split {split}: its per-row LLM vectors are not the ones the run of {run.checkpoint} trained on "
            f"({'; '.join(changes)}); attach the vectors it trained on (semantics export --attach-dir with its "
            "adapted LLM)"
        )


def run_evaluation(config: ExperimentConfig, checkpoint: str, split: Optional[str] = None,
                   student: bool = False) -> Dict[str, Any]:
    """Loads ``checkpoint`` (any world size: shards are re-cut) and evaluates one split (every rank).

    Args:
        config (ExperimentConfig): the experiment the checkpoint came from.
        checkpoint (str): a complete checkpoint directory, or a run directory (its best model,
            else its latest checkpoint).
        split (Optional[str]): split to evaluate (default ``data.test_split``).
        student (bool): of an ELEC distillation run, the student alone, as it serves: the split needs no teacher
            input (LLM vectors, offline teacher outputs), and ``loss`` is the student's BCE without the KD terms.

    Returns:
        Dict[str, Any]: metrics (with ``cold/*`` when the data marks cold items).

    Raises:
        ValueError: no ``split`` given and ``data.test_split`` is '' (a run without a test split), or
            ``student`` for a run that is no distillation.

    It runs with float32 as torch's default dtype and puts the caller's (a notebook's float64) back after it.
    """
    with float32_default_dtype():
        return _run_evaluation(config, checkpoint, split, student)


def _run_evaluation(config: ExperimentConfig, checkpoint: str, split: Optional[str], student: bool) -> Dict[str, Any]:
    """:func:`run_evaluation` under float32 as torch's default dtype."""
    distillation = (config.elec or {}).get("task") == "distill"
    if student and not distillation:
        raise ValueError(f"--student: {checkpoint} is no ELEC distillation run (elec.task=distill), so it has no "
                         "student apart from its model; evaluate it without --student")
    split = split or config.data.test_split
    if not split:  # else read as a Parquet path '', which names neither the setting nor the flag
        raise ValueError("no split to evaluate: data.test_split is '' (the run reports no test split); name a split "
                         "of the run's data or a Parquet file or directory, e.g. evaluate --split "
                         "data/day3/test.parquet (the next day's rows prepared with `prepare tabular --like` the "
                         "run's data)")
    run = open_trained_run(config, checkpoint)
    ctx, schema = run.ctx, run.schema
    seed_everything(config.train.seed)
    data = config.data
    if split not in schema.splits:
        if not os.path.exists(split):  # before the model loads
            raise ValueError(f"--split {split}: not a split of schema {schema.name!r} (splits: "
                             f"{', '.join(sorted(schema.splits))}) nor a Parquet file or directory")
        _check_split_prepared_like(split, run)  # a file or directory of other prepared data: ids as the run's
    if not student:  # the student reads no teacher input
        teacher_side = [name for name in plugin_extras(config) if name not in first_file_columns(schema, split)]
        if teacher_side and distillation:
            raise ConfigError(f"--split {split}: no column(s) {teacher_side}, which the distillation's teacher side "
                              "reads; evaluate the student alone, as it serves, with evaluate --student")
        if split in schema.splits:
            check_plugin_columns(config, schema, [split])
        check_splits_row_vectors(config, [split], run)
    if schema.label not in first_file_columns(schema, split):  # before the model loads
        raise ValueError(f"--split {split}: its rows have no label column {schema.label!r}, so there is nothing to "
                         "evaluate against; to score rows without labels, export the run (`recsys-llm export "
                         f"--checkpoint {checkpoint} --output ARTIFACT`) and run `recsys-llm score --artifact ARTIFACT "
                         "--data DIR`")
    teacher_inputs = [] if student else plugin_extras(config)
    extras = list(data.extras) + teacher_inputs + list(metric_subsets(config, schema).values())
    reader = ParquetBatchReader(
        schema, split, data.eval_batch_size or data.batch_size, rank=ctx.rank, world_size=ctx.world_size,
        extras=sorted(set(extras)), validate=data.validate, prefetch=data.prefetch, pin_memory=ctx.device.type == "cuda",
        equal_batches=False,
    )
    if ctx.is_main and config.train.progress:  # building the shards and loading them takes minutes for large tables
        print(f"[recsys_llm] evaluate: loading {run.checkpoint} on {ctx.world_size} rank(s)", file=sys.stderr,
              flush=True)
    model = load_trained_model(config, run)
    # the student's own forward (a CTRTask: BCE and its own loss terms) on its sharded tables; one by one, as the
    # training pipeline takes the whole model
    evaluated = get_unwrapped_module(model).student if student else model
    results = evaluate(evaluated, reader, ctx.device, CTRMetrics(metric_subsets(config, schema)), description=split,
                       progress=config.train.progress,
                       pipelined=not student and use_pipelined_eval(config.train.pipelined_eval, ctx.device))
    results["checkpoint"] = run.checkpoint
    results["split"] = split
    if student:
        results["model"] = "student"
    return results
