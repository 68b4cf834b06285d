"""Bring-your-own data: CSV/Parquet + user schema file -> validated Parquet splits."""

import copy
import decimal
import json
import os
import re
import warnings

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import SchemaError
from recsys_llm.data.tabular import TabularConfig, prepare_tabular
from recsys_llm.data.tabular.raw_values import raw_value_ids
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


@pytest.mark.parametrize("name", ["area/city", "/victim", "~victim"])
def test_a_column_name_that_is_a_path_keeps_its_value_text_inside_the_output(tmp_path, name):
    """The value-text file is named after the field: a column named like a path (a crafted file, or a
    CSV header with a '/') must not write outside the prepared directory."""
    rows = _rows()
    rows[name] = rows.pop("city")
    raw = json.loads(json.dumps(SCHEMA))
    raw["fields"][1]["name"] = name
    (tmp_path / "work").mkdir()
    victim = tmp_path / "victim.parquet"
    victim.write_text("precious")
    out = tmp_path / "work" / "out"
    schema = prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path, raw), str(out), TabularConfig())
    assert victim.read_text() == "precious"
    assert sorted(os.listdir(tmp_path / "work")) == ["out"]
    value_text = schema.field(name).value_text
    assert os.path.dirname(value_text) == "text" and not os.path.basename(value_text).startswith(".")
    assert schema.load_value_text(name)["text"].to_pylist() == ["unknown"] + sorted(CITIES)
    assert sorted(os.listdir(out / "text")) == sorted(["cats.parquet", os.path.basename(value_text)])


@pytest.mark.parametrize("name", ["../../victim", ".city"])
def test_a_sparse_column_name_with_a_dot_is_refused_before_anything_is_written(tmp_path, name):
    """A table's name is a torch module name, which may not hold a '.'; such a path-like name never
    reaches the value-text file."""
    rows = _rows()
    rows[name] = rows.pop("city")
    raw = json.loads(json.dumps(SCHEMA))
    raw["fields"][1]["name"] = name
    (tmp_path / "work").mkdir()
    with pytest.raises(SchemaError, match=rf"name={re.escape(repr(name))}: a sparse field's name may not contain '\.'"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path, raw), str(tmp_path / "work" / "out"),
                        TabularConfig())
    assert os.listdir(tmp_path / "work") == []


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


def test_a_random_split_depends_on_its_seed(tmp_path):
    """Each seed draws its own split of the rows (TabularConfig.seed); the same seed the same one."""
    path, schema_path = _csv(tmp_path / "d.csv", _rows(300)), _schema_file(tmp_path)

    def held_out(seed, out):
        schema = prepare_tabular(path, schema_path, str(tmp_path / out), TabularConfig(seed=seed))
        return set(pq.read_table(schema.split_path("test"))["impression"].to_pylist())

    first = held_out(1, "a")
    assert first == held_out(1, "b") and first != held_out(2, "c")


def test_a_time_split_puts_the_floor_of_each_cumulative_share_before_its_bound(tmp_path):
    """15 rows ranked by time at 0.8/0.1/0.1: valid starts at floor(12.0) = 12 and test at floor(13.5) = 13, so
    valid gets 1 row and test the last 2 (rounding would give valid 2 and test 1)."""
    rows = _rows(15)
    schema = prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"),
                             TabularConfig(split_by="ts"))
    by_time = rows["impression"][np.argsort(rows["ts"], kind="stable")]
    got = {s: sorted(pq.read_table(schema.split_path(s))["impression"].to_pylist()) for s in ("train", "valid", "test")}
    assert got == {"train": sorted(by_time[:12].tolist()), "valid": sorted(by_time[12:13].tolist()),
                   "test": sorted(by_time[13:].tolist())}


@pytest.mark.parametrize("cardinality", [3, 4])  # 4: as many ids as values, but id 0 is the missing value's
def test_too_many_distinct_values_for_cardinality(tmp_path, cardinality):
    raw = json.loads(json.dumps(SCHEMA))
    raw["fields"][1]["cardinality"] = cardinality
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
    with pytest.raises(DataError, match=r"d\.csv: column 'clicked', data row 1 \(line 3 if no blank line or multi-line cell precedes it\): label 2\.0 .*expected 0 or 1"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"))
    schema = prepare_tabular(str(tmp_path / "d.csv"), _schema_file(tmp_path), str(tmp_path / "out"),
                             TabularConfig(label_threshold=3))
    labels = np.concatenate([pq.read_table(schema.split_path(s))["clicked"].to_numpy() for s in schema.splits])
    assert labels.mean() == pytest.approx(0.4)


def test_missing_dense_is_error_unless_filled(tmp_path):
    rows = _rows()
    rows["price"] = ["" if i == 7 else "1.5" for i in range(200)]
    with pytest.raises(DataError, match=r"d\.csv: column 'price', data row 7 \(line 9 if no blank line or multi-line cell precedes it\): null value; .*--fill-missing-dense"):
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


@pytest.mark.parametrize("name, compression", [("clicks.csv.gz", "gzip"), ("clicks.csv.bz2", "bz2"),
                                               ("clicks.csv", "gzip"), ("CLICKS.CSV.GZ", "gzip"),
                                               ("clicks.csv", "zstd"), ("clicks.txt", "bz2")])
def test_a_compressed_csv_is_read_as_the_csv_it_holds(tmp_path, name, compression):
    """By its suffix (as pyarrow's CSV reader takes it; the header must be read alike) or, named otherwise, by its
    first bytes: a clicks.csv saved from a clicks.csv.gz download, or a Windows CLICKS.CSV.GZ, was read as columns of
    binary ("missing column(s) ...; the file has columns ['\\x1f\\x8b...']"), as prepare criteo already read it."""
    plain = _csv(tmp_path / "plain.csv", _rows())
    packed = str(tmp_path / name)
    with open(plain, "rb") as source, pa.CompressedOutputStream(packed, compression) as target:
        target.write(source.read())
    expected = prepare_tabular(plain, _schema_file(tmp_path), str(tmp_path / "plain"), TabularConfig(split_by="ts"))
    schema = prepare_tabular(packed, _schema_file(tmp_path), str(tmp_path / "packed"), TabularConfig(split_by="ts"))
    for split in schema.splits:
        assert pq.read_table(schema.split_path(split)).equals(pq.read_table(expected.split_path(split)))


@pytest.mark.parametrize("case", ["cut short", "cut in its header", "plain text named .gz"])
def test_a_damaged_compressed_csv_is_named_not_a_traceback(tmp_path, case):
    """pyarrow's bare OSError (Truncated compressed stream, zlib inflate failed) came out as a traceback."""
    plain = _csv(tmp_path / "clicks.csv", _rows(3000))
    packed = str(tmp_path / "clicks.csv.gz")
    with open(plain, "rb") as source, pa.CompressedOutputStream(packed, "gzip") as target:
        target.write(source.read())
    data = open(packed, "rb").read()
    damaged = {"cut short": data[: len(data) // 2], "cut in its header": data[:12],
               "plain text named .gz": open(plain, "rb").read()}[case]
    with open(packed, "wb") as handle:
        handle.write(damaged)
    with pytest.raises(DataError, match=r"clicks\.csv\.gz: cannot be read \(.*\); expected a complete file"):
        prepare_tabular(packed, _schema_file(tmp_path), str(tmp_path / "out"), TabularConfig(split_by="ts"))


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
    with pytest.raises(DataError, match=r"b\.csv: column 'price', data row 99 \(line 101 if no blank line or multi-line cell precedes it\): null value"):
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
    with pytest.raises(ValueError, match=r"a\.csv: the output is the input file .*a\.csv itself; expected a directory"):
        prepare_tabular(data, schema_path, data)  # --out the input (it said "the output directory holds the input")
    assert os.path.isfile(data)


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
    with pytest.raises(DataError, match=r"d\.csv: column 'price', data row 99 \(line 101 if no blank line or multi-line cell precedes it\): null value"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    # said: such words are often a missing value's marker, which became a category (and a text the LLM reads)
    with pytest.warns(UserWarning, match=r"d\.csv: column 'country' holds \['N/A', 'NA', 'null'\], taken as values "
                      r"of their own .* --missing-token N/A --missing-token NA --missing-token null"):
        schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(fill_missing_dense=0.0))
    text = schema.load_value_text("country")["text"].to_pylist()
    assert text == ["unknown", "DE", "N/A", "NA", "null"]
    ids = np.concatenate([pq.read_table(schema.split_path(s))["country"].to_numpy() for s in schema.splits])
    assert sorted(np.bincount(ids).tolist()) == [20] * 5  # four words and the missing id 0, 20 rows each
    with pytest.warns(UserWarning, match=r"holds \['null'\]"):
        schema = prepare_tabular(data, schema_path, str(tmp_path / "out2"),
                                 TabularConfig(fill_missing_dense=0.0, missing_tokens=("", "NA", "N/A")))
    assert schema.load_value_text("country")["text"].to_pylist() == ["unknown", "DE", "null"]


def test_a_missing_token_is_missing_in_numeric_columns_too(tmp_path):
    """MySQL's SELECT ... INTO OUTFILE and PostgreSQL's text COPY write NULL as \\N: --missing-token '\\N' read it as
    missing in string columns only, so a dense column's \\N stayed refused even with --fill-missing-dense."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    schema_path = _schema_file(tmp_path, raw)
    data = _city_data(tmp_path, "d.csv", ["Paris", "Lyon", "\\N", "Nice"] * 25, ["1.5", "\\N", "2.5", "3.5"] * 25)
    with pytest.raises(DataError, match=r"d\.csv: column 'price', data row 1 .*'\\\\N' is not a number; .*--missing-token"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(fill_missing_dense=0.0))
    with pytest.raises(DataError, match=r"d\.csv: column 'price', data row 1 .*null value"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(missing_tokens=("", "\\N")))
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"),
                             TabularConfig(fill_missing_dense=-1.0, missing_tokens=("", "\\N")))
    assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "Lyon", "Nice", "Paris"]
    table = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits]).sort_by("row_id")
    assert table["price"].to_pylist()[:4] == [1.5, -1.0, 2.5, 3.5] and table["city"].to_pylist()[2] == 0


def test_a_missing_token_that_is_a_number_stays_a_number_in_numeric_columns(tmp_path):
    """--missing-token -1 (a string column's code for unknown) made a dense column's -1 missing too: the command of
    the day before failed, or with --fill-missing-dense turned every price of -1 into the fill value (another
    preparation of the same rows than earlier days'); a token that is no number (\\N) is still missing there."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    schema_path = _schema_file(tmp_path, raw)
    data = _city_data(tmp_path, "d.csv", ["Paris", "-1", "Lyon", "Nice"] * 25, ["1.5", "-1", "\\N", "0"] * 25)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"),
                             TabularConfig(fill_missing_dense=7.0, missing_tokens=("", "-1", "0", "\\N")))
    table = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits]).sort_by("row_id")
    assert table["price"].to_pylist()[:4] == [1.5, -1.0, 7.0, 0.0]  # -1 and 0 numbers as written, \\N filled
    assert table["city"].to_pylist()[1] == 0  # the string column's -1: missing, as before
    assert sorted(set(table["clicked"].to_pylist())) == [0, 1]  # a label of 0 is no missing label


def test_a_missing_token_is_missing_in_parquet_columns_and_among_a_sequences_tokens(tmp_path):
    """--missing-token made whole CSV cells missing only: a Parquet column's NA (pandas' astype(str) writes None, nan)
    and a sequence's token NA (a|NA|b) stayed values, and the warning kept advising the --missing-token already
    given. A served model gives such a value id 0 (the vocabulary lacks it), as the prepared rows hold it."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10},
                                                       {"name": "cats", "kind": "sequence", "cardinality": 10,
                                                        "max_length": 3}]}
    schema_path = _schema_file(tmp_path, raw)
    cities, cats = ["Paris", "NA", " NA ", "Lyon"] * 10, ["a|NA|b", "NA", "b", ""] * 10
    table = pa.table({"city": cities, "cats": cats, "clicked": [0, 1] * 20})
    pq.write_table(table, tmp_path / "d.parquet")
    (tmp_path / "d.csv").write_text("city,cats,clicked\n" + "".join(f"{c},{t},{i % 2}\n" for i, (c, t) in
                                                                      enumerate(zip(cities, cats))))
    config = TabularConfig(missing_tokens=("", "NA"))
    for name in ("d.parquet", "d.csv"):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning advising the --missing-token given
            schema = prepare_tabular(str(tmp_path / name), schema_path, str(tmp_path / f"out-{name}"), config)
        assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "Lyon", "Paris"], name
        assert schema.load_value_text("cats")["text"].to_pylist() == ["unknown", "a", "b"], name
        out = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits]).sort_by("row_id")
        assert out["city"].to_pylist()[:4] == [2, 0, 0, 1], name
        assert out["cats"].to_pylist()[:4] == [[1, 2], [], [2], []], name
        assert raw_value_ids(schema, "cats", ["a|NA|b"])[0].tolist() == [1, 2]


def test_a_latin1_header_is_named_not_utf8(tmp_path):
    """A header written in Windows-1252 ('cit\\xe9') was only listed as 'cit\\ufffd' beside the missing 'cité'."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "cité", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    path = tmp_path / "d.csv"
    path.write_bytes("cité,price,clicked\nParis,1.5,1\nLyon,2.5,0\n".encode("latin-1"))
    with pytest.raises(DataError, match=r"d\.csv: missing column\(s\) \['cité'\] .*the header is not UTF-8 .*iconv"):
        prepare_tabular(str(path), _schema_file(tmp_path, raw), str(tmp_path / "out"))


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


# ---- row keys, stray cells and messages that name the right source ----------------------------------
def _keyed(tmp_path, name, keys, users=None, encoding="utf-8", row_key="event_id"):
    """A CSV ``event_id,user,price,clicked`` and a schema naming ``row_key``; returns (data, schema) paths."""
    users = users if users is not None else [str(i % 7) for i in range(len(keys))]
    lines = ["event_id,user,price,clicked"] + [f"{k},{u},0.5,{i % 2}" for i, (k, u) in enumerate(zip(keys, users))]
    (tmp_path / name).write_text("\n".join(lines) + "\n", encoding=encoding)
    raw = {"name": "t", "label": "clicked", "row_key": row_key,
           "fields": [{"name": "user", "kind": "sparse", "cardinality": 10}, {"name": "price", "kind": "dense"}]}
    return str(tmp_path / name), _schema_file(tmp_path, raw)


def _all(schema, column):
    return np.concatenate([pq.read_table(schema.split_path(s))[column].to_numpy() for s in schema.splits])


def test_a_utf8_bom_csv_keeps_the_users_row_key(tmp_path):
    """Excel's "CSV UTF-8" starts with a byte order mark before the first column name."""
    data, schema_path = _keyed(tmp_path, "bom.csv", [str(k) for k in range(500, 540)], encoding="utf-8-sig")
    assert open(data, "rb").read(3) == b"\xef\xbb\xbf"
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert schema.row_key == "event_id"
    assert sorted(_all(schema, "event_id").tolist()) == list(range(500, 540))


def test_a_row_key_the_data_lacks_is_refused_not_generated(tmp_path):
    data, schema_path = _keyed(tmp_path, "d.csv", [str(k) for k in range(40)], row_key="eventid")
    with pytest.raises(DataError, match=r"d\.csv: missing row key column 'eventid' named by row_key in .*schema\.json"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_without_row_key_the_rows_are_numbered_as_row_id(tmp_path):
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10},
                                                       {"name": "price", "kind": "dense"}]}
    schema = prepare_tabular(_city_data(tmp_path, "a.csv", ["rome", "paris"] * 20, [0.5] * 40),
                             _schema_file(tmp_path, raw), str(tmp_path / "out"))
    assert schema.row_key == "row_id" and sorted(_all(schema, "row_id").tolist()) == list(range(40))


@pytest.mark.parametrize("bad, message", [
    ("e40", r"d\.csv: column 'event_id', data row 4 \(line 6 if no blank line or multi-line cell precedes it\): row key 'e40' is not an integer"),
    ("", r"d\.csv: column 'event_id', data row 4 \(line 6 if no blank line or multi-line cell precedes it\): null value; expected an integer row key"),
    ("99999999999999999999", r"d\.csv: column 'event_id', data row 4 \(line 6 if no blank line or multi-line cell precedes "
                             r"it\): row key 99999999999999999999 is outside -2\*\*63 \.\. 2\*\*63 - 1; expected an integer "
                             r"row key per row .*, within int64"),
])
def test_a_bad_row_key_names_the_file_and_row(tmp_path, bad, message):
    keys = [str(k) for k in range(40)]
    keys[4] = bad
    data, schema_path = _keyed(tmp_path, "d.csv", keys)
    with pytest.raises(DataError, match=message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_a_repeated_row_key_is_refused_naming_the_key_and_rows(tmp_path):
    keys = [str(k) for k in range(100, 140)]
    keys[6] = "103"
    data, schema_path = _keyed(tmp_path, "d.csv", keys)
    with pytest.raises(DataError, match=r"d\.csv: row key column 'event_id': key 103 is repeated, in data row 3 "
                                        r"\(line 5 if no blank line or multi-line cell precedes it\) and data row 6 \(line 8 if no blank line or multi-line cell precedes it\)"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    pq.write_table(pa.table({"event_id": [1, 2, 1], "user": [1, 2, 3], "price": [0.5] * 3, "clicked": [0, 1, 0]}),
                   tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"d\.parquet: row key column 'event_id': key 1 is repeated, in row 0 and row 2"):
        prepare_tabular(str(tmp_path / "d.parquet"), schema_path, str(tmp_path / "out"))


def test_a_row_key_repeated_next_to_itself_among_increasing_keys_is_refused(tmp_path):
    """Keys in increasing order but for one repeated in the next row: the quick path for increasing keys takes
    only strictly increasing ones as unique."""
    keys = [str(k) for k in range(100, 140)]
    keys[5] = "104"
    data, schema_path = _keyed(tmp_path, "d.csv", keys)
    with pytest.raises(DataError, match=r"d\.csv: row key column 'event_id': key 104 is repeated, in data row 4 .* and "
                                        r"data row 5 "):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize("stray", ["3.5", "bob"])
def test_a_stray_cell_in_an_integer_id_column_is_an_error_not_a_vocabulary(tmp_path, stray):
    users = [str(i % 7) for i in range(40)]
    users[9] = stray
    data, schema_path = _keyed(tmp_path, "d.csv", [str(k) for k in range(40)], users)
    with pytest.raises(DataError, match=rf"d\.csv: column 'user', data row 9 \(line 11 if no blank line or multi-line cell precedes it\): '{stray}' is "
                                        r"not an integer.*--vocabulary user.*\"hashed\": true"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    # asked for: a vocabulary of every value (ids 1..V), written as value text
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(vocabulary_fields=("user",)))
    assert schema.load_value_text("user")["text"].to_pylist() == ["unknown"] + sorted(set(users))
    assert sorted(set(_all(schema, "user").tolist())) == list(range(1, len(set(users)) + 1))


def test_vocabulary_fields_must_name_an_unhashed_categorical_field(tmp_path):
    data, schema_path = _keyed(tmp_path, "d.csv", [str(k) for k in range(40)])
    with pytest.raises(ValueError, match=r"--vocabulary price \(TabularConfig\.vocabulary_fields\): .* has no sparse"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(vocabulary_fields=("price",)))


def test_a_missing_split_by_column_is_named_as_the_options_not_the_schemas(tmp_path):
    data, schema_path = _keyed(tmp_path, "d.csv", [str(k) for k in range(40)])
    with pytest.raises(DataError, match=r"d\.csv: missing column 'time' named by --split-by \(TabularConfig\.split_by\)"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(split_by="time"))


@pytest.mark.parametrize("option, value, message", [
    ("seed", -1, r"^TabularConfig\.seed must be an integer >= 0, got -1$"),
    ("rows_per_group", 0, r"^TabularConfig\.rows_per_group must be an integer >= 1, got 0$"),
    ("fill_missing_dense", float("nan"), r"^TabularConfig\.fill_missing_dense must be a finite number or None, got nan$"),
    ("delimiter", ",,", r"TabularConfig\.delimiter=',,': expected one character"),
    ("vocabulary_fields", "user", r"TabularConfig\.vocabulary_fields='user': expected a tuple of strings"),
])
def test_bad_numbers_and_options_are_refused_naming_the_option(option, value, message):
    with pytest.raises(ValueError, match=message):
        TabularConfig(**{option: value})


def test_vocabulary_fields_also_map_an_integer_typed_parquet_column(tmp_path):
    pq.write_table(pa.table({"zip": [75001, 13001, 75001, 69001] * 10, "price": [0.5] * 40,
                             "clicked": [0, 1] * 20}), tmp_path / "z.parquet")
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "zip", "kind": "sparse", "cardinality": 4},
                                                       {"name": "price", "kind": "dense"}]}
    schema = prepare_tabular(str(tmp_path / "z.parquet"), _schema_file(tmp_path, raw), str(tmp_path / "out"),
                             TabularConfig(vocabulary_fields=("zip",)))
    assert schema.load_value_text("zip")["text"].to_pylist() == ["unknown", "13001", "69001", "75001"]
    assert sorted(set(_all(schema, "zip").tolist())) == [1, 2, 3]


def test_a_field_named_row_id_without_a_row_key_is_refused_naming_the_numbered_rows_not_a_row_key(tmp_path):
    """The schema names no row_key: the message must not blame one, but the name the numbered rows take."""
    path = tmp_path / "d.csv"
    path.write_text("row_id,clicked\n" + "".join(f"{i % 5},{i % 2}\n" for i in range(40)))
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked",
                                          "fields": [{"name": "row_id", "kind": "sparse", "cardinality": 10}]})
    with pytest.raises(SchemaError, match=r"schema\.json: without row_key the rows are numbered as 'row_id', which is "
                                          r"also a field or the label; expected another name for that column, or a "
                                          r"row_key"):
        prepare_tabular(str(path), schema_path, str(tmp_path / "out"))


def test_a_row_key_that_is_also_a_field_is_refused_and_one_listed_as_extra_is_written_once(tmp_path):
    data, schema_path = _keyed(tmp_path, "d.csv", [str(k) for k in range(40)], row_key="user")
    with pytest.raises(SchemaError, match=r"schema\.json: row_key 'user' is also a field or the label"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    raw = json.loads(open(schema_path).read())
    raw.update(row_key="event_id", extra_columns=["event_id"])
    schema = prepare_tabular(data, _schema_file(tmp_path, raw), str(tmp_path / "out"))
    assert schema.extra_columns == [] and pq.read_schema(schema.split_path("train")).names.count("event_id") == 1


def test_split_by_the_row_key_orders_keys_as_numbers(tmp_path):
    keys = [str(k) for k in range(1, 41)]  # as strings "10" would sort before "9"
    data, schema_path = _keyed(tmp_path, "d.csv", keys)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(split_by="event_id"))
    assert pq.read_table(schema.split_path("test"))["event_id"].to_pylist() == list(range(37, 41))


def test_a_float_row_key_of_whole_numbers_is_read_as_integers(tmp_path) -> None:
    """pandas writes an integer column with a gap as float64: whole numbers are keys, fractions are not."""
    schema_path = tmp_path / "s.yaml"
    schema_path.write_text("name: k\nlabel: clicked\nrow_key: event_id\nfields:\n"
                           "  - {name: user, kind: sparse, cardinality: 10, description: user}\n")
    for name, keys in (("whole", [float(i) for i in range(40)]), ("fraction", [i + 0.5 for i in range(40)])):
        pq.write_table(pa.table({"event_id": pa.array(keys, pa.float64()), "user": pa.array([i % 10 for i in range(40)]),
                                 "clicked": pa.array([i % 2 for i in range(40)])}), str(tmp_path / f"{name}.parquet"))
    schema = prepare_tabular(str(tmp_path / "whole.parquet"), str(schema_path), str(tmp_path / "out"))
    keys = sorted(k for split in schema.splits for k in pq.read_table(schema.split_path(split)).column("event_id").to_pylist())
    assert keys == list(range(40))
    with pytest.raises(DataError, match=r"fraction\.parquet: row key column 'event_id' has non-integer values: row 0: "
                                        r"row key 0\.5 is not a whole number; expected an integer row key per row"):
        prepare_tabular(str(tmp_path / "fraction.parquet"), str(schema_path), str(tmp_path / "out2"))
    pq.write_table(pa.table({"event_id": pa.array([None, 1.0, float("nan")] + [float(i) for i in range(3, 40)]),
                             "user": pa.array([i % 10 for i in range(40)]), "clicked": pa.array([i % 2 for i in range(40)])}),
                   str(tmp_path / "nan.parquet"))
    with pytest.raises(DataError, match=r"nan\.parquet: row key column 'event_id' has non-integer values: row 2: row key nan"):
        prepare_tabular(str(tmp_path / "nan.parquet"), str(schema_path), str(tmp_path / "out2"))


def test_an_empty_description_is_no_description(tmp_path) -> None:
    from recsys_llm.data.schema import DatasetSchema

    schema = DatasetSchema.from_dict({"fields": [{"name": "user", "kind": "sparse", "cardinality": 3,
                                                  "description": None}]})
    assert schema.fields[0].description == ""


# ---- bad input in a time-ordered split, a numeric column or the schema --------------------------------
_ROW_5 = r"data row 5 \(line 7 if no blank line or multi-line cell precedes it\)"


def test_a_word_in_the_split_column_is_refused_not_ranked_as_text(tmp_path):
    """One word makes pyarrow read the column as text, whose order ("10" < "100" < "20") is no time order."""
    rows = _rows()
    rows["ts"] = ["yesterday" if i == 5 else str(i) for i in range(200)]
    with pytest.raises(DataError, match=rf"d\.csv: column 'ts', {_ROW_5}: 'yesterday' is not a number as 199 of "
                                        r"the column's other 199 values are; expected one sortable type .*numbers, or "
                                        r"ISO-8601 dates/timestamps"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"),
                        TabularConfig(split_by="ts"))
    assert not os.path.exists(tmp_path / "out")
    # past the first block, from which pyarrow types the column as integers: read with the whole file's type, alike
    rows["ts"] = ["yesterday" if i == 150 else str(i) for i in range(200)]
    with pytest.raises(DataError, match=r"d\.csv: column 'ts', data row 150 \(line 152 .*\): 'yesterday' is not a "
                                        r"number as 199 of the column's other 199 values are; expected one sortable "
                                        r"type"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"),
                        TabularConfig(split_by="ts", block_bytes=2000))


def test_a_split_column_of_no_time_order_is_refused_naming_its_type(tmp_path):
    """A list column was a traceback (Sorting not supported), a struct one "Must specify one or more sort keys", and
    a binary one was ranked by its bytes (x1 < x10 < x100 < x2)."""
    raw = {"name": "t", "label": "clicked", "extra_columns": ["when"],
           "fields": [{"name": "day", "kind": "sparse", "cardinality": 300}]}
    base = {"day": [str(i + 1) for i in range(200)], "clicked": [i % 2 for i in range(200)]}
    for name, column, message in [
        ("list", pa.array([[i] for i in range(200)]), r"split column 'when' has type list<element: int64>; expected"),
        ("struct", pa.array([{"t": i} for i in range(200)]), r"split column 'when' has type struct<t: int64>; expected"),
        ("binary", pa.array([f"x{i}".encode() for i in range(200)], pa.binary()),
         r"column 'when', row 0: 'x0' is neither a number nor an ISO-8601 date/timestamp"),
        ("date", pa.array(["2024-13-45" if i == 7 else f"2024-01-{1 + i % 28:02d}" for i in range(200)]),
         r"'2024-13-45' is not an ISO-8601 date/timestamp without a zone offset as 199 of the column's other 199 "
         r"values are"),
    ]:
        pq.write_table(pa.table({"when": column, **base}), tmp_path / f"{name}.parquet")
        with pytest.raises(DataError, match=rf"{name}\.parquet: .*{message}"):
            prepare_tabular(str(tmp_path / f"{name}.parquet"), _schema_file(tmp_path, raw), str(tmp_path / name),
                            TabularConfig(split_by="when"))
    # a binary column of numbers is ranked by their values, as a text column of them is
    pq.write_table(pa.table({"when": pa.array([str(199 - i).encode() for i in range(200)], pa.binary()), **base}),
                   tmp_path / "numbers.parquet")
    schema = prepare_tabular(str(tmp_path / "numbers.parquet"), _schema_file(tmp_path, raw), str(tmp_path / "n"),
                             TabularConfig(split_by="when"))
    assert sorted(pq.read_table(schema.split_path("test"))["day"].to_pylist()) == list(range(1, 21))


def test_a_text_split_column_of_numbers_or_iso_timestamps_is_ranked_by_value(tmp_path):
    # ISO-8601 written three ways: as text, "2024-01-01 00:30:00" < "2024-01-01T00:10:00" (' ' < 'T')
    stamps = [f"2024-01-01{'T' if i % 2 else ' '}{i // 60:02d}:{i % 60:02d}:00" if i % 7 else f"2024-01-{1 + i // 1440:02d}"
              for i in range(1, 41)]
    order = np.random.default_rng(0).permutation(40)
    raw = {"name": "t", "label": "clicked", "extra_columns": ["when"],
           "fields": [{"name": "day", "kind": "sparse", "cardinality": 100}]}  # a sparse field is read as text
    pq.write_table(pa.table({"when": [stamps[i] for i in order], "day": [str(i + 1) for i in order],
                             "clicked": [int(i % 2) for i in order]}), tmp_path / "d.parquet")
    for column in ("when", "day"):
        schema = prepare_tabular(str(tmp_path / "d.parquet"), _schema_file(tmp_path, raw), str(tmp_path / column),
                                 TabularConfig(split_by=column))
        assert sorted(pq.read_table(schema.split_path("test"))["day"].to_pylist()) == [37, 38, 39, 40]


def test_quoted_cells_spanning_lines_are_read_alike_whichever_block_ends_inside_them(tmp_path):
    """The CSV is read in blocks of block_bytes: a multi-line cell (a review) across a block's end is one cell."""
    path = tmp_path / "reviews.csv"
    cities = ['"Paris,\nFrance"' if i % 7 == 3 else CITIES[i % 4] for i in range(120)]
    path.write_text("user,city,clicked\n" + "".join(f"{i % 50},{city},{i % 2}\n" for i, city in enumerate(cities)))
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked",
                                          "fields": [{"name": "user", "kind": "sparse", "cardinality": 100},
                                                     {"name": "city", "kind": "sparse", "cardinality": 10}]})
    whole = prepare_tabular(str(path), schema_path, str(tmp_path / "whole"))
    expected = _rows_of(whole, "city")
    assert expected[3] == 1 + sorted(CITIES + ["Paris,\nFrance"]).index("Paris,\nFrance")
    for block_bytes in range(200, 400, 9):
        schema = prepare_tabular(str(path), schema_path, str(tmp_path / "blocks"), TabularConfig(block_bytes=block_bytes))
        assert _rows_of(schema, "city") == expected, block_bytes


def test_extra_and_split_columns_take_their_types_from_the_whole_csv_not_its_first_block(tmp_path):
    """They took their types from the first block: an extra column empty there was refused at a later 'hello' as "not
    a null like the column's first rows", and an integer column at a later 3.5 as "expected one type per column"."""
    path = tmp_path / "d.csv"
    path.write_text("user,note,score,clicked\n" + "".join(
        f"{i % 50},{'hello' if i == 300 else ''},{3.5 if i == 310 else i},{i % 2}\n" for i in range(400)))
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked", "extra_columns": ["note", "score"],
                                          "fields": [{"name": "user", "kind": "sparse", "cardinality": 100}]})
    whole = prepare_tabular(str(path), schema_path, str(tmp_path / "whole"))  # one block: the whole file's types
    for split_by in (None, "score"):
        schema = prepare_tabular(str(path), schema_path, str(tmp_path / f"blocks_{split_by}"),
                                 TabularConfig(block_bytes=2000, split_by=split_by))
        for column in ("note", "score"):
            assert _rows_of(schema, column) == _rows_of(whole, column), (split_by, column)
        assert _rows_of(schema, "note")[300] == "hello" and _rows_of(schema, "score")[310] == 3.5


def test_a_row_of_another_column_count_is_named_when_a_column_changes_type_past_the_first_block(tmp_path):
    """Reading the file again for the whole file's types failed at the row of 4 columns, so the error was the
    type change ("'hello' is not a null like the column's first rows"), which converts, not the row that does not."""
    path = tmp_path / "d.csv"
    path.write_text("user,note,clicked\n" + "".join(
        f"{i % 50},{'hello' if i == 1000 else ''},{i % 2}{',extra' if i == 1500 else ''}\n" for i in range(1600)))
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked", "extra_columns": ["note"],
                                          "fields": [{"name": "user", "kind": "sparse", "cardinality": 100}]})
    for block_bytes in (None, 2000):  # one block, and 'hello' past the first
        config = TabularConfig() if block_bytes is None else TabularConfig(block_bytes=block_bytes)
        with pytest.raises(DataError, match=r"d\.csv, line 1502: 4 columns, expected 3: '0,,0,extra'"):
            prepare_tabular(str(path), schema_path, str(tmp_path / "out"), config)


def test_a_dictionary_encoded_split_column_is_ranked_by_its_values(tmp_path):
    """pandas writes a category column as a Parquet dictionary, which Arrow cannot sort as it is."""
    order = np.random.default_rng(0).permutation(40)
    days = pa.array([f"2024-01-{1 + i // 2:02d}" for i in order]).dictionary_encode()
    pq.write_table(pa.table({"day": days, "user": pa.array(order + 1), "clicked": [int(i % 2) for i in order]}),
                   tmp_path / "d.parquet")
    raw = {"name": "t", "label": "clicked", "extra_columns": ["day"],
           "fields": [{"name": "user", "kind": "sparse", "cardinality": 100}]}
    schema = prepare_tabular(str(tmp_path / "d.parquet"), _schema_file(tmp_path, raw), str(tmp_path / "out"),
                             TabularConfig(split_by="day"))
    assert sorted(pq.read_table(schema.split_path("test"))["user"].to_pylist()) == [37, 38, 39, 40]


def test_a_word_in_a_numeric_csv_column_names_the_column_and_data_row(tmp_path):
    rows = _rows()
    rows["price"] = ["abc" if i == 7 else "1.5" for i in range(200)]
    with pytest.raises(DataError, match=r"d\.csv: column 'price', data row 7 \(line 9 if no blank line or multi-line "
                                        r"cell precedes it\): 'abc' is not a number; expected a number in every row "
                                        r"of dense field 'price'"):
        prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("fields, what", [([], r"fields is empty"),
                                          ([{"name": "price", "kind": "dense"}], r"fields \['price'\] are all dense")])
def test_a_schema_without_a_categorical_field_is_refused_at_prepare(tmp_path, fields, what):
    path = _schema_file(tmp_path, dict(SCHEMA, fields=fields), yaml_format=True)
    with pytest.raises(SchemaError, match=rf"schema\.yaml: {what}; expected at least one sparse or sequence field"):
        prepare_tabular(_csv(tmp_path / "d.csv", _rows()), path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


# ---- Parquet column types: null list elements, dictionaries, floats, uint64, mixed files -------------
def _parquet_case(tmp_path, columns, fields, name="d.parquet"):
    """A Parquet file (or, for a list of column dicts, a directory of part files) with a 0/1 ``clicked``
    column added, and a YAML schema of ``fields``; returns (data, schema) paths."""
    parts = columns if isinstance(columns, list) else [columns]
    paths = []
    for i, part in enumerate(parts):
        rows = len(next(iter(part.values())))
        table = pa.table({**part, "clicked": pa.array([r % 2 for r in range(rows)], pa.int64())})
        paths.append(tmp_path / (name if len(parts) == 1 else os.path.join(name, f"part{i}.parquet")))
        paths[-1].parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, paths[-1])
    data = str(paths[0] if len(parts) == 1 else tmp_path / name)
    return data, _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": fields}, yaml_format=True)


def _rows_of(schema, column):
    """The written values of ``column`` in source row order (rows are numbered as row_id)."""
    table = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits]).sort_by("row_id")
    return table[column].to_pylist()


SEQ = [{"name": "cats", "kind": "sequence", "cardinality": 10, "max_length": 3}]
SPARSE = [{"name": "city", "kind": "sparse", "cardinality": 10}]


def test_a_null_element_of_a_string_list_is_dropped_like_an_empty_token(tmp_path):
    lists = [["toys", None, "books"], [None], None, ["toys", " "]] * 10
    data, schema_path = _parquet_case(tmp_path, {"cats": pa.array(lists, pa.list_(pa.string()))}, SEQ)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    text = schema.load_value_text("cats")["text"].to_pylist()
    assert text == ["unknown", "books", "toys"]
    assert _rows_of(schema, "cats")[:4] == [[2, 1], [], [], [2]]


def test_a_sparse_fields_tokens_are_trimmed_like_a_sequences(tmp_path):
    """' Paris' (a space after a CSV comma) is the city 'Paris', as it is inside a sequence, not a second
    city with its own id and text; a blank cell is missing (id 0) like an empty one, not a token ' '."""
    cities = ["Paris", " Paris", "Lyon ", "Lyon", "", " "] * 10
    schema = prepare_tabular(_city_data(tmp_path, "c.csv", cities, [0.5] * 60), _city_schema(tmp_path),
                             str(tmp_path / "out"))
    assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "Lyon", "Paris"]
    assert _rows_of(schema, "city")[:6] == [2, 2, 1, 1, 0, 0]
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array(cities)}, SPARSE)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out-parquet"))
    assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "Lyon", "Paris"]
    assert _rows_of(schema, "city")[:6] == [2, 2, 1, 1, 0, 0]


def test_a_null_element_of_an_integer_list_is_dropped_like_a_null_string_token(tmp_path):
    lists = [[1, None, 3], [None], None, [4]] * 10
    data, schema_path = _parquet_case(tmp_path, {"cats": pa.array(lists, pa.list_(pa.int64()))}, SEQ)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert _rows_of(schema, "cats")[:4] == [[1, 3], [], [], [4]]


def test_a_missing_marker_in_a_csv_sequence_of_integer_ids_is_dropped(tmp_path):
    """A missing id is dropped from a sequence, whether a null list element, an empty token or NA."""
    raw = {"name": "t", "label": "clicked", "fields": SEQ + [{"name": "price", "kind": "dense"}]}
    data = _city_data(tmp_path, "s.csv", ["1|NA|3", "2", "NA", "3||4"] * 10, [0.5] * 40, column="cats")
    schema = prepare_tabular(data, _schema_file(tmp_path, raw), str(tmp_path / "out"))
    assert schema.field("cats").value_text is None  # ids, not a vocabulary
    assert _rows_of(schema, "cats")[:4] == [[1, 3], [2], [], [3, 4]]


@pytest.mark.parametrize("column, kind, message", [
    (pa.array(list(range(40)), pa.int64()), "sequence",
     r"d\.parquet: column 'cats' \(sequence field\) has type int64; expected a list column \(e\.g\. list<int64> or "
     r"list<string>\) or a string column of tokens joined by '\|' \(--sequence-separator"),
    (pa.array([float(i) for i in range(40)]), "sequence", r"column 'cats' \(sequence field\) has type double; expected a list"),
    (pa.array([[1, 2]] * 40), "sparse",
     r"d\.parquet: column 'cats' \(sparse field\) has type list<element: int64>; expected one integer id or string token "
     r"per row \(a list column fits a sequence field\)"),
])
def test_a_column_of_the_wrong_shape_for_its_field_is_refused_naming_file_column_and_type(tmp_path, column, kind, message):
    field = dict(SEQ[0], kind=kind)
    if kind != "sequence":
        del field["max_length"]  # a sparse field's max_length is refused by the schema check first
    data, schema_path = _parquet_case(tmp_path, {"cats": column}, [field])
    with pytest.raises(DataError, match=message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_a_parquet_string_column_of_a_sequence_field_is_split_by_the_separator(tmp_path):
    data, schema_path = _parquet_case(tmp_path, {"cats": pa.array(["a|b", None, "b"] * 14)}, SEQ)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert _rows_of(schema, "cats")[:3] == [[1, 2], [], [2]]


def test_dictionary_encoded_columns_are_read_as_their_values(tmp_path):
    """pandas writes a category column as dictionary<values=string, indices=int32>."""
    cities = pa.array(["paris", "lyon", None, "paris"] * 10).dictionary_encode()
    cats = pa.array([["a", "b"], ["b", None], None, []] * 10, pa.list_(pa.dictionary(pa.int32(), pa.string())))
    users = pa.array([3, 4, None, 3] * 10).dictionary_encode()
    fields = SPARSE + SEQ + [{"name": "user", "kind": "sparse", "cardinality": 10}]
    data, schema_path = _parquet_case(tmp_path, {"city": cities, "cats": cats, "user": users}, fields)
    assert pa.types.is_dictionary(pq.read_schema(data).field("city").type)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "lyon", "paris"]
    assert _rows_of(schema, "city")[:4] == [2, 1, 0, 2]
    assert _rows_of(schema, "cats")[:4] == [[1, 2], [2], [], []]
    assert _rows_of(schema, "user")[:4] == [3, 4, 0, 3]


def test_a_float_id_column_of_whole_numbers_is_read_as_ids_with_nan_missing(tmp_path):
    """pandas writes an integer column with a gap as float64."""
    cities = pa.array([1.0, None, float("nan"), 7.0] * 10)
    cats = pa.array([[1.0, float("nan"), 3.0], None, [None], [2.0]] * 10)
    data, schema_path = _parquet_case(tmp_path, {"city": cities, "cats": cats}, SPARSE + SEQ)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert schema.field("city").value_text is None
    assert _rows_of(schema, "city")[:4] == [1, 0, 0, 7]
    assert _rows_of(schema, "cats")[:4] == [[1, 3], [], [], [2]]


@pytest.mark.parametrize("fields, column, row, value", [
    (SPARSE, {"city": pa.array([1.0, 2.0, 2.5, 3.0] * 10)}, 2, "2.5"),
    (SPARSE, {"city": pa.array([1.0, 2.0, 3.0, float("inf")] * 10)}, 3, "inf"),
    (SEQ, {"cats": pa.array([[1.0], [2.0, None], [2.0, 3.25]] * 14)}, 2, "3.25"),
])
def test_a_fraction_in_a_float_id_column_names_the_file_column_row_and_value(tmp_path, fields, column, row, value):
    data, schema_path = _parquet_case(tmp_path, column, fields)
    name = fields[0]["name"]
    with pytest.raises(DataError, match=rf"d\.parquet: column '{name}', row {row}: {value} is not a whole number; "
                                        rf"expected integer ids in {fields[0]['kind']} field '{name}'"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_a_parquet_directory_mixing_integer_and_string_ids_names_the_file_and_both_types(tmp_path):
    parts = [{"city": pa.array([1, 2] * 20)}, {"city": pa.array(["paris", "1"] * 20)}]
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    with pytest.raises(DataError, match=r"dir: column 'city' has type string \(string tokens\) in .*dir/part1\.parquet "
                                        r"but int64 \(integer ids\) in .*dir/part0\.parquet; expected integer ids in every "
                                        r"file or string tokens in every file \(write the column with one type, or pass "
                                        r"--vocabulary city"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    # as the message says: with --vocabulary every value is read as text, the integers of part0 included
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(vocabulary_fields=("city",)))
    assert schema.load_value_text("city")["text"].to_pylist() == ["unknown", "1", "2", "paris"]
    assert _rows_of(schema, "city")[:2] + _rows_of(schema, "city")[40:42] == [1, 2, 3, 1]


def test_a_parquet_directory_whose_later_file_lacks_a_column_names_that_file(tmp_path):
    parts = [{"city": pa.array([1, 2] * 20)}, {"town": pa.array([1, 2] * 20)}]
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    with pytest.raises(DataError, match=r"dir/part1\.parquet: missing column\(s\) \['city'\] that .*part0\.parquet has"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_uint64_ids_above_the_int64_range_are_named_as_they_are_or_folded_when_hashed(tmp_path):
    big = 2**63 + 5
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, big, 2, 3] * 10, pa.uint64())}, SPARSE)
    with pytest.raises(DataError, match=rf"d\.parquet: column 'city', row 1: id {big} in sparse field 'city' is >= "
                                        r"cardinality 10"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, big, 2, 3] * 10, pa.uint64())},
                                      [dict(SPARSE[0], hashed=True)])
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert _rows_of(schema, "city")[:4] == [1, (big - 2**64) % 10, 2, 3]  # the int64 of its bits, as served


def test_a_column_twice_in_a_csv_header_is_refused_naming_it(tmp_path):
    path = tmp_path / "dup.csv"
    path.write_text("city,clicked,city\n" + "".join(f"{i % 5},{i % 2},{900 + i}\n" for i in range(40)))
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": SPARSE}, yaml_format=True)
    with pytest.raises(DataError, match=r"dup\.csv: column\(s\) \['city'\] named in .*schema\.yaml occur more than once"):
        prepare_tabular(str(path), schema_path, str(tmp_path / "out"))


@pytest.mark.parametrize("header, raw, config, message", [
    ("city,clicked,ts,ts", {}, TabularConfig(split_by="ts"),
     r"column 'ts' named by --split-by \(TabularConfig\.split_by\) occurs more than once"),
    ("city,clicked,event,event", {"row_key": "event"}, TabularConfig(),
     r"column\(s\) \['event'\] named in .*schema\.yaml occur more than once"),
    ("city,clicked,row_id,row_id", {}, TabularConfig(),  # the row key without row_key in the schema
     r"column 'row_id', read as the row key as .*schema\.yaml names no row_key, occurs more than once"),
])
def test_a_split_column_or_row_key_twice_in_a_csv_header_is_refused_not_read_from_the_first(
    tmp_path, header, raw, config, message
):
    """The CSV reader would take the first of two same-named columns: a time split or row keys from the wrong one."""
    path = tmp_path / "dup.csv"
    path.write_text(header + "\n" + "".join(f"{i % 5},{i % 2},{i},{900 - i}\n" for i in range(40)))
    schema = {"name": "t", "label": "clicked", "fields": SPARSE, **raw}
    with pytest.raises(DataError, match=r"dup\.csv: " + message):
        prepare_tabular(str(path), _schema_file(tmp_path, schema, yaml_format=True), str(tmp_path / "out"), config)


@pytest.mark.parametrize("kind, cell, row", [("sparse", "99999999999999999999", 3), ("sequence", "1|-9223372036854775809", 3)])
def test_a_csv_id_beyond_int64_names_the_file_column_and_row(tmp_path, kind, cell, row):
    path = tmp_path / "big.csv"
    path.write_text("city,clicked\n" + "".join(f"{cell if i == row else i % 5},{i % 2}\n" for i in range(40)))
    fields = [dict(SPARSE[0], kind=kind, **({"max_length": 2} if kind == "sequence" else {}))]
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": fields})
    value = cell.split("|")[-1]
    with pytest.raises(DataError, match=rf"big\.csv: column 'city', data row {row} \(line {row + 2} .*\): id {value} is "
                                        rf"outside the int64 range .*; expected integer ids in \[0, 10\) in {kind} field"):
        prepare_tabular(str(path), schema_path, str(tmp_path / "out"))


def test_a_column_twice_in_a_parquet_file_is_refused_naming_the_file(tmp_path):
    parts = [{"city": pa.array([1, 2] * 20)}, {"city": pa.array([1, 2] * 20)}]
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    second = tmp_path / "dir" / "part1.parquet"
    table = pq.read_table(second)
    pq.write_table(table.append_column("city", table["city"]), second)
    with pytest.raises(DataError, match=r"dir/part1\.parquet: column\(s\) \['city'\] occur more than once"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_decimal_dense_and_label_columns_are_read_as_numbers(tmp_path):
    """Spark and DuckDB write a DECIMAL(10, 2) price (or a DECIMAL label) as Parquet decimal128."""
    data = tmp_path / "d.parquet"
    pq.write_table(pa.table({
        "city": pa.array([1, 2] * 20),
        "price": pa.array([decimal.Decimal("12.34"), decimal.Decimal("-0.50")] * 20, pa.decimal128(10, 2)),
        "clicked": pa.array([decimal.Decimal(r % 2) for r in range(40)], pa.decimal128(1, 0)),
    }), data)
    schema_path = _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": SPARSE + [{"name": "price", "kind": "dense"}]})
    schema = prepare_tabular(str(data), schema_path, str(tmp_path / "out"))
    assert _rows_of(schema, "price")[:2] == pytest.approx([12.34, -0.5])
    assert _rows_of(schema, "clicked")[:4] == [0, 1, 0, 1]


@pytest.mark.parametrize("fill", [None, 0.0])
def test_a_dense_value_beyond_float32_is_refused_not_written_as_inf(tmp_path, fill):
    """Dense features are stored as float32: 1e300 would become inf in the prepared data (NaN losses in training)."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20), "price": pa.array([0.5, 1e300] + [0.5] * 38)},
                                      SPARSE + [{"name": "price", "kind": "dense"}])
    with pytest.raises(DataError, match=r"d\.parquet: column 'price', row 1: dense feature 1e\+300 is outside the float32 "
                                        r"range .*; expected a finite float32 value"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(fill_missing_dense=fill))
    assert not os.path.exists(tmp_path / "out")


def test_fill_missing_dense_replaces_nan_and_inf_too(tmp_path):
    """--fill-missing-dense replaces missing and NaN/inf dense values (as the hint says), not only nulls."""
    price = pa.array([0.5, None, float("nan"), float("inf"), float("-inf")] + [0.5] * 35)
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20), "price": price},
                                      SPARSE + [{"name": "price", "kind": "dense"}])
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(fill_missing_dense=-1.0))
    assert _rows_of(schema, "price")[:6] == [0.5, -1.0, -1.0, -1.0, -1.0, 0.5]


def test_a_uint64_row_key_above_the_int64_range_names_the_file_column_and_row(tmp_path):
    keys = pa.array([7, 8, 2**64 - 1] + list(range(9, 46)), pa.uint64())
    data, schema_path = _parquet_case(tmp_path, {"event_id": keys, "city": pa.array([1, 2] * 20)}, SPARSE)
    raw = yaml.safe_load(open(schema_path))
    _schema_file(tmp_path, dict(raw, row_key="event_id"), yaml_format=True)
    with pytest.raises(DataError, match=rf"d\.parquet: column 'event_id', row 2: row key {2**64 - 1} is above "
                                        r"2\*\*63 - 1; expected an integer row key per row"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    # uint64 keys within int64 are read as they are
    data, _ = _parquet_case(tmp_path, {"event_id": pa.array(range(40), pa.uint64()), "city": pa.array([1, 2] * 20)}, SPARSE)
    _schema_file(tmp_path, dict(raw, row_key="event_id"), yaml_format=True)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert sorted(_all(schema, "event_id").tolist()) == list(range(40))


def test_a_parquet_directory_whose_split_column_or_extra_column_widens_between_files_is_read_as_one_type(tmp_path):
    """int32 in one file and int64 in the next, or ms and us timestamps: one column, ranked and written as one type."""
    ts = pa.array(range(40, 80), pa.int64()).cast(pa.timestamp("us"))
    parts = [{"city": pa.array([1, 2] * 20), "ts": pa.array(range(40), pa.int32()), "at": pa.array(range(40), pa.int64()).cast(pa.timestamp("ms"))},
             {"city": pa.array([3, 4] * 20), "ts": pa.array(range(40, 80), pa.int64()), "at": ts}]
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": SPARSE, "extra_columns": ["at"]}, yaml_format=True)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(split_by="ts"))
    tables = {s: pq.read_table(schema.split_path(s)) for s in schema.splits}
    assert [t.num_rows for t in tables.values()] == [64, 8, 8]
    assert tables["train"]["row_id"].to_pylist() == list(range(64)) and tables["test"]["row_id"].to_pylist() == list(range(72, 80))
    assert tables["train"].schema.field("at").type == pa.timestamp("us")
    assert tables["test"]["at"].to_pylist() == ts.slice(32).to_pylist()


@pytest.mark.parametrize("option, message", [
    ("extra", r"column 'at' \(extra column\) has type int64 in .*dir/part1\.parquet but timestamp\[ms\] in "
              r".*dir/part0\.parquet; expected one type in every file"),
    ("split", r"column 'at' \(split column, --split-by\) has type int64 in .*dir/part1\.parquet but timestamp\[ms\] in "
              r".*dir/part0\.parquet; expected one type in every file"),
])
def test_a_parquet_directory_whose_split_or_extra_column_changes_type_names_the_files(tmp_path, option, message):
    """An int64 column after a timestamp one would be written as milliseconds or fail sorting in pyarrow."""
    parts = [{"city": pa.array([1, 2] * 20), "at": pa.array(range(40), pa.int64()).cast(pa.timestamp("ms"))},
             {"city": pa.array([3, 4] * 20), "at": pa.array(range(40, 80), pa.int64())}]
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    raw = {"name": "t", "label": "clicked", "fields": SPARSE, **({"extra_columns": ["at"]} if option == "extra" else {})}
    _schema_file(tmp_path, raw, yaml_format=True)
    config = TabularConfig(split_by="at" if option == "split" else None)
    with pytest.raises(DataError, match=r"dir: " + message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), config)
    assert not os.path.exists(tmp_path / "out")


def _with_value_text(tmp_path, ids, texts):
    """A Parquet case of sparse field ``city`` whose schema names ``cities.parquet`` (``ids``, ``texts``) as its value text."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20)},
                                      [dict(SPARSE[0], value_text="cities.parquet")])
    pq.write_table(pa.table({"id": ids, "text": texts}), tmp_path / "cities.parquet")
    return data, schema_path


@pytest.mark.parametrize("ids, texts, message", [
    (pa.array([0, 1, 2, 1]), pa.array(["?", "rome", "paris", "oslo"]),
     r"id 1 is repeated, in rows 1 and 3; expected one text per id"),
    (pa.array(["0", "1", "2"]), pa.array(["?", "rome", "paris"]), r"column 'id' has type string; expected integer ids"),
    (pa.array([0, None, 2]), pa.array(["?", "rome", "paris"]), r"column 'id', row 1: null value; expected an integer id"),
    (pa.array([0, 1, 2]), pa.array([b"?", b"rome", b"s\xe3o paulo"]),
     r"column 'text', row 2: b's\\xe3o paulo' is not UTF-8; expected UTF-8 text"),
])
def test_a_bad_value_text_file_is_refused_at_prepare_naming_the_file(tmp_path, ids, texts, message):
    """Duplicate ids (one text silently picked), string or null ids, non-UTF-8 text: refused before any row is read,
    not when an LLM step reads the copy."""
    data, schema_path = _with_value_text(tmp_path, ids, texts)
    with pytest.raises(DataError, match=r"cities\.parquet: value-text file of field 'city': " + message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_value_text_file_is_written_with_int64_ids_and_string_text(tmp_path):
    data, schema_path = _with_value_text(tmp_path, pa.array([0, 1, 2], pa.int32()), pa.array([b"?", b"rome", b"s\xc3\xa3o paulo"]))
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    table = schema.load_value_text("city")
    assert table.schema.field("id").type == pa.int64() and table.schema.field("text").type == pa.string()
    assert table.to_pydict() == {"id": [0, 1, 2], "text": ["?", "rome", "são paulo"]}


def test_a_csv_cell_that_is_not_utf8_names_the_column_and_data_row(tmp_path):
    """A latin-1 export (Excel's plain "CSV"): pyarrow names the column by its index and the row counting the header."""
    lines = ["city,price,clicked"] + [f"{c},0.5,{i % 2}" for i, c in enumerate(["rome", "paris"] * 20)]
    lines[4] = "s\xe3o paulo,0.5,1"
    (tmp_path / "latin1.csv").write_bytes(("\n".join(lines) + "\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"latin1\.csv: column 'city', data row 3 \(line 5 if no blank line or multi-line "
                                        r"cell precedes it\): the cell is not UTF-8; expected a UTF-8 file \(re-save it as "
                                        r"UTF-8, e.g. iconv -f latin1 -t utf-8\)"):
        prepare_tabular(str(tmp_path / "latin1.csv"), _city_schema(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("name", ["d.parq", "000000_0"])
def test_a_parquet_file_without_the_parquet_extension_is_read_as_parquet_not_as_csv(tmp_path, name):
    """Hive writes 000000_0, some tools .parq: read as a CSV, the file's bytes were named as its columns."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20)}, SPARSE, name=name)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"))
    assert _rows_of(schema, "city") == [1, 2] * 20



def _two_part_dir(tmp_path, first, second):
    """A directory of two Parquet files of 40 rows (``event_id``, ``city``, ``price``; each file's columns
    updated from ``first`` and ``second``) and a schema with row key ``event_id``; returns (data, schema) paths."""
    parts = [{"event_id": pa.array(range(40)), "city": pa.array([1, 2] * 20), "price": pa.array([0.5] * 40)},
             {"event_id": pa.array(range(40, 80)), "city": pa.array([3, 4] * 20), "price": pa.array([0.5] * 40)}]
    parts[0].update(first)
    parts[1].update(second)
    data, schema_path = _parquet_case(tmp_path, parts, SPARSE, name="dir")
    _schema_file(tmp_path, {"name": "t", "label": "clicked", "row_key": "event_id",
                            "fields": SPARSE + [{"name": "price", "kind": "dense"}]}, yaml_format=True)
    return data, schema_path


@pytest.mark.parametrize("first, second, message", [
    ({}, {"city": pa.array([3] * 7 + [10] + [3] * 32)},
     r"dir/part1\.parquet: column 'city', row 7: id 10 in sparse field 'city' is >= cardinality 10"),
    ({}, {"price": pa.array([0.5] * 9 + [None] + [0.5] * 30)}, r"dir/part1\.parquet: column 'price', row 9: null value"),
    ({"city": pa.array(["1", "2"] * 20)}, {"city": pa.array(["3"] * 39 + ["bob"])},
     r"dir/part1\.parquet: column 'city', row 39: 'bob' is not an integer, but 79 of the column's 80 values"),
    ({}, {"event_id": pa.array([3] + list(range(41, 80)))},
     r"dir: row key column 'event_id': key 3 is repeated, in .*dir/part0\.parquet row 3 and .*dir/part1\.parquet row 0"),
])
def test_an_error_in_a_parquet_directory_names_the_file_and_its_row(tmp_path, first, second, message):
    """Not the directory and a row counted over all its files, which no file shows."""
    data, schema_path = _two_part_dir(tmp_path, first, second)
    with pytest.raises(DataError, match=message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def test_a_column_named_with_other_case_or_spaces_is_pointed_out(tmp_path):
    """Exports often write 'User ' or 'USER': the message points at the column, not only lists them all."""
    data, schema_path = _parquet_case(tmp_path, {"City ": pa.array([1, 2] * 20), "TS": pa.array(range(40))}, SPARSE)
    with pytest.raises(DataError, match=r"d\.parquet: missing column\(s\) \['city'\] named in .*schema\.yaml; the file has "
                                        r"'City ' for 'city' \(names must match exactly, case, spaces and Unicode form "
                                        r"included\); "
                                        r"the file has columns"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    # an NFD 'e' + U+0301 (macOS, some exports) prints as the schema's NFC 'é': the message tells them apart
    data, schema_path = _parquet_case(tmp_path, {"cite\u0301": pa.array([1, 2] * 20), "TS": pa.array(range(40))},
                                      [dict(SPARSE[0], name="cit\u00e9")])
    with pytest.raises(DataError, match=r"the file has 'cit.+' for 'cit.' \('cite\\u0301': another Unicode form of "
                                        r"'cit\\xe9'\)"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20), "TS": pa.array(range(40))}, SPARSE)
    with pytest.raises(DataError, match=r"missing column 'ts' named by --split-by \(TabularConfig\.split_by\); the file has "
                                        r"'TS' for 'ts' \(names must match exactly"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(split_by="ts"))


@pytest.mark.parametrize("labels, shown", [([0.0, 1.0, 0.7, 1.0] * 10, "0.7"), ([0, 1, 2, 1] * 10, "2.0")])
def test_a_label_other_than_0_or_1_points_at_label_threshold(tmp_path, labels, shown):
    """prepare tabular binarises with --label-threshold; the message says so."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20)}, SPARSE)
    table = pq.read_table(data)
    pq.write_table(table.set_column(table.column_names.index("clicked"), "clicked", pa.array(labels)), data)
    with pytest.raises(DataError, match=rf"d\.parquet: column 'clicked', row 2: label {shown} is not a click label; "
                                        r"expected 0 or 1 \(or pass --label-threshold T, TabularConfig\.label_threshold "
                                        r"in Python, for label = value > T\)"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


def _city_with_value_text(tmp_path, cities, field):
    """``d.csv`` (columns city, clicked: ``cities``, clicks alternating from 0) and a schema giving ``field`` the value
    text ``cities.parquet`` (ids 0-9, ``city {id}``); returns the schema's path."""
    (tmp_path / "d.csv").write_text("city,clicked\n" + "".join(f"{city},{i % 2}\n" for i, city in enumerate(cities)))
    pq.write_table(pa.table({"id": pa.array(range(10)), "text": [f"city {i}" for i in range(10)]}), tmp_path / "cities.parquet")
    return _schema_file(tmp_path, {"name": "t", "label": "clicked", "fields": [dict(field, value_text="cities.parquet")]})


def test_a_fields_own_value_text_is_not_silently_replaced_by_a_vocabulary(tmp_path):
    """Its text is keyed by the column's ids: a column of other strings ('u7', pandas' '7.0' in a CSV) would be
    renumbered through a vocabulary and the user's text dropped."""
    cities = [f"{i % 5}{'.0' if i else ''}" for i in range(40)]
    schema_path = _city_with_value_text(tmp_path, cities, SPARSE[0])
    with pytest.raises(DataError, match=r"d\.csv: column 'city' holds strings that are not integer ids \(such as '0\.0'\) "
                                        r"and would be mapped through a vocabulary, but field 'city' has its own value_text "
                                        r".*cities\.parquet, keyed by the column's ids; expected integer ids"):
        prepare_tabular(str(tmp_path / "d.csv"), schema_path, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--vocabulary city \(TabularConfig\.vocabulary_fields\): field 'city' has its own "
                                         r"value_text .*cities\.parquet"):
        prepare_tabular(str(tmp_path / "d.csv"), schema_path, str(tmp_path / "out"), TabularConfig(vocabulary_fields=("city",)))
    assert not os.path.exists(tmp_path / "out")


def test_a_hashed_fields_own_value_text_is_not_silently_left_describing_no_id(tmp_path):
    """Its text is keyed by the column's ids: hashed as text (by --hash, or because some value is no integer), the
    values got other ids, and the prepared value text described none of them."""
    schema_path = _city_with_value_text(tmp_path, [str(i % 5) for i in range(39)] + ["rome"], dict(SPARSE[0], hashed=True))
    with pytest.raises(DataError, match=r"d\.csv: column 'city' of hashed field 'city' holds values that are not integer "
                                        r"ids, so all its values would be hashed as text, but the field has its own "
                                        r"value_text .*cities\.parquet, keyed by the column's ids"):
        prepare_tabular(str(tmp_path / "d.csv"), schema_path, str(tmp_path / "out"))
    with pytest.raises(ValueError, match=r"--hash city \(TabularConfig\.hash_fields\): field 'city' has its own "
                                         r"value_text .*cities\.parquet"):
        prepare_tabular(str(tmp_path / "d.csv"), schema_path, str(tmp_path / "out"), TabularConfig(hash_fields=("city",)))
    assert not os.path.exists(tmp_path / "out")


def _raw_strings(values, list_length=None):
    """A string array of the bytes ``values`` as they are (a writer that does not check UTF-8), in lists of
    ``list_length`` when given."""
    offsets = np.cumsum([0] + [len(v) for v in values]).astype(np.int32)
    strings = pa.Array.from_buffers(pa.string(), len(values), [None, pa.py_buffer(offsets.tobytes()),
                                                               pa.py_buffer(b"".join(values))])
    if list_length is None:
        return strings
    return pa.ListArray.from_arrays(pa.array(np.arange(0, len(values) + 1, list_length, dtype=np.int32)), strings)


@pytest.mark.parametrize("column, fields, message", [
    (_raw_strings([b"rome", b"paris"] * 10 + [b"s\xe3o"] + [b"rome"] * 19), SPARSE, r"column 'city', row 20: b's\\xe3o'"),
    (_raw_strings([b"rome", b"paris"] * 10 + [b"s\xe3o"] + [b"rome"] * 19).dictionary_encode(), SPARSE,
     r"column 'city', row 20: b's\\xe3o'"),
    (_raw_strings([b"hats", b"bags"] * 30 + [b"b\xe9"] + [b"hats"] * 19, list_length=2), SEQ,
     r"column 'cats', row 30: b'b\\xe9'"),
])
def test_a_parquet_string_that_is_not_utf8_names_the_file_column_and_row(tmp_path, column, fields, message):
    """Parquet readers do not check UTF-8: such a value failed in pyarrow's or Python's decoding, naming nothing."""
    data, schema_path = _parquet_case(tmp_path, {fields[0]["name"]: column}, fields)
    with pytest.raises(DataError, match=rf"d\.parquet: {message} is not UTF-8; expected UTF-8 text"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))


@pytest.mark.parametrize("fractions, rows, counts", [((0.1, 0.7, 0.2), 10, [1, 7, 2]),
                                                     ((0.05, 0.35, 0.6), 1000, [50, 350, 600]),
                                                     ((0.15, 0.3, 0.55), 200, [30, 60, 110])])
def test_a_time_split_gives_each_split_its_share_of_rows(tmp_path, fractions, rows, counts):
    """0.1 + 0.7 is 0.7999999999999999 in floating point: the valid/test bound must still be row 8 of 10, not 7."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array(np.arange(rows) % 10), "ts": pa.array(np.arange(rows))},
                                      SPARSE)
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"),
                             TabularConfig(split_by="ts", split_fractions=fractions))
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == counts


@pytest.mark.parametrize("ts", [pa.array([0.0, 1.0, float("nan")] + list(range(3, 20)), pa.float64()),
                                pa.array(["0", "1", "NaN"] + [str(t) for t in range(3, 20)])])
def test_a_nan_in_the_split_column_is_refused_not_ranked_last(tmp_path, ts):
    """NaN (a float column's, or a text column's parsed as numbers) is no null, but has no time either: its row
    would go to the test split whatever the fractions."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array(np.arange(20) % 10), "ts": ts}, SPARSE)
    with pytest.raises(DataError, match=r"d\.parquet: split column 'ts' has 1 NaN values; expected a value per row"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(split_by="ts"))
    assert not (tmp_path / "out").exists()


def test_a_nan_label_is_an_error_with_a_label_threshold_too(tmp_path):
    """Without a threshold a NaN label is refused; with one, NaN > 3 is False and would silently become a 0 label."""
    data, schema_path = _parquet_case(tmp_path, {"city": pa.array([1, 2] * 20)}, SPARSE)
    table = pq.read_table(data)
    labels = pa.array([4.0, 1.0, float("nan")] + [4.0] * 37)
    pq.write_table(table.set_column(table.column_names.index("clicked"), "clicked", labels), data)
    with pytest.raises(DataError, match=r"d\.parquet: column 'clicked', row 2: label nan is not a number"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(label_threshold=3))


def _coded(tmp_path, codes):
    """A CSV ``user,code,price,clicked`` whose ``code`` (position 1 of 3 fields) is a hashed sparse field of 50 ids;
    returns (data, schema) paths."""
    lines = ["user,code,price,clicked"] + [f"{i % 7},{c},0.5,{i % 2}" for i, c in enumerate(codes)]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    raw = {"name": "t", "label": "clicked",
           "fields": [{"name": "user", "kind": "sparse", "cardinality": 10},
                      {"name": "code", "kind": "sparse", "cardinality": 50, "hashed": True},
                      {"name": "price", "kind": "dense"}]}
    return str(tmp_path / "d.csv"), _schema_file(tmp_path, raw)


def _ids_by_code(schema, codes):
    """{code value: id} read back from the prepared splits (rows matched by their row_id)."""
    rows = {name: _all(schema, name) for name in ("row_id", "code")}
    return {codes[int(r)]: int(i) for r, i in zip(rows["row_id"], rows["code"])}


def test_hash_fields_hash_an_all_integer_hashed_column_as_docs_usage_computes(tmp_path):
    """Without --hash, a hashed field whose values are all integers takes them as ids (mod cardinality), and
    one non-integer value in other data switches every id to a hash of the text; --hash makes it the hash
    always, the ids docs/usage.md's recipe computes (hash_strings of the trimmed text, salt = field position)."""
    from recsys_llm.data.hashing import hash_strings

    codes = [str(1000 + 37 * i) for i in range(60)]
    data, schema_path = _coded(tmp_path, codes)
    plain = prepare_tabular(data, schema_path, str(tmp_path / "plain"))
    assert _ids_by_code(plain, codes) == {c: int(c) % 50 for c in codes}
    ways = {}
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(hash_fields=("code",)),
                             field_ways=ways)
    expected = hash_strings(pa.array(codes, pa.string()), 50, salt=[f.name for f in schema.fields].index("code"))
    assert _ids_by_code(schema, codes) == dict(zip(codes, expected.tolist()))
    assert ways == {"user": "integer ids", "code": "hashed text (--hash)"}
    # the same ids from a Parquet column of integers, and from data holding one non-integer value
    pq.write_table(pa.table({"user": [i % 7 for i in range(60)], "code": [int(c) for c in codes],
                             "price": [0.5] * 60, "clicked": [i % 2 for i in range(60)]}), tmp_path / "d.parquet")
    from_parquet = prepare_tabular(str(tmp_path / "d.parquet"), schema_path, str(tmp_path / "pq"),
                                   TabularConfig(hash_fields=("code",)))
    assert _ids_by_code(from_parquet, codes) == dict(zip(codes, expected.tolist()))
    data, _ = _coded(tmp_path, codes[:-1] + ["x7"])
    mixed = prepare_tabular(data, schema_path, str(tmp_path / "mixed"), TabularConfig(hash_fields=("code",)))
    assert {c: i for c, i in _ids_by_code(mixed, codes[:-1] + ["x7"]).items() if c != "x7"} == \
        dict(zip(codes[:-1], expected[:-1].tolist()))


@pytest.mark.parametrize("options, message", [
    (dict(hash_fields=("user",)), r"^--hash user \(TabularConfig\.hash_fields\): field 'user' is not hashed in "
                                           r".*schema\.json; expected \"hashed\": true"),
    (dict(hash_fields=("price",)), r"^--hash price \(TabularConfig\.hash_fields\): .*schema\.json has no sparse "
                                            r"or sequence field 'price'"),
    (dict(hash_fields=("code",), vocabulary_fields=("code",)),
     r"^--hash code \(TabularConfig\.hash_fields\): field 'code' is also in --vocabulary"),
], ids=["not-hashed", "not-a-field", "also-vocabulary"])
def test_hash_fields_must_name_a_hashed_field_not_also_in_vocabulary_fields(tmp_path, options, message):
    data, schema_path = _coded(tmp_path, [str(i) for i in range(40)])
    with pytest.raises(ValueError, match=message):
        prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(**options))
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match=r"TabularConfig\.hash_fields='code': expected a tuple of strings"):
        TabularConfig(hash_fields="code")


def test_field_ways_name_the_way_each_field_took(tmp_path):
    """The prepared schema.json does not say whether a hashed field's values were ids or hashed text."""
    data, schema_path = _coded(tmp_path, [str(i) for i in range(39)] + ["x"])
    ways = {}
    prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(vocabulary_fields=("user",)), field_ways=ways)
    assert ways == {"user": "vocabulary (--vocabulary)", "code": "hashed text"}
    data, schema_path = _coded(tmp_path, [str(i) for i in range(40)])
    prepare_tabular(data, schema_path, str(tmp_path / "out"), field_ways=ways)
    assert ways == {"user": "integer ids", "code": "integer ids mod 50"}


def test_hash_fields_hash_a_parquet_directory_mixing_integer_and_string_ids_as_text(tmp_path):
    """Files of integer ids and files of strings in one hashed field: refused (naming --hash), or hashed as text."""
    from recsys_llm.data.hashing import hash_strings

    fields = [{"name": "city", "kind": "sparse", "cardinality": 10, "hashed": True}]
    parts = [{"city": pa.array([1, 2] * 20)}, {"city": pa.array(["paris", "1"] * 20)}]
    data, schema_path = _parquet_case(tmp_path, parts, fields, name="dir")
    with pytest.raises(DataError, match=r"dir: column 'city' has type string .* \(write the column with one type, or "
                                        r"pass --hash city \(TabularConfig\.hash_fields\)"):
        prepare_tabular(data, schema_path, str(tmp_path / "out"))
    schema = prepare_tabular(data, schema_path, str(tmp_path / "out"), TabularConfig(hash_fields=("city",)))
    one, two, paris = hash_strings(pa.array(["1", "2", "paris"]), 10, salt=0).tolist()
    assert _rows_of(schema, "city")[:2] + _rows_of(schema, "city")[40:42] == [one, two, paris, one]


def test_a_sequence_joined_by_another_separator_is_warned_about(tmp_path, recwarn):
    """cats written as toys;books with the default '|' became one value per row ('toys;books') without a word."""
    rows = _rows()
    rows["cats"] = [c.replace("|", ";") for c in rows["cats"]]
    raw = copy.deepcopy(SCHEMA)
    raw["fields"][3]["cardinality"] = 100
    prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path, raw), str(tmp_path / "out"),
                    TabularConfig(split_by="ts"))
    (message,) = [str(w.message) for w in recwarn.list if "sequence field" in str(w.message)]
    assert re.search(r"d\.csv: no cell of sequence field 'cats' holds the separator '\|' \(--sequence-separator\), so "
                     r"each row has one value at most, while \d+ of its \d+ values hold ';' \(e\.g\. '.*;.*'\); if they "
                     r"are joined by ';', pass --sequence-separator ';'", message), message
    prepare_tabular(_csv(tmp_path / "d.csv", rows), _schema_file(tmp_path, raw), str(tmp_path / "semi"),
                    TabularConfig(split_by="ts", sequence_separator=";"))
    assert len([w for w in recwarn.list if "sequence field" in str(w.message)]) == 1  # none with the right one


@pytest.mark.parametrize("case, hint", [
    ("empty", r"the file is empty \(no header line\); the file has columns \[\]"),
    ("json lines", r"the file looks like JSON \(lines\); prepare tabular reads CSV or Parquet"),
    ("utf-16", r"the file looks UTF-16 encoded; expected UTF-8 text"),
    ("tab separated", r"the header is one column holding '\\t': pass --delimiter '\\t'"),
    ("excel sep= line", r"the first line is Excel's delimiter line \('sep=;'\), not the header; .*delete that line"),
])
def test_a_file_that_is_no_csv_of_its_delimiter_says_what_it_looks_like(tmp_path, case, hint):
    """Each listed nonsense columns ('{"event_id": 0', '\\x00u\\x00s\\x00e\\x00r') or 'the file has columns []'."""
    path = tmp_path / "clicks.csv"
    plain = open(_csv(tmp_path / "plain.csv", _rows(5)), encoding="utf-8").read()
    path.write_bytes({"empty": b"", "json lines": b'{"user": 1, "clicked": 0}\n{"user": 2, "clicked": 1}\n',
                      "utf-16": plain.encode("utf-16"), "tab separated": plain.replace(",", "\t").encode(),
                      "excel sep= line": b"sep=;\n" + plain.replace(",", ";").encode()}[case])
    with pytest.raises(DataError, match=rf"clicks\.csv: missing column\(s\) .*{hint}"):
        prepare_tabular(str(path), _schema_file(tmp_path), str(tmp_path / "out"))


def test_a_floating_id_beyond_int64_is_named_so(tmp_path):
    rows = _rows(20)
    table = pa.table({**{k: v for k, v in rows.items() if k != "user"}, "user": [1e20] + [float(u) for u in rows["user"][1:]]})
    pq.write_table(table, tmp_path / "d.parquet")
    with pytest.raises(DataError, match=r"column 'user', row 0: 1e\+20 is beyond int64; expected integer ids"):
        prepare_tabular(str(tmp_path / "d.parquet"), _schema_file(tmp_path), str(tmp_path / "out"))


def test_splits_in_the_schema_it_reads_are_refused(tmp_path):
    """A top-level splits: in the input schema was accepted and meant nothing: the conversion writes its own."""
    raw = dict(SCHEMA, splits={"train": "mine.parquet"})
    with pytest.raises(SchemaError, match=r"schema\.json: splits is what prepare tabular writes into the prepared "
                                          r"schema\.json .*expected it left out of the schema it reads"):
        prepare_tabular(_csv(tmp_path / "d.csv", _rows()), _schema_file(tmp_path, raw), str(tmp_path / "out"))
    assert not os.path.exists(tmp_path / "out")


def test_a_schema_naming_no_label_says_the_default_is_missing(tmp_path):
    """It said the column 'label' was "named in" a schema that names none."""
    raw = {k: v for k, v in SCHEMA.items() if k != "label"}
    with pytest.raises(DataError, match=r"d\.csv: no column 'label', the label column .*schema\.json names by not naming "
                                        r"one \(the default\); expected the 0/1 click column named with label: COLUMN"):
        prepare_tabular(_csv(tmp_path / "d.csv", _rows()), _schema_file(tmp_path, raw), str(tmp_path / "out"))


def test_a_hashed_fields_first_pass_keeps_a_sample_not_every_value(monkeypatch) -> None:
    """A hashed field of strings kept every distinct value in the first pass (4M unique URLs: 1.7 GB against 0.84 GB
    with --hash), though no vocabulary is made of it; its plan follows from the counts alone."""
    from recsys_llm.data.tabular import tokens

    monkeypatch.setattr(tokens, "HASHED_SAMPLE", 50)
    counts = tokens._TokenCounts(bounded=True)
    for start in (0, 500):
        urls = pa.array([f"https://x/{i}" for i in range(start, start + 500)] + ["NA", "7"])
        tokens._count_tokens(counts, urls, None, "f.csv", start)
    assert len(counts.seen) == 50 and counts.not_integer == {"NA"}
    assert counts.others == 1000 and counts.integers == 2 and counts.first_other == ("https://x/0", "f.csv", 0)
    unbounded = tokens._TokenCounts()
    tokens._count_tokens(unbounded, urls, None, "f.csv", 0)
    assert len(unbounded.seen) == 502


def test_the_first_pass_shows_its_progress(tmp_path, capsys) -> None:
    """The pass that reads the tokens (8 of 12.5 s on 4M rows) drew nothing: the command seemed to hang; and the
    second pass of a random split had no total (no percentage, no time left)."""
    data = _csv(tmp_path / "d.csv", _rows(300))
    prepare_tabular(data, _schema_file(tmp_path), str(tmp_path / "out"), TabularConfig(), progress=True)
    err = capsys.readouterr().err
    assert re.search(r"tabular rows \(first pass\): 300row", err), err
    assert re.search(r"tabular rows: 100%.*300/300", err), err


def test_the_plan_of_a_hashed_field_follows_from_its_tokens_whatever_their_number(tmp_path, monkeypatch) -> None:
    """Bounded counts (a sample) must plan as the full ones did: a column of markers only is hashed (no id among
    them), integer ids with a missing-value marker stay ids."""
    from recsys_llm.data.tabular import tokens

    monkeypatch.setattr(tokens, "HASHED_SAMPLE", 5)
    raw = copy.deepcopy(SCHEMA)
    raw["fields"][2]["cardinality"] = 1000  # query: hashed
    rows = _rows(200)
    markers = dict(rows, query=["NA"] * 200)
    schema = prepare_tabular(_csv(tmp_path / "m.csv", markers), _schema_file(tmp_path, raw), str(tmp_path / "m"),
                             TabularConfig())
    assert schema.ids["query"] == "hashed_text"
    numbers = dict(rows, query=[str(i) if i % 7 else "NA" for i in range(200)])  # integer ids with a marker
    schema = prepare_tabular(_csv(tmp_path / "n.csv", numbers), _schema_file(tmp_path, raw), str(tmp_path / "n"),
                             TabularConfig())
    assert schema.ids["query"] == "integer"


def test_tabular_config_refuses_a_non_string_split_by():
    from recsys_llm.data.tabular.config import TabularConfig

    with pytest.raises(ValueError, match=r"TabularConfig.split_by: expected a string or None, got 1"):
        TabularConfig(split_by=1)


def test_one_text_in_several_unicode_forms_is_warned_about(tmp_path):
    """An NFD 'Café' (macOS, some exports) beside the NFC one, and 'Paris' with a zero-width space beside 'Paris',
    became values of their own with no word: a served request in the other form got the other id."""
    raw = {"name": "t", "label": "clicked", "fields": [{"name": "city", "kind": "sparse", "cardinality": 10}]}
    schema_path = _schema_file(tmp_path, raw)
    cities = ["Caf\u00e9", "Cafe\u0301", "Paris", "Paris\u200b", "Lyon", "\u00c9vry"] * 5
    pq.write_table(pa.table({"city": cities, "clicked": [0, 1] * 15}), tmp_path / "d.parquet")
    with pytest.warns(UserWarning, match=r"column 'city' holds 2 text\(s\) in several Unicode forms \('Cafe\\u0301' / "
                                         r"'Caf\\xe9'; 'Paris' / 'Paris\\u200b'\), each form a value of its own"):
        prepare_tabular(str(tmp_path / "d.parquet"), schema_path, str(tmp_path / "out"))
    pq.write_table(pa.table({"city": ["Caf\u00e9", "\u00c9vry", "Paris"] * 10, "clicked": [0, 1] * 15}),
                   tmp_path / "one.parquet")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one form each: no warning
        prepare_tabular(str(tmp_path / "one.parquet"), schema_path, str(tmp_path / "out-one"))
