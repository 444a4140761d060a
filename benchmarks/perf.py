"""fwdgrad's performance suite: jvp and hvp against PyTorch's anchors, CPU float32, one thread.

    python benchmarks/perf.py            # every workload, about three minutes
    python benchmarks/perf.py --quick    # fewer rounds
    python benchmarks/perf.py --workload mlp --workload cnn --no-memory

Workloads (jvp with respect to the inputs, under ``torch.no_grad()`` unless
said otherwise):

* ``mlp``: 4 x (Linear(1024) + GELU), batch 256; ``mlp (grad mode)`` the same
  with grad enabled and parameters that require grad;
* ``cnn``: a small AlexNet-style network (convolutions, BatchNorm with batch
  statistics, ReLU, max-pool, linear), batch 16 at 64x64;
* ``gpt2 eager`` / ``gpt2 sdpa``: a GPT-2 from ``transformers`` with random
  weights (4 layers, width 256, 4 heads, sequence 128, batch 1) and
  ``attn_implementation="eager"`` / ``"sdpa"``, differentiated with respect
  to ``inputs_embeds``;
* ``chain: ...``: 200 elementwise ops on 16-element tensors
  (``benchmarks/traced.py``'s three chains), the per-op overhead;
* ``hvp mlp``: ``hvp`` of a cross-entropy loss of an MLP classifier
  (``benchmarks/hvp_memory.py``'s model, batch 1024) with respect to its
  parameters.

Anchors: the plain forward (one gradient for hvp), ``torch.func.jvp``,
``torch.autograd.functional.jvp`` (the double-backward trick); for hvp
``torch.func`` ``jvp(grad)`` and ``torch.autograd.functional.hvp``.

Every method is first checked against ``torch.func`` (for SDPA, whose CPU
kernel has no forward AD in PyTorch, against ``torch.func.jvp`` of the same
model with eager attention).  Times are medians of interleaved rounds in this
process.  Peak memory is measured in a fresh subprocess per method, two ways
(``benchmarks/common.py``): the peak of live tensor bytes from the CPU
allocator's own record (exact; the targets use it) and the growth of the
resident set (glibc can serve a tensor from memory already resident, so it
undercounts tensors of a few hundred KiB).  The table goes to
stdout, the targets of issue 5 follow with met/missed, and the plots are
written to ``docs/img/perf_time.png`` and ``docs/img/perf_memory.png``.
"""

import argparse
import concurrent.futures
import contextlib
import json
import math
import os
import sys
import warnings

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from torch.utils import _pytree as pytree  # noqa: E402

import fwdgrad  # noqa: E402
from common import ROOT, peak_growth, run_child, tensor_peak, time_interleaved  # noqa: E402

FORWARD, FUNC, AUTOGRAD = "forward", "torch.func.jvp", "autograd.functional.jvp"
FWDGRAD, TRACED = "fwdgrad.jvp", "fwdgrad.jvp(trace=True)"
GRAD, FUNC_HVP, AUTOGRAD_HVP = "grad", "torch.func jvp(grad)", "autograd.functional.hvp"
HVP_PURE, HVP_CLOSURE = "fwdgrad.hvp (pure)", "fwdgrad.hvp (closure)"
HVP_BATCH = 1024


class Case:
    """One workload: its methods (zero-argument callables), the baseline and
    anchors its ratios are taken against, and how to check each method."""

    def __init__(self, kind, methods, anchors, reference, unavailable=None, context=torch.no_grad):
        self.kind = kind  # "jvp" or "hvp"
        self.context = context
        self.methods = {name: self._in_context(fn) for name, fn in methods.items()}
        self.anchors = anchors  # anchors[0] is the baseline
        self.reference = reference  # () -> the expected tangent / Hv
        self.unavailable = unavailable or {}  # method -> why it cannot run

    def _in_context(self, fn):
        def call():
            with self.context():
                return fn()

        return call

    def result_of(self, name, out):
        """The part of a method's output that the reference gives."""
        if name == self.anchors[0]:
            return None  # the baseline (a plain forward or gradient) computes something else
        return pytree.tree_leaves(out) if self.kind == "hvp" else out[1]


def _jvp_methods(f, x, v, anchors=(FORWARD, FUNC, AUTOGRAD), traced=False):
    methods = {
        FORWARD: lambda: f(x),
        FWDGRAD: lambda: fwdgrad.jvp(f, (x,), (v,)),
    }
    if traced:
        methods[TRACED] = lambda: fwdgrad.jvp(f, (x,), (v,), trace=True)
    if FUNC in anchors:
        methods[FUNC] = lambda: torch.func.jvp(f, (x,), (v,))
    if AUTOGRAD in anchors:
        methods[AUTOGRAD] = lambda: torch.autograd.functional.jvp(f, (x,), (v,))
    return methods


def _func_reference(f, x, v):
    return lambda: torch.func.jvp(f, (x,), (v,))[1]


def mlp(grad_mode=False):
    torch.manual_seed(0)
    layers = []
    for _ in range(4):
        layers += [nn.Linear(1024, 1024), nn.GELU()]
    model = nn.Sequential(*layers)
    x, v = torch.randn(256, 1024), torch.randn(256, 1024)
    return Case("jvp", _jvp_methods(model, x, v), [FORWARD, FUNC, AUTOGRAD], _func_reference(model, x, v),
                context=torch.enable_grad if grad_mode else torch.no_grad)


def cnn():
    torch.manual_seed(0)

    def block(cin, cout, k, stride=1, pool=False):
        # Batch statistics without running buffers: torch.func refuses a model
        # that updates its buffers in place.
        bn = nn.BatchNorm2d(cout, track_running_stats=False)
        layers = [nn.Conv2d(cin, cout, k, stride=stride, padding=k // 2), bn, nn.ReLU()]
        return layers + [nn.MaxPool2d(2)] if pool else layers

    model = nn.Sequential(
        *block(3, 32, 5, stride=2, pool=True),  # 16x16
        *block(32, 64, 3, pool=True),  # 8x8
        *block(64, 128, 3),
        *block(128, 128, 3, pool=True),  # 4x4
        nn.Flatten(),
        nn.Linear(128 * 4 * 4, 256),
        nn.ReLU(),
        nn.Linear(256, 10),
    )
    x, v = torch.randn(16, 3, 64, 64), torch.randn(16, 3, 64, 64)
    return Case("jvp", _jvp_methods(model, x, v), [FORWARD, FUNC, AUTOGRAD], _func_reference(model, x, v))


def _gpt2_model(attention):
    from transformers import GPT2Config, GPT2Model
    from transformers.utils import logging

    logging.set_verbosity_error()
    torch.manual_seed(0)
    config = GPT2Config(n_layer=4, n_embd=256, n_head=4, n_positions=128, vocab_size=1024,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attention)
    model = GPT2Model(config).eval()  # eval: no dropout

    def f(embeds):
        return model(inputs_embeds=embeds, use_cache=False).last_hidden_state

    return f


def gpt2(attention):
    f = _gpt2_model(attention)
    gen = torch.Generator().manual_seed(1)
    x, v = torch.randn(1, 128, 256, generator=gen), torch.randn(1, 128, 256, generator=gen)
    if attention == "eager":
        return Case("jvp", _jvp_methods(f, x, v), [FORWARD, FUNC, AUTOGRAD], _func_reference(f, x, v))
    # SDPA's CPU kernel has no forward AD in PyTorch and no double backward:
    # neither anchor runs.  The same weights with eager attention give the reference.
    unavailable = {
        FUNC: "cannot run: no forward AD for _scaled_dot_product_flash_attention_for_cpu",
        AUTOGRAD: "cannot run: no derivative for _scaled_dot_product_flash_attention_for_cpu_backward",
    }
    return Case("jvp", _jvp_methods(f, x, v, anchors=(FORWARD,)), [FORWARD, FUNC, AUTOGRAD],
                _func_reference(_gpt2_model("eager"), x, v), unavailable)


def chain(name):
    import traced

    body = traced.CHAINS[name]
    torch.manual_seed(0)
    x, y, v = torch.randn(16), torch.randn(16), torch.randn(16)

    def f(x):
        return body(x, y)

    return Case("jvp", _jvp_methods(f, x, v, traced=True), [FORWARD, FUNC, AUTOGRAD], _func_reference(f, x, v))


def hvp_mlp():
    import hvp_memory

    methods = {m: hvp_memory.make_call("mlp", m, batch=HVP_BATCH)
               for m in (GRAD, HVP_PURE, HVP_CLOSURE, FUNC_HVP, AUTOGRAD_HVP)}
    return Case("hvp", methods, [GRAD, FUNC_HVP, AUTOGRAD_HVP], methods[FUNC_HVP], context=contextlib.nullcontext)


WORKLOADS = {
    "mlp": mlp,
    "mlp (grad mode)": lambda: mlp(grad_mode=True),
    "cnn": cnn,
    "gpt2 eager": lambda: gpt2("eager"),
    "gpt2 sdpa": lambda: gpt2("sdpa"),
    "chain: unary": lambda: chain("unary"),
    "chain: tensor constants": lambda: chain("tensor constants"),
    "chain: scalar constants": lambda: chain("scalar constants"),
    "hvp mlp": hvp_mlp,
}


def check(name, case):
    """Each method against the reference (torch.func), before anything is timed."""
    expected = case.reference()
    for method, fn in case.methods.items():
        got = case.result_of(method, fn())
        if got is None:
            continue
        for a, b in zip(pytree.tree_leaves(got), pytree.tree_leaves(expected), strict=True):
            scale = b.abs().max().item() or 1.0
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * scale,
                                       msg=lambda m: f"{name}, {method}: {m}")


def memory_child(workload, method):
    """Both peaks of one method, in this fresh process: the resident set's
    growth first, then the live tensor bytes (the profiler, which that needs,
    would add its own memory to the resident set)."""
    torch.set_num_threads(1)
    fn = WORKLOADS[workload]().methods[method]
    rss = peak_growth(fn)
    return {"rss_bytes": rss, "tensor_bytes": tensor_peak(fn, warmup=0)}


def measure_memory(workloads):
    """Peak memory of every (workload, method), each in a fresh process, two at a time."""
    jobs = []
    for name, case in workloads.items():
        jobs += [(name, m) for m in case.methods]
    script = os.path.abspath(__file__)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = pool.map(lambda job: run_child(script, ["--memory-child", *job], memory=True), jobs)
        return dict(zip(jobs, results))


# --------------------------------------------------------------------------
# Report.

SHORT = {FORWARD: "fwd", GRAD: "grad", FUNC: "func", FUNC_HVP: "func", AUTOGRAD: "autograd",
         AUTOGRAD_HVP: "autograd"}
SMALL = 1 << 20  # a baseline peak below this is noise next to the interpreter's own allocations: no ratios


def _ratio(a, b):
    if a is None or b is None or b <= 0 or math.isnan(a) or math.isnan(b):
        return None
    return a / b


def _fmt(x, spec):
    return format(x, spec) if x is not None else "-".rjust(int(spec.split(".")[0]))


def _mem_ratio(r, key, m, a):
    base = r[key].get(r["anchors"][0])
    if base is None or base < SMALL:
        return None
    return _ratio(r[key].get(m), r[key].get(a))


def print_table(name, r):
    anchors = r["anchors"]
    print(f"\n{name}  (x {', x '.join(f'{SHORT[a]}: ratio to {a}' for a in anchors)})")
    ratios = "".join(f" {'x ' + SHORT[a]:>9s}" for a in anchors)
    print(f"  {'method':27s} {'time ms':>9s}{ratios} {'tensors MiB':>11s}{ratios} {'RSS MiB':>8s} "
          f"{'x ' + SHORT[anchors[0]]:>7s}")
    for m in r["methods"] + list(r["unavailable"]):
        if m in r["unavailable"]:
            print(f"  {m:27s} {r['unavailable'][m]}")
            continue
        t, tb, rss = r["times"][m], r["tensors"].get(m), r["rss"].get(m)
        row = f"  {m:27s} {t * 1e3:9.3f}"
        row += "".join(f" {_fmt(_ratio(t, r['times'].get(a)), '9.2f')}" for a in anchors)
        row += f" {_fmt(None if tb is None else tb / 2**20, '11.2f')}"
        row += "".join(f" {_fmt(_mem_ratio(r, 'tensors', m, a), '9.2f')}" for a in anchors)
        row += f" {_fmt(None if rss is None else rss / 2**20, '8.1f')} {_fmt(_mem_ratio(r, 'rss', m, anchors[0]), '7.2f')}"
        print(row)


def targets(results):
    """(description, value, limit, note) for each target of issue 5.  Memory is
    judged on live tensor bytes; the note gives the resident-set ratio.  A value
    of None is a target met by running at all (SDPA, where torch.func cannot)."""
    out = []

    def t(w, m, a):
        r = results.get(w)
        return None if r is None else _ratio(r["times"].get(m), r["times"].get(a))

    def add(desc, value, limit, note=""):
        if value is not None:
            out.append((desc, value, limit, note))

    def add_mem(desc, w, m, a, limit):
        r = results.get(w)
        if r is not None:
            rss = _mem_ratio(r, "rss", m, a)
            add(desc, _mem_ratio(r, "tensors", m, a), limit, "" if rss is None else f"(RSS {rss:.2f}x)")

    add("mlp: fwdgrad.jvp time <= 2.2x forward", t("mlp", FWDGRAD, FORWARD), 2.2)
    add("mlp (grad mode): fwdgrad.jvp time <= 2.2x forward", t("mlp (grad mode)", FWDGRAD, FORWARD), 2.2)
    for w in ("mlp", "mlp (grad mode)", "cnn"):
        add(f"{w}: fwdgrad.jvp time <= 0.8x torch.func.jvp", t(w, FWDGRAD, FUNC), 0.8)
    add("gpt2 eager: fwdgrad.jvp time <= 1.0x torch.func.jvp", t("gpt2 eager", FWDGRAD, FUNC), 1.0)
    if "gpt2 sdpa" in results:
        out.append(("gpt2 sdpa: fwdgrad.jvp runs (torch.func.jvp cannot)", None, None, ""))
    chains = [w for w in results if w.startswith("chain")]
    for w in chains:
        add(f"{w}: fwdgrad.jvp time <= 0.5x torch.func.jvp", t(w, FWDGRAD, FUNC), 0.5)
    for w in ("mlp", "cnn", "gpt2 eager", "gpt2 sdpa"):
        add_mem(f"{w}: fwdgrad.jvp peak memory (no_grad) <= 2.2x forward", w, FWDGRAD, FORWARD, 2.2)
    for m in (HVP_PURE, HVP_CLOSURE):
        add(f"hvp mlp: {m} time <= 1.0x torch.func jvp(grad)", t("hvp mlp", m, FUNC_HVP), 1.0)
        add_mem(f"hvp mlp: {m} peak memory <= 2.0x grad", "hvp mlp", m, GRAD, 2.0)
    for w in chains:
        add(f"{w}: traced jvp time <= 0.15x torch.func.jvp", t(w, TRACED, FUNC), 0.15)
    return out


def print_targets(results):
    print("\nTargets (issue 5; memory: peak live tensor bytes)")
    for desc, value, limit, note in targets(results):
        if value is None:
            print(f"  {desc:64s} {'':>7s}  met")
        else:
            verdict = "met" if value <= limit else f"missed by {100 * (value / limit - 1):.1f}%"
            print(f"  {desc:64s} {value:6.3f}x  {verdict} {note}".rstrip())


def rst_tables(results):
    """The figures and the targets as reStructuredText list-tables (for docs/performance.rst)."""
    lines = [".. list-table:: Median time and peak memory, CPU float32, one thread",
             "   :header-rows: 1", "",
             "   * - workload", "     - method", "     - time ms", "     - x baseline", "     - x torch.func",
             "     - x autograd.functional", "     - tensors MiB", "     - x baseline", "     - x torch.func",
             "     - RSS MiB", "     - x baseline"]

    def cell(x, spec):
        return "-" if x is None else format(x, spec)

    for w, r in results.items():
        base, func, ag = r["anchors"]
        for i, m in enumerate(r["methods"] + list(r["unavailable"])):
            first = f"   * - {w if i == 0 else ''}".rstrip()
            if m in r["unavailable"]:
                lines += [first, f"     - {m}", f"     - {r['unavailable'][m]}"] + ["     -"] * 8
                continue
            t, tb, rss = r["times"][m], r["tensors"].get(m), r["rss"].get(m)
            lines += [first, f"     - {m}", f"     - {t * 1e3:.2f}",
                      f"     - {cell(_ratio(t, r['times'].get(base)), '.2f')}",
                      f"     - {cell(_ratio(t, r['times'].get(func)), '.2f')}",
                      f"     - {cell(_ratio(t, r['times'].get(ag)), '.2f')}",
                      f"     - {cell(None if tb is None else tb / 2**20, '.2f')}",
                      f"     - {cell(_mem_ratio(r, 'tensors', m, base), '.2f')}",
                      f"     - {cell(_mem_ratio(r, 'tensors', m, func), '.2f')}",
                      f"     - {cell(None if rss is None else rss / 2**20, '.1f')}",
                      f"     - {cell(_mem_ratio(r, 'rss', m, base), '.2f')}"]
    lines += ["", ".. list-table:: Targets (memory: peak live tensor bytes)", "   :header-rows: 1", "",
              "   * - target", "     - measured", "     - verdict"]
    for desc, value, limit, note in targets(results):
        if value is None:
            lines += [f"   * - {desc}", "     - runs", "     - met"]
        else:
            verdict = "met" if value <= limit else f"missed by {100 * (value / limit - 1):.1f}%"
            lines += [f"   * - {desc}", f"     - {value:.3f}x {note}".rstrip(), f"     - {verdict}"]
    return "\n".join(lines) + "\n"


COLORS = {FORWARD: "#888888", GRAD: "#888888", FWDGRAD: "#1f77b4", TRACED: "#17becf", HVP_PURE: "#1f77b4",
          HVP_CLOSURE: "#17becf", FUNC: "#ff7f0e", FUNC_HVP: "#ff7f0e", AUTOGRAD: "#2ca02c",
          AUTOGRAD_HVP: "#2ca02c"}


# Targets relative to a panel's baseline, drawn as dashed lines.
PLOT_TARGETS = {
    "times": {"mlp": 2.2, "mlp (grad mode)": 2.2},
    "tensors": {"mlp": 2.2, "cnn": 2.2, "gpt2 eager": 2.2, "gpt2 sdpa": 2.2, "hvp mlp": 2.0},
}


def plot(results, key, title, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [w for w in results if results[w][key]
             and (key == "times" or (results[w][key].get(results[w]["anchors"][0]) or 0) >= SMALL)]
    limits = PLOT_TARGETS.get(key, {})
    cols = 3
    rows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 2.4 * rows), squeeze=False)
    for ax, w in zip(axes.flat, names):
        r = results[w]
        base_name = r["anchors"][0]
        base = r[key][base_name]
        methods = [m for m in r["methods"] if r[key].get(m) is not None] + list(r["unavailable"])
        values = [r[key][m] / base if m in r[key] else 0.0 for m in methods]
        ys = range(len(methods))
        ax.barh(ys, values, color=[COLORS.get(m, "#9467bd") for m in methods])
        ax.set_yticks(list(ys), methods, fontsize=8)
        ax.invert_yaxis()
        ax.set_title(w, fontsize=9)
        ax.axvline(1.0, color="black", linewidth=0.6)
        if w in limits:
            ax.axvline(limits[w], color="#d62728", linewidth=0.8, linestyle="--")
        for y, m, val in zip(ys, methods, values):
            ax.text(val, y, " cannot run" if m in r["unavailable"] else f" {val:.2f}x", va="center", fontsize=7)
        ax.set_xlim(0, max(max(values), 1.0) * 1.3)
        ax.tick_params(axis="x", labelsize=7)
        ax.set_xlabel(f"x {base_name}", fontsize=8)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds")
    parser.add_argument("--rounds", type=int, help="timed rounds per workload (default 21, 5 with --quick)")
    parser.add_argument("--workload", action="append", choices=list(WORKLOADS), help="repeatable; default all")
    parser.add_argument("--no-memory", action="store_true", help="skip the memory subprocesses")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--rst", help="also write the tables as reStructuredText to this file")
    parser.add_argument("--from-json", help="report figures saved by --json instead of measuring")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    if args.memory_child:
        print(json.dumps(memory_child(*args.memory_child)))
        return
    torch.set_num_threads(1)
    rounds = args.rounds or (5 if args.quick else 21)
    names = args.workload or list(WORKLOADS)
    print(f"torch {torch.__version__}, CPU float32, 1 thread; median of {rounds} interleaved rounds")
    cases, results = {}, {}
    if args.from_json:
        with open(args.from_json) as fh:
            results = json.load(fh)
        names = list(results)
    for name in names if not args.from_json else ():
        case = cases[name] = WORKLOADS[name]()
        check(name, case)
        times = time_interleaved(case.methods, rounds, warmup=2)
        results[name] = {"times": times, "tensors": {}, "rss": {}, "anchors": case.anchors,
                         "methods": list(case.methods), "unavailable": case.unavailable}
        print(f"  {name}: checked against torch.func, timed", flush=True)
    if not args.no_memory and not args.from_json:
        for (name, m), r in measure_memory(cases).items():
            if "error" in r:
                print(f"  memory of {name}, {m} failed: {r['error']}")
            else:
                results[name]["tensors"][m] = r["tensor_bytes"]
                results[name]["rss"][m] = r["rss_bytes"]
    for name in names:
        print_table(name, results[name])
    print_targets(results)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1)
    if args.rst:
        with open(args.rst, "w") as fh:
            fh.write(rst_tables(results))
    if not args.no_plots:
        img = os.path.join(ROOT, "docs", "img")
        plot(results, "times", "Median time relative to the baseline (CPU, float32, 1 thread; dashed: target)",
             os.path.join(img, "perf_time.png"))
        if not args.no_memory:
            plot(results, "tensors", "Peak live tensor memory relative to the baseline (each in its own process;"
                 " dashed: target)", os.path.join(img, "perf_memory.png"))
        print(f"\nplots: {os.path.join(img, 'perf_time.png')}, {os.path.join(img, 'perf_memory.png')}")


if __name__ == "__main__":
    main()
