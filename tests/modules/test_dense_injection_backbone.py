import re

import pytest
import torch
import torchrec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.models.base import CTROutput
from recsys_llm.models.dlrm import DLRMBackbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.dense_injection import DLRMDenseInjectionBackbone, VectorFieldInjection
from recsys_llm.modules.teacher_student import TeacherStudentConfig, TeacherStudentTask


def _dlrm(dense_in: int, prefix: str = "t_") -> DLRM:
    ebc = EmbeddingBagCollection(tables=[
        EmbeddingBagConfig(name=f"{prefix}user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
        EmbeddingBagConfig(name=f"{prefix}item", embedding_dim=8, num_embeddings=12, feature_names=["item_id"]),
    ])
    return DLRM(ebc, dense_in_features=dense_in, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 4, 1])


def _batch(batch_size: int = 4, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"],
        values=torch.cat([torch.randint(0, 10, (batch_size,), generator=g), torch.randint(0, 12, (batch_size,), generator=g)]),
        lengths=torch.ones(2 * batch_size, dtype=torch.int32),
    )
    labels = torch.randint(0, 2, (batch_size,), generator=g).float()
    return Batch(torch.randn(batch_size, 3, generator=g), kjt, labels, {"llm_vector": torch.randn(batch_size, 6, generator=g)})


class TestDLRMDenseInjectionBackbone:
    @pytest.mark.parametrize("num_fields, width", [(1, 5), (2, 4)])  # (B, E, P) enters as flatten: field by field
    def test_equals_the_unmodified_dlrm_on_the_concatenated_input(self, num_fields, width) -> None:
        torch.manual_seed(0)
        dlrm = _dlrm(3 + num_fields * width)
        backbone = DLRMDenseInjectionBackbone(dlrm, num_dense_features=3)
        assert backbone.injected_width == num_fields * width and backbone.representation_dim == 4
        task = CTRTask(backbone, field_injection=VectorFieldInjection(6, width, num_fields=num_fields))
        batch = _batch()
        output = task.predict(batch)
        projected = task.field_injection(batch.extras["llm_vector"]).flatten(1)  # (B, E * P)
        expected = dlrm(torch.cat([batch.dense_features, projected], dim=1), batch.sparse_features).squeeze(-1)
        torch.testing.assert_close(output.logits, expected)
        assert output.representation.shape == (4, 4)
        other = Batch(batch.dense_features, batch.sparse_features, batch.labels, {"llm_vector": torch.randn(4, 6)})
        assert not torch.allclose(task.predict(other).logits, output.logits)  # the vector matters

    def test_traces_and_teaches_a_plain_dlrm(self) -> None:
        torch.manual_seed(0)
        gain = DLRMDenseInjectionBackbone(_dlrm(3 + 8, "teacher_"), num_dense_features=3)
        teacher = CTRTask(gain, field_injection=VectorFieldInjection(6, 8))
        student = CTRTask(DLRMBackbone(_dlrm(3, "student_"), num_dense_features=3))
        task = TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="joint", alpha=0.5, beta=0.1))
        graph = torchrec.fx.symbolic_trace(task)  # what TrainPipelineSparseDist does
        assert "field_injection" in str(graph.graph)
        loss, (_, logits, _) = task(_batch())
        loss.backward()
        assert logits.shape == (4,)
        assert teacher.field_injection.projection.weight.grad is not None
        assert isinstance(task.repr_kd.projection, torch.nn.Identity)  # both representations are (B, 4)

    def test_errors(self) -> None:
        with pytest.raises(ValueError, match="dense_in_features = num_dense"):
            DLRMDenseInjectionBackbone(_dlrm(3), num_dense_features=3)
        backbone = DLRMDenseInjectionBackbone(_dlrm(3 + 5), num_dense_features=3)
        with pytest.raises(ValueError, match="field_injection"):
            CTRTask(backbone).predict(_batch())
        with pytest.raises(ValueError, match=r"VectorFieldInjection\) gives 1 x 4 = 4 values per row; the DLRM's dense "
                                             r"input has room for 5 \(injected_width\)"):
            CTRTask(backbone, field_injection=VectorFieldInjection(6, 4))
        task = CTRTask(backbone, field_injection=VectorFieldInjection(6, 5))
        batch = _batch()
        with pytest.raises(KeyError, match=r"the batch has no extra 'llm_vector' for the field injection \(its extras: "
                                           r"\['other'\]\); .*extras=\['llm_vector'\]"):
            task.predict(Batch(batch.dense_features, batch.sparse_features, batch.labels, {"other": torch.zeros(4, 6)}))


def test_dense_features_of_another_width_are_named_with_the_width_the_backbone_was_built_for() -> None:
    """A batch with the injected vector already in its dense features (or a dense column more or less) failed in
    the bottom MLP with torch's bare "mat1 and mat2 shapes cannot be multiplied (4x9 and 8x16)"."""
    backbone = DLRMDenseInjectionBackbone(_dlrm(3 + 5), num_dense_features=3)
    task = CTRTask(backbone, field_injection=VectorFieldInjection(6, backbone.injected_width))
    batch = _batch()
    batch.dense_features = torch.randn(4, 4)
    with pytest.raises(ValueError, match=r"DLRMDenseInjectionBackbone: dense_features are \(4, 4\), expected \(B, 3\)"
                                         r": it was built with num_dense_features=3"):
        task(batch)
    with pytest.raises(ValueError, match=r"DLRMBackbone: dense_features are \(4, 2\), expected \(B, 3\)"):
        DLRMBackbone(_dlrm(3), num_dense_features=3)(torch.randn(4, 2), batch.sparse_features)
    # (B, 3, 1) has the width as its second size, and a (3,) vector has no second size: neither is (B, 3)
    for shape in ((4, 3, 1), (3,)):
        with pytest.raises(ValueError, match=rf"DLRMBackbone: dense_features are {re.escape(str(shape))}, expected"):
            DLRMBackbone(_dlrm(3), num_dense_features=3)(torch.randn(shape), batch.sparse_features)


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_a_backbone_given_where_a_ctr_task_is_expected_is_named(role: str) -> None:
    """TeacherStudentTask(DLRMBackbone(...), ...) failed with "'DLRMBackbone' object has no attribute 'model'"."""
    teacher = CTRTask(DLRMBackbone(_dlrm(3, "teacher_"), 3))
    student = CTRTask(DLRMBackbone(_dlrm(3, "student_"), 3))
    given = {"teacher": teacher, "student": student}
    given[role] = given[role].model  # the bare backbone
    with pytest.raises(TypeError, match=rf"TeacherStudentTask: the {role} is a DLRMBackbone, which lacks \['predict', "
                                        r"'loss_terms', 'model.representation_dim'\]; expected a CTRTask"):
        TeacherStudentTask(given["teacher"], given["student"], TeacherStudentConfig(mode="joint"))


class _OwnTask(torch.nn.Module):
    """A task of one's own with what TeacherStudentTask reads of a CTRTask (``predict``, ``loss_terms`` unless
    ``loss_terms=False``, ``model``), which is no CTRTask: its ``model`` may be a torchrec DLRM as it is."""

    def __init__(self, model: torch.nn.Module, loss_terms: bool = True) -> None:
        super().__init__()
        self.model = model
        if loss_terms:
            self.loss_terms = torch.nn.ModuleDict()

    def predict(self, batch: Batch) -> CTROutput:
        if isinstance(self.model, DLRM):  # (B, 1) logits alone
            return CTROutput(self.model(batch.dense_features, batch.sparse_features).squeeze(-1), None, None)
        return self.model(batch.dense_features, batch.sparse_features)


def test_a_task_of_ones_own_needs_only_what_its_role_reads() -> None:
    """A frozen teacher is read by ``predict`` and ``model.representation_dim`` alone (no ``loss_terms``), a student
    without representation KD (beta 0) by ``predict`` and ``loss_terms`` alone; representation KD needs the
    student's ``model.representation_dim``, a ``model`` without one (a torchrec DLRM) is refused naming it."""
    teacher = _OwnTask(DLRMBackbone(_dlrm(3, "teacher_"), 3), loss_terms=False)
    student = _OwnTask(_dlrm(3, "student_"))
    task = TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="frozen", beta=0.0))
    loss, _ = task(_batch())
    assert torch.isfinite(loss)
    with pytest.raises(TypeError, match=r"the student is a _OwnTask, which lacks \['model.representation_dim'\]"):
        TeacherStudentTask(teacher, student, TeacherStudentConfig(mode="frozen", beta=0.1))
