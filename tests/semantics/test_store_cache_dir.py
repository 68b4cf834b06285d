"""``semantics encode --cache-dir``: a file given as the cache directory is named with the option,
before anything is encoded (it was ``[Errno 17] File exists``, after encoding)."""

import os

import pytest

from recsys_llm.cli import main
from recsys_llm.semantics.store import cached_encode, check_cache_dir


class NeverEncodes:
    """An encoder that must not run."""

    model_hash, model_id, pooling, max_length, dtype = "h", "m", "mean", 16, "float32"

    def encode(self, texts, progress=True):
        raise AssertionError("encoded although the cache directory cannot take the vectors")


@pytest.fixture()
def a_file(tmp_path) -> str:
    path = tmp_path / "README.md"
    path.write_text("notes", encoding="utf-8")
    return str(path)


def test_a_file_as_cache_dir_is_refused_before_encoding(a_file) -> None:
    expected = (f"--cache-dir {a_file}: is a file, expected a directory for the encoded-text cache; give a "
                "directory path (made if missing), or leave --cache-dir out for no cache")
    with pytest.raises(NotADirectoryError) as refused:
        cached_encode(NeverEncodes(), ["shade 1"], "t1", a_file, progress=False)
    assert str(refused.value) == expected
    below = os.path.join(a_file, "cache")  # a file on the way to the directory
    with pytest.raises(NotADirectoryError, match=f"^--cache-dir {below}: {a_file} is a file, expected a directory"):
        check_cache_dir(below)
    with open(a_file, encoding="utf-8") as handle:
        assert handle.read() == "notes"


def test_a_directory_or_a_path_to_make_is_accepted(tmp_path) -> None:
    check_cache_dir(None)
    check_cache_dir(str(tmp_path))
    check_cache_dir(str(tmp_path / "new" / "cache"))  # made when the first entry is written
    assert not os.path.exists(tmp_path / "new")


def test_encode_names_the_option(tmp_path, tiny_schema, tiny_bert_dir, a_file, capsys) -> None:
    output = str(tmp_path / "f.safetensors")
    code = main(["semantics", "encode", "--schema", tiny_schema.root, "--model", tiny_bert_dir, "--output", output,
                 "--cache-dir", a_file])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err
    assert (f"recsys-llm semantics encode: error: --cache-dir {a_file}: is a file, expected a directory for the "
            "encoded-text cache") in err
    assert "File exists" not in err and not os.path.exists(output)


class CountingEncoder:
    model_hash, model_id, pooling, max_length, dtype = "h", "m", "mean", 16, "float32"

    def __init__(self) -> None:
        self.calls = 0

    def encode(self, texts, progress=True):
        import torch

        self.calls += 1
        return torch.ones(len(texts), 3)


@pytest.mark.parametrize("errno_name", ["EROFS", "EACCES"])
def test_a_cache_this_user_cannot_write_gives_the_vectors_with_a_warning(tmp_path, monkeypatch, errno_name) -> None:
    """A shared cache on a read-only mount (or another user's): its hits were read, but a miss encoded every text
    and then ended the command with "[Errno 30] Read-only file system: '<cache>/<key>.safetensors.<id>.tmp'",
    no --output written."""
    import errno

    from recsys_llm.semantics import store

    def refused(path, *args, **kwargs):
        code = getattr(errno, errno_name)
        raise (PermissionError if code == errno.EACCES else OSError)(code, os.strerror(code), path + ".1234abcd.tmp")

    monkeypatch.setattr(store, "save_vectors", refused)
    encoder = CountingEncoder()
    with pytest.warns(UserWarning, match=f"encode cache: {tmp_path} cannot be written here .*not cached"):
        vectors = cached_encode(encoder, ["shade 1", "shade 2"], "t1", str(tmp_path), progress=False)
    assert tuple(vectors.shape) == (2, 3) and encoder.calls == 1


def test_a_full_cache_disk_still_ends_the_command(tmp_path, monkeypatch) -> None:
    import errno

    from recsys_llm.semantics import store

    def full(path, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

    monkeypatch.setattr(store, "save_vectors", full)
    with pytest.raises(OSError, match="No space left"):
        cached_encode(CountingEncoder(), ["shade 1"], "t1", str(tmp_path), progress=False)
