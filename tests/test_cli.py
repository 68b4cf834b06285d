"""The ``recsys-llm`` entry point itself (sub-commands have their own tests)."""

import os

import pytest

from recsys_llm.cli import PROGRESS_INTERVAL_ENV, main


def test_progress_bars_written_to_a_log_update_every_30_s(monkeypatch) -> None:
    monkeypatch.delenv(PROGRESS_INTERVAL_ENV, raising=False)  # restored after the test
    with pytest.raises(SystemExit):
        main(["prepare", "synthetic", "--help"])  # pytest's captured stderr is not a terminal
    assert os.environ[PROGRESS_INTERVAL_ENV] == "30"


def test_a_chosen_progress_interval_is_kept(monkeypatch) -> None:
    monkeypatch.setenv(PROGRESS_INTERVAL_ENV, "5")
    with pytest.raises(SystemExit):
        main(["prepare", "synthetic", "--help"])
    assert os.environ[PROGRESS_INTERVAL_ENV] == "5"
