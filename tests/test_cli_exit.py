"""``recsys-llm`` once its command is over: a Ctrl-C (or SIGTERM) in the second the interpreter takes to exit (torch's
atexit hooks, freeing its modules) printed a traceback of the hook it landed in with exit code 0, or ended the process
by the signal with no message; it now ends the process at once, with the command's own exit code."""

import os
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(command_ends: str, signal_name: str = "SIGINT") -> subprocess.CompletedProcess:
    # the atexit hook below is registered after recsys_llm.cli's own, so it runs first: where torch's hooks run
    script = textwrap.dedent(f"""
        import atexit, os, signal, sys, time
        import recsys_llm.cli as cli

        def command(argv=None):
            print("summary of the command")
            {command_ends}
        cli.main = command

        def hook_of_a_library():
            os.kill(os.getpid(), signal.{signal_name})
            time.sleep(2)
            print("the hook went on after the signal", file=sys.stderr)
        atexit.register(hook_of_a_library)
        cli.run()
    """)
    env = dict(os.environ, PYTHONPATH=REPO + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("command_ends, code", [("return 0", 0), ("return 2", 2), ("raise SystemExit(130)", 130)])
def test_a_ctrl_c_in_the_exit_hooks_ends_with_the_commands_code_and_no_traceback(command_ends, code):
    done = _run(command_ends)
    assert done.returncode == code
    assert done.stderr == ""  # no "Exception ignored in atexit callback ... KeyboardInterrupt"
    assert done.stdout == "summary of the command\n"  # flushed before the exit at once, even into a pipe


def test_a_sigterm_in_the_exit_hooks_ends_with_the_commands_code():
    done = _run("return 0", "SIGTERM")
    assert (done.returncode, done.stderr) == (0, "")


def test_the_handlers_of_a_program_that_imports_the_cli_are_left_alone():
    import signal

    import recsys_llm.cli as cli

    before = [signal.getsignal(number) for number in cli.EXIT_SIGNALS]
    cli._ignore_signals_while_exiting()  # its atexit hook: nothing while no command ran through run()
    assert [signal.getsignal(number) for number in cli.EXIT_SIGNALS] == before
