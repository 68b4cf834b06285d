import torch

from recsys_llm.models.embedding import build_embedding_bag_collection
from recsys_llm.models.fm import FM, fm_interaction
from recsys_llm.models.fwfm import FwFM, FwFMConfig, fwfm_interaction
from backbone_inputs import TINY_IDS, explicit_fields, explicit_first_order, explicit_pairwise, randomize


class TestFwFMInteraction:
    def test_matches_explicit_weighted_pairs(self) -> None:
        generator = torch.Generator().manual_seed(0)
        fields, weight = torch.randn(3, 5, 4, generator=generator), torch.randn(5, 5, generator=generator)
        vector = fwfm_interaction(fields, weight)
        expected = sum(weight[i, j] * fields[:, i] * fields[:, j] for i in range(5) for j in range(i + 1, 5))
        torch.testing.assert_close(vector, expected)
        torch.testing.assert_close(vector.sum(-1), explicit_pairwise(fields, weight))

    def test_unit_weights_are_fm(self) -> None:
        fields = torch.randn(2, 4, 8)
        torch.testing.assert_close(fwfm_interaction(fields, torch.ones(4, 4)), fm_interaction(fields))


class TestFwFM:
    def test_logits_match_explicit_fwfm(self, schema, kjt, dense) -> None:
        torch.manual_seed(0)
        model = FwFM(build_embedding_bag_collection(schema, 4, device=torch.device("cpu")), 2, num_extra_fields=1)
        randomize(model)
        extra = torch.randn(4, 1, 4)
        out = model(dense, kjt, extra)
        fields = torch.cat([explicit_fields(model.embedding_bag_collection, TINY_IDS), extra], dim=1)
        pair_fields = torch.cat([fields, dense.unsqueeze(-1) * model.dense_fields.weight], dim=1)  # N = 6
        expected = explicit_first_order(model, fields, dense) + explicit_pairwise(pair_fields, model.pair_weight)
        torch.testing.assert_close(out.logits, expected)
        assert out.representation.shape == (4, 4)
        assert model.pair_weights().shape == (6, 6)
        assert (torch.tril(model.pair_weights()) == 0).all()

    def test_starts_as_fm(self, schema, kjt, dense) -> None:
        torch.manual_seed(0)
        fwfm = FwFM(build_embedding_bag_collection(schema, 4, device=torch.device("cpu")), 2, FwFMConfig())
        fm = FM(build_embedding_bag_collection(schema, 4, device=torch.device("cpu")), 2)
        fm.load_state_dict({k: v for k, v in fwfm.state_dict().items() if k != "pair_weight"})
        torch.testing.assert_close(fwfm(dense, kjt).logits, fm(dense, kjt).logits)
