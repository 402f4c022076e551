"""Relax gradient modules for the conv-gradient legalization tests."""

from __future__ import annotations

import tvm
from tvm import relax


def conv_grad_module(xs, ws, stride, pad):
    """main_adjoint(x, w, g): gradients of sum(conv2d(x, w) * g), as relax's Gradient writes
    them (the weight gradient a CNHW conv2d, sliced when its window is larger than w)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(xs, "float32"))
    w = relax.Var("w", relax.TensorType(ws, "float32"))
    n, _, h, _ = xs
    gh = (h + 2 * pad - ws[2]) // stride + 1
    g = relax.Var("g", relax.TensorType((n, ws[0], gh, gh), "float32"))
    with bb.function("main", [x, w, g]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad))
            loss = bb.emit_output(bb.emit(relax.op.sum(relax.op.multiply(y, g))))
        bb.emit_func_output(loss)
    mod = relax.transform.Gradient("main", require_grads=[w])(bb.get())
    return mod, (n, ws[0], gh, gh)


def call_names(mod, func: str = "main_adjoint") -> list[str]:
    """Op names of ``func``'s calls; a call_tir counts as its PrimFunc's name."""
    names = []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, tvm.ir.Op):
            is_tir = e.op.name == "relax.call_tir"
            names.append(e.args[0].name_hint if is_tir else e.op.name)

    relax.analysis.post_order_visit(mod[func].body, visit)
    return names
