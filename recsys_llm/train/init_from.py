"""A new run that starts from another run's trained weights (``train.init_from``): the next day's
training of yesterday's model, on data prepared like it (``prepare tabular --like``).

Unlike a resume, the new run has its own run directory, data, budget and position (step 0,
epoch 0, its own shuffle and RNG streams); it takes the earlier run's weights and, with
``train.init_optimizer`` (the default), its table and dense optimizer states, so row-wise Adagrad
goes on with the step sizes it had reached instead of starting again from its largest ones.
Frozen plug-in weights (ELEC's entity tables and frozen teacher) come from their own files
afterwards, as in any new run.

With ``train.init_scope=tables`` it takes only the trained embedding tables of the fields both runs have
(:mod:`recsys_llm.train.init_tables`: under the same state-dict key, or matched by field; with
``train.init_optimizer`` their optimizer states too) and leaves everything else fresh: tables of new fields, the
dense layers (whose input width changes with the fields) and the plug-ins' trained weights (LLaCTR's FRE/FIE field
state, ELEC's gain-network projections), which belong to the earlier fields and vectors. The next day's data may
then add (or drop) fields; each shared field must be as it was (settings, vocabulary or one grown from it) and its
table of the same shape.

Example::

    recsys-llm train --config configs/shop.yaml train.run_dir=runs/day2 \\
        data.schema=data/shop-day2 train.init_from=runs/day1
"""

import os
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple

from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.optim.keyed import CombinedOptimizer

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.modules.elec import TEACHER_PREFIX
from recsys_llm.train.checkpoint import (
    checkpoint_digests,
    load_checkpoint,
    read_train_state,
    resolve_checkpoint,
    run_config_of,
    run_dir_of,
    table_of,
)
from recsys_llm.train.config import ConfigError, ExperimentConfig, check_same_model, load_config
from recsys_llm.train.init_tables import TableShape, check_table_settings, shared_tables
from recsys_llm.train.resume import check_same_table_state_layout, stateful_tables
from recsys_llm.train.run_records import (
    PLAN_FILE,
    check_same_entity_vector_source,
    check_shared_fields,
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
    """The checked checkpoint a new run starts from (:func:`check_init_source`): with ``tables`` (table name ->
    state-dict key; ``train.init_scope=tables``) only those tables, ``fresh_tables`` left as initialised;
    ``sources``: the checkpoint's key of each of those keys it keeps under another (a table matched by field)."""

    checkpoint: str
    with_optimizer: bool
    tables: Optional[Dict[str, str]] = None
    fresh_tables: Tuple[str, ...] = ()
    sources: Optional[Dict[str, str]] = None


def check_init_source(config: ExperimentConfig, schema: DatasetSchema, plan: ShardingPlan,
                      plugins: Dict[str, Any], tables: Mapping[str, TableShape]) -> Optional[InitSource]:
    """Resolves ``train.init_from`` (a run directory: its best, else latest, checkpoint; or a checkpoint
    directory inside one) and checks that this run can start from it; None when it is unset.

    Args:
        schema (DatasetSchema): this run's data.
        plan (ShardingPlan): this run's sharding plan (a row-wise Adagrad state cannot be re-cut into
            other column shards).
        plugins (Dict[str, Any]): this run's plug-in records (``BuiltTask.plugins``).
        tables (Mapping[str, TableShape]): this run's trained tables
            (:func:`~recsys_llm.train.init_tables.trained_tables`), which
            ``train.init_scope=tables`` takes where the checkpoint has them.

    Raises:
        FileNotFoundError: no checkpoint there, or one without its run's ``config.yaml``.
        ConfigError: another model or schema, other LLaCTR field vectors, ELEC entity vectors of another
            adapted LLM (other ids are fine: the day's export), or (with
            ``train.init_optimizer``) another kind of optimizer, a table trained here that it kept
            frozen, or another column split. With ``train.init_scope=tables`` instead of another model or
            schema: other :data:`~recsys_llm.train.init_tables.TABLE_SETTINGS`, a shared field changed
            (settings, vocabulary), a shared table of another shape, a table whose field two of the checkpoint's
            tables embed (naming them), or no shared table at all; and of the optimizers only ``optim.sparse``.
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
    if train_cfg.init_scope == "tables":
        return _check_tables_source(config, schema, plan, checkpoint, saved_config, tables)
    advice = "set them as that run did, or leave train.init_from unset to start from fresh weights"
    check_same_model(config, saved_config, advice=advice, free=INIT_FREE_KEYS)
    check_trained_on(schema, saved_config, f"train.init_from={train_cfg.init_from}", advice=(
        "use data prepared like that run's (prepare tabular --like), or, for data with other fields (a new "
        "feature column), set train.init_scope=tables to take the tables of the fields both share and start the "
        "new fields' tables and the dense layers fresh"))
    fresh = "leave train.init_from unset to train on the new vectors from fresh weights"
    check_trained_with_these_vectors(checkpoint, plugins, f"Pass the vector file that run trained with "
                                     f"(llactr.vectors_path), or {fresh}", f"attach the vectors that run trained on, "
                                     f"or {fresh}")
    if not _has_frozen_teacher(config):  # a frozen teacher's tables come from its own checkpoint, which may change
        check_same_entity_vector_source(checkpoint, plugins, "Export the day's entities with the adapted LLM that "
                                        f"run's vectors came from (semantics export --llm), or {fresh}")
    if train_cfg.init_optimizer:
        _check_optimizer_state_fits(config, load_config(saved_config), plan,
                                    os.path.join(run_dir_of(checkpoint), PLAN_FILE),
                                    stateful=stateful_tables(tables, config.sharding.frozen_tables) if tables else None)
    return InitSource(checkpoint, train_cfg.init_optimizer)


def _check_tables_source(config: ExperimentConfig, schema: DatasetSchema, plan: ShardingPlan, checkpoint: str,
                         saved_config: str, tables: Mapping[str, TableShape]) -> InitSource:
    """:func:`check_init_source` under ``train.init_scope=tables``: the tables it takes and those left fresh."""
    what = f"train.init_from={config.train.init_from}"
    saved = load_config(saved_config)
    check_table_settings(config, saved, what)
    fields = check_shared_fields(schema, saved_config, what)
    # a frozen teacher's tables are not that run's training but its teacher export's: never taken
    taken = shared_tables(checkpoint, tables, what, fields=fields,
                          untaken_prefixes=(TEACHER_PREFIX,) if _has_frozen_teacher(saved) else ())
    if config.train.init_optimizer:
        _check_optimizer_state_fits(config, saved, plan, os.path.join(run_dir_of(checkpoint), PLAN_FILE),
                                    kinds=("sparse",), origins={name: table_of(key) for name, key in taken.items()},
                                    stateful=stateful_tables(taken, config.sharding.frozen_tables))
    sources = {tables[name].key: key for name, key in taken.items() if key != tables[name].key}
    return InitSource(checkpoint, config.train.init_optimizer, {name: tables[name].key for name in taken},
                      tuple(sorted(name for name in tables if name not in taken)), sources or None)


def _has_frozen_teacher(config: ExperimentConfig) -> bool:
    """Whether ``config`` distils from a frozen teacher (``elec.task=distill``, ``elec.distill.mode=frozen``), whose
    tables come from its own checkpoint rather than the run's training."""
    elec = config.elec or {}
    return elec.get("task") == "distill" and (elec.get("distill") or {}).get("mode") == "frozen"


def _check_optimizer_state_fits(config: ExperimentConfig, saved: ExperimentConfig, plan: ShardingPlan,
                                saved_plan: str, kinds: Collection[str] = OPTIMIZER_KINDS,
                                origins: Optional[Mapping[str, str]] = None,
                                stateful: Optional[Collection[str]] = None) -> None:
    """Raises ConfigError unless this run's optimizers can take the state of the run ``saved`` configured (its
    ``sharding_plan.json`` at ``saved_plan``): the same ``kinds``, no table it kept frozen trained now (of
    ``origins``, where given: the tables whose state it takes, each -> the table of that run it comes from, which
    differs where a table is matched by field; None: every table), the same column split of each table (row-wise
    Adagrad) of ``stateful`` (the tables whose state is loaded: a frozen table's, whose placement may change freely,
    and a table left fresh are not; None: every table of ``plan``)."""
    init_from = config.train.init_from
    changed = [f"optim.{kind}: {getattr(saved.optim, kind)!r} -> {getattr(config.optim, kind)!r}"
               for kind in kinds if getattr(saved.optim, kind) != getattr(config.optim, kind)]
    renamed = {name: origin for name, origin in (origins or {}).items() if origin != name}
    # a frozen table trains by plain SGD at lr 0, which keeps no state: none to go on with here
    thawed: List[str] = []
    if config.optim.sparse != "sgd":
        was_frozen, now_frozen = set(saved.sharding.frozen_tables), set(config.sharding.frozen_tables)
        pairs = origins if origins is not None else {name: name for name in was_frozen}
        thawed = sorted(origin if origin == name else f"{origin} (for {name})" for name, origin in pairs.items()
                        if origin in was_frozen and name not in now_frozen)
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
        f"was (on its world size and device, sharding.plan_file={saved_plan})"),
        renamed=renamed, tables=stateful)


def load_init_source(source: InitSource, model: nn.Module, optimizer: CombinedOptimizer) -> Dict[str, Any]:
    """Loads the checked checkpoint's weights (and optimizer state) into this run's sharded model (collective;
    any plan and world size: shards are re-cut); the RNG states stay this run's.

    Returns:
        Dict[str, Any]: the record ``plugins.json`` keeps under :data:`INIT_FROM_KEY`: the checkpoint, its
        step, whether its optimizer state came along, and its files' digests; under ``train.init_scope=tables``
        the tables taken and those left fresh, and where a table was matched by field, ``table_sources``: each
        table taken -> the checkpoint's table it came from (with its optimizer state, where that came along).
    """
    only = None if source.tables is None else sorted(source.tables.values())
    load_checkpoint(source.checkpoint, model, optimizer if source.with_optimizer else None, restore_rng=False,
                    only=only, sources=source.sources)
    record = {
        "checkpoint": os.path.abspath(source.checkpoint),
        "global_step": read_train_state(source.checkpoint).global_step,
        "optimizer": source.with_optimizer,
        "digests": checkpoint_digests(source.checkpoint),
    }
    if source.tables is not None:
        record.update({"scope": "tables", "tables": sorted(source.tables), "fresh_tables": list(source.fresh_tables)})
    if source.tables is not None and source.sources:  # matched by field: each table's table there
        record["table_sources"] = {name: table_of(source.sources.get(key, key))
                                   for name, key in sorted(source.tables.items())}
    return record


def started_fields(record: Dict[str, Any]) -> Dict[str, Any]:
    """What the ``started`` event of ``metrics.jsonl`` says of the :func:`load_init_source` ``record``: the
    checkpoint, and under ``train.init_scope=tables`` the tables taken and those started fresh (and, matched by
    field, ``init_table_sources``: each one's table in the checkpoint)."""
    fields: Dict[str, Any] = {INIT_FROM_KEY: record["checkpoint"]}
    if record.get("scope") == "tables":
        fields.update({"init_tables": record["tables"], "fresh_tables": record["fresh_tables"]})
    if "table_sources" in record:
        fields["init_table_sources"] = record["table_sources"]
    return fields


def start_line(run_dir: str, record: Dict[str, Any]) -> str:
    """The log line of a run started from the :func:`load_init_source` ``record``."""
    what = "weights and optimizer state" if record["optimizer"] else "weights"
    if record.get("scope") == "tables":
        fresh = ", ".join(record["fresh_tables"]) or "no table"
        sources = record.get("table_sources", {})
        taken = ", ".join(name if sources.get(name, name) == name else f"{name} (from {sources[name]})"
                          for name in record["tables"])
        what = f"tables {taken} ({what}; fresh: {fresh} and every other weight)"
    return f"starting {run_dir} from the {what} of {record['checkpoint']} (its step {record['global_step']})"
