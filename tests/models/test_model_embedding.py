import dataclasses

import pytest
import torch
from torchrec.modules.embedding_configs import PoolingType

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.models.embedding import build_embedding_bag_collection
from backbone_inputs import TINY_IDS, explicit_fields


class TestBuildEmbeddingBagCollection:
    def test_one_table_per_categorical_field(self, schema: DatasetSchema) -> None:
        ebc = build_embedding_bag_collection(schema, 8, table_prefix="s_")
        configs = ebc.embedding_bag_configs()
        assert [c.name for c in configs] == ["s_user_id", "s_item_id", "s_genres"]
        assert [c.feature_names for c in configs] == [["user_id"], ["item_id"], ["genres"]]
        assert [c.num_embeddings for c in configs] == [10, 12, 5]
        assert [c.pooling for c in configs] == [PoolingType.SUM, PoolingType.SUM, PoolingType.MEAN]
        assert {c.embedding_dim for c in configs} == {8}

    def test_meta_by_default_cpu_on_request(self, schema: DatasetSchema) -> None:
        assert build_embedding_bag_collection(schema, 8).embedding_bags["t_user_id"].weight.is_meta
        cpu = build_embedding_bag_collection(schema, 8, device=torch.device("cpu"))
        assert cpu.embedding_bags["t_user_id"].weight.device.type == "cpu"

    def test_pooling_matches_explicit_lookup(self, schema: DatasetSchema, kjt) -> None:
        torch.manual_seed(0)
        ebc = build_embedding_bag_collection(schema, 4, device=torch.device("cpu"))
        pooled = ebc(kjt).values().view(4, 3, 4)
        torch.testing.assert_close(pooled, explicit_fields(ebc, TINY_IDS))

    @pytest.mark.multiprocess
    def test_init_scale_bounds_every_table_also_when_sharded(self, schema: DatasetSchema) -> None:
        from tests.multiprocess import run_multiprocess

        torch.manual_seed(0)
        plain = build_embedding_bag_collection(schema, 8, device=torch.device("cpu"))
        assert plain.embedding_bags["t_item_id"].weight.abs().max() > 0.05  # torchrec's ±sqrt(1 / rows)
        small = build_embedding_bag_collection(schema, 8, device=torch.device("cpu"), init_scale=1e-3)
        assert all(0 < bag.weight.abs().max() <= 1e-3 for bag in small.embedding_bags.values())
        (largest_sharded,) = run_multiprocess(_largest_sharded_weight, world_size=1, schema=schema, init_scale=1e-3)
        assert 0 < largest_sharded <= 1e-3
        for bad in (0.0, float("nan"), float("inf")):
            with pytest.raises(ValueError, match="init_scale .* must be a finite number > 0 or None, got"):
                build_embedding_bag_collection(schema, 8, init_scale=bad)

    @pytest.mark.parametrize("dim", [6, 0, -4])
    def test_dim_not_multiple_of_four_is_rejected(self, schema: DatasetSchema, dim: int) -> None:
        with pytest.raises(ValueError, match=rf"^model.embedding_dim must be a positive multiple of 4 .*got {dim}"):
            build_embedding_bag_collection(schema, dim)  # the model's dim: no field set one of its own

    def test_field_override_is_validated(self, schema: DatasetSchema) -> None:
        fields = [dataclasses.replace(schema.fields[0], embedding_dim=10)] + schema.fields[1:]
        with pytest.raises(ValueError, match="field 'user_id': its embedding_dim must be .*got 10"):
            build_embedding_bag_collection(DatasetSchema("tiny", fields), 8)

    def test_schema_without_categorical_field(self) -> None:
        with pytest.raises(ValueError, match="no sparse or sequence field"):
            build_embedding_bag_collection(DatasetSchema("dense_only", [FieldSpec("x", "dense")]), 8)


def _largest_sharded_weight(schema: DatasetSchema, init_scale: float) -> float:
    """One rank: the largest |weight| of the table-wise sharded (FBGEMM) tables built with ``init_scale``."""
    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    ctx = init_distributed("cpu")
    sharded, _ = shard_model(build_embedding_bag_collection(schema, 8, init_scale=init_scale), ctx.device, 1,
                             ShardingConfig(sharding_types=["table_wise"]), OptimizerConfig(), batch_size=8)
    weights = [v for k, v in sharded.state_dict().items() if k.endswith(".weight")]
    assert weights
    return max(float(w.local_shards()[0].tensor.abs().max()) for w in weights)
