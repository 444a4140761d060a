"""fwdgrad's curvature products inside curvlinops and hessian-eigenthings.

Both libraries build their algorithms on an operator interface, so fwdgrad's
products can stand in for their own:

* **curvlinops** (``curvlinops-for-pytorch``): any subclass of its
  ``PyTorchLinearOperator`` that implements ``_matmat`` on tensor lists works
  with its tools (``hutchinson_trace``, ``to_scipy``, sums and products of
  operators).  ``FwdgradGGN`` below does it with ``fwdgrad.ggnvp(...,
  batched=True)``: every column of the matrix goes through one batched jvp
  and one batched vjp.
* **hessian-eigenthings**: its ``LambdaOperator(matvec, size)`` accepts any
  flat matvec, here ``fwdgrad.linops.hessian_operator(...).matvec``, and its
  ``lanczos`` runs on it unchanged.

Each is checked against the library's own operator for the same curvature.
A library that is not installed is skipped with a message (both install with
``pip install --no-deps``; curvlinops also needs einops, einconv,
linear_operator and tqdm).
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad
import fwdgrad.linops

try:
    import curvlinops
    from curvlinops._torch_base import PyTorchLinearOperator
except ImportError:
    curvlinops = None
try:
    import hessian_eigenthings as he
except ImportError:
    he = None

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 4))
x, y = torch.randn(128, 10), torch.randint(0, 4, (128,))
params = dict(model.named_parameters())
n = sum(p.numel() for p in params.values())

if curvlinops is not None:

    class FwdgradGGN(PyTorchLinearOperator):
        """The GGN of the cross-entropy loss, with curvlinops' interface and fwdgrad's products."""

        SELF_ADJOINT = True

        def __init__(self, model, x, y):
            self.model, self.x, self.loss = model, x, fwdgrad.cross_entropy_loss(y)
            self.params = dict(model.named_parameters())
            shapes = [p.shape for p in self.params.values()]
            super().__init__(shapes, shapes)

        def _matmat(self, X):
            # curvlinops' list format: one tensor (*param.shape, K) per parameter.
            V = {k: t.movedim(-1, 0) for k, t in zip(self.params, X)}
            GV = fwdgrad.ggnvp(lambda: self.model(self.x), self.loss, self.params, V, batched=True)
            return [t.movedim(0, -1) for t in GV.values()]

        @property
        def dtype(self):
            return next(iter(self.params.values())).dtype

        @property
        def device(self):
            return next(iter(self.params.values())).device

    ours = FwdgradGGN(model, x, y)
    theirs = curvlinops.GGNLinearOperator(model, nn.CrossEntropyLoss(), list(params.values()), [(x, y)],
                                          progressbar=False)
    X = torch.randn(n, 8)
    err = ((ours @ X) - (theirs @ X)).abs().max().item()
    print(f"curvlinops: GGN matmat (8 columns), fwdgrad-backed vs GGNLinearOperator: max err {err:.1e}")
    assert err < 1e-5
    # curvlinops' own algorithms accept the fwdgrad-backed operator.
    torch.manual_seed(1)
    trace_ours = curvlinops.hutchinson_trace(ours, 200)
    torch.manual_seed(1)
    trace_theirs = curvlinops.hutchinson_trace(theirs, 200)
    print(f"curvlinops.hutchinson_trace, 200 probes: {float(trace_ours):.5f} (fwdgrad), {float(trace_theirs):.5f} (curvlinops)")
    assert abs(float(trace_ours) - float(trace_theirs)) < 1e-4 * abs(float(trace_theirs))
else:
    print("curvlinops is not installed: skipping its part (pip install --no-deps curvlinops-for-pytorch)")

if he is not None:
    H = fwdgrad.linops.hessian_operator(lambda: F.cross_entropy(model(x), y), params)
    ours = he.LambdaOperator(H.matvec, n, dtype=H.dtype)
    theirs = he.HessianOperator(model, [(x, y)], he.supervised_loss(F.cross_entropy))
    v = torch.randn(n)
    err = (ours.matvec(v) - theirs.matvec(v)).abs().max().item()
    print(f"hessian-eigenthings: Hessian matvec, LambdaOperator(fwdgrad) vs HessianOperator: max err {err:.1e}")
    assert err < 1e-5
    top_ours = he.lanczos(ours, k=3, which="LA", max_iter=40, seed=0).eigenvalues
    top_theirs = he.lanczos(theirs, k=3, which="LA", max_iter=40, seed=0).eigenvalues
    print(f"hessian_eigenthings.lanczos top 3: {[round(float(e), 5) for e in top_ours]} (fwdgrad), "
          f"{[round(float(e), 5) for e in top_theirs]} (its own operator)")
    assert torch.allclose(torch.as_tensor(top_ours), torch.as_tensor(top_theirs), rtol=1e-3, atol=1e-6)
else:
    print("hessian-eigenthings is not installed: skipping its part (pip install --no-deps hessian-eigenthings)")
