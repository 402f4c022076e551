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
3. Measurement (``measure.py: measure_workload``, ``rpc.py``, ``sampling.py``): the kernels
   are built into one library, the whole step (``server_step`` + ``server_update``, through
   flat wrappers since RPC cannot pass nested tuples) compiled for the Relax VM, and both are
   timed together in rounds with ``time_evaluator`` (warm-up call, ``repeats`` timings of
   >= 1 ms spread over >= ``rounds`` rounds, more rounds until one ran on a quiet machine,
   the minimum recorded; ``recheck`` times tested workloads twice), so ``step ~ step_scale x
   sum(kernels) + call_overhead x calls`` can be fitted. Locally or on a board through TVM's
   RPC tracker (no authentication: trusted networks only, see ``cost_models/rpc.py``). Each
   workload in a fresh process (``fresh.py``) unless ``fresh_processes`` is False.
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
   kernels within +-10 %, are refitted on everything (labels: the median time of each
   identical kernel, ``lookup.py: twins``) and written, with the comparison against the
   roofline prior, the op-cost correction fitted on whole steps (``op_scale``,
   ``op_overhead``), the measured kernels' times (``twins``) and a digest of the rows (not
   the rows), into a ``DeviceProfile`` JSON (``"learned"`` key, ``provenance.status =
   "calibrated"``; ~0.6 MB for 2,540 kernels of 48 workloads) that ``load_profile(path)``
   and ``cost_model_for`` read.

Layering note: ``cost_models`` does not import ``passes`` at module level; building the
training step needs the frontend and SplitModule, so ``workloads.py: model_module`` and
``measure_workload`` import them inside the function (calibration is the one place where
measuring needs the compiler).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from splitc import BuildError, InputError, SplitcError
from splitc.cost_models.dataset import (
    DATASET_VERSION,
    done_keys,
    load_rows,
    load_train_rows,
    now,
    row_key,
)
from splitc.cost_models.fit import (  # noqa: F401 - re-export
    NOISY_REPEAT,
    _step_fit,
    fit_learned,
    heldout_report,
    noise_warning,
)
from splitc.cost_models.fresh import time_fresh
from splitc.cost_models.kernels import resolve as _target
from splitc.cost_models.measure import measure_workload, schedules_label
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.regressors import fit_jobs
from splitc.cost_models.sampling import Probe
from splitc.cost_models.workloads import model_module, sweep_module, synthetic_models

__all__ = [
    "DATASET_VERSION",
    "NOISY_REPEAT",
    "CalibrateConfig",
    "calibrate",
    "default_models",
    "fit_learned",
    "heldout_report",
    "load_rows",
    "measure_workload",
    "model_module",
    "noise_warning",
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
    # time each workload in a fresh Python process (fresh.py says why: a long-lived timing
    # process drifts slow); False: every workload in this one
    fresh_processes: bool = True
    # False: time and save the rows, no fit (a later run with the same output fits them: every
    # row is done by then); calibrate returns the dataset's path
    fit: bool = True
    # worker processes for the fit (``regressors.fit_jobs``; the timing is over by then);
    # None: one per CPU this process may run on
    jobs: int | None = None
    progress: Callable[[str], None] | None = field(default=None, compare=False)

    @property
    def dataset_path(self) -> Path:
        return Path(self.dataset) if self.dataset else Path(self.output).with_suffix(".jsonl")


def build_workload(m, b):
    """The workload ``(m, b)`` of a calibration: the op sweep (``m == "sweep"``), a synthetic
    or family model (``b``), or a model at batch ``b`` (None: its own)."""
    if m == "sweep":
        return sweep_module()
    if b == "synthetic":
        return model_module(m, None, True)
    if b == "family":
        return model_module(m, None, True, step=False)
    return model_module(m, b)


def failed_message(m, error: str, b=None) -> str:
    """What ``calibrate`` says when the training step of workload ``(m, b)`` does not build:
    a user's model can be left out; a generated one (the op sweep, a synthetic or family
    model) is splitc's to fix."""
    lines = [ln for ln in error.splitlines() if ln.strip()] or ["error"]
    hint = ("this generated training model should build: please report it"
            if m == "sweep" or b in ("synthetic", "family") else
            "leave this model out of --models")
    return f"Calibrate: compiling the training step of {m} failed ({lines[-1][:160]}); {hint}"


# -- entry point -----------------------------------------------------------------------------
def calibrate(cfg: CalibrateConfig) -> Path:
    """Measure (resumably), fit, and write the calibrated profile to ``cfg.output``; returns
    its path (the dataset's with ``cfg.fit`` False: timed, not fitted)."""
    from splitc.cost_models.profiles import load_profile
    from splitc.cost_models.rpc import Runner

    say = cfg.progress or (lambda msg: None)
    if cfg.repeats < 1 or cfg.number < 1:
        raise InputError("Calibrate: --repeats and --number must be >= 1")
    if cfg.rounds < 1 or cfg.max_rounds < cfg.rounds:
        raise InputError(f"Calibrate: rounds {cfg.rounds} and max_rounds {cfg.max_rounds} "
                         "must satisfy 1 <= rounds <= max_rounds")
    if cfg.jobs is not None and cfg.jobs < 1:  # now, not after the timing
        raise InputError(f"Calibrate: --jobs must be >= 1, got {cfg.jobs}")
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
    label = schedules_label(cfg)
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
        # one probe for the whole calibration: "quiet" is relative to its best reading (the
        # fresh processes carry it from one to the next)
        probe = (Probe(runner, _target(cfg.target))
                 if cfg.max_rounds > cfg.rounds and not cfg.fresh_processes else None)
        probe_best: dict[str, float] = {}
        if cfg.fresh_processes:  # each child opens its own runner: a board behind RPC serves
            runner.close()  # one session at a time
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
                w = build_workload(m, b)
                if not cfg.fresh_processes:
                    measure_workload(w, runner, cfg, done, emit, say, probe)
            except SplitcError:
                raise
            except Exception as e:  # noqa: BLE001 - TVM's legalizer raises AssertionError...
                raise BuildError(failed_message(m, str(e), b)) from None
            if cfg.fresh_processes:
                if row_key(w.key, "done", "", "") in done:
                    say(f"{w.key}: already measured")
                else:
                    probe_best = time_fresh(cfg, (m, b), probe_best, say)
        if cfg.fresh_processes:  # what the children wrote
            rows = load_rows(ds, cfg.target, board)
    finally:
        fh.close()
        runner.close()
    if not cfg.fit:
        say(f"timed; {len(rows)} rows in {ds}, not fitted")
        return ds
    with fit_jobs(cfg.jobs) as jobs:
        say(f"fitting the cost model ({jobs} job{'s' if jobs > 1 else ''})")
        learned = fit_learned(rows + extra, base, progress=say)
    name = cfg.name or Path(cfg.output).stem
    acc = learned["accuracy"]
    best = learned["kernel_regressor_name"]
    notes = (f"{learned['dataset']['kernels']} kernels from {len(learned['dataset']['models'])} "
             f"workloads; held-out ({', '.join(acc.get('models', [])) or 'none'}): "
             + "; ".join(f"{k} {v['within_10pct']:.2%} within 10%, MAPE {v['mape_pct']:.1f}%"
                         for k, v in acc.items() if isinstance(v, dict) and "mape_pct" in v)
             + f"; chosen {best} (kernels), {learned['regressor_name']} (op costs). Roofline "
             f"constants from {base.name}.")
    if warn := noise_warning(acc):
        say(f"warning: {warn}")
        notes += f" Warning: {warn}."
    prof = DeviceProfile(name, base.kind, dict(base.peak_flops), base.mem_bandwidth,
                         base.kernel_overhead,
                         {"status": "calibrated", "source": f"splitc calibrate on "
                          f"{board} ({cfg.target}), dataset {ds.name}",
                          "schedules": schedules_label(cfg),
                          "date": now()[:10], "notes": notes}, learned)
    out = Path(cfg.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    # no indentation: the trees are long flat lists (one number a line would triple the size)
    out.write_text(json.dumps(prof.to_json(), separators=(",", ":")) + "\n")
    say(f"wrote {out}")
    return out
