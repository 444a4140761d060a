"""Helpers shared by the benchmarks: interleaved timing and peak memory per subprocess.

* ``time_interleaved(methods, rounds)``: median seconds per call, one call of
  each method per round with the order rotated every round, so that load from
  other processes and the machine's frequency drift affect every method alike.
* ``peak_growth(fn)``: how far the resident set grows during one call, after
  warm-up calls (Linux: ``/proc/self/clear_refs`` resets the peak ``VmHWM``).
* ``tensor_peak(fn)``: the peak of live tensor bytes during one call, from the
  CPU allocator's own accounting.  Exact where the resident set is not: glibc
  serves a request from a free chunk already resident when it has one, so
  tensors of a few hundred KiB can come and go without the RSS moving.
* ``run_child(script, args)``: run ``script`` in a fresh interpreter and read the
  JSON object on its last line of output.  ``MEMORY_ENV`` fixes glibc's mmap
  threshold, so that freed tensors leave the resident set instead of being
  kept for reuse and resident memory follows the live tensors.
"""

import gc
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# Settings for a memory measurement's subprocess (timings use the defaults).
MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "65536"}


def time_interleaved(methods, rounds, warmup=1):
    """Median seconds per call of each zero-argument callable in ``methods`` (a dict)."""
    for fn in methods.values():
        for _ in range(warmup):
            fn()
    samples = {name: [] for name in methods}
    names = list(methods)
    for r in range(rounds):
        gc.collect()
        k = r % len(names)
        for name in names[k:] + names[:k]:
            fn = methods[name]
            t0 = time.perf_counter()
            fn()
            samples[name].append(time.perf_counter() - t0)
    return {name: statistics.median(s) for name, s in samples.items()}


def kib(key):
    """A ``/proc/self/status`` field in KiB (``"VmRSS:"``, ``"VmHWM:"``)."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(key):
                return int(line.split()[1])
    raise RuntimeError(f"{key} missing from /proc/self/status")


def reset_peak():
    """Reset the peak resident set size (``VmHWM``) to the current size."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")


def peak_growth(fn, warmup=2):
    """Bytes the resident set grows by during one call of ``fn``, above the
    resident size just before it (so torch, the interpreter and the model's
    parameters are not counted), after ``warmup`` calls that fill caches."""
    for _ in range(warmup):
        out = fn()
        del out
    gc.collect()
    base = kib("VmRSS:")
    reset_peak()
    out = fn()
    peak = kib("VmHWM:")
    del out
    return (peak - base) * 1024


def tensor_peak(fn, warmup=2):
    """Peak bytes of live tensors (above those alive before) during one call of
    ``fn``, from the profiler's record of every CPU allocation and free."""
    import torch

    for _ in range(warmup):
        out = fn()
        del out
    gc.collect()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
        del out
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def child_env(memory=False):
    """The environment for a benchmark subprocess: the repository on the path,
    and for a memory measurement the fixed allocator thresholds."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
    if memory:
        env.update(MEMORY_ENV)
    return env


def run_child(script, args, memory=False):
    """Run ``script args`` in a fresh interpreter; the JSON object on the last line
    of its output, or ``{"error": <last line of its error output>}``."""
    proc = subprocess.run(
        [sys.executable, script, *args], capture_output=True, text=True, env=child_env(memory)
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        return {"error": lines[-1] if lines else f"exit status {proc.returncode}"}
    return json.loads(proc.stdout.strip().splitlines()[-1])
