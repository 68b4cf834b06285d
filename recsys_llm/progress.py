"""The options of the project's tqdm bars, read when each bar is made: the update interval and, in a log, a
line per update.

tqdm reads ``TQDM_MININTERVAL`` and ``TQDM_MAXINTERVAL`` once, when it is first imported: a command
run by a program that had imported tqdm before (torchrec imports it) drew its bars in a log ten times a
second whatever ``recsys_llm.cli.main`` set, and one whose ``main`` imported it first kept the
command's 30 s after the command returned. Bars made with :func:`bar_options` follow the
environment as it is when they are made.

tqdm redraws a bar in place (a carriage return, no newline); in a log file a whole epoch's updates were one
line, which ``tail``, ``grep`` and log collectors that split on newlines saw only when it ended. With
``RECSYS_LLM_PROGRESS_LINES=1`` (set by the CLI when stderr is not a terminal) each update is a line of its own.
"""

import os
import re
import sys
from typing import Any, Dict

MININTERVAL_ENV = "TQDM_MININTERVAL"
MAXINTERVAL_ENV = "TQDM_MAXINTERVAL"
LINES_ENV = "RECSYS_LLM_PROGRESS_LINES"
DEFAULTS = {"mininterval": 0.1, "maxinterval": 10.0}  # tqdm's own
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's moves between nested bars' lines


class ProgressLines:
    """A file for tqdm that writes each redraw of a bar as a line of its own to ``sys.stderr`` (as it is at the
    write), leaving out the blanking and cursor moves that make sense on a terminal only."""

    def write(self, text: str) -> None:
        for part in text.split("\r"):
            line = _CURSOR_MOVES.sub("", part).strip()
            if line:
                sys.stderr.write(line + "\n")

    def flush(self) -> None:
        sys.stderr.flush()


def bar_options() -> Dict[str, Any]:
    """``mininterval`` and ``maxinterval`` (seconds) for ``tqdm(...)``: ``$TQDM_MININTERVAL`` and
    ``$TQDM_MAXINTERVAL`` where set, else tqdm's defaults (0.1 and 10); and ``file``, a :class:`ProgressLines`,
    where ``$RECSYS_LLM_PROGRESS_LINES`` is 1.

    Raises:
        ValueError: a variable that is not a number, named with its value.
    """
    options: Dict[str, Any] = dict(DEFAULTS)
    for key, variable in (("mininterval", MININTERVAL_ENV), ("maxinterval", MAXINTERVAL_ENV)):
        value = os.environ.get(variable)
        if value:
            try:
                options[key] = float(value)
            except ValueError:
                raise ValueError(f"{variable} is {value!r}; expected seconds between progress bar updates, "
                                 "a number such as 30") from None
    if os.environ.get(LINES_ENV) == "1":
        options["file"] = ProgressLines()
    return options
