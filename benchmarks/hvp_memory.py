"""Peak memory and time of Hessian-vector products, against one plain gradient computation.

Each measurement runs in its own subprocess.  After building the model and
running the computation once (warm-up), the process resets its peak resident
set size (``/proc/self/clear_refs``), runs the computation again and reports
the growth of the peak over the resident size just before the call, so the
interpreter, torch itself and the model's parameters are not counted.  glibc's
mmap threshold is fixed (``MALLOC_MMAP_THRESHOLD_``) so that freed tensors
leave the resident set instead of being kept for reuse.

    python benchmarks/hvp_memory.py            # both models, all methods
    python benchmarks/hvp_memory.py --model cnn --repeat 5

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
import gc
import json
import os
import subprocess
import sys
import time

METHODS = [
    "grad",
    "fwdgrad.hvp (pure)",
    "fwdgrad.hvp (closure)",
    "torch.func jvp(grad)",
    "autograd.functional.hvp",
    "double backward",
]
MODELS = ["cnn", "mlp"]


def build(model_name):
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
        x = torch.randn(64, 3, 32, 32)
    else:
        model = nn.Sequential(
            nn.Linear(512, 1024),
            nn.Tanh(),
            nn.Linear(1024, 1024),
            nn.GELU(),
            nn.Linear(1024, 10),
        )
        x = torch.randn(4096, 512)
    model.eval()  # batch statistics are not needed to compare memory; eval keeps buffers fixed
    y = torch.randint(0, 10, (x.shape[0],))
    return model, x, y


def make_call(model_name, method):
    import torch
    import torch.nn.functional as F
    from torch.func import functional_call

    import fwdgrad

    model, x, y = build(model_name)
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


def _rss_kib():
    with open("/proc/self/status") as f:
        fields = dict(line.split(":", 1) for line in f)
    return int(fields["VmRSS"].split()[0]), int(fields["VmHWM"].split()[0])


def _reset_peak():
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def measure(model_name, method, repeat):
    import torch

    torch.set_num_threads(1)
    call = make_call(model_name, method)
    out = call()  # warm-up: caches, lazy initialisation
    del out
    gc.collect()
    rss0, _ = _rss_kib()
    _reset_peak()
    out = call()
    _, peak = _rss_kib()
    del out
    gc.collect()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = call()
        times.append(time.perf_counter() - t0)
        del out
    times.sort()
    return {"peak_mib": (peak - rss0) / 1024, "time_s": times[len(times) // 2]}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, action="append")
    parser.add_argument("--method", choices=METHODS, action="append")
    parser.add_argument("--repeat", type=int, default=5, help="timed calls per measurement (median)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(measure(args.child[0], args.child[1], args.repeat)))
        return
    here = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([os.path.dirname(here), os.environ.get("PYTHONPATH", "")]))
    # glibc keeps freed memory resident and raises its mmap threshold after
    # frees; a fixed threshold makes resident memory follow live tensors.
    env.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
    env.setdefault("MALLOC_TRIM_THRESHOLD_", "65536")
    for model_name in args.model or MODELS:
        results = {}
        for method in args.method or METHODS:
            proc = subprocess.run(
                [sys.executable, __file__, "--child", model_name, method, "--repeat", str(args.repeat)],
                capture_output=True, text=True, env=env,
            )
            if proc.returncode:
                print(f"{model_name} / {method} failed:\n{proc.stderr[-2000:]}", file=sys.stderr)
                continue
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
        base = results.get("grad")
        print(f"\n{model_name}: peak memory above the pre-call resident size, and median time")
        print(f"{'method':<26} {'peak MiB':>9} {'x grad':>7} {'time ms':>9} {'x grad':>7}")
        for method, r in results.items():
            mem_ratio = r["peak_mib"] / base["peak_mib"] if base else float("nan")
            time_ratio = r["time_s"] / base["time_s"] if base else float("nan")
            print(
                f"{method:<26} {r['peak_mib']:>9.1f} {mem_ratio:>7.2f} "
                f"{1000 * r['time_s']:>9.1f} {time_ratio:>7.2f}"
            )


if __name__ == "__main__":
    main()
