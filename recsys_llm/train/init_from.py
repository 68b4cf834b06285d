"""A new run that starts from another run's trained weights (``train.init_from``): the next day's
training of yesterday's model, on data prepared like it (``prepare tabular --like``).

Unlike a resume, the new run has its own run directory, data, budget and position (step 0,
epoch 0, its own shuffle and RNG streams); it takes the earlier run's weights and, with
``train.init_optimizer`` (the default), its table and dense optimizer states, so row-wise Adagrad
goes on with the step sizes it had reached instead of starting again from its largest ones.
Frozen plug-in weights (ELEC's entity tables and frozen teacher) come from their own files
afterwards, as in any new run.

With ``train.init_scope=tables`` it takes only the trained embedding tables both models have (the same
state-dict key: a field both schemas share; with ``train.init_optimizer`` their optimizer states too) and
leaves everything else fresh: tables of new fields, the dense layers (whose input width changes with the
fields) and the plug-ins' trained weights (LLaCTR's FRE/FIE field state, ELEC's gain-network projections),
which belong to the earlier fields and vectors. The next day's data may then add (or drop) fields; each
shared field must be as it was (settings, vocabulary or one grown from it) and its table of the same shape.

Example::

    recsys-llm train --config configs/shop.yaml train.run_dir=runs/day2 \\
        data.schema=data/shop-day2 train.init_from=runs/day1
"""

import os
import re
from typing import Any, Collection, Dict, List, Mapping, NamedTuple, Optional, Tuple

import torch
from torch import nn
from torchrec.distributed.types import ShardingPlan
from torchrec.modules.embedding_configs import data_type_to_dtype
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.optim.keyed import CombinedOptimizer

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.modules.semantic_table import TABLE_PREFIX as SEMANTIC_TABLE_PREFIX
from recsys_llm.train.checkpoint import (
    checkpoint_digests,
    load_checkpoint,
    read_train_state,
    resolve_checkpoint,
    run_config_of,
    run_dir_of,
)
from recsys_llm.train.checkpoint_reader import SafeFileSystemReader
from recsys_llm.train.config import ConfigError, ExperimentConfig, check_same_model, config_differences, load_config
from recsys_llm.train.resume import check_same_table_state_layout
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
#: ``train.init_scope=tables``: the model settings that shape every table's weights (a field's own
#: ``embedding_dim`` in ``schema.json`` is compared with the field)
TABLE_SETTINGS = ("model.embedding_dim", "model.embedding_dtype")


class TableShape(NamedTuple):
    """A trained embedding table of this run's model (:func:`trained_tables`): its weight's key in the sharded
    model's state dict, rows, columns and dtype."""

    key: str
    rows: int
    dim: int
    dtype: torch.dtype


class InitSource(NamedTuple):
    """The checked checkpoint a new run starts from (:func:`check_init_source`): with ``tables`` (table name ->
    state-dict key; ``train.init_scope=tables``) only those tables, ``fresh_tables`` left as initialised."""

    checkpoint: str
    with_optimizer: bool
    tables: Optional[Dict[str, str]] = None
    fresh_tables: Tuple[str, ...] = ()


def trained_tables(tables: Mapping[str, Tuple[str, EmbeddingBagCollection]]) -> Dict[str, TableShape]:
    """The tables of :func:`~recsys_llm.train.planner_inputs.find_tables` (of the model before sharding) that
    training fills: all but those of frozen plug-in EBCs (ELEC's entity tables, a frozen teacher's), which come
    from their own files. Tables of ``sharding.frozen_tables`` count: they keep the weights they start from."""
    shapes = {}
    for name, (path, ebc) in tables.items():
        if getattr(ebc, "frozen", False):
            continue
        config = next(config for config in ebc.embedding_bag_configs() if config.name == name)
        shapes[name] = TableShape(f"{path}.embedding_bags.{name}.weight", config.num_embeddings,
                                  config.embedding_dim, data_type_to_dtype(config.data_type))
    return shapes


def check_init_source(config: ExperimentConfig, schema: DatasetSchema, plan: ShardingPlan,
                      plugins: Dict[str, Any], tables: Mapping[str, TableShape]) -> Optional[InitSource]:
    """Resolves ``train.init_from`` (a run directory: its best, else latest, checkpoint; or a checkpoint
    directory inside one) and checks that this run can start from it; None when it is unset.

    Args:
        schema (DatasetSchema): this run's data.
        plan (ShardingPlan): this run's sharding plan (a row-wise Adagrad state cannot be re-cut into
            other column shards).
        plugins (Dict[str, Any]): this run's plug-in records (``BuiltTask.plugins``).
        tables (Mapping[str, TableShape]): this run's trained tables (:func:`trained_tables`), which
            ``train.init_scope=tables`` takes where the checkpoint has them.

    Raises:
        FileNotFoundError: no checkpoint there, or one without its run's ``config.yaml``.
        ConfigError: another model or schema, other LLaCTR field vectors, ELEC entity vectors of another
            adapted LLM (other ids are fine: the day's export), or (with
            ``train.init_optimizer``) another kind of optimizer, a table trained here that it kept
            frozen, or another column split. With ``train.init_scope=tables`` instead of another model or
            schema: other :data:`TABLE_SETTINGS`, a shared field changed (settings, vocabulary), a shared
            table of another shape, or no shared table at all; and of the optimizers only ``optim.sparse``.
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
    elec = config.elec or {}
    frozen_teacher = elec.get("task") == "distill" and (elec.get("distill") or {}).get("mode") == "frozen"
    if not frozen_teacher:  # a frozen teacher's tables come from its own checkpoint, which the run may change
        check_same_entity_vector_source(checkpoint, plugins, "Export the day's entities with the adapted LLM that "
                                        f"run's vectors came from (semantics export --llm), or {fresh}")
    if train_cfg.init_optimizer:
        _check_optimizer_state_fits(config, load_config(saved_config), plan,
                                    os.path.join(run_dir_of(checkpoint), PLAN_FILE))
    return InitSource(checkpoint, train_cfg.init_optimizer)


def _check_tables_source(config: ExperimentConfig, schema: DatasetSchema, plan: ShardingPlan, checkpoint: str,
                         saved_config: str, tables: Mapping[str, TableShape]) -> InitSource:
    """:func:`check_init_source` under ``train.init_scope=tables``: the tables it takes and those left fresh."""
    what = f"train.init_from={config.train.init_from}"
    saved = load_config(saved_config)
    _check_table_settings(config, saved, what)
    check_shared_fields(schema, saved_config, what)
    taken = _shared_tables(checkpoint, tables, what)
    if config.train.init_optimizer:
        _check_optimizer_state_fits(config, saved, plan, os.path.join(run_dir_of(checkpoint), PLAN_FILE),
                                    kinds=("sparse",), tables=taken)
    return InitSource(checkpoint, config.train.init_optimizer, taken,
                      tuple(sorted(name for name in tables if name not in taken)))


def _check_table_settings(config: ExperimentConfig, saved: ExperimentConfig, what: str) -> None:
    """Raises ConfigError where ``config`` sets one of :data:`TABLE_SETTINGS` otherwise than ``saved``."""
    changed = [difference for difference in config_differences(saved, config)
               if difference.split(":", 1)[0] in TABLE_SETTINGS]
    if changed:
        raise ConfigError(f"{what}: its run built its tables with other settings ({'; '.join(changed)}), so no table "
                          "of it fits this model's; expected the same, or leave train.init_from unset to start from "
                          "fresh weights")


def _shared_tables(checkpoint: str, tables: Mapping[str, TableShape], what: str) -> Dict[str, str]:
    """``{table: state-dict key}`` of the tables of ``tables`` that ``checkpoint`` holds under the same key.

    Raises:
        ConfigError: none, or one of another shape or dtype (naming it, and both shapes).
    """
    metadata = SafeFileSystemReader(checkpoint).read_metadata()
    saved = {key[len("model."):]: item for key, item in metadata.state_dict_metadata.items()
             if key.startswith("model.")}
    shared = {name: table for name, table in sorted(tables.items()) if table.key in saved}
    if not shared:
        raise ConfigError(f"{what}: its checkpoint holds none of this model's tables ({', '.join(sorted(tables))}) "
                          f"under {', '.join(sorted({t.key.rsplit('.', 2)[0] for t in tables.values()}))} "
                          f"({_where_kept(saved)}); expected the tables of the fields both runs have where "
                          "this model keeps them: a plain or LLaCTR run keeps a field's table as t_<field> under "
                          "model., an ELEC gain network as teacher_<field> under model., an ELEC teacher-student "
                          "pair as student_<field> under student.model. (and teacher_<field> under teacher.model.), "
                          "so tables pass between runs of one of these kinds only; or leave train.init_from unset to "
                          "start from fresh weights")
    other = [f"{name}: {_shape_text(list(saved[table.key].size), saved[table.key].properties.dtype)} there, "
             f"{_shape_text([table.rows, table.dim], table.dtype)} here" for name, table in shared.items()
             if (list(saved[table.key].size), saved[table.key].properties.dtype) !=
             ([table.rows, table.dim], table.dtype)]
    if other:
        raise ConfigError(f"{what}: table(s) both models have differ in shape or dtype ({'; '.join(other)}); "
                          "expected each as that run built it (the same model.embedding_dim, model.embedding_dtype, "
                          "and each shared field's cardinality and embedding_dim), or leave train.init_from unset")
    return {name: table.key for name, table in shared.items()}


def _where_kept(saved: Mapping[str, Any]) -> str:
    """What a checkpoint's model keys (``saved``, without ``model.``) say of its tables, for a message:
    ``"that run keeps t_city, t_user under model.embedding_bag_collection.embedding_bags"``, or that it keeps none."""
    places: Dict[str, List[str]] = {}
    for key in saved:
        match = re.fullmatch(r"(.*embedding_bags)\.([^.]+)\.weight", key)
        if match and not match.group(2).startswith(SEMANTIC_TABLE_PREFIX):  # frozen entity tables: never taken
            places.setdefault(match.group(1), []).append(match.group(2))
    if not places:
        return "that run keeps no embedding table"
    return "; ".join(f"that run keeps {', '.join(sorted(names))} under {path}" for path, names in sorted(places.items()))


def _shape_text(size: List[int], dtype: torch.dtype) -> str:
    """``"121 x 16 float32"`` for a message."""
    return f"{' x '.join(str(n) for n in size)} {str(dtype).replace('torch.', '')}"


def _check_optimizer_state_fits(config: ExperimentConfig, saved: ExperimentConfig, plan: ShardingPlan,
                                saved_plan: str, kinds: Collection[str] = OPTIMIZER_KINDS,
                                tables: Optional[Collection[str]] = None) -> None:
    """Raises ConfigError unless this run's optimizers can take the state of the run ``saved`` configured (its
    ``sharding_plan.json`` at ``saved_plan``): the same ``kinds``, no table it kept frozen trained now (of
    ``tables``, where given: those whose state it takes), the same column split of each table (row-wise
    Adagrad)."""
    init_from = config.train.init_from
    changed = [f"optim.{kind}: {getattr(saved.optim, kind)!r} -> {getattr(config.optim, kind)!r}"
               for kind in kinds if getattr(saved.optim, kind) != getattr(config.optim, kind)]
    # a frozen table trains by plain SGD at lr 0, which keeps no state: none to go on with here
    thawed = [] if config.optim.sparse == "sgd" else sorted(
        name for name in set(saved.sharding.frozen_tables) - set(config.sharding.frozen_tables)
        if tables is None or name in tables)
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
    only = None if source.tables is None else sorted(source.tables.values())
    load_checkpoint(source.checkpoint, model, optimizer if source.with_optimizer else None, restore_rng=False,
                    only=only)
    record = {
        "checkpoint": os.path.abspath(source.checkpoint),
        "global_step": read_train_state(source.checkpoint).global_step,
        "optimizer": source.with_optimizer,
        "digests": checkpoint_digests(source.checkpoint),
    }
    if source.tables is not None:
        record.update({"scope": "tables", "tables": sorted(source.tables), "fresh_tables": list(source.fresh_tables)})
    return record


def started_fields(record: Dict[str, Any]) -> Dict[str, Any]:
    """What the ``started`` event of ``metrics.jsonl`` says of the :func:`load_init_source` ``record``: the
    checkpoint, and under ``train.init_scope=tables`` the tables taken and those started fresh."""
    fields: Dict[str, Any] = {INIT_FROM_KEY: record["checkpoint"]}
    if record.get("scope") == "tables":
        fields.update({"init_tables": record["tables"], "fresh_tables": record["fresh_tables"]})
    return fields


def start_line(run_dir: str, record: Dict[str, Any]) -> str:
    """The log line of a run started from the :func:`load_init_source` ``record``."""
    what = "weights and optimizer state" if record["optimizer"] else "weights"
    if record.get("scope") == "tables":
        fresh = ", ".join(record["fresh_tables"]) or "no table"
        what = f"tables {', '.join(record['tables'])} ({what}; fresh: {fresh} and every other weight)"
    return f"starting {run_dir} from the {what} of {record['checkpoint']} (its step {record['global_step']})"
