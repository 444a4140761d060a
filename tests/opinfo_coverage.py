"""Print fwdgrad's operator coverage on PyTorch's OpInfo database.

    python tests/opinfo_coverage.py [--details] [--ops NAME ...]

Columns: fwdgrad's status per op, and whether torch.func.jvp passes the same
samples (checked against finite differences).  The summary counts passes,
expected failures, and ops fwdgrad passes that torch.func.jvp does not.
"""

import argparse
import multiprocessing
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def _run(name):
    import opinfo_util as u

    op = _OPS[name]
    r = u.check_op(op)
    return r, u.check_torch_func(op)


_OPS = {}


def _init():
    import torch

    torch.set_num_threads(1)
    import opinfo_util as u

    for op in u.autograd_ops():
        _OPS[u.op_id(op)] = op


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--details", action="store_true", help="list every op")
    parser.add_argument("--ops", nargs="*", help="only these OpInfo names")
    parser.add_argument("-j", type=int, default=os.cpu_count() or 1)
    a = parser.parse_args()
    _init()
    from expected_failures import EXPECTED_FAILURES

    names = a.ops or list(_OPS)
    with multiprocessing.Pool(a.j, initializer=_init) as pool:
        results = pool.map(_run, names, chunksize=4)
    passed = [r for r, _ in results if r.status == "pass"]
    nosample = [r for r, _ in results if r.status == "nosample"]
    failed = [r for r, _ in results if r.status in ("fail", "error")]
    torch_pass = {r.name for r, tf in results if tf}
    beyond = [r for r in passed if r.name not in torch_pass]
    if a.details:
        for r, tf in results:
            print(f"{r.name:45s} {r.status:8s} torch.func={'pass' if tf else 'no':5s} {r.detail}")
    unlisted = [r for r in failed if r.name not in EXPECTED_FAILURES]
    stale = [n for n in EXPECTED_FAILURES if n in {r.name for r in passed}]
    print()
    print(f"OpInfo ops with autograd: {len(results)} (float64, CPU, up to 3 samples each)")
    print(f"  fwdgrad passes:          {len(passed)}")
    print(f"  expected failures:       {len([r for r in failed if r.name in EXPECTED_FAILURES])}")
    print(f"  unexpected failures:     {len(unlisted)}")
    print(f"  no usable sample:        {len(nosample)}")
    print(f"  torch.func.jvp passes:   {len(torch_pass)}")
    print(f"  fwdgrad passes, torch.func.jvp does not: {len(beyond)}")
    if beyond:
        print("    " + ", ".join(sorted(r.name for r in beyond)))
    for r in nosample:
        print(f"  no sample {r.name}: {r.detail}")
    for r in unlisted:
        print(f"  UNEXPECTED {r.name}: {r.detail}")
    for n in stale:
        print(f"  STALE expected failure (now passes): {n}")
    return 1 if unlisted else 0


if __name__ == "__main__":
    sys.exit(main())
