import json
import os
import re
import shlex
import shutil

import pytest
import torch
from torch import nn
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.modules.elec import ELECConfig, build_elec_task, build_gain_network, build_student
from recsys_llm.modules.teacher_student import TeacherStudentConfig
from recsys_llm.serving import ServedModel, export_task, load_state_file, sub_state, unsharded_state_dict
from tests.small_artifact import as_exported_before_config_digests, write_config_as_exported

CPU = torch.device("cpu")
SCHEMA = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("item_id", "sparse", 12),
                             FieldSpec("genres", "sequence", 5, max_length=3), FieldSpec("age", "dense")])


def make_batch(batch_size: int, seed: int) -> Batch:
    g = torch.Generator().manual_seed(seed)
    genre_lengths = torch.randint(0, 4, (batch_size,), generator=g)
    values = torch.cat([torch.randint(0, 10, (batch_size,), generator=g), torch.randint(0, 12, (batch_size,), generator=g),
                        torch.randint(0, 5, (int(genre_lengths.sum()),), generator=g)])
    lengths = torch.cat([torch.ones(2 * batch_size, dtype=torch.int64), genre_lengths]).int()
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id", "genres"], values=values, lengths=lengths)
    vector = torch.randn(batch_size, 8, generator=g)
    return Batch(torch.randn(batch_size, 1, generator=g), kjt, (vector[:, 0] > 0).float(), {"llm_vector": vector})


def _trained_pair(model_name: str):
    torch.manual_seed(0)
    task = build_elec_task(ELECConfig(task="distill", vector_dim=8, distill=TeacherStudentConfig(mode="joint", beta=0.5)),
                           SCHEMA, SMOKE_CONFIGS[model_name], device=CPU)
    optimizer = torch.optim.Adam(task.parameters(), lr=0.01)
    for step in range(3):
        loss, _ = task(make_batch(16, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task.eval()


@pytest.mark.parametrize("model_name", ["deepfm", "dcnv2", "dlrm"])
def test_exported_student_reproduces_predictions_and_holds_no_teacher(tmp_path, model_name):
    task = _trained_pair(model_name)
    full = unsharded_state_dict(task)
    student = build_student(SCHEMA, SMOKE_CONFIGS[model_name], device=CPU)
    student.load_state_dict(sub_state(full, "student."))
    out = str(tmp_path / "export")
    example = make_batch(4, 100)
    config = export_task(student, out, example.dense_features, example.sparse_features,
                         metadata={"model": SMOKE_CONFIGS[model_name].to_dict()})
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    assert sorted(os.listdir(out)) == ["INFERENCE.md", "config.json", "dense_program.pt2", "model.safetensors", "tables.json"]

    exported = load_state_file(out)
    assert set(exported) == set(task.student.state_dict())
    assert not any(part in key for key in exported for part in ("teacher", "semantic", "injection", "llm", "kd"))
    student_params = sum(p.numel() for p in task.student.parameters())
    assert config["num_parameters"] == student_params < sum(p.numel() for p in task.parameters())
    assert sum(v.numel() for v in exported.values()) == sum(v.numel() for v in task.student.state_dict().values())
    program = torch.export.load(os.path.join(out, "dense_program.pt2"))
    program_names = set(program.state_dict) | set(getattr(program, "constants", {}))
    assert not any("teacher" in n or "injection" in n for n in program_names)
    assert not any("embedding_bag" in n for n in program_names)  # the tables are served by the eager EBC only

    served = ServedModel.load(out, trust_program=True)
    for seed, size in ((7, 1), (8, 5), (9, 33)):  # batch sizes other than the example's
        batch = make_batch(size, seed)
        with torch.no_grad():
            expected = task.student.predict(batch).logits
        assert torch.equal(served.logits(batch.dense_features, batch.sparse_features), expected)
        torch.testing.assert_close(served.predict(batch.dense_features, batch.sparse_features), torch.sigmoid(expected))
    with open(os.path.join(out, "config.json")) as handle:
        assert json.load(handle)["metadata"]["model"]["name"] == model_name


@pytest.mark.parametrize("model_name, folded", [("fm", ["fie"]), ("deepfm", ["fie"]), ("dcnv2", [])])
def test_exported_llactr_task_serves_the_frozen_fie_term(tmp_path, model_name, folded):
    """FIE is frozen for the export and, on FM-family backbones, folded into their own pairs."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
    from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement
    from recsys_llm.models.task import CTRTask

    torch.manual_seed(0)
    backbone = build_backbone(SMOKE_CONFIGS[model_name], SCHEMA, device=CPU)
    fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.5)  # genres left out
    fre = FieldRepresentationEnhancement(torch.randn(2, 6), ["item_id", "user_id"], SMOKE_CONFIGS[model_name].embedding_dim)
    task = CTRTask(backbone, logit_terms={"fie": fie}, loss_terms={"fre": fre})
    optimizer = torch.optim.Adam(task.parameters(), lr=0.05)
    for step in range(3):
        loss, _ = task(make_batch(16, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    task.eval()
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    before = {key: value.clone() for key, value in task.state_dict().items()}
    config = export_task(task, out, example.dense_features, example.sparse_features)
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    assert config["folded_logit_terms"] == folded
    assert not fie.frozen and getattr(backbone, "folded_pair_weight", None) is None  # the task is as it was
    after = task.state_dict()  # its never-frozen FIE's frozen_pair_weights (zeros) too: a checkpoint is unchanged
    assert sorted(after) == sorted(before) and all(torch.equal(after[key], before[key]) for key in before)
    assert task.loss_terms["fre"] is fre and task.logit_terms["fie"] is fie
    program = torch.export.load(os.path.join(out, "dense_program.pt2"))
    program_names = set(program.state_dict) | set(getattr(program, "constants", {}))
    assert not any("loss_terms" in n for n in program_names)  # FRE (LLM field vectors) is training-only
    assert any("logit_terms.fie" in n for n in program_names) == (not folded)  # a folded FIE is in the backbone
    with torch.no_grad():
        served_weights = fie.pair_weight(fie.pair_similarity)
    state = load_state_file(out)
    assert ("logit_terms.fie.frozen_pair_weights" in state) == (not folded)  # a folded FIE is in the program only
    if not folded:
        torch.testing.assert_close(state["logit_terms.fie.frozen_pair_weights"], served_weights)
    served = ServedModel.load(out, trust_program=True)
    # the pair weights are constants of the program, not rebuilt per request
    targets = {str(node.target) for node in served.dense_program.graph.nodes if node.op == "call_function"}
    assert not any(op in target for target in targets for op in ("triu", "index_put", "ones_like", "addmv")), targets
    assert not _device_pinned(served.dense_program)
    for seed, size in ((7, 1), (8, 33)):
        batch = make_batch(size, seed)
        with torch.no_grad():
            expected = task.predict(batch).logits
            plain = backbone(batch.dense_features, batch.sparse_features).logits
        assert not torch.allclose(expected, plain)  # the FIE term is there
        torch.testing.assert_close(served.logits(batch.dense_features, batch.sparse_features), expected)



FRE_KEYS = {"loss_terms.fre.field_vectors", "loss_terms.fre.projection.weight", "loss_terms.fre.projection.bias"}
FIE_KEYS = {f"logit_terms.fie.{name}" for name in ("pair_rows", "pair_cols", "pair_similarity", "frozen_pair_weights",
                                                   "pair_weight.weight", "pair_weight.bias")}
TABLE_KEYS = {f"model.embedding_bag_collection.embedding_bags.t_{f}.weight" for f in ("user_id", "item_id", "genres")}


def _llactr_task(model_name: str, seed: int = 0, steps: int = 3):
    """A CTRTask of ``model_name`` + FIE (logit term) + FRE (loss term), ``steps`` steps trained, in eval mode."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
    from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement

    torch.manual_seed(seed)
    backbone = build_backbone(SMOKE_CONFIGS[model_name], SCHEMA, device=CPU)
    names = ["item_id", "user_id"]  # genres left out
    fie = FieldInteractionEnhancement(torch.randn(2, 6), names, weight=0.5)
    fre = FieldRepresentationEnhancement(torch.randn(2, 6), names, SMOKE_CONFIGS[model_name].embedding_dim)
    task = CTRTask(backbone, logit_terms={"fie": fie}, loss_terms={"fre": fre})
    optimizer = torch.optim.Adam(task.parameters(), lr=0.05)
    for step in range(steps):
        loss, _ = task(make_batch(16, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return task.eval()


def _as_written_before(out: str, task) -> None:
    """Rewrites the artifact ``out`` of ``task`` as exports wrote it before they left the training-only parts out:
    the whole task's state as served (FIE frozen), with the same export id, its digest recorded again."""
    from safetensors.torch import save_file

    from recsys_llm.file_hash import file_sha256
    from recsys_llm.serving.export import serving_form, state_to_write

    path = os.path.join(out, "model.safetensors")
    with open(os.path.join(out, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    with serving_form(task, config["feature_names"]):
        state = state_to_write(task)
    save_file(state, path, metadata={"export_id": config["export_id"]})
    config["sha256"]["model.safetensors"] = file_sha256(path)
    config["num_state_tensors"] = len(state)
    write_config_as_exported(os.path.join(out, "config.json"), config, indent=2)


@pytest.mark.parametrize("model_name, left_out", [("fm", FRE_KEYS | FIE_KEYS), ("dcnv2", FRE_KEYS)])
def test_the_artifact_holds_no_training_only_tensor(tmp_path, model_name, left_out):
    """model.safetensors held FRE's LLM field vectors and projection, and a folded FIE term's pair-weight network,
    which neither ServedModel (it reads the tables) nor the program reads; a DCNv2's FIE, a logit term of the
    program, stays. An artifact written before, with the whole state, still loads and serves the same logits."""
    task = _llactr_task(model_name)
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    config = export_task(task, out, example.dense_features, example.sparse_features)
    assert config["folded_logit_terms"] == (["fie"] if model_name == "fm" else [])
    state = load_state_file(out)
    assert not left_out & set(state)
    assert set(state) == set(task.state_dict()) - left_out and config["num_state_tensors"] == len(state)
    assert TABLE_KEYS <= set(state) and (FIE_KEYS <= set(state)) == (model_name == "dcnv2")
    served = ServedModel.load(out, trust_program=True)
    batches = [make_batch(size, seed) for seed, size in ((7, 1), (8, 33))]
    logits = [served.logits(batch.dense_features, batch.sparse_features) for batch in batches]
    with torch.no_grad():
        for batch, served_logits in zip(batches, logits):
            expected = task.predict(batch).logits
            if model_name == "fm":  # the folded pairs are added in another order
                torch.testing.assert_close(served_logits, expected)
            else:
                assert torch.equal(served_logits, expected)

    _as_written_before(out, task)
    assert left_out <= set(load_state_file(out))
    before = ServedModel.load(out, trust_program=True)
    for batch, served_logits in zip(batches, logits):
        assert torch.equal(before.logits(batch.dense_features, batch.sparse_features), served_logits)


def test_a_weights_only_artifact_keeps_the_whole_state_for_the_model_code(tmp_path, monkeypatch):
    """Without a dense program the state is served by the model's own code, whose load_state_dict wants every
    tensor: FRE's, and the FIE term's that the model code does not fold, are kept."""
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot capture this")

    task = _llactr_task("fm")
    monkeypatch.setattr(torch.export, "export", refuse)
    example = make_batch(4, 100)
    with pytest.warns(UserWarning, match="could not capture the dense part"):
        config = export_task(task, str(tmp_path / "e"), example.dense_features, example.sparse_features)
    assert config["dense_program"] is None and config["folded_logit_terms"] == []
    state = load_state_file(str(tmp_path / "e"))
    assert FRE_KEYS | FIE_KEYS <= set(state) and set(state) == set(task.state_dict())
    model_code = _llactr_task("fm", seed=1, steps=0)
    model_code.load_state_dict(state)  # strict
    batch = make_batch(9, 3)
    with torch.no_grad():
        assert torch.equal(model_code.predict(batch).logits, task.predict(batch).logits)

def test_export_keeps_a_frozen_fie_as_it_was_and_refuses_a_folded_backbone(tmp_path):
    import torchrec.fx

    from recsys_llm.models.registry import build_backbone
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
    from recsys_llm.models.task import CTRTask

    torch.manual_seed(0)
    backbone = build_backbone(SMOKE_CONFIGS["fm"], SCHEMA, device=CPU)
    fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.5)
    task = CTRTask(backbone, logit_terms={"fie": fie}).eval()
    fie.freeze()
    torch.nn.init.normal_(fie.pair_weight.weight)  # the Linear moves on; the frozen weights stay
    frozen = fie.frozen_pair_weights.clone()
    example = make_batch(4, 100)
    export_task(task, str(tmp_path / "a"), example.dense_features, example.sparse_features)
    assert fie.frozen and fie.serving_pair_matrix is None and backbone.folded_pair_weight is None
    assert torch.equal(fie.frozen_pair_weights, frozen)
    batch = make_batch(9, 3)
    with torch.no_grad():
        served = ServedModel.load(str(tmp_path / "a"), trust_program=True).logits(batch.dense_features, batch.sparse_features)
        torch.testing.assert_close(served, task.predict(batch).logits)  # served with the frozen weights
    torchrec.fx.symbolic_trace(fie)  # still traceable for the training pipeline

    # a serving key order set before the export (the user's own) is set again after it
    fie.set_serving_key_order(["user_id", "item_id"])
    matrix = fie.serving_pair_matrix.clone()
    export_task(task, str(tmp_path / "c"), example.dense_features, example.sparse_features)
    assert fie.serving_key_order == ("user_id", "item_id") and torch.equal(fie.serving_pair_matrix, matrix)

    fie.fold_into(backbone)
    with pytest.raises(ValueError, match="already has pair weights folded in"):
        export_task(task, str(tmp_path / "b"), example.dense_features, example.sparse_features)
    assert not os.path.exists(str(tmp_path / "b"))
    # the folded backbone without its FIE term is refused as well: the message names the one way (it offered this)
    with pytest.raises(ValueError, match=r"undo the fold \(backbone\.fold_pair_weights\(None\)\) and export the task "
                                         "with its FIE term") as refused:
        export_task(CTRTask(backbone), str(tmp_path / "b"), example.dense_features, example.sparse_features)
    assert "folded backbone without" not in str(refused.value) and not os.path.exists(str(tmp_path / "b"))


def test_gain_network_and_pairs_are_refused(tmp_path):
    gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    example = make_batch(4, 0)
    with pytest.raises(ValueError, match="export the student"):
        export_task(gain, str(tmp_path / "x"), example.dense_features, example.sparse_features)
    with pytest.raises(KeyError, match="no state under prefix"):
        sub_state(unsharded_state_dict(gain), "student.")
    assert not os.path.exists(str(tmp_path / "x"))


def test_a_task_holding_teacher_or_llm_parts_is_refused_before_anything_is_written(tmp_path):
    """A student that still holds a teacher's (or an LLM's) modules is no servable task: refused by name, as its
    artifact would carry their weights or need them at inference."""
    example = make_batch(4, 0)
    for part in ("teacher", "llm"):
        task = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
        setattr(task, part, nn.Linear(2, 2))
        with pytest.raises(ValueError, match=rf"export: the task holds teacher/LLM parts \['{part}'\]; export the "
                                             r"student only"):
            export_task(task, str(tmp_path / "x"), example.dense_features, example.sparse_features)
    assert not os.path.exists(str(tmp_path / "x"))


def test_a_feature_feeding_tables_of_several_sizes_takes_ids_the_smallest_holds():
    """A gain network's entity table may hold fewer rows than the backbone's table of the same feature: the
    served id bound is the smaller one, or an id past it would index outside the entity table."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig

    from recsys_llm.serving.export import rows_per_feature

    def tables(rows: int, name: str) -> EmbeddingBagCollection:
        config = EmbeddingBagConfig(name=name, embedding_dim=4, num_embeddings=rows, feature_names=["item_id"])
        return EmbeddingBagCollection(tables=[config], device=torch.device("meta"))

    backbone, entities = tables(12, "t_item"), tables(7, "semantic_item")
    assert rows_per_feature(backbone, entities) == rows_per_feature(entities, backbone) == {"item_id": 7}
    assert rows_per_feature(backbone, None) == {"item_id": 12}


def test_the_student_s_state_is_taken_without_the_teacher_s(tmp_path):
    """The prefix keeps exactly the student's tensors (unsharded here; that the teacher's sharded tables are not
    gathered at all is shown on 2 ranks: test_semantic_table's test_two_ranks_load_own_shards_...)."""
    pair = build_elec_task(ELECConfig(task="distill", vector_dim=8), SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    whole = unsharded_state_dict(pair)
    student = unsharded_state_dict(pair, prefix="student.")
    assert any(not name.startswith("student.") for name in whole)
    assert sorted(student) == sorted(name for name in whole if name.startswith("student."))
    for name, value in student.items():
        torch.testing.assert_close(value, whole[name])


def test_the_gathered_state_s_names_lose_the_dmp_and_ddp_wrappers():
    """A sharded model's keys carry DMP's ``_dmp_wrapped_module.`` and its DDP's ``module.``: the exported state's
    names are the plain task's, which the task built by the model's code loads."""
    from recsys_llm.serving.state import strip_wrappers

    assert strip_wrappers("_dmp_wrapped_module.module.model.over.weight") == "model.over.weight"
    assert strip_wrappers("module.model.over.weight") == "model.over.weight"
    assert strip_wrappers("model.module_x.weight") == "model.module_x.weight"


def test_a_teacher_student_pair_is_refused_naming_its_student(tmp_path):
    pair = build_elec_task(ELECConfig(task="distill", vector_dim=8), SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    example = make_batch(4, 0)
    with pytest.raises(ValueError, match=r"export: TeacherStudentTask is a teacher and a student; export the student "
                                         r"alone, the served part: export_task\(task.student, ...\)"):
        export_task(pair, str(tmp_path / "x"), example.dense_features, example.sparse_features)
    assert not os.path.exists(str(tmp_path / "x"))


@pytest.mark.slow
def test_cli_export_of_a_trained_run(tmp_path):
    """``recsys-llm train`` then ``recsys-llm export`` on tiny synthetic data; the artifact serves."""
    import subprocess
    import sys

    from recsys_llm.data.parquet import ParquetBatchReader
    from recsys_llm.data.schema import DatasetSchema

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    config = os.path.join(root, "configs", "synthetic_deepfm.yaml")
    overrides = [f"data.schema={tmp_path}/data/schema.json", "data.synthetic_rows=2000", f"train.run_dir={tmp_path}/run",
                 "train.epochs=1", "train.progress=false", "data.batch_size=256"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    run = lambda *args: subprocess.run([sys.executable, "-m", "recsys_llm.cli", *args], cwd=root, env=env,
                                       capture_output=True, text=True, timeout=300)
    trained = run("train", "--config", config, *overrides)
    assert trained.returncode == 0, trained.stderr[-3000:]
    # without --config: the run's own config.yaml, overrides included
    exported = run("export", "--checkpoint", f"{tmp_path}/run", "--output", f"{tmp_path}/export")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert re.search(r"\[recsys_llm\] export: loading \S+ on 1 rank\(s\) and gathering the tables into rank 0\n"
                     r"\[recsys_llm\] export: writing \S+/export \([\d.]+[kMG]?B of trained weights, then the dense part "
                     r"traced with torch.export\)", exported.stderr)  # progress of a step that takes minutes at scale
    assert json.loads(exported.stdout)["output"] == f"{tmp_path}/export"  # stdout is the JSON alone (| jq)
    assert "inference example: " in exported.stderr
    evaluated = run("evaluate", "--checkpoint", f"{tmp_path}/run/best", "--split", "valid", "train.progress=true")
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    assert f"[recsys_llm] evaluate: loading {tmp_path}/run/best/ckpt-" in evaluated.stderr  # minutes at scale, said
    assert json.loads(evaluated.stdout[evaluated.stdout.index("{"):])["split"] == "valid"
    bare = shutil.copytree(f"{tmp_path}/run/best", f"{tmp_path}/bare")  # a checkpoint outside its run directory
    refused = run("evaluate", "--checkpoint", os.path.join(bare, next(n for n in os.listdir(bare) if n.startswith("ckpt-"))))
    assert refused.returncode == 2 and "pass the run's config with --config" in refused.stderr
    served = ServedModel.load(f"{tmp_path}/export", trust_program=True)
    schema = DatasetSchema.load(f"{tmp_path}/data/schema.json")
    batch = next(iter(ParquetBatchReader(schema, "test", 64)))
    probabilities = served.predict(batch.dense_features, batch.sparse_features)
    assert probabilities.shape == (64,) and ((probabilities > 0) & (probabilities < 1)).all()
    assert served.feature_names == schema.sparse_feature_names
    # --mixed-precision bf16 reaches the program, and the printed JSON names it
    exported = run("export", "--checkpoint", f"{tmp_path}/run", "--output", f"{tmp_path}/bf16", "--mixed-precision",
                   "bf16")
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert json.loads(exported.stdout)["mixed_precision"] == "bf16"
    bf16 = ServedModel.load(f"{tmp_path}/bf16", trust_program=True)
    assert bf16.mixed_precision == "bf16"
    torch.testing.assert_close(bf16.predict(batch.dense_features, batch.sparse_features), probabilities, rtol=0,
                               atol=0.01)


def test_materialize_meta_keeps_real_tensors_and_non_persistent_buffers():
    """Tables built on meta get storage; DLRM's non-persistent ``triu_indices`` survives (``to_empty`` would empty it)."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.serving import materialize_meta
    from recsys_llm.models.task import CTRTask

    torch.manual_seed(0)
    trained = CTRTask(build_backbone(SMOKE_CONFIGS["dlrm"], SCHEMA, device=CPU, dense_device=CPU)).eval()
    fresh = CTRTask(build_backbone(SMOKE_CONFIGS["dlrm"], SCHEMA, device=torch.device("meta"), dense_device=CPU))
    buffers = {name: b.clone() for name, b in fresh.named_buffers() if b.device.type == "cpu"}
    assert any(name.endswith("triu_indices") for name in buffers)
    materialize_meta(fresh, CPU)
    assert not [name for name, t in [*fresh.named_parameters(), *fresh.named_buffers()] if t.is_meta]
    for name, buffer in fresh.named_buffers():
        if name in buffers:
            assert torch.equal(buffer, buffers[name]), name
    fresh.load_state_dict(trained.state_dict())
    batch = make_batch(16, 0)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval().predict(batch).logits, trained.predict(batch).logits)


def test_materialize_meta_refuses_a_non_persistent_buffer_on_meta():
    """A DLRM built whole under ``torch.device("meta")``: its ``triu_indices`` (no state dict restores it) kept
    uninitialised memory, and the loaded model indexed with it (an IndexError, or wrong logits)."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.serving import materialize_meta
    from recsys_llm.models.task import CTRTask

    with torch.device("meta"):
        fresh = CTRTask(build_backbone(SMOKE_CONFIGS["dlrm"], SCHEMA, device=torch.device("meta")))
    with pytest.raises(ValueError, match=r"materialize_meta: the non-persistent buffer\(s\) "
                                         r"\['model.inter_arch.triu_indices'\] are on the meta device"):
        materialize_meta(fresh, CPU)
    assert all(t.is_meta for t in fresh.parameters())  # refused before anything was allocated


def test_entity_table_gain_network_serves_without_the_llm(tmp_path):
    """A gain network reading user + item vectors from frozen tables exports and reproduces its predictions."""
    from recsys_llm.modules.elec import load_elec_state
    from recsys_llm.semantics.vector_export import VectorExport, VectorExportConfig
    import numpy as np
    import pyarrow as pa

    dirs = {}
    for field, rows in (("user_id", 10), ("item_id", 12)):
        table = np.random.default_rng(rows).normal(size=(rows, 8)).astype(np.float32)
        dirs[field] = str(tmp_path / field)
        VectorExport(dirs[field], {"model": "tiny"}, VectorExportConfig(chunk_rows=4)).run(
            pa.array(np.arange(rows), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
            lambda texts, table=table: torch.from_numpy(table[[int(t) for t in texts]]), progress=False)
    config = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table", entity_tables=dirs)
    torch.manual_seed(0)
    gain = build_gain_network(config, SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
    load_elec_state(gain, config)
    optimizer = torch.optim.Adam([p for p in gain.parameters() if p.requires_grad], lr=0.01)
    for step in range(3):
        loss, _ = gain(make_batch(16, step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    gain.eval()
    example = make_batch(16, 7)
    written = export_task(gain, str(tmp_path / "gain"), example.dense_features, example.sparse_features)
    assert written["semantic_tables"] == "semantic_tables.json" and written["dense_program"]
    program = torch.export.load(str(tmp_path / "gain" / "dense_program.pt2"))
    program_names = set(program.state_dict) | set(getattr(program, "constants", {}))
    assert program_names and not any("embedding_bag" in n for n in program_names)  # no copy of any table
    assert gain.semantic_table.embedding_bag_collection is not None  # the task has its tables back
    served = ServedModel.load(str(tmp_path / "gain"), trust_program=True)
    batch = make_batch(32, 8)
    with torch.no_grad():
        expected = gain.predict(batch).logits
    torch.testing.assert_close(served.logits(batch.dense_features, batch.sparse_features), expected)
    assert "No LLM runs at inference" in (tmp_path / "gain" / "INFERENCE.md").read_text()
    assert not _device_pinned(served.dense_program)


def _device_pinned(program) -> list:
    """The nodes of a served program that demand a tensor's export-time device: torch.export records one for a
    ``.to()`` that was a no-op when traced (FIE's serving matrix, a gain network's vectors), and it refused every
    request of a ServedModel moved with ``.to("cuda")``."""
    return [node.format_node() for node in program.graph.nodes
            if node.op == "call_function" and node.kwargs.get("device") is not None]


def test_the_inference_example_runs_as_written_without_llm_packages(tmp_path):
    """INFERENCE.md's code, copied into a fresh process that cannot import transformers, peft or torchx."""
    import subprocess
    import sys

    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    out = str(tmp_path / 'model "v1"')  # a quote in the path: the example's string literal must hold it
    export_task(student, out, example.dense_features, example.sparse_features, schema=SCHEMA)
    text = open(os.path.join(out, "INFERENCE.md"), encoding="utf-8").read()
    code = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    score_line = re.search(r"`(recsys-llm score [^`]*)`", text).group(1)  # the shell line holds the path as one word
    assert shlex.split(score_line)[:4] == ["recsys-llm", "score", "--artifact", out], score_line
    blocker = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('transformers', 'peft', 'torchx', 'sentence_transformers'):\n"
        "            raise ImportError('not installed on the serving host: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
    )
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=root)
    ran = subprocess.run([sys.executable, "-c", blocker + code], cwd=str(tmp_path), env=env, capture_output=True,
                         text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr[-3000:]
    with torch.no_grad():
        expected = torch.sigmoid(student.predict(Batch(
            torch.zeros(2, 1), KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id", "genres"],
                                                                   values=torch.zeros(6, dtype=torch.int64),
                                                                   lengths=torch.ones(6, dtype=torch.int32)),
            torch.zeros(2), {})).logits)
    printed = [float(v) for v in re.findall(r"[-\d.]+(?:e[-+]?\d+)?", ran.stdout.split("tensor(")[1])]
    torch.testing.assert_close(torch.tensor(printed), expected, atol=1e-4, rtol=0)


def test_the_inference_notes_recipe_without_recsys_llm_gives_what_predict_gives(tmp_path, monkeypatch):
    """INFERENCE.md's way to serve with torch and torchrec alone (an EBC from ``tables.json`` and
    ``model.safetensors``, then the dense program) gives ``predict``'s probabilities: the program's
    output is a logit, which the recipe served as it was."""
    from safetensors.torch import load_file
    from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType
    from torchrec.modules.embedding_modules import EmbeddingBagCollection

    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    export_task(student, out, example.dense_features, example.sparse_features, schema=SCHEMA)
    text = open(os.path.join(out, "INFERENCE.md"), encoding="utf-8").read()
    (recipe,) = [span for span in re.findall(r"`([^`\n]+)`", text) if 'dense_program.pt2").module()' in span]
    with open(os.path.join(out, "tables.json"), encoding="utf-8") as handle:
        tables = json.load(handle)
    ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(
        name=t["name"], num_embeddings=t["num_embeddings"], embedding_dim=t["embedding_dim"],
        feature_names=t["feature_names"], pooling=PoolingType[t["pooling"]]) for t in tables])
    prefix = "model.embedding_bag_collection."
    ebc.load_state_dict({k[len(prefix):]: v for k, v in load_file(os.path.join(out, "model.safetensors")).items()
                         if k.startswith(prefix)})
    batch = make_batch(5, 7)
    monkeypatch.chdir(out)
    with torch.no_grad():
        served = eval(recipe, {"torch": torch}, {"dense": batch.dense_features, "ebc": ebc,
                                                 "kjt": batch.sparse_features})
    expected = ServedModel.load(out, trust_program=True).predict(batch.dense_features, batch.sparse_features)
    torch.testing.assert_close(served, expected)


def _add_guard(program_path: str, guard: str) -> None:
    """Rewrites a .pt2 archive with one more guard in its program's ``guards_code``."""
    import zipfile

    with zipfile.ZipFile(program_path) as archive:
        entries = {info.filename: archive.read(info) for info in archive.infolist()}
    (name,) = [n for n in entries if n.endswith("models/model.json")]
    program = json.loads(entries[name])
    program["guards_code"] = program["guards_code"] + [guard]
    entries[name] = json.dumps(program).encode()
    with zipfile.ZipFile(program_path, "w", zipfile.ZIP_STORED) as archive:
        for entry, data in entries.items():
            archive.writestr(entry, data)
    # a crafted artifact comes with a config.json that matches it: the SHA-256 catches damage, not intent
    from recsys_llm.file_hash import file_sha256

    config_path = os.path.join(os.path.dirname(program_path), "config.json")
    with open(config_path) as handle:
        config = json.load(handle)
    config["sha256"][os.path.basename(program_path)] = file_sha256(program_path)
    write_config_as_exported(config_path, config)


def test_the_dense_program_is_loaded_only_when_trusted(tmp_path):
    """torch.export programs carry code (here a guard that creates a file): never run unasked."""
    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["fm"], device=CPU)
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    export_task(student, out, example.dense_features, example.sparse_features)
    assert student.training  # exported in eval mode, then left as it was
    marker = tmp_path / "code_ran"
    _add_guard(os.path.join(out, "dense_program.pt2"), f"__import__('pathlib').Path({str(marker)!r}).touch() is None")
    with pytest.raises(PermissionError, match=r"dense_program\.pt2 is a torch\.export program.*trust_program=True"):
        ServedModel.load(out)
    assert not marker.exists()
    served = ServedModel.load(out, trust_program=True)  # asked for: the program's code runs
    served.logits(example.dense_features, example.sparse_features)
    assert marker.exists()
    # an inference module as torch users treat one: eval() is accepted (a torch.export module refuses train()),
    # calling it gives its logits, and a model holding it can switch its own mode (train(True) raised)
    assert not served.training and served.eval() is served and not served.training
    torch.testing.assert_close(served(example.dense_features, example.sparse_features),
                               served.logits(example.dense_features, example.sparse_features), rtol=0, atol=0)
    holder = torch.nn.ModuleDict({"served": served, "head": torch.nn.Linear(1, 1)})
    with pytest.warns(UserWarning, match="ServedModel serves a program exported in eval mode and cannot train"):
        holder.train()
    assert holder["head"].training and not served.training


def _sparse_safetensors(path: str, rows: int, cols: int) -> None:
    """A safetensors file of one float32 (rows, cols) tensor of zeros, written as a sparse file:
    its data region is a hole, so the file takes no disk and a reader only pays for what it reads."""
    header = json.dumps({"table": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, rows * cols * 4]}})
    header = header.encode() + b" " * (-len(header) % 8)
    with open(path, "wb") as handle:
        handle.write(len(header).to_bytes(8, "little") + header)
        handle.truncate(8 + len(header) + rows * cols * 4)


def test_a_slice_of_a_safetensors_state_file_reads_only_that_slice(tmp_path):
    """The frozen teacher's loader copies each rank's shards out of a state file: a slice of
    a 4 GiB table must not bring the table into memory (the reading process's own peak RSS,
    VmHWM; ru_maxrss would start from the parent's peak)."""
    import subprocess
    import sys

    if not os.path.exists("/proc/self/status"):
        pytest.skip("reads the peak RSS from Linux's /proc/self/status")
    probe = tmp_path / "probe"
    with open(probe, "wb") as handle:
        handle.truncate(64 << 20)
    if os.stat(probe).st_blocks * 512 > 1 << 20:
        pytest.skip("this file system does not keep sparse files")
    path = str(tmp_path / "big.safetensors")
    try:
        _sparse_safetensors(path, 1 << 20, 1024)
    except OSError as error:
        pytest.skip(f"cannot write a 4 GiB sparse file here: {error}")
    script = (
        "import re, sys\n"
        "from recsys_llm.serving import open_state_file\n"
        "with open_state_file(sys.argv[1]) as state:\n"
        "    table = state['table']\n"
        "    part = table[1000:1064, 8:24]\n"
        "    assert tuple(table.shape) == (1 << 20, 1024) and tuple(part.shape) == (64, 16)\n"
        "    assert not part.any()\n"
        "status = open('/proc/self/status').read()\n"
        "print(int(re.search(r'VmHWM:\\s+(\\d+) kB', status).group(1)))\n"
    )
    done = subprocess.run([sys.executable, "-c", script, path], capture_output=True, text=True, check=True)
    peak_bytes = int(done.stdout.split()[-1]) * 1024
    assert peak_bytes < 1 << 30, f"peak RSS {peak_bytes / 2 ** 30:.2f} GiB: the 4 GiB table was read whole"


def test_served_model_treats_raw_request_ids_as_the_reader_treated_training_ids(tmp_path):
    """Hashed ids are folded, sequences cut to max_length, other ids outside a table refused."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10, hashed=True), FieldSpec("item_id", "sparse", 12),
                                 FieldSpec("genres", "sequence", 5, max_length=3), FieldSpec("age", "dense")])
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=CPU)).eval()
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    config = export_task(task, out, example.dense_features, example.sparse_features, schema=schema)
    assert config["id_rules"] == {"user_id": {"hashed": True, "max_length": 0, "single_id": True},
                                  "item_id": {"hashed": False, "max_length": 0, "single_id": True},
                                  "genres": {"hashed": False, "max_length": 3, "single_id": False}}
    served = ServedModel.load(out, trust_program=True)

    def kjt(users, items, genres):
        return KeyedJaggedTensor.from_lengths_sync(
            keys=["user_id", "item_id", "genres"],
            values=torch.tensor(users + items + [g for bag in genres for g in bag]),
            lengths=torch.tensor([1] * (len(users) + len(items)) + [len(bag) for bag in genres], dtype=torch.int32))

    dense = torch.randn(3, 1)
    raw = kjt([23, -4, 7], [1, 11, 0], [[1, 2, 3, 4], [], [0, 4, 1, 2, 3]])  # as a caller sends them
    as_read = kjt([3, 6, 7], [1, 11, 0], [[1, 2, 3], [], [0, 4, 1]])  # as ParquetBatchReader gives them
    with torch.no_grad():
        expected = task.model(dense, as_read).logits
    assert torch.equal(served.logits(dense, raw), expected)
    with pytest.raises(ValueError, match=r"feature 'item_id', row 2 of the batch: id 12 is outside its table's \[0, 12\)"):
        served.logits(dense, kjt([1, 2, 3], [1, 11, 12], [[], [], []]))
    with pytest.raises(ValueError, match=r"feature 'genres', row 1 of the batch: id -1 is outside"):
        served.logits(dense, kjt([1, 2, 3], [1, 2, 3], [[0], [2, -1], []]))
    with torch.no_grad():  # ids past max_length are cut before they are checked, as the reader does
        expected = task.model(dense, kjt([1, 2, 3], [1, 2, 3], [[0, 1, 2], [], [4]])).logits
    assert torch.equal(served.logits(dense, kjt([1, 2, 3], [1, 2, 3], [[0, 1, 2, 400], [], [4]])), expected)


@pytest.mark.parametrize("item_lengths, row, count", [([1, 0, 1], 1, 0), ([1, 1, 2], 2, 2)])
def test_served_model_takes_one_id_per_row_of_a_sparse_field(tmp_path, item_lengths, row, count):
    """The reader gives every row one id of a sparse field (a null is refused): an empty or a
    longer bag there is refused by name, while a sequence's bags may hold any number; an
    artifact without ``single_id`` in its rules (written before it was recorded) takes any."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask

    schema = DatasetSchema("t", [FieldSpec("item_id", "sparse", 12), FieldSpec("genres", "sequence", 5),
                                 FieldSpec("age", "dense")])
    torch.manual_seed(0)
    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=CPU)).eval()
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    export_task(task, out, example.dense_features, example.sparse_features, schema=schema)
    dense = torch.randn(3, 1)
    genres = [[], [0, 1, 2, 3], [4]]
    request = KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "genres"], values=torch.tensor([5] * sum(item_lengths) + [g for bag in genres for g in bag]),
        lengths=torch.tensor(item_lengths + [len(bag) for bag in genres], dtype=torch.int32))
    served = ServedModel.load(out, trust_program=True)
    served.logits(dense, KeyedJaggedTensor.from_lengths_sync(
        keys=["item_id", "genres"], values=torch.tensor([5, 5, 5] + [g for bag in genres for g in bag]),
        lengths=torch.tensor([1, 1, 1] + [len(bag) for bag in genres], dtype=torch.int32)))
    with pytest.raises(ValueError, match=rf"feature 'item_id', row {row}: {count} ids; expected exactly one"):
        served.logits(dense, request)

    config_path = os.path.join(out, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    for rule in config["id_rules"].values():
        del rule["single_id"]
    write_config_as_exported(config_path, config)
    assert ServedModel.load(out, trust_program=True).logits(dense, request).shape == (3,)


def test_files_of_two_exports_copied_together_are_refused(tmp_path):
    """Two exports of the same model kind share every shape: only the export id tells them apart."""
    import shutil

    example = make_batch(4, 100)
    exports = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU)
        exports.append(str(tmp_path / f"export{seed}"))
        export_task(student, exports[-1], example.dense_features, example.sparse_features)
    for name in ("model.safetensors", "dense_program.pt2"):
        mixed = str(tmp_path / f"mixed_{name}")
        shutil.copytree(exports[0], mixed)
        shutil.copy(os.path.join(exports[1], name), os.path.join(mixed, name))
        with pytest.raises(ValueError, match=rf"mixed_{re.escape(name)}/{re.escape(name)}: written by another export "
                                             r"\(export_id \w+\) than .*config\.json \(\w+\); the artifact mixes"):
            ServedModel.load(mixed, trust_program=True)
    # an artifact from before export ids (config.json without one) loads as before
    config = as_exported_before_config_digests(exports[1])
    del config["export_id"]
    write_config_as_exported(os.path.join(exports[1], "config.json"), config)
    ServedModel.load(exports[1], trust_program=True).logits(example.dense_features, example.sparse_features)



def _dmp_export(directory: str):
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    ctx = init_distributed("cpu")
    model, _ = shard_model(build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=torch.device("meta")), ctx.device, 1,
                           ShardingConfig(), OptimizerConfig())
    example = make_batch(4, 0)
    try:
        export_task(model, directory, example.dense_features, example.sparse_features)
    except ValueError as error:
        return str(error)
    return "exported"


@pytest.mark.multiprocess
def test_export_names_what_it_cannot_export(tmp_path):
    """A sharded model, weights on meta, a batch of 1, a module that is no CTRTask: refused, nothing written."""
    from tests.multiprocess import run_multiprocess

    out = str(tmp_path / "export")
    example = make_batch(4, 0)
    with pytest.raises(ValueError, match=r"the example dense batch must be \(B >= 2, num_dense_features\), got \(1, 1\)"):
        export_task(build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU), out,
                    example.dense_features[:1], make_batch(1, 0).sparse_features)
    with pytest.raises(ValueError, match=r"export: 'model\.embedding_bag_collection\.embedding_bags\.student_user_id\.weight' is on "
                                         r"the meta device"):
        export_task(build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=torch.device("meta")), out,
                    example.dense_features, example.sparse_features)
    with pytest.raises(ValueError, match="expected a CTRTask whose model .* got DeepFM"):
        export_task(build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).model, out,
                    example.dense_features, example.sparse_features)
    (message,) = run_multiprocess(_dmp_export, world_size=1, directory=out)
    assert "pass the unsharded task, not the DistributedModelParallel model" in message
    assert not os.path.exists(out)


def test_a_hugging_face_model_directory_is_not_replaced_as_an_earlier_export(tmp_path):
    """A model directory (the LLM of `semantics encode`) holds config.json and model.safetensors, the files that
    mark an export: `export --output` at it replaced it, deleting its tokenizer files."""
    from safetensors.torch import save_file

    from recsys_llm.cli.export import _write_state

    model_dir = tmp_path / "minilm"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 8}))
    save_file({"embeddings.word_embeddings.weight": torch.zeros(4, 8)}, str(model_dir / "model.safetensors"))
    (model_dir / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    before = sorted(os.listdir(model_dir))
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 0)
    refusal = r"minilm: holds config.json and model.safetensors but is not an earlier export: .*config.json has no " \
              r"'state' and 'dense_program' keys \(a Hugging Face model directory\?\); writing the export there " \
              r"would replace its 3 entries \(config.json, model.safetensors, vocab.txt\)"
    with pytest.raises(FileExistsError, match=refusal):
        export_task(student, str(model_dir), example.dense_features, example.sparse_features)
    with pytest.raises(FileExistsError, match=refusal):  # `export --state-only`
        _write_state(student.state_dict(), str(model_dir), {})
    assert sorted(os.listdir(model_dir)) == before
    assert sorted(os.listdir(tmp_path)) == ["minilm"]
    _write_state(student.state_dict(), str(tmp_path / "state"), {})
    export_task(student, str(tmp_path / "state"), example.dense_features, example.sparse_features)  # an earlier export


def test_an_example_batch_of_another_dense_width_is_refused_and_keeps_the_earlier_export(tmp_path):
    """torch.export failed on it (and on sparse features of another batch size), so the export replaced a working
    artifact with one without a program, blaming torch.export and recording the example's width as the model's;
    sparse features without one of the model's features failed with a bare KeyError."""
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 0)
    out = str(tmp_path / "export")
    export_task(student, out, example.dense_features, example.sparse_features)
    with pytest.raises(ValueError, match=r"export: the example dense batch has 3 column\(s\); DeepFM was built for 1 "
                                         r"dense feature\(s\)"):
        export_task(student, out, torch.randn(4, 3), example.sparse_features)
    with pytest.raises(ValueError, match=r"export: the example sparse features hold 4 row\(s\), the example dense "
                                         r"batch 2; pass the dense and sparse features of one batch"):
        export_task(student, out, example.dense_features[:2], example.sparse_features)
    no_genres = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=example.sparse_features.values()[:8],
                                                    lengths=example.sparse_features.lengths()[:8])
    with pytest.raises(ValueError, match=re.escape("export: the example sparse features lack ['genres']; DeepFM's tables "
                                                   "read ['user_id', 'item_id', 'genres']")):  # was a bare KeyError
        export_task(student, out, example.dense_features, no_genres)
    ServedModel.load(out, trust_program=True).logits(example.dense_features, example.sparse_features)


def test_a_dense_part_torch_export_cannot_capture_warns(tmp_path, monkeypatch):
    """The weights-only artifact it writes is refused by ServedModel with the capture's error and what to load
    instead, not a TypeError from joining the directory with a null program name."""
    def refuse(*args, **kwargs):
        raise RuntimeError("cannot capture this\nsecond line")

    monkeypatch.setattr(torch.export, "export", refuse)
    example = make_batch(4, 0)
    with pytest.warns(UserWarning, match=r"could not capture the dense part \(RuntimeError: cannot capture this\); "
                                         r".* holds the weights and tables but no dense program, so ServedModel "
                                         r"cannot load it: serve it eagerly by loading model\.safetensors"):
        config = export_task(build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU), str(tmp_path / "e"),
                             example.dense_features, example.sparse_features)
    assert config["dense_program"] is None
    # config.json records the whole error (dense_program_error); the refusal quotes its first line, as the warning
    with pytest.raises(ValueError, match=rf"^{re.escape(str(tmp_path / 'e'))}: no dense program was exported "
                                         r"\(RuntimeError: cannot capture this\); load model\.safetensors into the "
                                         r"model code instead$"):
        ServedModel.load(str(tmp_path / "e"), trust_program=True)


def test_a_failed_capture_keeps_an_earlier_servable_export(tmp_path, monkeypatch):
    """A capture that failed replaced a working artifact with one ServedModel cannot load (a warning, exit 0)."""
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 0)
    out = str(tmp_path / "export")
    export_task(student, out, example.dense_features, example.sparse_features)
    before = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)}

    def refuse(*args, **kwargs):
        raise RuntimeError("cannot capture this")

    monkeypatch.setattr(torch.export, "export", refuse)
    with pytest.raises(FileExistsError, match=r"export: torch.export could not capture the dense part \(RuntimeError: "
                                              r"cannot capture this\); .*export holds an earlier export with a dense "
                                              r"program, left as it was"):
        export_task(student, out, example.dense_features, example.sparse_features)
    assert {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["export"]
    ServedModel.load(out, trust_program=True).logits(example.dense_features, example.sparse_features)
    with pytest.warns(UserWarning, match="could not capture the dense part"):  # elsewhere the weights-only artifact
        assert export_task(student, str(tmp_path / "weights"), example.dense_features,
                           example.sparse_features)["dense_program"] is None
    with pytest.warns(UserWarning, match="could not capture the dense part"):  # over a weights-only one: no loss
        export_task(student, str(tmp_path / "weights"), example.dense_features, example.sparse_features)


def test_a_full_disk_writing_the_dense_program_is_an_os_error_not_a_failed_capture(tmp_path, monkeypatch):
    """ENOSPC writing dense_program.pt2 was taken for a failed capture: over an earlier export the error said
    "torch.export could not capture the dense part", elsewhere a warning, and torch's zip writer then aborted the
    process (exit 134) with the temp directory left behind."""
    import builtins
    import errno

    from recsys_llm.serving import export as export_module

    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 0)
    out = str(tmp_path / "export")
    export_task(student, out, example.dense_features, example.sparse_features)
    before = {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)}

    def full_disk_open(path, *args, **kwargs):
        if str(path).endswith("dense_program.pt2"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return builtins.open(path, *args, **kwargs)

    monkeypatch.setattr(export_module, "open", full_disk_open, raising=False)
    for target in (out, str(tmp_path / "fresh")):
        with pytest.raises(OSError) as caught:
            export_task(student, target, example.dense_features, example.sparse_features)
        assert caught.value.errno == errno.ENOSPC
    assert {name: (tmp_path / "export" / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(name for name in os.listdir(tmp_path) if not name.endswith(".lock")) == ["export"]


def test_a_re_export_refuses_a_directory_with_files_an_export_does_not_write(tmp_path):
    """A re-export swapped the directory whole: a user's notes beside the earlier export were deleted."""
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 0)
    out = tmp_path / "export"
    export_task(student, str(out), example.dense_features, example.sparse_features)
    (out / "NOTES.txt").write_text("approved for canary\n")
    with pytest.raises(FileExistsError, match=r"export: an earlier export, but it also holds NOTES.txt, which an "
                                              r"export does not write; the new export replaces the directory whole "
                                              r"and would delete them"):
        export_task(student, str(out), example.dense_features, example.sparse_features)
    assert (out / "NOTES.txt").read_text() == "approved for canary\n"
    (out / "NOTES.txt").unlink()
    export_task(student, str(out), example.dense_features, example.sparse_features)  # an export's own files only


def test_export_writes_the_tables_without_copying_them(tmp_path, monkeypatch):
    """A large model's tables are held once by the task while written, not cloned first (a
    Criteo model of 26 tables of 1M rows took 4.4x its size in RAM to export)."""
    import recsys_llm.serving.export as export_module

    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    written = {}
    real_save = export_module.save_file

    def save_file(state, path, metadata=None):
        written.update(state)
        real_save(state, path, metadata=metadata)

    monkeypatch.setattr(export_module, "save_file", save_file)
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    tables = {k: v for k, v in student.state_dict().items() if "embedding_bags" in k}
    assert tables and all(written[k].data_ptr() == v.data_ptr() for k, v in tables.items())
    exported = load_state_file(str(tmp_path / "export"))
    assert all(torch.equal(exported[k], v) for k, v in student.state_dict().items())


def test_state_to_write_copies_only_a_tensor_sharing_storage(tmp_path):
    from safetensors.torch import load_file, save_file

    from recsys_llm.serving.export import state_to_write

    module = torch.nn.Module()
    module.weight = torch.nn.Parameter(torch.randn(4, 3))
    module.register_buffer("tied", module.weight.detach())  # the same storage: safetensors refuses it as is
    state = state_to_write(module)
    assert state["weight"].data_ptr() == module.weight.data_ptr()
    assert state["tied"].data_ptr() != module.weight.data_ptr() and torch.equal(state["tied"], module.weight)
    save_file(state, str(tmp_path / "m.safetensors"))
    assert torch.equal(load_file(str(tmp_path / "m.safetensors"))["tied"], module.weight.detach())


@pytest.mark.parametrize("data_type", ["FP16", "BF16"])
def test_tables_of_a_half_precision_data_type_serve_as_trained(tmp_path, data_type):
    """torchrec tables may hold FP16 / BF16 weights (``EmbeddingBagConfig.data_type``); the artifact served them
    (the load refused them as a damaged artifact: "not float32, as export writes them")."""
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    from torchrec.modules.embedding_configs import DataType

    from recsys_llm.models.task import CTRTask
    from tests.test_serving_weighted import _Concat

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f],
                                 data_type=DataType[data_type]) for f in ("user_id", "tags")]
    task = CTRTask(_Concat(EmbeddingBagCollection(tables=tables))).eval()
    out = str(tmp_path / "export")

    def request(batch_size: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        lengths = torch.cat([torch.ones(batch_size, dtype=torch.int32), torch.randint(0, 4, (batch_size,), generator=g).int()])
        kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "tags"], torch.randint(0, 10, (int(lengths.sum()),),
                                                                                     generator=g), lengths)
        return torch.randn(batch_size, 1, generator=g), kjt

    config = export_task(task, out, *request(4, 0))
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    served = ServedModel.load(out, trust_program=True)
    assert {p.dtype for p in served.embedding_bag_collection.parameters()} == {load_state_file(out)[
        "model.embedding_bag_collection.embedding_bags.t_tags.weight"].dtype}
    for size, seed in ((1, 1), (5, 2)):
        dense, sparse = request(size, seed)
        with torch.no_grad():
            expected = task.model(dense, sparse).logits
        assert torch.equal(served.logits(dense, sparse), expected)
    with open(os.path.join(out, "tables.json")) as handle:
        assert [t["data_type"] for t in json.load(handle)] == [data_type, data_type]


@pytest.mark.parametrize("model_name", ["fwfm", "finalmlp", "deepfm"])
def test_a_float64_example_dense_batch_exports_the_program_served_in_float32(tmp_path, model_name):
    """numpy's default dtype: the example is converted as requests are (torch.export failed on
    FwFM / FinalMLP, leaving an artifact without its dense program)."""
    student = build_student(SCHEMA, SMOKE_CONFIGS[model_name], device=CPU).eval()
    example = make_batch(4, 100)
    out = str(tmp_path / "export")
    config = export_task(student, out, example.dense_features.double(), example.sparse_features)
    assert config["dense_program"] == "dense_program.pt2", config["dense_program_error"]
    served = ServedModel.load(out, trust_program=True)
    batch = make_batch(5, 8)
    with torch.no_grad():
        expected = student.predict(batch).logits
    assert torch.equal(served.logits(batch.dense_features.double(), batch.sparse_features), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("model_name", ["deepfm", "dcnv2"])
def test_a_served_model_moved_to_cuda_serves_cuda_requests(tmp_path, model_name):
    """usage.md: a model moved with ``served.to("cuda")`` takes CUDA requests; only its id rules were run on a GPU.
    DCNv2 keeps FIE as a matrix of its program (not folded), whose export-time device the program once checked."""
    from recsys_llm.models.registry import build_backbone
    from recsys_llm.models.task import CTRTask
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

    torch.manual_seed(0)
    fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.5)
    task = CTRTask(build_backbone(SMOKE_CONFIGS[model_name], SCHEMA, device=CPU), logit_terms={"fie": fie}).eval()
    fie.freeze()
    example = make_batch(4, 100)
    export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features, schema=SCHEMA)
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    batch = make_batch(9, 3)
    expected = served.logits(batch.dense_features, batch.sparse_features)
    served.to("cuda")
    got = served.logits(batch.dense_features.cuda(), batch.sparse_features.to("cuda"))
    assert got.device.type == "cuda"
    torch.testing.assert_close(got.cpu(), expected, rtol=1e-4, atol=1e-5)


def test_the_inference_notes_promise_id_rules_only_where_the_export_recorded_them(tmp_path):
    """An export given no schema records no id rules (``id_rules: null``): its INFERENCE.md said hashed ids are
    folded and sequences cut, which that ServedModel does not do; ids outside their tables are still refused."""
    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "rules"), example.dense_features, example.sparse_features, schema=SCHEMA)
    export_task(student, str(tmp_path / "none"), example.dense_features, example.sparse_features)
    with_rules = (tmp_path / "rules" / "INFERENCE.md").read_text()
    without = (tmp_path / "none" / "INFERENCE.md").read_text()
    assert "Ids go through the training reader's rules first" in with_rules and "recorded no id rules" not in with_rules
    assert "recorded no id rules" in without and "rules first" not in without
    served = ServedModel.load(str(tmp_path / "none"), trust_program=True)
    batch = make_batch(2, 1)
    out_of_range = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "genres"], values=torch.tensor([1, 2, 3, 12, 0]),
        lengths=torch.tensor([1, 1, 1, 1, 1, 0], dtype=torch.int32))
    with pytest.raises(ValueError, match="item_id"):
        served.logits(batch.dense_features, out_of_range)


def test_a_request_on_another_device_than_the_model_is_named(tmp_path):
    """It failed deep in torchrec or the program, naming neither device."""
    torch.manual_seed(0)
    student = build_student(SCHEMA, SMOKE_CONFIGS["deepfm"], device=CPU).eval()
    example = make_batch(4, 100)
    export_task(student, str(tmp_path / "export"), example.dense_features, example.sparse_features, schema=SCHEMA)
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    batch = make_batch(2, 1)
    with pytest.raises(ValueError, match=r"sparse features: on meta, the model on cpu; move the request \(.to\('cpu'\)\)"):
        served.logits(batch.dense_features, batch.sparse_features.to("meta"))
    with pytest.raises(ValueError, match=r"dense features: on meta, the model on cpu"):
        served.logits(batch.dense_features.to("meta"), batch.sparse_features)
    assert served.logits(batch.dense_features, batch.sparse_features).shape == (2,)


def test_a_served_fie_term_loads_without_a_shared_storage_warning(tmp_path):
    """FIE's pair indices were two views of one tensor, which torch.export.load of an artifact with an unfolded FIE
    (DCNv2) warned of: "No complete tensor found in the group! ... may cause issues when your weights are not on
    CPU"."""
    import warnings

    task = _llactr_task("dcnv2")
    fie = task.logit_terms["fie"]
    assert fie.pair_rows.untyped_storage().data_ptr() != fie.pair_cols.untyped_storage().data_ptr()
    example = make_batch(4, 100)
    export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ServedModel.load(str(tmp_path / "export"), trust_program=True)
    assert not [w for w in caught if "complete tensor" in str(w.message)], [str(w.message) for w in caught]


def test_trust_program_and_gather_options_are_checked(tmp_path):
    """ServedModel.load(dir, "false") loaded the program ("false" is truthy); unsharded_state_dict(model, "student.")
    took the prefix as the rank dst and returned an empty dict."""
    with pytest.raises(TypeError, match="ServedModel.load: trust_program must be True or False, got 'false'"):
        ServedModel.load(str(tmp_path), "false")
    model = nn.Sequential(nn.Linear(2, 2))
    with pytest.raises(TypeError, match="positional"):
        unsharded_state_dict(model, "0.")
    with pytest.raises(ValueError, match="unsharded_state_dict: dst must be a rank"):
        unsharded_state_dict(model, dst="0.")
    assert sorted(unsharded_state_dict(model, prefix="0.")) == ["0.bias", "0.weight"]


def test_unsharded_state_dict_refuses_a_bool_or_negative_dst_and_a_prefix_that_is_no_string():
    """True is no rank, -1 none of the ranks (every rank returned an empty dict); a tuple prefix is no name's start."""
    model = nn.Sequential(nn.Linear(2, 2))
    for bad in (True, -1):
        with pytest.raises(ValueError, match="unsharded_state_dict: dst must be a rank"):
            unsharded_state_dict(model, dst=bad)
    with pytest.raises(TypeError, match="unsharded_state_dict: prefix must be a string"):
        unsharded_state_dict(model, prefix=("0.",))
    assert sorted(unsharded_state_dict(model, dst=0)) == ["0.bias", "0.weight"]


_EXPORT_FREES_THE_SHARDED_MODEL = r"""
import gc, sys

import recsys_llm.serving as serving
from recsys_llm.cli import main
from torchrec.distributed.embeddingbag import ShardedEmbeddingBagCollection

work = sys.argv[1]
assert main(["train", "--config", "recsys_llm/configs/synthetic_deepfm.yaml", f"data.schema={work}/data/schema.json",
             "data.synthetic_rows=600", f"train.run_dir={work}/run", "train.epochs=1", "train.progress=false",
             "data.batch_size=256"]) == 0
left = []
materialize = serving.materialize_meta
serving.materialize_meta = lambda *a, **k: left.append(
    sum(isinstance(o, ShardedEmbeddingBagCollection) for o in gc.get_objects())) or materialize(*a, **k)
gc.collect()  # the training job's leftovers
gc.disable()  # no collection happens to free the export's sharded model: the export must (one of 10^7 rows was not)
assert main(["export", "--checkpoint", f"{work}/run", "--output", f"{work}/export"]) == 0
print("SHARDED TABLES LEFT", left)
"""


def test_export_frees_the_sharded_model_once_its_tables_are_gathered(tmp_path):
    """The loaded sharded model is gone before the served task takes the gathered tables: reference cycles kept its
    sharded tables until the process ended, 2x the tables' memory while the artifact was written (a 10^7 x 4 table:
    869 MB held, 678 MB after)."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    done = subprocess.run([sys.executable, "-c", _EXPORT_FREES_THE_SHARDED_MODEL, str(tmp_path)], cwd=root,
                          env=dict(os.environ, OMP_NUM_THREADS="1"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "SHARDED TABLES LEFT [0]" in done.stdout, done.stdout[-2000:]
