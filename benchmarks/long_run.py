"""Long runs: resident memory over 10,000 jvp and 1,000 hvp calls (pure and closure form).

Prints, at regular checkpoints, the process's resident set size, the number of
live ``Dual`` tensors and of all tensors (after a garbage collection), and the
size of fwdgrad's op cache.  A flat RSS column and constant counts mean no
leaked tangents, levels, weak references or cached graphs.

    PYTHONPATH=. python benchmarks/long_run.py [--jvp 10000] [--hvp 1000] [--every 1000]

(tests/test_long_run.py checks the same counts at a smaller size.)
"""

import argparse
import gc
import time

import torch
import torch.nn.functional as F

import fwdgrad
from fwdgrad import interpreter


def rss_mib():
    """Current resident set size (Linux), or the peak where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def counts():
    gc.collect()
    objects = gc.get_objects()
    duals = sum(type(o) is interpreter.Dual for o in objects)
    tensors = sum(issubclass(type(o), torch.Tensor) for o in objects)
    return duals, tensors, len(interpreter._entries)


def make_workload():
    g = torch.Generator().manual_seed(0)
    params = {
        "w1": torch.randn(64, 128, generator=g) * 0.1,
        "b1": torch.zeros(128),
        "w2": torch.randn(128, 10, generator=g) * 0.1,
    }
    x = torch.randn(32, 64, generator=g)
    target = torch.randint(0, 10, (32,), generator=g)

    def model(x, p):
        h = F.layer_norm(F.gelu(x @ p["w1"] + p["b1"]), (128,))
        h = h.clone()
        h[:, 1:].mul_(h[:, :-1].sigmoid())  # views and in-place ops
        return h @ p["w2"]

    def loss(p):
        return F.cross_entropy(model(x, p), target)

    v_x = torch.randn(32, 64, generator=g)
    v_p = {k: torch.randn(t.shape, generator=g) for k, t in params.items()}

    def jvp_step():
        return fwdgrad.jvp(lambda x: model(x, params), (x,), (v_x,))

    def hvp_step():
        return fwdgrad.hvp(loss, params, v_p)

    # The closure form on a live module: parameters are swapped in and out per call.
    net = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.GELU(), torch.nn.Linear(128, 10))
    net_params = dict(net.named_parameters())
    v_net = {k: torch.randn(t.shape, generator=g) for k, t in net_params.items()}

    def closure_hvp_step():
        return fwdgrad.hvp(lambda: F.cross_entropy(net(x), target), net_params, v_net)

    return jvp_step, hvp_step, closure_hvp_step


def run(name, step, calls, every):
    print(f"\n{name}: {calls} calls")
    print(f"{'calls':>7} {'RSS MiB':>9} {'duals':>6} {'tensors':>8} {'op cache':>9} {'mean ms':>8}")
    first = None
    start = time.perf_counter()
    for i in range(calls + 1):
        if i % every == 0:
            elapsed = (time.perf_counter() - start) / max(i, 1) * 1e3
            rss = rss_mib()
            duals, tensors, cache = counts()
            if i == every:
                first = rss  # after warm-up: caches filled, allocator settled
            print(f"{i:>7} {rss:>9.1f} {duals:>6} {tensors:>8} {cache:>9} {elapsed:>8.2f}")
        if i < calls:
            step()
    growth = rss - first if first is not None else float("nan")
    print(f"RSS growth after warm-up: {growth:+.1f} MiB")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jvp", type=int, default=10_000)
    parser.add_argument("--hvp", type=int, default=1_000)
    parser.add_argument("--every", type=int, default=None, help="checkpoint interval (calls)")
    args = parser.parse_args()
    jvp_step, hvp_step, closure_hvp_step = make_workload()
    run("jvp", jvp_step, args.jvp, args.every or max(args.jvp // 10, 1))
    run("hvp (pure)", hvp_step, args.hvp, args.every or max(args.hvp // 10, 1))
    run("hvp (closure on a live nn.Module)", closure_hvp_step, args.hvp, args.every or max(args.hvp // 10, 1))


if __name__ == "__main__":
    main()
