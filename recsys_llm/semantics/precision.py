"""Optimizer steps for an LLM loaded in float16 / bfloat16 that lose no update.

AdamW's step is about the learning rate (1e-4), below bfloat16's resolution at usual weight
sizes (8 significant bits: 2e-4 at 0.05), so stepping bfloat16 weights in place drops most
updates and all of the weight decay without any error. :class:`LowPrecisionSteps` keeps a
float32 master copy of every trainable float16 / bfloat16 tensor: the optimizer updates the
copies and the model gets them, rounded, after each step. Trainable tensors already in
float32 (LoRA adapters, which peft keeps in float32, and the heads) are stepped as they are.
With float16 the loss is scaled (``torch.amp.GradScaler``) so that small gradients do not
flush to zero; a step whose gradients overflowed is skipped and the scale lowered.
"""

from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch

SHORT_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}  # as every dtype setting takes them


def long_dtype_name(name: str) -> str:
    """``fp32`` / ``bf16`` / ``fp16`` as torch names them (``float32``, ...); any other name as it is."""
    return SHORT_DTYPE_NAMES.get(name, name)


LOW_PRECISION = (torch.float16, torch.bfloat16)


class LowPrecisionSteps:
    """Backward and optimizer step of a model whose trainable tensors may be float16 / bfloat16.

    Args:
        groups (Sequence[Dict[str, Any]]): optimizer parameter groups (``{"params": [...], ...}``)
            of the model's trainable tensors.
        make_optimizer (Callable): builds the optimizer from the groups it is given, in which
            every float16 / bfloat16 tensor is replaced by its float32 master copy.
        model (torch.nn.Module): the whole model: where it runs is the loss scaler's device, and
            any float16 weight in it (trained or not: a float16 base under float32 LoRA adapters
            gives float16 activations) has the loss scaled.

    Example::

        steps = LowPrecisionSteps([{"params": params, "lr": 1e-4}], torch.optim.AdamW, model)
        steps.zero_grad()
        steps.backward(loss)
        steps.step()
    """

    def __init__(
        self,
        groups: Sequence[Dict[str, Any]],
        make_optimizer: Callable[[List[Dict[str, Any]]], torch.optim.Optimizer],
        model: torch.nn.Module,
    ) -> None:
        self._masters: List[Tuple[torch.nn.Parameter, torch.Tensor]] = []
        optimizer_groups = []
        for group in groups:
            params = []
            for param in group["params"]:
                if param.dtype in LOW_PRECISION:
                    master = param.detach().float().requires_grad_(True)
                    self._masters.append((param, master))
                    params.append(master)
                else:
                    params.append(param)
            optimizer_groups.append({**group, "params": params})
        self.optimizer = make_optimizer(optimizer_groups)
        weights = list(model.parameters())
        self.scaler = torch.amp.GradScaler(weights[0].device.type,
                                           enabled=any(p.dtype == torch.float16 for p in weights))

    def trained_tensor(self, param: torch.nn.Parameter) -> torch.Tensor:
        """What the optimizer steps for ``param``: its float32 master copy, else ``param`` itself
        (a checkpoint saves this one; the model's float16 / bfloat16 weight is it rounded)."""
        for weight, master in self._masters:
            if weight is param:
                return master
        return param

    @torch.no_grad()
    def set_trained_tensor(self, param: torch.nn.Parameter, value: torch.Tensor) -> None:
        """Gives ``param``'s :meth:`trained_tensor` the values of ``value`` (same shape), and ``param`` them rounded."""
        trained = self.trained_tensor(param)
        trained.copy_(value)
        if trained is not param:
            param.copy_(trained)

    @property
    def num_master_copies(self) -> int:
        """How many low-precision tensors train through a float32 master copy."""
        return len(self._masters)

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        for param, _ in self._masters:
            param.grad = None

    def backward(self, loss: torch.Tensor) -> None:
        """Gradients of ``loss`` (a scalar), scaled when the loss is."""
        self.scaler.scale(loss).backward()

    def step(self) -> None:
        """One optimizer step on the float32 copies (skipped if float16 gradients overflowed),
        then the model's low-precision tensors take the copies' values."""
        for param, master in self._masters:
            master.grad = None if param.grad is None else param.grad.float()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        with torch.no_grad():
            for param, master in self._masters:
                param.copy_(master)
