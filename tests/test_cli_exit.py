"""``recsys-llm`` once its command is over: a Ctrl-C in the second the interpreter takes to exit (torch's
atexit hooks, freeing its modules) printed a traceback of the hook it landed in with exit code 0, or ended the process
by the signal with no message; it is now ignored, and the process exits with the command's own code."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command_ends: str) -> subprocess.CompletedProcess:
    """A stand-in command run by ``run()``, then an exit hook (where torch's run) that gets a Ctrl-C."""
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys, time
        import recsys_llm.cli as cli

        def command(argv=None):
            print("summary of the command")
            {command_ends}
        cli.main = command

        def hook_of_a_library():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(2)
            print("the hook went on after the signal", file=sys.stderr)
        atexit.register(hook_of_a_library)
        cli.run()
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("command_ends, code", [("return 0", 0), ("return 2", 2), ("raise SystemExit(130)", 130)])
def test_a_ctrl_c_in_the_exit_hooks_is_ignored_and_the_exit_keeps_the_commands_code(command_ends, code):
    done = _run(command_ends)
    assert done.returncode == code
    assert "KeyboardInterrupt" not in done.stderr  # no "Exception ignored in atexit callback ... KeyboardInterrupt"
    assert "the hook went on after the signal" in done.stderr  # every exit hook still does its cleanup
    assert done.stdout == "summary of the command\n"


def test_a_program_calling_main_keeps_its_ctrl_c_handler():
    import signal

    from recsys_llm.cli import main

    before = signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit):
        main(["--help"])
    assert signal.getsignal(signal.SIGINT) is before


def test_a_latin1_name_is_printed_as_its_bytes_and_other_text_escaped():
    """Under a C or C.UTF-8 locale (stdout's errors: surrogateescape) a Latin-1 path printed as its own bytes; the
    streams' backslashreplace printed it as the text "\\\\udce9"."""
    import io

    from recsys_llm.cli import _printable_streams

    stdout = io.TextIOWrapper(io.BytesIO(), encoding="ascii", errors="surrogateescape")
    saved = sys.stdout
    sys.stdout = stdout
    try:
        restore = _printable_streams()
        print("runs/caf\udce9 ville o\u00f9")
        restore()
    finally:
        sys.stdout = saved
    stdout.flush()
    assert stdout.buffer.getvalue() == b"runs/caf\xe9 ville o\\xf9\n"
    assert stdout.errors == "surrogateescape"
