"""Thread safety: transforms (jvp, forward_grad, hvp in both forms) in several
threads at once each get the right answer, and plain torch code in other
threads is untouched.

fwdgrad keeps its levels on the dual tensors and in a per-thread stack, not in
process-global state, so threads share nothing but the kept recordings of
jacfwd and the traced mode.  (PyTorch's forward-AD level is process-global:
``torch.func.jvp`` from several threads fails with "no level exists"; see
``benchmarks/thread_safety.py``, which prints both side by side.)
"""

import threading

import pytest
import torch
import torch.nn.functional as F
from torch.autograd.functional import hvp as autograd_hvp

import fwdgrad

DT = torch.float64
N_THREADS = 4
ITERATIONS = 15


@pytest.fixture(autouse=True)
def one_intra_op_thread():
    """Python threads x OpenMP threads oversubscribe a small CI machine; the point
    here is concurrency between Python threads, so keep each op single-threaded."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _data(seed, *shape):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, dtype=DT, generator=g)


W = _data(100, 6, 6)


def mlp(x):
    return torch.tanh(x @ W).softmax(-1).sum(0)


def views_and_inplace(x):
    y = x.clone()
    y[1:].mul_(x[:-1].sin())
    y.t().diagonal().add_(1.0)
    return F.layer_norm(y, y.shape[-1:])


def nested(x):
    """jvp of a function that itself calls jvp: two levels in one thread."""
    return fwdgrad.jvp(lambda y: (y * x.cos()).sum(-1), (x,), (torch.ones_like(x),))[1]


def loss(x):
    return (x @ W).sigmoid().pow(2).sum() + F.log_softmax(x, -1).sum()


def forward_over_reverse(x, v):
    def gradient(x):
        with torch.enable_grad():
            x = x.requires_grad_()
            return torch.autograd.grad(loss(x), x, create_graph=True)[0]

    return fwdgrad.jvp(gradient, (x.clone(),), (v,))[1]


def _run_threads(workers):
    """Run each worker in its own thread, all starting together; re-raise the first failure."""
    barrier = threading.Barrier(len(workers))
    failures = []

    def run(work):
        try:
            barrier.wait()
            work()
        except BaseException as e:  # noqa: BLE001 - reported below
            failures.append(e)

    threads = [threading.Thread(target=run, args=(w,)) for w in workers]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if failures:
        raise failures[0]


def _jvp_worker(f, x, v, expected):
    def work():
        for _ in range(ITERATIONS):
            out, t = fwdgrad.jvp(f, (x,), (v,))
            assert type(t) is torch.Tensor
            torch.testing.assert_close(t, expected)

    return work


def _forward_grad_worker(f, x, v, expected):
    def work():
        df = fwdgrad.forward_grad(f)
        for _ in range(ITERATIONS):
            torch.testing.assert_close(df(x, v)[1], expected)

    return work


def _hvp_worker(x, v, expected):
    def work():
        for _ in range(ITERATIONS):
            torch.testing.assert_close(forward_over_reverse(x, v), expected)

    return work


def _hvp_pure_worker(x, v, expected):
    def work():
        for _ in range(ITERATIONS):
            torch.testing.assert_close(fwdgrad.hvp(loss, x, v), expected)

    return work


def _hvp_closure_worker(seed):
    """A model of its own per thread: the closure form swaps its live parameters."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3)).double()
    x = _data(seed, 5, 6)
    params = dict(model.named_parameters())
    v = {k: _data(seed + i, *p.shape) for i, (k, p) in enumerate(params.items())}
    names = list(params)

    def pure(*ws):
        return torch.func.functional_call(model, dict(zip(names, ws)), (x,)).softmax(-1).pow(2).sum()

    detached = tuple(p.detach() for p in params.values())
    expected = torch.autograd.functional.hvp(pure, detached, tuple(v.values()))[1]

    def work():
        for _ in range(ITERATIONS):
            hv = fwdgrad.hvp(lambda: model(x).softmax(-1).pow(2).sum(), params, v)
            torch.testing.assert_close(tuple(hv.values()), expected)
        assert all(type(p) is torch.nn.Parameter for p in model.parameters())

    return work


def _plain_torch_worker(seed):
    x = _data(seed, 5, 6)
    expected_grad = 2 * (x @ W) @ W.t()

    def work():
        for _ in range(3 * ITERATIONS):
            xr = x.clone().requires_grad_()
            y = ((xr @ W) ** 2).sum()
            (g,) = torch.autograd.grad(y, xr)
            assert type(y) is torch.Tensor and type(g) is torch.Tensor
            torch.testing.assert_close(g, expected_grad)
            z = x.clone()
            z[1:].mul_(2)
            assert type(z) is torch.Tensor
            torch.testing.assert_close(z[1:], 2 * x[1:])
            assert torch.is_grad_enabled()

    return work


def test_jvp_in_many_threads_each_gets_its_own_answer():
    cases = [(f, _data(i, 5, 6), _data(10 + i, 5, 6)) for i, f in enumerate([mlp, views_and_inplace, nested, mlp])]
    # Oracles: torch.func, serially; for the nested case (fwdgrad inside
    # fwdgrad) the analytic answer: d/dx along v of sum(cos(x), -1).
    expected = [
        -(x.sin() * v).sum(-1) if f is nested else torch.func.jvp(f, (x,), (v,))[1]
        for f, x, v in cases
    ]
    workers = [_jvp_worker(f, x, v, e) for (f, x, v), e in zip(cases, expected)]
    workers.append(_forward_grad_worker(mlp, cases[0][1], cases[0][2], expected[0]))
    _run_threads(workers)


def test_forward_over_reverse_in_many_threads():
    cases = [(_data(i, 5, 6), _data(20 + i, 5, 6)) for i in range(N_THREADS)]
    expected = [autograd_hvp(loss, x, v)[1] for x, v in cases]
    _run_threads([_hvp_worker(x, v, e) for (x, v), e in zip(cases, expected)])


def test_plain_torch_threads_are_untouched_while_transforms_run():
    x, v = _data(1, 5, 6), _data(2, 5, 6)
    expected = torch.func.jvp(views_and_inplace, (x,), (v,))[1]
    hx, hv = _data(3, 5, 6), _data(4, 5, 6)
    expected_hv = autograd_hvp(loss, hx, hv)[1]
    workers = [
        _jvp_worker(views_and_inplace, x, v, expected),
        _hvp_worker(hx, hv, expected_hv),
        _plain_torch_worker(5),
        _plain_torch_worker(6),
    ]
    _run_threads(workers)


def test_hvp_in_many_threads_pure_and_closure():
    cases = [(_data(i, 5, 6), _data(30 + i, 5, 6)) for i in range(2)]
    expected = [autograd_hvp(loss, x, v)[1] for x, v in cases]
    workers = [_hvp_pure_worker(x, v, e) for (x, v), e in zip(cases, expected)]
    workers += [_hvp_closure_worker(40), _hvp_closure_worker(41)]
    _run_threads(workers)


def test_jacfwd_in_many_threads_shares_its_kept_recordings():
    """jacfwd keeps one recording per function and signature; threads hitting and
    filling that cache at once still each get their own Jacobian."""
    points = [_data(40 + i, 3, 6) for i in range(N_THREADS)]
    expected = [torch.func.jacfwd(mlp)(x) for x in points]

    def worker(x, e):
        def work():
            for _ in range(ITERATIONS):
                assert torch.allclose(fwdgrad.jacfwd(mlp)(x), e)
        return work

    _run_threads([worker(x, e) for x, e in zip(points, expected)])
