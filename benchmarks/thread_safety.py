"""jvp from several threads at once: fwdgrad against torch.func.

PyTorch's forward-AD level is process-global, so concurrent ``torch.func.jvp``
calls trip over each other ("no level exists").  fwdgrad keeps its levels on the
dual tensors, so threads share nothing.  Prints, for each library, how many
calls raised (grouped by message) and how many returned a wrong tangent.

    PYTHONPATH=. python benchmarks/thread_safety.py [--threads 6] [--calls 50]
"""

import argparse
import collections
import threading

import torch

import fwdgrad


def run(jvp, f, inputs, expected, calls):
    errors = collections.Counter()
    wrong = 0
    lock = threading.Lock()
    barrier = threading.Barrier(len(inputs))

    def worker(i):
        nonlocal wrong
        x, v = inputs[i]
        barrier.wait()
        for _ in range(calls):
            try:
                t = jvp(f, (x,), (v,))[1]
                ok = torch.allclose(t, expected[i])
            except Exception as e:  # noqa: BLE001 - counted and printed
                with lock:
                    errors[f"{type(e).__name__}: {str(e).splitlines()[0][:70]}"] += 1
                continue
            if not ok:
                with lock:
                    wrong += 1

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(inputs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return errors, wrong


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--calls", type=int, default=50, help="jvp calls per thread")
    args = parser.parse_args()

    torch.manual_seed(0)
    w = torch.randn(16, 16, dtype=torch.float64)

    def f(x):
        return torch.tanh(x @ w).softmax(-1).sum(0)

    inputs = [
        (torch.randn(8, 16, dtype=torch.float64), torch.randn(8, 16, dtype=torch.float64))
        for _ in range(args.threads)
    ]
    # The reference, computed serially.
    expected = [torch.func.jvp(f, (x,), (v,))[1] for x, v in inputs]
    total = args.threads * args.calls
    print(f"{args.threads} threads x {args.calls} jvp calls = {total} calls each\n")
    print(f"{'library':<12} {'raised':>7} {'wrong':>7} {'correct':>8}")
    results = {}
    for name, jvp in (("torch.func", torch.func.jvp), ("fwdgrad", fwdgrad.jvp)):
        errors, wrong = run(jvp, f, inputs, expected, args.calls)
        raised = sum(errors.values())
        results[name] = errors
        print(f"{name:<12} {raised:>7} {wrong:>7} {total - raised - wrong:>8}")
    for name, errors in results.items():
        for message, count in errors.most_common():
            print(f"\n{name}: {count} x {message}")


if __name__ == "__main__":
    main()
