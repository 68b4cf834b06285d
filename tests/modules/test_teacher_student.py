import dataclasses
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchrec
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import SMOKE_CONFIGS
from recsys_llm.modules.elec import ELECConfig, ELECDistillConfig, build_elec_task, build_gain_network, load_elec_state
from recsys_llm.modules.teacher_columns import attach_columns, write_teacher_columns
from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask, labeled_bce, load_full_state

CPU = torch.device("cpu")
SCHEMA = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("item_id", "sparse", 12),
                             FieldSpec("age", "dense")])
MODEL = SMOKE_CONFIGS["deepfm"]


def make_batch(batch_size: int = 16, seed: int = 0, vector_dim: int = 8) -> Batch:
    g = torch.Generator().manual_seed(seed)
    users = torch.randint(0, 10, (batch_size,), generator=g)
    items = torch.randint(0, 12, (batch_size,), generator=g)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=["user_id", "item_id"], values=torch.cat([users, items]),
                                              lengths=torch.ones(2 * batch_size, dtype=torch.int32))
    vector = torch.randn(batch_size, vector_dim, generator=g)
    labels = (vector[:, 0] > 0).float()  # clicks follow the LLM vector
    return Batch(torch.randn(batch_size, 1, generator=g), kjt, labels,
                 {"llm_vector": vector, "row_id": torch.arange(batch_size) + 1000 * seed})


def _elec(mode: str, **kwargs) -> TeacherStudentTask:
    torch.manual_seed(0)
    distill = TeacherStudentConfig(**{"mode": mode, "alpha": 1.0, "beta": 0.5, "temperature": 2.0, **kwargs})
    checkpoint = kwargs.pop("checkpoint", None)
    return build_elec_task(ELECConfig(task="distill", vector_dim=8, distill=distill, teacher_checkpoint=checkpoint),
                           SCHEMA, MODEL, device=CPU)


def _train(task, steps: int = 5):
    params = [p for p in task.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=0.01)
    for step in range(steps):
        loss, (detached, logits, labels) = task(make_batch(seed=step))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return loss, detached, logits, labels


def _exported_item_table_gain(tmp_path, with_elec: bool) -> str:
    """``export --state-only`` of a gain network on an item entity table, as a directory; its config.json records
    the model settings, and the elec settings when ``with_elec`` (exports before 2026-12-05 did not)."""
    import json

    from safetensors.torch import save_file

    from recsys_llm.modules.elec import gain_shape_settings

    entity = ELECConfig(task="gain", vector_dim=8, vector_source="entity_table", entity_field="item_id",
                        entity_vectors="unused")
    gain = build_gain_network(entity, SCHEMA, MODEL, device=CPU)
    export = tmp_path / "gain_on_items"
    export.mkdir()
    save_file({k: v.contiguous() for k, v in gain.state_dict().items()}, str(export / "model.safetensors"))
    metadata = {"model": MODEL.to_dict(), **({"elec": gain_shape_settings(entity)} if with_elec else {})}
    (export / "config.json").write_text(json.dumps({"metadata": metadata}), encoding="utf-8")
    return str(export)

class TestTeacherStudentTask:
    def test_joint_trains_both_and_kd_does_not_touch_teacher(self):
        task = _elec("joint")
        batch = make_batch()
        loss, (detached, logits, labels) = task(batch)
        assert logits.shape == (16,) and torch.equal(labels, batch.labels) and not detached.requires_grad
        loss.backward()
        assert all(p.grad is not None for p in task.teacher.parameters() if p.requires_grad)
        assert all(p.grad is not None for p in task.student.parameters())
        # the KD terms alone send no gradient into the teacher
        task.zero_grad()
        t_out = task.teacher.predict(batch)
        s_out = task.student.predict(batch)
        (task.score_kd(s_out.logits, t_out.logits) + task.repr_kd(s_out.representation, t_out.representation)).backward()
        assert all(p.grad is None or not p.grad.any() for p in task.teacher.parameters())

    def test_loss_is_sum_of_terms(self):
        task = _elec("joint", alpha=0.7, teacher_loss_weight=0.25)  # alpha 0.7, beta 0.5, gamma 0.25: each shows
        batch = make_batch()
        loss, _ = task(batch)
        t_out, s_out = task.teacher.predict(batch), task.student.predict(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        expected = (bce(s_out.logits, batch.labels) + 0.7 * task.score_kd(s_out.logits, t_out.logits)
                    + 0.5 * task.repr_kd(s_out.representation, t_out.representation)
                    + 0.25 * bce(t_out.logits, batch.labels))
        torch.testing.assert_close(loss, expected)

    def test_loss_holds_each_networks_own_loss_terms(self):
        """The student's loss_terms (e.g. FRE) always, the teacher's in joint mode times gamma, each on its own
        output."""
        from recsys_llm.modules.field_semantics import FieldRepresentationEnhancement

        task = _elec("joint", teacher_loss_weight=0.25)
        names = ["user_id", "item_id"]
        for network, weight in ((task.student, 0.3), (task.teacher, 0.7)):
            network.loss_terms["fre"] = FieldRepresentationEnhancement(
                torch.randn(2, 5), names, network.model.embedding_dim, weight)
        batch = make_batch()
        loss, _ = task(batch)
        t_out, s_out = task.teacher.predict(batch), task.student.predict(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits

        def fre(network, output):  # the FRE term written out: KL summed over fields, mean over the batch
            term, kl = network.loss_terms["fre"], 0.0
            for f, name in enumerate(names):
                p = torch.softmax(term.projection(term.field_vectors[f]), dim=-1)
                kl = kl + (p * (p.log() - torch.log_softmax(output.embeddings[name], dim=-1))).sum(-1).mean()
            return kl

        expected = (bce(s_out.logits, batch.labels) + 0.3 * fre(task.student, s_out)
                    + 1.0 * task.score_kd(s_out.logits, t_out.logits)
                    + 0.5 * task.repr_kd(s_out.representation, t_out.representation)
                    + 0.25 * (bce(t_out.logits, batch.labels) + 0.7 * fre(task.teacher, t_out)))
        torch.testing.assert_close(loss, expected)

    def test_frozen_teacher_unchanged_and_has_no_trainable_params(self, tmp_path):
        gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, MODEL, device=CPU)
        export = str(tmp_path / "gain_state.safetensors")
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in gain.state_dict().items()}, export)
        task = build_elec_task(ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=export,
                                          distill=TeacherStudentConfig(mode="frozen", beta=0.5)), SCHEMA, MODEL, device=CPU)
        assert load_elec_state(task, ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=export,
                                                distill=TeacherStudentConfig(mode="frozen")))["teacher_tensors"] > 0
        tables = [m for m in task.teacher.modules() if isinstance(m, torchrec.EmbeddingBagCollection)]
        table_params = {id(p) for m in tables for p in m.parameters()}
        assert not any(p.requires_grad for p in task.teacher.parameters() if id(p) not in table_params)
        assert all(getattr(m, "frozen", False) for m in task.teacher.modules()
                   if isinstance(m, torchrec.EmbeddingBagCollection))
        before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
        for k, v in gain.state_dict().items():
            torch.testing.assert_close(before[k], v)
        task.train()
        assert not task.teacher.training
        _train(task)
        for k, v in task.teacher.state_dict().items():
            assert torch.equal(v, before[k]), k

    def test_an_offline_students_task_gives_no_teacher_and_says_which_run_does(self):
        """teacher_of is what teacher-outputs runs: an offline student holds no teacher (its run is refused before
        loading; this is the library caller's refusal), and the message says what it is and what to take instead."""
        from recsys_llm.train.teacher_outputs import teacher_of

        with pytest.raises(ValueError, match=r"^an offline student's task \(elec\.distill\.mode=offline\), which "
                                             r"holds no teacher to run; take the run of its teacher$"):
            teacher_of(_elec("offline", teacher_representation_dim=8))
        joint = _elec("joint")
        assert teacher_of(joint) is joint.teacher

    def test_a_joint_runs_teacher_is_a_frozen_teacher(self, tmp_path):
        """A distillation run's whole state (``export --state-only`` of a joint run: teacher.*, student.*, repr_kd.*)
        gives its teacher, as ``teacher-outputs`` takes it for an offline student; it was refused, naming model
        settings that were not the cause."""
        from safetensors.torch import save_file

        joint = _elec("joint")
        _train(joint, steps=2)
        export = tmp_path / "joint_state"
        export.mkdir()
        save_file({k: v.contiguous() for k, v in joint.state_dict().items()}, str(export / "model.safetensors"))
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=str(export),
                            distill=TeacherStudentConfig(mode="frozen"))
        frozen = build_elec_task(config, SCHEMA, MODEL, device=CPU)
        assert load_elec_state(frozen, config)["teacher_tensors"] == len(joint.teacher.state_dict())
        for key, value in joint.teacher.state_dict().items():
            assert torch.equal(frozen.teacher.state_dict()[key], value), key

    def test_a_frozen_teacher_builds_no_autograd_graph(self):
        """Its outputs enter the loss detached, so a graph through it would only cost memory and time."""
        task = build_elec_task(ELECConfig(task="distill", vector_dim=8, teacher_checkpoint="unused",
                                          distill=TeacherStudentConfig(mode="frozen", beta=0.5)), SCHEMA, MODEL,
                               device=CPU)
        grad_enabled = []
        task.teacher.model.register_forward_hook(lambda module, inputs, output: grad_enabled.append(
            (torch.is_grad_enabled(), output.logits.requires_grad)))
        loss, _ = task(make_batch())
        assert grad_enabled == [(False, False)] and loss.requires_grad

    def test_a_frozen_teacher_from_a_run_or_another_model_says_what_to_pass(self, tmp_path):
        import json

        from safetensors.torch import save_file

        frozen = TeacherStudentConfig(mode="frozen")
        run = tmp_path / "gain_run"
        (run / "best").mkdir(parents=True)
        with pytest.raises(FileNotFoundError, match=r"gain_run: a training run or checkpoint, not an exported state; .*"
                                                    r"recsys-llm export --checkpoint .*gain_run --output DIR --state-only"):
            load_elec_state(_elec("joint"), ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=str(run),
                                                       distill=frozen))
        export = tmp_path / "fm_gain"  # a gain network of another backbone, exported with --state-only
        export.mkdir()
        fm_gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, SMOKE_CONFIGS["fm"], device=CPU)
        save_file({k: v.contiguous() for k, v in fm_gain.state_dict().items()}, str(export / "model.safetensors"))
        (export / "config.json").write_text(json.dumps({"metadata": {"model": {"name": "fm"}}}), encoding="utf-8")
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=str(export), distill=frozen)
        with pytest.raises(KeyError, match=r"no tensor .*; the state was exported from a 'fm' model \(config.json "
                                           r"metadata.model.name\): build the teacher with the same model settings"):
            load_elec_state(build_elec_task(config, SCHEMA, MODEL, device=CPU), config)
        file_config = dataclasses.replace(config, teacher_checkpoint=str(export / "model.safetensors"))
        with pytest.raises(KeyError, match=r"exported from a 'fm' model"):  # the state file named itself
            load_elec_state(build_elec_task(file_config, SCHEMA, MODEL, device=CPU), file_config)

    def test_a_frozen_teacher_of_other_elec_settings_is_refused_not_loaded(self, tmp_path):
        """A gain network on an item entity table has the same tensors as one reading per-row vectors, plus its
        table: loaded into the latter, the table was dropped and the teacher scored other vectors than it learnt."""
        export = _exported_item_table_gain(tmp_path, with_elec=False)
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=export,
                            distill=TeacherStudentConfig(mode="frozen"))  # per-row vectors
        task = build_elec_task(config, SCHEMA, MODEL, device=CPU)
        before = {k: v.clone() for k, v in task.teacher.state_dict().items()}
        with pytest.raises(ValueError, match=r"holds 1 tensors the model has no place for under 'teacher.': "
                                             r"\['semantic_table.*semantic_item_id.weight'\]; the model settings match "
                                             r"the state's, so build the teacher with the gain run's settings: .*"
                                             r"elec.vector_source"):
            load_elec_state(task, config, model_config=MODEL)
        for k, v in task.teacher.state_dict().items():  # refused before anything was copied
            assert torch.equal(v, before[k]), k

    def test_a_frozen_teacher_of_other_recorded_elec_settings_names_them(self, tmp_path):
        """export --state-only records the elec settings that shape the gain network (metadata.elec): the refusal
        names the ones that differ instead of listing every setting to compare."""
        export = _exported_item_table_gain(tmp_path, with_elec=True)
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=export,
                            distill=TeacherStudentConfig(mode="frozen"))
        with pytest.raises(ValueError, match=r"the state was exported from a gain network of other elec settings "
                                             r"\(config.json metadata.elec\): elec.vector_source 'entity_table' \(here "
                                             r"'extras'\), the fields of elec.entity_tables / elec.entity_field "
                                             r"\['item_id'\] \(here \[\]\); build the teacher with the same settings$"):
            load_elec_state(build_elec_task(config, SCHEMA, MODEL, device=CPU), config, model_config=MODEL)

    def test_a_frozen_teacher_with_nan_weights_gets_no_settings_hint(self, tmp_path):
        """NaN in the teacher's state is no mismatch of settings: the refusal says so alone."""
        import json

        from safetensors.torch import save_file

        gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, MODEL, device=CPU)
        state = {k: v.contiguous().clone() for k, v in gain.state_dict().items()}
        key = next(k for k in state if state[k].is_floating_point() and state[k].numel())
        state[key].view(-1)[0] = float("nan")
        export = tmp_path / "nan_gain"
        export.mkdir()
        save_file(state, str(export / "model.safetensors"))
        (export / "config.json").write_text(json.dumps({"metadata": {"model": MODEL.to_dict()}}), encoding="utf-8")
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=str(export),
                            distill=TeacherStudentConfig(mode="frozen"))
        with pytest.raises(ValueError, match="non-finite value") as caught:
            load_elec_state(build_elec_task(config, SCHEMA, MODEL, device=CPU), config, model_config=MODEL)
        assert "build the teacher" not in str(caught.value)

    def test_a_frozen_teacher_of_other_model_settings_or_schema_names_them(self, tmp_path):
        import json

        from safetensors.torch import save_file

        wide = dataclasses.replace(MODEL, embedding_dim=MODEL.embedding_dim * 2)
        gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, wide, device=CPU)
        export = tmp_path / "wide_gain"
        export.mkdir()
        save_file({k: v.contiguous() for k, v in gain.state_dict().items()}, str(export / "model.safetensors"))
        recorded = wide
        (export / "config.json").write_text(json.dumps({"metadata": {"model": recorded.to_dict(),
                                                                     "schema_fingerprint": "0123abcd"}}),
                                            encoding="utf-8")
        config = ELECConfig(task="distill", vector_dim=8, teacher_checkpoint=str(export),
                            distill=TeacherStudentConfig(mode="frozen"))
        task = build_elec_task(config, SCHEMA, MODEL, device=CPU)
        with pytest.raises(ValueError, match=rf"has shape .*; the state was exported from a model with other settings "
                                             rf"\(config.json metadata.model\): model.embedding_dim={2 * MODEL.embedding_dim} "
                                             rf"\(here {MODEL.embedding_dim}\); .*; the teacher was trained on another "
                                             rf"schema \(config.json metadata.schema_fingerprint 0123abcd, this data "
                                             rf"set's is {SCHEMA.fingerprint()}\)"):
            load_elec_state(task, config, SCHEMA.fingerprint(), model_config=MODEL)
        with pytest.raises(ValueError) as caught:
            load_elec_state(task, config, SCHEMA.fingerprint(), model_config=MODEL)
        assert "dropout" not in str(caught.value)
        # dropout 0 builds torchrec's MLP, > 0 Perceptron + Dropout layers (other keys): named; 0.25 vs 0.5 is not
        for teacher_dropout, here, named in ((0.25, 0.0, True), (0.5, 0.25, False)):
            (export / "config.json").write_text(json.dumps(
                {"metadata": {"model": dataclasses.replace(wide, dropout=teacher_dropout).to_dict()}}), encoding="utf-8")
            with pytest.raises(ValueError) as caught:
                load_elec_state(task, config, model_config=dataclasses.replace(MODEL, dropout=here))
            assert (f"model.dropout={teacher_dropout} (here {here})" in str(caught.value)) == named

    def test_offline_reads_extras_and_matches_frozen(self):
        frozen = _elec("joint")
        batch = make_batch()
        with torch.no_grad():
            t_out = frozen.teacher.predict(batch)
        offline = TeacherStudentTask(None, frozen.student, TeacherStudentConfig(
            mode="offline", alpha=1.0, beta=0.5, temperature=2.0,
            teacher_representation_dim=int(frozen.teacher.model.representation_dim)))
        offline.repr_kd.load_state_dict(frozen.repr_kd.state_dict())
        extras = dict(batch.extras, teacher_logits=t_out.logits, teacher_representation=t_out.representation)
        loss_offline, _ = offline(Batch(batch.dense_features, batch.sparse_features, batch.labels, extras))
        frozen_cfg = TeacherStudentConfig(mode="frozen", alpha=1.0, beta=0.5, temperature=2.0)
        as_frozen = TeacherStudentTask(frozen.teacher, frozen.student, frozen_cfg)
        as_frozen.repr_kd.load_state_dict(frozen.repr_kd.state_dict())
        loss_frozen, _ = as_frozen(batch)
        torch.testing.assert_close(loss_offline, loss_frozen)
        without_representation = dict(batch.extras, teacher_logits=t_out.logits)
        with pytest.raises(KeyError, match="no extra 'teacher_representation' for offline representation distillation"):
            offline(Batch(batch.dense_features, batch.sparse_features, batch.labels, without_representation))
        with pytest.raises(KeyError, match="no extra 'teacher_logits' for offline distillation"):
            offline(batch)
        with pytest.raises(ValueError, match="teacher=None"):
            TeacherStudentTask(frozen.teacher, frozen.student, TeacherStudentConfig(mode="offline"))
        with pytest.raises(ValueError, match="teacher_representation_dim"):
            TeacherStudentTask(None, frozen.student, TeacherStudentConfig(mode="offline", beta=1.0))

    def test_score_kd_moves_student_towards_teacher(self):
        user_score = torch.linspace(-3, 3, 10)  # an offline teacher's logits: a function of the user

        def with_teacher(batch):
            users = batch.sparse_features["user_id"].values()
            extras = dict(batch.extras, teacher_logits=user_score[users])
            return Batch(batch.dense_features, batch.sparse_features, batch.labels, extras)

        gaps = {}
        for alpha in (0.0, 5.0):
            torch.manual_seed(0)
            task = build_elec_task(ELECConfig(task="distill", vector_dim=8, distill=TeacherStudentConfig(
                mode="offline", alpha=alpha, beta=0.0)), SCHEMA, MODEL, device=CPU)
            optimizer = torch.optim.Adam(task.parameters(), lr=0.02)
            for step in range(40):
                loss, _ = task(with_teacher(make_batch(seed=step)))
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
            batch = with_teacher(make_batch(64, seed=999))
            with torch.no_grad():
                gaps[alpha] = float((task.student.predict(batch).logits - batch.extras["teacher_logits"]).abs().mean())
        assert gaps[5.0] < 0.7 * gaps[0.0], gaps

    def test_unlabeled_rows_take_kd_but_no_bce(self):
        task = _elec("joint")
        batch = make_batch()
        weight = (torch.arange(16) < 10).float()  # rows 10.. carry no label

        def loss_with(labels):
            extras = dict(batch.extras, label_weight=weight)
            return task(Batch(batch.dense_features, batch.sparse_features, labels, extras))

        loss, (_, logits, _) = loss_with(batch.labels)
        assert logits.shape == (16,)  # training: no mask (no host sync)
        flipped = batch.labels.clone()
        flipped[10:] = 1 - flipped[10:]
        torch.testing.assert_close(loss_with(flipped)[0], loss)  # labels of unlabeled rows are ignored
        task.eval()
        _, (_, eval_logits, labels) = loss_with(batch.labels)
        task.train()
        assert eval_logits.shape == (10,) and torch.equal(labels, batch.labels[:10])  # metrics: labeled rows only
        t_out, s_out = task.teacher.predict(batch), task.student.predict(batch)
        bce = torch.nn.functional.binary_cross_entropy_with_logits
        expected = (bce(s_out.logits[:10], batch.labels[:10]) + bce(t_out.logits[:10], batch.labels[:10])
                    + 1.0 * task.score_kd(s_out.logits, t_out.logits)  # KD over all 16 rows
                    + 0.5 * task.repr_kd(s_out.representation, t_out.representation))
        torch.testing.assert_close(loss, expected)

    def test_labeled_bce_weighs_rows_and_is_zero_without_a_labeled_row(self):
        """Mean BCE weighted by label_weight; a batch of label-free rows only (all weights 0) adds 0 with zero
        gradients, not 0 / 0 = NaN (which would reach every parameter through the shared loss)."""
        batch = make_batch(4)
        logits = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
        weight = torch.tensor([1.0, 0.5, 0.0, 2.0])
        bce = torch.nn.functional.binary_cross_entropy_with_logits(logits.detach(), batch.labels, reduction="none")
        weighted = Batch(batch.dense_features, batch.sparse_features, batch.labels,
                         dict(batch.extras, label_weight=weight))
        torch.testing.assert_close(labeled_bce(logits, weighted), (bce * weight).sum() / 3.5)
        unlabeled = Batch(batch.dense_features, batch.sparse_features, batch.labels,
                          dict(batch.extras, label_weight=torch.zeros(4)))
        loss = labeled_bce(logits, unlabeled)
        assert float(loss) == 0.0
        (grad,) = torch.autograd.grad(loss, logits)
        assert torch.equal(grad, torch.zeros(4))

    def test_swap_fields_need_a_teacher_and_entity_vectors(self):
        with pytest.raises(ValueError, match=r"^elec\.distill\.swap_fields needs .*'joint' or 'frozen', not 'offline'"):
            ELECDistillConfig(mode="offline", swap_fields=["item_id"])
        with pytest.raises(ValueError, match=r"^elec\.distill\.swap_catalog is set but swap_fields is empty"):
            ELECDistillConfig(mode="frozen", swap_catalog="items.parquet")
        with pytest.raises(ValueError, match="vector_source 'entity_table'"):
            ELECConfig(task="distill", distill=ELECDistillConfig(mode="joint", swap_fields=["item_id"]))
        config = ELECConfig.from_dict({"task": "distill", "vector_source": "entity_table", "entity_field": "item_id",
                                       "entity_vectors": "v", "distill": {"swap_fields": ["item_id"], "alpha": 5}})
        assert config.distill.swap_fields == ["item_id"] and config.distill.alpha == 5
        assert ELECDistillConfig(mode="joint", swap_fields="item_id").swap_fields == ["item_id"]

    def test_the_tasks_own_config_has_no_swap_setting_it_would_ignore(self):
        """The swap is made of the batches (SwappedPairs), which the task never sees being made: a swap setting on
        TeacherStudentConfig was accepted and ignored in a loop of one's own. ELECConfig takes a plain one too."""
        with pytest.raises(TypeError, match="swap_fields"):
            TeacherStudentConfig(mode="joint", swap_fields=["item_id"])
        config = ELECConfig(task="distill", distill=TeacherStudentConfig(mode="joint", alpha=3.0))
        assert isinstance(config.distill, ELECDistillConfig)
        assert (config.distill.alpha, config.distill.swap_fields) == (3.0, [])

    @pytest.mark.parametrize("mode", ["joint", "frozen", "offline"])
    def test_fx_traceable(self, mode, tmp_path):
        if mode == "offline":
            task = build_elec_task(ELECConfig(task="distill", vector_dim=8, distill=TeacherStudentConfig(
                mode="offline", teacher_representation_dim=8)), SCHEMA, MODEL, device=CPU)
        else:
            task = build_elec_task(ELECConfig(task="distill", vector_dim=8, teacher_checkpoint="unused",
                                              distill=TeacherStudentConfig(mode=mode)), SCHEMA, MODEL, device=CPU)
        graph = torchrec.fx.symbolic_trace(task)
        code = graph.code
        assert "student" in code and ("teacher_logits" in code) == (mode == "offline")



@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_integer_and_boolean_labels_give_the_losses_of_float_labels(dtype):
    """As CTRTask (and torchrec's DLRMTrain) take them; the teacher-student BCE failed on them in torch."""
    task = _elec("joint")
    batch = make_batch(seed=3)
    loss, _ = task(batch)
    loss_of_ints, _ = task(Batch(batch.dense_features, batch.sparse_features, batch.labels.to(dtype), batch.extras))
    torch.testing.assert_close(loss_of_ints, loss)

class TestOfflineOutputs:
    def test_write_and_attach(self, tmp_path):
        task = _elec("joint")
        batches = [make_batch(8, seed=s) for s in range(3)]
        out = str(tmp_path / "teacher.parquet")
        assert write_teacher_columns(task.teacher, batches, out, progress=False) == 24
        table = pq.read_table(out)
        assert table.schema.field("teacher_representation").type.list_size == task.teacher.model.representation_dim
        split = str(tmp_path / "split.parquet")
        row_ids = np.concatenate([b.extras["row_id"].numpy() for b in batches])[::-1].copy()
        pq.write_table(pa.table({"row_id": row_ids, "label": np.zeros(24)}), split)
        copy = str(tmp_path / "split_teacher.parquet")
        attach_columns(split, out, "row_id", copy)
        joined = pq.read_table(copy)
        with torch.no_grad():
            expected = torch.cat([task.teacher.predict(b).logits for b in batches]).numpy()[::-1]
        np.testing.assert_allclose(joined.column("teacher_logits").to_numpy(), expected, rtol=1e-6)
        pq.write_table(pa.table({"row_id": np.array([123456])}), split)
        with pytest.raises(ValueError, match="1 rows have no 'row_id'"):
            attach_columns(split, out, "row_id", copy)

    def test_padded_pairs_write_each_real_row_once(self, tmp_path):
        """ParquetBatchReader.padded()'s (batch, real) pairs, which keep the ranks of a sharded teacher in step on an
        uneven split: the repeats run the teacher and write nothing; a rank of repeats only writes no row."""
        task = _elec("joint")
        first, last = make_batch(8, seed=0), make_batch(5, seed=1)
        out = str(tmp_path / "teacher.parquet")
        assert write_teacher_columns(task.teacher, [(first, True), (last, True), (last, False)], out,
                                     progress=False) == 13
        keys = pq.read_table(out).column("row_id").to_pylist()
        assert keys == first.extras["row_id"].tolist() + last.extras["row_id"].tolist()
        only_repeats = str(tmp_path / "empty_rank.parquet")
        assert write_teacher_columns(task.teacher, [(last, False)], only_repeats, progress=False) == 0
        assert pq.read_table(only_repeats).column_names == ["row_id", "teacher_logits", "teacher_representation"]

    def test_the_ranks_files_are_attached_together(self, tmp_path):
        """Each rank of a sharded teacher writes a file of its own rows (one of none at all, say); the split's copy
        takes its columns from all of them."""
        task = _elec("joint")
        batches = [make_batch(8, seed=0), make_batch(5, seed=1)]
        files = [str(tmp_path / f"rank{rank}.parquet") for rank in range(3)]
        for path, pairs in zip(files, [[(batches[0], True)], [(batches[1], True)], [(batches[1], False)]]):
            write_teacher_columns(task.teacher, pairs, path, progress=False)
        split, copy = str(tmp_path / "split.parquet"), str(tmp_path / "copy.parquet")
        row_ids = np.concatenate([b.extras["row_id"].numpy() for b in batches])[::-1].copy()
        pq.write_table(pa.table({"row_id": row_ids}), split)
        assert attach_columns(split, files, "row_id", copy) == 13
        with torch.no_grad():
            expected = torch.cat([task.teacher.predict(b).logits for b in batches]).numpy()[::-1]
        np.testing.assert_allclose(pq.read_table(copy).column("teacher_logits").to_numpy(), expected, rtol=1e-6)
        pq.write_table(pa.table({"row_id": np.array([7])}), files[2])
        with pytest.raises(ValueError, match=rf"^{files[0]}, {files[1]}, {files[2]}: files of other columns"):
            attach_columns(split, files, "row_id", str(tmp_path / "copy2.parquet"))

    def test_batches_without_extras_are_named(self, tmp_path):
        """torchrec's own Batch has no extras: it failed with "'Batch' object has no attribute 'extras'"."""
        from torchrec.datasets.utils import Batch as TorchrecBatch

        batch = make_batch(4)
        plain = TorchrecBatch(batch.dense_features, batch.sparse_features, batch.labels)
        with pytest.raises(TypeError, match=r"a Batch without extras \(torchrec's own Batch has none\)"):
            write_teacher_columns(_elec("joint").teacher, [plain], str(tmp_path / "t.parquet"), progress=False)
        assert not os.path.exists(tmp_path / "t.parquet")

    def test_offline_columns_of_another_shape_are_named_with_their_setting(self):
        """A teacher_representation_dim other than the columns' width was reported as a model's ``interact`` width,
        and teacher logits of another shape by BCE's "Target size"; both name the extras key now."""
        batch = make_batch(6)
        task = _elec("offline", teacher_representation_dim=16)
        extras = {**batch.extras, "teacher_logits": torch.randn(6), "teacher_representation": torch.randn(6, 8)}
        with pytest.raises(ValueError, match=r"extras\['teacher_representation'\] is \(6, 8\), expected \(6, 16\) "
                                             r"\(TeacherStudentConfig.teacher_representation_dim=16\)"):
            task(Batch(batch.dense_features, batch.sparse_features, batch.labels, extras))
        task = _elec("offline", teacher_representation_dim=8)
        for logits in (torch.randn(6, 1), torch.randn(5)):
            bad = {**extras, "teacher_logits": logits}
            with pytest.raises(ValueError, match=r"extras\['teacher_logits'\] is .*, expected \(6,\) \(one value per"):
                task(Batch(batch.dense_features, batch.sparse_features, batch.labels, bad))
        rows_short = {**extras, "teacher_representation": torch.randn(5, 8)}  # the width is right: no setting named
        with pytest.raises(ValueError, match=r"is \(5, 8\), expected \(6, 8\) \(one value per row of the batch\)"):
            task(Batch(batch.dense_features, batch.sparse_features, batch.labels, rows_short))
        loss, _ = task(Batch(batch.dense_features, batch.sparse_features, batch.labels, extras))
        assert torch.isfinite(loss)

    def test_columns_named_as_the_students_extras_keys(self, tmp_path):
        """A student configured with other extras keys reads columns of those names (they were always teacher_*)."""
        task = _elec("joint")
        out = str(tmp_path / "teacher.parquet")
        write_teacher_columns(task.teacher, [make_batch(8, seed=0)], out, progress=False, logits_column="t_logit",
                              representation_column="t_rep")
        assert pq.read_table(out).column_names == ["row_id", "t_logit", "t_rep"]

    def test_a_failed_attach_keeps_the_earlier_copy_and_leaves_no_temp_file(self, tmp_path, monkeypatch):
        """A write that fails half way (a full disk, Ctrl-C) leaves the output as it was, and no ``.tmp``."""
        split, columns, copy = (str(tmp_path / name) for name in ("split.parquet", "cols.parquet", "copy.parquet"))
        pq.write_table(pa.table({"row_id": np.arange(4), "label": np.zeros(4)}), split)
        pq.write_table(pa.table({"row_id": np.arange(4), "teacher_logits": np.ones(4)}), columns)
        attach_columns(split, columns, "row_id", copy)

        write_table = pq.ParquetWriter.write_table

        def half_written(self, table, **kwargs):  # the first row group written, then the disk is full
            write_table(self, table, **kwargs)
            raise OSError(28, "No space left on device")

        monkeypatch.setattr(pq.ParquetWriter, "write_table", half_written)
        with pytest.raises(OSError, match="No space left"):
            attach_columns(split, columns, "row_id", copy)
        assert sorted(os.listdir(tmp_path)) == ["cols.parquet", "copy.parquet", "split.parquet"]
        assert pq.read_table(copy).column("teacher_logits").to_pylist() == [1.0] * 4

    def test_a_failed_attach_closes_its_parquet_writer_itself(self, tmp_path, monkeypatch):
        """The writer of a copy that failed half way is closed before its temp file goes: left to the garbage
        collector, its close wrote to the closed file and raised 'write to closed file' where nothing catches it."""
        import gc
        import sys

        split, columns, copy = (str(tmp_path / name) for name in ("split.parquet", "cols.parquet", "copy.parquet"))
        pq.write_table(pa.table({"row_id": np.arange(4), "label": np.zeros(4)}), split)
        pq.write_table(pa.table({"row_id": np.arange(4), "teacher_logits": np.ones(4)}), columns)
        write_table = pq.ParquetWriter.write_table

        def half_written(self, table, **kwargs):
            write_table(self, table, **kwargs)
            raise OSError(28, "No space left on device")

        unraisable = []
        monkeypatch.setattr(sys, "unraisablehook", lambda failure: unraisable.append(repr(failure.exc_value)))
        monkeypatch.setattr(pq.ParquetWriter, "write_table", half_written)
        try:
            attach_columns(split, columns, "row_id", copy)
        except OSError as error:
            assert "No space left" in str(error)
        else:
            raise AssertionError("the full disk was not raised")
        gc.collect()
        assert unraisable == [] and sorted(os.listdir(tmp_path)) == ["cols.parquet", "split.parquet"]

    def test_a_column_the_split_already_has_is_refused_and_nothing_is_written(self, tmp_path):
        """A split that holds an earlier teacher's column would get a second column of the same name."""
        split, columns, copy = (str(tmp_path / name) for name in ("split.parquet", "cols.parquet", "copy.parquet"))
        pq.write_table(pa.table({"row_id": np.arange(4), "teacher_logits": np.zeros(4)}), split)
        pq.write_table(pa.table({"row_id": np.arange(4), "teacher_logits": np.ones(4)}), columns)
        with pytest.raises(ValueError, match=r"split\.parquet: already has a column 'teacher_logits'$"):
            attach_columns(split, columns, "row_id", copy)
        assert not os.path.exists(copy)

    def test_the_split_is_copied_a_row_group_at_a_time(self, tmp_path, monkeypatch):
        """Only its key column is read whole: the copy of a 3M-row split read it all (and the columns file,
        and wrote row groups of 1M rows, which the reader reads whole)."""
        from recsys_llm.modules import teacher_columns

        split, columns, copy = (str(tmp_path / name) for name in ("split.parquet", "cols.parquet", "copy.parquet"))
        pq.write_table(pa.table({"row_id": np.arange(10), "label": np.arange(10.0)}), split, row_group_size=3)
        pq.write_table(pa.table({"row_id": np.arange(10)[::-1].copy(), "t": np.arange(10.0)[::-1].copy()}), columns)
        monkeypatch.setattr(teacher_columns, "ATTACHED_ROWS_PER_GROUP", 4)
        read = pq.ParquetFile.read

        def key_column_only(self, columns=None, **kwargs):
            assert columns == ["row_id"], columns
            return read(self, columns=columns, **kwargs)

        monkeypatch.setattr(pq.ParquetFile, "read", key_column_only)
        assert attach_columns(split, columns, "row_id", copy) == 10
        copied = pq.ParquetFile(copy)
        assert [copied.metadata.row_group(i).num_rows for i in range(copied.num_row_groups)] == [4, 4, 2]
        table = pq.read_table(copy)
        assert table.column("t").to_pylist() == table.column("label").to_pylist() == list(np.arange(10.0))
        pq.write_table(pa.table({"row_id": pa.array([], pa.int64()), "label": pa.array([], pa.float64())}), split)
        assert attach_columns(split, columns, "row_id", copy) == 0
        assert pq.read_table(copy).column_names == ["row_id", "label", "t"]

    def test_a_row_key_of_another_name_is_read_from_the_readers_row_id_and_repeated_keys_are_refused(self, tmp_path):
        """The reader carries any row key as ``extras["row_id"]``: ``write_teacher_columns(row_key=
        "impression")`` refused its batches, so the pair of functions could not join on such a split;
        and a columns file with a key twice was joined on its first row silently."""
        task = _elec("joint")
        batches = [make_batch(8, seed=s) for s in range(2)]
        out = str(tmp_path / "teacher.parquet")
        assert write_teacher_columns(task.teacher, batches, out, row_key="impression", progress=False) == 16
        split = str(tmp_path / "split.parquet")
        keys = np.concatenate([b.extras["row_id"].numpy() for b in batches])
        pq.write_table(pa.table({"impression": keys, "label": np.zeros(16)}), split)
        assert attach_columns(split, out, "impression", str(tmp_path / "copy.parquet")) == 16
        twice = str(tmp_path / "twice.parquet")
        pq.write_table(pa.concat_tables([pq.read_table(out), pq.read_table(out).slice(3, 1)]), twice)
        with pytest.raises(ValueError, match=rf"twice\.parquet: key {keys[3]} of column 'impression' occurs more than "
                                             r"once; expected one row per key"):
            attach_columns(split, twice, "impression", str(tmp_path / "copy2.parquet"))
        own = make_batch(8, seed=3)  # one's own loop: the keys under the row key's own name come first
        own.extras["impression"] = own.extras["row_id"] + 7
        write_teacher_columns(task.teacher, [own], out, row_key="impression", progress=False)
        assert pq.read_table(out).column("impression").to_pylist() == own.extras["impression"].tolist()


    @pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
    def test_the_teacher_keeps_its_mode_and_a_failed_write_leaves_no_file(self, tmp_path):
        """The failed write's ParquetWriter was left to the garbage collector, which closed it over the temp file
        already closed and removed ('Exception ignored in ParquetWriter.__del__: write to closed file')."""
        task = _elec("joint")
        task.teacher.train()  # e.g. a joint teacher between training epochs: its dropout stays on afterwards
        out = str(tmp_path / "teacher.parquet")
        assert write_teacher_columns(task.teacher, [make_batch(8)], out, progress=False) == 8
        assert task.teacher.training
        no_row_ids = make_batch(8, seed=1)
        del no_row_ids.extras["row_id"]
        with pytest.raises(KeyError, match="no extras\\['row_id'\\] \\(row keys\\)"):
            write_teacher_columns(task.teacher, [make_batch(8, seed=2), no_row_ids], str(tmp_path / "failed.parquet"),
                                  progress=False)
        assert task.teacher.training
        assert sorted(os.listdir(tmp_path)) == ["teacher.parquet"]


class TestLoadFullState:
    def test_unknown_key_rejected(self):
        task = _elec("joint")
        with pytest.raises(KeyError, match="no tensor"):
            load_full_state(task, {}, prefix="teacher.")

    def test_a_destination_not_allocated_yet_is_refused(self):
        module = torch.nn.Linear(3, 1, device="meta")
        with pytest.raises(RuntimeError, match="load_full_state: 'weight' is on the meta device"):
            load_full_state(module, {"weight": torch.ones(1, 3), "bias": torch.zeros(1)})

    def test_a_tensor_the_model_has_no_place_for_is_refused(self):
        task = _elec("joint")
        state = {k.removeprefix("teacher."): v.clone() for k, v in task.state_dict().items() if k.startswith("teacher.")}
        state["extra.weight"] = torch.zeros(2)
        with pytest.raises(ValueError, match=r"gain.pt: holds 1 tensors the model has no place for under 'teacher.': "
                                             r"\['extra.weight'\]"):
            load_full_state(task, state, prefix="teacher.", source="gain.pt")

    def test_a_tensor_of_another_shape_is_named(self):
        task = _elec("joint")
        state = {k.removeprefix("teacher."): v.clone() for k, v in task.state_dict().items() if k.startswith("teacher.")}
        key = next(k for k in state if k.endswith("item_id.weight"))
        state[key] = torch.zeros(state[key].shape[0] + 1, state[key].shape[1])
        with pytest.raises(ValueError, match=rf"gain.pt: tensor '{key}' has shape \(13, 8\), .* expects \(12, 8\)"):
            load_full_state(task, state, prefix="teacher.", source="gain.pt")

    @pytest.mark.parametrize("file_name", ["gain.safetensors", "gain.pt", "gain_legacy.pt"])
    def test_state_files_are_read_lazily_and_load_like_the_tensors(self, tmp_path, file_name):
        from safetensors.torch import save_file

        from recsys_llm.serving import open_state_file

        gain = build_gain_network(ELECConfig(task="gain", vector_dim=8), SCHEMA, MODEL, device=CPU)
        state = {k: v.contiguous() for k, v in gain.state_dict().items()}
        path = str(tmp_path / file_name)
        if file_name.endswith(".safetensors"):
            save_file(state, path)
        else:  # the legacy format cannot be memory-mapped and is read whole
            torch.save(state, path, _use_new_zipfile_serialization="legacy" not in file_name)
        key = next(k for k in state if k.endswith("item_id.weight"))
        with open_state_file(path) as lazy:
            assert lazy[key].shape == state[key].shape
            torch.testing.assert_close(lazy[key][2:5, 1:3], state[key][2:5, 1:3], rtol=0, atol=0)
            task = _elec("joint")
            assert load_full_state(task, lazy, prefix="teacher.") == len(state)
        for k, v in state.items():
            assert torch.equal(task.state_dict()[f"teacher.{k}"], v), k

    def test_a_frozen_fie_takes_its_weights_from_the_loaded_linear_as_with_load_state_dict(self):
        """freeze() before shard_model, then load_full_state of a run that never froze (its frozen copy is
        zeros): the frozen weights stayed those of the buffer, and FIE served zeros."""
        from recsys_llm.models.task import CTRTask
        from recsys_llm.modules.elec import build_student
        from recsys_llm.modules.field_interaction import FieldInteractionEnhancement

        def student() -> CTRTask:
            task = build_student(SCHEMA, MODEL, device=CPU)
            fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.5)
            return CTRTask(task.model, logit_terms={"fie": fie}).eval()

        torch.manual_seed(0)
        trained = student()
        batch = make_batch(8)
        with torch.no_grad():
            expected = trained.predict(batch).logits
        state = trained.state_dict()
        assert not state["logit_terms.fie.frozen_pair_weights"].any()
        for prefix in ("", "student."):
            loaded = student()
            loaded.logit_terms["fie"].freeze()
            target = loaded if not prefix else torch.nn.ModuleDict({"student": loaded})
            load_full_state(target, state, prefix=prefix)
            assert loaded.logit_terms["fie"].frozen
            with torch.no_grad():
                torch.testing.assert_close(loaded.predict(batch).logits, expected)


class TestTorchRecBatch:
    """Batches of torchrec's own ``Batch`` (no extras), as a TorchRec user's loader yields them."""

    @staticmethod
    def _torchrec_batch(seed: int = 0):
        from torchrec.datasets.utils import Batch as TorchRecBatch

        batch = make_batch(seed=seed)
        return TorchRecBatch(batch.dense_features, batch.sparse_features, batch.labels)

    @staticmethod
    def _plain_pair() -> TeacherStudentTask:
        from recsys_llm.models.registry import build_backbone
        from recsys_llm.models.task import CTRTask

        torch.manual_seed(0)
        teacher, student = (CTRTask(build_backbone(MODEL, SCHEMA, device=CPU, table_prefix=prefix))
                            for prefix in ("teacher_", "student_"))
        return TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="joint", alpha=1.0, beta=0.5))

    def test_distillation_and_evaluation_take_it(self):
        from recsys_llm.train.metrics import CTRMetrics
        from recsys_llm.train.pipeline import evaluate

        task = self._plain_pair()
        ours, theirs = make_batch(), self._torchrec_batch()
        loss, (_, logits, labels) = task(theirs)
        expected_loss, (_, expected_logits, _) = task(ours)  # the same rows, with extras the task does not read
        assert torch.equal(loss, expected_loss) and torch.equal(logits, expected_logits)
        loss.backward()
        assert all(p.grad is not None for p in task.student.parameters())
        results = evaluate(task, [self._torchrec_batch(seed) for seed in range(3)], CPU, CTRMetrics(), progress=False)
        assert results["num_samples"] == 48 and 0 <= results["auc"] <= 1

    def test_a_task_that_needs_an_extra_names_it(self):
        task = _elec("joint")  # the gain network reads llm_vector
        with pytest.raises(KeyError, match=r"no extra 'llm_vector' for the field injection \(its extras: \[\]\)"):
            task(self._torchrec_batch())


def test_temperature_scaling_reaches_the_tasks_score_kd() -> None:
    """elec.distill.temperature_scaling=false: the joint task's score-KD term is the one at T, not times T²."""
    student, teacher = torch.randn(16, generator=torch.Generator().manual_seed(1)), torch.randn(16)
    terms = {scaling: _elec("joint", temperature_scaling=scaling).score_kd(student, teacher) for scaling in (True, False)}
    torch.testing.assert_close(terms[False], terms[True] / 4.0)  # T = 2


@pytest.mark.parametrize("bad", ["false", 1])
def test_temperature_scaling_is_a_bool(bad):
    """TeacherStudentConfig(temperature_scaling="false") scaled by T² all the same; ELEC's distill section too."""
    from recsys_llm.modules.elec import ELECDistillConfig
    from recsys_llm.modules.teacher_student import TeacherStudentConfig

    for cls in (TeacherStudentConfig, ELECDistillConfig):
        with pytest.raises(ValueError, match="TeacherStudentConfig.temperature_scaling: expected true or false"):
            cls(temperature_scaling=bad)


def test_teacher_student_config_refuses_a_non_string_key():
    from recsys_llm.modules.teacher_student import TeacherStudentConfig

    with pytest.raises(ValueError, match=r"TeacherStudentConfig.teacher_logits_key: expected a string, got 3"):
        TeacherStudentConfig(teacher_logits_key=3)
