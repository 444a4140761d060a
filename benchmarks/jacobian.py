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
import gc
import json
import os
import statistics
import subprocess
import sys
import time

import torch

import fwdgrad

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


def time_interleaved(methods, rounds):
    """Median seconds per call, one call of each method per round, rotating the order."""
    for fn in methods.values():
        fn()
    samples = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        gc.collect()
        k = r % len(names)
        for name in names[k:] + names[:k]:
            t0 = time.perf_counter()
            methods[name]()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def _kib(key):
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def peak_here(fn):
    """Bytes the resident set grows by during one call (after two warm-up calls)."""
    fn()
    fn()
    gc.collect()
    base = _kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as fh:  # reset the peak (VmHWM) to now
        fh.write("5")
    out = fn()
    peak = _kib("VmHWM:")
    del out
    return (peak - base) * 1024


def peak_in_fresh_process(case, method, threads):
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    cmd = [sys.executable, __file__, "--memory", case, method, "--threads", str(threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return lines[-1] if lines else f"exit status {proc.returncode}"
    return json.loads(proc.stdout.strip().splitlines()[-1])["peak_bytes"]


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
        print(json.dumps({"peak_bytes": peak_here(build(case)[2][method])}))
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
