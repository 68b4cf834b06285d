import pytest
import torch

from recsys_llm.models.dcnv2 import DCNv2, DCNv2Config
from recsys_llm.models.embedding import build_embedding_bag_collection
from backbone_inputs import TINY_IDS, explicit_fields, explicit_mlp, randomize


def explicit_cross(model: DCNv2, x0: torch.Tensor, low_rank: bool) -> torch.Tensor:
    """x_{l+1} = x0 * (W_l x_l + b_l) + x_l with W_l = U_l V_l for the low-rank net."""
    net, x = model.crossnet, x0
    for layer in range(2):
        if low_rank:
            weight = net.W_kernels[layer] @ net.V_kernels[layer]  # (K, K)
            bias = net.bias[layer]
        else:
            weight, bias = net.kernels[layer], net.bias[layer][:, 0]
        x = x0 * (x @ weight.T + bias) + x
    return x


class TestDCNv2:
    @pytest.mark.parametrize("low_rank", [0, 3])
    @pytest.mark.parametrize("structure", ["stacked", "parallel"])
    def test_logits_match_explicit_cross_and_deep(self, schema, kjt, dense, low_rank: int, structure: str) -> None:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        config = DCNv2Config(cross_layers=2, low_rank=low_rank, structure=structure, mlp_layer_sizes=(8, 6))
        model = DCNv2(ebc, 2, config, num_extra_fields=1)
        with torch.no_grad():
            randomize(model)
            for parameter in model.crossnet.parameters():
                parameter.mul_(0.3)  # keep two cross layers well-conditioned in float32
        extra = torch.randn(4, 1, 4)
        out = model(dense, kjt, extra)

        fields = torch.cat([explicit_fields(ebc, TINY_IDS), extra], dim=1)
        x0 = torch.cat([fields.flatten(1), dense], dim=1)  # (B, 4 * 4 + 2)
        crossed = explicit_cross(model, x0, low_rank > 0)
        if structure == "stacked":
            hidden = explicit_mlp(model.mlp, crossed)
        else:
            hidden = torch.cat([crossed, explicit_mlp(model.mlp, x0)], dim=1)
        torch.testing.assert_close(out.representation, hidden)
        torch.testing.assert_close(out.logits, hidden @ model.head.weight[0] + model.head.bias[0])
        assert model.representation_dim == (6 if structure == "stacked" else 18 + 6)

    @pytest.mark.parametrize(
        "kwargs,message",
        [({"structure": "both"}, "structure"), ({"cross_layers": 0}, "cross_layers"), ({"low_rank": -1}, "low_rank"),
         # torchrec's range() said "'float' object cannot be interpreted as an integer"
         ({"cross_layers": 2.5}, r"DCNv2Config.cross_layers must be an integer >= 1, got 2.5"),
         ({"mlp_layer_sizes": ()}, r"DCNv2Config.mlp_layer_sizes is empty")],
    )
    def test_bad_config(self, kwargs, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            DCNv2Config(**kwargs)


@pytest.mark.parametrize("name", ["dcnv2", "dlrm_dcn"])
def test_the_cross_net_starts_from_the_dense_devices_random_stream(name) -> None:
    """torchrec's cross nets take no device: built on CPU and moved, their start drew from the CPU's random stream
    while the MLPs drew from the dense device's (on a GPU, a plain run and an ELEC student of one seed differed)."""
    from backbone_inputs import tiny_schema

    from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone

    torch.manual_seed(0)
    build_backbone(SMOKE_CONFIGS[name], tiny_schema(), device=torch.device("meta"), dense_device=torch.device("meta"))
    after_build = torch.rand(1)
    torch.manual_seed(0)
    assert torch.equal(after_build, torch.rand(1))  # nothing drawn from the CPU's stream


def test_dcnv2_config_refuses_a_nan_dropout():
    from recsys_llm.models.dcnv2 import DCNv2Config

    with pytest.raises(ValueError, match=r"DCNv2Config.dropout must be a finite number >= 0 and < 1, got nan"):
        DCNv2Config(dropout=float("nan"))
