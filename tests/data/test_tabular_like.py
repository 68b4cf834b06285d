"""``prepare tabular --like``: new raw rows prepared into the id space of an earlier ``prepare tabular`` output."""

import json
import os
import shutil
import warnings
import re
from typing import Dict

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys_llm.cli import main as cli_main
from recsys_llm.data.prepare import prepare_dataset
from recsys_llm.data.schema import DatasetSchema, SchemaError
from recsys_llm.data.synthetic import generate_synthetic
from recsys_llm.data.tabular import TabularConfig, prepare_tabular, prepare_tabular_like
from recsys_llm.data.tabular.raw_values import raw_value_ids
from recsys_llm.data.validation import DataError
from recsys_llm.file_hash import file_sha256
from recsys_llm.serving.scoring import check_artifact_fits, score_split
from recsys_llm.serving.served_model import ServedModel
from recsys_llm.train.config import PLUGINS_FILE, ConfigError, load_config, save_config
from recsys_llm.train.run_records import (
    SCHEMA_CONTENTS_KEY,
    SCHEMA_FINGERPRINT_KEY,
    VOCABULARIES_KEY,
    check_shared_fields,
    check_trained_on,
    trained_vocabularies,
)
from tests.small_artifact import export_small_deepfm, write_config_as_exported

SCHEMA = {
    "name": "shop",
    "label": "clicked",
    "row_key": "impression",
    "extra_columns": ["ts"],
    "fields": [
        {"name": "user", "kind": "sparse", "cardinality": 100, "description": "shopper id"},
        {"name": "city", "kind": "sparse", "cardinality": 10, "description": "city of the shopper"},
        {"name": "query", "kind": "sparse", "cardinality": 50, "hashed": True, "description": "search query"},
        {"name": "cats", "kind": "sequence", "cardinality": 8, "max_length": 3, "description": "product categories"},
        {"name": "price", "kind": "dense", "description": "price"},
    ],
}
DEEPFM_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                             "configs", "synthetic_deepfm.yaml")
CITIES = ["Paris", "Lyon", "Nice", "Lille"]
CATS = ["shoes", "bags", "hats", "coats", "socks"]
# new rows: an unseen city (Berlin), new queries, an unseen category (boots), a missing city and sequence
NEW = {
    "user": [3, 7, 99, 0],
    "city": ["Paris", "Berlin", "", "Lille"],
    "query": ["q1", "a brand new query", "q499", ""],
    "cats": ["shoes|boots", "boots", "", "hats|socks|bags"],
    "price": [1.5, 2.5, 0.25, 9.0],
}


def _csv(path, rows) -> str:
    names = list(rows)
    with open(path, "w") as handle:
        handle.write(",".join(names) + "\n")
        for i in range(len(rows[names[0]])):
            handle.write(",".join(str(rows[k][i]) for k in names) + "\n")
    return str(path)


def _old_rows(n=300, seed=0):
    rng = np.random.default_rng(seed)
    return {
        "impression": np.arange(1000, 1000 + n),
        "user": rng.integers(0, 100, n),
        "city": [CITIES[i] for i in rng.integers(0, 4, n)],
        "query": [f"q{i}" for i in rng.integers(0, 500, n)],
        "cats": ["|".join(CATS[j] for j in rng.choice(5, size=k, replace=False)) for k in rng.integers(1, 4, n)],
        "price": rng.random(n).round(3),
        "clicked": rng.integers(0, 2, n),
        "ts": rng.permutation(n),
    }


@pytest.fixture(scope="module")
def earlier(tmp_path_factory: pytest.TempPathFactory) -> Dict[str, str]:
    """A prepared tabular data set (vocabulary, hashed, integer-id, sequence and dense fields, a row key) and an
    artifact of a small DeepFM trained a few steps on it."""
    root = tmp_path_factory.mktemp("like")
    schema_path = str(root / "shop.yaml")
    with open(schema_path, "w") as handle:
        yaml.safe_dump(SCHEMA, handle)
    data = str(root / "shop")
    prepare_tabular(_csv(root / "old.csv", _old_rows()), schema_path, data)
    artifact = str(root / "artifact")
    export_small_deepfm(DatasetSchema.load(data), artifact, batch_size=64, steps=3)
    return {"data": data, "schema": schema_path, "artifact": artifact}


def test_new_rows_get_the_earlier_ids_and_schema(earlier: Dict[str, str], tmp_path) -> None:
    out = str(tmp_path / "day2")
    ways: Dict[str, str] = {}
    schema = prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], out, field_ways=ways)
    old = DatasetSchema.load(earlier["data"])
    saved = DatasetSchema.load(out)
    assert saved.fingerprint() == schema.fingerprint() == old.fingerprint()
    assert saved.ids == old.ids == {"user": "integer", "city": "vocabulary", "query": "hashed_text",
                                    "cats": "vocabulary"}
    assert saved.splits == {"test": "test.parquet"} and saved.row_key == "impression" and saved.extra_columns == []
    # the values the earlier vocabularies lack (Berlin; boots twice), read as unknown, are counted in the report
    assert ways == {"user": "integer ids", "city": "vocabulary (1 of 3 values not in it: id 0, unknown)",
                    "query": "hashed text", "cats": "vocabulary (2 of 6 values not in it: id 0, unknown)"}
    assert sorted(os.listdir(out)) == ["schema.json", "test.parquet", "text"]
    for name in ("city", "cats"):  # the vocabularies, copied as they are
        assert pq.read_table(saved.value_text_path(name)).equals(pq.read_table(old.value_text_path(name)))
    table = pq.read_table(os.path.join(out, "test.parquet"))
    assert table.column_names == ["impression", "user", "city", "query", "cats", "price"]  # no label column
    assert table["impression"].to_pylist() == [0, 1, 2, 3]  # no row key in the input: rows numbered
    # a vocabulary field none of whose values the vocabulary holds (another form of them): a warning, not only a count
    with pytest.warns(UserWarning, match=r"new\.csv: none of the 4 values of field 'city' is in its vocabulary .*"
                                         r"every one got id 0 \(unknown\); are they written in another form"):
        prepare_tabular_like(_csv(tmp_path / "new.csv", dict(NEW, city=["1", "2", "3", "4"])), earlier["data"],
                             str(tmp_path / "numbers"))
    # named as a split training reads, rows without labels are written with a warning (training failed on them later)
    with pytest.warns(UserWarning, match=r"new\.csv: no label column 'clicked', so split 'train' is written without "
                                         r"labels, as rows to score"):
        prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], str(tmp_path / "train_day"),
                             split_name="train")
    for name in ("user", "city", "query"):
        expected, _ = raw_value_ids(old, name, [v if v != "" else None for v in NEW[name]])
        assert table[name].to_pylist() == expected.tolist()
    city = table["city"].to_pylist()
    assert city[1] == 0 and city[2] == 0 and city[0] > 0  # Berlin unseen, a missing city: 0
    flat, lengths = raw_value_ids(old, "cats", [v or None for v in NEW["cats"]])
    assert [len(c) for c in table["cats"].to_pylist()] == lengths.tolist() == [1, 0, 0, 3]  # boots dropped
    assert [i for c in table["cats"].to_pylist() for i in c] == flat.tolist()
    assert table["price"].to_pylist() == NEW["price"]


def test_labeled_rows_with_a_row_key_keep_them(earlier: Dict[str, str], tmp_path) -> None:
    rows = dict(NEW, impression=[7, 5, 9, 1], clicked=[0, 3, 1, 0], ts=[1, 2, 3, 4])
    path = _csv(tmp_path / "new.csv", rows)
    with pytest.raises(DataError, match=r"new\.csv: column 'clicked', data row 1.*3"):
        prepare_tabular_like(path, earlier["data"], str(tmp_path / "bad"))
    out = str(tmp_path / "day2")
    report = prepare_dataset("tabular", out, path, config=TabularConfig(label_threshold=0.5), like_dir=earlier["data"],
                             split_name="day2", progress=False)
    assert report.rows == {"day2": 4} and report.click_rate == {"day2": 0.5}
    table = pq.read_table(os.path.join(out, "day2.parquet"))
    assert table["impression"].to_pylist() == [7, 5, 9, 1] and table["clicked"].to_pylist() == [0, 1, 1, 0]
    assert table["ts"].to_pylist() == [1, 2, 3, 4] and report.schema.extra_columns == ["ts"]
    # written again over its earlier output
    prepare_tabular_like(path, earlier["data"], out, TabularConfig(label_threshold=0.5), split_name="day2")
    assert sorted(os.listdir(out)) == ["day2.parquet", "schema.json", "text"]


def test_an_integer_id_outside_the_table_names_file_column_and_row(earlier: Dict[str, str], tmp_path) -> None:
    path = _csv(tmp_path / "new.csv", dict(NEW, user=[3, 7, 100, 0]))
    with pytest.raises(DataError, match=r"new\.csv: column 'user'.*data row 2.*100"):
        prepare_tabular_like(path, earlier["data"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    # text in an integer-id field (the way the earlier schema records): arrow's parse error named no row
    path = _csv(tmp_path / "text_id.csv", dict(NEW, user=[3, 7, "u182", 0]))
    with pytest.raises(DataError, match=r"text_id\.csv: column 'user', data row 2.*'u182' is not an integer id; "
                                        r"expected integer ids in \[0, \d+\)"):
        prepare_tabular_like(path, earlier["data"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(DataError, match=r"missing column\(s\) \['price'\]"):
        prepare_tabular_like(_csv(tmp_path / "no_price.csv", {k: v for k, v in NEW.items() if k != "price"}),
                             earlier["data"], str(tmp_path / "out"))


def test_the_artifact_scores_the_new_rows(earlier: Dict[str, str], tmp_path, capsys) -> None:
    out = str(tmp_path / "day2")
    new = _csv(tmp_path / "new.csv", NEW)
    assert cli_main(["prepare", "tabular", "--input", new, "--like", earlier["data"], "--out", out, "--quiet"]) == 0
    assert "no labels" in capsys.readouterr().out
    assert cli_main(["score", "--artifact", earlier["artifact"], "--data", out, "--split", "test",
                     "--trust-program"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labeled"] is False and report["rows"] == 4 and "auc" not in report
    labeled = _csv(tmp_path / "labeled.csv", dict(NEW, clicked=[0, 1, 1, 0]))
    out2 = str(tmp_path / "day2-labeled")
    assert cli_main(["prepare", "tabular", "--input", labeled, "--like", earlier["data"], "--out", out2,
                     "--quiet"]) == 0
    capsys.readouterr()
    assert cli_main(["score", "--artifact", earlier["artifact"], "--data", out2, "--split", "test",
                     "--trust-program"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["labeled"] is True and 0.0 <= report["auc"] <= 1.0 and report["logloss"] > 0


@pytest.mark.parametrize("option", [["--split", "0.5,0.25,0.25"], ["--split-by", "ts"],
                                    ["--seed", "1"], ["--vocabulary", "user"], ["--hash", "query"]])
def test_options_the_earlier_preparation_decided_are_refused(earlier: Dict[str, str], tmp_path, capsys,
                                                             option) -> None:
    new = _csv(tmp_path / "new.csv", NEW)
    code = cli_main(["prepare", "tabular", "--input", new, "--like", earlier["data"], "--out", str(tmp_path / "o"),
                     "--quiet", *option])
    assert code != 0 and f"{option[0]} decided by the earlier preparation" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "o")


def test_split_name_without_like_and_like_of_other_data_are_refused(earlier: Dict[str, str], tmp_path,
                                                                    capsys) -> None:
    new = _csv(tmp_path / "new.csv", NEW)
    code = cli_main(["prepare", "tabular", "--input", new, "--schema", earlier["schema"], "--out",
                     str(tmp_path / "o"), "--split-name", "day2", "--quiet"])
    assert code != 0 and "--split-name" in capsys.readouterr().err
    code = cli_main(["prepare", "tabular", "--input", new, "--out", str(tmp_path / "o"), "--quiet"])
    assert code != 0 and "--schema" in capsys.readouterr().err
    synthetic = str(tmp_path / "synthetic")
    generate_synthetic(synthetic, 100, seed=0)
    with pytest.raises(ValueError, match=r"synthetic.*does not record how field\(s\)"):
        prepare_tabular_like(new, synthetic, str(tmp_path / "o"))
    with pytest.raises(ValueError, match="--vocabulary"):
        prepare_tabular_like(new, earlier["data"], str(tmp_path / "o"), TabularConfig(vocabulary_fields=("user",)))
    assert not os.path.exists(tmp_path / "o")


def test_a_directory_of_parquet_files_is_one_input(earlier: Dict[str, str], tmp_path) -> None:
    """Each file's rows in order, a dictionary-encoded string column and float ids with a null read as the CSV's."""
    new = tmp_path / "new"
    new.mkdir()
    pq.write_table(pa.table({"user": pa.array([3.0, None]), "city": pa.array(["Paris", "Berlin"]).dictionary_encode(),
                             "query": ["q1", None], "cats": ["shoes|boots", None], "price": [1.0, 2.0],
                             "clicked": [1, 0], "impression": [5, 6]}), new / "a.parquet")
    pq.write_table(pa.table({"user": pa.array([7.0, 99.0]), "city": pa.array(["Lyon", None]).dictionary_encode(),
                             "query": ["q2", "x"], "cats": ["hats", "bags|socks"], "price": [3.0, 4.0],
                             "clicked": [0, 1], "impression": [7, 8]}), new / "b.parquet")
    schema = prepare_tabular_like(str(new), earlier["data"], str(tmp_path / "out"))
    old = DatasetSchema.load(earlier["data"])
    table = pq.read_table(schema.split_path("test"))
    assert table["impression"].to_pylist() == [5, 6, 7, 8] and table["clicked"].to_pylist() == [1, 0, 0, 1]
    assert table["user"].to_pylist() == [3, 0, 7, 99]
    for name, values in (("city", ["Paris", "Berlin", "Lyon", None]), ("query", ["q1", None, "q2", "x"])):
        expected, _ = raw_value_ids(old, name, values)
        assert table[name].to_pylist() == expected.tolist(), name
    assert table["city"].to_pylist()[1] == 0 and table["city"].to_pylist()[0] > 0
    flat, lengths = raw_value_ids(old, "cats", ["shoes|boots", None, "hats", "bags|socks"])
    assert [len(c) for c in table["cats"].to_pylist()] == lengths.tolist() == [1, 0, 1, 2]
    assert [i for c in table["cats"].to_pylist() for i in c] == flat.tolist()


@pytest.mark.parametrize("option, flag", [({"split_fractions": (0.5, 0.25, 0.25)}, "--split"),
                                          ({"seed": 1}, "--seed"), ({"hash_fields": ("query",)}, "--hash"),
                                          ({"split_by": "ts"}, "--split-by")])
def test_python_options_the_earlier_preparation_decided_are_refused(earlier: Dict[str, str], tmp_path, option,
                                                                    flag) -> None:
    with pytest.raises(ValueError, match=rf"{flag} \(TabularConfig\) decided by the earlier preparation"):
        prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], str(tmp_path / "o"),
                             TabularConfig(**option))
    assert not os.path.exists(tmp_path / "o")


def test_an_extra_column_whose_type_changes_after_the_first_block(earlier: Dict[str, str], tmp_path) -> None:
    """The CSV read again with the whole file's types, as prepare tabular does."""
    n = 400
    rows = {name: [values[i % 4] for i in range(n)] for name, values in NEW.items()}
    rows.update(clicked=[i % 2 for i in range(n)], ts=[3.5 if i == 350 else i for i in range(n)])
    path = _csv(tmp_path / "new.csv", rows)
    schema = prepare_tabular_like(path, earlier["data"], str(tmp_path / "out"), TabularConfig(block_bytes=2000))
    table = pq.read_table(schema.split_path("test"))
    assert schema.extra_columns == ["ts"] and table.num_rows == n
    assert table["ts"].to_pylist() == [float(t) for t in rows["ts"]] and table["ts"].type == pa.float64()
    assert table["clicked"].to_pylist() == rows["clicked"]
    expected, _ = raw_value_ids(DatasetSchema.load(earlier["data"]), "city", [v or None for v in rows["city"]])
    assert table["city"].to_pylist() == expected.tolist()


def test_new_rows_get_the_ids_the_earlier_rows_of_the_same_values_got(earlier: Dict[str, str], tmp_path) -> None:
    """Checked against the earlier prepared rows themselves, not through raw_value_ids (which shares the plan):
    a vocabulary read one id off would map both alike. Missing-value markers of an integer-id field are id 0."""
    old = DatasetSchema.load(earlier["data"])
    old_rows, key = _old_rows(), old.row_key
    prepared = {}
    for split in old.splits:
        table = pq.read_table(old.split_path(split)).to_pydict()
        for i, impression in enumerate(table[key]):
            prepared[impression - 1000] = {name: table[name][i] for name in ("city", "cats")}
    first = {}  # value -> id in the earlier data
    for i, row in prepared.items():
        first.setdefault(old_rows["city"][i], row["city"])
        for token, token_id in zip(old_rows["cats"][i].split("|"), row["cats"]):
            first.setdefault(token, token_id)
    rows = dict(NEW, user=[3, "NA", "null", 0])
    schema = prepare_tabular_like(_csv(tmp_path / "new.csv", rows), earlier["data"], str(tmp_path / "out"))
    table = pq.read_table(schema.split_path("test"))
    assert table["city"].to_pylist() == [first["Paris"], 0, 0, first["Lille"]]
    assert table["cats"].to_pylist() == [[first["shoes"]], [], [], [first["hats"], first["socks"], first["bags"]]]
    assert table["user"].to_pylist() == [3, 0, 0, 0]


def test_a_repeated_column_and_a_bad_split_name_are_refused(earlier: Dict[str, str], tmp_path) -> None:
    path = tmp_path / "twice.csv"
    path.write_text("user,city,query,cats,price,city\n3,Paris,q1,shoes,1.5,Lyon\n")
    with pytest.raises(DataError, match=r"twice\.csv: column\(s\) \['city'\].*more than once"):
        prepare_tabular_like(str(path), earlier["data"], str(tmp_path / "o"))
    with pytest.raises(SchemaError, match="--split-name"):
        prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], str(tmp_path / "o"),
                             split_name="../day2")
    assert not os.path.exists(tmp_path / "o") and not os.path.exists(tmp_path / "day2.parquet")


def test_prepare_dataset_refuses_like_of_another_source_or_split_name_alone(earlier: Dict[str, str],
                                                                           tmp_path) -> None:
    new = _csv(tmp_path / "new.csv", NEW)
    out = str(tmp_path / "o")
    with pytest.raises(ValueError, match="expected source tabular"):
        prepare_dataset("criteo", out, new, like_dir=earlier["data"], progress=False)
    with pytest.raises(ValueError, match="expected it only with like_dir"):
        prepare_dataset("tabular", out, new, earlier["schema"], split_name="day2", progress=False)
    assert not os.path.exists(out)


def test_decided_options_given_at_their_default_values_are_accepted(earlier: Dict[str, str], tmp_path) -> None:
    config = TabularConfig(split_fractions=tuple([0.8, 0.1, 0.1]), seed=0, split_by=None, hash_fields=tuple([]),
                           vocabulary_fields=tuple([]))
    schema = prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], str(tmp_path / "o"), config)
    assert schema.splits == {"test": "test.parquet"}


# a day that brings two new cities (Berlin twice, Rome once) and new categories (boots twice, caps once)
GROWING = {
    "user": [3, 7, 99, 0, 5],
    "city": ["Paris", "Berlin", "Rome", "Berlin", ""],
    "query": ["q1", "q2", "q3", "q4", "q5"],
    "cats": ["shoes|boots", "boots", "caps", "", "hats"],
    "price": [1.0, 2.0, 3.0, 4.0, 5.0],
}


def test_grown_vocabularies_give_new_values_the_free_ids_most_frequent_first(earlier: Dict[str, str],
                                                                              tmp_path) -> None:
    """``--grow-vocabulary``: the values a vocabulary lacks take ids V+1.. of the field's table (Berlin, seen twice,
    before Rome); the earlier ids and the fingerprint stay; the value-text files hold the new values, so a later
    day prepared like the grown output gives them the same ids."""
    old = DatasetSchema.load(earlier["data"])
    out, ways = str(tmp_path / "day2"), {}
    prepare_tabular_like(_csv(tmp_path / "day2.csv", GROWING), earlier["data"], out, split_name="train",
                         field_ways=ways, grow_vocabulary=True)
    grown = DatasetSchema.load(out)
    assert grown.fingerprint() == old.fingerprint()
    # a run of the earlier data may train on it (its ids kept their values); the grown ids mean nothing earlier
    assert grown.changed_vocabularies(old.vocabulary_records()) == []
    assert old.changed_vocabularies(grown.vocabulary_records()) == ["cats", "city"]
    # rows of an earlier day for a model of the grown data: said so, not "prepared afresh"
    assert old.other_ids_cause(grown.vocabulary_records()).startswith(
        "the vocabulary of ['cats', 'city'] here holds fewer ids than the model's, which grew since")
    assert old.other_ids_cause() == "data of the same source prepared afresh, not --like the training data"
    cities = pq.read_table(old.value_text_path("city"))["text"].to_pylist()  # unknown + the 4 earlier cities
    assert pq.read_table(grown.value_text_path("city"))["text"].to_pylist() == cities + ["Berlin", "Rome"]
    assert ways["city"] == "vocabulary, 2 new values, ids 5-6" and ways["cats"] == "vocabulary, 2 new values, ids 6-7"
    assert ways["user"] == "integer ids" and ways["query"] == "hashed text"
    table = pq.read_table(os.path.join(out, "train.parquet"))
    assert table["city"].to_pylist() == [cities.index("Paris"), 5, 6, 5, 0]
    shoes = pq.read_table(old.value_text_path("cats"))["text"].to_pylist().index("shoes")
    assert table["cats"].to_pylist() == [[shoes, 6], [6], [7], [], [raw_value_ids(old, "cats", ["hats"])[0][0]]]
    day3 = str(tmp_path / "day3")
    prepare_tabular_like(_csv(tmp_path / "day3.csv", dict(GROWING, city=["Rome", "Berlin", "Nice", "Oslo", "Rome"])),
                         out, day3)
    assert pq.read_table(os.path.join(day3, "test.parquet"))["city"].to_pylist() == [6, 5, cities.index("Nice"), 0, 6]
    assert raw_value_ids(DatasetSchema.load(day3), "city", ["Berlin", "Oslo"])[0].tolist() == [5, 0]


def test_new_values_past_the_tables_free_ids_get_id_0_with_a_warning(earlier: Dict[str, str], tmp_path) -> None:
    """cats holds 5 values in a table of 8 rows: 2 ids are free, so the third new category gets id 0, said once."""
    rows = dict(GROWING, cats=["boots", "boots|caps", "caps|scarves", "boots", "scarves|belts"])
    out, ways = str(tmp_path / "day2"), {}
    with pytest.warns(UserWarning, match=r"field 'cats' met 4 values .* 2 more than its table has free ids "
                                         r"\(cardinality 8\); they get id 0"):
        prepare_tabular_like(_csv(tmp_path / "day2.csv", rows), earlier["data"], out, field_ways=ways,
                             grow_vocabulary=True)
    # 8 tokens written: scarves (twice) and belts, left out, are 3 of them
    assert ways["cats"] == "vocabulary, 2 new values, ids 6-7 (3 of 8 values not in it: id 0, unknown)"
    texts = pq.read_table(DatasetSchema.load(out).value_text_path("cats"))["text"].to_pylist()
    assert texts[6:] == ["boots", "caps"]  # boots in 3 rows, caps and scarves in 2 (the tie by value), belts in 1
    # a sequence drops the tokens left at id 0, as without growth
    assert pq.read_table(os.path.join(out, "test.parquet"))["cats"].to_pylist() == [[6], [6, 7], [7], [6], []]


def test_grow_vocabulary_is_refused_without_like(earlier: Dict[str, str], tmp_path, capsys) -> None:
    with pytest.raises(ValueError, match=r"grow_vocabulary \(--grow-vocabulary\).*only with like_dir \(--like\)"):
        prepare_dataset("tabular", str(tmp_path / "out"), _csv(tmp_path / "day2.csv", GROWING),
                        schema_path=earlier["schema"], grow_vocabulary=True, progress=False)
    argv = ["prepare", "tabular", "--input", str(tmp_path / "day2.csv"), "--like", earlier["data"], "--out",
            str(tmp_path / "cli"), "--grow-vocabulary", "--quiet"]
    assert cli_main(argv) == 0
    assert "city                 sparse" in capsys.readouterr().out
    assert raw_value_ids(DatasetSchema.load(str(tmp_path / "cli")), "city", ["Rome"])[0].tolist() == [6]


def test_data_prepared_afresh_instead_of_like_is_refused_where_its_ids_would_mean_other_values(
        earlier: Dict[str, str], tmp_path) -> None:
    """The same source prepared afresh keeps the schema fingerprint (sizes, not vocabularies) while a value first
    seen on the new day (Berlin, boots) sorts in between the earlier ones: a run or artifact of the earlier data
    refuses it, naming the fields and ``--like``; data prepared ``--like`` passes."""
    old = DatasetSchema.load(earlier["data"])
    labeled = _csv(tmp_path / "new.csv", dict(NEW, clicked=[0, 1, 1, 0]))
    like = prepare_tabular_like(labeled, earlier["data"], str(tmp_path / "like"), split_name="train")
    rows = _old_rows(seed=1)
    rows["city"][:3], rows["cats"][:3] = ["Berlin"] * 3, ["boots"] * 3
    fresh_dir = str(tmp_path / "fresh")
    prepare_tabular(_csv(tmp_path / "day2.csv", rows), earlier["schema"], fresh_dir)
    fresh = DatasetSchema.load(fresh_dir)
    assert fresh.fingerprint() == like.fingerprint() == old.fingerprint()
    assert set(old.vocabulary_records()) == {"city", "cats"}  # not the integer or hashed fields
    assert like.vocabulary_records() == old.vocabulary_records() != fresh.vocabulary_records()
    assert fresh.changed_vocabularies(old.vocabulary_records()) == ["cats", "city"]

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved_config = str(run_dir / "config.yaml")
    save_config(load_config(DEEPFM_CONFIG, [f"data.schema={earlier['data']}"]), saved_config)
    record = {SCHEMA_FINGERPRINT_KEY: old.fingerprint()}
    (run_dir / PLUGINS_FILE).write_text(json.dumps(record))
    check_trained_on(fresh, saved_config, "train.init_from=runs/day1")  # a run written before they were recorded
    assert trained_vocabularies(saved_config) == {}
    (run_dir / PLUGINS_FILE).write_text(json.dumps({**record, VOCABULARIES_KEY: old.vocabulary_records()}))
    assert trained_vocabularies(saved_config) == old.vocabulary_records()
    check_trained_on(like, saved_config, "train.init_from=runs/day1")
    with pytest.raises(ConfigError, match=r"train\.init_from=runs/day1: the vocabulary of field\(s\) \['cats', "
                                          r"'city'\] in .*fresh is not the one the run trained on.*--like "
                                          + re.escape(earlier["data"])):
        check_trained_on(fresh, saved_config, "train.init_from=runs/day1")

    served = ServedModel.load(earlier["artifact"], trust_program=True)
    assert served.vocabularies == old.vocabulary_records()  # export_task records them from its schema
    served._config["metadata"] = {}
    check_artifact_fits(served, fresh)  # an artifact exported before they were recorded
    served._config["metadata"] = {"vocabularies": old.vocabulary_records()}
    check_artifact_fits(served, like)
    with pytest.raises(ValueError, match=r"fresh/schema\.json: the vocabulary of field\(s\) \['cats', 'city'\] is "
                                         r"not the one the artifact's model was trained on.*--like"):
        check_artifact_fits(served, fresh)


def test_a_run_taking_the_shared_tables_checks_the_vocabularies_of_the_shared_fields_alone(
        earlier: Dict[str, str], tmp_path) -> None:
    """``train.init_scope=tables`` (check_shared_fields): a shared field whose ids mean other values is refused, naming
    it; a grown vocabulary passes; a field the earlier run lacked (a new column) is not compared."""
    old = DatasetSchema.load(earlier["data"])
    rows = _old_rows(seed=1)
    rows["city"][:3] = ["Berlin"] * 3  # sorts in between the earlier cities: their ids shift
    fresh_dir = str(tmp_path / "fresh")
    prepare_tabular(_csv(tmp_path / "day2.csv", rows), earlier["schema"], fresh_dir)
    fresh = DatasetSchema.load(fresh_dir)
    assert fresh.changed_vocabularies(old.vocabulary_records()) == ["city"]
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved_config = str(run_dir / "config.yaml")
    save_config(load_config(DEEPFM_CONFIG, [f"data.schema={earlier['data']}"]), saved_config)

    def record(without: str = "") -> None:  # the earlier run's plugins.json, trained without the field ``without``
        contents = old.fingerprinted()
        contents = {**contents, "fields": [field for field in contents["fields"] if field["name"] != without]}
        vocabularies = {name: value for name, value in old.vocabulary_records().items() if name != without}
        (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: "earlier", SCHEMA_CONTENTS_KEY: contents,
                                                        VOCABULARIES_KEY: vocabularies}))

    record()
    with pytest.raises(ConfigError, match=r"train\.init_from=runs/day1: the vocabulary of field\(s\) \[.*'city'"):
        check_shared_fields(fresh, saved_config, "train.init_from=runs/day1")
    grown = DatasetSchema.load(_grown_day(earlier, tmp_path))
    assert "city" in check_shared_fields(grown, saved_config, "day2")
    record(without="cats")  # cats is the day's new field: its table starts fresh, whatever its ids
    shared = check_shared_fields(grown, saved_config, "day2")
    assert "cats" not in shared and "city" in shared
    # city new today moves query, a hashed-text field after it, whose position salts its hash: other rows
    record(without="city")
    with pytest.raises(ConfigError, match=r"field 'query' \(hashed text\): position 1 -> 2"):
        check_shared_fields(fresh, saved_config, "train.init_from=runs/day1")


def test_a_run_that_recorded_no_schema_contents_gives_its_tables_only_for_data_of_its_fingerprint(
        earlier: Dict[str, str], tmp_path) -> None:
    """``check_shared_fields`` of a run written before runs recorded their schema contents: it cannot tell which
    fields both share, so data of another fingerprint is refused (not every field taken as shared, whatever it now
    means); data of its own fingerprint shares every field."""
    old = DatasetSchema.load(earlier["data"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved_config = str(run_dir / "config.yaml")
    save_config(load_config(DEEPFM_CONFIG, [f"data.schema={earlier['data']}"]), saved_config)
    (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: "earlier"}))
    with pytest.raises(ConfigError, match=r"day1: trained on data with schema fingerprint earlier, .*recorded no "
                                          r"schema contents"):
        check_shared_fields(old, saved_config, "day1")
    (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: old.fingerprint()}))
    assert check_shared_fields(old, saved_config, "day1") == [spec.name for spec in old.fields]


def _grown_day(earlier: Dict[str, str], tmp_path) -> str:
    """The next day's labeled rows (GROWING) prepared like the earlier data with --grow-vocabulary: its directory."""
    grown_dir = str(tmp_path / "day2")
    prepare_tabular_like(_csv(tmp_path / "day2.csv", dict(GROWING, clicked=[0, 1, 1, 0, 1])), earlier["data"],
                         grown_dir, split_name="train", grow_vocabulary=True)
    return grown_dir


def test_an_earlier_days_data_passes_a_grown_model_whose_training_data_begins_with_its_vocabularies(
        earlier: Dict[str, str], tmp_path) -> None:
    """Yesterday's holdout scored by today's model (its vocabularies grew since) was refused, its shorter vocabularies
    "cannot be checked": the artifact's ``ids/`` and the run's training data hold the grown vocabularies, whose first
    ids the earlier data's must be. Data prepared afresh, of fewer values, stays refused, as does the earlier data
    where the run's training data is no longer there."""
    old, grown_dir = DatasetSchema.load(earlier["data"]), _grown_day(earlier, tmp_path)
    grown = DatasetSchema.load(grown_dir)
    recorded = grown.vocabulary_records()
    assert old.changed_vocabularies(recorded) == ["cats", "city"]  # nothing to check it against
    assert old.changed_vocabularies(recorded, grown) == []
    assert old.changed_vocabularies(recorded, old) == ["cats", "city"]  # a reference without the recorded ids
    fresh_dir = str(tmp_path / "fresh")
    prepare_tabular(_csv(tmp_path / "fresh.csv", dict(_old_rows(n=60, seed=2), city=["Rome"] * 60,
                                                      cats=["caps"] * 60)), earlier["schema"], fresh_dir)
    fresh = DatasetSchema.load(fresh_dir)
    assert fresh.vocabulary_records()["city"]["ids"] < recorded["city"]["ids"]
    assert fresh.changed_vocabularies(recorded, grown) == ["cats", "city"]

    artifact = str(tmp_path / "artifact")
    export_small_deepfm(grown, artifact, batch_size=5, steps=1)
    served = ServedModel.load(artifact, trust_program=True)
    check_artifact_fits(served, old)
    with pytest.raises(ValueError, match=r"fresh/schema\.json: the vocabulary of field\(s\) \['cats', 'city'\] is "
                                         r"not the one the artifact's model was trained on"):
        check_artifact_fits(served, fresh)

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    saved_config = str(run_dir / "config.yaml")
    save_config(load_config(DEEPFM_CONFIG, [f"data.schema={grown_dir}"]), saved_config)
    (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: grown.fingerprint(),
                                                    VOCABULARIES_KEY: recorded}))
    check_trained_on(old, saved_config, "evaluate --checkpoint runs/day2")
    shutil.rmtree(grown_dir)
    with pytest.raises(ConfigError, match=r"the vocabulary of field\(s\) \['cats', 'city'\] in .* holds fewer ids "
                                          r"than the model's"):
        check_trained_on(old, saved_config, "evaluate --checkpoint runs/day2")


def test_the_artifact_turns_raw_values_into_the_ids_its_model_was_trained_on(earlier: Dict[str, str],
                                                                             tmp_path) -> None:
    """An export of ``prepare tabular`` data holds its id ways (``ids/``): raw values get the prepared data's ids
    from the artifact alone; a changed vocabulary file there is damage."""
    from recsys_llm.serving import ServedModel

    old = DatasetSchema.load(earlier["data"])
    artifact = str(tmp_path / "artifact")
    shutil.copytree(earlier["artifact"], artifact)
    served = ServedModel.load(artifact, trust_program=True)
    assert served.raw_id_ways.root == os.path.join(artifact, "ids")  # the copy's own files, not the data's
    assert sorted(os.listdir(os.path.join(artifact, "ids"))) == ["schema.json", "text"]
    for field, values in (("city", ["Paris", "Berlin", None, " Lyon"]), ("user", [3, "7", None]),
                          ("query", ["red shoes", "", "q1"])):
        assert served.raw_value_ids(field, values)[0].tolist() == raw_value_ids(old, field, values)[0].tolist()
    flat, lengths = served.raw_value_ids("cats", ["shoes|boots", None, "hats|bags"])
    expected_flat, expected_lengths = raw_value_ids(old, "cats", ["shoes|boots", None, "hats|bags"])
    assert flat.tolist() == expected_flat.tolist() and lengths.tolist() == expected_lengths.tolist()
    assert served.raw_id_ways.fingerprint() == old.fingerprint() and served.raw_id_ways.splits == {}
    texts = os.path.join(artifact, "ids", "text", "city.parquet")
    table = pq.read_table(texts)
    pq.write_table(table.set_column(1, "text", pa.array(["unknown", "Lyon", "Lille", "Nice", "Paris"])), texts)
    with pytest.raises(ValueError, match=r"ids/text/city\.parquet: its bytes changed after the export"):
        ServedModel.load(artifact, trust_program=True)


def test_a_loaded_artifact_keeps_its_vocabularies_when_its_directory_changes(earlier: Dict[str, str],
                                                                            tmp_path) -> None:
    """``raw_value_ids`` of a loaded model reads its vocabularies from memory, not from the artifact's ``ids/`` at
    every call: an export of another model swapped into the directory (ids meaning other values), or the directory
    deleted, while the process serves left the model's ids wrong (or refused) without a word."""
    from recsys_llm.serving import ServedModel

    old = DatasetSchema.load(earlier["data"])
    artifact = str(tmp_path / "artifact")
    shutil.copytree(earlier["artifact"], artifact)
    served = ServedModel.load(artifact, trust_program=True)
    cities = ["Paris", "Lille", None, "Berlin"]
    expected = raw_value_ids(old, "city", cities)[0].tolist()
    texts = os.path.join(artifact, "ids", "text", "city.parquet")
    table = pq.read_table(texts)  # the vocabulary of data prepared afresh: the same values under other ids
    pq.write_table(table.set_column(1, "text", pa.array(["unknown", *reversed(table.column("text").to_pylist()[1:])])),
                   texts)
    assert served.raw_value_ids("city", cities)[0].tolist() == expected
    shutil.rmtree(artifact)
    assert served.raw_value_ids("city", cities)[0].tolist() == expected
    flat, lengths = served.raw_value_ids("cats", ["shoes|boots", None])
    expected_flat, expected_lengths = raw_value_ids(old, "cats", ["shoes|boots", None])
    assert flat.tolist() == expected_flat.tolist() and lengths.tolist() == expected_lengths.tolist()


def test_id_ways_that_cannot_be_read_leave_the_loaded_ones_as_they_were(earlier: Dict[str, str], tmp_path) -> None:
    """``served.raw_id_ways = schema`` reads every vocabulary of ``schema``: one that cannot be read (a missing
    value-text file) raises and leaves the model's id ways whole, not the earlier ways beside the vocabularies of
    the new schema read before the missing one (ids of other values, while raw_id_ways named the artifact's)."""
    from recsys_llm.serving import ServedModel

    served = ServedModel.load(earlier["artifact"], trust_program=True)
    loaded = served.raw_id_ways
    cities = ["Paris", "Lyon", None]
    expected = served.raw_value_ids("city", cities)[0].tolist()
    other = str(tmp_path / "other")
    shutil.copytree(earlier["data"], other)
    texts = os.path.join(other, "text", "city.parquet")
    table = pq.read_table(texts)  # the same values under other ids
    pq.write_table(table.set_column(1, "text", pa.array(["unknown", *reversed(table.column("text").to_pylist()[1:])])),
                   texts)
    os.remove(os.path.join(other, "text", "cats.parquet"))  # a field after city
    with pytest.raises(ValueError, match=r"cats\.parquet"):
        served.raw_id_ways = DatasetSchema.load(other)
    assert served.raw_id_ways is loaded
    assert served.raw_value_ids("city", cities)[0].tolist() == expected


def test_an_artifact_with_id_ways_is_exported_again_into_its_directory(earlier: Dict[str, str], tmp_path) -> None:
    """A model trained again, exported into the same place (the daily loop): the earlier export's ``ids/`` was
    taken for a file an export does not write, and every re-export of ``prepare tabular`` data was refused."""
    from recsys_llm.serving import ServedModel

    schema = DatasetSchema.load(earlier["data"])
    artifact = str(tmp_path / "artifact")
    def export_id() -> str:
        with open(os.path.join(artifact, "config.json"), encoding="utf-8") as handle:
            return json.load(handle)["export_id"]

    export_small_deepfm(schema, artifact, batch_size=64, steps=3)
    first = export_id()
    export_small_deepfm(schema, artifact, batch_size=64, steps=4)
    assert export_id() != first and sorted(os.listdir(os.path.join(artifact, "ids"))) == ["schema.json", "text"]
    assert ServedModel.load(artifact, trust_program=True).raw_value_ids("city", ["Paris"])[0].tolist() == \
        raw_value_ids(schema, "city", ["Paris"])[0].tolist()


def test_an_artifact_of_data_without_id_ways_says_where_raw_ids_come_from(tmp_path) -> None:
    from recsys_llm.serving import ServedModel

    data = str(tmp_path / "synthetic")
    generate_synthetic(data, 600, seed=0, rows_per_group=256)
    artifact = str(tmp_path / "artifact")
    export_small_deepfm(DatasetSchema.load(data), artifact, batch_size=64, steps=1)
    served = ServedModel.load(artifact, trust_program=True)
    assert served.raw_id_ways is None and not os.path.exists(os.path.join(artifact, "ids"))
    with pytest.raises(ValueError, match=r"no way from raw values to ids \(config\.json: raw_ids null\).*"
                                         r"raw_value_ids\(DatasetSchema\.load\(<prepared data>\)"):
        served.raw_value_ids("user_id", [1, 2])


def test_tied_new_values_take_ids_in_value_order_and_growth_that_fits_warns_nothing(earlier: Dict[str, str],
                                                                                    tmp_path) -> None:
    """Rome is seen before Berlin and as often: the tie goes by value (Berlin first), not by first sight; every new
    value finds a free id, and the day holds a known city too, so no warning."""
    rows = dict(GROWING, city=["Rome", "Berlin", "Berlin", "Rome", "Oslo"])
    rows = {name: values + ["Paris" if name == "city" else values[0]] for name, values in rows.items()}
    out = str(tmp_path / "day2")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        prepare_tabular_like(_csv(tmp_path / "day2.csv", rows), earlier["data"], out, grow_vocabulary=True)
    texts = pq.read_table(DatasetSchema.load(out).value_text_path("city"))["text"].to_pylist()
    assert texts[5:] == ["Berlin", "Rome", "Oslo"]
    assert pq.read_table(os.path.join(out, "test.parquet"))["city"].to_pylist() == [6, 5, 5, 6, 7, texts.index("Paris")]


def test_a_day_none_of_whose_values_the_vocabulary_holds_warns_as_it_grows(earlier: Dict[str, str],
                                                                               tmp_path) -> None:
    """Cities written as numbers where the earlier data had names: without growth each gets id 0 with a warning;
    with ``--grow-vocabulary`` each would take a free id for good (a later day prepared like the output keeps them),
    so the same warning names the field, the file and the earlier data."""
    rows = dict(GROWING, city=["1", "2", "3", "2", ""])
    with pytest.warns(UserWarning, match=r"day2\.csv: none of the 4 values of field 'city' is in its vocabulary "
                                         r"\(.*shop\), so --grow-vocabulary spends the table's free ids on them "
                                         r"\(for good: .*\); are they written in another form"):
        prepare_tabular_like(_csv(tmp_path / "day2.csv", rows), earlier["data"], str(tmp_path / "day2"),
                             grow_vocabulary=True)
    # a day whose cities are all missing spends no id, and so is not warned about
    rows = dict(GROWING, city=[""] * 5)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        prepare_tabular_like(_csv(tmp_path / "day3.csv", rows), earlier["data"], str(tmp_path / "day3"),
                             grow_vocabulary=True)
    assert not [w for w in caught if "none of the" in str(w.message)]


def test_growth_counts_a_values_rows_over_every_block_and_the_report_counts_a_reread_once(
        earlier: Dict[str, str], tmp_path) -> None:
    """Berlin fills the first 300 rows and one in the last block, Rome the 99 between: read in small blocks,
    Berlin still counts 301 rows and comes first. An extra column whose type changes late has the rows written
    again: the report counts each value once."""
    n = 400
    rows = {name: [values[i % 4] for i in range(n)] for name, values in NEW.items()}
    rows["city"] = ["Berlin" if i < 300 or i == n - 1 else "Rome" for i in range(n)]
    rows["cats"] = [["boots", "caps|shoes", "belts" if i % 8 == 2 else "boots", ""][i % 4] for i in range(n)]
    rows.update(clicked=[i % 2 for i in range(n)], ts=[3.5 if i == 350 else i for i in range(n)])
    out, ways = str(tmp_path / "out"), {}
    with pytest.warns(UserWarning, match=r"field 'cats' met 3 values .* 1 more than its table has free ids"):
        schema = prepare_tabular_like(_csv(tmp_path / "new.csv", rows), earlier["data"], out,
                                      TabularConfig(block_bytes=2000), field_ways=ways, grow_vocabulary=True)
    assert pq.read_table(schema.value_text_path("city"))["text"].to_pylist()[5:] == ["Berlin", "Rome"]
    assert pq.read_table(schema.value_text_path("cats"))["text"].to_pylist()[6:] == ["boots", "caps"]
    # boots in 150 rows, caps 100, belts 50 (left out); 400 tokens written
    assert ways["city"] == "vocabulary, 2 new values, ids 5-6"
    assert ways["cats"] == "vocabulary, 2 new values, ids 6-7 (50 of 400 values not in it: id 0, unknown)"
    table = pq.read_table(schema.split_path("test"))
    assert table.num_rows == n and table["city"].to_pylist()[298:302] == [5, 5, 6, 6]


def test_an_integer_vocabulary_field_grows_by_its_values_text(earlier: Dict[str, str], tmp_path) -> None:
    """A field of integers prepared ``--vocabulary`` maps their text: new users 100 and 99 of a Parquet file, tied,
    take the next free ids in text order ("100" < "99"), as the values are cast before they are counted. Fields
    whose values are all known report no growth. Data of the same rows prepared without ``--vocabulary`` (raw
    integer ids) is refused where a run or artifact of the vocabulary data meets it, and the other way round, though
    the fingerprint stays."""
    old_rows = _old_rows()
    old_rows["user"] = old_rows["user"] % 50
    data = str(tmp_path / "shop")
    prepare_tabular(_csv(tmp_path / "old.csv", old_rows), earlier["schema"], data,
                    TabularConfig(vocabulary_fields=("user",)))
    old = DatasetSchema.load(data)
    held = old.load_value_text("user").num_rows - 1  # the values it holds, besides unknown
    rows = dict(GROWING, user=[3, 100, 7, 99, 0], city=["Paris", "Lyon", "Nice", "Lille", ""],
                cats=["shoes|bags", "hats", "", "coats", "socks"])
    out, ways, day2 = str(tmp_path / "day2"), {}, str(tmp_path / "day2.parquet")
    pq.write_table(pa.table(rows), day2)  # user read as integers (a CSV's categorical columns are read as text)
    prepare_tabular_like(day2, data, out, field_ways=ways, grow_vocabulary=True)
    assert ways["user"] == f"vocabulary, 2 new values, ids {held + 1}-{held + 2}"
    assert ways["city"] == ways["cats"] == "vocabulary"
    expected, _ = raw_value_ids(old, "user", [3, 7, 0])
    table = pq.read_table(os.path.join(out, "test.parquet"))
    assert table["user"].to_pylist() == [expected[0], held + 1, expected[1], held + 2, expected[2]]

    raw = str(tmp_path / "raw")
    prepare_tabular(_csv(tmp_path / "old.csv", old_rows), earlier["schema"], raw)
    raw_ids = DatasetSchema.load(raw)
    assert raw_ids.ids["user"] == "integer" and raw_ids.fingerprint() == old.fingerprint()
    assert raw_ids.changed_vocabularies(old.vocabulary_records()) == ["user"]
    assert old.changed_vocabularies(raw_ids.vocabulary_records()) == ["user"]  # integer ids then, a vocabulary now
    assert DatasetSchema.load(out).changed_vocabularies(old.vocabulary_records()) == []


def test_a_full_table_grows_no_further_and_a_single_new_value_is_reported_as_one(earlier: Dict[str, str],
                                                                                 tmp_path) -> None:
    """Day 2 fills the cats table (2 free ids); day 3, grown like day 2, finds none free: 0 new values, the new
    category at id 0. Its one new city (Oslo) takes id 7, said in the singular."""
    day2 = str(tmp_path / "day2")
    prepare_tabular_like(_csv(tmp_path / "day2.csv", GROWING), earlier["data"], day2, grow_vocabulary=True)
    rows = dict(GROWING, city=["Paris", "Rome", "Berlin", "Oslo", "Lyon"], cats=["belts", "boots", "", "", "caps"])
    day3, ways = str(tmp_path / "day3"), {}
    with pytest.warns(UserWarning, match=r"field 'cats' met 1 value.* 1 more than its table has free ids"):
        prepare_tabular_like(_csv(tmp_path / "day3.csv", rows), day2, day3, field_ways=ways, grow_vocabulary=True)
    assert ways["city"] == "vocabulary, 1 new value, id 7"
    assert ways["cats"] == "vocabulary, 0 new values (1 of 3 values not in it: id 0, unknown)"
    assert pq.read_table(os.path.join(day3, "test.parquet"))["cats"].to_pylist() == [[], [6], [], [], [7]]
    assert pq.read_table(os.path.join(day3, "test.parquet"))["city"].to_pylist()[1:4] == [6, 5, 7]


def test_vocabulary_records_check_every_id_and_skip_what_they_cannot_read(earlier: Dict[str, str], tmp_path) -> None:
    """A vocabulary that differs only in its last value is changed; records that are no ``{ids, digest}`` mapping,
    or of a field the data lacks, are left unchecked; a vocabulary field whose value-text file is gone is not
    recorded."""
    old = DatasetSchema.load(earlier["data"])
    records = old.vocabulary_records()
    assert records["city"]["ids"] == len(CITIES) + 1
    data = str(tmp_path / "shop")
    shutil.copytree(earlier["data"], data)
    texts = old.load_value_text("city")
    assert texts["text"].to_pylist()[-1] == "Paris"
    pq.write_table(texts.set_column(1, "text", pa.array(texts["text"].to_pylist()[:-1] + ["Rome"])),
                   DatasetSchema.load(data).value_text_path("city"))
    copy = DatasetSchema.load(data)
    assert copy.changed_vocabularies(records) == ["city"]
    assert copy.changed_vocabularies({"city": "junk", "cats": {"digest": "x"}, "gone": {"ids": 2, "digest": "x"},
                                      "user": None}) == []
    os.remove(copy.value_text_path("city"))
    assert set(DatasetSchema.load(data).vocabulary_records()) == {"cats"}


def test_an_artifacts_id_ways_elsewhere_missing_or_unreadable_are_damage(earlier: Dict[str, str], tmp_path) -> None:
    """``raw_ids`` names the artifact's own ``ids`` (no other directory), each of its files must be there, its
    ``schema.json`` is among the digests, and one that is no schema (its digest rewritten to match) is named as the
    damage."""
    from recsys_llm.serving.artifact import DIGESTS_KEY

    def broken(name: str, change) -> str:
        artifact = str(tmp_path / name)
        shutil.copytree(earlier["artifact"], artifact)
        with open(os.path.join(artifact, "config.json")) as handle:
            config = json.load(handle)
        change(artifact, config)
        write_config_as_exported(os.path.join(artifact, "config.json"), config)
        return artifact

    elsewhere = broken("elsewhere", lambda artifact, config: config.update(raw_ids="ids/text"))
    with pytest.raises(ValueError, match=r"config\.json: 'raw_ids' is 'ids/text'; expected 'ids' or null"):
        ServedModel.load(elsewhere, trust_program=True)
    missing = broken("missing", lambda artifact, config: os.remove(os.path.join(artifact, "ids", "text",
                                                                                "city.parquet")))
    with pytest.raises(ValueError, match=r"ids/text/city\.parquet: file missing; the export artifact is damaged"):
        ServedModel.load(missing, trust_program=True)

    def unreadable(artifact: str, config: Dict) -> None:
        path = os.path.join(artifact, "ids", "schema.json")
        with open(path, "w") as handle:
            handle.write("{")
        config[DIGESTS_KEY]["ids/schema.json"] = file_sha256(path)

    with pytest.raises(ValueError, match=r"ids/schema\.json: cannot be read as the data's id ways .*damaged"):
        ServedModel.load(broken("unreadable", unreadable), trust_program=True)

    def edited(artifact: str, config: Dict) -> None:  # city's ids read as hashed text: the digest tells
        path = os.path.join(artifact, "ids", "schema.json")
        with open(path) as handle:
            ways = json.load(handle)
        ways["ids"]["city"] = "hashed_text"
        with open(path, "w") as handle:
            json.dump(ways, handle)

    with pytest.raises(ValueError, match=r"ids/schema\.json: its bytes changed after the export"):
        ServedModel.load(broken("edited", edited), trust_program=True)


def test_a_run_and_its_exports_record_the_vocabularies_it_trained_on(earlier: Dict[str, str], tmp_path) -> None:
    """plugins.json, the artifact's and the state-only export's config.json record the training data's
    vocabularies, so the run, its artifact and a resume check data against them (not only a hand-written record)."""
    from recsys_llm.train.runner import run_training
    from recsys_llm.train.distributed import teardown_distributed

    try:  # run_training and evaluate start a 1-rank process group in this process
        old = DatasetSchema.load(earlier["data"])
        run_dir = str(tmp_path / "run")
        overrides = [f"data.schema={earlier['data']}", "data.batch_size=64", "data.synthetic_rows=0",
                     "train.max_steps=2", "train.epochs=1", "train.progress=false", "train.device=cpu",
                     f"train.run_dir={run_dir}", "model.mlp_layer_sizes=[8]", "model.embedding_dim=4"]
        run_training(load_config(DEEPFM_CONFIG, overrides))
        with open(os.path.join(run_dir, PLUGINS_FILE)) as handle:
            assert json.load(handle)[VOCABULARIES_KEY] == old.vocabulary_records()
        for output, flags in (("artifact", []), ("state", ["--state-only"])):
            assert cli_main(["export", "--config", DEEPFM_CONFIG, "--checkpoint", run_dir, "--output",
                             str(tmp_path / output), *flags, *overrides]) == 0
            with open(os.path.join(tmp_path, output, "config.json")) as handle:
                assert json.load(handle)["metadata"]["vocabularies"] == old.vocabulary_records(), output
        assert ServedModel.load(str(tmp_path / "artifact"), trust_program=True).vocabularies == old.vocabulary_records()

        # evaluate --split of other prepared data: refused, as a directory or a file, where its ids mean other values
        from recsys_llm.train.trained_run import run_evaluation

        rows = _old_rows(seed=1)
        rows["city"][:3] = ["Berlin"] * 3
        fresh = str(tmp_path / "fresh")
        prepare_tabular(_csv(tmp_path / "day2.csv", rows), earlier["schema"], fresh)
        config = load_config(DEEPFM_CONFIG, overrides)
        for split in (fresh, os.path.join(fresh, "test.parquet")):
            with pytest.raises(ConfigError, match=rf"--split {re.escape(split)}: the vocabulary of field\(s\) "
                                                  r"\['city'\] in .*fresh is not the one the run trained on"):
                run_evaluation(config, run_dir, split)
        like = prepare_tabular_like(_csv(tmp_path / "new.csv", dict(NEW, clicked=[0, 1, 1, 0])), earlier["data"],
                                    str(tmp_path / "like"))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "auc" in run_evaluation(config, run_dir, like.split_path("test"))
        assert not [w for w in caught if "added after" in str(w.message)]
        # a day grown --like (Berlin, boots): evaluated, with a warning naming the ids the run never trained
        grown = prepare_tabular_like(_csv(tmp_path / "new.csv", dict(NEW, clicked=[0, 1, 1, 0])), earlier["data"],
                                     str(tmp_path / "grown"), grow_vocabulary=True)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert "auc" in run_evaluation(config, run_dir, grown.split_path("test"))
        notes = sorted(str(w.message) for w in caught if "added after" in str(w.message))
        assert len(notes) == 2 and all(f"added after the model of {run_dir}" in n for n in notes), notes
        assert "'cats' holds 1 value" in notes[0] and "'city' holds 1 value" in notes[1], notes
    finally:
        teardown_distributed()


def test_the_artifacts_raw_ids_split_a_sequence_at_the_separator_given(earlier: Dict[str, str]) -> None:
    """``ServedModel.raw_value_ids(..., sequence_separator=";")`` splits the tokens as the prepared data's ways do."""
    served = ServedModel.load(earlier["artifact"], trust_program=True)
    flat, lengths = served.raw_value_ids("cats", ["shoes;boots", "hats;bags"], sequence_separator=";")
    expected_flat, expected_lengths = raw_value_ids(DatasetSchema.load(earlier["data"]), "cats",
                                                    ["shoes|boots", "hats|bags"])
    assert flat.tolist() == expected_flat.tolist() and lengths.tolist() == expected_lengths.tolist() == [1, 2]


def test_scoring_rows_of_values_added_after_the_artifacts_model_trained_warns(earlier: Dict[str, str],
                                                                              tmp_path) -> None:
    """Rows prepared --like with --grow-vocabulary fit the artifact, with a warning naming the ids its model never
    trained; rows prepared --like without growing it, and an artifact that records no vocabularies, warn not."""
    old = DatasetSchema.load(earlier["data"])
    new = _csv(tmp_path / "new.csv", dict(NEW, clicked=[0, 1, 1, 0]))
    like = prepare_tabular_like(new, earlier["data"], str(tmp_path / "like"))
    grown = prepare_tabular_like(new, earlier["data"], str(tmp_path / "grown"), grow_vocabulary=True)
    served = ServedModel.load(earlier["artifact"], trust_program=True)

    def notes(schema: DatasetSchema) -> list:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_artifact_fits(served, schema)
        return sorted(str(w.message) for w in caught if "added after" in str(w.message))

    served._config["metadata"] = {}
    assert notes(grown) == []  # an artifact exported before they were recorded
    served._config["metadata"] = {"vocabularies": old.vocabulary_records()}
    assert notes(like) == []
    city = old.vocabulary_records()["city"]["ids"]
    [cats, cities] = notes(grown)
    assert "grown/schema.json: the vocabulary of 'cats'" in cats and "the artifact's model" in cats
    assert "'city' holds 1 value" in cities and f"(ids {city}..{city}) added after" in cities


@pytest.mark.parametrize("first, later, message", [
    ({}, {"price"}, r"b\.parquet: missing column\(s\) \['price'\] that .*a\.parquet has"),
    ({"impression"}, set(), r"b\.parquet: has column\(s\) \['impression'\] of the earlier schema that .*a\.parquet lacks"),
    ({"clicked"}, set(), r"b\.parquet: has column\(s\) \['clicked'\] of the earlier schema that .*a\.parquet lacks"),
    (set(), {"clicked"}, r"b\.parquet: missing column\(s\) \['clicked'\] that .*a\.parquet has"),
], ids=["field absent later", "row key only later", "label only later", "label only first"])
def test_files_of_a_directory_with_other_columns_than_the_first_are_refused(earlier: Dict[str, str], tmp_path,
                                                                             first, later, message) -> None:
    """The columns are taken from the first file: a later file without one of them, or with a label, row key or
    extra column the first lacks, is refused naming it (its labels or keys would be dropped, or a KeyError)."""
    new = tmp_path / "new"
    new.mkdir()
    rows = {"user": [3, 7], "city": ["Paris", "Lyon"], "query": ["q1", "q2"], "cats": ["shoes", "hats"],
            "price": [1.0, 2.0], "clicked": [1, 0], "impression": [5, 6]}
    pq.write_table(pa.table({k: v for k, v in rows.items() if k not in first}), new / "a.parquet")
    pq.write_table(pa.table({k: [v[0]] for k, v in rows.items() if k not in later}), new / "b.parquet")
    with pytest.raises(DataError, match=message):
        prepare_tabular_like(str(new), earlier["data"], str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_options_after_config_are_keyword_only(tmp_path):
    """prepare_tabular_like(data, like, out, "valid") took the split name as the config ("'str' object has no
    attribute 'split_by'"); prepare_tabular(data, schema, out, True) took the progress switch as it."""
    with pytest.raises(TypeError, match="prepare_tabular_like: config must be a TabularConfig or None, got 'valid'"):
        prepare_tabular_like(str(tmp_path / "d.csv"), str(tmp_path), str(tmp_path / "o"), "valid")
    with pytest.raises(TypeError, match="positional"):
        prepare_tabular_like(str(tmp_path / "d.csv"), str(tmp_path), str(tmp_path / "o"), None, "valid")
    with pytest.raises(TypeError, match="prepare_tabular_like: grow_vocabulary must be True or False"):
        prepare_tabular_like(str(tmp_path / "d.csv"), str(tmp_path), str(tmp_path / "o"), grow_vocabulary="false")
    with pytest.raises(TypeError, match="prepare_tabular: config must be a TabularConfig or None, got True"):
        prepare_tabular(str(tmp_path / "d.csv"), str(tmp_path / "s.yaml"), str(tmp_path / "o"), True)


def test_grow_vocabulary_takes_a_numpy_bool(earlier: Dict[str, str], tmp_path) -> None:
    """np.False_ (a cell of a pandas sweep grid) is a bool, as the config switches take it; only non-bools are refused."""
    path = _csv(tmp_path / "new.csv", NEW)
    out = str(tmp_path / "day2")
    prepare_tabular_like(path, earlier["data"], out, grow_vocabulary=np.False_)
    assert os.path.exists(os.path.join(out, "schema.json"))


def test_a_request_of_raw_values_scores_as_the_same_rows_prepared(earlier: Dict[str, str], tmp_path) -> None:
    """``ServedModel.raw_request`` builds a whole request (every feature's ids, the dense fields in column order) from
    raw values by field name; scored, it gives each row the logit ``score`` gives the same rows prepared."""
    served = ServedModel.load(earlier["artifact"], trust_program=True)
    day2 = str(tmp_path / "day2")
    schema = prepare_tabular_like(_csv(tmp_path / "new.csv", NEW), earlier["data"], day2)
    scores = str(tmp_path / "scores.parquet")
    score_split(served, schema, "test", batch_size=4, output=scores, progress=False)  # one call, as below
    raw = {name: [None if value == "" else value for value in values] for name, values in NEW.items()}
    columns = {name: raw[name] for name in ("price", "cats", "query", "city", "user")}  # any order
    dense, kjt = served.raw_request(dict(columns, impression=[5, 6, 7, 8]))  # columns the model lacks are ignored
    assert dense.numpy().dtype == np.float32
    assert dense.numpy().tolist() == np.asarray(NEW["price"], dtype=np.float32).reshape(4, 1).tolist()
    assert kjt.keys() == served.feature_names
    assert kjt["cats"].lengths().tolist() == [1, 0, 0, 3] and kjt["city"].lengths().tolist() == [1, 1, 1, 1]
    logits = served.logits(dense, kjt)
    assert logits.tolist() == pq.read_table(scores)["logit"].to_pylist()
    with pytest.raises(ValueError, match=r"raw_request: no column for \['city'\]; expected one raw value per row for "
                                         r"every feature of the model"):
        served.raw_request({k: v for k, v in columns.items() if k != "city"})
    with pytest.raises(ValueError, match=r"raw_request: column 'query' holds 3 rows, column 'user' 4"):
        served.raw_request(dict(columns, query=["q1", "q2", "q3"]))
    with pytest.raises(ValueError, match=r"raw_request: column 'city' is str 'Paris'; expected a sequence of one raw"):
        served.raw_request(dict(columns, city="Paris"))
    with pytest.raises(ValueError, match=r"raw_request: dense field 'price', row 2: None is not a number"):
        served.raw_request(dict(columns, price=[1.0, 2.0, None, 3.0]))
    with pytest.raises(ValueError, match=r"dense field 'price', row 0: True is not a number"):
        served.raw_request(dict(columns, price=[True, 2.0, 1.0, 3.0]))


def test_a_raw_request_needs_the_artifacts_dense_field_names(earlier: Dict[str, str], tmp_path) -> None:
    artifact = str(tmp_path / "artifact")
    shutil.copytree(earlier["artifact"], artifact)
    with open(os.path.join(artifact, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    write_config_as_exported(os.path.join(artifact, "config.json"), dict(config, dense_feature_names=None))
    served = ServedModel.load(artifact, trust_program=True)
    with pytest.raises(ValueError, match=r"raw_request: this artifact does not record which fields its 1 dense "
                                         r"features are \(config.json: dense_feature_names"):
        served.raw_request(NEW)


def test_an_earlier_days_vocabulary_is_checked_only_against_a_reference_that_holds_it_as_a_vocabulary(
        earlier: Dict[str, str], tmp_path) -> None:
    """A reference whose ids of a field are no vocabulary (recorded another way) cannot vouch for the earlier day's
    ids of that field: it stays refused, the other passes."""
    old, reference = DatasetSchema.load(earlier["data"]), DatasetSchema.load(_grown_day(earlier, tmp_path))
    recorded = reference.vocabulary_records()
    reference.ids = {name: way for name, way in reference.ids.items() if name != "city"}
    assert old.changed_vocabularies(recorded, reference) == ["city"]


# a day that brings a new column, seller (the earlier data lacked it)
SELLERS = ["acme", "bolt", "acme", ""]


def _added_schema(tmp_path, fields=None, **changes) -> str:
    """A schema file of the earlier fields (or ``fields``) plus a new sparse field ``seller``: its path."""
    seller = {"name": "seller", "kind": "sparse", "cardinality": 20, "description": "seller of the item"}
    raw = dict(SCHEMA, fields=(SCHEMA["fields"] if fields is None else fields) + [seller], **changes)
    path = tmp_path / "shop2.yaml"
    path.write_text(yaml.safe_dump(raw))
    return str(path)


def test_a_schema_that_adds_a_field_keeps_the_earlier_ids_and_prepares_the_new_one_afresh(
        earlier: Dict[str, str], tmp_path) -> None:
    """``--like DIR --schema FILE``: the earlier fields as plain ``--like`` prepares them (their ids, value texts), the
    new field as a fresh ``prepare tabular`` of these rows; a run taking the shared tables accepts the output."""
    rows = dict(NEW, seller=SELLERS, clicked=[0, 1, 1, 0])
    new_csv = _csv(tmp_path / "day2.csv", rows)
    ways: Dict[str, str] = {}
    schema = prepare_tabular_like(new_csv, earlier["data"], str(tmp_path / "day2"), split_name="train",
                                  schema_path=_added_schema(tmp_path), field_ways=ways)
    plain = prepare_tabular_like(new_csv, earlier["data"], str(tmp_path / "plain"), split_name="train")
    old = DatasetSchema.load(earlier["data"])
    saved = DatasetSchema.load(str(tmp_path / "day2"))
    assert [f.name for f in saved.fields] == ["user", "city", "query", "cats", "price", "seller"]
    assert saved.ids == {**old.ids, "seller": "vocabulary"} and saved.fingerprint() == schema.fingerprint()
    assert saved.fingerprint() != old.fingerprint() and saved.row_key == old.row_key and saved.label == old.label
    assert ways["seller"] == "vocabulary (new field)" and ways["city"].startswith("vocabulary")
    table, earlier_ids = (pq.read_table(os.path.join(d.root, "train.parquet")) for d in (saved, plain))
    for name in ("user", "city", "query", "cats", "price", "clicked"):
        assert table[name].to_pylist() == earlier_ids[name].to_pylist()
    for name in ("city", "cats"):  # the earlier vocabularies, copied as they are
        assert pq.read_table(saved.value_text_path(name)).equals(pq.read_table(old.value_text_path(name)))
    assert pq.read_table(saved.value_text_path("seller"))["text"].to_pylist() == ["unknown", "acme", "bolt"]
    assert table["seller"].to_pylist() == [1, 2, 1, 0]
    run_dir = tmp_path / "run"  # the earlier run's records: trained on the earlier data
    run_dir.mkdir()
    save_config(load_config(DEEPFM_CONFIG, [f"data.schema={earlier['data']}"]), str(run_dir / "config.yaml"))
    (run_dir / PLUGINS_FILE).write_text(json.dumps({SCHEMA_FINGERPRINT_KEY: old.fingerprint(),
                                                    SCHEMA_CONTENTS_KEY: old.fingerprinted(),
                                                    VOCABULARIES_KEY: old.vocabulary_records()}))
    shared = check_shared_fields(saved, str(run_dir / "config.yaml"), "train.init_from=runs/day1")
    assert shared == ["user", "city", "query", "cats", "price"]
    # the day after, prepared --like the output: the same fields and ids
    day3 = prepare_tabular_like(new_csv, saved.root, str(tmp_path / "day3"))
    assert day3.fingerprint() == saved.fingerprint()
    assert pq.read_table(os.path.join(day3.root, "test.parquet"))["seller"].to_pylist() == [1, 2, 1, 0]


def test_a_schema_with_a_new_field_grows_the_earlier_vocabularies_and_takes_its_options_from_the_cli(
        earlier: Dict[str, str], tmp_path, capsys) -> None:
    new_csv = _csv(tmp_path / "sellers.csv", dict(GROWING, seller=[7, 3, 7, 9, 3], clicked=[0, 1, 1, 0, 1]))
    out = str(tmp_path / "with_seller")
    assert cli_main(["prepare", "tabular", "--input", new_csv, "--like", earlier["data"], "--schema",
                     _added_schema(tmp_path), "--out", out, "--split-name", "train", "--grow-vocabulary",
                     "--vocabulary", "seller", "--quiet"]) == 0
    assert "vocabulary (--vocabulary) (new field)" in capsys.readouterr().out
    saved, grown = DatasetSchema.load(out), DatasetSchema.load(_grown_day(earlier, tmp_path))
    assert saved.ids["seller"] == "vocabulary"
    for name in ("city", "cats"):  # grown as plain --like --grow-vocabulary grows them
        assert pq.read_table(saved.value_text_path(name)).equals(pq.read_table(grown.value_text_path(name)))
    assert pq.read_table(saved.value_text_path("seller"))["text"].to_pylist() == ["unknown", "3", "7", "9"]
    # --split (and --split-by, --seed) stay the earlier preparation's, with a schema too
    code = cli_main(["prepare", "tabular", "--input", new_csv, "--like", earlier["data"], "--schema",
                     _added_schema(tmp_path), "--out", str(tmp_path / "o"), "--split", "8,1,1", "--quiet"])
    assert code != 0 and "--split decided by the earlier preparation" in capsys.readouterr().err


def test_a_schema_that_changes_an_earlier_field_or_lacks_the_new_column_is_refused(earlier: Dict[str, str],
                                                                                  tmp_path) -> None:
    new_csv = _csv(tmp_path / "day2.csv", dict(NEW, seller=SELLERS))
    out = str(tmp_path / "o")
    fields = [dict(f, cardinality=12) if f["name"] == "city" else f for f in SCHEMA["fields"]]
    with pytest.raises(SchemaError, match=r"shop2\.yaml: field 'city': cardinality 10 -> 12 \(earlier in .*"
                                          r"schema\.json\); expected each field of the earlier data as it was"):
        prepare_tabular_like(new_csv, earlier["data"], out, schema_path=_added_schema(tmp_path, fields))
    fields = [dict(f, hashed=True) if f["name"] == "user" else f for f in SCHEMA["fields"]]
    with pytest.raises(SchemaError, match=r"field 'user': hashed 'unset' -> True"):
        prepare_tabular_like(new_csv, earlier["data"], out, schema_path=_added_schema(tmp_path, fields))
    with pytest.raises(SchemaError, match=r"label 'click', but the earlier data's is 'clicked'"):
        prepare_tabular_like(new_csv, earlier["data"], out, schema_path=_added_schema(tmp_path, label="click"))
    with pytest.raises(DataError, match=r"day2\.csv: missing column\(s\) \['seller'\], new field\(s\) of .*shop2\.yaml"):
        prepare_tabular_like(_csv(tmp_path / "day2.csv", NEW), earlier["data"], out,
                             schema_path=_added_schema(tmp_path))
    with pytest.raises(ValueError, match=r"--vocabulary city: field\(s\) of the earlier data, whose ids the earlier "
                                         r"preparation decided; expected it only for the new field\(s\) \['seller'\]"):
        prepare_tabular_like(new_csv, earlier["data"], out, TabularConfig(vocabulary_fields=("city",)),
                             schema_path=_added_schema(tmp_path))
    with pytest.raises(ValueError, match=r"--vocabulary"):  # without a schema, no field takes it
        prepare_tabular_like(new_csv, earlier["data"], out, TabularConfig(vocabulary_fields=("seller",)))
    assert not os.path.exists(out)


def test_a_schema_that_leaves_out_an_earlier_field_drops_it_with_a_warning(earlier: Dict[str, str], tmp_path) -> None:
    rows = {name: values for name, values in dict(NEW, seller=SELLERS).items() if name != "query"}
    fields = [f for f in SCHEMA["fields"] if f["name"] != "query"]
    with pytest.warns(UserWarning, match=r"shop2\.yaml: leaves out field\(s\) \['query'\] of the earlier data"):
        schema = prepare_tabular_like(_csv(tmp_path / "day2.csv", rows), earlier["data"], str(tmp_path / "o"),
                                      schema_path=_added_schema(tmp_path, fields))
    assert [f.name for f in schema.fields] == ["user", "city", "cats", "price", "seller"] and "query" not in schema.ids


def test_a_schema_that_moves_a_hashed_text_field_is_refused_before_anything_is_written(
        earlier: Dict[str, str], tmp_path) -> None:
    """Dropping (or inserting) a field before a hashed-text field changes its position, the salt of its hash, so its
    values would get other ids than its trained table's: refused, naming the field, both positions and both files."""
    rows = dict(NEW, seller=SELLERS, clicked=[0, 1, 1, 0])
    new_csv = _csv(tmp_path / "day2.csv", rows)
    fields = [spec for spec in SCHEMA["fields"] if spec["name"] != "city"]  # query: position 2 -> 1
    out = tmp_path / "day2"
    with pytest.raises(SchemaError, match=r"field 'query' \(hashed text\): position 2 -> 1.*shop/schema\.json"):
        prepare_tabular_like(new_csv, earlier["data"], str(out), schema_path=_added_schema(tmp_path, fields))
    assert not out.exists()
    after = [spec for spec in SCHEMA["fields"] if spec["name"] != "price"]  # a field after it: query stays at 2
    with pytest.warns(UserWarning, match=r"leaves out field\(s\) \['price'\]"):
        schema = prepare_tabular_like(new_csv, earlier["data"], str(out), schema_path=_added_schema(tmp_path, after))
    plain = prepare_tabular_like(new_csv, earlier["data"], str(tmp_path / "plain"))
    assert (pq.read_table(os.path.join(schema.root, "test.parquet"))["query"].to_pylist()
            == pq.read_table(os.path.join(plain.root, "test.parquet"))["query"].to_pylist())


def test_a_new_field_of_an_earlier_extra_columns_name_reads_that_column_as_a_field(
        earlier: Dict[str, str], tmp_path) -> None:
    """A new field named like an earlier extra column (``ts``) takes the column: the output encodes it as the field
    and no longer carries it as an extra column (the two would clash)."""
    rows = dict(NEW, ts=[5, 6, 7, 5], clicked=[0, 1, 1, 0])
    new_csv = _csv(tmp_path / "day2.csv", rows)
    ts_field = {"name": "ts", "kind": "sparse", "cardinality": 10, "description": "hour of the day"}
    path = tmp_path / "shop2.yaml"
    path.write_text(yaml.safe_dump(dict(SCHEMA, fields=SCHEMA["fields"] + [ts_field], extra_columns=[])))
    schema = prepare_tabular_like(new_csv, earlier["data"], str(tmp_path / "day2"), schema_path=str(path))
    saved = DatasetSchema.load(schema.root)
    assert saved.extra_columns == [] and saved.field("ts").kind == "sparse" and saved.ids["ts"] == "integer"
    assert pq.read_table(os.path.join(saved.root, "test.parquet"))["ts"].to_pylist() == [5, 6, 7, 5]
