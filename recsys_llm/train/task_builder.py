"""The model a config trains: the backbone alone, with LLaCTR's terms, or ELEC's gain network or
teacher-student pair, and what the plug-ins need besides (extra columns, entity vectors, swapped pairs)."""

import dataclasses
import json
import os
from typing import Any, Dict, List, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from torch import nn

from recsys_llm.data.pair_swap import SwappedPairs
from recsys_llm.data.parquet_files import resolve_paths
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.registry import ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.elec import (
    ELECConfig,
    build_elec_task,
    entity_vectors_record,
    frozen_teacher_record,
    load_elec_state,
)
from recsys_llm.modules.llactr import build_llactr_terms
from recsys_llm.semantics.vector_reader import attached_vectors_provenance
from recsys_llm.train.config import ConfigError, ExperimentConfig, parse_plugin_sections
from recsys_llm.train.run_records import changed_row_vectors, split_row_vector_changes


class BuiltTask(NamedTuple):
    """What :func:`build_task` returns.

    Args:
        task (nn.Module): ``forward(batch) -> (loss, (loss, logits, labels))``.
        plugins (Dict[str, Any]): per plug-in (``llactr`` / ``elec``), what it was built
            from (vector provenance, resolved settings); written to ``run_dir/plugins.json``.
        elec (Optional[ELECConfig]): the parsed ``elec`` section, for :func:`load_plugin_state`.
        model (Optional[ModelConfig]): the backbone settings, for :func:`load_plugin_state`'s errors.
    """

    task: nn.Module
    plugins: Dict[str, Any]
    elec: Optional[ELECConfig] = None
    model: Optional[ModelConfig] = None


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
        record = dataclasses.asdict(elec)
        if elec.task == "distill" and distill.mode == "frozen":
            record["frozen_teacher"] = frozen_teacher_record(elec.teacher_checkpoint)
        entity_vectors = entity_vectors_record(elec)
        if entity_vectors:
            record["entity_vectors"] = entity_vectors
        row_vectors = (attached_vectors_provenance(resolve_paths(schema, config.data.train_split), elec.vector_key)
                       if reads_row_vectors else None)
        if row_vectors:  # which LLM's vectors the network reads (run_records.check_same_row_vectors)
            record["row_vectors"] = row_vectors
            taught_on = changed_row_vectors((record.get("frozen_teacher") or {}).get("row_vectors"), row_vectors)
            if taught_on:
                raise ConfigError(
                    f"elec.teacher_checkpoint={elec.teacher_checkpoint}: the frozen teacher trained on other per-row "
                    f"LLM vectors than {schema.root} holds ({'; '.join(taught_on)}): it would score rows by vectors "
                    "it never saw; attach the vectors its gain run trained on (semantics export --attach-dir with "
                    "that adapted LLM), or train a gain network on these"
                )
        return BuiltTask(task, {"elec": record}, elec, config.model)
    backbone = build_backbone(config.model, schema, device=torch.device("meta"), dense_device=device)
    if llactr is None:
        return BuiltTask(CTRTask(backbone), {})
    logit_terms, loss_terms, provenance = build_llactr_terms(llactr, schema, backbone, device)
    return BuiltTask(CTRTask(backbone, logit_terms=logit_terms, loss_terms=loss_terms), {"llactr": provenance})


def check_offline_reads_no_vectors(elec: ELECConfig) -> None:
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


def check_elec_settings_are_read(elec: ELECConfig) -> None:
    """Refuses elec settings a new run would silently ignore (``plugins.json`` would still record
    them as the run's): a ``teacher_checkpoint`` outside ``distill.mode`` ``frozen`` (a joint
    teacher trains from scratch, an offline student reads the teacher's outputs from the data), and
    entity tables beside ``vector_source`` ``extras`` (the vectors come from the data's column), entity
    tables without an export directory where one fills them (a gain network, a joint teacher), and an
    ``expected_provenance`` where no entity export is read (``extras``, or an offline student).
    (New runs only, as :func:`check_offline_reads_no_vectors`.)

    Raises:
        ConfigError: naming the setting and what to change.
    """
    distill = elec.task == "distill"
    _check_distill_settings_are_read(elec)
    if distill and elec.distill.mode != "frozen" and elec.teacher_checkpoint:
        raise ConfigError(
            f"elec.teacher_checkpoint={elec.teacher_checkpoint} is read only by elec.distill.mode 'frozen', and the mode "
            f"is {elec.distill.mode!r} ("
            + ("the teacher trains from scratch beside the student" if elec.distill.mode == "joint" else
               "the teacher's outputs come from the data") + "): set elec.distill.mode=frozen to distil that "
            "teacher, or leave it out (elec.teacher_checkpoint=null)"
        )
    reads_vectors = not distill or elec.distill.mode != "offline"  # offline: check_offline_reads_no_vectors
    if reads_vectors and elec.vector_source == "extras" and elec.entity_tables:
        raise ConfigError(
            f"elec.entity_tables / elec.entity_field name entity vector tables for {sorted(elec.entity_tables)}, but "
            f"elec.vector_source is 'extras': the LLM vectors come from the data's column {elec.vector_key!r} and no "
            "entity table is read; set elec.vector_source=entity_table to use them, or leave them out"
        )
    trains_entity_tables = elec.vector_source == "entity_table" and (not distill or elec.distill.mode == "joint")
    unfilled = sorted(field for field, directory in elec.entity_tables.items() if not directory)
    if trains_entity_tables and unfilled:  # a frozen teacher's come from its checkpoint; an offline student has none
        raise ConfigError(
            f"elec.entity_tables: fields {unfilled} name no export directory, and a "
            + ("gain network" if not distill else "joint teacher") + " fills its entity tables from exports "
            "(`recsys-llm semantics export --granularity entity`): set elec.entity_tables.<field>=DIR (or "
            "elec.entity_vectors beside elec.entity_field)"
        )
    reads_exports = reads_vectors and elec.vector_source == "entity_table"  # frozen, none named: load_elec_state
    if elec.expected_provenance and not reads_exports:
        why = "elec.vector_source is 'extras'" if reads_vectors else "elec.distill.mode is 'offline'"
        raise ConfigError(
            f"elec.expected_provenance={elec.expected_provenance} is checked on entity vector exports only, and none "
            f"is read ({why}): the vectors would not be checked; leave it out (elec.expected_provenance={{}})"
        )


def _check_distill_settings_are_read(elec: ELECConfig) -> None:
    """The part of :func:`check_elec_settings_are_read` on distillation weights that leave a run without its
    point: a joint teacher that never trains, a student without a distillation term. (Settings of another task
    or mode stay allowed: one config file serves the teacher and its students.)"""
    settings = elec.distill
    if elec.task != "distill":
        return
    if settings.mode == "joint" and settings.teacher_loss_weight == 0:
        raise ConfigError(
            "elec.distill.teacher_loss_weight=0 in mode 'joint': the teacher's own loss is all it trains on, so it "
            "would keep its random initial weights and the student would learn from them; give it a weight > 0 "
            "(default 1.0), or distil a trained gain network (elec.distill.mode=frozen, elec.teacher_checkpoint)"
        )
    if settings.alpha == 0 and settings.beta == 0:
        raise ConfigError(
            "elec.distill.alpha=0 and elec.distill.beta=0: no distillation term, so the student trains on its labels "
            "alone, the plain backbone with a teacher run beside it for nothing; give alpha (score KD) or beta "
            "(representation KD) a weight > 0, or train the plain backbone (no elec section)"
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


def check_row_vectors_of_splits(config: ExperimentConfig, schema: DatasetSchema, built: BuiltTask) -> None:
    """Refuses, for a run that trains on per-row LLM vectors, a valid or test split whose attached vectors are of
    another export than the train split's (an attach into the directory stopped part-way, or its files were mixed):
    the run would validate and test on vectors it never trained on. (A job on a trained run checks the split it
    reads: ``trained_run.check_splits_row_vectors``.)

    Raises:
        ConfigError: naming the split and what differs.
    """
    row_vectors = (built.plugins.get("elec") or {}).get("row_vectors")
    for split in (config.data.valid_split, config.data.test_split):
        if split and split in schema.splits:
            other = split_row_vector_changes(row_vectors, schema, split)
            if other:
                raise ConfigError(
                    f"{schema.root}: split {split!r} holds other per-row LLM vectors than split "
                    f"{config.data.train_split!r} ({'; '.join(other)}): an attach into this directory stopped "
                    "part-way, or its files were mixed; attach one export to every split again "
                    "(semantics export --attach-dir)"
                )


def check_plugin_columns(config: ExperimentConfig, schema: DatasetSchema, splits: List[str]) -> None:
    """Raises, before any reader is made, when a split lacks a column the plug-ins read
    (:func:`plugin_extras`), saying which command writes it for that split.

    Raises:
        ConfigError: naming the split's file, the columns and the command that writes them.
    """
    wanted = plugin_extras(config)
    for split in splits if wanted else []:
        path = resolve_paths(schema, split)[0]
        missing = [name for name in wanted if name not in pq.read_schema(path).names]
        if not missing:
            continue
        elec = ELECConfig.from_dict(config.elec, source="elec")
        if elec.task == "distill" and elec.distill.mode == "offline":
            why = ("offline distillation reads the teacher's outputs in every split it trains on or evaluates (its "
                   "loss holds the distillation terms): `recsys-llm teacher-outputs --checkpoint TEACHER_RUN` writes "
                   "them for every split of the schema (leave --splits out)")
        else:
            why = ("ELEC reads the LLM vector of every row it trains on or evaluates: `recsys-llm semantics export "
                   "--attach-dir` writes it into a copy of every split (leave --splits out)")
        raise ConfigError(f"{path} (split {split!r}): no column(s) {missing}; {why}")


def plugin_extras(config: ExperimentConfig) -> List[str]:
    """Parquet columns the plug-ins read from ``batch.extras`` (added to ``data.extras``)."""
    if not config.elec:
        return []
    elec = ELECConfig.from_dict(config.elec, source="elec")
    if elec.task == "distill" and elec.distill.mode == "offline":
        keys = [elec.distill.teacher_logits_key]
        return keys + [elec.distill.teacher_representation_key] if elec.distill.beta > 0 else keys
    return [elec.vector_key] if elec.vector_source == "extras" else []


def _entity_exports(built: BuiltTask) -> Dict[str, str]:
    """The ELEC entity exports a run loads, entity field -> directory: none without entity tables, nor in offline
    distillation, whose student reads no vectors."""
    elec = built.elec
    if elec is None or elec.vector_source != "entity_table" or (elec.task == "distill"
                                                                and elec.distill.mode == "offline"):
        return {}
    return {field: directory for field, directory in elec.entity_tables.items() if directory}


def check_entity_vocabularies(built: BuiltTask, schema: DatasetSchema) -> None:
    """Refuses an ELEC entity export whose ids mean other values than in ``schema``'s vocabulary (the export
    records the vocabulary it was made from: data of the same source prepared afresh, not ``--like``, keeps the
    fingerprint while its ids mean other values); a vocabulary grown by ``--grow-vocabulary`` passes.

    Raises:
        ProvenanceError: naming the export, the field and the data.
    """
    from recsys_llm.semantics.vector_export import ProvenanceError, read_manifest

    for field, directory in _entity_exports(built).items():
        if not os.path.isdir(directory):
            continue  # load_elec_state names it
        recorded = read_manifest(directory)["provenance"].get("vocabulary")
        if recorded is None:
            continue  # exported before the record, or a field without a vocabulary
        record = json.loads(recorded)
        if field in schema.changed_vocabularies({field: record}):  # (it names the schema's other vocabularies too)
            raise ProvenanceError(
                f"elec entity vectors of {field!r} in {directory}: exported from data whose {record['ids']} ids of "
                f"{field!r} mean other values than in {schema.root} ({schema.other_ids_cause()}; or an export of "
                "a later day's grown vocabulary), so vectors would land on "
                f"other entities' ids; export them from this data (`recsys-llm semantics export --schema "
                f"{schema.root} --granularity entity --entity-field {field} ...`)")


def load_plugin_state(model: nn.Module, built: BuiltTask, schema: DatasetSchema) -> Dict[str, int]:
    """After sharding: fills what training does not (ELEC entity vectors of ``schema``, frozen teacher)."""
    check_entity_vocabularies(built, schema)
    return load_elec_state(model, built.elec, schema.fingerprint(), built.model) if built.elec is not None else {}


def entity_vector_gaps(built: BuiltTask, schema: DatasetSchema) -> List[str]:
    """One warning per ELEC entity export that lacks vectors for some values of its field's vocabulary
    (``prepare tabular`` data): those ids read a row of zeros, e.g. a day's export that leaves out the
    items of earlier days that the grown vocabulary keeps."""
    from recsys_llm.semantics.vector_export import read_manifest
    from recsys_llm.semantics.vector_reader import ids_without_vector

    gaps = []
    for field, directory in _entity_exports(built).items():
        if schema.ids.get(field) != "vocabulary" or schema.value_text_path(field) is None:
            continue
        ids = schema.load_value_text(field).column("id").to_numpy()
        ids = ids[ids != 0]  # id 0: unknown, the missing value
        missing = ids_without_vector(directory, ids)
        if len(missing):
            shown = ", ".join(str(i) for i in missing[:5]) + (", ..." if len(missing) > 5 else "")
            provenance = read_manifest(directory)["provenance"]
            recorded = provenance.get("vocabulary")
            # the settings --reuse compares that differ from the defaults (a command without them is refused)
            settings = "".join(f" --{option} {provenance[option]}" for option, default in
                               (("output", "representation"), ("dtype", "float32"))
                               if provenance.get(option, default) != default)
            text_fields = provenance.get("entity_fields", field).split(",")
            settings += f" --entity-fields {' '.join(text_fields)}" if text_fields != [field] else ""
            settings += " --projection PROJECTION_FILE" if provenance.get("projection", "none") != "none" else ""
            exported_ids = json.loads(recorded).get("ids") if recorded else None
            if exported_ids is not None and exported_ids < len(ids) + 1:  # an earlier day's export (+1: id 0)
                way = (f"it was exported from data of {exported_ids} ids, before the vocabulary grew to "
                       f"{len(ids) + 1} (an earlier day's export): export the day's entities with its adapted LLM, "
                       f"`semantics export --schema {schema.root} --llm ADAPTED_LLM --granularity entity "
                       f"--entity-field {field}{settings} --splits EARLIER_DAYS_FILES... train --reuse {directory} "
                       "--output-dir NEW_DIR` (--reuse encodes the new ids alone)")
            else:
                way = ("`semantics export` covers the ids of the splits it reads: to cover them, add the data they "
                       "appear in to --splits (Parquet files of the same ids, e.g. an earlier day's: --splits "
                       "data/day1/train.parquet train)")
            gaps.append(
                f"elec entity vectors of {field!r} in {directory}: {len(missing)} of the {len(ids)} values of the "
                f"field's vocabulary have no vector (ids {shown}) and read a row of zeros; {way}")
    return gaps


def swapped_pairs(built: BuiltTask, schema: DatasetSchema, seed: int, rank: int = 0) -> Optional[SwappedPairs]:
    """The training-batch transform of ELEC's ``distill.swap_fields`` (None when unset).

    With it, every training batch carries B label-free swapped rows after its B rows, and the
    epoch's ``samples_per_second`` counts both.
    """
    if built.elec is None or built.elec.task != "distill" or not built.elec.distill.swap_fields:
        return None
    distill = built.elec.distill
    return SwappedPairs(schema, distill.swap_fields, seed=seed, catalog=distill.swap_catalog, rank=rank)
