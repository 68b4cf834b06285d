import os

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


def test_the_result_has_the_usual_permissions(tmp_path):
    umask = os.umask(0o022)
    try:
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)) as tmp:
            os.makedirs(os.path.join(tmp, "sub"))
            fd = os.open(os.path.join(tmp, "a.txt"), os.O_CREAT | os.O_WRONLY, 0o600)  # as mkstemp would
            os.close(fd)
    finally:
        os.umask(umask)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "sub").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out" / "a.txt").stat().st_mode & 0o777 == 0o644


def test_a_foreign_dot_old_directory_is_not_swept_away(tmp_path):
    (tmp_path / "out.old").mkdir()
    (tmp_path / "out.old" / "backup.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(FileExistsError, match=r"out.old: not empty and not an earlier output"):
        with atomic_directory(str(tmp_path / "out"), "output", ("a.txt",)):
            raise AssertionError("the block must not run")
    assert (tmp_path / "out.old" / "backup.txt").read_text(encoding="utf-8") == "mine"


def test_temp_directories_of_a_killed_run_are_named(tmp_path, capsys) -> None:
    leftover = tmp_path / ".out.k1ll3d"  # what a SIGKILLed run leaves beside its output
    leftover.mkdir()
    with atomic_directory(str(tmp_path / "out"), "export", ["config.json"]) as tmp:
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as handle:
            handle.write("{}")
    err = capsys.readouterr().err
    assert f"{tmp_path}: .out.k1ll3d left by an earlier export of {tmp_path / 'out'} that was killed" in err
    assert leftover.is_dir()  # named, not removed: another run may still be writing it
