import pytest
import torch

from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.finalmlp import BilinearFusion, FeatureGate, FinalMLP, FinalMLPConfig
from backbone_inputs import TINY_IDS, explicit_fields, explicit_mlp, randomize


def explicit_gate(gate: FeatureGate, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    hidden_layers = [m for m in gate.gate.modules() if isinstance(m, torch.nn.Linear)]
    for layer in hidden_layers[:-1]:
        context = torch.relu(context @ layer.weight.T + layer.bias)
    last = hidden_layers[-1]
    return x * 2 * torch.sigmoid(context @ last.weight.T + last.bias)


class TestBilinearFusion:
    def test_matches_explicit_heads(self) -> None:
        torch.manual_seed(0)
        fusion = BilinearFusion(dim1=6, dim2=4, num_heads=2)
        randomize(fusion)
        o1, o2 = torch.randn(3, 6), torch.randn(3, 4)
        expected = fusion.linear1(o1)[:, 0] + fusion.linear2(o2)[:, 0]
        for head in range(2):
            expected = expected + torch.einsum(
                "bi,ij,bj->b", o1[:, head * 3:(head + 1) * 3], fusion.bilinear[head], o2[:, head * 2:(head + 1) * 2]
            )
        torch.testing.assert_close(fusion(o1, o2), expected)

    def test_heads_must_divide(self) -> None:
        with pytest.raises(ValueError, match="divisible by num_heads=4"):
            BilinearFusion(6, 8, 4)


class TestFeatureGate:
    def test_learned_context_gate(self) -> None:
        torch.manual_seed(0)
        gate = FeatureGate(in_features=5, context_fields=[], embedding_dim=4, hidden_sizes=[3])
        randomize(gate)
        x = torch.randn(2, 5)
        torch.testing.assert_close(gate(x, torch.randn(2, 3, 4)), explicit_gate(gate, x, gate.context))

    def test_field_context_gate(self) -> None:
        torch.manual_seed(0)
        gate = FeatureGate(in_features=5, context_fields=[2, 0], embedding_dim=4, hidden_sizes=[])
        randomize(gate)
        x, fields = torch.randn(2, 5), torch.randn(2, 3, 4)
        context = torch.cat([fields[:, 2], fields[:, 0]], dim=1)
        torch.testing.assert_close(gate(x, fields), explicit_gate(gate, x, context))


class TestFinalMLP:
    def test_logits_match_explicit_two_streams(self, schema, kjt, dense) -> None:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        config = FinalMLPConfig(
            mlp1_layer_sizes=(8, 6), mlp2_layer_sizes=(4,), num_heads=2, gate_hidden_sizes=(5,), context2=("item_id",)
        )
        model = FinalMLP(ebc, 2, config, num_extra_fields=1)
        randomize(model)
        extra = torch.randn(4, 1, 4)
        out = model(dense, kjt, extra)

        fields = torch.cat([explicit_fields(ebc, TINY_IDS), extra], dim=1)
        x = torch.cat([fields.flatten(1), dense], dim=1)
        stream1 = explicit_mlp(model.mlp1, explicit_gate(model.gate1, x, model.gate1.context))
        stream2 = explicit_mlp(model.mlp2, explicit_gate(model.gate2, x, fields[:, 1]))
        torch.testing.assert_close(out.representation, torch.cat([stream1, stream2], dim=1))
        torch.testing.assert_close(out.logits, model.fusion(stream1, stream2))
        assert model.representation_dim == 10

    @pytest.mark.parametrize(
        "kwargs,message",
        [({"mlp2_layer_sizes": ()}, r"FinalMLPConfig.mlp2_layer_sizes is empty"),
         ({"mlp1_layer_sizes": (64, 0)}, r"FinalMLPConfig.mlp1_layer_sizes\[1\] must be an integer >= 1, got 0"),
         ({"gate_hidden_sizes": (0,)}, r"FinalMLPConfig.gate_hidden_sizes\[0\] must be an integer >= 1, got 0"),
         ({"context1": "user_id"}, r"FinalMLPConfig.context1: expected a tuple of field names, got the string")],
    )
    def test_bad_config_names_its_setting(self, kwargs, message: str) -> None:
        """The three MLPs' sizes failed alike in build_mlp ("MLP layer sizes must be a non-empty list ...,
        got []"), and a context string was read as its characters (['u', 's', 'e', 'r', '_', 'i', 'd'])."""
        with pytest.raises(ValueError, match=message):
            FinalMLPConfig(**kwargs)
        assert FinalMLPConfig(gate_hidden_sizes=()).gate_hidden_sizes == ()

    def test_unknown_context_field(self, schema) -> None:
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        with pytest.raises(ValueError, match=r"^model\.finalmlp_context1 \(FinalMLPConfig\.context1\): gate context "
                                             r"fields \['zip'\]"):
            FinalMLP(ebc, 2, FinalMLPConfig(context1=("zip",)))
        with pytest.raises(ValueError, match=r"^model\.finalmlp_context2 \(FinalMLPConfig\.context2\)"):
            FinalMLP(ebc, 2, FinalMLPConfig(context2=("zip",)))


def test_finalmlp_config_refuses_a_bool_fractional_or_negative_num_heads_and_a_nan_dropout():
    import numpy as np
    from recsys_llm.models.finalmlp import FinalMLPConfig

    for heads in (True, 2.5, -1):
        with pytest.raises(ValueError, match=r"FinalMLPConfig.num_heads must be an integer >= 1"):
            FinalMLPConfig(num_heads=heads)
    with pytest.raises(ValueError, match=r"FinalMLPConfig.dropout must be a finite number"):
        FinalMLPConfig(dropout=float("nan"))
    assert FinalMLPConfig(num_heads=np.int64(2), dropout=np.float32(0.1)).num_heads == 2
