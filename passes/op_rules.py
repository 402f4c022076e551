"""FLOPs and bytes of one Relax op call, by exact formula, in a registry keyed by ``Op``.

Conventions (every rule below follows them; the formula is in the comment of each rule):
- a multiply-accumulate is 2 FLOPs; an elementwise primitive (add, exp, erf, tanh, compare,
  select ...) is 1 FLOP per output element, transcendental or not (the fvcore/ptflops
  convention: the roofline cares about the order of magnitude, the solver about consistency);
- data movement (reshape, permute, concat, take, slicing, casts) is 0 FLOPs, bytes only;
- ``bytes_read`` = bytes of every tensor argument (activations and weights), except where a
  rule says the op reads less (``take`` reads only the gathered rows);
  ``bytes_written`` = bytes of every output tensor.

The registry is keyed by ``tvm.ir.Op.get(name)`` resolved at import time, so a misspelt op
name fails when this module is imported, not when a model happens to use it. An op with no
rule raises ``UnsupportedError`` naming the op and the binding: there is no silent zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import tvm
from splitc import UnsupportedError
from splitc.passes.opgraph import dtype_bytes

__all__ = ["RULES", "Arg", "CallInfo", "OpCount", "count", "has_rule"]


@dataclass(frozen=True)
class Arg:
    """A tensor argument or output: static shape and dtype."""

    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.size * dtype_bytes(self.dtype)


@dataclass(frozen=True)
class CallInfo:
    """What a rule sees: tensor args in call order (``None`` where an arg is not a tensor:
    a shape, a prim value), outputs (several for a tuple result) and the call's attrs."""

    op: str
    binding: str
    args: tuple[Arg | None, ...]
    outs: tuple[Arg, ...]
    attrs: object = None

    @property
    def tensors(self) -> list[Arg]:
        return [a for a in self.args if a is not None]

    @property
    def out(self) -> Arg:
        return self.outs[0]

    def attr(self, name: str, default=None):
        if self.attrs is None:
            return default
        try:
            v = getattr(self.attrs, name)
        except AttributeError:
            return default
        return v if v is not None else default


@dataclass(frozen=True)
class OpCount:
    flops: int
    bytes_read: int
    bytes_written: int


Rule = Callable[[CallInfo], "int | tuple[int, int]"]  # flops, or (flops, bytes_read)
RULES: dict[tvm.ir.Op, Rule] = {}


def _register(names: list[str] | str, rule: Rule) -> None:
    for n in [names] if isinstance(names, str) else names:
        RULES[tvm.ir.Op.get("relax." + n)] = rule  # raises at import for a typo


def has_rule(op: tvm.ir.Op) -> bool:
    return op in RULES


def count(op: tvm.ir.Op, call: CallInfo) -> OpCount:
    rule = RULES.get(op)
    if rule is None:
        raise UnsupportedError(
            f"AnnotateCosts: no FLOP rule for op {call.op} (binding {call.binding!r}); add one "
            "to passes/op_rules.py")
    res = rule(call)
    flops, read = res if isinstance(res, tuple) else (res, sum(a.nbytes for a in call.tensors))
    return OpCount(int(flops), int(read), sum(o.nbytes for o in call.outs))


def _layout_index(layout: str, axis: str, default: int) -> int:
    layout = str(layout) if layout else ""
    return layout.index(axis) if axis in layout else default


# -- convolutions -----------------------------------------------------------------------------
def _conv(c: CallInfo) -> int:
    # 2 * out elements * (in channels per group * kernel volume)
    #   = 2 * prod(out) * prod(weight) / weight[O]; holds for 1d/2d/3d, groups, depthwise.
    w = c.args[1]
    o = _layout_index(c.attr("kernel_layout"), "O", 0)
    return 2 * c.out.size * w.size // w.shape[o]


def _conv_transpose(c: CallInfo) -> int:
    # each input element scatters into (out channels per group * kernel volume) outputs:
    #   2 * prod(in) * prod(weight) / weight[I]   (kernel layout IOHW by default)
    x, w = c.args[0], c.args[1]
    i = _layout_index(c.attr("kernel_layout"), "I", 0)
    return 2 * x.size * w.size // w.shape[i]


_register(["nn.conv1d", "nn.conv2d", "nn.conv3d"], _conv)
_register(["nn.conv1d_transpose", "nn.conv2d_transpose", "nn.conv3d_transpose"], _conv_transpose)


# -- matmul -----------------------------------------------------------------------------------
def _matmul(c: CallInfo) -> int:
    # (..., M, K) x (..., K, N) -> (..., M, N): 2 * prod(out) * K  (broadcast batch dims and
    # 1-D operands included: K is always the last dim of the first operand)
    return 2 * c.out.size * c.args[0].shape[-1]


def _einsum(c: CallInfo) -> int:
    # 2 * prod(out) * prod(contracted dims): the contracted labels appear in the inputs only
    eq = str(c.attr("subscripts"))
    lhs, rhs = eq.replace(" ", "").split("->")
    sizes: dict[str, int] = {}
    for term, a in zip(lhs.split(","), c.tensors):
        for ch, d in zip(term, a.shape):
            sizes[ch] = d
    contracted = math.prod(sizes[ch] for ch in set(sizes) - set(rhs))
    return 2 * c.out.size * contracted


def _outer(c: CallInfo) -> int:
    return c.out.size  # one multiply per output element


_register("matmul", _matmul)
_register("einsum", _einsum)
_register("outer", _outer)


# -- attention --------------------------------------------------------------------------------
def _attention(c: CallInfo) -> int:
    # q (B,S,H,D), k (B,T,H,D), v (B,T,H,Dv): QK^T 2*B*H*S*T*D + softmax 5*B*H*S*T
    #   + PV 2*B*H*S*T*Dv (+ 1*B*H*S*T for a bias)
    q, k, v = c.args[0], c.args[1], c.args[2]
    b, s, h, d = q.shape
    t, dv = k.shape[1], v.shape[3]
    n = b * h * s * t
    return 2 * n * d + 5 * n + 2 * n * dv + (n if len(c.tensors) > 3 else 0)


_register(["nn.attention", "nn.attention_bias"], _attention)


# -- elementwise ------------------------------------------------------------------------------
def _ewise(c: CallInfo) -> int:
    return c.out.size  # 1 FLOP per output element (broadcast result for binary ops)


_UNARY = [
    "abs", "acos", "acosh", "asin", "asinh", "atan", "atanh", "ceil", "cos", "cosh", "erf", "exp",
    "floor", "isfinite", "isinf", "isnan", "log", "negative", "round", "rsqrt", "sigmoid",
    "sign", "sin", "sinh", "sqrt", "square", "tan", "tanh", "trunc", "bitwise_not",
    "logical_not", "clip", "nn.relu", "nn.gelu", "nn.gelu_tanh", "nn.silu", "nn.selu",
    "nn.leakyrelu", "nn.softplus", "nn.prelu",
]
_BINARY = [
    "add", "subtract", "multiply", "divide", "floor_divide", "floor_mod", "mod", "power",
    "maximum", "minimum", "atan2", "equal", "not_equal", "greater", "greater_equal", "less",
    "less_equal", "logical_and", "logical_or", "logical_xor", "bitwise_and", "bitwise_or",
    "bitwise_xor", "left_shift", "right_shift", "log_add_exp", "where", "ewise_fma",
]
_register(_UNARY + _BINARY, _ewise)


def _dropout(c: CallInfo) -> int:
    return 2 * c.args[0].size  # draw a mask and multiply: 2 per element


_register("nn.dropout", _dropout)


# -- reductions -------------------------------------------------------------------------------
def _reduce(c: CallInfo) -> int:
    return c.args[0].size  # one accumulate (add / compare / multiply) per input element


def _mean(c: CallInfo) -> int:
    return c.args[0].size + c.out.size  # accumulate every input, then one divide per output


def _variance(c: CallInfo) -> int:
    # mean (n + out) then subtract, square, accumulate (3n) and divide (out): 4n + 2*out
    return 4 * c.args[0].size + 2 * c.out.size


def _cumulative(c: CallInfo) -> int:
    return c.args[0].size  # one add / multiply per element


_register(["sum", "max", "min", "prod", "argmax", "argmin"], _reduce)
_register("mean", _mean)
_register(["variance", "std"], _variance)
_register(["cumsum", "cumprod"], _cumulative)


# -- softmax and norms ------------------------------------------------------------------------
def _softmax(c: CallInfo) -> int:
    # max-reduce, subtract, exp, sum-reduce, divide: 5 per element
    return 5 * c.args[0].size


def _log_softmax(c: CallInfo) -> int:
    # max-reduce, subtract, exp, sum-reduce, final subtract: 5 per element + 1 log per row
    x = c.args[0]
    axis = int(c.attr("axis", -1))
    return 5 * x.size + x.size // x.shape[axis]


def _norm(c: CallInfo) -> int:
    # training statistics: mean (1), variance (subtract, square, accumulate: 3),
    # normalise (subtract, multiply by rsqrt: 2), affine (scale, shift: 2) = 8 per element
    return 8 * c.args[0].size


def _batch_norm(c: CallInfo) -> int:
    x = c.args[0]
    if c.attr("training", False):
        # 8 per element (see _norm) + running stats update per channel
        # (mean and var: multiply, multiply, add each: 6 per channel)
        return 8 * x.size + 6 * c.args[1].size
    return 2 * x.size  # inference: x * scale + shift with precomputed per-channel factors


def _rms_norm(c: CallInfo) -> int:
    # square, accumulate (2), rsqrt-scale (1), weight multiply (1) = 4 per element
    return 4 * c.args[0].size


_register("nn.softmax", _softmax)
_register("nn.log_softmax", _log_softmax)
_register(["nn.layer_norm", "nn.group_norm", "nn.instance_norm"], _norm)
_register("nn.batch_norm", _batch_norm)
_register("nn.rms_norm", _rms_norm)


# -- pooling ----------------------------------------------------------------------------------
def _window(c: CallInfo) -> int:
    return math.prod(int(k) for k in c.attr("pool_size", (1,)))


def _max_pool(c: CallInfo) -> int:
    return c.out.size * _window(c)  # one compare per window element per output


def _avg_pool(c: CallInfo) -> int:
    return c.out.size * (_window(c) + 1)  # window adds + one divide per output


def _adaptive_avg_pool(c: CallInfo) -> int:
    return c.args[0].size + c.out.size  # each input element added once, one divide per output


_register(["nn.max_pool1d", "nn.max_pool2d", "nn.max_pool3d"], _max_pool)
_register(["nn.avg_pool1d", "nn.avg_pool2d", "nn.avg_pool3d"], _avg_pool)
_register(["nn.adaptive_avg_pool1d", "nn.adaptive_avg_pool2d", "nn.adaptive_avg_pool3d"],
          _adaptive_avg_pool)


# -- losses (when a model carries its own) ----------------------------------------------------
def _cross_entropy(c: CallInfo) -> int:
    # -sum(log_softmax(x) * y) / N: log_softmax 5 per element + multiply + accumulate 2
    return 7 * c.args[0].size


def _nll(c: CallInfo) -> int:
    return 2 * c.args[1].size  # gather the target's score and accumulate: 2 per target


_register("nn.cross_entropy_with_logits", _cross_entropy)
_register("nn.nll_loss", _nll)


# -- data movement: 0 FLOPs -------------------------------------------------------------------
def _move(c: CallInfo) -> int:
    return 0


def _take(c: CallInfo) -> tuple[int, int]:
    # gather: reads the indices and only the gathered rows (= output bytes), not the table
    # (GPT-2's 50257 x 768 embedding is 154 MB; one batch of 32 tokens reads 98 KB of it)
    idx = c.args[1]
    return 0, (idx.nbytes if idx is not None else 0) + c.out.nbytes


_register([
    "reshape", "permute_dims", "concat", "split", "strided_slice", "dynamic_strided_slice",
    "broadcast_to", "astype", "expand_dims", "squeeze", "flatten", "nn.batch_flatten", "tile",
    "repeat", "flip", "stack", "gather_elements", "gather_nd", "scatter_elements",
    "scatter_nd", "slice_scatter", "index_put", "index_tensor", "zeros_like", "ones_like",
    "full_like", "one_hot", "nn.pad", "nn.pixel_shuffle", "collapse_sum_like",
    "collapse_sum_to", "triu", "tril", "zeros", "ones", "full", "arange", "layout_transform",
], _move)
_register("take", _take)


def _resize(c: CallInfo) -> int:
    # linear interpolation: 4 neighbours, 3 lerps of 3 FLOPs -> ~ 9 per output; nearest 0
    method = str(c.attr("method", "linear"))
    return 0 if method.startswith("nearest") else 9 * c.out.size


_register(["image.resize2d"], _resize)
