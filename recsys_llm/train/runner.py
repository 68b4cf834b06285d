"""One training run end to end: data, task, sharding, pipelined training, checkpoints, metrics.

:func:`run_training` is what ``recsys-llm train`` (under ``torchrun`` or alone) and the
tests call on every rank. It

1. initialises the process group (gloo on CPU, nccl on CUDA) and seeds every RNG;
2. opens rank-sharded Parquet readers for train / valid / test (generating the embedded
   synthetic data first when the config asks for it and it is missing);
3. builds the task with :func:`build_task` (plain, LLaCTR or ELEC, from the config sections),
   shards it (planner + DMP + fused table optimizers) and builds the combined optimizer;
4. resumes from the run directory's newest complete checkpoint (``checkpoints/``, else a newer
   ``best/`` one) when there is one; a run that finished by using up its epochs / max_steps
   goes on when the resume gives it more, one that stopped early on patience stays finished;
5. trains on ``TrainPipelineSparseDist``, checkpointing every ``checkpoint_every`` steps and
   at every epoch end, validating every ``eval_every`` epochs with early stopping on
   validation AUC (the best model is kept in ``best/``);
6. evaluates the best model on the test split (overall, and on cold items when the data
   marks them) and writes the run directory::

       run_dir/config.yaml  plugins.json  sharding_plan.json  metrics.jsonl  results.json
       run_dir/checkpoints/ckpt-N/ ...   run_dir/best/ckpt-N/ ...

Example::

    config = load_config("configs/synthetic_deepfm.yaml", ["train.epochs=1"])
    results = run_training(config)      # on every rank
    print(results["test"]["auc"])
"""

import dataclasses
import fcntl
import json
import math
import os
import random
import time
from typing import IO, Any, Callable, Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from recsys_llm.atomic_dir import write_text_atomically
from recsys_llm.data.pair_swap import SwappedPairs
from recsys_llm.data.parquet import ParquetBatchReader, resolve_paths, split_fingerprint
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.error_text import telling_line
from recsys_llm.models.registry import build_backbone
from recsys_llm.modules.elec import ELECConfig, build_elec_task, load_elec_state
from recsys_llm.modules.llactr import LLaCTRConfig, build_llactr_terms
from recsys_llm.train.checkpoint import (
    STOP_BUDGET,
    STOP_PATIENCE,
    CheckpointManager,
    TrainState,
    load_checkpoint,
    read_train_state,
    resolve_checkpoint,
    run_config_of,
)
from recsys_llm.train.config import (
    DEFAULT_COLD_ITEM_COLUMN,
    ConfigError,
    ExperimentConfig,
    TrainConfig,
    check_plugin_history,
    check_resumable,
    check_same_model,
    save_config,
)
from recsys_llm.train.distributed import DistContext, barrier, init_distributed, run_on_every_rank
from recsys_llm.train.metrics import CTRMetrics
from recsys_llm.train.pipeline import EpochStats, check_finite_loss, evaluate, train_epoch
from recsys_llm.train.sharding import build_optimizer, describe_plan, shard_model
from recsys_llm.train.task import CTRTask

RESULTS_FILE = "results.json"
PLUGINS_FILE = "plugins.json"  # what the plug-ins were built from, and the schema the run trained on
# what a run directory holds once its checks have passed (config.yaml and results.json are
# common names, so they do not mark a directory as a run's)
RUN_MARKERS = ("metrics.jsonl", "sharding_plan.json", "checkpoints", "best")
RUN_LOCK_FILE = ".lock"  # rank 0 of a training job holds an exclusive lock on it
# parts of the llactr record that describe where and when, not which, vectors
VECTOR_RECORD_PLACE_KEYS = frozenset({"config", "vectors", "created_at", "created_by"})
SCHEMA_FINGERPRINT_KEY = "schema_fingerprint"  # in PLUGINS_FILE: the data set's schema the run trained on
DATA_FINGERPRINTS_KEY = "data_fingerprints"  # in PLUGINS_FILE: split -> the Parquet footers' hash of its files

# Called on every rank after each optimizer step (and after a checkpoint of that step).
StepHook = Callable[[TrainState], None]


def seed_everything(seed: int) -> None:
    """Seeds torch, numpy and Python ``random`` (the same seed on every rank)."""
    torch.manual_seed(seed)
    np.random.seed(seed % (2**32))
    random.seed(seed)


def set_cpu_float_mode(train_cfg: TrainConfig) -> bool:
    """Sets whether CPU float math flushes subnormal numbers to zero: ``train.flush_denormal``.

    The setting is the process's (``torch.set_flush_denormal``), and it reaches torch's worker
    threads only when set before the process's first multi-threaded op, as the ``recsys-llm``
    commands do; called later (e.g. in a notebook after other torch work), it covers the calling
    thread's share of each op only.

    Returns:
        bool: whether subnormals are now flushed (False where the CPU cannot, with a warning).
    """
    supported = torch.set_flush_denormal(train_cfg.flush_denormal)  # True where the CPU has the mode, either way
    flushing = train_cfg.flush_denormal and supported
    if train_cfg.flush_denormal and not supported:
        print("[recsys_llm] train.flush_denormal: this CPU cannot flush subnormal floats; training goes on without",
              flush=True)
    return flushing


def load_or_generate_schema(config: ExperimentConfig, ctx: DistContext, generate: bool = True) -> DatasetSchema:
    """Loads ``data.schema``; rank 0 first generates the synthetic data if asked and missing.

    Args:
        generate (bool): False for a job on a trained run (evaluate, export, teacher outputs):
            it reads the data the run trained on, which data generated now need not be.

    Raises:
        FileNotFoundError: the schema is missing and ``data.synthetic_rows`` is 0 (or ``generate`` is False).
    """
    path = config.data.schema
    if not path:
        raise ValueError("data.schema is empty: set it in the config or with data.schema=PATH")
    schema_file = os.path.join(path, "schema.json") if not path.endswith((".json", ".yaml", ".yml")) else path
    if not generate and not os.path.exists(schema_file):
        raise FileNotFoundError(
            f"{schema_file}: schema not found; a trained run is evaluated and exported on the data it trained on, "
            "which is not generated here: point data.schema at it"
        )
    if config.data.synthetic_rows <= 0:
        if not os.path.exists(schema_file):
            raise FileNotFoundError(
                f"{schema_file}: schema not found; run `recsys-llm prepare` or set data.synthetic_rows>0 "
                "to generate the embedded synthetic data there"
            )
        return DatasetSchema.load(schema_file)
    # rank 0 alone decides whether to generate; every rank then meets at the barrier, also one
    # that already sees the schema (a slower rank, or a node-local path)
    if ctx.is_main and not os.path.exists(schema_file):
        from recsys_llm.data.parquet import write_prepared
        from recsys_llm.data.synthetic import generate_synthetic

        rows, seed = config.data.synthetic_rows, config.data.synthetic_seed
        # a mistyped or unmounted data.schema lands here too: say so, and never write into a
        # directory that holds something else (write_prepared refuses it)
        print(f"[recsys_llm] {schema_file} not found: generating {rows} rows of the embedded synthetic data "
              "there (data.synthetic_rows; set it to 0 to require existing data)", flush=True)
        write_prepared(os.path.dirname(schema_file), "synthetic", [],
                       lambda tmp: generate_synthetic(tmp, rows, seed=seed, progress=True))
    barrier()
    return DatasetSchema.load(schema_file)


class BuiltTask(NamedTuple):
    """What :func:`build_task` returns.

    Args:
        task (nn.Module): ``forward(batch) -> (loss, (loss, logits, labels))``.
        plugins (Dict[str, Any]): per plug-in (``llactr`` / ``elec``), what it was built
            from (vector provenance, resolved settings); written to ``run_dir/plugins.json``.
        elec (Optional[ELECConfig]): the parsed ``elec`` section, for :func:`load_plugin_state`.
    """

    task: nn.Module
    plugins: Dict[str, Any]
    elec: Optional[ELECConfig] = None


def build_task(config: ExperimentConfig, schema: DatasetSchema, device: torch.device) -> BuiltTask:
    """The model to shard, from ``config.model`` and the optional ``llactr`` / ``elec`` sections.

    * neither section: ``CTRTask(backbone)``;
    * ``llactr``: ``CTRTask(backbone, logit_terms={"fie"}, loss_terms={"fre"})`` from the field
      vectors (their provenance must match ``schema``);
    * ``elec``: the gain network, or the teacher-student pair (see ``recsys_llm.modules.elec``).

    Tables are created on ``meta`` (DMP materialises each rank's shards), dense weights on
    ``device``.

    Raises:
        ValueError: both sections are set, or a section has unknown keys or bad values.
    """
    llactr, elec = parse_plugin_sections(config)
    if elec is not None:
        distill = elec.distill
        if elec.task == "distill" and distill.mode == "offline" and distill.beta > 0:
            width = extra_column_width(schema, config.data.train_split, distill.teacher_representation_key)
            if distill.teacher_representation_dim <= 0:
                distill.teacher_representation_dim = width
            elif distill.teacher_representation_dim != width:
                raise ValueError(
                    f"elec.distill.teacher_representation_dim={distill.teacher_representation_dim}, but the column "
                    f"{distill.teacher_representation_key!r} holds {width}-d teacher representations; set it to "
                    f"{width} or leave it out (0: read from the column)"
                )
        reads_row_vectors = elec.vector_source == "extras" and (elec.task == "gain" or distill.mode != "offline")
        if reads_row_vectors:
            width = extra_column_width(schema, config.data.train_split, elec.vector_key)
            if width != elec.vector_dim:
                raise ValueError(f"elec.vector_dim={elec.vector_dim}, but the column {elec.vector_key!r} holds "
                                 f"{width}-d vectors; set elec.vector_dim={width}")
        task = build_elec_task(elec, schema, config.model, device=torch.device("meta"), dense_device=device)
        return BuiltTask(task, {"elec": dataclasses.asdict(elec)}, elec)
    backbone = build_backbone(config.model, schema, device=torch.device("meta"), dense_device=device)
    if llactr is None:
        return BuiltTask(CTRTask(backbone), {})
    logit_terms, loss_terms, provenance = build_llactr_terms(llactr, schema, backbone, device)
    return BuiltTask(CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms), {"llactr": provenance})


def parse_plugin_sections(config: ExperimentConfig) -> Tuple[Optional[LLaCTRConfig], Optional[ELECConfig]]:
    """The ``llactr`` and ``elec`` sections as their configs (None where a section is empty).

    ``run_training`` calls it before any data is read or generated, so a bad value costs nothing.

    Raises:
        ValueError: both sections are set, or a section has unknown keys or bad values.
    """
    if config.llactr and config.elec:
        raise ValueError("config: 'llactr' and 'elec' sections are both set; train one method per run")
    llactr = LLaCTRConfig.from_dict(config.llactr, source="llactr") if config.llactr else None
    return llactr, ELECConfig.from_dict(config.elec, source="elec") if config.elec else None


def _check_offline_reads_no_vectors(elec: ELECConfig) -> None:
    """Refuses entity exports named for an offline student, which reads the teacher's outputs from
    the data and no LLM vector: ``plugins.json`` would record them as the run's vectors. (New runs
    only: runs of earlier versions that name them still resume, export and evaluate.)

    Raises:
        ConfigError: naming the fields and how to leave their directories out.
    """
    if elec.task != "distill" or elec.distill.mode != "offline":
        return
    named = sorted(field for field, directory in elec.entity_tables.items() if directory)
    if named:
        raise ConfigError(
            f"elec.distill.mode 'offline' reads the teacher's outputs from the data and no LLM vector, so the entity "
            f"vectors named for {named} would not be read: leave them out (elec.entity_tables.<field>=null, or "
            "elec.entity_vectors=null beside elec.entity_field)"
        )


def extra_column_width(schema: DatasetSchema, split: str, column: str) -> int:
    """d of a ``fixed_size_list<float>[d]`` extra column, read from the split's first file footer.

    Raises:
        ValueError: the column is missing or not a fixed-size list.
    """
    path = resolve_paths(schema, split)[0]
    arrow = pq.ParquetFile(path).schema_arrow
    if column not in arrow.names:
        raise ValueError(f"{path}: no column {column!r} (expected a fixed_size_list<float>[d] of vectors: teacher "
                         "outputs from `recsys-llm teacher-outputs`, LLM vectors from `semantics export --attach-dir`)")
    kind = arrow.field(column).type
    if not pa.types.is_fixed_size_list(kind):
        raise ValueError(f"{path}: column {column!r} is {kind}, expected fixed_size_list<float>[d]")
    return int(kind.list_size)


def plugin_extras(config: ExperimentConfig) -> List[str]:
    """Parquet columns the plug-ins read from ``batch.extras`` (added to ``data.extras``)."""
    if not config.elec:
        return []
    elec = ELECConfig.from_dict(config.elec, source="elec")
    if elec.task == "distill" and elec.distill.mode == "offline":
        keys = [elec.distill.teacher_logits_key]
        return keys + [elec.distill.teacher_representation_key] if elec.distill.beta > 0 else keys
    return [elec.vector_key] if elec.vector_source == "extras" else []


def load_plugin_state(model: nn.Module, built: BuiltTask, schema: DatasetSchema) -> Dict[str, int]:
    """After sharding: fills what training does not (ELEC entity vectors of ``schema``, frozen teacher)."""
    return load_elec_state(model, built.elec, schema.fingerprint()) if built.elec is not None else {}


def swapped_pairs(built: BuiltTask, schema: DatasetSchema, seed: int, rank: int = 0) -> Optional[SwappedPairs]:
    """The training-batch transform of ELEC's ``distill.swap_fields`` (None when unset).

    With it, every training batch carries B label-free swapped rows after its B rows, and the
    epoch's ``samples_per_second`` counts both.
    """
    if built.elec is None or built.elec.task != "distill" or not built.elec.distill.swap_fields:
        return None
    distill = built.elec.distill
    return SwappedPairs(schema, distill.swap_fields, seed=seed, catalog=distill.swap_catalog, rank=rank)


def _readers(
    config: ExperimentConfig, schema: DatasetSchema, ctx: DistContext, train_transform: Optional[SwappedPairs] = None
) -> Dict[str, ParquetBatchReader]:
    data = config.data
    eval_batch = data.eval_batch_size or data.batch_size
    train_extras = list(dict.fromkeys(list(data.extras) + plugin_extras(config)))
    eval_extras = list(dict.fromkeys(train_extras + list(_subsets(config, schema).values())))
    common = dict(rank=ctx.rank, world_size=ctx.world_size, validate=data.validate,
                  pin_memory=ctx.device.type == "cuda")
    readers = {
        "train": ParquetBatchReader(
            schema, data.train_split, data.batch_size, extras=train_extras, shuffle=data.shuffle,
            seed=config.train.seed, transform=train_transform, **common,
        ),
    }
    for name, split in (("valid", data.valid_split), ("test", data.test_split)):
        if not split:
            continue
        if split not in schema.splits:
            raise ConfigError(
                f"data.{name}_split={split!r}: {schema.root} has no such split (it has {sorted(schema.splits)}); "
                f"set data.{name}_split='' to train without a {name} split"
            )
        readers[name] = ParquetBatchReader(schema, split, eval_batch, extras=eval_extras, equal_batches=False,
                                           **common)  # evaluate scores every row
    return readers


def _subsets(config: ExperimentConfig, schema: DatasetSchema) -> Dict[str, str]:
    """The metric subsets of evaluation: ``{"cold": data.cold_item_column}`` when the data has that
    extra column, else none.

    Raises:
        ConfigError: ``data.cold_item_column`` is set to another name than the default and the data
            has no such extra column (a typo would silently drop the cold-item metrics; the default may
            be absent, as in data without cold items).
    """
    column = config.data.cold_item_column
    if not column:
        return {}
    if column in schema.extra_columns:
        return {"cold": column}
    if column == DEFAULT_COLD_ITEM_COLUMN:
        return {}
    found = ""
    split = next((name for name in (config.data.test_split, config.data.train_split) if name in schema.splits), None)
    if split is not None:  # what the files hold besides the schema's extra columns
        path = resolve_paths(schema, split)[0]
        file_columns = sorted(pq.ParquetFile(path).schema_arrow.names)
        found = (f"; {path} has that column, but the schema does not list it in extra_columns: add it there"
                 if column in file_columns else f"; file columns of {path}: {file_columns}")
    raise ConfigError(
        f"data.cold_item_column={column!r}: the data has no such extra column (extra_columns of {schema.root}: "
        f"{list(schema.extra_columns)}{found}). Name the 0/1 column that marks cold items, or set "
        "data.cold_item_column='' for no cold-item metrics"
    )


class _RunLog:
    """Rank 0 appends JSON lines to ``metrics.jsonl``; other ranks write nothing."""

    def __init__(self, path: str, enabled: bool) -> None:
        self._path = path
        self._enabled = enabled

    def write(self, record: Dict[str, Any]) -> None:
        if not self._enabled:
            return
        record = {"time": round(time.time(), 3), **{key: _finite_or_none(value) for key, value in record.items()}}
        with open(self._path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record, sort_keys=True, default=float) + "\n")
            handle.flush()


def _finite_or_none(value: Any) -> Any:
    """None for a NaN / infinite float (strict JSON has no NaN), else ``value``."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return None
    return value


def _epoch_record(stats: EpochStats, state: TrainState, world_size: int, resumed_at: int) -> Dict[str, Any]:
    """The ``epoch`` event; an epoch of 0 steps (a resume at its end) has no loss or throughput."""
    trained = stats.steps > 0
    return {
        "event": "epoch", "epoch": state.epoch, "global_step": state.global_step, "steps": stats.steps,
        "samples": stats.samples * world_size, "mean_loss": stats.mean_loss if trained else None,
        "samples_per_second": stats.samples_per_second * world_size if trained else None,
        # steps, samples and mean_loss count only the steps after the resume
        **({"resumed_at_step_in_epoch": resumed_at} if resumed_at else {}),
    }


def budget_spent(state: TrainState, train_cfg: TrainConfig) -> bool:
    """Whether ``state`` has used up ``train.epochs`` or ``train.max_steps``."""
    return state.epoch >= train_cfg.epochs or (train_cfg.max_steps > 0 and state.global_step >= train_cfg.max_steps)


def reopen_for_budget(state: TrainState, train_cfg: TrainConfig) -> TrainState:
    """A run that finished by using up its budget goes on when a resume gives it more.

    One that stopped early on patience stays finished, and so does one whose checkpoint
    predates ``stop_reason`` (its reason is unknown).
    """
    if state.finished and state.stop_reason == STOP_BUDGET and not budget_spent(state, train_cfg):
        state.finished, state.stop_reason = False, ""
    return state


def resume_point(checkpoints: CheckpointManager, best: CheckpointManager) -> Optional[str]:
    """The newest complete checkpoint of ``checkpoints/`` and ``best/`` (``checkpoints/`` on a tie).

    A ``best/`` checkpoint is a full snapshot of the run (weights, optimizer, RNG, position,
    train state equal to the periodic checkpoint that follows it at the same step), so when a
    kill between the two, or a lost ``checkpoints/``, leaves it the newest, the run resumes
    from it instead of starting again from scratch beside it.
    """
    found = [path for path in (checkpoints.latest(), best.latest()) if path is not None]
    return max(found, key=lambda path: read_train_state(path).global_step) if found else None


def _check_resumable_position(state: TrainState, ctx: DistContext, train_cfg: TrainConfig) -> None:
    """Each rank reads its own share of the rows, so a checkpoint taken mid-epoch by another
    number of ranks has no exact position for this job: refused unless ``train.reshard_mid_epoch``
    accepts going on after the same number of samples.

    Raises:
        ConfigError: another world size mid-epoch, without ``train.reshard_mid_epoch``.
    """
    if state.world_size == ctx.world_size or state.step_in_epoch == 0:
        return  # the same ranks, or an epoch boundary
    if reopen_for_budget(state, train_cfg).finished or budget_spent(state, train_cfg):
        return  # a run that trains no further row
    if not train_cfg.reshard_mid_epoch:
        raise ConfigError(
            f"{train_cfg.run_dir}: its newest checkpoint was taken {state.step_in_epoch} steps into epoch "
            f"{state.epoch} by {state.world_size} rank(s); this job has {ctx.world_size}, whose shares of the "
            f"rows differ, so that epoch cannot go on exactly. Resume with {state.world_size} rank(s), or set "
            "train.reshard_mid_epoch=true to go on after the same number of samples (some rows of this "
            "epoch are then seen twice and others not at all; later epochs are exact)"
        )
    if ctx.is_main:
        print(f"[recsys_llm] train.reshard_mid_epoch: epoch {state.epoch} goes on with {ctx.world_size} rank(s) "
              f"after {state.world_size} rank(s) read part of it; some of its rows repeat, others are skipped",
              flush=True)


def _state_for_world(state: TrainState, ctx: DistContext, batch_size: int, seed: int) -> TrainState:
    """Converts the reader position of a checkpoint written with another world size / batch size.

    With another batch size it is exact when the rows read so far fill whole batches of the new
    size; otherwise the rows of the partial batch are read again (said on rank 0). See
    :func:`_check_resumable_position` for another world size.
    """
    if state.world_size == ctx.world_size and state.batch_size == batch_size:
        return state
    samples = state.step_in_epoch * state.batch_size * state.world_size
    state.step_in_epoch, left_over = divmod(samples, batch_size * ctx.world_size)
    if left_over and state.world_size == ctx.world_size and ctx.is_main:
        print(f"[recsys_llm] resuming {samples} rows into epoch {state.epoch} with data.batch_size={batch_size} "
              f"(was {state.batch_size}): {left_over} of them do not fill a batch and are read again", flush=True)
    state.world_size, state.batch_size = ctx.world_size, batch_size
    seed_everything(seed + state.global_step + ctx.rank)
    return state


def data_fingerprints(config: ExperimentConfig, schema: DatasetSchema) -> Dict[str, str]:
    """Split name -> :func:`~recsys_llm.data.parquet.split_fingerprint` of every split the run reads."""
    data = config.data
    splits = [split for split in (data.train_split, data.valid_split, data.test_split) if split and split in schema.splits]
    return {split: split_fingerprint(schema, split) for split in dict.fromkeys(splits)}


def check_same_data(saved_record: Dict[str, Any], current: Dict[str, str], schema: DatasetSchema, source: str) -> None:
    """Raises when a split a resumed run reads now holds other rows than when the run started (the
    directory prepared again with the same fields and sizes): the run would go on with other data,
    and skip as many batches of it as it had trained of the old. Runs that recorded no data
    fingerprints (older ones) are not checked.

    Raises:
        ConfigError: naming the splits that changed.
    """
    saved = saved_record.get(DATA_FINGERPRINTS_KEY) or {}
    changed = [split for split in current if split in saved and saved[split] != current[split]]
    if changed:
        raise ConfigError(
            f"{source}: the data of split(s) {changed} in {schema.root} changed since this run started (other rows "
            "under the same fields and sizes, e.g. prepared again); a resume would train on both. Restore the data "
            "the run started with, or train into another train.run_dir"
        )


def lock_run_dir(run_dir: str) -> IO[str]:
    """Creates ``run_dir`` and takes an exclusive lock on ``run_dir/.lock`` (released when the returned
    file is closed, or its process ends, even by SIGKILL).

    Raises:
        ConfigError: another process holds the lock (a job training in ``run_dir``).
    """
    os.makedirs(run_dir, exist_ok=True)
    handle = open(os.path.join(run_dir, RUN_LOCK_FILE), "a", encoding="utf-8")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ConfigError(
            f"{run_dir}: another job is training in this train.run_dir (it holds {RUN_LOCK_FILE} there); wait for "
            "it to end (or stop it), or use another train.run_dir"
        ) from None
    return handle


def check_run_dir_is_ours(run_dir: str) -> None:
    """Raises when ``run_dir`` holds files but is no run directory: training would write its
    config.yaml, results.json and checkpoints among (or over) them.

    Raises:
        ConfigError: naming the directory and a few of its entries.
    """
    entries = sorted(os.listdir(run_dir)) if os.path.isdir(run_dir) else []
    if entries and not any(marker in entries for marker in (*RUN_MARKERS, RUN_LOCK_FILE)):
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise ConfigError(
            f"{run_dir}: train.run_dir is not empty and holds no run of recsys-llm train (it has {shown}; a run "
            f"has {', '.join(RUN_MARKERS)}); training would write config.yaml, results.json and checkpoints "
            "among them. Use a new or empty train.run_dir"
        )


def check_same_field_vectors(saved_plugins: Dict[str, Any], current_plugins: Dict[str, Any], source: str) -> None:
    """Raises when a resumed LLaCTR run's vector file now holds other vectors than it trained with.

    The checkpoint restores the vectors it trained with (FRE's and FIE's buffers), so going on
    would train with the old vectors while ``plugins.json`` recorded the new ones. Moving the
    file, or writing the same vectors again, is fine; entries that only one of the two records
    has (written by another version) are not compared.

    Raises:
        ConfigError: naming the file, the vectors' path and the entries that differ.
    """
    saved, current = saved_plugins.get("llactr"), current_plugins.get("llactr")
    if not saved or not current:
        return
    current = json.loads(json.dumps(current, default=str))  # as plugins.json stores it
    keys = sorted((set(saved) & set(current)) - VECTOR_RECORD_PLACE_KEYS)
    differing = [key for key in keys if saved[key] != current[key]]
    if differing:
        raise ConfigError(
            f"{source}: this run trained with other field vectors than {current.get('vectors')} holds now "
            f"(differing: {', '.join(differing)}); a resume goes on with the vectors in its checkpoint. Restore "
            "the vector file the run started with to resume it, or train the new vectors in another train.run_dir"
        )


def _earlier_throughput(run_dir: str) -> Optional[float]:
    """``samples_per_second`` of the results an earlier job wrote in ``run_dir`` (None without one)."""
    earlier = finished_results(run_dir)
    return earlier.get("samples_per_second") if earlier else None


def finished_results(run_dir: str) -> Optional[Dict[str, Any]]:
    """The ``results.json`` :func:`run_training` wrote last in ``run_dir``, or None if it never finished."""
    path = os.path.join(run_dir, RESULTS_FILE)
    if not os.path.exists(path):
        return None
    return read_run_record(path)


def run_training(config: ExperimentConfig, on_step: Optional[StepHook] = None) -> Dict[str, Any]:
    """Trains, validates with early stopping, tests; returns (and writes) the results (every rank).

    Args:
        config (ExperimentConfig): the experiment.
        on_step (Optional[StepHook]): called after every optimizer step with the train state.

    Returns:
        Dict[str, Any]: ``{"valid": best validation metrics, "test": test metrics (with
        ``cold/*``), "best_step", "global_step", "epochs", "samples_per_second", "world_size",
        "stopped_early", "run_dir"}``.
    """
    set_cpu_float_mode(config.train)
    ctx = init_distributed(config.train.device)
    seed_everything(config.train.seed)
    train_cfg = config.train
    run_dir = train_cfg.run_dir  # created only once every check has passed: a refused run leaves nothing
    check_run_dir_is_ours(run_dir)
    _, elec = parse_plugin_sections(config)  # before the data is made: a bad llactr / elec value is refused at once
    if elec is not None and not os.path.exists(os.path.join(run_dir, "config.yaml")):  # a new run
        _check_offline_reads_no_vectors(elec)
    schema = load_or_generate_schema(config, ctx)
    built = build_task(config, schema, ctx.device)
    swap = swapped_pairs(built, schema, train_cfg.seed, ctx.rank)  # before sharding: a bad catalogue fails early
    readers = _readers(config, schema, ctx, train_transform=swap)
    if len(readers["train"]) == 0:
        raise ValueError(f"training split {config.data.train_split!r} gives 0 batches per rank at batch size {config.data.batch_size}")

    # swapped pairs double every training batch; the planner sizes for what a step really holds
    step_rows = config.data.batch_size * (2 if swap is not None else 1)
    model, plan = shard_model(built.task, ctx.device, ctx.world_size, config.sharding, config.optim, step_rows)
    optimizer = build_optimizer(model, config.optim)
    checkpoints = CheckpointManager(os.path.join(run_dir, "checkpoints"), keep=train_cfg.keep_checkpoints)
    best = CheckpointManager(os.path.join(run_dir, "best"), keep=1)
    earlier = resume_point(checkpoints, best)
    latest = earlier if train_cfg.resume else None
    if latest is None:
        # a resumed run takes these weights from its checkpoint, so their source files (teacher
        # checkpoint, entity vectors) need not be where they were when it started
        # a bad vector or teacher file can fail on the one rank that reads its rows
        run_on_every_rank(lambda: load_plugin_state(model, built, schema), "loading the plug-in weights", ctx.device)
    saved_config = os.path.join(run_dir, "config.yaml")
    fingerprints = data_fingerprints(config, schema)
    # every rank, before anything in run_dir changes
    if earlier is not None and not train_cfg.resume:
        raise ValueError(f"{run_dir}: holds checkpoints of an earlier run ({earlier}); with train.resume=false "
                         "its checkpoints and the new run's would mix: use an empty train.run_dir")
    if latest is not None and not os.path.isfile(saved_config):
        raise ConfigError(f"{run_dir}: holds checkpoints ({latest}) but no config.yaml, so a resume cannot check "
                          "that it trains the same model; restore config.yaml or use another train.run_dir")
    if latest is not None:
        check_resumable(config, saved_config)
        _check_trained_on(schema, saved_config, run_dir)
        _check_resumable_position(read_train_state(latest), ctx, train_cfg)
        saved_plugins = os.path.join(run_dir, PLUGINS_FILE)
        if os.path.isfile(saved_plugins):
            saved_record = read_run_record(saved_plugins)
            check_plugin_history(saved_record, built.plugins, saved_plugins)
            check_same_field_vectors(saved_record, built.plugins, saved_plugins)
            check_same_data(saved_record, fingerprints, schema, saved_plugins)
    barrier()  # every rank has read config.yaml / plugins.json before rank 0 rewrites them
    # rank 0 holds the run directory while the job trains: a second job there would delete the
    # first one's checkpoint in writing and interleave its metrics
    lock = run_on_every_rank(lambda: lock_run_dir(run_dir) if ctx.is_main else None, "locking train.run_dir", ctx.device)
    try:
        return _train_in_run_dir(config, ctx, schema, built, readers, model, plan, optimizer, checkpoints, best, latest,
                                 saved_config, fingerprints, on_step)
    finally:
        if lock is not None:
            lock.close()  # closing the file releases its lock


def _train_in_run_dir(
    config: ExperimentConfig, ctx: DistContext, schema: DatasetSchema, built: BuiltTask,
    readers: Dict[str, ParquetBatchReader], model: nn.Module, plan: Any, optimizer: Any, checkpoints: CheckpointManager,
    best: CheckpointManager, latest: Optional[str], saved_config: str, fingerprints: Dict[str, str],
    on_step: Optional[StepHook],
) -> Dict[str, Any]:
    """:func:`run_training` from the first write into ``train.run_dir`` on (rank 0 holds its lock)."""
    train_cfg = config.train
    run_dir = train_cfg.run_dir
    if ctx.is_main:
        save_config(config, saved_config)
        write_text_atomically(os.path.join(run_dir, PLUGINS_FILE), json.dumps(
            {SCHEMA_FINGERPRINT_KEY: schema.fingerprint(), DATA_FINGERPRINTS_KEY: fingerprints, **built.plugins},
            indent=2, sort_keys=True, default=str))
        with open(os.path.join(run_dir, "sharding_plan.json"), "w", encoding="utf-8") as handle:
            handle.write(describe_plan(plan))
    log = _RunLog(os.path.join(run_dir, "metrics.jsonl"), ctx.is_main)

    state = TrainState(world_size=ctx.world_size, batch_size=config.data.batch_size)
    if latest is not None:
        state = _state_for_world(load_checkpoint(latest, model, optimizer), ctx, config.data.batch_size,
                                 train_cfg.seed)
        state = reopen_for_budget(state, train_cfg)
        log.write({"event": "resumed", "checkpoint": latest, "global_step": state.global_step, "epoch": state.epoch})
        if ctx.is_main:
            print(f"resuming {run_dir} from {latest}: epoch {state.epoch}, step {state.global_step}", flush=True)

    subsets = _subsets(config, schema)
    train_reader = readers["train"]
    throughput: List[float] = []

    def step_callback(step_in_epoch: int, loss: torch.Tensor) -> bool:
        state.step_in_epoch = step_in_epoch
        state.global_step += 1
        if state.global_step % 50 == 0:
            log.write({"event": "train", "global_step": state.global_step, "epoch": state.epoch, "loss": float(loss)})
        if train_cfg.checkpoint_every and state.global_step % train_cfg.checkpoint_every == 0:
            check_finite_loss(loss, f"step {state.global_step}")  # a NaN step makes every later loss NaN
            checkpoints.save(model, optimizer, state)
        if on_step is not None:
            on_step(state)
        return budget_spent(state, train_cfg)  # within an epoch, only max_steps can be spent

    while not state.finished:
        epoch_done = False
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
            )
            if stats.steps:
                throughput.append(stats.samples_per_second * ctx.world_size)
            log.write(_epoch_record(stats, state, ctx.world_size, resumed_at))
            epoch_done = not stats.stopped_early or state.step_in_epoch >= len(train_reader)
            if epoch_done:
                state.epoch += 1
                state.step_in_epoch = 0
        last = budget_spent(state, train_cfg)
        if last:  # set before validating: a best/ checkpoint holds the same state as the one below
            state.finished, state.stop_reason = True, STOP_BUDGET
        if "valid" in readers and (last or (epoch_done and state.epoch % max(1, train_cfg.eval_every) == 0)):
            _validate(model, optimizer, readers["valid"], ctx, state, best, log, train_cfg)
        checkpoints.save(model, optimizer, state)

    best_path = best.latest()
    if best_path is not None:
        load_checkpoint(best_path, model, None, restore_rng=False)
    results: Dict[str, Any] = {
        "run_dir": run_dir,
        "world_size": ctx.world_size,
        "global_step": state.global_step,
        "epochs": state.epoch,
        "best_step": state.best_step,
        "stopped_early": _stopped_early(state, train_cfg),
        # a job that trained no step (a finished run run again) keeps the earlier job's figure
        "samples_per_second": float(np.mean(throughput)) if throughput else _earlier_throughput(run_dir),
        "valid": {"auc": None if state.best_metric == float("-inf") else state.best_metric},
    }
    if "test" in readers:
        results["test"] = evaluate(
            model, readers["test"], ctx.device, CTRMetrics(subsets), description="test",
            progress=train_cfg.progress,
        )
        log.write({"event": "test", "global_step": state.global_step, **results["test"]})
    if ctx.is_main:
        tmp = os.path.join(run_dir, f"{RESULTS_FILE}.tmp")
        with open(tmp, "w", encoding="utf-8") as handle:
            json.dump(results, handle, indent=2, sort_keys=True, default=float)
        os.replace(tmp, os.path.join(run_dir, RESULTS_FILE))
    barrier()
    return results


def _validate(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reader: ParquetBatchReader,
    ctx: DistContext,
    state: TrainState,
    best: CheckpointManager,
    log: _RunLog,
    train_cfg: TrainConfig,
) -> None:
    """Validates; a better AUC saves the model to ``best/``, ``train.patience`` evaluations
    without one finish the run (``state`` is updated in place)."""
    valid = evaluate(model, reader, ctx.device, CTRMetrics(), description="valid", progress=train_cfg.progress)
    log.write({"event": "valid", "epoch": state.epoch, "global_step": state.global_step, **valid})
    auc = valid["auc"]
    if not math.isnan(auc) and auc > state.best_metric:
        state.best_metric, state.best_step, state.bad_evals = auc, state.global_step, 0
        best.save(model, optimizer, state)
    else:
        state.bad_evals += 1
    if train_cfg.patience and state.bad_evals >= train_cfg.patience:
        log.write({"event": "early_stop", "global_step": state.global_step, "best_step": state.best_step})
        state.finished, state.stop_reason = True, STOP_PATIENCE


def _stopped_early(state: TrainState, train_cfg: TrainConfig) -> bool:
    """Whether the run stopped on patience (inferred from ``bad_evals`` for a checkpoint
    written before ``stop_reason`` was recorded)."""
    if state.stop_reason:
        return state.stop_reason == STOP_PATIENCE
    return bool(train_cfg.patience) and state.bad_evals >= train_cfg.patience


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
    schema = load_or_generate_schema(config, ctx, generate=False)
    _check_trained_on(schema, saved_config, checkpoint)
    return TrainedRun(checkpoint, ctx, schema)


def _check_trained_on(schema: DatasetSchema, saved_config: Optional[str], what: str) -> None:
    """Raises ConfigError when the run of ``saved_config`` trained on data of another schema
    (e.g. the same directory prepared again with other sizes)."""
    trained_on = _trained_schema_fingerprint(saved_config)
    if trained_on is not None and trained_on != schema.fingerprint():
        raise ConfigError(
            f"{what}: trained on data with schema fingerprint {trained_on}, but {schema.root} has "
            f"{schema.fingerprint()} (other fields, sizes or descriptions): use data prepared like the training data"
        )


def _trained_schema_fingerprint(saved_config: Optional[str]) -> Optional[str]:
    """The schema fingerprint in ``plugins.json`` beside a run's ``config.yaml`` (None for a bare
    checkpoint, or a run written before runs recorded it)."""
    plugins = os.path.join(os.path.dirname(saved_config), PLUGINS_FILE) if saved_config else None
    if plugins is None or not os.path.isfile(plugins):
        return None
    return read_run_record(plugins).get(SCHEMA_FINGERPRINT_KEY)


# what each record of a run directory is for, in the error for a damaged one
RUN_RECORD_ROLES = {
    PLUGINS_FILE: "it records the schema, data and plug-ins the run trained with, which a resume, evaluate and "
                  "export check against; restore it, or delete it (training writes it again; the checks it serves "
                  "are skipped until then)",
    RESULTS_FILE: "it holds the finished run's results; restore it, or delete it (training the run again writes it)",
}


def read_run_record(path: str) -> Dict[str, Any]:
    """The JSON object of a run directory's record (``plugins.json``, ``results.json``).

    Raises:
        ConfigError: the file is not valid UTF-8 JSON, or holds no JSON object: naming the file,
            the problem and what to do.
    """
    def damaged(problem: str) -> ConfigError:
        role = RUN_RECORD_ROLES.get(os.path.basename(path), "restore it, or delete it")
        return ConfigError(f"{path}: damaged run record, {problem}, not what `recsys-llm train` wrote; {role}")

    try:
        with open(path, encoding="utf-8") as handle:
            record = json.load(handle)
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError
        raise damaged(f"not valid JSON ({telling_line(error)})") from error
    if not isinstance(record, dict):
        raise damaged(f"holds a JSON {type(record).__name__}, expected an object")
    return record


def load_trained_model(config: ExperimentConfig, run: TrainedRun) -> nn.Module:
    """The DMP-sharded task of ``config`` with the run's checkpoint loaded (collective; any
    world size: the shards are re-cut). Every weight comes from the checkpoint, frozen entity
    tables and a frozen teacher included, so their source files are not read again."""
    built = build_task(config, run.schema, run.ctx.device)
    model, _ = shard_model(built.task, run.ctx.device, run.ctx.world_size, config.sharding, config.optim,
                           config.data.batch_size)
    load_checkpoint(run.checkpoint, model, None, restore_rng=False)
    return model


def run_evaluation(config: ExperimentConfig, checkpoint: str, split: Optional[str] = None) -> Dict[str, Any]:
    """Loads ``checkpoint`` (any world size: shards are re-cut) and evaluates one split (every rank).

    Args:
        config (ExperimentConfig): the experiment the checkpoint came from.
        checkpoint (str): a complete checkpoint directory, or a run directory (its best model,
            else its latest checkpoint).
        split (Optional[str]): split to evaluate (default ``data.test_split``).

    Returns:
        Dict[str, Any]: metrics (with ``cold/*`` when the data marks cold items).
    """
    run = open_trained_run(config, checkpoint)
    ctx, schema = run.ctx, run.schema
    seed_everything(config.train.seed)
    split = split or config.data.test_split
    data = config.data
    extras = list(data.extras) + plugin_extras(config) + list(_subsets(config, schema).values())
    reader = ParquetBatchReader(
        schema, split, data.eval_batch_size or data.batch_size, rank=ctx.rank, world_size=ctx.world_size,
        extras=sorted(set(extras)), validate=data.validate, pin_memory=ctx.device.type == "cuda", equal_batches=False,
    )
    model = load_trained_model(config, run)
    results = evaluate(model, reader, ctx.device, CTRMetrics(_subsets(config, schema)), description=split,
                       progress=config.train.progress)
    results["checkpoint"] = run.checkpoint
    results["split"] = split
    return results
