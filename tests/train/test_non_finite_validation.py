"""A model whose weights diverged after the last loss check (a step's loss finite, its update blowing the weights
up) gives NaN logits: the validation must stop the run before best/ or a checkpoint keeps it, and the test and
evaluate metrics must not be NaN without a word.

``train.max_steps=1 optim.dense_lr=1e20 optim.sparse_lr=1e20`` on a small DeepFM saved best/ckpt-00000001 with
a valid LogLoss of NaN (AUC 0.53 from NaN logits made it the best), and export wrote its artifact.
"""

import math
import os
import types

import pytest
import torch

import recsys_llm.train.runner as runner
from recsys_llm.train.checkpoint import TrainState
from recsys_llm.train.pipeline import NonFiniteLossError
from tests.train.test_validate_warnings import _Best, _Log


def _validate(monkeypatch, valid, state: TrainState, best: _Best) -> None:
    monkeypatch.setattr(runner, "evaluate", lambda *args, **kwargs: dict(valid))
    ctx = types.SimpleNamespace(is_main=True, device=torch.device("cpu"))
    cfg = types.SimpleNamespace(progress=False, pipelined_eval="false", patience=0)
    state.global_step = 7
    runner._validate(None, None, None, ctx, state, best, _Log(), cfg, train_loss=0.8, warned=set())


@pytest.mark.parametrize("logloss", [math.nan, math.inf])
def test_a_validation_of_non_finite_logits_stops_before_best_is_saved(monkeypatch, logloss) -> None:
    state, best = TrainState(), _Best()
    with pytest.raises(NonFiniteLossError, match=r"step 7: valid LogLoss is .*NaN, inf or huge .*291 row"):
        _validate(monkeypatch, {"auc": 0.53, "logloss": logloss, "ne": math.nan, "num_samples": 291.0, "ctr": 0.55},
                  state, best)
    assert best.saved == 0
    assert state.best_step == TrainState().best_step


def test_a_finite_validation_still_saves_best(monkeypatch) -> None:
    state, best = TrainState(), _Best()
    _validate(monkeypatch, {"auc": 0.6, "logloss": 0.65, "ne": 0.95, "num_samples": 10.0, "ctr": 0.5}, state, best)
    assert best.saved == 1 and state.best_step == 7


def test_a_run_whose_first_update_blows_the_weights_up_keeps_no_checkpoint(synthetic_dir, tmp_path) -> None:
    """The real run: a finite first loss, then an update at a learning rate of 1e20."""
    from recsys_llm.train.config import load_config
    from tests.train.test_train_runner import DEEPFM_CONFIG, _overrides

    run_dir = tmp_path / "run"
    config = load_config(DEEPFM_CONFIG, _overrides(synthetic_dir, str(run_dir), 1024, [
        "train.max_steps=1", "optim.dense_lr=1e20", "optim.sparse_lr=1e20"]))
    with pytest.raises(NonFiniteLossError, match=r"step 1: valid LogLoss is nan: the model's logit is NaN, inf or huge"):
        runner.run_training(config)
    assert not (run_dir / "best").exists() or not os.listdir(run_dir / "best")
    assert not (run_dir / "checkpoints").exists() or not os.listdir(run_dir / "checkpoints")


def test_a_test_split_of_non_finite_logits_is_named():
    with pytest.warns(UserWarning, match=r"test LogLoss is nan: the model's logit is NaN, inf or huge .*304 row"):
        runner.warn_undefined_test_metrics({"auc": 0.67, "logloss": math.nan, "ne": math.nan, "ctr": 0.5,
                                            "num_samples": 304.0})
    assert runner.non_finite_logits_note({"logloss": 0.6, "num_samples": 3.0}, "test") is None
    assert runner.non_finite_logits_note({"logloss": math.nan, "num_samples": 0.0}, "test") is None
