"""Worlds of CPU processes over gloo for the distributed tests: start one, bound its time, and let
each rank save its results and leave.

A test runs ``run_world(worker, args, world, out_dir, timeout_s)``; ``worker(rank, *args)`` calls
``join(rank, world, out_dir)`` first and ``leave(results, rank, out_dir)`` last.
"""

from __future__ import annotations

import datetime
import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def join(rank: int, world: int, out_dir: str, timeout_s: float = 60) -> None:
    """Join the gloo process group of ``world`` ranks (rendezvous through a file in out_dir,
    so no port can collide), one intra-op thread per rank; a collective that waits longer than
    timeout_s raises."""
    torch.set_num_threads(1)
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group(
        "gloo", init_method=f"file://{os.path.join(out_dir, 'store')}", rank=rank,
        world_size=world, timeout=datetime.timedelta(seconds=timeout_s),
    )


def leave(results: object, rank: int, out_dir: str) -> None:
    """Save this rank's results, wait for every rank, destroy the process group and exit. The
    exit skips interpreter finalisation: gloo's worker threads can still hold Python-owned
    tensors there (FSDP2's asynchronous reduce-scatters, for one), whose release then aborts the
    process with "terminate called without an active exception" (pytorch/pytorch#179291)."""
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()
    os._exit(0)


def run_world(worker, args: tuple, world: int, out_dir, timeout_s: float) -> list:
    """Spawn ``world`` processes running ``worker(rank, *args)`` and return each rank's saved
    results. A rank's exception fails the test with its traceback, a rank killed by a signal
    with its exit code, a world still running after timeout_s (spawn included) with a timeout;
    every process is gone when this returns."""
    context = mp.start_processes(worker, args=args, nprocs=world, join=False, start_method="spawn")
    deadline = time.monotonic() + timeout_s
    try:
        while not context.join(timeout=1):
            if time.monotonic() > deadline:
                pytest.fail(f"the {world}-process world did not finish in {timeout_s} s")
    finally:
        for process in context.processes:
            if process.is_alive():
                process.terminate()
            process.join(5)
            if process.is_alive():
                process.kill()
                process.join()
    return [torch.load(Path(out_dir) / f"rank{rank}.pt") for rank in range(world)]
