"""ELEC settings: numeric values refused where they are read, and a frozen teacher's entity tables.

A bad ``elec.*`` value must be the config error of ``recsys-llm train`` (exit code 2) naming the
key, not a reshape / negative-dimension / planner error deep in building or sharding the task.
"""

import re

import numpy as np
import pyarrow as pa
import pytest
import torch

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.modules.elec import ELECConfig, ELECDistillConfig, build_elec_task, build_gain_network, load_elec_state
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.semantics.vector_export import ProvenanceError, VectorExport, VectorExportConfig
from recsys_llm.train.config import ConfigError

CPU = torch.device("cpu")
MODEL = SMOKE_CONFIGS["deepfm"]
NUM_USERS, NUM_ITEMS, DIM = 4, 6, 8
SCHEMA = DatasetSchema("t", [FieldSpec("user_id", "sparse", NUM_USERS), FieldSpec("item_id", "sparse", NUM_ITEMS),
                             FieldSpec("age", "dense")])
PROVENANCE = {"model": "tiny", "granularity": "entity"}
ENTITY = dict(vector_source="entity_table", entity_tables={"item_id": "unused"})


@pytest.mark.parametrize("raw, message", [
    ({"num_injected_fields": 0}, "elec.num_injected_fields must be an integer >= 1, got 0"),
    ({"num_injected_fields": -1}, "elec.num_injected_fields must be an integer >= 1, got -1"),
    ({"vector_dim": -4}, "elec.vector_dim must be an integer >= 1, got -4"),
    ({"vector_dim": 0}, "elec.vector_dim must be an integer >= 1, got 0"),
    ({"vector_dim": 0, **ENTITY}, "elec.vector_dim must be an integer >= 1, got 0"),
    ({"distill": {"teacher_loss_weight": -1}},
     "elec.distill.teacher_loss_weight must be a finite number >= 0, got -1.0"),
    ({"distill": {"alpha": -1}}, "elec.distill.alpha must be a finite number >= 0, got -1.0"),
    ({"distill": {"beta": float("nan")}},
     "elec.distill.beta must be a finite number >= 0, got nan"),
    ({"distill": {"temperature": 0}},
     "elec.distill.temperature must be a finite number > 0, got 0.0"),
    ({"distill": {"teacher_representation_dim": -1}},
     "elec.distill.teacher_representation_dim must be an integer >= 0, got -1"),
    ({"distill": {"score_kd": "mse"}},
     r"elec.distill.score_kd must be one of \('bce', 'kl'\), got 'mse'"),
    ({"distill": {"repr_kd": "kl"}},
     r"elec.distill.repr_kd must be one of \('mse', 'cosine'\), got 'kl'"),
    ({"distill": {"mode": "jont"}},  # not "elec.distill: TeacherStudentConfig.mode must be ..."
     r"elec.distill.mode must be one of \('joint', 'frozen', 'offline'\), got 'jont'"),
])
def test_a_value_out_of_range_is_a_config_error_naming_the_key(raw, message):
    """The ``elec`` section as ``recsys-llm train`` parses it (``build_task``, ``plugin_extras``)."""
    with pytest.raises(ConfigError, match=f"^{message}$"):
        ELECConfig.from_dict({"task": "gain", **raw}, source="elec")


def test_the_edges_of_each_range_are_accepted():
    config = ELECConfig.from_dict({"task": "distill", "vector_dim": 1, "num_injected_fields": 1, "distill": {
        "alpha": 0, "beta": 0, "teacher_loss_weight": 0, "temperature": 0.01, "teacher_representation_dim": 0}})
    assert config.distill.teacher_loss_weight == 0 and config.num_injected_fields == 1


def test_library_users_get_the_same_refusals():
    with pytest.raises(ValueError, match="elec.num_injected_fields must be an integer >= 1, got 0"):
        ELECConfig(task="gain", vector_dim=8, num_injected_fields=0)
    with pytest.raises(ValueError, match="TeacherStudentConfig.teacher_loss_weight must be a finite number >= 0"):
        TeacherStudentConfig(teacher_loss_weight=-1.0)


@pytest.mark.parametrize("settings, message", [
    (dict(task="teacher"), r"^elec\.task must be one of \('gain', 'distill'\), got 'teacher'$"),
    (dict(vector_source="entity"), r"^elec\.vector_source must be one of \('extras', 'entity_table'\), "
                                   r"got 'entity'$"),
    (dict(vector_source="entity_table"), r"^elec\.vector_source 'entity_table' needs elec\.entity_field \(e\.g\. "
                                         r"'item_id'\) or elec\.entity_tables \(\{field: vector directory\}\)$"),
    (dict(distill=TeacherStudentConfig(mode="frozen")), r"^elec\.distill\.mode 'frozen' needs "
                                                        r"elec\.teacher_checkpoint$"),
    (dict(distill=ELECDistillConfig(swap_fields=["item_id"])),
     r"^elec\.distill\.swap_fields re-pairs rows, .*use vector_source 'entity_table'"),
], ids=["task", "vector source", "entity table without fields", "frozen without teacher", "swap with extras"])
def test_settings_that_cannot_build_a_task_are_refused_naming_the_key(settings, message):
    """Caught when the config is made, naming the elec.* key and what it takes, not later while building,
    loading or training the task."""
    with pytest.raises(ValueError, match=message):
        ELECConfig(**{"vector_dim": DIM, **settings})


# ---- a frozen teacher's entity tables ----------------------------------------------------------
def _export(directory: str, field: str, vectors: np.ndarray, provenance=None) -> str:
    ids = np.arange(len(vectors))
    VectorExport(directory, {**PROVENANCE, **(provenance or {})}, VectorExportConfig(chunk_rows=3)).run(
        pa.array(ids, pa.int64()), lambda a, b: [str(i) for i in ids[a:b]],
        lambda texts: torch.from_numpy(vectors[[int(t) for t in texts]]), progress=False)
    return directory


def _gain_state(tmp_path, tables):
    """A trained gain network on user and item tables, written as ``export --state-only`` would."""
    from safetensors.torch import save_file

    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_tables=tables)
    torch.manual_seed(0)
    gain = build_gain_network(config, SCHEMA, MODEL, device=CPU)
    load_elec_state(gain, config, SCHEMA.fingerprint())
    path = str(tmp_path / "gain_state.safetensors")
    save_file({k: v.contiguous() for k, v in gain.state_dict().items()}, path)
    return path


def _frozen(checkpoint, tables, **kwargs):
    return ELECConfig(task="distill", vector_dim=DIM, vector_source="entity_table", entity_tables=tables,
                      teacher_checkpoint=checkpoint, distill=TeacherStudentConfig(mode="frozen", beta=0), **kwargs)


@pytest.fixture()
def trained_teacher(tmp_path):
    rng = np.random.default_rng(0)
    users = _export(str(tmp_path / "users"), "user_id", rng.normal(size=(NUM_USERS, DIM)).astype(np.float32),
                    {"entity_field": "user_id", "schema": SCHEMA.fingerprint()})
    items = _export(str(tmp_path / "items"), "item_id", rng.normal(size=(NUM_ITEMS, DIM)).astype(np.float32),
                    {"entity_field": "item_id", "schema": SCHEMA.fingerprint()})
    tables = {"user_id": users, "item_id": items}
    return tables, _gain_state(tmp_path, tables)


def _load(config):
    task = build_elec_task(config, SCHEMA, MODEL, device=CPU)
    return load_elec_state(task, config, SCHEMA.fingerprint())


def test_a_frozen_teacher_checks_the_entity_exports_it_is_given_against_its_own_tables(trained_teacher):
    """The exports the teacher trained with are what the run records (plugins.json): they pass."""
    tables, checkpoint = trained_teacher
    report = _load(_frozen(checkpoint, tables, expected_provenance={"model": "tiny"}))
    assert report["teacher_tensors"] > 0 and report["entity_rows_checked"] == NUM_USERS + NUM_ITEMS
    assert report["entity_rows"] == 0  # the table's vectors are the checkpoint's, not read into it again


def test_a_frozen_teacher_refuses_entity_exports_it_does_not_read(trained_teacher, tmp_path):
    """Before: any path, even a missing one, was accepted, ignored, and recorded as the run's vectors."""
    tables, checkpoint = trained_teacher
    with pytest.raises(FileNotFoundError, match=r"^elec\.entity_tables\.user_id='/nonexistent': no such directory; "
                                                r"expected a vector export of field 'user_id', written by `recsys-llm "
                                                r"semantics export --granularity entity --entity-field user_id"):
        _load(_frozen(checkpoint, {**tables, "user_id": "/nonexistent"}))
    other = _export(str(tmp_path / "other_users"), "user_id", np.ones((NUM_USERS, DIM), np.float32),
                    {"entity_field": "user_id", "schema": SCHEMA.fingerprint()})
    with pytest.raises(ValueError, match=r"elec.entity_tables\['user_id'\]=.*other_users': holds other vectors than "
                                         r"the teacher's table 'semantic_user_id' .*elec.teacher_checkpoint"):
        _load(_frozen(checkpoint, {**tables, "user_id": other}))
    with pytest.raises(ProvenanceError, match=r"users: vectors do not match .*model: stored 'tiny', expected 'big'"):
        _load(_frozen(checkpoint, tables, expected_provenance={"model": "big"}))
    with pytest.raises(ProvenanceError, match=r"items: vectors do not match .*entity_field: stored 'item_id', "
                                              r"expected 'user_id'"):
        _load(_frozen(checkpoint, {"user_id": tables["item_id"], "item_id": tables["user_id"]}))


@pytest.mark.parametrize("settings, key", [
    (dict(entity_field="user_id", entity_vectors="/nonexistent"), "elec.entity_vectors"),
    (dict(entity_tables={"user_id": "/nonexistent"}), "elec.entity_tables.user_id"),
], ids=["entity_vectors", "entity_tables"])
def test_a_missing_entity_vector_directory_is_named_by_the_key_that_gave_it(settings, key):
    """elec.entity_field + elec.entity_vectors (one entity) and elec.entity_tables (several) both name a directory;
    the refusal names the key the user wrote, not always elec.entity_tables."""
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", **settings)
    with pytest.raises(FileNotFoundError, match=rf"^{re.escape(key)}='/nonexistent': no such directory; expected a "
                                                r"vector export of field 'user_id'"):
        _load(config)


def test_entity_vectors_of_another_width_than_elec_vector_dim_name_the_key(tmp_path):
    """Before: the first shard read failed with 'vectors have dim 8, the table expects 4'."""
    wide = _export(str(tmp_path / "wide"), "user_id", np.ones((NUM_USERS, DIM * 2), np.float32),
                   {"entity_field": "user_id", "schema": SCHEMA.fingerprint()})
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_tables={"user_id": wide})
    gain = build_gain_network(config, SCHEMA, MODEL, device=CPU)
    with pytest.raises(ValueError, match=rf"'user_id' in .*wide: {DIM * 2}-d vectors, but elec.vector_dim is {DIM}; "
                                         rf"set elec.vector_dim={DIM * 2}"):
        load_elec_state(gain, config, SCHEMA.fingerprint())


def test_a_frozen_teacher_needs_no_entity_export(trained_teacher):
    """The fields give the teacher its shape; its vectors come from its checkpoint."""
    tables, checkpoint = trained_teacher
    report = _load(_frozen(checkpoint, {"user_id": None, "item_id": ""}))
    assert report["teacher_tensors"] > 0 and report["entity_rows_checked"] == 0
    with pytest.raises(ValueError, match="elec.expected_provenance is set, but .* no export directory is named"):
        _load(_frozen(checkpoint, {"user_id": None, "item_id": ""}, expected_provenance={"model": "tiny"}))


@pytest.mark.parametrize("distill", [
    TeacherStudentConfig(mode="joint", beta=0.1),
    TeacherStudentConfig(mode="offline", beta=0.1, teacher_representation_dim=4),
], ids=["joint", "offline"])
@pytest.mark.parametrize("tables", ["cpu", "meta"])
def test_the_student_starts_from_the_weights_of_the_plain_backbone_of_the_same_seed(distill, tables):
    # the teacher (and representation KD's projection) used to be drawn first from the global stream, so
    # a joint or frozen student started from other dense weights and, materialised later by DMP from that
    # stream, other tables than the plain run it is compared with: the tables then differed by more than KD
    from recsys_llm.models.registry import build_backbone

    device = torch.device(tables)
    torch.manual_seed(3)
    plain = build_backbone(MODEL, SCHEMA, device=device, dense_device=CPU)
    plain_next = torch.rand(4)  # what DMP would draw the plain tables from
    torch.manual_seed(3)
    task = build_elec_task(ELECConfig(task="distill", vector_dim=DIM, distill=distill), SCHEMA, MODEL, device=device,
                           dense_device=CPU)
    torch.testing.assert_close(torch.rand(4), plain_next, rtol=0, atol=0)
    student = [p for p in task.student.model.parameters() if not p.is_meta]
    expected = [p for p in plain.parameters() if not p.is_meta]
    assert len(student) == len(expected) > 0
    assert all(torch.equal(a, b) for a, b in zip(student, expected))
    assert next(iter(task.named_children()))[0] == "student"  # DMP materialises its tables first


def test_an_entity_named_without_a_directory_twice_is_the_same_setting():
    """``entity_field`` with ``entity_vectors`` left null, and ``entity_tables.<field>=null`` beside it (the docs'
    two ways of naming the field without a directory) were refused as 'two vector directories, entity_vectors=None
    and entity_tables[...]=""' (the config file's null is read as '')."""
    for vectors in (None, ""):
        config = ELECConfig.from_dict({"task": "distill", "distill": {"mode": "frozen"}, "teacher_checkpoint": "t",
                                       "vector_source": "entity_table", "entity_field": "item_id",
                                       "entity_vectors": vectors, "entity_tables": {"item_id": None, "user_id": None}})
        assert set(config.entity_tables) == {"item_id", "user_id"} and not any(config.entity_tables.values())
    with pytest.raises(ConfigError, match=r"^elec\.entity_vectors=None and elec\.entity_tables\['item_id'\]="
                                          r"'vectors/items' name two vector directories for entity 'item_id'; give "
                                          r"one of them"):
        ELECConfig.from_dict({"vector_source": "entity_table", "entity_field": "item_id", "entity_vectors": None,
                              "entity_tables": {"item_id": "vectors/items"}})


@pytest.mark.parametrize("source", [{}, {"vector_source": "entity_table", "entity_tables": {"item_id": None}}],
                         ids=["extras", "entity_table"])
def test_the_vector_becomes_fields_of_the_width_the_schema_gives_the_tables(source):
    """A schema whose fields all set their own embedding_dim: the plain backbone embeds them in that width, but the
    gain network projected the vector to model.embedding_dim and was refused ('gives 1 extra field(s) of dim 16;
    DeepFM was built for 1 of its embedding dim 8')."""
    import dataclasses

    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_llm.data.batch import Batch

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", NUM_USERS, embedding_dim=8),
                                 FieldSpec("item_id", "sparse", NUM_ITEMS, embedding_dim=8), FieldSpec("age", "dense")])
    model = dataclasses.replace(MODEL, embedding_dim=16)
    config = ELECConfig(task="gain", vector_dim=DIM, num_injected_fields=2, **source)
    gain = build_gain_network(config, schema, model, device=CPU)
    assert (gain.field_injection.num_fields, gain.field_injection.embedding_dim) == (2, 8)
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "item_id"], torch.tensor([1, 2, 3, 4]),
                                              torch.ones(4, dtype=torch.int32))
    batch = Batch(torch.rand(2, 1), kjt, torch.tensor([1.0, 0.0]), {"llm_vector": torch.randn(2, DIM)})
    assert gain.predict(batch).logits.shape == (2,)


def test_a_frozen_teacher_refuses_an_export_with_an_id_beyond_its_table(trained_teacher, tmp_path):
    """The teacher's vectors plus one of id NUM_USERS (one past the table's last row): no shard holds that row, so
    comparing shard by shard never reads it; the export is refused by its id range, not passed as the teacher's."""
    from recsys_llm.semantics.vector_reader import read_vectors

    tables, checkpoint = trained_teacher
    keys, vectors = read_vectors(tables["user_id"])
    held = vectors[np.argsort(keys)]
    longer = _export(str(tmp_path / "more_users"), "user_id", np.concatenate([held, held[:1]]),
                     {"entity_field": "user_id", "schema": SCHEMA.fingerprint()})
    with pytest.raises(ValueError, match=rf"more_users': holds vectors of ids 0..{NUM_USERS}, but the teacher's table "
                                         rf"'semantic_user_id' has rows 0..{NUM_USERS - 1}"):
        _load(_frozen(checkpoint, {**tables, "user_id": longer}))


def test_a_gain_network_whose_entity_table_names_no_directory_is_refused_not_left_unfilled() -> None:
    """Only a frozen teacher reads its entity tables from its checkpoint and may leave their directory out (null);
    a gain network that names none would train on a table nothing filled."""
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_tables={"item_id": None})
    gain = build_gain_network(config, SCHEMA, MODEL, device=CPU)
    with pytest.raises(FileNotFoundError, match=r"elec.entity_tables.item_id=None: no such directory"):
        load_elec_state(gain, config, SCHEMA.fingerprint())


def test_the_run_record_of_entity_vectors_holds_their_keys_hash_and_nothing_for_an_offline_student(tmp_path) -> None:
    """A re-export over other ids (as many, the same provenance) is told apart by its keys' hash; an offline
    student reads no table, so its run records none."""
    from recsys_llm.modules.elec import entity_vectors_record
    from recsys_llm.semantics.vector_export import keys_sha256

    out = str(tmp_path / "items")
    keys = np.array([3, 1, 5], np.int64)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
        pa.array(keys), lambda a, b: [str(k) for k in keys[a:b]], lambda texts: torch.ones(len(texts), DIM),
        progress=False)
    gain = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_tables={"item_id": out})
    record = entity_vectors_record(gain)["item_id"]
    assert record["keys_sha256"] == keys_sha256(keys) and record["num_rows"] == 3
    offline = ELECConfig(task="distill", vector_dim=DIM, vector_source="entity_table", entity_tables={"item_id": out},
                         distill=ELECDistillConfig(mode="offline"))
    assert entity_vectors_record(offline) == {}


@pytest.mark.parametrize("name", ["entity_tables", "expected_provenance"])
@pytest.mark.parametrize("bad", ["item_id", ["item_id"]])
def test_mapping_settings_refuse_a_string_or_list(name, bad):
    """ELECConfig(expected_provenance="x") was kept (no provenance then checked); entity_tables="item_id" failed in
    dict() ("dictionary update sequence element #0")."""
    from recsys_llm.modules.elec import ELECConfig

    with pytest.raises(ValueError, match=rf"elec\.{name}: expected a mapping"):
        ELECConfig(**{name: bad})


def test_elec_config_refuses_non_string_settings_and_takes_a_path():
    import pathlib
    from recsys_llm.modules.elec import ELECConfig

    with pytest.raises(ValueError, match=r"elec.vector_key: expected a string, got True"):
        ELECConfig(vector_key=True)
    with pytest.raises(ValueError, match=r"elec.entity_field: expected a string or None, got 3"):
        ELECConfig(entity_field=3)
    assert ELECConfig(teacher_checkpoint=pathlib.Path("runs/t")).teacher_checkpoint == "runs/t"
