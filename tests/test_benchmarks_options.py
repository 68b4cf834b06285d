"""Benchmark options as a user passes them: a bad ``--llm`` refused before any work, ``run_all`` not counting a
script that wrote no JSON as a success, and the device that a benchmark built on ``benchmarks/common.py`` records."""

import argparse
import sys
from pathlib import Path
from typing import List

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, elec, llactr, run_all  # noqa: E402


def _no_work(*args: object, **kwargs: object) -> None:
    raise AssertionError("the benchmark started its work before refusing --llm")


@pytest.mark.parametrize("module", [llactr, elec], ids=["llactr", "elec"])
@pytest.mark.parametrize("kind", ["missing", "not_a_model", "a_file", "no_model_type"])
def test_a_bad_llm_is_refused_naming_the_option_before_any_work(module, kind: str, tmp_path: Path, capsys,
                                                                 monkeypatch) -> None:
    """``--llm /no/such/dir`` (or a folder without config.json, or a file) ended in a ``[rank0]`` traceback that
    did not name ``--llm``, after the synthetic data was generated."""
    import recsys_llm.data.synthetic as synthetic

    monkeypatch.setattr(synthetic, "generate_synthetic", _no_work)
    llm = tmp_path / "llm"
    if kind == "not_a_model":
        llm.mkdir()
        (llm / "readme.txt").write_text("not a model\n")
    elif kind == "a_file":
        llm.write_text("{}\n")
    elif kind == "no_model_type":  # config.json without a model_type: read_model_config's ValueError
        llm.mkdir()
        (llm / "config.json").write_text('{"hidden_size": 8}\n')
    json_path = tmp_path / "out" / "bench.json"
    argv: List[str] = ["--smoke", "--device", "cpu", "--llm", str(llm), "--json", str(json_path)]
    with pytest.raises(SystemExit) as exited:
        module.main(argv)
    assert exited.value.code == 2
    error = capsys.readouterr().err
    assert f"error: --llm {llm}" in error, error
    assert not json_path.exists()


def test_check_llm_option_lets_a_model_directory_and_the_default_pass(tmp_path: Path) -> None:
    parser = argparse.ArgumentParser()
    common.check_llm_option(parser, None)
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text('{"model_type": "bert"}\n')
    common.check_llm_option(parser, str(model))


def test_run_all_does_not_count_a_script_that_wrote_no_json_as_ok(tmp_path: Path) -> None:
    """A script that exited 0 without writing its JSON was reported ``ok``, and the README was rebuilt from the
    earlier run's JSON (or without the benchmark) as if it were this run's."""
    (tmp_path / "silent.py").write_text("print('[silent] ratio=1 (mode=quick, device=cpu)')\n")
    (tmp_path / "writes.py").write_text(
        "import sys\nopen(sys.argv[sys.argv.index('--json') + 1], 'w').write('{}')\n")
    result = run_all.run_one("silent", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)
    assert result["status"] == f"failed (exit 0 but {tmp_path / 'silent.json'} not written)"
    (tmp_path / "silent.json").write_text('{"earlier": 1}\n')  # an earlier run's figures stay as they are
    result = run_all.run_one("silent", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)
    assert result["status"].startswith("failed (exit 0 but")
    assert run_all.run_one("writes", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)["status"] == "ok"
    # written again over an earlier JSON: ok too
    assert run_all.run_one("writes", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)["status"] == "ok"


def test_a_benchmark_on_the_common_helpers_records_the_device_it_ran_on_not_auto(tmp_path: Path) -> None:
    """``parse_args`` then ``result_payload``, the module's own example, recorded ``"device": "auto"``, which
    ``run_all`` then showed as a README section of its own (Device `auto`)."""
    args = common.parse_args("mine", "My benchmark.", ["--smoke", "--json", str(tmp_path / "mine.json")])
    payload = common.result_payload(args, {"ratio": 1.0})
    assert payload["device"] == common.resolve_device("auto") and payload["device"] in ("cpu", "cuda")
