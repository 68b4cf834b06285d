"""A random stream of its own for modules built beside a backbone.

A trainer materialises a model's tables later than its modules are built (DMP, from ``meta``),
from the global random stream in module order: a module drawn from that stream before or beside
the backbone (LLaCTR's FRE / FIE, an ELEC teacher or KD projection) would shift every table and
dense weight after it, so an enhanced model would start from other weights than the plain model
of the same seed, and a comparison would measure the initial weights as well as the method.

On several ranks, each rank past 0 also draws from a stream of its own (:func:`give_rank_its_own_stream`).
"""

import contextlib
import hashlib
from typing import Iterator

import torch


@contextlib.contextmanager
def own_random_stream(name: str) -> Iterator[None]:
    """Runs the block on random streams of their own, seeded from the process's seed and ``name``:
    CPU's, and the default device's when that is a GPU. The global streams are left where they were.

    Example::

        with own_random_stream("elec.teacher"):
            teacher = build_gain_network(...)  # the student's draws are those of plain
    """
    seed = int.from_bytes(hashlib.sha256(f"{torch.initial_seed()}:{name}".encode()).digest()[:8], "little") >> 1
    default = torch.get_default_device()
    gpus = []
    if default.type == "cuda":
        gpus = [default.index if default.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=gpus):
        seed_torch_streams(seed, default)
        yield


def seed_torch_streams(seed: int, device: torch.device) -> None:
    """Seeds torch's CPU RNG and, for a GPU ``device``, that GPU's alone (``torch.manual_seed`` would seed every
    GPU's, which ``torch.random.fork_rng(devices=[device])`` does not restore)."""
    torch.random.default_generator.manual_seed(seed)
    if device.type == "cuda":
        torch.cuda.default_generators[device.index if device.index is not None
                                      else torch.cuda.current_device()].manual_seed(seed)


def give_rank_its_own_stream(rank: int, device: torch.device) -> None:
    """Reseeds torch's RNG (and ``device``'s, a GPU) of rank r > 0 from a draw of it plus r; rank 0 keeps its stream.

    Every rank is seeded alike (``train.seed``): the sharding draws each rank's table shards so (in a
    fork of the RNG), and training its dropout masks, which ranks 1, 2, ... otherwise drew alike at
    every step. A 1-rank run is unchanged.
    """
    if rank == 0:
        return
    seed_torch_streams(int(torch.randint(0, 2**62, ())) + rank, device)
