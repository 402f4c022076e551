"""Timing one workload so that it agrees with its own re-timing on a shared machine.

``time_rounds(runner, lib, calls, vm, functions, ...)`` times every kernel of a workload and
its whole step (Relax VM functions) in rounds: each round takes a share of every kernel's
and the step's samples, in turn, and the minimum over all rounds is recorded. A probe (a
fixed reference kernel pair, ``Probe``) is timed between rounds; rounds go on (up to
``max_rounds``) until one round ran with the probe within 5 % of the fastest it ever read
before and after it: a round in which the machine was in its fast state.

Why (measured here, 181 kernels and 4 whole steps of tiny_cnn, tiny_transformer, mlp and
wide_cnn, 3 full passes per method, methods rotated in one process, two other engineers'
jobs on the 2 cores, load average 2-4): the share of kernels within +-10 % of their
re-timing was 54 % for 30 consecutive 1 ms samples (min), 77 % pinned to one core, 68-98 %
for 3 rounds of 10 (varies run to run), 68-80 % pinned + 3 rounds, and 97 % pinned + rounds
until a quiet round (steps: every pair within 5 % in 83 % vs 17-50 %, worst 8.8 % vs
18-46 %), for 1.4x the timing time. Preemption is not the main noise: whole passes ran
uniformly slower, 1.38x in the median over 13 s, with every sample slow, so the minimum of
consecutive samples cannot remove it (another tenant's load on the host: the VM shows no SMT
siblings). The probe saw the same: 1.0-1.3x of its best, in phases of seconds.

Arguments are allocated afresh every round (same values, new addresses): a kernel's time
depends on where its buffers lie (cache sets, 4K aliasing), and the VM runs it on whatever
addresses its allocator hands out. Same run, 373 kernels of the 7 test models, 3 passes:
within +-10 % of the re-timing 89-94 % of kernels with one allocation per pass, 96-99 %
with one per round (>= 10 us: 85-95 % vs 98 %); the step gets all its samples every round,
since it is cheap (1-2 ms) and what the plan is judged on. Before this module (30
consecutive samples, kernels then step, one allocation, no pinning), in one run of the same
kernels: 78-86 % of kernels, steps up to 59 % apart; with it, 1.6-1.7x the timing time.

Limits: under sustained load (load average 4-5, the probe 1.3-1.6x its best for minutes) no
round is quiet within 8 and agreement falls again: a whole calibration's re-timing gave 78 %
of kernels (95.5 % of those >= 10 us), tiny_cnn's kernels alone 49 % in one such phase.
Dividing each round by its probe reading was tried and made it worse (29-48 %): the
slowdown is not the same for every kernel.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Callable

from splitc.cost_models.rpc import Timing, random_args, timing

__all__ = ["LOCK_ENV", "QUIET", "Probe", "time_rounds", "timing_lock"]

# Processes timing on one machine take turns (``timing_lock``): the lock file's path, or empty
# for no lock; default ``splitc-timing.lock`` in the temporary directory.
LOCK_ENV = "SPLITC_TIMING_LOCK"


@contextlib.contextmanager
def timing_lock(runner, say: Callable[[str], None] | None = None):
    """Context: this process alone times on this machine (an exclusive ``flock`` on the file
    ``$SPLITC_TIMING_LOCK``); other processes may compile meanwhile. Nothing for a board behind
    RPC (it times there) or with ``SPLITC_TIMING_LOCK=`` (empty).

    Why: two processes timing at once on two cores share the cache and the memory bus. In
    session 19 (2 cores) the 9 test models timed twice beside a family sweep agreed within
    +-10 % for 92.4 % of kernels (97-99 % alone in earlier sessions), and the probe read
    1.3x its best in most rounds, 1.06-1.14x with the sweep stopped. That the turns help is
    not established: later the same day, with turns, the host's own load kept the probe at
    1.08-1.92x with the other sweep stopped. Turns cost little: a block spends about half its
    time starting its process and compiling (two sweeps taking turns timed 3.6 and 3.8 blocks
    a minute)."""
    path = os.environ.get(LOCK_ENV, os.path.join(tempfile.gettempdir(), "splitc-timing.lock"))
    if getattr(runner, "remote", None) is not None or not path:
        yield
        return
    import fcntl

    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if say:
                say(f"waiting for another process's timing to end (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

QUIET = 1.05  # a round is quiet when the probe reads within 5 % of its best before and after


class Probe:
    """A 64^3 float32 matmul (compute, L1) and a 1M-element add (12 MiB: L3 and memory), built
    for the runner's target and timed through it (on a board behind RPC too): ``()`` returns
    how much slower than its best so far the machine runs now (>= 1.0). ``best``: the fastest
    readings of an earlier probe (``Probe.best``), carried from process to process."""

    def __init__(self, runner, target, best: dict[str, float] | None = None):
        import tvm
        from tvm import te

        a = te.placeholder((64, 64), name="a")
        b = te.placeholder((64, 64), name="b")
        k = te.reduce_axis((0, 64), name="k")
        mm = te.compute((64, 64), lambda i, j: te.sum(a[i, k] * b[k, j], axis=k), name="mm")
        x = te.placeholder((1 << 20,), name="x")
        y = te.placeholder((1 << 20,), name="y")
        add = te.compute((1 << 20,), lambda i: x[i] + y[i], name="add")
        mod = tvm.IRModule({
            "probe_mm": te.create_prim_func([a, b, mm]).with_attr("global_symbol", "probe_mm"),
            "probe_add": te.create_prim_func([x, y, add]).with_attr("global_symbol", "probe_add"),
        })
        self.runner = runner
        self.lib = runner.load(tvm.tirx.build(mod, target=target), "probe")
        f32 = "float32"
        self.args = {"probe_mm": random_args([((64, 64), f32)] * 3, runner.dev),
                     "probe_add": random_args([((1 << 20,), f32)] * 3, runner.dev)}
        self.best = {k: (best or {}).get(k, float("inf")) for k in self.args}

    def __call__(self) -> float:
        ratio = 1.0
        for sym, args in self.args.items():
            t = min(self.runner.sample_kernel(self.lib, sym, args, 5, 1, 1))
            self.best[sym] = min(self.best[sym], t)
            ratio = max(ratio, t / self.best[sym])
        return ratio


def time_rounds(runner, lib, calls, vm, functions: dict, repeats: int, number: int,
                min_repeat_ms: int, budget_s: float, rounds: int = 3, max_rounds: int = 8,
                probe: Callable[[], float] | None = None,
                say: Callable[[str], None] | None = None
                ) -> tuple[list[Timing], dict[str, Timing], dict]:
    """``calls``: [(symbol, specs)] of ``lib``; ``functions``: {name: specs} of the VM ``vm``
    (None: no step). Each kernel gets ``repeats / rounds`` samples a round (fewer for slow
    ones: ``budget_s`` a kernel over all rounds, >= 2 a round), each VM function
    ``max(repeats, 15) / rounds`` (>= 5). Returns the kernels' and functions' Timings over
    all rounds and ``{"rounds": used, "quiet": a quiet round ran, "probe": readings}``, with
    a ``Probe``'s fastest readings so far in seconds (``probe_s``)."""
    def fresh():  # the same values at new addresses (see the docstring)
        return ([random_args(specs, runner.dev, seed=i) for i, (_, specs) in enumerate(calls)],
                {f: random_args(s, runner.dev, seed=100 + i)
                 for i, (f, s) in enumerate((functions or {}).items())})

    args, vargs = fresh()
    per = max(1, repeats // rounds)
    vper = max(repeats, 15)
    samples: list[list[float]] = [[] for _ in calls]
    vsamples: dict[str, list[float]] = {f: [] for f in vargs}
    est: list[float] = []
    with timing_lock(runner, say), runner.pinned():
        for (sym, _), a in zip(calls, args):  # warm-up: page in code and data, estimate
            t0 = time.perf_counter()
            lib[sym](*a)
            est.append(max(time.perf_counter() - t0, min_repeat_ms * 1e-3))
        for f, a in vargs.items():
            vm[f](*a)
        before = probe() if probe else 1.0
        readings = [before]
        used, quiet = 0, False
        while used < rounds or (probe and not quiet and used < max_rounds):
            if used:
                args, vargs = fresh()  # allocated while the old ones still hold their memory
            for i, ((sym, _), a) in enumerate(zip(calls, args)):
                n = min(per, max(2, int(budget_s / rounds / est[i])))
                samples[i] += runner.sample_kernel(lib, sym, a, n, number, min_repeat_ms)
            for f, a in vargs.items():
                vsamples[f] += runner.sample_vm(vm, f, a, vper, number, min_repeat_ms)
            after = probe() if probe else 1.0
            readings.append(after)
            quiet = quiet or max(before, after) < QUIET
            before = after
            used += 1
            if say:
                say(f"round {used}: {len(calls)} kernels, {len(vargs)} VM functions, probe "
                    f"{after:.2f}x its best{'' if quiet or not probe else ', no quiet round yet'}")
    info = {"rounds": used, "quiet": quiet if probe else None,
            "probe": [round(r, 3) for r in readings]}
    if isinstance(probe, Probe):  # the host's speed in absolute terms, for other days' rows
        info["probe_s"] = {k: float(f"{v:.4g}") for k, v in probe.best.items()}
    return ([timing(s, number) for s in samples],
            {f: timing(s, number) for f, s in vsamples.items()}, info)
