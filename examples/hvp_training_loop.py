"""Hessian-vector products in a training loop: track the sharpness of the loss.

Every few steps, ten rounds of power iteration on ``v -> H v`` estimate the
largest eigenvalue of the loss Hessian with respect to the parameters.
``fwdgrad.hvp`` takes a closure that reads the live model, so there is no
functional_call and no copy of the model; each ``H v`` is one forward-over-
reverse pass at about twice the memory of a plain gradient.

    python examples/hvp_training_loop.py
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad

torch.manual_seed(0)
model = nn.Sequential(
    nn.Conv2d(1, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.MaxPool2d(2),
    nn.Flatten(), nn.Linear(8 * 13 * 13, 10),
)
opt = torch.optim.SGD(model.parameters(), lr=0.05)
params = dict(model.named_parameters())
x, y = torch.randn(64, 1, 28, 28), torch.randint(0, 10, (64,))  # stand-in for a data loader


def sharpness(loss_fn, rounds=10):
    """The largest Hessian eigenvalue, by power iteration on H v."""
    v = {k: torch.randn_like(p) for k, p in params.items()}
    for _ in range(rounds):
        hv = fwdgrad.hvp(loss_fn, params, v)
        norm = torch.sqrt(sum((h * h).sum() for h in hv.values()))
        v = {k: h / norm for k, h in hv.items()}
    return norm.item()


for step in range(30):
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    if step % 10 == 0:
        model.eval()  # fixed BatchNorm statistics while measuring
        print(f"step {step:3d}  loss {loss_fn().item():.4f}  sharpness {sharpness(loss_fn):.3f}")
        model.train()
    opt.zero_grad()
    loss_fn().backward()
    opt.step()
