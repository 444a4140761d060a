"""Curvature operators side by side: fwdgrad, curvlinops and hessian-eigenthings, in one run.

For a small CNN and a small transformer (one batch, float32, one thread;
``transformer`` is ``nn.TransformerEncoderLayer``, whose CPU attention kernel
has neither forward AD nor a double backward in PyTorch, so only fwdgrad
differentiates it; ``transformer-math`` writes the attention out so that
all three libraries can):

* matvec and matmat (``--k`` columns) time of the Hessian and the GGN
  operators: fwdgrad's ``hessian_operator`` / ``ggn_operator`` (closure form
  over the live model, cross-entropy's Hessian in closed form),
  curvlinops' ``HessianLinearOperator`` / ``GGNLinearOperator`` (torch.func
  ``jvp(jacrev)`` and ``jvp``/``vjp`` under ``vmap``), and
  hessian-eigenthings' ``HessianOperator`` / ``GGNOperator`` (double
  backward; matmat as a loop of matvecs, which is what it offers);
* peak memory of the same calls: the peak of live tensor bytes above those
  alive before the call (``tensor_peak`` in ``benchmarks/common.py``, from
  the CPU allocator's own record);
* wall time of the top-5 eigenvalues of the Hessian: ``scipy.sparse.linalg.eigsh``
  on each library's scipy operator (``to_scipy()``; hessian-eigenthings has
  none, so its own ``lanczos``), and fwdgrad's own Lanczos (``fwdgrad.spectra``).

Ratios are fwdgrad over curvlinops (goal: time <= 0.7, memory <= 0.6).
A library that is not installed is left out of the table.

    python benchmarks/curvature.py                 # both models
    python benchmarks/curvature.py --model cnn --rounds 5 --json out.json
"""

import argparse
import gc
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from common import tensor_peak, time_interleaved  # noqa: E402

import fwdgrad  # noqa: E402
import fwdgrad.linops as L  # noqa: E402
import fwdgrad.spectra as S  # noqa: E402

try:
    import curvlinops
except ImportError:
    curvlinops = None
try:
    import hessian_eigenthings as he
except ImportError:
    he = None
try:
    from scipy.sparse.linalg import eigsh
except ImportError:
    eigsh = None


class TinyTransformer(nn.Module):
    """Token embedding, one pre-norm encoder layer, a linear head; logits flattened to (B*T, V)."""

    def __init__(self, vocab=32, d=32, heads=2, length=16):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.layer = nn.TransformerEncoderLayer(d, heads, 2 * d, dropout=0.0, batch_first=True, norm_first=True)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.layer(self.embed(tokens) + self.pos)
        return self.head(h).flatten(0, 1)


class MathTransformer(nn.Module):
    """The same shape of model with attention written out (``softmax(q k^T / sqrt(d)) v``), which
    torch.func's forward AD and double backward can differentiate on CPU."""

    def __init__(self, vocab=32, d=32, heads=2, length=16):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(length, d) * 0.1)
        self.norm1, self.norm2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.proj = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens):
        h = self.embed(tokens) + self.pos
        B, T, D = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(B, T, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // self.heads) ** 0.5, -1) @ v
        h = h + self.proj(att.transpose(1, 2).reshape(B, T, D))
        h = h + self.mlp(self.norm2(h))
        return self.head(h).flatten(0, 1)


def build(name):
    torch.manual_seed(0)
    if name == "cnn":
        model = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(16 * 8 * 8, 10),
        )
        x = torch.randn(64, 3, 32, 32)
        y = torch.randint(0, 10, (64,))
    else:
        model = TinyTransformer() if name == "transformer" else MathTransformer()
        x = torch.randint(0, 32, (16, 16))
        y = torch.randint(0, 32, (16 * 16,))
    return model.eval(), x, y


def operators(model, x, y):
    """{(library, curvature): (matvec, matmat, scipy_or_None)} for every installed library."""
    params = dict(model.named_parameters())
    plist = list(params.values())
    ops = {}
    loss = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    H = L.hessian_operator(loss, params)
    G = L.ggn_operator(lambda: model(x), fwdgrad.cross_entropy_loss(y), params)
    ops["fwdgrad", "hessian"] = (H.matvec, H.matmat, H)
    ops["fwdgrad", "ggn"] = (G.matvec, G.matmat, G)
    if curvlinops is not None:
        data = [(x, y)]
        kw = dict(progressbar=False, check_deterministic=False)
        cH = curvlinops.HessianLinearOperator(model, nn.CrossEntropyLoss(), plist, data, **kw)
        cG = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), plist, data, **kw)
        ops["curvlinops", "hessian"] = (cH.__matmul__, cH.__matmul__, cH)
        ops["curvlinops", "ggn"] = (cG.__matmul__, cG.__matmul__, cG)
    if he is not None:
        data = [(x, y)]
        eH = he.HessianOperator(model, data, he.supervised_loss(F.cross_entropy))
        eG = he.GGNOperator(model, data, he.supervised_forward, he.supervised_loss_of_output(F.cross_entropy))
        for name, op in (("hessian", eH), ("ggn", eG)):
            ops["hessian-eigenthings", name] = (op.matvec, _loop_matmat(op), op)
    return ops


def _loop_matmat(op):
    def matmat(X):
        return torch.stack([op.matvec(X[:, j]) for j in range(X.shape[1])], 1)

    return matmat


def check_agreement(ops, n, k):
    """Compare every library's products with fwdgrad's before anything is timed (float32 rounding: 1e-3)."""
    torch.manual_seed(1)
    v, X = torch.randn(n), torch.randn(n, k)
    for curv in ("hessian", "ggn"):
        if ("fwdgrad", curv) not in ops:
            continue
        ref_v = ops["fwdgrad", curv][0](v)
        ref_X = ops["fwdgrad", curv][1](X)
        for (lib, c), (mv, mm, _) in ops.items():
            if c != curv or lib == "fwdgrad":
                continue
            err = max((got - ref).abs().max().item() / ref.abs().max().item()
                      for got, ref in ((mv(v), ref_v), (mm(X), ref_X)))
            if err > 1e-3:  # reported, not fatal: the Hessian is checked against double backward below
                print(f"note: {lib}'s {curv} product differs from fwdgrad's by {err:.1e} (relative, max)")


def check_hessian(model, x, y, ops, n):
    """Each library's Hessian matvec against double backward through torch.autograd."""
    torch.manual_seed(3)
    v = torch.randn(n)
    params = list(model.parameters())
    try:
        g = torch.autograd.grad(F.cross_entropy(model(x), y), params, create_graph=True)
        hv = torch.autograd.grad(g, params, list(unflatten_like(v, params)))
    except RuntimeError as e:  # no double backward for this model
        print(f"note: double backward fails here ({str(e).splitlines()[0][:80]}); no oracle")
        return
    ref = torch.cat([t.flatten() for t in hv])
    for (lib, curv), (mv, _, _) in ops.items():
        if curv == "hessian":
            err = (mv(v) - ref).abs().max().item() / ref.abs().max().item()
            print(f"check: {lib} Hessian matvec vs double backward: relative error {err:.1e}")


def unflatten_like(v, params):
    return [c.view_as(p) for c, p in zip(v.split([p.numel() for p in params]), params)]


def top5(op, lib):
    if lib == "fwdgrad-lanczos":
        return lambda: S.eigenpairs(op, 5, tol=1e-4, max_steps=200)[0]
    if lib == "hessian-eigenthings":
        return lambda: he.lanczos(op, k=5, which="LA", max_iter=60, seed=0)
    sp = op.to_scipy()
    v0 = np.random.default_rng(0).standard_normal(op.shape[0]).astype(np.float32)
    return lambda: eigsh(sp, k=5, which="LA", tol=1e-4, v0=v0)[0]


def drop_failing(ops, n):
    """Try one matvec of each operator; those that raise are reported and left out."""
    failures = {}
    for key, (mv, _, _) in list(ops.items()):
        try:
            mv(torch.randn(n))
        except Exception as e:  # a library that cannot differentiate this model
            failures[key] = f"{type(e).__name__}: {str(e).splitlines()[0][:110]}"
            del ops[key]
    # A failed call's partial graph holds the parameters: autograd's engine keeps
    # its last graph task until the next backward pass on the thread (run a tiny
    # one), and reference cycles keep the rest until a collection.
    leaf = torch.zeros((), requires_grad=True)
    torch.autograd.grad(leaf * 1.0, leaf)
    gc.collect()
    return failures


def run(name, rounds, k):
    model, x, y = build(name)
    ops = operators(model, x, y)
    n = sum(p.numel() for p in model.parameters())
    failures = drop_failing(ops, n)
    check_agreement(ops, n, k)
    check_hessian(model, x, y, ops, n)
    torch.manual_seed(2)
    v, X = torch.randn(n), torch.randn(n, k)
    rows = {}
    for curv in ("hessian", "ggn"):
        for what, arg, idx in (("matvec", v, 0), (f"matmat k={k}", X, 1)):
            calls = {lib: (lambda f=fns[idx]: f(arg)) for (lib, c), fns in ops.items() if c == curv}
            times = time_interleaved(calls, rounds)
            for lib, fn in calls.items():
                rows[f"{curv} {what}", lib] = {"time_s": times[lib], "peak_bytes": tensor_peak(fn, warmup=1)}
    if eigsh is not None:
        calls = {}
        for lib in ("fwdgrad", "curvlinops"):
            if (lib, "hessian") in ops:
                calls[lib] = top5(ops[lib, "hessian"][2], lib)
        calls["fwdgrad-lanczos"] = top5(ops["fwdgrad", "hessian"][2], "fwdgrad-lanczos")
        if ("hessian-eigenthings", "hessian") in ops:
            calls["hessian-eigenthings"] = top5(ops["hessian-eigenthings", "hessian"][2], "hessian-eigenthings")
        for lib, fn in calls.items():
            fn()  # warm-up
            t0 = time.perf_counter()
            fn()
            rows["hessian top-5 eigenvalues", lib] = {"time_s": time.perf_counter() - t0}
    for (lib, curv), why in failures.items():
        rows[f"{curv} (any product)", lib] = {"error": why}
    return n, rows


def report(name, n, rows):
    print(f"\n{name}: {n} parameters")
    libs = ["fwdgrad", "fwdgrad-lanczos", "curvlinops", "hessian-eigenthings"]
    print(f"{'operation':<30} {'library':<21} {'time ms':>9} {'peak MiB':>9} {'time/cl':>8} {'mem/cl':>7}")
    for what in dict.fromkeys(w for w, _ in rows):
        base = rows.get((what, "curvlinops"))
        base = base if base and "error" not in base else None
        for lib in libs:
            r = rows.get((what, lib))
            if r is None:
                continue
            if "error" in r:
                print(f"{what:<30} {lib:<21} fails: {r['error']}")
                continue
            mem = r.get("peak_bytes")
            t_ratio = f"{r['time_s'] / base['time_s']:.2f}" if base else "-"
            m_ratio = f"{mem / base['peak_bytes']:.2f}" if base and mem is not None and base.get("peak_bytes") else "-"
            mem_s = f"{mem / 2**20:.1f}" if mem is not None else "-"
            print(f"{what:<30} {lib:<21} {r['time_s'] * 1e3:>9.1f} {mem_s:>9} {t_ratio:>8} {m_ratio:>7}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["cnn", "transformer", "transformer-math"], action="append")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    installed = [lib for lib, mod in (("curvlinops", curvlinops), ("hessian-eigenthings", he), ("scipy", eigsh)) if mod]
    print("installed for comparison: " + (", ".join(installed) or "none"))
    out = {}
    for name in args.model or ["cnn", "transformer", "transformer-math"]:
        n, rows = run(name, args.rounds, args.k)
        report(name, n, rows)
        out[name] = {"parameters": n, "rows": [{"operation": w, "library": lib, **r} for (w, lib), r in rows.items()]}
        if args.json:  # after each model, so that a later failure keeps the earlier figures
            with open(args.json, "w") as fh:
                json.dump(out, fh, indent=1)


if __name__ == "__main__":
    main()
