"""Data-parallel Hessian-free training: Newton-CG steps on a DDP model, checked against one process.

Run it with ``torchrun --nproc-per-node 2 examples/distributed_newton_cg.py``
(NCCL where there is a GPU per process, gloo on the CPU otherwise), or plainly with ``python``, which
starts two gloo processes itself.  Each rank holds its shard of the batch and
a DistributedDataParallel model.  Each product ``H v`` inside conjugate
gradients is one closure-form call::

    fwdgrad.value_grad_and_hvp(lambda: F.cross_entropy(ddp(x), y), params, v)

fwdgrad recognises the DDP model and reduces (value, gradient, H v) over its
process group in one all-reduce, so every rank takes the same Newton step:
that of the full batch's mean loss.  At the end each rank repeats the
training in a single process on the full batch and checks that the
parameters agree.
"""

import math
import os
import socket

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

import fwdgrad

STEPS, CG_ITERATIONS, DAMPING = 5, 10, 1.0


def two_spirals(n):
    g = torch.Generator().manual_seed(0)
    t = torch.rand(n, generator=g, dtype=torch.double) * 2.5 * math.pi + 0.5
    label = torch.randint(0, 2, (n,), generator=g)
    sign = 1 - 2 * label.double()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], 1) / 5
    return x + 0.05 * torch.randn(n, 2, generator=g, dtype=torch.double), label


def make_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 2)).double()


def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def newton_cg(model, params, loss):
    """``STEPS`` damped Newton steps, each direction from conjugate gradients on ``H v`` products."""
    for _ in range(STEPS):
        zeros = {k: torch.zeros_like(p) for k, p in params.items()}
        _, g, _ = fwdgrad.value_grad_and_hvp(loss, params, zeros)
        step = {k: torch.zeros_like(t) for k, t in g.items()}
        r = {k: -t for k, t in g.items()}
        d, rr = dict(r), dot(r, r)
        for _ in range(CG_ITERATIONS):
            hd = fwdgrad.hvp(loss, params, d)
            hd = {k: hd[k] + DAMPING * d[k] for k in d}
            curvature = dot(d, hd)
            if curvature <= 0:
                break
            alpha = rr / curvature
            step = {k: step[k] + alpha * d[k] for k in d}
            r = {k: r[k] - alpha * hd[k] for k in d}
            rr_new = dot(r, r)
            if rr_new.sqrt() < 1e-10:
                break
            d, rr = {k: r[k] + (rr_new / rr) * d[k] for k in d}, rr_new
        with torch.no_grad():
            for k, p in params.items():
                p.add_(step[k])
    with torch.no_grad():
        return float(loss())


def main():
    rank, world = dist.get_rank(), dist.get_world_size()
    nccl = dist.get_backend() == "nccl"
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if nccl else torch.device("cpu")
    x, y = two_spirals(64 * world)
    xr, yr = x.chunk(world)[rank].to(device), y.chunk(world)[rank].to(device)
    ddp = DDP(make_model().to(device))
    params = dict(ddp.module.named_parameters())
    with torch.no_grad():
        start = float(F.cross_entropy(make_model()(x), y))
    final = newton_cg(ddp, params, lambda: F.cross_entropy(ddp(xr), yr))

    # The same training in one process on the full batch.
    reference = make_model()
    ref_params = dict(reference.named_parameters())
    ref_final = newton_cg(reference, ref_params, lambda: F.cross_entropy(reference(x), y))
    for k, p in params.items():
        torch.testing.assert_close(p.detach().cpu(), ref_params[k].detach(), msg=lambda m: f"rank {rank}, {k}: {m}")
    # DDP's own training steps still work afterwards.
    F.cross_entropy(ddp(xr), yr).backward()
    if rank == 0:
        print(f"{world} processes, {STEPS} Newton-CG steps: loss {start:.4f} -> {ref_final:.4f} "
              f"(rank 0's shard {final:.4f}); parameters match one process on the full batch")


def _spawned(rank, world, port):
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        main()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    if "RANK" in os.environ:  # under torchrun
        # NCCL needs a GPU per rank; otherwise gloo on the CPU.
        gpus = torch.cuda.device_count()
        dist.init_process_group("nccl" if gpus >= int(os.environ["WORLD_SIZE"]) else "gloo")
        try:
            main()
        finally:
            dist.destroy_process_group()
    else:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        mp.start_processes(_spawned, args=(2, port), nprocs=2, start_method="spawn")
