"""Peak memory and time of Hessian-vector products, against one plain gradient computation.

Each measurement runs in its own subprocess.  After building the model and
running the computation once (warm-up), the process resets its peak resident
set size (``/proc/self/clear_refs``), runs the computation again and reports
the growth of the peak over the resident size just before the call, so the
interpreter, torch itself and the model's parameters are not counted.  glibc's
mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors
leave the resident set instead of being kept for reuse.  Times come from one
more subprocess per model with default allocator settings, one thread, the
methods interleaved round by round; the median over rounds is reported
(helpers in ``benchmarks/common.py``).

    python benchmarks/hvp_memory.py            # both models, all methods
    python benchmarks/hvp_memory.py --model cnn --rounds 10

Methods:

* ``grad``: one plain ``torch.autograd.grad`` of the loss (the reference).
* ``fwdgrad.hvp (pure)``: ``fwdgrad.hvp(loss_of_params, params, v)``.
* ``fwdgrad.hvp (closure)``: ``fwdgrad.hvp(lambda: loss(model(x)), params, v)``.
* ``torch.func jvp(grad)``: PyTorch's forward-over-reverse.
* ``autograd.functional.hvp``: PyTorch's double-backward trick.
* ``double backward``: ``grad(grad(loss, create_graph=True) . v)``.

Targets (issue 3): fwdgrad's peak at most about 2x the plain gradient's, and
fwdgrad no slower than torch.func's ``jvp(grad)``.
"""

import argparse
import json
import sys

from common import peak_growth, run_child, time_interleaved

METHODS = [
    "grad",
    "fwdgrad.hvp (pure)",
    "fwdgrad.hvp (closure)",
    "torch.func jvp(grad)",
    "autograd.functional.hvp",
    "double backward",
]
MODELS = ["cnn", "mlp"]


def build(model_name, batch=None):
    """The model, a batch of inputs and labels; ``batch`` overrides the default size."""
    import torch
    import torch.nn as nn

    torch.manual_seed(0)
    if model_name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1),
            nn.BatchNorm2d(32),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.BatchNorm2d(64),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 8 * 8, 10),
        )
        x = torch.randn(batch or 64, 3, 32, 32)
    else:
        model = nn.Sequential(
            nn.Linear(512, 1024),
            nn.Tanh(),
            nn.Linear(1024, 1024),
            nn.GELU(),
            nn.Linear(1024, 10),
        )
        x = torch.randn(batch or 4096, 512)
    model.eval()  # batch statistics are not needed to compare memory; eval keeps buffers fixed
    y = torch.randint(0, 10, (x.shape[0],))
    return model, x, y


def make_call(model_name, method, batch=None):
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    import fwdgrad

    model, x, y = build(model_name, batch)
    params = dict(model.named_parameters())
    names = list(params)
    v = {k: torch.randn_like(p) for k, p in params.items()}

    def loss_of(ps):
        return F.cross_entropy(functional_call(model, ps, (x,)), y)

    if method == "grad":
        def call():
            loss = F.cross_entropy(model(x), y)
            return torch.autograd.grad(loss, list(params.values()))
    elif method == "fwdgrad.hvp (pure)":
        def call():
            return fwdgrad.hvp(loss_of, params, v)
    elif method == "fwdgrad.hvp (closure)":
        def call():
            return fwdgrad.hvp(lambda: F.cross_entropy(model(x), y), params, v)
    elif method == "torch.func jvp(grad)":
        plain = {k: p.detach() for k, p in params.items()}

        def call():
            return torch.func.jvp(torch.func.grad(loss_of), (plain,), (v,))[1]
    elif method == "autograd.functional.hvp":
        plain = tuple(p.detach() for p in params.values())

        def loss_of_tuple(*ps):
            return loss_of(dict(zip(names, ps)))

        def call():
            return torch.autograd.functional.hvp(loss_of_tuple, plain, tuple(v.values()))[1]
    elif method == "double backward":
        ps = list(params.values())
        vs = list(v.values())

        def call():
            loss = F.cross_entropy(model(x), y)
            gs = torch.autograd.grad(loss, ps, create_graph=True)
            dot = sum((g * u).sum() for g, u in zip(gs, vs))
            return torch.autograd.grad(dot, ps)
    else:
        raise ValueError(method)
    return call


def measure_memory(model_name, method):
    import torch

    torch.set_num_threads(1)
    return {"peak_mib": peak_growth(make_call(model_name, method)) / 2**20}


def measure_time(model_name, methods, rounds):
    """Median time per call of each method, interleaved round by round."""
    import torch

    torch.set_num_threads(1)
    return time_interleaved({m: make_call(model_name, m) for m in methods}, rounds)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, action="append")
    parser.add_argument("--method", choices=METHODS, action="append")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds (the median is reported)")
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--time-child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.memory_child:
        print(json.dumps(measure_memory(*args.memory_child)))
        return
    if args.time_child:
        print(json.dumps(measure_time(args.time_child[0], args.time_child[1:], args.rounds)))
        return
    methods = args.method or METHODS
    if "grad" not in methods:
        methods = ["grad"] + methods
    for model_name in args.model or MODELS:
        memory = {m: run_child(__file__, ["--memory-child", model_name, m], memory=True) for m in methods}
        times = run_child(__file__, ["--time-child", model_name, *methods, "--rounds", str(args.rounds)])
        for what, r in [("time", times)] + [(f"memory of {m}", r) for m, r in memory.items()]:
            if "error" in r:
                print(f"{model_name}: {what} failed: {r['error']}", file=sys.stderr)
        base_mem = memory["grad"].get("peak_mib", float("nan"))
        base_time = times.get("grad", float("nan"))
        print(f"\n{model_name}: peak memory above the pre-call resident size; median time of {args.rounds} interleaved rounds")
        print(f"{'method':<26} {'peak MiB':>9} {'x grad':>7} {'time ms':>9} {'x grad':>7}")
        for m in methods:
            peak = memory[m].get("peak_mib", float("nan"))
            t = times.get(m, float("nan"))
            print(f"{m:<26} {peak:>9.1f} {peak / base_mem:>7.2f} {1000 * t:>9.1f} {t / base_time:>7.2f}")


if __name__ == "__main__":
    main()
