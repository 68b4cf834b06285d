"""``recsys-llm prepare``: the sub-commands write checked splits and report errors clearly."""

import json

import pyarrow.parquet as pq
import pytest

from recsys_llm.cli import main
from recsys_llm.data.movielens import MovieLensConfig
from recsys_llm.data.prepare import check_prepared, prepare_dataset
from recsys_llm.data.schema import DatasetSchema
from recsys_llm.data.synthetic import SyntheticConfig


def _run(argv):
    return main(argv)


def test_prepare_synthetic_cli(tmp_path, capsys):
    out = str(tmp_path / "syn")
    assert _run(["prepare", "synthetic", "--out", out, "--rows", "2000", "--quiet", "--rows-per-group", "300"]) == 0
    printed = capsys.readouterr().out
    assert "train" in printed and "1,600 rows" in printed and "item_id" in printed
    schema = DatasetSchema.load(out)
    assert pq.ParquetFile(schema.split_path("train")).metadata.num_row_groups == 6
    report = check_prepared(schema)
    assert report.rows == {"train": 1600, "valid": 200, "test": 200}
    assert 0.1 < report.click_rate["train"] < 0.6


def test_click_rate_is_the_label_mean_of_every_row_group_and_file(tmp_path):
    """The label column is summed a row group at a time (not read whole), over every file of a split directory."""
    import os

    out = str(tmp_path / "syn")
    assert _run(["prepare", "synthetic", "--out", out, "--rows", "2000", "--quiet", "--rows-per-group", "170"]) == 0
    schema = DatasetSchema.load(out)
    labels = pq.read_table(schema.split_path("train"), columns=[schema.label]).column(0).to_numpy()
    folder = os.path.join(out, "train_parts")
    os.makedirs(folder)
    table = pq.read_table(schema.split_path("train"))
    pq.write_table(table.slice(0, 700), os.path.join(folder, "a.parquet"), row_group_size=300)
    pq.write_table(table.slice(700), os.path.join(folder, "b.parquet"), row_group_size=250)
    os.remove(schema.split_path("train"))
    schema.splits["train"] = "train_parts"

    report = check_prepared(schema)
    assert report.rows["train"] == 1600
    assert report.click_rate["train"] == pytest.approx(float(labels.mean()), abs=1e-12)


def test_prepare_tabular_cli_error_names_file(tmp_path, capsys):
    (tmp_path / "d.csv").write_text("u,clicked\n1,0\n2,7\n")
    (tmp_path / "s.json").write_text(json.dumps({"name": "t", "label": "clicked",
                                                 "fields": [{"name": "u", "kind": "sparse", "cardinality": 5}]}))
    code = _run(["prepare", "tabular", "--input", str(tmp_path / "d.csv"), "--schema", str(tmp_path / "s.json"),
                 "--out", str(tmp_path / "out"), "--quiet"])
    assert code == 2
    error = capsys.readouterr().err
    assert error.startswith("recsys-llm prepare tabular: error: ") and "d.csv: column 'clicked', data row 1 (line 3 if no blank line or multi-line cell precedes it): label 7.0" in error


def test_prepare_dataset_config_roundtrip(tmp_path):
    report = prepare_dataset("synthetic", str(tmp_path / "s"), config=SyntheticConfig(num_rows=500, num_users=30,
                                                                                     num_items=20), progress=False)
    assert report.schema.field("user_id").cardinality == 31 and report.schema.field("item_id").cardinality == 21
    assert sum(report.rows.values()) == 500


def test_prepare_refuses_a_zero_split_share_before_any_work(tmp_path, capsys):
    import pytest

    raw = tmp_path / "day.txt"
    raw.write_text("\t".join(["1"] + ["0"] * 13 + ["ab"] * 26) + "\n")
    with pytest.raises(SystemExit) as exit_info:
        _run(["prepare", "criteo", "--input", str(raw), "--out", str(tmp_path / "out"), "--split", "0.5,0.5,0", "--quiet"])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "argument --split: expected three positive shares" in error and "'0.5,0.5,0'" in error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["day.txt"]


def test_prepare_synthetic_refuses_an_unrelated_directory(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert _run(["prepare", "synthetic", "--out", str(out), "--rows", "200", "--quiet"]) == 2
    assert "not an earlier prepared data set" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_prepare_again_refuses_a_data_set_holding_other_files_and_keeps_them(tmp_path, capsys):
    """Replacing the data set whole would delete what the user put beside it."""
    out = tmp_path / "syn"
    assert _run(["prepare", "synthetic", "--out", str(out), "--rows", "200", "--quiet"]) == 0
    written = sorted(p.name for p in out.iterdir())
    assert _run(["prepare", "synthetic", "--out", str(out), "--rows", "300", "--quiet"]) == 0  # its own entries: fine
    (out / "notes.txt").write_text("keep me")
    (out / "vectors").mkdir()
    assert _run(["prepare", "synthetic", "--out", str(out), "--rows", "300", "--quiet"]) == 2
    error = capsys.readouterr().err
    assert "also notes.txt, vectors, which prepare did not write" in error and "move them out" in error
    assert sorted(p.name for p in out.iterdir()) == sorted(written + ["notes.txt", "vectors"])
    assert (out / "notes.txt").read_text() == "keep me"
    (out / "notes.txt").unlink()
    (out / "vectors").rmdir()
    # a Parquet file prepare did not write (a `score --output`, the raw rows) was taken for its own and deleted
    (out / "scores.parquet").write_bytes(b"PAR1 the user's scores")
    assert _run(["prepare", "synthetic", "--out", str(out), "--rows", "300", "--quiet"]) == 2
    assert "also scores.parquet, which prepare did not write" in capsys.readouterr().err
    assert (out / "scores.parquet").read_bytes() == b"PAR1 the user's scores"


def test_prepare_again_refuses_an_old_copy_holding_other_files_and_keeps_them(tmp_path):
    """``.<out>.old`` (a swap killed between its renames) is put back or removed by the next swap, which
    deleted what the user had put into it unchecked; a visible ``<out>.old`` is the user's, left alone."""
    import os
    import shutil

    out = tmp_path / "syn"
    prepare_dataset("synthetic", str(out), config=SyntheticConfig(num_rows=200), progress=False)
    shutil.copytree(out, f"{out}.old")  # a backup of one's own
    os.replace(out, tmp_path / ".syn.old")
    (tmp_path / ".syn.old" / "notes.txt").write_text("keep me")
    for _ in range(2):  # without <out>, then beside a new one
        with pytest.raises(FileExistsError, match=r"\.syn\.old: holds an earlier prepared data set and also notes\.txt"):
            prepare_dataset("synthetic", str(out), config=SyntheticConfig(num_rows=300), progress=False)
        assert (tmp_path / ".syn.old" / "notes.txt").read_text() == "keep me"
        out.mkdir(exist_ok=True)
    os.remove(tmp_path / ".syn.old" / "notes.txt")  # the earlier data set alone: removed by the swap
    prepare_dataset("synthetic", str(out), config=SyntheticConfig(num_rows=300), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["syn", "syn.old"]
    assert (tmp_path / "syn.old" / "schema.json").is_file()


def test_prepare_again_through_a_trailing_slash_or_a_symlink(tmp_path):
    """The swap works on the real directory: ``out/`` and a symlinked output name it too."""
    import os

    real = tmp_path / "big" / "syn"
    real.parent.mkdir()
    link = tmp_path / "syn"
    os.symlink(real, link)
    for out in (f"{real}/", f"{real}/", str(link), str(link)):
        report = prepare_dataset("synthetic", out, config=SyntheticConfig(num_rows=600, rows_per_group=300),
                                 progress=False)
        assert report.schema.root == str(real) and report.rows["train"] == 480
    assert os.path.islink(link) and sorted(os.listdir(tmp_path / "big")) == ["syn"]  # no .old or temp left


def test_prepare_refuses_bad_numbers_naming_the_flag_before_any_work(tmp_path, capsys):
    import pytest

    cases = [
        (["synthetic", "--items", "-1"], "argument --items: expected an integer >= 1, got '-1'"),
        (["synthetic", "--users", "0"], "argument --users: expected an integer >= 1, got '0'"),
        (["synthetic", "--rows-per-group", "0"], "argument --rows-per-group: expected an integer >= 1, got '0'"),
        (["synthetic", "--rows", "5"], "argument --rows: expected an integer >= 10, got '5'"),
        (["synthetic", "--seed", "-3"], "argument --seed: expected an integer >= 0, got '-3'"),
        (["synthetic", "--cold-item-fraction", "1.5"], "argument --cold-item-fraction: expected a finite number >= 0 "
                                                       "and < 1, got '1.5'"),
        (["criteo", "--input", "x", "--hash-size", "1"], "argument --hash-size: expected an integer >= 2, or 26 of them separated by commas (C1..C26), got '1'"),
        (["criteo", "--input", "x", "--hash-size", "5,6"], "argument --hash-size: expected an integer >= 2, or 26 of "
                                                            "them separated by commas (C1..C26), got '5,6'"),
        (["criteo", "--input", "x", "--max-rows", "0"], "argument --max-rows: expected an integer >= 1, got '0'"),
        (["movielens", "--input", "x", "--zip-prefix-length", "0"], "argument --zip-prefix-length: expected an "
                                                                    "integer >= 1, got '0'"),
        (["tabular", "--input", "x", "--schema", "s", "--fill-missing-dense", "nan"],
         "argument --fill-missing-dense: expected a finite number, got 'nan'"),
        (["tabular", "--input", "x", "--schema", "s", "--label-threshold", "abc"],
         "argument --label-threshold: expected a finite number, got 'abc'"),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            _run(["prepare", argv[0], "--out", str(tmp_path / "out"), "--quiet"] + argv[1:])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err, argv
    assert list(tmp_path.iterdir()) == []


def test_prepare_synthetic_seed_has_help(capsys):
    import pytest

    with pytest.raises(SystemExit):
        _run(["prepare", "synthetic", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--seed SEED seed of users, items and impressions" in help_text


def test_prepare_configs_refuse_bad_numbers_naming_the_setting():
    import pytest

    from recsys_llm.data.criteo import CriteoConfig
    from recsys_llm.data.movielens import MovieLensConfig

    with pytest.raises(ValueError, match=r"^SyntheticConfig\.num_items must be an integer >= 1 or None, got -1$"):
        SyntheticConfig(num_items=-1)
    with pytest.raises(ValueError, match=r"^SyntheticConfig\.cold_item_fraction must be a finite number >= 0 and < 1, got 1\.5$"):
        SyntheticConfig(cold_item_fraction=1.5)
    with pytest.raises(ValueError, match=r"^SyntheticConfig\.rows_per_group must be an integer >= 1, got 0$"):
        SyntheticConfig(rows_per_group=0)
    with pytest.raises(ValueError, match=r"^SyntheticConfig\.num_rows must be an integer >= 10, got True$"):
        SyntheticConfig(num_rows=True)
    with pytest.raises(ValueError, match=r"^CriteoConfig\.hash_size must be an integer >= 2, got 1$"):
        CriteoConfig(hash_size=1)
    with pytest.raises(ValueError, match=r"^MovieLensConfig\.rows_per_group must be an integer >= 1, got 0$"):
        MovieLensConfig(rows_per_group=0)


def test_prepare_dataset_refuses_another_sources_config_before_any_work(tmp_path):
    """A ``MovieLensConfig`` for the synthetic source (or a ``SyntheticConfig`` for MovieLens) is named, not
    an AttributeError from inside the converter."""
    import pytest

    out = tmp_path / "out"
    with pytest.raises(TypeError, match=r"prepare synthetic: config is a MovieLensConfig; expected a SyntheticConfig"):
        prepare_dataset("synthetic", str(out), config=MovieLensConfig(), progress=False)
    raw = tmp_path / "ml"
    raw.mkdir()
    with pytest.raises(TypeError, match=r"prepare movielens: config is a SyntheticConfig; expected a MovieLensConfig"):
        prepare_dataset("movielens", str(out), input_path=str(raw), config=SyntheticConfig(), progress=False)
    assert not out.exists()


def test_delimiter_flag_takes_a_typed_tab_escape(tmp_path, capsys):
    r"""``--delimiter '\t'`` (two characters from a shell) was refused by tabular with "expected one
    character, e.g. ',' or '\t'", and read by criteo as a two-character separator ("1 '\\t'-separated
    columns"); it now means a tab, as ``tab`` does."""
    import pytest

    rows = "".join(f"{i % 4}\t{i % 2}\n" for i in range(200))
    (tmp_path / "d.tsv").write_text("u\tclicked\n" + rows)
    (tmp_path / "s.json").write_text(json.dumps({"name": "t", "label": "clicked",
                                                 "fields": [{"name": "u", "kind": "sparse", "cardinality": 5}]}))
    for typed in ("\\t", "tab", "\t"):
        out = tmp_path / f"out-{len(typed)}"
        assert _run(["prepare", "tabular", "--input", str(tmp_path / "d.tsv"), "--schema", str(tmp_path / "s.json"),
                     "--out", str(out), "--delimiter", typed, "--quiet"]) == 0
        assert sum(check_prepared(DatasetSchema.load(str(out))).rows.values()) == 200
    line = "\t".join(["1"] + ["3"] * 13 + ["68fd1e64"] * 26) + "\n"
    (tmp_path / "day.csv").write_text(line * 10)  # a .csv name: comma by default
    assert _run(["prepare", "criteo", "--input", str(tmp_path / "day.csv"), "--out", str(tmp_path / "criteo"),
                 "--delimiter", "\\t", "--quiet"]) == 0
    capsys.readouterr()
    for source in (["criteo", "--input", "x"], ["tabular", "--input", "x", "--schema", "s"]):
        with pytest.raises(SystemExit):
            _run(["prepare", *source, "--out", str(tmp_path / "no"), "--delimiter", ";;", "--quiet"])
        assert ("argument --delimiter: expected one character, or \\t or tab for a tab, got ';;'"
                in capsys.readouterr().err)


def test_an_input_of_the_wrong_kind_is_one_line_naming_it(tmp_path, capsys):
    """Criteo reads one file: a directory given as --input is one error line, not pyarrow's traceback."""
    folder = tmp_path / "day_0"
    folder.mkdir()
    out = tmp_path / "out"
    assert _run(["prepare", "criteo", "--input", str(folder), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert f"recsys-llm prepare criteo: error: {folder}: is a directory; prepare criteo reads one" in err, err
    assert "Traceback" not in err and not out.exists()


def test_an_empty_sequence_separator_is_named_by_its_flag(tmp_path, capsys):
    """It was named as ``TabularConfig.sequence_separator=''``, a setting the user never wrote."""
    import pytest

    (tmp_path / "d.csv").write_text("u,clicked\n1,0\n")
    (tmp_path / "s.json").write_text(json.dumps({"name": "t", "label": "clicked",
                                                 "fields": [{"name": "u", "kind": "sparse", "cardinality": 5}]}))
    with pytest.raises(SystemExit) as exit_info:
        _run(["prepare", "tabular", "--input", str(tmp_path / "d.csv"), "--schema", str(tmp_path / "s.json"),
              "--out", str(tmp_path / "out"), "--sequence-separator", "", "--quiet"])
    assert exit_info.value.code == 2
    assert "argument --sequence-separator: expected a non-empty separator of sequence tokens, e.g. '|', got ''" in \
        capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_prepare_tabular_reports_the_way_of_each_field_and_takes_hash(tmp_path, capsys):
    """Whether a hashed field's integers were ids or hashed as text depends on the data; the report says which."""
    (tmp_path / "d.csv").write_text("u,q,clicked\n" + "".join(f"{i % 4},{100 + i},{i % 2}\n" for i in range(40)))
    (tmp_path / "s.json").write_text(json.dumps({"name": "t", "label": "clicked",
                                                 "fields": [{"name": "u", "kind": "sparse", "cardinality": 5},
                                                            {"name": "q", "kind": "sparse", "cardinality": 20,
                                                             "hashed": True}]}))
    args = ["prepare", "tabular", "--input", str(tmp_path / "d.csv"), "--schema", str(tmp_path / "s.json"), "--quiet"]
    assert _run(args + ["--out", str(tmp_path / "ids")]) == 0
    printed = capsys.readouterr().out
    assert "ids: integer ids  " in printed and "ids: integer ids mod 20" in printed
    assert _run(args + ["--out", str(tmp_path / "hashed"), "--hash", "q"]) == 0
    assert "ids: hashed text (--hash)" in capsys.readouterr().out
    assert _run(args + ["--out", str(tmp_path / "no"), "--hash", "u"]) == 2
    assert "--hash u (TabularConfig.hash_fields): field 'u' is not hashed in" in capsys.readouterr().err
    report = prepare_dataset("synthetic", str(tmp_path / "syn"), config=SyntheticConfig(num_rows=100), progress=False)
    assert report.field_ways == {} and "ids:" not in report.summary()


def test_an_input_inside_the_copy_an_earlier_swap_kept_is_refused(tmp_path):
    """The next swap deletes the hidden ``.<out>.old`` that the last one kept: an input there would go with it."""
    from recsys_llm.data.parquet_writer import check_inputs_outside

    kept = tmp_path / ".out.old"
    kept.mkdir()
    with pytest.raises(ValueError, match="the output directory holds the input"):
        check_inputs_outside(str(tmp_path / "out"), [str(kept / "rows.csv")])
    check_inputs_outside(str(tmp_path / "out"), [str(tmp_path / "rows.csv")])


def test_the_summary_marks_hashed_fields(tmp_path):
    from recsys_llm.data.criteo import DENSE_NAMES, SPARSE_NAMES, CriteoConfig

    raw = tmp_path / "day_0"
    raw.write_text("".join("\t".join([str(i % 2)] + ["1"] * len(DENSE_NAMES) + ["68fd1e64"] * len(SPARSE_NAMES)) + "\n"
                           for i in range(20)))
    summary = prepare_dataset("criteo", str(tmp_path / "out"), input_path=str(raw), config=CriteoConfig(hash_size=64),
                              progress=False).summary()
    assert [line.split()[:4] for line in summary.splitlines() if line.split()[0] in ("I1", "C1")] == [
        ["I1", "dense", "-", "anonymised"], ["C1", "sparse", "64", "(hashed)"]]


@pytest.mark.parametrize("source", ["movielens", "criteo", "tabular"])
def test_an_input_that_does_not_exist_is_named_before_any_work(tmp_path, source):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=rf"^{missing}: input not found$"):
        prepare_dataset(source, str(tmp_path / "out"), input_path=missing, schema_path=str(tmp_path / "s.json"),
                        progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_every_flag_reaches_the_config_of_its_source():
    """Each option of ``prepare SOURCE`` ends up in the config the converter gets (none silently left at its
    default)."""
    from recsys_llm.cli import build_parser
    from recsys_llm.cli.data import _config
    from recsys_llm.data.criteo import CriteoConfig
    from recsys_llm.data.tabular import TabularConfig

    def config(argv):
        return _config(build_parser().parse_args(["prepare", *argv, "--out", "o"]))

    assert config(["synthetic", "--rows", "500", "--seed", "4", "--users", "7", "--items", "5", "--rows-per-group", "9",
                   "--cold-item-fraction", "0.2"]) == SyntheticConfig(500, 4, 7, 5, 9, 0.2)
    assert config(["movielens", "--input", "x", "--split", "0.6,0.2,0.2", "--zip-prefix-length", "3",
                   "--rows-per-group", "9", "--history-length", "0"]) == MovieLensConfig((0.6, 0.2, 0.2), 3, 9, 0)
    assert config(["criteo", "--input", "x", "--hash-size", "64", "--delimiter", ",", "--split", "0.6,0.2,0.2",
                   "--rows-per-group", "9", "--max-rows", "100"]) == CriteoConfig(64, ",", (0.6, 0.2, 0.2), 9,
                                                                                 max_rows=100)
    got = config(["tabular", "--input", "x", "--schema", "s", "--split", "0.6,0.2,0.2", "--split-by", "ts",
                  "--seed", "4", "--label-threshold", "3", "--fill-missing-dense", "0", "--sequence-separator", ";",
                  "--delimiter", "tab", "--rows-per-group", "9", "--missing-token", "NA", "--missing-token", "null",
                  "--vocabulary", "zip", "--hash", "q"])
    assert got == TabularConfig(split_by="ts", split_fractions=(0.6, 0.2, 0.2), seed=4, label_threshold=3.0,
                                fill_missing_dense=0.0, sequence_separator=";", delimiter="\t", rows_per_group=9,
                                missing_tokens=("", "NA", "null"), vocabulary_fields=("zip",), hash_fields=("q",))


def test_a_cold_item_fraction_of_one_is_refused_by_the_flag(tmp_path, capsys):
    """[0, 1): every item cold would leave training without its items (argparse names the flag, before any work)."""
    with pytest.raises(SystemExit):
        _run(["prepare", "synthetic", "--out", str(tmp_path / "out"), "--cold-item-fraction", "1", "--quiet"])
    assert "argument --cold-item-fraction: expected a finite number >= 0 and < 1, got '1'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []
