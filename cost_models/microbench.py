"""``local-cpu``: peak FLOP/s, memory bandwidth and per-call overhead measured on the spot.

A short numpy microbenchmark (~0.6 s, bounded well under 2 s): float32 matmul GFLOP/s (best of
repeats of a 512^3 product, 2*512^3 FLOPs each), copy bandwidth (a 32 MiB array copied:
read + write = 64 MiB moved per copy) and the cost of a trivial numpy call as the kernel
overhead. Measured once per process and cached: every ``load_profile("local-cpu")`` in one
run sees the same numbers, so plans are reproducible within a run.
"""

from __future__ import annotations

import functools
import os
import platform
import time

import numpy as np

from splitc.cost_models.profiles import LOCAL_CPU, DeviceProfile

__all__ = ["local_cpu_profile", "measure"]

_BUDGET_S = 0.25  # per measurement: matmul + copy + call overhead ~0.6 s, 2 s worst case


def _best_of(fn, budget: float, min_reps: int = 3) -> float:
    best = float("inf")
    start = time.perf_counter()
    reps = 0
    while reps < min_reps or time.perf_counter() - start < budget:
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
        reps += 1
        if time.perf_counter() - start > 2 * budget:  # a loaded machine: stop early
            break
    return best


def measure(budget: float = _BUDGET_S) -> dict:
    """Return ``{"flops": FLOP/s, "bandwidth": B/s, "overhead": s}`` for this CPU."""
    n = 512
    rng = np.random.default_rng(0)
    a = rng.standard_normal((n, n), dtype=np.float32)
    b = rng.standard_normal((n, n), dtype=np.float32)
    t_mm = _best_of(lambda: a @ b, budget)
    src = np.ones(8 << 20, dtype=np.float32)  # 32 MiB
    dst = np.empty_like(src)
    t_cp = _best_of(lambda: np.copyto(dst, src), budget)
    small = np.ones(4, dtype=np.float32)
    t_call = _best_of(lambda: np.negative(small, out=small), budget / 5, min_reps=100)
    return {"flops": 2 * n**3 / t_mm, "bandwidth": 2 * src.nbytes / t_cp, "overhead": t_call}


@functools.lru_cache(maxsize=1)
def local_cpu_profile() -> DeviceProfile:
    m = measure()
    return DeviceProfile(
        name=LOCAL_CPU, kind="cpu", peak_flops={"float32": m["flops"]},
        mem_bandwidth=m["bandwidth"], kernel_overhead=m["overhead"],
        provenance={
            "status": "measured",
            "source": "cost_models/microbench.py: numpy 512^3 float32 matmul, 32 MiB copy, "
                      "trivial ufunc call (best of repeats)",
            "date": time.strftime("%Y-%m-%d"),
            "notes": f"{platform.machine()} {platform.processor() or ''} "
                     f"cpus={os.cpu_count()}; measured in-process, not calibrated against TVM",
        },
    )
