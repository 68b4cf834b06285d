import pytest
import torch

from recsys_llm.semantics.precision import LowPrecisionSteps


def _linear(dtype: torch.dtype) -> torch.nn.Linear:
    torch.manual_seed(0)
    return torch.nn.Linear(64, 1).to(dtype)


def _train(layer: torch.nn.Linear, steps: LowPrecisionSteps, count: int) -> None:
    generator = torch.Generator().manual_seed(1)
    for _ in range(count):
        x = torch.randn(32, 64, generator=generator).to(layer.weight.dtype)
        steps.zero_grad()
        steps.backward(layer(x).float().pow(2).mean())
        steps.step()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_small_steps_accumulate_in_float32_master_copies(dtype):
    reference, layer = _linear(torch.float32), _linear(dtype)
    start = layer.weight.detach().float().clone()
    for model in (reference, layer):
        steps = LowPrecisionSteps([{"params": list(model.parameters())}], lambda g: torch.optim.AdamW(g, lr=1e-5),
                                  model)
        assert steps.num_master_copies == (0 if model is reference else 2)
        _train(model, steps, 100)
    assert layer.weight.dtype == dtype
    # steps of ~1e-5 each: far below one bf16 step at |w| ~ 0.1 (4.9e-4), but not lost
    changed = (layer.weight.float() != start).float().mean()
    moved = (reference.weight.detach() - start).norm()
    apart = (layer.weight.float() - reference.weight.detach()).norm()
    assert changed > 0.9 and apart < 0.5 * moved, (changed, apart, moved)  # bf16 rounding: ~0.35


def test_in_place_bf16_steps_lose_the_updates_the_master_copies_keep():
    """What the master copies are for: AdamW stepping the bf16 weights in place leaves most unchanged."""
    layer = _linear(torch.bfloat16)
    start = layer.weight.detach().clone()
    optimizer = torch.optim.AdamW(layer.parameters(), lr=1e-5)
    generator = torch.Generator().manual_seed(1)
    for _ in range(100):
        optimizer.zero_grad()
        layer(torch.randn(32, 64, generator=generator).bfloat16()).float().pow(2).mean().backward()
        optimizer.step()
    assert (layer.weight != start).float().mean() < 0.3


def test_a_float16_step_whose_gradients_overflow_is_skipped():
    layer = _linear(torch.float16)
    steps = LowPrecisionSteps([{"params": list(layer.parameters())}], lambda g: torch.optim.AdamW(g, lr=1e-3),
                              layer)
    assert steps.scaler.is_enabled()  # a float16 model
    before = layer.weight.detach().clone()
    scale = steps.scaler.get_scale()
    steps.zero_grad()
    steps.backward(layer(torch.full((4, 64), 60000.0, dtype=torch.float16)).float().sum())  # inf gradients
    steps.step()
    assert torch.equal(layer.weight, before) and steps.scaler.get_scale() < scale
    _train(layer, steps, 3)
    assert not torch.equal(layer.weight, before) and torch.isfinite(layer.weight).all()
