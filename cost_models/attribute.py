"""Measured kernel time attributed back to the planner's ops: per-op "measured" costs.

``attribute(ops, kernels, step_seconds, prof, sites=None) -> {op name: OpCost}``. The kernels
TVM runs are fused (``fused_conv2d_add_relu``) and the gradient pass adds its own (transposes,
reductions), so a kernel does not belong to one op.

Per binding (``sites`` given): ``passes/provenance.py`` traces every kernel call (``Site``,
as JSON: function, symbol, parts) back to the Relax bindings it fused and each binding to
the op that owns it (an op's forward bindings, its backward bindings by the adjoint they
read, its parameter's optimizer update). A kernel row's time (``calls x seconds``) is split
evenly over its call sites and each site's over its parts by their roofline time
(``max(FLOPs / peak, bytes / bandwidth)``, each part at least 1e-3 of the site). The loss's
parts go to the key ``LOSS``; parts no op reaches (the optimizer's step counter) are spread
over the ops in proportion to what they already have. Rows with no site (a kernel traced
in another build) fall back to the bucket rule below.

By bucket (no ``sites``): each kernel's measured time goes to the bucket of its role and
family (``forward/conv``, ``backward/ewise``, ...) and each bucket is spread over the ops'
own kernels of that bucket (``features.op_kernels``) in proportion to their roofline time; a
bucket no op kernel falls in (the loss's ``forward/loss`` when the loss is not among
``ops``) is spread over the role, else over every op kernel.

What the whole step measured beyond its kernels (VM calls and allocations, ``step_seconds -
sum(kernels)``) is spread evenly over the kernel calls (per binding) or the op kernels (by
bucket). Exact in sum, by construction: the costs add up to ``max(step_seconds, sum of
kernels)`` (tests check both modes).

Used by ``tools/bench_cost_model.py`` for decision quality: the plan chosen with predicted
costs against the plan chosen with these measured ones.
"""

from __future__ import annotations

from collections import defaultdict

from splitc.cost_models.base import OpCost, OpFeatures
from splitc.cost_models.features import op_kernels
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.roofline import RooflineModel

__all__ = ["LOSS", "attribute", "row_sites"]

LOSS = "<loss>"  # passes/provenance.py: LOSS (the loss is no planner op)

_ROLE = {"forward": 0, "backward": 1, "update": 2}


def row_sites(kernels: list[dict]) -> list[dict]:
    """The ``sites`` argument of ``attribute`` from kernel rows that carry them (one entry per
    call: ``function``, ``symbol``, ``parts``); empty when none do."""
    return [{"function": r["function"], "symbol": r["symbol"], "parts": p}
            for r in kernels for p in r.get("sites", ())]


def attribute(ops: list[tuple[str, OpFeatures]], kernels: list[dict],
              step_seconds: float | None, prof: DeviceProfile,
              sites: list[dict] | None = None) -> dict[str, OpCost]:
    """Per-op measured cost (forward, backward, update) from calibration kernel rows
    (``function``, ``symbol``, ``role``, ``features.family``, ``calls``, ``seconds``) of one
    workload; per binding when ``sites`` (``provenance.Site.to_json()``) are given."""
    if sites is not None:
        return _by_binding(ops, kernels, step_seconds, prof, sites)
    roof = RooflineModel(prof)
    virt = []  # (op name, role, family, roofline weight) per op kernel
    for name, f in ops:
        for role, ks in op_kernels(f).items():
            for k in ks:
                w = roof.compute_time(int(k.flops), k.bytes_read + k.bytes_written) + \
                    prof.kernel_overhead
                virt.append((name, role, k.family, w))
    out = {name: [0.0, 0.0, 0.0] for name, _ in ops}
    if not virt:
        return {name: OpCost(*c) for name, c in out.items()}
    total: dict = defaultdict(float)
    for r in kernels:
        total[(r["role"], r["features"]["family"])] += r["calls"] * r["seconds"]
    for (role, fam), t in total.items():
        group = [v for v in virt if v[1] == role and v[2] == fam] or \
            [v for v in virt if v[1] == role] or virt
        s = sum(v[3] for v in group)
        for v in group:
            out[v[0]][_ROLE[v[1]]] += t * v[3] / s
    rest = max((step_seconds or 0.0) - sum(total.values()), 0.0) / len(virt)
    for v in virt:
        out[v[0]][_ROLE[v[1]]] += rest
    return {name: OpCost(*c) for name, c in out.items()}


def _by_binding(ops, kernels, step_seconds, prof, sites) -> dict[str, OpCost]:
    names = [name for name, _ in ops]
    out: dict = {name: [0.0, 0.0, 0.0] for name in names}
    out[LOSS] = [0.0, 0.0, 0.0]
    by_key: dict = defaultdict(list)
    for s in sites:
        by_key[(s["function"], s["symbol"])].append(s)
    timed: list = []  # (site, seconds per call)
    loose: list = []  # rows without a traced site
    for r in kernels:
        ss = by_key.get((r.get("function"), r.get("symbol")))
        if ss:
            timed += [(s, r["calls"] * r["seconds"] / len(ss)) for s in ss]
        else:
            loose.append(r)
    n_calls = len(timed) + sum(r["calls"] for r in loose)
    kernel_sum = sum(r["calls"] * r["seconds"] for r in kernels)
    extra = max((step_seconds or 0.0) - kernel_sum, 0.0) / n_calls if n_calls else 0.0
    unowned = [0.0, 0.0, 0.0]
    peak, bw = prof.peak("float32"), prof.mem_bandwidth
    for s, t in timed:
        w = [max(flops / peak, nbytes / bw) for _, _, flops, nbytes in s["parts"]]
        floor = 1e-3 * max(w + [1e-30])
        w = [max(x, floor) for x in w]
        for (owner, role, _, _), x in zip(s["parts"], w):
            out.get(owner, unowned)[_ROLE[role]] += (t + extra) * x / sum(w)
    if loose:  # kernels of another build: the bucket rule, with their calls' extra time
        loose_sum = sum(r["calls"] * r["seconds"] for r in loose)
        scale = 1.0 + extra * sum(r["calls"] for r in loose) / loose_sum if loose_sum else 1.0
        for name, c in attribute(ops, loose, None, prof).items():
            for i, x in enumerate((c.forward, c.backward, c.update)):
                out[name][i] += x * scale
    owned = {name: sum(out[name]) for name in names}
    total = sum(owned.values())
    for name in names:
        share = owned[name] / total if total else 1.0 / len(names)
        for i in range(3):
            out[name][i] += unowned[i] * share
    costs = {name: OpCost(*c) for name, c in out.items()}
    if not any(out[LOSS]):
        del costs[LOSS]
    return costs
