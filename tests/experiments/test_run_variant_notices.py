"""The table drivers print one line per training run: the upstream notices `recsys-llm train` hides
(torchrec's planner, torch's checkpoint writer) stay hidden when a driver trains in-process too."""

import logging
import warnings

import experiments.common as common
from experiments.common import base_config_path, run_variant
from recsys_llm.train.config import ExperimentConfig


def _noisy_training(config: ExperimentConfig) -> dict:
    """What ``run_training`` emits from upstream on every run (the planner's and the checkpoint writer's notices)."""
    warnings.warn("HeuristicalStorageReservation is known to cause issues, particularly during dry run",
                  FutureWarning)
    warnings.warn("Please use DTensor instead and we are deprecating ShardedTensor.", FutureWarning)
    logging.getLogger("torchrec.distributed.planner.storage_reservations").warning(
        "There is a known issue with TorchRec's dense tensor size calculation in dry run scenarios")
    return {"valid": {"auc": 0.74}, "test": {"auc": 0.76, "logloss": 0.47}}


def test_a_driver_run_prints_its_one_line_without_upstream_notices(tmp_path, monkeypatch, capsys, caplog) -> None:
    """`python -m experiments.llactr --quick` printed three upstream notices around each `[run k/N]` line."""
    monkeypatch.setattr(common, "run_training", _noisy_training)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with caplog.at_level(logging.WARNING):
            results = run_variant(base_config_path("ml100k", "fm"), [], str(tmp_path / "run"))
    assert results["test"]["auc"] == 0.76
    assert [str(w.message) for w in caught] == []
    assert [record.getMessage() for record in caplog.records] == []
    assert "test AUC 0.7600" in capsys.readouterr().out
    with warnings.catch_warnings(record=True) as caught:  # the caller's own filters are back afterwards
        warnings.simplefilter("always")
        _noisy_training(ExperimentConfig())
    assert len(caught) == 2
