"""``once_differentiable`` for hand-written kernels whose term may enter a loss linearly.

``torch.autograd.function.once_differentiable`` marks a backward's gradients as not
differentiable only when the incoming gradient requires grad. A term added to the loss as
it is (FRE's ``lambda * KL``, FIE's logit term inside a linear logit) gets a constant
incoming gradient under ``create_graph=True``, so a gradient penalty or Hessian through it
would silently leave out the term's second order (which is not zero). :func:`first_order_only`
marks the gradients whenever a graph is being built, and differentiating them raises.

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
    def forward(ctx, grad: torch.Tensor, kernel: str) -> torch.Tensor:
        ctx.kernel = kernel
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, _: torch.Tensor) -> "tuple[None, None]":
        raise RuntimeError(
            f"trying to differentiate twice {ctx.kernel}, whose backward is first order only "
            "(@once_differentiable): a gradient penalty or Hessian through it is not supported"
        )


def first_order_only(kernel: str) -> Callable[[Backward], Backward]:
    """Decorates an autograd Function's ``backward`` as ``once_differentiable`` does, and also refuses a
    double backward when the incoming gradient is a constant.

    Args:
        kernel (str): what the error names, e.g. ``"FRE's KL kernel (projected_field_kl)"``.
    """

    def decorate(backward: Backward) -> Backward:
        once = torch.autograd.function.once_differentiable(backward)

        @functools.wraps(backward)
        def wrapper(ctx: Any, *grads: Optional[torch.Tensor]) -> Tuple[Optional[torch.Tensor], ...]:
            outputs = once(ctx, *grads)
            if not torch.is_grad_enabled() or any(g.requires_grad for g in grads if g is not None):
                return outputs  # no graph wanted, or marked by once_differentiable
            return tuple(None if out is None else _NoSecondOrder.apply(out.requires_grad_(), kernel)
                         for out in outputs)

        return wrapper

    return decorate
