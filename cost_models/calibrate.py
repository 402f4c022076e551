"""Calibration: time the fused kernels of real training steps, fit the learned cost model.

``calibrate(CalibrateConfig(...)) -> Path`` (what ``splitc calibrate`` runs):

1. Workloads (``workloads.py``). Each ONNX model (default: the bundled demo CNN) is imported,
   planned server-only and split (``passes/split_module.py``), so one side holds the whole
   training step: ``server_loss_adjoint`` (forward then backward) and ``server_update`` (SGD).
   Plus a sweep of single ops over shapes (matmul, conv2d, conv2d_transpose, elementwise,
   reductions, softmax, transpose), so the regressor sees sizes the models do not have.
2. Kernels. The module is legalized, fused and scheduled exactly as ``passes/build.py`` does
   for an ``llvm`` target (RewriteGrads and conv2d_transpose phases, ``LegalizeOps``,
   ``passes/schedules.py: default_cpu_schedule``; ``--target host`` is what ``splitc
   compile`` builds); every ``call_tir`` is one kernel launch. Its role comes from where it
   runs: in ``*_adjoint`` functions the forward ends at the first binding whose var is an
   ``*_adjoint`` (``relax.transform.Gradient`` emits the whole forward first), ``*_update``
   kernels are the optimizer.
3. Measurement (``cost_models/rpc.py``, ``sampling.py``): the kernels are built into one
   library, the whole step (``server_step`` + ``server_update``, through flat wrappers since
   RPC cannot pass nested tuples) compiled for the Relax VM, and both are timed together in
   rounds with ``time_evaluator`` (warm-up call, ``repeats`` timings of >= 1 ms spread over
   >= ``rounds`` rounds, more rounds until one ran on a quiet machine, the minimum recorded;
   ``recheck`` times tested workloads twice), so ``step ~ step_scale x sum(kernels) +
   call_overhead x calls`` can be fitted. Locally or on a board through TVM's RPC tracker (no
   authentication: trusted networks only, see ``cost_models/rpc.py``).
4. Dataset (``dataset.py``): JSON lines, one row per (workload, function, role, kernel) with
   its plain and schedule-aware features (``tir_features.py``), one ``ops`` row (the
   planner's OpFeatures) and one ``step`` row per model workload and a ``done`` row closing
   each workload, each with its provenance (target, mcpu, board key, TVM version, date,
   repeats, statistic, threads). Resumable: rows already in the file for the same target and
   board are not measured again; a ``done`` workload is not compiled. A killed run loses at
   most the workload it was timing.
5. Fit (``fit.py: fit_learned``): linear and per-family tree regressors in log space, on plain
   and on schedule-aware features, compared by leave-one-model-out error (fit on every other
   workload, the op sweep and ``synthetic`` random models included, test on a model never
   seen); the best plain one (op costs) and the best overall (kernels), by the share of
   kernels within +-10 %, are refitted on everything (labels: the fastest time of each
   identical kernel) and written, with the comparison against the roofline prior, the op-cost
   correction fitted on whole steps (``op_scale``, ``op_overhead``), the measured kernels'
   times (``twins``) and a digest of the rows (not the rows), into a ``DeviceProfile`` JSON
   (``"learned"`` key, ``provenance.status = "calibrated"``; ~0.6 MB for 2,540 kernels of 48
   workloads) that ``load_profile(path)`` and ``cost_model_for`` read.

Layering note: ``cost_models`` does not import ``passes`` at module level; building the
training step needs the frontend and SplitModule, so ``workloads.py: model_module`` and
``measure_workload`` import them inside the function (calibration is the one place where
measuring needs the compiler).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splitc import BuildError, InputError, SplitcError, __version__
from splitc.cost_models.dataset import (
    DATASET_VERSION,
    done_keys,
    load_rows,
    load_train_rows,
    now,
    row_key,
)
from splitc.cost_models.fit import _step_fit, fit_learned, heldout_report  # noqa: F401 - re-export
from splitc.cost_models.kernels import calls as _calls
from splitc.cost_models.kernels import features as _features
from splitc.cost_models.kernels import resolve as _target
from splitc.cost_models.kernels import scheduled as _schedule
from splitc.cost_models.kernels import vm_builtins as _vm_builtins
from splitc.cost_models.kernels import vm_specs as _vm_specs
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.sampling import Probe, time_rounds
from splitc.cost_models.workloads import Workload, model_module, sweep_module, synthetic_models

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
    # 30 timings of >= 1 ms each over the rounds, the minimum recorded (rpc.py: Timing,
    # sampling.py: time_rounds say why)
    repeats: int = 30
    rounds: int = 3  # each kernel and the step sampled in >= 3 rounds, in turn
    # more rounds (up to this) until one ran on a quiet machine (the probe within 5 % of its
    # best before and after); == rounds: no probe, exactly `rounds` rounds
    max_rounds: int = 8
    number: int = 1  # calls per timing, grown until one timing lasts min_repeat_ms
    min_repeat_ms: int = 1
    # time every kernel (and the step) of a tested (not training-only) workload a second time
    # after the whole workload: rows keep both passes ("seconds_first", "seconds_again": their
    # agreement is the noise floor of any fit) and record the smaller as "seconds"
    recheck: bool = False
    sweep: bool = True  # also time single ops over shapes
    # random small models (workloads.py: synthetic_models, needs torch) timed as training
    # data only; exported under the dataset's folder
    synthetic: int = 0
    # random models of realistic size (workloads.py: _SIZES["large"]), training data only
    synthetic_large: int = 0
    # random one-block models per kernel family (family_sweep.py), kernels only, training
    # data only: dense sampling of the families the test models' kernels fall into
    family_sweep: int = 0
    # JSON-lines datasets of earlier calibrations whose training-only rows (op sweep,
    # synthetic models, family blocks) join the fit without being timed again: a cached
    # sweep (dataset.load_train_rows; test models' rows are never taken)
    train_rows: tuple[Path, ...] = ()
    dataset: Path | None = None  # JSON lines; default: output with suffix .jsonl
    resume: bool = True
    name: str | None = None  # profile name; default: output file stem
    base_profile: str = "local-cpu"  # roofline constants kept in the profile (the fallback)
    # a `splitc tune` directory: kernels are timed with its knob records applied, as
    # `splitc compile --tuning-records` builds them; None: the default schedules
    tuning_records: Path | None = None
    progress: Callable[[str], None] | None = field(default=None, compare=False)

    @property
    def dataset_path(self) -> Path:
        return Path(self.dataset) if self.dataset else Path(self.output).with_suffix(".jsonl")


# timing budget per kernel over all rounds: 30 x 1 ms timings for the many microsecond
# kernels, >= 2 a round of the few slow ones (sampling.py: time_rounds)
_BUDGET_S = 0.06


def _schedules_label(cfg: CalibrateConfig) -> str:
    """What the timed kernels ran: the default schedules or a tuning directory's records."""
    return "default" if cfg.tuning_records is None else f"tuned ({cfg.tuning_records})"


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def measure_workload(w: Workload, runner, cfg: CalibrateConfig, done: set,
                     emit: Callable[[dict], None], say: Callable[[str], None],
                     probe: Probe | None = None) -> None:
    """Compile ``w`` as the build does, time its kernels (skipping keys in ``done``) and its
    whole step in rounds (``sampling.py: time_rounds``; ``probe``, shared by every workload
    of a calibration, decides when a round was quiet), and ``emit`` one row per kernel and
    one ``step`` row."""
    import tvm
    from splitc.cost_models.tir_features import schedule_features
    from splitc.passes.provenance import trace
    from tvm import tirx
    from tvm.s_tir.analysis import estimate_tir_flops

    target = _target(cfg.target)
    if target.kind.name != "llvm":
        raise InputError(f"Calibrate: target {cfg.target!r} is not a CPU (llvm) target; GPU "
                         "calibration is not implemented yet")
    if row_key(w.key, "done", "", "") in done:
        say(f"{w.key}: already measured")
        return
    t0 = time.perf_counter()
    with trace() as tr:
        sched = _schedule(w.module, target, cfg.tuning_records)
    calls = _calls(sched, w.weights)
    prims = {gv.name_hint: f for gv, f in sched.functions.items() if isinstance(f, tirx.PrimFunc)}
    groups: dict[tuple, list] = defaultdict(list)
    for c in calls:
        groups[(c.function, c.role, c.symbol, c.specs)].append(c)
    sites = _sites(tr, w, sched, groups, say)
    # threads: the TVM runtime's pool here (1 on this 2-vCPU box, or TVM_NUM_THREADS);
    # unknown on a board behind RPC. stat: which statistic of the timings "seconds" is.
    prov = {"train_only": w.train_only, "target": str(cfg.target),
            "mcpu": str(target.attrs.get("mcpu", "")), "board": runner.board,
            "tvm": _tvm_version(), "splitc": __version__,
            "repeats": cfg.repeats, "number": cfg.number, "min_repeat_ms": cfg.min_repeat_ms,
            "stat": "min", "threads": runner.threads, "schema": DATASET_VERSION,
            "rounds": cfg.rounds, "max_rounds": cfg.max_rounds,
            "schedules": _schedules_label(cfg)}
    todo = [(k, cs) for k, cs in groups.items() if row_key(w.key, *k[:3]) not in done]
    # training-only workloads are not tested on: their noise floor is not needed (half the
    # timing time of a calibration with 40 synthetic models)
    recheck = cfg.recheck and not w.train_only
    step = bool(w.step) and row_key(w.key, "step", "", "") not in done
    say(f"{w.key}: {len(groups)} kernels ({len(calls)} calls), {len(todo)} to measure")
    lib = vm = None
    if todo:
        syms = sorted({k[2] for k, _ in todo})
        lib = tvm.tirx.build(tvm.IRModule({s: prims[s].with_attr("global_symbol", s)
                                           for s in syms}), target=target)
        lib = runner.load(lib, f"k{abs(hash(w.key)) % 10**8}")
        say(f"{w.key}: scheduled and built in {time.perf_counter() - t0:.1f} s")
    specs = {}
    if step:
        # compiled before timing: the kernels and the step are sampled in the same rounds
        ex = tvm.compile(sched, target=target)
        vm_work = _vm_builtins(ex)
        vm = runner.vm(runner.load(ex, f"s{abs(hash(w.key)) % 10**8}"))
        specs = {f: _vm_specs(sched[f]) for f in w.step}
        say(f"{w.key}: step compiled ({time.perf_counter() - t0:.1f} s so far)")
    tcalls = [(k[2], list(k[3])) for k, _ in todo]
    if not tcalls and not specs:
        emit({"type": "done", "workload": w.key, "model": w.model, "date": now(), **prov})
        return

    def timed(label: str):
        t1 = time.perf_counter()
        ks, fs, info = time_rounds(runner, lib, tcalls, vm, specs, cfg.repeats, cfg.number,
                                   cfg.min_repeat_ms, _BUDGET_S, cfg.rounds, cfg.max_rounds,
                                   probe, lambda m: say(f"{w.key}: {label} {m}"))
        say(f"{w.key}: {label} {len(tcalls)} kernels and {len(specs)} VM functions in "
            f"{info['rounds']} rounds, {time.perf_counter() - t1:.1f} s")
        return ks, fs, info

    ts, fs, info = timed("timing")
    # again, after the whole first measurement: the noise floor of any fit
    ts2, fs2, _ = timed("re-timing") if recheck else ([None] * len(todo), None, None)
    rows = []
    for (((fname, role, sym, specs_), cs), t, t2) in zip(todo, ts, ts2):
        try:
            flops = float(estimate_tir_flops(tvm.IRModule({sym: prims[sym]})))
        except Exception:  # noqa: BLE001 - opaque extern calls have no FLOP estimate
            flops = 0.0
        sf = schedule_features(prims[sym], target)
        rows.append({"type": "kernel", "workload": w.key, "model": w.model,
                     "function": fname, "role": role, "symbol": sym, "calls": len(cs),
                     "features": _features(cs[0], flops, "T.parallel(" in prims[sym].script(),
                                           sf).to_json(),
                     "seconds": t.seconds, "median": t.median, "spread": t.spread,
                     "samples": t.repeats, "rounds_used": info["rounds"],
                     "quiet": info["quiet"], "date": now(), **prov})
        if (fname, role, sym, specs_) in sites:
            rows[-1]["sites"] = sites[(fname, role, sym, specs_)]
        if t2 is not None:
            rows[-1].update(seconds=min(t.seconds, t2.seconds), seconds_first=t.seconds,
                            seconds_again=t2.seconds, median_again=t2.median)
    for r in rows:
        emit(r)
    if w.ops and row_key(w.key, "ops", "", "") not in done:
        emit({"type": "ops", "workload": w.key, "model": w.model,
              "ops": [f.to_json() for f in w.ops], "date": now(), **prov})
    if step:
        n_calls = sum(1 for c in calls if c.function != "server_infer")
        first = sum(t.seconds for t in fs.values())
        row = {"type": "step", "workload": w.key, "model": w.model, "seconds": first,
               "median": sum(t.median for t in fs.values()),
               "functions": {k: t.seconds for k, t in fs.items()},
               "spread": max(t.spread for t in fs.values()), "n_calls": n_calls,
               # VM work around the kernels, every function but inference (kernels.py)
               "vm_builtins": sum(n for f, n in vm_work.items() if "infer" not in f),
               "rounds_used": info["rounds"], "quiet": info["quiet"],
               "probe": info["probe"], "date": now(), **prov}
        if recheck:
            again = sum(t.seconds for t in fs2.values())
            row.update(seconds=min(first, again), seconds_first=first, seconds_again=again)
        emit(row)
        say(f"{w.key}: step {row['seconds'] * 1e3:.3f} ms")
    emit({"type": "done", "workload": w.key, "model": w.model, "date": now(), **prov})


def _sites(tr, w: Workload, sched, groups: dict, say) -> dict:
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


# -- entry point -----------------------------------------------------------------------------
def calibrate(cfg: CalibrateConfig) -> Path:
    """Measure (resumably), fit, and write the calibrated profile to ``cfg.output``."""
    from splitc.cost_models.profiles import load_profile
    from splitc.cost_models.rpc import Runner

    say = cfg.progress or (lambda msg: None)
    if cfg.repeats < 1 or cfg.number < 1:
        raise InputError("Calibrate: --repeats and --number must be >= 1")
    if cfg.rounds < 1 or cfg.max_rounds < cfg.rounds:
        raise InputError(f"Calibrate: rounds {cfg.rounds} and max_rounds {cfg.max_rounds} "
                         "must satisfy 1 <= rounds <= max_rounds")
    models = tuple(Path(m) for m in (cfg.models or default_models()))
    for m in models:
        if not m.is_file():
            raise InputError(f"Calibrate: model {str(m)!r} does not exist; pass ONNX files")
    base = load_profile(cfg.base_profile)
    runner = Runner(_target(cfg.target), cfg.rpc_tracker, cfg.rpc_key)
    board = runner.board
    ds = cfg.dataset_path
    ds.parent.mkdir(parents=True, exist_ok=True)
    if not cfg.resume and ds.exists():
        ds.unlink()
    rows = load_rows(ds, cfg.target, board)
    # cached training rows: their workloads are not timed again (done), and join the fit
    extra = load_train_rows(cfg.train_rows, cfg.target, board,
                            {r["workload"] for r in rows})
    label = _schedules_label(cfg)
    other = [r for r in rows + extra if r.get("schedules", "default") != label]
    if other:
        raise InputError(
            f"Calibrate: {ds} holds {len(other)} rows timed with other schedules "
            f"({other[0].get('schedules', 'default')}, now {label}); pass another -o"
        )
    done = done_keys(rows + extra)
    say(f"dataset {ds}: {len(rows)} rows already measured on {board}, {len(extra)} training "
        "rows reused")
    fh = ds.open("a")

    def emit(row: dict) -> None:
        fh.write(json.dumps(row) + "\n")
        fh.flush()  # a killed run keeps every finished row: resume picks up from here
        rows.append(row)

    try:
        # one probe for the whole calibration: "quiet" is relative to its best reading
        probe = Probe(runner, _target(cfg.target)) if cfg.max_rounds > cfg.rounds else None
        workloads = [("sweep", None)] if cfg.sweep else []
        workloads += [(m, b) for m in models for b in (cfg.batch_sizes or (None,))]
        syn = synthetic_models(ds.parent / "synthetic", cfg.synthetic) if cfg.synthetic else []
        if cfg.synthetic_large:
            syn += synthetic_models(ds.parent / "synthetic", cfg.synthetic_large, size="large")
        workloads += [(m, "synthetic") for m in syn]
        if cfg.family_sweep:
            from splitc.cost_models.family_sweep import family_models

            workloads += [(m, "family") for m in family_models(ds.parent / "family",
                                                                 cfg.family_sweep)]
        for i, (m, b) in enumerate(workloads):
            say(f"workload {i + 1}/{len(workloads)}: {m if m == 'sweep' else Path(m).name}")
            try:
                w = (sweep_module() if m == "sweep" else model_module(m, None, True)
                     if b == "synthetic" else model_module(m, None, True, step=False)
                     if b == "family" else model_module(m, b))
                measure_workload(w, runner, cfg, done, emit, say, probe)
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
    learned = fit_learned(rows + extra, base)
    name = cfg.name or Path(cfg.output).stem
    acc = learned["accuracy"]
    best = learned["kernel_regressor_name"]
    notes = (f"{learned['dataset']['kernels']} kernels from {len(learned['dataset']['models'])} "
             f"workloads; held-out ({', '.join(acc.get('models', [])) or 'none'}): "
             + "; ".join(f"{k} {v['within_10pct']:.0%} within 10%, MAPE {v['mape_pct']:.1f}%"
                         for k, v in acc.items() if isinstance(v, dict) and "mape_pct" in v)
             + f"; chosen {best} (kernels), {learned['regressor_name']} (op costs). Roofline "
             f"constants from {base.name}.")
    prof = DeviceProfile(name, base.kind, dict(base.peak_flops), base.mem_bandwidth,
                         base.kernel_overhead,
                         {"status": "calibrated", "source": f"splitc calibrate on "
                          f"{board} ({cfg.target}), dataset {ds.name}",
                          "schedules": _schedules_label(cfg),
                          "date": now()[:10], "notes": notes}, learned)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # no indentation: the trees are long flat lists (one number a line would triple the size)
    out.write_text(json.dumps(prof.to_json(), separators=(",", ":")) + "\n")
    say(f"wrote {out}")
    return out
