"""Training support for imported models: decompositions, extra gradients, losses, optimizers.

``relax.transform.Gradient`` differentiates only about 50 ops (``tvm/relax/op/_op_gradient.py``)
and wants one dataflow block. Imported ONNX models use ops outside that set, so before any
gradient is taken:

- ``DecomposeForTraining`` and ``LiftOpaqueElementwise`` (``passes/decompose.py``, re-exported
  here) rewrite batch/layer norm and clip into primitive ops that have gradients (and fix the
  importer's batch-norm momentum, see there).
- ``register_gradients()`` (run at import) adds gradients TVM lacks: ``erf`` and ``nn.gelu``
  (GELU as ONNX exports it: ``x * 0.5 * (1 + erf(x / sqrt 2))``), ``nn.pad``, ``squeeze``,
  ``flatten``. Each rule is checked against PyTorch autograd in tests/passes/test_training.py.
- ``check_gradients`` reports EVERY op on the differentiated path that still lacks a gradient,
  by op and binding name, as one ``UnsupportedError``, before any compile work.
"""

from __future__ import annotations

import math

import numpy as np
import tvm
from splitc import InputError, UnsupportedError
from splitc.passes.decompose import (  # small Relax helpers shared with the decompositions
    DecomposeForTraining,
    LiftOpaqueElementwise,
    _const,
    _dtype,
    _shape,
)
from tvm import relax
from tvm.relax import op as R

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
