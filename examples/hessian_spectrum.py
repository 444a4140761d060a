"""A trained MLP's Hessian spectrum from Hessian-vector products alone: top eigenvalues, trace, density.

``fwdgrad.linops.hessian_operator`` wraps ``fwdgrad.hvp`` (closure form, over the
live model) as an ``n x n`` operator; ``fwdgrad.spectra`` then computes

* the top eigenvalues and eigenvectors by Lanczos (``eigenpairs``),
* the trace by Hutchinson's estimator (``hutchinson_trace``), and
* the spectral density by stochastic Lanczos quadrature (``spectral_density``),

each from products ``H V`` only (a batch of directions goes through one
batched ``hvp``).  The MLP is small enough (about 400 parameters) to form the
full Hessian with ``torch.func.hessian`` as an oracle, so the script checks
all three against ``torch.linalg.eigvalsh`` of it.  It can also plot the
density:

    python examples/hessian_spectrum.py                  # checks only; writes no file
    python examples/hessian_spectrum.py --plot out.png   # also writes the figure to out.png

With no ``--plot``, a folder named by the ``FWDGRAD_EXAMPLE_OUTPUT`` environment
variable (the test suite sets one) gets ``hessian_spectrum.png``.  The figure in
the documentation was made with ``--plot docs/img/hessian_spectrum.png``.
"""

import argparse
import math
import os
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad.linops
import fwdgrad.spectra

parser = argparse.ArgumentParser(description="A trained MLP's Hessian spectrum from hvp calls.")
parser.add_argument("--plot", metavar="PATH", help="write the figure (PNG) to PATH; by default no file is written")
args = parser.parse_args()
if args.plot:
    plot_path = pathlib.Path(args.plot)
elif os.environ.get("FWDGRAD_EXAMPLE_OUTPUT"):
    plot_path = pathlib.Path(os.environ["FWDGRAD_EXAMPLE_OUTPUT"]) / "hessian_spectrum.png"
else:
    plot_path = None

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

# A small classifier, trained for a while so that the spectrum has structure.
centers = torch.randn(3, 2) * 2
y = torch.randint(0, 3, (300,))
x = centers[y] + torch.randn(300, 2)
model = nn.Sequential(nn.Linear(2, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 3))
optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
for _ in range(200):
    optimizer.zero_grad()
    F.cross_entropy(model(x), y).backward()
    optimizer.step()

params = dict(model.named_parameters())
H = fwdgrad.linops.hessian_operator(lambda: F.cross_entropy(model(x), y), params)
n = H.shape[0]
print(f"MLP with {n} parameters trained to loss {F.cross_entropy(model(x), y).item():.4f}")

top = 5
values, vectors = fwdgrad.spectra.eigenpairs(H, top, tol=1e-10)
smallest, _ = fwdgrad.spectra.eigenpairs(H, 1, which="smallest", tol=1e-10)
trace, stderr = fwdgrad.spectra.hutchinson_trace(H, samples=200, batch=50)
sigma = 0.005  # the width of the Gaussian each quadrature node becomes
grid, density = fwdgrad.spectra.spectral_density(H, probes=20, steps=60, points=600, sigma=sigma)

# Oracle: the full n x n Hessian of the same loss, by torch.func.
flat = fwdgrad.linops.flatten(params).detach()


def loss_of_flat(f):
    p = fwdgrad.linops.unflatten(f, params)
    return F.cross_entropy(torch.func.functional_call(model, p, (x,)), y)


dense = torch.func.hessian(loss_of_flat)(flat)
eigenvalues = torch.linalg.eigvalsh(dense).flip(0)  # largest first

print(f"top {top} eigenvalues, full Hessian (eigvalsh): " + " ".join(f"{e:.6f}" for e in eigenvalues[:top]))
print(f"top {top} eigenvalues, Lanczos (eigenpairs):    " + " ".join(f"{e:.6f}" for e in values))
assert torch.allclose(values, eigenvalues[:top], rtol=1e-6, atol=1e-9), "Lanczos disagrees with eigvalsh"
residual = (dense @ vectors - vectors * values).norm(dim=0).max().item()
print(f"eigenvector residual max ||H y - theta y||: {residual:.1e}")
assert residual < 1e-6
print(f"smallest eigenvalue: eigvalsh {eigenvalues[-1]:.6f}, Lanczos {smallest[0]:.6f} "
      f"(negative: the loss is not convex here)")
assert torch.allclose(smallest[0], eigenvalues[-1], rtol=1e-6, atol=1e-9)

exact_trace = dense.trace().item()
print(f"trace: exact {exact_trace:.4f}, Hutchinson (200 probes) {trace:.4f} +- {stderr:.4f}")
assert abs(trace - exact_trace) < 4 * stderr, "Hutchinson's estimate is off by more than 4 standard errors"

# The density against the dense spectrum smoothed by the same Gaussian kernel.
smoothed = torch.exp(-0.5 * ((grid[:, None] - eigenvalues[None]) / sigma) ** 2).mean(1) / (sigma * math.sqrt(2 * math.pi))
mass = torch.trapezoid(density, grid).item()
l1 = torch.trapezoid((density - smoothed).abs(), grid).item()
print(f"spectral density (20 probes x 60 Lanczos steps): total mass {mass:.4f}, "
      f"L1 distance to the smoothed dense spectrum {l1:.3f}")
assert abs(mass - 1) < 1e-3
assert l1 < 0.1, "stochastic Lanczos quadrature is far from the dense spectrum"


def plot(path):
    """The density by stochastic Lanczos quadrature over the dense spectrum, and the top eigenvalues."""
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, open no window
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    left.semilogy(grid, density.clamp_min(1e-8), color="C0", label="stochastic Lanczos quadrature (20 probes)")
    left.semilogy(grid, smoothed.clamp_min(1e-8), "--", color="0.5", label="dense eigvalsh, same kernel")
    left.set_xlabel("eigenvalue")
    left.set_ylabel("density (log scale)")
    left.set_title(f"Hessian spectral density of an MLP ({n} parameters)")
    left.legend(fontsize=8)
    index = torch.arange(1, 3 * top + 1)
    right.plot(index, eigenvalues[: 3 * top], ".", color="0.6", label="full Hessian (eigvalsh)")
    right.plot(index[:top], values, "x", color="C0", markersize=9, label="Lanczos (fwdgrad.spectra.eigenpairs)")
    right.set_xlabel("eigenvalue index (largest first)")
    right.set_ylabel("eigenvalue")
    right.set_title("Top eigenvalues")
    right.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if plot_path is not None:
    plot(plot_path)
