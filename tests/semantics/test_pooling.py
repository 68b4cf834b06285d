"""Which pooling a model gets (by kind, or as a sentence-transformers directory declares it), the pooling
itself, and the width of the states it pools."""

import json
import warnings

import pytest
import torch
from transformers import BertConfig, LlamaConfig

from recsys_llm.semantics.encoder import TextEncoder
from recsys_llm.semantics.pooling import pool, resolve_pooling
from tests.tiny_models import (
    SAMPLE_TEXTS,
    copy_model_dir,
    save_with_tokenizer,
    tiny_gemma3_multimodal,
    tiny_opt_projected,
    tiny_vocab_size,
)


class TestPool:
    def test_mean_and_last_token_with_right_and_left_padding(self) -> None:
        torch.manual_seed(0)
        hidden = torch.randn(2, 4, 3)
        right = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
        left = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]])
        torch.testing.assert_close(pool(hidden, right, "last_token"), torch.stack([hidden[0, 1], hidden[1, 3]]))
        torch.testing.assert_close(pool(hidden, left, "last_token"), torch.stack([hidden[0, 3], hidden[1, 3]]))
        torch.testing.assert_close(pool(hidden, left, "cls"), torch.stack([hidden[0, 2], hidden[1, 0]]))
        torch.testing.assert_close(pool(hidden, right, "mean"), torch.stack([hidden[0, :2].mean(0), hidden[1].mean(0)]))

    def test_a_bfloat16_mean_is_summed_in_float32(self) -> None:
        """300 tokens: their bfloat16 sum, rounded before the division, would move the mean."""
        torch.manual_seed(0)
        hidden = (torch.randn(1, 300, 8) + 100).to(torch.bfloat16)
        mask = torch.ones(1, 300, dtype=torch.int64)
        pooled = pool(hidden, mask, "mean")
        assert pooled.dtype == torch.bfloat16
        torch.testing.assert_close(pooled, hidden.float().mean(1).to(torch.bfloat16), rtol=0, atol=0)

    def test_resolve_pooling(self) -> None:
        assert resolve_pooling("auto", LlamaConfig()) == "last_token"
        assert resolve_pooling("auto", BertConfig()) == "mean"
        assert resolve_pooling("cls", LlamaConfig()) == "cls"
        with pytest.raises(ValueError, match="pooling must be one of"):
            resolve_pooling("max", BertConfig())


def test_auto_pooling_of_an_encoder_decoder_models_encoder_is_mean() -> None:
    """mT5 / UMT5 tokenizers have no mask token: the encoder stack is bidirectional all the same."""
    from transformers import MT5Config, UMT5Config

    from tests.tiny_models import make_tokenizer

    no_mask = make_tokenizer(with_mask=False)
    assert resolve_pooling("auto", MT5Config(), no_mask) == "mean"
    encoder_only = UMT5Config(architectures=["UMT5EncoderModel"], is_encoder_decoder=False)
    assert resolve_pooling("auto", encoder_only, no_mask) == "mean"
    assert resolve_pooling("auto", LlamaConfig(), no_mask) == "last_token"


def test_auto_pooling_of_an_unknown_model_type_follows_its_tokenizers_mask_token() -> None:
    """A model type neither list knows, with no architecture to tell: a tokenizer without a mask token is a
    decoder's (last token), one with a mask token an encoder's (mean)."""
    from transformers import PretrainedConfig

    from tests.tiny_models import make_tokenizer

    unknown = PretrainedConfig()
    assert resolve_pooling("auto", unknown, make_tokenizer(with_mask=False)) == "last_token"
    assert resolve_pooling("auto", unknown, make_tokenizer(with_mask=True)) == "mean"
    assert resolve_pooling("auto", unknown) == "mean"


def _tiny_t5gemma() -> torch.nn.Module:
    from transformers import T5GemmaConfig, T5GemmaModel

    stack = dict(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    return T5GemmaModel(T5GemmaConfig(encoder=stack, decoder=stack, vocab_size=tiny_vocab_size()))


def _tiny_t5gemma2() -> torch.nn.Module:
    from transformers import T5Gemma2Config, T5Gemma2Model

    text = dict(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    encoder = dict(text_config=text, vision_config=vision, mm_tokens_per_image=4)
    return T5Gemma2Model(T5Gemma2Config(encoder=encoder, decoder=text, vocab_size=tiny_vocab_size()))


@pytest.mark.parametrize("build", [_tiny_t5gemma, _tiny_t5gemma2], ids=["t5gemma", "t5gemma2"])
def test_auto_pooling_of_a_t5gemma_directorys_encoder_is_mean(tmp_path, build) -> None:
    """A T5Gemma (2) directory as shipped (encoder and decoder): its encoder stack has a config of its own that is
    not marked encoder-decoder, and the Gemma tokenizer has no mask token; the stack is bidirectional all the
    same, so it is mean-pooled as the docs say of an encoder-decoder model's encoder."""
    torch.manual_seed(0)
    encoder = TextEncoder(save_with_tokenizer(build(), tmp_path / "model"))
    assert encoder.pooling == "mean"


def test_auto_pooling_of_a_decoder_type_made_bidirectional_is_mean(tmp_path) -> None:
    """EmbeddingGemma is a gemma3_text model with use_bidirectional_attention: an encoder (mean, as its
    1_Pooling says), also in a copy without the sentence-transformers files; the causal one keeps the last token."""
    from transformers import Gemma3TextConfig, Gemma3TextModel

    for bidirectional, expected in ((True, "mean"), (False, "last_token")):
        torch.manual_seed(0)
        config = Gemma3TextConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64,
                                  num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, head_dim=8,
                                  max_position_embeddings=128, pad_token_id=0,
                                  use_bidirectional_attention=bidirectional)
        path = save_with_tokenizer(Gemma3TextModel(config), tmp_path / str(bidirectional))
        assert TextEncoder(path).pooling == expected


@pytest.mark.parametrize("mode, expected", [("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last_token"),
                                            ("pooling_mode_max_tokens", "mean")])
def test_auto_pooling_of_a_sentence_transformers_directory_is_its_own(tiny_bert_dir, tmp_path, mode, expected) -> None:
    """BGE declares CLS pooling in 1_Pooling/config.json; a mode not computed here (max) leaves the rule by kind."""
    path = copy_model_dir(tiny_bert_dir, tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps({**modes, mode: True}))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert TextEncoder(path).pooling == expected
    # max pooling became mean without a word: the vectors differed from sentence-transformers' encode
    assert [str(w.message).split(":")[0] for w in caught if "is not computed here" in str(w.message)] == (
        [str(tmp_path / "st" / "1_Pooling" / "config.json")] if mode == "pooling_mode_max_tokens" else [])
    assert TextEncoder(path, pooling="mean").pooling == "mean"


@pytest.mark.parametrize("mode, expected", [("cls", "cls"), (["lasttoken"], "last_token"), ("max", "mean")])
def test_auto_pooling_reads_the_pooling_mode_newer_sentence_transformers_write(tiny_bert_dir, tmp_path, mode,
                                                                               expected) -> None:
    path = copy_model_dir(tiny_bert_dir, tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": mode, "include_prompt": True}))
    assert TextEncoder(path).pooling == expected


def test_a_dense_module_that_is_not_applied_is_warned_about(tiny_bert_dir, tmp_path) -> None:
    """sentence-t5, LaBSE and distiluse project the pooled state with a Dense module that is not applied here:
    their vectors silently differed from the model's own (another width, too)."""
    path = copy_model_dir(tiny_bert_dir, tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
               {"idx": 2, "name": "2", "path": "2_Dense", "type": "sentence_transformers.models.Dense"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    with pytest.warns(UserWarning, match=r"modules\.json: lists Dense module\(s\) \['2_Dense'\], which are not "
                                         r"applied: the vectors are the model's pooled hidden states"):
        encoder = TextEncoder(path, pooling="mean")
    assert encoder.dim == 32


def test_dim_is_the_width_of_the_hidden_states(tmp_path) -> None:
    for name, model in (("opt", tiny_opt_projected()), ("gemma3", tiny_gemma3_multimodal())):
        encoder = TextEncoder(save_with_tokenizer(model, tmp_path / name))
        assert encoder.dim == encoder.encode(SAMPLE_TEXTS[:2], progress=False).shape[1] == (16 if name == "opt" else 32)
        assert encoder.encode([], progress=False).shape == (0, encoder.dim)


def test_a_t5gemma_encoder_is_as_wide_as_its_encoder(tmp_path) -> None:
    """T5Gemma's get_text_config() is its decoder's; the vectors come from its encoder (here wider)."""
    from transformers import T5GemmaConfig, T5GemmaEncoderModel

    def stack(width: int) -> dict:
        return dict(vocab_size=tiny_vocab_size(), hidden_size=width, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128,
                    pad_token_id=0)

    torch.manual_seed(0)
    config = T5GemmaConfig(encoder=stack(48), decoder=stack(32), is_encoder_decoder=False, vocab_size=tiny_vocab_size())
    encoder = TextEncoder(save_with_tokenizer(T5GemmaEncoderModel(config), tmp_path / "t5gemma"))
    assert encoder.dim == encoder.encode(SAMPLE_TEXTS[:1], progress=False).shape[1] == 48


def test_which_models_return_their_last_hidden_state_by_class_name() -> None:
    from recsys_llm.semantics.pooling import _is_base_model

    def named(name: str) -> torch.nn.Module:
        return type(name, (torch.nn.Module,), {})()

    assert _is_base_model(named("BertModel")) and _is_base_model(named("RoFormerModel"))  # "For" in a model's name
    assert not any(_is_base_model(named(name)) for name in (
        "LlamaForCausalLM", "BertForSequenceClassification", "GPT2LMHeadModel", "T5ForConditionalGeneration"))


def test_hidden_states_of_a_head_model_named_like_a_base_model() -> None:
    """A class of a directory's own code (--trust-remote-code) may be named ``SomethingModel`` yet return
    a head's output (no ``last_hidden_state``): its last hidden states are read from ``hidden_states``."""
    from types import SimpleNamespace

    from recsys_llm.semantics.pooling import hidden_states

    class OwnCodeModel(torch.nn.Module):
        def forward(self, input_ids, attention_mask, output_hidden_states=False):
            hidden = input_ids.float().unsqueeze(-1).expand(-1, -1, 3)  # (B, L, 3)
            return SimpleNamespace(logits=hidden.sum(-1), hidden_states=(hidden * 0, hidden) if output_hidden_states
                                   else None)

    ids = torch.tensor([[1, 2, 3]])
    out = hidden_states(OwnCodeModel(), ids, torch.ones_like(ids))
    assert torch.equal(out, ids.float().unsqueeze(-1).expand(-1, -1, 3))


@pytest.mark.parametrize("lora", [False, True])
def test_hidden_states_of_a_decoder_keep_no_key_value_cache(tiny_llama_dir, lora) -> None:
    """Llama's config has use_cache on: its forward would keep every layer's keys and values in a DynamicCache
    until it returns (GBs for a 7B model's batch), which pooling never reads. The config is put back after."""
    from recsys_llm.semantics.lora_targets import with_lora
    from recsys_llm.semantics.model_loading import load_model
    from recsys_llm.semantics.pooling import hidden_states

    model = load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
    if lora:
        model = with_lora(model, tiny_llama_dir, r=2, alpha=4, dropout=0.0)
    base = model.get_base_model() if lora else model
    assert base.config.use_cache is True
    caches = []
    hook = base.register_forward_hook(lambda module, args, out: caches.append(out.past_key_values))
    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    with torch.no_grad():
        hidden = hidden_states(model, ids, torch.tensor([[1, 1, 1], [1, 1, 0]]))
    hook.remove()
    assert hidden.shape == (2, 3, base.config.hidden_size)
    assert caches == [None]
    assert base.config.use_cache is True
