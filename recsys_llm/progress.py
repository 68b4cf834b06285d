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
# the values an on/off variable of the project (RECSYS_LLM_PROGRESS_LINES, RECSYS_LLM_TRACEBACK) takes
FLAG_VALUES = {"": False, "0": False, "false": False, "no": False, "off": False,
               "1": True, "true": True, "yes": True, "on": True}
_CURSOR_MOVES = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")  # tqdm's moves between nested bars' lines


def env_flag(name: str) -> bool:
    """The on/off environment variable ``name``: unset, empty, ``0``, ``false``, ``no`` or ``off`` is off; ``1``,
    ``true``, ``yes`` or ``on`` is on (any case).

    Raises:
        ValueError: another value (``RECSYS_LLM_TRACEBACK=full``), named with the values taken: read as off, it
            left a log's bars redrawn in place, and read as on, it changed a command's exit codes.
    """
    raw = os.environ.get(name, "")
    try:
        return FLAG_VALUES[raw.strip().lower()]
    except KeyError:
        raise ValueError(f"environment variable {name}={raw!r}: expected 1 (or true, yes, on) or 0 (or false, no, "
                         "off), or unset it") from None


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
    where ``$RECSYS_LLM_PROGRESS_LINES`` is on (:func:`env_flag`).

    Raises:
        ValueError: a variable that is not a number, or a ``$RECSYS_LLM_PROGRESS_LINES`` that is no on/off value,
            named with its value.
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
    if env_flag(LINES_ENV):
        options["file"] = ProgressLines()
    return options
