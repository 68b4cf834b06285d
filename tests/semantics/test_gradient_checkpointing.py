"""``--gradient-checkpointing`` of ``semantics tune`` and ``semantics adapt``: fewer activations kept for the
backward, the same gradients, losses and tuned weights."""

from typing import List

import pytest
import torch

from recsys_llm.semantics.lora_targets import with_lora
from recsys_llm.semantics.model_loading import enable_gradient_checkpointing, load_model
from recsys_llm.semantics.pooling import hidden_states


def _checkpointed(model: torch.nn.Module) -> bool:
    """Whether transformers checkpoints a layer of ``model``."""
    return any(getattr(module, "gradient_checkpointing", False) is True for module in model.modules())


def _saved_for_backward_and_gradients(model_dir: str, checkpointing: bool) -> "tuple[int, List[torch.Tensor]]":
    """Tensors the forward keeps for the backward, and the LoRA gradients, of one training step (dropout on)."""
    base = load_model(model_dir, torch.device("cpu"), torch.float32)
    if checkpointing:
        enable_gradient_checkpointing(base, model_dir)
    torch.manual_seed(0)
    model = with_lora(base, model_dir, r=2, alpha=4, dropout=0.1)
    model.train()
    saved = []
    torch.manual_seed(1)
    with torch.autograd.graph.saved_tensors_hooks(lambda tensor: saved.append(tensor.numel()) or tensor, lambda t: t):
        hidden = hidden_states(model, torch.tensor([[5, 6, 7, 8], [8, 9, 10, 0]]), torch.tensor([[1, 1, 1, 1],
                                                                                                [1, 1, 1, 0]]))
    hidden.square().sum().backward()
    return sum(saved), [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_bert_dir"])
def test_checkpointing_keeps_fewer_activations_and_gives_the_same_gradients(model_fixture, request) -> None:
    model_dir = request.getfixturevalue(model_fixture)
    kept, grads = _saved_for_backward_and_gradients(model_dir, checkpointing=False)
    kept_checkpointed, grads_checkpointed = _saved_for_backward_and_gradients(model_dir, checkpointing=True)
    assert kept_checkpointed < kept / 2, (kept_checkpointed, kept)
    assert len(grads) == len(grads_checkpointed) > 0
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_checkpointed))  # dropout masks replayed


def test_a_model_class_without_checkpointing_is_refused_naming_it(tiny_bert_dir) -> None:
    base = load_model(tiny_bert_dir, torch.device("cpu"), torch.float32)
    type(base).supports_gradient_checkpointing = False
    try:
        with pytest.raises(ValueError, match=r"bert: --gradient-checkpointing: BertModel does not support"):
            enable_gradient_checkpointing(base, tiny_bert_dir + "/bert")
    finally:
        del type(base).supports_gradient_checkpointing  # the class attribute of its base class again


def test_ssft_with_checkpointing_trains_as_without_and_resumes_either_way(tmp_path, tiny_llama_dir,
                                                                          tiny_schema) -> None:
    from tests.semantics.test_ssft import _config
    from recsys_llm.semantics.ssft import SSFTTrainer

    small = dict(samples_train=8, samples_valid=2, batch_size=8)
    plain = SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, str(tmp_path / "plain")).run()
    out = str(tmp_path / "checkpointed")
    checkpointed = SSFTTrainer(_config(tiny_llama_dir, epochs=1, gradient_checkpointing=True, **small), tiny_schema,
                               out)
    assert _checkpointed(checkpointed._encoder.model)
    checkpointed.run()
    resumed = SSFTTrainer(_config(tiny_llama_dir, epochs=2, **small), tiny_schema, out).run()  # the option dropped
    assert resumed["history"] == plain["history"] and resumed["after"] == plain["after"]


def test_adapt_with_checkpointing_gives_the_same_losses_and_heads_tuning_refuses_it(tmp_path) -> None:
    import dataclasses

    from tests.semantics.test_ctr_llm import _data, _tiny_model_dir
    from recsys_llm.semantics.ctr_llm import CTRAdaptedLLM, CTRLLMConfig, tune_ctr_llm

    config = CTRLLMConfig(model_path=_tiny_model_dir(tmp_path, "llama"), pooling="last_token", representation_dim=8,
                          hidden_dim=16, lora_target_modules=["q_proj", "v_proj"], lora_dropout=0.1, batch_size=16,
                          epochs=1, max_length=32, sample_rows=32)
    texts, labels = _data()
    losses, checkpointed = [], []
    for checkpointing in (False, True):  # each built right before its tuning: the same random stream for dropout
        model = CTRAdaptedLLM.from_config(config)
        losses.append(tune_ctr_llm(model, texts, labels, config, progress=False, gradient_checkpointing=checkpointing))
        checkpointed.append(_checkpointed(model.llm))
    assert checkpointed == [False, True]
    assert len(losses[0]) == 2 and losses[0] == losses[1]
    heads = dataclasses.replace(config, tuning="heads")
    with pytest.raises(ValueError, match=r"--gradient-checkpointing: --tuning heads trains no LLM weights"):
        tune_ctr_llm(CTRAdaptedLLM.from_config(heads), texts, labels, heads, progress=False,
                     gradient_checkpointing=True)
