"""``python -m experiments.replot``: every committed table JSON redraws its PNG with the plot and title its run
gives, running nothing; a JSON that is no table, or lacks what the plot needs, is refused naming the file and key."""

import argparse
import glob
import importlib
import json
import os
import shutil

import pytest

from experiments import common, replot

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# every committed results JSON with a PNG beside it (results/*.json, results/*/*.json and deeper)
DRAWN = sorted(os.path.relpath(path, REPO)
               for path in glob.glob(os.path.join(REPO, "results", "**", "*.json"), recursive=True)
               if os.path.exists(path[:-len(".json")] + ".png"))
TABLES = [p for p in DRAWN if "demo_results" not in p]


def _run_args(command: str, monkeypatch) -> "tuple[str, argparse.Namespace]":
    """The script and the parsed options of a table's ``command`` (parsed by the script's own parser, nothing run)."""

    class Parsed(Exception):
        pass

    parse_args = argparse.ArgumentParser.parse_args

    def parse_only(parser, args=None, namespace=None):
        raise Parsed(parse_args(parser, args, namespace))

    module, *words = command.split()[2:]
    with monkeypatch.context() as patch:
        patch.setattr(argparse.ArgumentParser, "parse_args", parse_only)
        with pytest.raises(Parsed) as parsed:
            importlib.import_module(module).main(words)
    return module, parsed.value.args[0]


def _run_title(command: str, monkeypatch) -> str:
    """The title the run of ``command`` gives its figure (the format of each script's report)."""
    module, args = _run_args(command, monkeypatch)
    if module == "experiments.llactr":
        control = " with random field vectors (control)" if args.field_vectors == "random" else ""
        return f"LLaCTR on {args.data}{control}: test AUC"
    if module == "experiments.elec":
        return f"ELEC on {args.data}: test AUC"
    assert module == "experiments.ml100k_backbones", module
    return "ML-100K: backbones"


def _recording(monkeypatch) -> list:
    """Records every ``plot_auc(out_path, tables, title)`` call, still drawing it."""
    calls, plot_auc = [], common.plot_auc

    def record(out_path, tables, title):
        calls.append((out_path, tables, title))
        plot_auc(out_path, tables, title)

    monkeypatch.setattr(common, "plot_auc", record)
    return calls


def test_the_committed_tables_are_found():
    assert len(TABLES) >= 20 and "results/ml100k_backbones.json" in TABLES and "results/llactr_ml100k.json" in TABLES


@pytest.mark.parametrize("path", TABLES)
def test_every_committed_table_replots_with_its_runs_title_and_tables(path, tmp_path, monkeypatch):
    source = tmp_path / os.path.basename(path)
    shutil.copy(os.path.join(REPO, path), source)
    calls = _recording(monkeypatch)
    assert replot.main([str(source)]) == 0
    png = source.with_suffix(".png")
    assert png.stat().st_size > 0 and sorted(os.listdir(tmp_path)) == sorted([source.name, png.name])
    ((out_path, tables, title),) = calls
    payload = json.loads(source.read_text())
    assert out_path == str(png) and title == _run_title(payload["command"], monkeypatch)
    module, args = _run_args(payload["command"], monkeypatch)
    # the backbones in the run's order (its --backbones, else the script's), every row as the JSON holds it
    order = payload.get("backbones_done") or list(args.backbones or importlib.import_module(module).BACKBONES)
    assert list(tables) == order and set(order) == set(payload["table"])
    if module == "experiments.ml100k_backbones":
        assert tables == {b: {"test": payload["table"][b]} for b in order}
    else:
        run_order = ["plain", *importlib.import_module(module).VARIANTS] if module == "experiments.llactr" else [
            v for v in importlib.import_module(module).VARIANT_ORDER if v in payload["table"][order[0]]]
        assert all(list(tables[b]) == run_order and tables[b] == payload["table"][b] for b in order)


def test_plot_names_where_the_png_goes(tmp_path):
    source = tmp_path / "table.json"
    shutil.copy(os.path.join(REPO, "results", "ml100k_backbones.json"), source)
    assert replot.main([str(source), "--plot", str(tmp_path / "elsewhere.png")]) == 0
    assert sorted(os.listdir(tmp_path)) == ["elsewhere.png", "table.json"]


def test_a_json_without_what_the_plot_needs_is_refused_naming_file_and_key(tmp_path, capsys):
    payload = json.loads(open(os.path.join(REPO, "results", "llactr_ml100k.json"), encoding="utf-8").read())
    for name, drop in (("no_data", lambda p: p.pop("data")),
                       ("no_std", lambda p: p["table"]["fm"]["+FRE"]["auc"].pop("std"))):
        changed = json.loads(json.dumps(payload))
        drop(changed)
        (tmp_path / f"{name}.json").write_text(json.dumps(changed))
    shutil.copy(os.path.join(REPO, "results", "demo", "demo_results.json"), tmp_path / "demo_results.json")
    paths = [str(tmp_path / f"{name}.json") for name in ("no_data", "no_std", "demo_results")]
    assert replot.main(paths) == 1
    errors = capsys.readouterr().err
    assert f"{paths[0]}: no key 'data'" in errors and f"{paths[1]}: no key 'table.fm.+FRE.auc.std'" in errors
    assert f"{paths[2]}: no key 'table': not a table of experiments/" in errors
    assert sorted(os.listdir(tmp_path)) == sorted(os.path.basename(p) for p in paths)  # nothing drawn


def test_a_run_draws_its_png_through_the_replot_path(tmp_path, monkeypatch):
    """ml100k_backbones' write path: the PNG of the JSON it wrote, as a replot draws it (same tables and title)."""
    calls = _recording(monkeypatch)
    row = {"auc": {"mean": 0.76, "std": 0.01, "n": 3}, "logloss": {"mean": 0.47, "std": 0.01, "n": 3}}
    payload = {"backbones_done": ["fwfm", "fm"], "table": {"fwfm": row, "fm": row},
               "command": "python -m experiments.ml100k_backbones --backbones fwfm fm"}
    common.write_table(str(tmp_path), "ml100k_backbones", payload, "md")
    assert replot.main([str(tmp_path / "ml100k_backbones.json"), "--plot", str(tmp_path / "again.png")]) == 0
    (_, run_tables, run_title), (_, tables, title) = calls
    assert (run_tables, run_title) == (tables, title) and list(tables) == ["fwfm", "fm"]
