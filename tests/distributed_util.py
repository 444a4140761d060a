"""Run a function on several gloo processes on this machine, with timeouts everywhere.

``run(target, world_size)`` spawns ``world_size`` processes (torch.multiprocessing,
``spawn``), each joins a gloo process group on 127.0.0.1 at a free port with a
timeout on initialisation and on every collective, calls ``target(rank,
world_size)`` and leaves the group.  An exception on any rank fails the call
with that rank's traceback; a run past ``timeout`` seconds kills every process
and raises, so a diverging collective fails the test instead of hanging it.
"""

import datetime
import importlib
import os
import socket
import time

import torch.distributed as dist
import torch.multiprocessing as mp

COLLECTIVE_TIMEOUT = datetime.timedelta(seconds=30)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank, world_size, port, module, name):
    os.environ.setdefault("FWDGRAD_CHECK", "1")
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size,
        timeout=COLLECTIVE_TIMEOUT,
    )
    try:
        getattr(importlib.import_module(module), name)(rank, world_size)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run(target, world_size, timeout=120):
    """Call the module-level function ``target(rank, world_size)`` on ``world_size`` processes."""
    ctx = mp.start_processes(
        _entry, args=(world_size, free_port(), target.__module__, target.__name__),
        nprocs=world_size, join=False, start_method="spawn",
    )
    deadline = time.monotonic() + timeout
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            raise TimeoutError(f"{target.__name__} on {world_size} processes ran past {timeout} s")
