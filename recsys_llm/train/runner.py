"""One training run end to end: data, task, sharding, pipelined training, checkpoints, metrics.

:func:`run_training` is what ``recsys-llm train`` (under ``torchrun`` or alone) and the
tests call on every rank. It

1. initialises the process group (gloo on CPU, nccl on CUDA) and seeds every RNG;
2. opens rank-sharded Parquet readers for train / valid / test (generating the embedded
   synthetic data first when the config asks for it and it is missing);
3. builds the task with :func:`~recsys_llm.train.task_builder.build_task` (plain, LLaCTR or ELEC, from the config sections),
   shards it (planner + DMP + fused table optimizers) and builds the combined optimizer;
4. resumes from the run directory's newest complete checkpoint (``checkpoints/``, else a newer
   ``best/`` one) when there is one; a run that finished by using up its epochs / max_steps
   goes on when the resume gives it more, one that stopped early on patience stays finished (a
   finished one trains nothing but completes final saves a kill left undone);
5. trains on ``TrainPipelineSparseDist``, checkpointing every ``checkpoint_every`` steps and
   at every epoch end, validating every ``eval_every`` epochs with early stopping on
   validation AUC (the best model is kept in ``best/``);
6. evaluates the best model on the test split (overall, and on cold items when the data
   marks them) and writes the run directory::

       run_dir/config.yaml  plugins.json  sharding_plan.json  metrics.jsonl  results.json  training_curves.png
       run_dir/checkpoints/ckpt-N/ ...   run_dir/best/ckpt-N/ ...

Example::

    config = load_config("configs/synthetic_deepfm.yaml", ["train.epochs=1"])
    results = run_training(config)      # on every rank
    print(results["test"]["auc"])
"""

import contextlib
import dataclasses
import json
import math
import os
import sys
import time
import warnings
from typing import IO, Any, Callable, Collection, Dict, List, Optional, Set, Tuple

import numpy as np
import torch
from torch import nn
from torchrec.optim.keyed import CombinedOptimizer
from tqdm import tqdm

from recsys_llm.atomic_dir import is_temp_file_of, write_text_atomically
from recsys_llm.data.ids_per_bag import mean_ids_per_bag
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.env import job_provenance
from recsys_llm.modules.random_stream import give_rank_its_own_stream
from recsys_llm.train.checkpoint import (
    STOP_BUDGET,
    STOP_PATIENCE,
    CheckpointManager,
    TrainState,
    load_checkpoint,
    read_train_state,
)
from recsys_llm.train.config import (
    SETTINGS_KEY,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_plugin_history,
    check_resumable,
    parse_plugin_sections,
    save_config,
)
from recsys_llm.train.curves import CURVES_FILE, plot_training_curves
from recsys_llm.train.distributed import (
    DistContext,
    all_ranks_true,
    barrier,
    init_distributed,
    leave_existing_group_be,
    leave_process_group,
    run_on_every_rank,
    sum_over_ranks,
)
from recsys_llm.train.eval_forwards import use_pipelined_eval
from recsys_llm.train.init_from import (
    INIT_FROM_KEY,
    check_init_source,
    load_init_source,
    start_line,
    started_fields,
)
from recsys_llm.train.init_tables import trained_tables
from recsys_llm.train.loss_sums import LossSums
from recsys_llm.train.lr_schedule import ScheduledLearningRates
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.mixed_precision import autocast_dtype
from recsys_llm.train.pipeline import (
    DIVERGED_REMEDY, EpochStats, NonFiniteLossError, check_finite_loss, evaluate, train_epoch,
)
from recsys_llm.train.process import float32_default_dtype, seed_everything, set_cpu_float_mode
from recsys_llm.train.resume import (
    budget_spent,
    check_resumable_position,
    check_same_table_state_layout,
    reopen_for_budget,
    resume_point,
    state_for_world,
    stateful_tables,
)
from recsys_llm.train.run_data import build_readers, check_split_names, load_or_generate_schema, metric_subsets
from recsys_llm.train.run_records import (
    DATA_FINGERPRINTS_KEY,
    FINISHED_EVENT,
    METRICS_FILE,
    PLAN_FILE,
    PLUGINS_FILE,
    REDONE_KEY,
    RESULTS_FILE,
    RESUMED_EVENT,
    SCHEMA_CONTENTS_KEY,
    SCHEMA_FINGERPRINT_KEY,
    STARTED_EVENT,
    TRAIN_WINDOW_EVENT,
    VOCABULARIES_KEY,
    RunDirBusyError,
    check_data_unchanged,
    check_run_dir_is_ours,
    check_run_dir_shared,
    check_same_config_on_every_rank,
    check_same_data,
    check_same_entity_vectors,
    check_same_field_vectors,
    check_same_frozen_teacher,
    check_same_row_vectors,
    check_trained_on,
    data_fingerprints,
    earlier_throughput,
    lock_run_dir,
    read_run_record,
    resumed_frozen_teacher,
    split_file_stats,
    strict_json,
)
from recsys_llm.train.plan_report import describe_plan, plan_line, weights_text
from recsys_llm.train.planner_inputs import find_tables, table_weights
from recsys_llm.train.pooling_factors import planned_without_pooling_factors, table_pooling_factors
from recsys_llm.train.qcomms import comms_text
from recsys_llm.train.sharding import build_optimizer, dense_gradient_norm, shard_model
from recsys_llm.train.task_builder import (
    BuiltTask,
    build_task,
    check_elec_settings_are_read,
    check_offline_reads_no_vectors,
    check_row_vectors_of_splits,
    entity_vector_gaps,
    load_plugin_state,
    swapped_pairs,
)
from recsys_llm.train.train_metrics import WindowedTrainMetrics

# Called on every rank after each optimizer step (and after a checkpoint of that step).
StepHook = Callable[[TrainState], None]
LOSS_RECORD_STEPS = 50  # a `train` record of metrics.jsonl: the mean batch loss of this many steps
SLOW_SAVE_SECONDS = 10.0  # a mid-epoch checkpoint save that took this long is named under the progress bar
# a model this large (in the shards of one rank) announces its checkpoint saves and its sharding in the log,
# which would otherwise stand still for seconds to minutes (about 190 MB/s on a 2-core CPU)
NOTED_STATE_BYTES = 1 << 30
NOTED_TABLE_WEIGHTS = 100_000_000


def _local_state_bytes(model: nn.Module) -> int:
    """Bytes of this rank's share of ``model``'s state: the local shards of its sharded tables, its dense tensors."""
    total = 0
    for value in model.state_dict().values():
        shards = value.local_shards() if hasattr(value, "local_shards") else [value]
        for shard in shards:
            tensor = getattr(shard, "tensor", shard)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total


def _save_note(model: nn.Module, ctx: DistContext, train_cfg: TrainConfig) -> Optional[Callable[[str], None]]:
    """What announces a checkpoint save on rank 0, for a model whose state is ``NOTED_STATE_BYTES`` or more."""
    if not (ctx.is_main and train_cfg.progress):  # the state dict is walked only where the note can show
        return None
    size = _local_state_bytes(model)
    if size < NOTED_STATE_BYTES:
        return None
    return lambda path: tqdm.write(f"saving {path} ({size / 2**30:.1f} GiB on rank 0)", file=sys.stderr)


class _RunLog:
    """Rank 0 appends JSON lines to ``metrics.jsonl``; other ranks write nothing."""

    def __init__(self, path: str, enabled: bool) -> None:
        self._path = path
        self._enabled = enabled
        if enabled:
            _end_cut_off_line(path)

    def write(self, record: Dict[str, Any]) -> None:
        if not self._enabled:
            return
        record = strict_json({"time": round(time.time(), 3), **record})
        with open(self._path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True, default=float) + "\n")
            handle.flush()


def _end_cut_off_line(path: str) -> None:
    """Ends the last line of ``path`` when a kill cut off its record, so the next record starts a line of its own."""
    if not os.path.isfile(path) or os.path.getsize(path) == 0:
        return
    with open(path, "rb+") as handle:
        handle.seek(-1, os.SEEK_END)
        if handle.read(1) != b"\n":
            handle.write(b"\n")


def _epoch_record(stats: EpochStats, state: TrainState, world_size: int, resumed_at: int, samples: int,
                  mean_loss: Optional[float], loss_steps: int) -> Dict[str, Any]:
    """The ``epoch`` event: ``steps``, ``samples`` and ``samples_per_second`` are this job's (none in an epoch
    of 0 steps, a resume at its end), ``mean_loss`` the epoch's over all its ``loss_steps`` steps, a killed
    job's before the resume included.

    Args:
        samples (int): the rows every rank trained on (the ranks' last batches may differ by a row).
    """
    trained = stats.steps > 0
    return {
        "event": "epoch", "epoch": state.epoch, "global_step": state.global_step, "steps": stats.steps,
        "samples": samples, "mean_loss": mean_loss, "loss_steps": loss_steps,
        "samples_per_second": stats.samples_per_second * world_size if trained else None,
        **({"world_size": world_size} if trained else {}),
        **({"resumed_at_step_in_epoch": resumed_at} if resumed_at else {}),
    }


def run_training(config: ExperimentConfig, on_step: Optional[StepHook] = None) -> Dict[str, Any]:
    """Trains, validates with early stopping, tests; returns (and writes) the results (every rank).

    Args:
        config (ExperimentConfig): the experiment.
        on_step (Optional[StepHook]): called after every optimizer step with the train state.

    Returns:
        Dict[str, Any]: ``{"valid": {"auc": best validation AUC, None without one}, "test": test metrics (with
        ``cold/*``; only with a test split), "best_step", "global_step", "epochs", "samples_per_second",
        "mixed_precision", "world_size", "stopped_early", "run_dir"}``.

    It starts a process group when the process has none (ended by ``teardown_distributed``; a run that fails ends
    it, and leaves one that was there before it as it was), seeds the global random generators with
    ``train.seed`` and, with ``train.flush_denormal``, flushes subnormal floats process-wide:
    ``recsys_llm.cli.main`` puts the caller's generators and float mode back. It runs with float32 as torch's
    default dtype and puts the caller's (a notebook's float64) back when it returns or fails.
    """
    give_back_group = leave_existing_group_be()
    try:
        with float32_default_dtype():
            return _run_training(config, on_step)
    except BaseException:
        leave_process_group()  # the one it started: a search loop's next trial starts as a new process would
        raise
    finally:
        give_back_group()


def _run_training(config: ExperimentConfig, on_step: Optional[StepHook]) -> Dict[str, Any]:
    set_cpu_float_mode(config.train)
    ctx = init_distributed(config.train.device)
    seed_everything(config.train.seed)
    train_cfg = config.train
    autocast = autocast_dtype(train_cfg.mixed_precision, ctx.device)  # bf16 on a GPU without it: refused at once
    run_dir = train_cfg.run_dir  # created only once every check has passed: a refused run leaves nothing
    check_same_config_on_every_rank(config)  # another config file on one host: refused, naming the keys
    check_run_dir_shared(run_dir)  # before any rank decides from what it finds there (whether to resume, ...)
    check_run_dir_is_ours(run_dir)
    _, elec = parse_plugin_sections(config)  # before the data is made: a bad llactr / elec value is refused at once
    if elec is not None and not os.path.exists(os.path.join(run_dir, "config.yaml")):  # a new run
        check_offline_reads_no_vectors(elec)
        check_elec_settings_are_read(elec)
    schema = load_or_generate_schema(config, ctx)
    check_split_names(config, schema)  # before build_task: ELEC reads its vector width from the train split
    built = build_task(config, schema, ctx.device)
    check_row_vectors_of_splits(config, schema, built)
    swap = swapped_pairs(built, schema, train_cfg.seed, ctx.rank)  # before sharding: a bad catalogue fails early
    readers = build_readers(config, schema, ctx, train_transform=swap)
    if len(readers["train"]) == 0:  # a rank without rows (batches are not dropped), and the ranks train in step
        rows = sum(readers["train"].rows_per_rank)
        raise ValueError(f"training split {config.data.train_split!r} has {rows} row(s) for {ctx.world_size} ranks: "
                         f"a rank gets none to train on; run at most {rows} rank(s), or train on more rows")

    # swapped pairs double every training batch; the planner sizes for what a step really holds
    step_rows = config.data.batch_size * (2 if swap is not None else 1)
    tables = find_tables(built.task)
    # before sharding replaces the EBCs: what train.init_scope=tables takes, and whose optimizer state a resume loads
    trained = trained_tables(tables)
    weights = table_weights(tables)
    if ctx.is_main and train_cfg.progress and weights >= NOTED_TABLE_WEIGHTS:
        print(f"sharding: planning {len(tables)} tables ({weights_text(weights)} weights) on {ctx.world_size} rank(s) "
              "and building their shards", file=sys.stderr, flush=True)
    # before sharding and before anything is written: a window smaller than a step's rows is refused at once
    windowed = None if not train_cfg.metrics_window else WindowedTrainMetrics(
        train_cfg.metrics_window, train_cfg.metrics_every, step_rows, ctx.world_size, ctx.rank, ctx.device)
    # the planner (rank 0) prices each multi-hot table by the ids its bags hold in the training split
    ids_per_bag = run_on_every_rank(lambda: _ids_per_bag_to_plan_with(config, schema) if ctx.is_main else None,
                                    "measuring the ids per bag of the training split", ctx.device)
    pooling = table_pooling_factors(tables, ids_per_bag) if ids_per_bag is not None else {}
    model, plan = shard_model(built.task, ctx.device, ctx.world_size, config.sharding, config.optim, step_rows,
                              ids_per_bag)
    optimizer = build_optimizer(model, config.optim)
    note = _save_note(model, ctx, train_cfg)
    checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep=train_cfg.keep_checkpoints,
                                    before_save=note)
    best = CheckpointManager(os.path.join(run_dir, "best"), keep=1, before_save=note)
    earlier = resume_point(checkpoints, best, warn=ctx.is_main)  # a newer damaged checkpoint: named once
    latest = earlier if train_cfg.resume else None
    init_record: Optional[Dict[str, Any]] = None
    if earlier is None:  # a run with checkpoints of its own goes on from them
        init = run_on_every_rank(lambda: check_init_source(config, schema, plan, built.plugins, trained),
                                 "checking train.init_from", ctx.device)
        if init is not None:  # before the plug-in weights: frozen ones come from their own files
            init_record = load_init_source(init, model, optimizer)
    if latest is None:
        # a resumed run takes these weights from its checkpoint, so their source files (teacher
        # checkpoint, entity vectors) need not be where they were when it started
        # a bad vector or teacher file can fail on the one rank that reads its rows
        run_on_every_rank(lambda: load_plugin_state(model, built, schema), "loading the plug-in weights", ctx.device)
        if ctx.rank == 0:
            for gap in entity_vector_gaps(built, schema):
                warnings.warn(gap, stacklevel=2)
    saved_config = os.path.join(run_dir, "config.yaml")
    fingerprints = data_fingerprints(config, schema)
    # every rank, before anything in run_dir changes
    if earlier is not None and not train_cfg.resume:
        raise ValueError(f"{run_dir}: holds checkpoints of an earlier run ({earlier}); with train.resume=false "
                         "its checkpoints and the new run's would mix: use an empty train.run_dir")
    if latest is not None:
        built, init_record = _check_resume(config, ctx, schema, built, readers["train"], plan, checkpoints, best,
                                           latest, saved_config, fingerprints, trained)
    barrier()  # every rank has read config.yaml / plugins.json before rank 0 rewrites them
    # rank 0 holds the run directory while the job trains: a second job there would delete the
    # first one's checkpoint in writing and interleave its metrics
    lock = run_on_every_rank(lambda: _lock_as_checked(run_dir, checkpoints, best, earlier) if ctx.is_main else None,
                             "locking train.run_dir", ctx.device)
    try:
        return _train_in_run_dir(config, ctx, schema, built, readers, model, plan, optimizer, checkpoints, best, latest,
                                 saved_config, fingerprints, on_step, pooling, windowed, init_record, autocast)
    finally:
        if lock is not None:
            lock.close()  # closing the file releases its lock


def _check_resume(
    config: ExperimentConfig, ctx: DistContext, schema: DatasetSchema, built: BuiltTask,
    train_reader: ParquetBatchReader, plan: Any, checkpoints: CheckpointManager, best: CheckpointManager,
    latest: str, saved_config: str, fingerprints: Dict[str, str], trained: Collection[str],
) -> Tuple[BuiltTask, Optional[Dict[str, Any]]]:
    """Raises unless the run of ``train.run_dir`` can go on from its checkpoint ``latest`` with ``config``, its
    data and its plug-ins (every rank, before anything in run_dir changes). Returns ``built`` with the frozen
    teacher the run started with, and the ``train.init_from`` record the run kept (None without one); ``trained``:
    the model's trained tables (whose optimizer states the checkpoint holds, but ``sharding.frozen_tables``')."""
    run_dir = config.train.run_dir
    init_record: Optional[Dict[str, Any]] = None
    if not os.path.isfile(saved_config):
        raise ConfigError(f"{run_dir}: holds checkpoints ({latest}) but no config.yaml, so a resume cannot check "
                          "that it trains the same model; restore config.yaml or use another train.run_dir")
    check_resumable(config, saved_config)
    check_trained_on(schema, saved_config, run_dir)
    check_resumable_position(read_train_state(latest), ctx, config.train, train_reader, config.data.shuffle)
    # a frozen table keeps no state: its placement may change with the world size
    check_same_table_state_layout(os.path.join(run_dir, PLAN_FILE), plan, config.optim.sparse,
                                  tables=stateful_tables(trained, config.sharding.frozen_tables))
    # found at the first record or save otherwise, once the model is built or after training (another user's run,
    # its directories made group-writable but its files written under umask 022)
    for written in (run_dir, os.path.join(run_dir, METRICS_FILE), checkpoints.directory, best.directory):
        if os.path.exists(written) and not os.access(written, os.W_OK | (os.X_OK if os.path.isdir(written) else 0)):
            raise PermissionError(f"{written}: not writable here (permissions, or a read-only mount), so the resumed "
                                  "run would fail when it first writes there: make it writable, or use another "
                                  "train.run_dir")
    saved_plugins = os.path.join(run_dir, PLUGINS_FILE)
    if os.path.isfile(saved_plugins):
        saved_record = read_run_record(saved_plugins)
        init_record = saved_record.get(INIT_FROM_KEY)  # kept: the weights this run started from
        check_plugin_history(saved_record, built.plugins, saved_plugins)
        check_same_field_vectors(saved_record, built.plugins, saved_plugins)
        check_same_entity_vectors(saved_record, built.plugins, saved_plugins)
        check_same_row_vectors(saved_record, built.plugins, saved_plugins, "attach the vectors it started with "
                               "(semantics export --attach-dir with its adapted LLM), or train on these in another "
                               "train.run_dir")
        # each rank reads the teacher export's config.json: one that sees another teacher stops them all
        run_on_every_rank(lambda: check_same_frozen_teacher(saved_record, built.plugins, saved_plugins),
                          "checking the frozen teacher (elec.teacher_checkpoint)", ctx.device)
        check_same_data(saved_record, fingerprints, schema, saved_plugins)
        # the checkpoint holds the teacher the run started with: plugins.json keeps its record
        built = built._replace(plugins=resumed_frozen_teacher(saved_record, built.plugins))
    return built, init_record


def _ids_per_bag_to_plan_with(config: ExperimentConfig, schema: DatasetSchema) -> Optional[Dict[str, float]]:
    """Each multi-hot field's mean ids per bag in the training split, for the planner's pooling factors; None
    (one per bag) with ``sharding.measure_pooling`` off, with a plan file (nothing is planned), and on a resume
    of a run planned without them (its plan then stays as it was: new factors could move a table)."""
    sharding = config.sharding
    if not sharding.measure_pooling or sharding.plan_file:
        return None
    saved_plan = os.path.join(config.train.run_dir, PLAN_FILE)
    if config.train.resume and planned_without_pooling_factors(saved_plan):
        return None
    return mean_ids_per_bag(schema, config.data.train_split)


def _lock_as_checked(run_dir: str, checkpoints: CheckpointManager, best: CheckpointManager,
                     checked: Optional[str]) -> IO[str]:
    """:func:`lock_run_dir`, then raises unless ``run_dir``'s newest checkpoint is still ``checked``, the one
    the job's checks read: a job there that ended (finished, or was killed) between those checks and this
    lock left checkpoints that the checks never saw, and training on would mix them with this job's.

    Raises:
        RunDirBusyError: another job holds the lock, or wrote (or removed) checkpoints since the checks.
    """
    lock = lock_run_dir(run_dir)
    now = resume_point(checkpoints, best, warn=False)  # the first look warned
    if now != checked:
        lock.close()
        raise RunDirBusyError(
            f"{run_dir}: another job changed this train.run_dir's checkpoints while this one was starting (its "
            f"checks saw {checked or 'no checkpoint'}, now it holds {now or 'none'}); run this job again: it then "
            "checks, and resumes from (or refuses), what is there now"
        )
    _remove_killed_writes(run_dir)
    return lock


#: the run directory's files written whole through a temp file (``write_text_atomically``, ``save_figure_atomically``)
RUN_FILES_WRITTEN_WHOLE = ("config.yaml", PLUGINS_FILE, PLAN_FILE, RESULTS_FILE, CURVES_FILE)


def _remove_killed_writes(run_dir: str) -> None:
    """Removes the temp files of :data:`RUN_FILES_WRITTEN_WHOLE` that a job killed outright (SIGKILL) while writing
    them left in ``run_dir``; the caller holds the run's lock, so no job is writing them now."""
    for name in os.listdir(run_dir):
        if any(is_temp_file_of(name, file) for file in RUN_FILES_WRITTEN_WHOLE):
            with contextlib.suppress(FileNotFoundError):
                os.remove(os.path.join(run_dir, name))


def _write_run_records(
    config: ExperimentConfig, schema: DatasetSchema, built: BuiltTask, saved_config: str,
    fingerprints: Dict[str, str], init_record: Optional[Dict[str, Any]],
) -> None:
    """Writes the run's ``config.yaml`` (to ``saved_config``) and ``plugins.json``: what it trains, on which data."""
    save_config(config, saved_config)
    write_text_atomically(os.path.join(config.train.run_dir, PLUGINS_FILE), json.dumps(
        {SCHEMA_FINGERPRINT_KEY: schema.fingerprint(), SCHEMA_CONTENTS_KEY: schema.fingerprinted(),
         DATA_FINGERPRINTS_KEY: fingerprints, VOCABULARIES_KEY: schema.vocabulary_records(),
         SETTINGS_KEY: config.to_dict(),  # an edit of config.yaml is told from what the checkpoints trained with
         **built.plugins,
         **({INIT_FROM_KEY: init_record} if init_record is not None else {})},
        indent=2, sort_keys=True, default=str))


def _train_in_run_dir(
    config: ExperimentConfig, ctx: DistContext, schema: DatasetSchema, built: BuiltTask,
    readers: Dict[str, ParquetBatchReader], model: nn.Module, plan: Any, optimizer: Any, checkpoints: CheckpointManager,
    best: CheckpointManager, latest: Optional[str], saved_config: str, fingerprints: Dict[str, str],
    on_step: Optional[StepHook], pooling: Dict[str, List[float]], windowed: Optional[WindowedTrainMetrics],
    init_record: Optional[Dict[str, Any]], autocast: Optional[torch.dtype],
) -> Dict[str, Any]:
    """:func:`run_training` from the first write into ``train.run_dir`` on (rank 0 holds its lock); ``pooling``:
    each table's pooling factors as the planner took them (for ``sharding_plan.json``); ``windowed``: the windowed
    training metrics (``train.metrics_window``), whose window starts empty in every job; ``init_record``: where a
    new run's weights came from (``train.init_from``), kept in ``plugins.json``; ``autocast``: the training forwards'
    autocast dtype (``train.mixed_precision``), None for float32."""
    train_cfg = config.train
    run_dir = train_cfg.run_dir
    if ctx.is_main:
        _write_run_records(config, schema, built, saved_config, fingerprints, init_record)
    log = _RunLog(os.path.join(run_dir, METRICS_FILE), ctx.is_main)

    state = TrainState(world_size=ctx.world_size, batch_size=config.data.batch_size)
    if latest is None:
        give_rank_its_own_stream(ctx.rank, ctx.device)  # dropout masks; a resume restores each rank's from its checkpoint
        # records before it are a job's that was killed before its first checkpoint: superseded
        log.write({"event": STARTED_EVENT, "global_step": 0, "epoch": 0, "mixed_precision": train_cfg.mixed_precision,
                   **(started_fields(init_record) if init_record is not None else {}),
                   **(job_provenance() if ctx.is_main else {})})
        if ctx.is_main and init_record is not None:
            print(start_line(run_dir, init_record), flush=True)
    else:
        state = state_for_world(load_checkpoint(latest, model, optimizer), ctx, config.data.batch_size,
                                 train_cfg.seed, readers["train"])
        finished = state.finished
        state = reopen_for_budget(state, train_cfg)
        redone = _redone_events(state, train_cfg, reopened=finished and not state.finished)
        log.write({"event": RESUMED_EVENT, "checkpoint": latest, "global_step": state.global_step,
                   "epoch": state.epoch, REDONE_KEY: redone, **(job_provenance() if ctx.is_main else {})})
        if ctx.is_main:
            print(_resume_line(run_dir, latest, state), file=sys.stderr, flush=True)  # a notice, beside the bars
    # the plan of the shards this job trains; a finished run run again (nothing to train, maybe on other ranks)
    # keeps the plan it trained with
    if ctx.is_main and (latest is None or not state.finished):
        plan_path = os.path.join(run_dir, PLAN_FILE)
        write_text_atomically(plan_path, describe_plan(plan, pooling))
        if train_cfg.progress:
            print(plan_line(plan, ctx.world_size, plan_path,
                            comms_text(config.sharding.qcomms, ctx.world_size)), file=sys.stderr,
                  flush=True)

    subsets = metric_subsets(config, schema)
    train_reader = readers["train"]
    throughput: List[float] = []

    losses = LossSums.resumed_from(state)  # a checkpoint between two loss records carries their sums
    schedule = config.optim.lr_schedule
    rates = ScheduledLearningRates(optimizer, schedule)
    if not schedule.constant:
        rates.set_for_step(state.global_step)  # the first step of this job (a resumed one's too)
    if windowed is not None:
        windowed.steps = state.global_step  # computes on the global steps that are multiples of metrics_every

    def step_callback(step_in_epoch: int, loss: torch.Tensor) -> bool:
        state.step_in_epoch = step_in_epoch
        state.global_step += 1
        losses.add(loss.detach())
        if state.global_step % LOSS_RECORD_STEPS == 0:  # the mean batch loss of the window, over the ranks
            mean_loss, steps = losses.take_window(ctx.device)
            grad_norm = dense_gradient_norm(optimizer)  # with optim.max_grad_norm: this step's, before clipping
            log.write({"event": "train", "global_step": state.global_step, "epoch": state.epoch, "loss": mean_loss,
                       "steps": steps, **({} if grad_norm is None else {"grad_norm": grad_norm}),
                       **({} if schedule.constant else {"lr_scale": schedule.scale(state.global_step - 1)})})
        if not schedule.constant:
            rates.set_for_step(state.global_step)
        if windowed is not None and windowed.computed is not None:  # computed at this step, over the ranks
            log.write({"event": TRAIN_WINDOW_EVENT, "global_step": state.global_step, "epoch": state.epoch,
                       **windowed.computed})
        if train_cfg.checkpoint_every and state.global_step % train_cfg.checkpoint_every == 0:
            check_finite_loss(loss, f"step {state.global_step}")  # a NaN step makes every later loss NaN
            losses.carry_into(state, ctx.device)
            started = time.perf_counter()
            path = checkpoints.save(model, optimizer, state)
            seconds = time.perf_counter() - started
            if ctx.is_main and train_cfg.progress and seconds >= SLOW_SAVE_SECONDS:  # the bar stood still meanwhile
                tqdm.write(f"step {state.global_step}: checkpoint saved in {seconds:.0f} s ({path})", file=sys.stderr)
        if on_step is not None:
            on_step(state)
        return budget_spent(state, train_cfg)  # within an epoch, only max_steps can be spent

    checked_stats: List[Any] = [None]  # the files' stats when the data was last found unchanged

    def unchanged_since_start() -> None:
        stats = split_file_stats(config, schema)
        if stats != checked_stats[0]:  # only then read the footers (and bytes) again
            check_data_unchanged(config, schema, fingerprints)
            checked_stats[0] = stats

    def data_unchanged() -> None:  # rank 0 looks; its error stops every rank
        run_on_every_rank(lambda: unchanged_since_start() if ctx.is_main else None,
                          "checking the data did not change while the run trained", ctx.device)

    warned: Set[str] = set()  # the warnings of _validate this job gave: each once, not at every validation
    first_epoch = True
    while not state.finished:
        epoch_done = False
        epoch, stats, valid = state.epoch, None, None
        if not first_epoch:  # the first one reads what the run just fingerprinted
            data_unchanged()
        first_epoch = False
        if not budget_spent(state, train_cfg):  # a resume at or past max_steps trains no further step
            train_reader.set_epoch(state.epoch)
            resumed_at = state.step_in_epoch  # > 0 only in the epoch a resumed run continues
            stats = train_epoch(
                model, optimizer, train_reader, ctx.device,
                skip_batches=resumed_at,
                on_step=step_callback,
                total=len(train_reader),
                description=f"epoch {state.epoch}",
                progress=train_cfg.progress,
                window_metrics=windowed,
                autocast_dtype=autocast,
            )
            epoch_loss = losses.epoch_mean(ctx.device)  # all rows' (and a killed job's steps before the resume)
            stats = dataclasses.replace(stats, mean_loss=math.nan if epoch_loss is None else epoch_loss)
            if stats.steps:
                throughput.append(stats.samples_per_second * ctx.world_size)
            log.write(_epoch_record(stats, state, ctx.world_size, resumed_at, sum_over_ranks(stats.samples, ctx.device),
                                    epoch_loss, losses.epoch_steps))
            epoch_done = not stats.stopped_early or state.step_in_epoch >= len(train_reader)
        else:  # a checkpoint of the epoch's last step, the one train.max_steps ends on, is at that epoch's end
            epoch_done = state.step_in_epoch >= len(train_reader)
        if epoch_done:
            state.epoch += 1
            state.step_in_epoch = 0
            losses.start_epoch()
        losses.carry_into(state, ctx.device)  # the checkpoints below (best/ included) go on from these sums
        last = budget_spent(state, train_cfg)
        if last:  # set before validating: a best/ checkpoint holds the same state as the one below
            state.finished, state.stop_reason = True, STOP_BUDGET
        due = "valid" in readers and (last or (epoch_done and state.epoch % max(1, train_cfg.eval_every) == 0))
        # not again at a step already validated: a job resumed there with a budget it has spent trains nothing,
        # and the same weights scored again would count as an evaluation without progress (patience)
        if due and state.validated_step != state.global_step:
            # the valid split is read again here: one prepared again during the epoch would be scored (and could
            # pick best/, spend patience) under the record of the data the run started with
            data_unchanged()
            valid = _validate(model, optimizer, readers["valid"], ctx, state, best, log, train_cfg,
                              train_loss=None if stats is None else stats.mean_loss, warned=warned)
        checkpoints.save(model, optimizer, state, same_state_as=best.latest())  # links a best/ one just saved
        if ctx.is_main and train_cfg.progress and (stats is not None and stats.steps or valid is not None):
            print(epoch_line(epoch, stats, ctx.world_size, valid, state, train_cfg), file=sys.stderr, flush=True)
    _complete_final_saves(model, optimizer, state, checkpoints, best)

    return _finish_run(config, ctx, readers, model, best, state, throughput, subsets, log, data_unchanged)


def _finish_run(
    config: ExperimentConfig, ctx: DistContext, readers: Dict[str, ParquetBatchReader], model: nn.Module,
    best: CheckpointManager, state: TrainState, throughput: List[float], subsets: Dict[str, str], log: _RunLog,
    data_unchanged: Callable[[], None],
) -> Dict[str, Any]:
    """The end of :func:`_train_in_run_dir`: loads the best model, scores the test split, writes ``results.json`` and
    the training curves, and returns the results; ``throughput``: this job's epochs' samples per second."""
    train_cfg = config.train
    run_dir = train_cfg.run_dir
    best_path = best.latest()
    if best_path is not None:
        load_checkpoint(best_path, model, None, restore_rng=False)
    # a job that trained no step (a finished run run again, or one killed in its final saves) keeps the figure of
    # the last job that trained one, and the ranks it trained on
    if throughput:
        samples_per_second, trained_on = float(np.mean(throughput)), ctx.world_size
    else:
        samples_per_second, trained_on = earlier_throughput(run_dir)
    results: Dict[str, Any] = {
        "run_dir": run_dir,
        "world_size": trained_on or ctx.world_size,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "best_step": state.best_step,
        "stopped_early": _stopped_early(state, train_cfg),
        "samples_per_second": samples_per_second,
        "mixed_precision": train_cfg.mixed_precision,  # what samples_per_second was trained in
        "valid": {"auc": None if state.best_metric == float("-inf") else state.best_metric},
    }
    if "test" in readers:
        data_unchanged()
        results["test"] = evaluate(
            model, readers["test"], ctx.device, CTRMetrics(subsets), description="test",
            progress=train_cfg.progress, pipelined=use_pipelined_eval(train_cfg.pipelined_eval, ctx.device),
        )
        log.write({"event": "test", "global_step": state.global_step, **results["test"]})
        if ctx.is_main:
            warn_undefined_test_metrics(results["test"])
    if ctx.is_main:
        write_text_atomically(os.path.join(run_dir, RESULTS_FILE),  # strict JSON, as metrics.jsonl: NaN is null
                              json.dumps(strict_json(results), indent=2, sort_keys=True, default=float))
        log.write({"event": FINISHED_EVENT, "global_step": state.global_step, "epoch": state.epoch,
                   "best_step": state.best_step})
        try:  # a picture that cannot be drawn (a full disk) must not fail a finished run, nor leave the ranks waiting
            plot_training_curves(run_dir)
        except Exception as error:  # noqa: BLE001 - reported, and the run goes on
            warnings.warn(f"{run_dir}: training_curves.png not written: {type(error).__name__}: {error}", stacklevel=3)
    barrier()
    return results


def non_finite_logits_note(metrics: Dict[str, Any], split: str) -> Optional[str]:
    """What to say when ``metrics`` (of rows scored) hold a NaN or infinite LogLoss: the model's logit was NaN or
    inf for some row, or so large that the sum of the rows' cross-entropies overflowed, so LogLoss, NE,
    calibration and AUC mean nothing; None otherwise."""
    logloss = metrics.get("logloss")
    if not metrics.get("num_samples") or logloss is None or math.isfinite(logloss):
        return None
    return (f"{split} LogLoss is {logloss}: the model's logit is NaN, inf or huge for some of the {split} split's "
            f"{metrics['num_samples']:.0f} row(s), so its LogLoss, NE, calibration and AUC are meaningless: the "
            "weights diverged (a learning rate too high) or dense values lie far beyond the training data's "
            "(scale them as the training data was)")


def warn_undefined_test_metrics(metrics: Dict[str, Any]) -> None:
    """Says why the test AUC (and NE) is NaN, as ``_validate`` does for the validation split: a split of one class
    (every label 1, say) has none, and the results table would otherwise print ``nan`` without a word; and why its
    LogLoss is NaN or inf (:func:`non_finite_logits_note`)."""
    note = non_finite_logits_note(metrics, "test")
    if note is not None:
        warnings.warn(note, stacklevel=2)
        return
    auc = metrics.get("auc")
    if auc is not None and math.isnan(auc):
        clickless = metrics.get("ctr") == 0.0  # calibration divides by the clicks
        stand = ("its LogLoss stands (calibration, predicted over actual clicks, is undefined without a click)"
                 if clickless else "its LogLoss and calibration stand")
        what = "AUC, NE and calibration are" if clickless else "AUC and NE are"
        warnings.warn(f"test {what} undefined (nan; null in results.json): the test split's "
                      f"{metrics.get('num_samples', 0):.0f} row(s) hold one class only (click rate "
                      f"{metrics.get('ctr', math.nan):.3f}); {stand}", stacklevel=2)


def _resume_line(run_dir: str, checkpoint: str, state: TrainState) -> str:
    """What a job says when it goes on from ``checkpoint``: where, or, for a run that is finished (and stays so
    under this job's budget), that it trains nothing and how to go on."""
    if not state.finished:
        return f"resuming {run_dir} from {checkpoint}: epoch {state.epoch}, step {state.global_step}"
    why = {STOP_BUDGET: "its train.epochs / train.max_steps used up",
           STOP_PATIENCE: "stopped early: train.patience"}.get(state.stop_reason, "finished")
    more = ("raise train.epochs or train.max_steps to train on, or use " if state.stop_reason == STOP_BUDGET
            else "use ")
    return (f"{run_dir} is finished ({why}, epoch {state.epoch}, step {state.global_step}): nothing to train (a test "
            f"split scores its best model again); {more}another train.run_dir for a new run")


def _complete_final_saves(
    model: nn.Module, optimizer: Any, state: TrainState, checkpoints: CheckpointManager, best: CheckpointManager,
) -> None:
    """Completes the run's last saves as an uninterrupted job makes them (collective; a no-op after one).

    A job killed after its final ``best/ckpt-N`` but before ``checkpoints/ckpt-N`` resumes from the
    former, finished, and trains nothing: ``checkpoints/ckpt-N`` is saved from it (the same snapshot).
    A kill after either save's rename left its leftovers, ``latest`` and pruning undone.
    """
    # one answer for all ranks (the save is collective): a shared file system may show them different states
    if not all_ranks_true(checkpoints.holds_step(state.global_step)):
        checkpoints.save(model, optimizer, state, same_state_as=best.latest())
    checkpoints.complete_interrupted_save()
    best.complete_interrupted_save()


def _redone_events(state: TrainState, train_cfg: TrainConfig, reopened: bool = False) -> List[str]:
    """The records a job resumed from a checkpoint of ``state`` writes again at its step: a checkpoint
    taken within an epoch (``checkpoint_every``, possibly on its last step) precedes the epoch-end
    records of that step (but the ``epoch`` record only while the budget lets the job train: one at
    ``train.max_steps`` takes no step and writes none, so the killed job's stands); every checkpoint
    precedes the test records of a finished run. A finished run given more budget (``reopened``, also
    mid-epoch after ``train.max_steps``) writes none again: its checkpoint followed its epoch-end
    records, whose validation may be the run's best."""
    if reopened:
        return []
    if state.finished:
        return ["test"]
    if state.step_in_epoch == 0:
        return []
    return ([] if budget_spent(state, train_cfg) else ["epoch"]) + ["valid", "early_stop", "test"]


DIVERGED_LOGLOSS = 2 * math.log(2)  # a validation LogLoss above it (and NE above 1) is warned about as divergence


def _validate(
    model: nn.Module,
    optimizer: CombinedOptimizer,
    reader: ParquetBatchReader,
    ctx: DistContext,
    state: TrainState,
    best: CheckpointManager,
    log: _RunLog,
    train_cfg: TrainConfig,
    train_loss: Optional[float] = None,
    warned: Optional[Set[str]] = None,
) -> Dict[str, float]:
    """Validates; a better AUC saves the model to ``best/``, ``train.patience`` evaluations
    without one finish the run (``state`` is updated in place). Returns the validation metrics.

    ``train_loss``: the mean training loss of the epoch just trained (None: none trained), which tells a model that
    overfits (a low training loss) from one that diverged; ``warned``: the kinds of warning this job already gave,
    each given once per job (a 1,000-epoch run would otherwise repeat one at every validation)."""
    valid = evaluate(model, reader, ctx.device, CTRMetrics(), description="valid", progress=train_cfg.progress,
                     pipelined=use_pipelined_eval(train_cfg.pipelined_eval, ctx.device))
    state.validated_step = state.global_step
    log.write({"event": "valid", "epoch": state.epoch, "global_step": state.global_step, **valid})
    auc = valid["auc"]
    note = non_finite_logits_note(valid, "valid")
    if note is not None:  # every rank has the same metrics: all raise, before best/ keeps the weights
        raise NonFiniteLossError(f"step {state.global_step}: {note}; stopped before best/ keeps these weights "
                                 "(best/ holds the last finite validation's model; checkpoints saved since it may "
                                 f"hold the diverged weights: {DIVERGED_REMEDY})")
    if ctx.is_main:
        _warn_of_bad_validation(valid, state.global_step, train_loss, set() if warned is None else warned)
    if not math.isnan(auc) and auc > state.best_metric:
        state.best_metric, state.best_step, state.bad_evals = auc, state.global_step, 0
        best.save(model, optimizer, state)
    else:
        state.bad_evals += 1
    # a run that used up train.epochs / max_steps with this validation did not stop early: it stays open to a larger
    # budget (its next evaluation without a better AUC stops it, as bad_evals stays counted)
    budget_end = state.finished and state.stop_reason == STOP_BUDGET
    if train_cfg.patience and state.bad_evals >= train_cfg.patience and not budget_end:
        log.write({"event": "early_stop", "global_step": state.global_step, "best_step": state.best_step})
        state.finished, state.stop_reason = True, STOP_PATIENCE
    return valid


def _warn_of_bad_validation(valid: Dict[str, float], step: int, train_loss: Optional[float], warned: Set[str]) -> None:
    """Warns of a validation without an AUC (one class) and of one far worse than the click rate alone, telling a
    model that overfits (its training loss far below) from one that diverged; each kind once (``warned``, the kinds
    this job gave: a 1,000-epoch run repeated one at every validation)."""
    def once(kind: str, message: str) -> None:
        if kind not in warned:
            warned.add(kind)
            warnings.warn(message, stacklevel=4)

    if math.isnan(valid["auc"]):
        once("one class", f"valid AUC at step {step} is undefined: the validation split holds rows of one class only "
             "(or none); no checkpoint of it can be the best, and train.patience counts it as an evaluation without a "
             "better AUC")
    # far worse than the click rate alone (NE 1) and than 0.5 for every row (LogLoss ln 2), as a model that is only
    # undertrained is not (NaN compares False)
    if not (valid.get("ne", math.nan) > 1 and valid["logloss"] > DIVERGED_LOGLOSS):
        return
    worse = (f"valid LogLoss at step {step} is {valid['logloss']:.4f} (NE {valid['ne']:.2f}), far worse than the "
             "click rate alone (NE 1)")
    # "far below": under half the click rate's own LogLoss (LogLoss / NE; ln 2 at a 50% click rate), which a model
    # diverged on its training rows too does not reach
    if train_loss is not None and train_loss < valid["logloss"] / valid["ne"] / 2:  # NaN compares False
        once("overfits", f"{worse}, while the epoch's training loss is {train_loss:.4f}: the model overfits its "
             "training split (train.patience stops a run after its best validation; fewer epochs, model.dropout); "
             "not repeated at this job's later validations")
    else:
        once("diverged", f"{worse} or 0.5 for every row ({math.log(2):.4f}): the model has diverged: lower "
             "optim.dense_lr / optim.sparse_lr or set optim.max_grad_norm; with an FM-family backbone (fm, fwfm, "
             "deepfm) on dense values that are not standardised, such as Criteo's log(1 + x) counts, set "
             "model.dense_as_fields=false")


def epoch_line(
    epoch: int, stats: Optional[EpochStats], world_size: int, valid: Optional[Dict[str, float]], state: TrainState,
    train_cfg: TrainConfig,
) -> str:
    """The line rank 0 prints after an epoch (with ``train.progress``), as its bar is cleared:
    ``epoch 0: loss 0.6123, 12,005 samples/s; valid AUC 0.5797 (best)``, with the best AUC so far
    when this one is not, and the reason when the run stops on ``train.patience``."""
    parts = []
    if stats is not None and stats.steps:
        parts.append(f"loss {stats.mean_loss:.4f}, {stats.samples_per_second * world_size:,.0f} samples/s")
    line = f"epoch {epoch}: " + ", ".join(parts)
    if valid is not None:
        auc = valid["auc"]
        if state.best_step < 0 or state.best_metric == float("-inf"):
            best = "no valid AUC yet"
        elif state.best_step == state.global_step and not math.isnan(auc):
            best = "best"
        else:
            best = f"best {state.best_metric:.4f} at step {state.best_step}"
        line += f"{'; ' if parts else ''}valid AUC {auc:.4f} ({best})"
        if state.stop_reason == STOP_PATIENCE:
            line += f"; no better valid AUC in {train_cfg.patience} evaluation(s): stopping early (train.patience)"
    return line


def _stopped_early(state: TrainState, train_cfg: TrainConfig) -> bool:
    """Whether the run stopped on patience (inferred from ``bad_evals`` for a checkpoint
    written before ``stop_reason`` was recorded)."""
    if state.stop_reason:
        return state.stop_reason == STOP_PATIENCE
    return bool(train_cfg.patience) and state.bad_evals >= train_cfg.patience
