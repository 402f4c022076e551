"""Default CPU schedules: the scheduled build computes what the unscheduled build computes.

Gradients are compared with rtol 1e-4 and an absolute floor of 1e-4 x the largest gradient of
the step: a bias feeding a normalisation has a gradient that cancels to ~1e-7 (260 summed terms
of ~1e-3), where changing the summation order (what vectorising a reduction does) moves it by
~1e-9, a relative 1 % of nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
import tvm
from splitc import BuildError
from splitc.passes import schedule_rules
from splitc.passes.schedules import (
    DefaultCPUSchedule,
    KernelFallback,
    default_cpu_schedule,
    default_schedule,
    host_llvm_target,
    schedule_prim_func,
)
from tvm import relax, tirx
from tvm.script import tirx as T

TARGET = tvm.target.Target("llvm")


def _tiny_resnet():
    import torch
    from torch import nn

    class Net(nn.Module):
        """3x3 stride 1 and stride 2 convs, a 1x1 stride-2 shortcut, batch norm, linear: every
        conv form the training graph creates (forward, conv2d_transpose, CNHW weight grad)."""

        def __init__(self):
            super().__init__()
            self.c0 = nn.Conv2d(3, 8, 3, 1, 1, bias=False)
            self.b0 = nn.BatchNorm2d(8)
            self.c1 = nn.Conv2d(8, 16, 3, 2, 1, bias=False)
            self.sc = nn.Conv2d(8, 16, 1, 2, bias=False)
            self.fc = nn.Linear(16, 10)

        def forward(self, x):
            y = torch.relu(self.b0(self.c0(x)))
            y = torch.relu(self.c1(y) + self.sc(y))
            return self.fc(y.mean((2, 3)))

    return Net(), (4, 3, 16, 16)


def _tiny_transformer():
    from splitc.tools.bench_vs_pytorch import _encoder

    return _encoder(32, 4, 1), (2, 8, 32)


def _step(mod, params, opt_state, x, y, target):
    ex = tvm.compile(mod, target)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    dev = tvm.cpu()
    ps = [tvm.runtime.tensor(p, dev) for p in params]
    out = vm["backbone_loss_adjoint"](tvm.runtime.tensor(x, dev), *ps, tvm.runtime.tensor(y, dev))
    loss = out[0] if isinstance(out[0], tvm.runtime.Tensor) else out[0][0]
    grads = [g.numpy() for g in out[1]]
    state = tuple(tvm.runtime.tensor(s, dev) for s in opt_state)
    new_params, _ = vm["optimizer"](tuple(ps), out[1], state)
    return loss.numpy(), grads, [p.numpy() for p in new_params]


@pytest.mark.parametrize("make", [_tiny_resnet, _tiny_transformer], ids=["cnn", "transformer"])
def test_scheduled_training_step_equals_unscheduled(make):
    import torch
    from splitc.tools.bench_vs_pytorch import train_module

    torch.manual_seed(0)
    model, shape = make()
    mod, params, opt_state = train_module(model, shape, 10)
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    y = rng.integers(0, 10, shape[0]).astype("int64")
    fallbacks: list[KernelFallback] = []
    scheduled = default_cpu_schedule(mod, TARGET, fallbacks.append)
    loss_a, grads_a, new_a = _step(mod, params, opt_state, x, y, TARGET)
    loss_b, grads_b, new_b = _step(scheduled, params, opt_state, x, y, TARGET)
    np.testing.assert_allclose(loss_b, loss_a, rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in grads_a)
    for ga, gb in zip(grads_a, grads_b, strict=True):
        np.testing.assert_allclose(gb, ga, rtol=1e-4, atol=1e-4 * scale)
    for pa, pb in zip(new_a, new_b, strict=True):
        np.testing.assert_allclose(pb, pa, rtol=1e-4, atol=1e-6)
    # Only the scalar loss kernels may fall back (their 0-d/1-d reductions are tiny).
    assert {f.kernel for f in fallbacks} <= {"nll_loss_without_weight"}
    # Every scheduled kernel is marked so tvm.compile's FuseOps/FuseTIR leave it alone.
    for f in scheduled.functions.values():
        if isinstance(f, tirx.PrimFunc):
            assert bool(f.attrs["tirx.is_scheduled"]) and int(f.attrs["op_pattern"]) == 8


@T.prim_func(private=True, s_tir=True)
def _matmul(
    a: T.Buffer((64, 32), "float32"),
    b: T.Buffer((32, 48), "float32"),
    c: T.Buffer((64, 48), "float32"),
):
    for i, j, k in T.grid(64, 48, 32):
        with T.sblock("matmul"):
            vi, vj, vk = T.axis.remap("SSR", [i, j, k])
            with T.init():
                c[vi, vj] = T.float32(0)
            c[vi, vj] = c[vi, vj] + a[vi, vk] * b[vk, vj]


@T.prim_func(private=True, s_tir=True)
def _row_sum(a: T.Buffer((64, 128), "float32"), c: T.Buffer((64,), "float32")):
    for i, k in T.grid(64, 128):
        with T.sblock("sum"):
            vi, vk = T.axis.remap("SR", [i, k])
            with T.init():
                c[vi] = T.float32(0)
            c[vi] = c[vi] + a[vi, vk]


def _for_kinds(func) -> set[str]:
    # kinds of every loop in the printed function: T.parallel / T.vectorized / T.unroll
    text = func.script()
    return {k for k in ("T.parallel", "T.vectorized", "T.unroll") if k in text}


def _run(func, *arrays):
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), TARGET).jit()
    args = [tvm.runtime.tensor(a) for a in arrays]
    lib["k"](*args)
    return args[-1].numpy()


def test_matmul_is_register_tiled_and_exact():
    new, problems = schedule_prim_func(_matmul, TARGET)
    assert problems == []
    # parallel outer tiles, unrolled rows, vectorised lanes (generic llvm: 4 lanes, tile 8)
    assert _for_kinds(new) == {"T.parallel", "T.vectorized", "T.unroll"}
    rng = np.random.default_rng(1)
    a = rng.standard_normal((64, 32)).astype("float32")
    b = rng.standard_normal((32, 48)).astype("float32")
    out = _run(new, a, b, np.zeros((64, 48), "float32"))
    np.testing.assert_allclose(out, a @ b, rtol=1e-5, atol=1e-5)


def test_row_reduction_is_rfactored_and_exact():
    new, problems = schedule_prim_func(_row_sum, TARGET)
    assert problems == []
    # the 128-long reduction is split into 4 vector lanes and rfactored: "sum_rf" block
    assert '"sum_rf' in new.script() and "T.vectorized" in new.script()
    a = np.random.default_rng(2).standard_normal((64, 128)).astype("float32")
    np.testing.assert_allclose(
        _run(new, a, np.zeros(64, "float32")), a.sum(1), rtol=1e-5, atol=1e-5
    )


def _matmul_module() -> tvm.IRModule:
    """A Relax module with one (64, 32) @ (32, 48) matmul."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((64, 32), "float32"))
    b = relax.Var("b", relax.TensorType((32, 48), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.matmul(a, b))
        bb.emit_func_output(out)
    return bb.get()


def test_rule_error_falls_back_and_is_reported(monkeypatch):
    def broken(*_args, **_kw):
        raise RuntimeError("tile rule exploded\nsecond line")

    monkeypatch.setattr(schedule_rules, "_register_tile", broken)
    mod = _matmul_module()
    fallbacks: list[KernelFallback] = []
    scheduled = DefaultCPUSchedule(TARGET, fallbacks.append)(mod)  # the pass form
    assert fallbacks == [KernelFallback("matmul", "partial", "matmul: tile rule exploded")]
    # the kernel still builds and is right: the generic parallel fallback applied
    assert "T.parallel" in scheduled["matmul"].script()
    rng = np.random.default_rng(3)
    an = rng.standard_normal((64, 32)).astype("float32")
    bn = rng.standard_normal((32, 48)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(scheduled, TARGET), tvm.cpu())
    np.testing.assert_allclose(
        vm["main"](tvm.runtime.tensor(an), tvm.runtime.tensor(bn)).numpy(),
        an @ bn,
        rtol=1e-5,
        atol=1e-5,
    )


def test_already_scheduled_kernels_are_kept():
    marked = _matmul.with_attr("tirx.is_scheduled", True)
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((64, 32), "float32"))
    b = relax.Var("b", relax.TensorType((32, 48), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            gv = bb.add_func(marked, "tuned_mm")
            out = bb.emit_output(relax.call_tir(gv, (a, b), relax.TensorType((64, 48), "float32")))
        bb.emit_func_output(out)
    scheduled = default_cpu_schedule(bb.get(), TARGET)
    # same loops (AnnotateTIROpPattern may add an op_pattern attribute, nothing else changes)
    tvm.ir.assert_structural_equal(scheduled["tuned_mm"].body, marked.body)
    assert "T.parallel" not in scheduled["tuned_mm"].script()


def test_non_llvm_target_is_refused():
    with pytest.raises(
        BuildError,
        match=r"^Schedules: default_cpu_schedule needs an llvm "
        r"target, got cuda; call default_schedule for GPU targets$",
    ):
        default_cpu_schedule(tvm.IRModule(), tvm.target.Target("cuda"))


def test_gpu_targets_get_dlight_thread_bindings():
    # no GPU needed: scheduling only, no codegen. Every kernel must bind threads, else CUDA
    # codegen rejects it ("did you forget to bind?").
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((64, 64), "float32"))
    with bb.function("main", [a]):
        with bb.dataflow():
            out = bb.emit_output(relax.op.nn.relu(relax.op.matmul(a, a)))
        bb.emit_func_output(out)
    scheduled = default_schedule(bb.get(), tvm.target.Target("cuda"))
    kernels = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    assert kernels and all("threadIdx" in f.script() for f in kernels)


@T.prim_func(private=True, s_tir=True)
def _transpose(a: T.Buffer((96, 64), "float32"), c: T.Buffer((64, 96), "float32")):
    for i, j in T.grid(64, 96):
        with T.sblock("T_transpose"):
            vi, vj = T.axis.remap("SS", [i, j])
            c[vi, vj] = a[vj, vi]


def test_transpose_is_cache_blocked_and_exact():
    new, problems = schedule_prim_func(_transpose, TARGET)
    assert problems == []
    # 16 unrolled steps along a's contiguous axis x 8 vector lanes along c's: 4 x 12 tiles
    text = new.script()
    assert _for_kinds(new) == {"T.parallel", "T.vectorized", "T.unroll"}
    assert "T.parallel(48)" in text and "T.unroll(16)" in text and "T.vectorized(8)" in text
    a = np.random.default_rng(4).standard_normal((96, 64)).astype("float32")
    np.testing.assert_array_equal(_run(new, a, np.zeros((64, 96), "float32")), a.T)


def test_tile_knobs_reach_the_register_tiling(monkeypatch):
    seen = []
    real = schedule_rules._register_tile

    def spy(*args, **kw):
        seen.append(kw.get("knobs", "absent"))
        return real(*args)  # heuristic tile: the knob object here is only a marker

    monkeypatch.setattr(schedule_rules, "_register_tile", spy)
    mod = _matmul_module()
    asked = []

    def knobs(name, func):
        asked.append((name, isinstance(func, tirx.PrimFunc)))
        return "marker"

    default_cpu_schedule(mod, TARGET, tile_knobs=knobs)
    assert asked == [("matmul", True)] and seen == ["marker"]
    seen.clear()
    default_cpu_schedule(mod, TARGET)  # no lookup: _register_tile gets no knobs at all
    assert seen == ["absent"]


def test_transpose_fused_with_a_reshape_is_cache_blocked():
    # reshape (4, 32, 48) -> (128, 48) then transpose: legalization reads
    # g[(v1 // 48 + v0) % 128 // 32, ..., v1 % 48], linear in v1 only once simplified
    bb = relax.BlockBuilder()
    g = relax.Var("g", relax.TensorType((4, 32, 48), "float32"))
    with bb.function("main", [g]):
        with bb.dataflow():
            g2 = bb.emit(relax.op.reshape(g, (128, 48)))
            out = bb.emit_output(relax.op.permute_dims(g2, [1, 0]))
        bb.emit_func_output(out)
    scheduled = default_cpu_schedule(bb.get(), TARGET)
    (kernel,) = [f for f in scheduled.functions.values() if isinstance(f, tirx.PrimFunc)]
    text = kernel.script().replace("T.int64(", "(")  # relax-made kernels have int64 loops
    assert "T.unroll((16))" in text and "T.vectorized((8))" in text
    gn = np.random.default_rng(6).standard_normal((4, 32, 48)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(scheduled, TARGET), tvm.cpu())
    np.testing.assert_array_equal(vm["main"](tvm.runtime.tensor(gn)).numpy(), gn.reshape(128, 48).T)


def test_elementwise_producer_is_inlined_into_a_per_channel_sum():
    """sum over N, H, W of a * b reads each product once: the multiply is inlined (no
    intermediate buffer), while a conv's padded input stays materialised (read 9 times)."""
    bb = relax.BlockBuilder()
    shape = (2, 32, 6, 6)
    a = relax.Var("a", relax.TensorType(shape, "float32"))
    b = relax.Var("b", relax.TensorType(shape, "float32"))
    w = relax.Var("w", relax.TensorType((16, 32, 3, 3), "float32"))
    with bb.function("main", [a, b, w]):
        with bb.dataflow():
            prod = bb.emit(relax.op.multiply(a, b))
            s = bb.emit(relax.op.collapse_sum_to(prod, (1, 32, 1, 1)))
            c = bb.emit(relax.op.nn.conv2d(relax.op.nn.relu(a), w, padding=1))
            out = bb.emit_output(relax.Tuple([s, c]))
        bb.emit_func_output(out)
    mod = default_cpu_schedule(bb.get(), TARGET)
    texts = {gv.name_hint: f.script() for gv, f in mod.functions.items() if gv.name_hint != "main"}
    (sum_kernel,) = [t for n, t in texts.items() if "collapse_sum" in n]
    assert "T_multiply" not in sum_kernel  # inlined into the reduction
    (conv_kernel,) = [t for n, t in texts.items() if "conv2d" in n]
    assert "pad_temp" in conv_kernel and 'T.sblock("pad_temp")' in conv_kernel
    rng = np.random.default_rng(5)
    args = [rng.standard_normal(s).astype("float32") for s in (shape, shape, (16, 32, 3, 3))]
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    got = vm["main"](*(tvm.runtime.tensor(x) for x in args))
    want = (args[0] * args[1]).sum(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(got[0].numpy(), want, rtol=1e-5, atol=1e-5)


def test_rows_of_no_whole_vector_are_vectorised_by_a_divisor():
    """A divide by a [1, C, 1, 1] operand over 14-wide rows: 14-lane vectors (a divisor of the
    row), not LLVM's loop vectoriser (10x slower at 8x1024x14x14), and exact."""
    bb = relax.BlockBuilder()
    a = relax.Var("a", relax.TensorType((2, 64, 14, 14), "float32"))
    b = relax.Var("b", relax.TensorType((1, 64, 1, 1), "float32"))
    with bb.function("main", [a, b]):
        with bb.dataflow():
            out = bb.emit_output(bb.emit(relax.op.divide(a, b)))
        bb.emit_func_output(out)
    mod = default_cpu_schedule(bb.get(), host_llvm_target())  # 16 lanes
    (kernel,) = [f for gv, f in mod.functions.items() if gv.name_hint != "main"]
    assert "T.vectorized(T.int64(14))" in kernel.script()
    rng = np.random.default_rng(6)
    x, y = rng.standard_normal((2, 64, 14, 14), "float32"), rng.random((1, 64, 1, 1), "float32")
    vm = relax.VirtualMachine(tvm.compile(mod, host_llvm_target()), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(y + 0.5)).numpy()
    np.testing.assert_allclose(got, x / (y + 0.5), rtol=1e-6)
