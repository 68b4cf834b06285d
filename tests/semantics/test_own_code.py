"""A model directory whose config.json brings its own code (``auto_map``) for a model type transformers knows loads
either way: its code with ``trust_remote_code``, transformers' class without. The same files then give other vectors,
so the encode cache, the vector provenance, an SSFT adapter and a CTR-LLM tuning's resume tell the two apart."""

import json
import os
import warnings

import pytest

from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig
from recsys_llm.semantics.field_vectors import FieldVectorConfig, encode_field_vectors
from recsys_llm.semantics.model_loading import runs_own_code
from recsys_llm.semantics.ssft import SSFTConfig, SSFTTrainer
from recsys_llm.semantics.ssft_adapter import load_tuned_encoder
from recsys_llm.semantics.templates import PromptTemplates
from tests.tiny_models import save_tiny_bert

OWN_CODE = '''
from transformers import BertModel


class DoubledBert(BertModel):
    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.last_hidden_state = out.last_hidden_state * 2 + 1
        return out
'''


@pytest.fixture(scope="module")
def bert_with_own_code(tmp_path_factory) -> str:
    path = save_tiny_bert(str(tmp_path_factory.mktemp("own_code") / "bert"))
    with open(os.path.join(path, "modeling_doubled.py"), "w", encoding="utf-8") as handle:
        handle.write(OWN_CODE)
    with open(os.path.join(path, "config.json"), encoding="utf-8") as handle:
        config = json.load(handle)
    config["auto_map"] = {"AutoModel": "modeling_doubled.DoubledBert"}
    with open(os.path.join(path, "config.json"), "w", encoding="utf-8") as handle:
        json.dump(config, handle)
    return path


def test_the_encode_cache_and_provenance_tell_the_models_own_code_from_transformers_class(
        bert_with_own_code, tiny_schema, tmp_path):
    cache = str(tmp_path / "cache")
    stored = {}
    for trust in (True, False):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the untrusted load warns that the directory's code is not run
            stored[trust] = encode_field_vectors(
                FieldVectorConfig(model_path=bert_with_own_code, trust_remote_code=trust, cache_dir=cache), tiny_schema,
                str(tmp_path / f"fields_{trust}.safetensors"))
    # the untrusted encode got the trusted one's cached vectors
    assert not stored[True].vectors.allclose(stored[False].vectors)
    assert stored[True].provenance.model_hash != stored[False].provenance.model_hash
    assert stored[True].provenance.model_hash.endswith("+own-code")


def test_ctr_llm_provenance_says_the_models_own_code_ran(bert_with_own_code):
    config = CTRLLMConfig(model_path=bert_with_own_code, representation_dim=8, hidden_dim=16)
    trusted = CTRAdaptedLLM.from_config(config, trust_remote_code=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = CTRAdaptedLLM.from_config(config)
    assert runs_own_code(trusted.llm) and not runs_own_code(native.llm)
    assert trusted.provenance()["own_code"] == "true" and "own_code" not in native.provenance()
    assert {k: v for k, v in trusted.provenance().items() if k != "own_code"} == native.provenance()  # all else alike


def test_an_ssft_adapter_is_encoded_with_the_code_it_was_tuned_on(bert_with_own_code, tiny_schema, tmp_path):
    short = PromptTemplates(prompt="### Input:\n{input}\n\n### Response:\n")
    config = SSFTConfig(model_path=bert_with_own_code, samples_train=4, samples_valid=1, epochs=1, batch_size=8,
                        templates=short, seed=0, trust_remote_code=True)
    metrics = SSFTTrainer(config, tiny_schema, str(tmp_path / "ssft")).run()
    adapter = metrics["adapter_dir"]
    with open(os.path.join(adapter, "ssft.json"), encoding="utf-8") as handle:
        assert json.load(handle)["own_code"] is True
    encoder, _ = load_tuned_encoder(adapter, trust_remote_code=True)
    assert encoder.model_hash.endswith("+own-code")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(ValueError, match=r"tuned on the model directory's own code \(--trust-remote-code\), and "
                                             r"transformers' own class is loaded now: pass --trust-remote-code"):
            load_tuned_encoder(adapter)


def test_a_ctr_llm_tuning_resumes_only_with_the_code_it_started_with(bert_with_own_code, tmp_path):
    from recsys_llm.semantics.ctr_llm import check_tune_checkpoint, tune_ctr_llm
    from recsys_llm.semantics.ctr_llm_checkpoint import TuneCheckpoint

    texts = [f"user id is {i % 5}." for i in range(8)]
    labels = [float(i % 2) for i in range(8)]
    config = CTRLLMConfig(model_path=bert_with_own_code, representation_dim=4, hidden_dim=8, batch_size=4,
                          max_length=16, epochs=1)
    directory = str(tmp_path / "checkpoint")
    tune_ctr_llm(CTRAdaptedLLM.from_config(config, trust_remote_code=True), texts, labels, config, progress=False,
                 checkpoint=TuneCheckpoint(directory, every_steps=1))
    more = CTRLLMConfig(**{**config.__dict__, "epochs": 2})
    check_tune_checkpoint(TuneCheckpoint(directory), texts, labels, more)  # before a model loads: cannot tell
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        native = CTRAdaptedLLM.from_config(more)
    with pytest.raises(ValueError, match=r"checkpoint was made with other settings \(own_code"):
        tune_ctr_llm(native, texts, labels, more, progress=False, checkpoint=TuneCheckpoint(directory))
    assert tune_ctr_llm(CTRAdaptedLLM.from_config(more, trust_remote_code=True), texts, labels, more, progress=False,
                        checkpoint=TuneCheckpoint(directory))  # the same code: resumes


@pytest.mark.parametrize("adapted_with_own_code", [True, False])
def test_a_saved_ctr_llm_loads_only_with_the_code_it_was_adapted_on(bert_with_own_code, tmp_path,
                                                                     adapted_with_own_code):
    """`semantics export` ran a CTR-LLM adapted on transformers' class with the directory's own code (or the
    other way round): exit 0, vectors 0.4 off, no word (an SSFT adapter was refused already)."""
    from recsys_llm.semantics.ctr_llm_store import load_ctr_llm, save_ctr_llm

    config = CTRLLMConfig(model_path=bert_with_own_code, representation_dim=8, hidden_dim=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the untrusted load warns that the directory's code is not run
        save_ctr_llm(CTRAdaptedLLM.from_config(config, trust_remote_code=adapted_with_own_code), str(tmp_path / "llm"))
        with pytest.raises(ValueError, match=r"llm: adapted on .*(pass --trust-remote-code \(trust_remote_code=True\)|leave it out) to run the "
                                             "model it was adapted on"):
            load_ctr_llm(str(tmp_path / "llm"), trust_remote_code=not adapted_with_own_code)
        loaded = load_ctr_llm(str(tmp_path / "llm"), trust_remote_code=adapted_with_own_code)
    assert runs_own_code(loaded.llm) == adapted_with_own_code


OWN_TOKENIZER_CODE = '''
from transformers import BertTokenizerFast


class PrefixingTokenizer(BertTokenizerFast):
    def __call__(self, text=None, *args, **kwargs):
        if isinstance(text, str):
            text = "query: " + text
        elif isinstance(text, list):
            text = ["query: " + t for t in text]
        return super().__call__(text, *args, **kwargs)
'''


def test_a_tokenizer_of_the_directorys_own_code_is_warned_of_and_keeps_its_own_cache_entries(tiny_bert_dir,
                                                                                               tiny_schema, tmp_path):
    """tokenizer_config.json's auto_map: without --trust-remote-code skipped without a word; with it, the vectors'
    model_hash (the encode cache key) was the untrusted run's, so --cache-dir gave back the other tokenizer's vectors."""
    from tests.tiny_models import copy_model_dir

    path = copy_model_dir(tiny_bert_dir, tmp_path / "bert")
    with open(os.path.join(path, "tokenization_prefixing.py"), "w", encoding="utf-8") as handle:
        handle.write(OWN_TOKENIZER_CODE)
    config_path = os.path.join(path, "tokenizer_config.json")
    with open(config_path, encoding="utf-8") as handle:
        tokenizer_config = json.load(handle)
    tokenizer_config["auto_map"] = {"AutoTokenizer": [None, "tokenization_prefixing.PrefixingTokenizer"]}
    with open(config_path, "w", encoding="utf-8") as handle:
        json.dump(tokenizer_config, handle)
    cache = str(tmp_path / "cache")
    with pytest.warns(UserWarning, match=rf"^{config_path}: the directory's own tokenizer code .* is not run"):
        untrusted = encode_field_vectors(FieldVectorConfig(model_path=path, cache_dir=cache), tiny_schema,
                                         str(tmp_path / "untrusted.safetensors"))
    trusted = encode_field_vectors(FieldVectorConfig(model_path=path, cache_dir=cache, trust_remote_code=True),
                                   tiny_schema, str(tmp_path / "trusted.safetensors"))
    assert trusted.provenance.model_hash == untrusted.provenance.model_hash + "+own-tokenizer-code"
    assert not trusted.vectors.allclose(untrusted.vectors)  # encoded with the prefix, not read from the cache
