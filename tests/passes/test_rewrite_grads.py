"""RewriteGrads: folded matmuls compute what the unfolded graph computes, with fewer kernels."""

from __future__ import annotations

import collections

import numpy as np
import pytest
import tvm
from splitc.passes.rewrite_grads import RewriteGrads, rewrite_grads
from tvm import relax

TARGET = tvm.target.Target("llvm")


def _ops(func) -> collections.Counter:
    counts = collections.Counter()

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            counts[e.op.name.removeprefix("relax.")] += 1

    relax.analysis.post_order_visit(func.body, visit)
    return counts


def _calls(func) -> list:
    calls = []
    relax.analysis.post_order_visit(
        func.body, lambda e: calls.append(e) if isinstance(e, relax.Call) else None
    )
    return calls


def test_untransposed_weight_gradient_keeps_k_by_n():
    # collapse_sum_to without the final permute: x2^T @ g2, (8, 12)
    def build(bb, x, g):
        t = bb.emit(relax.op.permute_dims(x, [0, 2, 1]))
        m = bb.emit(relax.op.matmul(t, g))
        return relax.op.collapse_sum_to(m, relax.ShapeExpr([8, 12]))

    mod = _module(build, (3, 5, 8), (3, 5, 12))
    new, folded = rewrite_grads(mod)
    assert folded == 1 and _ops(new["main"]) == {"reshape": 2, "permute_dims": 1, "matmul": 1}
    rng = np.random.default_rng(5)
    x = rng.standard_normal((3, 5, 8)).astype("float32")
    g = rng.standard_normal((3, 5, 12)).astype("float32")
    expected = np.einsum("bsk,bsn->kn", x, g)
    np.testing.assert_allclose(_run(new, x, g), expected, rtol=1e-5, atol=1e-5)


def _run(mod, *arrays):
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in arrays])
    return out.numpy()


def _module(build, *shapes):
    bb = relax.BlockBuilder()
    args = [relax.Var(f"a{i}", relax.TensorType(s, "float32")) for i, s in enumerate(shapes)]
    with bb.function("main", args):
        with bb.dataflow():
            out = bb.emit_output(build(bb, *args))
        bb.emit_func_output(out)
    return bb.get()


def _weight_grad(bb, x, g):
    # what Gradient emits for y = x @ W.T, x (B, S, K): dW = (sum_b x[b]^T @ g[b])^T
    t = bb.emit(relax.op.permute_dims(x, [0, 2, 1]))
    m = bb.emit(relax.op.matmul(t, g))
    c = bb.emit(relax.op.collapse_sum_to(m, relax.ShapeExpr([x.ty.shape[2], g.ty.shape[2]])))
    return relax.op.permute_dims(c, [1, 0])


def test_weight_gradient_becomes_one_2d_matmul():
    mod = _module(_weight_grad, (3, 5, 8), (3, 5, 12))
    new, folded = rewrite_grads(mod)
    assert folded == 1
    # permute + batched matmul (3, 8, 12) + collapse_sum_to + permute (a weight-sized transpose)
    # -> g viewed as (15, 12), transposed (an activation-sized transpose), @ x viewed as (15, 8)
    assert _ops(mod["main"]) == {"permute_dims": 2, "matmul": 1, "collapse_sum_to": 1}
    assert _ops(new["main"]) == {"reshape": 2, "permute_dims": 1, "matmul": 1}
    matmul = next(e for e in _calls(new["main"]) if e.op.name == "relax.matmul")
    assert [[int(d) for d in a.ty.shape] for a in matmul.args] == [[12, 15], [15, 8]]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 5, 8)).astype("float32")
    g = rng.standard_normal((3, 5, 12)).astype("float32")
    expected = np.einsum("bsk,bsn->nk", x, g)
    np.testing.assert_allclose(_run(new, x, g), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(_run(mod, x, g), expected, rtol=1e-5, atol=1e-5)


def test_attention_transposes_fold_into_the_matmul():
    # out = (att @ permute(v, [0,2,1,3])) permuted back to [B, S, H, D]: V is read in place
    def build(bb, att, v):
        vt = bb.emit(relax.op.permute_dims(v, [0, 2, 1, 3]))
        o = bb.emit(relax.op.matmul(att, vt))
        return relax.op.permute_dims(o, [0, 2, 1, 3])

    mod = _module(build, (2, 3, 4, 4), (2, 4, 3, 8))
    new, folded = rewrite_grads(mod)
    assert folded == 1 and _ops(new["main"]) == {"call_tir": 1}
    rng = np.random.default_rng(1)
    att = rng.standard_normal((2, 3, 4, 4)).astype("float32")
    v = rng.standard_normal((2, 4, 3, 8)).astype("float32")
    expected = np.einsum("bhst,bthd->bshd", att, v)
    np.testing.assert_allclose(_run(new, att, v), expected, rtol=1e-5, atol=1e-5)


def test_transposed_weight_of_the_forward_is_not_folded():
    # x @ W.T: folding W's permute would make the output's lane axis a strided gather of W
    def build(bb, x, w):
        return relax.op.matmul(x, bb.emit(relax.op.permute_dims(w, [1, 0])))

    mod = _module(build, (2, 5, 8), (12, 8))
    new, folded = rewrite_grads(mod)
    assert folded == 0
    tvm.ir.assert_structural_equal(new, mod)


def test_intermediate_with_other_readers_is_not_folded():
    # the batched product is also returned: it is computed anyway, so the sum stays separate
    def build(bb, x, g):
        t = bb.emit(relax.op.permute_dims(x, [0, 2, 1]))
        m = bb.emit(relax.op.matmul(t, g))
        c = bb.emit(relax.op.collapse_sum_to(m, relax.ShapeExpr([8, 12])))
        return relax.Tuple([m, c])

    mod = _module(build, (3, 5, 8), (3, 5, 12))
    new, _ = rewrite_grads(mod)
    ops = _ops(new["main"])
    assert ops["collapse_sum_to"] == 1 and ops["call_tir"] == 1  # x's permute folded only
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 8)).astype("float32")
    g = rng.standard_normal((3, 5, 12)).astype("float32")
    vm = relax.VirtualMachine(tvm.compile(new, TARGET), tvm.cpu())
    m, c = vm["main"](tvm.runtime.tensor(x), tvm.runtime.tensor(g))
    np.testing.assert_allclose(m.numpy(), np.einsum("bsk,bsn->bkn", x, g), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(c.numpy(), np.einsum("bsk,bsn->kn", x, g), rtol=1e-5, atol=1e-5)


def test_legalized_module_is_left_alone():
    mod = relax.transform.LegalizeOps()(_module(_weight_grad, (3, 5, 8), (3, 5, 12)))
    new = RewriteGrads()(mod)  # the pass form
    tvm.ir.assert_structural_equal(new, mod)


@pytest.mark.slow
def test_training_step_is_unchanged_and_matmul_kernels_fewer():
    import torch
    from splitc.tools.bench_vs_pytorch import _encoder, train_module

    torch.manual_seed(0)
    mod, params, _ = train_module(_encoder(32, 4, 1), (2, 8, 32), 10)
    new, folded = rewrite_grads(mod)
    before, after = _ops(mod["backbone_loss_adjoint"]), _ops(new["backbone_loss_adjoint"])
    # 4 weight gradients of 3-D linears (qkv, proj, fc1, fc2: permute + batched matmul +
    # collapse_sum_to + permute -> reshape x2 + permute + 2-D matmul), the 2-D one of fc
    # (permute + matmul -> one kernel) and 4 attention matmuls with a folded Q/K/V or output
    # transpose (one kernel each)
    assert (before["matmul"], after["matmul"]) == (21, 12 + 4)
    assert (before["permute_dims"], after["permute_dims"]) == (26, 11 + 4)
    assert (before["collapse_sum_to"], after["collapse_sum_to"]) == (15, 11)
    assert after["call_tir"] == 5 and folded == 13  # + 2 each in backbone and backbone_loss
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 8, 32)).astype("float32")
    y = rng.integers(0, 10, 2).astype("int64")

    def step(m):
        vm = relax.VirtualMachine(tvm.compile(m, TARGET), tvm.cpu())
        args = [tvm.runtime.tensor(a) for a in (x, *params, y)]
        out = vm["backbone_loss_adjoint"](*args)
        return [out[0].numpy()] + [g.numpy() for g in out[1]]

    for a, b in zip(step(mod), step(new), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
