"""Tiny, randomly initialised Hugging Face models and a tiny schema, built on the fly (no download).

The schema has four described fields whose values share a field-specific token
(``shade N``, ``town N``, raw user ids, prices ``N.5``), so a model can learn to
tell the field of values it never saw, plus one undescribed field ``C1``.
"""

import os
from typing import List

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import BertConfig, BertModel, LlamaConfig, LlamaModel, PreTrainedTokenizerFast

from recsys_llm.data.schema import DatasetSchema, FieldSpec
from recsys_llm.semantics.templates import ALPACA_PROMPT, SSFT_INPUT, SSFT_INSTRUCTION

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "</s>"]
EXTRA_WORDS = "shade town price user id color city of the a in dollars item paid colour name".split()


def make_schema(root: str, name: str = "tiny", descriptions: bool = True) -> DatasetSchema:
    """Writes value-text files and a train split under ``root``; returns the schema."""
    os.makedirs(os.path.join(root, "text"), exist_ok=True)
    n = 100
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"shade {i}" for i in range(n)]}),
                   os.path.join(root, "text", "color.parquet"))
    pq.write_table(pa.table({"id": pa.array(range(n), pa.int64()), "text": [f"town {i}" for i in range(n)]}),
                   os.path.join(root, "text", "city.parquet"))
    rows = 200
    pq.write_table(
        pa.table({
            "color": pa.array([i % n for i in range(rows)], pa.int64()),
            "city": pa.array([(3 * i) % n for i in range(rows)], pa.int64()),
            "user_id": pa.array([(7 * i) % 300 for i in range(rows)], pa.int64()),
            "C1": pa.array([i % 10 for i in range(rows)], pa.int64()),
            "price": pa.array([float(i % n) + 0.5 for i in range(rows)], pa.float32()),
            "label": pa.array([i % 2 for i in range(rows)], pa.int64()),
        }),
        os.path.join(root, "train.parquet"),
    )
    desc = (lambda text: text) if descriptions else (lambda text: "")
    schema = DatasetSchema(
        name=name,
        fields=[
            FieldSpec("color", "sparse", cardinality=n, description=desc("colour of the item"), value_text="text/color.parquet"),
            FieldSpec("city", "sparse", cardinality=n, description=desc("city of the user"), value_text="text/city.parquet"),
            FieldSpec("user_id", "sparse", cardinality=300, description=desc("user id")),
            FieldSpec("C1", "sparse", cardinality=10),
            FieldSpec("price", "dense", description=desc("price paid in dollars")),
        ],
        splits={"train": "train.parquet"},
        root=root,
    )
    schema.save(os.path.join(root, "schema.json"))
    return DatasetSchema.load(os.path.join(root, "schema.json"))


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


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_llama"))
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


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    path = str(tmp_path_factory.mktemp("tiny_bert"))
    tokenizer = make_tokenizer(with_mask=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=256, pad_token_id=tokenizer.pad_token_id,
    )
    BertModel(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture()
def tiny_schema(tmp_path) -> DatasetSchema:
    return make_schema(str(tmp_path / "data"))
