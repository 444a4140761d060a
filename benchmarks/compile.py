"""fwdgrad under torch.compile, side by side with torch.func (one run, medians of interleaved rounds).

For each workload (the 200-op unary chain on 16 elements, an MLP, a GPT-2
block) it times

- ``torch.func.jvp`` eager and ``torch.compile(torch.func.jvp)`` (the anchors);
- ``fwdgrad.jvp`` eager, traced (``trace=True``), traced and compiled
  (``trace=True, compile=True``), ``torch.compile`` of a function that
  calls ``fwdgrad.jvp`` (``fullgraph=True``), and ``fwdgrad.jvp`` of a
  compiled ``f``;

and prints each time with its ratio to both anchors.  It also checks that
``fwdgrad.jvp(torch.compile(f))`` leaves the plain compiled ``f`` as fast as
before, with no new compile.

    PYTHONPATH=. python benchmarks/compile.py [--rounds 20] [--json PATH] [--plot PNG] [--only chain]

Targets (issue 16): compiled fwdgrad <= 1.0x torch.compile(torch.func.jvp).
Compiling takes a while (inductor, C++); the times exclude it.
"""

import argparse
import json
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

import fwdgrad
from common import run_child, time_interleaved

FUNC, FUNC_C = "torch.func.jvp", "compile(torch.func.jvp)"
EAGER, TRACED, TRACED_C, COMPILED, OF_COMPILED = (
    "fwdgrad.jvp", "fwdgrad.jvp(trace=True)", "fwdgrad.jvp(trace=True, compile=True)", "compile(fwdgrad.jvp)",
    "fwdgrad.jvp(compile(f))",
)
METHODS = [FUNC, FUNC_C, EAGER, TRACED, TRACED_C, COMPILED, OF_COMPILED]


def chain():
    def f(x):
        for _ in range(50):
            x = torch.cos(torch.sigmoid(torch.tanh(torch.sin(x))))
        return x

    torch.manual_seed(0)
    return f, torch.randn(16), torch.randn(16)


def mlp():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512), nn.GELU(), nn.Linear(512, 512))
    return model, torch.randn(64, 512), torch.randn(64, 512)


def gpt2_block():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_embd=256, n_head=4, n_positions=128, attn_implementation="eager")
    block = GPT2Block(config).eval()

    def f(h):
        out = block(h)
        return out[0] if isinstance(out, tuple) else out

    return f, torch.randn(1, 128, 256), torch.randn(1, 128, 256)


WORKLOADS = {"chain": chain, "mlp": mlp, "gpt2 block": gpt2_block}


def probe(wname):
    """Whether ``torch.compile(torch.func.jvp)`` runs on a workload, tried in a fresh
    process: a failed compile can leave functorch's state broken for the rest of
    this one (torch.func.jvp then fails too)."""
    f, x, v = WORKLOADS[wname]()
    try:
        with torch.no_grad():
            torch.compile(lambda x, v: torch.func.jvp(f, (x,), (v,)), dynamic=False)(x, v)
    except Exception as e:
        lines = [ln for ln in str(e).splitlines() if ln.strip()]
        print(json.dumps({"error": f"{type(e).__name__}: {' / '.join(lines[:2])}"}))
        return
    print(json.dumps({"ok": True}))


def methods_for(f, x, v):
    func_c = torch.compile(lambda x, v: torch.func.jvp(f, (x,), (v,)), dynamic=False)
    fwd_c = torch.compile(lambda x, v: fwdgrad.jvp(f, (x,), (v,)), fullgraph=True, dynamic=False)
    f_c = torch.compile(f, dynamic=False)
    return {
        FUNC: lambda: torch.func.jvp(f, (x,), (v,)),
        FUNC_C: lambda: func_c(x, v),
        EAGER: lambda: fwdgrad.jvp(f, (x,), (v,)),
        TRACED: lambda: fwdgrad.jvp(f, (x,), (v,), trace=True),
        TRACED_C: lambda: fwdgrad.jvp(f, (x,), (v,), trace=True, compile=True),
        COMPILED: lambda: fwd_c(x, v),
        OF_COMPILED: lambda: fwdgrad.jvp(f_c, (x,), (v,)),
    }


def warm(methods, reference):
    """Run each method until compiled and check its tangent.

    Returns the warm-up seconds, and the methods that failed with the reason
    (they are dropped from ``methods``).
    """
    seconds, failed = {}, {}
    for name, fn in list(methods.items()):
        t0 = time.perf_counter()
        try:
            for _ in range(3):
                out = fn()
        except Exception as e:  # an anchor that cannot run is reported, not fatal
            failed[name] = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:100]}"
            del methods[name]
            continue
        seconds[name] = time.perf_counter() - t0
        if not torch.allclose(out[1], reference, atol=1e-4, rtol=1e-4):
            raise AssertionError(f"{name}: wrong tangent")
    return seconds, failed


def cache_check(f, x, v, rounds):
    """``fwdgrad.jvp(torch.compile(f))`` must not slow down or recompile plain compiled calls."""
    cf = torch.compile(f, dynamic=False)
    for _ in range(3):
        cf(x)
    # Each time is taken side by side with eager f, and the ratio of the two
    # compared, so that a change in the machine's load between them cancels.
    t = time_interleaved({"compiled": lambda: cf(x), "eager": lambda: f(x)}, rounds)
    before = t["compiled"] / t["eager"]
    graphs = counters["stats"]["unique_graphs"]
    fwdgrad.jvp(cf, (x,), (v,))
    fwdgrad.jvp(cf, (x,), (v,))
    after_jvp = counters["stats"]["unique_graphs"]
    t = time_interleaved({"compiled": lambda: cf(x), "eager": lambda: f(x)}, rounds)
    after = t["compiled"] / t["eager"]
    cf(x)
    return {
        "compiled/eager before": before, "compiled/eager after": after, "ratio": after / before,
        "graphs for duals": after_jvp - graphs, "graphs after": counters["stats"]["unique_graphs"] - after_jvp,
    }


def _ratio(t, times, anchor):
    return f"{t / times[anchor]:13.2f}x" if anchor in times else f"{'-':>14s}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--plot", help="write a bar chart of the times relative to torch.func.jvp here")
    parser.add_argument("--rst", help="write the table for the docs here (reStructuredText)")
    parser.add_argument("--only", action="append", choices=list(WORKLOADS))
    parser.add_argument("--probe", choices=list(WORKLOADS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        return probe(args.probe)
    torch.set_num_threads(args.threads)
    torch._dynamo.config.cache_size_limit = 64
    print(f"torch {torch.__version__}, {args.threads} thread(s), median of {args.rounds} interleaved rounds")
    results = {}
    for wname in args.only or WORKLOADS:
        anchor = run_child(__file__, ["--probe", wname])
        f, x, v = WORKLOADS[wname]()
        with torch.no_grad():
            reference = torch.func.jvp(f, (x,), (v,))[1]
            methods = methods_for(f, x, v)
            if "error" in anchor:
                del methods[FUNC_C]
            compile_s, failed = warm(methods, reference)
            if "error" in anchor:
                failed[FUNC_C] = anchor["error"][:160]
            times = time_interleaved(methods, args.rounds)
            cache = cache_check(f, x, v, args.rounds)
        results[wname] = {"times": times, "compile seconds": compile_s, "failed": failed, "plain compiled f": cache}
        print(f"\n{wname}")
        print(f"  {'method':40s} {'time ms':>9s} {'vs torch.func':>14s} {'vs compiled':>12s} {'warm-up s':>10s}")
        for m in METHODS:
            if m in failed:
                print(f"  {m:40s} fails: {failed[m]}")
                continue
            t = times[m]
            print(f"  {m:40s} {t * 1e3:9.3f} {_ratio(t, times, FUNC)} {_ratio(t, times, FUNC_C)[1:]} "
                  f"{compile_s[m]:10.1f}")
        print(f"  compiled f's plain calls after fwdgrad.jvp(compiled f): {cache['ratio']:.2f}x before, "
              f"{cache['graphs for duals']} graph(s) for duals, {cache['graphs after']} new plain graph(s)")
    print("\ntargets")
    for wname, r in results.items():
        t = r["times"]
        if FUNC_C not in t:
            print(f"  {wname}: compile(torch.func.jvp) fails ({r['failed'][FUNC_C]}); "
                  f"compile(fwdgrad.jvp) {t[COMPILED] / t[FUNC]:.2f}x torch.func.jvp eager")
            continue
        ratio = t[COMPILED] / t[FUNC_C]
        print(f"  {wname}: compile(fwdgrad.jvp) {ratio:.2f}x compile(torch.func.jvp) (<= 1.0: "
              f"{'met' if ratio <= 1.0 else 'MISSED'}); traced+compile {t[TRACED_C] / t[FUNC_C]:.2f}x")
        if wname == "chain":
            e = t[EAGER] / t[FUNC]
            print(f"  chain: fwdgrad.jvp eager {e:.2f}x torch.func.jvp (<= 1.0: {'met' if e <= 1.0 else 'MISSED'})")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.plot:
        plot(results, args.plot)
    if args.rst:
        with open(args.rst, "w") as fh:
            fh.write(rst_table(results))


def rst_table(results):
    """One row per workload and method: ms, and the ratios to both anchors."""
    rows = [("workload", "method", "time ms", "/ torch.func.jvp", "/ compile(torch.func.jvp)")]
    for wname, r in results.items():
        t = r["times"]
        for m in METHODS:
            if m not in t:
                rows.append((wname, m, "fails", "", ""))
                continue
            c = f"{t[m] / t[FUNC_C]:.2f}x" if FUNC_C in t else "-"
            rows.append((wname, m, f"{t[m] * 1e3:.3f}", f"{t[m] / t[FUNC]:.2f}x", c))
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    rule = " ".join("=" * w for w in widths)
    line = lambda row: " ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip()  # noqa: E731
    return "\n".join([rule, line(rows[0]), rule, *map(line, rows[1:]), rule, ""])


def plot(results, path):
    """Grouped bars: each method's time over torch.func.jvp's, per workload (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    fig, ax = plt.subplots(figsize=(8, 3.6))
    width = 0.8 / len(METHODS)
    for j, m in enumerate(METHODS):
        xs, ys = [], []
        for i, w in enumerate(names):
            t = results[w]["times"]
            if m in t:
                xs.append(i + (j - len(METHODS) / 2 + 0.5) * width)
                ys.append(t[m] / t[FUNC])
        ax.bar(xs, ys, width, label=m)
    ax.set_yscale("log")
    ax.axhline(1.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylabel("time / torch.func.jvp")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
