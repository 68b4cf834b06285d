"""The table driver's helpers: backbone overrides, validation picks, gains, reuse of identical runs."""

import json
import math
import os
import shutil

import pytest

from experiments.common import (
    SYNTHETIC_ROWS,
    _same_experiment,
    base_config_path,
    markdown_table,
    mean_std,
    model_overrides,
    prepared_schema,
    tune_on_validation,
    relative_gain,
    run_variant,
    summarize,
)
from recsys_llm.train.config import load_config, save_config


def _result(valid_auc, test_auc):
    return {"valid": {"auc": valid_auc}, "test": {"auc": test_auc, "logloss": 0.5}}


def _recording_run(valid, test):
    """``run(setting, seed)`` over fixed validation / test AUCs, logging its calls."""
    calls = []

    def run(setting, seed):
        calls.append((setting, seed))
        return _result(valid[setting][seed], test[setting][seed])

    return run, calls


# "a" is best on seed 0's validation, "b" on the mean over seeds; test AUCs point the other way
VALID = {"a": {0: 0.75, 1: 0.70, 2: 0.70}, "b": {0: 0.74, 1: 0.73, 2: 0.73}}
TEST = {"a": {0: 0.90, 1: 0.90, 2: 0.90}, "b": {0: 0.60, 1: 0.60, 2: 0.60}}


def test_tune_on_all_seeds_picks_the_best_mean_validation_auc():
    run, calls = _recording_run(VALID, TEST)
    best, results, valid_auc = tune_on_validation(["a", "b"], [0, 1, 2], run, "all-seeds")
    assert best == "b"
    assert [r["valid"]["auc"] for r in results] == [0.74, 0.73, 0.73]
    assert valid_auc == pytest.approx({"a": 0.7166667, "b": 0.7333333})
    assert sorted(calls) == [(s, seed) for s in ("a", "b") for seed in (0, 1, 2)]  # each run once


def test_tune_on_first_seed_runs_only_the_pick_on_the_other_seeds():
    run, calls = _recording_run(VALID, TEST)
    best, results, valid_auc = tune_on_validation(["a", "b"], [0, 1, 2], run, "first-seed")
    assert best == "a"
    assert [r["valid"]["auc"] for r in results] == [0.75, 0.70, 0.70]
    assert valid_auc == {"a": 0.75, "b": 0.74}
    assert calls == [("a", 0), ("b", 0), ("a", 1), ("a", 2)]


def test_tune_on_validation_rejects_bad_arguments():
    run, _ = _recording_run(VALID, TEST)
    with pytest.raises(ValueError, match="tune_on"):
        tune_on_validation(["a"], [0], run, "test-set")
    with pytest.raises(ValueError, match="no settings"):
        tune_on_validation([], [0], run, "all-seeds")
    with pytest.raises(ValueError, match="no seeds"):
        tune_on_validation(["a"], [], run, "all-seeds")


def test_a_tie_in_validation_auc_picks_the_first_setting_of_the_grid():
    run, _ = _recording_run({"a": {0: 0.7}, "b": {0: 0.7}, "c": {0: 0.7}}, {s: {0: 0.5} for s in "abc"})
    assert tune_on_validation(["b", "c", "a"], [0], run, "all-seeds")[0] == "b"


def test_a_setting_without_validation_auc_ranks_last_and_reports_none():
    run, _ = _recording_run({"a": {0: None, 1: 0.9}, "b": {0: 0.6, 1: 0.6}}, TEST)
    best, _, valid_auc = tune_on_validation(["a", "b"], [0, 1], run, "all-seeds")
    assert best == "b" and valid_auc == {"a": None, "b": 0.6}


def test_relative_gain_of_summarized_means():
    table = summarize({"plain": [_result(0.7, 0.80), _result(0.7, 0.80)], "x": [_result(0.7, 0.84)]})
    assert relative_gain(table, "x", "plain") == pytest.approx(0.05)


def test_synthetic_model_overrides_give_the_ml100k_architecture():
    config = load_config(base_config_path("synthetic", "dcnv2"), model_overrides("synthetic", "dcnv2"))
    reference = load_config(base_config_path("ml100k", "dcnv2"))
    assert config.model == reference.model
    assert model_overrides("ml100k", "dcnv2") == []


def test_identical_finished_run_is_recognised(tmp_path):
    config = load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={tmp_path / 'a'}"])
    other = tmp_path / "b"
    os.makedirs(other)
    save_config(load_config(base_config_path("ml100k", "fm"), [f"train.run_dir={other}"]), str(other / "config.yaml"))
    assert not _same_experiment(config, str(other))  # not finished yet
    (other / "results.json").write_text(json.dumps(_result(0.7, 0.7)))
    assert _same_experiment(config, str(other))
    changed = load_config(base_config_path("ml100k", "fm"), ["train.seed=1", f"train.run_dir={tmp_path / 'a'}"])
    assert not _same_experiment(changed, str(other))


def test_a_finished_run_of_other_settings_is_not_reused(tmp_path):
    """A table rerun with other settings into the same --out must not take the old results."""
    run_dir = tmp_path / "fm" / "fre_fre0.5" / "seed0"
    os.makedirs(run_dir)
    saved = ["llactr.vectors_path=fields.safetensors", "llactr.fre_field_reduction=sum"]
    save_config(load_config(base_config_path("ml100k", "fm"), saved + [f"train.run_dir={run_dir}"]),
                str(run_dir / "config.yaml"))
    (run_dir / "results.json").write_text(json.dumps(_result(0.7, 0.7)))
    assert run_variant(base_config_path("ml100k", "fm"), saved, str(run_dir)) == _result(0.7, 0.7)
    with pytest.raises(SystemExit, match=r"fre_fre0.5/seed0: holds a finished run of other settings "
                                         r"\(llactr.fre_field_reduction: 'sum' -> 'mean'\)"):
        run_variant(base_config_path("ml100k", "fm"), saved[:1] + ["llactr.fre_field_reduction=mean"], str(run_dir))


def test_a_done_llm_step_is_skipped_only_for_the_command_that_did_it(tmp_path, capsys):
    """A rerun with other LLM settings into the same --out must not take the old step's output."""
    from experiments.common import run_cli_step

    out = str(tmp_path / "data")
    command = ["prepare", "synthetic", "--out", out, "--rows", "300", "--quiet"]
    run_cli_step(command, os.path.join(out, "schema.json"))
    run_cli_step(command, os.path.join(out, "schema.json"))
    assert "[skip] prepare synthetic" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"schema.json: done by `recsys-llm prepare synthetic .* --rows 300 --quiet`, "
                                         r"not by `recsys-llm prepare synthetic .* --rows 400 --quiet`"):
        run_cli_step(command[:-2] + ["400", "--quiet"], os.path.join(out, "schema.json"))


def test_tables_go_to_tables_out_and_runs_stay_under_out(tmp_path):
    from experiments.common import experiment_args, tables_dir, write_outputs

    parser = experiment_args("test", "results")
    first = parser.parse_args(["--out", str(tmp_path / "all")])
    second = parser.parse_args(["--out", str(tmp_path / "all"), "--tables-out", str(tmp_path / "all" / "pick")])
    write_outputs(tables_dir(first), "table", {"pick": "all-seeds"}, "all")
    write_outputs(tables_dir(second), "table", {"pick": "first-seed"}, "first")
    assert (tmp_path / "all" / "table.md").read_text() == "all\n"  # not overwritten by the second pick
    assert (tmp_path / "all" / "pick" / "table.md").read_text() == "first\n"


def _finished_run_on(data_dir: str, run_dir: str) -> None:
    """A finished run's records (config, plugins.json with the data fingerprints, results) on ``data_dir``'s data."""
    from recsys_llm.data.schema import DatasetSchema
    from recsys_llm.train.run_records import (
        DATA_FINGERPRINTS_KEY, PLUGINS_FILE, SCHEMA_FINGERPRINT_KEY, data_fingerprints,
    )

    config = load_config(base_config_path("synthetic", "deepfm"), [f"data.schema={data_dir}", f"train.run_dir={run_dir}"])
    schema = DatasetSchema.load(os.path.join(data_dir, "schema.json"))
    os.makedirs(run_dir)
    save_config(config, os.path.join(run_dir, "config.yaml"))
    with open(os.path.join(run_dir, PLUGINS_FILE), "w", encoding="utf-8") as handle:
        json.dump({SCHEMA_FINGERPRINT_KEY: schema.fingerprint(),
                   DATA_FINGERPRINTS_KEY: data_fingerprints(config, schema)}, handle)
    with open(os.path.join(run_dir, "results.json"), "w", encoding="utf-8") as handle:
        json.dump(_result(0.7, 0.7), handle)


def test_a_finished_run_on_other_data_is_neither_taken_nor_reused(tmp_path):
    """Data prepared again in the same directory (same fields and sizes, other rows: the config is
    identical) must not let a table report the old data's results."""
    from recsys_llm.data.synthetic import generate_synthetic

    data = str(tmp_path / "data")
    generate_synthetic(data, 300, seed=0)
    run_dir, other = str(tmp_path / "runs" / "plain" / "seed0"), str(tmp_path / "backbones" / "seed0")
    _finished_run_on(data, run_dir)
    _finished_run_on(data, other)
    config = base_config_path("synthetic", "deepfm")
    assert run_variant(config, [f"data.schema={data}"], run_dir) == _result(0.7, 0.7)  # same data: taken
    new_dir = str(tmp_path / "runs" / "plain" / "seed0_again")
    assert _same_experiment(load_config(config, [f"data.schema={data}", f"train.run_dir={new_dir}"]), other)

    import shutil
    shutil.rmtree(data)
    generate_synthetic(data, 300, seed=1)  # the same schema, other rows
    with pytest.raises(SystemExit, match=r"plain/seed0: holds a finished run of other settings \(the data of "
                                         r"split\(s\) \['train', 'valid', 'test'\]"):
        run_variant(config, [f"data.schema={data}"], run_dir)
    assert not _same_experiment(load_config(config, [f"data.schema={data}", f"train.run_dir={new_dir}"]), other)


def test_an_unknown_backbone_is_refused_before_anything_runs(capsys):
    """A typo in ``--backbones`` used to fail only when its turn came, after the LLM steps and the
    runs of every backbone before it."""
    from experiments.common import BACKBONES, experiment_args

    parser = experiment_args("test", "results")
    assert parser.parse_args(["--backbones", "fm", "dcnv2"]).backbones == ["fm", "dcnv2"]
    with pytest.raises(SystemExit):
        parser.parse_args(["--backbones", "deepfm", "dcn"])
    assert "--backbones: invalid choice: 'dcn'" in capsys.readouterr().err
    assert all(os.path.isfile(base_config_path("ml100k", backbone)) for backbone in BACKBONES)


def test_a_seed_given_twice_is_refused(capsys):
    """``--seeds 0 0 1`` used to reuse seed 0's run as a second sample: mean and std over three "seeds"
    of two runs (seed 0 weighted twice, the std understated)."""
    from experiments.common import experiment_args

    parser = experiment_args("test", "results")
    assert parser.parse_args(["--seeds", "2", "0"]).seeds == [2, 0]
    with pytest.raises(SystemExit):
        parser.parse_args(["--seeds", "0", "0", "1"])
    assert "--seeds: seed(s) [0] given more than once" in capsys.readouterr().err


def test_a_finished_llactr_run_on_other_field_vectors_is_not_taken(tmp_path):
    """The vector file written again at the same path by another SSFT adapter (the LLM steps' outputs
    removed to redo them) left every config identical: a rerun took the old runs' results for the new
    vectors."""
    import dataclasses

    import torch

    from recsys_llm.semantics.store import VectorProvenance, save_vectors
    from recsys_llm.train.run_records import PLUGINS_FILE

    vectors = str(tmp_path / "fields.safetensors")
    tuned = VectorProvenance(model_id="minilm+ssft:aaa", model_hash="h-aaa", pooling="mean", template="t")
    save_vectors(vectors, torch.ones(2, 4), ["user_id", "item_id"], tuned)
    run_dir = tmp_path / "fm" / "fre_fre0.5" / "seed0"
    os.makedirs(run_dir)
    overrides = [f"llactr.vectors_path={vectors}", "llactr.use_fre=true", "llactr.lambda_fre=0.5"]
    save_config(load_config(base_config_path("ml100k", "fm"), overrides + [f"train.run_dir={run_dir}"]),
                str(run_dir / "config.yaml"))
    (run_dir / PLUGINS_FILE).write_text(json.dumps({"llactr": {"vectors": vectors, **tuned.to_dict()}}))
    (run_dir / "results.json").write_text(json.dumps(_result(0.7, 0.7)))
    assert run_variant(base_config_path("ml100k", "fm"), overrides, str(run_dir)) == _result(0.7, 0.7)
    save_vectors(vectors, torch.ones(2, 4), ["user_id", "item_id"], tuned)  # the same vectors written again: taken
    assert run_variant(base_config_path("ml100k", "fm"), overrides, str(run_dir)) == _result(0.7, 0.7)

    retuned = dataclasses.replace(tuned, model_id="minilm+ssft:bbb", model_hash="h-bbb")
    save_vectors(vectors, torch.zeros(2, 4), ["user_id", "item_id"], retuned)
    with pytest.raises(SystemExit, match=r"fre_fre0.5/seed0: holds a finished run of other settings \(the field "
                                         r"vectors in .*fields.safetensors: model_hash 'h-aaa' -> 'h-bbb', "
                                         r"model_id 'minilm\+ssft:aaa' -> 'minilm\+ssft:bbb'\)"):
        run_variant(base_config_path("ml100k", "fm"), overrides, str(run_dir))


def test_a_finished_elec_run_on_entity_vectors_exported_again_by_another_model_is_not_taken(tmp_path):
    """As the LLaCTR case above, for the entity tables of an ELEC gain network: the export directory
    written again from a re-adapted LLM left every config identical."""
    import numpy as np
    import pyarrow as pa
    import torch

    from recsys_llm.modules.elec import ELECConfig, entity_vectors_record
    from recsys_llm.semantics.vector_export import VectorExport, VectorExportConfig
    from recsys_llm.train.run_records import PLUGINS_FILE

    items = str(tmp_path / "items")

    def export(model: str) -> None:
        shutil.rmtree(items, ignore_errors=True)
        VectorExport(items, {"model": model, "granularity": "entity"}, VectorExportConfig(chunk_rows=8)).run(
            pa.array(np.arange(10), pa.int64()), lambda a, b: [str(i) for i in range(a, b)],
            lambda texts: torch.ones(len(texts), 4), progress=False)

    export("adapted-a")
    overrides = ["elec.task=gain", "elec.vector_dim=4", "elec.vector_source=entity_table", "elec.entity_field=item_id",
                 f"elec.entity_vectors={items}"]
    run_dir = tmp_path / "deepfm" / "gain" / "seed0"
    os.makedirs(run_dir)
    config = load_config(base_config_path("ml100k", "deepfm"), overrides + [f"train.run_dir={run_dir}"])
    save_config(config, str(run_dir / "config.yaml"))
    record = entity_vectors_record(ELECConfig.from_dict(config.elec, source="elec"))
    (run_dir / PLUGINS_FILE).write_text(json.dumps({"elec": {"entity_vectors": record}}))
    (run_dir / "results.json").write_text(json.dumps(_result(0.7, 0.7)))
    assert run_variant(base_config_path("ml100k", "deepfm"), overrides, str(run_dir)) == _result(0.7, 0.7)
    export("adapted-b")
    with pytest.raises(SystemExit, match=r"gain/seed0: holds a finished run of other settings \(the entity vectors: "
                                         r"item_id \(model: 'adapted-a' -> 'adapted-b'\)\)"):
        run_variant(base_config_path("ml100k", "deepfm"), overrides, str(run_dir))


@pytest.mark.parametrize("flag", ["--sample-rows", "--max-length"])
def test_elec_refuses_a_zero_count_instead_of_taking_its_default(tmp_path, flag, capsys):
    from experiments import elec

    with pytest.raises(SystemExit) as exited:
        elec.main(["--out", str(tmp_path), flag, "0"])
    assert exited.value.code == 2
    assert f"{flag}: expected an integer >= 1, got '0'" in capsys.readouterr().err
    assert not os.listdir(tmp_path)  # refused before any work


def test_synthetic_data_of_another_size_is_refused_not_reported_as_the_tables_data(tmp_path):
    from recsys_llm.data.synthetic import generate_synthetic

    generate_synthetic(str(tmp_path / "synthetic"), 2_000, seed=0)
    with pytest.raises(SystemExit, match=f"synthetic data of 2000 rows; the tables are for {SYNTHETIC_ROWS} rows"):
        prepared_schema("synthetic", str(tmp_path), raw="unused")


def test_a_table_cell_over_fewer_seeds_says_how_many():
    """A seed whose metric was missing dropped out of the mean silently, under a header saying three seeds."""
    runs = {"plain": [_result(0.7, 0.70), _result(0.7, 0.72), _result(0.7, 0.74)],
            "fre": [_result(0.7, 0.71), {"valid": {"auc": 0.7}, "test": {"auc": None, "logloss": 0.5}},
                    _result(0.7, 0.73)]}
    lines = markdown_table(summarize(runs), ["auc", "logloss"], baseline="plain").splitlines()
    assert lines[2] == "| plain | 0.7200 ± 0.0200 | 0.5000 ± 0.0000 | +0.00% |"
    assert lines[3].startswith("| fre | 0.7200 ± 0.0141 (n=2) | 0.5000 ± 0.0000 | ")


def test_each_trained_run_prints_one_line(tmp_path, capsys):
    """The drivers train with the progress bar off: a table of hundreds of runs printed nothing until its pick."""
    from recsys_llm.data.synthetic import generate_synthetic

    data = str(tmp_path / "data")
    generate_synthetic(data, 300, seed=0)
    run_dir = str(tmp_path / "run")
    overrides = [f"data.schema={data}", "train.epochs=1", "data.batch_size=64", "model.mlp_layer_sizes=[8]"]
    results = run_variant(base_config_path("synthetic", "deepfm"), overrides, run_dir)
    line = next(line for line in capsys.readouterr().out.splitlines() if line.startswith("[run] "))
    assert line.startswith(f"[run] {run_dir}: valid AUC {results['valid']['auc']:.4f}, test AUC "
                           f"{results['test']['auc']:.4f} (")


def test_ml100k_prepared_with_a_history_is_never_prepared_again_with_the_defaults(tmp_path):
    """Data of an earlier version (no item catalogue) is prepared again with the default conversion: over a
    `--history-length` data set that lost its history field and the tables trained on it their meaning."""
    from recsys_llm.data.schema import DatasetSchema, FieldSpec

    out = tmp_path / "ml-100k"
    out.mkdir()
    DatasetSchema("ml-100k", [FieldSpec("user_id", "sparse", 10), FieldSpec("history", "sequence", 20, max_length=5)],
                  splits={"train": "train.parquet"}, root=str(out)).save(str(out / "schema.json"))
    before = (out / "schema.json").read_bytes()
    with pytest.raises(SystemExit, match="ML-100K prepared with a history field .* --history-length N"):
        prepared_schema("ml100k", str(tmp_path), raw="unused")
    assert (out / "schema.json").read_bytes() == before


def test_ml100k_prepared_with_a_history_is_refused_unless_the_table_reads_it(tmp_path):
    """`prepare movielens --out data/ml-100k --history-length 10` (the docs' example) was read by every table
    without a word: each model read one more field, and the table said nothing of it."""
    from recsys_llm.data.schema import DatasetSchema, FieldSpec
    from recsys_llm.data.synthetic import ITEM_CATALOG

    out = tmp_path / "ml-100k"
    out.mkdir()
    DatasetSchema("ml-100k", [FieldSpec("user_id", "sparse", 10), FieldSpec("history", "sequence", 20, max_length=5)],
                  splits={"train": "train.parquet"}, root=str(out)).save(str(out / "schema.json"))
    (out / ITEM_CATALOG).write_bytes(b"")
    with pytest.raises(SystemExit, match=r"ml-100k: ML-100K prepared with a history field .*these tables are of the "
                                         r"default conversion.*or name history in elec's --row-fields"):
        prepared_schema("ml100k", str(tmp_path), raw="unused")
    assert prepared_schema("ml100k", str(tmp_path), raw="unused", with_history=True) == str(out / "schema.json")


def test_mean_std_is_the_mean_and_sample_std_of_the_seeds_with_a_number():
    """A seed whose metric is missing (None) or undefined (NaN: one class in the split) is left out and counted."""
    out = mean_std([0.70, 0.71, 0.75, float("nan"), None])
    assert out["n"] == 3
    assert out["mean"] == pytest.approx(0.72)  # the mean, not the median (0.71)
    assert out["std"] == pytest.approx(((0.02 ** 2 + 0.01 ** 2 + 0.03 ** 2) / 2) ** 0.5)  # n - 1
    nothing = mean_std([float("nan"), None])
    assert nothing["n"] == 0 and math.isnan(nothing["mean"]) and math.isnan(nothing["std"])


def test_a_table_row_shows_its_gain_over_the_baseline():
    table = summarize({"plain": [_result(0.7, 0.80)], "better": [_result(0.7, 0.84)], "worse": [_result(0.7, 0.76)]})
    lines = markdown_table(table, ["auc"], baseline="plain").splitlines()
    # one seed each: the mean alone (a "± 0.0000" would claim a spread that was not measured)
    assert lines[3:] == ["| better | 0.8400 | +5.00% |", "| worse | 0.7600 | -5.00% |"]


def test_summarize_reports_test_metrics_cold_items_too_and_the_validation_auc_apart():
    def result(valid, test, cold):
        return {"valid": {"auc": valid, "logloss": 0.4, "cold/auc": 0.5, "cold/logloss": 0.9},
                "test": {"auc": test, "logloss": 0.5, "cold/auc": cold, "cold/logloss": 0.7}}

    table = summarize({"x": [result(0.70, 0.80, 0.60), result(0.72, 0.82, 0.64)], "y": [_result(0.7, 0.8)]})
    row = table["x"]
    assert (row["auc"]["mean"], row["logloss"]["mean"]) == (pytest.approx(0.81), 0.5)
    assert (row["cold/auc"]["mean"], row["cold/logloss"]["mean"]) == (pytest.approx(0.62), 0.7)
    assert row["valid_auc"]["mean"] == pytest.approx(0.71) and row["valid_auc"]["n"] == 2
    assert set(table["y"]) == {"auc", "logloss", "valid_auc"}  # no cold-item metrics, no cold columns


def test_the_auc_plot_holds_every_error_bar_and_says_where_its_axis_starts(tmp_path, monkeypatch):
    """Its bars started at the lowest mean - 0.01 without a word (gains of 0.002 AUC looked large) and clipped
    error bars wider than 0.01; it is drawn on a Figure of its own (pyplot's state is left alone)."""
    from matplotlib.figure import Figure

    from experiments import common

    drawn = {}

    def keep(figure, path, **kwargs):
        drawn["axes"] = figure.axes[0]

    monkeypatch.setattr(common, "save_figure_atomically", keep)
    tables = {"fm": {"plain": {"auc": {"mean": 0.70, "std": 0.03}}, "+both": {"auc": {"mean": 0.71, "std": 0.0}}},
              "dcnv2": {"plain": {"auc": {"mean": 0.75, "std": 0.02}}, "+both": {"auc": {"mean": 0.752, "std": 0.001}}}}
    common.plot_auc(str(tmp_path / "auc.png"), tables, "title")
    low, high = drawn["axes"].get_ylim()
    assert low <= 0.67 and high >= 0.77
    assert f"axis from {low:.3f}" in drawn["axes"].get_ylabel()
    assert isinstance(drawn["axes"].figure, Figure)
    tables["fm"]["plain"]["auc"] = {"mean": math.nan, "std": math.nan}  # every seed of a variant failed
    common.plot_auc(str(tmp_path / "auc.png"), tables, "title")
    assert all(math.isfinite(limit) for limit in drawn["axes"].get_ylim())


def test_a_gain_over_an_undefined_auc_is_shown_as_unknown_not_nan():
    """A baseline whose AUC no seed defined (a one-class test split) has a NaN mean: the Δ AUC column read "+nan%"."""
    table = {"plain": {"auc": mean_std([None, float("nan")])}, "better": {"auc": mean_std([0.84])},
             "undefined": {"auc": mean_std([None])}}
    lines = markdown_table(table, ["auc"], baseline="plain").splitlines()
    assert lines[3] == "| better | 0.8400 | – |"
    table["plain"] = {"auc": mean_std([0.80])}
    lines = markdown_table(table, ["auc"], baseline="plain").splitlines()
    assert lines[3] == "| better | 0.8400 | +5.00% |"
    assert lines[4].endswith("| – |")


def test_a_tables_json_records_the_machine_it_was_computed_on(tmp_path):
    """Float results differ between CPUs (docs/results.md: +0.49% on an Intel Xeon, +0.59% on an AMD EPYC, same code
    and seeds); the tables' JSONs named the commit only, so which CPU made a committed table was in no file."""
    import json

    from experiments.common import write_outputs

    write_outputs(str(tmp_path), "table", {"table": {}}, "md")
    machine = json.loads((tmp_path / "table.json").read_text())["machine"]
    assert machine["cpu_model"] and machine["cpu_count"] >= 1 and machine["usable_cores"] >= 1
    assert machine["python"] and machine["platform"]
    assert machine["versions"]["torch"] and machine["versions"]["torchrec"]
