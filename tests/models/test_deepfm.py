import pytest
import torch

from recsys_llm.models.deepfm import DeepFM, DeepFMConfig
from recsys_llm.models.embedding import build_embedding_bag_collection
from backbone_inputs import (
    TINY_IDS,
    explicit_fields,
    explicit_first_order,
    explicit_mlp,
    explicit_pairwise,
    randomize,
)


class TestDeepFM:
    def test_logits_are_fm_plus_mlp(self, schema, kjt, dense) -> None:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        model = DeepFM(ebc, 2, DeepFMConfig(mlp_layer_sizes=(8, 6)), num_extra_fields=1)
        randomize(model)
        extra = torch.randn(4, 1, 4)
        out = model(dense, kjt, extra)

        fields = torch.cat([explicit_fields(ebc, TINY_IDS), extra], dim=1)  # (B, 4, D)
        pair_fields = torch.cat([fields, dense.unsqueeze(-1) * model.dense_fields.weight], dim=1)
        hidden = explicit_mlp(model.mlp, torch.cat([fields.flatten(1), dense], dim=1))
        head = hidden @ model.head.weight[0] + model.head.bias[0]
        expected = explicit_first_order(model, fields, dense) + explicit_pairwise(pair_fields, torch.ones(6, 6)) + head
        torch.testing.assert_close(out.logits, expected)
        torch.testing.assert_close(out.representation, hidden)
        assert model.representation_dim == 6

    def test_dropout_only_in_training(self, schema, kjt, dense) -> None:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        model = DeepFM(ebc, 2, DeepFMConfig(mlp_layer_sizes=(32,), dropout=0.5)).eval()
        torch.testing.assert_close(model(dense, kjt).logits, model(dense, kjt).logits)
        model.train()
        assert not torch.equal(model(dense, kjt).representation, model(dense, kjt).representation)

    @pytest.mark.parametrize(
        "sizes,message",
        [((64, 32.0), r"DeepFMConfig.mlp_layer_sizes\[1\] must be an integer >= 1, got 32.0"),
         ("64", r"DeepFMConfig.mlp_layer_sizes must be a list of layer sizes, got '64'"),
         ((), r"DeepFMConfig.mlp_layer_sizes is empty"),
         ((64, 0), r"DeepFMConfig.mlp_layer_sizes\[1\] must be an integer >= 1, got 0")],
    )
    def test_bad_layer_sizes_name_the_setting(self, sizes, message: str) -> None:
        """A float or string size failed in torch ("empty(): argument 'size' failed to unpack the object"), an
        empty or non-positive one in build_mlp without the setting, as DCNv2Config's and FinalMLPConfig's no longer do."""
        with pytest.raises(ValueError, match=message):
            DeepFMConfig(mlp_layer_sizes=sizes)


def test_deepfm_config_refuses_a_nan_dropout():
    from recsys_llm.models.deepfm import DeepFMConfig

    with pytest.raises(ValueError, match=r"DeepFMConfig.dropout must be a finite number >= 0 and < 1, got nan"):
        DeepFMConfig(dropout=float("nan"))
