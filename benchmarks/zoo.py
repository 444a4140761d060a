"""The model zoo benchmark: fwdgrad against torch.func and double backward, in one run.

    python benchmarks/zoo.py                       # every zoo model, float32, one thread
    python benchmarks/zoo.py --model llama --model resnet --rounds 5
    python benchmarks/zoo.py --json benchmarks/results/zoo.json

For each model of ``tests/zoo_models.py`` (the test zoo's tiny configurations,
batch 2) it reports, as ratios against anchors measured side by side in
this process (``common.time_interleaved``):

* ``jvp x``: ``fwdgrad.jvp`` w.r.t. the input / ``torch.func.jvp`` (on the
  eager-attention twin where PyTorch has no forward AD for the SDPA kernel);
* ``jvp p``: the same w.r.t. all parameters (``functional_call``);
* ``hvp``: ``fwdgrad.hvp`` (closure form) / double backward
  (``autograd.grad`` of ``<grad, v>`` with ``create_graph``, on the eager twin), and
  ``hvp/grad``, against one plain gradient;
* ``mem``: peak live tensor bytes of the hvp / of one gradient, and the same
  for double backward (``common.tensor_peak``).

``--alexnet BATCH`` (default 16) adds torchvision's full-size AlexNet: ``jvp``
w.r.t. the input, time and peak memory against ``torch.func.jvp`` and the
double-backward trick.

Goals (issue 15): ``jvp p`` at most 0.8 on every model; ``hvp`` at most 1.0,
at about 2x a gradient's memory.  A method that cannot run prints its error.
"""

import argparse
import json
import os
import sys

import torch
from torch.func import functional_call

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

import fwdgrad  # noqa: E402
import zoo_models  # noqa: E402
from common import tensor_peak, time_interleaved  # noqa: E402


def _bench(family, name, path, build, rounds):
    case = build(path, torch.float32)
    twin = build("eager" if family == "transformers" else path, torch.float32)
    gen = torch.Generator().manual_seed(1)
    x = case.x
    vx = torch.randn(x.shape, generator=gen)
    params = {k: p for k, p in case.model.named_parameters() if p.requires_grad}
    detached = {k: p.detach() for k, p in params.items()}
    vp = {k: torch.randn(p.shape, generator=gen) for k, p in params.items()}
    tp = list(params.values())

    def at(c):
        mod = zoo_models.Call(c.model, c.f)
        return lambda p: functional_call(mod, {"model." + k: t for k, t in p.items()}, (c.x,))

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    def grad():
        return torch.autograd.grad(case.loss(), tp)

    twin_tp = [p for p in twin.model.parameters() if p.requires_grad]
    twin_detached = {k: p.detach() for k, p in twin.model.named_parameters() if p.requires_grad}
    assert twin_detached.keys() == detached.keys()

    def double_backward():  # on the eager twin: the fused SDPA kernel has no double backward
        g = torch.autograd.grad(twin.loss(), twin_tp, create_graph=True)
        return torch.autograd.grad(sum((a * vp[k]).sum() for a, k in zip(g, params)), twin_tp)

    methods = {
        "fwdgrad jvp x": no_grad(lambda: fwdgrad.jvp(case.f, (x,), (vx,))),
        "func jvp x": no_grad(lambda: torch.func.jvp(twin.f, (x,), (vx,))),
        "fwdgrad jvp p": no_grad(lambda: fwdgrad.jvp(at(case), (detached,), (vp,))),
        "func jvp p": no_grad(lambda: torch.func.jvp(at(twin), (twin_detached,), (vp,))),
        "grad": grad,
        "fwdgrad hvp": lambda: fwdgrad.hvp(case.loss, params, vp),
        "double backward": double_backward,
    }
    errors = {}
    for m, fn in list(methods.items()):
        try:
            fn()
        except Exception as e:  # a method PyTorch cannot run here
            errors[m] = f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
            del methods[m]
    times = time_interleaved(methods, rounds)
    mem = {m: tensor_peak(methods[m]) for m in ("grad", "fwdgrad hvp", "double backward") if m in methods}
    row = {"model": f"{name} {path}", "times": times, "memory": mem, "errors": errors}

    def ratio(a, b, table=times):
        return table[a] / table[b] if a in table and b in table else None

    row["ratios"] = {
        "jvp x": ratio("fwdgrad jvp x", "func jvp x"),
        "jvp p": ratio("fwdgrad jvp p", "func jvp p"),
        "hvp": ratio("fwdgrad hvp", "double backward"),
        "hvp/grad": ratio("fwdgrad hvp", "grad"),
        "dbl/grad": ratio("double backward", "grad"),
        "mem hvp/grad": ratio("fwdgrad hvp", "grad", mem),
        "mem dbl/grad": ratio("double backward", "grad", mem),
    }
    return row


def alexnet_row(batch, rounds):
    """torchvision's AlexNet at full size (224x224, 1000 classes): jvp w.r.t. the input
    under no_grad, against torch.func.jvp and the double-backward trick
    (torch.autograd.functional.jvp), time and peak live tensor bytes."""
    tv = zoo_models.torchvision()
    torch.manual_seed(0)
    model = tv.models.alexnet().eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 3, 224, 224, generator=gen)
    v = torch.randn(x.shape, generator=gen)

    def no_grad(fn):
        def run():
            with torch.no_grad():
                return fn()
        return run

    methods = {
        "forward": no_grad(lambda: model(x)),
        "fwdgrad jvp": no_grad(lambda: fwdgrad.jvp(model, (x,), (v,))),
        "torch.func.jvp": no_grad(lambda: torch.func.jvp(model, (x,), (v,))),
        "double-backward trick": lambda: torch.autograd.functional.jvp(model, x, v),
    }
    times = time_interleaved(methods, rounds)
    mem = {m: tensor_peak(fn, warmup=1) for m, fn in methods.items()}
    print(f"AlexNet, batch {batch} at 224x224, jvp w.r.t. the input:")
    for m in methods:
        print(f"  {m:24s} {times[m] * 1e3:9.1f} ms  {times[m] / times['forward']:5.2f}x forward   "
              f"peak {mem[m] / 2 ** 20:8.1f} MiB  {mem[m] / mem['forward']:5.2f}x forward")
    return {"model": f"alexnet batch {batch}", "times": times, "memory": mem}


def _fmt(x):
    return "   -  " if x is None else f"{x:6.2f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", action="append", help="a zoo model name (repeatable); default all")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--json", help="write the rows to this file")
    parser.add_argument("--alexnet", type=int, metavar="BATCH", default=16,
                        help="batch of the full-size AlexNet row (0: skip it)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    cols = ["jvp x", "jvp p", "hvp", "hvp/grad", "dbl/grad", "mem hvp/grad", "mem dbl/grad"]
    print(f"{'model':22s}" + "".join(f"{c:>14s}" for c in cols))
    for family, name, path, build in zoo_models.entries():
        if args.model and name not in args.model:
            continue
        if family == "torchvision" and zoo_models.torchvision() is None:
            print(f"{name:22s} skipped: torchvision is not installed")
            continue
        row = _bench(family, name, path, build, args.rounds)
        rows.append(row)
        print(f"{row['model']:22s}" + "".join(f"{_fmt(row['ratios'][c]):>14s}" for c in cols), flush=True)
        for m, e in row["errors"].items():
            print(f"    {m}: {e}")
    jp = [r["ratios"]["jvp p"] for r in rows if r["ratios"]["jvp p"] is not None]
    hv = [r["ratios"]["hvp"] for r in rows if r["ratios"]["hvp"] is not None]
    if jp:
        print(f"goal jvp p <= 0.8 on every model: {'met' if max(jp) <= 0.8 else 'missed'} (worst {max(jp):.2f})")
    if hv:
        print(f"goal hvp <= 1.0 x double backward on every model: {'met' if max(hv) <= 1.0 else 'missed'} "
              f"(worst {max(hv):.2f})")
    if args.alexnet and zoo_models.torchvision() is not None and (not args.model or "alexnet" in args.model):
        rows.append(alexnet_row(args.alexnet, args.rounds))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
