import os
import re
import warnings
from typing import List

import pytest
import torch

from recsys_llm.data.schema import DatasetSchema
from recsys_llm.semantics.encoder import TextEncoder
from recsys_llm.semantics.store import (
    VectorProvenance, VectorProvenanceError, cached_encode, load_vectors, save_vectors, texts_hash,
)
from tests.semantics.conftest import make_schema


class CountingEncoder(TextEncoder):
    """A real TextEncoder that counts how often it runs the model."""

    calls: int = 0

    def encode(self, texts: List[str], progress: bool = True) -> torch.Tensor:
        type(self).calls += 1
        return super().encode(texts, progress)


def _provenance() -> VectorProvenance:
    return VectorProvenance(model_id="m", model_hash="h1", pooling="mean", template="{name}")


class TestVectorStore:
    def test_round_trip(self, tmp_path, tiny_schema: DatasetSchema) -> None:
        path = str(tmp_path / "v.safetensors")
        vectors = torch.randn(2, 8)
        save_vectors(path, vectors, ["color", "city"], _provenance().for_schema(tiny_schema))
        stored = load_vectors(path, schema=tiny_schema, expected={"pooling": "mean"})
        torch.testing.assert_close(stored.vectors, vectors)
        assert stored.keys == ["color", "city"]
        assert stored.provenance.schema_fingerprint == tiny_schema.fingerprint()
        assert stored.provenance.schema_fields == ["color", "city", "user_id", "C1", "price"]
        assert not [name for name in os.listdir(tmp_path) if ".tmp" in name]  # atomic write left no temp file

    def test_other_schema_is_rejected_with_clear_message(self, tmp_path, tiny_schema: DatasetSchema) -> None:
        path = str(tmp_path / "v.safetensors")
        save_vectors(path, torch.randn(2, 8), ["color", "city"], _provenance().for_schema(tiny_schema))
        other = make_schema(str(tmp_path / "other"), name="other", descriptions=False)
        with pytest.raises(VectorProvenanceError) as error:
            load_vectors(path, schema=other)
        message = str(error.value)
        # the fingerprints of what field vectors depend on (names, kinds, descriptions, order, label)
        assert path in message and tiny_schema.semantic_fingerprint() in message
        assert other.semantic_fingerprint() in message
        assert "'tiny'" in message and "'other'" in message and "re-encode" in message.lower()

    def test_a_directory_is_named_as_one_not_as_an_unreadable_file(self, tmp_path) -> None:
        # llactr.vectors_path=runs/ssft (the tune's output directory): safetensors' own error was
        # "not a readable safetensors vector file: No such device (os error 19)"
        with pytest.raises(VectorProvenanceError, match=rf"{tmp_path}: is a directory, not a field-vector file; give "
                                                        r"the \.safetensors file `recsys-llm semantics encode --output` "
                                                        r"wrote"):
            load_vectors(str(tmp_path))

    @pytest.mark.usefixtures("ends_the_run_if_it_waits")  # a FIFO read would wait for good
    def test_a_fifo_is_refused_not_waited_on(self, tmp_path) -> None:
        # llactr.vectors_path naming a named pipe: safetensors' open would block until a writer came
        path = str(tmp_path / "v.safetensors")
        os.mkfifo(path)
        with pytest.raises(VectorProvenanceError, match=rf"{re.escape(path)}: is a named pipe \(FIFO\), not a "
                                                        r"field-vector file"):
            load_vectors(path)

    def test_expected_mismatch_and_bad_shapes(self, tmp_path) -> None:
        path = str(tmp_path / "v.safetensors")
        save_vectors(path, torch.randn(2, 8), ["a", "b"], _provenance())
        with pytest.raises(VectorProvenanceError, match="pooling='mean', expected 'last_token'"):
            load_vectors(path, expected={"pooling": "last_token"})
        with pytest.raises(ValueError, match="shape"):
            save_vectors(path, torch.randn(3, 8), ["a", "b"], _provenance())
        with pytest.raises(ValueError, match="distinct"):
            save_vectors(path, torch.randn(2, 8), ["a", "a"], _provenance())


class TestCachedEncode:
    def test_second_call_hits_cache(self, tmp_path, tiny_llama_dir: str, capsys) -> None:
        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2", "price"]
        first = cached_encode(encoder, texts, "t1", str(tmp_path), progress=False)
        second = cached_encode(encoder, texts, "t1", str(tmp_path), progress=True)
        assert CountingEncoder.calls == 1
        # a hit says so (with progress): its vectors are the same as an encode's
        assert re.fullmatch(rf"\[recsys_llm\] encode cache: the vectors of the 3 texts read from "
                            rf"{re.escape(str(tmp_path))}/\w+\.safetensors, not encoded again",
                            capsys.readouterr().err.splitlines()[-1])
        torch.testing.assert_close(first, second, atol=0, rtol=0)
        cached_encode(encoder, texts, "t2", str(tmp_path), progress=False)  # other template: miss
        cached_encode(encoder, texts[:2], "t1", str(tmp_path), progress=False)  # other texts: miss
        assert CountingEncoder.calls == 3
        # the same model in bf16 (what dtype=auto picks on CUDA): another key, and its dtype recorded
        half = CountingEncoder(tiny_llama_dir, dtype="bfloat16")
        assert (encoder.dtype, half.dtype) == ("float32", "bfloat16")
        cached_encode(half, texts, "t1", str(tmp_path), progress=False)
        assert CountingEncoder.calls == 4
        dtypes = {load_vectors(str(path)).provenance.extra["dtype"] for path in tmp_path.glob("*.safetensors")}
        assert dtypes == {"float32", "bfloat16"}
        # both entries stay: the float32 one is still a hit (a key without the dtype would have the bf16 encode
        # replace it, and the two dtypes evict each other's entry on every run)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            cached_encode(encoder, texts, "t1", str(tmp_path), progress=False)
        assert CountingEncoder.calls == 4

    def test_a_damaged_cache_file_is_encoded_again_and_replaced(self, tmp_path, tiny_llama_dir: str) -> None:
        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2"]
        first = cached_encode(encoder, texts, "t1", str(tmp_path), progress=False)
        (path,) = tmp_path.glob("*.safetensors")
        path.write_bytes(path.read_bytes()[:40])  # cut short, as by a full disk
        with pytest.warns(UserWarning, match=rf"encode cache: {path}: not a readable safetensors vector file: .*; the "
                                             "texts are encoded again and the cache file replaced"):
            again = cached_encode(encoder, texts, "t1", str(tmp_path), progress=False)
        assert CountingEncoder.calls == 2
        torch.testing.assert_close(again, first, atol=0, rtol=0)
        torch.testing.assert_close(load_vectors(str(path)).vectors, first, atol=0, rtol=0)  # replaced
        # readable tensors, damaged metadata
        from safetensors.torch import save_file

        save_file({"vectors": first}, str(path), metadata={"keys": "[", "provenance": "{}"})
        with pytest.raises(VectorProvenanceError, match=r"metadata is not valid JSON .*: damaged, or not written by "):
            load_vectors(str(path))
        with pytest.warns(UserWarning, match="metadata is not valid JSON"):
            cached_encode(encoder, texts, "t1", str(tmp_path), progress=False)
        assert CountingEncoder.calls == 3 and load_vectors(str(path)).keys == ["0", "1"]


    def test_a_cache_file_holding_another_number_of_texts_is_encoded_again(self, tmp_path, tiny_llama_dir: str) -> None:
        """A file under this key whose vectors are not one per text (another entry copied over it) is not returned."""
        import shutil

        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2", "price"]
        expected = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        (path,) = (tmp_path / "a").glob("*.safetensors")
        cached_encode(encoder, texts[:2], "t1", str(tmp_path / "b"), progress=False)
        (other,) = (tmp_path / "b").glob("*.safetensors")
        shutil.copyfile(other, path)  # two vectors under the key of three texts
        again = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        assert CountingEncoder.calls == 3
        torch.testing.assert_close(again, expected, atol=0, rtol=0)
        assert load_vectors(str(path)).vectors.shape == (3, expected.size(1))  # replaced

    def test_a_cache_file_of_other_texts_of_the_same_number_is_encoded_again(self, tmp_path, tiny_llama_dir) -> None:
        import shutil

        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2"]
        expected = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        (path,) = (tmp_path / "a").glob("*.safetensors")
        cached_encode(encoder, ["price", "shade 9"], "t1", str(tmp_path / "b"), progress=False)
        (other,) = (tmp_path / "b").glob("*.safetensors")
        shutil.copyfile(other, path)  # two vectors of two other texts under this key
        with pytest.warns(UserWarning, match=r"texts_sha256=.*, expected .*; the texts are encoded again"):
            again = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        assert CountingEncoder.calls == 3
        torch.testing.assert_close(again, expected, atol=0, rtol=0)

    def test_a_cache_file_of_another_dtype_copied_under_this_key_is_encoded_again(self, tmp_path, tiny_llama_dir) -> None:
        """max_length and dtype are part of the key (the file name) and must be read back too."""
        import shutil

        encoder, half = CountingEncoder(tiny_llama_dir), CountingEncoder(tiny_llama_dir, dtype="bfloat16")
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2"]
        expected = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        (path,) = (tmp_path / "a").glob("*.safetensors")
        cached_encode(half, texts, "t1", str(tmp_path / "b"), progress=False)
        (other,) = (tmp_path / "b").glob("*.safetensors")
        shutil.copyfile(other, path)  # the bf16 vectors of the same texts under the float32 key
        with pytest.warns(UserWarning, match=r"dtype='bfloat16', expected 'float32'; the texts are encoded again"):
            again = cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        assert CountingEncoder.calls == 3
        torch.testing.assert_close(again, expected, atol=0, rtol=0)

    def test_each_template_and_text_set_keeps_its_own_cache_entry(self, tmp_path, tiny_llama_dir: str) -> None:
        """The template and the texts are in the key (the file name): going back and forth between two templates
        or two text sets hits the cache, not one shared file replaced (with a warning) on every switch."""
        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts, fewer = ["shade 1", "town 2", "price"], ["shade 1", "town 2"]
        calls = [(texts, "t1"), (texts, "t2"), (fewer, "t1")]
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for _ in range(2):
                for chosen, template in calls:
                    cached_encode(encoder, chosen, template, str(tmp_path), progress=False)
        assert CountingEncoder.calls == 3 and len(list(tmp_path.glob("*.safetensors"))) == 3

    def test_a_cache_file_of_another_template_copied_under_this_key_is_encoded_again(self, tmp_path,
                                                                                      tiny_llama_dir) -> None:
        """The template recorded in a cache file is read back: one renamed from another template's entry is not
        taken for this one."""
        import shutil

        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        texts = ["shade 1", "town 2"]
        cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        (path,) = (tmp_path / "a").glob("*.safetensors")
        cached_encode(encoder, texts, "t2", str(tmp_path / "b"), progress=False)
        (other,) = (tmp_path / "b").glob("*.safetensors")
        shutil.copyfile(other, path)
        with pytest.warns(UserWarning, match=r"template='t2', expected 't1'; the texts are encoded again"):
            cached_encode(encoder, texts, "t1", str(tmp_path / "a"), progress=False)
        assert CountingEncoder.calls == 3
        assert load_vectors(str(path)).provenance.template == "t1"

    def test_the_texts_hash_tells_where_one_text_ends(self) -> None:
        """Texts are hashed length-prefixed: ["ab"] and ["a", "b"] (or a text moved across a boundary) are other
        texts, and must not share a cache key."""
        hashes = {texts_hash(["ab"]), texts_hash(["a", "b"]), texts_hash(["a", "b", ""]), texts_hash(["ab", ""])}
        assert len(hashes) == 4
        assert texts_hash(["a", "b"]) == texts_hash(["a", "b"])


    def test_a_single_string_is_refused_with_or_without_a_cache(self, tmp_path, tiny_llama_dir: str) -> None:
        """As TextEncoder.encode refuses it: list("price") would encode (and cache) its 5 characters."""
        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        for cache_dir in (None, str(tmp_path / "cache")):
            with pytest.raises(TypeError, match="got the single string 'price'; pass \\[text\\]"):
                cached_encode(encoder, "price", "t1", cache_dir, progress=False)
        assert CountingEncoder.calls == 0 and not os.path.exists(tmp_path / "cache")


    def test_a_text_that_is_not_a_string_is_refused_with_or_without_a_cache(self, tmp_path, tiny_llama_dir) -> None:
        """With a cache, hashing the texts for the key failed first with AttributeError ('int' object has no
        attribute 'encode'), not with the TypeError encode gives without one."""
        encoder = CountingEncoder(tiny_llama_dir)
        CountingEncoder.calls = 0
        for cache_dir in (None, str(tmp_path / "cache")):
            with pytest.raises(TypeError, match=r"^texts\[1\] must be str, got int$"):
                cached_encode(encoder, ["price", 3], "t1", cache_dir, progress=False)
        assert CountingEncoder.calls == 0 and not os.path.exists(tmp_path / "cache")


    def test_a_loaded_model_with_another_tokenizer_misses_the_cache(self, tmp_path, tiny_llama_dir: str) -> None:
        """from_model without a model_hash: the same weights read through another tokenizer (other ids for the
        same words) give other vectors, so they must not hit the vectors cached for the first tokenizer."""
        from tokenizers import Tokenizer, models, pre_tokenizers
        from transformers import AutoModel, AutoTokenizer, PreTrainedTokenizerFast

        own = AutoTokenizer.from_pretrained(tiny_llama_dir)
        vocab = own.get_vocab()
        words = sorted(vocab, key=vocab.get)
        shifted = {word: 6 + (i + 1) % (len(words) - 6) if i >= 6 else i for i, word in enumerate(words)}  # specials kept
        backend = Tokenizer(models.WordLevel(vocab=shifted, unk_token="[UNK]"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        other = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
        model = AutoModel.from_pretrained(tiny_llama_dir)
        texts = ["shade 1", "town 2"]
        first = cached_encode(TextEncoder.from_model(model, own), texts, "t1", str(tmp_path), progress=False)
        second = cached_encode(TextEncoder.from_model(model, other), texts, "t1", str(tmp_path), progress=False)
        torch.testing.assert_close(second, TextEncoder.from_model(model, other).encode(texts, progress=False))
        assert not torch.allclose(first, second) and len(list(tmp_path.glob("*.safetensors"))) == 2


class TestNonFiniteVectors:
    """A NaN vector (e.g. from a model overflowing in float16) must never reach training."""

    def test_save_refuses_nan_and_writes_nothing(self, tmp_path) -> None:
        path = str(tmp_path / "v.safetensors")
        vectors = torch.randn(3, 4)
        vectors[1, 2] = float("nan")
        with pytest.raises(ValueError, match=r"v\.safetensors: not written: the vector of 'b' \(row 1\) holds nan, "
                                             r"and 1 of 3 vectors hold NaN/inf"):
            save_vectors(path, vectors, ["a", "b", "c"], _provenance())
        assert os.listdir(tmp_path) == []
        vectors[1, 2] = float("inf")
        with pytest.raises(ValueError, match=r"'b' \(row 1\) holds inf"):
            save_vectors(path, vectors, ["a", "b", "c"], _provenance())

    def test_load_refuses_a_file_with_nan(self, tmp_path) -> None:
        """A file written before the check (or damaged): refused, naming the file and the field."""
        from safetensors import safe_open
        from safetensors.torch import save_file

        path = str(tmp_path / "v.safetensors")
        save_vectors(path, torch.randn(3, 4), ["a", "b", "c"], _provenance())
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata()
        vectors = torch.randn(3, 4)
        vectors[2, 0] = float("-inf")
        save_file({"vectors": vectors}, path, metadata=metadata)
        with pytest.raises(VectorProvenanceError, match=r"v\.safetensors: the vector of 'c' \(row 2\) holds -inf"):
            load_vectors(path)

    def test_load_warns_of_all_zero_vectors_naming_them(self, tmp_path) -> None:
        """An edited or damaged file of zero vectors trained LLaCTR without a word (FIE's similarities all 0)."""
        path = str(tmp_path / "v.safetensors")
        vectors = torch.randn(3, 4)
        vectors[1] = 0.0
        save_vectors(path, vectors, ["a", "b", "c"], _provenance())
        with pytest.warns(UserWarning, match=r"v\.safetensors: the vectors of \['b'\] \(1 of 3\) are all zeros"):
            assert torch.equal(load_vectors(path).vectors, vectors)
        save_vectors(path, torch.randn(3, 4), ["a", "b", "c"], _provenance())
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            load_vectors(path)

    def test_cached_encode_refuses_nan_before_caching(self, tmp_path, tiny_llama_dir: str, monkeypatch) -> None:
        encoder = TextEncoder(tiny_llama_dir)

        def nan_encode(texts: List[str], progress: bool = True) -> torch.Tensor:
            return torch.full((len(texts), 4), float("nan"))

        monkeypatch.setattr(encoder, "encode", nan_encode)
        with pytest.raises(ValueError, match=r"text 0 \('shade 1'\) was encoded to a vector holding nan, and 2 of 2 "
                                             r"texts to NaN/inf; nothing was cached"):
            cached_encode(encoder, ["shade 1", "town 2"], "t1", str(tmp_path / "cache"), progress=False)
        assert not os.path.exists(tmp_path / "cache") or os.listdir(tmp_path / "cache") == []


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_vector_files_get_the_mode_the_umask_allows(tmp_path, umask: int) -> None:
    """safetensors writes 0600 files: other users of a shared cluster could not read them."""
    path = str(tmp_path / "v.safetensors")
    old = os.umask(umask)
    try:
        save_vectors(path, torch.randn(2, 4), ["a", "b"], _provenance())
    finally:
        os.umask(old)
    assert os.stat(path).st_mode & 0o777 == 0o666 & ~umask


def test_vector_files_are_synced_before_the_rename_and_a_failed_save_keeps_the_old_file(tmp_path, monkeypatch) -> None:
    """``save_vectors`` renamed an unsynced temp file over the vectors: a power loss after the rename
    could leave an empty file where a whole one had been."""
    path = str(tmp_path / "v.safetensors")
    save_vectors(path, torch.ones(2, 4), ["a", "b"], _provenance())
    synced: List[int] = []
    monkeypatch.setattr(os, "fsync", synced.append)
    save_vectors(path, torch.zeros(2, 4), ["a", "b"], _provenance())
    assert synced

    def interrupted(fd: int) -> None:
        raise KeyboardInterrupt()

    monkeypatch.setattr(os, "fsync", interrupted)
    with pytest.raises(KeyboardInterrupt):
        save_vectors(path, torch.full((2, 4), 2.0), ["a", "b"], _provenance())
    monkeypatch.undo()
    assert load_vectors(path).vectors.sum() == 0 and os.listdir(tmp_path) == ["v.safetensors"]


def test_a_cache_file_recording_max_length_in_extra_still_matches(tmp_path) -> None:
    """Cache files written before ``max_length`` became a provenance field keep it in ``extra``."""
    path = str(tmp_path / "old.safetensors")
    older = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="t", extra={"max_length": 256})
    save_vectors(path, torch.ones(1, 4), ["0"], older)
    assert load_vectors(path, expected={"max_length": 256}).provenance.max_length is None
    with pytest.raises(VectorProvenanceError, match="max_length=256, expected 128"):
        load_vectors(path, expected={"max_length": 128})


def test_an_output_directory_that_cannot_be_written_is_named_before_the_encode(tmp_path, monkeypatch) -> None:
    """`semantics encode --output ro/v.safetensors` encoded every field, then failed on its temp file's name
    ('Permission denied: ro/v.safetensors.1592cbf8.tmp'). Root writes anywhere but on a read-only mount, so the
    directory's refusal is stood in for."""
    from recsys_llm.semantics.store import check_vector_output

    locked = tmp_path / "ro"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    for target in (locked / "v.safetensors", locked / "new" / "v.safetensors"):
        with pytest.raises(PermissionError, match=f"^{target}: cannot be written: {locked} is not writable here"):
            check_vector_output(str(target))
    check_vector_output(str(tmp_path / "v.safetensors"))  # a writable directory passes


@pytest.mark.parametrize("vectors, metadata, expected", [
    (torch.ones(2, 3, dtype=torch.int64), None, r"vectors of dtype torch\.int64; expected floating-point vectors"),
    (torch.ones(2, 3), {"keys": '[{"a": 1}, "b"]'}, r"metadata 'keys' is not a list of field names"),
    (torch.ones(2, 3), {"keys": "[" * 100_000 + "]" * 100_000}, r"metadata is not valid JSON"),
], ids=["integer vectors", "keys not names", "keys nested past the recursion limit"])
def test_a_vector_file_of_other_types_is_refused_naming_it(tmp_path, vectors, metadata, expected) -> None:
    """Integer vectors trained as if encoded; other keys gave a TypeError or a RecursionError traceback."""
    import json

    from safetensors.torch import save_file

    path = str(tmp_path / "fields.safetensors")
    provenance = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="{name}")
    save_file({"vectors": vectors}, path, metadata={"keys": json.dumps(["a", "b"]),
                                                    "provenance": json.dumps(provenance.to_dict()), **(metadata or {})})
    with pytest.raises(VectorProvenanceError, match=rf"^{path}: {expected}"):
        load_vectors(path)


def test_an_earlier_vector_file_in_a_directory_that_cannot_be_written_is_named_before_the_encode(
        tmp_path, monkeypatch) -> None:
    """Re-encoding over an existing vector file checks its directory too (the file is replaced by a temp file's
    rename there)."""
    from recsys_llm.semantics.store import check_vector_output

    locked = tmp_path / "ro"
    locked.mkdir()
    (locked / "v.safetensors").write_bytes(b"x")
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: str(path) != str(locked) and access(path, mode))
    with pytest.raises(PermissionError, match="is not writable here"):
        check_vector_output(str(locked / "v.safetensors"))


def test_repeated_keys_are_named_once_each_and_nothing_is_written(tmp_path) -> None:
    path = str(tmp_path / "v.safetensors")
    provenance = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="{name}")
    with pytest.raises(ValueError, match=r"v\.safetensors: keys must be distinct, got duplicates \['a', 'c'\]"):
        save_vectors(path, torch.zeros(5, 2), ["c", "a", "b", "a", "c"], provenance)
    assert not os.path.exists(path)


def test_a_vector_file_of_this_schema_keyed_by_names_that_are_no_field_is_refused(tmp_path, tiny_schema) -> None:
    """The schema fingerprints match, but a key that names no field of the schema (a file written with other row
    names) would give a field no vector and a vector no field: it is refused naming the keys."""
    path = str(tmp_path / "v.safetensors")
    save_vectors(path, torch.randn(2, 4), ["color", "colour"], _provenance().for_schema(tiny_schema))
    with pytest.raises(VectorProvenanceError, match=r"keys \['colour'\] are not fields of schema"):
        load_vectors(path, schema=tiny_schema)


def test_a_safetensors_file_with_provenance_but_no_field_vectors_is_not_written_over(tmp_path) -> None:
    """``check_vector_output``: only a file ``save_vectors`` wrote (its ``keys`` and a provenance with a schema
    fingerprint) may be replaced; another safetensors file that carries a provenance (an entity-vector export, a
    file of another tool) was taken for field vectors and replaced by `semantics encode --output`."""
    import json

    from safetensors.torch import save_file

    from recsys_llm.semantics.store import check_vector_output

    provenance = VectorProvenance(model_id="m", model_hash="h", pooling="mean", template="{name}").to_dict()
    other = str(tmp_path / "other.safetensors")
    save_file({"vectors": torch.ones(2, 3)}, other, metadata={"provenance": json.dumps(provenance)})
    with pytest.raises(FileExistsError, match="exists and is not a field-vector file"):
        check_vector_output(other)
    ours = str(tmp_path / "ours.safetensors")
    save_vectors(ours, torch.ones(2, 3), ["a", "b"], VectorProvenance(model_id="m", model_hash="h", pooling="mean",
                                                                       template="{name}", schema_fingerprint="s"))
    check_vector_output(ours)  # its own file: encoded again in place
