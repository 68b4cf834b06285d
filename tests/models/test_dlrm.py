import re

import pytest
import torch
from torchrec.models.dlrm import DLRM, DLRM_DCN

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.dlrm import DLRMBackbone, build_dlrm
from recsys_llm.models.embedding import build_embedding_bag_collection


def _dlrm(schema, dcn: bool, extra: int = 0) -> DLRM:
    torch.manual_seed(0)
    return build_dlrm(schema, 4, [8, 4], [8, 6, 1], dcn=dcn, dcn_num_layers=2, dcn_low_rank_dim=2,
                      num_extra_fields=extra, device=torch.device("cpu"))


class TestDLRMBackbone:
    @pytest.mark.parametrize("dcn", [False, True])
    def test_logits_equal_unmodified_dlrm(self, schema, kjt, dense, dcn: bool) -> None:
        dlrm = _dlrm(schema, dcn)
        assert type(dlrm) is (DLRM_DCN if dcn else DLRM)
        model = DLRMBackbone(dlrm, num_dense_features=2)
        out = model(dense, kjt)
        assert torch.equal(out.logits, dlrm(dense, kjt).squeeze(1))
        assert out.representation.shape == (4, 6) and model.representation_dim == 6
        hidden = dlrm.over_arch.model[0](dlrm.inter_arch(dlrm.dense_arch(dense), dlrm.sparse_arch(kjt)))
        assert torch.equal(out.representation, hidden)
        assert out.embeddings.keys() == ["user_id", "item_id", "genres"]

    def test_shares_parameters_with_one_fqn_each(self, schema) -> None:
        dlrm = _dlrm(schema, dcn=False)
        model = DLRMBackbone(dlrm, 2)
        assert model.embedding_bag_collection is dlrm.sparse_arch.embedding_bag_collection
        names = [n for n, _ in model.named_parameters(remove_duplicate=False)]
        assert len(names) == len(set(p for _, p in model.named_parameters()))
        assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in dlrm.parameters())

    @pytest.mark.parametrize("dcn", [False, True])
    def test_extra_fields_interact(self, schema, kjt, dense, dcn: bool) -> None:
        dlrm = _dlrm(schema, dcn, extra=2)
        assert dlrm.inter_arch.F == 5
        model = DLRMBackbone(dlrm, 2, num_extra_fields=2)
        extra = torch.randn(4, 2, 4)
        out = model(dense, kjt, extra)
        assert out.logits.shape == (4,)
        # with dot interactions, the extra fields' dot products are over-arch inputs
        embedded_dense = dlrm.dense_arch(dense)
        fields = torch.cat([dlrm.sparse_arch(kjt), extra], dim=1)
        expected = dlrm.over_arch(dlrm.inter_arch(embedded_dense, fields)).squeeze(1)
        torch.testing.assert_close(out.logits, expected)
        assert not torch.allclose(out.logits, model(dense, kjt, extra * 3).logits)

    @pytest.mark.parametrize("dcn", [False, True])
    @pytest.mark.parametrize("extra", [0, 1])
    def test_every_dense_tensor_is_on_the_dense_device(self, schema, dcn: bool, extra: int) -> None:
        """meta stands for the GPU: torchrec builds DLRM's interaction on CPU, which one rank (no DDP) never moves."""
        meta = torch.device("meta")
        dlrm = build_dlrm(schema, 4, [8, 4], [8, 6, 1], dcn=dcn, dcn_num_layers=2, dcn_low_rank_dim=2,
                          num_extra_fields=extra, device=meta, dense_device=meta)
        elsewhere = [name for name, tensor in [*dlrm.named_parameters(), *dlrm.named_buffers()] if not tensor.is_meta]
        assert elsewhere == []

    def test_field_count_mismatch(self, schema) -> None:
        with pytest.raises(ValueError, match="interacts 3 fields but the adapter needs 3 sparse \\+ 1 extra"):
            DLRMBackbone(_dlrm(schema, dcn=False), 2, num_extra_fields=1)

    @pytest.mark.parametrize("num_dense", [1, 3])
    def test_a_dense_count_other_than_the_dlrms_is_named(self, schema, num_dense: int) -> None:
        """It was accepted: num_dense_features reported the wrong width and the first batch failed in a matmul."""
        with pytest.raises(ValueError, match=rf"^DLRMBackbone: num_dense_features={num_dense}, but the DLRM's "
                                             r"dense_arch reads 2 features \(its dense_in_features\)"):
            DLRMBackbone(_dlrm(schema, dcn=False), num_dense)


class TestBuildDLRM:
    def test_meta_tables_by_default(self, schema) -> None:
        dlrm = build_dlrm(schema, 8, [8], [4, 1])
        assert dlrm.sparse_arch.embedding_bag_collection.embedding_bags["t_user_id"].weight.is_meta
        assert not dlrm.over_arch.model[1].weight.is_meta

    @pytest.mark.parametrize(
        "dense_sizes,over_sizes,message",
        [([8, 6], [4, 1], "must end in embedding_dim=8"), ([8], [1], "needs >= 2 sizes ending in 1"),
         ([8], [4, 2], "ending in 1")],
    )
    def test_bad_sizes(self, schema, dense_sizes, over_sizes, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            build_dlrm(schema, 8, dense_sizes, over_sizes)

    @pytest.mark.parametrize("widths", [(8, None), (8, 8)])
    def test_a_field_of_its_own_width_is_named(self, widths) -> None:
        """torchrec's DLRM refused it with a bare AssertionError, or printed '{dense_arch_layer_sizes[-1]}'."""
        schema = DatasetSchema(name="widths", fields=[
            FieldSpec("user_id", "sparse", cardinality=10, embedding_dim=widths[0]),
            FieldSpec("item_id", "sparse", cardinality=12, embedding_dim=widths[1]),
            FieldSpec("age", "dense"),
        ])
        expected = {"user_id": 8} if widths[1] is None else {"user_id": 8, "item_id": 8}
        message = re.escape(f"embedding_dim=4 (the dense arch's last size), but schema 'widths' gives fields an "
                            f"embedding_dim of their own: {expected}")
        for dcn in (False, True):
            with pytest.raises(ValueError, match=message):
                build_dlrm(schema, 4, [8, 4], [8, 1], dcn=dcn, device=torch.device("cpu"))

    def test_same_tables_as_other_backbones(self, schema) -> None:
        dlrm = build_dlrm(schema, 8, [8], [4, 1])
        ours = build_embedding_bag_collection(schema, 8)
        def summary(ebc):
            return [(c.name, c.num_embeddings, c.embedding_dim, c.feature_names, c.pooling)
                    for c in ebc.embedding_bag_configs()]

        assert summary(dlrm.sparse_arch.embedding_bag_collection) == summary(ours)
