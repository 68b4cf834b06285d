"""Tiny, randomly initialised Hugging Face models and their word-level tokenizer (no download).

Shared by the semantics tests and the end-to-end method tests. The vocabulary covers the
prompt templates, a few field words and the numbers 0-299; anything else is ``[UNK]``.
"""

import json
import os
import shutil
from typing import Any, List, Tuple

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast, T5Config, T5Model

from recsys_llm.semantics.templates import ALPACA_PROMPT, SSFT_INPUT, SSFT_INSTRUCTION

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
EXTRA_WORDS = "shade town price user id color city of the a in dollars item paid colour name".split()


def _vocab() -> List[str]:
    words = list(SPECIALS)
    splitter = pre_tokenizers.Whitespace()
    corpus = " ".join([ALPACA_PROMPT, SSFT_INSTRUCTION, SSFT_INPUT, " ".join(EXTRA_WORDS), "color city user_id C1 price"])
    for token, _ in splitter.pre_tokenize_str(corpus):
        if token not in words:
            words.append(token)
    for i in range(300):
        if str(i) not in words:
            words.append(str(i))
    return words


def make_tokenizer(with_mask: bool) -> PreTrainedTokenizerFast:
    vocab = {w: i for i, w in enumerate(_vocab())}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    specials = dict(unk_token="[UNK]", pad_token="[PAD]", eos_token="</s>")
    if with_mask:
        specials.update(mask_token="[MASK]", cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=backend, **specials)


def save_tiny_llama(path: str) -> str:
    """A 2-layer Llama-style decoder (hidden 64) and its tokenizer, saved to ``path``."""
    tokenizer = make_tokenizer(with_mask=False)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    LlamaModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_bert(path: str) -> str:
    """A 2-layer BERT-style encoder (hidden 32) and its tokenizer, saved to ``path``."""
    tokenizer = make_tokenizer(with_mask=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_tiny_t5(path: str) -> str:
    """A 1+1-layer T5-style encoder-decoder (d_model 32) and its tokenizer, saved to ``path``."""
    tokenizer = make_tokenizer(with_mask=False)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(tokenizer), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=4,
        pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id,
    )
    T5Model(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def save_with_tokenizer(model: torch.nn.Module, path: "os.PathLike[str] | str") -> str:
    """Saves ``model`` and the tests' word-level tokenizer (no mask token) to ``path``."""
    model.save_pretrained(str(path))
    make_tokenizer(with_mask=False).save_pretrained(str(path))
    return str(path)


def tiny_vocab_size() -> int:
    """Tokens of the tests' word-level tokenizer (the vocab_size of the tiny models built here)."""
    return len(make_tokenizer(with_mask=False))


def save_tiny_t5_encoder(path: "os.PathLike[str] | str") -> str:
    """A T5EncoderModel directory (sentence-T5 style): config.json has architectures ['T5EncoderModel']."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    config = T5Config(vocab_size=tiny_vocab_size(), d_model=32, d_kv=8, d_ff=64, num_layers=1, num_heads=4,
                      pad_token_id=0)
    return save_with_tokenizer(T5EncoderModel(config), path)


def tiny_gemma3_multimodal() -> torch.nn.Module:
    """Gemma-3 as shipped (Gemma3ForConditionalGeneration): hidden_size only under text_config."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration

    torch.manual_seed(0)
    text = dict(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=1, head_dim=8, max_position_embeddings=128, pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    return Gemma3ForConditionalGeneration(Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4))


def save_tiny_smolvlm(path: "os.PathLike[str] | str", text_layers: int, vision_layers: int) -> str:
    """SmolVLM (text_model + vision_model, no get_text_features) with a Llama text model, saved with the tokenizer."""
    from transformers import SmolVLMConfig, SmolVLMModel

    torch.manual_seed(0)
    text = dict(model_type="llama", vocab_size=tiny_vocab_size() + 8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=text_layers, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=vision_layers, num_attention_heads=4,
                  image_size=32, patch_size=8)
    return save_with_tokenizer(SmolVLMModel(SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2)), path)


def tiny_opt_projected() -> torch.nn.Module:
    """OPT whose last hidden states are projected to word_embed_proj_dim (16) != hidden_size (32), as opt-350m."""
    from transformers import OPTConfig, OPTModel

    torch.manual_seed(0)
    return OPTModel(OPTConfig(vocab_size=tiny_vocab_size(), hidden_size=32, word_embed_proj_dim=16, ffn_dim=64,
                              num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=128, pad_token_id=0))


# short texts of varied length (batches of them are padded)
SAMPLE_TEXTS = ["shade 3", "town 17 of the user", "price", "user id 250 shade 9 town 4", "12 . 5"]


def copy_model_dir(source: str, target: "os.PathLike[str] | str") -> str:
    """A copy of a saved model directory (the session fixtures stay untouched)."""
    return shutil.copytree(source, str(target))


def copy_model_dir_with_config(source: str, target: "os.PathLike[str] | str", **changes: Any) -> Tuple[str, str]:
    """A copy of a saved model directory whose ``config.json`` has ``changes`` set; ``(directory, config.json)``."""
    path = copy_model_dir(source, target)
    config_path = os.path.join(path, "config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, **changes}, handle)
    return path, config_path
