"""A new run that starts from another run's trained weights (``train.init_from``): the next day's
training of yesterday's model, on data prepared like it (``prepare tabular --like``).

Unlike a resume, the new run has its own run directory, data, budget and position (step 0,
epoch 0, its own shuffle and RNG streams); it takes the earlier run's weights and, with
``train.init_optimizer`` (the default), its table and dense optimizer states, so row-wise Adagrad
goes on with the step sizes it had reached instead of starting again from its largest ones.
Frozen plug-in weights (ELEC's entity tables and frozen teacher) come from their own files
afterwards, as in any new run.

Example::

    recsys-llm train --config configs/shop.yaml train.run_dir=runs/day2 \\
        data.schema=data/shop-day2 train.init_from=runs/day1
"""

import os
from typing import Any, Dict, NamedTuple, Optional

from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.train.checkpoint import (
    checkpoint_digests,
    load_checkpoint,
    read_train_state,
    resolve_checkpoint,
    run_config_of,
    run_dir_of,
)
from recsys_llm.train.config import ConfigError, ExperimentConfig, check_same_model, load_config
from recsys_llm.train.resume import check_same_table_state_layout
from recsys_llm.train.run_records import (
    PLAN_FILE,
    check_same_entity_vector_source,
    check_trained_on,
    check_trained_with_these_vectors,
)

#: the key of ``plugins.json`` that records where a run's first weights came from
INIT_FROM_KEY = "init_from"
#: optimizer settings that shape the saved optimizer state (learning rates, eps and decay do not)
OPTIMIZER_KINDS = ("sparse", "dense")
#: model settings a new run may change from its init run: the files of frozen weights it loads afresh (the next
#: day's entity vectors, with vectors for its new ids; of the width ``elec.vector_dim`` keeps)
INIT_FREE_KEYS = ("elec.entity_vectors", "elec.entity_tables")


class InitSource(NamedTuple):
    """The checked checkpoint a new run starts from (:func:`check_init_source`)."""

    checkpoint: str
    with_optimizer: bool


def check_init_source(config: ExperimentConfig, schema: DatasetSchema, plan: ShardingPlan,
                      plugins: Dict[str, Any]) -> Optional[InitSource]:
    """Resolves ``train.init_from`` (a run directory: its best, else latest, checkpoint; or a checkpoint
    directory inside one) and checks that this run can start from it; None when it is unset.

    Args:
        schema (DatasetSchema): this run's data.
        plan (ShardingPlan): this run's sharding plan (a row-wise Adagrad state cannot be re-cut into
            other column shards).
        plugins (Dict[str, Any]): this run's plug-in records (``BuiltTask.plugins``).

    Raises:
        FileNotFoundError: no checkpoint there, or one without its run's ``config.yaml``.
        ConfigError: another model or schema, other LLaCTR field vectors, ELEC entity vectors of another
            adapted LLM (other ids are fine: the day's export), or (with
            ``train.init_optimizer``) another kind of optimizer, a table trained here that it kept
            frozen, or another column split.
    """
    train_cfg = config.train
    if not train_cfg.init_from:
        return None
    try:
        checkpoint = resolve_checkpoint(train_cfg.init_from)
    except FileNotFoundError as error:  # name the setting: a daily job passes several paths
        raise FileNotFoundError(f"train.init_from={train_cfg.init_from}: {error}; expected the run directory of the "
                                "run to start from (or a checkpoint inside it)") from error
    saved_config = run_config_of(checkpoint)
    if saved_config is None:
        raise FileNotFoundError(
            f"train.init_from={train_cfg.init_from}: {checkpoint} lies outside its run directory, whose config.yaml "
            "and plugins.json tell which model and data its weights belong to; name the run directory or a "
            "checkpoint inside it"
        )
    advice = "set them as that run did, or leave train.init_from unset to start from fresh weights"
    check_same_model(config, saved_config, advice=advice, free=INIT_FREE_KEYS)
    check_trained_on(schema, saved_config, f"train.init_from={train_cfg.init_from}")
    fresh = "leave train.init_from unset to train on the new vectors from fresh weights"
    check_trained_with_these_vectors(checkpoint, plugins, f"Pass the vector file that run trained with "
                                     f"(llactr.vectors_path), or {fresh}", f"attach the vectors that run trained on, "
                                     f"or {fresh}")
    elec = config.elec or {}
    frozen_teacher = elec.get("task") == "distill" and (elec.get("distill") or {}).get("mode") == "frozen"
    if not frozen_teacher:  # a frozen teacher's tables come from its own checkpoint, which the run may change
        check_same_entity_vector_source(checkpoint, plugins, "Export the day's entities with the adapted LLM that "
                                        f"run's vectors came from (semantics export --llm), or {fresh}")
    if train_cfg.init_optimizer:
        _check_optimizer_state_fits(config, load_config(saved_config), plan,
                                    os.path.join(run_dir_of(checkpoint), PLAN_FILE))
    return InitSource(checkpoint, train_cfg.init_optimizer)


def _check_optimizer_state_fits(config: ExperimentConfig, saved: ExperimentConfig, plan: ShardingPlan,
                                saved_plan: str) -> None:
    """Raises ConfigError unless this run's optimizers can take the state of the run ``saved`` configured (its
    ``sharding_plan.json`` at ``saved_plan``): the same kinds, no table it kept frozen trained now, the same column
    split of each table (row-wise Adagrad)."""
    init_from = config.train.init_from
    changed = [f"optim.{kind}: {getattr(saved.optim, kind)!r} -> {getattr(config.optim, kind)!r}"
               for kind in OPTIMIZER_KINDS if getattr(saved.optim, kind) != getattr(config.optim, kind)]
    # a frozen table trains by plain SGD at lr 0, which keeps no state: none to go on with here
    thawed = [] if config.optim.sparse == "sgd" else sorted(
        set(saved.sharding.frozen_tables) - set(config.sharding.frozen_tables))
    if thawed:
        changed.append(f"sharding.frozen_tables: {', '.join(thawed)} frozen there (no optimizer state), trained here")
    if changed:
        raise ConfigError(
            f"train.init_from={init_from}: its run trained with another optimizer ({'; '.join(changed)}), whose "
            "state this run cannot take; set train.init_optimizer=false to start from its weights with fresh "
            "optimizer state, or use the same optimizers"
        )
    check_same_table_state_layout(saved_plan, plan, config.optim.sparse, advice=(
        f"set train.init_optimizer=false to start from its weights with fresh optimizer state, or shard as it "
        f"was (on its world size and device, sharding.plan_file={saved_plan})"))


def load_init_source(source: InitSource, model: nn.Module, optimizer: CombinedOptimizer) -> Dict[str, Any]:
    """Loads the checked checkpoint's weights (and optimizer state) into this run's sharded model (collective;
    any plan and world size: shards are re-cut); the RNG states stay this run's.

    Returns:
        Dict[str, Any]: the record ``plugins.json`` keeps under :data:`INIT_FROM_KEY`: the checkpoint, its
        step, whether its optimizer state came along, and its files' digests.
    """
    load_checkpoint(source.checkpoint, model, optimizer if source.with_optimizer else None, restore_rng=False)
    return {
        "checkpoint": os.path.abspath(source.checkpoint),
        "global_step": read_train_state(source.checkpoint).global_step,
        "optimizer": source.with_optimizer,
        "digests": checkpoint_digests(source.checkpoint),
    }
