"""fwdgrad in one minute: forward-mode derivatives of a small model, checked
against central finite differences in float64."""

import torch

import fwdgrad

torch.manual_seed(0)
torch.set_default_dtype(torch.float64)

model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Tanh(), torch.nn.Linear(16, 3))
x = torch.randn(8, 4)
v = torch.randn(8, 4)


def finite_difference(f, x, v, eps=1e-6):
    return (f(x + eps * v) - f(x - eps * v)) / (2 * eps)


# 1. forward_grad: df(x, dx) -> (f(x), J(x) dx)
df = fwdgrad.forward_grad(model)
y, dy = df(x, v)
err = (dy - finite_difference(model, x, v)).abs().max().item()
print(f"forward_grad: output {tuple(y.shape)}, tangent matches finite differences (max err {err:.1e})")
assert err < 1e-6

# 2. jvp, torch.func style, with a pytree of inputs
def f(inputs):
    return (inputs["a"].sin() * inputs["b"]).sum(-1)

a, b = torch.randn(5, 3), torch.randn(5, 3)
da, db = torch.randn(5, 3), torch.randn(5, 3)
out, tangent = fwdgrad.jvp(f, ({"a": a, "b": b},), ({"a": da, "b": db},))
fd = finite_difference(lambda s: f({"a": a + s * da, "b": b + s * db}), torch.tensor(0.0), torch.tensor(1.0))
err = (tangent - fd).abs().max().item()
print(f"jvp:          pytree inputs, tangent matches finite differences (max err {err:.1e})")
assert err < 1e-6
