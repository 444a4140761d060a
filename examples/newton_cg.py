"""Hessian-free training (Martens 2010): damped Gauss-Newton steps solved by conjugate gradients.

Each epoch takes one step ``p`` that approximately solves ``(G + lambda I) p = -g``
by conjugate gradients, where ``G = J^T H_L J`` is the generalised Gauss-Newton
matrix of the loss (Schraudolph 2002; Martens 2010, "Deep learning via
Hessian-free optimization").  Unlike the Hessian, ``G`` is positive
semi-definite, so CG on the damped system is well posed.  CG needs only
products ``G v``, never ``G``: each is one ``fwdgrad.ggnvp`` call (a forward-mode
jvp of the model, cross-entropy's Hessian on the logits in closed form, one
vjp), with the model as a closure over the live module, so there is no
functional_call and no copy of the parameters::

    fwdgrad.ggnvp(lambda: model(x), fwdgrad.cross_entropy_loss(y), dict(model.named_parameters()), v)

The damping ``lambda`` adapts by the Levenberg-Marquardt rule on the ratio of
actual to predicted reduction, CG is warm-started from the previous step
(Martens' "CG backtracking" is left out), and a backtracking line search guards
each step.  The script trains a small MLP on two spirals this way and with
minibatch SGD (and Adam, for reference) from the same start, and prints the
loss per epoch (one pass over the data: 16 minibatch steps, or one
Gauss-Newton step).
"""

import math
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import fwdgrad

torch.manual_seed(0)


def two_spirals(n):
    t = torch.rand(n) * 2.5 * math.pi + 0.5
    label = torch.randint(0, 2, (n,))
    sign = 1 - 2 * label.float()
    x = torch.stack([sign * t * torch.cos(t), sign * t * torch.sin(t)], 1) / 5
    return x + 0.05 * torch.randn(n, 2), label


x, y = two_spirals(512)
init = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))


def fresh_model():
    model = nn.Sequential(nn.Linear(2, 32), nn.Tanh(), nn.Linear(32, 32), nn.Tanh(), nn.Linear(32, 2))
    model.load_state_dict(init.state_dict())
    return model


# Small helpers for vectors stored as {name: tensor}, the structure of the parameters.
def dot(a, b):
    return sum((a[k] * b[k]).sum() for k in a)


def add(a, b, scale=1.0):
    return {k: a[k] + scale * b[k] for k in a}


def conjugate_gradient(gvp, g, damping, iterations, start):
    """Approximately solve (G + damping I) p = -g from ``start`` (the previous step, decayed)."""
    p = dict(start)
    r = add({k: -t for k, t in g.items()}, add(gvp(p), p, damping), -1.0)  # -g - (G + damping I) p
    d = dict(r)
    rr = dot(r, r)
    for _ in range(iterations):
        hd = add(gvp(d), d, damping)
        curvature = dot(d, hd)
        if curvature <= 0:
            break
        alpha = rr / curvature
        p = add(p, d, alpha)
        r = add(r, hd, -alpha)
        rr_new = dot(r, r)
        if rr_new.sqrt() < 1e-6:
            break
        d = add(r, d, rr_new / rr)
        rr = rr_new
    return p


def train_hessian_free(epochs, cg_iterations=50):
    model = fresh_model()
    params = dict(model.named_parameters())
    loss_fn = lambda: F.cross_entropy(model(x), y)  # noqa: E731
    ce = fwdgrad.cross_entropy_loss(y)
    product_count = 0

    def gvp(v):
        nonlocal product_count
        product_count += 1
        return fwdgrad.ggnvp(lambda: model(x), ce, params, v)

    damping, losses = 1.0, [loss_fn().item()]
    previous = {k: torch.zeros_like(t) for k, t in params.items()}
    for _ in range(epochs):
        loss = loss_fn()
        g = dict(zip(params, torch.autograd.grad(loss, list(params.values()))))
        loss = loss.detach()  # the closure form needs no graph holding the parameters
        p = conjugate_gradient(gvp, g, damping, cg_iterations, {k: 0.95 * t for k, t in previous.items()})
        # Reduction predicted by the damped quadratic model, for the damping rule.
        predicted = dot(g, p) + 0.5 * dot(p, add(gvp(p), p, damping))
        with torch.no_grad():
            step = 1.0
            while True:  # backtracking line search along p
                for k, t in params.items():
                    t += step * p[k]
                new_loss = loss_fn()
                if new_loss < loss + 1e-4 * step * dot(g, p) or step < 1e-3:
                    break
                for k, t in params.items():
                    t -= step * p[k]
                step /= 2
        rho = (new_loss - loss) / predicted if step == 1.0 else 0.0
        damping *= 1.5 if rho < 0.25 else (2 / 3 if rho > 0.75 else 1.0)
        previous = {k: step * t for k, t in p.items()}
        losses.append(new_loss.item())
    return losses, product_count


def train_first_order(epochs, make_optimizer, batch_size=32):
    model = fresh_model()
    optimizer = make_optimizer(model.parameters())
    losses = [F.cross_entropy(model(x), y).item()]
    for _ in range(epochs):
        for idx in torch.randperm(len(x)).split(batch_size):
            optimizer.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            optimizer.step()
        with torch.no_grad():
            losses.append(F.cross_entropy(model(x), y).item())
    return losses


# The closure-form GGN product agrees with J^T H J built by torch.func (jvp, then vjp).
model = fresh_model()
params = dict(model.named_parameters())
v = {k: torch.randn_like(t) for k, t in params.items()}
gv = fwdgrad.ggnvp(lambda: model(x), fwdgrad.cross_entropy_loss(y), params, v)
detached = {k: t.detach() for k, t in params.items()}


def logits_of(p):
    return torch.func.functional_call(model, p, (x,))


z, jv = torch.func.jvp(logits_of, (detached,), (v,))
_, h_jv = torch.func.jvp(torch.func.grad(lambda z: F.cross_entropy(z, y)), (z,), (jv,))
oracle = torch.func.vjp(logits_of, detached)[1](h_jv)[0]
err = max((gv[k] - oracle[k]).abs().max().item() for k in params)
print(f"closure-form ggnvp vs torch.func J^T H J v: max err {err:.1e}")
assert err < 1e-5

epochs = 25
start = time.perf_counter()
hf, product_count = train_hessian_free(epochs)
hf_time = time.perf_counter() - start
start = time.perf_counter()
sgd = train_first_order(epochs, lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9))
sgd_time = time.perf_counter() - start
adam = train_first_order(epochs, lambda p: torch.optim.Adam(p, lr=1e-2))

print(f"MLP 2-32-32-2 on two spirals ({len(x)} points); full-batch loss after each epoch")
print(f"{'epoch':>5} {'GN-CG':>10} {'SGD+momentum':>13} {'Adam':>8}")
for epoch in range(0, epochs + 1, 5):
    print(f"{epoch:>5} {hf[epoch]:>10.4f} {sgd[epoch]:>13.4f} {adam[epoch]:>8.4f}")
print(f"time: Gauss-Newton CG {hf_time:.1f} s ({product_count} GGN products), SGD {sgd_time:.1f} s")

assert hf[-1] < 0.5 * sgd[-1], "Hessian-free should reach a much lower loss than SGD in as many epochs"
print(f"after {epochs} epochs the Hessian-free loss is {hf[-1]:.4f}, SGD's {sgd[-1]:.4f}, Adam's {adam[-1]:.4f}")
