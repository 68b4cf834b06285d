"""Criteo TSV/CSV conversion on a small file the test writes itself."""

import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from recsys_llm.data.criteo import DENSE_NAMES, SPARSE_NAMES, CriteoConfig, prepare_criteo
from recsys_llm.data.hashing import hash_strings
from recsys_llm.data.parquet import ParquetBatchReader
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.validation import DataError
from recsys_llm.serving import ServedModel
from tests.small_artifact import export_small_deepfm


def _lines(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        label = str(int(rng.random() < 0.3))
        dense = ["" if rng.random() < 0.2 else str(int(rng.integers(-2, 1000))) for _ in DENSE_NAMES]
        sparse = ["" if rng.random() < 0.1 else f"{int(rng.integers(0, 50)):08x}" for _ in SPARSE_NAMES]
        rows.append([label] + dense + sparse)
    return rows


def _write(path, rows, delimiter="\t", header=None):
    with open(path, "w") as handle:
        if header:
            handle.write(delimiter.join(header) + "\n")
        handle.writelines(delimiter.join(r) + "\n" for r in rows)
    return str(path)


def test_tsv_conversion_matches_raw(tmp_path):
    rows = _lines(1000)
    raw = _write(tmp_path / "day_0", rows)
    schema = prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=1000, rows_per_group=128, block_bytes=4096))
    tables = [pq.read_table(schema.split_path(s)) for s in ("train", "valid", "test")]
    assert [t.num_rows for t in tables] == [800, 100, 100]
    table = tables[0]
    np.testing.assert_array_equal(table["row_id"].to_numpy(), np.arange(800))
    np.testing.assert_array_equal(table["label"].to_numpy(), [int(r[0]) for r in rows[:800]])
    i3 = np.array([float(r[3]) if r[3] else 0.0 for r in rows[:800]])
    np.testing.assert_allclose(table["I3"].to_numpy(), np.log1p(np.maximum(i3, 0)), rtol=1e-6)
    c5 = [r[1 + 13 + 4] for r in rows[:800]]
    expected = hash_strings(__import__("pyarrow").array([c or None for c in c5]), 1000, salt=4)
    np.testing.assert_array_equal(table["C5"].to_numpy(), expected)
    assert (table["C5"].to_numpy() == 0).sum() == sum(1 for c in c5 if not c)
    same = [i for i in range(800) if c5[i] == c5[0]]
    assert len(set(table["C5"].to_numpy()[same])) == 1  # equal tokens, equal ids
    assert all(schema.field(n).hashed and schema.field(n).cardinality == 1000 for n in SPARSE_NAMES)
    batch = next(iter(ParquetBatchReader(schema, "train", 256)))
    assert batch.dense_features.shape == (256, 13) and len(batch.sparse_features.keys()) == 26


def test_kaggle_csv_with_header_and_id(tmp_path):
    rows = [[str(i)] + r for i, r in enumerate(_lines(50, seed=1))]
    raw = _write(tmp_path / "train.csv", rows, ",", ["Id", "Label"] + DENSE_NAMES + SPARSE_NAMES)
    schema = prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=64, split_fractions=(0.6, 0.2, 0.2)))
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == [30, 10, 10]


def test_wrong_column_count_names_line(tmp_path):
    rows = _lines(20)
    rows[6] = rows[6][:30]
    raw = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad\.tsv, line 7: 30 columns, expected 40"):
        prepare_criteo(raw, str(tmp_path / "out"))


def test_a_line_ending_in_a_delimiter_is_pointed_out_as_read_with_an_id_column(tmp_path):
    """41 columns read as Kaggle's Id column first: the label is dropped and every cell named one column early."""
    rows = [r[:14] + ["68fd1e64"] * len(SPARSE_NAMES) for r in _lines(20)]
    raw = tmp_path / "day_0"
    raw.write_text("".join("\t".join(r) + "\t\n" for r in rows))
    with pytest.raises(DataError, match=r"day_0, line 1, column I13: '68fd1e64' is not a number; .* \(line 1 has 41 "
                                        r"'\\t'-separated columns, so every line is read as Id, label, I1\.\.I13, "
                                        r"C1\.\.C26 and its first column dropped as an Id; a line ending in '\\t' has "
                                        r"one column too many\)$"):
        prepare_criteo(str(raw), str(tmp_path / "out"))


def test_blank_line_is_named_with_its_line_number(tmp_path):
    rows = _lines(20)
    raw = _write(tmp_path / "bad.tsv", rows[:5] + [[""]] + rows[5:])
    with pytest.raises(DataError, match=r"bad\.tsv, line 6: blank line, or every cell empty; expected label, I1\.\.I13"):
        prepare_criteo(raw, str(tmp_path / "out"))


def test_blank_lines_at_the_end_are_ignored(tmp_path):
    rows = _lines(20)
    raw = _write(tmp_path / "tail.tsv", rows)
    with open(raw, "a") as handle:
        handle.write("\n\r\n\n")  # e.g. from cat or an editor
    schema = prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=64, split_fractions=(0.5, 0.25, 0.25)))
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == [10, 5, 5]


def test_bad_label_names_line(tmp_path):
    rows = _lines(20)
    rows[9][0] = "3"
    raw = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad\.tsv: column 'label', line 10: label 3\.0 .*expected 0 or 1 \(the first "
                                        r"column of a Criteo line is the click label\)"):  # not MovieLens' "binarise ratings"
        prepare_criteo(raw, str(tmp_path / "out"))


@pytest.mark.parametrize("marker", ["NA", "NULL", "null", "N/A"])
def test_other_missing_markers_than_an_empty_cell_are_refused(tmp_path, marker):
    """pyarrow reads these as null by default: in I1..I13 they became 0 and in C1..C26 an empty token."""
    rows = _lines(20)
    rows[3][1] = marker  # I1
    raw = _write(tmp_path / "dense.tsv", rows)
    with pytest.raises(DataError, match=rf"dense\.tsv, line 4, column I1: '{marker}' is not a number; expected an "
                                        r"integer count or an empty cell"):
        prepare_criteo(raw, str(tmp_path / "out"))
    rows[3][1] = ""
    rows[5][0] = marker
    raw = _write(tmp_path / "label.tsv", rows)
    with pytest.raises(DataError, match=rf"label\.tsv, line 6, column label: '{marker}' is not a number; expected 0 or 1"):
        prepare_criteo(raw, str(tmp_path / "out"))


def test_non_numeric_cell_names_line_and_column(tmp_path):
    rows = _lines(300)
    rows[250][2] = "abc"  # I2, in a later block
    raw = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad\.tsv, line 251, column I2: 'abc' is not a number; expected an integer"):
        prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(block_bytes=4096))
    rows[250][2], rows[7][0] = "1", "yes"
    raw = _write(tmp_path / "label.tsv", rows)
    with pytest.raises(DataError, match=r"label\.tsv, line 8, column label: 'yes' is not a number; expected 0 or 1"):
        prepare_criteo(raw, str(tmp_path / "out"))
    rows = [[str(i)] + r for i, r in enumerate(_lines(20, seed=1))]
    rows[4][3] = "x1"  # Kaggle's I2, after the Id and Label columns and the header line
    raw = _write(tmp_path / "train.csv", rows, ",", ["Id", "Label"] + DENSE_NAMES + SPARSE_NAMES)
    with pytest.raises(DataError, match=r"train\.csv, line 6, column I2: 'x1' is not a number"):
        prepare_criteo(raw, str(tmp_path / "out"))


@pytest.mark.parametrize("value", ["3.5", "inf", "-inf", "1e400", "nan", "NaN"])
def test_dense_value_that_is_not_an_integer_names_line_and_column(tmp_path, value):
    """pyarrow parses these as doubles; ``inf`` would reach training, ``nan`` would become a silent 0."""
    rows = _lines(20)
    rows[12][5] = value
    raw = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=r"bad\.tsv, line 13, column I5: (3\.5|nan|'-?inf', or a number beyond "
                                        r"-?1\.8e308 \(a float64's range\),) is not an integer count"):
        prepare_criteo(raw, str(tmp_path / "out"))
    rows[12][5] = "12.0"  # a whole number written as a float is a count
    prepare_criteo(_write(tmp_path / "ok.tsv", rows), str(tmp_path / "out"), CriteoConfig(hash_size=64))


def test_zero_split_share_is_refused_before_any_work():
    with pytest.raises(ValueError, match=r"CriteoConfig\.split_fractions=\(0\.5, 0\.5, 0\): expected three positive"):
        CriteoConfig(split_fractions=(0.5, 0.5, 0))


def test_failed_conversion_leaves_the_earlier_output_byte_identical(tmp_path):
    out = tmp_path / "out"
    prepare_criteo(_write(tmp_path / "good.tsv", _lines(50)), str(out), CriteoConfig(hash_size=64))
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    rows = _lines(50, seed=2)
    rows[45][0] = "3"  # a bad label after the first splits were written
    with pytest.raises(DataError, match=r"bad\.tsv: column 'label', line 46"):
        prepare_criteo(_write(tmp_path / "bad.tsv", rows), str(out), CriteoConfig(hash_size=64))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(DataError, match=r"tiny\.tsv: split 'valid' received no rows of 3"):
        prepare_criteo(_write(tmp_path / "tiny.tsv", _lines(3)), str(out), CriteoConfig(hash_size=64))
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.tsv", "good.tsv", "out", "tiny.tsv"]


@pytest.mark.parametrize("kaggle", [False, True])
def test_byte_order_mark_is_ignored_and_keeps_the_first_row(tmp_path, kaggle):
    """A file starting with a UTF-8 BOM (Excel's "CSV UTF-8", Windows tools) converts exactly as
    the same file without it: the BOM must not make the first data row look like a header."""
    rows, delimiter, header = _lines(50, seed=3), "\t", None
    if kaggle:
        rows, delimiter, header = [[str(i)] + r for i, r in enumerate(rows)], ",", ["Id", "Label"] + DENSE_NAMES + SPARSE_NAMES
    plain = _write(tmp_path / "plain.csv", rows, delimiter, header)
    bom = tmp_path / "bom.csv"
    bom.write_bytes(b"\xef\xbb\xbf" + (tmp_path / "plain.csv").read_bytes())
    config = CriteoConfig(hash_size=64, delimiter=delimiter, block_bytes=4096)
    expected = prepare_criteo(plain, str(tmp_path / "out-plain"), config)
    got = prepare_criteo(str(bom), str(tmp_path / "out-bom"), config)
    for split in expected.splits:
        want, have = pq.read_table(expected.split_path(split)), pq.read_table(got.split_path(split))
        assert have.num_rows == want.num_rows and have.equals(want), split
    assert [pq.read_metadata(got.split_path(s)).num_rows for s in got.splits] == [40, 5, 5]


@pytest.mark.parametrize("name", ["day_0.gz", "train.csv.gz", "day_0.bz2"])
def test_compressed_file_converts_like_the_plain_one(tmp_path, name):
    """Terabyte days are published as ``day_N.gz``: read as they are, a ``.csv.gz`` comma-separated."""
    import bz2
    import gzip

    delimiter = "," if ".csv" in name else "\t"
    plain = _write(tmp_path / "plain.txt", _lines(60, seed=4), delimiter)
    with open(plain, "a") as handle:
        handle.write("\n\n")  # blank lines at the end are ignored in the compressed file too
    packed = tmp_path / name
    packed.write_bytes((gzip.compress if name.endswith(".gz") else bz2.compress)((tmp_path / "plain.txt").read_bytes()))
    config = CriteoConfig(hash_size=64, block_bytes=4096)
    expected = prepare_criteo(plain, str(tmp_path / "out-plain"), CriteoConfig(hash_size=64, delimiter=delimiter))
    got = prepare_criteo(str(packed), str(tmp_path / "out-packed"), config)
    for split in expected.splits:
        assert pq.read_table(got.split_path(split)).equals(pq.read_table(expected.split_path(split))), split


@pytest.mark.parametrize("codec", ["gzip", "bz2"])
def test_a_compressed_file_without_its_suffix_is_read_by_its_first_bytes(tmp_path, codec):
    """``day_0`` saved from a ``day_0.gz`` download: read as it is, not refused as '3 columns' of binary."""
    import bz2
    import gzip

    plain = _write(tmp_path / "plain.txt", _lines(60, seed=5))
    packed = tmp_path / "day_0"
    packed.write_bytes((gzip.compress if codec == "gzip" else bz2.compress)((tmp_path / "plain.txt").read_bytes()))
    expected = prepare_criteo(plain, str(tmp_path / "out-plain"), CriteoConfig(hash_size=64))
    got = prepare_criteo(str(packed), str(tmp_path / "out-packed"), CriteoConfig(hash_size=64, block_bytes=4096))
    for split in expected.splits:
        assert pq.read_table(got.split_path(split)).equals(pq.read_table(expected.split_path(split))), split


@pytest.mark.parametrize("name", ["day_0.gz", "day_0.bz2"])
def test_a_compressed_file_cut_short_is_named(tmp_path, name):
    """An interrupted download of a Terabyte day: pyarrow's bare ``OSError: Truncated compressed stream``
    named no file."""
    import bz2
    import gzip

    packed = (gzip.compress if name.endswith(".gz") else bz2.compress)(
        "".join("\t".join(r) + "\n" for r in _lines(2000, seed=7)).encode())
    raw = tmp_path / name
    raw.write_bytes(packed[: len(packed) // 2])
    with pytest.raises(DataError, match=rf"{re.escape(str(raw))}: cannot be read \(Truncated compressed stream\); "
                                        r"expected a complete file"):
        prepare_criteo(str(raw), str(tmp_path / "out"), CriteoConfig(hash_size=64))
    assert not (tmp_path / "out").exists()


def test_max_rows_reads_only_the_start_of_the_file(tmp_path, monkeypatch):
    """The line count for the split bounds stops at ``max_rows``: a quick look at a 40 GB day
    must not read all of it first."""
    from recsys_llm.data import criteo

    rows = _lines(400, seed=5)
    raw = _write(tmp_path / "day_0", rows)
    read = []
    real_open = criteo.open_text

    class Counting:
        def __init__(self, path, opened=None):
            self._handle = real_open(path, opened)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()

        def read(self, size):
            chunk = self._handle.read(size)
            read.append(len(chunk))
            return chunk

    monkeypatch.setattr(criteo, "open_text", Counting)
    assert criteo._count_data_lines(raw, limit=20, block=512) == 20
    assert 0 < sum(read) < 20 * 512 < (tmp_path / "day_0").stat().st_size
    monkeypatch.undo()
    schema = prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=64, max_rows=20, split_fractions=(0.5, 0.25, 0.25)))
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == [10, 5, 5]


@pytest.mark.parametrize("tail, max_rows", [
    ("\t\n \r\n", None),  # lines of tabs or spaces at the end are blank lines too, as the line count has them
    ("\t".join(["1"] * 20) + "\n", 12),  # a truncated line after --max-rows, in the block the reader parses
    ("x\tabc\n", 12),
])
def test_lines_after_the_converted_ones_are_not_parsed(tmp_path, tail, max_rows):
    rows = _lines(20, seed=6)
    raw = _write(tmp_path / "day_0", rows)
    with open(raw, "a") as handle:
        handle.write(tail)
    config = CriteoConfig(hash_size=64, split_fractions=(0.5, 0.25, 0.25), max_rows=max_rows)
    schema = prepare_criteo(raw, str(tmp_path / "out"), config)
    table = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits])
    kept = rows[: max_rows or len(rows)]
    assert table.num_rows == len(kept)
    np.testing.assert_array_equal(table["label"].to_numpy(), [int(r[0]) for r in kept])


def test_line_count_ignores_blank_lines_at_the_end_across_blocks(tmp_path):
    from recsys_llm.data.criteo import _count_data_lines

    path = tmp_path / "day_0"
    path.write_bytes(b"1\ta\n\n0\tb\r\n" + b"\n \r\n\t\n" * 50)
    for block in (1, 3, 7, 1 << 20):
        assert _count_data_lines(str(path), block=block) == 3
        assert _count_data_lines(str(path), limit=2, block=block) == 2
        assert _count_data_lines(str(path), limit=9, block=block) == 3
    path.write_bytes(b"1\ta")  # no final newline
    assert _count_data_lines(str(path)) == 1


@pytest.mark.parametrize("value", ["zz", "3.5", "68fd 1e64", "é", "NULL", "NA"])
def test_categorical_value_that_is_not_hex_names_line_and_column(tmp_path, value):
    rows = _lines(300)
    rows[260][1 + 13 + 7] = value  # C8, in a later block
    raw = _write(tmp_path / "bad.tsv", rows)
    with pytest.raises(DataError, match=rf"bad\.tsv, line 261, column C8: '{value}' is not a hex token; expected hex"):
        prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=64, block_bytes=4096))
    rows[260][1 + 13 + 7] = "ABCDEF09"  # upper case hex is a token like any other
    prepare_criteo(_write(tmp_path / "ok.tsv", rows), str(tmp_path / "out"), CriteoConfig(hash_size=64, block_bytes=4096))


def test_upper_case_hex_is_the_same_token_as_lower_case(tmp_path):
    """68FD1E64 and 68fd1e64 are one value: upper case (a re-exported file) was hashed to another id."""
    rows = _lines(200)
    config = CriteoConfig(hash_size=1 << 20)
    lower = prepare_criteo(_write(tmp_path / "lower.tsv", rows), str(tmp_path / "lower"), config)
    upper = prepare_criteo(_write(tmp_path / "upper.tsv", [r[:14] + [c.upper() for c in r[14:]] for r in rows]),
                           str(tmp_path / "upper"), config)
    assert any(c != c.upper() for r in rows for c in r[14:])
    for split in lower.splits:
        want, have = pq.read_table(lower.split_path(split)), pq.read_table(upper.split_path(split))
        assert all(have[name].equals(want[name]) for name in SPARSE_NAMES), split


def test_a_first_line_with_a_bad_label_is_refused_not_skipped_as_a_header(tmp_path):
    rows = _lines(20)
    rows[0][0] = "x"  # its other cells are data: not a header
    with pytest.raises(DataError, match=r"bad\.tsv, line 1, column label: 'x' is not a number; expected 0 or 1"):
        prepare_criteo(_write(tmp_path / "bad.tsv", rows), str(tmp_path / "out"))
    header = ["label"] + DENSE_NAMES + SPARSE_NAMES  # a header of a TSV, as of Kaggle's CSV, is skipped
    schema = prepare_criteo(_write(tmp_path / "named.tsv", _lines(20), header=header), str(tmp_path / "out"),
                            CriteoConfig(hash_size=64, split_fractions=(0.5, 0.25, 0.25)))
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == [10, 5, 5]


def test_each_categorical_field_can_have_a_table_size_of_its_own(tmp_path):
    """As torchrec's DLRM example's --num_embeddings_per_feature: a field of few values needs no table the size
    of the largest field's."""
    rows = _lines(200)
    sizes = tuple(range(5, 5 + len(SPARSE_NAMES)))
    schema = prepare_criteo(_write(tmp_path / "day_0", rows), str(tmp_path / "out"), CriteoConfig(hash_size=sizes))
    assert [schema.field(name).cardinality for name in SPARSE_NAMES] == list(sizes)
    table = pq.read_table(schema.split_path("train"))
    for index, (name, size) in enumerate(zip(SPARSE_NAMES, sizes)):
        raw = [r[1 + len(DENSE_NAMES) + index] for r in rows[: table.num_rows]]
        np.testing.assert_array_equal(table[name].to_numpy(), hash_strings(pa.array(raw), size, salt=index))


@pytest.mark.parametrize("hash_size, message", [
    ((64,) * 25, "CriteoConfig.hash_size: expected one size or 26 (one per C1..C26), got 25 sizes"),
    ((64,) * 25 + (1,), "CriteoConfig.hash_size of C26 must be an integer >= 2, got 1"),
])
def test_per_field_table_sizes_are_checked(hash_size, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CriteoConfig(hash_size=hash_size)


@pytest.mark.parametrize("delimiter", ["||", "", 9])
def test_a_delimiter_that_is_not_one_character_is_refused_naming_the_setting(delimiter):
    """Else ``"||"`` was named as the file's fault (``line 1: 1 '||'-separated columns``) and ``""`` failed in
    ``str.split`` without naming the setting."""
    message = f"CriteoConfig.delimiter={delimiter!r}: expected one character, e.g. ',' or '\\t', or None (from the file name)"
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        CriteoConfig(delimiter=delimiter)


def test_the_command_takes_one_table_size_or_one_per_field(capsys):
    from recsys_llm.cli import build_parser

    parse = lambda value: build_parser().parse_args(["prepare", "criteo", "--input", "x", "--out", "y",
                                                     "--hash-size", value]).hash_size
    assert parse("1000") == 1000
    assert parse(",".join(str(n) for n in range(2, 28))) == tuple(range(2, 28))
    with pytest.raises(SystemExit):
        parse("10,20")
    assert "expected an integer >= 2, or 26 of them separated by commas (C1..C26), got '10,20'" in capsys.readouterr().err


@pytest.mark.parametrize("suffix", [".gz", ".bz2", ".zst", ".lz4"])
def test_line_count_of_a_compressed_file_shows_its_progress_to_the_end(tmp_path, capsys, suffix):
    """A compressed day was counted without a total: the bar gave no percentage or time left for its first pass."""
    from recsys_llm.data.criteo import _count_data_lines

    path = str(tmp_path / f"day_0{suffix}")
    with pa.output_stream(path, compression="detect") as out:
        out.write(b"".join(b"%d\t%d\n" % (i % 2, i) for i in range(5000)))
    assert _count_data_lines(path, block=1024, progress=True) == 5000
    assert "counting lines: 100%" in capsys.readouterr().err


def test_max_rows_counts_data_lines_after_a_header(tmp_path):
    """--max-rows 10 of Kaggle's train.csv (header and Id column) converts its first 10 rows, not 9."""
    rows = [[str(i)] + r for i, r in enumerate(_lines(50, seed=1))]
    raw = _write(tmp_path / "train.csv", rows, ",", ["Id", "Label"] + DENSE_NAMES + SPARSE_NAMES)
    schema = prepare_criteo(raw, str(tmp_path / "out"), CriteoConfig(hash_size=64, max_rows=10,
                                                                      split_fractions=(0.6, 0.2, 0.2)))
    table = pa.concat_tables([pq.read_table(schema.split_path(s)) for s in schema.splits])
    assert [pq.read_metadata(schema.split_path(s)).num_rows for s in schema.splits] == [6, 2, 2]
    np.testing.assert_array_equal(table["label"].to_numpy(), [int(r[1]) for r in rows[:10]])


@pytest.mark.parametrize("size", [3, 4, 5, 64])
def test_the_first_lines_end_at_the_last_newline_kept(size):
    """A read that holds exactly the lines still to pass on, and the start of the next one, stops after their
    newline: the next line is not parsed (it may be cut short, or beyond --max-rows)."""
    from recsys_llm.data.criteo import _FirstLines

    lines = _FirstLines(pa.BufferReader(b"a\nb\nc\nd\n"), 2, "day_0")
    got = b""
    while True:
        chunk = lines.read(size)
        if not chunk:
            break
        got += chunk
    assert got == b"a\nb\n"


def test_errors_of_a_kaggle_file_with_a_header_do_not_blame_a_trailing_delimiter(tmp_path):
    """Kaggle's train.csv names its Id column in its header: an error there is not explained as a line ending in
    a delimiter read as an Id column, and a short line is counted against the Id column too."""
    rows = [[str(i)] + r for i, r in enumerate(_lines(30, seed=2))]
    rows[9][3] = "NA"  # I2 of the file's line 11 (line 1 is the header)
    header = ["Id", "Label"] + DENSE_NAMES + SPARSE_NAMES
    raw = _write(tmp_path / "train.csv", rows, ",", header)
    with pytest.raises(DataError, match=r"train\.csv, line 11, column I2: 'NA' is not a number; expected an integer "
                                        r"count or an empty cell$"):
        prepare_criteo(raw, str(tmp_path / "out"))
    rows[9][3] = "5"
    rows[19] = rows[19][:-1]
    raw = _write(tmp_path / "short.csv", rows, ",", header)
    with pytest.raises(DataError, match=r"short\.csv, line 21: 40 columns, expected 41 \(Id, label, I1\.\.I13, "
                                        r"C1\.\.C26\): '19,"):
        prepare_criteo(raw, str(tmp_path / "out"))


def test_raw_values_for_an_artifact_of_criteo_data_point_to_the_criteo_recipe(tmp_path):
    """A Criteo artifact holds no id ways: ``raw_request`` says how ``prepare criteo`` made its ids (not "export the
    run again", which gives none either), and the recipe it names gives the ids ``score`` reads."""
    rows = _lines(200, seed=3)
    schema = prepare_criteo(_write(tmp_path / "day_0", rows), str(tmp_path / "data"), CriteoConfig(hash_size=97))
    artifact = str(tmp_path / "artifact")
    export_small_deepfm(DatasetSchema.load(schema.root), artifact, batch_size=32, steps=1)
    served = ServedModel.load(artifact, trust_program=True)
    request = {name: [r[1 + i] for r in rows[:2]] for i, name in enumerate(DENSE_NAMES + SPARSE_NAMES)}
    with pytest.raises(ValueError, match=r"raw_request: this artifact's training data was prepared by "
                                         r"`recsys-llm prepare criteo`.*exporting again gives none either.*"
                                         r"hash_strings\(tokens, <C_k's cardinality in the prepared schema\.json>, "
                                         r"salt=k - 1\).*log\(1 \+ max\(x, 0\)\)"):
        served.raw_request(request)
    with pytest.raises(ValueError, match=r"raw_value_ids\('C1'\): this artifact's training data was prepared by "):
        served.raw_value_ids("C1", ["68fd1e64"])
    ids = hash_strings(pa.array([r[14 + 2].lower() for r in rows[:5]]), schema.field("C3").cardinality, salt=2)
    np.testing.assert_array_equal(pq.read_table(schema.split_path("train"))["C3"].to_numpy()[:5], ids)


@pytest.mark.parametrize("value", ["9" * 400, "-" + "9" * 400])
def test_a_count_beyond_float_range_is_not_shown_as_inf(tmp_path, value):
    """A cell of 400 digits reads as inf: the message says so rather than quote an inf the file does not hold."""
    rows = _lines(20)
    rows[3][2] = value
    raw = _write(tmp_path / "bad.tsv", rows)
    sign = "-" if value.startswith("-") else ""
    with pytest.raises(DataError, match=rf"bad\.tsv, line 4, column I2: '{sign}inf', or a number beyond "
                                        rf"{sign}1\.8e308 \(a float64's range\), is not an integer count; expected "
                                        r"an integer or an empty cell$"):
        prepare_criteo(raw, str(tmp_path / "out"))
