"""Sensitivity of a simulated trajectory to a handful of parameters: a tall Jacobian.

A reaction-diffusion front (the Fisher-KPP equation u_t = D u_xx + r u (1 - u)
on a periodic grid of 64 cells, discretised in space into 64 coupled ODEs and
integrated with classical RK4 in plain torch) depends on four physical inputs:
the diffusion coefficient D, the growth rate r, and the amplitude and width of
the initial bump.  The Jacobian of the whole trajectory (101 time points x 64
cells = 6464 outputs) with respect to them has 6464 rows and 4 columns, the
shape forward mode is made for: ``fwdgrad.jacfwd`` pushes 4 tangents through
the simulation, where ``torch.func.jacrev`` needs one backward pass per row
(batched by vmap, but each over the whole simulation).  The script checks that
both give the same Jacobian (float64) and prints the timings.
"""

import time

import torch

import fwdgrad

torch.set_default_dtype(torch.float64)
CELLS, STEPS, DT = 64, 100, 0.01
grid = torch.linspace(0, 1, CELLS + 1)[:-1]


def reaction_diffusion(u, diffusion, growth):
    laplacian = (torch.roll(u, 1) + torch.roll(u, -1) - 2 * u) * CELLS**2
    return diffusion * laplacian + growth * u * (1 - u)


def simulate(inputs):
    """Trajectory (STEPS + 1, CELLS) from inputs = (D, r, amplitude, width), by RK4."""
    diffusion, growth, amplitude, width = inputs[0], inputs[1], inputs[2], inputs[3]
    u = amplitude * torch.exp(-(((grid - 0.5) / width) ** 2))
    trajectory = [u]
    for _ in range(STEPS):
        k1 = reaction_diffusion(u, diffusion, growth)
        k2 = reaction_diffusion(u + DT / 2 * k1, diffusion, growth)
        k3 = reaction_diffusion(u + DT / 2 * k2, diffusion, growth)
        k4 = reaction_diffusion(u + DT * k3, diffusion, growth)
        u = u + DT / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
        trajectory.append(u)
    return torch.stack(trajectory)


inputs = torch.tensor([1e-3, 2.0, 0.5, 0.05])
names = ["D", "r", "amplitude", "width"]


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return result, time.perf_counter() - start


trajectory, t_forward = timed(lambda: simulate(inputs))
J, t_fwdgrad = timed(lambda: fwdgrad.jacfwd(simulate)(inputs))
J_rev, t_jacrev = timed(lambda: torch.func.jacrev(simulate)(inputs))
J_func_fwd, t_func_jacfwd = timed(lambda: torch.func.jacfwd(simulate)(inputs))

rows = trajectory.numel()
print(f"trajectory {tuple(trajectory.shape)}; Jacobian {tuple(J.shape)}: {rows} rows x {J.shape[-1]} columns")
err = (J - J_rev).abs().max().item()
print(f"fwdgrad.jacfwd vs torch.func.jacrev: max abs difference {err:.1e} (largest entry {J.abs().max():.1e})")
assert torch.allclose(J, J_rev, rtol=1e-9, atol=1e-10)
assert torch.allclose(J, J_func_fwd, rtol=1e-9, atol=1e-10)

print(f"time: one plain simulation {t_forward:.2f} s")
print(f"      fwdgrad.jacfwd       {t_fwdgrad:.2f} s  ({J.shape[-1]} tangents)")
print(f"      torch.func.jacrev    {t_jacrev:.2f} s  ({rows} cotangents)")
print(f"      torch.func.jacfwd    {t_func_jacfwd:.2f} s  (for reference)")

# What it shows: how the total population at the end responds to each input
# (relative sensitivity, d log N / d log input).
total = trajectory[-1].sum()
relative = J[-1].sum(0) * inputs / total
print(f"total population at t={STEPS * DT:.0f}: {total:.2f}; d log(total) / d log(input): "
      + ", ".join(f"{n} {v:+.2f}" for n, v in zip(names, relative.tolist())))
