import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.fm import FM, FMConfig, fm_interaction
from backbone_inputs import (
    TINY_IDS,
    explicit_fields,
    explicit_first_order,
    explicit_pairwise,
    randomize,
)


class TestFMInteraction:
    def test_sum_square_equals_pairwise_sum(self) -> None:
        fields = torch.randn(3, 5, 4, generator=torch.Generator().manual_seed(0))
        vector = fm_interaction(fields)
        assert vector.shape == (3, 4)
        expected = sum(fields[:, i] * fields[:, j] for i in range(5) for j in range(i + 1, 5))
        torch.testing.assert_close(vector, expected)
        torch.testing.assert_close(vector.sum(-1), explicit_pairwise(fields, torch.ones(5, 5)))


    def test_gradient_is_the_sum_square_tricks(self) -> None:
        fields = torch.randn(3, 5, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        fields.requires_grad_()
        assert torch.autograd.gradcheck(fm_interaction, (fields,))
        grad = torch.randn(3, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
        (by_kernel,) = torch.autograd.grad(fm_interaction(fields), fields, grad)
        explicit = sum(fields[:, i] * fields[:, j] for i in range(5) for j in range(i + 1, 5))
        (by_autograd,) = torch.autograd.grad(explicit, fields, grad)
        torch.testing.assert_close(by_kernel, by_autograd)

    def test_inference_path_gives_the_training_values(self) -> None:
        fields = torch.randn(6, 4, 8, generator=torch.Generator().manual_seed(3), requires_grad=True)
        with torch.no_grad():
            inference = fm_interaction(fields)
        torch.testing.assert_close(fm_interaction(fields).detach(), inference)

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
    @pytest.mark.parametrize("grad", [False, True])
    def test_half_precision_fields_keep_a_small_product_beside_a_large_field(self, dtype, grad) -> None:
        # (300 + 0.1)^2 - (300^2 + 0.1^2) in float16 was inf - inf = NaN, in bfloat16 0; the product is 30
        fields = torch.tensor([[[300.0, 1.0], [0.1, 2.0]]], dtype=dtype, requires_grad=grad)
        vector = fm_interaction(fields)
        assert vector.dtype == dtype
        torch.testing.assert_close(vector.float(), torch.tensor([[30.0, 2.0]]), rtol=1e-2, atol=0.0)
        if grad:  # d/de_0 = e_1 (the backward's sum_j e_j - e_i rounded 300.1 - 300 to 0)
            vector.sum().backward()
            torch.testing.assert_close(fields.grad.float(), fields.detach().flip(1).float())

class TestFM:
    def _model(self, schema: DatasetSchema, config: FMConfig = FMConfig(), extra: int = 0) -> FM:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        model = FM(ebc, num_dense_features=2, config=config, num_extra_fields=extra)
        randomize(model)
        return model

    @pytest.mark.parametrize("dense_as_fields", [True, False])
    def test_logits_match_explicit_fm(self, schema, kjt, dense, dense_as_fields: bool) -> None:
        model = self._model(schema, FMConfig(dense_as_fields=dense_as_fields), extra=1)
        extra = torch.randn(4, 1, 4, generator=torch.Generator().manual_seed(2))
        out = model(dense, kjt, extra)

        fields = torch.cat([explicit_fields(model.embedding_bag_collection, TINY_IDS), extra], dim=1)
        expected = explicit_first_order(model, fields, dense)
        pair_fields = fields
        if dense_as_fields:
            dense_fields = dense.unsqueeze(-1) * model.dense_fields.weight  # x_j v_j
            pair_fields = torch.cat([fields, dense_fields], dim=1)
        else:
            assert model.dense_fields is None
        expected = expected + explicit_pairwise(pair_fields, torch.ones(6, 6))
        torch.testing.assert_close(out.logits, expected)
        assert out.representation.shape == (4, model.representation_dim) == (4, 4)
        torch.testing.assert_close(out.representation, fm_interaction(pair_fields))

    def test_extra_fields_change_the_logits(self, schema, kjt, dense) -> None:
        model = self._model(schema, extra=2)
        extra = torch.randn(4, 2, 4)
        assert not torch.allclose(model(dense, kjt, extra).logits, model(dense, kjt, extra * 2).logits)


@pytest.mark.parametrize("config_name", ["FMConfig", "FwFMConfig", "DeepFMConfig"])
@pytest.mark.parametrize("bad", ["false", 1, None])
def test_dense_as_fields_is_a_bool(config_name, bad):
    """A config built in Python: ``"false"`` or 1 was kept and counted as True."""
    import recsys_llm.models as models

    with pytest.raises(ValueError, match=rf"{config_name}\.dense_as_fields: expected true or false, got"):
        getattr(models, config_name)(dense_as_fields=bad)


def test_num_extra_fields_given_a_device_or_bool_is_named():
    """FM(ebc, n, config, device) put the device in num_extra_fields (an int + device TypeError); True was one field."""
    from recsys_llm.data.synthetic import SyntheticConfig, synthetic_schema
    from recsys_llm.models import FM, FMConfig

    ebc = build_embedding_bag_collection(synthetic_schema(SyntheticConfig()), 8, device=torch.device("cpu"))
    for bad in (torch.device("cpu"), True, -1):
        with pytest.raises(ValueError, match="FM: num_extra_fields must be an integer >= 0"):
            FM(ebc, 3, FMConfig(), bad)
