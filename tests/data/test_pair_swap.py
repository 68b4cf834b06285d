import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.pair_swap import LABEL_WEIGHT_KEY, SwappedPairs, without_fixed_points
from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.data.validation import DataError

SCHEMA = DatasetSchema("t", [
    FieldSpec("user_id", "sparse", 100),
    FieldSpec("item_id", "sparse", 100),
    FieldSpec("item_tags", "sequence", 50, max_length=3),
    FieldSpec("user_age", "dense"),
    FieldSpec("item_price", "dense"),
])
ITEM_FIELDS = ["item_id", "item_tags", "item_price"]


def make_batch(batch_size: int = 6) -> Batch:
    """Row r: user 10 + r, item 50 + r, r % 3 + 1 tags (20 + r, ...), age r, price 100 + r."""
    tag_lengths = torch.arange(batch_size) % 3 + 1
    tags = torch.cat([torch.arange(n) + 20 + r for r, n in enumerate(tag_lengths.tolist())])
    kjt = KeyedJaggedTensor.from_lengths_sync(
        keys=["user_id", "item_id", "item_tags"],
        values=torch.cat([torch.arange(batch_size) + 10, torch.arange(batch_size) + 50, tags]),
        lengths=torch.cat([torch.ones(2 * batch_size, dtype=torch.int32), tag_lengths.int()]),
    )
    dense = torch.stack([torch.arange(batch_size).float(), torch.arange(batch_size).float() + 100], dim=1)
    labels = (torch.arange(batch_size) % 2).float()
    return Batch(dense, kjt, labels, {"row_id": torch.arange(batch_size)})


def test_swapped_rows_keep_the_user_side_and_take_the_item_side_of_another_row() -> None:
    batch = make_batch()
    swap = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=3)
    doubled = swap(batch)
    size = batch.batch_size
    order = swap.permutation(size)
    assert sorted(order.tolist()) == list(range(size))
    features = doubled.sparse_features.to_dict()
    assert doubled.sparse_features.keys() == batch.sparse_features.keys()
    assert doubled.batch_size == 2 * size
    # real rows first, unchanged
    assert torch.equal(features["user_id"].values()[:size], torch.arange(size) + 10)
    assert torch.equal(features["item_id"].values()[:size], torch.arange(size) + 50)
    # swapped rows: own user and age, the item, tags and price of row order[i]
    assert torch.equal(features["user_id"].values()[size:], torch.arange(size) + 10)
    assert torch.equal(features["item_id"].values()[size:], order + 50)
    original_tags = batch.sparse_features["item_tags"].to_dense()
    swapped_tags = features["item_tags"].to_dense()[size:]
    for i, source in enumerate(order.tolist()):
        assert torch.equal(swapped_tags[i], original_tags[source])
    assert torch.equal(doubled.dense_features[size:, 0], batch.dense_features[:, 0])
    assert torch.equal(doubled.dense_features[size:, 1], batch.dense_features[order, 1])
    assert torch.equal(doubled.extras[LABEL_WEIGHT_KEY], torch.cat([torch.ones(size), torch.zeros(size)]))
    assert torch.equal(doubled.labels[:size], batch.labels) and not doubled.labels[size:].any()
    assert torch.equal(doubled.extras["row_id"], torch.cat([batch.extras["row_id"]] * 2))


def test_a_batch_with_per_row_vectors_in_its_extras_is_refused() -> None:
    """A per-row LLM vector describes the row's own (user, item) pair: swapped rows kept it, and a teacher reading it
    scored pairs by the vectors of others (the runner refuses swap_fields with such vectors; one's own loop did not)."""
    batch = make_batch()
    batch.extras["llm_vector"] = torch.randn(batch.batch_size, 4)
    with pytest.raises(ValueError, match=r"swapped pairs: the batch carries per-row vectors in its extras "
                                         r"\['llm_vector'\] \(B, d\).*entity tables"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, seed=3)(batch)


def test_per_id_weights_move_with_their_ids_and_a_catalogue_without_them_is_refused(tmp_path) -> None:
    """A weighted model's KJT (is_weighted=True EBC): swapped rows keep the weights of the ids they take;
    without them a weighted EBC gets no weights (refused) and the student learns unweighted bags."""
    batch = make_batch()
    kjt = batch.sparse_features
    ids = kjt.values()
    weighted = KeyedJaggedTensor.from_lengths_sync(keys=kjt.keys(), values=ids, lengths=kjt.lengths(),
                                                   weights=ids.float() / 100)  # weight = id / 100
    swap = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=3)
    doubled = swap(Batch(batch.dense_features, weighted, batch.labels, batch.extras)).sparse_features
    for key, jagged in doubled.to_dict().items():
        assert jagged.weights_or_none() is not None, key
        assert torch.equal(jagged.weights(), jagged.values().float() / 100), key
    path = str(tmp_path / "items.parquet")
    write_catalog(path)
    with pytest.raises(ValueError, match=r"per-id weights, but the catalogue .*items.parquet holds ids only"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)(Batch(batch.dense_features, weighted, batch.labels, {}))


def test_the_pairing_is_fixed_per_batch_size_and_seed() -> None:
    first, again = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=1), SwappedPairs(SCHEMA, ITEM_FIELDS, seed=1)
    assert torch.equal(first.permutation(64), again.permutation(64))
    assert not torch.equal(first.permutation(64), SwappedPairs(SCHEMA, ITEM_FIELDS, seed=2).permutation(64))
    assert not torch.equal(first.permutation(64), torch.arange(64))


@pytest.mark.parametrize("fields, message", [
    ([], "must name fields"),
    (["item_id", "nope"], "unknown: \\['nope'\\]"),
    (["user_id", "item_id", "item_tags"], "every sparse field"),
])
def test_bad_swap_fields_are_named(fields, message) -> None:
    with pytest.raises(ValueError, match=message):
        SwappedPairs(SCHEMA, fields)


def write_catalog(path: str, num_items: int = 5, **overrides) -> None:
    """Item i (1..num_items): tags [30 + i] * (i % 3), price 200 + i."""
    ids = np.arange(1, num_items + 1)
    columns = {
        "item_id": pa.array(ids, pa.int64()),
        "item_tags": pa.array([[30 + int(i)] * (int(i) % 3) for i in ids], pa.list_(pa.int64())),
        "item_price": pa.array((200 + ids).astype(np.float32)),
    }
    columns.update(overrides)
    pq.write_table(pa.table(columns), path)


def test_catalogue_pairs_take_the_item_side_from_catalogue_rows(tmp_path) -> None:
    path = str(tmp_path / "items.parquet")
    write_catalog(path)
    swap = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=0, catalog=path)
    assert swap.catalog.num_rows == 5
    batch = make_batch(6)
    doubled = swap(batch, epoch=2, index=7)
    rows = swap.catalog_rows(6, epoch=2, index=7)
    assert torch.equal(rows, swap.catalog_rows(6, epoch=2, index=7))  # a resumed run draws the same rows
    assert not torch.equal(rows, swap.catalog_rows(6, epoch=2, index=8))
    assert not torch.equal(rows, swap.catalog_rows(6, epoch=3, index=7))  # each epoch pairs users with new items
    items = rows + 1
    features = doubled.sparse_features.to_dict()
    assert torch.equal(features["item_id"].values()[6:], items)
    assert torch.equal(features["user_id"].values()[6:], torch.arange(6) + 10)
    tags = features["item_tags"]
    assert torch.equal(tags.lengths()[6:], (items % 3).int())
    swapped_tags = tags.values()[int(tags.lengths()[:6].sum()):]
    assert torch.equal(swapped_tags, torch.cat([torch.full((int(i) % 3,), 30 + int(i)) for i in items]))
    assert torch.equal(doubled.dense_features[6:, 1], (200 + items).float())
    assert torch.equal(doubled.dense_features[6:, 0], batch.dense_features[:, 0])
    over = list(swap.over([batch, batch], epoch=2))
    assert torch.equal(over[1].sparse_features["item_id"].values()[6:], swap.catalog_rows(6, 2, 1) + 1)


def test_bad_catalogues_are_named(tmp_path) -> None:
    path = str(tmp_path / "items.parquet")
    pq.write_table(pa.table({"item_id": pa.array([1, 2], pa.int64())}), path)
    with pytest.raises(DataError, match="no column 'item_tags'"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    write_catalog(path, item_id=pa.array([1, 2, 3, 4, 100], pa.int64()))
    with pytest.raises(DataError, match="items.parquet: column 'item_id', row 4: id 100 .* >= cardinality 100"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    write_catalog(path, item_price=pa.array([1.0, None, 2.0, 3.0, 4.0], pa.float32()))
    with pytest.raises(DataError, match="column 'item_price', row 1: null value"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    write_catalog(path, item_id=pa.array([1.0, 2.5, 3.0, 4.0, 5.0], pa.float64()))
    with pytest.raises(DataError, match="column 'item_id' \\(sparse field\\) has Arrow type double; expected an integer"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    write_catalog(path, item_tags=pa.array([1, 2, 3, 4, 5], pa.int64()))
    with pytest.raises(DataError, match="column 'item_tags' \\(sequence field\\) has Arrow type int64"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    write_catalog(path, num_items=0)
    with pytest.raises(DataError, match="items.parquet: the swap catalogue has no rows"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path)
    with pytest.raises(DataError, match="missing.parquet: Parquet file not found"):
        SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=str(tmp_path / "missing.parquet"))


def test_ranks_draw_different_catalogue_rows(tmp_path) -> None:
    path = str(tmp_path / "items.parquet")
    write_catalog(path, num_items=15)
    rank0, rank1 = (SwappedPairs(SCHEMA, ITEM_FIELDS, catalog=path, rank=r) for r in (0, 1))
    assert not torch.equal(rank0.catalog_rows(32, 0, 0), rank1.catalog_rows(32, 0, 0))


def test_a_negative_seed_draws_catalogue_rows_like_any_other(tmp_path) -> None:
    """train.seed=-1 (which the config and the reader take) failed numpy's SeedSequence at the first swapped batch."""
    path = str(tmp_path / "items.parquet")
    write_catalog(path)
    swap = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=-1, catalog=path)
    rows = swap.catalog_rows(6, epoch=0, index=0)
    assert torch.equal(rows, swap.catalog_rows(6, epoch=0, index=0))
    assert rows.shape == (6,) and int(rows.min()) >= 0 and int(rows.max()) < 5


def test_a_large_seed_pairs_rows_like_any_other() -> None:
    """train.seed=20261204233041 (which torch.manual_seed and the reader take) overflowed the pairing's
    generator seed ('Overflow when unpacking long long') at the first swapped batch."""
    swap = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=20261204233041)
    order = swap.permutation(6)
    assert sorted(order.tolist()) == list(range(6))
    assert torch.equal(swap(make_batch(6)).sparse_features["item_id"].values()[6:], order + 50)
    # the seeds that fitted before pair rows as they did (but for rows once paired with themselves)
    for seed in (-1, 0, 3):
        before = torch.randperm(64, generator=torch.Generator().manual_seed(seed * 1_000_003 + 64))
        assert torch.equal(SwappedPairs(SCHEMA, ITEM_FIELDS, seed=seed).permutation(64),
                           without_fixed_points(before))


def test_no_row_is_paired_with_itself() -> None:
    """randperm leaves a row in place about once per batch (half the time for B = 2): its swapped row
    repeated the real row, a labeled pair, instead of the other row the docs promise."""
    for seed in (-1, 0, 3):
        for size in range(2, 130):
            order = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=seed).permutation(size)
            assert sorted(order.tolist()) == list(range(size))
            assert not (order == torch.arange(size)).any(), (seed, size, order)
    before = torch.randperm(64, generator=torch.Generator().manual_seed(3 * 1_000_003 + 64))  # row 35 in place
    after = SwappedPairs(SCHEMA, ITEM_FIELDS, seed=3).permutation(64)
    assert int(before[35]) == 35 and (after != before).nonzero().flatten().tolist() == [35, 36]
    assert torch.equal(SwappedPairs(SCHEMA, ITEM_FIELDS).permutation(1), torch.tensor([0]))  # no other row
