"""Default CPU schedules: parallel + vectorised kernels for every function of a training step.

Plain ``tvm.compile(mod, "llvm")`` lowers each Relax op to naive single-threaded TIR loops.
Measured on the 2-core AVX-512 dev box, the training step of a small ResNet (3 residual
blocks, batch 32) takes 5.1 s that way, 95 % of it in convolutions: forward convs, the
``conv2d_transpose`` of the data gradient and the ``CNHW`` conv2d of the weight gradient.
``default_cpu_schedule`` first folds the transposes and batch sums around matmuls into the
matmul kernels (``passes/rewrite_grads.py``), then schedules every PrimFunc of the legalized,
fused module, after replacing libm's scalar ``exp``/``erf`` by vectorisable polynomials
(``passes/fast_math.py``), with the rules of ``passes/schedule_rules.py``, per root block:

- *inline*: injective blocks that only feed injective blocks (epilogues such as
  ``add -> less -> where``) are inlined; pads feeding a reduction stay materialised so the
  reduction's loads are unconditional vector loads;
- *register tiling* for reductions whose output's innermost axis is read by an input with
  stride 1 or 2 (conv2d NCHW forward, conv2d_transpose, matmul, batch matmul):
  ``parallel(outer spatial) -> reductions -> unroll(rows) -> vectorise(lanes)`` with a
  register-resident accumulator (``cache_write`` to ``local``); rows are an axis the costliest
  load does not depend on, and a second row axis is blocked when both operands are vectors;
- *rfactor tiling* for reductions whose output is tiny but whose reduction axis is read
  contiguously (weight-gradient convs: output 3x3, reduction over batch x 16 x 16; row sums):
  split that axis by the vector width, ``rfactor`` it and register-tile the factored block;
- *transpose*: an injective block whose output's contiguous axis is no input's contiguous axis
  gets 16 x 8 tiles (input's contiguous axis unrolled x output lanes vectorised);
- *injective*: vectorise the innermost loop alone, parallelise the fused outer loops;
- *fallback*: any other reduction gets its spatial loops fused and parallelised; blocks under
  4096 iterations are left as they are.

A rule that raises is undone (the block's schedule state is restored), the block gets the
generic parallel fallback, and the kernel is reported through ``on_fallback`` as a
:class:`KernelFallback`; the build never fails because of a schedule.

Where it runs: on a Relax module right before ``tvm.compile`` (after Gradient, SplitModule
and the training decompositions). It legalizes and fuses the module itself (the backend's
``library_dispatch_passes`` and ``legalize_passes``, no-ops on what is already lowered),
schedules the kernels and marks them ``tirx.is_scheduled`` and opaque (``op_pattern`` 8), so
the second legalization and fusion inside ``tvm.compile`` leave them alone::

    mod = default_cpu_schedule(mod, target, on_fallback=report.append)
    ex = tvm.compile(mod, target)

The target matters as much as the schedule: a bare ``"llvm"`` target compiles for generic
x86-64 (SSE2); ``host_llvm_target()`` names this CPU (3.6x faster matmul tiles here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import tvm
from splitc import BuildError
from splitc.passes.conv_transpose_phases import legalize_strided_conv_transposes
from splitc.passes.conv_weight_grads import legalize_conv_weight_grads
from splitc.passes.fast_math import vector_math
from splitc.passes.max_pool_grads import legalize_max_pool_grads
from splitc.passes.pointwise_convs import legalize_pointwise_convs
from splitc.passes.rewrite_grads import rewrite_grads
from splitc.passes.schedule_rules import _first_line, schedule_prim_func
from tvm import tirx
from tvm.ir import IRModule

# TVM 0.27 (dlight, MetaSchedule) marks scheduled kernels "tirx.is_scheduled"; older code and
# some passes still say "tir.is_scheduled": either means hands off.
_SCHEDULED_ATTRS = ("tirx.is_scheduled", "tir.is_scheduled")

__all__ = [
    "DefaultCPUSchedule",
    "KernelFallback",
    "cpu_graph_rewrites",
    "default_cpu_schedule",
    "default_schedule",
    "host_llvm_target",
    "lower_for_schedule",
    "schedule_prim_func",
]


@dataclass(frozen=True)
class KernelFallback:
    """A kernel that the rules did not schedule fully; it is still built, correct but slower.

    ``rule`` is ``"partial"`` when some of its blocks kept their naive loops or got only the
    generic parallel fallback, ``"none"`` when the whole kernel is left unscheduled;
    ``reason`` lists ``"<block>: <first line of the error>"`` separated by ``"; "``.
    """

    kernel: str
    rule: str
    reason: str


def host_llvm_target() -> tvm.target.Target:
    """``llvm`` for this machine's CPU (``mcpu`` from LLVM's host detection).

    Bare ``"llvm"`` compiles for generic x86-64 (SSE2): on the AVX-512 dev box a scheduled
    matmul (16x64x256 @ 256x1024) takes 79 ms that way, 38 ms with ``x86-64-v3`` (AVX2) and
    22 ms with the host's ``znver4``. ``mcpu=native`` is rejected by TVM 0.27's LLVM.
    """
    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})


def lower_for_schedule(mod: IRModule, target: tvm.target.Target) -> IRModule:
    """The CPU/GPU backend's dispatch + legalize + fuse passes (what tvm.compile runs first)."""
    from tvm.relax import pipeline as relax_pipeline

    with target:
        seq = tvm.transform.Sequential(
            relax_pipeline.library_dispatch_passes(target) + relax_pipeline.legalize_passes(target)
        )
        return seq(mod)


def cpu_graph_rewrites(
    mod: IRModule, *, rewrite_matmuls: bool = True, conv_kernels: bool = True
) -> IRModule:
    """The Relax-level rewrites of llvm builds, before ``LegalizeOps`` (``default_cpu_schedule``
    and ``build.rewrite_for_cpu`` both run exactly this): ``rewrite_grads``, then
    ``pointwise_convs`` (first: ``legalize_strided_conv_transposes`` legalizes every
    ``conv2d_transpose``), ``conv_weight_grads``, ``conv_transpose_phases`` and
    ``max_pool_grads``. The GPU build runs none of them: dlight's rules expect the plain ops."""
    if rewrite_matmuls:
        mod = rewrite_grads(mod)[0]
    if conv_kernels:
        mod = legalize_conv_weight_grads(legalize_pointwise_convs(mod))
    mod = legalize_strided_conv_transposes(mod)
    if conv_kernels:
        mod = legalize_max_pool_grads(mod)
    return mod


def default_cpu_schedule(
    mod: IRModule,
    target,
    on_fallback: Callable[[KernelFallback], None] | None = None,
    *,
    tile_knobs: Callable[[str, tirx.PrimFunc], object | None] | None = None,
    rewrite_matmuls: bool = True,
    fast_math: bool = True,
    conv_kernels: bool = True,
) -> IRModule:
    """Rewrite matmul gradients, legalize, fuse and schedule every kernel for an ``llvm`` target.

    Run it on the Relax module right before ``tvm.compile(mod, target)`` (after Gradient and
    SplitModule). ``on_fallback`` is called once per kernel that a rule could not schedule
    fully; the kernel is still built, correct but slower. Kernels already marked
    ``tirx.is_scheduled`` (tuned by MetaSchedule) are kept as they are. ``tile_knobs(kernel
    name, prim_func)`` returns the tile choice (``schedule_tiling.TileKnobs``) for a kernel's
    register-tiled blocks, or None for the heuristics (a tuner's hook; None: heuristics
    everywhere). ``rewrite_grads`` runs first (``rewrite_matmuls=False``: not at all); on a
    module that is already legalized it finds no ``relax.matmul`` and changes nothing.
    Strided ``conv2d_transpose`` calls (data gradients of strided convs) are legalized as
    dense phase convolutions (``passes/conv_transpose_phases.py``) and conv weight gradients
    as direct channels-last kernels (``passes/conv_weight_grads.py``) and 1x1 convs as GEMMs
    over all pixels of the batch (``passes/pointwise_convs.py``), max-pools and their
    gradients as phase-split stages scheduled per image plane (``passes/max_pool_grads.py``)
    before the rest
    (``conv_kernels=False``: the last three not, for before/after measurements).
    ``fast_math=False`` keeps libm's ``expf``/``erff`` (exact to 1 ulp, scalar) instead of the
    polynomials of ``passes/fast_math.py`` (``exp``: 8e-8 relative, ``erf``: 4e-7 absolute).
    """
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if target.kind.name != "llvm":
        raise BuildError(
            f"Schedules: default_cpu_schedule needs an llvm target, got "
            f"{target.kind.name}; call default_schedule for GPU targets"
        )
    mod = cpu_graph_rewrites(mod, rewrite_matmuls=rewrite_matmuls, conv_kernels=conv_kernels)
    mod = lower_for_schedule(mod, target)
    updates = {}
    for gv, func in mod.functions.items():
        if not isinstance(func, tirx.PrimFunc):
            continue
        if func.attrs is not None and any(
            k in func.attrs and bool(func.attrs[k]) for k in _SCHEDULED_ATTRS
        ):
            continue  # tuned (MetaSchedule) or scheduled by dlight: keep it
        rule = "partial"
        try:
            if fast_math:  # libm's scalar expf/erff -> vectorisable polynomials
                func = vector_math(func)
            knobs = tile_knobs(gv.name_hint, func) if tile_knobs is not None else None
            new_func, problems = schedule_prim_func(func, target, knobs)
        except Exception as exc:  # noqa: BLE001 - never crash the build
            new_func, problems, rule = func, [f"schedule: {_first_line(exc)}"], "none"
        if problems and on_fallback is not None:
            on_fallback(KernelFallback(gv.name_hint, rule, "; ".join(problems)))
        # op_pattern 8 (kOpaque): FuseOps inside tvm.compile must not fuse a scheduled
        # kernel again (FuseTIR would rebuild it from the scheduled loops).
        updates[gv] = new_func.with_attr("tirx.is_scheduled", True).with_attr("op_pattern", 8)
    for gv, func in updates.items():
        mod[gv] = func
    return mod


def default_schedule(
    mod: IRModule, target, on_fallback: Callable[[KernelFallback], None] | None = None
) -> IRModule:
    """Dispatch on the target kind: llvm -> default_cpu_schedule; GPU kinds -> dlight's GPU
    rules after legalization; anything else unchanged."""
    target = tvm.target.Target(target) if not isinstance(target, tvm.target.Target) else target
    if target.kind.name == "llvm":
        return default_cpu_schedule(mod, target, on_fallback)
    if target.kind.name in ("cuda", "rocm", "metal", "vulkan", "opencl"):
        from tvm.s_tir import dlight

        # no RewriteGrads here (as in build.py's GPU build): dlight's Matmul rule is written for
        # legalization's matmul forms, and no GPU was at hand to time the folded kernels
        mod = lower_for_schedule(mod, target)
        with target:
            return dlight.ApplyDefaultSchedule(
                dlight.gpu.Matmul(),
                dlight.gpu.GEMV(),
                dlight.gpu.Reduction(),
                dlight.gpu.GeneralReduction(),
                dlight.gpu.Fallback(),
            )(mod)
    return mod


@tvm.transform.module_pass(opt_level=0, name="DefaultCPUSchedule")
class DefaultCPUSchedule:
    """``default_cpu_schedule`` as a module pass (for a ``Sequential`` before ``tvm.compile``).

    Must run after every Relax-level rewrite (Gradient, SplitModule, DecomposeForTraining): the
    module it returns is legalized and fused. ``on_fallback`` receives each
    :class:`KernelFallback`; keyword options are those of ``default_cpu_schedule``.
    """

    def __init__(
        self, target, on_fallback: Callable[[KernelFallback], None] | None = None, **options
    ):
        self.target = target
        self.on_fallback = on_fallback
        self.options = options

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        return default_cpu_schedule(mod, self.target, self.on_fallback, **self.options)
