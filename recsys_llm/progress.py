"""The update interval of the project's tqdm bars, read when each bar is made.

tqdm reads ``TQDM_MININTERVAL`` and ``TQDM_MAXINTERVAL`` once, when it is first imported: a command
run by a program that had imported tqdm before (torchrec imports it) drew its bars in a log ten times a
second whatever ``recsys_llm.cli.main`` set, and one whose ``main`` imported it first kept the
command's 30 s after the command returned. Bars made with :func:`interval_options` follow the
environment as it is when they are made.
"""

import os
from typing import Dict

MININTERVAL_ENV = "TQDM_MININTERVAL"
MAXINTERVAL_ENV = "TQDM_MAXINTERVAL"
DEFAULTS = {"mininterval": 0.1, "maxinterval": 10.0}  # tqdm's own


def interval_options() -> Dict[str, float]:
    """``mininterval`` and ``maxinterval`` (seconds) for ``tqdm(...)``: ``$TQDM_MININTERVAL`` and
    ``$TQDM_MAXINTERVAL`` where set, else tqdm's defaults (0.1 and 10).

    Raises:
        ValueError: a variable that is not a number, named with its value.
    """
    options = dict(DEFAULTS)
    for key, variable in (("mininterval", MININTERVAL_ENV), ("maxinterval", MAXINTERVAL_ENV)):
        value = os.environ.get(variable)
        if value:
            try:
                options[key] = float(value)
            except ValueError:
                raise ValueError(f"{variable} is {value!r}; expected seconds between progress bar updates, "
                                 "a number such as 30") from None
    return options
