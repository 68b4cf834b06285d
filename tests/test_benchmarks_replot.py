"""``--replot JSON``: every benchmark that plots redraws the PNG of a JSON it wrote, from that JSON alone (no model,
no timing), through the same function its run draws with. No pixel comparison: the PNG is written and not empty."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, run_all  # noqa: E402

RESULTS = REPO_ROOT / "benchmarks" / "results"
# every committed result that has a PNG beside it, as a path under benchmarks/results
COMMITTED = sorted(str(path.relative_to(RESULTS)) for path in RESULTS.rglob("*.json")
                   if path.with_suffix(".png").exists())
# the benchmarks whose run writes a PNG (peer_deepctr.py is the peer venv's side of peers.py, no main(argv))
PLOTTING = run_all.discover()


def _benchmark(json_path: Path) -> str:
    """The script that wrote ``json_path`` (its ``benchmark`` key)."""
    return json.loads(json_path.read_text(encoding="utf-8"))["benchmark"]


def _copy(relative: str, tmp_path: Path) -> Path:
    """A copy of a committed result in ``tmp_path``: a test never writes into the repository."""
    copy = tmp_path / relative.replace("/", "_")
    shutil.copyfile(RESULTS / relative, copy)
    return copy


def test_every_committed_result_with_a_png_is_covered() -> None:
    assert len(COMMITTED) >= len(PLOTTING) and {_benchmark(RESULTS / path) for path in COMMITTED} == set(PLOTTING)


@pytest.mark.parametrize("relative", COMMITTED)
def test_replot_of_a_committed_result_writes_its_png_beside_the_json(relative: str, tmp_path: Path, capsys) -> None:
    json_path = _copy(relative, tmp_path)
    before = json_path.read_bytes()
    module = importlib.import_module(f"benchmarks.{_benchmark(json_path)}")
    payload = module.main(["--replot", str(json_path)])
    png = json_path.with_suffix(".png")
    assert png.stat().st_size > 1000 and png.read_bytes()[:4] == b"\x89PNG"
    assert json_path.read_bytes() == before and payload == json.loads(before)  # the JSON is read, not rewritten
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted([json_path.name, png.name])
    assert f"{png} redrawn from {json_path}" in capsys.readouterr().out


def test_replot_writes_to_plot_when_given(tmp_path: Path) -> None:
    json_path = _copy("llactr.json", tmp_path)
    from benchmarks import llactr

    llactr.main(["--replot", str(json_path), "--plot", str(tmp_path / "figures" / "other.png")])
    assert (tmp_path / "figures" / "other.png").stat().st_size > 1000
    assert not json_path.with_suffix(".png").exists()


@pytest.mark.parametrize("name", PLOTTING)
def test_a_run_and_replot_draw_through_one_function(name: str, tmp_path: Path) -> None:
    """A run ends in ``write_result(args, payload, replot)``: the JSON, then ``replot`` of that payload as the JSON
    holds it (the run's dicts with int keys and tuples come back as ``--replot`` reads them)."""
    module = importlib.import_module(f"benchmarks.{name}")
    source = Path(module.__file__).read_text(encoding="utf-8")
    assert source.count("write_result(args, payload, replot)") == 1 and "replot_json(args, replot)" in source
    assert "write_json(" not in source and "two_panel_figure(args.plot" not in source
    assert callable(module.replot)
    drawn: List[object] = []
    args = common.parse_args(name, None, ["--json", str(tmp_path / "x.json")])
    common.write_result(args, {"figure": 1.0, "by_size": {1024: 2.0}, "sizes": (1, 2)},
                        lambda payload, png: drawn.append((dict(payload), png)))
    assert drawn == [({"figure": 1.0, "by_size": {"1024": 2.0}, "sizes": [1, 2]}, tmp_path / "x.png")]
    assert json.loads((tmp_path / "x.json").read_text()) == drawn[0][0]


@pytest.mark.parametrize("relative, drop", [
    ("train_throughput.json", ("details", "sizes")),
    ("llactr.json", ("details", "instance", "per_row_seconds")),
    ("elec.json", ("student_serve_ratio_vs_backbone",)),
    ("full/scaling.json", ("details", "batch", "by_method")),
    ("table_dtype.json", ("details", "serve")),
])
def test_a_result_lacking_a_key_the_plot_needs_is_refused_naming_file_and_key(relative: str, drop: tuple,
                                                                              tmp_path: Path) -> None:
    json_path = _copy(relative, tmp_path)
    payload = json.loads(json_path.read_text(encoding="utf-8"))
    parent = payload
    for key in drop[:-1]:
        parent = parent[key]
    del parent[drop[-1]]
    json_path.write_text(json.dumps(payload), encoding="utf-8")
    module = importlib.import_module(f"benchmarks.{payload['benchmark']}")
    with pytest.raises(SystemExit) as stopped:
        module.main(["--replot", str(json_path)])
    assert f"--replot {json_path}: no key '{'.'.join(drop)}'" in str(stopped.value.code)
    assert not json_path.with_suffix(".png").exists()


def test_replot_refuses_another_benchmarks_json_a_missing_file_and_a_size(tmp_path: Path, capsys) -> None:
    from benchmarks import elec, peers

    json_path = _copy("peers.json", tmp_path)
    with pytest.raises(SystemExit) as stopped:
        elec.main(["--replot", str(json_path)])
    assert "a result of benchmarks/peers.py, not of benchmarks/elec.py" in str(stopped.value.code)
    for argv, message in ((["--replot", str(tmp_path / "none.json")], "no such file"),
                          (["--replot", str(json_path), "--quick"], "--quick and --smoke do not apply"),
                          (["--replot", str(json_path), "--plot", str(json_path)], "name one file")):
        with pytest.raises(SystemExit):
            peers.main(argv)
        assert message in capsys.readouterr().err


def test_result_dict_names_the_path_of_a_missing_key() -> None:
    payload = common.result_dict({"details": {"sizes": {"rows": 1}}, "rounds": [{"a": 1}]}, "r.json")
    assert payload["details"]["sizes"]["rows"] == 1 and payload.get("nothing") is None
    with pytest.raises(common.MissingResultKey, match=r"r\.json: no key 'details\.sizes\.batch'"):
        payload["details"]["sizes"]["batch"]
    with pytest.raises(KeyError, match=r"no key 'rounds\.b'"):
        payload["rounds"][0]["b"]


def test_replot_imports_no_torch(tmp_path: Path) -> None:
    """In a fresh process (this one has torch from conftest): the plot needs matplotlib, not torch or the models."""
    json_path = _copy("scaling.json", tmp_path)
    code = ("import sys; from benchmarks import scaling; scaling.main(['--replot', sys.argv[1]]); "
            "print(sorted(m for m in ('torch', 'torchrec', 'transformers', 'pyarrow') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", code, str(json_path)], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "[]" and json_path.with_suffix(".png").stat().st_size > 1000


def test_replot_refuses_a_plot_directory_and_a_json_that_is_no_result_object(tmp_path: Path, capsys) -> None:
    from benchmarks import peers

    json_path = _copy("peers.json", tmp_path)
    (tmp_path / "figures").mkdir()
    with pytest.raises(SystemExit):
        peers.main(["--replot", str(json_path), "--plot", str(tmp_path / "figures")])
    assert "--plot" in (err := capsys.readouterr().err) and "is a directory" in err
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]", encoding="utf-8")
    with pytest.raises(SystemExit) as stopped:
        peers.main(["--replot", str(listed)])
    assert f"--replot {listed}: not a result (a JSON object)" in str(stopped.value.code)
    assert not listed.with_suffix(".png").exists()


def test_only_rank_0_draws(tmp_path: Path, monkeypatch) -> None:
    """The ranks of a run under torchrun all reach write_result: one PNG is drawn, by rank 0."""
    drawn = []
    monkeypatch.setattr(common, "is_rank_zero", lambda: False)
    common.replot_payload(lambda payload, path: drawn.append(path), {"benchmark": "x"}, tmp_path / "x.png", "x.json")
    assert drawn == []
    monkeypatch.setattr(common, "is_rank_zero", lambda: True)
    common.replot_payload(lambda payload, path: drawn.append(path), {"benchmark": "x"}, tmp_path / "x.png", "x.json")
    assert drawn == [tmp_path / "x.png"]
