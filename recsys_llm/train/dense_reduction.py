"""The dense gradients' all-reduce in one fixed order, whatever DDP's buckets: a resumed run on three or
more ranks goes on bit for bit (``sharding.exact_dense_reduction``)."""

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn


# DDP's bucket cap for several ranks: every dense gradient in one bucket (see CanonicalAllReduce)
ONE_BUCKET_MB = 1 << 20


class CanonicalAllReduce:
    """DDP comm hook: all-reduces the gradients in parameter order, whatever DDP's bucket order.

    A ring all-reduce adds an element's ``world_size`` values in an order set by the element's
    offset in the buffer. DDP reduces the first step in parameter order and then rebuilds its
    buckets in the order the gradients became ready, so the first step after a resume reduced
    in another layout than the uninterrupted run's step at that point. On three or more ranks
    (a sum of two values does not depend on their order) that changed the last bits of the
    gradients and the resumed run drifted from the uninterrupted one. With one bucket
    (``ONE_BUCKET_MB``) holding every dense gradient, copying them into parameter order before
    the all-reduce makes every step reduce in the same layout.

    A DDP of several buckets (the one torchrec wraps each ``data_parallel`` lookup in keeps DDP's default
    caps: 1 MB for its first bucket, 25 MB for the others) may also regroup its gradients when it rebuilds
    them, so which gradients share a bucket, and at what offsets, can change too: with ``per_parameter``
    each gradient is all-reduced on its own (its elements always at the same offsets), one collective per
    parameter, which for a lookup is one per group of tables.
    """

    def __init__(self, ddp: nn.parallel.DistributedDataParallel, per_parameter: bool = False) -> None:
        self.group = ddp.process_group
        self.module = ddp.module
        self.per_parameter = per_parameter
        # the bucket's parameters' storages -> their positions in parameter order; recomputed (a walk
        # over every parameter of the module) only when those storages change, not at every step
        self._layout: Optional[Tuple[Tuple[int, ...], List[int]]] = None

    def _order(self, params: List[torch.Tensor]) -> List[int]:
        """Positions in ``params`` (the bucket's parameters) sorted by the module's parameter order."""
        pointers = tuple(p.data_ptr() for p in params)
        if self._layout is None or self._layout[0] != pointers:
            # a parameter's storage may be replaced (a checkpoint loaded by assignment): looked up again then
            index = {p.data_ptr(): i for i, p in enumerate(self.module.parameters()) if p.requires_grad}
            self._layout = (pointers, sorted(range(len(params)), key=lambda i: index[pointers[i]]))
        return self._layout[1]

    def __call__(self, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer, grads = bucket.buffer(), bucket.gradients()  # the gradients are views of the buffer
        order = self._order(bucket.parameters())
        world_size = dist.get_world_size(self.group)
        if self.per_parameter:  # in place: a gradient is a contiguous view of the buffer
            works = [dist.all_reduce(grads[i].div_(world_size), group=self.group, async_op=True) for i in order]
            for work in works:  # NCCL: the current stream waits for them (collect_all's future is a CPU one,
                work.wait()     # which DDP's copy out of the buffer would not wait for); gloo: this thread waits
            done: torch.futures.Future[torch.Tensor] = torch.futures.Future(
                devices=[buffer.device] if buffer.is_cuda else None)
            done.set_result(buffer)
            return done
        flat = torch.cat([grads[i].reshape(-1) for i in order]).div_(world_size)

        def unpack(fut: torch.futures.Future[List[torch.Tensor]]) -> torch.Tensor:
            reduced, offset = fut.value()[0], 0
            for i in order:
                grads[i].copy_(reduced[offset:offset + grads[i].numel()].view_as(grads[i]))
                offset += grads[i].numel()
            return buffer

        return dist.all_reduce(flat, group=self.group, async_op=True).get_future().then(unpack)


def _hook(state: CanonicalAllReduce, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    return state(bucket)


def reduce_in_parameter_order(model: nn.Module) -> None:
    """Registers :class:`CanonicalAllReduce` on the DDP wrapper of ``model``'s dense part (one bucket) and, one
    gradient at a time, on the DDP torchrec wraps each sharded EBC's ``data_parallel`` lookup in (kept in the
    plain list ``_lookups``, which ``modules()`` does not walk)."""
    own = {id(m): m for m in model.modules() if isinstance(m, nn.parallel.DistributedDataParallel)}
    lookups = {id(lookup): lookup for module in model.modules() for lookup in getattr(module, "_lookups", None) or []
               if isinstance(lookup, nn.parallel.DistributedDataParallel) and id(lookup) not in own}
    for ddp in own.values():
        ddp.register_comm_hook(CanonicalAllReduce(ddp), _hook)
    for ddp in lookups.values():  # built by torchrec with DDP's default bucket caps
        ddp.register_comm_hook(CanonicalAllReduce(ddp, per_parameter=True), _hook)
