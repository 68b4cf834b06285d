import pytest
import torch
import torchrec
from torchrec.models.dlrm import DLRM
from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.dense_injection import DLRMDenseInjection, VectorFieldInjection


def _kjt(batch_size: int, seed: int = 0) -> KeyedJaggedTensor:
    g = torch.Generator().manual_seed(seed)
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id"],
        values=torch.cat([torch.randint(0, 10, (batch_size,), generator=g), torch.randint(0, 12, (batch_size,), generator=g)]),
        lengths=torch.ones(2 * batch_size, dtype=torch.int32),
    )


class TestVectorFieldInjection:
    def test_shape_and_formula(self):
        torch.manual_seed(0)
        injection = VectorFieldInjection(in_dim=6, embedding_dim=4, num_fields=2)
        vector = torch.randn(3, 6)
        out = injection(vector)
        assert out.shape == (3, 2, 4)
        expected = (vector @ injection.projection.weight.T + injection.projection.bias).view(3, 2, 4)
        torch.testing.assert_close(out, expected)
        torch.testing.assert_close(injection(vector.half()), injection(vector.half().float()))

    @pytest.mark.parametrize("kwargs, bad", [
        (dict(in_dim=6, embedding_dim=4, num_fields=0), "num_fields must be an integer >= 1, got 0"),
        (dict(in_dim=6, embedding_dim=4, num_fields=-1), "num_fields must be an integer >= 1, got -1"),
        (dict(in_dim=-4, embedding_dim=4), "in_dim must be an integer >= 1, got -4"),
        (dict(in_dim=0, embedding_dim=4), "in_dim must be an integer >= 1, got 0"),
        (dict(in_dim=6, embedding_dim=0), "embedding_dim must be an integer >= 1, got 0"),
        (dict(in_dim=6, embedding_dim=4, num_fields=1.5), r"num_fields must be an integer >= 1, got 1.5"),
    ])
    def test_widths_and_counts_below_one_are_refused_when_built(self, kwargs, bad):
        """Not a reshape error in forward (0 fields) or torch's 'negative dimension' (-1)."""
        with pytest.raises(ValueError, match=rf"^VectorFieldInjection\.{bad}$"):
            VectorFieldInjection(**kwargs)

    def test_gain_network_uses_the_vector_and_traces(self):
        schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("item_id", "sparse", 12),
                                     FieldSpec("age", "dense")])
        torch.manual_seed(0)
        backbone = build_backbone(SMOKE_CONFIGS["deepfm"], schema, num_extra_fields=1, device=torch.device("cpu"))
        task = CTRTask(backbone, field_injection=VectorFieldInjection(6, 8), injection_key="llm_vector")
        batch = Batch(torch.randn(4, 1), _kjt(4), torch.tensor([0.0, 1.0, 1.0, 0.0]), {"llm_vector": torch.randn(4, 6)})
        other = Batch(batch.dense_features, batch.sparse_features, batch.labels, {"llm_vector": torch.randn(4, 6)})
        logits = task.predict(batch).logits
        assert not torch.allclose(logits, task.predict(other).logits)  # the vector changes the prediction
        graph = torchrec.fx.symbolic_trace(task)
        assert "field_injection" in str(graph.graph)
        with pytest.raises(ValueError, match=r"gives 2 extra field\(s\) of dim 8; DeepFM was built for 1 of its "
                                             r"embedding dim 8"):
            CTRTask(backbone, field_injection=VectorFieldInjection(6, 8, num_fields=2))
        with pytest.raises(ValueError, match="gives 1 extra field\\(s\\) of dim 4"):
            CTRTask(backbone, field_injection=VectorFieldInjection(6, 4))


class TestDLRMDenseInjection:
    def test_matches_dlrm_on_concatenated_input(self):
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=12, feature_names=["item_id"]),
        ])
        dlrm = DLRM(ebc, dense_in_features=3 + 5, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
        model = DLRMDenseInjection(dlrm, in_dim=6, projected_dim=5)
        assert model.num_dense_features == 3
        dense, vector, kjt = torch.randn(4, 3), torch.randn(4, 6), _kjt(4)
        logits = model(dense, kjt, vector)
        assert logits.shape == (4,)
        expected = dlrm(torch.cat([dense, model.projection(vector)], 1), kjt).squeeze(-1)
        torch.testing.assert_close(logits, expected)
        unprojected = DLRMDenseInjection(DLRM(ebc, 3 + 6, [16, 8], [8, 1]), in_dim=6)
        assert unprojected(dense, kjt, vector).shape == (4,)

    def test_it_traces_for_the_training_pipeline(self):
        """TrainPipelineSparseDist traces the model: the dense-width check was Python control flow on a traced
        shape ('symbolically traced variables cannot be used as inputs to control flow'), so a DMP-sharded
        DLRMDenseInjection failed on its first pipelined step."""
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=12, feature_names=["item_id"]),
        ])
        model = DLRMDenseInjection(DLRM(ebc, 3 + 5, [16, 8], [8, 1]), in_dim=6, projected_dim=5)
        traced = torchrec.fx.symbolic_trace(model)
        dense, vector, kjt = torch.randn(4, 3), torch.randn(4, 6), _kjt(4)
        torch.testing.assert_close(traced(dense, kjt, vector), model(dense, kjt, vector))
        with pytest.raises(ValueError, match=r"DLRMDenseInjection: dense features are \(4, 2\), expected \(B, 3\)"):
            traced(dense[:, :2], kjt, vector)  # still checked when traced

    def test_data_without_dense_features_feeds_the_vector_alone(self):
        """A data set without dense features (ML-100K's ids only): the DLRM's dense arch reads the vector alone."""
        torch.manual_seed(0)
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=12, feature_names=["item_id"]),
        ])
        dlrm = DLRM(ebc, dense_in_features=5, dense_arch_layer_sizes=[16, 8], over_arch_layer_sizes=[8, 1])
        model = DLRMDenseInjection(dlrm, in_dim=6, projected_dim=5)
        assert model.num_dense_features == 0
        vector, kjt = torch.randn(4, 6), _kjt(4)
        logits = model(torch.empty(4, 0), kjt, vector)  # (4,)
        torch.testing.assert_close(logits, dlrm(model.projection(vector), kjt).squeeze(-1))

    def test_too_narrow_dlrm_rejected(self):
        ebc = EmbeddingBagCollection(tables=[EmbeddingBagConfig(name="t", embedding_dim=8, num_embeddings=4,
                                                                feature_names=["user_id"])])
        dlrm = DLRM(ebc, dense_in_features=3, dense_arch_layer_sizes=[8], over_arch_layer_sizes=[4, 1])
        try:
            DLRMDenseInjection(dlrm, in_dim=6, projected_dim=5)
        except ValueError as error:
            assert "dense_in_features" in str(error)
        else:
            raise AssertionError("a DLRM without room for the vector must be rejected")

    def test_a_vector_of_another_width_is_named(self):
        """Not a matmul error from the projection or the DLRM's dense arch."""
        ebc = EmbeddingBagCollection(tables=[
            EmbeddingBagConfig(name="t_user", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
            EmbeddingBagConfig(name="t_item", embedding_dim=8, num_embeddings=12, feature_names=["item_id"]),
        ])
        dense, kjt = torch.randn(4, 3), _kjt(4)
        for projected_dim, dense_in in ((5, 3 + 5), (None, 3 + 6)):
            model = DLRMDenseInjection(DLRM(ebc, dense_in, [8], [4, 1]), in_dim=6, projected_dim=projected_dim)
            assert model(dense, kjt, torch.randn(4, 6)).shape == (4,)
            with pytest.raises(ValueError, match=r"^DLRMDenseInjection: the LLM vector is \(4, 7\), expected \(B, 6\)"):
                model(dense, kjt, torch.randn(4, 7))
            # dense features of another width than the DLRM was built for: named, not a matmul error
            with pytest.raises(ValueError, match=r"^DLRMDenseInjection: dense features are \(4, 4\), expected \(B, 3\) "
                                                 r"\(num_dense_features"):
                model(torch.randn(4, 4), kjt, torch.randn(4, 6))
            # float64 (numpy's default) named as every backbone names it, not torch's bare dtype mismatch
            with pytest.raises(TypeError, match=r"^DLRMDenseInjection: dense_features have dtype torch.float64"):
                model(dense.double(), kjt, torch.randn(4, 6))
