"""Export and serving of a model whose EmbeddingBagCollection pools per-id weights (``is_weighted=True``)."""

import re

import pytest
import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor, KeyedTensor, PoolingType

from recsys_llm.data.batch import Batch
from recsys_llm.models.base import CTRBackbone
from recsys_llm.models.task import CTRTask
from recsys_llm.modules.semantic_table import SemanticTable
from recsys_llm.serving import ServedModel, export_task

FEATURES = ["user_id", "tags"]


class _Concat(CTRBackbone):
    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__(ebc, 1)
        self.head = nn.Linear(sum(self.embedding_dims.values()) + 1, 1)

    @property
    def representation_dim(self) -> int:
        return 17

    def interact(self, dense: torch.Tensor, pooled: KeyedTensor, extra_fields):
        by_name = pooled.to_dict()
        hidden = torch.cat([by_name[name] for name in self.feature_names] + [dense], dim=1)
        return self.head(hidden).squeeze(-1), hidden


def _weighted_task() -> CTRTask:
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f]) for f in FEATURES]
    return CTRTask(_Concat(EmbeddingBagCollection(tables=tables, is_weighted=True))).eval()


def _request(batch_size: int, seed: int, weighted: bool = True) -> Batch:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.cat([torch.ones(batch_size, dtype=torch.int32), torch.randint(0, 4, (batch_size,), generator=g).int()])
    values = torch.randint(0, 10, (int(lengths.sum()),), generator=g)
    weights = torch.rand(values.numel(), generator=g) * 3 if weighted else None
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=values, lengths=lengths, weights=weights)
    return Batch(torch.randn(batch_size, 1, generator=g), kjt, torch.zeros(batch_size), {})


def test_a_weighted_model_serves_with_the_request_weights(tmp_path):
    task = _weighted_task()
    example = _request(4, 0)
    config = export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    assert config["weighted"] is True
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    request = _request(16, 1)
    with torch.no_grad():
        expected = task.predict(request).logits
        unit = request.sparse_features
        unit = KeyedJaggedTensor.from_lengths_sync(keys=unit.keys(), values=unit.values(), lengths=unit.lengths(),
                                                    weights=torch.ones_like(unit.weights()))
        unweighted = task.predict(Batch(request.dense_features, unit, request.labels, {})).logits
    assert not torch.allclose(expected, unweighted)  # the weights matter to this model's predictions
    torch.testing.assert_close(served.logits(request.dense_features, request.sparse_features), expected)
    with pytest.raises(ValueError, match="no weights; this model's tables pool per-id weights"):
        served.logits(request.dense_features, _request(16, 1, weighted=False).sparse_features)
    with pytest.raises(ValueError, match=r"raw_request: this model's tables pool per-id weights \(config.json: "
                                         r"weighted\), which raw values do not give"):
        served.raw_request({})
    text = (tmp_path / "export" / "INFERENCE.md").read_text()
    assert "weights=torch.ones(len(features) * batch_size)" in re.search(r"```python\n(.*?)```", text, re.S).group(1)
    assert "is_weighted=True" in text


def test_an_example_without_the_weights_a_weighted_model_needs_is_named(tmp_path):
    """Not torchrec's bare AssertionError ("This (Keyed)JaggedTensor doesn't have weights")."""
    example = _request(4, 0, weighted=False)
    with pytest.raises(ValueError, match=r"export: _Concat \(example_sparse\): its EmbeddingBagCollection is "
                                         r"weighted \(is_weighted=True\), but the sparse features carry no per-id weights"):
        export_task(_weighted_task(), str(tmp_path / "export"), example.dense_features, example.sparse_features)
    assert not (tmp_path / "export").exists()


def test_an_unweighted_export_records_it(tmp_path):
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f]) for f in FEATURES]
    task = CTRTask(_Concat(EmbeddingBagCollection(tables=tables))).eval()
    example = _request(4, 0, weighted=False)
    config = export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    assert config["weighted"] is False
    assert "weights=" not in (tmp_path / "export" / "INFERENCE.md").read_text()


def test_a_weighted_gain_network_serves_its_entity_vectors_with_the_weights(tmp_path):
    """Backbone EBC and entity table both pool the request's weights, in training and served."""
    from recsys_llm.serving import materialize_meta
    from tests.modules.test_semantic_table import _weighted_batch, _weighted_gain_network

    task = materialize_meta(_weighted_gain_network(True, torch.device("cpu")), torch.device("cpu")).eval()
    with torch.no_grad():  # materialize_meta allocates the tables, unset: fill them as training and loading would
        generator = torch.Generator().manual_seed(0)
        for name, weight in task.named_parameters():
            if "embedding_bags" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    example = _weighted_batch(0)
    config = export_task(task, str(tmp_path / "gain"), example.dense_features, example.sparse_features)
    assert config["weighted"] is True
    served = ServedModel.load(str(tmp_path / "gain"), trust_program=True)
    request = _weighted_batch(1)
    with torch.no_grad():
        expected = task.predict(request).logits
    torch.testing.assert_close(served.logits(request.dense_features, request.sparse_features), expected)


def _exported_weighted_task(tmp_path):
    """A weighted task and its export, loaded for serving."""
    task = _weighted_task()
    example = _request(4, 0)
    export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    return task, ServedModel.load(str(tmp_path / "export"), trust_program=True)


def test_weights_of_another_real_dtype_are_served_as_float32(tmp_path):
    """Per-id weights built from numpy are float64 (and may be integer counts): served like float32
    ones, as dense features of another dtype are, not a RuntimeError from inside embedding_bag."""
    task, served = _exported_weighted_task(tmp_path)
    request = _request(6, 2)
    sparse = request.sparse_features
    for weights in (sparse.weights().double(), sparse.weights().round().to(torch.int64)):
        as_sent = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(),
                                                       lengths=sparse.lengths(), weights=weights)
        as_float32 = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(),
                                                          lengths=sparse.lengths(), weights=weights.float())
        with torch.no_grad():
            expected = task.predict(Batch(request.dense_features, as_float32, request.labels, {})).logits
        assert torch.equal(served.logits(request.dense_features, as_sent), expected)
    complex_weights = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(),
                                                          lengths=sparse.lengths(), weights=sparse.weights().cfloat())
    with pytest.raises(ValueError, match=r"sparse features: weights are torch\.complex64; expected real"):
        served.logits(request.dense_features, complex_weights)


def test_weights_are_served_in_the_dtype_of_half_precision_tables(tmp_path):
    """``embedding_bag`` takes weights of its table's dtype only: float32 weights (what a sharded FBGEMM table
    takes from the training batches) reached FP16 tables as they were, a RuntimeError inside ``embedding_bag``."""
    from torchrec.modules.embedding_configs import DataType

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f],
                                 data_type=DataType.FP16) for f in FEATURES]
    task = CTRTask(_Concat(EmbeddingBagCollection(tables=tables, is_weighted=True))).eval()
    half = lambda batch: Batch(batch.dense_features, KeyedJaggedTensor.from_lengths_sync(  # noqa: E731
        keys=FEATURES, values=batch.sparse_features.values(), lengths=batch.sparse_features.lengths(),
        weights=batch.sparse_features.weights().half()), batch.labels, {})
    example = half(_request(4, 0))
    export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    request = _request(6, 2)  # float32 weights
    with torch.no_grad():
        expected = task.predict(half(request)).logits
    assert torch.equal(served.logits(request.dense_features, request.sparse_features), expected)
    # INFERENCE.md's way without recsys_llm, the weights in the tables' dtype as it says
    blocks = re.findall(r"```python\n(.*?)```", (tmp_path / "export" / "INFERENCE.md").read_text(), re.S)
    namespace: dict = {}
    exec(blocks[1], namespace)
    probabilities = namespace["predict_without_recsys_llm"](half(request).dense_features, half(request).sparse_features)
    assert torch.equal(probabilities, torch.sigmoid(expected))


def test_half_precision_tables_take_the_readers_float32_weights_unsharded(tmp_path):
    """The training reader's weights are float32 (what sharded FBGEMM tables take): the unsharded task of FP16
    tables (evaluation, ``export_task``'s lookup of the example) gave them to ``embedding_bag`` as they were, a
    RuntimeError ("Expected tensor for argument #1 'weight' to have the same type ...")."""
    from torchrec.modules.embedding_configs import DataType

    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f],
                                 data_type=DataType.FP16) for f in FEATURES]
    task = CTRTask(_Concat(EmbeddingBagCollection(tables=tables, is_weighted=True))).eval()
    example, request = _request(4, 0), _request(6, 2)  # float32 weights
    export_task(task, str(tmp_path / "export"), example.dense_features, example.sparse_features)
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    sparse = request.sparse_features
    half = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                               weights=sparse.weights().half())
    with torch.no_grad():
        expected = task.predict(request).logits
        assert torch.equal(task.predict(Batch(request.dense_features, half, request.labels, {})).logits, expected)
    assert torch.equal(served.logits(request.dense_features, sparse), expected)


def test_weights_take_the_dtype_of_one_dtypes_tables_and_keep_the_batch_layout() -> None:
    """``weights_in_table_dtype``: float16 weights for FP16 tables, a variable batch size per feature kept as it is;
    the features as they are when the EBC holds tables of two dtypes (no one dtype to give the weights)."""
    from torchrec.modules.embedding_configs import DataType

    from recsys_llm.models.base import weights_in_table_dtype

    def ebc(*dtypes: DataType) -> EmbeddingBagCollection:
        return EmbeddingBagCollection(tables=[EmbeddingBagConfig(name=f"t_{f}", embedding_dim=4, num_embeddings=10,
                                                                 feature_names=[f], data_type=dtype)
                                              for f, dtype in zip(FEATURES, dtypes)], is_weighted=True)

    features = KeyedJaggedTensor(keys=FEATURES, values=torch.arange(5), weights=torch.full((5,), 0.3),
                                 lengths=torch.ones(5, dtype=torch.int64), stride_per_key_per_rank=[[2], [3]])
    half = weights_in_table_dtype(features, ebc(DataType.FP16, DataType.FP16))
    assert half.weights().dtype == torch.float16 and torch.equal(half.values(), features.values())
    assert half.variable_stride_per_key() and half.stride_per_key_per_rank() == [[2], [3]]
    float64 = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.arange(4), lengths=torch.ones(4).long(),
                                                  weights=torch.full((4,), 0.3, dtype=torch.float64))
    assert weights_in_table_dtype(float64, ebc(DataType.FP16, DataType.FP32)) is float64


def test_a_weighted_gain_network_of_fp16_tables_serves_its_float32_entity_table(tmp_path):
    """Served, the request's weights went to both EBCs in the backbone's dtype: float16 ones reached the float32
    entity table, a RuntimeError inside ``embedding_bag``; each EBC now takes them in its own tables' dtype."""
    from torchrec.modules.embedding_configs import DataType

    from recsys_llm.serving import materialize_meta
    from tests.modules.test_semantic_table import _weighted_batch, _weighted_gain_network

    task = materialize_meta(_weighted_gain_network(True, torch.device("cpu"), DataType.FP16), torch.device("cpu")).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, weight in task.named_parameters():
            if "embedding_bags" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    assert {p.dtype for p in task.model.embedding_bag_collection.parameters()} == {torch.float16}
    example = _weighted_batch(0)
    export_task(task, str(tmp_path / "gain"), example.dense_features, example.sparse_features)
    served = ServedModel.load(str(tmp_path / "gain"), trust_program=True)
    request = _weighted_batch(1)
    with torch.no_grad():
        expected = task.predict(request).logits
    torch.testing.assert_close(served.logits(request.dense_features, request.sparse_features), expected)


def test_a_weighted_gain_network_serves_float64_weights_to_its_entity_table_as_float32(tmp_path):
    """Weights built from numpy (float64) are converted for the entity table as for the backbone's tables: each
    EBC gets them in its own tables' dtype (left as sent, the entity table's ``embedding_bag`` met float64 weights)."""
    from recsys_llm.serving import materialize_meta
    from tests.modules.test_semantic_table import _weighted_batch, _weighted_gain_network

    task = materialize_meta(_weighted_gain_network(True, torch.device("cpu")), torch.device("cpu")).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(0)
        for name, weight in task.named_parameters():
            if "embedding_bags" in name:
                weight.copy_(torch.randn(weight.shape, generator=generator))
    example = _weighted_batch(0)
    export_task(task, str(tmp_path / "gain"), example.dense_features, example.sparse_features)
    served = ServedModel.load(str(tmp_path / "gain"), trust_program=True)
    request = _weighted_batch(1)
    sparse = request.sparse_features
    as_sent = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                                   weights=sparse.weights().double())
    with torch.no_grad():
        expected = task.predict(request).logits  # the float32 weights
    torch.testing.assert_close(served.logits(request.dense_features, as_sent), expected)


def test_a_nan_or_inf_weight_is_refused_naming_its_feature_and_position(tmp_path):
    """As a NaN dense feature is: not a NaN probability (nor inf from a float64 beyond float32's range)."""
    _, served = _exported_weighted_task(tmp_path)
    request = _request(6, 2)
    sparse = request.sparse_features
    second_key_start = int(sparse.offset_per_key()[1])
    for bad, shown in ((float("nan"), "nan"), (float("inf"), "inf"), (1e300, "inf")):
        weights = sparse.weights().double()
        weights[second_key_start + 1] = bad
        as_sent = KeyedJaggedTensor.from_lengths_sync(keys=sparse.keys(), values=sparse.values(),
                                                       lengths=sparse.lengths(), weights=weights)
        with pytest.raises(ValueError, match=rf"weight 1 of '{sparse.keys()[1]}' is {shown} .*expected finite"):
            served.logits(request.dense_features, as_sent)


def test_weights_of_another_count_than_the_ids_are_refused(tmp_path):
    """One weight per id: a request with one weight too few or too many is named, not pooled with weights
    shifted onto other ids or failing deep inside embedding_bag."""
    _, served = _exported_weighted_task(tmp_path)
    request = _request(6, 2)
    sparse = request.sparse_features
    ids = sparse.values().numel()
    for weights in (sparse.weights()[:-1], torch.cat([sparse.weights(), torch.ones(1)])):
        as_sent = KeyedJaggedTensor(keys=sparse.keys(), values=sparse.values(), lengths=sparse.lengths(),
                                    weights=weights)
        with pytest.raises(ValueError, match=rf"^sparse features: {weights.numel()} weights for {ids} ids; "
                                             r"expected one each$"):
            served.logits(request.dense_features, as_sent)


def test_a_nan_weight_after_a_sequence_cut_to_max_length_is_named_at_its_place_in_the_request(tmp_path):
    """The weights are checked after the id rules: a sequence cut to ``max_length`` shifted the weights after it,
    and the error named another weight than the NaN one the request holds."""
    from recsys_llm.data.schema import DatasetSchema, FieldSpec

    schema = DatasetSchema("t", [FieldSpec("user_id", "sparse", 10), FieldSpec("tags", "sequence", 10, max_length=2),
                                 FieldSpec("x", "dense")])
    example = _request(4, 0)
    export_task(_weighted_task(), str(tmp_path / "export"), example.dense_features, example.sparse_features,
                schema=schema)
    served = ServedModel.load(str(tmp_path / "export"), trust_program=True)
    # tags: row 0 holds 3 ids (its third one is cut), row 1 two ids, the second one (weight 4 of 'tags') NaN
    weights = torch.tensor([1.0, 1.0, 1.0, 1.0, 1.0, 1.0, float("nan")])
    sparse = KeyedJaggedTensor.from_lengths_sync(keys=FEATURES, values=torch.tensor([1, 2, 1, 2, 3, 4, 5]),
                                                 lengths=torch.tensor([1, 1, 3, 2], dtype=torch.int32), weights=weights)
    with pytest.raises(ValueError, match=r"weight 4 of 'tags' is nan \(as torch\.float32\) in row 1 of the batch; "
                                         r"expected finite"):
        served.logits(torch.zeros(2, 1), sparse)


def test_a_weighted_table_that_pools_other_than_sum_is_refused_before_training():
    """torch's unsharded EmbeddingBag takes per-id weights with SUM only: a weighted MEAN table trains
    sharded, then fails to export or serve (``per_sample_weights is only supported for mode='sum'``)."""
    tables = [EmbeddingBagConfig(name="t_user_id", embedding_dim=8, num_embeddings=10, feature_names=["user_id"]),
              EmbeddingBagConfig(name="t_tags", embedding_dim=8, num_embeddings=10, feature_names=["tags"],
                                 pooling=PoolingType.MEAN)]
    with pytest.raises(ValueError, match=r"_Concat: its EmbeddingBagCollection is weighted \(is_weighted=True\), but "
                                         r"tables \{'t_tags': 'MEAN'\} pool other than SUM; .*pooling=PoolingType.SUM"):
        _Concat(EmbeddingBagCollection(tables=tables, is_weighted=True))
    _Concat(EmbeddingBagCollection(tables=tables))  # unweighted: MEAN is fine
    with pytest.raises(ValueError, match=r"SemanticTable \['item_id'\]: .* tables \{'semantic_item_id': 'MEAN'\}"):
        SemanticTable({"item_id": 10}, 8, pooling=PoolingType.MEAN, device=torch.device("cpu"), is_weighted=True)


def test_sharded_fp16_tables_pool_the_readers_float32_weights_unrounded() -> None:
    """Under DMP, FBGEMM's kernels take float32 per-id weights for FP16 tables: the backbone gives them as they
    are (it converts them to the table dtype only for an unsharded EBC, whose ``embedding_bag`` takes no other)."""
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec.modules.embedding_configs import DataType

    from recsys_llm.train.distributed import init_distributed
    from recsys_llm.train.sharding import shard_model
    from recsys_llm.train.sharding_config import OptimizerConfig, ShardingConfig

    init_distributed()
    torch.manual_seed(0)
    tables = [EmbeddingBagConfig(name=f"t_{f}", embedding_dim=8, num_embeddings=10, feature_names=[f],
                                 data_type=DataType.FP16) for f in FEATURES]
    task = CTRTask(_Concat(EmbeddingBagCollection(tables=tables, is_weighted=True, device=torch.device("meta"))))
    model, _ = shard_model(task, torch.device("cpu"), 1, ShardingConfig(sharding_types=["table_wise"]),
                           OptimizerConfig(), batch_size=8)
    request = _request(6, 2)  # float32 weights in [0, 3): float16 keeps 11 bits of them
    with torch.no_grad():
        pooled = model.module.predict(request).embeddings.to_dict()
    state = model.state_dict()
    kjt = request.sparse_features.to_dict()
    for name in FEATURES:
        table = next(v for k, v in state.items() if k.endswith(f"t_{name}.weight"))
        rows = (table.local_shards()[0].tensor if isinstance(table, ShardedTensor) else table).double()  # (10, 8)
        bags = kjt[name]
        ids, weights = bags.values(), bags.weights().double()
        expected = torch.zeros(6, 8, dtype=torch.float64)
        expected.index_add_(0, torch.repeat_interleave(torch.arange(6), bags.lengths()), rows[ids] * weights[:, None])
        torch.testing.assert_close(pooled[name].double(), expected, atol=2e-6, rtol=0)
