"""Fingerprints of a model directory."""

import os



def test_a_remote_code_models_python_files_are_part_of_its_fingerprint(tmp_path, tiny_bert_dir) -> None:
    """Its modeling code changes its vectors as much as its weights do: a cache must not outlive it."""
    import shutil

    from recsys_llm.semantics.model_dir import model_dir_fingerprint

    model = str(tmp_path / "remote")
    shutil.copytree(tiny_bert_dir, model)
    with open(os.path.join(model, "modeling_x.py"), "w") as handle:
        handle.write("SCALE = 1.0\n")
    before = model_dir_fingerprint(model)
    with open(os.path.join(model, "modeling_x.py"), "w") as handle:
        handle.write("SCALE = 3.0\n")
    assert model_dir_fingerprint(model) != before


def _write(path: str, text: str) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as handle:
        handle.write(text)


def test_folders_below_a_model_that_it_does_not_load_leave_its_fingerprint(tmp_path, tiny_bert_dir) -> None:
    """Outputs kept in the model directory (an SSFT adapter, a vector export's manifest) and a hub download's
    onnx/ are not the model: they changed its fingerprint, and the adapters and vectors tied to it were refused."""
    from recsys_llm.semantics.model_dir import model_dir_fingerprint, model_dir_walk_fingerprint
    from tests.tiny_models import copy_model_dir

    model = copy_model_dir(tiny_bert_dir, tmp_path / "model")
    before = model_dir_fingerprint(model)
    assert before == model_dir_walk_fingerprint(model)  # what a directory without subfolders always had
    _write(os.path.join(model, "ssft_out", "adapter", "adapter_config.json"), "{}")
    _write(os.path.join(model, "vectors", "manifest.json"), "{}")
    _write(os.path.join(model, "onnx", "model.onnx_data.bin"), "x")
    assert model_dir_fingerprint(model) == before
    _write(os.path.join(model, "tokenizer_config.json"), "{}")  # the model's own files still count
    assert model_dir_fingerprint(model) != before


def test_a_sentence_transformers_models_module_folders_are_part_of_its_fingerprint(tmp_path, tiny_bert_dir) -> None:
    """The folders modules.json names (1_Pooling: the pooling `auto` reads) count, as they always did."""
    import json

    from recsys_llm.semantics.model_dir import model_dir_fingerprint, model_dir_walk_fingerprint
    from tests.tiny_models import copy_model_dir

    model = copy_model_dir(tiny_bert_dir, tmp_path / "st")
    _write(os.path.join(model, "modules.json"), json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
    ]))
    _write(os.path.join(model, "1_Pooling", "config.json"), json.dumps({"pooling_mode_mean_tokens": True}))
    mean = model_dir_fingerprint(model)
    assert mean == model_dir_walk_fingerprint(model)  # unchanged for a directory holding only its modules
    _write(os.path.join(model, "1_Pooling", "config.json"), json.dumps({"pooling_mode_cls_token": True}))
    assert model_dir_fingerprint(model) != mean


def test_hashing_a_large_model_file_shows_a_bar_on_rank_0_only(tmp_path, tiny_bert_dir, capsys, monkeypatch) -> None:
    """A 16 GB model's files took about 35 s to hash before each LLM command's work, with nothing in the log."""
    import hashlib
    import shutil

    from recsys_llm import file_hash
    from recsys_llm.semantics import model_dir

    monkeypatch.setattr(file_hash, "BAR_BYTES", 0)  # every file counts as large
    copy = shutil.copytree(tiny_bert_dir, tmp_path / "model")
    for rank, shown in (("1", False), ("0", True)):
        monkeypatch.setenv("RANK", rank)
        model_dir._FILE_HASHES.clear()
        model_dir.model_dir_fingerprint(str(copy))
        err = capsys.readouterr().err
        files = sum(1 for path in copy.iterdir() if path.suffix in (".json", ".safetensors", ".txt"))
        assert (f"hashing {files} files of model (the vectors' provenance)" in err) == shown, err
    weights = next(str(path) for path in copy.iterdir() if path.suffix == ".safetensors")
    with open(weights, "rb") as handle:
        assert file_hash.file_sha256(weights, chunk=1000, description="x") == hashlib.sha256(handle.read()).hexdigest()


def test_files_hashed_side_by_side_keep_their_order(tmp_path, monkeypatch) -> None:
    """A model's weight shards are hashed on several threads; each hash must stay with its file."""
    import hashlib

    from recsys_llm import file_hash

    monkeypatch.setattr(file_hash.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    paths = []
    for index, size in enumerate((3_000_000, 10, 0, 700_001, 1)):
        paths.append(str(tmp_path / f"part-{index}.safetensors"))
        with open(paths[-1], "wb") as handle:
            handle.write(bytes([index]) * size)
    expected = []
    for path in paths:
        with open(path, "rb") as handle:
            expected.append(hashlib.sha256(handle.read()).hexdigest())
    assert file_hash.files_sha256(paths, chunk=4096) == expected
    assert file_hash.files_sha256(paths[::-1], chunk=4096) == expected[::-1]


def _sha256_of(path: str) -> str:
    import hashlib

    with open(path, "rb") as handle:
        return hashlib.sha256(handle.read()).hexdigest()


def _fingerprint_of(model: str, files: list) -> str:
    """The recorded formula: 16 hex digits of sha256 over "<path in the model>:<sha256 of the file>\\n", in order."""
    import hashlib

    digest = hashlib.sha256()
    for rel in files:
        digest.update(f"{rel}:{_sha256_of(os.path.join(model, rel))}\n".encode())
    return digest.hexdigest()[:16]


def test_fingerprints_hashed_side_by_side_are_those_recorded_before(tmp_path, monkeypatch) -> None:
    """Exports, SSFT adapters and CTR-adapted LLMs record these fingerprints: hashing the files on several threads
    must give the same digits, or everything recorded before is refused as made by another model."""
    import json

    from recsys_llm import file_hash
    from recsys_llm.semantics import model_dir

    monkeypatch.setattr(file_hash.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    model = str(tmp_path / "model")
    for rel, text in (("config.json", "{}"), ("model-00001-of-00002.safetensors", "a" * 5000),
                      ("model-00002-of-00002.safetensors", "b" * 7), ("tokenizer.json", "{\"v\": 1}"),
                      ("README.md", "card"), (".cache.json", "{}"), ("notes.csv", "x"),
                      ("1_Pooling/config.json", "{\"pooling_mode_mean_tokens\": true}"), ("onnx/model.bin", "o")):
        _write(os.path.join(model, rel), text)
    _write(os.path.join(model, "modules.json"), json.dumps([
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
    model_dir._FILE_HASHES.clear()
    top = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "modules.json",
           "tokenizer.json"]
    assert model_dir.model_dir_fingerprint(model) == _fingerprint_of(model, top + ["1_Pooling/config.json"])
    assert model_dir.model_dir_fingerprint(model, subdirectories=False) == _fingerprint_of(model, top)
    weights = ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    assert model_dir.model_weights_fingerprint(model) == _fingerprint_of(model, weights)
    assert model_dir.file_fingerprint(os.path.join(model, "tokenizer.json")) == _sha256_of(
        os.path.join(model, "tokenizer.json"))


def test_one_bar_counts_every_byte_of_the_files_hashed_together(tmp_path, monkeypatch) -> None:
    """The bar is shown when the files add up to BAR_BYTES (a model's shards, each below it), and counts them all."""
    from recsys_llm import file_hash

    bars = []

    class Bar:
        def __init__(self, total: int, disable: bool, **_: object) -> None:
            self.total, self.shown, self.counted = total, not disable, 0
            bars.append(self)

        def update(self, n: int) -> None:
            self.counted += n

        def __enter__(self) -> "Bar":
            return self

        def __exit__(self, *_: object) -> None:
            return None

    monkeypatch.setattr(file_hash, "tqdm", Bar)
    monkeypatch.setattr(file_hash, "BAR_BYTES", 100)
    monkeypatch.setenv("RANK", "0")
    paths = []
    for index in range(3):
        paths.append(str(tmp_path / f"shard-{index}.safetensors"))
        with open(paths[-1], "wb") as handle:
            handle.write(b"x" * 60)  # each below BAR_BYTES, together above
    file_hash.files_sha256(paths, description="hashing", chunk=16)
    file_hash.files_sha256(paths[:1], description="hashing", chunk=16)
    assert [(bar.total, bar.shown, bar.counted) for bar in bars] == [(180, True, 180), (60, False, 60)]


def _copy_with_times(source: str, target: str, mtime_ns: int) -> None:
    """``source``'s files copied to ``target`` with one fixed mtime (a tar archive's, ``cp -a`` of files written in
    the same second)."""
    import shutil

    shutil.copytree(source, target)
    for name in os.listdir(target):
        os.utime(os.path.join(target, name), ns=(mtime_ns, mtime_ns))


def test_another_model_copied_to_the_same_path_with_the_same_sizes_and_times_gets_its_own_fingerprint(tmp_path) -> None:
    """In one process (a notebook) a model put where another one was, by a copy that keeps times, has files of the
    same sizes and mtimes: memoised on those alone, it got the first model's fingerprint, and an encode cache served
    the first model's vectors for it."""
    import shutil

    from recsys_llm.semantics.model_dir import model_dir_fingerprint

    first, second, model = str(tmp_path / "first"), str(tmp_path / "second"), str(tmp_path / "model")
    _write(os.path.join(first, "config.json"), "{}")
    _write(os.path.join(first, "model.safetensors"), "a" * 64)
    _write(os.path.join(second, "config.json"), "{}")
    _write(os.path.join(second, "model.safetensors"), "b" * 64)  # other weights, the same size
    fresh = {}
    for name, source in (("first", first), ("second", second)):
        _copy_with_times(source, model, 10**18)
        fresh[name] = model_dir_fingerprint(model)
        shutil.rmtree(model)
    assert fresh["first"] != fresh["second"]
    _copy_with_times(second, model, 10**18)
    assert model_dir_fingerprint(model) == fresh["second"]  # memoised: the same files give it again


def test_a_safetensors_header_beyond_the_librarys_limit_is_named_without_reading_it(tmp_path) -> None:
    """A file claiming a header of 200 MB (a sparse file of that size: nothing is written) was read into memory in one
    piece before its JSON was parsed; the safetensors library refuses such a header anyway."""
    import struct

    from recsys_llm.semantics.model_dir import SAFETENSORS_HEADER_LIMIT, safetensors_damage

    path = tmp_path / "model.safetensors"
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 2 * SAFETENSORS_HEADER_LIMIT))
        handle.truncate(8 + 2 * SAFETENSORS_HEADER_LIMIT)
    assert safetensors_damage(str(path)) == (f"header of {2 * SAFETENSORS_HEADER_LIMIT} bytes, beyond safetensors' "
                                             f"limit of {SAFETENSORS_HEADER_LIMIT}")
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", 100) + b"{}")
    assert safetensors_damage(str(path)) == "truncated: header of 100 bytes, file of 10 bytes"
