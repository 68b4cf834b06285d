import numpy as np
import pyarrow as pa
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.models.embedding import FILLED_BEFORE_SHARDING
from recsys_llm.modules.semantic_table import SemanticTable, load_semantic_vectors
from recsys_llm.semantics.vector_export import ProvenanceError, VectorExport, VectorExportConfig

NUM_ITEMS = 12
DIM = 256  # torchrec cuts column-wise shards of 128 columns: two ranks hold half each
PROVENANCE = {"model": "tiny", "granularity": "entity"}


def write_item_vectors(directory: str) -> np.ndarray:
    """Entity vectors for items 0..11 (ids exported in shuffled order, chunks of 5)."""
    ids = np.random.default_rng(0).permutation(NUM_ITEMS)
    table = np.random.default_rng(1).normal(size=(NUM_ITEMS, DIM)).astype(np.float32)

    def encode(texts):
        return torch.from_numpy(table[[int(t) for t in texts]])

    VectorExport(directory, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(
        pa.array(ids, pa.int64()), lambda a, b: [str(i) for i in ids[a:b]], encode, progress=False)
    return table


def item_kjt(items: torch.Tensor) -> KeyedJaggedTensor:
    n = items.numel()
    return KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.cat([items % 3, items]),
                                               lengths=torch.ones(2 * n, dtype=torch.int32))


class TestSemanticTable:
    def test_lookup_after_loading(self, tmp_path):
        table = write_item_vectors(str(tmp_path / "items"))
        module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
        assert module.embedding_bag_collection.frozen
        assert load_semantic_vectors(module, "semantic_item_id", str(tmp_path / "items"), expected=PROVENANCE) == NUM_ITEMS
        items = torch.tensor([3, 0, 11, 3])
        out = module(item_kjt(items))
        assert out.shape == (4, DIM) and not out.requires_grad  # detached: never trained
        torch.testing.assert_close(out, torch.from_numpy(table[items.numpy()]))
        # shard_model would allocate the table's shards afresh: it refuses a table filled before sharding
        assert getattr(module.embedding_bag_collection, FILLED_BEFORE_SHARDING) == "load_semantic_vectors"

    def test_errors(self, tmp_path):
        write_item_vectors(str(tmp_path / "items"))
        with pytest.raises(ValueError, match="multiple of 4 .*adapt the LLM with a --representation-dim that is one, "
                                             "or export the vectors with --projection FILE"):
            SemanticTable({"item_id": NUM_ITEMS}, 6)
        module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
        with pytest.raises(ProvenanceError, match="model"):
            load_semantic_vectors(module, "semantic_item_id", str(tmp_path / "items"), expected={"model": "big"})
        with pytest.raises(KeyError, match="no embedding table"):
            load_semantic_vectors(module, "semantic_user_id", str(tmp_path / "items"))
        # one row short: the largest id (11) is the first row outside the table
        smaller = SemanticTable({"item_id": NUM_ITEMS - 1}, DIM, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"items: holds vectors of ids 0..11, but table 'semantic_item_id' has rows "
                                             r"0..10; a vector outside it would be dropped"):
            load_semantic_vectors(smaller, "semantic_item_id", str(tmp_path / "items"))

    def test_a_table_not_allocated_yet_is_refused(self, tmp_path):
        """Loading before shard_model: the copy into a meta table would do nothing, silently."""
        write_item_vectors(str(tmp_path / "items"))
        module = SemanticTable({"item_id": NUM_ITEMS}, DIM)  # on meta, as shard_model wants it
        with pytest.raises(RuntimeError, match=r"load_semantic_vectors\('semantic_item_id'\): .* is on the meta "
                                               r"device, not allocated yet; call it after shard_model"):
            load_semantic_vectors(module, "semantic_item_id", str(tmp_path / "items"))

    def test_an_injection_of_another_width_than_the_table_is_refused(self):
        """Two entities give K * d values per row: an injection built for d fails when built, not at the first step."""
        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
        from recsys_llm.modules.dense_injection import VectorFieldInjection
        from recsys_llm.modules.semantic_table import SemanticTableTask

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", NUM_ITEMS),
                                     FieldSpec("age", "dense")])
        config = SMOKE_CONFIGS["deepfm"]
        backbone = build_backbone(config, schema, num_extra_fields=1, device=torch.device("cpu"))
        table = SemanticTable({"user_id": 3, "item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=rf"SemanticTableTask: the field injection takes vectors of width {DIM}, "
                                             rf"the semantic table gives {2 * DIM} \(2 entities .* build it with "
                                             rf"in_dim={2 * DIM}"):
            SemanticTableTask(backbone, table, VectorFieldInjection(DIM, config.embedding_dim))
        task = SemanticTableTask(backbone, table, VectorFieldInjection(2 * DIM, config.embedding_dim))
        assert task.field_injection.in_dim == table.output_dim

    def test_a_hashed_entity_field_gets_no_entity_table(self):
        """Folded ids share table rows: one vector per row would belong to several entities."""
        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        from recsys_llm.models.registry import SMOKE_CONFIGS
        from recsys_llm.modules.elec import ELECConfig, build_gain_network

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", 8, hashed=True),
                                     FieldSpec("age", "dense")])
        config = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table", entity_field="item_id",
                            entity_vectors="unused")
        with pytest.raises(ValueError, match=r"elec.entity_tables: fields \['item_id'\] are hashed"):
            build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"])

    def test_a_sequence_entity_field_is_refused_by_name(self):
        """Its table summed the vectors of a row's ids (the backbone mean-pools the field): an LLM vector that grew
        with the sequence's length."""
        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        from recsys_llm.models.registry import SMOKE_CONFIGS
        from recsys_llm.modules.elec import ELECConfig, build_gain_network

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("history", "sequence", 8, max_length=4),
                                     FieldSpec("age", "dense")])
        config = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table", entity_field="history",
                            entity_vectors="unused")
        with pytest.raises(ValueError, match=r"elec.entity_tables: fields \['history'\] are sequence fields \(several "
                                             r"ids per row\); entity vectors are keyed by the ids of a sparse field"):
            build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"])

    def test_a_dense_entity_field_is_refused_by_name(self):
        """A dense field has no ids to key vectors by (it was a ZeroDivisionError in torchrec's table init)."""
        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        from recsys_llm.models.registry import SMOKE_CONFIGS
        from recsys_llm.modules.elec import ELECConfig, build_gain_network

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("age", "dense")])
        config = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table", entity_field="age",
                            entity_vectors="unused")
        with pytest.raises(ValueError, match=r"elec.entity_tables: fields \['age'\] are dense .* sparse id field"):
            build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"])

    def test_an_entity_field_not_in_the_schema_is_refused_by_the_setting(self):
        """Before: "schema 't' has no field 'movie_id'", which named no elec setting."""
        from recsys_llm.data.schema import DatasetSchema, FieldSpec
        from recsys_llm.models.registry import SMOKE_CONFIGS
        from recsys_llm.modules.elec import ELECConfig, build_gain_network

        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", 8),
                                     FieldSpec("age", "dense")])
        config = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table",
                            entity_tables={"item_id": None, "movie_id": "vectors/movies"})
        with pytest.raises(ValueError, match=r"elec.entity_tables: fields \['movie_id'\] are not fields of the "
                                             r"schema 't' \(fields: \['user_id', 'item_id', 'age'\]\)"):
            build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"])


def _sharded_joint_kd(vector_dir: str, export_dir: str):
    """One rank: joint KD with a column-wise sharded frozen entity table, trained by the pipeline.

    (torchrec 1.8 offers row-wise sharding on CUDA only; column-wise exercises the same
    shard-offset loading on CPU.)
    """
    from recsys_llm.data.batch import Batch
    from recsys_llm.data.schema import DatasetSchema, FieldSpec
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, ELECDistillConfig, build_elec_task, load_elec_state
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.pipeline import train_epoch
    from recsys_llm.train.plan_report import table_placements
    from recsys_llm.train.sharding import build_optimizer, shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    ctx = init_distributed("cpu")
    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", NUM_ITEMS),
                                 FieldSpec("age", "dense")])
    config = ELECConfig(task="distill", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                        entity_vectors=vector_dir, expected_provenance=PROVENANCE,
                        distill=ELECDistillConfig(mode="joint", beta=0.5, swap_fields=["item_id"]))
    torch.manual_seed(0)
    task = build_elec_task(config, schema, SMOKE_CONFIGS["deepfm"])
    from recsys_llm.data.pair_swap import SwappedPairs

    swap = SwappedPairs(schema, config.distill.swap_fields, seed=0)
    sharding = ShardingConfig(sharding_types=["table_wise", "column_wise"],
                              table_constraints={"semantic_item_id": {"sharding_types": ["column_wise"]}})
    model, plan = shard_model(task, ctx.device, ctx.world_size, sharding, OptimizerConfig(sparse_lr=0.5), batch_size=8)
    filled = load_elec_state(model, config)["entity_rows"]
    optimizer = build_optimizer(model, OptimizerConfig(sparse_lr=0.5))

    def weights(table: str):
        return {k: [s.tensor.clone() for s in v.local_shards()] if isinstance(v, ShardedTensor) else [v.clone()]
                for k, v in model.state_dict().items() if k.endswith(f"embedding_bags.{table}.weight")}

    semantic_before = weights("semantic_item_id")
    student_before = weights("student_item_id")
    g = torch.Generator().manual_seed(ctx.rank)
    batches = []
    for _ in range(6):
        items = torch.randint(0, NUM_ITEMS, (8,), generator=g)
        batches.append(Batch(torch.randn(8, 1, generator=g), item_kjt(items), (items % 2).float(), {}))
    # every batch also carries 8 label-free rows whose items (and so item vectors) are swapped
    stats = train_epoch(model, optimizer, [swap(batch) for batch in batches], ctx.device, progress=False)
    semantic_after = weights("semantic_item_id")
    student_after = weights("student_item_id")
    unchanged = all(torch.equal(a, b) for k in semantic_before for a, b in zip(semantic_before[k], semantic_after[k]))
    student_changed = any(not torch.equal(a, b) for k in student_before for a, b in zip(student_before[k], student_after[k]))
    (key, shards), = semantic_after.items()
    local = []
    for tensor, shard in zip(shards, model.state_dict()[key].local_shards()):
        row, col = shard.metadata.shard_offsets
        local.append((row, col, tensor.numpy().tolist()))
    # the student alone, gathered from the shards and exported, reproduces the DMP student
    from recsys_llm.modules.elec import build_student
    from recsys_llm.serving import ServedModel, export_task, sub_state, unsharded_state_dict

    full = unsharded_state_dict(model)  # collective: every rank takes part, rank 0 gets it all
    # export gathers the student alone: the teacher's sharded tables never travel (a spy counts the gathers)
    import recsys_llm.serving.state as state_module

    gather, gathered = state_module._gather_shards_to_cpu, []
    state_module._gather_shards_to_cpu = lambda value, dst: gathered.append(tuple(value.size())) or gather(value, dst)
    try:
        student_only = unsharded_state_dict(model, prefix="student.")
    finally:
        state_module._gather_shards_to_cpu = gather
    sharded = [state_module.strip_wrappers(k) for k, v in model.state_dict().items() if isinstance(v, ShardedTensor)]
    model.eval()
    with torch.no_grad():
        _, (_, dmp_logits, _) = model(batches[0])
    export_equal = None
    if ctx.rank == 0:
        student = build_student(schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
        student.load_state_dict(sub_state(full, "student."))
        export_task(student, export_dir, batches[0].dense_features, batches[0].sparse_features)
        served = ServedModel.load(export_dir, trust_program=True)
        export_equal = torch.equal(served.logits(batches[0].dense_features, batches[0].sparse_features), dmp_logits)
    fused_state = model.fused_optimizer.state_dict()["state"]
    semantic_state = {str(k): {n: (tuple(v.shape) if hasattr(v, "shape") else v) for n, v in st.items()}
                      for k, st in fused_state.items() if "semantic" in str(k)}
    return {
        "filled": filled,
        "export_equal": export_equal,
        # the teacher's column-wise sharded entity table as gathered whole on rank 0 (each rank holds half its columns)
        "semantic_gathered": None if ctx.rank else next(
            v for k, v in full.items() if k.endswith("embedding_bags.semantic_item_id.weight")).numpy().tolist(),
        "student_gathers": len(gathered),
        "student_sharded": sum(name.startswith("student.") for name in sharded),
        "sharded": len(sharded),
        "student_only_equal": None if ctx.rank else (
            sorted(student_only) == sorted(k for k in full if k.startswith("student."))
            and all(torch.equal(v, full[k]) for k, v in student_only.items())),
        "local": local,
        "unchanged": unchanged,
        "student_changed": student_changed,
        "steps": stats.steps,
        "samples": stats.samples,
        "pipelined": stats.pipelined_modules,
        "placement": table_placements(plan)["semantic_item_id"],
        "semantic_optimizer_state": semantic_state,
        "dense_optimizer_semantic": [k for _, opt in optimizer.optimizers if opt is not model.fused_optimizer
                                     for k in opt.params if "semantic" in k],
        "dense_optimizer_size": sum(len(opt.params) for _, opt in optimizer.optimizers if opt is not model.fused_optimizer),
    }


@pytest.mark.multiprocess
class TestShardedSemanticTable:
    def test_two_ranks_load_own_shards_stay_frozen_and_export_student(self, tmp_path):
        from tests.multiprocess import run_multiprocess

        table = write_item_vectors(str(tmp_path / "items"))
        results = run_multiprocess(_sharded_joint_kd, world_size=2, vector_dir=str(tmp_path / "items"),
                                   export_dir=str(tmp_path / "export"))
        assert results[0]["export_equal"] is True  # gathered student export == DMP student predictions
        assert results[0]["student_only_equal"] is True
        # unsharded_state_dict gathers every shard of a column-wise table, the one at a column offset too
        np.testing.assert_allclose(np.array(results[0]["semantic_gathered"]), table, rtol=1e-6)
        for result in results:  # the student's sharded tables gathered, none of the teacher's
            assert 0 < result["student_gathers"] == result["student_sharded"] < result["sharded"], result
        covered = np.zeros((NUM_ITEMS, DIM), dtype=int)
        for rank, result in enumerate(results):
            assert result["steps"] == 6 and result["samples"] == 6 * 16  # 8 rows + 8 swapped rows per batch
            assert result["placement"]["sharding_type"] == "column_wise"
            assert len(result["placement"]["shards"]) == 2
            assert result["unchanged"], f"rank {rank}: frozen table changed"
            # the table's optimizer holds no state, and the dense optimizer does not see it
            assert result["semantic_optimizer_state"] and not any(result["semantic_optimizer_state"].values())
            assert not result["dense_optimizer_semantic"] and result["dense_optimizer_size"] > 0
            assert any("semantic_table" in m for m in result["pipelined"]), result["pipelined"]
            held = 0
            for row, col, values in result["local"]:
                values = np.array(values)
                np.testing.assert_allclose(values, table[row : row + values.shape[0], col : col + values.shape[1]],
                                           rtol=1e-6)
                covered[row : row + values.shape[0], col : col + values.shape[1]] += 1
                held += values.size
            assert held < NUM_ITEMS * DIM  # no rank holds (or loaded) the whole table
        assert (covered == 1).all()
        assert any(r["student_changed"] for r in results)  # the student's table (on some rank) trained


def _user_vectors_and_schema(directory: str):
    """An export of 3 users' vectors in ``directory``, and a schema of users and items: (vectors (3, DIM), schema)."""
    from recsys_llm.data.schema import DatasetSchema, FieldSpec

    users = np.random.default_rng(2).normal(size=(3, DIM)).astype(np.float32)
    VectorExport(directory, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
        pa.array(np.arange(3), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
        lambda texts: torch.from_numpy(users[[int(t) for t in texts]]), progress=False)
    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", NUM_ITEMS),
                                 FieldSpec("age", "dense")])
    return users, schema


def test_user_and_item_vectors_are_concatenated_and_become_one_field_each(tmp_path):
    """Two entity tables: each filled from its own export, vectors concatenated user-first, K fields injected."""
    from recsys_llm.data.batch import Batch
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_gain_network, load_elec_state

    items = write_item_vectors(str(tmp_path / "items"))
    users, schema = _user_vectors_and_schema(str(tmp_path / "users"))
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                        entity_vectors=str(tmp_path / "items"), entity_tables={"user_id": str(tmp_path / "users")},
                        expected_provenance=PROVENANCE)
    assert list(config.entity_tables) == ["item_id", "user_id"]
    task = build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    assert load_elec_state(task, config)["entity_rows"] == NUM_ITEMS + 3
    ids = torch.tensor([3, 0, 11, 5])
    kjt = item_kjt(ids)
    vectors = task.semantic_table(kjt)
    assert task.semantic_table.feature_names == ["user_id", "item_id"]  # the schema's order, not the config's
    torch.testing.assert_close(vectors, torch.from_numpy(np.concatenate([users[ids.numpy() % 3], items[ids.numpy()]], 1)))
    assert task.field_injection(vectors).shape == (4, 2, SMOKE_CONFIGS["deepfm"].embedding_dim)
    logits = task.predict(Batch(torch.randn(4, 1), kjt, torch.ones(4), {})).logits
    assert logits.shape == (4,) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="two vector directories"):
        ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                   entity_vectors="a", entity_tables={"item_id": "b"})


def test_entity_tables_named_in_another_order_read_a_trained_state_as_it_was_trained(tmp_path):
    """A checkpoint (or a frozen teacher's export) does not record the order the config named the entity
    tables in, and configs naming them in another order are the same settings to a resume or a frozen
    teacher (``user_id`` then ``item_id`` in ``entity_tables``, or ``entity_field=item_id`` beside
    ``entity_tables.user_id``). The vectors used to be concatenated in the config's order, so the same
    state read the user's vector where its injection had learnt the item's, silently."""
    from recsys_llm.data.batch import Batch
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_gain_network, load_elec_state

    write_item_vectors(str(tmp_path / "items"))
    users, schema = _user_vectors_and_schema(str(tmp_path / "users"))
    user_first = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table",
                            entity_tables={"user_id": str(tmp_path / "users"), "item_id": str(tmp_path / "items")})
    item_first = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                            entity_vectors=str(tmp_path / "items"), entity_tables={"user_id": str(tmp_path / "users")})
    assert list(item_first.entity_tables) == ["item_id", "user_id"]
    torch.manual_seed(0)
    trained = build_gain_network(user_first, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    load_elec_state(trained, user_first)
    reloaded = build_gain_network(item_first, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    reloaded.load_state_dict(trained.state_dict())
    batch = Batch(torch.randn(4, 1), item_kjt(torch.tensor([3, 0, 11, 5])), torch.ones(4), {})
    torch.testing.assert_close(reloaded.predict(batch).logits, trained.predict(batch).logits, rtol=0, atol=0)


def _items_schema():
    from recsys_llm.data.schema import DatasetSchema, FieldSpec

    return DatasetSchema("t", [FieldSpec("user_id", "sparse", 3), FieldSpec("item_id", "sparse", NUM_ITEMS),
                               FieldSpec("age", "dense")])


def _export_ones(directory: str, provenance: dict, keys: np.ndarray) -> None:
    """An export of a vector of ones per key, with ``provenance``."""
    VectorExport(directory, provenance, VectorExportConfig(chunk_rows=5)).run(
        pa.array(keys, pa.int64()), lambda a, b: [str(i) for i in keys[a:b]],
        lambda texts: torch.ones(len(texts), DIM), progress=False)


def test_entity_vectors_of_another_schema_or_field_are_refused(tmp_path):
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_gain_network, load_elec_state

    schema = _items_schema()
    # as `semantics export` writes
    _export_ones(str(tmp_path / "items"), {**PROVENANCE, "entity_field": "item_id", "schema": schema.fingerprint()},
                 np.arange(NUM_ITEMS))
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                        entity_vectors=str(tmp_path / "items"))
    task = build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    assert load_elec_state(task, config, schema.fingerprint())["entity_rows"] == NUM_ITEMS
    with pytest.raises(ProvenanceError, match=r"items: vectors do not match .*schema: stored '[0-9a-f]+', expected 'other'"):
        load_elec_state(task, config, "other")
    as_users = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="user_id",
                          entity_vectors=str(tmp_path / "items"))
    users_task = build_gain_network(as_users, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    with pytest.raises(ProvenanceError, match="entity_field: stored 'item_id', expected 'user_id'"):
        load_elec_state(users_task, as_users, schema.fingerprint())


def test_entity_vectors_under_a_schema_whose_tables_grew_are_refused(tmp_path):
    """Unlike field vectors (one per field: a grown table changes none), entity vectors are one per id: a schema
    whose tables grew is another schema for them, checked against the whole fingerprint."""
    import dataclasses

    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_gain_network, load_elec_state

    schema = _items_schema()
    _export_ones(str(tmp_path / "items"), {**PROVENANCE, "entity_field": "item_id", "schema": schema.fingerprint()},
                 np.arange(NUM_ITEMS))
    grown = dataclasses.replace(schema, fields=[
        dataclasses.replace(f, cardinality=f.cardinality + 5) if f.name == "item_id" else f for f in schema.fields])
    assert grown.semantic_fingerprint() == schema.semantic_fingerprint()  # the same fields, texts and kinds
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                        entity_vectors=str(tmp_path / "items"))
    task = build_gain_network(config, grown, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    with pytest.raises(ProvenanceError, match=rf"schema: stored '{schema.fingerprint()}', "
                                              rf"expected '{grown.fingerprint()}'"):
        load_elec_state(task, config, grown.fingerprint())


def test_per_row_vectors_named_as_entity_vectors_are_refused(tmp_path):
    """A `semantics export --granularity row` directory (keyed by row keys) named as elec.entity_vectors
    used to be loaded as item vectors whenever its row keys fell below the field's cardinality: row k's
    vector became item k's, silently."""
    from recsys_llm.models.registry import SMOKE_CONFIGS
    from recsys_llm.modules.elec import ELECConfig, build_gain_network, load_elec_state

    schema = _items_schema()
    # as `semantics export` writes; row keys 0..9: every one an id of the item table
    _export_ones(str(tmp_path / "rows"), {**PROVENANCE, "granularity": "row", "schema": schema.fingerprint()},
                 np.arange(NUM_ITEMS - 2))
    config = ELECConfig(task="gain", vector_dim=DIM, vector_source="entity_table", entity_field="item_id",
                        entity_vectors=str(tmp_path / "rows"))
    task = build_gain_network(config, schema, SMOKE_CONFIGS["deepfm"], device=torch.device("cpu"))
    with pytest.raises(ProvenanceError, match=r"elec entity vectors of 'item_id' in .*rows: per-row vectors "
                                              r"\(granularity 'row', keyed by the row key\), not one per id; export "
                                              r"them with semantics export --granularity entity --entity-field item_id"):
        load_elec_state(task, config, schema.fingerprint())


def _rewrite_chunk_keys(directory: str, index: int, keys) -> None:
    """Replaces chunk ``index``'s rows by ``keys`` (vectors of its first rows), keeping its provenance."""
    import pyarrow.parquet as pq

    from recsys_llm.semantics.vector_export import chunk_path

    path = chunk_path(directory, index)
    table = pq.read_table(path).slice(0, len(keys))
    table = table.set_column(0, table.schema.field(0), pa.array(keys, pa.int64()))
    pq.write_table(table.replace_schema_metadata(pq.read_schema(path).metadata), path)


class TestDamagedEntityExport:
    """Damaged exports used to fill the table silently and train with exit 0."""

    def test_a_repeated_id_is_refused(self, tmp_path):
        out = str(tmp_path / "items")
        write_item_vectors(out)
        ids = np.random.default_rng(0).permutation(NUM_ITEMS)
        repeated = ids[5:10].copy()
        repeated[1] = ids[0]  # an id of chunk 0 again in chunk 1: its vector would be one of the two
        _rewrite_chunk_keys(out, 1, repeated)
        module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=rf"items: key column 'key': keys must be unique, but 1 repeat "
                                             rf"\(first: {ids[0]}\)"):
            load_semantic_vectors(module, "semantic_item_id", out)

    def test_a_chunk_with_fewer_rows_than_the_manifest_is_refused(self, tmp_path):
        out = str(tmp_path / "items")
        write_item_vectors(out)
        ids = np.random.default_rng(0).permutation(NUM_ITEMS)
        _rewrite_chunk_keys(out, 1, ids[5:8])  # 3 of its 5 rows: 2 ids would keep zero vectors
        module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"items/chunk-00001\.parquet: holds 3 rows, but the manifest of .*items "
                                             r"\(num_rows=12, chunk_rows=5\) gives chunk 1 5; the export is damaged"):
            load_semantic_vectors(module, "semantic_item_id", out)


# ---- memory: no rank holds the whole table, nor a second copy of its shards, while loading ----
BIG_ITEMS, BIG_DIM, BIG_CHUNK = 4096, 256, 128  # a 4 MiB table in 32 chunks of 128 KiB


def write_big_item_vectors(directory: str) -> None:
    """Vector of item k: k + j / 2 in column j (exact in float32); ids exported in shuffled order."""
    ids = np.random.default_rng(0).permutation(BIG_ITEMS)
    state = {"next": 0}

    def encode(texts):
        keys = ids[state["next"] : state["next"] + len(texts)]
        state["next"] += len(texts)
        return torch.from_numpy(keys[:, None].astype(np.float32) + np.arange(BIG_DIM, dtype=np.float32) / 2)

    VectorExport(directory, PROVENANCE, VectorExportConfig(chunk_rows=BIG_CHUNK, batch_size=BIG_CHUNK)).run(
        pa.array(ids, pa.int64()), lambda a, b: [""] * (b - a), encode, progress=False)


def big_item_vectors(rows: slice = slice(None), cols: slice = slice(None)) -> torch.Tensor:
    table = np.arange(BIG_ITEMS, dtype=np.float32)[:, None] + np.arange(BIG_DIM, dtype=np.float32) / 2
    return torch.from_numpy(table[rows, cols])


def traced_peak(fn):
    """``fn()``'s result and the peak of the Python and NumPy memory it allocated (tracemalloc), on
    a second call (the first one imports modules)."""
    import tracemalloc

    fn()
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_loading_a_table_holds_one_chunk_at_a_time_not_a_copy_of_the_table(tmp_path):
    """The loader used to read all rows of the table into one (N, d) block before copying it."""
    out = str(tmp_path / "items")
    write_big_item_vectors(out)
    module = SemanticTable({"item_id": BIG_ITEMS}, BIG_DIM, device=torch.device("cpu"))
    weight = module.embedding_bag_collection.embedding_bags["semantic_item_id"].weight

    def load():
        with torch.no_grad():
            weight.fill_(-1.0)
        return load_semantic_vectors(module, "semantic_item_id", out, expected=PROVENANCE)

    filled, peak = traced_peak(load)
    assert filled == BIG_ITEMS
    torch.testing.assert_close(weight.detach(), big_item_vectors(), rtol=0, atol=0)
    table_bytes = BIG_ITEMS * BIG_DIM * 4
    assert peak < table_bytes / 8, f"loading held {peak} bytes, the table is {table_bytes}"


def _load_column_shards(vector_dir: str):
    """One rank: a column-wise sharded SemanticTable, loaded and checked against the export; the
    peak memory the reader allocated while doing each."""
    from torch import nn

    from recsys_llm.modules.elec import check_teacher_vectors
    from recsys_llm.modules.semantic_table import table_weights
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    ctx = init_distributed("cpu")

    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.semantic_table = SemanticTable({"item_id": BIG_ITEMS}, BIG_DIM)
            self.dense = nn.Linear(2, 2)

    model, _ = shard_model(Holder(), ctx.device, ctx.world_size, ShardingConfig(sharding_types=["column_wise"]),
                           OptimizerConfig(), batch_size=8)
    filled, load_peak = traced_peak(lambda: load_semantic_vectors(model, "semantic_item_id", vector_dir, PROVENANCE))
    checked, check_peak = traced_peak(lambda: check_teacher_vectors(model, "item_id", vector_dir))
    (_, weight), = table_weights(model, "semantic_item_id")
    shards = []
    for shard in weight.local_shards():
        row, col = shard.metadata.shard_offsets
        rows, cols = shard.metadata.shard_sizes
        expected = big_item_vectors(slice(row, row + rows), slice(col, col + cols))
        shards.append((row, col, rows, cols, torch.equal(shard.tensor, expected)))
    # a changed row is told apart from the export
    if weight.local_shards():
        weight.local_shards()[0].tensor[7, 3] += 1
    try:
        check_teacher_vectors(model, "item_id", vector_dir)
        refused = False
    except ValueError as error:
        refused = "holds other vectors than the teacher's table" in str(error)
    return {"filled": filled, "checked": checked, "load_peak": load_peak, "check_peak": check_peak,
            "shards": shards, "refused": refused}


@pytest.mark.multiprocess
def test_each_rank_reads_only_the_columns_of_its_shards(tmp_path):
    """Column-wise shards: each rank used to read every row and column of the export into one block."""
    from tests.multiprocess import run_multiprocess

    out = str(tmp_path / "items")
    write_big_item_vectors(out)
    results = run_multiprocess(_load_column_shards, world_size=2, vector_dir=out)
    covered = 0
    for result in results:
        (row, col, rows, cols, equal), = result["shards"]
        assert equal and row == 0 and rows == BIG_ITEMS and result["filled"] == result["checked"] == BIG_ITEMS
        shard_bytes = rows * cols * 4
        assert result["load_peak"] < shard_bytes / 4, result
        assert result["check_peak"] < shard_bytes / 4, result
        assert result["refused"]
        covered += cols
    assert covered == BIG_DIM
    # one rank holding both column shards counts each row once
    (alone,) = run_multiprocess(_load_column_shards, world_size=1, vector_dir=out)
    assert len(alone["shards"]) == 2 and all(equal for *_, equal in alone["shards"])
    assert alone["filled"] == alone["checked"] == BIG_ITEMS


def _weighted_gain_network(table_weighted: bool, device: torch.device, data_type=None):
    """A gain network over a weighted EBC (``is_weighted=True``; its tables of ``data_type``, default FP32) and an
    entity table of ``item_id``."""
    from torch import nn
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType

    from recsys_llm.models.base import CTRBackbone
    from recsys_llm.modules.dense_injection import VectorFieldInjection
    from recsys_llm.modules.semantic_table import SemanticTableTask

    class Concat(CTRBackbone):
        def __init__(self, ebc):
            super().__init__(ebc, 1, num_extra_fields=1)
            self.head = nn.Linear(2 * 8 + 1 + 8, 1)

        @property
        def representation_dim(self) -> int:
            return 2 * 8 + 1 + 8

        def interact(self, dense, pooled, extra_fields):
            by_name = pooled.to_dict()
            hidden = torch.cat([by_name["user_id"], by_name["item_id"], dense, extra_fields.flatten(1)], dim=1)
            return self.head(hidden).squeeze(-1), hidden

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=NUM_ITEMS, feature_names=[f],
                                 data_type=data_type or DataType.FP32) for f in ("user_id", "item_id")]
    with torch.device(device):
        backbone = Concat(EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device("meta")))
        injection = VectorFieldInjection(8, 8)
    table = SemanticTable({"item_id": NUM_ITEMS}, 8, is_weighted=table_weighted)
    return SemanticTableTask(backbone, table, injection)


def _weighted_batch(seed: int):
    from recsys_llm.data.batch import Batch

    g = torch.Generator().manual_seed(seed)
    values = torch.randint(0, NUM_ITEMS, (16,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=values,
                                              lengths=torch.ones(16, dtype=torch.int32),
                                              weights=torch.rand(16, generator=g) * 3)
    return Batch(torch.randn(8, 1, generator=g), kjt, torch.zeros(8), {})


def test_an_entity_table_must_be_weighted_like_the_backbone():
    """A sharded unweighted entity table pools the KJT's weights, an unsharded or served one does not."""
    with pytest.raises(ValueError, match=r"SemanticTableTask: the backbone's EmbeddingBagCollection has "
                                         r"is_weighted=True and the entity table \['item_id'\] is_weighted=False; .*"
                                         r"SemanticTable\(\.\.\., is_weighted=True\)"):
        _weighted_gain_network(table_weighted=False, device=torch.device("cpu"))


def _sharded_weighted_gain_network() -> dict:
    from recsys_llm.serving import materialize_meta, unsharded_state_dict
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    ctx = init_distributed("cpu")
    optim = OptimizerConfig(sparse="row_wise_adagrad")
    model, _ = shard_model(_weighted_gain_network(True, ctx.device), ctx.device, ctx.world_size,
                           ShardingConfig(sharding_types=["table_wise"]), optim, batch_size=8)
    model.eval()
    batch = _weighted_batch(ctx.rank)
    with torch.no_grad():
        _, (_, sharded_logits, _) = model(batch)
    state = unsharded_state_dict(model)
    if ctx.rank != 0:
        return {}
    eager = materialize_meta(_weighted_gain_network(True, torch.device("cpu")), torch.device("cpu"))
    eager.load_state_dict(state)
    with torch.no_grad():
        return {"sharded": sharded_logits, "eager": eager.eval().predict(batch).logits}


@pytest.mark.multiprocess
def test_a_weighted_entity_table_gives_the_same_logits_sharded_and_unsharded():
    from tests.multiprocess import run_multiprocess

    result, _ = run_multiprocess(_sharded_weighted_gain_network, world_size=2)
    torch.testing.assert_close(result["sharded"], result["eager"])


def test_distinct_rows_counts_the_union_of_row_ranges():
    from recsys_llm.modules.semantic_table import distinct_rows

    assert distinct_rows([]) == 0
    assert distinct_rows([(0, 10), (0, 10)]) == 10  # two column shards of the same rows
    assert distinct_rows([(20, 30), (0, 10)]) == 20  # row-wise shards with a gap
    assert distinct_rows([(0, 10), (5, 25), (20, 30), (0, 4)]) == 30


def test_an_unsharded_table_left_on_meta_is_refused_instead_of_giving_vectors_without_values() -> None:
    """Built with the default device (meta, for DMP) and called as it was, it returned a meta tensor."""
    kjt = KeyedJaggedTensor.from_lengths_sync(["item_id"], torch.tensor([1, 2]), torch.ones(2, dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"SemanticTable \['item_id'\]: its tables are on the meta device"):
        SemanticTable({"item_id": NUM_ITEMS}, 8)(kjt)
    assert SemanticTable({"item_id": NUM_ITEMS}, 8, device=torch.device("cpu"))(kjt).shape == (2, 8)


def _sparse_item_vectors(directory: str, ids) -> np.ndarray:
    """An export of the vectors of ``ids`` alone (chunks of 2): the (NUM_ITEMS, DIM) table it stands for,
    zero on the rows of the other ids."""
    table = np.zeros((NUM_ITEMS, DIM), np.float32)
    table[ids] = np.random.default_rng(3).normal(size=(len(ids), DIM)).astype(np.float32)
    VectorExport(directory, PROVENANCE, VectorExportConfig(chunk_rows=2)).run(
        pa.array(ids, pa.int64()), lambda a, b: [str(i) for i in ids[a:b]],
        lambda texts: torch.from_numpy(table[[int(t) for t in texts]]), progress=False)
    return table


def test_rows_without_an_exported_vector_are_zero_not_left_as_initialised(tmp_path):
    """load_semantic_vectors zeroes the rows of ids the export has no vector for: left with their random
    initial values, entities never exported would get a made-up vector."""
    out = str(tmp_path / "items")
    table = _sparse_item_vectors(out, [9, 1, 6])
    module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
    assert load_semantic_vectors(module, "semantic_item_id", out) == NUM_ITEMS
    weight = module.embedding_bag_collection.embedding_bags["semantic_item_id"].weight
    np.testing.assert_allclose(weight.detach().numpy(), table, rtol=1e-6)


def _load_row_shards(vector_dir: str):
    """One rank holding a table in two row-wise shards (rows 0..4 and 5..11), filled with 7 before loading."""
    from torch import nn
    from torch.distributed._shard.sharded_tensor import Shard, ShardMetadata, init_from_local_shards

    from recsys_llm.train.distributed import init_distributed

    init_distributed("cpu")
    shards = [Shard(torch.full((rows, DIM), 7.0), ShardMetadata([row, 0], [rows, DIM], "rank:0/cpu"))
              for row, rows in ((0, 5), (5, NUM_ITEMS - 5))]
    weight = init_from_local_shards(shards, NUM_ITEMS, DIM)

    class Holder(nn.Module):
        def state_dict(self, *args, **kwargs):
            return {"ebc.embedding_bags.semantic_item_id.weight": weight}

    filled = load_semantic_vectors(Holder(), "semantic_item_id", vector_dir)
    shards = [(shard.metadata.shard_offsets[0], shard.tensor.numpy()) for shard in weight.local_shards()]
    return {"filled": filled, "shards": shards}


def test_row_wise_shards_are_filled_with_the_vectors_of_their_own_rows(tmp_path):
    """Each row-wise shard holds the ids from its row offset on: filled from the export's rows at that offset,
    not from row 0 (the column-wise tests hold every shard at row 0)."""
    from tests.multiprocess import run_multiprocess

    out = str(tmp_path / "items")
    table = _sparse_item_vectors(out, [9, 1, 6, 3])
    (result,) = run_multiprocess(_load_row_shards, world_size=1, vector_dir=out)
    assert result["filled"] == NUM_ITEMS and [row for row, _ in result["shards"]] == [0, 5]
    for row, values in result["shards"]:
        np.testing.assert_allclose(values, table[row : row + len(values)], rtol=1e-6)


def test_an_export_wider_than_the_table_is_refused_not_cut_to_its_width(tmp_path):
    """Vectors of 8 columns loaded into a table of 4: refused by their width, not cut to their first 4 columns
    (a column-wise shard reads the columns of its own range: cut vectors would fill every shard silently)."""
    out = str(tmp_path / "wide")
    wide = np.random.default_rng(4).normal(size=(NUM_ITEMS, 8)).astype(np.float32)
    VectorExport(out, PROVENANCE, VectorExportConfig(chunk_rows=5)).run(
        pa.array(np.arange(NUM_ITEMS), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
        lambda texts: torch.from_numpy(wide[[int(t) for t in texts]]), progress=False)
    module = SemanticTable({"item_id": NUM_ITEMS}, 4, device=torch.device("cpu"))
    with pytest.raises(ValueError, match=r"wide/.*: vectors have dim 8, the table expects 4"):
        load_semantic_vectors(module, "semantic_item_id", out)


def test_a_frozen_teachers_row_the_export_has_no_vector_for_must_be_zero(tmp_path):
    """check_teacher_vectors compares the exported rows and also the others: a teacher's table with a vector on
    an id the export holds none for (load_semantic_vectors leaves such rows zero) was trained with another export."""
    from recsys_llm.modules.elec import check_teacher_vectors

    out = str(tmp_path / "items")
    _sparse_item_vectors(out, [9, 1, 6])
    module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
    load_semantic_vectors(module, "semantic_item_id", out)
    assert check_teacher_vectors(module, "item_id", out) == NUM_ITEMS
    with torch.no_grad():
        module.embedding_bag_collection.embedding_bags["semantic_item_id"].weight[4, 0] = 0.5  # id 4: not exported
    with pytest.raises(ValueError, match="holds other vectors than the teacher's table"):
        check_teacher_vectors(module, "item_id", out)


def test_optional_arguments_are_keyword_only_and_misnamed_tables_and_absent_fields_are_named(tmp_path):
    """SemanticTable(entities, d, torch.device("cpu")) was taken as pooling (AttributeError 'value'); a feature name
    given as the table name, or an entity field the KJT lacks, now names what to use."""
    with pytest.raises(TypeError, match="positional"):
        SemanticTable({"item_id": NUM_ITEMS}, DIM, torch.device("cpu"))
    write_item_vectors(str(tmp_path / "items"))
    module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
    with pytest.raises(KeyError, match="its entity tables: \\['semantic_item_id'\\].*is 'semantic_item_id'"):
        load_semantic_vectors(module, "item_id", str(tmp_path / "items"))
    load_semantic_vectors(module, "semantic_item_id", str(tmp_path / "items"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["movie_id"], torch.tensor([1, 2]), torch.tensor([1, 1]))
    with pytest.raises(KeyError, match=r"has no feature \['item_id'\] \(its keys: \['movie_id'\]\)"):
        module(kjt)


def test_another_entity_fields_export_is_refused_where_its_ids_fit(tmp_path):
    """A user_id export loaded into the item table filled it without a word wherever the user ids fit its rows."""
    users = str(tmp_path / "users")
    VectorExport(users, {**PROVENANCE, "entity_field": "user_id"}, VectorExportConfig(chunk_rows=5)).run(
        pa.array(np.arange(3), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
        lambda texts: torch.ones(len(texts), DIM), progress=False)
    module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
    weight = module.embedding_bag_collection.embedding_bags["semantic_item_id"].weight
    before = weight.detach().clone()
    with pytest.raises(ProvenanceError, match="entity_field: stored 'user_id', expected 'item_id'"):
        load_semantic_vectors(module, "semantic_item_id", users)
    assert torch.equal(weight, before)  # nothing copied
    user_table = SemanticTable({"user_id": 3}, DIM, device=torch.device("cpu"))
    assert load_semantic_vectors(user_table, "semantic_user_id", users) == 3



def test_an_entity_exports_own_field_check_keeps_the_callers_expected_provenance(tmp_path):
    """The entity_field check added to ``expected`` must not replace what the caller asked for."""
    items = str(tmp_path / "items")
    _export_ones(items, {**PROVENANCE, "entity_field": "item_id"}, np.arange(NUM_ITEMS))
    module = SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))
    with pytest.raises(ProvenanceError, match="model: stored 'tiny', expected 'other'"):
        load_semantic_vectors(module, "semantic_item_id", items, expected={"model": "other"})
    assert load_semantic_vectors(module, "semantic_item_id", items, expected=PROVENANCE) == NUM_ITEMS


def test_a_misnamed_table_lists_only_the_entity_tables_not_the_backbones(tmp_path):
    """The hint lists the semantic tables beside the backbone's own (t_*), which load_semantic_vectors does not fill."""
    from torchrec.modules.embedding_configs import EmbeddingBagConfig
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    backbone_tables = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name="t_item_id", embedding_dim=4, num_embeddings=NUM_ITEMS, feature_names=["item_id"])],
        device=torch.device("cpu"))
    model = torch.nn.ModuleDict({"ebc": backbone_tables,
                                 "semantic": SemanticTable({"item_id": NUM_ITEMS}, DIM, device=torch.device("cpu"))})
    with pytest.raises(KeyError, match=r"its entity tables: \['semantic_item_id'\]; the table"):
        load_semantic_vectors(model, "item_id", str(tmp_path / "items"))
