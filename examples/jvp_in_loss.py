"""A loss that contains a JVP, trained by backpropagating through the JVP.

MeanFlow (Geng et al. 2025) and continuous-time consistency models train a
network ``u(z, r, t)`` whose loss contains its own time derivative along the
flow, ``du/dt = J_z u . v + d_t u``: a Jacobian-vector product.  Here the
MeanFlow identity ``u(z_t, r, t) = v - (t - r) du/dt`` is used as a residual,
with gradients flowing through the JVP term too (no stop-gradient), so training
needs reverse mode over forward mode.

The network is a small transformer using ``F.scaled_dot_product_attention``.
On CPU that op runs as ``_scaled_dot_product_flash_attention_for_cpu``, which
has no forward-mode formula in PyTorch, so ``torch.func.jvp`` raises; fwdgrad
has its own rule.  The script shows the error, checks the JVP against a
double-backward oracle and the gradient through it against finite differences
(float64), and trains.  (On torch 2.13 the gradient through PyTorch's own
double-backward JVP is off here, as it is for ``F.layer_norm`` alone; the
printout shows it.)
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdgrad

torch.manual_seed(0)
SEQ, DIM = 16, 2


def sample_data(n):
    """Arcs on circles: each sequence is 16 points with its own start angle, speed and radius."""
    start = torch.rand(n, 1) * 2 * math.pi
    speed = 0.2 + 0.3 * torch.rand(n, 1)
    radius = 0.5 + torch.rand(n, 1)
    angle = start + speed * torch.arange(SEQ)
    return torch.stack([radius * angle.cos(), radius * angle.sin()], -1)


class Block(nn.Module):
    def __init__(self, width, heads):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, h):
        b, n, w = h.shape
        q, k, v = self.qkv(self.norm1(h)).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.proj(a.transpose(1, 2).reshape(b, n, w))
        return h + self.mlp(self.norm2(h))


class MeanFlowTransformer(nn.Module):
    """u(z, r, t): the average velocity of the flow from time r to time t."""

    def __init__(self, width=32, heads=4, depth=2):
        super().__init__()
        self.inp = nn.Linear(DIM, width)
        self.pos = nn.Parameter(0.1 * torch.randn(SEQ, width))
        self.time = nn.Sequential(nn.Linear(2, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.out = nn.Linear(width, DIM)

    def forward(self, z, r, t):
        h = self.inp(z) + self.pos + self.time(torch.stack([r, t], -1)).unsqueeze(1)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def draw_batch(n):
    x, noise = sample_data(n), torch.randn(n, SEQ, DIM)
    t, r = torch.rand(n), torch.rand(n)
    t, r = torch.maximum(t, r), torch.minimum(t, r)
    z = (1 - t[:, None, None]) * x + t[:, None, None] * noise
    return z, r, t, noise - x  # noise - x is the flow's velocity dz/dt


def meanflow_loss(model, batch, jvp):
    """Mean squared residual of u + (t - r) du/dt = v, where du/dt comes from ``jvp``."""
    z, r, t, velocity = batch
    u, dudt = jvp(lambda z, t: model(z, r, t), (z, t), (velocity, torch.ones_like(t)))
    residual = u + (t - r)[:, None, None] * dudt - velocity
    return residual.pow(2).mean()


def double_backward_jvp(f, primals, tangents):
    """The oracle: a JVP from two reverse passes, with the math attention kernel (it has double backward)."""
    with sdpa_kernel(SDPBackend.MATH):
        return torch.autograd.functional.jvp(f, primals, tangents, create_graph=True)


model = MeanFlowTransformer()
print(f"transformer with {sum(p.numel() for p in model.parameters())} parameters")

# 1. torch.func.jvp cannot differentiate the CPU attention kernel.
try:
    meanflow_loss(model, draw_batch(4), torch.func.jvp)
    print("torch.func.jvp: ran")
except (NotImplementedError, RuntimeError) as e:
    print(f"torch.func.jvp raises {type(e).__name__}: {str(e).splitlines()[0][:110]}...")

# 2. Check in float64: the JVP against the double-backward oracle, and the
#    gradient through it against central finite differences of the loss.
model64 = MeanFlowTransformer().double()
batch = [b.double() for b in draw_batch(4)]
z, r, t, velocity = batch
f = lambda z, t: model64(z, r, t)  # noqa: E731
_, dudt = fwdgrad.jvp(f, (z, t), (velocity, torch.ones_like(t)))
_, dudt_oracle = double_backward_jvp(f, (z, t), (velocity, torch.ones_like(t)))
print(f"du/dt vs double-backward oracle: max err {(dudt - dudt_oracle).abs().max():.1e}")
assert torch.allclose(dudt, dudt_oracle, rtol=1e-10, atol=1e-10)

params = list(model64.parameters())
grads = torch.autograd.grad(meanflow_loss(model64, batch, fwdgrad.jvp), params)
double_backward_grads = torch.autograd.grad(meanflow_loss(model64, batch, double_backward_jvp), params)


def loss_at(step):
    """The loss with every parameter moved by ``step``; its JVP from the oracle, not fwdgrad."""
    with torch.no_grad():
        for p, d in zip(params, step):
            p.add_(d)
        value = meanflow_loss(model64, batch, double_backward_jvp).item()
        for p, d in zip(params, step):
            p.sub_(d)
    return value


eps = 1e-6
for trial in range(3):
    direction = [torch.randn_like(p) for p in params]
    fd = (loss_at([eps * d for d in direction]) - loss_at([-eps * d for d in direction])) / (2 * eps)
    ours = sum((g * d).sum() for g, d in zip(grads, direction)).item()
    theirs = sum((g * d).sum() for g, d in zip(double_backward_grads, direction)).item()
    print(f"directional derivative of the loss: finite differences {fd:+.8f}, "
          f"fwdgrad {ours:+.8f}, torch double backward {theirs:+.8f}")
    assert abs(ours - fd) < 1e-6 * max(1.0, abs(fd)), "gradient through fwdgrad.jvp disagrees"

# 3. Train with fwdgrad.
optimizer = torch.optim.Adam(model.parameters(), lr=2e-3)
losses = []
start = time.perf_counter()
for step in range(100):
    loss = meanflow_loss(model, draw_batch(64), fwdgrad.jvp)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    losses.append(loss.item())
    if step % 20 == 0 or step == 99:
        print(f"step {step:>3}  MeanFlow loss {loss.item():.4f}")
elapsed = time.perf_counter() - start
first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
print(f"100 steps in {elapsed:.1f} s; mean loss over 10 steps fell from {first:.3f} to {last:.3f}")
assert last < 0.7 * first, "the MeanFlow loss did not fall"
