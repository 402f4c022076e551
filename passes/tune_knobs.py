"""Knob tuning: search the default CPU schedules' tile choices per kernel, keep what is faster.

``splitc tune --strategy knobs`` (the default on ``llvm`` targets) runs this instead of
MetaSchedule. The default rules (``passes/schedule_rules.py``, ``schedule_tiling.py``) pick
one register tile per conv/matmul by heuristics; ``schedule_tiling.tile_candidates`` lists a
handful of alternatives (tile rows x vectors, reduction blocking, packing). For the kernels
that take most of a half's step time this module builds and times every alternative and
records the fastest, when it beats the heuristic by more than ``_MIN_GAIN`` in an
interleaved re-timing (so noise on a shared machine cannot pick a slower schedule):

1. lower the half exactly as ``build_side`` does (``build.lower_side``) and count how often
   the training functions (``*_forward``, ``*_backward``, ``*_step``, ``*_update``) call each
   kernel;
2. time every kernel once with the default schedules; rank by calls x time; keep the top
   ``max_kernels`` that own a register tile;
3. per kernel, time each candidate; re-time the best against the default, alternating;
4. write ``knobs.json`` in the output directory (atomically, after every kernel: an
   interrupted run keeps what it measured and a re-run skips tuned kernels).

Records are keyed by the structural hash of the unscheduled kernel, so a later
``splitc compile --tuning-records DIR`` (``knob_lookup``) finds them whatever the kernel's
name, and kernels it does not hold keep the heuristics. A MetaSchedule search costs ~5 s a
trial here (a worker process per build); a knob trial is one in-process build of one
kernel, ~0.2-1 s.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import tvm
from splitc import InputError

__all__ = ["KNOBS_FILE", "KnobRecord", "knob_lookup", "load_knobs", "tune_side_knobs"]

KNOBS_FILE = "knobs.json"
_SCHEMA = 1
_MIN_GAIN = 0.03  # a candidate must beat the heuristic tile by 3% (interleaved medians)
_TRAINING_SUFFIXES = ("_forward", "_backward", "_step", "_update")


@dataclass(frozen=True)
class KnobRecord:
    kernel: str  # name when tuned (informational: lookups go by structure)
    side: str
    knobs: dict | None  # TileKnobs fields; None: the heuristic tile won
    seconds: float  # best measured time per call
    default_seconds: float  # the heuristic tile's time per call (same interleaved run)
    candidates: int  # alternatives timed


def _shash(func) -> str:
    from splitc.passes.compat import structural_hash

    return f"{structural_hash(func) & 0xFFFFFFFFFFFFFFFF:016x}"


def load_knobs(directory: str | os.PathLike) -> dict[str, dict]:
    """{structural hash: record dict} of ``directory/knobs.json`` ({} when absent)."""
    path = Path(directory) / KNOBS_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
        if data.get("schema") != _SCHEMA:
            raise ValueError(f"schema {data.get('schema')!r}, expected {_SCHEMA}")
        return dict(data["records"])
    except (ValueError, KeyError, TypeError) as e:
        from splitc import BuildError

        raise BuildError(
            f"Build: {path} is not a splitc knob database ({e}); re-run splitc tune -o "
            f"{Path(directory)}"
        ) from None


def _save(directory: Path, records: dict[str, dict], target: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    data = {"schema": _SCHEMA, "target": target, "records": records}
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".knobs-", suffix=".json")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
    os.replace(tmp, directory / KNOBS_FILE)


def knob_lookup(directory: str | os.PathLike) -> Callable | None:
    """The ``tile_knobs`` callable ``default_cpu_schedule`` takes, from a knob database; None
    when the directory holds no knob records."""
    records = load_knobs(directory)
    if not records:
        return None
    from splitc.passes.schedule_tiling import TileKnobs

    def lookup(name: str, func):  # records are keyed by structure: the name is unused
        rec = records.get(_shash(func))
        if rec is None or rec.get("knobs") is None:
            return None
        return TileKnobs(**rec["knobs"])

    return lookup


# ------------------------------------------------------------------------------- tuning
def _call_counts(mod: tvm.IRModule, functions: Callable[[str], bool] | None) -> dict[str, int]:
    """Calls of each kernel from the training functions of a lowered side module (or from the
    Relax functions ``functions(name)`` accepts)."""
    keep = functions or (lambda name: name.endswith(_TRAINING_SUFFIXES))
    counts: dict[str, int] = {}
    call_tir = tvm.ir.Op.get("relax.call_tir")

    def visit(e):
        if isinstance(e, tvm.relax.Call) and e.op.same_as(call_tir):
            gv = e.args[0]
            counts[gv.name_hint] = counts.get(gv.name_hint, 0) + 1

    for gv, f in mod.functions.items():
        if isinstance(f, tvm.relax.Function) and keep(gv.name_hint):
            tvm.relax.analysis.post_order_visit(f.body, visit)
    return counts


def _arg_specs(func) -> list | None:
    """[(shape, dtype)] of the kernel's buffer arguments; None for a symbolic shape."""
    from tvm.s_tir.meta_schedule.arg_info import ArgInfo

    specs = []
    for info in ArgInfo.from_prim_func(func):
        kind, dtype, shape = info.as_json()
        if kind != "TENSOR" or not all(isinstance(d, int) for d in shape):
            return None  # symbolic shape: nothing to time
        specs.append(([int(d) for d in shape], str(dtype)))
    return specs


def _tile_candidates(func, target) -> list:
    """The alternatives ``tile_candidates`` lists for the kernel's register-tiled block(s)
    (the heuristic first); [] when no block gets a register tile."""
    from splitc.passes import schedule_rules as R
    from splitc.passes import schedule_tiling as T

    sch = tvm.s_tir.Schedule(func)
    R._inline_injective(sch)
    for rv in sch.get_child_blocks(sch.get_sblock("root")):
        info = T._block_facts(sch, rv)
        if info is None or info.injective or len(info.writes) != 1 or not info.has_init:
            continue
        lanes = R.lanes_for(target, R._dtype_bits(sch.get(rv)))
        cands = list(T.tile_candidates(info, lanes))  # register tile or its rfactor block
        if cands:
            return cands
    return []


class _Timer:
    """Builds one kernel with given knobs and times it (locally or through a TVM RPC runner)."""

    def __init__(self, target, runner, repeats: int):
        self.target, self.runner, self.repeats = target, runner, repeats

    def build(self, func, knobs):
        from splitc.passes.schedule_rules import schedule_prim_func

        sched, problems = schedule_prim_func(func, self.target, knobs=knobs)
        if problems and knobs is not None:
            raise ValueError("; ".join(problems))
        mod = tvm.IRModule({"k": sched.with_attr("global_symbol", "k")})
        return self.runner.load(tvm.tirx.build(mod, target=self.target), "k")

    def time(self, lib, specs, number: int) -> float:
        t = self.runner.time_kernels(lib, [("k", specs)], self.repeats, number)[0]
        return float(t.median)


def _number_for(seconds: float) -> int:
    # >= ~2 ms a timing: short kernels are otherwise dominated by timer and cache noise
    return max(1, min(1000, int(0.002 / max(seconds, 1e-7))))


def tune_side_knobs(
    side: str,
    low: tvm.IRModule,
    target: tvm.target.Target,
    runner,
    output: Path,
    *,
    max_kernels: int = 12,
    trials: int = 1000,
    repeats: int = 5,
    say: Callable[[str], None] = lambda m: None,
    functions: Callable[[str], bool] | None = None,
) -> list[KnobRecord]:
    """Tune the tile knobs of ``side``'s heaviest kernels (module docstring); returns the
    records written in this run (already-tuned kernels are skipped)."""
    if target.kind.name != "llvm":
        raise InputError(
            f"Tune: --strategy knobs tunes llvm targets only, got {target.kind.name}; "
            "use --strategy metaschedule"
        )
    records = load_knobs(output)
    timer = _Timer(target, runner, repeats)
    counts = _call_counts(low, functions)
    kernels = []
    for gv, f in low.functions.items():
        if isinstance(f, tvm.tirx.PrimFunc) and counts.get(gv.name_hint):
            specs = _arg_specs(f)
            if specs is not None:
                kernels.append((gv.name_hint, f, specs))
    say(f"{side}: timing {len(kernels)} kernels with the default schedules")
    ranked = []
    for name, f, specs in kernels:
        try:
            cands = _tile_candidates(f, target)
        except Exception:  # noqa: BLE001 - a kernel the rules cannot read has no knobs
            cands = []
        if len(cands) < 2:
            continue
        lib = timer.build(f, None)
        t = timer.time(lib, specs, 1)
        ranked.append((counts[name] * t, name, f, specs, cands, lib))
    ranked.sort(key=lambda r: -r[0])
    total = sum(r[0] for r in ranked) or 1.0
    out: list[KnobRecord] = []
    spent = 0
    for share, name, f, specs, cands, base_lib in ranked[:max_kernels]:
        key = _shash(f)
        if key in records:
            say(f"{side}: {name}: already tuned")
            continue
        if spent >= trials:
            say(f"{side}: trial budget {trials} spent")
            break
        t0 = time.perf_counter()
        number = _number_for(timer.time(base_lib, specs, 1))  # the ranking's build, re-timed
        best, best_t, best_lib = None, timer.time(base_lib, specs, number), base_lib
        tried = 0
        for knobs in cands[1:]:
            if spent >= trials:
                break
            spent += 1
            tried += 1
            try:
                lib = timer.build(f, knobs)
                t = timer.time(lib, specs, number)
            except Exception:  # noqa: BLE001, S112 - a candidate a block cannot take: skip it
                continue
            if t < best_t:
                best, best_t, best_lib = knobs, t, lib
        default_t = best_t if best is None else None
        if best is not None:
            # interleaved re-timing, 3 rounds: the winner must beat the heuristic tile clearly
            a, b = [], []
            for _ in range(3):
                a.append(timer.time(base_lib, specs, number))
                b.append(timer.time(best_lib, specs, number))
            default_t, best_t = statistics.median(a), statistics.median(b)
            if best_t > default_t * (1 - _MIN_GAIN):
                best, best_t = None, default_t
        rec = KnobRecord(
            name,
            side,
            dataclasses.asdict(best) if best is not None else None,
            best_t,
            default_t,
            tried,
        )
        records[key] = dataclasses.asdict(rec)
        _save(output, records, str(target))
        out.append(rec)
        gain = default_t / best_t if best_t > 0 else 1.0
        say(
            f"{side}: {name} ({share / total:.0%} of the tunable kernels' time): "
            f"{tried} candidates, "
            f"{default_t * 1e3:.2f} -> {best_t * 1e3:.2f} ms ({gain:.2f}x) "
            f"in {time.perf_counter() - t0:.0f} s"
        )
    return out
