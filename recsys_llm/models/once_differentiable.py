"""``once_differentiable`` for hand-written kernels whose term may enter a loss linearly.

``torch.autograd.function.once_differentiable`` marks a backward's gradients as not
differentiable only when the incoming gradient requires grad. A term added to the loss as
it is (FRE's ``lambda * KL``, FIE's logit term inside a linear logit) gets a constant
incoming gradient under ``create_graph=True``, so a gradient penalty or Hessian through it
would silently leave out the term's second order (which is not zero). And the error node
``once_differentiable`` adds hangs off the incoming gradient alone: ``autograd.grad(penalty,
inputs)`` and ``torch.autograd.functional.hessian``, which only walk the graph between the
penalty and the inputs, never reach it and return gradients without the kernel's part.
:func:`first_order_only` computes the gradients without a graph and, whenever a graph is
being built, passes them through an error node whose inputs are the forward's saved inputs
and the incoming gradients: every differentiation of them raises (in eager mode; under ``torch.compile``
PyTorch refuses a double backward itself, and ``autograd.grad(..., allow_unused=True)`` gives None).

Example::

    class _Kernel(torch.autograd.Function):
        @staticmethod
        @first_order_only("my kernel (my_op)")
        def backward(ctx, grad): ...
"""

import functools
from typing import Any, Callable, Optional, Tuple

import torch

Backward = Callable[..., Tuple[Optional[torch.Tensor], ...]]


class _NoSecondOrder(torch.autograd.Function):
    """Identity on a gradient computed without a graph; differentiating through it raises."""

    @staticmethod
    def forward(ctx, grad: torch.Tensor, kernel: str, *anchors: torch.Tensor) -> torch.Tensor:
        ctx.kernel = kernel
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *_: torch.Tensor):
        raise RuntimeError(
            f"trying to differentiate twice {ctx.kernel}, whose backward is first order only "
            "(@once_differentiable): a gradient penalty or Hessian through it is not supported"
        )


def first_order_only(kernel: str) -> Callable[[Backward], Backward]:
    """Decorates an autograd Function's ``backward`` so that any double backward through it raises:
    by ``backward()``, by ``autograd.grad`` with the inputs named, and with a constant incoming
    gradient. The Function must save the tensors it differentiates (``ctx.save_for_backward``):
    the error node is reached through them.

    Args:
        kernel (str): what the error names, e.g. ``"FRE's KL kernel (projected_field_kl)"``.
    """

    def decorate(backward: Backward) -> Backward:
        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
            with torch.no_grad():
                outputs = backward(ctx, *grads)
            if not torch.is_grad_enabled():
                return outputs
            # the error node hangs off the forward's inputs and the incoming gradients, so any
            # differentiation of these gradients (autograd.grad(inputs=...), hessian) reaches it and raises
            anchors = [t for t in (*ctx.saved_tensors, *grads) if isinstance(t, torch.Tensor) and t.requires_grad]
            return tuple(None if out is None else _NoSecondOrder.apply(out, kernel, *anchors) for out in outputs)

        return wrapper

    return decorate
