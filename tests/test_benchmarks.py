"""Benchmarks: every script runs in its smallest mode and writes finite figures; shared helpers.

No timing assertions: the figures depend on the machine and its load.
"""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, run_all  # noqa: E402

# Top-level keys that the issues require of a benchmark's JSON (others: at least one figure).
REQUIRED_KEYS = {
    "train_throughput": ["ratio_vs_torchrec_loop", "ratio_parquet_vs_memory"],
    "peers": ["train_speedup_vs_deepctr_torch", "auc_diff_vs_deepctr_torch"],
}
MACHINE_KEYS = ["cpu_model", "usable_cores", "torch_threads", "gpu", "versions"]


_SMOKE_RUNS = {}


def run_smoke(name: str, tmp_path_factory: pytest.TempPathFactory):
    """Runs ``benchmarks/<name>.py --smoke`` once per test session; returns (process, json, png)."""
    if name not in _SMOKE_RUNS:
        out = tmp_path_factory.mktemp(f"bench_{name}")
        json_path, plot_path = out / f"{name}.json", out / f"{name}.png"
        env = dict(os.environ, PYTHONPATH=str(REPO_ROOT))
        process = subprocess.run(
            [sys.executable, str(REPO_ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--device", "cpu",
             "--json", str(json_path), "--plot", str(plot_path)],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=600, env=env,
        )
        _SMOKE_RUNS[name] = (process, json_path, plot_path)
    return _SMOKE_RUNS[name]


@pytest.mark.slow
@pytest.mark.parametrize("name", run_all.discover())
def test_benchmark_smoke_writes_finite_json_and_png(name: str, tmp_path_factory: pytest.TempPathFactory) -> None:
    process, json_path, plot_path = run_smoke(name, tmp_path_factory)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    payload = json.loads(json_path.read_text())
    figures = run_all.figures_of(payload)
    keys = REQUIRED_KEYS.get(name, list(figures))
    assert keys, f"{name} wrote no top-level figure"
    assert common.all_finite(payload, keys), {k: payload.get(k) for k in keys}
    assert payload["mode"] == "smoke" and payload["benchmark"] == name
    assert all(key in payload["machine"] for key in MACHINE_KEYS)
    assert "torch" in payload["machine"]["versions"] and "torchrec" in payload["machine"]["versions"]
    assert plot_path.stat().st_size > 1000 and plot_path.read_bytes()[:4] == b"\x89PNG"
    assert any(line.startswith(f"[{name}] ") for line in process.stdout.splitlines()), process.stdout[-2000:]


@pytest.mark.slow
def test_train_throughput_json_details_describe_both_loops(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The ratios are built from per-round samples/s of the three contenders."""
    process, json_path, _ = run_smoke("train_throughput", tmp_path_factory)
    assert process.returncode == 0, process.stderr[-3000:]
    payload = json.loads(json_path.read_text())
    rounds = payload["details"]["samples_per_second_rounds"]
    assert set(rounds) == {"torchrec_loop", "project_memory", "project_parquet"}
    assert all(len(v) == payload["details"]["sizes"]["repeats"] and min(v) > 0 for v in rounds.values())
    expected = [p / t for p, t in zip(rounds["project_memory"], rounds["torchrec_loop"])]
    assert payload["ratio_vs_torchrec_loop"] == pytest.approx(common.median(expected))
    # the project's loop pipelined every sharded module (otherwise it silently runs slower)
    assert payload["details"]["project_pipelined_modules"] == payload["details"]["project_sharded_modules"]


class TestCommon:
    def test_parser_modes_and_default_paths(self) -> None:
        args = common.parse_args("x", "doc", ["--quick"])
        assert args.mode == "quick" and args.json.name == "x.json" and args.plot.name == "x.png"
        assert common.parse_args("x", "doc", []).mode == "full"
        with pytest.raises(SystemExit):
            common.parse_args("x", "doc", ["--quick", "--smoke"])

    def test_interleaved_repeats_alternate_order(self) -> None:
        calls = []
        contenders = {name: (lambda n=name: calls.append(n) or float(len(calls))) for name in "abc"}
        results = common.interleaved_repeats(contenders, repeats=2)
        assert calls == ["a", "b", "c", "c", "b", "a"]
        assert results == {"a": [1.0, 6.0], "b": [2.0, 5.0], "c": [3.0, 4.0]}

    def test_timed_steps_runs_warmup_then_measured(self) -> None:
        calls = []
        seconds = common.timed_steps(lambda: calls.append(1), warmup_steps=3, measured_steps=5)
        assert len(calls) == 8 and seconds >= 0.0
        with pytest.raises(ValueError):
            common.timed_steps(lambda: None, 1, 0)

    def test_write_json_only_on_rank_zero(self, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
        monkeypatch.setenv("RANK", "1")
        common.write_json(tmp_path / "r1.json", {"a": 1.0})
        assert not (tmp_path / "r1.json").exists()
        monkeypatch.setenv("RANK", "0")
        common.write_json(tmp_path / "sub" / "r0.json", {"a": 1.0})
        assert json.loads((tmp_path / "sub" / "r0.json").read_text()) == {"a": 1.0}
        assert not list(tmp_path.rglob("*.tmp"))

    def test_machine_info_names_cpu_and_versions(self) -> None:
        info = common.machine_info()
        assert info["usable_cores"] >= 1 and info["cpu_model"]
        assert info["versions"]["torch"] and info["versions"]["torchrec"]

    def test_all_finite(self) -> None:
        assert common.all_finite({"a": 1.0, "b": 2}, ["a", "b"])
        assert not common.all_finite({"a": math.nan}, ["a"])
        assert not common.all_finite({"a": 1.0}, ["a", "missing"])


class TestRunAll:
    def test_discover_finds_scripts_with_main_argv(self, tmp_path: Path) -> None:
        (tmp_path / "good.py").write_text("def main(argv=None):\n    return {}\n")
        (tmp_path / "helper.py").write_text("def other():\n    pass\n")
        (tmp_path / "noargs.py").write_text("def main():\n    pass\n")
        (tmp_path / "common.py").write_text("def main(argv=None):\n    pass\n")
        assert run_all.discover(tmp_path) == ["good"]
        assert "train_throughput" in run_all.discover()

    def test_readme_tables_come_from_json_and_keep_prose(self, tmp_path: Path) -> None:
        results = tmp_path / "results"
        machine = {"cpu_model": "Test CPU", "usable_cores": 2, "torch_threads": 2, "gpu": None,
                   "versions": {"torch": "2.13.0"}, "hostname": "h", "git_commit": "abc", "time_utc": "t"}
        common.write_json(results / "demo.json", {
            "speedup": 3.25, "benchmark": "demo", "mode": "quick", "device": "cpu", "details": {},
            "table": [{"batch": 1024, "samples/s": 12345.6}], "machine": machine,
        })
        readme = tmp_path / "README.md"
        readme.write_text(f"# Bench\n\nhand-written prose\n\n{run_all.BEGIN}\nold\n{run_all.END}\n\nfooter\n")
        run_all.update_readme(readme, results)
        text = readme.read_text()
        assert "hand-written prose" in text and "footer" in text and "\nold\n" not in text
        assert "| speedup | 3.25 |" in text and "| 1,024 | 12,346 |" in text
        assert "Test CPU" in text and "No GPU was available" in text
        run_all.update_readme(readme, results)  # idempotent
        assert readme.read_text() == text

    def test_unreadable_result_json_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(ValueError, match="bad.json"):
            run_all.render_results(tmp_path, tmp_path)
