"""The top of a trained MLP's Hessian spectrum, from Hessian-vector products alone.

Power iteration and the Lanczos method only ever need ``v -> H v``, which
``fwdgrad.hvp`` computes in one forward-over-reverse pass without forming ``H``.
The MLP here is small enough (about 400 parameters) to form the full Hessian
with ``torch.func.hessian`` as an oracle, so the script checks the top
eigenvalues against ``torch.linalg.eigvalsh`` of it.  It can also plot them:

    python examples/hessian_spectrum.py                  # checks only; writes no file
    python examples/hessian_spectrum.py --plot out.png   # also writes the figure to out.png

With no ``--plot``, a folder named by the ``FWDGRAD_EXAMPLE_OUTPUT`` environment
variable (the test suite sets one) gets ``hessian_spectrum.png``.  The figure in
the documentation was made with ``--plot docs/img/hessian_spectrum.png``.
"""

import argparse
import os
import pathlib

import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad

parser = argparse.ArgumentParser(description="The top of a trained MLP's Hessian spectrum from hvp calls.")
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
n = sum(p.numel() for p in params.values())
loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
print(f"MLP with {n} parameters trained to loss {loss_fn().item():.4f}")


def hvp(v):
    return fwdgrad.hvp(loss_fn, params, v)


def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def scaled(a, s):
    return {k: t * s for k, t in a.items()}


def random_unit():
    v = {k: torch.randn_like(p) for k, p in params.items()}
    return scaled(v, 1 / dot(v, v).sqrt())


def power_iteration(iterations):
    """The eigenvalue of largest magnitude; the Rayleigh quotient after each step."""
    v, history = random_unit(), []
    for _ in range(iterations):
        hv = hvp(v)
        history.append(dot(v, hv).item())
        v = scaled(hv, 1 / dot(hv, hv).sqrt())
    return history


def lanczos(iterations):
    """Ritz values of the Lanczos tridiagonal matrix (full reorthogonalisation)."""
    basis, alphas, betas = [random_unit()], [], []
    for j in range(iterations):
        w = hvp(basis[j])
        alphas.append(dot(w, basis[j]))
        for q in basis:  # Gram-Schmidt against every earlier vector, twice for stability
            w = {k: w[k] - dot(w, q) * q[k] for k in w}
        for q in basis:
            w = {k: w[k] - dot(w, q) * q[k] for k in w}
        beta = dot(w, w).sqrt()
        if j == iterations - 1 or beta < 1e-10:
            break
        betas.append(beta)
        basis.append(scaled(w, 1 / beta))
    T = torch.diag(torch.stack(alphas))
    if betas:
        off = torch.stack(betas)
        T = T + torch.diag(off, 1) + torch.diag(off, -1)
    return torch.linalg.eigvalsh(T).flip(0)  # largest first


power = power_iteration(20)
ritz = lanczos(40)

# Oracle: the full n x n Hessian of the same loss, by torch.func.
names = list(params)
shapes = [params[k].shape for k in names]
sizes = [params[k].numel() for k in names]


def loss_of_flat(flat):
    chunks = dict(zip(names, (c.view(s) for c, s in zip(flat.split(sizes), shapes))))
    return F.cross_entropy(torch.func.functional_call(model, chunks, (x,)), y)


flat = torch.cat([params[k].detach().flatten() for k in names])
H = torch.func.hessian(loss_of_flat)(flat)
eigenvalues = torch.linalg.eigvalsh(H).flip(0)  # largest first

top = 5
print(f"top {top} eigenvalues, full Hessian (eigvalsh): " + " ".join(f"{e:.6f}" for e in eigenvalues[:top]))
print(f"top {top} eigenvalues, Lanczos, 40 hvps:        " + " ".join(f"{e:.6f}" for e in ritz[:top]))
print(f"largest, power iteration, 20 hvps:              {power[-1]:.6f}")
assert torch.allclose(ritz[:top], eigenvalues[:top], rtol=1e-6, atol=1e-9), "Lanczos disagrees with eigvalsh"
largest = eigenvalues[eigenvalues.abs().argmax()].item()
assert abs(power[-1] - largest) < 1e-3 * abs(largest), "power iteration disagrees with eigvalsh"
print(f"smallest eigenvalue: eigvalsh {eigenvalues[-1]:.6f}, Lanczos {ritz[-1]:.6f} "
      f"(Lanczos finds both ends of the spectrum; negative: the loss is not convex here)")
assert torch.allclose(ritz[-1], eigenvalues[-1], rtol=1e-6, atol=1e-9)


def plot(path):
    """The full spectrum with the Lanczos and power-iteration estimates, and
    power iteration's convergence."""
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, open no window
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    index = torch.arange(1, n + 1)
    left.plot(index, eigenvalues, ".", color="0.6", label="full Hessian (torch.func.hessian + eigvalsh)")
    left.plot(index[:top], ritz[:top], "x", color="C0", markersize=9, label="Lanczos, 40 hvp calls")
    left.plot(index[-1:], ritz[-1:], "x", color="C0", markersize=9)
    left.plot([1], [power[-1]], "+", color="C1", markersize=14, label="power iteration, 20 hvp calls")
    left.set_yscale("symlog", linthresh=1e-4)
    left.set_xlabel("eigenvalue index (largest first)")
    left.set_ylabel("eigenvalue (symlog scale)")
    left.set_title(f"Hessian spectrum of an MLP ({n} parameters)")
    left.legend(fontsize=8, loc="lower left")
    right.semilogy(range(1, len(power) + 1), [abs(p - largest) / abs(largest) + 1e-16 for p in power], color="C1")
    right.set_xlabel("power iteration step (one hvp each)")
    right.set_ylabel("relative error of the Rayleigh quotient")
    right.set_title("Power iteration convergence")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print(f"wrote {path}")


if plot_path is not None:
    plot(plot_path)
