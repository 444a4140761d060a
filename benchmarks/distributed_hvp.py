"""Data-parallel hvp on 1, 2 and 4 gloo processes: time per call and the all-reduce's share.

The global batch is fixed and split evenly; each rank calls
``fwdgrad.hvp(loss, params, v, process_group=WORLD)`` on its shard.  The
anchors, measured side by side in the same processes: the same call without
``process_group=`` (the rank-local hvp, so the difference is what the
reduction costs) and the reduction alone (one all-reduce of a buffer the size
of value + gradient + Hv).  A last column times the same hvp with the
model sharded by FSDP2 (``fully_shard`` on each linear layer and the whole),
its parameters and directions DTensors (the parameters are all-gathered,
the model runs unsharded, Hv comes back sharded).  On one machine the processes share the cores, so
the speed-up from 1 to 4 processes is bounded by the free cores; the
all-reduce's share is the figure that carries over.

    python benchmarks/distributed_hvp.py [--batch 4096] [--width 256] [--rounds 10]
"""

import argparse
import copy
import json
import os
import socket
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import distribute_tensor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import time_interleaved  # noqa: E402

import fwdgrad  # noqa: E402


def _worker(rank, world, port, batch, width, rounds, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 10))
    x, y = torch.randn(batch, 64).chunk(world)[rank], torch.randint(0, 10, (batch,)).chunk(world)[rank]
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    group = dist.group.WORLD
    n = 1 + 2 * sum(p.numel() for p in params.values())
    buf = torch.randn(n)

    sharded = copy.deepcopy(model)
    for layer in sharded:
        if isinstance(layer, nn.Linear):
            fully_shard(layer)
    fully_shard(sharded)
    s_params = dict(sharded.named_parameters())
    s_v = {k: distribute_tensor(v[k], p.device_mesh, p.placements) for k, p in s_params.items()}

    def loss():
        return F.cross_entropy(model(x), y)

    def sharded_loss():
        return F.cross_entropy(sharded(x), y)

    times = time_interleaved({
        "hvp": lambda: fwdgrad.hvp(loss, params, v, process_group=group),
        "local": lambda: fwdgrad.hvp(loss, params, v),
        "allreduce": lambda: dist.all_reduce(buf.clone(), group=group),
        "fsdp": lambda: fwdgrad.hvp(sharded_loss, s_params, s_v),
    }, rounds)
    t = torch.tensor([times["hvp"], times["local"], times["allreduce"], times["fsdp"]], dtype=torch.double)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)  # the slowest rank sets the pace
    if rank == 0:
        with open(out, "w") as f:
            json.dump(dict(zip(["hvp", "local", "allreduce", "fsdp"], t.tolist())), f)
    dist.destroy_process_group()


def measure(world, batch, width, rounds, tmp):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = os.path.join(tmp, f"dist_{world}.json")
    mp.start_processes(_worker, args=(world, port, batch, width, rounds, out), nprocs=world, start_method="spawn")
    with open(out) as f:
        return json.load(f)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--width", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--worlds", default="1,2,4")
    args = ap.parse_args()
    tmp = os.environ.get("TMPDIR", "/tmp")
    rows = []
    for world in map(int, args.worlds.split(",")):
        r = measure(world, args.batch, args.width, args.rounds, tmp)
        rows.append((world, r))
    base = rows[0][1]["hvp"]
    print(f"data-parallel hvp, global batch {args.batch}, MLP width {args.width}, gloo, "
          f"one thread per process, {os.cpu_count()} cores")
    print(f"{'procs':>5} {'hvp ms':>8} {'local ms':>9} {'allreduce ms':>13} {'share':>6} {'vs 1 proc':>10} "
          f"{'FSDP2 ms':>9} {'FSDP2/hvp':>10}")
    for world, r in rows:
        print(f"{world:>5} {1e3 * r['hvp']:8.2f} {1e3 * r['local']:9.2f} {1e3 * r['allreduce']:13.2f} "
              f"{r['allreduce'] / r['hvp']:6.1%} {base / r['hvp']:9.2f}x {1e3 * r['fsdp']:9.2f} "
              f"{r['fsdp'] / r['hvp']:9.2f}x")


if __name__ == "__main__":
    main()
