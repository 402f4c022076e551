"""Training support for imported models: decompositions, extra gradients, losses, optimizers.

``relax.transform.Gradient`` differentiates only about 50 ops (``tvm/relax/op/_op_gradient.py``)
and wants one dataflow block. Imported ONNX models use ops outside that set, so before any
gradient is taken:

- ``DecomposeForTraining`` (a module pass) rewrites, in every function of the module,
  ``nn.batch_norm`` (training: batch statistics and the running-stat update; inference: the
  running stats), ``nn.layer_norm`` and ``clip`` (ReLU6) into primitive ops that have
  gradients. Run it after the split (``passes/split_module.py``) and before ``Gradient``.
- ``register_gradients()`` (run at import) adds gradients TVM lacks: ``erf`` and ``nn.gelu``
  (GELU as ONNX exports it: ``x * 0.5 * (1 + erf(x / sqrt 2))``), ``nn.pad``, ``squeeze``,
  ``flatten``. Each rule is checked against PyTorch autograd in tests/passes/test_training.py.
- ``check_gradients`` reports EVERY op on the differentiated path that still lacks a gradient,
  by op and binding name, as one ``UnsupportedError``, before any compile work.

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
from splitc import InputError, UnsupportedError
from tvm import relax
from tvm.relax import op as R
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = [
    "LOSSES",
    "OPTIMIZERS",
    "DecomposeForTraining",
    "LiftOpaqueElementwise",
    "check_gradients",
    "make_loss",
    "make_optimizer",
    "register_gradients",
    "running_stat_params",
]

LOSSES = ("cross-entropy", "mse", "none")  # none: the model's own (scalar) output is the loss
OPTIMIZERS = ("sgd", "momentum", "adam")

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


# --------------------------------------------------------------------------- gradients
def _erf_grad(orig_var, orig_call, output_grad, ctx):
    # d/dx erf(x) = 2/sqrt(pi) * exp(-x^2)
    x = orig_call.args[0]
    dt = _dtype(x)
    return [
        R.multiply(
            output_grad,
            R.multiply(_const(2.0 / math.sqrt(math.pi), dt), R.exp(R.negative(R.multiply(x, x)))),
        )
    ]


def _gelu_grad(orig_var, orig_call, output_grad, ctx):
    # gelu(x) = x * Phi(x): d/dx = Phi(x) + x * phi(x), phi(x) = exp(-x^2/2) / sqrt(2 pi)
    x = orig_call.args[0]
    dt = _dtype(x)
    cdf = R.multiply(
        _const(0.5, dt), R.add(_const(1.0, dt), R.erf(R.multiply(x, _const(1 / math.sqrt(2), dt))))
    )
    pdf = R.multiply(
        _const(1 / math.sqrt(2 * math.pi), dt),
        R.exp(R.multiply(_const(-0.5, dt), R.multiply(x, x))),
    )
    return [R.multiply(output_grad, R.add(cdf, R.multiply(x, pdf)))]


def _reshape_back_grad(orig_var, orig_call, output_grad, ctx):
    return [R.reshape(output_grad, _shape(orig_call.args[0]))]


def _pad_grad(orig_var, orig_call, output_grad, ctx):
    # constant padding: the gradient is the interior slice of the output gradient
    x = orig_call.args[0]
    pw = [int(p) for p in orig_call.attrs.pad_width]
    shp = _shape(x)
    begin = [pw[2 * i] for i in range(len(shp))]
    end = [pw[2 * i] + shp[i] for i in range(len(shp))]
    return [R.strided_slice(output_grad, list(range(len(shp))), begin, end)]


_EXTRA_GRADIENTS = {
    "relax.erf": _erf_grad,
    "relax.nn.gelu": _gelu_grad,
    "relax.squeeze": _reshape_back_grad,
    "relax.flatten": _reshape_back_grad,
    "relax.nn.pad": _pad_grad,
}


def register_gradients() -> None:
    """Register the gradients TVM 0.27 lacks (idempotent; never overrides TVM's own)."""
    for name, fn in _EXTRA_GRADIENTS.items():
        op = tvm.ir.Op.get(name)
        if op.get_attr("FPrimalGradient") is None:
            relax.op.register_gradient(name, fn)


register_gradients()


def _free_vars(e: relax.Expr) -> list[relax.Var]:
    return list(relax.analysis.free_vars(e))


def check_gradients(
    func: relax.Function, wrt: list[relax.Var], where: str, target: relax.Var | None = None
) -> None:
    """Raise ``UnsupportedError`` listing every op between ``wrt`` and the target that has no
    gradient (``op (binding)``, in program order). ``target`` defaults to the return value."""
    from splitc.passes.naming import binding_names

    names = binding_names(func)
    bindings = [b for blk in func.body.blocks for b in blk.bindings]
    tainted = set(wrt)
    for b in bindings:
        if any(v in tainted for v in _free_vars(b.value)):
            tainted.add(b.var)
    live = set(_free_vars(target if target is not None else func.body.body))
    missing = []
    for b in reversed(bindings):
        if b.var not in live:
            continue
        live.update(_free_vars(b.value))
        v = b.value
        if (
            b.var in tainted
            and isinstance(v, relax.Call)
            and isinstance(v.op, tvm.ir.Op)
            and v.op.get_attr("FPrimalGradient") is None
        ):
            missing.append(f"{v.op.name} ({names.get(b.var, b.var.name)})")
    if missing:
        raise UnsupportedError(
            f"Gradient: {where}: no gradient for {', '.join(reversed(missing))}; register one "
            "with tvm.relax.op.register_gradient or keep these ops out of training"
        )


def running_stat_params(func: relax.Function) -> list[str]:
    """Names of parameters read as batch-norm running mean/var: state, not trainable."""
    out = []
    params = {p: p.name for p in func.params}
    for blk in func.body.blocks:
        for b in blk.bindings:
            v = b.value
            if isinstance(v, relax.Call) and v.op == _BATCH_NORM:
                for a in v.args[3:5]:
                    if a in params and params[a] not in out:
                        out.append(params[a])
    return out


# --------------------------------------------------------------------------- loss, optimizer
def make_loss(kind: str, pred: relax.Expr, labels: relax.Var | None) -> relax.Expr:
    """The scalar loss expression of ``pred`` (a model output) against ``labels``.

    cross-entropy: mean of ``-log_softmax(pred, axis=-1)[label]`` over every position (int64
    labels shaped ``pred.shape[:-1]``, as in OpGraph.labels); mse: mean squared error (labels shaped like pred);
    output: the model already ends in a scalar loss.
    """
    if kind == "cross-entropy":
        # classes on the LAST axis, labels ``pred.shape[:-1]``: the convention AnnotateCosts
        # puts into OpGraph.labels (and LM logits (N, T, V) use); torch's axis-1 layout for
        # (N, C, H, W) outputs would need a transpose in the model
        if len(_shape(pred)) > 2:
            n_cls = _shape(pred)[-1]
            pred = R.reshape(pred, [-1, n_cls])
            labels = R.reshape(labels, [-1])
        return R.nn.nll_loss(R.nn.log_softmax(pred, axis=-1), labels, reduction="mean")
    if kind == "mse":
        d = R.subtract(pred, labels)
        return R.mean(R.multiply(d, d))
    if kind == "none":
        if _shape(pred):
            raise InputError(
                f"Loss: --loss none needs a scalar model output, got shape "
                f"{_shape(pred)}; use --loss cross-entropy or mse"
            )
        return pred
    raise InputError(f"Loss: unknown loss {kind!r}; use one of {', '.join(LOSSES)}")


def label_ty(kind: str, pred_ty: relax.TensorType) -> relax.TensorType | None:
    """Struct info of the labels for ``kind`` (None when the model computes its own loss)."""
    shp = [int(d) for d in pred_ty.shape]
    if kind == "cross-entropy":
        return relax.TensorType(shp[:-1], "int64")
    if kind == "mse":
        return relax.TensorType(shp, str(pred_ty.dtype))
    return None


def make_optimizer(kind: str, lr: float, params: list[relax.Var], name: str):
    """``(relax.Function, initial state as numpy arrays)`` for ``kind`` over ``params``.

    The function maps ``(params tuple, grads tuple, state tuple) -> (new params, new state)``
    (``tvm.relax.training.optimizer``); the state is explicit so it can be checkpointed.
    """
    from tvm.relax.training import optimizer as opt

    if not lr > 0:
        raise InputError(f"Optimizer: learning rate must be > 0, got {lr}")
    if kind == "sgd":
        o = opt.SGD(lr)
    elif kind == "momentum":
        o = opt.MomentumSGD(lr, 0.9)
    elif kind == "adam":
        o = opt.Adam(lr)
    else:
        raise InputError(
            f"Optimizer: unknown optimizer {kind!r}; use one of {', '.join(OPTIMIZERS)}"
        )
    # TVM 0.27's Optimizer.init builds its state with ``np.ones((), T.float32)`` and fails (the
    # dtype became a PrimType): set params and dtype ourselves and build the same state.
    o._set_params_and_dtype(list(params))
    o.dtype = str(o.dtype)
    zeros = [np.zeros(_shape(p), _dtype(p)) for p in params]
    step = [np.zeros((), "int64")]
    if kind == "sgd":
        state = step
    elif kind == "momentum":
        state = step + zeros
    else:  # num_steps, beta1**t, beta2**t, first moments, second moments
        ones = [np.ones((), o.dtype), np.ones((), o.dtype)]
        state = step + ones + zeros + [z.copy() for z in zeros]
    o.state = tuple(state)
    func = o.get_function().with_attr("global_symbol", name)
    return func, state
