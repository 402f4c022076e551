"""Decompositions for training: ops without gradients rewritten into ops that have them.

``relax.transform.Gradient`` differentiates only about 50 ops (``tvm/relax/op/_op_gradient.py``).

- ``DecomposeForTraining`` (a module pass) rewrites, in every function of the module,
  ``nn.batch_norm`` (training: batch statistics and the running-stat update; inference: the
  running stats), ``nn.layer_norm`` and ``clip`` (ReLU6) into primitive ops that have
  gradients. Run it after the split (``passes/split_module.py``) and before ``Gradient``.
- ``LiftOpaqueElementwise`` turns the importer's topi ``call_tir`` kernels for Clip back into
  Relax ops (runs on ``main`` before the split).

BatchNorm running statistics: TVM 0.27's ONNX importer passes ONNX's ``momentum`` (0.9 for a
PyTorch ``momentum=0.1``) straight into ``relax.nn.batch_norm``, whose legalization weighs the
*batch* by it, i.e. ``0.1 * old + 0.9 * batch``, the wrong way round. Our decomposition applies
ONNX semantics, ``new = momentum * old + (1 - momentum) * batch``, with PyTorch's unbiased batch
variance (``n / (n - 1)``), so running stats after N steps equal PyTorch's. The new running
stats are extra outputs of the training forward, carried as non-trainable state.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from tvm import relax
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["DecomposeForTraining", "LiftOpaqueElementwise"]

_BATCH_NORM = tvm.ir.Op.get("relax.nn.batch_norm")
_LAYER_NORM = tvm.ir.Op.get("relax.nn.layer_norm")
_CLIP = tvm.ir.Op.get("relax.clip")


def _dtype(e: relax.Expr) -> str:
    return str(e.ty.dtype)


def _shape(e: relax.Expr) -> list[int]:
    return [int(d) for d in e.ty.shape]


def _const(v: float, dtype: str) -> relax.Constant:
    return relax.const(np.asarray(v, dtype=dtype))


@mutator
class _Decompose(PyExprMutator):
    def __init__(self, mod: tvm.IRModule, training: bool):
        super().__init__(mod)
        self.training = training
        self.binding = "lv"  # name of the var whose binding is being rewritten

    def visit_var_binding_(self, binding) -> None:
        self.binding = binding.var.name
        return super().visit_var_binding_(binding)

    def _emit(self, expr: relax.Expr) -> relax.Var:
        """Emit ``expr`` (its nested calls first), each binding named ``<binding>__d``: the
        pieces of a decomposed op name the op they came from (``passes/provenance.py``)."""
        if isinstance(expr, relax.Call):
            args = [self._emit(a) if isinstance(a, relax.Call) else a for a in expr.args]
            expr = relax.Call(expr.op, args, expr.attrs, expr.ty_args)
        return self.builder_.emit(expr, name_hint=f"{self.binding}__d")

    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op == _BATCH_NORM:
            return self._batch_norm(call)
        if call.op == _LAYER_NORM:
            return self._layer_norm(call)
        if call.op == _CLIP:
            x, lo, hi = call.args
            dt = _dtype(x)
            return self._emit(R.minimum(R.maximum(x, _const(lo.value, dt)), _const(hi.value, dt)))
        return call

    def _bcast(self, v: relax.Expr, ndim: int, axis: int, channels: int) -> relax.Expr:
        shape = [1] * ndim
        shape[axis] = channels
        return self._emit(R.reshape(v, shape))

    def _batch_norm(self, call: relax.Call) -> relax.Expr:
        x, gamma, beta, rmean, rvar = call.args
        a = call.attrs
        shp, dt = _shape(x), _dtype(x)
        axis = int(a.axis) % len(shp)
        c = shp[axis]
        eps = _const(float(a.epsilon), dt)
        training = bool(a.training) and self.training
        if training:
            axes = [i for i in range(len(shp)) if i != axis]
            n = math.prod(shp[i] for i in axes)
            mean = self._emit(R.mean(x, axes, keepdims=True))
            var = self._emit(R.variance(x, axes, keepdims=True))
            m = float(a.momentum)
            # ONNX semantics (see module docstring) with PyTorch's unbiased variance: n/(n-1).
            new_mean = R.add(
                R.multiply(_const(m, dt), rmean),
                R.multiply(_const(1 - m, dt), R.reshape(mean, [c])),
            )
            unbiased = float(n) / float(max(n - 1, 1))
            new_var = R.add(
                R.multiply(_const(m, dt), rvar),
                R.multiply(_const((1 - m) * unbiased, dt), R.reshape(var, [c])),
            )
        else:
            mean = self._bcast(rmean, len(shp), axis, c)
            var = self._bcast(rvar, len(shp), axis, c)
            new_mean, new_var = rmean, rvar
        y = R.divide(R.subtract(x, mean), R.sqrt(R.add(var, eps)))
        if a.scale:
            y = R.multiply(y, self._bcast(gamma, len(shp), axis, c))
        if a.center:
            y = R.add(y, self._bcast(beta, len(shp), axis, c))
        return relax.Tuple(
            [self._emit(y), self._emit(new_mean), self._emit(new_var)]
        )

    def _layer_norm(self, call: relax.Call) -> relax.Expr:
        x, gamma, beta = call.args
        a = call.attrs
        nd = len(_shape(x))
        axes = [int(i) % nd for i in a.axes]
        dt = _dtype(x)
        mean = self._emit(R.mean(x, axes, keepdims=True))
        var = self._emit(R.variance(x, axes, keepdims=True))
        y = R.divide(R.subtract(x, mean), R.sqrt(R.add(var, _const(float(a.epsilon), dt))))
        # gamma/beta have the shape of the normalised trailing axes: they broadcast as is.
        if a.scale:
            y = R.multiply(y, gamma)
        if a.center:
            y = R.add(y, beta)
        return self._emit(y)


@tvm.transform.module_pass(opt_level=0, name="DecomposeForTraining")
class DecomposeForTraining:
    """Rewrite batch/layer norm and clip into ops with gradients (see module docstring).

    ``training=False`` turns training-mode batch norm into inference (running stats). Runs
    after SplitModule has extracted the halves and before ``relax.transform.Gradient``; follow
    it with ``CanonicalizeBindings`` to fold the ``(y, mean, var)`` tuples it leaves.
    """

    def __init__(self, training: bool = True):
        self.training = training

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = _Decompose(mod, self.training)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        out = m.builder_.get()
        return relax.transform.CanonicalizeBindings()(out)


_CALL_TIR = tvm.ir.Op.get("relax.call_tir")
# PrimFuncs the ONNX importer emits through topi for Clip (ReLU6 = minimum(maximum(x, 0), 6)):
# opaque to Gradient, so they go back to the Relax ops that compute the same thing.
_TOPI_BINARY = {
    "maximum": R.maximum,
    "minimum": R.minimum,
    "add": R.add,
    "subtract": R.subtract,
    "multiply": R.multiply,
    "divide": R.divide,
}


@mutator
class _Lift(PyExprMutator):
    def visit_call_(self, call: relax.Call) -> relax.Expr:
        call = super().visit_call_(call)
        if call.op != _CALL_TIR or len(call.args) < 2:
            return call
        base = call.args[0].name_hint.rstrip("0123456789").rstrip("_")
        fn, args = _TOPI_BINARY.get(base), list(call.args[1].fields)
        if fn is None or len(args) != 2:
            return call
        new = self.builder_.normalize(fn(*args))
        if str(new.ty) != str(call.ty):
            return call  # not the plain elementwise op its name says: leave it (and report)
        return new


@tvm.transform.module_pass(opt_level=0, name="LiftOpaqueElementwise")
class LiftOpaqueElementwise:
    """Turn ``call_tir`` of the importer's topi ``maximum``/``minimum``/... kernels back into
    Relax ops, keeping every binding var (so OpGraph names still match). Runs on ``main``
    before SplitModule; SplitModule reports any ``call_tir`` left."""

    def transform_module(self, mod: tvm.IRModule, _ctx) -> tvm.IRModule:
        m = _Lift(mod)
        for gv, func in list(mod.functions.items()):
            if isinstance(func, relax.Function):
                m.builder_.update_func(gv, m.visit_expr(func))
        # no DeadCodeElimination: it drops unused bindings (BN running-stat items) and so
        # would shift the names the Plan refers to
        return m.builder_.get()
