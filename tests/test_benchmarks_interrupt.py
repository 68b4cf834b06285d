"""benchmarks/common.run_main: Ctrl-C ends a benchmark with one line and exit code 130, as the recsys-llm commands
end, not with a traceback of wherever it landed (54 lines, each prefixed '[rank0]:' once torch.distributed is loaded)."""

import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from benchmarks import common  # noqa: E402


def _interrupted() -> None:
    raise KeyboardInterrupt


@pytest.fixture(autouse=True)
def _progress_settings_restored(monkeypatch):
    """run_main sets the progress variables of a script writing to a log (os.environ.setdefault): set here, so that
    monkeypatch puts them back for the tests after these."""
    from recsys_llm.progress import LINES_ENV, MAXINTERVAL_ENV, MININTERVAL_ENV

    for variable, value in ((LINES_ENV, "0"), (MININTERVAL_ENV, "0.1"), (MAXINTERVAL_ENV, "10")):
        monkeypatch.setenv(variable, value)


def test_ctrl_c_ends_a_benchmark_with_one_line_and_130(capsys, monkeypatch):
    monkeypatch.delenv("RECSYS_LLM_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as ended:
        common.run_main(_interrupted)
    assert ended.value.code == 130
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1 and "interrupted (Ctrl-C)" in lines[0]


def test_the_traceback_stays_when_asked(monkeypatch):
    monkeypatch.setenv("RECSYS_LLM_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        common.run_main(_interrupted)


def test_a_benchmark_quiets_upstream_notices_while_it_runs_and_puts_them_back():
    """A program or test calling a benchmark's main in its own process keeps its logger levels and root filters:
    parse_args left torchrec's advisory loggers at ERROR and a filter on the root logger for good."""
    import logging

    from recsys_llm.cli import UPSTREAM_ADVISORY_LOGGERS

    loggers = [logging.getLogger(name) for name in UPSTREAM_ADVISORY_LOGGERS]
    before = [logger.level for logger in loggers], list(logging.getLogger().filters)
    seen = []
    common.parse_args("quiet", None, ["--smoke"])
    common.run_main(lambda: seen.append([logger.level for logger in loggers]))
    assert seen == [[logging.ERROR] * len(loggers)]
    assert ([logger.level for logger in loggers], list(logging.getLogger().filters)) == before
