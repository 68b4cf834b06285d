import json
import os
import re
import shutil
import warnings

import pytest
import torch
from transformers import AutoModel, AutoTokenizer

from recsys_llm.semantics.encoder import TextEncoder, default_model_path
from tests.tiny_models import SAMPLE_TEXTS


def _without_pad_token(model_dir: str, target) -> str:
    """A copy of a saved decoder whose tokenizer and config.json name no pad token (as Llama's and GPT-2's)."""
    from tests.tiny_models import copy_model_dir_with_config

    path, _ = copy_model_dir_with_config(model_dir, target, pad_token_id=None)
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenizer.pad_token = None
    tokenizer.save_pretrained(path)
    return path


class TestTextEncoder:
    def test_decoder_last_token_matches_single_text_forward(self, tiny_llama_dir: str) -> None:
        encoder = TextEncoder(tiny_llama_dir, batch_size=2)
        assert encoder.pooling == "last_token"
        vectors = encoder.encode(SAMPLE_TEXTS)  # (5, 64), batched by length
        assert vectors.shape == (5, 64) and vectors.dtype == torch.float32
        model = AutoModel.from_pretrained(tiny_llama_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        for i, text in enumerate(SAMPLE_TEXTS):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(vectors[i], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder.encode(SAMPLE_TEXTS), vectors, atol=0, rtol=0)  # deterministic

    def test_a_decoder_tokenizer_without_a_pad_token_encodes_texts_of_any_lengths(self, tiny_llama_dir: str,
                                                                                tmp_path) -> None:
        """Llama's and GPT-2's tokenizers have no pad token: batching texts of different lengths raised
        "Asking to pad but the tokenizer does not have a padding token". Batches are padded with the eos token,
        which last-token pooling never reads: a text's vector is the same batched with longer ones or alone."""
        path = _without_pad_token(tiny_llama_dir, tmp_path / "no_pad")
        assert AutoTokenizer.from_pretrained(path).pad_token is None
        encoder = TextEncoder(path, batch_size=len(SAMPLE_TEXTS))
        assert encoder.pooling == "last_token"
        vectors = encoder.encode(SAMPLE_TEXTS, progress=False)  # (5, 64), one padded batch
        for i, text in enumerate(SAMPLE_TEXTS):
            torch.testing.assert_close(vectors[i], encoder.encode([text], progress=False)[0], atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(vectors, TextEncoder(tiny_llama_dir).encode(SAMPLE_TEXTS, progress=False),
                                   atol=1e-5, rtol=1e-4)  # as with a pad token of its own
        wrapped = TextEncoder.from_model(AutoModel.from_pretrained(path), AutoTokenizer.from_pretrained(path),
                                         batch_size=len(SAMPLE_TEXTS))  # a model the caller loaded
        torch.testing.assert_close(wrapped.encode(SAMPLE_TEXTS, progress=False), vectors, atol=1e-5, rtol=1e-4)

    def test_a_single_string_is_refused_not_split_into_characters(self, tiny_bert_dir: str) -> None:
        """encode("user id") for encode(["user id"]): list() made it 7 one-character texts, (7, H), silently."""
        encoder = TextEncoder(tiny_bert_dir)
        for call in (encoder.encode, encoder.tokenize, encoder.embed):
            with pytest.raises(TypeError, match=r"expected a sequence of texts, got the single string 'user id'; "
                                                r"pass \[text\]"):
                call("user id")
        assert encoder.encode(["user id"]).shape[0] == 1

    def test_a_text_without_tokens_is_refused_alone_or_in_a_batch(self, tiny_llama_dir: str) -> None:
        """The tests' tokenizer adds no special tokens (as Qwen's): alone, an empty text failed in the forward
        (a reshape error), and batched with others it got the vector of a padding position."""
        encoder = TextEncoder(tiny_llama_dir, batch_size=4)
        for texts in ([""], ["shade 3", " ", "price"]):
            with pytest.raises(ValueError, match=rf"^{encoder.model_id}: the text '\s?' has no tokens \(the "
                                                 r"tokenizer finds none in it and adds no special tokens\)"):
                encoder.encode(texts, progress=False)
        assert encoder.encode(["shade 3", "price"], progress=False).shape[0] == 2

    def test_encoder_model_mean_pooling(self, tiny_bert_dir: str) -> None:
        encoder = TextEncoder(tiny_bert_dir, batch_size=3)
        assert encoder.pooling == "mean"
        vectors = encoder.encode(SAMPLE_TEXTS)
        model = AutoModel.from_pretrained(tiny_bert_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
        ids = tokenizer(SAMPLE_TEXTS[1], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[1], expected, atol=1e-5, rtol=1e-4)

    def test_encoder_decoder_model_reads_with_its_encoder(self, tmp_path) -> None:
        from transformers import T5EncoderModel

        from tests.tiny_models import save_tiny_t5

        path = save_tiny_t5(str(tmp_path / "t5"))
        encoder = TextEncoder(path, batch_size=2)
        assert encoder.pooling == "mean"
        vectors = encoder.encode(SAMPLE_TEXTS)  # (5, 32)
        model = T5EncoderModel.from_pretrained(path).eval()
        ids = AutoTokenizer.from_pretrained(path)(SAMPLE_TEXTS[3], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[3], expected, atol=1e-5, rtol=1e-4)

    def test_from_loaded_model(self, tiny_llama_dir: str) -> None:
        model = AutoModel.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        wrapped = TextEncoder.from_model(model, tokenizer, batch_size=4)
        expected = TextEncoder(tiny_llama_dir).encode(SAMPLE_TEXTS)
        torch.testing.assert_close(wrapped.encode(SAMPLE_TEXTS), expected, atol=1e-5, rtol=1e-4)
        assert len(wrapped.model_hash) == 16

    def test_from_a_loaded_model_with_a_head_or_a_decoder(self, tiny_bert_dir: str, tmp_path) -> None:
        """A *ForSequenceClassification model failed with AttributeError: last_hidden_state, and a whole T5Model
        with a ValueError (it wants decoder inputs): the loaders take the base model, or the encoder, of both."""
        from transformers import AutoModelForSequenceClassification, T5Model

        from tests.tiny_models import save_tiny_t5

        tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
        classifier = AutoModelForSequenceClassification.from_pretrained(tiny_bert_dir, num_labels=2)
        torch.testing.assert_close(TextEncoder.from_model(classifier, tokenizer).encode(SAMPLE_TEXTS),
                                   TextEncoder(tiny_bert_dir).encode(SAMPLE_TEXTS), atol=1e-5, rtol=1e-4)
        t5 = save_tiny_t5(str(tmp_path / "t5"))
        whole = TextEncoder.from_model(T5Model.from_pretrained(t5), AutoTokenizer.from_pretrained(t5))
        torch.testing.assert_close(whole.encode(SAMPLE_TEXTS), TextEncoder(t5).encode(SAMPLE_TEXTS), atol=1e-5, rtol=1e-4)

    def test_a_loaded_tokenizer_set_to_truncate_on_the_left_cuts_texts_at_their_end(self, tiny_llama_dir: str) -> None:
        """from_model kept a tokenizer's ``truncation_side: left`` (load_tokenizer sets it right): a long text
        was cut at its start, where the docs and the cut-off warnings say the end is cut."""
        model = AutoModel.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir, truncation_side="left")
        full = tokenizer("red blue green town city")["input_ids"]
        encoder = TextEncoder.from_model(model, tokenizer, max_length=3)
        input_ids, _ = encoder.tokenize(["red blue green town city"])
        assert input_ids[0].tolist() == full[:3]

    def test_encode_runs_in_eval_mode_and_leaves_the_models_mode_as_it_was(self, tiny_llama_dir: str) -> None:
        """SSFT evaluates (encodes) between training steps: dropout off while encoding, back on after."""
        model = AutoModel.from_pretrained(tiny_llama_dir)
        encoder = TextEncoder.from_model(model, AutoTokenizer.from_pretrained(tiny_llama_dir), batch_size=4)
        modes = []
        model.register_forward_hook(lambda module, inputs, output: modes.append(module.training))
        for training in (True, False):
            model.train(training)
            encoder.encode(SAMPLE_TEXTS[:2], progress=False)
            assert modes.pop() is False and model.training is training
        assert encoder.provenance() == {"model_id": encoder.model_id, "model_hash": encoder.model_hash,
                                        "pooling": "last_token", "max_length": encoder.max_length}

    @pytest.mark.parametrize("max_length", [1, 2])
    def test_a_max_length_leaving_no_token_of_text_is_refused_naming_the_minimum(self, max_length: int) -> None:
        """MiniLM's tokenizer adds [CLS] and [SEP]: at --max-length 1 the length was not applied (texts were not
        cut), at 2 every text was the same [CLS] [SEP] and got the same vector, silently."""
        with pytest.raises(ValueError, match=rf"^{re.escape(default_model_path())}: --max-length {max_length} leaves "
                                             r"no token of text: the tokenizer adds 2 special tokens to every text; "
                                             r"expected --max-length >= 3$"):
            TextEncoder(max_length=max_length)
        model = AutoModel.from_pretrained(default_model_path())
        with pytest.raises(ValueError, match=r"--max-length 2 leaves no token of text"):
            TextEncoder.from_model(model, AutoTokenizer.from_pretrained(default_model_path()), max_length=2)
        assert TextEncoder(max_length=3).tokenize(["a movie about space travel"])[0].shape == (1, 3)

    def test_default_minilm_matches_sentence_transformers(self) -> None:
        texts = ["a movie about space travel", "user age in years", "the genre of the film"]
        encoder = TextEncoder(batch_size=2)
        assert encoder.pooling == "mean" and encoder.dim == 384
        vectors = encoder.encode(texts)
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(default_model_path(), device="cpu").encode(texts, convert_to_tensor=True)
        cosine = torch.nn.functional.cosine_similarity(vectors, reference.cpu(), dim=-1)
        assert bool((cosine > 0.9999).all()), cosine


def test_an_encoders_fingerprint_follows_its_model_trained_in_place_between_encodes(tmp_path, tiny_bert_dir) -> None:
    """A notebook wraps a model, encodes, fine-tunes it a few steps in place and encodes again: the fingerprint,
    memoised at the first encode, stayed the old weights', and the encode cache served their vectors."""
    from recsys_llm.semantics.model_dir import model_dir_fingerprint
    from recsys_llm.semantics.store import cached_encode

    model, tokenizer = AutoModel.from_pretrained(tiny_bert_dir), AutoTokenizer.from_pretrained(tiny_bert_dir)
    wrapped = TextEncoder.from_model(model, tokenizer, pooling="mean")
    loaded = TextEncoder(tiny_bert_dir, pooling="mean", device="cpu")
    cache = str(tmp_path / "cache")
    before = cached_encode(wrapped, SAMPLE_TEXTS, "t", cache, progress=False)
    first, loaded_first = wrapped.model_hash, loaded.model_hash
    assert loaded_first.startswith(model_dir_fingerprint(tiny_bert_dir))
    assert torch.equal(cached_encode(wrapped, SAMPLE_TEXTS, "t", cache, progress=False), before)
    assert wrapped.model_hash == first  # unchanged weights: the same fingerprint, a cache hit
    with torch.no_grad():
        for parameter in (*model.parameters(), *loaded.model.parameters()):
            parameter.add_(0.1 * torch.randn_like(parameter))
    after = cached_encode(wrapped, SAMPLE_TEXTS, "t", cache, progress=False)
    assert wrapped.model_hash != first
    assert loaded.model_hash != loaded_first  # its files no longer hold its weights
    torch.testing.assert_close(after, wrapped.encode(SAMPLE_TEXTS, progress=False))
    assert not torch.allclose(after, before)
    given = TextEncoder.from_model(model, tokenizer, pooling="mean", model_hash="mine")
    with torch.no_grad():
        next(model.parameters()).add_(1.0)
    assert given.model_hash == "mine"  # a caller's fingerprint is kept as given


def test_a_sentence_transformers_max_seq_length_below_max_length_is_warned(tmp_path) -> None:
    """A sentence-transformers directory whose sentence_bert_config.json declares max_seq_length 8: texts read up
    to --max-length 256 tokens are past what the model's own encode reads; the warning names the file."""
    path = shutil.copytree(default_model_path(), str(tmp_path / "st8"))
    with open(os.path.join(path, "sentence_bert_config.json"), "w", encoding="utf-8") as handle:
        json.dump({"max_seq_length": 8, "do_lower_case": False}, handle)
    with pytest.warns(UserWarning, match=r"sentence_bert_config\.json: declares max_seq_length 8, below --max-length 256"):
        TextEncoder(path, max_length=256)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        TextEncoder(path, max_length=8)  # at the declared length: no warning
