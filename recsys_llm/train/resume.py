"""Where a resumed run goes on: its newest checkpoint, its budget, and its reader position under
another world size or batch size."""

import json
import sys
import warnings
from typing import Any, Collection, Dict, List, Mapping, Optional

from torchrec.distributed.types import ShardingPlan

from recsys_llm.data.parquet import ParquetBatchReader, default_shuffle_buffer_rows
from recsys_llm.train.checkpoint import (
    STOP_BUDGET,
    TRAIN_STATE_FILE,
    CheckpointManager,
    TrainState,
    read_train_state,
)
from recsys_llm.train.config import ConfigError, TrainConfig
from recsys_llm.train.distributed import DistContext
from recsys_llm.train.process import seed_everything
from recsys_llm.train.plan_report import table_placements


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


def resume_point(checkpoints: CheckpointManager, best: CheckpointManager, *, warn: bool = True) -> Optional[str]:
    """The newest complete checkpoint of ``checkpoints/`` and ``best/`` (``checkpoints/`` on a tie), None when
    neither holds one; with ``warn`` (False for a second look at the same start), a warning names each newer
    ``ckpt-N`` of either that is incomplete (damaged: see :meth:`CheckpointManager.incomplete_after`) and passed over.

    A ``best/`` checkpoint is a full snapshot of the run (weights, optimizer, RNG, position,
    train state equal to the periodic checkpoint that follows it at the same step), so when a
    kill between the two, or a lost ``checkpoints/``, leaves it the newest, the run resumes
    from it instead of starting again from scratch beside it.
    """
    found = [path for path in (checkpoints.latest(), best.latest()) if path is not None]
    steps = {path: read_train_state(path).global_step for path in found}
    chosen = max(found, key=steps.__getitem__) if found else None
    step = steps[chosen] if chosen is not None else -1
    passed_over = checkpoints.incomplete_after(step) + best.incomplete_after(step) if warn else []
    if passed_over:  # the resume's next save of that step replaces it: say what is lost
        warnings.warn(f"{', '.join(passed_over)}: newer than the checkpoint this run resumes from "
                      f"({chosen or 'none: it starts again'}), but incomplete: its {TRAIN_STATE_FILE} is missing or "
                      "not a file (a save writes it last, and renames the checkpoint into place whole: this is "
                      "damage, not an interrupted save); passed over, and replaced when the run saves that step "
                      "again: copy it away first to keep it", stacklevel=2)
    return chosen


def _shuffled_otherwise(state: TrainState, reader: ParquetBatchReader, shuffle: bool) -> bool:
    """Whether ``reader`` orders an epoch's rows otherwise than the reader of the job that wrote ``state``:
    a shuffling reader mixes rows in buffers whose size follows the batch size above 8,192 rows
    (:func:`~recsys_llm.data.parquet.default_shuffle_buffer_rows`), which reorders every rank's rows
    that fill more than the smaller buffer (the same on every rank)."""
    if not shuffle or state.batch_size <= 0:  # a checkpoint that did not record its batch size
        return False
    before, now = default_shuffle_buffer_rows(state.batch_size), reader.shuffle_buffer_rows
    return before != now and max(reader.rows_per_rank) > min(before, now)


def read_whole_epoch(state: TrainState, reader: ParquetBatchReader) -> bool:
    """Whether the job that wrote ``state`` had trained on every batch of its epoch: a checkpoint of the
    epoch's last step (``train.checkpoint_every``) that a kill before the epoch-end one (while validating)
    left the newest. Its position is the epoch's end under any world size and batch size.

    Args:
        reader (ParquetBatchReader): this job's training reader (the same split's rows).
    """
    if state.step_in_epoch <= 0 or state.batch_size <= 0:  # a checkpoint that did not record its batch size
        return False
    return state.step_in_epoch >= reader.batches_with(state.world_size, state.batch_size)


def check_resumable_position(state: TrainState, ctx: DistContext, train_cfg: TrainConfig,
                             reader: ParquetBatchReader, shuffle: bool) -> None:
    """Each rank reads its own share of the rows, so a checkpoint taken mid-epoch by another
    number of ranks has no exact position for this job; neither has one taken with a batch size
    whose shuffle buffer differs from ``reader``'s (the epoch's rows come in another order).
    Either is refused unless ``train.reshard_mid_epoch`` accepts going on after the same number
    of samples.

    Args:
        reader (ParquetBatchReader): this job's training reader.
        shuffle (bool): ``data.shuffle``.

    Raises:
        ConfigError: another world size, or another shuffle order, mid-epoch, without ``train.reshard_mid_epoch``.
    """
    if state.step_in_epoch == 0 or read_whole_epoch(state, reader):
        return  # an epoch boundary
    other_ranks = state.world_size != ctx.world_size
    other_order = _shuffled_otherwise(state, reader, shuffle)
    if not (other_ranks or other_order):
        return  # the same ranks, reading the rows in the same order
    if reopen_for_budget(state, train_cfg).finished or budget_spent(state, train_cfg):
        return  # a run that trains no further row
    if other_ranks:
        why = (f"by {state.world_size} rank(s); this job has {ctx.world_size}, whose shares of the rows differ",
               f"Resume with {state.world_size} rank(s)")
    else:
        why = (f"with data.batch_size={state.batch_size}; this job shuffles the rows in buffers of "
               f"{reader.shuffle_buffer_rows} rows instead of {default_shuffle_buffer_rows(state.batch_size)} "
               "(the buffer follows the batch size above 8,192 rows), so they come in another order",
               f"Resume with data.batch_size={state.batch_size}")
    if not train_cfg.reshard_mid_epoch:
        raise ConfigError(
            f"{train_cfg.run_dir}: its newest checkpoint was taken {state.step_in_epoch} steps into epoch "
            f"{state.epoch} {why[0]}, so that epoch cannot go on exactly. {why[1]}, or set "
            "train.reshard_mid_epoch=true to go on after the same number of samples (some rows of this "
            "epoch are then seen twice and others not at all; later epochs are exact)"
        )
    if ctx.is_main:
        change = (f"with {ctx.world_size} rank(s) after {state.world_size} rank(s) read part of it" if other_ranks
                  else f"in another row order than data.batch_size={state.batch_size} read part of it in")
        print(f"[recsys_llm] train.reshard_mid_epoch: epoch {state.epoch} goes on {change}; some of its rows repeat, "
              "others are skipped", file=sys.stderr, flush=True)


def state_for_world(state: TrainState, ctx: DistContext, batch_size: int, seed: int,
                    reader: Optional[ParquetBatchReader] = None) -> TrainState:
    """Converts the reader position of a checkpoint written with another world size / batch size.

    With another batch size it is exact when the rows read so far fill whole batches of the new
    size; otherwise the rows of the partial batch are read again (said on rank 0). A checkpoint
    of an epoch's last step goes on at the end of ``reader``'s epoch (:func:`read_whole_epoch`).
    See :func:`check_resumable_position` for another world size.

    Args:
        reader (Optional[ParquetBatchReader]): this job's training reader.
    """
    if state.world_size == ctx.world_size and state.batch_size == batch_size:
        return state
    samples = state.step_in_epoch * state.batch_size * state.world_size
    if reader is not None and read_whole_epoch(state, reader):  # its last batch may hold fewer rows
        state.step_in_epoch, left_over = len(reader), 0
    else:
        state.step_in_epoch, left_over = divmod(samples, batch_size * ctx.world_size)
    if left_over and state.world_size == ctx.world_size and ctx.is_main:
        print(f"[recsys_llm] resuming {samples} rows into epoch {state.epoch} with data.batch_size={batch_size} "
              f"(was {state.batch_size}): {left_over} of them do not fill a batch and are read again", file=sys.stderr,
              flush=True)
    state.world_size, state.batch_size = ctx.world_size, batch_size
    seed_everything(seed + state.global_step + ctx.rank)
    return state


def column_shards(placement: Dict[str, Any]) -> int:
    """How many column ranges a table's shards split it into (``table_placements``' entry of one
    table): more than 1 only for the column-wise types."""
    return len({tuple(shard["offsets"][1:]) for shard in placement.get("shards") or []}) or 1


def stateful_tables(tables: Collection[str], frozen_tables: Collection[str]) -> List[str]:
    """The tables of ``tables`` (a run's trained tables, or those a ``train.init_from`` run takes) that keep optimizer
    state: all but ``frozen_tables`` (``sharding.frozen_tables``: SGD at lr 0, stateless), sorted."""
    return sorted(name for name in tables if name not in frozen_tables)


def check_same_table_state_layout(saved_plan_path: str, plan: ShardingPlan, sparse_optimizer: str,
                                  advice: str = "", renamed: Optional[Mapping[str, str]] = None,
                                  tables: Optional[Collection[str]] = None) -> None:
    """Raises when the table optimizer's state saved under the plan of a run's checkpoints (``sharding_plan.json``)
    cannot be loaded into this job's plan, which DCP's resharding of the tables' rows and columns does not cover:

    * a table replicated (``data_parallel``) in one plan and sharded in the other, with any optimizer that keeps
      state (not ``sgd``): a replicated table's state is a torch optimizer's (Adagrad's ``sum``, ``step``), a
      sharded one's FBGEMM's (``momentum1``); with ``sharding.sharding_types`` empty the planner may choose
      otherwise on another world size;
    * with ``row_wise_adagrad``, a table whose columns are split into other shards: its state holds one value per
      row of each column shard (rows x shards). The planner may split otherwise on another world size or device
      (on CUDA a table wider than FBGEMM's kernels take is always column-wise), or with another
      ``sharding.proposer_patience`` (runs saved before 2026-12-06 were planned with the exhaustive search, 0).

    A run without a readable record is left to the checkpoint's load. ``advice``: what to do instead (default:
    resume as the run was saved). ``renamed``: the saved table each of this plan's tables takes its state from,
    where its name differs (``train.init_scope=tables`` matching tables by field). ``tables``: this plan's tables
    whose state is loaded (``train.init_from``: not a frozen table's, which keeps none, nor, under
    ``train.init_scope=tables``, a table left fresh); None: every table.

    Raises:
        ConfigError: naming each such table, its placement then and now, and what keeps it.
    """
    if sparse_optimizer == "sgd":
        return
    try:
        with open(saved_plan_path, encoding="utf-8") as handle:
            saved = json.load(handle)
    except (OSError, ValueError):
        return
    if not isinstance(saved, dict):
        return
    renamed = renamed or {}
    placements = {(table if renamed.get(table, table) == table else f"{table} (from {renamed[table]})"):
                  (saved[renamed.get(table, table)], placement)
                  for table, placement in sorted(table_placements(plan).items())
                  if isinstance(saved.get(renamed.get(table, table)), dict) and (tables is None or table in tables)}
    advice = advice or _RESUME_AS_SAVED.format(plan=saved_plan_path)
    replicated = [f"{table!r} {before.get('sharding_type')} -> {now['sharding_type']}"
                  for table, (before, now) in placements.items()
                  if (before.get("sharding_type") == "data_parallel") != (now["sharding_type"] == "data_parallel")]
    if replicated:
        raise ConfigError(
            f"{saved_plan_path}: this job's sharding plan replicates (data_parallel) tables that the plan the run's "
            f"checkpoints were saved under shards, or the reverse ({'; '.join(replicated)}), and the "
            f"{sparse_optimizer} state of a replicated table (a torch optimizer's) does not load into a sharded one "
            "(FBGEMM's) or the reverse; the planner may choose otherwise on another world size or device unless "
            f"sharding.sharding_types leaves data_parallel out (or allows only it); {advice}"
        )
    split = [f"{table!r} {column_shards(before)} ({before.get('sharding_type')}) -> "
             f"{column_shards(now)} ({now['sharding_type']})"
             for table, (before, now) in placements.items() if column_shards(before) != column_shards(now)]
    if split and sparse_optimizer == "row_wise_adagrad":
        raise ConfigError(
            f"{saved_plan_path}: this job's sharding plan splits the columns of tables into other shards than the "
            f"plan the run's checkpoints were saved under ({'; '.join(split)} column shards), and the "
            "row_wise_adagrad state of a table has one value per row of each column shard, which cannot be "
            f"loaded into another split; {advice}"
        )


# check_same_table_state_layout's advice to a resume
_RESUME_AS_SAVED = ("resume on the world size and device the run was saved on with the run's own plan "
                    "(sharding.plan_file={plan}; a run saved before 2026-12-06 was planned by the exhaustive search, "
                    "sharding.proposer_patience=0), or use another train.run_dir for a new run")
