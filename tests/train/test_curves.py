"""``curves``: the picture of a run's ``metrics.jsonl``."""

import json
import os

from recsys_llm.train.curves import CURVES_FILE, plot_training_curves, training_curves
from recsys_llm.train.run_records import read_metrics


def _write_metrics(run_dir: str, records) -> None:
    with open(os.path.join(run_dir, "metrics.jsonl"), "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record) + "\n")


RECORDS = [
    {"event": "started", "global_step": 0, "epoch": 0},
    {"event": "train", "global_step": 50, "epoch": 0, "loss": 0.69},
    {"event": "epoch", "global_step": 80, "epoch": 1, "mean_loss": 0.66},
    {"event": "valid", "global_step": 80, "epoch": 1, "auc": 0.61, "logloss": 0.64},
    {"event": "train", "global_step": 100, "epoch": 1, "loss": 0.9},  # the killed job's, after its checkpoint
    {"event": "resumed", "global_step": 80, "epoch": 1},
    {"event": "train", "global_step": 100, "epoch": 1, "loss": 0.62},
    {"event": "epoch", "global_step": 160, "epoch": 2, "mean_loss": 0.6},
    {"event": "valid", "global_step": 160, "epoch": 2, "auc": None},  # NaN is written as null
    {"event": "test", "global_step": 160, "auc": 0.63},
]


def test_the_curves_are_the_records_that_stand(tmp_path) -> None:
    _write_metrics(str(tmp_path), RECORDS)
    curves = training_curves(read_metrics(str(tmp_path)))
    assert curves == {"loss": ([50, 100], [0.69, 0.62]), "epoch loss": ([80, 160], [0.66, 0.6]),
                      "valid logloss": ([80], [0.64]), "valid auc": ([80], [0.61])}


def test_the_picture_is_a_png_in_the_run_dir_and_nothing_without_records(tmp_path) -> None:
    run_dir = str(tmp_path / "run")
    os.makedirs(run_dir)
    assert plot_training_curves(run_dir) is None and os.listdir(run_dir) == []
    _write_metrics(run_dir, RECORDS)
    path = plot_training_curves(run_dir)
    assert path == os.path.join(run_dir, CURVES_FILE)
    with open(path, "rb") as handle:
        assert handle.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(os.listdir(run_dir)) == ["metrics.jsonl", CURVES_FILE]  # no temp file left


def test_the_picture_leaves_the_callers_matplotlib_backend_alone(tmp_path) -> None:
    """run_training draws it in the caller's process (a notebook): no matplotlib.use, no pyplot figure."""
    import subprocess
    import sys

    _write_metrics(str(tmp_path), RECORDS)
    code = ("import matplotlib; matplotlib.use('svg'); import matplotlib.pyplot as plt; "
            "from recsys_llm.train.curves import plot_training_curves; "
            f"assert plot_training_curves({str(tmp_path)!r}); "
            "print(matplotlib.get_backend(), len(plt.get_fignums()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["svg", "0"]


def test_a_single_training_loss_record_is_drawn(tmp_path, monkeypatch) -> None:
    """A run of 50 to 99 steps logs one training loss: a line through one point drew nothing, though
    the legend named it."""
    from recsys_llm.train import curves

    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    _write_metrics(str(tmp_path), RECORDS[:4])
    assert plot_training_curves(str(tmp_path))
    (line,) = [line for line in drawn[0].axes[0].get_lines() if line.get_label().startswith("training loss")]
    assert list(line.get_xdata()) == [50] and line.get_marker() not in ("None", "", None)
    # the validation LogLoss beside it, a gap that opens showing overfitting
    (valid,) = [line for line in drawn[0].axes[0].get_lines() if line.get_label() == "validation LogLoss"]
    assert list(valid.get_xdata()) == [80] and list(valid.get_ydata()) == [0.64]


def test_the_best_validation_auc_and_the_last_test_auc_are_marked(tmp_path, monkeypatch) -> None:
    """The star marks the best validation AUC (the checkpoint the test AUC is of), and the test line is the
    last test record's: a run trained on for more epochs is tested again on its new best model."""
    from recsys_llm.train import curves

    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    records = [
        {"event": "valid", "global_step": 80, "epoch": 1, "auc": 0.61, "logloss": 0.64},
        {"event": "valid", "global_step": 160, "epoch": 2, "auc": 0.67, "logloss": 0.6},
        {"event": "valid", "global_step": 240, "epoch": 3, "auc": 0.65, "logloss": 0.62},
        {"event": "test", "global_step": 240, "auc": 0.63},
        {"event": "valid", "global_step": 320, "epoch": 4, "auc": 0.64, "logloss": 0.63},
        {"event": "test", "global_step": 320, "auc": 0.66},
    ]
    _write_metrics(str(tmp_path), records)
    assert plot_training_curves(str(tmp_path))
    auc_axis = drawn[0].axes[1]
    (best,) = [line for line in auc_axis.get_lines() if line.get_label().startswith("best")]
    assert list(best.get_xdata()) == [160] and list(best.get_ydata()) == [0.67]
    assert best.get_label() == "best 0.6700"
    (test,) = [line for line in auc_axis.get_lines() if line.get_label().startswith("test AUC")]
    assert list(test.get_ydata()) == [0.66, 0.66] and test.get_label() == "test AUC 0.6600 (best model)"


def test_a_200_epoch_run_keeps_its_loss_line_visible(tmp_path, monkeypatch) -> None:
    """200 epochs drew 200 epoch-loss dots and 200 validation squares at full size, which hid the 50-step
    training-loss line beneath them: markers are thinned to at most MAX_MARKERS a curve, the loss line drawn on top."""
    import recsys_llm.train.curves as curves

    records = [{"event": "started", "global_step": 0, "epoch": 0}]
    for epoch in range(200):
        step = (epoch + 1) * 100
        records += [{"event": "train", "global_step": step - 50, "epoch": epoch, "loss": 0.5},
                    {"event": "train", "global_step": step, "epoch": epoch, "loss": 0.4},
                    {"event": "epoch", "global_step": step, "epoch": epoch, "mean_loss": 0.45},
                    {"event": "valid", "global_step": step, "epoch": epoch + 1, "auc": 0.7, "logloss": 0.5}]
    _write_metrics(str(tmp_path), records)
    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    plot_training_curves(str(tmp_path))
    loss_axis, auc_axis = drawn[0].axes
    lines = {line.get_label(): line for axis in (loss_axis, auc_axis) for line in axis.get_lines()}
    for label in ("epoch mean loss", "validation LogLoss", "validation AUC"):
        every = lines[label].get_markevery()
        shown = len(lines[label].get_xdata()[::every]) if isinstance(every, int) else len(lines[label].get_xdata())
        assert shown <= curves.MAX_MARKERS, (label, shown)
        assert len(lines[label].get_xdata()) == 200  # the line goes through every point
    loss_line = lines["training loss, mean of 50 steps (BCE + loss terms)"]
    assert loss_line.get_zorder() > lines["epoch mean loss"].get_zorder()


def test_a_short_run_marks_every_point(tmp_path, monkeypatch) -> None:
    import recsys_llm.train.curves as curves

    _write_metrics(str(tmp_path), RECORDS)
    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    plot_training_curves(str(tmp_path))
    epoch_line = next(line for line in drawn[0].axes[0].get_lines() if line.get_label() == "epoch mean loss")
    assert epoch_line.get_markevery() in (None, 1) and epoch_line.get_linestyle() == "None"


def _drawn(tmp_path, monkeypatch, records):
    from recsys_llm.train import curves

    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    _write_metrics(str(tmp_path), records)
    assert plot_training_curves(str(tmp_path))
    return drawn[0].axes


def test_a_nan_auc_is_left_out_not_starred_as_best(tmp_path, monkeypatch) -> None:
    """A NaN (a file written before NaN became null) drew no star and labelled it "best nan"."""
    records = [{"event": "valid", "global_step": 50, "auc": float("nan"), "logloss": float("nan")},
               {"event": "valid", "global_step": 100, "auc": 0.6, "logloss": 0.64},
               {"event": "train", "global_step": 100, "loss": float("inf")}]
    assert training_curves(records) == {"valid logloss": ([100], [0.64]), "valid auc": ([100], [0.6])}
    _, auc_axis = _drawn(tmp_path, monkeypatch, records)
    (best,) = [line for line in auc_axis.get_lines() if line.get_label().startswith("best")]
    assert best.get_label() == "best 0.6000" and list(best.get_xdata()) == [100]
    low, high = auc_axis.get_xlim()  # the NaN at step 50, marked, is inside the panel (it was drawn outside it,
    assert low < 50 and high > 100  # beside a one-step axis, and tight_layout gave up: no legend in the picture)


def test_a_run_without_validation_says_so_and_tests_its_final_model(tmp_path, monkeypatch) -> None:
    """data.valid_split=: the AUC panel spanned 0 to 1 on its step axis, empty but for a test line labelled
    "(best model)", though no best model was chosen (best_step -1: the final model is tested)."""
    records = [{"event": "train", "global_step": 50, "loss": 0.69}, {"event": "train", "global_step": 100, "loss": 0.6},
               {"event": "test", "global_step": 100, "auc": 0.58}]
    loss_axis, auc_axis = _drawn(tmp_path, monkeypatch, records)
    (test,) = [line for line in auc_axis.get_lines() if line.get_label().startswith("test AUC")]
    assert test.get_label() == "test AUC 0.5800 (final model)"
    assert any("no validation AUC" in text.get_text() for text in auc_axis.texts)
    assert auc_axis.get_xlim() == loss_axis.get_xlim() and auc_axis.get_xlim()[1] > 90  # the run's steps
    low, high = auc_axis.get_ylim()
    assert low < 0.58 < high


def test_step_ticks_are_whole_and_legends_sit_beneath_the_panels(tmp_path, monkeypatch) -> None:
    """train.max_steps=1 drew ticks 0.96 .. 1.04; legends inside the panels hid the last validation points."""
    records = [{"event": "epoch", "global_step": 1, "mean_loss": 0.9},
               {"event": "valid", "global_step": 1, "auc": 0.55, "logloss": 0.79},
               {"event": "test", "global_step": 1, "auc": 0.5}]
    axes = _drawn(tmp_path, monkeypatch, records)
    for axis in axes:
        low, high = axis.get_xlim()
        ticks = [tick for tick in axis.get_xticks() if low <= tick <= high]
        assert 1 in ticks and all(float(tick).is_integer() for tick in ticks)
        anchor = axis.get_legend().get_bbox_to_anchor().transformed(axis.transAxes.inverted())
        assert anchor.y0 < 0  # below the axes


def test_a_resume_is_marked_on_both_panels(tmp_path, monkeypatch) -> None:
    """A run stopped mid-epoch and resumed showed two validations and two epoch means inside one epoch with nothing
    to say why; a job that found no checkpoint (a resume at step 0) marks nothing."""
    from recsys_llm.train import curves

    drawn = []
    monkeypatch.setattr(curves, "save_figure_atomically", lambda figure, path, **kwargs: drawn.append(figure))
    records = [
        {"event": "resumed", "global_step": 0},
        {"event": "train", "global_step": 50, "loss": 0.7},
        {"event": "valid", "global_step": 75, "epoch": 0, "auc": 0.6, "logloss": 0.66},
        {"event": "resumed", "global_step": 75},
        {"event": "train", "global_step": 100, "loss": 0.6},
        {"event": "valid", "global_step": 100, "epoch": 1, "auc": 0.62, "logloss": 0.65},
    ]
    _write_metrics(str(tmp_path), records)
    assert plot_training_curves(str(tmp_path))
    for axis in drawn[0].axes:
        marks = [line for line in axis.get_lines() if line.get_linestyle() == ":"]
        assert [list(line.get_xdata()) for line in marks] == [[75, 75]]
    assert "resumed" in drawn[0].axes[0].get_legend_handles_labels()[1]


def test_a_non_finite_value_breaks_its_line_and_is_marked(tmp_path, monkeypatch) -> None:
    """A diverged loss (NaN) or a single-class validation (AUC null) was left out and the line drawn straight across
    it, so the picture showed a smooth run."""
    import math

    records = [{"event": "train", "global_step": 50, "loss": 0.7}, {"event": "train", "global_step": 100, "loss": None},
               {"event": "train", "global_step": 150, "loss": 0.6},
               {"event": "valid", "global_step": 100, "auc": 0.6, "logloss": 0.6},
               {"event": "valid", "global_step": 200, "auc": None, "logloss": 0.6},
               {"event": "valid", "global_step": 300, "auc": 0.7, "logloss": 0.6}]
    loss_axis, auc_axis = _drawn(tmp_path, monkeypatch, records)
    lines = {line.get_label(): line for axis in (loss_axis, auc_axis) for line in axis.get_lines()}
    loss = lines["training loss, mean of 50 steps (BCE + loss terms)"]
    assert list(loss.get_xdata()) == [50, 100, 150] and math.isnan(loss.get_ydata()[1])
    auc = lines["validation AUC"]
    assert list(auc.get_xdata()) == [100, 200, 300] and math.isnan(auc.get_ydata()[1])
    assert list(lines["no finite loss (NaN / inf / null)"].get_xdata()) == [100]
    assert list(lines["no finite AUC (NaN / inf / null)"].get_xdata()) == [200]
    assert lines["best 0.7000"].get_xdata()[0] == 300


def test_a_loss_spanning_decades_is_on_a_log_scale(tmp_path, monkeypatch) -> None:
    """An early spike (or an ELEC student's KD terms, 20x its LogLoss) flattened the other curves along the bottom."""
    spiky = [{"event": "train", "global_step": 50, "loss": 500.0}, {"event": "train", "global_step": 100, "loss": 0.6},
             {"event": "valid", "global_step": 100, "auc": 0.6, "logloss": 0.6}]
    loss_axis, _ = _drawn(tmp_path, monkeypatch, spiky)
    assert loss_axis.get_yscale() == "log" and "log" in loss_axis.get_ylabel()
    loss_axis, _ = _drawn(tmp_path, monkeypatch, RECORDS)
    assert loss_axis.get_yscale() == "linear"


def test_the_title_names_the_model_and_the_data(tmp_path, monkeypatch) -> None:
    """The title was the run directory's name alone ("tiny"): the picture did not say what was trained on what."""
    with open(tmp_path / "config.yaml", "w", encoding="utf-8") as handle:
        handle.write("data:\n  schema: data/ml100k/schema.json\nmodel:\n  name: dcnv2\n")
    axes = _drawn(tmp_path, monkeypatch, RECORDS)
    assert axes[0].figure.get_suptitle() == f"{tmp_path.name}: dcnv2 on ml100k"
    (tmp_path / "config.yaml").write_text(": not yaml [", encoding="utf-8")
    axes = _drawn(tmp_path, monkeypatch, RECORDS)
    assert axes[0].figure.get_suptitle() == tmp_path.name


def test_every_curve_breaks_at_its_non_finite_values_and_each_is_marked(tmp_path, monkeypatch) -> None:
    """The epoch means, the validation LogLoss and the training-window AUC break at a null as the training loss does,
    and every step without a finite value is crossed, not only the first."""
    import math

    records = [{"event": "train", "global_step": 50, "loss": 0.7}, {"event": "train", "global_step": 100, "loss": None},
               {"event": "train", "global_step": 150, "loss": 0.6},
               {"event": "epoch", "global_step": 60, "mean_loss": 0.7}, {"event": "epoch", "global_step": 120,
                                                                          "mean_loss": None},
               {"event": "epoch", "global_step": 180, "mean_loss": 0.6},
               {"event": "valid", "global_step": 60, "auc": 0.6, "logloss": 0.6},
               {"event": "valid", "global_step": 120, "auc": 0.6, "logloss": None},
               {"event": "valid", "global_step": 180, "auc": 0.7, "logloss": 0.5},
               {"event": "train_window", "global_step": 50, "auc": 0.6},
               {"event": "train_window", "global_step": 100, "auc": None},
               {"event": "train_window", "global_step": 150, "auc": 0.7}]
    loss_axis, auc_axis = _drawn(tmp_path, monkeypatch, records)
    lines = {line.get_label(): line for axis in (loss_axis, auc_axis) for line in axis.get_lines()}
    for label, steps in (("epoch mean loss", [60, 120, 180]), ("validation LogLoss", [60, 120, 180]),
                         ("training AUC, torchrec window", [50, 100, 150])):
        assert list(lines[label].get_xdata()) == steps, label
        assert math.isnan(lines[label].get_ydata()[1]), label
    assert list(lines["no finite loss (NaN / inf / null)"].get_xdata()) == [100, 120]
    assert list(lines["no finite AUC (NaN / inf / null)"].get_xdata()) == [100]


def test_a_value_the_record_lacks_or_a_bool_is_no_gap(tmp_path, monkeypatch) -> None:
    """A validation record without a LogLoss (one of a single class writes its AUC as null alone) and a bool are
    not values that went non-finite: nothing is crossed for them."""
    records = RECORDS + [{"event": "train", "global_step": 200, "epoch": 2, "loss": True}]
    loss_axis, _ = _drawn(tmp_path, monkeypatch, records)
    assert "no finite loss (NaN / inf / null)" not in [line.get_label() for line in loss_axis.get_lines()]


def test_the_loss_panel_is_on_a_log_scale_from_a_span_of_20x_over_all_its_curves(tmp_path, monkeypatch) -> None:
    """10x stays linear, 20x (by the validation LogLoss alone) is logarithmic; a zero loss, which a log scale cannot
    show, keeps it linear."""
    def scale(train_losses, logloss):
        records = [{"event": "train", "global_step": 50 * (i + 1), "loss": loss} for i, loss in enumerate(train_losses)]
        records.append({"event": "valid", "global_step": 100, "auc": 0.6, "logloss": logloss})
        loss_axis, _ = _drawn(tmp_path, monkeypatch, records)
        return loss_axis.get_yscale()

    assert scale([5.0, 0.5], 0.5) == "linear"
    assert scale([0.5, 0.5], 10.0) == "log"
    assert scale([10.0, 0.5], 0.5) == "log"
    assert scale([10.0, 0.0], 0.5) == "linear"


def test_a_config_yaml_that_is_no_mapping_leaves_the_title_the_run_directory(tmp_path, monkeypatch) -> None:
    (tmp_path / "config.yaml").write_text("- dcnv2\n- ml100k\n", encoding="utf-8")
    axes = _drawn(tmp_path, monkeypatch, RECORDS)
    assert axes[0].figure.get_suptitle() == tmp_path.name
