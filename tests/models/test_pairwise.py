import pytest
import torch

from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.pairwise import upper_pair_weights, weighted_pair_sum
from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
from backbone_inputs import randomize


class TestWeightedPairSum:
    def test_hand_written_backward_matches_autograd(self) -> None:
        torch.manual_seed(0)
        fields = torch.randn(5, 4, 3, dtype=torch.double, requires_grad=True)
        matrix = torch.randn(4, 4, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(weighted_pair_sum, (fields, matrix))
        reference = torch.einsum("bid,ij,bjd->b", fields, matrix, fields)
        torch.testing.assert_close(weighted_pair_sum(fields, matrix), reference)
        weights = torch.randn(5, dtype=torch.double)
        got = torch.autograd.grad((weighted_pair_sum(fields, matrix) * weights).sum(), (fields, matrix))
        expected = torch.autograd.grad((reference * weights).sum(), (fields, matrix))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b)

    def test_inference_kernel_matches_training_kernel(self) -> None:
        torch.manual_seed(0)
        values = torch.randn(7, 5 * 3, requires_grad=True)
        fields = values.view(7, 5, 3)  # a view, as fields_in_key_order gives
        matrix = torch.randn(5, 5)
        training = weighted_pair_sum(fields, matrix)
        assert training.requires_grad
        with torch.no_grad():
            inference = weighted_pair_sum(fields, matrix)
        torch.testing.assert_close(inference, training.detach())
        torch.testing.assert_close(inference, torch.einsum("bid,ij,bjd->b", fields.detach(), matrix, fields.detach()))
        # an empty batch gives an empty result with and without gradients
        empty = torch.randn(0, 5, 3, requires_grad=True)
        assert weighted_pair_sum(empty, matrix).shape == (0,)
        with torch.no_grad():
            assert weighted_pair_sum(empty, matrix).shape == (0,)

    def test_upper_pair_weights(self) -> None:
        matrix = torch.tensor([[0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 3.0, 0.0]])
        torch.testing.assert_close(upper_pair_weights(matrix), torch.tensor([[0.0, 3.0, 0.0], [0.0, 0.0, 3.0], [0.0, 0.0, 0.0]]))
        with pytest.raises(ValueError, match="zero diagonal"):
            upper_pair_weights(torch.eye(3))
        with pytest.raises(ValueError, match="square"):
            upper_pair_weights(torch.zeros(2, 3))


@pytest.mark.parametrize("name", ["fm", "fwfm", "deepfm"])
class TestPairWeightFolding:
    def _backbone(self, schema, name: str):
        torch.manual_seed(0)
        model = build_backbone(SMOKE_CONFIGS[name], schema, device=torch.device("cpu"))
        randomize(model)
        return model.eval()

    def test_folded_backbone_equals_backbone_plus_fie(self, schema, kjt, dense, name: str) -> None:
        model = self._backbone(schema, name)
        fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.7)  # genres left out
        torch.nn.init.normal_(fie.pair_weight.weight)
        with torch.no_grad():
            output = model(dense, kjt)
            expected = output.logits + fie(output)
            assert fie.fold_into(model)
            assert model.folded_pair_weight is not None
            torch.testing.assert_close(model(dense, kjt).logits, expected, rtol=1e-5, atol=1e-5)
            # the task's FIE term would now count twice, and so would a second fold
            with pytest.raises(RuntimeError, match="folded into .*logits already include it"):
                fie(output)
            with pytest.raises(RuntimeError, match="already folded into this"):
                fie.fold_into(model)
            model.fold_pair_weights(None)
            torch.testing.assert_close(model(dense, kjt).logits, output.logits)
            torch.testing.assert_close(output.logits + fie(output), expected)  # unfolded: the term runs again
        assert "folded_pair_weight" not in model.state_dict()

    def test_loading_a_folded_term_refolds_its_loaded_weights(self, schema, kjt, dense, name: str) -> None:
        """A folded FIE that loads a state dict (frozen: its constant weights follow the loaded
        Linear) updates what it folded into the backbone, instead of leaving its old weights there."""
        model = self._backbone(schema, name)
        vectors = torch.randn(2, 6)
        fie = FieldInteractionEnhancement(vectors, ["item_id", "user_id"], weight=0.7)
        trained = FieldInteractionEnhancement(vectors, ["item_id", "user_id"], weight=0.7)
        torch.nn.init.normal_(fie.pair_weight.weight)
        torch.nn.init.normal_(trained.pair_weight.weight)
        with torch.no_grad():
            output = model(dense, kjt)
            expected = output.logits + trained(output)
            for frozen in (True, False):
                if frozen:
                    fie.freeze()
                assert fie.fold_into(model)
                fie.load_state_dict(trained.state_dict())
                torch.testing.assert_close(model(dense, kjt).logits, expected, rtol=1e-5, atol=1e-5)
                model.fold_pair_weights(None)
                fie.unfreeze()
                torch.testing.assert_close(output.logits + fie(output), expected)
                torch.nn.init.normal_(fie.pair_weight.weight)

    def test_a_fold_removed_is_gone_whatever_was_folded_after(self, schema, kjt, dense, name: str) -> None:
        """A term folded, its fold removed, another term folded: the first believed itself still folded (it refused
        to run, and freezing it again subtracted its old weights from the other term's fold)."""
        model = self._backbone(schema, name)
        first = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"], weight=0.7)
        second = FieldInteractionEnhancement(torch.randn(2, 6), ["genres", "user_id"], weight=0.7)
        for term in (first, second):
            torch.nn.init.normal_(term.pair_weight.weight)
            term.freeze()
        with torch.no_grad():
            output = model(dense, kjt)
            expected = output.logits + second(output)
            assert first.fold_into(model)
            model.fold_pair_weights(None)
            assert second.fold_into(model)
            with_second = model(dense, kjt).logits
            torch.testing.assert_close(with_second, expected, rtol=1e-5, atol=1e-5)
            first(output)  # not folded: it runs
            torch.nn.init.normal_(first.pair_weight.weight)
            first.freeze()  # refreshes its own fold only, and it has none
            torch.testing.assert_close(model(dense, kjt).logits, with_second)
            assert first.fold_into(model)  # folds again

    def test_folds_add_up_and_are_checked(self, schema, kjt, dense, name: str) -> None:
        model = self._backbone(schema, name)
        num_sparse = len(model.feature_names)
        first, second = torch.randn(num_sparse, num_sparse).triu(1), torch.randn(num_sparse, num_sparse).tril(-1)
        with torch.no_grad():
            model.fold_pair_weights(first)
            model.fold_pair_weights(second)
            twice = model(dense, kjt).logits
            model.fold_pair_weights(None)
            model.fold_pair_weights(first + second)
            torch.testing.assert_close(model(dense, kjt).logits, twice)
        with pytest.raises(ValueError, match=r"sparse fields .* must be \(3, 3\)"):
            model.fold_pair_weights(torch.zeros(2, 2))


def test_trained_own_pair_weights_stay_live_in_a_fold(schema, kjt, dense) -> None:
    """Only a backbone that declares its own weights constant (FM, DeepFM) has them baked into
    the fold; FwFM's, and any other backbone's, are read at every call."""
    from recsys_llm.models.pairwise import PairWeightFolding

    assert not PairWeightFolding.constant_own_pair_weights
    torch.manual_seed(0)
    model = build_backbone(SMOKE_CONFIGS["fwfm"], schema, device=torch.device("cpu")).eval()
    randomize(model)
    extra = torch.randn(3, 3).triu(1)
    with torch.no_grad():
        model.fold_pair_weights(extra)
        model.pair_weight.mul_(2)  # the backbone's own weights move after the fold
        folded = model(dense, kjt).logits
        model.fold_pair_weights(None)
        unfolded = model(dense, kjt).logits
        model.fold_pair_weights(extra)
        torch.testing.assert_close(model(dense, kjt).logits, folded)
    assert not torch.allclose(folded, unfolded)  # the fold adds its pairs to the moved weights


def test_backbones_without_pairwise_term_do_not_fold(schema) -> None:
    model = build_backbone(SMOKE_CONFIGS["dcnv2"], schema, device=torch.device("cpu"))
    fie = FieldInteractionEnhancement(torch.randn(2, 6), ["item_id", "user_id"])
    assert not fie.fold_into(model)


def test_fm_fold_of_a_single_table_schema_keeps_dense_fields(schema, kjt, dense) -> None:
    """The folded matrix spans the dense fields too: FM's own dense pairs keep weight 1."""
    from recsys_llm.models.fm import FM

    torch.manual_seed(0)
    model = FM(build_embedding_bag_collection(schema, 4, device=torch.device("cpu")), num_dense_features=2).eval()
    randomize(model)
    with torch.no_grad():
        plain = model(dense, kjt).logits
        model.fold_pair_weights(torch.zeros(3, 3))
        assert model.folded_pair_weight.shape == (5, 5)
        torch.testing.assert_close(model(dense, kjt).logits, plain, rtol=1e-5, atol=1e-5)
