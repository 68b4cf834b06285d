"""Hand-written autograd Functions of the models (FRE's KL, the pairwise sums) are first-order
only: a double backward through them raises instead of giving wrong second derivatives
(also when they enter the loss linearly, as FRE's KL does and FIE's term in a linear logit, where
``once_differentiable`` let a constant incoming gradient through). FM's interaction
kernel is twice differentiable, as the autograd formula it replaced was.
"""

import pytest
import torch

from recsys_llm.models.fm import fm_interaction
from recsys_llm.models.pairwise import weighted_pair_sum
from recsys_llm.modules.field_interaction import semantic_pair_sum
from recsys_llm.modules.field_semantics import projected_field_kl


def _second_order(loss: torch.Tensor, inputs: torch.Tensor) -> None:
    """A gradient penalty: differentiate the gradient's norm once more, by ``backward()`` (every
    leaf) and by ``autograd.grad`` with the inputs named (which reaches only the graph between
    them: a refusal that hung off a leaf of its own was never reached, and the penalty silently
    lost the kernel's second order)."""
    (grad,) = torch.autograd.grad(loss, inputs, create_graph=True)
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.grad(grad.pow(2).sum(), inputs, retain_graph=True)
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


def test_projected_field_kl_entering_the_loss_linearly_refuses_a_gradient_penalty():
    """FRE is added to the loss as it is (lambda * KL): its incoming gradient is a constant, which
    once_differentiable let through, and the penalty silently lost the KL's second order."""
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 6, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    logits = fields.flatten(1) @ torch.randn(20, dtype=torch.float64)
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    loss = bce + 0.5 * projected_field_kl(fields, torch.randn(4, 6, dtype=torch.float64), weight, bias)
    with pytest.raises(RuntimeError, match="differentiate twice FRE's KL kernel"):
        _second_order(loss, fields)
    # a plain backward, and a graph that is never differentiated again, still work
    (grad,) = torch.autograd.grad(loss, fields, create_graph=True)
    loss.backward()
    torch.testing.assert_close(grad.detach(), fields.grad)


def test_semantic_pair_sum_refuses_double_backward():
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(6, 6).double()
    flat_pairs = torch.tensor([1, 2, 3, 6, 7, 11])  # the 6 pairs i < j of 4 keys
    logits = semantic_pair_sum(fields, torch.randn(6, dtype=torch.float64), linear.weight, linear.bias, flat_pairs, 0.5)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits))
    with pytest.raises(RuntimeError, match="once_differentiable"):
        _second_order(loss, fields)


@pytest.mark.parametrize("kernel", ["weighted_pair_sum", "semantic_pair_sum"])
def test_pair_sums_entering_the_logit_linearly_refuse_a_gradient_penalty(kernel):
    """A penalty on a logit linear in the pair sum: its incoming gradient is a constant, and the penalty's
    gradient silently left out the pair sum's second order (off by 13 in a penalty of FIE's logit)."""
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    linear = torch.nn.Linear(6, 6).double()
    flat_pairs = torch.tensor([1, 2, 3, 6, 7, 11])
    pair_sum = {
        "weighted_pair_sum": lambda x: weighted_pair_sum(x, torch.randn(4, 4, dtype=torch.float64)),
        "semantic_pair_sum": lambda x: semantic_pair_sum(x, torch.randn(6, dtype=torch.float64), linear.weight,
                                                         linear.bias, flat_pairs, 0.5),
    }[kernel]
    loss = pair_sum(fields).sum() + fields.pow(3).sum()
    with pytest.raises(RuntimeError, match=rf"differentiate twice .*\({kernel}\)"):
        _second_order(loss, fields)
    (grad,) = torch.autograd.grad(loss, fields, create_graph=True)  # a graph never differentiated again: fine
    loss.backward()
    torch.testing.assert_close(grad.detach(), fields.grad)


def test_frozen_fie_entering_the_logit_linearly_refuses_a_gradient_penalty():
    from recsys_llm.modules.field_interaction import FieldInteractionEnhancement
    from tests.modules.llactr_helpers import FEATURES, make_ebc, make_kjt

    fie = FieldInteractionEnhancement(torch.randn(3, 16), FEATURES, 0.2)
    for frozen in (False, True):
        if frozen:
            fie.freeze()
        pooled = make_ebc(8)(make_kjt(4))
        with pytest.raises(RuntimeError, match="differentiate twice"):
            _second_order(fie.logit(pooled).sum(), pooled.values())


@pytest.mark.parametrize("kernel", ["weighted_pair_sum", "semantic_pair_sum", "projected_field_kl"])
def test_hessian_through_a_first_order_kernel_is_refused(kernel):
    """``torch.autograd.functional.hessian`` differentiates with the inputs named: it returned zeros."""
    linear = torch.nn.Linear(6, 6).double()
    weight, bias = torch.randn(5, 6, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    term = {
        "weighted_pair_sum": lambda x: weighted_pair_sum(x, torch.ones(4, 4, dtype=torch.float64)).sum(),
        "semantic_pair_sum": lambda x: semantic_pair_sum(x, torch.ones(6, dtype=torch.float64), linear.weight,
                                                         linear.bias, torch.tensor([1, 2, 3, 6, 7, 11]), 0.5).sum(),
        "projected_field_kl": lambda x: projected_field_kl(x, torch.ones(4, 6, dtype=torch.float64), weight, bias),
    }[kernel]
    with pytest.raises(RuntimeError, match="differentiate twice"):
        torch.autograd.functional.hessian(term, torch.randn(2, 4, 5, dtype=torch.float64))


def _explicit_fm(fields: torch.Tensor) -> torch.Tensor:
    count = fields.size(1)
    return sum(fields[:, i] * fields[:, j] for i in range(count) for j in range(i + 1, count))


@pytest.mark.parametrize("loss_of", [lambda v: v.sum(), lambda v: v.sum(-1).sigmoid().log().neg().mean()],
                         ids=["linear logit", "bce"])
def test_fm_interaction_gradient_penalty_equals_autograds(loss_of):
    """The penalty on a logit that is linear in v sees no gradient that requires grad: a
    ``once_differentiable`` kernel would return a gradient without a graph there, silently."""
    fields = torch.randn(3, 4, 5, dtype=torch.float64, requires_grad=True)
    by_kernel, by_autograd = (
        torch.autograd.grad(
            torch.autograd.grad(loss_of(f(fields)), fields, create_graph=True)[0].pow(2).sum(), fields
        )[0]
        for f in (fm_interaction, _explicit_fm)
    )
    torch.testing.assert_close(by_kernel, by_autograd)
    assert torch.autograd.gradgradcheck(fm_interaction, (fields,))


def test_fm_interaction_works_under_torch_func():
    fields = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    per_sample = torch.func.vmap(torch.func.grad(lambda f: fm_interaction(f).sum()))(fields)
    expected = torch.stack([torch.func.grad(lambda f: _explicit_fm(f).sum())(f) for f in fields])
    torch.testing.assert_close(per_sample, expected)


@pytest.mark.parametrize("kernel", ["fm_interaction", "weighted_pair_sum", "semantic_pair_sum", "projected_field_kl"])
def test_kernels_backward_under_batched_gradients(kernel):
    """``jacobian(vectorize=True)`` and ``autograd.grad(is_grads_batched=True)`` run a backward on
    vmapped gradients: an in-place multiply of the gradient into an unbatched tensor was refused by vmap."""
    fields = torch.randn(3, 4, 2, dtype=torch.float64)
    pair_matrix = torch.randn(4, 4, dtype=torch.float64)
    linear = torch.nn.Linear(6, 6).double()
    flat_pairs = torch.tensor([1, 2, 3, 6, 7, 11])
    field_vectors, weight, bias = torch.randn(4, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64), \
        torch.randn(2, dtype=torch.float64)
    term = {
        "fm_interaction": fm_interaction,
        "weighted_pair_sum": lambda x: weighted_pair_sum(x, pair_matrix),
        "semantic_pair_sum": lambda x: semantic_pair_sum(x, field_vectors.new_ones(6), linear.weight, linear.bias,
                                                         flat_pairs, 0.5),
        "projected_field_kl": lambda x: projected_field_kl(x, field_vectors, weight, bias),
    }[kernel]
    torch.testing.assert_close(
        torch.autograd.functional.jacobian(term, fields, vectorize=True),
        torch.autograd.functional.jacobian(term, fields),
    )
