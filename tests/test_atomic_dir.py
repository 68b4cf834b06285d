import os

import pytest

from recsys_llm.atomic_dir import atomic_directory


def test_success_replaces_and_failure_keeps_the_old_directory(tmp_path):
    target = str(tmp_path / "out")
    with atomic_directory(target) as tmp:
        with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
            handle.write("first")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_directory(target) as tmp:
            with open(os.path.join(tmp, "a.txt"), "w", encoding="utf-8") as handle:
                handle.write("half-written")
            raise RuntimeError("boom")
    assert (tmp_path / "out" / "a.txt").read_text() == "first"
    with atomic_directory(target) as tmp:
        with open(os.path.join(tmp, "b.txt"), "w", encoding="utf-8") as handle:
            handle.write("second")
    assert sorted(os.listdir(target)) == ["b.txt"]
    assert sorted(os.listdir(tmp_path)) == ["out"]  # no temp or .old directory left behind
