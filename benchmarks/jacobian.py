"""Jacobians side by side: fwdgrad.jacfwd against torch.func.jacfwd and torch.func.jacrev.

Two maps, both a 3-layer tanh MLP on one float32 vector (CPU):

- tall: R^16 -> R^4096 (forward mode's case: 16 directions);
- wide: R^4096 -> R^16 (reverse mode's case: forward mode needs 4096 directions).

Times are medians of interleaved rounds in this process.  Peak memory is the
growth of the resident set during one call, each measurement in a fresh
process (``MALLOC_MMAP_THRESHOLD_`` set low so freed tensors leave the RSS).

    PYTHONPATH=. python benchmarks/jacobian.py [--threads 1] [--rounds 20]

Target (issue 4): fwdgrad.jacfwd at most as slow as torch.func.jacfwd on the
tall map.
"""

import argparse
import json

import torch

import fwdgrad
from common import peak_growth, run_child, time_interleaved

CASES = {"tall": [16, 256, 1024, 4096], "wide": [4096, 1024, 256, 16]}
CHUNK = {"tall": 4, "wide": 256}


def build(case):
    """``(f, x, methods)`` for one case; the weights are fixed by a seed."""
    sizes = CASES[case]
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g) / i**0.5 for i, o in zip(sizes[:-1], sizes[1:])]

    def f(x):
        for w in weights[:-1]:
            x = torch.tanh(w @ x)
        return weights[-1] @ x

    x = torch.randn(sizes[0], generator=g)
    chunk = CHUNK[case]
    methods = {
        "fwdgrad.jacfwd": lambda: fwdgrad.jacfwd(f)(x),
        f"fwdgrad.jacfwd(chunk_size={chunk})": lambda: fwdgrad.jacfwd(f, chunk_size=chunk)(x),
        "torch.func.jacfwd": lambda: torch.func.jacfwd(f)(x),
        "torch.func.jacrev": lambda: torch.func.jacrev(f)(x),
    }
    return f, x, methods


def peak_in_fresh_process(case, method, threads):
    r = run_child(__file__, ["--memory", case, method, "--threads", str(threads)], memory=True)
    return r.get("peak_bytes", r.get("error"))


def check_agreement(case):
    """The methods must agree before their speed means anything."""
    _, _, methods = build(case)
    ref = methods["torch.func.jacrev"]()
    for name, fn in methods.items():
        torch.testing.assert_close(fn(), ref, rtol=1e-4, atol=1e-5, msg=lambda m: f"{case} {name}: {m}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--memory", nargs=2, metavar=("CASE", "METHOD"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.memory:
        case, method = args.memory
        print(json.dumps({"peak_bytes": peak_growth(build(case)[2][method])}))
        return
    print(f"torch {torch.__version__}, {args.threads} thread(s), float32 CPU; median of {args.rounds} interleaved rounds")
    ratios = {}
    for case in CASES:
        check_agreement(case)
        _, _, methods = build(case)
        times = time_interleaved(methods, args.rounds)
        sizes = CASES[case]
        print(f"\n{case}: R^{sizes[0]} -> R^{sizes[-1]} (MLP {' -> '.join(map(str, sizes))})")
        print(f"  {'method':34s} {'time ms':>9s} {'vs func.jacfwd':>15s} {'peak MiB':>9s} {'vs func.jacfwd':>15s}")
        peaks = {name: peak_in_fresh_process(case, name, args.threads) for name in methods}
        ref_t = times["torch.func.jacfwd"]
        ref_m = peaks["torch.func.jacfwd"]
        ratios[case] = times["fwdgrad.jacfwd"] / ref_t
        for name in methods:
            m = peaks[name]
            mem = f"{m / 2**20:9.1f}" if isinstance(m, int) else f"{'error':>9s}"
            mem_ratio = f"{m / ref_m:14.2f}x" if isinstance(m, int) and isinstance(ref_m, int) and ref_m > 0 else ""
            print(f"  {name:34s} {times[name] * 1e3:9.2f} {times[name] / ref_t:14.2f}x {mem} {mem_ratio:>15s}")
            if not isinstance(m, int):
                print(f"      memory measurement failed: {m}")
    ratio = ratios["tall"]
    print(
        f"\ntarget: fwdgrad.jacfwd <= torch.func.jacfwd on the tall map: {ratio:.2f}x "
        f"({'met' if ratio <= 1 else 'missed'})"
    )


if __name__ == "__main__":
    main()
