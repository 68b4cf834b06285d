"""Bring-your-own data: CSV/Parquet + user schema file -> validated Parquet splits."""

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.tabular import TabularConfig, prepare_tabular
from recsys_llm.data.validation import DataError

SCHEMA = {
    "name": "shop",
    "label": "clicked",
    "row_key": "impression",
    "extra_columns": ["ts"],
    "fields": [
        {"name": "user", "kind": "sparse", "cardinality": 100, "description": "shopper id"},
        {"name": "city", "kind": "sparse", "cardinality": 10, "description": "city of the shopper"},
        {"name": "query", "kind": "sparse", "cardinality": 50, "hashed": True, "description": "search query"},
        {"name": "cats", "kind": "sequence", "cardinality": 6, "max_length": 2, "description": "product categories"},
        {"name": "price", "kind": "dense", "description": "price"},
    ],
}
CITIES = ["Paris", "Lyon", "Nice", "Lille"]
CATS = ["shoes", "bags", "hats", "coats", "socks"]


def _rows(n=200, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "impression": np.arange(1000, 1000 + n),
        "user": rng.integers(0, 100, n),
        "city": [CITIES[i] for i in rng.integers(0, 4, n)],
        "query": [f"q{i}" for i in rng.integers(0, 500, n)],
        "cats": ["|".join(CATS[j] for j in rng.choice(5, size=k, replace=False)) for k in rng.integers(0, 4, n)],
        "price": rng.random(n).round(3),
        "clicked": rng.integers(0, 2, n),
        "ts": rng.permutation(n),
    }


def _csv(path, rows):
    names = list(rows)
    with open(path, "w") as handle:
        handle.write(",".join(names) + "\n")
        for i in range(len(rows["user"])):
            handle.write(",".join(str(rows[k][i]) for k in names) + "\n")
    return str(path)


def _schema_file(tmp_path, raw=None, yaml_format=False):
    path = tmp_path / ("schema.yaml" if yaml_format else "schema.json")
    path.write_text(yaml.safe_dump(raw or SCHEMA) if yaml_format else json.dumps(raw or SCHEMA))
    return str(path)


def test_csv_time_split_vocab_and_text(tmp_path):
    rows = _rows()
    schema = prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path, yaml_format=True),
                             str(tmp_path / "out"), TabularConfig(split_by="ts"))
    tables = {s: pq.read_table(schema.split_path(s)) for s in schema.splits}
    assert [t.num_rows for t in tables.values()] == [160, 20, 20]
    assert tables["train"]["ts"].to_numpy().max() < tables["valid"]["ts"].to_numpy().min()
    assert tables["valid"]["ts"].to_numpy().max() < tables["test"]["ts"].to_numpy().min()
    train = tables["train"].to_pydict()
    by_key = {k: i for i, k in enumerate(rows["impression"])}
    city_text = schema.load_value_text("city")["text"].to_pylist()
    cat_text = schema.load_value_text("cats")["text"].to_pylist()
    assert city_text == ["unknown"] + sorted(CITIES)
    for j in range(0, 160, 17):
        i = by_key[train["impression"][j]]
        assert city_text[train["city"][j]] == rows["city"][i]
        assert [cat_text[c] for c in train["cats"][j]] == [c for c in rows["cats"][i].split("|") if c]
        assert train["user"][j] == rows["user"][i] and train["clicked"][j] == rows["clicked"][i]
        assert 1 <= train["query"][j] < 50
    assert schema.field("city").value_text == "text/city.parquet"
    batches = list(ParquetBatchReader(schema, "train", 64, extras=["ts"]))
    assert sum(b.batch_size for b in batches) == 160
    assert set(batches[0].extras) == {"row_id", "ts"}


def test_parquet_random_split_is_seeded(tmp_path):
    rows = _rows(300)
    table = pa.table({**rows, "cats": pa.array([[CATS.index(c) + 1 for c in r.split("|") if c] for r in rows["cats"]])})
    pq.write_table(table, tmp_path / "d.parquet")
    schema_path = _schema_file(tmp_path)
    a = prepare_tabular(str(tmp_path / "d.parquet"), schema_path, str(tmp_path / "a"), TabularConfig(seed=1))
    b = prepare_tabular(str(tmp_path / "d.parquet"), schema_path, str(tmp_path / "b"), TabularConfig(seed=1))
    ids_a = pq.read_table(a.split_path("test"))["impression"].to_numpy()
    np.testing.assert_array_equal(ids_a, pq.read_table(b.split_path("test"))["impression"].to_numpy())
    sizes = [pq.read_metadata(a.split_path(s)).num_rows for s in a.splits]
    assert sum(sizes) == 300 and 200 < sizes[0] < 280
    np.testing.assert_array_equal(np.sort(np.concatenate([pq.read_table(a.split_path(s))["impression"].to_numpy()
                                                          for s in a.splits])), rows["impression"])


def test_too_many_distinct_values_for_cardinality(tmp_path):
    raw = json.loads(json.dumps(SCHEMA))
    raw["fields"][1]["cardinality"] = 3
    with pytest.raises(DataError, match=r"d\.csv: column 'city' has 4 distinct values.*cardinality >= 5"):
        prepare_tabular(_csv(tmp_path / "d.csv", _rows()), _schema_file(tmp_path, raw), str(tmp_path / "out"))


def test_missing_column_names_schema_and_file(tmp_path):
    rows = _rows()
    del rows["price"]
    with pytest.raises(DataError, match=r"d\.csv: missing column\(s\) \['price'\] named in .*schema\.json"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"))


def test_label_rule_and_bad_labels(tmp_path):
    rows = _rows()
    rows["clicked"] = np.arange(200) % 5 + 1  # ratings
    with pytest.raises(DataError, match=r"d\.csv: column 'clicked', row 1: label 2\.0 .*expected 0 or 1"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"))
    schema = prepare_tabular(str(tmp_path / "d.csv"), _schema_file(tmp_path), str(tmp_path / "out"),
                             TabularConfig(label_threshold=3))
    labels = np.concatenate([pq.read_table(schema.split_path(s))["clicked"].to_numpy() for s in schema.splits])
    assert labels.mean() == pytest.approx(0.4)


def test_missing_dense_is_error_unless_filled(tmp_path):
    rows = _rows()
    rows["price"] = ["" if i == 7 else "1.5" for i in range(200)]
    with pytest.raises(DataError, match=r"d\.csv: column 'price', row 7: null value"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"))
    schema = prepare_tabular(str(tmp_path / "d.csv"), _schema_file(tmp_path), str(tmp_path / "out"),
                             TabularConfig(fill_missing_dense=0.0))
    assert sum(pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits) == 200


def test_csv_with_a_quoted_header(tmp_path):
    """Headers as pyarrow, R's write.csv or csv.QUOTE_ALL write them."""
    import pyarrow.csv as pacsv

    rows = _rows()
    path = str(tmp_path / "quoted.csv")
    pacsv.write_csv(pa.table(rows), path, pacsv.WriteOptions(quoting_style="all_valid"))
    assert open(path).readline().startswith('"impression","user"')
    schema = prepare_tabular(path, _schema_file(tmp_path), str(tmp_path / "out"), TabularConfig(split_by="ts"))
    assert sum(pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits) == 200


# ---- the output is written whole or not at all ------------------------------------------------------
def _snapshot(directory):
    """Relative path -> bytes of every file under ``directory``."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as handle:
                files[os.path.relpath(path, directory)] = handle.read()
    return files


def _city_data(tmp_path, name, cities, prices, column="city"):
    rows = [f"{column},price,clicked"] + [f"{c},{prices[i]},{i % 2}" for i, c in enumerate(cities)]
    (tmp_path / name).write_text("\n".join(rows) + "\n")
    return str(tmp_path / name)


def _city_schema(tmp_path):
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    return _schema_file(tmp_path, raw)


def test_failed_conversion_leaves_the_earlier_output_byte_identical(tmp_path):
    schema_path, out = _city_schema(tmp_path), str(tmp_path / "out")
    first = _city_data(tmp_path, "a.csv", ["rome", "paris"] * 50, [0.5] * 100)
    prepare_tabular(first, schema_path, out)
    before = _snapshot(out)
    assert "text/city.parquet" in before and "schema.json" in before
    # other words (ids would mean other cities), then a missing price in the last row
    second = _city_data(tmp_path, "b.csv", ["oslo", "berlin"] * 50, [0.5] * 99 + [""])
    with pytest.raises(DataError, match=r"b\.csv: column 'price', row 99: null value"):
        prepare_tabular(second, schema_path, out)
    assert _snapshot(out) == before
    assert sorted(os.listdir(tmp_path)) == ["a.csv", "b.csv", "out", "schema.json"]  # no temp directory left


def test_empty_split_is_refused_before_replacing_the_earlier_output(tmp_path):
    schema_path, out = _city_schema(tmp_path), str(tmp_path / "out")
    prepare_tabular(_city_data(tmp_path, "a.csv", ["rome", "paris"] * 50, [0.5] * 100), schema_path, out)
    before = _snapshot(out)
    with pytest.raises(DataError, match=r"c\.csv: split 'test' received no rows of 2"):
        prepare_tabular(_city_data(tmp_path, "c.csv", ["lyon", "nice"], [1, 2]), schema_path, out)
    assert _snapshot(out) == before


def test_unrelated_directory_and_inputs_inside_the_output_are_refused(tmp_path):
    schema_path, out = _city_schema(tmp_path), tmp_path / "out"
    data = _city_data(tmp_path, "a.csv", ["rome", "paris"] * 50, [0.5] * 100)
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"out: not empty and not an earlier prepared data set.*notes\.txt"):
        prepare_tabular(data, schema_path, str(out))
    assert os.listdir(out) == ["notes.txt"]
    (out / "notes.txt").unlink()
    prepare_tabular(data, schema_path, str(out))
    inside = _city_data(out, "again.csv", ["rome", "paris"] * 50, [0.5] * 100)
    with pytest.raises(ValueError, match=r"out: the output directory holds the input .*again\.csv"):
        prepare_tabular(inside, schema_path, str(out))
    assert os.path.exists(inside)


def test_zero_split_share_is_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"TabularConfig\.split_fractions=\(0\.5, 0\.5, 0\): expected three positive"):
        TabularConfig(split_fractions=(0.5, 0.5, 0))


def test_csv_words_like_na_and_null_are_values_only_the_empty_cell_is_missing(tmp_path):
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "country", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    schema_path = _schema_file(tmp_path, raw)
    countries = ["NA", "DE", "null", "N/A", ""] * 20
    prices = ["1.5"] * 99 + ["NA"]  # numeric columns keep the usual missing markers
    data = _city_data(tmp_path, "d.csv", countries, prices, column="country")
    with pytest.raises(DataError, match=r"d\.csv: column 'price', row 99: null value"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(fill_missing_dense=0.0))
    text = schema.load_value_text("country")["text"].to_pylist()
    assert text == ["unknown", "DE", "N/A", "NA", "null"]
    ids = np.concatenate([pq.read_table(schema.split_path(s))["country"].to_numpy() for s in schema.splits])
    assert sorted(np.bincount(ids).tolist()) == [20] * 5  # four words and the missing id 0, 20 rows each
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out2"),
                             TabularConfig(fill_missing_dense=0.0, missing_tokens=("", "NA", "N/A")))
    assert schema.load_value_text("country")["text"].to_pylist() == ["unknown", "DE", "null"]


def test_a_missing_marker_among_integer_ids_is_missing_not_a_vocabulary(tmp_path):
    """R's write.csv writes NA for a missing id: the ids stay ids, NA becomes id 0."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "item", "kind": "sparse", "cardinality": 100},
                                                       {"name": "price", "kind": "dense"}]}
    schema_path = _schema_file(tmp_path, raw)
    items = ["70", "71", "72", "NA"] * 25
    schema = prepare_tabular(_city_data(tmp_path, "i.csv", items, [0.5] * 100, column="item"), schema_path,
                             str(tmp_path / "out"))
    assert schema.field("item").value_text is None  # no vocabulary was built
    ids = np.concatenate([pq.read_table(schema.split_path(s))["item"].to_numpy() for s in schema.splits])
    assert sorted(set(ids.tolist())) == [0, 70, 71, 72] and int((ids == 0).sum()) == 25
