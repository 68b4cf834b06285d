"""Benchmarks: every script runs in its smallest mode and writes finite figures; shared helpers.

No timing assertions: the figures depend on the machine and its load.
"""

import itertools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common, peers, run_all  # noqa: E402

# Top-level keys that the issues require of a benchmark's JSON (others: at least one figure).
REQUIRED_KEYS = {
    "train_throughput": ["ratio_vs_torchrec_loop", "ratio_parquet_vs_memory"],
    "llactr": ["train_ratio_vs_backbone", "serve_ratio_vs_backbone", "llm_cost_ratio_instance_vs_field"],
    "elec": ["student_serve_ratio_vs_backbone", "student_speedup_vs_gain_online_llm", "kd_train_ratio_vs_backbone",
             "gain_entity_tables_serve_ratio_vs_backbone"],
    "peers": ["train_speedup_vs_deepctr_torch", "auc_diff_vs_deepctr_torch"],
    "table_dtype": ["ratio_fp16_vs_fp32_tables", "table_bytes_ratio_fp16_vs_fp32", "serve_ratio_int8_vs_fp32_tables",
                    "artifact_bytes_ratio_int8_vs_fp32"],
    "mixed_precision": ["ratio_bf16_vs_fp32", "auc_difference_bf16_vs_fp32", "runner_ratio_bf16_vs_fp32",
                        "serve_ratio_bf16_vs_fp32"],
}
MACHINE_KEYS = ["cpu_model", "usable_cores", "torch_threads", "gpu", "versions"]


_SMOKE_RUNS = {}


def require_peer_venv() -> None:
    """Skips (naming the fix) when the DeepCTR-Torch venv of ``benchmarks/peers.py`` is absent.

    The same lookup as the script (``$PEER_VENV`` or ``.venv-peers``): once
    ``bash scripts/peer_venv.sh`` has made it, the peer tests run.
    """
    try:
        peers.peer_python(None)
    except peers.PeerMissing as error:
        pytest.skip(str(error))


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
    if name == "peers":
        require_peer_venv()
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
    """The ratios are built from per-round samples/s of the contenders (the reader alone and the two
    reader variants among them)."""
    process, json_path, _ = run_smoke("train_throughput", tmp_path_factory)
    assert process.returncode == 0, process.stderr[-3000:]
    payload = json.loads(json_path.read_text())
    rounds = payload["details"]["samples_per_second_rounds"]
    variants = ("parquet_deep_prefetch", "parquet_worker_process")
    assert set(rounds) == {"torchrec_loop", "project_memory", "project_parquet", "parquet_reader_alone",
                           *(f"project_{variant}" for variant in variants)}
    assert all(len(v) == payload["details"]["sizes"]["repeats"] and min(v) > 0 for v in rounds.values())
    expected = max(rounds["project_memory"]) / max(rounds["torchrec_loop"])
    assert payload["ratio_vs_torchrec_loop"] == pytest.approx(expected)
    for variant in variants:
        expected = max(rounds[f"project_{variant}"]) / max(rounds["project_memory"])
        assert payload[f"ratio_{variant}_vs_memory"] == pytest.approx(expected), variant
    # the project's loop pipelined every sharded module (otherwise it silently runs slower)
    assert payload["details"]["project_pipelined_modules"] == payload["details"]["project_sharded_modules"]


def _smoke_payload(name: str, tmp_path_factory: pytest.TempPathFactory) -> dict:
    process, json_path, _ = run_smoke(name, tmp_path_factory)
    assert process.returncode == 0, process.stdout[-3000:] + process.stderr[-3000:]
    return json.loads(json_path.read_text())


@pytest.mark.parametrize("mode", ["quick", "full"])
def test_llactr_data_holds_the_default_s_of_every_id_field(mode: str, tmp_path: Path) -> None:
    """The field side is scaled to SSFT at the default S counted on the mode's data: that data must
    give user_id and item_id their S training values, as the instance side's 1M rows would."""
    from benchmarks import llactr
    from recsys_llm.data.synthetic import generate_synthetic
    from recsys_llm.semantics.ssft import SSFTConfig
    from recsys_llm.semantics.ssft_examples import build_examples
    from recsys_llm.semantics.templates import select_fields

    schema = generate_synthetic(str(tmp_path / "data"), llactr.SIZES[mode].data_rows, seed=0)
    default = SSFTConfig()
    fields = select_fields(schema, default.include_fields_without_description)
    train, _ = build_examples(schema, fields, default)
    for field in ("user_id", "item_id"):
        label = [f.name for f in fields].index(field)
        assert sum(1 for e in train if e.label == label) == default.samples_train, field


@pytest.mark.slow
def test_llactr_ratios_come_from_rounds_and_scaled_costs(tmp_path_factory: pytest.TempPathFactory) -> None:
    payload = _smoke_payload("llactr", tmp_path_factory)
    details = payload["details"]
    for name, result in details["per_backbone"].items():
        rounds = result["train_samples_per_second_rounds"]
        assert result["train_ratio"] == pytest.approx(max(rounds["llactr"]) / max(rounds["plain"])), name
        expected = [a / b for a, b in zip(rounds["llactr"], rounds["plain"])]
        assert result["train_ratio_median_of_rounds"] == pytest.approx(common.median(expected)), name
        for phase, key in (("serve", "serve_samples_per_second_rounds"),
                           ("serve_ratio_dmp_eval", "serve_dmp_eval_samples_per_second_rounds")):
            served = result[key]
            ratio = "serve_ratio" if phase == "serve" else phase
            assert result[ratio] == pytest.approx(max(served["llactr"]) / max(served["plain"])), (name, phase)
            per_round = [a / b for a, b in zip(served["llactr"], served["plain"])]
            assert result[f"{ratio}_rounds"] == pytest.approx(per_round), (name, phase)
        serve = result["serve_samples_per_second_rounds"]
        expected = [a / b for a, b in zip(serve["llactr"], serve["plain"])]
        assert result["serve_ratio_median_of_rounds"] == pytest.approx(common.median(expected)), name
        assert result["pipelined_all_sharded_modules"], name
        assert set(result["serve_path"].values()) <= {"export", "eager"}
        if result["serve_path"]["llactr"] == "export":  # FIE folded into FM-family pairwise terms
            assert result["serve_folded_terms"] == (["fie"] if name in ("fm", "fwfm", "deepfm") else []), name
    backbones = details["per_backbone"].values()
    for figure, ratio in (("train_ratio_vs_backbone", "train_ratio"), ("serve_ratio_vs_backbone", "serve_ratio")):
        assert payload[figure] == pytest.approx(common.geometric_mean([r[ratio] for r in backbones])), figure
    field, instance = details["field"], details["instance"]
    assert field["ssft_run_scale_to_default_s"] >= 1.0
    phases = field["phase_seconds"]  # set-up and encode unscaled, the SSFT run scaled to the default S
    assert field["seconds_at_default_s"] == pytest.approx(
        phases["ssft_setup"] + field["ssft_run_scale_to_default_s"] * phases["ssft_run"] + phases["field_encode"])
    assert field["seconds_at_default_s"] >= field["seconds"] > 0
    timed = instance["phase_seconds"]  # loading once, unscaled; rendering, tuning and encoding per row
    assert instance["setup_seconds"] == timed["load"]
    assert instance["per_row_seconds"] == pytest.approx(
        (timed["render"] + timed["tune"] + timed["encode"]) / instance["timed_rows"])
    rows, sample = details["instance_scaled_to_rows"], details["instance_with_tuning_sample"]
    assert sample["tuning_rows"] < rows  # tuned on a sample, every row rendered and encoded
    assert sample["seconds"] == pytest.approx(instance["setup_seconds"] + (
        timed["tune"] * sample["tuning_rows"] + (timed["render"] + timed["encode"]) * rows) / instance["timed_rows"])
    assert sample["llm_cost_ratio_instance_vs_field"] == pytest.approx(sample["seconds"] / field["seconds_at_default_s"])
    assert details["crossover_rows"] == pytest.approx(
        (field["seconds_at_default_s"] - instance["setup_seconds"]) / instance["per_row_seconds"])
    scaled = instance["setup_seconds"] + instance["per_row_seconds"] * details["instance_scaled_to_rows"]
    assert payload["llm_cost_ratio_instance_vs_field"] == pytest.approx(scaled / field["seconds_at_default_s"])


def test_the_ssft_run_scales_by_the_larger_growth_of_train_and_held_out_prompts() -> None:
    """Train prompts pass once per epoch; held-out ones are scored before tuning and after each epoch."""
    from benchmarks import llactr

    assert llactr.ssft_run_scale((80, 20, 1), (4919, 500, 2)) == pytest.approx(4919 * 2 / 80)  # train grows more
    assert llactr.ssft_run_scale((80, 2, 1), (160, 100, 2)) == pytest.approx(100 * 3 / (2 * 2))  # held-out grows more
    assert llactr.ssft_run_scale((80, 0, 1), (160, 100, 2)) == pytest.approx(4.0)  # none held out: train alone
    assert llactr.ssft_run_scale((80, 20, 2), (40, 10, 2)) == 1.0  # never below the timed run


def test_llactr_batch_size_and_backbones_override_the_mode(capsys: pytest.CaptureFixture, tmp_path) -> None:
    from benchmarks import llactr

    argv = ["--quick", "--batch-size", "4096", "--backbones", "fm"]
    sizes = llactr.mode_sizes(common.parse_args("llactr", None, argv, parser=llactr.llactr_parser()))
    assert (sizes.batch_size, sizes.backbones) == (4096, ("fm",))
    assert sizes.measured_steps == llactr.SIZES["quick"].measured_steps
    with pytest.raises(SystemExit) as exit_info:
        llactr.main(["--smoke", "--batch-size", "0"])
    assert exit_info.value.code == 2
    assert "--batch-size must be an integer >= 1, got 0" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:  # at start, not after the LLM work, when the batches cannot be cut
        llactr.main(["--smoke", "--batch-size", "2048", "--json", str(tmp_path / "unused.json")])
    assert exit_info.value.code == 2
    assert "--batch-size 2048: the smoke mode's 2,400 train rows make fewer than its 2 batches; at most 1200" in (
        capsys.readouterr().err)


@pytest.mark.slow
def test_elec_student_is_served_exported_and_ratios_come_from_rounds(tmp_path_factory: pytest.TempPathFactory) -> None:
    payload = _smoke_payload("elec", tmp_path_factory)
    for name, result in payload["details"]["per_backbone"].items():
        serve = result["serve_samples_per_second_rounds"]
        assert set(serve) == {"student", "plain", "gain_entity_tables", "student_request", "gain_online_llm"}
        entity = max(serve["gain_entity_tables"]) / max(serve["plain"])
        assert result["gain_entity_tables_serve_ratio"] == pytest.approx(entity), name
        assert result["serve_path"]["gain_entity_tables"] == "export"
        assert result["student_serve_ratio"] == pytest.approx(max(serve["student"]) / max(serve["plain"])), name
        online = max(serve["student_request"]) / max(serve["gain_online_llm"])
        assert result["student_speedup_vs_gain_online_llm"] == pytest.approx(online), name
        train = result["train_samples_per_second_rounds"]
        assert result["kd_train_ratio"] == pytest.approx(max(train["joint_kd"]) / max(train["plain"])), name
        kd = [k / p for k, p in zip(train["joint_kd"], train["plain"])]
        assert result["median_of_round_ratios"]["kd_train"] == pytest.approx(common.median(kd)), name
        for figure, numerator, denominator, rounds in (
                ("student_serve", "student", "plain", serve), ("kd_train", "joint_kd", "plain", train),
                ("student_speedup", "student_request", "gain_online_llm", serve)):
            per_round = [a / b for a, b in zip(rounds[numerator], rounds[denominator])]
            assert result[f"{figure}_rounds" if figure == "student_speedup" else f"{figure}_ratio_rounds"] == (
                pytest.approx(per_round)), (name, figure)
            assert result["median_of_round_ratios"][figure] == pytest.approx(common.median(per_round)), (name, figure)
        assert result["serve_path"]["student"] == "export" and result["serve_path"]["plain"] == "export"
        assert all(result["pipelined_all_sharded_modules"].values()), name
        # the student is the plain architecture; the gain network adds the vector injection
        assert result["parameters"]["student"] == result["parameters"]["plain"] < result["parameters"]["gain"]
    backbones = payload["details"]["per_backbone"].values()
    for figure, ratio in (("student_serve_ratio_vs_backbone", "student_serve_ratio"),
                          ("student_speedup_vs_gain_online_llm", "student_speedup_vs_gain_online_llm"),
                          ("kd_train_ratio_vs_backbone", "kd_train_ratio"),
                          ("gain_entity_tables_serve_ratio_vs_backbone", "gain_entity_tables_serve_ratio")):
        assert payload[figure] == pytest.approx(common.geometric_mean([r[ratio] for r in backbones])), figure


@pytest.mark.slow
def test_mixed_precision_compares_rounds_of_both_precisions_and_two_trained_runs(
        tmp_path_factory: pytest.TempPathFactory) -> None:
    """The training and serving ratios come from interleaved rounds of the two loops and of the two exported
    programs; the AUC difference and the runner's ratio from two finished runs of the packaged DeepFM config, one
    per precision."""
    from benchmarks import mixed_precision

    payload = _smoke_payload("mixed_precision", tmp_path_factory)
    rounds = payload["details"]["samples_per_second_rounds"]
    assert set(rounds) == {"fp32", "bf16"}
    assert all(len(v) == mixed_precision.SIZES["smoke"].repeats and min(v) > 0 for v in rounds.values())
    assert payload["ratio_bf16_vs_fp32"] == pytest.approx(max(rounds["bf16"]) / max(rounds["fp32"]))
    accuracy = payload["details"]["accuracy"]
    assert set(accuracy) == {"fp32", "bf16"} and all(0.5 < run["test_auc"] < 1 for run in accuracy.values())
    assert payload["auc_difference_bf16_vs_fp32"] == pytest.approx(accuracy["bf16"]["test_auc"]
                                                                   - accuracy["fp32"]["test_auc"])
    serve = payload["details"]["serve"]
    served = serve["samples_per_second_rounds"]
    assert set(served) == {"fp32", "bf16"} and all(min(v) > 0 for v in served.values())
    assert payload["serve_ratio_bf16_vs_fp32"] == pytest.approx(max(served["bf16"]) / max(served["fp32"]))
    assert 0 < serve["logit_abs_difference"]["max"] < 0.5  # the bf16 program computes, a little off float32
    assert serve["logit_abs_difference"]["fp32_abs_mean"] > 0
    # the two DeepFM runs trained in their own precisions (same seed: two float32 runs would match exactly)
    assert accuracy["bf16"]["test_logloss"] != accuracy["fp32"]["test_logloss"]


@pytest.mark.slow
def test_table_dtype_serves_int8_int4_and_fp32_exports_of_the_trained_model(tmp_path_factory: pytest.TempPathFactory
                                                                            ) -> None:
    """The serving figures come from interleaved rounds of the three exported artifacts; the INT8 one is smaller on
    disk and in memory than the FP32 one, the INT4 one smaller on disk than the INT8 one, and their logits stay
    close to the FP32 one's."""
    from benchmarks import table_dtype

    payload = _smoke_payload("table_dtype", tmp_path_factory)
    serve = payload["details"]["serve"]
    rounds = serve["samples_per_second_rounds"]
    assert set(rounds) == {"fp32_tables", "int8_tables", "int4_tables"}
    assert all(len(v) == table_dtype.SERVE_SIZES["smoke"].repeats and min(v) > 0 for v in rounds.values())
    assert payload["serve_ratio_int8_vs_fp32_tables"] == pytest.approx(max(rounds["int8_tables"])
                                                                      / max(rounds["fp32_tables"]))
    assert serve["ratio_rounds"] == pytest.approx([a / b for a, b in zip(rounds["int8_tables"],
                                                                          rounds["fp32_tables"])])
    assert payload["artifact_bytes_ratio_int8_vs_fp32"] == pytest.approx(
        serve["artifact_bytes"]["int8"] / serve["artifact_bytes"]["fp32"])
    assert 0 < payload["artifact_bytes_ratio_int8_vs_fp32"] < 0.6  # D bytes + 4 per row vs 4 * D
    assert 0 < serve["table_bytes_ratio_int8_vs_fp32"] < 1
    assert payload["serve_ratio_int4_vs_fp32_tables"] == pytest.approx(max(rounds["int4_tables"])
                                                                      / max(rounds["fp32_tables"]))
    assert serve["ratio_rounds_int4"] == pytest.approx([a / b for a, b in zip(rounds["int4_tables"],
                                                                               rounds["fp32_tables"])])
    assert payload["artifact_bytes_ratio_int4_vs_fp32"] == pytest.approx(
        serve["artifact_bytes"]["int4"] / serve["artifact_bytes"]["fp32"])
    # D / 2 bytes + 4 per row vs 4 * D (the dense part's float32 weights are in both)
    assert 0 < payload["artifact_bytes_ratio_int4_vs_fp32"] < payload["artifact_bytes_ratio_int8_vs_fp32"]
    assert 0 < serve["table_bytes_ratio_int4_vs_fp32"] <= serve["table_bytes_ratio_int8_vs_fp32"]
    difference = serve["logit_abs_difference"]
    sizes = payload["details"]["sizes"]
    assert difference["rows"] == sizes["batch_size"] * sizes["memory_batches"]  # every request batch, every row
    assert 0 <= difference["mean"] <= difference["max"] < 0.1 and difference["max"] > 0  # quantized: not exact
    int4 = serve["logit_abs_difference_int4"]
    assert int4["rows"] == difference["rows"] and 0 <= int4["mean"] <= int4["max"] < 0.5 and int4["max"] > 0
    assert difference["fp32_abs_mean"] == int4["fp32_abs_mean"] > 0
    assert [row["phase"] for row in payload["table"]] == ["train", "train", "serve", "serve", "serve"]


@pytest.mark.slow
def test_peers_speedup_is_the_ratio_of_best_epochs(tmp_path_factory: pytest.TempPathFactory) -> None:
    require_peer_venv()
    payload = _smoke_payload("peers", tmp_path_factory)
    details = payload["details"]
    assert set(details["by_tables"]) == {"small", "large"} and details["headline_tables"] == peers.HEADLINE_SCALE
    for name, result in details["by_tables"].items():
        rounds = result["samples_per_second_rounds"]
        assert result["train_speedup_vs_deepctr_fit"] == pytest.approx(max(rounds["project"]) / max(rounds["deepctr_fit"]))
        aucs = {contender: m["auc"] for contender, m in result["test_metrics"].items()}
        assert all(0.0 <= auc <= 1.0 for auc in aucs.values())
        assert result["auc_diff_vs_deepctr_fit"] == pytest.approx(aucs["project"] - aucs["deepctr_fit"])
        assert result["peer"]["deepctr_torch"] and result["project_pipelined_all_sharded_modules"]
        assert result["rows"]["train"] == result["peer"]["train_rows"]
        assert details["train_speedup_vs_deepctr_torch_by_tables"][name] == result["train_speedup_vs_deepctr_fit"]
    small, large = (details["by_tables"][n]["table_rows"]["user_id"] for n in ("small", "large"))
    assert large == peers.SIZES["smoke"].tables[1].num_users + 1 > small
    headline = details["by_tables"][peers.HEADLINE_SCALE]
    assert payload["train_speedup_vs_deepctr_torch"] == headline["train_speedup_vs_deepctr_fit"]
    assert payload["auc_diff_vs_deepctr_torch"] == headline["auc_diff_vs_deepctr_fit"]


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a host without a GPU")
def test_a_failing_benchmark_leaves_its_error_where_torchrun_and_torchx_status_read_it(tmp_path: Path) -> None:
    """Under the torchx bench component the scripts' failures reached only the log: torchrun's summary said
    'To enable traceback see ...' and torchx status 'structured_error_msg: <NONE>'."""
    error_file = tmp_path / "error.json"
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "train_throughput.py"), "--smoke", "--device", "cuda",
         "--json", str(tmp_path / "t.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "TORCHELASTIC_ERROR_FILE": str(error_file)},
    )
    assert process.returncode == 2 and not (tmp_path / "t.json").exists()
    # one line, no traceback, in the log and in the error file
    assert "Traceback" not in process.stderr
    assert process.stderr.splitlines()[-1].startswith(
        "benchmarks/train_throughput.py: error: --device cuda: no GPU is visible")
    recorded = json.loads(error_file.read_text())["message"]
    assert recorded == process.stderr.splitlines()[-1]


def test_peers_without_peer_venv_stops_and_says_how_to_make_it(tmp_path: Path) -> None:
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "peers.py"), "--smoke",
         "--json", str(tmp_path / "p.json"), "--plot", str(tmp_path / "p.png")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        env={**os.environ, "PEER_VENV": str(tmp_path / "missing")},
    )
    assert process.returncode == peers.MISSING_PEER_EXIT
    assert "scripts/peer_venv.sh" in process.stderr and str(tmp_path / "missing" / "bin" / "python") in process.stderr
    assert not (tmp_path / "p.json").exists()


def test_a_peer_python_given_that_does_not_exist_is_a_usage_error_not_a_skip(tmp_path: Path) -> None:
    """An interpreter path typed with --peer-python exited 75, which run_all reports as skipped like a peer venv not
    installed: a typo read as "no peer"."""
    process = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "peers.py"), "--smoke", "--peer-python",
         str(tmp_path / "missing" / "python"), "--json", str(tmp_path / "p.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert process.returncode == 2
    assert f"error: --peer-python {tmp_path / 'missing' / 'python'}: no such file" in process.stderr
    assert not (tmp_path / "p.json").exists()


def test_peers_export_split_pads_sequences_and_keeps_row_order(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow.parquet as pq

    from recsys_llm.data.synthetic import generate_synthetic

    schema = generate_synthetic(str(tmp_path / "data"), 200, seed=3)
    fields = peers.field_specs(schema)
    rows = peers.export_split(schema, "train", fields, str(tmp_path / "train.npz"))
    table = pq.read_table(schema.split_path("train"))
    assert rows == table.num_rows
    with np.load(tmp_path / "train.npz", allow_pickle=False) as data:
        for field in fields:
            got, column = data[field["name"]], table.column(field["name"]).to_pylist()
            if field["kind"] == "sequence":
                assert got.shape == (rows, field["max_length"])
                assert [list(r[r > 0]) for r in got] == [list(v or []) for v in column]
            else:
                np.testing.assert_allclose(got, np.asarray(column, dtype=got.dtype))
        np.testing.assert_array_equal(data["label"], table.column(schema.label).to_numpy().astype(np.float32))


class TestCommon:
    def test_parser_modes_and_default_paths(self) -> None:
        args = common.parse_args("x", "doc", ["--quick"])
        assert args.mode == "quick" and args.json.name == "x.json" and args.plot.name == "x.png"
        trial = common.parse_args("x", "doc", ["--json", "/tmp/trial/x1.json"])
        assert str(trial.plot) == "/tmp/trial/x1.png"  # a trial run leaves the committed plot alone
        assert common.parse_args("x", "doc", []).mode == "full"
        with pytest.raises(SystemExit):
            common.parse_args("x", "doc", ["--quick", "--smoke"])

    def test_result_paths_that_cannot_be_files_are_refused_before_the_run(
            self, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args("x", "doc", ["--json", str(tmp_path)])
        assert exit_info.value.code == 2
        assert f"--json {tmp_path}: is a directory; --json takes the file to write, e.g. {tmp_path}/x.json" in (
            capsys.readouterr().err)
        (tmp_path / "plots").mkdir()
        with pytest.raises(SystemExit):
            common.parse_args("x", "doc", ["--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "plots")])
        assert f"--plot {tmp_path / 'plots'}: is a directory" in capsys.readouterr().err
        (tmp_path / "afile").write_text("")
        with pytest.raises(SystemExit):
            common.parse_args("x", "doc", ["--json", str(tmp_path / "afile" / "sub" / "x.json")])
        assert f"{tmp_path / 'afile'} is a file, not a directory" in capsys.readouterr().err
        fresh = common.parse_args("x", "doc", ["--json", str(tmp_path / "new" / "dir" / "x.json")])
        assert fresh.plot == tmp_path / "new" / "dir" / "x.png"  # missing folders are made when writing
        with pytest.raises(SystemExit):  # the plot (the JSON's name with .png) would overwrite the JSON
            common.parse_args("x", "doc", ["--json", str(tmp_path / "x.png")])
        assert "--json and --plot name one file" in capsys.readouterr().err

    @pytest.mark.parametrize("option", ["--json", "--plot"])
    def test_result_paths_in_an_unwritable_folder_are_refused_before_the_run(
            self, option: str, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        # /proc takes no new files, not even from root (a chmod'ed folder would not stop root)
        path = "/proc/bench_results/x.json" if option == "--json" else "/proc/bench_results/x.png"
        argv = ["--json", str(tmp_path / "x.json"), option, path]
        with pytest.raises(SystemExit) as exit_info:
            common.parse_args("x", "doc", argv if option == "--plot" else argv[2:])
        assert exit_info.value.code == 2
        assert f"{option} {path}: cannot write in /proc" in capsys.readouterr().err

    def test_a_plot_format_matplotlib_cannot_write_is_refused_before_the_run(
            self, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
        with pytest.raises(SystemExit) as exit_info:  # a typo of .png would fail only once the figures are in
            common.parse_args("x", "doc", ["--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / "x.pgn")])
        assert exit_info.value.code == 2
        assert f"--plot {tmp_path / 'x.pgn'}: matplotlib cannot write '.pgn' files" in capsys.readouterr().err
        for name in ("x.svg", "x.PDF", "x"):  # matplotlib's formats, any case; no suffix: PNG
            assert common.parse_args("x", "doc", ["--json", str(tmp_path / "x.json"), "--plot", str(tmp_path / name)])

    def test_interleaved_repeats_rotate_order(self) -> None:
        calls = []
        contenders = {name: (lambda n=name: calls.append(n) or float(len(calls))) for name in "abc"}
        results = common.interleaved_repeats(contenders, repeats=6)
        rounds = [calls[i:i + 3] for i in range(0, 18, 3)]
        assert rounds == [list("abc"), list("bca"), list("cab"), list("cba"), list("acb"), list("bac")]
        for name in "abc":  # every contender runs once in each position per three rounds, both ways
            assert sorted(r.index(name) for r in rounds) == [0, 0, 1, 1, 2, 2]
        assert results["a"] == [1.0, 6.0, 8.0, 12.0, 13.0, 17.0]
        two = []
        common.interleaved_repeats({n: (lambda n=n: two.append(n) or 0.0) for n in "ab"}, repeats=4)
        assert two == list("ab" "ba" "ba" "ab")

    @pytest.mark.parametrize("count", [4, 5])
    def test_interleaved_repeats_vary_who_runs_before_whom(self, count: int) -> None:
        """With 5 contenders (ELEC's serving) the rotation put each one after the same other one in every round
        it did not open (the student always after the online LLM)."""
        calls = []
        names = "abcde"[:count]
        common.interleaved_repeats({n: (lambda n=n: calls.append(n) or 0.0) for n in names}, repeats=count)
        rounds = [calls[i:i + count] for i in range(0, count * count, count)]
        for name in names:
            assert sorted(r.index(name) for r in rounds) == list(range(count))  # each position once
        pairs = [(r[i], r[i + 1]) for r in rounds for i in range(count - 1)]
        if count % 2 == 0:  # a Williams design: each ordered pair adjacent exactly once
            assert sorted(pairs) == sorted((a, b) for a in names for b in names if a != b)
        else:
            assert all(len({a for a, b in pairs if b == name}) >= 2 for name in names)

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

    def test_a_plot_that_fails_midway_leaves_the_earlier_png(self, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
        from matplotlib.figure import Figure

        path = tmp_path / "x.png"
        common.bar_chart(path, {"a": 1.0}, ylabel="samples/s")
        earlier = path.read_bytes()
        assert earlier[:4] == b"\x89PNG"

        def fails_midway(self: Figure, fname: object, **kwargs: object) -> None:
            if hasattr(fname, "write"):
                fname.write(b"\x89PNG, cut short")
            else:
                Path(fname).write_bytes(b"\x89PNG, cut short")
            raise OSError("No space left on device")

        monkeypatch.setattr(Figure, "savefig", fails_midway)
        with pytest.raises(OSError, match="No space left"):
            common.bar_chart(path, {"a": 2.0}, ylabel="samples/s")
        assert path.read_bytes() == earlier
        assert [p.name for p in tmp_path.iterdir()] == ["x.png"]

    def test_machine_info_names_cpu_and_versions(self) -> None:
        info = common.machine_info()
        assert info["usable_cores"] >= 1 and info["cpu_model"]
        assert info["versions"]["torch"] and info["versions"]["torchrec"]

    def test_ratio_helpers(self) -> None:
        assert common.per_round_ratios([2.0, 9.0], [1.0, 3.0]) == [2.0, 3.0]
        with pytest.raises(ValueError, match="rounds differ"):
            common.per_round_ratios([1.0], [1.0, 2.0])
        assert common.geometric_mean([1.0, 4.0]) == pytest.approx(2.0)
        # a round slowed by background load does not drag the ratio down
        assert common.best_of_rounds_ratio([9.0, 3.0], [10.0, 10.0]) == pytest.approx(0.9)
        with pytest.raises(ValueError, match="at least one round"):
            common.best_of_rounds_ratio([], [1.0])

    def test_rounds_under_unequal_load_are_flagged(self, capsys: pytest.CaptureFixture) -> None:
        common.best_of_rounds_ratio([10.0, 9.8, 10.1], [20.0, 19.5, 20.2])
        assert capsys.readouterr().err == ""
        # one quiet round of the plain contender among busy ones: the ratio is not to be trusted
        assert common.best_of_rounds_ratio([14.5, 13.0, 12.0], [138.0, 9.6, 11.1]) == pytest.approx(14.5 / 138.0)
        assert "the machine was busy" in capsys.readouterr().err
        # the warning starts where the best round is more than 1.5 times the median one
        common.best_of_rounds_ratio([10.0, 10.0, 15.0], [10.0, 10.0, 10.0])  # exactly 1.5 times: not yet
        assert capsys.readouterr().err == ""
        common.best_of_rounds_ratio([10.0, 10.0, 10.0], [10.0, 10.0, 16.0])
        assert "the machine was busy" in capsys.readouterr().err
        with pytest.raises(ValueError, match="positive values"):
            common.geometric_mean([1.0, 0.0])

    def test_a_busy_contender_in_several_ratios_is_warned_about_once(self, capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
        """elec's plain backbone divides three ratios: its busy rounds printed the same warning twice."""
        monkeypatch.setattr(common, "_WARNED_BUSY", set())
        plain = [138.0, 9.6, 11.1]
        common.best_of_rounds_ratio([14.5, 13.0, 12.0], plain)
        common.best_of_rounds_ratio([15.0, 14.0, 13.5], plain)
        assert capsys.readouterr().err.count("the machine was busy") == 1
        common.best_of_rounds_ratio([14.0, 13.0, 12.0], [100.0, 9.0, 10.0])  # other rounds: warned about
        assert "the machine was busy" in capsys.readouterr().err

    def test_cycling_step_and_stopwatch(self) -> None:
        step = common.cycling_step(lambda x: x * 10, [1, 2])
        assert [step() for _ in range(3)] == [10, 20, 10]
        watch = common.Stopwatch()
        with watch("a"):
            pass
        with watch("a"):
            pass
        assert set(watch.seconds) == {"a"} and watch.total >= 0.0

    def test_all_finite(self) -> None:
        assert common.all_finite({"a": 1.0, "b": 2}, ["a", "b"])
        assert not common.all_finite({"a": math.nan}, ["a"])
        assert not common.all_finite({"a": 1.0}, ["a", "missing"])

    def test_the_median_of_rounds_is_the_middle_round(self) -> None:
        """A round slowed by background load moves a mean, not the median the tables report."""
        assert common.median([3.0, 1.0, 10.0]) == 3.0
        assert common.median([4.0, 1.0, 2.0, 10.0]) == 3.0  # even count: the mean of the two middle rounds
        with pytest.raises(ValueError, match="empty"):
            common.median([])

    def test_the_bars_of_rounds_are_their_medians_spanning_min_to_max(self) -> None:
        bars, spans = common.phase_round_bars({"serve": {"int8_tables": [3.0, 1.0, 10.0], "fp32_tables": [2.0]}})
        assert bars == {"serve int8": 3.0, "serve fp32": 2.0}
        assert spans == {"serve int8": (1.0, 10.0), "serve fp32": (2.0, 2.0)}

    def test_timed_steps_are_seconds_per_measured_step_and_samples_per_second_scale_by_the_batch(self) -> None:
        import time

        # the warmup steps are neither timed nor counted: one measured step of at least 10 ms
        assert common.timed_steps(lambda: time.sleep(0.01), warmup_steps=9, measured_steps=1) >= 0.01
        # a step of 1000 rows taking 10 ms (more under load) is at most 100k samples/s, far above 1000
        speed = common.samples_per_second(lambda: time.sleep(0.01), batch_size=1000, warmup_steps=1,
                                          measured_steps=2)()
        assert 1000.0 < speed <= 100_000.0

    def test_the_payload_and_summary_hold_every_figure_as_a_float_and_no_flag(self, capsys) -> None:
        import argparse

        import torch

        args = argparse.Namespace(name="demo", mode="smoke", device="cpu")
        payload = common.result_payload(args, {"speedup": torch.tensor(2.5), "rows": 3})
        assert payload["speedup"] == 2.5 and type(payload["speedup"]) is float and type(payload["rows"]) is float
        assert payload["flush_denormal"] is False
        line = common.print_summary("demo", {**payload, "flush_denormal": True})
        assert line == "[demo] speedup=2.5 rows=3 (mode=smoke: tiny sizes, a smoke test, not a measurement, device=cpu)"
        assert capsys.readouterr().out == line + "\n"


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

    def test_a_readme_write_that_fails_leaves_the_readme_whole(self, tmp_path: Path) -> None:
        """The README holds hand-written prose: a write that fails midway (here: a character UTF-8
        cannot encode, a lone surrogate from a JSON string) must not leave it empty."""
        results = tmp_path / "results"
        machine = {"cpu_model": "Test CPU", "usable_cores": 2, "torch_threads": 2, "gpu": None, "versions": {}}
        common.write_json(results / "demo.json", {"speedup": 3.25, "benchmark": "demo", "mode": "quick",
                                                  "table": [{"llm": "model_\udce9"}], "machine": machine})
        readme = tmp_path / "README.md"
        before = f"# Bench\n\nhand-written prose\n\n{run_all.BEGIN}\nold\n{run_all.END}\n"
        readme.write_text(before)
        with pytest.raises(UnicodeEncodeError):
            run_all.update_readme(readme, results)
        assert readme.read_text() == before

    def test_results_elsewhere_leave_the_committed_readme_alone(self, tmp_path: Path) -> None:
        committed = run_all.BENCH_DIR / "README.md"
        before = committed.read_bytes()
        assert run_all.main(["--readme-only", "--results-dir", str(tmp_path / "results")]) == 0
        assert committed.read_bytes() == before
        readme = tmp_path / "README.md"
        assert run_all.main(["--readme-only", "--results-dir", str(tmp_path / "results"), "--readme", str(readme)]) == 0
        assert "No results yet" in readme.read_text()

    def test_the_torchx_components_trial_results_are_not_published(self, tmp_path: Path) -> None:
        """torchx_components/bench.py writes results/torchx/ (git-ignored); --readme-only published them beside the
        committed figures."""
        (tmp_path / "torchx").mkdir()
        (tmp_path / "torchx" / "bad.json").write_text("{not json")  # not read at all
        assert "No results yet" in run_all.render_results(tmp_path, tmp_path)

    def test_unreadable_result_json_names_the_file(self, tmp_path: Path) -> None:
        (tmp_path / "bad.json").write_text("{not json")
        with pytest.raises(ValueError, match="bad.json"):
            run_all.render_results(tmp_path, tmp_path)


# ---- benchmarks/scaling.py ----------------------------------------------------------------------------
@pytest.mark.slow
def test_scaling_reports_three_curves_with_flat_shards(tmp_path_factory: pytest.TempPathFactory) -> None:
    from benchmarks import scaling

    payload = _smoke_payload("scaling", tmp_path_factory)
    sizes, details = scaling.SIZES["smoke"], payload["details"]
    rows = details["rows"]
    speeds = {int(k): v for k, v in rows["samples_per_second"].items()}
    rss = {int(k): v for k, v in rows["peak_rss_mb"].items()}
    assert sorted(speeds) == list(sizes.rows) and min(speeds.values()) > 0
    assert payload["rows_throughput_ratio_largest_vs_smallest"] == pytest.approx(
        speeds[sizes.rows[-1]] / speeds[sizes.rows[0]])
    assert payload["rows_rss_ratio_largest_vs_smallest"] == pytest.approx(rss[sizes.rows[-1]] / rss[sizes.rows[0]])
    # the largest data set is several part files of the smallest size, read by one streaming reader
    assert {int(k): v for k, v in rows["files"].items()} == {n: n // sizes.rows[0] for n in sizes.rows}
    tables = details["tables"]
    keys = [str(n) for n in sizes.table_rows]
    assert list(payload["tables_rss_per_rank_mb"]) == keys and min(payload["tables_rss_per_rank_mb"].values()) > 0
    for rank in tables["ranks"]:
        for key in keys:
            share = rank["sizes"][key]
            assert share["rows_total"] == sizes.num_tables * int(key)
            assert share["sharding_types"] == [sizes.table_sharding]
            assert share["samples_per_second"] > 0
    # each of the 2 ranks holds half of the table rows, and together they hold all of them
    assert all(f == pytest.approx(0.5, abs=0.1) for f in payload["tables_shard_fraction_per_rank"].values())
    for key in keys:
        assert sum(r["sizes"][key]["rows_on_rank"] for r in tables["ranks"]) == sizes.num_tables * int(key)
    batch = payload["batch_samples_per_second"]
    assert set(batch) == {"train", "inference"}
    for curve in batch.values():
        assert [int(k) for k in curve] == list(sizes.batch_sizes) and min(curve.values()) > 0
    assert details["batch"]["inference_path"] in {"export", "eager"}
    by_method = payload["batch_samples_per_second_by_method"]
    assert set(by_method["train"]) == set(scaling.BATCH_METHODS)
    assert set(by_method["inference"]) == set(scaling.SERVED_METHODS)
    assert by_method["train"]["plain"] == batch["train"]
    assert all(min(curve.values()) > 0 for part in by_method.values() for curve in part.values())
    assert set(details["batch"]["inference_paths"].values()) <= {"export", "eager"}
    assert set(payload["batch_samples_per_second_by_backbone"]) == set(sizes.batch_backbones)
    assert {row["curve"].split(" ")[0] for row in payload["table"]} == {"rows", "tables", "batch"}


def test_scaling_parts_are_prefixes_and_peak_rss_resets(tmp_path: Path) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from benchmarks import scaling

    source = tmp_path / "train.parquet"
    pq.write_table(pa.table({"row_id": pa.array(np.arange(1000), pa.int64())}), source, row_group_size=128)
    paths = scaling.split_into_parts(str(source), str(tmp_path / "parts"), 300, 3)
    ids = [pq.read_table(p).column("row_id").to_numpy() for p in paths]
    assert [len(part) for part in ids] == [300, 300, 300]
    assert np.array_equal(np.concatenate(ids), np.arange(900))
    with pytest.raises(RuntimeError, match="train.parquet: 1000 rows, need 1200"):
        scaling.split_into_parts(str(source), str(tmp_path / "more"), 400, 3)

    if not scaling.PeakRss().resettable:
        pytest.skip("this kernel does not allow resetting the peak RSS (/proc/self/clear_refs)")
    # in a fresh process, as scaling.py measures: in this one, heap that earlier tests freed
    # can hold the block without a change of RSS
    check = """
import numpy as np
from benchmarks.scaling import PeakRss
meter = PeakRss()
meter.reset()
before = meter.peak_mb()
block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
assert meter.peak_mb() >= before + 48, (before, meter.peak_mb())
del block
meter.reset()
assert meter.peak_mb() < before + 48, (before, meter.peak_mb())
"""
    root = str(Path(__file__).resolve().parents[1])
    result = subprocess.run([sys.executable, "-c", check], cwd=root, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_run_all_timeout_stops_the_processes_a_benchmark_started(tmp_path: Path) -> None:
    """``--timeout`` killed the script alone: the ranks or peer process it had started ran on, slowing down
    every benchmark measured after it."""
    import time

    child_pid = tmp_path / "child.pid"
    (tmp_path / "slow.py").write_text(
        "import subprocess, sys, time\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
        f"open({str(child_pid)!r}, 'w').write(str(child.pid))\n"
        "time.sleep(120)\n"
    )
    result = run_all.run_one("slow", "quick", "cpu", tmp_path, timeout_s=5, bench_dir=tmp_path)
    assert result["status"] == "timed out after 5 s"
    pid = int(child_pid.read_text())
    for _ in range(50):  # the kill is sent; the process may take a moment to go
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            break
        with open(f"/proc/{pid}/stat") as stat:
            if stat.read().split()[2] == "Z":  # killed, waiting for its parent (init) to reap it
                break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail(f"process {pid} started by the benchmark still runs after its timeout")


def test_run_all_reports_a_benchmark_whose_peer_is_missing_skipped_not_failed(tmp_path: Path, capfd) -> None:
    """`make bench` without the registry (no peer venv) ended in a make error, though every other result was
    written: peers.py exited 2, argparse's code, and run_all counted it failed."""
    (tmp_path / "needs_peer.py").write_text(f"import sys\nprint('make it: bash scripts/peer_venv.sh', file=sys.stderr)\n"
                                             f"sys.exit({peers.MISSING_PEER_EXIT})\n")
    (tmp_path / "broken.py").write_text("raise SystemExit(3)\n")
    assert run_all.run_one("needs_peer", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)["status"] == (
        run_all.SKIPPED)
    assert "bash scripts/peer_venv.sh" in capfd.readouterr().err
    assert run_all.run_one("broken", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)["status"] == (
        "failed (exit 3)")
    assert peers.MISSING_PEER_EXIT == run_all.SKIP_EXIT


def test_run_all_passes_a_benchmarks_progress_on_while_it_runs(tmp_path: Path, capfd) -> None:
    """run_all kept a script's output until it ended: minutes of silence per benchmark, its progress thrown away."""
    import threading
    import time

    go = tmp_path / "go"
    (tmp_path / "waits.py").write_text(
        "import os, sys, time\n"
        "print('measuring: 1/3', file=sys.stderr, flush=True)\n"
        f"deadline = time.time() + 30\nwhile not os.path.exists({str(go)!r}) and time.time() < deadline:\n"
        "    time.sleep(0.05)\n"
        "open(sys.argv[sys.argv.index('--json') + 1], 'w').write('{}')\n"
        "print('[waits] ratio=1 (mode=quick, device=cpu)')\n")
    result: dict = {}
    runner = threading.Thread(target=lambda: result.update(
        run_all.run_one("waits", "quick", "cpu", tmp_path, timeout_s=60, bench_dir=tmp_path)))
    runner.start()
    seen = ""
    for _ in range(400):
        seen += capfd.readouterr().err
        if "measuring: 1/3" in seen:
            break
        time.sleep(0.05)
    go.touch()
    runner.join()
    assert "measuring: 1/3" in seen  # before the script went on
    assert result["status"] == "ok" and "[waits] ratio=1 (mode=quick, device=cpu)" in capfd.readouterr().out


def test_run_all_ends_well_when_the_only_other_status_is_a_skip(tmp_path: Path, monkeypatch) -> None:
    statuses = {"a": "ok", "b": run_all.SKIPPED}
    monkeypatch.setattr(run_all, "discover", lambda *args, **kwargs: sorted(statuses))
    monkeypatch.setattr(run_all, "run_one", lambda name, *args, **kwargs: {"name": name, "status": statuses[name],
                                                                           "seconds": 0.0})
    argv = ["--smoke", "--results-dir", str(tmp_path), "--readme", str(tmp_path / "README.md")]
    assert run_all.main(argv) == 0
    statuses["a"] = "failed (exit 1)"
    assert run_all.main(argv) == 1


@pytest.mark.parametrize("name", ["train_throughput", "llactr", "elec", "table_dtype", "mixed_precision"])
def test_smoke_runs_take_at_least_two_interleaved_rounds(name: str) -> None:
    """What carries over between rounds (a stream a first round closed) shows only from the second one: with one
    round, the smoke tests passed while every later round of the real benchmark trained no step."""
    import importlib

    module = importlib.import_module(f"benchmarks.{name}")
    assert module.SIZES["smoke"].repeats >= 2
    if hasattr(module, "SERVE_SIZES"):  # table_dtype's serving rounds
        assert module.SERVE_SIZES["smoke"].repeats >= 2


def _project_loop_weights(dtype_name: str) -> dict:
    """The dense weights of the smoke DLRM_DCN after one measurement of ``ProjectLoop`` with that autocast dtype."""
    import torch

    from benchmarks import train_throughput
    from benchmarks.common import device_synchronize
    from recsys_llm.train.distributed import init_distributed

    sizes = train_throughput.SIZES["smoke"]
    device = init_distributed("cpu").device
    schema = train_throughput.make_schema(sizes)
    batches = train_throughput.make_batches(schema, sizes, seed=0)
    torch.manual_seed(0)
    model, optimizer = train_throughput.build_project_model(schema, sizes, device, train_throughput.LEARNING_RATES)
    loop = train_throughput.ProjectLoop(model, optimizer, device, itertools.cycle(batches), sizes,
                                        device_synchronize(device), autocast_dtype=getattr(torch, dtype_name, None))
    loop()
    return {name: p.detach().clone() for name, p in model.named_parameters() if "embedding_bags" not in name}


@pytest.mark.multiprocess
def test_project_loop_trains_under_its_autocast_dtype() -> None:
    """The benchmark's bf16 contender really trains under autocast: from the same start on the same batches, its
    weights end apart from the float32 one's (a loop that dropped the dtype measured float32 twice)."""
    import torch

    from tests.multiprocess import run_multiprocess

    (bf16,) = run_multiprocess(_project_loop_weights, world_size=1, dtype_name="bfloat16")
    (again,) = run_multiprocess(_project_loop_weights, world_size=1, dtype_name="bfloat16")
    (fp32,) = run_multiprocess(_project_loop_weights, world_size=1, dtype_name="none")
    assert all(torch.equal(bf16[name], again[name]) for name in bf16)  # the comparison is not noise
    assert any(not torch.equal(bf16[name], fp32[name]) for name in bf16)


def test_mixed_precision_serves_a_bf16_program_against_a_float32_one(tmp_path) -> None:
    from benchmarks import mixed_precision, table_dtype
    from recsys_llm.models.registry import SMOKE_CONFIGS, build_backbone
    from recsys_llm.models.task import CTRTask
    from tests.test_serving import CPU, SCHEMA, make_batch

    task = CTRTask(build_backbone(SMOKE_CONFIGS["deepfm"], SCHEMA, device=CPU)).eval()
    served, _ = table_dtype.export_and_load(task, None, make_batch(4, 100), str(tmp_path),
                                            mixed_precision.SERVE_VARIANTS)
    assert {name: model.mixed_precision for name, model in served.items()} == {"fp32": "fp32", "bf16": "bf16"}


def test_ratio_bars_name_a_dashed_goal_only_where_one_is_drawn() -> None:
    """mixed_precision's ratios have no goal: its panel's label promised a dashed goal line it did not draw."""
    from matplotlib.figure import Figure

    from benchmarks.common import ratio_bars

    for goals, label in (({}, "ratio (log scale)"), ({"train": 0.9}, "ratio (log scale; dashed: goal)")):
        axis = Figure().subplots()
        ratio_bars(axis, {"train": 0.8, "serve": 1.1}, goals, "ratios")
        assert axis.get_ylabel() == label and len(axis.collections) == len(goals)
        ticks = [tick.get_text() for tick in axis.get_xticklabels()]
        assert ticks == (["train", "serve"] if not goals else ["train\n(goal 0.9)", "serve"])
        if goals:  # the value above the goal's dash, not struck through by it
            (train_value,) = [text for text in axis.texts if text.get_text() == "0.8"]
            assert train_value.xy[1] == 0.9
        assert axis.margins()[1] == 0.15  # room above the tallest bar for its value
