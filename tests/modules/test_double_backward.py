"""Hand-written autograd Functions of the models (FRE's KL, the pairwise sums) are first-order
only: a double backward through them raises instead of giving wrong second derivatives
(when the incoming gradient requires grad, as in a gradient penalty; torch's
``once_differentiable`` cannot see a term that enters the loss linearly).
"""

import pytest
import torch

from recsys_llm.models.pairwise import weighted_pair_sum
from recsys_llm.modules.field_interaction import semantic_pair_sum
from recsys_llm.modules.field_semantics import projected_field_kl


def _second_order(loss: torch.Tensor, inputs: torch.Tensor) -> None:
    """A gradient penalty: differentiate the gradient's norm once more."""
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
    grad.pow(2).sum().backward()


def test_weighted_pair_sum_refuses_double_backward():
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    pair_matrix = torch.randn(4, 4, dtype=torch.float64, requires_grad=True)
    logits = weighted_pair_sum(fields, pair_matrix)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _second_order(loss, fields)


def test_projected_field_kl_refuses_double_backward():
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    loss = projected_field_kl(fields, torch.randn(4, 6, dtype=torch.float64), weight, bias)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _second_order(loss.pow(2), fields)


def test_semantic_pair_sum_refuses_double_backward():
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(6, 6).double()
    flat_pairs = torch.tensor([1, 2, 3, 6, 7, 11])  # the 6 pairs i < j of 4 keys
    logits = semantic_pair_sum(fields, torch.randn(6, dtype=torch.float64), linear.weight, linear.bias, flat_pairs, 0.5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _second_order(loss, fields)
