"""Calibration: time the fused kernels of real training steps, fit the learned cost model.

``calibrate(CalibrateConfig(...)) -> Path`` (what ``splitc calibrate`` runs):

1. Workloads. Each ONNX model (default: the bundled demo CNN) is imported, planned server-only
   and split (``passes/split_module.py``), so one side holds the whole training step:
   ``server_loss_adjoint`` (forward then backward) and ``server_update`` (SGD). Plus a sweep of
   single ops over shapes (matmul, conv2d, conv2d_transpose, elementwise, reductions, softmax,
   transpose), so the regressor sees sizes the models do not have.
2. Kernels. The module is legalized, fused and scheduled exactly as ``passes/build.py`` does
   for an ``llvm`` target (``passes/schedules.py: default_cpu_schedule``); every ``call_tir``
   is one kernel launch. Its role comes from where it runs: in ``*_adjoint`` functions the
   forward ends at the first binding whose var is an ``*_adjoint`` (``relax.transform.
   Gradient`` emits the whole forward first), ``*_update`` kernels are the optimizer.
3. Measurement (``cost_models/rpc.py``): the kernels are built into one library and timed
   one by one with ``time_evaluator`` (warm-up call, ``repeats`` x ``number`` calls, median
   and spread); the whole step (``server_step`` + ``server_update``, through flat wrappers
   since RPC cannot pass nested tuples) is timed through the Relax VM with >= 15 repeats, so
   ``step ~ step_scale x sum(kernels) + call_overhead x calls`` can be fitted. Locally or on a board through TVM's RPC tracker (no authentication: trusted
   networks only, see ``cost_models/rpc.py``).
4. Dataset: JSON lines, one row per (workload, function, role, kernel), one ``step`` row per
   model workload and a ``done`` row closing each workload, each with its provenance (target,
   board key, TVM version, date, repeats, spread). Resumable: rows already in the file for
   the same target and board are not measured again; a ``done`` workload is not compiled.
5. Fit (``fit_learned``): linear and tree regressors in log space, compared by leave-one-model-
   out error (fit on kernels of the other models + the sweep, test on the model never seen),
   the better one is refitted on everything and written, with the comparison against the
   roofline prior, into a ``DeviceProfile`` JSON (``"learned"`` key, ``provenance.status =
   "calibrated"``) that ``load_profile(path)`` and ``cost_model_for`` read.

Layering note: ``cost_models`` does not import ``passes`` at module level; building the
training step needs the frontend and SplitModule, so ``_model_workload`` imports them inside
the function (calibration is the one place where measuring needs the compiler).
"""

from __future__ import annotations

import datetime
import json
import math
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from splitc import BuildError, InputError, SplitcError, __version__
from splitc.cost_models.features import FAMILIES, FEATURE_NAMES, KernelFeatures, parse_kinds, vector
from splitc.cost_models.learned import LEARNED_VERSION, Regressor, fit_regressor, mape, within
from splitc.cost_models.profiles import DeviceProfile

__all__ = [
    "DATASET_VERSION",
    "CalibrateConfig",
    "calibrate",
    "default_models",
    "fit_learned",
    "heldout_report",
    "load_rows",
    "measure_workload",
    "model_module",
    "sweep_module",
]

DATASET_VERSION = 1
_BUNDLED = Path(__file__).resolve().parent.parent / "tools" / "models"


def default_models() -> tuple[Path, ...]:
    """The built-in calibration set: the bundled ONNX models (``tools/models/*.onnx``)."""
    return tuple(sorted(_BUNDLED.glob("*.onnx")))


@dataclass(frozen=True)
class CalibrateConfig:
    target: str = "llvm"
    output: Path = Path("calibrated.json")
    rpc_tracker: str | None = None  # "HOST:PORT"
    rpc_key: str | None = None
    models: tuple[Path, ...] = ()  # ONNX files; empty -> default_models()
    batch_sizes: tuple[int, ...] = ()  # fills symbolic batch dims; empty -> model's own
    repeats: int = 5
    number: int = 3  # calls per timing
    sweep: bool = True  # also time single ops over shapes
    dataset: Path | None = None  # JSON lines; default: output with suffix .jsonl
    resume: bool = True
    name: str | None = None  # profile name; default: output file stem
    base_profile: str = "local-cpu"  # roofline constants kept in the profile (the fallback)
    progress: Callable[[str], None] | None = field(default=None, compare=False)

    @property
    def dataset_path(self) -> Path:
        return Path(self.dataset) if self.dataset else Path(self.output).with_suffix(".jsonl")


# -- workloads -------------------------------------------------------------------------------
@dataclass
class Workload:
    key: str  # unique per model file + input shapes
    model: str  # short name, the held-out group
    module: object  # tvm.IRModule before legalization
    weights: frozenset  # Relax parameter names that are trainable weights
    step: tuple[str, ...]  # functions that make one training step (timed through the VM)


def model_module(path: Path, batch: int | None = None) -> Workload:
    """Server-only split of one ONNX model: the whole training step on one side."""
    import tvm
    from splitc.cost_models.link import Link
    from splitc.cost_models.roofline import RooflineModel
    from splitc.passes.annotate_costs import annotate_costs
    from splitc.passes.frontend import load_onnx
    from splitc.passes.partition import solve
    from splitc.passes.pipeline import resolve_input_shapes
    from splitc.passes.split_module import split_module

    shapes = resolve_input_shapes(Path(path), {}, batch)
    mod, info = load_onnx(path, shapes or None)
    # costs do not matter for a server-only plan; any profile will do
    prior = RooflineModel(DeviceProfile("calib", "cpu", {"float32": 1e11}, 1e10, 1e-6,
                                        {"status": "prior", "source": "placeholder"}))
    graph = annotate_costs(mod, prior, prior, model_hash=info.sha256, name=info.name,
                           buffers=info.buffers)
    plan = solve(graph, Link.parse("1Gbps", None, "0"), algorithm="server-only",
                 allow_raw_upload=True)
    smod, spec = split_module(mod, plan)
    keep = {gv: f for gv, f in smod.functions.items()
            if gv.name_hint in ("server_loss_adjoint", "server_step", "server_update")}
    keep = _with_flat_entries(tvm.IRModule(keep), ("server_step", "server_update"))
    dims = ",".join(f"{i.name}={'x'.join(map(str, i.shape))}" for i in info.inputs)
    key = f"{info.name}@{info.sha256[:12]}[{dims}]"
    return Workload(key, info.name, keep, frozenset(spec.server_params),
                    ("server_step_flat", "server_update_flat"))


def _unflatten(ty, hint: str, flat: list):
    """An expression of type ``ty`` built from fresh tensor vars (appended to ``flat``)."""
    from tvm import relax

    if hasattr(ty, "fields"):
        return relax.Tuple([_unflatten(t, f"{hint}_{i}", flat) for i, t in enumerate(ty.fields)])
    v = relax.Var(hint, ty)
    flat.append(v)
    return v


def _with_flat_entries(mod, names):
    """Add ``NAME_flat(tensors...)`` calling ``NAME`` with its tuple arguments rebuilt: TVM RPC
    cannot pass nested tuples (``server_update((params), (grads), state)``) to a remote VM."""
    from tvm import relax

    bb = relax.BlockBuilder(mod)
    for name in names:
        gv = mod.get_global_var(name)
        func = mod[name]
        if gv.ty is None or not hasattr(gv.ty, "ret"):
            relax.expr._update_type(gv, func.ty)  # a GlobalVar from IRModule({...}) has none
        flat: list = []
        rebuilt = [_unflatten(p.ty, p.name, flat) for p in func.params]
        with bb.function(f"{name}_flat", flat):
            out = bb.emit(relax.Call(gv, rebuilt))
            bb.emit_func_output(out)
    return bb.get()


# single ops over shapes: (op, shapes...), see sweep_module
_SWEEP = (
    [("matmul", (m, k), (k, n)) for m, k, n in
     [(8, 64, 64), (32, 256, 256), (64, 512, 512), (128, 128, 1024), (256, 1024, 256),
      (16, 1024, 1024), (512, 64, 512)]]
    + [("conv2d", (n, c, h, h), (o, c, k, k)) for n, c, h, o, k in
       [(1, 16, 32, 16, 3), (4, 32, 16, 32, 3), (1, 64, 16, 128, 1), (8, 3, 32, 16, 3),
        (2, 64, 8, 64, 3), (1, 128, 14, 128, 3)]]
    + [("conv2d_transpose", (n, o, h, h), (o, c, 3, 3)) for n, c, h, o in
       [(4, 16, 16, 32), (1, 64, 16, 64), (8, 8, 32, 16)]]
    + [(op, (n,), (n,)) for op in ("add", "multiply") for n in (1024, 32768, 1 << 20)]
    + [("relu", (n,)) for n in (4096, 262144, 1 << 22)]
    + [("sum", (r, c)) for r, c in [(64, 1024), (1024, 64), (16, 65536)]]
    + [("softmax", (r, c)) for r, c in [(64, 1000), (512, 128)]]
    + [("permute_dims", (r, c)) for r, c in [(256, 256), (64, 4096)]]
)


def sweep_module() -> Workload:
    """One Relax function per single op of the sweep (all forward kernels)."""
    from tvm import relax
    from tvm.relax import op as R

    bb = relax.BlockBuilder()
    for i, (op, *shapes) in enumerate(_SWEEP):
        ps = [relax.Var(f"a{j}", relax.TensorType(s, "float32")) for j, s in enumerate(shapes)]
        with bb.function(f"sweep{i}_{op}", ps):
            with bb.dataflow():
                if op in ("matmul", "add", "multiply"):
                    y = getattr(R, op)(*ps)
                elif op == "conv2d":
                    y = R.nn.conv2d(ps[0], ps[1], padding=shapes[1][-1] // 2)
                elif op == "conv2d_transpose":
                    y = R.nn.conv2d_transpose(ps[0], ps[1], padding=1)
                elif op == "relu":
                    y = R.nn.relu(ps[0])
                elif op == "sum":
                    y = R.sum(ps[0], axis=[1])
                elif op == "softmax":
                    y = R.nn.softmax(ps[0])
                else:
                    y = R.permute_dims(ps[0])
                out = bb.emit_output(y)
            bb.emit_func_output(out)
    return Workload(f"sweep-v{len(_SWEEP)}", "sweep", bb.get(), frozenset(), ())


# -- kernels ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Call:
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


def _calls(sched, weights: frozenset) -> list[_Call]:
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
                out.append(_Call(fname, role, v.args[0].name_hint, ins + outs, pb, len(outs)))
    return out


def _features(c: _Call, flops: float, parallel: bool | None = None) -> KernelFeatures:
    ins, outs = c.specs[:len(c.specs) - c.n_out], c.specs[len(c.specs) - c.n_out:]
    dtype = outs[0][1] if outs else "float32"
    return KernelFeatures(parse_kinds(c.symbol), float(flops), sum(map(_nbytes, ins)),
                          sum(map(_nbytes, outs)), c.param_bytes, c.role,
                          tuple(s for s, _ in ins), tuple(s for s, _ in outs), dtype, parallel)


def _vm_specs(func) -> list:
    def one(ty):
        if hasattr(ty, "fields"):
            return [one(t) for t in ty.fields]
        return _spec(ty)

    return [one(p.ty) for p in func.params]


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def measure_workload(w: Workload, runner, cfg: CalibrateConfig, done: set,
                     emit: Callable[[dict], None], say: Callable[[str], None]) -> None:
    """Compile ``w`` as the build does, time its kernels (skipping keys in ``done``) and its
    whole step, and ``emit`` one row per kernel and one ``step`` row."""
    import tvm
    from splitc.passes.schedules import default_cpu_schedule
    from tvm import relax, tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    target = tvm.target.Target(cfg.target)
    if target.kind.name != "llvm":
        raise InputError(f"Calibrate: target {cfg.target!r} is not a CPU (llvm) target; GPU "
                         "calibration is not implemented yet")
    if _row_key(w.key, "done", "", "") in done:
        say(f"{w.key}: already measured")
        return
    with target:
        sched = default_cpu_schedule(relax.transform.LegalizeOps()(w.module), target)
    calls = _calls(sched, w.weights)
    prims = {gv.name_hint: f for gv, f in sched.functions.items() if isinstance(f, tirx.PrimFunc)}
    groups: dict[tuple, list[_Call]] = defaultdict(list)
    for c in calls:
        groups[(c.function, c.role, c.symbol, c.specs)].append(c)
    prov = {"target": str(cfg.target), "board": runner.board, "tvm": _tvm_version(),
            "splitc": __version__, "repeats": cfg.repeats, "number": cfg.number,
            "schema": DATASET_VERSION}
    todo = [(k, cs) for k, cs in groups.items() if _row_key(w.key, *k[:3]) not in done]
    say(f"{w.key}: {len(groups)} kernels ({len(calls)} calls), {len(todo)} to measure")
    if todo:
        syms = sorted({k[2] for k, _ in todo})
        lib = tvm.tirx.build(tvm.IRModule({s: prims[s].with_attr("global_symbol", s)
                                           for s in syms}), target=target)
        lib = runner.load(lib, f"k{abs(hash(w.key)) % 10**8}")
        for i, ((fname, role, sym, specs), cs) in enumerate(todo):
            try:
                flops = float(estimate_tir_flops(tvm.IRModule({sym: prims[sym]})))
            except Exception:  # noqa: BLE001 - opaque extern calls have no FLOP estimate
                flops = 0.0
            t = runner.time_kernels(lib, [(sym, list(specs))], cfg.repeats, cfg.number)[0]
            emit({"type": "kernel", "workload": w.key, "model": w.model, "function": fname,
                  "role": role, "symbol": sym, "calls": len(cs),
                  "features": _features(cs[0], flops, "T.parallel(" in prims[sym].script()
                                        ).to_json(), "seconds": t.median,
                  "spread": t.spread, "date": _now(), **prov})
            say(f"{w.key}: kernel {i + 1}/{len(todo)} {sym} {t.median * 1e6:.1f} us")
    if w.step and _row_key(w.key, "step", "", "") not in done:
        ex = tvm.compile(sched, target=target)
        ex = runner.load(ex, f"s{abs(hash(w.key)) % 10**8}")
        specs = {f: _vm_specs(sched[f]) for f in w.step}
        # the whole step is what the plan is judged on: at least 15 timings (the machine is
        # shared, single timings of a step spread up to 30x under load)
        ts = runner.time_vm(ex, specs, max(cfg.repeats, 15), cfg.number)
        n_calls = sum(1 for c in calls if c.function != "server_infer")
        emit({"type": "step", "workload": w.key, "model": w.model,
              "seconds": sum(t.median for t in ts.values()),
              "functions": {k: t.median for k, t in ts.items()},
              "spread": max(t.spread for t in ts.values()), "n_calls": n_calls,
              "date": _now(), **prov})
        say(f"{w.key}: step {sum(t.median for t in ts.values()) * 1e3:.3f} ms")
    emit({"type": "done", "workload": w.key, "model": w.model, "date": _now(), **prov})


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _row_key(workload: str, function: str, role: str, symbol: str) -> tuple:
    return (workload, function, role, symbol)


def load_rows(path: Path, target: str | None = None, board: str | None = None) -> list[dict]:
    """Rows of a dataset file (optionally only those measured on ``target`` / ``board``).
    A torn last line (calibration killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or r.get("schema") != DATASET_VERSION:
            raise InputError(f"Calibrate: {str(path)!r} line {n + 1} is not a splitc dataset "
                             f"row (schema {DATASET_VERSION}); use another --dataset path")
        if (target is None or r.get("target") == target) and (board is None or
                                                                 r.get("board") == board):
            rows.append(r)
    return rows


def _done_keys(rows: list[dict]) -> set:
    keys = set()
    for r in rows:
        if r["type"] == "kernel":
            keys.add(_row_key(r["workload"], r["function"], r["role"], r["symbol"]))
        else:  # "step" or "done" (every row of the workload is in the file)
            keys.add(_row_key(r["workload"], r["type"], "", ""))
    return keys


# -- fitting ---------------------------------------------------------------------------------
def _xy(rows: list[dict], prof: DeviceProfile):
    ks = [KernelFeatures.from_json(r["features"]) for r in rows]
    X = np.array([vector(k, prof.peak("float32"), prof.mem_bandwidth) for k in ks])
    y = np.log10(np.maximum([r["seconds"] for r in rows], 1e-9))
    return ks, X, y


def _roofline(ks: list[KernelFeatures], prof: DeviceProfile) -> np.ndarray:
    return np.array([max(k.flops / prof.peak(k.dtype),
                         (k.bytes_read + k.bytes_written) / prof.mem_bandwidth)
                     + prof.kernel_overhead for k in ks])


def _step_fit(kernels: list[dict], steps: list[dict]) -> tuple[float, float]:
    """(scale, call_overhead): the compiled step ~ scale x (sum of its kernels timed alone) +
    call_overhead x (kernel calls). Isolated kernels run with hot caches and no VM around
    them, so scale >= 1 in practice (1.2-2 measured here). Fitted by non-negative least squares
    on relative errors, so a 0.1 ms model weighs as much as a 40 ms one."""
    from scipy.optimize import nnls

    per = defaultdict(float)
    for r in kernels:
        per[r["workload"]] += r["calls"] * r["seconds"]
    eq = [(per[s["workload"]] / s["seconds"], s["n_calls"] / s["seconds"]) for s in steps
          if s["workload"] in per and s["n_calls"] and s["seconds"] > 0]
    if not eq:
        return 1.0, 0.0
    A = np.array(eq)
    A[:, 1] *= 1e-6  # overhead in microseconds: columns of similar size for NNLS
    (scale, ovh_us), _ = nnls(A, np.ones(len(eq)))
    if scale <= 0:  # degenerate (one tiny workload): keep kernels as they are
        return 1.0, float(max((1 - A[:, 0]).mean() / max(A[:, 1].mean(), 1e-12), 0) * 1e-6)
    return float(scale), float(ovh_us * 1e-6)


def heldout_report(rows: list[dict], prof: DeviceProfile, kinds=("linear", "trees")) -> dict:
    """Leave-one-model-out: for each model, fit on every other model's kernels plus the sweep
    and predict this model's kernels and whole step. Returns per regressor (and ``roofline``)
    the share of kernels within +-10 %, the MAPE (%), and per model the predicted and measured
    step."""
    kern = [r for r in rows if r["type"] == "kernel"]
    steps = {r["workload"]: r for r in rows if r["type"] == "step"}
    models = sorted({r["model"] for r in kern if r["model"] != "sweep"})
    out: dict = {"models": models, "kernels": 0}
    preds: dict[str, list] = defaultdict(list)
    meas, step_rep = [], defaultdict(dict)
    for m in models:
        train = [r for r in kern if r["model"] != m]
        test = [r for r in kern if r["model"] == m]
        if not train or not test:
            continue
        ks_tr, Xtr, ytr = _xy(train, prof)
        ks, X, _ = _xy(test, prof)
        y = np.array([r["seconds"] for r in test])
        meas.extend(y)
        scale, ovh = _step_fit(train, [s for w, s in steps.items() if s["model"] != m])
        seen = {k.family for k in ks_tr}
        roof = _roofline(ks, prof)
        cand = {"roofline": roof}
        for kind in kinds:
            p = 10.0 ** fit_regressor(kind, Xtr, ytr).predict(X)
            fb = np.array([k.family not in seen for k in ks])
            cand[kind] = np.where(fb, roof, p)
        for name, p in cand.items():
            preds[name].extend(p)
            for w in {r["workload"] for r in test}:
                if w not in steps:
                    continue
                idx = [i for i, r in enumerate(test) if r["workload"] == w]
                calls = np.array([test[i]["calls"] for i in idx])
                pred = float((calls * p[idx]).sum())
                if name != "roofline":
                    pred = scale * pred + ovh * steps[w]["n_calls"]
                step_rep[w][name] = pred
                step_rep[w]["measured"] = steps[w]["seconds"]
    out["kernels"] = len(meas)
    meas = np.asarray(meas)
    big = meas >= 1e-5  # kernels of 10 us or more: below, timer resolution and noise dominate
    out["kernels_ge_10us"] = int(big.sum())
    for name, p in preds.items():
        p = np.asarray(p)
        out[name] = {"within_10pct": within(p, meas), "mape_pct": mape(p, meas)}
        if big.any():
            out[name].update(within_10pct_ge_10us=within(p[big], meas[big]),
                             mape_pct_ge_10us=mape(p[big], meas[big]))
    out["steps"] = dict(step_rep)
    return out


def fit_learned(rows: list[dict], prof: DeviceProfile, kinds=("linear", "trees"),
                heldout: bool = True) -> dict:
    """The ``learned`` section of a calibrated profile: the regressor with the lower held-out
    MAPE (trees when there is only one model to hold out), refitted on every row.
    ``heldout=False`` skips the leave-one-model-out comparison and fits ``kinds[0]``."""
    kern = [r for r in rows if r["type"] == "kernel"]
    if len(kern) < 8:
        raise SplitcError(f"Calibrate: only {len(kern)} kernels measured; add models or enable "
                          "the op sweep")
    report = heldout_report(rows, prof, kinds) if heldout else {"models": [], "kernels": 0}
    scored = [k for k in kinds if k in report]
    best = min(scored, key=lambda k: report[k]["mape_pct"]) if scored else kinds[-1]
    ks, X, y = _xy(kern, prof)
    reg: Regressor = fit_regressor(best, X, y)
    steps = [r for r in rows if r["type"] == "step"]
    scale, ovh = _step_fit(kern, steps)
    sample = kern[0]
    return {"version": LEARNED_VERSION, "features": list(FEATURE_NAMES),
            "regressor": reg.to_json(), "families": sorted({k.family for k in ks}),
            "all_families": list(FAMILIES), "step_scale": scale, "call_overhead": ovh,
            "accuracy": {k: v for k, v in report.items() if k != "steps"},
            "steps": report.get("steps", {}),
            "dataset": {"rows": len(rows), "kernels": len(kern), "steps": len(steps),
                        "models": sorted({r["model"] for r in kern}),
                        "target": sample["target"], "board": sample["board"],
                        "tvm": sample["tvm"], "repeats": sample["repeats"]}}


# -- entry point -----------------------------------------------------------------------------
def calibrate(cfg: CalibrateConfig) -> Path:
    """Measure (resumably), fit, and write the calibrated profile to ``cfg.output``."""
    from splitc.cost_models.profiles import load_profile
    from splitc.cost_models.rpc import Runner

    say = cfg.progress or (lambda msg: None)
    if cfg.repeats < 1 or cfg.number < 1:
        raise InputError("Calibrate: --repeats and --number must be >= 1")
    models = tuple(Path(m) for m in (cfg.models or default_models()))
    for m in models:
        if not m.is_file():
            raise InputError(f"Calibrate: model {str(m)!r} does not exist; pass ONNX files")
    base = load_profile(cfg.base_profile)
    runner = Runner(cfg.target, cfg.rpc_tracker, cfg.rpc_key)
    board = runner.board
    ds = cfg.dataset_path
    ds.parent.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and ds.exists():
        ds.unlink()
    rows = load_rows(ds, cfg.target, board)
    done = _done_keys(rows)
    say(f"dataset {ds}: {len(rows)} rows already measured on {board}")
    fh = ds.open("a")

    def emit(row: dict) -> None:
        fh.write(json.dumps(row) + "\n")
        fh.flush()  # a killed run keeps every finished row: resume picks up from here
        rows.append(row)

    try:
        workloads = [("sweep", None)] if cfg.sweep else []
        workloads += [(m, b) for m in models for b in (cfg.batch_sizes or (None,))]
        for i, (m, b) in enumerate(workloads):
            say(f"workload {i + 1}/{len(workloads)}: {m if m == 'sweep' else Path(m).name}")
            try:
                w = sweep_module() if m == "sweep" else model_module(m, b)
                measure_workload(w, runner, cfg, done, emit, say)
            except SplitcError:
                raise
            except Exception as e:  # noqa: BLE001 - TVM's legalizer raises AssertionError...
                lines = [ln for ln in str(e).splitlines() if ln.strip()] or [type(e).__name__]
                raise BuildError(f"Calibrate: compiling the training step of {m} failed "
                                 f"({lines[-1][:160]}); leave this model out of --models"
                                 ) from None
    finally:
        fh.close()
        runner.close()
    say("fitting the cost model")
    learned = fit_learned(rows, base)
    name = cfg.name or Path(cfg.output).stem
    acc = learned["accuracy"]
    best = learned["regressor"]["kind"]
    notes = (f"{learned['dataset']['kernels']} kernels from {len(learned['dataset']['models'])} "
             f"workloads; held-out ({', '.join(acc.get('models', [])) or 'none'}): "
             + "; ".join(f"{k} {acc[k]['within_10pct']:.0%} within 10%, MAPE "
                         f"{acc[k]['mape_pct']:.1f}%" for k in ("roofline", "linear", "trees")
                         if k in acc)
             + f"; chosen {best}. Roofline constants from {base.name}.")
    prof = DeviceProfile(name, base.kind, dict(base.peak_flops), base.mem_bandwidth,
                         base.kernel_overhead,
                         {"status": "calibrated", "source": f"splitc calibrate on "
                          f"{board} ({cfg.target}), dataset {ds.name}",
                          "date": _now()[:10], "notes": notes}, learned)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(prof.to_json(), indent=1) + "\n")
    say(f"wrote {out}")
    return out
