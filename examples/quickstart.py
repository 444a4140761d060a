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

# 3. hvp: Hessian-vector product of a scalar loss, forward over reverse, here
#    with the closure form that reads the parameters from the live model.  That
#    form swaps the parameter objects during the call, so no autograd graph
#    through them may be alive: y and dy above hold one (the model's parameters
#    require grad).
del y, dy
params = dict(model.named_parameters())
direction = {k: torch.randn_like(p) for k, p in params.items()}
target = torch.randn(8, 3)


def loss_fn():
    return ((model(x) - target) ** 2).mean()


hv = fwdgrad.hvp(loss_fn, params, direction)


def gradient(shift):
    """The loss's gradient with every parameter moved by shift * direction."""
    with torch.no_grad():
        for k, p in params.items():
            p.add_(shift * direction[k])
    grads = torch.autograd.grad(loss_fn(), list(params.values()))
    with torch.no_grad():
        for k, p in params.items():
            p.sub_(shift * direction[k])
    return dict(zip(params, grads))


eps = 1e-6
g_plus, g_minus = gradient(eps), gradient(-eps)
err = max((hv[k] - (g_plus[k] - g_minus[k]) / (2 * eps)).abs().max().item() for k in params)
print(f"hvp:          closure over the live model, H v matches finite differences of the gradient (max err {err:.1e})")
assert err < 1e-6

# 4. jacfwd: the full Jacobian by forward mode, one column per input element.
x1 = torch.randn(4)
J = fwdgrad.jacfwd(model)(x1)
columns = torch.stack([finite_difference(model, x1, e) for e in torch.eye(4)], dim=-1)
err = (J - columns).abs().max().item()
print(f"jacfwd:       Jacobian {tuple(J.shape)} matches finite differences (max err {err:.1e})")
assert err < 1e-6
