"""The traced mode on a chain of 200 elementwise ops on 16-element tensors (per-op overhead).

Side by side, medians of interleaved rounds (float32 CPU):

- ``torch.func.jvp``;
- ``fwdgrad.jvp`` (the eager interpreter);
- ``fwdgrad.forward_grad(f, trace=True)`` and ``fwdgrad.jvp(f, ..., trace=True)``
  (record once, then replay the fx graph).

    PYTHONPATH=. python benchmarks/traced.py [--rounds 30] [--compile]

``--compile`` adds ``torch.compile(df.graph_module)``: the recorded program
fused by inductor (needs a C++ compiler; compiling takes seconds to minutes).

Target (issue 5): the traced mode at most 0.15x the time of torch.func.jvp.
"""

import argparse
import time

import torch

import fwdgrad
from common import time_interleaved

LENGTH = 200


def unary(x, y):
    for _ in range(LENGTH // 4):
        x = torch.cos(torch.sigmoid(torch.tanh(torch.sin(x))))
    return x


def tensor_constants(x, y):
    for _ in range(LENGTH // 8):
        x = torch.cos(torch.sigmoid(torch.tanh(torch.sin(x) * y) + y) - y) * y
    return x


def scalar_constants(x, y):
    for _ in range(LENGTH // 8):
        x = torch.cos(torch.sigmoid(torch.tanh(torch.sin(x) * 0.9) + 0.1) - 0.2) * 1.1
    return x


CHAINS = {"unary": unary, "tensor constants": tensor_constants, "scalar constants": scalar_constants}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile(df.graph_module)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s); {LENGTH} ops on 16 elements; median of {args.rounds} rounds")
    print(f"  {'chain':18s} {'method':36s} {'time ms':>9s} {'vs torch.func.jvp':>18s}")
    worst = 0.0
    for chain_name, body in CHAINS.items():
        torch.manual_seed(0)
        x, y, v = torch.randn(16), torch.randn(16), torch.randn(16)

        def f(x):
            return body(x, y)

        df = fwdgrad.forward_grad(f, trace=True)
        methods = {
            "torch.func.jvp": lambda: torch.func.jvp(f, (x,), (v,)),
            "fwdgrad.jvp (eager)": lambda: fwdgrad.jvp(f, (x,), (v,)),
            "fwdgrad.forward_grad(trace=True)": lambda: df(x, v),
            "fwdgrad.jvp(trace=True)": lambda: fwdgrad.jvp(f, (x,), (v,), trace=True),
        }
        if args.compile:
            df(x, v)
            compiled = torch.compile(df.graph_module, dynamic=False)
            t0 = time.perf_counter()
            compiled(x, v)
            print(f"  ({chain_name}: torch.compile took {time.perf_counter() - t0:.1f} s)")
            methods["torch.compile(df.graph_module)"] = lambda: compiled(x, v)[:2]
        expected = torch.func.jvp(f, (x,), (v,))
        for name, fn in methods.items():
            out = fn()
            torch.testing.assert_close(out[1], expected[1], msg=lambda m: f"{chain_name} {name}: {m}")
        times = time_interleaved(methods, args.rounds)
        ref = times["torch.func.jvp"]
        for name, t in times.items():
            print(f"  {chain_name:18s} {name:36s} {t * 1e3:9.3f} {t / ref:17.3f}x")
            if "trace=True" in name:
                worst = max(worst, t / ref)
    print(f"\ntarget: traced mode <= 0.15x torch.func.jvp: worst {worst:.3f}x ({'met' if worst <= 0.15 else 'missed'})")
    print("\nthe traced program of the scalar-constant chain starts:")
    print("\n".join(df.code.strip().splitlines()[:8]))


if __name__ == "__main__":
    main()
