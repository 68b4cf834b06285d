"""Run a function on N gloo ranks in forked-server processes (like torchrec's ``multi_process.py``).

Each child gets the ``torchrun`` environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR``, ``MASTER_PORT`` of a rendezvous store the parent hosts, as torchrun's agent
does), one CPU thread, and calls ``fn(**kwargs)``; the
function itself initialises the process group (so ``recsys_llm.train.distributed`` is
exercised as under ``torchrun``). Return values come back in rank order; an exception
on any rank fails the caller with that rank's traceback.

Example::

    from tests.multiprocess import run_multiprocess

    def _body(scale: int) -> int:
        ctx = init_distributed("cpu")
        ...
        return ctx.rank * scale

    assert run_multiprocess(_body, world_size=2, scale=3) == [0, 3]
"""

import os
import pickle
import queue as queue_module
import traceback
from typing import Any, Callable, Dict, List

import torch.distributed as dist
import torch.multiprocessing as mp


PRELOAD = ("torch", "torchrec", "torchrec.distributed", "recsys_llm.train.runner", "recsys_llm.train.trained_run")


def _child(rank: int, world_size: int, port: int, fn: Callable[..., Any], kwargs: Dict[str, Any], queue: Any) -> None:
    os.environ.update(
        {
            "RANK": str(rank),
            "WORLD_SIZE": str(world_size),
            "LOCAL_RANK": str(rank),
            "LOCAL_WORLD_SIZE": str(world_size),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            # the parent hosts the rendezvous store, as torchrun's agent does: every rank is its client
            "TORCHELASTIC_USE_AGENT_STORE": "True",
            "GLOO_DEVICE_TRANSPORT": "TCP",
            "OMP_NUM_THREADS": "1",
            "HF_HUB_OFFLINE": "1",
        }
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Plain pickle: tensors travel as bytes, not as shared-memory handles that die with the child.
        queue.put((rank, True, pickle.dumps(fn(**kwargs))))
    except BaseException:  # report any failure, including SystemExit from argparse
        queue.put((rank, False, traceback.format_exc()))
        raise
    finally:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def run_multiprocess(fn: Callable[..., Any], world_size: int = 2, start_method: str = "forkserver",
                     **kwargs: Any) -> List[Any]:
    """Runs ``fn(**kwargs)`` on ``world_size`` spawned ranks and returns their results.

    Args:
        fn (Callable): a module-level (picklable) function.
        world_size (int): number of ranks.
        start_method (str): ``forkserver`` (fast: ranks fork from a server that imported torch and
            torchrec once), or ``spawn`` for ranks that use CUDA, which a process forked after a
            CUDA build of fbgemm-gpu was imported cannot initialise.
        **kwargs: picklable keyword arguments passed to every rank.

    Returns:
        List[Any]: ``fn``'s return value per rank, rank order.

    Raises:
        RuntimeError: a rank raised (its traceback is in the message) or died.
    """
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        # The fork server imports torch/torchrec once; every rank then forks from it in
        # well under a second instead of re-importing them (fork-safe: the server never runs
        # an OpenMP region, unlike the pytest process).
        ctx.set_forkserver_preload(list(PRELOAD))
    queue = ctx.Queue()
    # bound here and held until the ranks are done: no free port looked up first that another
    # process could take before a rank binds it
    store = dist.TCPStore("127.0.0.1", 0, world_size, is_master=True, wait_for_workers=False)
    port = store.port
    procs = [
        ctx.Process(target=_child, args=(rank, world_size, port, fn, kwargs, queue), daemon=False)
        for rank in range(world_size)
    ]
    for proc in procs:
        proc.start()
    results: Dict[int, Any] = {}
    errors: List[str] = []
    # Drain the queue while the children run (a large result would otherwise block its put).
    while len(results) + len(errors) < world_size:
        try:
            rank, ok, value = queue.get(timeout=1.0)
        except queue_module.Empty:
            if all(not p.is_alive() for p in procs) and queue.empty():
                break
            continue
        if ok:
            results[rank] = pickle.loads(value)
        else:
            errors.append(f"rank {rank} failed:\n{value}")
            break
    if errors:
        for proc in procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        raise RuntimeError("\n".join(errors))
    for proc in procs:
        proc.join()
    dead = [f"rank {r} exit code {p.exitcode}" for r, p in enumerate(procs) if p.exitcode != 0 or r not in results]
    if dead:
        raise RuntimeError(f"multi-process run failed: {', '.join(dead)}")
    return [results[rank] for rank in range(world_size)]
