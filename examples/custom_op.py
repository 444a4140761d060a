"""A custom op with a NumPy kernel: give fwdgrad its JVP rule, then use it in jvp and hvp.

fwdgrad sees every op at the dispatcher.  An op whose kernel it cannot look into
(NumPy, C++, CUDA) needs a rule; fwdgrad says so, naming the op, until
``fwdgrad.register_jvp`` provides one.  For ``hvp`` (forward over reverse) the op
also needs a backward, registered with ``torch.library.register_autograd``;
fwdgrad differentiates that backward like any other torch code.
"""

import numpy as np
import torch

import fwdgrad

torch.set_default_dtype(torch.float64)


# The op: soft clipping x / sqrt(1 + x^2), computed by NumPy.
@torch.library.custom_op("examples::softclip", mutates_args=())
def softclip(x: torch.Tensor) -> torch.Tensor:
    x_np = x.numpy()
    return torch.from_numpy(x_np / np.sqrt(1 + x_np**2))


@softclip.register_fake
def _(x):  # shapes only, for tracers such as torch.compile
    return torch.empty_like(x)


def softclip_derivative(x):
    return (1 + x**2) ** -1.5


x = torch.randn(5)
v = torch.randn(5)

try:
    fwdgrad.jvp(softclip, (x,), (v,))
except NotImplementedError as e:
    print("before registering a rule, fwdgrad says:", str(e).splitlines()[0])


# The forward-mode rule: tangents[0] is the tangent of x, ans the op's output.
@fwdgrad.register_jvp(torch.ops.examples.softclip.default)
def softclip_jvp(tangents, ans, x):
    return softclip_derivative(x) * tangents[0]


eps = 1e-6
out, tangent = fwdgrad.jvp(softclip, (x,), (v,))
fd = (softclip(x + eps * v) - softclip(x - eps * v)) / (2 * eps)
print(f"jvp of softclip matches finite differences: max err {(tangent - fd).abs().max():.1e}")
assert torch.allclose(tangent, fd, atol=1e-8)


# The reverse-mode formula, for autograd (and so for hvp).
def setup_context(ctx, inputs, output):
    ctx.save_for_backward(inputs[0])


def backward(ctx, grad):
    (x,) = ctx.saved_tensors
    return grad * softclip_derivative(x)


softclip.register_autograd(backward, setup_context=setup_context)

# A least-squares fit through the op, and its Hessian-vector product.
A = torch.randn(20, 5)
b = torch.randn(20)


def loss(w):
    return ((softclip(A @ w) - b) ** 2).sum()


w = torch.randn(5)
hv = fwdgrad.hvp(loss, w, v)


def gradient(w):
    w = w.clone().requires_grad_()
    return torch.autograd.grad(loss(w), w)[0]


fd = (gradient(w + eps * v) - gradient(w - eps * v)) / (2 * eps)
print(f"hvp through softclip matches finite differences of the gradient: max err {(hv - fd).abs().max():.1e}")
assert torch.allclose(hv, fd, atol=1e-6)
