"""The one home of version-sensitive TVM calls (apache-tvm 0.27, Relax only).

TVM 0.27 renamed much of the Python API: ``struct_info`` is ``ty``, ``Var.name_hint`` is
``Var.name``, ``tir`` is ``tirx``, dlight is ``tvm.s_tir.dlight``. Every other module goes
through the helpers below so the next rename is a one-file change. Keep it in sections;
append new helpers to the section they belong to (or add a section).
"""

from __future__ import annotations

import contextlib

import numpy as np
import tvm
from tvm import relax

__all__ = [
    # vars and names
    "var_name",
    # types
    "expr_ty", "is_tensor_ty", "is_tuple_ty", "is_shape_ty", "is_prim_ty", "tensor_dtype",
    "tensor_shape", "static_shape", "has_static_shape", "tensor_ty_of", "tuple_fields",
    # ops
    "get_op", "call_op_name", "is_op_call",
    # functions
    "func_num_inputs", "func_param_values", "structural_hash", "structural_map",
    # arrays
    "to_numpy", "is_constant", "constant_value",
    # importer
    "onnx_convert_map", "relax_op_lowerings",
    # errors
    "register_splitc_errors",
]


# -- vars and names --------------------------------------------------------------------------
def var_name(var: relax.Var) -> str:
    """The user-visible name of a Relax var (``name_hint`` before 0.27, ``name`` since)."""
    name = getattr(var, "name", None)
    if name is None:  # pragma: no cover - older TVM
        name = var.name_hint
    return str(name)


# -- types (formerly struct info) ------------------------------------------------------------
def expr_ty(expr: relax.Expr):
    """The Relax type of an expression (``struct_info`` before 0.27)."""
    ty = getattr(expr, "ty", None)
    if ty is None:  # pragma: no cover - older TVM
        ty = expr.struct_info
    return ty


def is_tensor_ty(ty) -> bool:
    return isinstance(ty, relax.TensorType)


def is_tuple_ty(ty) -> bool:
    return isinstance(ty, relax.TupleType)


def is_shape_ty(ty) -> bool:
    return isinstance(ty, relax.ShapeType)


def is_prim_ty(ty) -> bool:
    return isinstance(ty, relax.type.PrimType)


def tuple_fields(ty) -> list:
    return list(ty.fields)


def tensor_dtype(ty) -> str:
    return str(ty.dtype)


def tensor_shape(ty) -> tuple | None:
    """Dims as python ints where static, the symbolic ``PrimExpr`` where not; ``None`` when
    the rank itself is unknown."""
    shape = ty.shape
    if shape is None:
        return None
    values = getattr(shape, "values", None)
    if values is None:
        return None
    out = []
    for d in values:
        out.append(int(d.value) if isinstance(d, tvm.tirx.IntImm) else d)
    return tuple(out)


def static_shape(ty) -> tuple[int, ...] | None:
    """``tensor_shape`` if every dim is a python int, else ``None``."""
    s = tensor_shape(ty)
    if s is None or not all(isinstance(d, int) for d in s):
        return None
    return s


def has_static_shape(expr) -> bool:
    """Whether ``expr`` is a tensor whose every dim is known (the CPU legalizations match only
    those)."""
    ty = getattr(expr, "ty", None)
    return is_tensor_ty(ty) and static_shape(ty) is not None


def tensor_ty_of(expr: relax.Expr):
    ty = expr_ty(expr)
    return ty if is_tensor_ty(ty) else None


# -- ops ------------------------------------------------------------------------------------
def get_op(name: str) -> tvm.ir.Op:
    """``tvm.ir.Op.get`` (raises at import time for a typo: that is the point)."""
    return tvm.ir.Op.get(name)


def is_op_call(expr) -> bool:
    return isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)


def call_op_name(expr) -> str:
    return str(expr.op.name)


# -- functions -------------------------------------------------------------------------------
def func_num_inputs(func: relax.Function) -> int:
    """``num_input`` attr set by the ONNX importer: the real inputs before the weights."""
    attrs = func.attrs
    if attrs is not None and "num_input" in attrs:
        return int(attrs["num_input"])
    return len(func.params)


def func_param_values(func: relax.Function) -> list[np.ndarray]:
    """Initial weight values kept by ``from_onnx(keep_params_in_input=True)`` (attr ``params``)."""
    attrs = func.attrs
    if attrs is None or "params" not in attrs:
        return []
    return [to_numpy(a) for a in attrs["params"]]


def structural_hash(node) -> int:
    """``tvm.ir.structural_hash`` before 0.27; ``tvm_ffi.structural_hash`` since."""
    fn = getattr(tvm.ir, "structural_hash", None)
    if fn is None:
        import tvm_ffi

        fn = tvm_ffi.structural_hash
    return int(fn(node))


def structural_map(node, rule):
    """Rebuild ``node`` bottom-up, replacing each sub-node of type ``rule[0]`` by
    ``rule[1](sub_node)``: ``tvm_ffi.structural_map`` (0.27; older TVM has no equivalent, use
    a ``tirx.stmt_functor.ir_transform`` there)."""
    import tvm_ffi

    return tvm_ffi.structural_map(node, rule)


# -- arrays and constants ------------------------------------------------------------------
def to_numpy(arr) -> np.ndarray:
    return arr.numpy() if hasattr(arr, "numpy") else np.asarray(arr)


def is_constant(expr) -> bool:
    """A Relax constant (``relax.Constant`` before 0.27, ``tvm.ir.expr.Constant`` since)."""
    return isinstance(expr, tvm.ir.expr.Constant)


def constant_value(expr) -> np.ndarray:
    data = getattr(expr, "data", None)
    if data is None:
        data = expr.value
    return to_numpy(data)


# -- ONNX importer ---------------------------------------------------------------------------
def onnx_convert_map() -> dict:
    """The importer's ONNX op type -> converter table (a private function in 0.27)."""
    from tvm.relax.frontend.onnx import onnx_frontend

    return onnx_frontend._get_convert_map()


@contextlib.contextmanager
def relax_op_lowerings():
    """Import ONNX ops as Relax ops where the 0.27 importer emits opaque TIR kernels.

    The importer lowers these through ``emit_te`` to ``call_tir`` kernels that have no FLOP
    rule and no gradient; here they become Relax ops with both a rule and (for Clip) a
    registered gradient:

    - ``Clip`` with constant bounds -> ``minimum(maximum(x, lo), hi)`` (ReLU6 in
      MobileNetV2 is Clip(0, 6)); non-constant or NaN bounds keep the importer's lowering;
    - ``Pad`` -> ``relax.nn.pad`` (modes constant, reflect, edge -> replicate, wrap ->
      circular);
    - ``Einsum`` -> ``relax.einsum``; ``Tile`` with constant repeats -> ``relax.tile``.
    """
    from tvm.relax.frontend.onnx import onnx_frontend as f

    saved = [(f.Clip, "_impl_v13"), (f.Clip, "_impl_v1"), (f.Pad, "_lower_pad"),
             (f.Einsum, "_impl_v12"), (f.Tile, "_impl_v13")]
    originals = [(cls, name, cls.__dict__[name]) for cls, name in saved]
    orig = {(cls, name): fn for cls, name, fn in originals}

    def const_bound(e):
        if is_constant(e):
            v = constant_value(e)
            if v.size == 1 and not np.isnan(v).any():
                return v
        return None

    def clip_v13(cls, bb, inputs, attr, params):
        x = inputs[0]
        given = [len(inputs) > k and inputs[k] is not None for k in (1, 2)]
        lo = const_bound(inputs[1]) if given[0] else None
        hi = const_bound(inputs[2]) if given[1] else None
        if (given[0] and lo is None) or (given[1] and hi is None):
            return orig[(f.Clip, "_impl_v13")].__func__(cls, bb, inputs, attr, params)
        dtype = str(expr_ty(x).dtype)
        if lo is not None:
            x = bb.normalize(relax.op.maximum(x, relax.const(lo.item(), dtype)))
        if hi is not None:
            x = bb.normalize(relax.op.minimum(x, relax.const(hi.item(), dtype)))
        return x

    def clip_v1(cls, bb, inputs, attr, params):
        x = inputs[0]
        dtype = str(expr_ty(x).dtype)
        if "min" in attr:
            x = bb.normalize(relax.op.maximum(x, relax.const(float(attr["min"]), dtype)))
        if "max" in attr:
            x = bb.normalize(relax.op.minimum(x, relax.const(float(attr["max"]), dtype)))
        return x

    pad_modes = {"constant": "constant", "reflect": "reflect", "edge": "replicate",
                 "wrap": "circular"}

    def lower_pad(cls, bb, inputs, attr, params, allowed_modes):
        mode = attr.get("mode", b"constant").decode("utf-8")
        if mode not in allowed_modes or mode not in pad_modes:
            return orig[(f.Pad, "_lower_pad")].__func__(cls, bb, inputs, attr, params,
                                                         allowed_modes)
        before, after, value = cls._parse_pads_and_axes(inputs, params)
        width = [int(v) for pair in zip(before, after) for v in pair]
        return relax.op.nn.pad(inputs[0], width, pad_modes[mode], float(value))

    def einsum_v12(cls, bb, inputs, attr, params):
        return relax.op.einsum(list(inputs), attr["equation"].decode("utf-8"))

    def tile_v13(cls, bb, inputs, attr, params):
        reps = inputs[1]
        if is_constant(reps):
            return relax.op.tile(inputs[0], [int(r) for r in constant_value(reps).tolist()])
        return orig[(f.Tile, "_impl_v13")].__func__(cls, bb, inputs, attr, params)

    f.Clip._impl_v13, f.Clip._impl_v1 = classmethod(clip_v13), classmethod(clip_v1)
    f.Pad._lower_pad = classmethod(lower_pad)
    f.Einsum._impl_v12 = classmethod(einsum_v12)
    f.Tile._impl_v13 = classmethod(tile_v13)
    try:
        yield
    finally:
        for cls, name, fn in originals:
            setattr(cls, name, fn)


# -- errors across the FFI -------------------------------------------------------------------
def register_splitc_errors() -> None:
    """Let splitc errors cross TVM's FFI with their type.

    A module pass runs under ``RunPass`` (C++); a Python exception raised inside comes back
    as a plain ``RuntimeError`` unless its class is registered with ``tvm_ffi``. Registered,
    ``AnnotateCosts(...)(mod)`` raises the same ``InputError``/``UnsupportedError`` a direct
    call would. Idempotent.
    """
    import splitc

    try:
        import tvm_ffi
    except ImportError:  # pragma: no cover - older TVM keeps its own error registry
        return
    for name in splitc.__all__:
        cls = getattr(splitc, name)
        if isinstance(cls, type) and issubclass(cls, splitc.SplitcError):
            tvm_ffi.register_error(name, cls)


register_splitc_errors()
