import os
import socket
import tempfile

from recsys_llm.paths import file_problem, not_a_regular_file


def test_what_is_no_regular_file_is_named_as_what_it_is(tmp_path) -> None:
    """A reader names what it found in place of its file: a FIFO's read waits for good, a device's reads without end."""
    regular = tmp_path / "f"
    regular.write_text("x")
    os.mkfifo(tmp_path / "pipe")
    found = {name: not_a_regular_file(str(tmp_path / name)) for name in ("f", "pipe", "gone")}
    assert found == {"f": None, "pipe": "a named pipe (FIFO)", "gone": None}
    with tempfile.TemporaryDirectory(dir="/tmp") as short, socket.socket(socket.AF_UNIX) as server:
        server.bind(os.path.join(short, "s"))  # a short path: AF_UNIX takes 104 bytes on macOS
        assert not_a_regular_file(os.path.join(short, "s")) == "a socket"
    assert not_a_regular_file(str(tmp_path)) == "a directory"
    assert not_a_regular_file(os.devnull) == "a device"
    os.symlink(str(regular), tmp_path / "link")
    os.symlink(str(tmp_path / "gone"), tmp_path / "dangling")
    assert file_problem(str(tmp_path / "link")) is None  # a link to a file is followed
    assert file_problem(str(tmp_path / "dangling")) == f"a dangling symbolic link (to {tmp_path / 'gone'})"
    assert file_problem(str(tmp_path / "gone")) == "missing"
