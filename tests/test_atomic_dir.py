import builtins
import os
import shutil
import stat

import pytest

from recsys_llm.atomic_dir import atomic_directory


def test_success_replaces_and_failure_keeps_the_old_directory(tmp_path):
    target = str(tmp_path / "out")
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
            handle.write("first")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target, "output", ("a.txt",)) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
                handle.write("half-written")
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        with open(os.path.join(tmp, "b.txt"), "w", encoding="utf-8") as handle:
            handle.write("second")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or .old directory left behind


def test_a_directory_of_another_kind_is_refused_and_left_untouched(tmp_path):
    target = tmp_path / "run"
    target.mkdir()
    (target / "checkpoints").mkdir()
    (target / "config.yaml").write_text("keep me", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"run: not empty and not an earlier export \(no config.json, model"):
        with atomic_directory(str(target), "export", ("config.json", "model.safetensors")):
            raise AssertionError("the block must not run")
    assert sorted(os.listdir(target)) == ["checkpoints", "config.yaml"]
    assert sorted(os.listdir(tmp_path)) == ["run"]
    (tmp_path / "empty").mkdir()
    with atomic_directory(str(tmp_path / "empty"), "export", ("config.json",)) as tmp:
        open(os.path.join(tmp, "config.json"), "w").close()


@pytest.mark.parametrize("parent_mode, umask, directory_mode, file_mode", [
    (None, 0o022, 0o755, 0o644),
    # a group-shared parent (set-group-ID, as `chmod g+s` makes it): `os.makedirs` makes directories that keep the
    # bit; the swapped-in output's chmod to the umask's permissions cleared it, so files written there later (by
    # another member of the group) took their writer's primary group
    (0o2775, 0o002, 0o2775, 0o664),
])
def test_the_result_has_the_usual_permissions(tmp_path, parent_mode, umask, directory_mode, file_mode):
    if parent_mode is not None:
        os.chmod(tmp_path, parent_mode)
        os.makedirs(tmp_path / "plain")
        if not (tmp_path / "plain").stat().st_mode & stat.S_ISGID:
            pytest.skip("this file system does not pass the set-group-ID bit on to new directories")
    umask = os.umask(umask)
    try:
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            fd = os.open(os.path.join(tmp, "a.txt"), os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp would
            os.close(fd)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o7777 == directory_mode
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o7777 == directory_mode
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o7777 == file_mode


def _refusing_append(monkeypatch, refused) -> None:
    """``open`` in atomic_dir refusing to append to ``refused`` (root opens any file: the refusal is stood in for)."""
    from recsys_llm import atomic_dir

    def no_append(path, mode="r", *args, **kwargs):
        if str(path) == str(refused) and "a" in mode:
            raise PermissionError(13, "Permission denied", str(path))
        return builtins.open(path, mode, *args, **kwargs)

    monkeypatch.setattr(atomic_dir, "open", no_append, raising=False)


def test_another_users_lock_file_this_user_cannot_write_is_locked_read_only(tmp_path, monkeypatch):
    """A lock file left by another user under umask 022 (a run's `.lock`, or a killed export's `.<name>.lock`) made
    every resume, export and tune of a group member fail with '[Errno 13] Permission denied: ...lock'. flock(2)
    locks a file opened for reading too; a lock held through it still refuses a second writer. Root opens any file,
    so the refusal to open it for appending is stood in for."""
    from recsys_llm import atomic_dir

    lock = tmp_path / ".out.lock"
    lock.write_text("")
    lock.chmod(0o644)
    _refusing_append(monkeypatch, lock)
    held = atomic_dir.try_lock(str(lock))
    assert held is not None
    assert atomic_dir.try_lock(str(lock)) is None  # held: a second writer is refused
    held.close()
    with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("{}")
    assert (tmp_path / "out" / "config.json").is_file()
    missing = tmp_path / "missing" / ".lock"
    with pytest.raises(FileNotFoundError):  # no lock file to fall back on: the error is the open's own
        atomic_dir.try_lock(str(missing))


def test_a_users_dot_old_copy_of_the_output_is_left_alone(tmp_path):
    """``cp -r out out.old`` before writing ``out`` again: the swap kept its previous copy at ``out.old``
    and removed it afterwards, the user's backup with it."""
    out = str(tmp_path / "out")
    with atomic_directory(out, "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "first")
    shutil.copytree(out, f"{out}.old")
    _write(f"{out}.old", "notes.txt", "mine")
    for text in ("second", "third"):
        with atomic_directory(out, "output", ("a.txt",)) as tmp:
            _write(tmp, "a.txt", text)
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "third"
    assert sorted(os.listdir(tmp_path / "out.old")) == ["a.txt", "notes.txt"]
    assert (tmp_path / "out.old" / "a.txt").read_text(encoding="utf-8") == "first"
    assert sorted(os.listdir(tmp_path)) == ["out", "out.old"]


def test_an_old_copy_of_the_output_is_named_not_put_back_and_an_empty_swapped_out_one_is_no_leftover(tmp_path,
                                                                                                        capsys):
    """A version before the hidden .<name>.old kept the previous output at <name>.old: one it left when killed
    is named (it may be a user's own copy, so it is neither put back nor removed)."""
    (tmp_path / "out.old").mkdir()
    _write(str(tmp_path / "out.old"), "a.txt", "earlier")
    (tmp_path / ".out.old").mkdir()  # empty: removed by the swap, not a leftover to delete by hand
    with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "new")
    err = capsys.readouterr().err
    assert f"{tmp_path / 'out.old'}: an earlier output, left alone" in err and "left by an earlier" not in err
    assert sorted(os.listdir(tmp_path)) == ["out", "out.old"]
    assert (tmp_path / "out.old" / "a.txt").read_text(encoding="utf-8") == "earlier"


def test_a_foreign_swapped_out_directory_is_not_swept_away(tmp_path):
    (tmp_path / ".out.old").mkdir()
    (tmp_path / ".out.old" / "backup.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"\.out\.old: not empty and not an earlier output"):
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)):
            raise AssertionError("the block must not run")
    assert (tmp_path / ".out.old" / "backup.txt").read_text(encoding="utf-8") == "mine"


def test_temp_directories_of_a_killed_run_are_named(tmp_path, capsys) -> None:
    leftover = tmp_path / ".out.k1ll3d"  # what a SIGKILLed run leaves beside its output
    leftover.mkdir()
    with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("{}")
    err = capsys.readouterr().err
    assert f"{tmp_path}: .out.k1ll3d left by an earlier export of {tmp_path / 'out'} that was killed; delete it\n" in err
    assert leftover.is_dir()  # named, not removed


def test_leftovers_of_a_sibling_named_like_the_output_are_not_called_its_own(tmp_path, capsys) -> None:
    (tmp_path / ".out.checkpoint.removing-0a1b2c3d").mkdir()  # semantics adapt's out.checkpoint, killed in removal
    with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
        _write(tmp, "config.json", "{}")
    assert "left by an earlier" not in capsys.readouterr().err


def _write(directory: str, name: str, text: str) -> None:
    with open(os.path.join(directory, name), "w", encoding="utf-8") as handle:
        handle.write(text)


def test_a_signal_between_the_two_renames_of_the_swap_waits_for_the_second(tmp_path, monkeypatch):
    """Ctrl-C (or SIGTERM, which the commands turn into the same exception) right after the old
    directory moved aside used to leave neither copy at the output path."""
    import signal

    from recsys_llm import atomic_dir

    target = str(tmp_path / "out")
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "first")
    real_replace = os.replace

    def replace_then_interrupt(source, destination):
        real_replace(source, destination)
        if destination.endswith(".old"):
            signal.raise_signal(signal.SIGINT)

    monkeypatch.setattr(atomic_dir.os, "replace", replace_then_interrupt)
    # Python's handler even where SIGINT is ignored (pytest run as a background job of a shell)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with atomic_directory(target, "output", ("a.txt",)) as tmp:
                _write(tmp, "a.txt", "second")
    finally:
        signal.signal(signal.SIGINT, previous)
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "second"
    monkeypatch.undo()
    with atomic_directory(target, "output", ("a.txt",)) as tmp:  # the .old left by the interrupt goes
        _write(tmp, "a.txt", "third")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_the_previous_copy_of_a_run_killed_between_the_renames_is_put_back(tmp_path, capsys):
    old = tmp_path / ".out.old"  # what a SIGKILL between the two renames leaves: no out, a complete .out.old
    old.mkdir()
    _write(str(old), "a.txt", "first")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)):
            raise RuntimeError("boom")
    assert "out: put back from" in capsys.readouterr().err
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "first"
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_kill_while_the_previous_copy_is_deleted_leaves_only_a_named_hidden_directory(tmp_path, monkeypatch,
                                                                                        capsys):
    from recsys_llm import atomic_dir

    target = str(tmp_path / "out")
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "first")

    real_rmtree = atomic_dir.shutil.rmtree

    def killed_midway(path, *args, **kwargs):
        if ".removing-" not in path:
            return real_rmtree(path, *args, **kwargs)
        os.remove(os.path.join(path, "a.txt"))  # part of it deleted, then the process is gone
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic_dir.shutil, "rmtree", killed_midway)
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(target, "output", ("a.txt",)) as tmp:
            _write(tmp, "a.txt", "second")
    monkeypatch.undo()
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "second"
    leftovers = [name for name in os.listdir(tmp_path) if name != "out"]
    assert len(leftovers) == 1 and leftovers[0].startswith(".out.removing-"), leftovers  # no half-deleted out.old
    with atomic_directory(target, "output", ("a.txt",)) as tmp:  # the next run is not blocked, and names it
        _write(tmp, "a.txt", "third")
    assert f"{leftovers[0]} left by an earlier output of {target} that was killed" in capsys.readouterr().err


def test_a_swap_after_one_killed_between_its_renames_keeps_the_previous_copy_until_the_new_one_is_in(
        tmp_path, monkeypatch):
    """What an SSFT checkpoint swap (``replace_directory``) killed between its renames leaves is the lone
    ``checkpoint.old``; the next swap, killed before its new copy is in place, must still leave it."""
    from recsys_llm import atomic_dir

    final, old, tmp = tmp_path / "checkpoint", tmp_path / "checkpoint.old", tmp_path / "checkpoint.tmp"
    old.mkdir()
    _write(str(old), "a.txt", "first")
    tmp.mkdir()
    _write(str(tmp), "a.txt", "second")
    real_replace = os.replace

    def killed_before_the_new_copy_is_in(source, destination):
        if source == str(tmp):
            raise OSError("killed")
        real_replace(source, destination)

    monkeypatch.setattr(atomic_dir.os, "replace", killed_before_the_new_copy_is_in)
    with pytest.raises(OSError, match="killed"):
        atomic_dir.replace_directory(str(tmp), str(final))
    complete = [path for path in (final, old) if (path / "a.txt").exists()]
    assert [(path / "a.txt").read_text(encoding="utf-8") for path in complete] == ["first"]
    monkeypatch.undo()
    atomic_dir.replace_directory(str(tmp), str(final))
    assert (final / "a.txt").read_text(encoding="utf-8") == "second" and sorted(os.listdir(tmp_path)) == ["checkpoint"]


def test_an_output_named_with_a_trailing_slash_is_replaced_beside_itself(tmp_path):
    """``--output exports/student/`` (a shell completes directories so): the earlier copy goes to
    ``exports/student.old``, not into ``exports/student/.old`` (a rename into itself: EINVAL)."""
    target = str(tmp_path / "out") + os.sep
    for text in ("first", "second"):
        with atomic_directory(target, "output", ("a.txt",)) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
                handle.write(text)
        assert (tmp_path / "out" / "a.txt").read_text() == text
        assert sorted(os.listdir(tmp_path / "out")) == ["a.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_an_output_that_is_a_symlink_is_written_where_it_points(tmp_path):
    """``exports/current -> exports/v3``: the swap happens at the target, the link stays, and no
    OSError ("Cannot call rmtree on a symbolic link") follows a finished swap, leaving the link
    under a hidden name that later runs call a killed run's leftover."""
    (tmp_path / "v3").mkdir()
    os.symlink(tmp_path / "v3", tmp_path / "current")
    for text in ("first", "second"):
        with atomic_directory(str(tmp_path / "current"), "output", ("a.txt",)) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
                handle.write(text)
        assert os.path.islink(tmp_path / "current")
        assert (tmp_path / "v3" / "a.txt").read_text() == text
    assert sorted(os.listdir(tmp_path)) == ["current", "v3"]


@pytest.mark.parametrize("failure", [OSError(28, "No space left on device"), KeyboardInterrupt()])
def test_a_text_write_that_fails_keeps_the_old_content_and_leaves_no_temp_file(tmp_path, monkeypatch, failure):
    """A full disk or Ctrl-C while writing leaves the file as it was and nothing beside it: a temp
    file left there is an entry a re-run refuses as foreign (``demo_llm.json.tmp`` made every later
    ``recsys-llm demo`` refuse its run directory, ``teacher.json.tmp`` a teacher-outputs directory)."""
    from recsys_llm.atomic_dir import write_text_atomically
    from recsys_llm.demo import ADAPT_FIELDS, _check_same_llm, _write_llm_record

    path = str(tmp_path / "record.json")
    write_text_atomically(path, "old")

    def fail(fd: int) -> None:
        raise failure

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(type(failure)):
        write_text_atomically(path, "new")
    llm_dir = str(tmp_path / "llm")
    record = {"llm": "/models/minilm", "fingerprint": "abc", "adapt_fields": ADAPT_FIELDS}
    with pytest.raises(type(failure)):
        _write_llm_record(llm_dir, record)
    monkeypatch.undo()
    assert (tmp_path / "record.json").read_text(encoding="utf-8") == "old"
    assert sorted(os.listdir(tmp_path)) == ["llm", "record.json"] and os.listdir(llm_dir) == []
    _check_same_llm(llm_dir, record, str(tmp_path))  # the demo's re-run goes on


def test_two_writers_of_one_file_at_once_leave_one_whole_content(tmp_path):
    """Both wrote through the same ``<path>.tmp``: the second truncated and wrote the file the first was
    still writing, and renamed it into place while the first went on writing into it. ``path`` held the
    second's bytes followed by the rest of the first's, and the first failed with 'No such file or directory'
    (two benchmarks, demos or sweeps writing the same JSON)."""
    from recsys_llm.atomic_dir import write_file_atomically

    path = str(tmp_path / "results.json")

    def first(handle) -> None:
        handle.write(b"a" * 1000)
        write_file_atomically(path, lambda other: other.write(b"b" * 500))  # another process, meanwhile
        handle.write(b"a" * 1000)

    write_file_atomically(path, first)
    assert (tmp_path / "results.json").read_bytes() == b"a" * 2000  # the last renamed, whole
    assert os.listdir(tmp_path) == ["results.json"]


def test_the_temp_files_a_killed_writer_leaves_are_an_output_s_own_entries():
    """Entries an SSFT output or a teacher-outputs directory accepts as their own (not foreign files)."""
    from recsys_llm.atomic_dir import is_temp_file_of
    from recsys_llm.semantics.ssft import _is_ssft_entry

    assert is_temp_file_of("teacher.json.tmp", "teacher.json")  # older versions' name
    assert is_temp_file_of("teacher.json.0a1b2c3d.tmp", "teacher.json")
    assert not is_temp_file_of("teacher.json.x.tmp", "teacher.json")
    assert not is_temp_file_of("schema.json.0a1b2c3d.tmp", "teacher.json")
    assert _is_ssft_entry("metrics.json.0a1b2c3d.tmp") and not _is_ssft_entry("notes.txt.0a1b2c3d.tmp")


@pytest.mark.parametrize("below", [["out"], ["out", "deeper"]])
def test_an_output_under_a_file_is_refused_before_any_work(tmp_path, below):
    """Making it failed with '[Errno 17] File exists' (or '[Errno 20] Not a directory') only once the
    output was ready to be written: after the export, the vectors, the training."""
    from recsys_llm.atomic_dir import check_own_entries, check_replaceable

    (tmp_path / "afile").write_text("mine")
    directory = os.path.join(tmp_path, "afile", *below)
    expected = f"{directory}: {tmp_path / 'afile'} is a file, not a directory; choose another output path"
    with pytest.raises(FileExistsError) as refused:
        check_replaceable(directory, "export", ["config.json"])
    assert str(refused.value) == expected
    with pytest.raises(FileExistsError) as refused:
        check_own_entries(directory, "vector export", lambda name: True, "chunk-*.parquet")
    assert str(refused.value) == expected
    with pytest.raises(FileExistsError) as refused:  # its lock beside the output is made only after the check
        with atomic_directory(directory, "export", ["config.json"]):
            pytest.fail("the block ran")
    assert str(refused.value) == expected
    assert (tmp_path / "afile").read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["afile"]


def test_a_second_writer_of_one_output_is_refused_before_it_starts(tmp_path):
    """Two writers of one output interleaved their checks and renames: 'Directory not empty' tracebacks, a finished
    output thrown away, a swap reported failed that had succeeded, a false 'put back from out.old'."""
    out = str(tmp_path / "out")
    with atomic_directory(out, "export", ["config.json"]) as tmp:
        with pytest.raises(FileExistsError, match=f"^{out}: another export is writing it \\(it holds "
                                                  f"{tmp_path / '.out.lock'}\\); wait for it to end"):
            with atomic_directory(out, "export", ["config.json"]):
                pytest.fail("the second writer ran")
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("{}")
    assert sorted(os.listdir(tmp_path)) == ["out"]  # the first one's output; its lock file went with it
    with atomic_directory(out, "export", ["config.json"]) as tmp:  # the next writer takes it
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("[]")
    assert (tmp_path / "out" / "config.json").read_text() == "[]"


def test_jobs_that_start_together_generate_the_synthetic_data_once(tmp_path, capsys):
    """Experiments started side by side on one data directory each generated it and swapped it in (and, with
    the swap locked, all but one would be refused): the others now wait and read it."""
    import threading

    from recsys_llm.train.run_data import _generate_once

    schema_file = str(tmp_path / "data" / "synthetic" / "schema.json")
    jobs = [threading.Thread(target=_generate_once, args=(schema_file, 200, 0)) for _ in range(3)]
    for job in jobs:
        job.start()
    for job in jobs:
        job.join()
    assert capsys.readouterr().err.count("generating 200 rows") == 1
    assert os.path.isfile(schema_file) and sorted(os.listdir(tmp_path / "data")) == ["synthetic"]


def test_synthetic_data_that_cannot_be_generated_where_it_is_missing_is_refused_naming_why(tmp_path, monkeypatch):
    """A data.schema missing on a read-only data mount failed with '[Errno 13] Permission denied:
    .../.synthetic.generating.lock', which says neither that the data is missing nor what would be written. Root
    writes anywhere but on a read-only mount, so the directory's refusal is stood in for."""
    from recsys_llm.train.run_data import _generate_once

    locked = tmp_path / "ro"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    schema_file = str(locked / "synthetic" / "schema.json")
    with pytest.raises(PermissionError, match=f"^{schema_file} not found, and the embedded synthetic data .* cannot "
                                              f"be generated there: .*{locked} is not writable here"):
        _generate_once(schema_file, 200, 0)
    assert os.listdir(locked) == []


def test_a_file_written_through_a_symlink_is_written_where_it_points(tmp_path):
    """`semantics encode --output current.safetensors` (a link to v3.safetensors) replaced the link with a file and
    left v3 with its old vectors; a directory output is written through its link (test above)."""
    from recsys_llm.atomic_dir import write_text_atomically

    (tmp_path / "v3.json").write_text("old")
    os.symlink("v3.json", tmp_path / "current.json")
    write_text_atomically(str(tmp_path / "current.json"), "new")
    assert os.path.islink(tmp_path / "current.json") and (tmp_path / "v3.json").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["current.json", "v3.json"]


def test_a_file_system_without_locks_is_warned_of_and_the_write_goes_on(tmp_path, monkeypatch):
    """flock(2) fails with ENOLCK / ENOSYS on Lustre without its flock option or NFSv3 without lockd: every prepare,
    export and train there failed on the lock meant to keep two writers apart."""
    import errno
    import fcntl

    from recsys_llm import atomic_dir

    def no_locks(handle, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(atomic_dir.fcntl, "flock", no_locks)
    with pytest.warns(UserWarning, match="this file system takes no locks"):
        with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
                handle.write("{}")
    assert (tmp_path / "out" / "config.json").is_file()
    monkeypatch.setattr(atomic_dir.fcntl, "flock", fcntl.flock)


def test_outputs_that_cannot_be_written_are_refused_before_any_work(tmp_path, monkeypatch):
    """`export --output ro/student` loaded the checkpoint and traced the model, then failed on its temp directory.
    Root writes anywhere but on a read-only mount, so the directory's refusal is stood in for."""
    from recsys_llm.atomic_dir import check_own_entries, check_replaceable

    locked = tmp_path / "ro"
    (locked / "earlier").mkdir(parents=True)
    (locked / "earlier" / "config.json").write_text("{}")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    for output in (locked / "new", locked / "a" / "b", locked / "earlier"):
        with pytest.raises(PermissionError, match=f"^{output}: cannot be written: {locked} is not writable here"):
            check_replaceable(str(output), "export", ["config.json"])
    for output in (locked, locked / "new"):  # filled in place: the directory itself, or where it is made
        with pytest.raises(PermissionError, match=f"^{output}: cannot be written: {locked} is not writable here"):
            check_own_entries(str(output), "vector export", lambda name: True, "chunks")
    check_replaceable(str(tmp_path / "free" / "new"), "export", ["config.json"])  # writable: passes
    check_own_entries(str(locked / "earlier"), "vector export", lambda name: True, "chunks")
    # a link to an output is written where it points: its target's directory is the one that must be writable
    (tmp_path / "free" / "v3").mkdir(parents=True)
    os.symlink(tmp_path / "free" / "v3", locked / "current")
    check_replaceable(str(locked / "current"), "export", ["config.json"])
    os.symlink(locked / "earlier", tmp_path / "free" / "to_locked")
    with pytest.raises(PermissionError, match=f"cannot be written: {locked} is not writable here"):
        check_replaceable(str(tmp_path / "free" / "to_locked"), "export", ["config.json"])


def test_an_earlier_output_this_user_cannot_delete_is_refused_before_any_work(tmp_path, monkeypatch):
    """`export --output shared/student` over another user's export (umask 022) in a group-writable directory swapped
    the new one in, then failed deleting the old copy ('[Errno 13] Permission denied: INFERENCE.md'), exiting 1
    after its work and leaving a hidden `.student.removing-*` directory. Root deletes anything, so the directory's
    refusal is stood in for."""
    from recsys_llm.atomic_dir import check_replaceable

    earlier = tmp_path / "student"
    (earlier / "sub").mkdir(parents=True)
    (earlier / "config.json").write_text("{}")
    access = os.access
    for locked in (earlier, earlier / "sub"):
        monkeypatch.setattr(os, "access", lambda path, mode, locked=locked: str(path) != str(locked)
                            and access(path, mode))
        with pytest.raises(PermissionError, match=f"^{earlier}: an earlier export that this user cannot replace: "
                                                  f"deleting it needs writing in {locked} "):
            with atomic_directory(str(earlier), "export", ["config.json"]):
                pytest.fail("the block ran")
        assert sorted(os.listdir(tmp_path)) == ["student"] and (earlier / "config.json").read_text() == "{}"
    monkeypatch.setattr(os, "access", access)
    check_replaceable(str(earlier), "export", ["config.json"])  # deletable: passes


def test_a_link_to_an_output_not_made_yet_is_checked_where_it_points(tmp_path, monkeypatch):
    """``current -> v4`` before v4 exists: atomic_directory swaps v4 in beside its target, so the directory that
    must be writable is the target's, not the link's (the link's was checked)."""
    from recsys_llm.atomic_dir import check_replaceable

    locked, free = tmp_path / "ro", tmp_path / "free"
    locked.mkdir()
    free.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    os.symlink(free / "v4", locked / "current")  # dangling: v4 is made by the export
    check_replaceable(str(locked / "current"), "export", ["config.json"])
    os.symlink(locked / "v4", free / "to_locked")
    with pytest.raises(PermissionError, match=f"cannot be written: {locked} is not writable here"):
        check_replaceable(str(free / "to_locked"), "export", ["config.json"])


def test_a_failed_write_names_the_file_it_was_writing(tmp_path, monkeypatch):
    """A full disk in a write or fsync raises an OSError that names no file: the CLI's one line then named the
    command's output (``semantics encode`` a full ``--cache-dir`` as its ``--output``, on another disk)."""
    from recsys_llm.atomic_dir import write_text_atomically

    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(OSError) as caught:
        write_text_atomically(str(tmp_path / "cache.bin"), "new")
    assert caught.value.filename == str(tmp_path / "cache.bin") and caught.value.errno == 28
    assert os.listdir(tmp_path) == []

    def fail_without_errno(fd: int) -> None:
        raise OSError("the device went away")

    monkeypatch.setattr(os, "fsync", fail_without_errno)
    with pytest.raises(OSError, match=r"^the device went away$"):  # a file name would replace the message
        write_text_atomically(str(tmp_path / "cache.bin"), "new")


def test_a_failed_rename_of_the_new_copy_puts_the_previous_one_back(tmp_path, monkeypatch):
    """EIO (or a full directory) on the rename of the finished copy after the previous one moved aside left
    the output path empty: the user's earlier export was only under its hidden ``.out.old`` name until a rerun."""
    import errno

    from recsys_llm import atomic_dir

    target = str(tmp_path / "out")
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "first")
    real_replace = os.replace

    def fail_the_new_copy(source: str, destination: str) -> None:
        if os.path.normpath(destination) == target and not source.endswith(".old"):
            raise OSError(errno.EIO, "Input/output error", source)
        real_replace(source, destination)

    monkeypatch.setattr(atomic_dir.os, "replace", fail_the_new_copy)
    with pytest.raises(OSError, match="Input/output error"):
        with atomic_directory(target, "output", ("a.txt",)) as tmp:
            _write(tmp, "a.txt", "second")
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "first"
    assert sorted(os.listdir(tmp_path)) == ["out"]  # neither the new copy nor a hidden .out.old left
    monkeypatch.undo()
    with atomic_directory(target, "output", ("a.txt",)) as tmp:
        _write(tmp, "a.txt", "third")
    assert (tmp_path / "out" / "a.txt").read_text(encoding="utf-8") == "third"


def test_temp_directories_of_several_killed_runs_are_named_together(tmp_path, capsys) -> None:
    for name in (".out.k1ll3d", ".out.k2ll3d"):
        (tmp_path / name).mkdir()
    with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("{}")
    err = capsys.readouterr().err
    assert f"{tmp_path}: .out.k1ll3d, .out.k2ll3d left by an earlier export of {tmp_path / 'out'} that was killed; " \
           "delete them\n" in err


def test_a_lock_file_that_cannot_be_made_is_the_opens_own_error(tmp_path, monkeypatch):
    """No lock file to fall back on in a directory this user cannot write: the PermissionError of the open, not a
    FileNotFoundError of a read-only open."""
    from recsys_llm import atomic_dir

    lock = tmp_path / ".out.lock"
    _refusing_append(monkeypatch, lock)
    with pytest.raises(PermissionError, match="Permission denied"):
        atomic_dir.try_lock(str(lock))
    assert not lock.exists()


def test_another_users_lock_file_on_nfs_that_cannot_be_locked_read_only_is_named(tmp_path, monkeypatch):
    """An NFS client emulates flock(2) with byte-range locks, which refuse a file opened for reading (EBADF): the
    error names the other user's lock file and who may delete it, not 'Bad file descriptor'."""
    import errno

    from recsys_llm import atomic_dir

    lock = tmp_path / ".out.lock"
    lock.write_text("")
    _refusing_append(monkeypatch, lock)

    def flock(handle, operation):
        raise OSError(errno.EBADF, "Bad file descriptor")

    monkeypatch.setattr(atomic_dir.fcntl, "flock", flock)
    with pytest.raises(PermissionError, match="another user's lock file, which this user can neither write nor lock "
                                              "here; its owner .* may delete it"):
        atomic_dir.try_lock(str(lock))


def test_a_lock_file_this_user_cannot_remove_is_left_unlocked(tmp_path, monkeypatch):
    """Another user's lock file in a sticky directory cannot be removed at the block's end: it is left there, and
    closed, so the next job locks it."""
    from recsys_llm import atomic_dir

    lock = tmp_path / ".out.lock"
    remove = os.remove

    def no_remove(path, *args, **kwargs):
        if str(path) == str(lock):
            raise PermissionError(1, "Operation not permitted", str(path))
        return remove(path, *args, **kwargs)

    monkeypatch.setattr(os, "remove", no_remove)
    with atomic_dir.file_locked(str(lock), "held"):
        pass
    assert lock.is_file()
    handle = atomic_dir.try_lock(str(lock))
    assert handle is not None  # not held any more
    handle.close()


def test_a_files_set_group_id_bit_is_not_kept(tmp_path):
    """Only a directory keeps its set-group-ID bit through the chmod to the umask's permissions: a file's is cleared
    as os.makedirs' and open's permissions would have it."""
    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)) as tmp:
            _write(tmp, "a.txt", "x")
            os.chmod(os.path.join(tmp, "a.txt"), 0o2644)
    finally:
        os.umask(umask)
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o7777 == 0o644
