"""Default LoRA targets by model family."""

import pytest
import torch

from recsys_llm.semantics.lora_targets import default_target_modules
from recsys_llm.semantics.model_loading import encoder_of
from tests.tiny_models import tiny_gemma3_multimodal


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

    model = encoder_of(tiny_gemma3_multimodal().model)  # the Gemma3Model AutoModel loads
    adapted = get_peft_model(model, LoraConfig(target_modules=default_target_modules(model)))
    names = [name for name, _ in adapted.named_parameters() if "lora_A" in name]
    assert len(names) == 4 and all(".language_model." in name for name in names), names


def test_the_help_lists_every_default_target_family() -> None:
    """`--target-modules --help` (kept free of torch) listed five of the nine families tried."""
    from recsys_llm.cli.semantics import LORA_TARGET_HELP
    from recsys_llm.semantics.lora_targets import QUERY_VALUE_NAMES

    assert LORA_TARGET_HELP.split(" / ") == [" ".join(family) for family in QUERY_VALUE_NAMES]


def test_unknown_targets_of_gpt2_name_its_conv1d_layers() -> None:
    """GPT-2's projections are transformers' Conv1D, not nn.Linear: the message lists them, not []."""
    from transformers import GPT2Config, GPT2Model

    from recsys_llm.semantics.lora_targets import with_lora

    model = GPT2Model(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))
    with pytest.raises(ValueError, match=r"Linear modules are \['c_attn', 'c_fc', 'c_proj'\]"):
        with_lora(model, "/models/gpt2", r=2, alpha=4, dropout=0.0, targets=["q_proj"])
