"""A long run's validations warn about a bad validation LogLoss once per job, and tell overfitting from divergence.

A 200-epoch DeepFM on 1,600 rows (train.patience=0) memorised its training split (training loss 0.0001, valid
LogLoss 3.6) and printed the 430-character "the model has diverged: lower optim.dense_lr ..." warning at 187 of
its 200 validations.
"""

import types
import warnings

import torch

import recsys_llm.train.runner as runner
from recsys_llm.train.checkpoint import TrainState


class _Best:
    def __init__(self) -> None:
        self.saved = 0

    def save(self, *args, **kwargs) -> None:
        self.saved += 1


class _Log:
    def write(self, record) -> None:
        pass


def _validations(monkeypatch, train_losses, valid=None):
    valid = valid or {"auc": 0.6, "logloss": 3.0, "ne": 5.0}
    monkeypatch.setattr(runner, "evaluate", lambda *args, **kwargs: dict(valid))
    ctx = types.SimpleNamespace(is_main=True, device=torch.device("cpu"))
    cfg = types.SimpleNamespace(progress=False, pipelined_eval="false", patience=0)
    state, warned = TrainState(), set()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for step, loss in enumerate(train_losses, start=1):
            state.global_step = step * 100
            runner._validate(None, None, None, ctx, state, _Best(), _Log(), cfg, train_loss=loss, warned=warned)
    return [str(w.message) for w in caught if "valid LogLoss" in str(w.message)]


def test_an_overfitting_model_is_warned_about_once_and_not_called_diverged(monkeypatch) -> None:
    messages = _validations(monkeypatch, [0.01] * 50)
    assert len(messages) == 1, messages
    assert "overfits" in messages[0] and "diverged" not in messages[0] and "step 100" in messages[0]


def test_a_diverged_model_is_warned_about_once_per_job(monkeypatch) -> None:
    messages = _validations(monkeypatch, [5.0] * 50)
    assert len(messages) == 1, messages
    assert "diverged" in messages[0] and "model.dense_as_fields=false" in messages[0]


def test_no_training_loss_known_keeps_the_divergence_warning(monkeypatch) -> None:
    messages = _validations(monkeypatch, [None, float("nan")])
    assert len(messages) == 1 and "diverged" in messages[0]


def test_a_low_click_rate_does_not_pass_a_diverged_model_for_an_overfitting_one(monkeypatch) -> None:
    """At a 2% click rate (LogLoss of the rate alone 0.098) a training loss of 0.3 is 3x worse than the rate alone:
    the model diverged on its training rows too, though 0.3 is below ln 2 / 2."""
    import math

    entropy = -(0.02 * math.log(0.02) + 0.98 * math.log(0.98))
    messages = _validations(monkeypatch, [0.3], valid={"auc": 0.6, "logloss": 2.0, "ne": 2.0 / entropy})
    assert len(messages) == 1 and "diverged" in messages[0], messages
    messages = _validations(monkeypatch, [0.01], valid={"auc": 0.6, "logloss": 2.0, "ne": 2.0 / entropy})
    assert len(messages) == 1 and "overfits" in messages[0], messages
