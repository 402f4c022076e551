"""Batch-scaled look-up: a kernel measured at another batch size, scaled by the work ratio.

Calibration prices a kernel it measured exactly (same fused ops, shapes, dtype and FLOPs:
``features.kernel_key``; ``twins``) at its measured time. A kernel that differs from
a measured one only in its leading dimension (the batch of a conv, the rows of a matmul, the
first axis of a weight gradient's reduction) runs the same loop nest over more or fewer
outer iterations; its time is the measured one times the ratio of the work (FLOPs, or bytes
for kernels without arithmetic):

- ``batch_key``: the identity up to the leading dimension: fused kinds, every argument's
  and output's shape without its first axis, dtype;
- ``scaled_twins(rows)``: ``batch_key`` -> ``[[leading dim, work, fastest seconds], ...]``
  over the measured kernels (stored in a calibrated profile);
- ``scaled_time(table, k)``: the nearest measured batch (work ratio ``r`` within
  ``MAX_RATIO`` either way) whose work ratio is the ratio of the leading dimensions (within
  ``TOLERANCE``: the first axis really is what scales), times ``r``.

Why, measured offline on session 7's data (9 test models, each held out; 210 of their 539
kernels had no exact twin and were predicted by the trees): 85 of the 210 have a batch twin
within 4x. Scaled, the heavy ones land much closer: encoder's 4.9 ms weight-gradient matmul
-3.5 % (predicted +35.6 %), small_resnet's 6.4 ms ReLU-masked data gradient -7.6 % (+44.2 %)
and its 0.7 ms weight gradient -1.6 % (-43.0 %). Held-out kernels within +-10 % 80.1 -> 81.3 %
(the 210: 56.2 -> 59.0 %), whole steps from kernel sums 6/9 -> 8/9 (encoder +14.2 -> +9.9 %,
small_resnet +11.0 -> +3.9 %); with session 8's first 108 re-timed blocks added, 82.4 ->
82.7 % and 8/9 steps both ways (tiny_cnn +8.5 -> +9.6 %). With the whole session 8 sweep the
trees got better at those kernels themselves: the 60 scaled ones 70 % within +-10 % scaled
against 62 % and 75 % predicted (two fits, with two runs' roofline constants), 4.6 % of their
time off against 5.2 and 5.9 %; all kernels +0.9 and -0.6 points, within the fits' spread.
Variants, on session 7's data and then with
session 8's sweep: reductions scaled too 81.4 / 82.6 % but tiny_cnn's step +9.1 / +11.3 %
(``UNSCALED``); conv, transposed conv and matmul only 80.0 / 81.6 %; at most 2x or 16x away
81.3 % (7/9 steps); only measured kernels of >= 1 us 80.3 / 81.4 %; only scaling up 80.1 /
82.0 %; a fixed 0.05-0.2 us per call left unscaled 80.5-77.7 %; the geometric mean with the
trees' prediction 81.3 % (7/9). ``fit.py: heldout_report`` reports these kernels as their own
group (``scaled``): in session 8's bench 60 held-out kernels were scaled, 70.0 % of them
within +-10 %, against 53.5 % of the 142 still predicted.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
from splitc.cost_models.features import KernelFeatures, kernel_key, loose_key, structure_key

__all__ = ["MAX_RATIO", "TOLERANCE", "TWIN_STAT", "UNSCALED", "batch_key", "scaled_time",
           "scaled_twins", "twins"]


def twins(rows: list[dict], stat: str | None = None) -> dict[str, float]:
    """``features.kernel_key``, ``structure_key`` (scheduled kernels) and ``loose_key``
    (elementwise ones) -> the time measured for it over ``rows``' kernels, the ``stat``
    (``TWIN_STAT`` by default) of its twins' times (``features.measured_time`` reads it).

    Why one figure per key rather than each row's own: the same kernel measured in several
    models (a bias add, a transpose, an SGD update) disagrees across runs far more than the
    +-10 % goal on a loaded host (the two passes of one calibration: 73 % of sub-us kernels
    within +-10 %). Held-out (7 models, 379 kernels), per-family trees with schedule
    features: 29.8 % within +-10 % as they were; 45.1 % when a kernel measured in another
    model takes that model's median time, 53.3 % when it takes the minimum.
    ``TWIN_STAT`` says why the median of the twins now."""
    stat = stat or TWIN_STAT
    if stat not in _STATS:
        raise ValueError(f"twins: unknown stat {stat!r}; use {' or '.join(_STATS)}")
    seen: dict[str, list[float]] = {}
    for r in rows:
        f = KernelFeatures.from_json(r["features"])
        # the loop nest's key too, and elementwise ones under their element counts
        for k in (structure_key(f), kernel_key(f), loose_key(f)):
            if k is not None:
                seen.setdefault(k, []).append(float(r["seconds"]))
    return {k: float(_STATS[stat](v)) for k, v in seen.items()}


_STATS = {"min": np.min, "median": np.median}
# The median of the twins' times, not their minimum (each twin is already the minimum over
# its own rounds): on a quiet host the twins differ by where their buffers lie, which a new
# instance of the kernel is as exposed to, so their fastest is biased low. Session 10 (a Zen 5
# host, the two timing passes agreeing for 99.1 % of kernels): look-ups of held-out kernels
# under 100 ns 128 -> 136 of 146 within +-10 %, all 265 -> 274 of 289.
TWIN_STAT = "median"


MAX_RATIO = 4.0  # a measured batch at most 4x bigger or smaller
# work ratio vs leading-dimension ratio: FLOPs (and bytes) of a batch loop scale exactly; 5 %
# let mbv2_block's depthwise weight gradient (192 channels x batch 2: its "leading dim" is
# channels) be scaled from one with 96 at work ratio 1.94: +81 %
TOLERANCE = 0.001
# kernel families never scaled: a reduction often sums over the leading dim (a bias or batch
# norm gradient over the batch), which is then no outer loop, and the small ones are
# fixed-cost bound (tiny_cnn's (2, 8, 8, 8) means and variances +30..+42 % scaled from batch 4)
UNSCALED = ("reduce",)


def batch_key(k: KernelFeatures) -> str | None:
    """Identity up to the leading dimension of every tensor (1-d tensors kept whole); None
    for a kernel without a shaped first argument, and for reductions (``UNSCALED``).

    >>> batch_key(KernelFeatures(("matmul", "add"), 2 * 8 * 64 * 32, 0, 0, 0, "forward",
    ...                          ((8, 64), (64, 32), (32,)), ((8, 32),)))
    '^matmul+add|64,32,32|32|float32'
    """
    if not k.in_shapes or not k.in_shapes[0] or k.family in UNSCALED:
        return None
    cut = lambda shapes: ",".join("x".join(map(str, s[1:] if len(s) >= 2 else s))
                                  for s in shapes)
    return f"^{'+'.join(k.kinds)}|{cut(k.in_shapes)}|{cut(k.out_shapes)}|{k.dtype}"


def _lead(k: KernelFeatures) -> int:
    return int(k.in_shapes[0][0])


def _work(k: KernelFeatures) -> float:
    """FLOPs, or bytes moved for kernels without arithmetic (layout kernels)."""
    return k.flops if k.flops > 0 else float(k.bytes_read + k.bytes_written)


def scaled_twins(kernels: Iterable[tuple[KernelFeatures, float]]
                 ) -> dict[str, list[list[float]]]:
    """``batch_key`` -> ``[[leading dim, work, fastest seconds], ...]``, one entry per
    distinct (leading dim, work), over (features, seconds) pairs of measured kernels.
    The fastest, not the median as in ``twins``: held out (session 10), the median priced 45
    of the 61 scaled kernels within +-10 %, the fastest 46."""
    best: dict[str, dict[tuple[int, float], float]] = {}
    for k, sec in kernels:
        key = batch_key(k)
        if key is None or _work(k) <= 0 or _lead(k) <= 0:
            continue
        d = best.setdefault(key, {})
        at = (_lead(k), _work(k))
        d[at] = min(d.get(at, float("inf")), float(sec))
    return {key: [[lead, w, s] for (lead, w), s in sorted(d.items())]
            for key, d in sorted(best.items())}


def scaled_time(table: dict[str, list], k: KernelFeatures) -> float | None:
    """``k``'s time from the nearest measured batch of the same kernel (``scaled_twins``),
    scaled by the work ratio; None when no measured batch qualifies (see the module)."""
    key = batch_key(k)
    if key is None or key not in table or _work(k) <= 0 or _lead(k) <= 0:
        return None
    best = None
    for lead, w, sec in table[key]:
        r = _work(k) / w
        if not 1.0 / MAX_RATIO <= r <= MAX_RATIO or abs(r * lead / _lead(k) - 1.0) > TOLERANCE:
            continue
        # nearest work ratio first; of equals, the longer (less overhead-bound) measurement
        rank = (abs(math.log(r)), -sec)
        if best is None or rank < best[0]:
            best = (rank, sec * r)
    return None if best is None else best[1]
