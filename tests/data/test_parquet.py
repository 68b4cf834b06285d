"""ParquetBatchReader: tensors equal pyarrow's ground truth; rank sharding; shuffle; extras."""

import dataclasses
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from recsys_llm.data.batch import Batch
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.parquet_writer import SplitWriter, arrow_schema_for, list_array
from recsys_llm.data.schema import DatasetSchema, FieldKind, FieldSpec
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.data.validation import DataError
from recsys_llm.id_rules import IdRules


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> DatasetSchema:
    return generate_synthetic(str(tmp_path_factory.mktemp("syn")), 4000, seed=3, rows_per_group=700)


def _concat(batches):
    keys = batches[0].sparse_features.keys()
    per_key = {k: [b.sparse_features[k] for b in batches] for k in keys}
    return (
        torch.cat([b.dense_features for b in batches]),
        {k: (torch.cat([j.values() for j in v]), torch.cat([j.lengths() for j in v])) for k, v in per_key.items()},
        torch.cat([b.labels for b in batches]),
        {k: torch.cat([b.extras[k] for b in batches]) for k in batches[0].extras},
    )


@pytest.mark.parametrize("prefetch", [0, 2])
def test_tensors_match_pyarrow(synthetic, prefetch):
    reader = ParquetBatchReader(synthetic, "train", batch_size=333, extras=["is_cold_item"], prefetch=prefetch)
    batches = list(reader)
    assert len(batches) == len(reader) == -(-3200 // 333)
    assert all(isinstance(b, Batch) for b in batches)
    assert [b.batch_size for b in batches[:-1]] == [333] * (len(batches) - 1)  # independent of row-group size 700
    dense, sparse, labels, extras = _concat(batches)
    table = pq.read_table(synthetic.split_path("train"))
    expected_dense = np.stack([table[n].to_numpy() for n in synthetic.dense_feature_names], axis=1)
    assert dense.dtype == torch.float32 and dense.shape == (3200, 3)
    np.testing.assert_array_equal(dense.numpy(), expected_dense)
    np.testing.assert_array_equal(labels.numpy(), table["label"].to_numpy().astype(np.float32))
    np.testing.assert_array_equal(extras["row_id"].numpy(), table["row_id"].to_numpy())
    np.testing.assert_array_equal(extras["is_cold_item"].numpy(), table["is_cold_item"].to_numpy())
    assert list(sparse) == synthetic.sparse_feature_names
    for spec in synthetic.categorical_fields:
        values, lengths = sparse[spec.name]
        if spec.kind == FieldKind.SPARSE:
            np.testing.assert_array_equal(values.numpy(), table[spec.name].to_numpy())
            assert bool((lengths == 1).all())
        else:
            rows = table[spec.name].to_pylist()
            np.testing.assert_array_equal(lengths.numpy(), [min(len(r), spec.max_length) for r in rows])
            np.testing.assert_array_equal(values.numpy(), [i for r in rows for i in r[: spec.max_length]])


def test_pin_memory_pins_on_cuda_and_is_refused_without(synthetic):
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="pin_memory=True needs CUDA"):
            ParquetBatchReader(synthetic, "train", batch_size=500, pin_memory=True)
        return
    from recsys_llm.data.pair_swap import SwappedPairs
    from recsys_llm.data.synthetic import ITEM_FIELDS

    swap = SwappedPairs(synthetic, ITEM_FIELDS)
    for transform in (None, swap):  # a transformed batch is the one pinned
        reader = ParquetBatchReader(synthetic, "train", batch_size=500, extras=["row_id"], pin_memory=True,
                                    transform=transform)
        batch = next(iter(reader))
        assert batch.dense_features.is_pinned() and batch.labels.is_pinned() and batch.extras["row_id"].is_pinned()
        assert batch.sparse_features.values().is_pinned()


def test_sequences_truncated_and_vector_extras(tmp_path):
    schema = DatasetSchema("seq", [FieldSpec("hist", FieldKind.SEQUENCE, cardinality=100, max_length=3),
                                   FieldSpec("x", FieldKind.DENSE)])
    n = 50
    rng = np.random.default_rng(0)
    lengths = rng.integers(0, 7, size=n)
    values = rng.integers(0, 100, size=int(lengths.sum()))
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    path = str(tmp_path / "s.parquet")
    arrow = arrow_schema_for(schema, {"llm_vector": pa.list_(pa.float32(), 4)})
    with SplitWriter(path, arrow, row_group_size=16) as writer:
        writer.write({
            "row_id": np.arange(n), "hist": list_array(lengths, values), "x": np.zeros(n, np.float32),
            "label": np.zeros(n, np.int8),
            "llm_vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.ravel()), 4),
        })
    assert pq.ParquetFile(path).metadata.num_row_groups == 4
    batches = list(ParquetBatchReader(schema, path, batch_size=7, extras=["llm_vector"]))
    _, sparse, _, extras = _concat(batches)
    got_values, got_lengths = sparse["hist"]
    np.testing.assert_array_equal(got_lengths.numpy(), np.minimum(lengths, 3))
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    np.testing.assert_array_equal(got_values.numpy(), np.concatenate([values[o : o + min(l, 3)] for o, l in zip(offsets, lengths)]))
    assert extras["llm_vector"].shape == (n, 4) and extras["llm_vector"].dtype == torch.float32
    np.testing.assert_allclose(extras["llm_vector"].numpy(), vectors)


def test_a_null_list_is_an_empty_sequence(tmp_path):
    """A null sequence cell (a user without history) is a bag of no ids, and the rows after it keep their own ids,
    cut to max_length as any row."""
    schema = DatasetSchema("s", [FieldSpec("g", FieldKind.SEQUENCE, 7, max_length=2)], row_key=None)
    path = str(tmp_path / "null_lists.parquet")
    pq.write_table(pa.table({"g": pa.array([[1, 2], None, [3], None, [4, 5, 6]], pa.list_(pa.int64())),
                             "label": pa.array([0, 1, 0, 1, 0], pa.int8())}), path)
    (batch,) = ParquetBatchReader(schema, path, batch_size=5, prefetch=0)
    assert batch.sparse_features["g"].lengths().tolist() == [2, 0, 1, 0, 2]
    assert batch.sparse_features["g"].values().tolist() == [1, 2, 3, 4, 5]


def test_two_writers_of_one_path_never_mix_and_one_that_must_not_replace_leaves_the_others_file(tmp_path):
    """Two `score` runs into one --output shared the temp file ``<path>.tmp``: one left a file of both (lz4 data
    that did not decode) and reported it written, the other failed renaming a temp file that was gone."""
    import os

    path = str(tmp_path / "scores.parquet")
    columns = pa.schema([pa.field("logit", pa.float32())])
    first = SplitWriter(path, columns, row_group_size=4, replace=False)
    second = SplitWriter(path, columns, row_group_size=4, replace=False)
    first.write({"logit": np.arange(10, dtype=np.float32)})
    second.write({"logit": -np.arange(6, dtype=np.float32)})
    first.close()
    with pytest.raises(FileExistsError, match=r"scores\.parquet: appeared while this file was written"):
        second.close()
    assert pq.read_table(path)["logit"].to_pylist() == list(range(10))
    assert os.listdir(tmp_path) == ["scores.parquet"]  # no temp file of either
    with SplitWriter(path, columns) as writer:  # replace (the default, as prepare writes into its own directory)
        writer.write({"logit": np.ones(3, dtype=np.float32)})
    assert pq.read_table(path)["logit"].to_pylist() == [1.0] * 3 and os.listdir(tmp_path) == ["scores.parquet"]


def test_a_list_column_past_arrows_int32_offsets_is_written_in_pieces(tmp_path):
    """Arrow's list offsets are int32: past the limit (2**31 - 1 ids; a small one here), ``list_array``
    gives whole-row pieces, which SplitWriter writes and the reader reads back as they were."""
    lengths = np.array([2, 3, 0, 1, 4, 2])
    values = np.arange(int(lengths.sum()))
    pieces = list_array(lengths, values, max_ids_per_array=5)
    assert isinstance(pieces, pa.ChunkedArray) and [len(chunk) for chunk in pieces.chunks] == [3, 2, 1]
    whole = list_array(lengths, values)
    assert isinstance(whole, pa.Array) and pieces.to_pylist() == whole.to_pylist()
    with pytest.raises(ValueError, match="row 4 holds 4 ids, more than a list array holds \\(3\\)"):
        list_array(lengths, values, max_ids_per_array=3)
    schema = DatasetSchema("seq", [FieldSpec("hist", FieldKind.SEQUENCE, cardinality=100, max_length=8)], row_key=None)
    path = str(tmp_path / "pieces.parquet")
    with SplitWriter(path, arrow_schema_for(schema), row_group_size=4) as writer:
        writer.write({"hist": pieces, "label": np.zeros(len(lengths), np.int8)})
    (batch,) = ParquetBatchReader(schema, path, batch_size=len(lengths), prefetch=0)
    assert batch.sparse_features["hist"].lengths().tolist() == lengths.tolist()
    assert batch.sparse_features["hist"].values().tolist() == values.tolist()


# (3, 533): ranks of 1066, 1067 and 1067 rows make 2, 3 and 3 batches; all ranks are capped at 2
# (3, 11, True): 96, 97 and 97 full batches, capped at 96; (2, 100, True): 1600 rows a rank, its last batch full
@pytest.mark.parametrize("world_size,batch_size,drop_last", [(2, 128, False), (3, 100, False), (3, 100, True), (4, 64, False),
                                                             (3, 533, False), (3, 11, True), (2, 100, True)])
def test_rank_sharding_equal_batches_and_disjoint_rows(synthetic, world_size, batch_size, drop_last):
    readers = [ParquetBatchReader(synthetic, "train", batch_size, rank=r, world_size=world_size, drop_last=drop_last)
               for r in range(world_size)]
    counts = [len(list(r)) for r in readers]
    assert len(set(counts)) == 1 and counts[0] == len(readers[0]) > 0
    seen = np.concatenate([_concat(list(r))[3]["row_id"].numpy() for r in readers])
    assert len(np.unique(seen)) == len(seen)  # every row at most once
    dropped = sum(r.dropped_rows for r in readers)
    assert len(seen) + dropped == 3200  # every row either read once or counted as dropped by the cap
    assert sum(readers[0].rows_per_rank) == 3200
    assert dropped <= world_size * (batch_size if drop_last else 1)  # balanced ranges: <= 1 row per rank + drop_last
    assert counts[0] == min(readers[0].batches_per_rank)


@pytest.mark.parametrize("rows,world_size,batch_size", [(401, 2, 200), (3200, 3, 1066), (1, 2, 4), (5, 4, 1)])
def test_padded_passes_see_every_row_once_in_equal_steps(tmp_path, synthetic, rows, world_size, batch_size):
    path = str(tmp_path / "rows.parquet")
    pq.write_table(pq.read_table(synthetic.split_path("train")).slice(0, rows), path, row_group_size=128)
    readers = [ParquetBatchReader(synthetic, path, batch_size, rank=r, world_size=world_size, equal_batches=False)
               for r in range(world_size)]
    passes = [list(reader.padded()) for reader in readers]
    assert len({len(p) for p in passes}) == 1 and len(passes[0]) == readers[0].padded_len  # every rank in step
    real = np.concatenate([_concat([b for b, is_real in p if is_real])[3]["row_id"].numpy() for p in passes if
                           any(is_real for _, is_real in p)])
    np.testing.assert_array_equal(real, pq.read_table(path)["row_id"].to_numpy())  # each row once, in file order
    pads = sum(not is_real for p in passes for _, is_real in p)
    assert pads == sum(readers[0].padded_len - n for n in readers[0].batches_per_rank) > 0


def test_a_rank_without_rows_pads_with_the_first_row_as_its_transform_makes_it(tmp_path, synthetic):
    """A rank whose range is empty repeats the split's first row, through the reader's transform like every other
    batch (the model's forward, and its collectives, see the batch form the transform gives, e.g. swapped pairs)."""
    path = str(tmp_path / "one.parquet")
    pq.write_table(pq.read_table(synthetic.split_path("train")).slice(0, 1), path)

    def marked(batch, epoch, index):
        return dataclasses.replace(batch, extras={**batch.extras, "marked": torch.full_like(batch.labels, 7.0)})

    readers = [ParquetBatchReader(synthetic, path, 4, rank=r, world_size=2, equal_batches=False, prefetch=0,
                                  transform=marked) for r in range(2)]
    (pad, pad_real), = list(readers[0].padded())  # rows [0, 0): none
    (real, is_real), = list(readers[1].padded())
    assert is_real and not pad_real
    assert pad.extras["marked"].tolist() == real.extras["marked"].tolist() == [7.0]
    assert pad.extras["row_id"].tolist() == real.extras["row_id"].tolist() == [0]


def test_a_cap_of_no_batch_holds_on_a_rank_with_a_full_batch(tmp_path, synthetic):
    """9 rows on 2 ranks (4 and 5) in 5-row batches with drop_last: rank 0 makes no batch, so rank 1, which holds
    one full batch, makes none either (it would run a step's collectives alone)."""
    path = str(tmp_path / "nine.parquet")
    pq.write_table(pq.read_table(synthetic.split_path("train")).slice(0, 9), path)
    readers = [ParquetBatchReader(synthetic, path, 5, rank=r, world_size=2, drop_last=True, prefetch=0)
               for r in range(2)]
    assert [len(r) for r in readers] == [0, 0] and [len(list(r)) for r in readers] == [0, 0]
    assert [r.dropped_rows for r in readers] == [4, 5]


@pytest.mark.parametrize("drop_last", [False, True])
def test_batches_with_is_the_length_of_a_reader_of_that_shape(synthetic, drop_last):
    """The steps of an epoch in a job of another shape, from a reader of this one: 3200 rows on 3 ranks are shares
    of 1066 and 1067 rows, so 533-row batches make 2 steps (the smallest share's), not 3."""
    reader = ParquetBatchReader(synthetic, "train", 64, drop_last=drop_last, prefetch=0)
    for world_size, batch_size in [(1, 64), (3, 533), (3, 11), (4, 100)]:
        other = ParquetBatchReader(synthetic, "train", batch_size, world_size=world_size, drop_last=drop_last)
        assert reader.batches_with(world_size, batch_size) == len(other), (world_size, batch_size)


def test_a_bad_value_in_a_row_group_two_ranks_share_is_named_by_its_row_in_the_file(tmp_path):
    """A rank whose range starts inside a row group keeps a slice of it: a bad value there is named by its row in
    the file, not in the slice."""
    schema = DatasetSchema("s", [FieldSpec("u", FieldKind.SPARSE, 7)], row_key=None)
    path = str(tmp_path / "one.parquet")
    labels = [0, 1] * 5
    labels[7] = 3
    pq.write_table(pa.table({"u": pa.array(np.arange(10) % 7, pa.int64()), "label": pa.array(labels, pa.int8())}), path)
    assert pq.ParquetFile(path).metadata.num_row_groups == 1
    with pytest.raises(DataError, match=r"one\.parquet: column 'label', row 7: label 3 is not a click label"):
        list(ParquetBatchReader(schema, path, 4, rank=1, world_size=2, prefetch=0))  # rows 5..9 of the group


def test_fewer_row_groups_than_ranks_uses_row_ranges(tmp_path, synthetic):
    table = pq.read_table(synthetic.split_path("valid"))  # 400 rows
    path = str(tmp_path / "one_group.parquet")
    pq.write_table(table, path, row_group_size=1000)
    readers = [ParquetBatchReader(synthetic, path, 64, rank=r, world_size=3) for r in range(3)]
    ids = [_concat(list(r))[3]["row_id"].numpy() for r in readers]
    assert [len(list(r)) for r in readers] == [len(readers[0])] * 3
    seen = np.concatenate(ids)
    assert len(np.unique(seen)) == len(seen) and np.isin(seen, table["row_id"].to_numpy()).all()
    assert sum(map(len, ids)) + sum(r.dropped_rows for r in readers) == 400
    assert all(np.all(np.diff(i) == 1) for i in ids)  # contiguous row ranges


def test_shuffle_is_seeded_per_epoch(synthetic):
    reader = ParquetBatchReader(synthetic, "train", 256, shuffle=True, seed=1, shuffle_buffer_rows=1000)
    def order(epoch):
        reader.set_epoch(epoch)
        return _concat(list(reader))[3]["row_id"].numpy()
    first, again, second = order(0), order(0), order(1)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, second)
    np.testing.assert_array_equal(np.sort(first), np.arange(3200))
    assert not np.array_equal(first, np.arange(3200))
    assert reader.shuffle_buffer_rows == 1000
    assert ParquetBatchReader(synthetic, "train", 256).shuffle_buffer_rows == 65536  # max(8 * batch, 65,536)
    assert ParquetBatchReader(synthetic, "train", 16384).shuffle_buffer_rows == 8 * 16384


def test_a_shuffled_row_keeps_its_own_values_and_sequence_ids(synthetic):
    """Shuffling moves whole rows: each batch row holds the dense values, label, ids and sequence bag of the file
    row its row_id names (a gather that moved the bags' lengths but not their ids gave rows others' sequences)."""
    reader = ParquetBatchReader(synthetic, "train", 256, shuffle=True, seed=2, shuffle_buffer_rows=1000, prefetch=0)
    dense, sparse, labels, extras = _concat(list(reader))
    table = pq.read_table(synthetic.split_path("train"))
    order = extras["row_id"].numpy()
    assert not np.array_equal(order, np.arange(3200))
    by_id = np.argsort(table["row_id"].to_numpy())[order]  # the file row of each batch row
    expected_dense = np.stack([table[n].to_numpy() for n in synthetic.dense_feature_names], axis=1)[by_id]
    np.testing.assert_array_equal(dense.numpy(), expected_dense)
    np.testing.assert_array_equal(labels.numpy(), table["label"].to_numpy().astype(np.float32)[by_id])
    for spec in synthetic.categorical_fields:
        values, lengths = sparse[spec.name]
        rows = table[spec.name].to_pylist()
        if spec.kind == FieldKind.SPARSE:
            np.testing.assert_array_equal(values.numpy(), np.asarray(rows)[by_id])
            continue
        bags = [(rows[i] or [])[: spec.max_length] for i in by_id]
        assert lengths.tolist() == [len(bag) for bag in bags]
        assert values.tolist() == [v for bag in bags for v in bag]


def test_shuffling_takes_the_row_groups_in_an_order_drawn_per_epoch(tmp_path, synthetic):
    """With a shuffle buffer of one row group's rows, each buffer mixes one row group (every batch's rows come from
    one group), and the groups come in a random order: an epoch need not start with the file's first group."""
    path = str(tmp_path / "groups.parquet")
    pq.write_table(pq.read_table(synthetic.split_path("train")).slice(0, 2800), path, row_group_size=700)
    reader = ParquetBatchReader(synthetic, path, 100, shuffle=True, seed=4, shuffle_buffer_rows=700, prefetch=0)
    first_groups = set()
    for epoch in range(4):
        reader.set_epoch(epoch)
        groups = [set((batch.extras["row_id"].numpy() // 700).tolist()) for batch in reader]
        assert len(groups) == 28 and all(len(group) == 1 for group in groups)
        first_groups |= groups[0]
    assert len(first_groups) > 1


def test_each_rank_shuffles_with_its_own_draw(tmp_path, synthetic):
    """The shuffle is seeded by (seed, epoch, rank): two ranks with shares of the same shape do not put their rows
    in the same order (the rows at equal places of each share would always share a step)."""
    path = str(tmp_path / "two.parquet")
    pq.write_table(pq.read_table(synthetic.split_path("train")).slice(0, 1400), path, row_group_size=700)
    places = []
    for rank in range(2):
        reader = ParquetBatchReader(synthetic, path, 100, rank=rank, world_size=2, shuffle=True, seed=1,
                                    shuffle_buffer_rows=700, prefetch=0)
        places.append(_concat(list(reader))[3]["row_id"].numpy() - 700 * rank)
        np.testing.assert_array_equal(np.sort(places[-1]), np.arange(700))
    assert not np.array_equal(places[0], places[1])


def test_a_negative_seed_shuffles_like_any_other(synthetic):
    """train.seed may be negative (seed_everything takes it modulo 2**32); numpy's default_rng refuses
    negative entropy, which failed the first batch with a bare 'expected non-negative integer'."""
    def order(seed, epoch=0):
        reader = ParquetBatchReader(synthetic, "valid", 64, shuffle=True, seed=seed, shuffle_buffer_rows=100)
        reader.set_epoch(epoch)
        return _concat(list(reader))[3]["row_id"].numpy()
    first = order(-1)
    np.testing.assert_array_equal(first, order(-1))
    np.testing.assert_array_equal(np.sort(first), np.sort(order(0)))
    assert not np.array_equal(first, order(-1, epoch=1)) and not np.array_equal(first, order(-2))


def test_errors_in_later_row_groups_surface_through_prefetch(tmp_path, synthetic):
    table = pq.read_table(synthetic.split_path("valid"))
    labels = table["label"].to_numpy().copy()
    labels[350] = 5
    bad = table.set_column(table.schema.get_field_index("label"), "label", pa.array(labels))
    path = str(tmp_path / "late_error.parquet")
    pq.write_table(bad, path, row_group_size=100)
    reader = ParquetBatchReader(synthetic, path, 64, prefetch=2)
    with pytest.raises(DataError, match=r"late_error\.parquet: column 'label', row 350"):
        list(reader)


def test_bad_arguments(synthetic):
    with pytest.raises(ValueError, match="rank 2 is outside"):
        ParquetBatchReader(synthetic, "train", 16, rank=2, world_size=2)
    with pytest.raises(DataError, match="no such Parquet file or directory"):
        ParquetBatchReader(synthetic, "nope", 16)


@pytest.mark.parametrize("catalog", [False, True])
def test_a_transform_runs_in_the_reader_like_over_the_reader(synthetic, catalog):
    """Swapped pairs as the reader's transform (prefetch thread, before pinning) give the batches
    the trainer used to get by wrapping the reader, epoch and batch index included."""
    import os

    from recsys_llm.data.pair_swap import SwappedPairs
    from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS

    catalog_path = os.path.join(synthetic.root, ITEM_CATALOG) if catalog else None
    swap = SwappedPairs(synthetic, ITEM_FIELDS, seed=5, catalog=catalog_path)
    inside = ParquetBatchReader(synthetic, "train", 256, shuffle=True, transform=swap)
    outside = ParquetBatchReader(synthetic, "train", 256, shuffle=True)
    inside.set_epoch(1)
    outside.set_epoch(1)
    got, expected = list(inside), list(swap.over(outside, epoch=1))
    assert len(got) == len(expected) == len(outside) and got[0].batch_size == 512
    for a, b in zip(got, expected):
        assert torch.equal(a.dense_features, b.dense_features) and torch.equal(a.labels, b.labels)
        assert torch.equal(a.sparse_features.values(), b.sparse_features.values())
        assert torch.equal(a.sparse_features.lengths(), b.sparse_features.lengths())
        assert a.extras.keys() == b.extras.keys() and all(torch.equal(a.extras[k], b.extras[k]) for k in a.extras)


@pytest.mark.parametrize("hashed", [False, True])
def test_null_inside_a_sequence_names_file_column_and_row(tmp_path, hashed):
    schema = DatasetSchema("s", [FieldSpec("g", FieldKind.SEQUENCE, 7, hashed=hashed, max_length=4)], row_key=None)
    path = str(tmp_path / "n.parquet")
    pq.write_table(pa.table({"g": pa.array([[1, 2], None, [], [3, None]], pa.list_(pa.int64())),
                             "label": pa.array([0, 1, 0, 1], pa.int8())}), path, row_group_size=2)
    for validate in (True, False):
        with pytest.raises(DataError, match=r"n\.parquet: column 'g', row 3: null value at position 1 of the list"):
            list(ParquetBatchReader(schema, path, 4, prefetch=0, validate=validate))


def test_out_of_range_id_names_its_row_without_validation(tmp_path):
    schema = DatasetSchema("s", [FieldSpec("g", FieldKind.SEQUENCE, 7)], row_key=None)
    path = str(tmp_path / "v.parquet")
    pq.write_table(pa.table({"g": pa.array([[1, 2, 3], [], [4, 5, 6], [1, 99]], pa.list_(pa.int64())),
                             "label": pa.array([0, 1, 0, 1], pa.int8())}), path, row_group_size=2)
    for validate in (True, False):
        with pytest.raises(DataError, match=r"v\.parquet: column 'g', row 3: id 99 in sequence field 'g'"):
            list(ParquetBatchReader(schema, path, 4, prefetch=0, validate=validate))


@pytest.mark.parametrize("kind", [FieldKind.SPARSE, FieldKind.SEQUENCE])
def test_uint64_ids_above_the_int64_range_are_named_as_they_are_or_folded_when_hashed(tmp_path, kind):
    """A uint64 id column (any integer type passes the footer check) is read as unsigned, as
    ``prepare tabular`` reads it: an id above 2**63 - 1 is named as it is, not wrapped to a
    negative one, and a hashed field folds the int64 of the same bits: a served model gets int64
    ids and folds them so (``IdRules``); folding the unsigned value put 2**64 - 3 in row 3 when
    trained and row 9 when served."""
    big = 2**64 - 3
    ids = pa.array([1, big, 2, 2**63 + 1], pa.uint64())
    column = ids if kind == FieldKind.SPARSE else pa.ListArray.from_arrays(pa.array([0, 1, 2, 3, 4], pa.int32()), ids)
    path = str(tmp_path / "u.parquet")
    pq.write_table(pa.table({"u": column, "label": pa.array([0, 1, 0, 1], pa.int8())}), path)
    plain = DatasetSchema("s", [FieldSpec("u", kind, 10, max_length=4 if kind == FieldKind.SEQUENCE else 0)],
                          row_key=None)
    with pytest.raises(DataError, match=rf"u\.parquet: column 'u', row 1: id {big} in {kind.value} field 'u' is >= "
                                        r"cardinality 10"):
        list(ParquetBatchReader(plain, path, 4, prefetch=0))
    hashed = DatasetSchema("s", [dataclasses.replace(plain.fields[0], hashed=True)], row_key=None)
    batch = next(iter(ParquetBatchReader(hashed, path, 4, prefetch=0)))
    folded = batch.sparse_features["u"].values()
    assert folded.tolist() == [1, (big - 2**64) % 10, 2, (2**63 + 1 - 2**64) % 10]
    served = IdRules({"u": 10}, {"u": True}, {})(KeyedJaggedTensor.from_lengths_sync(
        ["u"], torch.tensor([1, big - 2**64, 2, 2**63 + 1 - 2**64]), torch.ones(4, dtype=torch.int64)))
    assert served.values().tolist() == folded.tolist()


def test_a_uint64_row_key_above_the_int64_range_is_refused_naming_the_row(tmp_path):
    """Batches carry row keys as int64: a larger uint64 key would wrap to a negative ``row_id``."""
    schema = DatasetSchema("s", [FieldSpec("u", FieldKind.SPARSE, 7)], row_key="key")
    path = str(tmp_path / "k.parquet")
    keys = pa.array([0, 1, 2, 2**63], pa.uint64())
    pq.write_table(pa.table({"u": pa.array([1, 2, 3, 4], pa.int64()), "label": pa.array([0, 1, 0, 1], pa.int8()),
                             "key": keys}), path, row_group_size=2)
    with pytest.raises(DataError, match=rf"k\.parquet: extra column 'key', row 3: value {2**63} is above 2\*\*63 - 1"):
        list(ParquetBatchReader(schema, path, 4, prefetch=0))
    pq.write_table(pa.table({"u": pa.array([1, 2], pa.int64()), "label": pa.array([0, 1], pa.int8()),
                             "key": pa.array([5, 2**63 - 1], pa.uint64())}), path)
    assert next(iter(ParquetBatchReader(schema, path, 4, prefetch=0))).extras["row_id"].tolist() == [5, 2**63 - 1]


@pytest.mark.parametrize("hashed", [False, True])
def test_null_in_a_sparse_column_names_file_column_and_row_without_validation(tmp_path, hashed):
    """Like a null inside a sequence: a null id has no id, so even ``validate=False`` refuses it
    (it used to become the int64 minimum: named as a negative id, or folded into a real id if hashed)."""
    schema = DatasetSchema("s", [FieldSpec("u", FieldKind.SPARSE, 7, hashed=hashed)], row_key=None)
    path = str(tmp_path / "n.parquet")
    pq.write_table(pa.table({"u": pa.array([1, 2, 3, None], pa.int64()),
                             "label": pa.array([0, 1, 0, 1], pa.int8())}), path, row_group_size=2)
    for validate in (True, False):
        with pytest.raises(DataError, match=r"n\.parquet: column 'u', row 3: null value; expected an id in \[0, 7\)"):
            list(ParquetBatchReader(schema, path, 4, prefetch=0, validate=validate))


def test_a_split_rewritten_with_the_same_footers_but_other_rows_has_another_fingerprint(tmp_path) -> None:
    """Two labels swapped and the file written again by the same writer: the footers (row counts, sizes, column
    statistics) came out byte for byte the same, and a resume trained on the other labels without a word."""
    from recsys_llm.data.parquet_files import same_split_fingerprint, split_fingerprint

    schema = DatasetSchema(name="toy", fields=[FieldSpec("item_id", cardinality=10)], splits={"train": "train.parquet"},
                           root=str(tmp_path))
    labels = [0, 1] * 50

    def write(labels) -> str:
        pq.write_table(pa.table({"item_id": pa.array([i % 10 for i in range(100)], pa.int64()),
                                 "label": pa.array(labels, pa.int64())}), str(tmp_path / "train.parquet"))
        return split_fingerprint(schema, "train")

    before = write(labels)
    footers = pq.ParquetFile(str(tmp_path / "train.parquet")).metadata.to_dict()
    swapped = write([1, 0] + labels[2:])
    assert pq.ParquetFile(str(tmp_path / "train.parquet")).metadata.to_dict() == footers  # what was compared
    assert not same_split_fingerprint(before, swapped)
    assert same_split_fingerprint(before, write(labels))  # the same rows written again: the same data
    footers_only = split_fingerprint(schema, "train", content_max_bytes=0)  # a split over the limit
    assert "+" not in footers_only and same_split_fingerprint(footers_only, before)
    assert same_split_fingerprint(before, footers_only)  # either way round
    assert same_split_fingerprint(before.partition("+")[0], swapped)  # a record of an older version: footers only


def test_a_data_sets_directory_read_as_one_split_is_refused_naming_its_splits(synthetic) -> None:
    """`evaluate --split data/synthetic` scored train, valid and test together (every *.parquet in the directory)."""
    from recsys_llm.data.parquet_files import parquet_files

    with pytest.raises(DataError, match=r"a prepared data set's directory, holding the files of its splits "
                                        r"\['test', 'train', 'valid'\] \(its schema.json\)"):
        parquet_files(synthetic.root)
    with pytest.raises(DataError, match="holding the files of its splits"):
        ParquetBatchReader(synthetic, synthetic.root, batch_size=8)
    assert parquet_files(synthetic.split_path("test")) == [synthetic.split_path("test")]


@pytest.mark.parametrize("written", ["./{name}", "{root}/{name}", "../{base}/{name}"])
def test_a_data_sets_splits_are_found_however_its_schema_writes_their_paths(tmp_path, synthetic, written) -> None:
    import json
    import shutil

    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "data"
    root.mkdir()
    for name in ("train.parquet", "test.parquet"):
        shutil.copy(synthetic.split_path("test"), root / name)
    paths = {split: written.format(name=f"{split}.parquet", root=root, base=root.name) for split in ("train", "test")}
    (root / "schema.json").write_text(json.dumps({"splits": paths}))
    with pytest.raises(DataError, match=r"holding the files of its splits \['test', 'train'\]"):
        parquet_files(str(root))
    (root / "schema.json").write_text("[" * 100_000 + "]" * 100_000)  # no schema of a data set: read as a split
    assert len(parquet_files(str(root))) == 2


def test_a_split_directory_beside_its_schema_is_read(tmp_path, synthetic) -> None:
    """A data set of one split kept as the directory that also holds schema.json (splits: {train: "."}) is no mix."""
    import json
    import shutil

    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "one_split"
    root.mkdir()
    shutil.copy(synthetic.split_path("train"), root / "part-0.parquet")
    (root / "schema.json").write_text(json.dumps({"splits": {"train": "."}}))
    assert parquet_files(str(root)) == [str(root / "part-0.parquet")]


@pytest.mark.parametrize("written", ["{name}", "{name}/part-0.parquet"], ids=["split directories", "files below"])
def test_a_data_sets_directory_whose_splits_lie_below_it_is_read_as_its_own_files(tmp_path, synthetic,
                                                                                  written) -> None:
    """Splits kept in subdirectories (train/, or train/part-0.parquet) are not filed in the data set's directory:
    a *.parquet file beside schema.json is one split's data, not a mix of the splits below it."""
    import json
    import shutil

    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "data"
    for split in ("train", "test"):
        (root / split).mkdir(parents=True)
        shutil.copy(synthetic.split_path("test"), root / split / "part-0.parquet")
    shutil.copy(synthetic.split_path("test"), root / "extra.parquet")
    (root / "schema.json").write_text(json.dumps({"splits": {s: written.format(name=s) for s in ("train", "test")}}))
    assert parquet_files(str(root)) == [str(root / "extra.parquet")]


def test_one_split_filed_beside_the_schema_is_no_mix(tmp_path, synthetic) -> None:
    """Only several splits' files in one directory are mixed when it is read as a split: one is read."""
    import json
    import shutil

    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "data"
    (root / "test").mkdir(parents=True)
    shutil.copy(synthetic.split_path("train"), root / "train.parquet")
    shutil.copy(synthetic.split_path("test"), root / "test" / "part-0.parquet")
    (root / "schema.json").write_text(json.dumps({"splits": {"train": "train.parquet", "test": "test"}}))
    assert parquet_files(str(root)) == [str(root / "train.parquet")]


@pytest.mark.parametrize("splits", [["train", "test"], {"train": 3, "test": None}, "train.parquet"],
                         ids=["a list", "paths not strings", "a string"])
def test_a_schema_json_whose_splits_are_no_mapping_of_paths_is_no_data_sets(tmp_path, synthetic, splits) -> None:
    """Another tool's schema.json beside Parquet files: its 'splits' are not read as ours (no TypeError or
    AttributeError from reading them), and the directory is read as one split."""
    import json
    import shutil

    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "data"
    root.mkdir()
    for name in ("train.parquet", "test.parquet"):
        shutil.copy(synthetic.split_path("test"), root / name)
    (root / "schema.json").write_text(json.dumps({"splits": splits}))
    assert len(parquet_files(str(root))) == 2


@pytest.mark.parametrize("entry", ["dt=2026-12-02/part-0.parquet", "b.pq", "c.PARQUET", "000000_0"],
                         ids=["hive partition", "pq suffix", "upper case suffix", "hive file name"])
def test_data_a_directory_would_leave_unread_is_refused_naming_it(tmp_path, entry) -> None:
    """A directory read as one input takes its *.parquet files: a Hive partition directory beside them, or a
    Parquet file of another name, would be left out without a word (its rows lost), so it is refused, naming it;
    Spark's _SUCCESS, .crc files, _temporary and other (non-partition) subdirectories are not data."""
    from recsys_llm.data.parquet_files import parquet_files

    root = tmp_path / "data"
    (root / "_temporary" / "0").mkdir(parents=True)
    (root / "train").mkdir()
    table = pa.table({"x": [1, 2]})
    pq.write_table(table, root / "part-00000-c000.snappy.parquet")
    pq.write_table(table, root / "_temporary" / "0" / "part-1.parquet")
    (root / "_SUCCESS").write_bytes(b"")
    (root / ".part-00000-c000.snappy.parquet.crc").write_bytes(b"crc")
    assert parquet_files(str(root)) == [str(root / "part-00000-c000.snappy.parquet")]
    (root / entry).parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, root / entry)
    with pytest.raises(DataError, match=re.escape(entry.split("/")[0])):
        parquet_files(str(root))


def test_a_directory_of_hive_partitions_alone_is_refused_as_such(tmp_path) -> None:
    from recsys_llm.data.parquet_files import parquet_files

    for day in ("dt=2026-12-01", "dt=2026-12-02"):
        (tmp_path / day).mkdir()
        pq.write_table(pa.table({"x": [1]}), tmp_path / day / "part-0.parquet")
    with pytest.raises(DataError, match=r"Hive-style partition directories \['dt=2026-12-01', 'dt=2026-12-02'\]"):
        parquet_files(str(tmp_path))


def test_a_splits_fingerprint_is_the_same_for_a_copy_and_for_its_file_named_by_path(tmp_path) -> None:
    """The fingerprint names the split's files relative to the split itself: a copy of the data elsewhere, or the
    split's file passed by its path (``score --split data/test.parquet``), gives the same fingerprint."""
    from recsys_llm.data.parquet_files import split_fingerprint

    fingerprints = []
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        pq.write_table(pa.table({"item_id": pa.array(range(10), pa.int64())}), str(tmp_path / name / "train.parquet"))
        schema = DatasetSchema(name="toy", fields=[FieldSpec("item_id", cardinality=10)],
                               splits={"train": "train.parquet"}, root=str(tmp_path / name))
        fingerprints += [split_fingerprint(schema, "train"), split_fingerprint(schema, schema.split_path("train"))]
    assert len(set(fingerprints)) == 1, fingerprints
