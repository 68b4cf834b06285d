"""MovieLens (RecBole atomic format) conversion: counts, label rule, time order, ids and text."""

import csv
import os
import re

import numpy as np
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.movielens import prepare_movielens
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.validation import DataError


@pytest.fixture(scope="module")
def ml100k(ml100k_raw_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("ml100k"))
    return prepare_movielens(ml100k_raw_dir, out), ml100k_raw_dir


def _raw_rows(path):
    with open(path, encoding="utf-8") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return list(reader)


def test_counts_labels_and_time_split(ml100k):
    schema, raw_dir = ml100k
    raw = _raw_rows(os.path.join(raw_dir, "ml-100k.inter"))
    kept = [r for r in raw if float(r[2]) != 3]
    tables = {s: pq.read_table(schema.split_path(s)) for s in ("train", "valid", "test")}
    sizes = [tables[s].num_rows for s in ("train", "valid", "test")]
    assert sum(sizes) == len(kept) == 72855
    assert sizes[0] == int(0.8 * len(kept)) and abs(sizes[1] - sizes[2]) <= 1
    # time order: every training row precedes every validation row, which precede test rows
    ts = {s: t["timestamp"].to_numpy() for s, t in tables.items()}
    assert ts["train"].max() <= ts["valid"].min() and ts["valid"].max() <= ts["test"].min()
    assert all(np.all(np.diff(t) >= 0) for t in ts.values())
    # label rule: rating > 3 on the raw rows, matched through the (user, item, timestamp) triple
    positives = {(r[0], r[1], int(float(r[3]))) for r in kept if float(r[2]) > 3}
    users = schema.load_value_text("user_id")["text"].to_pylist()
    items = schema.load_value_text("item_id")["text"].to_pylist()
    raw_users = {r[0]: r for r in _raw_rows(os.path.join(raw_dir, "ml-100k.user"))}
    raw_items = {r[0]: r for r in _raw_rows(os.path.join(raw_dir, "ml-100k.item"))}
    # raw tokens are the integers 1..N, so the numeric-order remapping keeps them: check it through the text
    assert all(items[int(token)].startswith(row[1]) for token, row in raw_items.items())
    labels = np.concatenate([t["label"].to_numpy() for t in tables.values()])
    assert labels.mean() == pytest.approx(sum(1 for r in kept if float(r[2]) > 3) / len(kept))
    # ids are contiguous with 0 reserved; ids map back to the raw tokens (users are numbered like the raw ids)
    train = tables["train"].to_pydict()
    for i in range(0, len(train["row_id"]), 997):
        user_token = str(train["user_id"][i])
        item_token = str(train["item_id"][i])
        assert ((user_token, item_token, train["timestamp"][i]) in positives) == bool(train["label"][i])
        age, gender = raw_users[user_token][1], raw_users[user_token][2]
        assert users[train["user_id"][i]].startswith(f"A {age} year old {'man' if gender == 'M' else 'woman'}")
    assert schema.field("user_id").cardinality == 944 and schema.field("item_id").cardinality == 1683


def test_how_many_test_rows_have_a_user_or_movie_without_training_rows(ml100k):
    """The figures README.md states of the time-ordered split: most test users are new, few test movies."""
    schema, _ = ml100k
    columns = {s: pq.read_table(schema.split_path(s), columns=["user_id", "item_id"]) for s in ("train", "test")}
    for field, rows, distinct in (("user_id", 6250, 98), ("item_id", 117, 48)):
        test = columns["test"][field].to_numpy()
        unseen = ~np.isin(test, columns["train"][field].to_numpy())
        assert (int(unseen.sum()), len(np.unique(test[unseen]))) == (rows, distinct), field
    assert len(np.unique(columns["test"]["user_id"].to_numpy())) == 161


def test_fields_text_and_reader(ml100k):
    schema, _ = ml100k
    assert schema.sparse_feature_names == ["user_id", "item_id", "age", "gender", "occupation", "zip_prefix", "release_year", "genres"]
    assert schema.dense_feature_names == ["user_age", "movie_year"]
    assert all(f.description for f in schema.fields)
    assert schema.load_value_text("item_id")["text"][1].as_py() == "Toy Story (1995). Genres: Animation, Children's, Comedy."
    assert "Sci-Fi" in schema.load_value_text("genres")["text"].to_pylist()
    reader = ParquetBatchReader(schema, "valid", 1000)
    batch = next(iter(reader))
    assert batch.dense_features.shape == (1000, 2)
    assert int(batch.sparse_features["genres"].lengths().max()) <= schema.field("genres").max_length


def _write_raw(tmp_path, inter_lines):
    (tmp_path / "x.inter").write_text("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(inter_lines))
    (tmp_path / "x.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                     "1\tA Movie\t1999\tDrama Comedy\n2\tB Movie\t2001\tAction\n3\tC Movie\t1980\tHorror\n")
    (tmp_path / "x.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                     "1\t30\tF\twriter\t12345\n2\t40\tM\tother\t54321\n")


def test_small_raw_files(tmp_path):
    lines = [f"{1 + i % 2}\t{1 + i % 3 // 2}\t{[1, 3, 4, 5][i % 4]}\t{1000 - i}\n" for i in range(40)]
    _write_raw(tmp_path, lines)
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    total = sum(pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits)
    assert total == 30  # the 10 ratings of 3 are dropped
    train = pq.read_table(schema.split_path("train"))
    assert np.all(np.diff(train["timestamp"].to_numpy()) >= 0)


def test_item_catalog_lists_every_movie_with_its_fields(tmp_path):
    from recsys_llm.data.movielens import ITEM_FIELDS
    from recsys_llm.data.pair_swap import load_swap_catalog
    from recsys_llm.data.synthetic import ITEM_CATALOG

    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 2}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    path = str(tmp_path / "out" / ITEM_CATALOG)
    catalog = pq.read_table(path).to_pydict()
    genres = schema.load_value_text("genres")["text"].to_pylist()
    assert catalog["item_id"] == [1, 2, 3]  # movie 3 was never rated: the catalogue still offers it
    assert [[genres[g] for g in row] for row in catalog["genres"]] == [["Drama", "Comedy"], ["Action"], ["Horror"]]
    assert catalog["movie_year"] == pytest.approx([0.99, 1.01, 0.80])
    # the rows carry the same item fields as the catalogue
    rows = pq.read_table(schema.split_path("train")).to_pydict()
    first = rows["item_id"].index(2)
    assert [rows[f][first] for f in ITEM_FIELDS] == [catalog[f][1] for f in ITEM_FIELDS]
    assert load_swap_catalog(path, schema, ITEM_FIELDS).num_rows == 3


def test_bad_line_names_file_and_line(tmp_path):
    _write_raw(tmp_path, ["1\t1\t4\t100\n", "2\t2\t5\n", "1\t2\t1\t300\n"])
    with pytest.raises(DataError, match=r"x\.inter, line 3: 3 tab-separated columns, expected 4"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_non_numeric_rating_names_file_and_line(tmp_path):
    _write_raw(tmp_path, ["1\t1\t4\t100\n", "2\t2\tfive\t200\n"])
    with pytest.raises(DataError, match=r"x\.inter, line 3: column 'rating' is 'five'; expected a number"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("stamp", ["1e400", "9.3e18", "-1e19"])
def test_a_timestamp_beyond_int64_names_file_and_line(tmp_path, stamp):
    """``1e400`` reads as infinity and ``9.3e18`` lies beyond int64: both were written as garbage
    timestamps (only a RuntimeWarning), ordering the splits by a made-up time."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)]
               + [f"1\t2\t5\t{stamp}\n"])
    with pytest.raises(DataError, match=rf"x\.inter, line 22: column 'timestamp' is '{stamp}'; expected a "
                                        r"number of seconds within int64's range"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_missing_column_in_header(tmp_path):
    _write_raw(tmp_path, ["1\t1\t4\t100\n"])
    (tmp_path / "x.user").write_text("user_id:token\tage:token\n1\t30\n")
    with pytest.raises(DataError, match=r"x\.user: missing column 'gender'"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_failed_conversion_keeps_the_earlier_output_and_its_item_catalog(tmp_path):
    from recsys_llm.data.movielens import MovieLensConfig
    from recsys_llm.data.synthetic import ITEM_CATALOG

    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir()
    _write_raw(raw, [f"{1 + i % 2}\t{1 + i % 2}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    prepare_movielens(str(raw), str(out))
    before = {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert ITEM_CATALOG in before and "text/item_id.parquet" in before
    # more movies (other ids and text), then a split left without rows
    (raw / "x.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
                                "7\tZ Movie\t1950\tWar\n8\tY Movie\t1960\tDrama\n")
    with pytest.raises(DataError, match=r"raw: split 'train' received no rows of 20"):
        prepare_movielens(str(raw), str(out), MovieLensConfig(split_fractions=(0.01, 0.5, 0.5)))
    assert {str(p.relative_to(out)): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "raw"]


def test_zero_split_share_is_refused_naming_the_option():
    from recsys_llm.data.movielens import MovieLensConfig

    with pytest.raises(ValueError, match=r"MovieLensConfig\.split_fractions=\(0\.9, 0\.1, 0\.0\): expected three positive"):
        MovieLensConfig(split_fractions=(0.9, 0.1, 0.0))


_ITEM_HEADER = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
_USER_HEADER = "user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"


def test_repeated_item_id_names_file_lines_and_id(tmp_path):
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    (tmp_path / "x.item").write_text(_ITEM_HEADER + "1\tA Movie\t1999\tDrama\n2\tB Movie\t2001\tAction\n"
                                     "3\tC Movie\t1980\tHorror\n2\tOther Title\t1950\tHorror\n")
    with pytest.raises(DataError, match=r"x\.item, line 5: item_id '2' is repeated \(first on line 3\); "
                                        r"expected one row per item_id"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_repeated_user_id_names_file_lines_and_id(tmp_path):
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    # a blank line before the repeat: the line is still counted as an editor counts it
    (tmp_path / "x.user").write_text(_USER_HEADER + "1\t30\tF\twriter\t12345\n2\t40\tM\tother\t54321\n\n"
                                     "1\t99\tM\tretired\t99999\n")
    with pytest.raises(DataError, match=r"x\.user, line 5: user_id '1' is repeated \(first on line 2\)"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_lines_after_a_blank_line_are_named_as_in_the_file(tmp_path):
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(12)]
    lines[4] = "\n"  # line 6 is blank (pyarrow skips it without a row)
    lines[9] = "2\t2\tfour\t300\n"  # line 11
    _write_raw(tmp_path, lines)
    with pytest.raises(DataError, match=r"x\.inter, line 11: column 'rating' is 'four'; expected a number"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    lines[9] = "2\t2\t4\n"  # a short line after the blank one, with Windows line ends
    (tmp_path / "x.inter").write_bytes(
        ("user_id:token\titem_id:token\trating:float\ttimestamp:float\n" + "".join(lines)).replace("\n", "\r\n").encode())
    with pytest.raises(DataError, match=r"x\.inter, line 11: 3 tab-separated columns, expected 4"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_byte_order_mark_is_ignored(tmp_path):
    """Files starting with a UTF-8 BOM (Windows tools) convert exactly as the same files without it."""
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{[1, 3, 4, 5][i % 4]}\t{1000 - i}\n" for i in range(40)]
    plain, bom = tmp_path / "plain", tmp_path / "bom"
    for raw in (plain, bom):
        raw.mkdir()
        _write_raw(raw, lines)
    for path in bom.iterdir():
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    want = prepare_movielens(str(plain), str(tmp_path / "out-plain"))
    got = prepare_movielens(str(bom), str(tmp_path / "out-bom"))
    for split in want.splits:
        assert pq.read_table(got.split_path(split)).equals(pq.read_table(want.split_path(split)))
    for name in ("user_id", "item_id", "age"):
        assert got.load_value_text(name).equals(want.load_value_text(name))


def test_history_lists_the_users_earlier_likes_most_recent_first(tmp_path):
    from recsys_llm.cli import main

    lines = [  # user, item, rating, timestamp (seconds)
        "1\t1\t5\t100\n", "2\t2\t5\t150\n", "1\t2\t4\t200\n", "1\t3\t5\t200\n", "1\t1\t1\t300\n", "1\t3\t2\t400\n",
        "2\t1\t4\t500\n", "2\t3\t1\t600\n", "2\t2\t2\t700\n", "1\t2\t5\t800\n", "2\t1\t1\t900\n",
    ]
    _write_raw(tmp_path, lines)
    out = str(tmp_path / "out")
    assert main(["prepare", "movielens", "--input", str(tmp_path), "--out", out, "--history-length", "2",
                 "--quiet"]) == 0
    from recsys_llm.data.schema import DatasetSchema

    schema = DatasetSchema.load(out)
    field = schema.field("history")
    assert field.kind == "sequence" and field.max_length == 2
    assert field.cardinality == schema.field("item_id").cardinality
    assert schema.load_value_text("history")["text"].to_pylist() == schema.load_value_text("item_id")["text"].to_pylist()
    rows = [row for split in ("train", "valid", "test") for row in pq.read_table(schema.split_path(split)).to_pylist()]
    histories = [(row["user_id"], row["timestamp"], row["history"]) for row in rows]
    assert histories == [
        (1, 100, []), (2, 150, []),
        (1, 200, [1]), (1, 200, [1]),  # the like of the same second is not history yet
        (1, 300, [3, 2]),  # the two likes of second 200, most recent (later in the file) first, capped at 2
        (1, 400, [3, 2]), (2, 500, [2]), (2, 600, [1, 2]), (2, 700, [1, 2]), (1, 800, [3, 2]), (2, 900, [1, 2]),
    ]
    batch = next(iter(ParquetBatchReader(schema, "train", 4)))
    assert batch.sparse_features["history"].lengths().tolist() == [0, 0, 1, 1]
    assert "history" not in [f.name for f in prepare_movielens(str(tmp_path), str(tmp_path / "plain")).fields]


def test_a_negative_history_length_is_refused_naming_the_option():
    from recsys_llm.data.movielens import MovieLensConfig

    with pytest.raises(ValueError, match=r"MovieLensConfig.history_length \(--history-length\)"):
        MovieLensConfig(history_length=-1)


def test_split_shares_are_exact_not_the_floor_of_a_float_sum(tmp_path):
    """0.1 + 0.7 is 0.7999999999999999 in floating point: its floor gave 10 rows 1 / 6 / 3."""
    from recsys_llm.data.movielens import MovieLensConfig

    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 2}\t{4 + i % 2}\t{100 + i}\n" for i in range(10)])
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"), MovieLensConfig(split_fractions=(0.1, 0.7, 0.2)))
    rows = {split: pq.ParquetFile(schema.split_path(split)).metadata.num_rows for split in ("train", "valid", "test")}
    assert rows == {"train": 1, "valid": 7, "test": 2}


def test_a_file_that_is_not_utf8_names_line_column_and_encoding(tmp_path):
    """GroupLens' own u.item is Latin-1: atomic files made from it by a byte copy (sed, awk) are too."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    (tmp_path / "x.item").write_bytes((_ITEM_HEADER + "1\tA Movie\t1999\tDrama\n\n2\tB Movie\t2001\tAction\n"
                                       "3\tCafé au Lait\t1993\tComedy\n").encode("latin-1"))
    with pytest.raises(DataError, match=r"x\.item, line 5: column 'movie_title' is not UTF-8 text; expected "
                                        r"a UTF-8 file \(re-encode it, e.g. from Latin-1"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("separator", [",", " "])
def test_a_header_not_separated_by_tabs_is_named_as_such(tmp_path, separator):
    """It said "missing column 'user_id'" of a header that names user_id first."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    header = separator.join(["user_id:token", "item_id:token", "rating:float", "timestamp:float"])
    (tmp_path / "x.inter").write_text(header + "\n" + "".join(f"1{separator}1{separator}4{separator}{100 + i}\n"
                                                              for i in range(20)))
    with pytest.raises(DataError, match=r"x\.inter, line 1: the header is one tab-separated column "
                                        r"'user_id:token.item_id:token.*'; expected tab-separated 'name:type' columns"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


@pytest.mark.parametrize("file_name, line, column", [("x.inter", 4, "user_id"), ("x.inter", 6, "item_id"),
                                                     ("x.item", 3, "item_id"), ("x.user", 3, "user_id")])
def test_an_empty_id_names_file_line_and_column(tmp_path, file_name, line, column):
    """Empty ids were read as the token '': one made-up user (or movie) shared by every such row, its
    history pooled from theirs, and the other ids renumbered."""
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)]
    if file_name == "x.inter" and column == "user_id":
        lines[2] = "\t1\t4\t102\n"
    elif file_name == "x.inter":
        lines[4] = "2\t \t5\t104\n"  # blank, not only empty
    _write_raw(tmp_path, lines)
    if file_name == "x.item":
        (tmp_path / "x.item").write_text(_ITEM_HEADER + "1\tA Movie\t1999\tDrama\n\tB Movie\t2001\tAction\n")
    elif file_name == "x.user":
        (tmp_path / "x.user").write_text(_USER_HEADER + "1\t30\tF\twriter\t12345\n\t40\tM\tother\t54321\n")
    with pytest.raises(DataError, match=rf"{file_name.replace('.', '[.]')}, line {line}: column '{column}' is "
                                        r"empty; expected an id in every row"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_several_files_of_one_kind_are_refused_naming_them(tmp_path):
    """A directory with RecBole's benchmark files (x.train.inter, x.valid.inter, x.test.inter), or two data
    sets, was converted from the first name in sorted order alone: here only the test interactions."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    os.rename(tmp_path / "x.inter", tmp_path / "x.train.inter")
    for split in ("test", "valid"):
        (tmp_path / f"x.{split}.inter").write_text((tmp_path / "x.train.inter").read_text())
    with pytest.raises(DataError, match=r"several \*\.inter files \(x\.test\.inter, x\.train\.inter, x\.valid\.inter\); "
                                        r"expected one"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_the_inter_file_given_as_input_is_named_with_its_directory(tmp_path):
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    with pytest.raises(DataError, match=r"x\.inter: a file; expected the directory that holds it .*--input "
                                        + re.escape(str(tmp_path))):
        prepare_movielens(str(tmp_path / "x.inter"), str(tmp_path / "out"))


def test_movielens_1m_age_and_occupation_codes_become_their_words(tmp_path):
    """ML-1M's users.dat (and RecBole's ml-1m.user) holds codes: age 1 is "under 18", occupation 10 is
    "K-12 student". The text read them as numbers: "A 1 year old woman, occupation: 10"."""
    _write_raw(tmp_path, [f"{1 + i % 3}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    (tmp_path / "x.user").write_text(_USER_HEADER + "1\t1\tF\t10\t48067\n2\t56\tM\t16\t70072\n3\t25\tM\t0\t55117\n")
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    assert schema.load_value_text("user_id")["text"].to_pylist()[1:] == [
        "A woman aged under 18, occupation: K-12 student, zip code 48067.",
        "A man aged 56 or older, occupation: self-employed, zip code 70072.",
        "A man aged 25 to 34, occupation: other or not specified, zip code 55117.",
    ]
    assert schema.load_value_text("age")["text"].to_pylist() == ["unknown", "aged under 18", "aged 25 to 34",
                                                                 "aged 56 or older"]
    assert schema.load_value_text("occupation")["text"].to_pylist() == ["unknown", "other or not specified",
                                                                        "K-12 student", "self-employed"]
    # the field texts say groups (they were "age of the user in years"): the LLM reads them
    assert schema.field("age").description == "age group of the user"
    assert schema.field("user_age").description.startswith("youngest age of the user's age group in years")
    # ML-100K's users.dat holds ages in years and occupations as words: read as they are
    (tmp_path / "x.user").write_text(_USER_HEADER + "1\t18\tF\twriter\t12345\n2\t25\tM\t10\t54321\n")
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    assert schema.load_value_text("user_id")["text"].to_pylist()[1] == ("A 18 year old woman, occupation: writer, "
                                                                        "zip code 12345.")
    assert schema.load_value_text("occupation")["text"].to_pylist() == ["unknown", "10", "writer"]
    assert (schema.field("age").description, schema.field("user_age").description) == (
        "age of the user in years", "age of the user in years divided by 100")


def test_cells_with_stray_spaces_convert_as_without_them(tmp_path):
    """A space around an id or attribute (a hand-edited or re-exported file) is no other user, movie or
    age: ``'1 '`` in the ``.inter`` is user ``1`` of the ``.user`` file, with that user's attributes and text."""
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{[1, 3, 4, 5][i % 4]}\t{1000 - i}\n" for i in range(40)]
    plain, spaced = tmp_path / "plain", tmp_path / "spaced"
    for raw in (plain, spaced):
        raw.mkdir()
        _write_raw(raw, lines)
    _write_raw(spaced, [line.replace("\t", " \t", 1) if i % 5 == 0 else line for i, line in enumerate(lines)])
    (spaced / "x.user").write_text("user_id:token\tage:token\tgender:token\toccupation:token\tzip_code:token\n"
                                   " 1\t30 \tF\twriter\t12345\n2\t40\tM \tother\t54321\n")
    want = prepare_movielens(str(plain), str(tmp_path / "out-plain"))
    got = prepare_movielens(str(spaced), str(tmp_path / "out-spaced"))
    assert got.fields == want.fields  # as many users, ages and genders
    for split in want.splits:
        assert pq.read_table(got.split_path(split)).equals(pq.read_table(want.split_path(split)))
    for name in ("user_id", "age", "gender"):
        assert got.load_value_text(name).equals(want.load_value_text(name))


def test_release_years_of_a_float_column_keep_their_year(tmp_path):
    """RecBole's ``release_year:float`` is accepted; a float column written by pandas holds ``1999.0``,
    which was no year: every movie's text, ``release_year`` text and ``movie_year`` lost it."""
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)]
    tokens, floats = tmp_path / "tokens", tmp_path / "floats"
    for raw in (tokens, floats):
        raw.mkdir()
        _write_raw(raw, lines)
    (floats / "x.item").write_text("item_id:token\tmovie_title:token_seq\trelease_year:float\tclass:token_seq\n"
                                   "1\tA Movie\t1999.0\tDrama Comedy\n2\tB Movie\t2001.0\tAction\n3\tC Movie\t1980.0\tHorror\n")
    want = prepare_movielens(str(tokens), str(tmp_path / "out-tokens"))
    got = prepare_movielens(str(floats), str(tmp_path / "out-floats"))
    assert got.load_value_text("item_id")["text"][1].as_py() == "A Movie (1999). Genres: Drama, Comedy."
    for name in ("item_id", "release_year"):
        assert got.load_value_text(name).equals(want.load_value_text(name))
    for split in want.splits:
        assert pq.read_table(got.split_path(split)).equals(pq.read_table(want.split_path(split)))


def test_ages_of_a_float_column_read_as_whole_years_and_ml1m_codes(tmp_path):
    """RecBole's ``age:float`` is accepted; a float column written by pandas holds ``24.0``, which became
    "A 24.0 year old woman" (ages in lexicographic order: 24.0, 30.0, 7.0), and ML-1M's codes written
    as ``1.0`` were no codes any more ("A 1.0 year old woman, occupation: 10")."""
    lines = [f"{1 + i % 3}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)]
    float_header = _USER_HEADER.replace("age:token", "age:float")
    for users in ("1\t24\tF\twriter\t12345\n2\t7\tM\tother\t54321\n3\t30\tM\tother\t55117\n",
                  "1\t1\tF\t10\t48067\n2\t56\tM\t16\t70072\n3\t25\tM\t0\t55117\n"):
        tokens, floats = tmp_path / "tokens", tmp_path / "floats"
        for raw in (tokens, floats):
            raw.mkdir(exist_ok=True)
            _write_raw(raw, lines)
        (tokens / "x.user").write_text(_USER_HEADER + users)
        (floats / "x.user").write_text(float_header + re.sub(r"^(\d+\t\d+)", r"\1.0", users, flags=re.M))
        want = prepare_movielens(str(tokens), str(tmp_path / "out-tokens"))
        got = prepare_movielens(str(floats), str(tmp_path / "out-floats"))
        assert got.fields == want.fields
        for name in ("user_id", "age", "occupation"):
            assert got.load_value_text(name).equals(want.load_value_text(name)), name
        for split in want.splits:
            assert pq.read_table(got.split_path(split)).equals(pq.read_table(want.split_path(split)))
    assert got.load_value_text("user_id")["text"][1].as_py() == ("A woman aged under 18, occupation: K-12 student, "
                                                                 "zip code 48067.")


def test_what_the_conversion_reads_as_missing_or_off_the_scale_is_warned_about(tmp_path, recwarn):
    """A user or movie the ratings name but the .user / .item file lacks, an age or year that is no number and a
    rating off the 0.5-5 scale were converted without a word (an unknown user, user_age 0, a click)."""
    lines = [f"{1 + i % 2}\t{1 + i % 3 // 2}\t{[1, 4, 5][i % 3]}\t{1000 - i}\n" for i in range(40)]
    lines[5] = "5000\t1\t4\t500\n"
    lines[6] = "2\t9999\t99\t501\n"
    _write_raw(tmp_path, lines)
    (tmp_path / "x.user").write_text(_USER_HEADER + "1\told\tF\twriter\t12345\n2\t40\tM\tother\t54321\n")
    (tmp_path / "x.item").write_text(_ITEM_HEADER + "1\tA Movie\t199x\tDrama\n2\tB Movie\t2001\tAction\n"
                                                    "3\tC Movie\t\tHorror\n")
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    said = [str(w.message) for w in recwarn.list]
    expected = [r"x\.inter: 1 rating\(s\) outside MovieLens' scale of 0\.5 to 5 \(99\): each is read as a click",
                r"x\.user: 1 age value\(s\) are not numbers \('old'\); read as missing \(user_age 0\)",
                r"x\.item: 1 release_year value\(s\) are not numbers \('199x'\); read as missing \(movie_year 0\)",
                r"x\.inter: 1 rating\(s\) of 1 user\(s\) absent from .*x\.user \('5000'\): their attributes are "
                r"missing \(id 0\) and their text 'unknown user'",
                r"x\.inter: 1 rating\(s\) of 1 movie\(s\) absent from .*x\.item \('9999'\)"]
    for pattern in expected:
        assert any(re.search(pattern, message) for message in said), (pattern, said)
    assert len(said) == len(expected)  # the empty year of movie 3 is missing, not unread
    assert schema.field("user_id").cardinality == 4  # users 1, 2 and 5000, and id 0


def _rows(schema):
    """Every row of the three splits, in split and row order."""
    return [row for split in ("train", "valid", "test") for row in pq.read_table(schema.split_path(split)).to_pylist()]


def test_ratings_of_one_second_keep_their_file_order(tmp_path):
    """Rows are sorted by timestamp with ties in file order (a stable sort): an unstable one reordered the ratings
    of a second, which moves rows across a split bound and reorders the likes a history lists."""
    lines = [f"{1 + i % 2}\t{1 + i % 3}\t{[1, 4, 5, 2][i % 4]}\t{100 + (i * 7) % 3}\n" for i in range(40)]
    _write_raw(tmp_path, lines)
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    raw = [line.split("\t") for line in lines]
    expected = sorted(((int(t), int(u), int(i), int(r) > 3) for u, i, r, t in raw), key=lambda row: row[0])
    got = [(row["timestamp"], row["user_id"], row["item_id"], bool(row["label"])) for row in _rows(schema)]
    assert got == expected


def test_a_half_star_rating_above_3_is_a_click(tmp_path):
    """label = rating > 3 on ML-20M's half-star scale too: 3.5 is a click, 2.5 is none."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{[3.5, 2.5, 3][i % 3]}\t{100 + i}\n" for i in range(30)])
    labels = [row["label"] for row in _rows(prepare_movielens(str(tmp_path), str(tmp_path / "out")))]
    assert labels == [1, 0] * 10


def test_fewer_than_10_ratings_other_than_3_are_refused(tmp_path):
    """Nine rows cannot be split 8:1:1 with a row in each split."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{[4, 3][i % 2]}\t{100 + i}\n" for i in range(18)])
    with pytest.raises(DataError, match=r"x\.inter: only 9 ratings other than 3; expected at least 10"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_zip_prefix_length_sets_the_characters_kept(tmp_path):
    from recsys_llm.cli import main
    from recsys_llm.data.schema import DatasetSchema

    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    out = str(tmp_path / "out")
    assert main(["prepare", "movielens", "--input", str(tmp_path), "--out", out, "--zip-prefix-length", "3",
                 "--quiet"]) == 0
    assert DatasetSchema.load(out).load_value_text("zip_prefix")["text"].to_pylist() == [
        "unknown", "zip code starting with 123", "zip code starting with 543"]


def test_two_inter_files_are_refused_naming_them(tmp_path):
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    (tmp_path / "y.inter").write_text((tmp_path / "x.inter").read_text())
    with pytest.raises(DataError, match=r"several \*\.inter files \(x\.inter, y\.inter\); expected one"):
        prepare_movielens(str(tmp_path), str(tmp_path / "out"))


def test_movies_without_any_genre_still_give_genres_a_length_of_one(tmp_path):
    """Every movie '(no genres listed)': the sequence field keeps max_length 1 (0 is a field without room for an id)."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(20)])
    (tmp_path / "x.item").write_text(_ITEM_HEADER + "".join(f"{i}\tMovie {i}\t1999\t(no genres listed)\n"
                                                            for i in (1, 2, 3)))
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    assert (schema.field("genres").cardinality, schema.field("genres").max_length) == (1, 1)
    assert next(iter(ParquetBatchReader(schema, "train", 4))).sparse_features["genres"].lengths().tolist() == [0] * 4


def test_each_row_carries_its_own_users_and_movies_attributes(tmp_path):
    """user_age is the user's age / 100 and release_year the year of the row's movie (not of another id)."""
    _write_raw(tmp_path, [f"{1 + i % 2}\t{1 + i % 3}\t{4 + i % 2}\t{100 + i}\n" for i in range(30)])
    schema = prepare_movielens(str(tmp_path), str(tmp_path / "out"))
    years = schema.load_value_text("release_year")["text"].to_pylist()
    movie_years = {1: "released in 1999", 2: "released in 2001", 3: "released in 1980"}
    for row in _rows(schema):
        assert row["user_age"] == pytest.approx({1: 0.30, 2: 0.40}[row["user_id"]])
        assert years[row["release_year"]] == movie_years[row["item_id"]]
