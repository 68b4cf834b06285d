"""``recsys-llm`` command line: one sub-command module per job.

Each module in ``COMMAND_MODULES`` exposes ``register(subparsers)``, which adds its
sub-command(s) and sets ``func`` on the parsed namespace.
"""

import argparse
import codecs
import errno
import importlib
import json
import logging
import os
import pickle
import re
import signal
import sys
import threading
import time
import warnings
from typing import Any, Callable, Dict, List, NoReturn, Optional, Tuple, Union

from recsys_llm.atomic_dir import TryAgainLater
from recsys_llm.error_text import one_line
from recsys_llm.progress import LINES_ENV, MAXINTERVAL_ENV, MININTERVAL_ENV, env_flag

DESCRIPTION = "LLM knowledge for sharded TorchRec CTR models (LLaCTR, ELEC), without an LLM at serving time."
EPILOG = """workflows:
  plain:   prepare -> train -> evaluate / export -> score
  LLaCTR:  prepare -> semantics tune -> semantics encode -> train (llactr.vectors_path=...) -> export
  ELEC:    prepare -> semantics adapt -> semantics export -> train (elec.task=gain)
           -> train (elec.task=distill) [or teacher-outputs -> train (offline)] -> export the student
  every sub-command has --help; docs/usage.md has each workflow step by step"""

COMMAND_MODULES = (
    "recsys_llm.cli.data",  # prepare
    "recsys_llm.cli.train",  # train, evaluate, demo
    "recsys_llm.cli.semantics",  # semantics tune | encode (and adapt | export: recsys_llm.cli.semantics_export)
    "recsys_llm.cli.export",  # export (serving artifact of a student), teacher-outputs
    "recsys_llm.cli.score",  # score (a split through an exported artifact)
)


class _Subcommands(argparse._SubParsersAction):
    """Sub-commands whose own ``--help`` opens with the one-line help their parent lists."""

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        if kwargs.get("help") and "description" not in kwargs:
            kwargs["description"] = kwargs["help"]
        return super().add_parser(name, **kwargs)


class CommandParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose sub-commands (and theirs, as they are of this class too) are ``_Subcommands``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.register("action", "parsers", _Subcommands)

    def error(self, message: str) -> NoReturn:
        """argparse's usage and error line, that line also left for the launcher (:func:`record_for_launcher`)."""
        record_for_launcher(f"{self.prog}: error: {message}")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    """The ``recsys-llm`` parser with every sub-command the CLI modules register."""
    parser = CommandParser(
        prog="recsys-llm", description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    from recsys_llm import __version__

    parser.add_argument("--version", action="version", version=f"recsys-llm {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    _name_own_parsers(parser)
    return parser


def _name_own_parsers(parser: argparse.ArgumentParser) -> None:
    """Gives every sub-command's parser the default ``command_parser`` (itself), so that an argument
    only known after parsing is refused with that sub-command's usage line, not the top level's."""
    for action in parser._actions:  # argparse keeps its sub-parsers nowhere public
        if isinstance(action, argparse._SubParsersAction):
            for sub_parser in action.choices.values():
                sub_parser.set_defaults(command_parser=sub_parser)
                _name_own_parsers(sub_parser)


# upstream notices a user of the commands cannot act on (the library leaves them on)
UPSTREAM_NOTICES = (
    ("HeuristicalStorageReservation is known to cause issues", FutureWarning),
    ("Please use DTensor instead and we are deprecating ShardedTensor", FutureWarning),
    ("`broadcast_buffers` is deprecated", FutureWarning),
    ("`is_gradient_checkpointing` is deprecated", FutureWarning),
    # FBGEMM's CPU kernel of a replicated (data_parallel) table runs its own autograd Function, so
    # the gradient flows (tests/train/test_train_sharding.py); torch warns at every backward only
    # because the op has no kernel at the Autograd key
    ("dense_embedding_codegen_lookup_function: an autograd kernel was not registered", UserWarning),
    # torch.export's archive writer, for weights that are all on CPU (``export`` moves them there)
    ("No complete tensor found in the group", UserWarning),
)

UPSTREAM_ADVISORY_LOGGERS = (
    "torch.fx._symbolic_trace",  # is_fx_tracing's meaning, once per trace
    "torchrec.distributed.planner.storage_reservations",  # dense size estimate in dry runs
    "torchrec.distributed.utils",  # "Sharding Type is data_parallel, caching params will be ignored", per table
)
# upstream lines logged through the root logger (``logging.warning``), which no logger's level can hide alone:
# the planner's check of its plan names every data-parallel table, one line each (500 for 500 fields), as
# having no sharding spec, which no data-parallel table has
UPSTREAM_ROOT_NOTICES = ("Sharding spec not found for ",)


def _not_an_upstream_root_notice(record: logging.LogRecord) -> bool:
    """Root-logger filter: False for a record whose message starts with one of ``UPSTREAM_ROOT_NOTICES``."""
    return not (record.levelno < logging.ERROR and str(record.msg).startswith(UPSTREAM_ROOT_NOTICES))


def quiet_upstream_notices() -> Callable[[], None]:
    """Hides ``UPSTREAM_NOTICES`` and the planner's and torch.fx's advisory log lines (the
    planner is built as torchrec's own examples build it; ``UPSTREAM_ROOT_NOTICES`` on the root logger)
    around the progress bars; returns what
    puts the caller's warning filters and those loggers' levels back (a program calling ``main``
    keeps its own)."""
    caught = warnings.catch_warnings()
    caught.__enter__()
    for message, category in UPSTREAM_NOTICES:
        warnings.filterwarnings("ignore", message=f".*{re.escape(message)}", category=category)
    loggers = [logging.getLogger(name) for name in UPSTREAM_ADVISORY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    logging.getLogger().addFilter(_not_an_upstream_root_notice)

    def restore() -> None:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
        logging.getLogger().removeFilter(_not_an_upstream_root_notice)
        caught.__exit__(None, None, None)

    return restore


PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_command(message: object, command: str) -> str:
    """``message`` without a leading ``<command>: ``: the package's messages name their command for Python
    callers (``export: ...``), which the CLI's ``recsys-llm <command>: error:`` names already."""
    text = str(message)
    prefix = f"{command}: "
    return text[len(prefix):] if command and text.startswith(prefix) else text


def project_warning_format(command: str, fallback: Any) -> Any:
    """A ``warnings.formatwarning`` that shows a warning raised in this package as one line,
    ``recsys-llm <command>: warning: <message>`` (the way errors are shown), instead of Python's
    ``/path/to/recsys_llm/module.py:99: UserWarning: <message>`` followed by the source line that
    raised it; every other warning (a library's) goes to ``fallback`` as before. With
    ``RECSYS_LLM_TRACEBACK=1`` the file and line are kept."""

    def formatwarning(message: Any, category: Any, filename: str, lineno: int, line: Optional[str] = None) -> str:
        if not traceback_asked() and os.path.abspath(filename).startswith(PACKAGE_DIR + os.sep):
            return f"recsys-llm {command}: warning: {without_command(message, command)}\n"
        return fallback(message, category, filename, lineno, line)

    return formatwarning


# errors that describe bad input (a file, column, key or value): shown as one line, not a traceback
USER_ERRORS = (
    ValueError, KeyError, FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
    pickle.UnpicklingError,  # a refused checkpoint .metadata
)
# an OSError of these is about where the command writes, not a bug: one line too (EFBIG: past a file-size
# limit, ``ulimit -f`` or the file system's largest file; Python ignores SIGXFSZ, so the write fails)
ENVIRONMENT_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG})
# what torch's zip writer says when a write comes up short (a full disk), without the OSError
SHORT_WRITE_MARK = "unexpected pos"
# how a Rust library (safetensors' SafetensorError) ends an I/O error's text, its only trace of the errno
RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
TRACEBACK_ENV = "RECSYS_LLM_TRACEBACK"
ERROR_FILE_ENV = "TORCHELASTIC_ERROR_FILE"  # set by torchrun's agent (and so torchx) for each worker
PROGRESS_INTERVAL_ENV = MININTERVAL_ENV  # the project's bars read it when made (recsys_llm.progress)


def _launch_number(name: str, default: int) -> int:
    """The integer in torchrun's environment variable ``name``; ``default`` when it is unset or not an
    integer (the command's process-group set-up refuses such a value, naming it)."""
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def exit_on_sigterm() -> Callable[[], None]:
    """Makes SIGTERM (a timeout, ``kill``, a scheduler's cancel) end a one-process command as Ctrl-C
    does: its ``finally`` blocks and context managers run, so a half-written output's temp
    directory is removed. Left alone under several ranks (``WORLD_SIZE`` > 1): a rank waiting in
    a collective runs no Python handler until the collective returns, and the launcher's
    SIGTERM must stop it at once.

    Returns:
        Callable[[], None]: puts back the handler there was before, for a program that called
        :func:`main` (a notebook, the examples) and goes on after the command.
    """
    if _launch_number("WORLD_SIZE", 1) > 1 or threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGTERM, _exit_for_signal)  # None: a handler not set from Python

    def restore() -> None:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)

    return restore


class Terminated(SystemExit):
    """The exit :func:`exit_on_sigterm`'s handler raises: code 128 + SIGTERM, as the shell reports a killed process."""


def _exit_for_signal(signum: int, frame: object) -> None:
    raise Terminated(128 + signum)


def _wrapped_failures(error: BaseException) -> List[BaseException]:
    """The exceptions ``torch.distributed.checkpoint`` wrapped in its ``CheckpointException``."""
    failures = getattr(error, "failures", None)
    if not isinstance(failures, dict):
        return []
    return [pair[0] for pair in failures.values()
            if isinstance(pair, tuple) and pair and isinstance(pair[0], BaseException)]


def _interruption(error: BaseException) -> Optional[BaseException]:
    """The Ctrl-C or SIGTERM behind ``error``, else None: ``error`` itself, one ``torch.distributed.checkpoint``
    wrapped (Ctrl-C / SIGTERM during a save), or one that a cleanup's own failure replaced while it was handled (a
    SIGTERM inside torchrec's pipeline fill left its ``detach`` to fail an assertion in ``train_epoch``'s
    ``finally``: exit code 1 and a traceback of 60 lines instead of 143 and one line)."""
    seen = set()
    current: Optional[BaseException] = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        wrapped = next((e for e in _wrapped_failures(current) if isinstance(e, (SystemExit, KeyboardInterrupt))), None)
        if wrapped is not None:
            return wrapped
        if isinstance(current, (KeyboardInterrupt, Terminated)):
            return current
        current = current.__context__
    return None


# where the commands write, by argparse dest (train sets run_dir from its config: train.run_dir)
# (output_dir before output: ``semantics export --output`` is a choice, representation or pooled, not a path)
OUTPUT_OPTIONS = ("out", "output_dir", "output", "attach_dir", "run_dir")


def _output_of(args: Optional[argparse.Namespace]) -> Optional[str]:
    """The output the command writes (its first of :data:`OUTPUT_OPTIONS` given), None for none."""
    return next((value for value in (getattr(args, name, None) for name in OUTPUT_OPTIONS)
                 if isinstance(value, str) and value), None)


def _environment_error_line(error: BaseException, args: Optional[argparse.Namespace] = None) -> Optional[str]:
    """One line for a failure of the disk the command writes to (full, over quota, read-only, a file past the
    file-size limit: the exit code says to try again once that is mended), else None; an error that names no file (pyarrow's "[Errno 28] Error writing bytes to file",
    safetensors' "... (os error 28)") gets the command's output."""
    # the wrapped failures first: a CheckpointException's own text holds every rank's traceback
    candidates = [*_wrapped_failures(error), error]
    output = _output_of(args)
    for candidate in candidates:
        if isinstance(candidate, OSError) and candidate.errno in ENVIRONMENT_ERRNOS:
            if candidate.filename is None and output is not None:
                return f"{candidate} (writing {output})"
            return str(candidate)
    for candidate in _wrapped_failures(error) or [error]:  # not the wrapper's text: every rank's traceback
        rust_errno = RUST_OS_ERROR.search(str(candidate))
        if rust_errno and int(rust_errno.group(1)) in ENVIRONMENT_ERRNOS:
            return f"{one_line(candidate)}{f' (writing {output})' if output is not None else ''}"
    for candidate in candidates:
        if SHORT_WRITE_MARK in str(candidate):
            where = f" ({output})" if output is not None else ""
            return (f"a file could not be written whole ({one_line(candidate)}): check the free space, quota and "
                    f"file-size limit (ulimit -f) where the command writes{where}")
    return None


def _name_too_long_line(error: BaseException, args: Optional[argparse.Namespace] = None) -> Optional[str]:
    """One line for an output name near NAME_MAX (the hidden temp, lock and backup names beside it are longer), else
    None."""
    output = _output_of(args)
    for candidate in [*_wrapped_failures(error), error]:
        if isinstance(candidate, OSError) and candidate.errno == errno.ENAMETOOLONG:
            return (f"{one_line(candidate)}: a file name is too long for the file system; the commands write hidden "
                    "temporary, lock and backup files beside their outputs, named after them with up to 30 more "
                    f"characters: choose a shorter name{f' than {output}' if output is not None else ''}")
    return None


# what gloo and NCCL say when a collective gave up on a rank that stalled (the first two: its timeout passed) or died
PEER_TIMEOUT_MARKS = ("Timed out waiting", "Watchdog caught collective operation timeout")
PEER_FAILURE_MARKS = PEER_TIMEOUT_MARKS + ("Connection closed by peer", "Connection reset by peer",
                                           "NCCL communicator was aborted")
# gloo's whole text, with no "[file:line]" prefix, for an asynchronous collective (torchrec's all-to-all in a
# backward) whose peer stalled past the timeout
GLOO_BARE_TIMEOUT = "Application timeout caused pair closure"


def _peer_failure_line(error: BaseException) -> Optional[str]:
    """One line for a collective that gave up waiting on another rank (stalled or died), else None: its
    traceback pointed at this rank, the one that waited."""
    text = str(error)
    # gloo's own text ("[../third_party/gloo/...] Timed out ...", or the bare one) or NCCL's, not a message of this
    # project's that quotes one (it says more: an export's "its finished chunks are kept")
    raw = text.startswith("[") or "NCCL" in text.split(":")[0]
    timed_out = text.startswith(GLOO_BARE_TIMEOUT) or (raw and any(mark in text for mark in PEER_TIMEOUT_MARKS))
    if not isinstance(error, RuntimeError) or not (timed_out or raw and any(m in text for m in PEER_FAILURE_MARKS)):
        return None
    from recsys_llm.train.distributed import DEFAULT_TIMEOUT_S, TIMEOUT_ENV  # torch is loaded: a collective failed

    if timed_out:  # torchrun's summary names this rank, which waited: the stalled one raised nothing
        cause = (f"which stalled past {TIMEOUT_ENV}={os.environ.get(TIMEOUT_ENV) or DEFAULT_TIMEOUT_S} s (torchrun's "
                 "summary names this rank, the one that waited; the stalled rank is the one whose output stopped "
                 "first, and `py-spy dump --pid` on it shows where it waits)")
    else:
        cause = "which died (torchrun's summary names it)"
    return f"a collective gave up waiting for another rank, {cause}: {one_line(error)[:300]}"


def traceback_asked() -> bool:
    """Whether ``$RECSYS_LLM_TRACEBACK`` asks for the traceback instead of the one-line error (:func:`env_flag`: a
    value that is no on/off value, which :func:`main` refuses, asks for none)."""
    try:
        return env_flag(TRACEBACK_ENV)
    except ValueError:
        return False


def _flag_environment_error() -> Optional[str]:
    """The line for an on/off variable of the project set to neither (``RECSYS_LLM_TRACEBACK=false`` turned the
    tracebacks on, and with them exit code 1 for bad input; ``RECSYS_LLM_PROGRESS_LINES=yes`` was read as off,
    leaving a log's bars redrawn in place), else None."""
    for name in (TRACEBACK_ENV, LINES_ENV):
        try:
            env_flag(name)
        except ValueError as error:
            return str(error)
    return None


def _close_progress_bars() -> None:
    """Closes the tqdm bars a failed command left open, so that what is printed next starts a line of its own
    (not after ``movielens:  25%|##5    |``, where the bar's carriage return left the cursor)."""
    if "tqdm" not in sys.modules:
        return
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


USAGE_ERROR = 2  # the input (an option, a file, a config value) is wrong: the same command fails again
TRY_AGAIN = 75  # EX_TEMPFAIL: the input is fine, the environment stopped it (a full disk, another job's lock)


def _error_exit(command: str, message: object, code: int = USAGE_ERROR) -> int:
    """Prints ``recsys-llm <command>: error: <message>`` (``recsys-llm: error: ...`` without a
    command) and the traceback hint, leaves the same line for the launcher
    (:func:`record_for_launcher`); returns ``code`` (:data:`USAGE_ERROR`, or :data:`TRY_AGAIN`)."""
    _close_progress_bars()
    line = f"recsys-llm{' ' + command if command else ''}: error: {without_command(message, command)}"
    # one write: print's separate write of the line end let the lines of ranks failing together run into each other
    sys.stderr.write(f"{line}\n(set {TRACEBACK_ENV}=1 for the traceback)\n")
    sys.stderr.flush()
    record_for_launcher(line)
    return code


def record_for_launcher(line: Optional[str] = None) -> None:
    """Leaves a worker's failure where torchrun's failure summary and ``torchx status`` read it:
    the file ``$TORCHELASTIC_ERROR_FILE`` that torch.distributed.elastic gives each worker (nothing
    without one). A user error is its one line; called with no line inside an ``except`` block, it
    records the exception with its traceback, as torch's ``@record`` does.
    """
    path = os.environ.get(ERROR_FILE_ENV)
    if not path:
        return
    try:  # a path that cannot be written (a variable left over from another job) must not replace the error
        if line is None:
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(sys.exc_info()[1])
            return
        with open(path, "w") as file:  # torch.distributed.elastic's one-message form
            json.dump({"message": line, "timestamp": int(time.time())}, file)
    except OSError as error:
        sys.stderr.write(f"recsys-llm: warning: {ERROR_FILE_ENV}={path!r} could not be written "
                         f"({error.strerror or error}); the error is shown here only\n")


def _flushes_subnormals() -> bool:
    """Whether this thread's float math flushes subnormal numbers to zero (``torch.set_flush_denormal``, which
    reaches Python's and numpy's float math too)."""
    return float.fromhex("0x1p-1060") * 1.0 == 0.0


def keep_callers_process_state() -> Callable[[], None]:
    """Saves the process-wide state a command changes (``train`` seeds the global RNGs and flushes subnormals,
    ``train.flush_denormal``) and runs it with float32 as torch's default dtype; returns what puts the caller's
    back, so that a program calling ``main`` several times keeps its own random streams, float math and default
    dtype. Torch's state is kept where the caller had imported torch (a command that needs it imports it)."""
    import random

    import numpy as np

    torch = sys.modules.get("torch")
    python_rng, numpy_rng, flushing = random.getstate(), np.random.get_state(), _flushes_subnormals()
    torch_rng = torch.get_rng_state() if torch is not None else None
    cuda_rngs = torch.cuda.get_rng_state_all() if torch is not None and torch.cuda.is_initialized() else None
    dtype = torch.get_default_dtype() if torch is not None else None
    if torch is not None:
        torch.set_default_dtype(torch.float32)  # the models and data are float32: a caller's float64 would mix

    def restore() -> None:
        random.setstate(python_rng)
        np.random.set_state(numpy_rng)
        torch_now = sys.modules.get("torch")
        if torch_now is not None:
            torch_now.set_flush_denormal(flushing)
        if torch_rng is not None:
            torch_now.set_rng_state(torch_rng)
            torch_now.set_default_dtype(dtype)
        if cuda_rngs is not None:
            torch_now.cuda.set_rng_state_all(cuda_rngs)

    return restore


def _leave_callers_group_be() -> Callable[[], None]:
    """:func:`recsys_llm.train.distributed.leave_existing_group_be` where torch is loaded and a group exists (a
    program's that calls ``main``); nothing to keep otherwise (no torch import for a command that needs none)."""
    torch_distributed = sys.modules.get("torch.distributed")
    if torch_distributed is None or not torch_distributed.is_initialized():
        return lambda: None
    from recsys_llm.train.distributed import leave_existing_group_be

    return leave_existing_group_be()


def _stderr_redraws_bars() -> bool:
    """Whether ``sys.stderr`` shows a tqdm bar redrawn in place: a terminal, or a Jupyter kernel's output stream
    (ipykernel's ``OutStream`` is no TTY, but the notebook applies the carriage returns, as a terminal does; as a
    log it left each bar's first "0%" line, and nothing else until 30 s had passed)."""
    stream = sys.stderr
    if stream is None:
        return False
    if type(stream).__module__.split(".")[0] == "ipykernel":
        return True
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # a closed or file-like stream without isatty
        return False


def _command_environment() -> Dict[str, str]:
    """The environment variables a command runs with that are not set already."""
    added = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    if _launch_number("RANK", 0) > 0:  # torchrun: rank 0 alone draws bars on the shared terminal
        added["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # transformers' "Loading weights", per rank
    if not _stderr_redraws_bars():  # a log file (torchx, Slurm): a progress line every 30 s, not 10 a second
        added[PROGRESS_INTERVAL_ENV] = os.environ.get(PROGRESS_INTERVAL_ENV, "30")
        # tqdm's monitor forces a refresh after maxinterval (10 s) without one: no sooner than the interval
        added[MAXINTERVAL_ENV] = added[PROGRESS_INTERVAL_ENV]
        added[LINES_ENV] = "1"  # each update a line of its own, not redrawn in place on one endless line
    return {key: value for key, value in added.items() if key not in os.environ}


def main(argv: Optional[List[str]] = None) -> int:
    """Runs one sub-command; bad input ends with ``recsys-llm <command>: error: ...`` and exit code 2
    (``RECSYS_LLM_TRACEBACK=1`` re-raises for the full traceback).

    The command runs offline (``HF_HUB_OFFLINE``), with progress lines every 30 s when stderr is
    not a terminal; of those variables, the ones it set are removed again when it returns, so a
    program calling ``main`` keeps its own environment."""
    added = _command_environment()
    os.environ.update(added)
    restore_streams = _printable_streams()
    try:
        flag_error = _flag_environment_error()
        if flag_error is not None:
            return _error_exit("", flag_error)
        tqdm_error = _tqdm_environment_error(set_here=added)
        if tqdm_error is not None:  # before the parser: the sub-commands' modules import tqdm
            return _error_exit("", tqdm_error)
        return _run_command(argv)
    finally:
        restore_streams()
        for key in added:
            os.environ.pop(key, None)


PRINTABLE_ERRORS = "recsys_llm.printable"  # the streams' error handler while a command runs


def _escape_unprintable(error: UnicodeError) -> Tuple[Union[str, bytes], int]:
    """Error handler :data:`PRINTABLE_ERRORS`: the bytes of a name the operating system gave undecoded (lone
    surrogates U+DC80..U+DCFF, a Latin-1 file name) written back as they were (``surrogateescape``, the stream's
    own handler under a C / C.UTF-8 locale), any other character the encoding lacks as a backslash escape."""
    if not isinstance(error, UnicodeEncodeError):
        raise error
    if all("\udc80" <= char <= "\udcff" for char in error.object[error.start:error.end]):
        return codecs.lookup_error("surrogateescape")(error)
    return codecs.backslashreplace_errors(error)


codecs.register_error(PRINTABLE_ERRORS, _escape_unprintable)


def _printable_streams() -> Callable[[], None]:
    """Lets stdout and stderr print any text: a character their encoding lacks (``PYTHONIOENCODING=ascii``, a
    Latin-1 locale) is written as a backslash escape rather than ending a command that did its work with a
    UnicodeEncodeError at its summary (a field description, a path, a value in another script), while a file
    name's undecoded bytes are written as they were (:func:`_escape_unprintable`); returns what puts the streams'
    own error handlers back, for a program calling ``main``."""
    changed = []
    for stream in (sys.stdout, sys.stderr):
        errors = getattr(stream, "errors", None)
        if errors in ("strict", "surrogateescape") and callable(getattr(stream, "reconfigure", None)):
            try:
                stream.reconfigure(errors=PRINTABLE_ERRORS)
            except (ValueError, OSError):  # a closed or detached stream: left as it is
                continue
            changed.append((stream, errors))

    def restore() -> None:
        for stream, errors in changed:
            try:
                stream.reconfigure(errors=errors)
            except (ValueError, OSError):
                pass
    return restore


def _ignore_ctrl_c() -> None:
    """Ctrl-C ignored from here on, in the main thread: the command is over, what it wrote stays as it is, and
    the interpreter's exit (torch's atexit hooks, freeing its modules: a second or so) is all that is left, where
    a Ctrl-C printed a traceback of the hook it landed in (exit code 0) or ended the process by the signal (130
    for a command that had done its work). ``SIG_IGN`` outlasts the interpreter's reset of its Python handlers;
    SIGTERM still ends the process."""
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGINT, signal.SIG_IGN)


def run() -> NoReturn:
    """The program ``recsys-llm`` (``python -m recsys_llm``, ``python -m recsys_llm.cli``, torchrun's workers):
    :func:`main`, then the interpreter's exit with its code, which a Ctrl-C no longer interrupts
    (:func:`_ignore_ctrl_c`). A program calling :func:`main` keeps its own handlers."""
    try:
        code = main()
    except SystemExit:  # an interrupted command's 130 / 143, argparse's 2, --help's 0
        _ignore_ctrl_c()
        raise
    _ignore_ctrl_c()
    sys.exit(code)


def expand_home(args: argparse.Namespace) -> None:
    """Expands a leading ``~`` (``~`` or ``~/...``) in the options' values as the shell would have:
    bash leaves ``--out=~/data`` as it is, and the command would make a directory named ``~``."""
    def expanded(value: Any) -> Any:
        if isinstance(value, str) and (value == "~" or value.startswith("~/")):
            return os.path.expanduser(value)
        return [expanded(item) for item in value] if isinstance(value, list) else value

    for name, value in vars(args).items():
        setattr(args, name, expanded(value))


def _undecodable_argument(args: argparse.Namespace) -> Optional[str]:
    """The first option value or override that holds UTF-8 bytes the locale's encoding could not decode (Python
    kept them as lone surrogates, ``'\\udcc3'``, which no UTF-8 library call takes) or decoded as other characters
    (a Latin-1 locale's ``'Ã©'`` for ``'é'``), as its text; else None.
    Bytes that are not UTF-8 at all (a name in Latin-1) are left to the command, as under a UTF-8 locale: the
    files such a name reaches through the operating system work (an old run's directory), and a UTF-8 locale
    would not help them."""
    def values(value: Any) -> List[str]:
        if isinstance(value, str):
            return [value]
        return [text for item in value for text in values(item)] if isinstance(value, (list, tuple)) else []

    encoding = sys.getfilesystemencoding()
    for value in vars(args).values():
        for text in values(value):
            if any("\udc80" <= char <= "\udcff" for char in text):
                try:
                    return text.encode("utf-8", "surrogateescape").decode("utf-8")
                except UnicodeDecodeError:  # not UTF-8 bytes
                    continue
            elif codecs.lookup(encoding).name != "utf-8" and not text.isascii():
                # a Latin-1 locale decodes UTF-8 bytes into other characters ("é" as "Ã©"), which pyarrow, writing
                # a path as UTF-8, reached as a name the command had not made ("Failed to open local file")
                try:
                    decoded = text.encode(encoding, "surrogateescape").decode("utf-8")
                except (UnicodeError, ValueError):  # bytes that are no UTF-8: the locale's own text
                    continue
                if decoded != text:
                    return decoded
    return None


def _command_name(args: argparse.Namespace) -> str:
    """The sub-command as typed, the way argparse's own usage errors name it: ``train``, ``semantics tune``,
    ``prepare movielens`` (from the prog of the parser that read it: :func:`_name_own_parsers`)."""
    return args.command_parser.prog.split(" ", 1)[1]


# torchrun's integer variables, with their least value: torchmetrics (imported with torchrec) and the host-memory
# check read LOCAL_RANK and LOCAL_WORLD_SIZE with a bare int(), which named no variable ("invalid literal for int()")
LAUNCH_INTEGERS = (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0), ("LOCAL_WORLD_SIZE", 1))


def _launch_variable_error() -> Optional[str]:
    """The line for a torchrun variable (:data:`LAUNCH_INTEGERS`) that is set but no integer of its least value
    or more, else None."""
    from recsys_llm.env import env_int

    for name, minimum in LAUNCH_INTEGERS:
        try:
            env_int(name, minimum, minimum)
        except ValueError as error:
            return str(error)
    return None


def _tqdm_environment_error(set_here: Dict[str, str]) -> Optional[str]:
    """The line for ``TQDM_*`` variables tqdm cannot read (``TQDM_MININTERVAL=soon``), naming those the user set
    (not the ones in ``set_here``, :func:`_command_environment`'s), else None: tqdm converts them when it is first
    imported, and the ``ValueError`` of that import was a traceback before any command ran."""
    if "tqdm" in sys.modules:  # imported already, by the program calling main: it read them then
        return None
    try:
        importlib.import_module("tqdm")
    except (ValueError, TypeError) as error:
        if traceback_asked():
            raise
        names = ", ".join(f"{name}={os.environ[name]!r}" for name in sorted(os.environ)
                          if name.startswith("TQDM_") and name not in set_here)
        return (f"tqdm cannot read its environment variables ({names}): {one_line(error)}; give numbers where "
                f"numbers are meant (seconds for {PROGRESS_INTERVAL_ENV} and {MAXINTERVAL_ENV}, such as 30), or "
                "unset them")
    return None


def _run_command(argv: Optional[List[str]]) -> int:
    from recsys_llm.env import check_versions

    parser = build_parser()  # imports the sub-commands (no torch: --help is quick), and tqdm, which reads the interval once
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        hint = ""
        if any("=" in item and not item.startswith("-") for item in unknown):
            hint = " (section.key=value overrides go after all options, in one run at the end of the command)"
        getattr(args, "command_parser", parser).error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    expand_home(args)
    command = _command_name(args)
    undecodable = _undecodable_argument(args)
    if undecodable is not None:  # pyarrow, safetensors and the JSON files take UTF-8 text: refused before any work
        return _error_exit(command, f"argument {undecodable!r} holds bytes the locale's encoding "
                                    f"({sys.getfilesystemencoding()}) cannot decode as the UTF-8 they are (a non-ASCII "
                                    "path or value under LC_ALL=C, POSIX or a Latin-1 locale without Python's UTF-8 "
                                    "mode); run under a UTF-8 locale (LC_ALL=C.UTF-8) or with PYTHONUTF8=1")
    launch_error = _launch_variable_error()
    if launch_error is not None:
        return _error_exit(command, launch_error)
    try:  # the commands import torchrec: a mismatched fbgemm-gpu would fail there, deep in its loader
        check_versions()
    except RuntimeError as error:
        if traceback_asked():
            raise
        return _error_exit("", error)
    except KeyboardInterrupt:  # in the seconds torch takes to import: nothing written yet
        if traceback_asked():
            raise
        if _launch_number("RANK", 0) == 0:  # rank 0 speaks for the ranks torchrun started
            print(f"recsys-llm {command}: interrupted (Ctrl-C) before it began", file=sys.stderr, flush=True)
        raise SystemExit(128 + signal.SIGINT) from None
    restore_notices = quiet_upstream_notices()
    restore_sigterm = exit_on_sigterm()
    restore_process_state = keep_callers_process_state()
    give_back_group = _leave_callers_group_be()
    caller_format = warnings.formatwarning  # put back at the end: a program calling main() keeps its own
    warnings.formatwarning = project_warning_format(command, caller_format)
    try:
        return int(args.func(args) or 0)
    except USER_ERRORS as error:
        if traceback_asked():
            record_for_launcher()
            raise
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        return _error_exit(command, message, TRY_AGAIN if isinstance(error, TryAgainLater) else USAGE_ERROR)
    except BaseException as error:
        # Ctrl-C / SIGTERM during a checkpoint save: torch.distributed.checkpoint wraps it
        interruption = _interruption(error)
        if isinstance(interruption, KeyboardInterrupt) and not traceback_asked():
            _close_progress_bars()
            # one line and the shell's code for SIGINT, as SIGTERM ends with 143 (a crash's 1 said something failed);
            # Ctrl-C reaches every rank torchrun started on the terminal: rank 0 says it for them all
            if _launch_number("RANK", 0) == 0:
                print(f"recsys-llm {command}: interrupted (Ctrl-C); what it had written whole stays, and what it "
                      "left half written is never read (removed now, or by the next run): run the same command again "
                      "to go on", file=sys.stderr, flush=True)
            raise SystemExit(128 + signal.SIGINT) from None
        if interruption is not None:
            if isinstance(interruption, Terminated) and not traceback_asked():
                _close_progress_bars()
                print(f"recsys-llm {command}: stopped (SIGTERM); what it had written whole stays, and what it left "
                      "half written is never read (removed now, or by the next run): run the same command again to go "
                      "on",
                      file=sys.stderr, flush=True)
            raise interruption from None
        environment = _environment_error_line(error, args)
        line = environment or _name_too_long_line(error, args) or _peer_failure_line(error)
        if line is None or traceback_asked():
            if isinstance(error, Exception):
                record_for_launcher()
            raise
        # a rank that died of its own bad input fails the others' collectives: theirs is no reason to try again
        return _error_exit(command, line, TRY_AGAIN if environment is not None else USAGE_ERROR)
    finally:  # a command that ended normally has torn its own group down already
        warnings.formatwarning = caller_format
        if "torch.distributed" in sys.modules:  # a group of the caller's (the examples, the demo) stays
            from recsys_llm.train.distributed import leave_process_group

            leave_process_group()
        give_back_group()
        restore_process_state()  # the caller's RNGs, subnormal mode and default dtype
        restore_sigterm()  # the calling program's own handler again, as its warning format
        restore_notices()


if __name__ == "__main__":
    sys.exit(main())
