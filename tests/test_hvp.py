"""hvp and value_grad_and_hvp on real models, in both forms, against PyTorch's double backward.

Oracle: ``torch.autograd.functional.hvp`` (double backward) over
``torch.func.functional_call``, in float64.  Attention uses PyTorch's math
SDPA backend in the oracle, since the fused CPU kernel has no double backward.
"""

import gc
import resource

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel

import fwdgrad
from fwdgrad.interpreter import Dual, strip

D = torch.float64


class CNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 6, 3)
        self.ln = nn.LayerNorm([6, 2, 2])
        self.fc = nn.Linear(24, 3)

    def forward(self, x):
        x = F.silu(self.bn(self.conv1(x)))
        x = F.max_pool2d(x, 2)
        x = self.ln(self.conv2(x))
        return self.fc(x.flatten(1))


class Attention(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.ln = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.ln(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.out(a.transpose(1, 2).reshape(b, n, d))
        return self.head(F.gelu(x).mean(1))


class LSTM(nn.Module):
    def __init__(self):
        super().__init__()
        self.lstm = nn.LSTM(4, 5, batch_first=True)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.lstm(x)[0][:, -1])


def _model(name):
    torch.manual_seed(0)
    if name == "mlp":
        model = nn.Sequential(
            nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 3), nn.Softmax(-1)
        )
        x = torch.randn(6, 5)
    elif name in ("cnn_eval", "cnn_train"):
        model = CNN()
        x = torch.randn(4, 3, 8, 8)
    elif name == "attention":
        model = Attention()
        x = torch.randn(2, 5, 8)
    elif name == "lstm":
        model = LSTM()
        x = torch.randn(3, 4, 4)
    model = model.double().train(name == "cnn_train")
    if name == "cnn_eval":  # non-trivial running statistics
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2)
    return model, x.double(), torch.tensor([0, 1, 2, 1, 0, 2][: x.shape[0]])


def _loss(out, y):
    # The MLP ends in a softmax: use it as probabilities.
    if torch.allclose(out.sum(-1), torch.ones((), dtype=D)):
        return F.nll_loss(out.log(), y)
    return F.cross_entropy(out, y)


def _oracle(model, x, y, params, v):
    names = list(params)

    def loss(*ps):
        return _loss(functional_call(model, dict(zip(names, ps)), (x,)), y)

    plain = tuple(p.detach() for p in params.values())
    with sdpa_kernel([SDPBackend.MATH]):
        value = loss(*plain)
        _, hv = torch.autograd.functional.hvp(loss, plain, tuple(v[k] for k in names))
        ps = tuple(p.clone().requires_grad_() for p in plain)
        grads = torch.autograd.grad(loss(*ps), ps)
    return value, dict(zip(names, grads)), dict(zip(names, hv))


MODELS = ["mlp", "cnn_eval", "cnn_train", "attention", "lstm"]


def _snapshot(model):
    return {k: (p, p.detach().clone(), p.requires_grad, p.grad) for k, p in model.named_parameters()}


def _assert_untouched(model, before):
    for k, p in model.named_parameters():
        obj, value, requires_grad, grad = before[k]
        assert p is obj, f"{k} is a different object"
        assert type(p) is nn.Parameter and not isinstance(p, Dual), f"{k} is a {type(p).__name__}"
        assert not hasattr(p, "_tangent"), f"{k} carries fwdgrad state"
        assert torch.equal(p.detach(), value), f"{k} changed value"
        assert p.requires_grad == requires_grad, f"{k} requires_grad changed"
        assert p.grad is grad, f"{k}.grad changed"


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("form", ["pure", "closure"])
def test_hvp_matches_double_backward(name, form):
    model, x, y = _model(name)
    params = dict(model.named_parameters())
    torch.manual_seed(1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    # A .grad the call must leave alone, and a frozen parameter.
    first = next(iter(params.values()))
    first.grad = torch.ones_like(first)
    last = list(params.values())[-1]
    last.requires_grad_(False)
    _, _, expected = _oracle(model, x, y, params, v)
    before = _snapshot(model)
    if form == "pure":
        hv = fwdgrad.hvp(lambda ps: _loss(functional_call(model, ps, (x,)), y), params, v)
    else:
        hv = fwdgrad.hvp(lambda: _loss(model(x), y), params, v)
    _assert_untouched(model, before)
    assert list(hv) == list(params)
    for k in params:
        torch.testing.assert_close(hv[k], expected[k], msg=lambda m: f"{name} {form} {k}: {m}")


@pytest.mark.parametrize("form", ["pure", "closure", "sequence", "tensor"])
def test_value_grad_and_hvp(form):
    model, x, y = _model("cnn_eval")
    params = dict(model.named_parameters())
    names = list(params)
    torch.manual_seed(1)
    v = {k: torch.randn_like(p) for k, p in params.items()}
    value0, grad0, hv0 = _oracle(model, x, y, params, v)
    if form == "pure":
        value, g, hv = fwdgrad.value_grad_and_hvp(lambda ps: _loss(functional_call(model, ps, (x,)), y), params, v)
    elif form == "closure":
        value, g, hv = fwdgrad.value_grad_and_hvp(lambda: _loss(model(x), y), params, v)
    elif form == "sequence":
        value, g, hv = fwdgrad.value_grad_and_hvp(
            lambda *ps: _loss(functional_call(model, dict(zip(names, ps)), (x,)), y),
            [params[k] for k in names], [v[k] for k in names],
        )
        assert isinstance(g, list) and isinstance(hv, list)
        g, hv = dict(zip(names, g)), dict(zip(names, hv))
    else:  # a single tensor: the fully connected layer's weight
        w = params["fc.weight"]

        def loss(w):
            return _loss(functional_call(model, {**params, "fc.weight": w}, (x,)), y)

        value, gw, hvw = fwdgrad.value_grad_and_hvp(loss, w, v["fc.weight"])
        assert isinstance(gw, torch.Tensor) and isinstance(hvw, torch.Tensor)
        g, hv = {"fc.weight": gw}, {"fc.weight": hvw}
        grad0 = {"fc.weight": grad0["fc.weight"]}
        _, hv_w = torch.autograd.functional.hvp(loss, w.detach(), v["fc.weight"])
        hv0 = {"fc.weight": hv_w}
    torch.testing.assert_close(value, value0)
    assert not value.requires_grad and not isinstance(value, Dual)
    for k in g:
        torch.testing.assert_close(g[k], grad0[k])
        torch.testing.assert_close(hv[k], hv0[k])
        assert type(g[k]) is torch.Tensor and type(hv[k]) is torch.Tensor


def test_batch_norm_running_statistics_update_like_a_forward_pass():
    model, x, y = _model("cnn_train")
    reference = _model("cnn_train")[0]
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    fwdgrad.hvp(lambda: _loss(model(x), y), params, v)
    with torch.no_grad():
        reference(x)
    torch.testing.assert_close(model.bn.running_mean, reference.bn.running_mean)
    torch.testing.assert_close(model.bn.running_var, reference.bn.running_var)
    assert type(model.bn.running_mean) is torch.Tensor


def test_hvp_of_a_quadratic_is_exact_and_owns_its_result():
    A = torch.randn(4, 4, dtype=D)
    A = A + A.T
    w = torch.randn(4, dtype=D)
    v = torch.randn(4, dtype=D)
    hv = fwdgrad.hvp(lambda w: 0.5 * w @ A @ w, w, v)
    torch.testing.assert_close(hv, A @ v)
    # The Hessian of 0.5 |w|^2 is the identity: Hv must be a copy of v, not v.
    hv = fwdgrad.hvp(lambda w: 0.5 * (w * w).sum(), w, v)
    torch.testing.assert_close(hv, v)
    hv.add_(1)
    assert not torch.equal(hv, v)


def test_hvp_of_parameters_the_loss_ignores_is_zero():
    a, b = torch.randn(3, dtype=D), torch.randn(2, dtype=D)
    value, g, hv = fwdgrad.value_grad_and_hvp(lambda a, b: (a.sin()).sum(), (a, b), (torch.ones(3, dtype=D), torch.ones(2, dtype=D)))
    assert torch.equal(g[1], torch.zeros(2, dtype=D)) and torch.equal(hv[1], torch.zeros(2, dtype=D))
    torch.testing.assert_close(hv[0], -a.sin())
    assert isinstance(g, tuple)


def test_closure_form_restores_parameters_when_the_loss_raises():
    model, x, y = _model("mlp")
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    before = _snapshot(model)

    def broken():
        h = model[0](x).tanh()
        raise KeyError("inside the closure")

    with pytest.raises(KeyError, match="inside the closure"):
        fwdgrad.hvp(broken, params, v)
    _assert_untouched(model, before)
    # And the model still trains normally afterwards.
    _loss(model(x), y).backward()
    assert model[0].weight.grad is not None


def test_closure_form_refuses_parameters_held_by_a_live_graph():
    model, x, y = _model("mlp")
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    pending = _loss(model(x), y)  # a graph that saved the weights
    before = _snapshot(model)
    with pytest.raises(RuntimeError, match="another reference"):
        fwdgrad.hvp(lambda: _loss(model(x), y), params, v)
    _assert_untouched(model, before)
    pending.backward()  # the pending graph is intact


def test_hvp_in_a_training_loop_does_not_grow():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.Tanh(), nn.Linear(256, 10)).double()
    x, y = torch.randn(256, 64, dtype=D), torch.randint(0, 10, (256,))
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        hv = fwdgrad.hvp(lambda: F.cross_entropy(model(x), y), params, v)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
        return hv

    def rss_mib():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2**20

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the suite runs in parallel workers
    try:
        for _ in range(10):
            step()
        gc.collect()
        start = rss_mib()
        for _ in range(100):
            step()
        gc.collect()
        growth = rss_mib() - start
    finally:
        torch.set_num_threads(threads)
    # One leaked forward-over-reverse graph per call would be ~1.5 MiB (two
    # saved 256x256 float64 activations and their tangents): 150 MiB here.
    assert growth < 20, f"resident memory grew by {growth:.1f} MiB over 100 hvp calls"
    assert not _real_duals(), "duals outlived the calls"


def _real_duals():
    """Live duals, leaving out those over fake tensors: torch.compile's caches keep
    the fake values of graphs it compiled (tests/test_compile.py), even after a reset."""
    return [
        o for o in gc.get_objects()
        if isinstance(o, Dual) and not isinstance(strip(o), torch._subclasses.FakeTensor)
    ]


def test_hvp_leaves_no_duals_behind_without_garbage_collection():
    model, x, y = _model("cnn_train")
    params = dict(model.named_parameters())
    v = {k: torch.randn_like(p) for k, p in params.items()}
    gc.collect()
    gc.disable()
    try:
        fwdgrad.hvp(lambda: _loss(model(x), y), params, v)
        fwdgrad.hvp(lambda ps: _loss(functional_call(model, ps, (x,)), y), params, v)
        alive = _real_duals()
    finally:
        gc.enable()
    assert not alive, f"{len(alive)} duals kept alive by reference cycles"


# ---- bad input ---------------------------------------------------------------------


def _quadratic_params():
    return {"a": torch.randn(3, dtype=D), "b": torch.randn(2, 2, dtype=D)}


@pytest.mark.parametrize(
    "make_v, error, match",
    [
        (lambda p: {"a": p["a"]}, ValueError, r"missing \['b'\]"),
        (lambda p: {**p, "c": p["a"]}, ValueError, r"unexpected \['c'\]"),
        (lambda p: {"a": p["a"], "b": torch.zeros(4, dtype=D)}, ValueError, r"v\['b'\] has shape \(4,\) but params\['b'\] has shape \(2, 2\)"),
        (lambda p: {"a": p["a"].float(), "b": p["b"]}, ValueError, r"v\['a'\] has dtype torch.float32"),
        (lambda p: [p["a"], p["b"]], TypeError, "params is a dict, so v must be a dict"),
        (lambda p: {"a": p["a"], "b": 1.0}, TypeError, r"v\['b'\] is a float"),
    ],
)
def test_hvp_rejects_mismatched_v(make_v, error, match):
    params = _quadratic_params()
    with pytest.raises(error, match=match):
        fwdgrad.hvp(lambda ps: (ps["a"] ** 2).sum() + ps["b"].sum(), params, make_v(params))


def test_hvp_rejects_bad_structures_and_losses():
    a = torch.randn(3, dtype=D)
    with pytest.raises(ValueError, match="params has 2 tensors but v has 1"):
        fwdgrad.hvp(lambda x, y: x.sum(), [a, a.clone()], [a])
    with pytest.raises(TypeError, match="must be a tensor, a list/tuple of tensors or a dict"):
        fwdgrad.hvp(lambda x: x.sum(), (p for p in [a]), [a])
    with pytest.raises(TypeError, match="params is a tensor, so v must be a tensor"):
        fwdgrad.hvp(lambda x: x.sum(), a, [a])
    with pytest.raises(ValueError, match=r"loss must return a scalar tensor \(one element\), got one of shape \(3,\)"):
        fwdgrad.hvp(lambda x: x * 2, a, a)
    with pytest.raises(TypeError, match="loss must return a scalar tensor, got float"):
        fwdgrad.hvp(lambda x: 1.0, a, a)
    with pytest.raises(TypeError, match=r"params\[0\] has dtype torch.int64"):
        fwdgrad.hvp(lambda x: x.sum(), [torch.arange(3)], [torch.arange(3)])
    with pytest.raises(TypeError, match="loss must be callable"):
        fwdgrad.hvp(None, a, a)
    with pytest.raises(ValueError, match="params is empty"):
        fwdgrad.hvp(lambda: a.sum(), [], [])
    w = nn.Parameter(torch.randn(3, dtype=D))
    with pytest.raises(ValueError, match=r"params\[1\] appears twice"):
        fwdgrad.hvp(lambda: (w ** 3).sum(), [w, w], [a, a])
    assert type(w) is nn.Parameter
