"""Kernel features: what the learned cost model sees of one fused TVM kernel (or of one op).

TVM fuses ops (``FuseOps`` + ``FuseTIR``): a ``conv2d -> add -> relu`` chain runs as one kernel
``fused_conv2d_add_relu``. Calibration (``cost_models/calibrate.py``) times those kernels, and
this module describes each one as plain data, a :class:`KernelFeatures`:

- ``kinds``: the ops fused in it, parsed from the kernel name (``fused_conv2d_transpose_add3_
  less_where`` -> ``conv2d_transpose, add, less, where``); ``family`` is the heaviest of them
  (``conv_t`` here), by the priority order of :data:`FAMILIES`;
- FLOPs (``tvm.s_tir.analysis.estimate_tir_flops`` of the kernel), bytes read and written (the
  call's argument and output tensors), parameter bytes (arguments that are trainable weights),
  shapes, dtype, and the role: ``forward``, ``backward`` or ``update``.

:func:`op_kernels` turns one op's ``OpFeatures`` into the kernels its training step runs
(forward, backward by the same gradient rules as the roofline prior, optimizer update), so the
learned model can price an op the planner asks about. :func:`vector` is the numeric feature
vector both regressors read. No TVM import here: plain data and arithmetic.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from splitc.cost_models.base import OpFeatures

__all__ = [
    "FAMILIES",
    "FEATURE_NAMES",
    "ROLES",
    "KernelFeatures",
    "family_of",
    "op_kernels",
    "parallel_guess",
    "parse_kinds",
    "sched_vector",
    "vector",
]

# Heaviest first: a fused kernel belongs to the first family any of its kinds falls in.
FAMILIES = ("conv_t", "conv", "matmul", "loss", "softmax", "norm", "pool", "reduce", "layout",
            "ewise")
ROLES = ("forward", "backward", "update")

# Multi-token op names as they appear in kernel names (tokens are split on "_").
_COMPOUND = ("conv1d_transpose", "conv2d_transpose", "conv3d_transpose", "collapse_sum",
             "log_softmax", "expand_dims", "broadcast_to", "nll_loss", "permute_dims",
             "strided_slice", "layer_norm", "group_norm", "batch_norm", "rms_norm",
             "max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "batch_flatten",
             "cross_entropy", "batch_matmul", "layout_transform", "log_add_exp")
_NOISE = {"fused", "tir", "te", "no", "without", "weight", "backward", "nn", "relax", "compute"}
_FAMILY_KINDS = {
    "conv_t": {"conv1d_transpose", "conv2d_transpose", "conv3d_transpose"},
    # the CPU legalizations name their kernels conv2d_weight_grad (passes/conv_weight_grads.py)
    # and conv2d_pixels / conv2d_transpose_pixels (pointwise_convs.py), which parse as conv and
    # conv_t; "conv", "conv1x" and "gemm" keep the earlier names of this session's
    # calibrations (conv_weight_grad, conv1x1_gemm) in the conv family rather than "ewise"
    "conv": {"conv1d", "conv2d", "conv3d", "conv", "conv1x"},
    "matmul": {"matmul", "dense", "batch_matmul", "einsum", "attention", "outer", "gemm"},
    "loss": {"nll_loss", "cross_entropy", "loss"},
    "softmax": {"softmax", "log_softmax"},
    "norm": {"layer_norm", "group_norm", "batch_norm", "rms_norm", "instance_norm"},
    "pool": {"max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "pool"},
    "reduce": {"sum", "mean", "variance", "std", "max", "min", "prod", "argmax", "argmin",
               "collapse_sum", "cumsum"},
    "layout": {"reshape", "transpose", "permute_dims", "expand_dims", "broadcast_to", "concat",
               "split", "strided_slice", "squeeze", "flatten", "batch_flatten", "take", "tile",
               "concatenate",
               "repeat", "pad", "layout_transform", "astype", "copy", "stack", "flip"},
}


@dataclass(frozen=True)
class KernelFeatures:
    """Hardware-independent facts about one kernel launch (one ``call_tir``)."""

    kinds: tuple[str, ...]
    flops: float
    bytes_read: int
    bytes_written: int
    param_bytes: int
    role: str  # forward | backward | update
    in_shapes: tuple[tuple[int, ...], ...] = ()
    out_shapes: tuple[tuple[int, ...], ...] = ()
    dtype: str = "float32"
    # whether the scheduled kernel runs a parallel loop (read from its TIR by calibration);
    # None for kernels predicted from OpFeatures: then guessed, see ``parallel_guess``
    parallel: bool | None = None
    # schedule-aware features of the scheduled kernel (``tir_features.SCHED_FEATURE_NAMES``),
    # read by calibration; None for kernels predicted from OpFeatures (nothing scheduled yet)
    sched: tuple[float, ...] | None = None

    @property
    def family(self) -> str:
        return family_of(self.kinds)

    def to_json(self) -> dict:
        return {"kinds": list(self.kinds), "family": self.family, "flops": self.flops,
                "bytes_read": self.bytes_read, "bytes_written": self.bytes_written,
                "param_bytes": self.param_bytes, "role": self.role,
                "in_shapes": [list(s) for s in self.in_shapes],
                "out_shapes": [list(s) for s in self.out_shapes], "dtype": self.dtype,
                "parallel": self.parallel,
                "sched": list(self.sched) if self.sched is not None else None}

    @classmethod
    def from_json(cls, d: dict) -> KernelFeatures:
        return cls(tuple(d["kinds"]), float(d["flops"]), int(d["bytes_read"]),
                   int(d["bytes_written"]), int(d["param_bytes"]), str(d["role"]),
                   tuple(tuple(s) for s in d.get("in_shapes", ())),
                   tuple(tuple(s) for s in d.get("out_shapes", ())), d.get("dtype", "float32"),
                   d.get("parallel"),
                   tuple(float(x) for x in d["sched"]) if d.get("sched") is not None else None)


def parse_kinds(kernel_name: str) -> tuple[str, ...]:
    """Op kinds fused in a kernel, from its name: digits that TVM appends to de-duplicate
    names (``add3``, ``conv2d1``) and helper words (``fused``, ``tir``, ``te``) are dropped.

    >>> parse_kinds("fused_conv2d_transpose_add3_less_where")
    ('conv2d_transpose', 'add', 'less', 'where')
    >>> parse_kinds("te_nll_loss_backward_no_weight")
    ('nll_loss',)
    >>> [family_of(parse_kinds(n)) for n in ("fused_conv1x1_gemm1_add3", "conv_weight_grad1")]
    ['conv', 'conv']
    """
    toks = [re.sub(r"(?<=[a-z])\d+$", "", t) for t in kernel_name.lower().split("_") if t]
    # conv2d keeps its "2d"; "conv2d1" -> "conv2d" since the regex only strips after a letter
    toks = [re.sub(r"^(conv[123]d|pool[123]d)\d+$", r"\1", t) for t in toks]
    out: list[str] = []
    i = 0
    while i < len(toks):
        for n in (3, 2):
            cand = "_".join(toks[i:i + n])
            if cand in _COMPOUND:
                out.append(cand)
                i += n
                break
        else:
            if toks[i] not in _NOISE and not toks[i].isdigit():
                out.append(toks[i])
            i += 1
    return tuple(out) or (kernel_name,)


def _kind_family(kind: str) -> str:
    k = kind.rsplit(".", 1)[-1]  # "relax.nn.conv2d" -> "conv2d"
    for fam in FAMILIES[:-1]:
        if k in _FAMILY_KINDS[fam]:
            return fam
    if "pool" in k:
        return "pool"
    if k.startswith("loss"):
        return "loss"
    return "ewise"


def family_of(kinds) -> str:
    """The heaviest family among ``kinds`` (``FAMILIES`` order)."""
    fams = {_kind_family(k) for k in kinds}
    return next((f for f in FAMILIES if f in fams), "ewise")


def _k(kind: str, role: str, flops: float, br: int, bw: int, pb: int, f: OpFeatures,
       shapes: tuple | None = None):
    """One op kernel; ``shapes`` = (input shapes, output shapes) when they are not the op's
    own (gradient and update kernels)."""
    ins, outs = shapes if shapes is not None else (f.in_shapes, f.out_shapes)
    return KernelFeatures((kind,), float(flops), int(br), int(bw), int(pb), role, tuple(ins),
                          tuple(outs), f.dtype)


def _weight_shapes(f: OpFeatures, width: int) -> list[tuple[int, ...]]:
    """The shapes of the weights ``f`` owns: the inputs after the first whose bytes add up to
    ``param_bytes`` (a matmul's weight, a norm's gamma and beta), else one flat tensor."""
    got, total = [], 0
    for s in f.in_shapes[1:] if len(f.in_shapes) > 1 else f.in_shapes:
        if total == f.param_bytes:
            break
        got.append(tuple(s))
        total += math.prod(s) * width
    if total != f.param_bytes:
        return [(f.param_bytes // width,)]
    return got


def op_kernels(f: OpFeatures, optimizer_bytes: int = 3, optimizer_flops: int = 2
               ) -> dict[str, list[KernelFeatures]]:
    """The kernels one op's training step runs, by role, from its ``OpFeatures``.

    Gradient rules (the roofline prior's, see ``cost_models/roofline.py``): conv / matmul need
    one product of the forward's size per gradient (data grad if ``input_grad``, weight grad
    if ``has_params``); elementwise, layout and pooling ops one pass over the same bytes;
    reductions a broadcast of the output gradient back to the input; norms two reductions and
    two elementwise passes each way. Update: one elementwise kernel over the op's weights,
    ``optimizer_bytes`` x ``param_bytes`` moved (SGD: read param + grad, write param = 3).
    """
    kind = f.op.rsplit(".", 1)[-1]
    fam = _kind_family(f.op) if not f.op.startswith("loss.") else "loss"
    br, bw, pb, fl = f.bytes_read, f.bytes_written, f.param_bytes, f.flops
    act_in = max(br - pb, 0)
    fwd, bwd = [], []
    needs = int(f.input_grad) + int(f.has_params)
    if fam == "norm":
        fwd = [_k("mean", "forward", fl / 4, act_in, bw // 8 + 4, 0, f),
               _k("variance", "forward", fl / 4, act_in, bw // 8 + 4, 0, f),
               _k("multiply", "forward", fl / 2, br, bw, pb, f)]
        if needs:
            bwd = [_k("collapse_sum", "backward", fl / 4, 2 * bw, bw // 8 + 4, 0, f)] * 2
            bwd += [_k("multiply", "backward", fl / 2, 2 * bw + pb, bw, 0, f)] * 2
    elif fam == "loss":
        fwd = [_k("log_softmax", "forward", fl, br, br, 0, f),
               _k("nll_loss", "forward", fl / 5, br, 4, 0, f)]
        bwd = [_k("nll_loss", "backward", fl / 5, br, br, 0, f),
               _k("exp", "backward", fl, 2 * br, br, 0, f)]
    else:
        fwd = [_k(kind, "forward", fl, br, bw, pb, f)]
        # gradient kernels get the shapes they run on, not the forward's: the trees read
        # output elements and FLOPs per output (``vector``), and a weight gradient writes the
        # weight (mlp's 784x512 from 32x784 and 32x512, FLOPs per output 64 vs 1568)
        x, w = (f.in_shapes + ((), ()))[:2]
        dy = f.out_shapes[:1]
        if fam in ("conv", "matmul"):
            if f.input_grad:
                bkind = "conv2d_transpose" if fam == "conv" else kind
                bwd.append(_k(bkind, "backward", fl, bw + pb, act_in, pb, f,
                              (dy + (w,), (x,))))
            if f.has_params:
                bwd.append(_k(kind, "backward", fl, bw + act_in, pb, 0, f, ((x,) + dy, (w,))))
        elif fam == "reduce" and needs:
            bwd = [_k("broadcast_to", "backward", 0, bw, act_in, 0, f, (dy, (x,)))]
        elif needs:
            bwd = [_k(kind, "backward", fl, br + bw, act_in or bw, 0, f,
                      (dy + f.in_shapes, f.in_shapes[:1] or dy))]
    upd = []
    if f.has_params and pb:
        width = 4 if f.dtype == "float32" else 2
        # one update kernel per weight tensor, as the compiled step runs them (a layer norm:
        # gamma and beta), each with its own shape. Planner's op-cost steps vs measured,
        # held out, session 4's dataset with the roofline offset: 5/7 within +-10 % with one
        # flat kernel per op (tiny_transformer +19 %, wide_cnn +16 %), 7/7 with this
        # (+8 %, +9 %; worst +9 %)
        for shape in _weight_shapes(f, width):
            n = math.prod(shape)
            upd.append(KernelFeatures(("multiply", "subtract"), float(optimizer_flops * n),
                                      (optimizer_bytes - 1) * n * width, n * width,
                                      n * width, "update", (shape, shape), (shape,), f.dtype))
    return {"forward": fwd, "backward": bwd, "update": upd}


FEATURE_NAMES = (
    ["log_flops", "log_bytes_read", "log_bytes_written", "log_param_bytes", "log_roofline",
     "arith_intensity", "log_out_elems", "log_flops_per_out", "n_kinds", "has_reduce",
     "has_layout", "parallel"]
    + [f"family={f}" for f in FAMILIES] + [f"role={r}" for r in ROLES]
    + [f"family={f}*log_flops" for f in FAMILIES] + [f"family={f}*log_bytes" for f in FAMILIES]
    + ["log_min_channels", "log2_spatial_ratio", "log_min_window"]
    + ["pow2_out_inner", "pow2_in_inner", "all_pow2"] + [f"log2_out_dim{i}" for i in range(4)]
)


# passes/schedules.py parallelises a kernel whose loop nest has >= 4096 iterations (below,
# waking the worker threads, ~5 us here, costs more than it saves)
_MIN_PARALLEL_WORK = 4096


def parallel_guess(k: KernelFeatures) -> bool:
    """Whether the default CPU schedule would parallelise ``k``: iterations ~ output elements
    for injective kernels, ~ FLOPs / 2 (multiply-accumulates) for reductions."""
    if k.parallel is not None:
        return k.parallel
    n_out = sum(math.prod(s) for s in k.out_shapes) if k.out_shapes else k.bytes_written / 4
    return max(n_out, k.flops / 2) >= _MIN_PARALLEL_WORK


def vector(k: KernelFeatures, peak_flops: float, bandwidth: float) -> list[float]:
    """Numeric features (``FEATURE_NAMES`` order): log10 sizes, the roofline time of the
    prior profile in log10 seconds, one-hot family and role, and per-family slopes (so a
    linear model in log space fits ``time ~ a_family * flops^b`` per family)."""
    nbytes = k.bytes_read + k.bytes_written
    lf, lb = math.log10(k.flops + 1.0), math.log10(nbytes + 1.0)
    roof = max(k.flops / peak_flops, nbytes / bandwidth, 1e-12)
    fams = {_kind_family(x) for x in k.kinds}
    fam = k.family
    # output elements and FLOPs per output: a depthwise conv (18 FLOPs per output for 3x3)
    # schedules and runs very differently from a dense one (2 x C x 9) of equal FLOPs
    n_out = sum(math.prod(s) for s in k.out_shapes) if k.out_shapes else k.bytes_written / 4
    lo = math.log10(n_out + 1.0)
    v = [lf, math.log10(k.bytes_read + 1.0), math.log10(k.bytes_written + 1.0),
         math.log10(k.param_bytes + 1.0), math.log10(roof), lf - lb, lo,
         math.log10(k.flops / max(n_out, 1.0) + 1.0), float(len(k.kinds)),
         float("reduce" in fams), float("layout" in fams), float(parallel_guess(k))]
    v += [float(fam == f) for f in FAMILIES] + [float(k.role == r) for r in ROLES]
    v += [lf * (fam == f) for f in FAMILIES] + [lb * (fam == f) for f in FAMILIES]
    return v + _geometry(k) + _shape_facts(k)


def _pow2(n: int) -> float:
    """log2 of the largest power of two dividing ``n`` (0 for 0), at most 10."""
    n = int(n)
    return min(math.log2(n & -n), 10.0) if n > 0 else 0.0


def _shape_facts(k: KernelFeatures) -> list[float]:
    """What sizes alone hide: the power-of-two factor of the output's and the first input's
    innermost dims, whether every dim is a power of two, and the output's last four dims
    (log2, right-aligned, -1 where it has fewer). Power-of-two row strides map rows to the
    same cache sets, and power-of-two inner extents turn a fused transpose's index arithmetic
    into shifts: encoder's all-power-of-two 2.8 ms matmuls (16x64x256 by 256x1024) took
    1.3x what the trees gave them from their neighbours in size, its (16, 64, 256) ->
    (16, 4, 64, 64) head split runs at 114 GB/s, where a (4, 128, 384) -> (4, 2, 128, 192)
    one runs 54. The dims tell a batch from a channel count of the same size (a depthwise conv
    on 2 x 96 channels ran 27.8 us, on 4 x 48 32.7). Held out (9 test models, session 10's
    dataset and constants), kernels within +-10 %: 80.3 % without these, 82.9 % with the
    power-of-two ones, 84.2 % with all (README, session 11)."""
    o = k.out_shapes[0] if k.out_shapes else ()
    i = k.in_shapes[0] if k.in_shapes else ()
    every = all(d > 0 and d & (d - 1) == 0 for s in k.in_shapes + k.out_shapes for d in s)
    last4 = (0,) * (4 - len(o[-4:])) + tuple(o[-4:])
    return ([_pow2(o[-1]) if o else 0.0, _pow2(i[-1]) if i else 0.0, float(every)]
            + [math.log2(d) if d > 0 else -1.0 for d in last4])


def _geometry(k: KernelFeatures) -> list[float]:
    """Conv geometry read from the 4-d shapes: the fewest channels (1: depthwise, whose
    weight gradient, ~16 GFLOP/s here, has the FLOPs per output and output size of a dense
    one at ~100), the input-to-output height ratio (stride 2 ran 39-83 GFLOP/s in the
    family sweep, stride 1 ~100) and the smallest window (a 1x1 or 3x3 weight). Held out
    (9 test models, session 5's dataset + 207 family blocks): 78.8 -> 80.9 % of kernels
    within +-10 %, predicted ones 55.3 -> 60.0 %."""
    s4 = [s for s in k.in_shapes + k.out_shapes if len(s) == 4]
    ins = [s for s in k.in_shapes if len(s) == 4]
    outs = [s for s in k.out_shapes if len(s) == 4]
    ratio = math.log2(max(ins[0][2], 1) / max(outs[0][2], 1)) if ins and outs else 0.0
    return [math.log10(min((s[1] for s in s4), default=0) + 1.0), ratio,
            math.log10(min((s[2] * s[3] for s in s4), default=0) + 1.0)]


def sched_vector(k: KernelFeatures, peak_flops: float, bandwidth: float) -> list[float]:
    """``vector`` followed by the kernel's schedule-aware features
    (``tir_features.SCHED_FEATURE_NAMES``); for kernels that carry them only."""
    if k.sched is None:
        raise ValueError("sched_vector: kernel has no schedule features; use vector")
    return vector(k, peak_flops, bandwidth) + list(k.sched)
