"""Training support: each added gradient rule against PyTorch autograd, decompositions, losses,
optimizers, and the report of every op without a gradient."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import tvm
from splitc import InputError, UnsupportedError
from splitc.passes import training as T
from tvm import relax
from tvm.relax import op as R

SHAPE = (2, 1, 3, 4)
RNG = np.random.default_rng(0)
X = RNG.standard_normal(SHAPE).astype("float32")


def _pad(x):
    return R.nn.pad(x, [0, 0, 0, 0, 1, 2, 2, 0])


# relax op -> PyTorch reference, for the rules registered by passes/training.py
RULES = {
    "erf": (R.erf, torch.erf, SHAPE),
    "gelu": (R.nn.gelu, torch.nn.functional.gelu, SHAPE),
    "squeeze": (lambda x: R.squeeze(x, [1]), lambda x: x.squeeze(1), (2, 3, 4)),
    "flatten": (R.flatten, lambda x: x.reshape(-1), (24,)),
    "pad": (_pad, lambda x: torch.nn.functional.pad(x, (2, 0, 1, 2)), (2, 1, 6, 6)),
}


def _grad_module():
    """One function per rule: loss = sum(op(x) * c), c a fixed random weight; its adjoint."""
    mod = tvm.IRModule()
    weights = {}
    for name, (rop, _, out_shape) in RULES.items():
        c = RNG.standard_normal(out_shape).astype("float32")
        weights[name] = c
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType(SHAPE, "float32"))
        with bb.function(name, [x]):
            with bb.dataflow():
                y = bb.emit(rop(x))
                loss = bb.emit_output(R.sum(R.multiply(y, relax.const(c))))
            bb.emit_func_output(loss)
        f = bb.get()[name]
        T.check_gradients(f, [f.params[0]], name)
        mod[name] = f
        mod = relax.transform.Gradient(name, [mod[name].params[0]])(mod)
    return mod, weights


def test_added_gradients_match_pytorch_autograd():
    mod, weights = _grad_module()
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    for name, (_, top, _) in RULES.items():
        loss, (grad,) = vm[name + "_adjoint"](tvm.runtime.tensor(X))
        xt = torch.from_numpy(X).requires_grad_()
        ref = (top(xt) * torch.from_numpy(weights[name])).sum()
        ref.backward()
        np.testing.assert_allclose(loss.numpy(), ref.item(), rtol=1e-5, err_msg=name)
        np.testing.assert_allclose(
            grad.numpy(), xt.grad.numpy(), rtol=1e-4, atol=1e-6, err_msg=name
        )


def test_every_op_without_gradient_is_reported_by_name():
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((1, 1, 2, 2), "float32"))
    w = relax.Var("w", relax.TensorType((1, 1, 2, 2), "float32"))
    with bb.function("demo", [x, w]):
        with bb.dataflow():
            a = bb.emit(R.floor(R.multiply(x, w)))
            b = bb.emit(R.image.resize2d(a, (4, 4)))
            c = bb.emit(R.round(x))  # no gradient either, but off the path from w: not reported
            loss = bb.emit_output(R.sum(R.add(b, R.sum(c))))
        bb.emit_func_output(loss)
    f = bb.get()["demo"]
    with pytest.raises(
        UnsupportedError,
        match=r"^Gradient: demo half: no gradient for "
        r"relax.floor \(lv1\), relax.image.resize2d "
        r"\(lv2\); register one with ",
    ):
        T.check_gradients(f, [f.params[1]], "demo half")


def test_clip_becomes_minimum_of_maximum():
    def build(body):
        bb = relax.BlockBuilder()
        x = relax.Var("x", relax.TensorType((4,), "float32"))
        with bb.function("main", [x]):
            with bb.dataflow():
                y = bb.emit_output(body(x))
            bb.emit_func_output(y)
        return bb.get()

    before = build(lambda x: R.clip(x, 0.0, 6.0))
    expected = build(
        lambda x: R.minimum(
            R.maximum(x, relax.const(np.float32(0.0))), relax.const(np.float32(6.0))
        )
    )
    tvm.ir.assert_structural_equal(T.DecomposeForTraining()(before), expected)


def test_cross_entropy_and_mse_losses_match_pytorch():
    logits = RNG.standard_normal((3, 5)).astype("float32")
    labels = np.array([4, 0, 2], "int64")
    target = RNG.standard_normal((3, 5)).astype("float32")
    mod = tvm.IRModule()
    for kind, lab in (("cross-entropy", labels), ("mse", target)):
        bb = relax.BlockBuilder()
        p = relax.Var("p", relax.TensorType((3, 5), "float32"))
        ty = T.label_ty(kind, p.ty)
        y = relax.Var("y", ty)
        assert tuple(int(d) for d in ty.shape) == lab.shape and str(ty.dtype) == str(lab.dtype)
        with bb.function(kind.replace("-", "_"), [p, y]):
            with bb.dataflow():
                out = bb.emit_output(T.make_loss(kind, p, y))
            bb.emit_func_output(out)
        mod[kind.replace("-", "_")] = bb.get()[kind.replace("-", "_")]
    vm = relax.VirtualMachine(tvm.compile(mod, target="llvm"), tvm.cpu())
    t = tvm.runtime.tensor
    ce = vm["cross_entropy"](t(logits), t(labels)).numpy()
    mse = vm["mse"](t(logits), t(target)).numpy()
    lt = torch.from_numpy(logits)
    np.testing.assert_allclose(
        ce, torch.nn.functional.cross_entropy(lt, torch.from_numpy(labels)), rtol=1e-6
    )
    np.testing.assert_allclose(
        mse, torch.nn.functional.mse_loss(lt, torch.from_numpy(target)), rtol=1e-6
    )


def test_cross_entropy_on_sequence_logits_uses_the_last_axis():
    # (N, T, V) logits against (N, T) labels, as an LM: torch on the flattened rows
    logits = RNG.standard_normal((2, 3, 5)).astype("float32")
    labels = RNG.integers(0, 5, (2, 3)).astype("int64")
    bb = relax.BlockBuilder()
    p = relax.Var("p", relax.TensorType((2, 3, 5), "float32"))
    y = relax.Var("y", T.label_ty("cross-entropy", p.ty))
    with bb.function("ce", [p, y]):
        with bb.dataflow():
            out = bb.emit_output(T.make_loss("cross-entropy", p, y))
        bb.emit_func_output(out)
    vm = relax.VirtualMachine(tvm.compile(bb.get(), target="llvm"), tvm.cpu())
    got = vm["ce"](tvm.runtime.tensor(logits), tvm.runtime.tensor(labels)).numpy()
    ref = torch.nn.functional.cross_entropy(
        torch.from_numpy(logits).reshape(6, 5), torch.from_numpy(labels).reshape(6)
    )
    np.testing.assert_allclose(got, ref.numpy(), rtol=1e-6)


def test_bad_loss_and_optimizer_names():
    p = relax.Var("p", relax.TensorType((3, 5), "float32"))
    with pytest.raises(
        InputError,
        match=r"^Loss: unknown loss 'hinge'; use one of "
        r"cross-entropy, mse, none$",
    ):
        T.make_loss("hinge", p, None)
    with pytest.raises(InputError, match=r"^Loss: --loss none needs a scalar model output"):
        T.make_loss("none", p, None)
    with pytest.raises(
        InputError,
        match=r"^Optimizer: unknown optimizer 'rmsprop'; use one of "
        r"sgd, momentum, adam$",
    ):
        T.make_optimizer("rmsprop", 0.1, [p], "u")
    with pytest.raises(InputError, match=r"^Optimizer: learning rate must be > 0, got 0"):
        T.make_optimizer("sgd", 0, [p], "u")


def test_optimizer_state_layout():
    p = relax.Var("p", relax.TensorType((3, 5), "float32"))
    q = relax.Var("q", relax.TensorType((2,), "float32"))
    _, sgd = T.make_optimizer("sgd", 0.1, [p, q], "u")
    _, mom = T.make_optimizer("momentum", 0.1, [p, q], "u")
    _, adam = T.make_optimizer("adam", 0.1, [p, q], "u")
    # sgd: step; momentum: step + one velocity per param; adam: step, beta1^t, beta2^t, m.., v..
    assert [a.shape for a in sgd] == [()]
    assert [a.shape for a in mom] == [(), (3, 5), (2,)]
    assert [a.shape for a in adam] == [(), (), (), (3, 5), (2,), (3, 5), (2,)]
    assert adam[0].dtype == np.int64 and float(adam[1]) == 1.0
