"""The command line with non-ASCII text on a stream that cannot print it, arguments the locale could not decode,
and output names near the file system's NAME_MAX."""

import io
import os
import sys

from recsys_llm.cli import main

SCHEMA = """name: shop
label: clicked
fields:
  - {name: city, kind: sparse, cardinality: 10, description: "ville où 日本"}
"""


def _inputs(tmp_path) -> "tuple[str, str]":
    csv = tmp_path / "clicks.csv"
    csv.write_text("city,clicked\n" + "".join(f"{city},{i % 2}\n" for i, city in
                                                enumerate(["Paris", "東京", "Zürich"] * 20)), encoding="utf-8")
    schema = tmp_path / "shop.yaml"
    schema.write_text(SCHEMA, encoding="utf-8")
    return str(csv), str(schema)


def test_a_summary_with_text_an_ascii_stdout_cannot_print_is_escaped_not_an_error(tmp_path, monkeypatch) -> None:
    """Under PYTHONIOENCODING=ascii `prepare tabular` wrote the data, then ended with exit code 2 and "'ascii'
    codec can't encode characters" at the summary's field description."""
    csv, schema = _inputs(tmp_path)
    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="strict")
    monkeypatch.setattr(sys, "stdout", stdout)
    assert main(["prepare", "tabular", "--input", csv, "--schema", schema, "--out", str(tmp_path / "data")]) == 0
    stdout.flush()
    assert "ville o\\xf9 \\u65e5\\u672c" in stdout.buffer.getvalue().decode("ascii")
    assert stdout.errors == "strict"  # the caller's stream is given back as it was


def test_an_argument_the_locale_could_not_decode_is_refused_before_any_work(tmp_path, capsys) -> None:
    """Under LC_ALL=C PYTHONUTF8=0 a non-ASCII --out reached pyarrow as lone surrogates: "'utf-8' codec can't
    encode characters in position 16-23: surrogates not allowed", naming nothing."""
    csv, schema = _inputs(tmp_path)
    out = str(tmp_path / "data") + "/\udcc3\udca9"  # b"\xc3\xa9" ("é") decoded under an ASCII locale
    assert main(["prepare", "tabular", "--input", csv, "--schema", schema, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "holds bytes the locale's encoding" in err and "PYTHONUTF8=1" in err and "/é'" in err
    assert not (tmp_path / "data").exists()


def test_an_argument_of_bytes_that_are_not_utf8_is_left_to_the_command() -> None:
    """A name in Latin-1 (b"caf\\xe9", an old run's directory) is no locale's misreading: `evaluate` of such a run
    worked before arguments were checked, and a UTF-8 locale, which the refusal advised, would not change it."""
    import argparse

    from recsys_llm.cli import _undecodable_argument

    assert _undecodable_argument(argparse.Namespace(checkpoint="runs/caf\udce9", overrides=[])) is None
    assert _undecodable_argument(argparse.Namespace(checkpoint="runs/x", overrides=["a.b=\udcc3\udca9"])) == "a.b=é"


def test_an_output_name_too_long_for_the_files_beside_it_is_one_line(tmp_path, capsys) -> None:
    """A 250-character --out (NAME_MAX is 255) ended in a traceback: its hidden lock file's name is longer."""
    name_max = os.pathconf(str(tmp_path), "PC_NAME_MAX")
    csv, schema = _inputs(tmp_path)
    out = str(tmp_path / ("n" * (name_max - 5)))
    assert main(["prepare", "tabular", "--input", csv, "--schema", schema, "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("recsys-llm prepare tabular: error: [Errno 36] File name too long")
    assert "choose a shorter name than" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["clicks.csv", "shop.yaml"]


def test_an_argument_a_latin1_locale_read_as_other_characters_is_refused(tmp_path, monkeypatch, capsys) -> None:
    """Under LC_ALL=en_US.ISO-8859-1 a UTF-8 --out 'Zürich' was read as 'ZÃ¼rich': the command made that name
    through the operating system (as the typed bytes) while pyarrow wrote it as UTF-8, another name, and the run
    ended after its first pass with exit code 2 and "Failed to open local file ... No such file or directory"."""
    import argparse

    from recsys_llm import cli

    monkeypatch.setattr(cli.sys, "getfilesystemencoding", lambda: "iso8859-1")
    misread = "Zürich".encode("utf-8").decode("latin-1")  # 'ZÃ¼rich'
    assert cli._undecodable_argument(argparse.Namespace(out="data/" + misread, overrides=[])) == "data/Zürich"
    # text that is no UTF-8 in the locale's bytes is the locale's own (a Latin-1 name typed under a Latin-1 locale)
    assert cli._undecodable_argument(argparse.Namespace(out="data/Zürich", overrides=[])) is None
    # the locale's own text in one argument leaves the next one checked
    assert cli._undecodable_argument(argparse.Namespace(data="data/Zürich", out="data/" + misread,
                                                        overrides=[])) == "data/Zürich"
    assert cli._undecodable_argument(argparse.Namespace(out="data/plain", overrides=[])) is None
    csv, schema = _inputs(tmp_path)
    out = str(tmp_path / "data") + "/" + misread
    assert main(["prepare", "tabular", "--input", csv, "--schema", schema, "--out", out]) == 2
    err = capsys.readouterr().err
    assert "holds bytes the locale's encoding (iso8859-1)" in err and "/Zürich'" in err and "PYTHONUTF8=1" in err
    assert not (tmp_path / "data").exists()
    monkeypatch.setattr(cli.sys, "getfilesystemencoding", lambda: "utf-8")  # a UTF-8 locale takes any text
    assert cli._undecodable_argument(argparse.Namespace(out="data/" + misread, overrides=[])) is None
