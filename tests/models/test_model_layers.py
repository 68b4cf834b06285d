"""The small shared modules: dense fields, extra-field checks, first order, MLP builder."""

import re

import pytest
import torch
from torch import nn
from torchrec.modules.mlp import MLP

from recsys_llm.models.fields import DenseFieldEmbedding, resolve_extra_fields
from recsys_llm.models.first_order import FirstOrder
from recsys_llm.models.mlp import build_mlp


class TestDenseFieldEmbedding:
    def test_value_times_vector(self) -> None:
        torch.manual_seed(0)
        module = DenseFieldEmbedding(num_dense_features=3, embedding_dim=4)
        x = torch.rand(2, 3)
        out = module(x)
        assert out.shape == (2, 3, 4)
        for b in range(2):
            for j in range(3):
                torch.testing.assert_close(out[b, j], x[b, j] * module.weight[j])

    def test_needs_a_feature(self) -> None:
        with pytest.raises(ValueError, match="at least one dense feature"):
            DenseFieldEmbedding(0, 4)


class TestResolveExtraFields:
    def test_declared_and_given(self) -> None:
        extra = torch.rand(2, 1, 4)
        assert resolve_extra_fields(extra, 1, "M") is extra

    def test_not_declared(self) -> None:
        assert resolve_extra_fields(None, 0, "M") is None
        with pytest.raises(ValueError, match="M was built with num_extra_fields=0"):
            resolve_extra_fields(torch.rand(2, 1, 4), 0, "M")

    def test_declared_but_missing(self) -> None:
        with pytest.raises(ValueError, match="num_extra_fields=2 but got extra_fields=None"):
            resolve_extra_fields(None, 2, "M")

    @pytest.mark.parametrize("shape", [(2, 2, 4), (2, 4), (2, 1, 1, 4)])
    def test_another_number_of_fields_is_named(self, shape) -> None:
        """A backbone built for E = 1 and given two fields failed in torch's cat or broadcast, naming no input."""
        with pytest.raises(ValueError, match=rf"M was built with num_extra_fields=1: extra_fields must be \(B, 1, D\), "
                                             rf"got {re.escape(str(shape))}"):
            resolve_extra_fields(torch.rand(*shape), 1, "M")

    def test_a_traced_placeholder_is_not_checked(self) -> None:
        """``torch.fx`` proxies carry no shape: a model with extra fields stays traceable."""
        graph = torch.fx.symbolic_trace(lambda extra: resolve_extra_fields(extra, 1, "M") * 2)
        extra = torch.rand(2, 1, 4)
        torch.testing.assert_close(graph(extra), extra * 2)


class TestFirstOrder:
    def test_matches_explicit_sum(self) -> None:
        torch.manual_seed(0)
        module = FirstOrder(num_fields=3, embedding_dim=4, num_dense_features=2)
        with torch.no_grad():
            for parameter in module.parameters():
                parameter.normal_()
        fields, dense = torch.rand(5, 3, 4), torch.rand(5, 2)
        expected = torch.stack([
            module.bias[0]
            + sum(torch.dot(module.field_weight[f], fields[b, f]) for f in range(3))
            + sum(module.dense_weight[j] * dense[b, j] for j in range(2))
            for b in range(5)
        ])
        torch.testing.assert_close(module(fields, dense), expected)

    def test_without_dense(self) -> None:
        module = FirstOrder(num_fields=2, embedding_dim=4, num_dense_features=0)
        assert module.dense_weight is None
        assert module(torch.rand(3, 2, 4), torch.rand(3, 0)).shape == (3,)


class TestBuildMLP:
    def test_torchrec_mlp_without_dropout(self) -> None:
        mlp = build_mlp(6, [5, 3])
        assert isinstance(mlp, MLP)
        assert mlp(torch.rand(2, 6)).shape == (2, 3)

    def test_dropout_layers(self) -> None:
        mlp = build_mlp(6, (5, 3), dropout=0.5)
        assert sum(isinstance(m, nn.Dropout) for m in mlp) == 2
        mlp.eval()
        x = torch.rand(2, 6)
        torch.testing.assert_close(mlp(x), mlp(x))
        assert (mlp(x) >= 0).all()

    @pytest.mark.parametrize("sizes,dropout", [([], 0.0), ([4, 0], 0.0), ([4], 1.0)])
    def test_bad_settings(self, sizes, dropout) -> None:
        with pytest.raises(ValueError):
            build_mlp(3, sizes, dropout)


def test_sparse_features_lacking_a_table_feature_are_named() -> None:
    """torchrec's unsharded lookup failed with a bare KeyError: 'genres'."""
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from recsys_llm.data.schema import DatasetSchema, FieldSpec
    from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("genres", "sequence", 5, max_length=2),
                                 FieldSpec("age", "dense")])
    backbone = build_backbone(SMOKE_CONFIGS["deepfm"], schema, device=torch.device("cpu"))
    kjt = KeyedJaggedTensor.from_lengths_sync(["user_id", "city"], torch.tensor([1, 2, 3, 4]), torch.ones(4, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"DeepFM: the sparse features lack \['genres'\], which its tables read; "
                                         r"expected a KeyedJaggedTensor with the keys \['user_id', 'genres'\]"):
        backbone(torch.rand(2, 1), kjt)
