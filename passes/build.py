"""Build: targets per side by name, compile each half, export its library.

Runs after ``passes/split_module.py`` (functions ``device_*`` / ``server_*``); before
``passes/package.py`` (which writes split.tar).

Targets come from ``resolve_target`` (``passes/targets.py``, re-exported here; the accepted
forms and the Jetson Orin host fix are listed there). An aarch64 host needs a cross compiler (``aarch64-linux-gnu-gcc`` by default) to link the library. CUDA code
is compiled at build time with nvcc (``TVM_CUDA_COMPILE_MODE=nvcc``, a fatbin for the tag's
``arch``), so a board never JIT-compiles; the CUDA version used is recorded for JetPack.
GPU functions get ``passes/build_gpu.py``'s pipeline (dlight's Matmul, GEMV, Reduction,
GeneralReduction and Fallback rules, kernel by kernel); CPU functions get
``passes/schedules.py: default_cpu_schedule``.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from contextlib import contextmanager
from dataclasses import dataclass

import tvm
from splitc import BuildError
from splitc.passes.build_gpu import FatbinPacker, gpu_pipeline
from splitc.passes.targets import _export, _is_aarch64, _is_gpu, resolve_target
from tvm import relax

__all__ = [
    "BuiltSide",
    "build_side",
    "cuda_version",
    "lower_side",
    "resolve_target",
    "rewrite_for_cpu",
    "side_module",
]


def cuda_version() -> str | None:
    """``"13.0"`` for the nvcc on PATH (or under /usr/local/cuda), None without CUDA."""
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc is None:
        return None
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=False).stdout
    m = re.search(r"release (\d+\.\d+)", out)
    return m.group(1) if m else None


@contextmanager
def _env(**kv):
    old = {k: os.environ.get(k) for k in kv}
    os.environ.update(kv)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def side_module(mod: tvm.IRModule, side: str) -> tvm.IRModule:
    """The functions of one side (``device_*`` or ``server_*``), GlobalVars kept."""
    keep = {gv: f for gv, f in mod.functions.items() if gv.name_hint.startswith(side + "_")}
    if not keep:
        raise BuildError(f"Build: the module has no {side}_* functions; run SplitModule first")
    return tvm.IRModule(keep)


@dataclass(frozen=True)
class BuiltSide:
    side: str
    target: dict  # Target.export(), JSON-able
    library: str  # path of the exported .so
    seconds: float
    cuda: str | None  # CUDA version the GPU code was compiled with
    cross_compiler: str | None
    # kernel (PrimFunc) names scheduled from the tuning records / by the default rules;
    # both empty when no tuning records were given (every kernel then has a default schedule)
    tuned: tuple[str, ...] = ()
    default: tuple[str, ...] = ()
    # kernels a schedule rule could not handle: built correct but slower (KernelFallback)
    fallbacks: tuple = ()


def _cpu_schedule(
    mod: tvm.IRModule, target: tvm.target.Target, tile_knobs=None, on_fallback=None
) -> tvm.IRModule:
    from splitc.passes.schedules import default_cpu_schedule

    return default_cpu_schedule(mod, target, on_fallback, tile_knobs=tile_knobs)


def build_side(
    mod: tvm.IRModule,
    side: str,
    target: str | tvm.target.Target,
    out_path: str,
    cross_compiler: str | None = None,
    tuning_records: str | os.PathLike | None = None,
) -> BuiltSide:
    """Compile ``side``'s functions of ``mod`` for ``target`` and export ``out_path`` (.so).

    ``tuning_records``: a ``splitc tune -o DB`` directory: MetaSchedule's JSON database (its
    best schedule is applied to every kernel it holds) and/or ``knobs.json`` (the tile choices
    of the default schedules, per kernel); other kernels get the default schedules.
    """
    tgt = resolve_target(target) if isinstance(target, str) else target
    sub = side_module(mod, side)
    fcompile, cc = None, None
    if _is_aarch64(tgt) and os.uname().machine != "aarch64":
        # --cross-compiler applies to the aarch64 side(s); an x86 server links natively
        cc = cross_compiler or "aarch64-linux-gnu-gcc"
        if shutil.which(cc) is None:
            raise BuildError(
                f"Build: cross compiler {cc!r} not found for the aarch64 {side} "
                "target; apt-get install g++-aarch64-linux-gnu or pass "
                "--cross-compiler"
            )
        from tvm.support import cc as tcc

        fcompile = tcc.cross_compiler(cc)
    gpu = _is_gpu(tgt)
    cuda = cuda_version() if tgt.kind.name == "cuda" else None
    if tgt.kind.name == "cuda" and cuda is None:
        raise BuildError(
            f"Build: {side} target {tgt.kind.name} needs nvcc (CUDA toolkit) to "
            "compile kernels; install CUDA or use an llvm target"
        )
    t0 = time.perf_counter()
    tuned: tuple[str, ...] = ()
    default: tuple[str, ...] = ()
    fallbacks: list = []  # KernelFallback of every kernel a schedule rule could not handle
    try:
        with _env(TVM_CUDA_COMPILE_MODE="nvcc"), tgt:
            knobs, knob_tuned = None, []
            if tuning_records is not None:
                from splitc.passes.tune import apply_records, has_metaschedule_records
                from splitc.passes.tune_knobs import KNOBS_FILE, knob_lookup

                lookup = knob_lookup(tuning_records) if not gpu else None
                if lookup is not None:

                    def knobs(name, func, _lookup=lookup):
                        k = _lookup(name, func)
                        if k is not None:
                            knob_tuned.append(name)
                        return k

                # knob records are for llvm sides; a directory with neither kind of record
                # is refused by apply_records with a clear error
                if has_metaschedule_records(tuning_records) or not os.path.exists(
                    os.path.join(tuning_records, KNOBS_FILE)
                ):
                    sub, tuned, default = apply_records(lower_side(sub, tgt), tgt, tuning_records)
            if gpu:
                pipeline = gpu_pipeline(tgt, fallbacks.append)
                ex = tvm.compile(sub, target=tgt, relax_pipeline=pipeline)
            else:
                # RewriteGrads works on relax.matmul: before legalization (a no-op after
                # apply_records, whose lower_side already ran it)
                sub = relax.transform.LegalizeOps()(rewrite_for_cpu(sub))
                sub = _cpu_schedule(sub, tgt, knobs, fallbacks.append)
                if knobs is not None:
                    names = [
                        gv.name_hint
                        for gv, f in sub.functions.items()
                        if isinstance(f, tvm.tirx.PrimFunc)
                    ]
                    tuned = tuple(sorted(set(tuned) | set(knob_tuned)))
                    default = tuple(sorted(n for n in names if n not in tuned))
                ex = tvm.compile(sub, target=tgt)
            pack = None
            if tgt.kind.name == "cuda":
                pack = FatbinPacker(str(tgt.attrs["arch"]))
            ex.export_library(out_path, fcompile=fcompile, fpack_imports=pack)
    except BuildError:
        raise
    except Exception as e:  # noqa: BLE001 - compiler errors come as many TVM types
        raise BuildError(
            f"Build: compiling the {side} half for {tgt.kind.name} failed "
            f"({_why(e)}); check the target and toolchain"
        ) from None
    secs = time.perf_counter() - t0
    return BuiltSide(side, _export(tgt), out_path, secs, cuda, cc, tuned, default, tuple(fallbacks))


def lower_side(sub: tvm.IRModule, target: tvm.target.Target) -> tvm.IRModule:
    """Legalized and fused kernels of a side module, exactly as ``build_side`` schedules them
    (``splitc tune`` extracts its tasks from this, so tuning records match the build)."""
    from splitc.passes.schedules import lower_for_schedule

    if target.kind.name == "llvm":
        sub = rewrite_for_cpu(sub)
    with target:
        return lower_for_schedule(relax.transform.LegalizeOps()(sub), target)


def rewrite_for_cpu(sub: tvm.IRModule) -> tvm.IRModule:
    """``passes/rewrite_grads.py`` (one kernel per training matmul),
    ``passes/conv_transpose_phases.py`` (strided data gradients without zero MACs) and
    ``passes/conv_weight_grads.py`` (weight gradients without the excess window) and
    ``passes/pointwise_convs.py`` (1x1 convs as GEMMs over all pixels) and
    ``passes/max_pool_grads.py``; llvm builds only: the GPU build keeps the ops dlight's rules
    recognise."""
    from splitc.passes.schedules import cpu_graph_rewrites

    return cpu_graph_rewrites(sub)


def _why(e: Exception) -> str:
    """The informative line of a TVM error (its message is a long trace + IR dump)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    for ln in lines:
        if re.match(r"^[A-Za-z.]*(Error|Exception)\b|^Check failed|error:", ln):
            return ln[:200]
    lines = [ln for ln in lines if not ln.startswith("(...")]
    return (lines[0] if lines else type(e).__name__)[:200]
