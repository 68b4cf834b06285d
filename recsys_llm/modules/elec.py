"""ELEC tasks for the runner: the gain network alone, or a teacher-student pair.

* ``task="gain"``: backbone + the LLM vector as ``num_injected_fields`` extra fields
  (:class:`VectorFieldInjection`). The vector comes from ``batch.extras[vector_key]``
  (per-row export attached to the split) or, with ``vector_source="entity_table"``, from a
  frozen sharded :class:`SemanticTable` looked up by ``entity_field`` (or several, ``entity_tables``).
* ``task="distill"``: :class:`TeacherStudentTask` of that gain network (teacher, tables
  prefixed ``teacher_``) and a vanilla network of the same backbone kind (student, tables
  prefixed ``student_``, tabular input only). In ``offline`` mode there is no teacher.

After sharding, :func:`load_elec_state` fills the entity table and (frozen mode) the
teacher, each rank writing only its own shards.

Example::

    config = ELECConfig(task="distill", vector_dim=64, distill=TeacherStudentConfig(mode="joint"))
    task = build_elec_task(config, schema, ModelConfig(name="deepfm"))
    model, plan = shard_model(task, device, world_size, sharding, optim)
    load_elec_state(model, config)
"""

import dataclasses
import json
import os
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
from torch import nn

from recsys_llm.data.schema import DatasetSchema, FieldKind
from recsys_llm.data.validation import check_number
from recsys_llm.models.registry import ModelConfig, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.dense_injection import VectorFieldInjection
from recsys_llm.modules.random_stream import own_random_stream
from recsys_llm.modules.semantic_table import (
    SemanticTable,
    SemanticTableTask,
    distinct_rows,
    load_semantic_vectors,
    semantic_table_name,
    table_weights,
)
from recsys_llm.modules.teacher_student import (
    StateMismatchError,
    TeacherStudentConfig,
    TeacherStudentTask,
    load_full_state,
)
from recsys_llm.typed_config import build_dataclass, check_str_settings

TASKS = ("gain", "distill")
VECTOR_SOURCES = ("extras", "entity_table")
TEACHER_PREFIX = "teacher_"
STUDENT_PREFIX = "student_"


@dataclasses.dataclass
class ELECDistillConfig(TeacherStudentConfig):
    """``elec.distill``: :class:`TeacherStudentConfig` plus the swapped pairs the runner makes of its training batches.

    Args:
        swap_fields (List[str]): **(ours)** fields re-paired across the rows of each training
            batch to add B label-free rows (:class:`recsys_llm.data.pair_swap.SwappedPairs`):
            BCE skips them, KD learns the teacher's scores on them. Empty: off. Needs the
            teacher in the step (``joint`` or ``frozen``).
        swap_catalog (Optional[str]): **(ours)** Parquet file with one row per entity and a
            column per swap field: swapped rows draw their ``swap_fields`` from it (cold
            entities included) instead of from other rows of the batch.

    The runner swaps the batches (``train.task_builder.swapped_pairs``), the task only reads them; a loop of your
    own passes its batches through ``SwappedPairs`` (``TeacherStudentConfig`` has no such setting to ignore).
    """

    swap_fields: List[str] = dataclasses.field(default_factory=list)
    swap_catalog: Optional[str] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        self.swap_fields = [self.swap_fields] if isinstance(self.swap_fields, str) else list(self.swap_fields)
        if self.swap_catalog and not self.swap_fields:
            raise ValueError("elec.distill.swap_catalog is set but swap_fields is empty: name the catalogue's "
                             "fields (e.g. the item fields) in swap_fields")
        if self.swap_fields and self.mode == "offline":
            raise ValueError("elec.distill.swap_fields needs the teacher to score the swapped rows during "
                             "training: use mode 'joint' or 'frozen', not 'offline'")


@dataclasses.dataclass
class ELECConfig:
    """What to build.

    Args:
        task (str): ``gain`` (teacher alone) or ``distill`` (teacher + student).
        vector_dim (int): d of the LLM vectors (>= 1).
        num_injected_fields (int): E extra fields the vector becomes (>= 1).
        vector_source (str): ``extras`` (``batch.extras[vector_key]``) or ``entity_table``.
        vector_key (str): extras key of per-row vectors.
        entity_field (Optional[str]): sparse field whose ids key the entity vectors.
        entity_vectors (Optional[str]): export directory of the entity vectors.
        entity_tables (Dict[str, str]): several entities at once, entity field -> export
            directory (e.g. ``{user_id: vectors/users, item_id: vectors/items}``); merged with
            ``entity_field`` / ``entity_vectors``. The K vectors, concatenated in the schema's field order
            (whatever order they are named in here), are projected
            to ``K * num_injected_fields`` fields, so the backbone can interact user and item
            vectors with each other (FM / cross terms) as well as with the ID embeddings. A frozen
            teacher reads its tables from ``teacher_checkpoint``: a directory named here is checked
            against them (:func:`load_elec_state`), and may be left out (None). An offline student
            reads none: a new run that names a directory there is refused.
        expected_provenance (Dict[str, str]): provenance the vectors must have (every entity
            table's; keys that differ per entity, such as ``entity_field``, do not belong here). Checked on
            entity exports only (a new run that sets it with ``extras`` or an offline student is refused).
        teacher_checkpoint (Optional[str]): frozen mode: a gain-network export directory
            (``recsys-llm export``) or ``.safetensors`` state dict. Read by no other distill mode
            (a new such run is refused: ``task_builder.check_elec_settings_are_read``).
        distill (ELECDistillConfig): KD mode and weights, and swapped pairs (a ``TeacherStudentConfig`` is taken as
            one without them).
    """

    task: str = "distill"
    vector_dim: int = 64
    num_injected_fields: int = 1
    vector_source: str = "extras"
    vector_key: str = "llm_vector"
    entity_field: Optional[str] = None
    entity_vectors: Optional[str] = None
    entity_tables: Dict[str, str] = dataclasses.field(default_factory=dict)
    expected_provenance: Dict[str, str] = dataclasses.field(default_factory=dict)
    teacher_checkpoint: Optional[str] = None
    distill: ELECDistillConfig = dataclasses.field(default_factory=ELECDistillConfig)

    def __post_init__(self) -> None:
        if isinstance(self.distill, Mapping):
            self.distill = ELECDistillConfig(**self.distill)
        elif not isinstance(self.distill, ELECDistillConfig):
            self.distill = ELECDistillConfig(**dataclasses.asdict(self.distill))
        check_str_settings(self, ("vector_key", "entity_field"), "elec", paths=("entity_vectors", "teacher_checkpoint"))
        if self.task not in TASKS:
            raise ValueError(f"elec.task must be one of {TASKS}, got {self.task!r}")
        if self.vector_source not in VECTOR_SOURCES:
            raise ValueError(f"elec.vector_source must be one of {VECTOR_SOURCES}, got {self.vector_source!r}")
        # caught here, not as a reshape or planner error deep in building or sharding the task
        check_number("elec.vector_dim", self.vector_dim, integer=True, minimum=1)
        check_number("elec.num_injected_fields", self.num_injected_fields, integer=True, minimum=1)
        for name in ("entity_tables", "expected_provenance"):  # a string was kept, or failed in dict()
            if not isinstance(getattr(self, name), Mapping):
                raise ValueError(f"elec.{name}: expected a mapping, got {getattr(self, name)!r}")
        self.entity_tables = dict(self.entity_tables)
        if self.entity_field:
            previous = self.entity_tables.get(self.entity_field, self.entity_vectors)
            if (previous or None) != (self.entity_vectors or None):  # null and '' both name no directory
                raise ValueError(  # "elec." first: ELECConfig.from_dict adds no second "elec:" before it
                    f"elec.entity_vectors={self.entity_vectors!r} and elec.entity_tables[{self.entity_field!r}]="
                    f"{previous!r} name two vector directories for entity {self.entity_field!r}; give one of them, "
                    "or the same directory in both"
                )
            self.entity_tables = {self.entity_field: self.entity_vectors, **self.entity_tables}
        if self.vector_source == "entity_table" and not self.entity_tables:
            raise ValueError(
                "elec.vector_source 'entity_table' needs elec.entity_field (e.g. 'item_id') or "
                "elec.entity_tables ({field: vector directory})"
            )
        if self.task == "distill" and self.distill.swap_fields and self.vector_source != "entity_table":
            raise ValueError(
                "elec.distill.swap_fields re-pairs rows, and the teacher's LLM vector must follow the swapped ids: "
                "use vector_source 'entity_table' (per-row vectors in extras would stay with the original row)"
            )
        if self.task == "distill" and self.distill.mode == "frozen" and not self.teacher_checkpoint:
            raise ValueError("elec.distill.mode 'frozen' needs elec.teacher_checkpoint")

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], source: str = "elec") -> "ELECConfig":
        """From a config-file mapping, typed like the rest of the config (``elec.vector_dim=abc``
        is an error naming the key); unknown keys are an error naming them."""
        return build_dataclass(cls, raw, source)


def build_gain_network(
    config: ELECConfig,
    schema: DatasetSchema,
    model_config: ModelConfig,
    table_prefix: str = TEACHER_PREFIX,
    device: Optional[torch.device] = torch.device("meta"),
) -> CTRTask:
    """The gain network: backbone + injected LLM vector (from extras or an entity table)."""
    if config.vector_source == "extras":
        backbone = build_backbone(model_config, schema, config.num_injected_fields, device=device,
                                  table_prefix=table_prefix)
        # the width the backbone's tables have: a schema field's own embedding_dim overrides model.embedding_dim
        injection = VectorFieldInjection(config.vector_dim, backbone.embedding_dim, config.num_injected_fields)
        return CTRTask(backbone, field_injection=injection, injection_key=config.vector_key)
    names = [spec.name for spec in schema.fields]
    unknown = [name for name in config.entity_tables if name not in names]
    if unknown:
        raise ValueError(
            f"elec.entity_tables: fields {unknown} are not fields of the schema {schema.name!r} (fields: {names}); "
            "name the sparse id field of the entity (e.g. item_id) its vectors were exported for"
        )
    dense = [name for name in config.entity_tables if not schema.field(name).is_categorical]
    if dense:
        raise ValueError(
            f"elec.entity_tables: fields {dense} are dense (a float value per row, no ids), so they key no entity "
            "vector table; name the sparse id field of the entity (e.g. item_id), the one its vectors were exported "
            "for (`semantics export --granularity entity --entity-field`)"
        )
    sequences = [name for name in config.entity_tables if schema.field(name).kind == FieldKind.SEQUENCE]
    if sequences:  # the table would sum the vectors of a row's ids: a vector growing with the sequence's length
        raise ValueError(
            f"elec.entity_tables: fields {sequences} are sequence fields (several ids per row); entity vectors are "
            "keyed by the ids of a sparse field, one id per row (the user or item id, e.g. 'item_id'), as "
            "`semantics export --entity-field` requires"
        )
    hashed = [name for name in config.entity_tables if schema.field(name).hashed]
    if hashed:
        raise ValueError(
            f"elec.entity_tables: fields {hashed} are hashed (ids folded modulo their cardinality), so one table "
            "row stands for several entities and an entity vector table cannot hold one vector per id; use "
            "per-row vectors (elec.vector_source=extras) for them"
        )
    # in the schema's field order, not the config's: a checkpoint or a frozen teacher's export does not record
    # the order, and configs naming the tables in another order are the same settings (config_differences)
    entities = {spec.name: spec.cardinality for spec in schema.fields if spec.name in config.entity_tables}
    num_fields = config.num_injected_fields * len(entities)
    backbone = build_backbone(model_config, schema, num_fields, device=device, table_prefix=table_prefix)
    table = SemanticTable(entities, config.vector_dim, device=device)
    injection = VectorFieldInjection(table.output_dim, backbone.embedding_dim, num_fields)  # as above
    return SemanticTableTask(backbone, table, injection)


def build_student(
    schema: DatasetSchema,
    model_config: ModelConfig,
    table_prefix: str = STUDENT_PREFIX,
    device: Optional[torch.device] = torch.device("meta"),
) -> CTRTask:
    """The vanilla network: the same backbone kind, own parameters, tabular input only."""
    return CTRTask(build_backbone(model_config, schema, 0, device=device, table_prefix=table_prefix))


def build_elec_task(
    config: ELECConfig,
    schema: DatasetSchema,
    model_config: ModelConfig,
    device: Optional[torch.device] = torch.device("meta"),
    dense_device: Optional[torch.device] = None,
) -> nn.Module:
    """The module the runner shards and trains (``forward(batch) -> (loss, (loss, logits, labels))``).

    Args:
        config (ELECConfig): gain network alone or teacher-student pair.
        schema (DatasetSchema): the data set.
        model_config (ModelConfig): backbone of both networks.
        device (Optional[torch.device]): EBC device (``meta`` for DMP, ``cpu`` for a plain model).
        dense_device (Optional[torch.device]): device of every non-table weight (None: default).
    """
    if dense_device is not None:
        with torch.device(dense_device):  # factory default for dense weights; tables keep ``device``
            return build_elec_task(config, schema, model_config, device=device)
    if config.task == "gain":
        return build_gain_network(config, schema, model_config, table_prefix=TEACHER_PREFIX, device=device)
    # the student first, on the global stream, as the plain backbone of the same seed draws it; the teacher
    # and the KD layers on a stream of their own, and the task registers the student first, so that DMP
    # also materialises the student's tables from where the plain run's are: student and plain differ by
    # the distillation only, not by their initial weights
    student = build_student(schema, model_config, table_prefix=STUDENT_PREFIX, device=device)
    with own_random_stream("elec.teacher"):
        teacher = None
        if config.distill.mode != "offline":
            teacher = build_gain_network(config, schema, model_config, table_prefix=TEACHER_PREFIX, device=device)
        return TeacherStudentTask(teacher, student, config.distill)


def _check_teacher_is_an_export(path: str) -> None:
    """Raises when ``elec.teacher_checkpoint`` names a training run (or one of its checkpoints)
    instead of its ``export --state-only`` output, with the command that makes one."""
    from recsys_llm.serving import STATE_FILE
    from recsys_llm.train.checkpoint import TRAIN_STATE_FILE
    from recsys_llm.train.run_records import RUN_MARKERS

    if os.path.isdir(path) and not os.path.exists(os.path.join(path, STATE_FILE)) and any(
        os.path.exists(os.path.join(path, name)) for name in (*RUN_MARKERS, TRAIN_STATE_FILE)
    ):
        raise FileNotFoundError(
            f"elec.teacher_checkpoint {path}: a training run or checkpoint, not an exported state; a frozen teacher "
            f"is read from the gain network's state: `recsys-llm export --checkpoint {path} --output DIR "
            "--state-only`, then elec.teacher_checkpoint=DIR"
        )


def _export_metadata(path: str) -> Dict[str, Any]:
    """``metadata`` of the ``config.json`` of the export ``path`` (the directory or its state file);
    ``{}`` when there is none to read (a state written by hand, a moved or damaged file)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    try:
        with open(os.path.join(directory, "config.json"), encoding="utf-8") as handle:
            metadata = json.load(handle)["metadata"]
    except (OSError, ValueError, KeyError, TypeError):
        return {}
    return metadata if isinstance(metadata, dict) else {}


def frozen_teacher_record(path: str) -> Dict[str, Any]:
    """What a frozen-teacher run records of ``elec.teacher_checkpoint`` (``plugins.json``:
    ``elec.frozen_teacher``): the export's path and the training checkpoint it was exported from
    with that checkpoint's digests (``checkpoint_sha256``, None for an export that has none), so
    that a resume or a reused run can tell a re-exported retrained teacher from the one it learned from; and,
    where the export records them, the provenance of the per-row LLM vectors the teacher trained on
    (``row_vectors``), which the student's data must hold."""
    metadata = _export_metadata(path)
    digests = metadata.get("checkpoint_sha256")
    record = {"export": os.path.abspath(path), "checkpoint": metadata.get("checkpoint"),
              "checkpoint_sha256": digests if isinstance(digests, dict) and digests else None}
    if isinstance(metadata.get("row_vectors"), dict):
        record["row_vectors"] = metadata["row_vectors"]
    return record


def entity_vectors_record(config: ELECConfig) -> Dict[str, Dict[str, Any]]:
    """What a run with entity tables records of their exports (``plugins.json``: ``elec.entity_vectors``):
    per named field whose export exists, its provenance (model, adapter, template, schema, ...) with
    the hash and count of its keys, so that a resume or a reused run can tell vectors exported again
    by another model from the ones it trained with. Where the export lies does not count."""
    from recsys_llm.semantics.vector_export import load_manifest, manifest_path

    if config.vector_source != "entity_table" or (config.task == "distill" and config.distill.mode == "offline"):
        return {}
    record: Dict[str, Dict[str, Any]] = {}
    for field, directory in config.entity_tables.items():
        path = manifest_path(directory) if directory else ""
        if path and os.path.isfile(path):
            manifest = load_manifest(path)
            record[field] = {**dict(manifest.get("provenance") or {}), "num_rows": manifest.get("num_rows"),
                             "keys_sha256": manifest.get("keys_sha256")}
    return record


def gain_shape_settings(config: ELECConfig) -> Dict[str, Any]:
    """The elec settings that shape a gain network's tensors (and so a frozen teacher's): what
    ``export --state-only`` records (``metadata.elec``) for a frozen-teacher run to compare."""
    return {
        "vector_source": config.vector_source,
        "entity_fields": sorted(config.entity_tables) if config.vector_source == "entity_table" else [],
        "vector_dim": config.vector_dim,
        "num_injected_fields": config.num_injected_fields,
    }


def _teacher_mismatch_hint(path: str, model_config: Optional[ModelConfig] = None,
                           schema_fingerprint: Optional[str] = None, elec_config: Optional[ELECConfig] = None) -> str:
    """``"; ..."``: why a frozen teacher's state may not fit the teacher this config builds, from the
    export's ``config.json`` (``metadata.model``, ``metadata.elec``, ``metadata.schema_fingerprint``): the
    model and elec settings that differ from ``model_config`` and ``elec_config``, another schema, or else
    the elec settings to compare."""
    metadata = _export_metadata(path)
    hints = []
    recorded_elec = metadata.get("elec") if isinstance(metadata.get("elec"), dict) else {}
    if elec_config is not None and recorded_elec:
        current_elec = gain_shape_settings(elec_config)
        names = {"entity_fields": "the fields of elec.entity_tables / elec.entity_field"}
        differing = [f"{names.get(key, 'elec.' + key)} {value!r} (here {current_elec[key]!r})"
                     for key, value in recorded_elec.items() if key in current_elec and current_elec[key] != value]
        if differing:
            hints.append(f"the state was exported from a gain network of other elec settings (config.json "
                         f"metadata.elec): {', '.join(differing)}; build the teacher with the same settings")
    recorded = metadata.get("model") if isinstance(metadata.get("model"), dict) else {}
    if model_config is not None and recorded:
        current = model_config.to_dict()
        from recsys_llm.train.config import TRAINING_ONLY_KEYS  # loss weights, ...: they shape no tensor

        differences = [f"model.{key}={value!r} (here {current[key]!r})" for key, value in recorded.items()
                       if key in current and current[key] != value and f"model.{key}" not in TRAINING_ONLY_KEYS
                       and not (key == "dropout" and bool(value) == bool(current[key]))]  # > 0: the same layers
        if differences:
            hints.append(f"the state was exported from a model with other settings (config.json metadata.model): "
                         f"{', '.join(differences)}; build the teacher with the same model settings")
    elif recorded.get("name"):
        hints.append(f"the state was exported from a {recorded['name']!r} model (config.json metadata.model.name): "
                     f"build the teacher with the same model settings (model.name={recorded['name']}, ...)")
    trained_on = metadata.get("schema_fingerprint")
    if schema_fingerprint and trained_on and trained_on != schema_fingerprint:
        hints.append(f"the teacher was trained on another schema (config.json metadata.schema_fingerprint "
                     f"{trained_on}, this data set's is {schema_fingerprint}): train the student on the teacher's data")
    if not hints:
        settings = "the model settings match the state's, so " if model_config is not None and recorded else ""
        if recorded_elec and elec_config is not None:
            settings = "the model and elec settings match the state's, so " if settings else settings
        hints.append(f"{settings}build the teacher with the gain run's settings: model.*, and elec.vector_source, the "
                     "fields of elec.entity_tables / elec.entity_field, elec.vector_dim and elec.num_injected_fields")
    return "; " + "; ".join(hints)


def teacher_part(state: Mapping[str, Any]) -> Mapping[str, Any]:
    """A frozen teacher's tensors in ``state``: a gain run's state as it is, or, from the whole state of a
    distillation run (``export --state-only`` of a joint or frozen run: ``teacher.*``, ``student.*``, ...), its
    teacher's, keys relative to ``teacher.`` (the values stay as ``state`` gives them: lazy reads stay lazy)."""
    keys = list(state)
    if not (any(k.startswith("teacher.") for k in keys) and any(k.startswith("student.") for k in keys)):
        return state
    return {key[len("teacher."):]: state[key] for key in keys if key.startswith("teacher.")}


def load_elec_state(model: nn.Module, config: ELECConfig, schema_fingerprint: Optional[str] = None,
                    model_config: Optional[ModelConfig] = None) -> Dict[str, int]:
    """Fills what training does not: entity vectors and (frozen mode) the teacher's weights.

    Call after sharding (each rank writes only its own shards) or on a plain model. Entity
    vectors must match ``config.expected_provenance`` and, where their provenance records
    them (``semantics export`` does), the entity field and ``schema_fingerprint``: ids of
    another data set would land on the wrong rows.

    A frozen teacher's state (a gain run's ``export --state-only``, or a distillation run's, whose teacher
    part is read: :func:`teacher_part`) must fit the teacher this config builds, tensor for tensor; when it
    does not, the error names the model settings (``model_config``) or schema the export's
    ``config.json`` records otherwise.

    A frozen teacher's entity tables come from ``teacher_checkpoint`` with its other weights;
    ``entity_tables`` names their fields (the teacher's shape) and may name their export
    directories: those are then checked as above and row by row against the checkpoint's tables,
    so a run that records them (``plugins.json``) records the vectors its teacher really reads.

    Returns:
        Dict[str, int]: rows filled in the entity table, rows of the frozen teacher's entity
        tables checked against their exports, tensors copied into the teacher.

    Raises:
        KeyError: the frozen teacher's state lacks a tensor of the teacher this config builds.
        FileNotFoundError: an entity export directory that does not exist (in frozen mode, one
            that is named).
        ProvenanceError: vectors of another provenance, field or schema, or per-row vectors (granularity
            ``row``) named as entity vectors.
        ValueError: the frozen teacher's state has a tensor of another shape or one the teacher has no
            place for; a frozen teacher's table holds other vectors than the export named for it, or
            ``expected_provenance`` is set for a frozen teacher without any export to check it on.
    """
    from recsys_llm.semantics.vector_export import ProvenanceError, check_provenance, read_manifest
    from recsys_llm.semantics.vector_reader import vector_dim
    from recsys_llm.serving import open_state_file

    report: Dict[str, int] = {"entity_rows": 0, "entity_rows_checked": 0, "teacher_tensors": 0}
    is_distill = config.task == "distill"
    frozen = is_distill and config.distill.mode == "frozen"
    if frozen:
        _check_teacher_is_an_export(config.teacher_checkpoint)
        source = f"elec.teacher_checkpoint {config.teacher_checkpoint}"
        with open_state_file(config.teacher_checkpoint) as state:  # each rank reads only its shards' rows
            try:
                report["teacher_tensors"] = load_full_state(model, teacher_part(state), prefix="teacher.",
                                                            source=source)
            # the state lacks a tensor, has one of another shape, or an extra one (not a NaN or a damaged
            # file: the ValueErrors of open_state_file's reads, which no model setting explains)
            except (KeyError, StateMismatchError) as error:
                hint = _teacher_mismatch_hint(config.teacher_checkpoint, model_config, schema_fingerprint, config)
                raise type(error)(f"{error.args[0]}{hint}") from None
    if config.vector_source != "entity_table" or (is_distill and config.distill.mode == "offline"):
        return report
    named = {field: directory for field, directory in config.entity_tables.items() if directory or not frozen}
    if frozen and config.expected_provenance and not named:
        raise ValueError(
            "elec.expected_provenance is set, but the frozen teacher's entity tables come from "
            f"elec.teacher_checkpoint {config.teacher_checkpoint} and no export directory is named to check it on: "
            "name the exports the teacher was trained with in elec.entity_tables (field -> directory), or drop "
            "elec.expected_provenance"
        )
    for field, directory in named.items():
        if not directory or not os.path.isdir(directory):
            key = ("elec.entity_vectors" if field == config.entity_field and directory == config.entity_vectors
                   else f"elec.entity_tables.{field}")
            raise FileNotFoundError(
                f"{key}={directory!r}: no such directory; expected a vector export of field {field!r}, written by "
                f"`recsys-llm semantics export --granularity entity --entity-field {field} --output-dir DIR`")
        stored = read_manifest(directory)["provenance"]
        if stored.get("granularity", "entity") != "entity":
            # keyed by row keys: row k's vector would become entity k's wherever k is below the cardinality
            raise ProvenanceError(
                f"elec entity vectors of {field!r} in {directory}: per-row vectors (granularity "
                f"{stored['granularity']!r}, keyed by the row key), not one per id; export them with semantics "
                f"export --granularity entity --entity-field {field}, or read per-row vectors with "
                "elec.vector_source=extras"
            )
        expected = dict(config.expected_provenance)
        # exports record their entity field and schema; vectors written otherwise may not
        for key, value in (("entity_field", field), ("schema", schema_fingerprint)):
            if value is not None and key in stored:
                expected[key] = value
        check_provenance(stored, expected, directory)  # every rank, not only those holding shards
        exported_dim = vector_dim(directory)
        if exported_dim != config.vector_dim:
            remedy = (f"name the export the teacher of elec.teacher_checkpoint {config.teacher_checkpoint} was trained "
                      "with" if frozen else f"set elec.vector_dim={exported_dim}, or export vectors of that width")
            raise ValueError(f"elec entity vectors of {field!r} in {directory}: {exported_dim}-d vectors, but "
                             f"elec.vector_dim is {config.vector_dim}; {remedy}")
        if frozen:
            report["entity_rows_checked"] += check_teacher_vectors(model, field, directory, config.teacher_checkpoint)
        else:
            report["entity_rows"] += load_semantic_vectors(model, semantic_table_name(field), directory)
    return report


@torch.no_grad()
def check_teacher_vectors(model: nn.Module, field: str, directory: str, checkpoint: Optional[str] = None) -> int:
    """Raises unless a loaded (frozen) teacher's entity table of ``field`` holds the vectors of the
    export ``directory``: each rank compares its local shards' rows and columns with the export's.

    Returns:
        int: table rows compared on this rank (a row of several local column shards counts once).

    Raises:
        KeyError: the model has no entity table of ``field``.
        ValueError: the export holds ids outside the table, or other vectors than the table.
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    from recsys_llm.semantics.vector_reader import iter_vector_rows, key_range

    table = semantic_table_name(field)
    weights = table_weights(model, table)
    if not weights:
        raise KeyError(f"model has no embedding table {table!r} in its state dict")

    def refuse(detail: str) -> ValueError:
        return ValueError(
            f"elec.entity_tables[{field!r}]={directory!r}: {detail}; the frozen teacher reads the table of "
            f"elec.teacher_checkpoint {checkpoint}, not this export: name the export the teacher was trained with "
            f"(or leave the directory out: null where it was named, elec.entity_tables.{field}=null or, for "
            "elec.entity_field, elec.entity_vectors=null)"
        )

    num_rows = weights[0][1].size(0)
    low, high = key_range(directory)
    if low < 0 or high >= num_rows:
        raise refuse(f"holds vectors of ids {low}..{high}, but the teacher's table {table!r} has rows "
                     f"0..{num_rows - 1}")
    checked: List[Tuple[int, int]] = []  # [start, stop) of the rows of each local shard
    for _, weight in weights:
        if isinstance(weight, ShardedTensor):
            pieces = [(s.tensor, *s.metadata.shard_offsets, *s.metadata.shard_sizes) for s in weight.local_shards()]
        else:
            pieces = [(weight, 0, 0, *weight.shape)]
        dim = weight.size(1)
        for tensor, row, col, rows, cols in pieces:
            # export chunk by chunk against the shard's rows (never a copy of the whole shard);
            # rows the export has no vector for must be zero, as load_semantic_vectors leaves them
            exported = torch.zeros(rows, dtype=torch.bool)
            same = True
            for positions, vectors in iter_vector_rows(directory, row, row + rows, dim, columns=(col, col + cols)):
                index = torch.from_numpy(positions)
                held = tensor.detach()[index.to(tensor.device)].cpu().float()
                same = same and torch.allclose(held, torch.from_numpy(vectors).float(), rtol=1e-6, atol=1e-7)
                exported[index] = True
            for start in range(0, rows, 65536):
                if not same:
                    break
                block = tensor.detach()[start : start + 65536].cpu().float()
                block = block[~exported[start : start + 65536]]
                same = torch.allclose(block, torch.zeros_like(block), rtol=1e-6, atol=1e-7)
            if not same:
                raise refuse(f"holds other vectors than the teacher's table {table!r} (rows {row}..{row + rows - 1})")
            checked.append((row, row + rows))
    return distinct_rows(checked)
