"""The kernels of a compiled training step, as calibration times them.

``scheduled(mod, target)`` legalizes, fuses and schedules a Relax module exactly as
``passes/build.py: build_side`` does for an llvm target; ``calls(sched, weights)`` lists every
``call_tir`` of its Relax functions (one kernel launch each) with its role (forward,
backward, update) and argument specs; ``features(call, ...)`` describes one as
``KernelFeatures``. Split out of ``calibrate.py`` (measurement and the entry point). Imports
``passes`` inside the functions only: calibration is the one place where measuring needs the
compiler (see ``calibrate.py``).
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass

from splitc.cost_models.features import KernelFeatures, parse_kinds

__all__ = ["Call", "calls", "describe", "features", "kernel_groups", "resolve", "scheduled",
           "vm_builtins", "vm_specs"]


@dataclass(frozen=True)
class Call:
    function: str
    role: str
    symbol: str
    specs: tuple  # ((shape, dtype), ...) inputs then outputs
    param_bytes: int
    n_out: int


def _spec(ty) -> tuple:
    return tuple(int(d) for d in ty.shape), str(ty.dtype)


def _nbytes(spec) -> int:
    shape, dtype = spec
    bits = int("".join(c for c in dtype if c.isdigit()) or 8)
    return math.prod(shape) * max(bits // 8, 1)


def calls(sched, weights: frozenset) -> list[Call]:
    """Every ``call_tir`` of every Relax function of a scheduled module, with its role."""
    import tvm
    from tvm import relax

    call_tir = tvm.ir.Op.get("relax.call_tir")
    out = []
    for gv, f in sched.functions.items():
        if not isinstance(f, relax.Function) or not isinstance(f.body, relax.SeqExpr):
            continue
        fname = gv.name_hint
        role = "update" if fname.endswith("_update") else "forward"
        for blk in f.body.blocks:
            for b in blk.bindings:
                if role == "forward" and b.var.name.endswith(("_adjoint", "_adjoint1")):
                    role = "backward"
                v = b.value
                if not (isinstance(v, relax.Call) and v.op == call_tir):
                    continue
                args = list(v.args[1].fields) if isinstance(v.args[1], relax.Tuple) else []
                try:
                    ins = tuple(_spec(a.ty) for a in args)
                    ot = v.ty_args[0]
                    outs = tuple(_spec(t) for t in (ot.fields if hasattr(ot, "fields") else [ot]))
                except (TypeError, AttributeError):
                    continue  # symbolic shapes: not timeable with fixed arrays
                pb = sum(_nbytes(_spec(a.ty)) for a in args
                         if isinstance(a, relax.Var) and a.name in weights)
                if role == "update" and "float" in outs[0][1]:
                    # the optimizer reads weights through TupleGetItem vars: the new weight
                    # (the kernel's output) has the weight's size
                    pb = _nbytes(outs[0])
                out.append(Call(fname, role, v.args[0].name_hint, ins + outs, pb, len(outs)))
    return out


def features(c: Call, flops: float, parallel: bool | None = None,
              sched: tuple | None = None) -> KernelFeatures:
    ins, outs = c.specs[:len(c.specs) - c.n_out], c.specs[len(c.specs) - c.n_out:]
    dtype = outs[0][1] if outs else "float32"
    return KernelFeatures(parse_kinds(c.symbol), float(flops), sum(map(_nbytes, ins)),
                          sum(map(_nbytes, outs)), c.param_bytes, c.role,
                          tuple(s for s, _ in ins), tuple(s for s, _ in outs), dtype, parallel,
                          sched)


def vm_specs(func) -> list:
    def one(ty):
        if hasattr(ty, "fields"):
            return [one(t) for t in ty.fields]
        return _spec(ty)

    return [one(p.ty) for p in func.params]


def vm_builtins(ex) -> dict[str, int]:
    """Per Relax VM function of a compiled ``Executable``, how many ``vm.builtin.*`` calls it
    makes (argument checks, shape matches, allocations, tuple ops, releases): the VM work
    around the kernels. tiny_cnn's step: 393 of them around 52 kernel calls, and 45 us of its
    66 us step are not kernel time (~0.1 us each)."""
    out: dict[str, int] = {}
    fn = None
    for line in ex.as_text().splitlines():
        if line.startswith("@") and line.rstrip().endswith(":"):
            fn = line[1:].rstrip()[:-1]
            out[fn] = 0
        elif fn is not None and line.split()[:2] and line.split()[0] == "call" \
                and line.split()[1].startswith("vm.builtin."):
            out[fn] += 1
    return out


def resolve(text: str):
    """``host`` (this CPU, what ``splitc compile`` builds for), ``llvm`` or any target text
    ``passes/targets.py: resolve_target`` reads."""
    from splitc.passes.targets import resolve_target

    return resolve_target(text)


def scheduled(mod, target, tuning_records=None):
    """Legalized, fused and scheduled exactly as ``passes/build.py: build_side`` does for an
    llvm target: its ``rewrite_for_cpu`` (RewriteGrads, strided conv2d_transpose phases), then
    ``LegalizeOps`` and ``default_cpu_schedule``. Not ``lower_side`` + schedule: that fuses
    twice (tiny_cnn: 51 kernel calls vs the build's 52)."""
    from splitc.passes.build import rewrite_for_cpu
    from splitc.passes.schedules import default_cpu_schedule
    from splitc.passes.tune_knobs import knob_lookup
    from tvm import relax

    knobs = knob_lookup(tuning_records) if tuning_records is not None else None
    with target:
        return default_cpu_schedule(
            relax.transform.LegalizeOps()(rewrite_for_cpu(mod)), target, tile_knobs=knobs
        )


def kernel_groups(w, target, tuning_records=None, say=lambda m: None):
    """Workload ``w`` (``workloads.Workload``) scheduled as the build does (``scheduled``):
    ``(sched, calls, prims, groups, sites)``: the scheduled module, its kernel ``calls``, its
    PrimFuncs by name, the calls grouped by ``(function, role, symbol, specs)`` (one dataset
    row each) and, per group, where each call came from (``_sites``)."""
    from splitc.passes.provenance import trace
    from tvm import tirx

    with trace() as tr:
        sched = scheduled(w.module, target, tuning_records)
    cs = calls(sched, w.weights)
    prims = {gv.name_hint: f for gv, f in sched.functions.items() if isinstance(f, tirx.PrimFunc)}
    groups: dict[tuple, list] = defaultdict(list)
    for c in cs:
        groups[(c.function, c.role, c.symbol, c.specs)].append(c)
    return sched, cs, prims, groups, _sites(tr, w, sched, groups, say)


def describe(key: tuple, cs: list[Call], prims: dict, target, sites: dict) -> dict:
    """One kernel group of ``kernel_groups`` as the untimed part of its dataset row:
    ``function``, ``role``, ``symbol``, ``calls``, ``features`` (FLOPs from TVM's estimate,
    schedule features from ``tir_features.py``) and ``sites`` where traced."""
    import tvm
    from splitc.cost_models.tir_features import schedule_features
    from tvm.s_tir.analysis import estimate_tir_flops

    fname, role, sym, _ = key
    try:
        flops = float(estimate_tir_flops(tvm.IRModule({sym: prims[sym]})))
    except Exception:  # noqa: BLE001 - opaque extern calls have no FLOP estimate
        flops = 0.0
    sf = schedule_features(prims[sym], target)
    row = {"function": fname, "role": role, "symbol": sym, "calls": len(cs),
           "features": features(cs[0], flops, "T.parallel(" in prims[sym].script(),
                                sf).to_json()}
    if key in sites:
        row["sites"] = sites[key]
    return row


def _sites(tr, w, sched, groups: dict, say) -> dict:
    """Per kernel row (group key), the parts of each of its calls: which planner op each
    fused binding came from (``passes/provenance.py``; ``cost_models/attribute.py`` splits
    the row's time by them). Empty for workloads without an OpGraph (the op sweep), and on
    a tracing failure, which is reported: the timings do not depend on it."""
    if w.graph is None:
        return {}
    try:
        by_call = defaultdict(list)
        for site in tr.sites(w.module, sched, w.graph):
            by_call[(site.function, site.symbol)].append(site.to_json()["parts"])
    except Exception as e:  # noqa: BLE001 - provenance is extra data; timing goes on
        say(f"{w.key}: kernel provenance failed ({type(e).__name__}: {e}); rows keep none")
        return {}
    out = {}
    for key, cs in groups.items():  # calls and sites are both in program order
        parts = by_call.get((key[0], key[2]), [])
        if len(parts) >= len(cs):
            out[key], by_call[(key[0], key[2])] = parts[:len(cs)], parts[len(cs):]
    return out
