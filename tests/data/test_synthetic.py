"""The embedded synthetic data: deterministic, cold items in valid/test only, clicks driven by text."""

import os

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torchmetrics.functional.classification import binary_auroc

from recsys_llm.data.parquet_files import read_schema_and_check
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import ITEM_CATALOG, ITEM_FIELDS, TOPIC_NAMES, TOPICS, generate_synthetic, topic_similarity


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("syn"))
    schema = generate_synthetic(out, 60_000, seed=7, rows_per_group=8192)
    return schema, {s: pq.read_table(schema.split_path(s)) for s in schema.splits}


def _auc(score: np.ndarray, label: np.ndarray) -> float:
    return float(binary_auroc(torch.as_tensor(score, dtype=torch.float32), torch.as_tensor(label, dtype=torch.long)))


def test_layout_and_schema(data):
    schema, tables = data
    assert [t.num_rows for t in tables.values()] == [48_000, 6_000, 6_000]
    np.testing.assert_array_equal(np.concatenate([t["row_id"].to_numpy() for t in tables.values()]), np.arange(60_000))
    reloaded = DatasetSchema.load(os.path.join(schema.root, "schema.json"))
    assert reloaded.fingerprint() == schema.fingerprint()
    assert reloaded.extra_columns == ["is_cold_item"]
    for split in schema.splits:
        assert read_schema_and_check(reloaded, split) == tables[split].num_rows
    for spec in schema.fields:
        assert spec.description
        if spec.is_categorical:
            text = schema.load_value_text(spec.name)
            assert text.num_rows == spec.cardinality  # every id has text
    assert pq.ParquetFile(schema.split_path("train")).metadata.num_row_groups == 6


def test_deterministic(tmp_path, data):
    a = generate_synthetic(str(tmp_path / "a"), 3000, seed=11, rows_per_group=500)
    b = generate_synthetic(str(tmp_path / "b"), 3000, seed=11, rows_per_group=500)
    c = generate_synthetic(str(tmp_path / "c"), 3000, seed=12, rows_per_group=500)
    for split in a.splits:
        assert pq.read_table(a.split_path(split)).equals(pq.read_table(b.split_path(split)))
    assert not pq.read_table(a.split_path("train")).equals(pq.read_table(c.split_path("train")))
    assert a.load_value_text("item_id").equals(b.load_value_text("item_id"))


def test_cold_items_never_in_train(data):
    _, tables = data
    train_items = set(tables["train"]["item_id"].to_numpy().tolist())
    assert tables["train"]["is_cold_item"].to_numpy().sum() == 0
    for split in ("valid", "test"):
        items = tables[split]["item_id"].to_numpy()
        cold = tables[split]["is_cold_item"].to_numpy().astype(bool)
        assert 0.2 < cold.mean() < 0.4
        assert not set(items[cold].tolist()) & train_items
        assert set(items[~cold].tolist()) <= train_items


def test_item_catalogue_lists_every_item_with_the_fields_its_rows_carry(data):
    schema, tables = data
    catalog = pq.read_table(os.path.join(schema.root, ITEM_CATALOG))
    items = catalog["item_id"].to_numpy()
    np.testing.assert_array_equal(items, np.arange(1, schema.field("item_id").cardinality))
    by_item = {name: catalog[name].to_pylist() for name in ITEM_FIELDS}
    for split, table in tables.items():
        rows = table.slice(0, 2000)
        index = rows["item_id"].to_numpy() - 1
        for name in ITEM_FIELDS:
            assert rows[name].to_pylist() == [by_item[name][i] for i in index], (split, name)
    cold = catalog["is_cold_item"].to_numpy().astype(bool)
    train_items = set(tables["train"]["item_id"].to_numpy().tolist())
    assert cold.any() and not set(items[cold].tolist()) & train_items  # cold items are listed too


def _text_topics(schema):
    """Topic weights read back from the TEXT only: users by the words they mention, items by their description."""
    word_topic = {w: t for t, name in enumerate(TOPIC_NAMES) for w in TOPICS[name]}
    def weights(texts):
        out = np.zeros((len(texts), len(TOPIC_NAMES)))
        for i, text in enumerate(texts):
            for word, topic in word_topic.items():
                if word in text:
                    out[i, topic] += 1
        return out / np.maximum(out.sum(axis=1, keepdims=True), 1)
    return (weights(schema.load_value_text("user_id")["text"].to_pylist()),
            weights(schema.load_value_text("item_id")["text"].to_pylist()))


def test_text_semantics_predict_cold_clicks_better_than_ids(data):
    """On cold test rows, a score computed from user and item text beats the best ID-only signal."""
    schema, tables = data
    users_t, items_t = _text_topics(schema)
    train, test = tables["train"], tables["test"]
    cold = test["is_cold_item"].to_numpy().astype(bool)
    user, item, label = (test[c].to_numpy()[cold] for c in ("user_id", "item_id", "label"))
    text_score = ((users_t[user] @ topic_similarity()) * items_t[item]).sum(axis=1)
    # ID-only: an unseen item id carries nothing, so the best an ID model has is the user's training click rate
    clicks = np.bincount(train["user_id"].to_numpy(), weights=train["label"].to_numpy(), minlength=users_t.shape[0])
    shown = np.bincount(train["user_id"].to_numpy(), minlength=users_t.shape[0])
    user_ctr = (clicks + 1) / (shown + 3)
    text_auc, id_auc = _auc(text_score, label), _auc(user_ctr[user], label)
    assert text_auc > 0.68, text_auc
    assert text_auc > id_auc + 0.05, (text_auc, id_auc)


def test_prepare_dataset_passes_every_synthetic_setting(tmp_path) -> None:
    """cold_row_fraction and affinity_weight used to be dropped on the way to the generator."""
    import dataclasses

    import pyarrow.parquet as pq

    from recsys_llm.data.prepare import prepare_dataset
    from recsys_llm.data.synthetic import SyntheticConfig

    base = SyntheticConfig(num_rows=4000, seed=1)
    cold = []
    for name, config in (("base", base), ("no_cold_rows", dataclasses.replace(base, cold_row_fraction=0.0))):
        prepare_dataset("synthetic", str(tmp_path / name), config=config)
        cold.append(sum(pq.read_table(str(tmp_path / name / "test.parquet")).column("is_cold_item").to_pylist()))
    assert cold[0] > 0 and cold[1] == 0


@pytest.mark.parametrize("num_items, fraction", [(10, 0.96), (3, 0.9), (1, 0.6)])
def test_a_fraction_below_one_never_makes_every_item_cold(tmp_path, num_items, fraction) -> None:
    """round(0.96 * 10) made all 10 items cold: training then drew them anyway (marked is_cold_item = 1)."""
    schema = generate_synthetic(str(tmp_path / "out"), 2000, seed=0, num_items=num_items, cold_item_fraction=fraction)
    catalog = pq.read_table(os.path.join(schema.root, ITEM_CATALOG))
    assert 0 < catalog["is_cold_item"].to_numpy().sum() < num_items or num_items == 1
    train = pq.read_table(schema.split_path("train"))
    assert train["is_cold_item"].to_numpy().sum() == 0
    cold_items = set(catalog["item_id"].to_numpy()[catalog["is_cold_item"].to_numpy().astype(bool)].tolist())
    assert not cold_items & set(train["item_id"].to_numpy().tolist())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_the_cold_share_of_items_is_exact_and_drawn_from_real_item_ids(tmp_path, seed) -> None:
    """round(0.9 * 10) = 9 of the items 1..10 are cold, whatever the seed (never the padding id 0)."""
    schema = generate_synthetic(str(tmp_path / "out"), 1000, seed=seed, num_items=10, cold_item_fraction=0.9)
    catalog = pq.read_table(os.path.join(schema.root, ITEM_CATALOG))
    assert int(catalog["is_cold_item"].to_numpy().sum()) == 9


def test_splits_and_chunks_are_drawn_apart_and_the_seed_makes_the_world(tmp_path, monkeypatch) -> None:
    """Each split and each chunk of a split has its own random stream (valid is no copy of test, nor a chunk
    of the one before), and the seed draws the users and items too, not only the impressions."""
    import recsys_llm.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "CHUNK_ROWS", 1000)
    schema = generate_synthetic(str(tmp_path / "a"), 10_000, seed=3)
    tables = {s: pq.read_table(schema.split_path(s)) for s in schema.splits}
    assert [t.num_rows for t in tables.values()] == [8000, 1000, 1000]
    columns = ("user_id", "item_id", "hour_of_day", "label")
    assert not all(tables["valid"][c].equals(tables["test"][c]) for c in columns)
    train = tables["train"]
    assert not all(train.slice(0, 1000)[c].equals(train.slice(1000, 1000)[c]) for c in columns)
    other = generate_synthetic(str(tmp_path / "b"), 10_000, seed=4)
    for name in ("user_id", "item_id"):
        assert not schema.load_value_text(name).equals(other.load_value_text(name)), name


@pytest.mark.parametrize("num_rows, sizes", [(15, [12, 1, 2]), (19, [15, 1, 3]), (10, [8, 1, 1])])
def test_the_test_split_takes_the_rows_the_others_leave(tmp_path, num_rows, sizes) -> None:
    schema = generate_synthetic(str(tmp_path / "out"), num_rows, seed=0)
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == sizes


def test_hours_and_devices_are_ids_from_1_that_name_their_text(data) -> None:
    """Id 0 is the unknown value: hour h is id h + 1 (text "h:00, ..."), device d id d + 1."""
    schema, tables = data
    hours = np.concatenate([t["hour_of_day"].to_numpy() for t in tables.values()])
    devices = np.concatenate([t["device"].to_numpy() for t in tables.values()])
    assert (hours.min(), hours.max(), devices.min(), devices.max()) == (1, 24, 1, 3)
    assert schema.load_value_text("hour_of_day")["text"][1].as_py() == "0:00, in the night"
    assert schema.load_value_text("device")["text"][1].as_py() == "mobile phone"


def test_the_users_text_names_the_attributes_its_rows_carry(data) -> None:
    """"A female engineer aged 25 to 34 who ...": the gender, occupation and age group of the user's fields."""
    schema, tables = data
    text = {name: schema.load_value_text(name)["text"].to_pylist()
            for name in ("user_id", "user_gender", "user_occupation", "user_age_bucket")}
    rows = tables["train"].slice(0, 2000).to_pydict()
    for i in range(len(rows["user_id"])):
        words = [text[name][rows[name][i]] for name in ("user_gender", "user_occupation", "user_age_bucket")]
        assert text["user_id"][rows["user_id"][i]].startswith("A {} {} {} who".format(*words)), i


def test_the_tag_field_has_room_for_every_items_tags(data) -> None:
    schema, tables = data
    lengths = [len(tags) for t in tables.values() for tags in t["item_tags"].to_pylist()]
    assert max(lengths) == schema.field("item_tags").max_length == 3


def test_activity_is_a_logarithm(data) -> None:
    """user_activity_log is log(activity) of a lognormal(0, 0.8) activity: about normal(0, 0.8) over the users
    (negative for the less active ones), one value per user."""
    _, tables = data
    values, users = tables["train"]["user_activity_log"].to_numpy(), tables["train"]["user_id"].to_numpy()
    ids, first = np.unique(users, return_index=True)
    per_user = values[first]
    assert (per_user < 0).mean() > 0.3 and 0.6 < per_user.std() < 1.0, (per_user.mean(), per_user.std())
    assert all(len(np.unique(values[users == u])) == 1 for u in ids[:50])


def test_default_world_size_follows_the_rows() -> None:
    from recsys_llm.data.synthetic import SyntheticConfig

    assert (SyntheticConfig(num_rows=1000).users, SyntheticConfig(num_rows=1000).items) == (200, 100)
    assert (SyntheticConfig(num_rows=1_000_000).users, SyntheticConfig(num_rows=1_000_000).items) == (25_000, 10_000)
    assert (SyntheticConfig(num_rows=1000, num_users=7, num_items=5).users,
            SyntheticConfig(num_rows=1000, num_users=7, num_items=5).items) == (7, 5)
