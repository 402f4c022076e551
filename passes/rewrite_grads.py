"""RewriteGrads: matmuls of a training step without needless transposes and batch sums.

``relax.transform.Gradient`` differentiates ``y = x @ W.T`` (x of shape (B, S, K)) into
``permute_dims(x) -> batched matmul (B, K, N) -> collapse_sum_to (K, N) -> permute_dims``:
four kernels, a (B, K, N) intermediate (75 MB for a GPT-2 MLP weight at batch 8), matmuls
with a reduction of S (64) instead of B x S (512) and a weight-sized transpose. Attention adds
transposes of Q, K, V and of their gradients around every batched matmul. Per ``matmul``:

- *weight gradient* (``matmul(permute_dims(x), g)`` summed over every batch axis, maybe
  transposed after): one 2-D matmul ``g2^T @ x2`` (N, K) (or ``x2^T @ g2`` (K, N)) of the
  (B x S, .) views of ``x`` and ``g``; the one transpose left is of an activation (B x S x N
  elements), a cache-blocked kernel (``schedule_rules``). GPT-2 block, 1 thread: the three
  batched weight-gradient matmuls + sums took 39 + 33 + 27 ms at batch 8.
- *other matmuls*: a ``permute_dims`` producing an operand, a ``collapse_sum_to``/``sum``
  over leading axes consuming the result and a ``permute_dims`` of the result fold into one
  ``call_tir`` of a TE reduction ``out[o...] = sum_r A[...] * B[...]`` that reads and writes
  the original layouts. A fold is made only when the output's innermost axis is still read
  with stride 1 by an operand (the lane axis the register tiling vectorises): ``x @ W.T`` in
  the forward keeps its weight transpose (folded, every vector lane would be a strided
  gather), and an operand permute read by other ops too is left alone.

Why the weight gradient is not folded the same way: a TE kernel reading ``g[m, n]`` along the
reduction walks both operands one row (12 KB) per step; at B x S = 512 that costs the same as
transpose + matmul (27-31 ms for a GPT-2 MLP weight), at 2048 (batch 32) 264 ms against 169.

The rewritten function computes the same values up to float32 summation order. Run it on the
Relax module after Gradient (SetupTrainer, SplitModule) and before ``LegalizeOps``; on a
legalized module it finds no ``relax.matmul`` and changes nothing. It is a graph rewrite
without target knowledge, but only CPU builds run it (``default_cpu_schedule``, build.py's
llvm path and ``lower_side``): the GPU build keeps the matmul forms dlight's Matmul rule
recognises (the folded kernels schedule under dlight, untimed on a GPU).
"""

from __future__ import annotations

import string

import tvm
from splitc.passes.compat import var_name
from tvm import relax, te
from tvm.ir import IRModule
from tvm.relax.expr_functor import PyExprMutator, mutator

__all__ = ["RewriteGrads", "rewrite_grads"]

_MATMUL = tvm.ir.Op.get("relax.matmul")
_PERMUTE = tvm.ir.Op.get("relax.permute_dims")
_COLLAPSE_SUM_TO = tvm.ir.Op.get("relax.collapse_sum_to")
_SUM = tvm.ir.Op.get("relax.sum")


def _static_shape(expr) -> list[int] | None:
    ty = getattr(expr, "ty", None)
    if not isinstance(ty, relax.TensorType) or ty.shape is None:
        return None
    shape = getattr(ty.shape, "values", None)
    if shape is None or not all(isinstance(d, tvm.tirx.IntImm) for d in shape):
        return None
    return [int(d) for d in shape]


def _axes(call: relax.Call, ndim: int) -> list[int]:
    axes = call.attrs.axes
    if axes is None:
        return list(range(ndim))[::-1]
    return [int(a) % ndim for a in axes]


class _Einsum:
    """``out[out_labels] = sum_{red} a[a_labels] * b[b_labels]`` over single-letter labels."""

    def __init__(self, a, a_lab, b, b_lab, out_lab, sizes, dtype):
        self.a, self.a_lab, self.b, self.b_lab = a, a_lab, b, b_lab
        self.out_lab, self.sizes, self.dtype = out_lab, sizes, dtype

    def emit(self, bb: relax.BlockBuilder, visit) -> relax.Expr:
        return bb.call_te(
            self.te_func(), visit(self.a), visit(self.b), primfunc_name_hint="matmul_folded"
        )

    def vectorizable(self) -> bool:
        # the lane axis (output innermost) must be some operand's innermost axis (stride 1)
        last = self.out_lab[-1]
        return self.a_lab[-1] == last or self.b_lab[-1] == last

    def te_func(self):
        red = [c for c in self.sizes if c not in self.out_lab]

        def compute(a: te.Tensor, b: te.Tensor) -> te.Tensor:
            def body(*idx):
                axes = {c: te.reduce_axis((0, self.sizes[c]), name=f"k{c}") for c in red}
                env = dict(zip(self.out_lab, idx, strict=True)) | axes
                va = a(*[env[c] for c in self.a_lab]).astype(self.dtype)
                vb = b(*[env[c] for c in self.b_lab]).astype(self.dtype)
                return te.sum(va * vb, axis=[axes[c] for c in red])

            shape = [self.sizes[c] for c in self.out_lab]
            return te.compute(shape, body, name="matmul")

        return compute


class _WeightGrad:
    """``sum_batch permute(x) @ g`` (then maybe transposed) as a 2-D matmul over B x S rows.

    ``x`` (..., S, K), ``g`` (..., S, N) -> ``x2^T @ g2`` (K, N), or ``g2^T @ x2`` (N, K) when
    the result was transposed, with ``x2``, ``g2`` the (B x S, .) views. The one transpose left
    (of an activation, B x S x N elements) is a cache-blocked kernel; the matmul is a plain
    row-major one. Folding the transpose into the matmul instead (a TE kernel reading
    ``g[m, n]`` along the reduction) walks both operands with a stride of one row per step:
    fine at B x S = 512 (GPT-2 block, batch 8: 27-31 ms either way for the MLP weights), 1.6x
    slower at 2048 (batch 32: 264 ms against 169 ms).
    """

    def __init__(self, x, g, rows: int, transposed: bool, out_dtype):
        self.x, self.g, self.rows, self.transposed = x, g, rows, transposed
        self.out_dtype = out_dtype

    def emit(self, bb: relax.BlockBuilder, visit) -> relax.Expr:
        x, g = visit(self.x), visit(self.g)
        x2 = bb.emit(relax.op.reshape(x, [self.rows, _static_shape(self.x)[-1]]))
        g2 = bb.emit(relax.op.reshape(g, [self.rows, _static_shape(self.g)[-1]]))
        lhs, rhs = (g2, x2) if self.transposed else (x2, g2)
        lhs_t = bb.emit(relax.op.permute_dims(lhs, [1, 0]))
        return relax.op.matmul(lhs_t, rhs, out_dtype=self.out_dtype)


def _matmul_einsum(a_shape, b_shape, out_shape) -> tuple[str, str, str, dict] | None:
    """Labels of a static ``matmul`` without size-1 broadcasting (B may be 2-D)."""
    if len(a_shape) < 2 or len(b_shape) < 2 or len(out_shape) != max(len(a_shape), len(b_shape)):
        return None
    letters = iter(string.ascii_letters)
    out = [next(letters) for _ in out_shape]
    k = next(letters)
    sizes = dict(zip(out, out_shape, strict=True)) | {k: a_shape[-1]}
    if b_shape[-2] != a_shape[-1]:
        return None
    nb = len(out_shape) - 2
    a_lab = out[nb - (len(a_shape) - 2) : nb] + [out[-2], k]
    b_lab = out[nb - (len(b_shape) - 2) : nb] + [k, out[-1]]
    for lab, shape in ((a_lab, a_shape), (b_lab, b_shape)):
        if [sizes[c] for c in lab] != list(shape):
            return None  # a broadcast size-1 batch axis: leave it to legalization
    return "".join(a_lab), "".join(b_lab), "".join(out), sizes


class _Planner:
    """Finds the folds: {var whose binding is replaced: _Einsum}, one per matmul."""

    def __init__(self, func: relax.Function):
        self.value: dict = {}  # dataflow var -> bound value
        self.users: dict = {}  # dataflow var -> [binding vars that read it]
        for block in func.body.blocks:
            if not isinstance(block, relax.DataflowBlock):
                continue
            for b in block.bindings:
                if isinstance(b, relax.VarBinding):
                    self.value[b.var] = b.value
            for var, users in relax.analysis.udchain(block).items():
                self.users[var] = list(users)
        self.plan: dict = {}

    def _call(self, var, op):
        v = self.value.get(var) if isinstance(var, relax.Var) else None
        return v if isinstance(v, relax.Call) and v.op == op else None

    def _only_user(self, var):
        """The one binding that reads ``var``, when nothing else (no output) does."""
        if not isinstance(var, relax.DataflowVar):
            return None  # a block output: read after the block
        users = self.users.get(var, [])
        return users[0] if len(users) == 1 and users[0] is not None else None

    def run(self) -> dict:
        for var, val in self.value.items():
            if isinstance(val, relax.Call) and val.op == _MATMUL:
                self._plan_matmul(var, val)
        return self.plan

    def _operand(self, arg, labels: str):
        """(source, its labels) when ``arg`` is a permute_dims read only here, else None."""
        p = self._call(arg, _PERMUTE)
        if p is None or self._only_user(arg) is None or _static_shape(p.args[0]) is None:
            return None
        lab = [""] * len(labels)
        for i, ax in enumerate(_axes(p, len(labels))):
            lab[ax] = labels[i]
        return p.args[0], "".join(lab)

    def _plan_matmul(self, var, call) -> None:
        a, b = call.args
        shapes = [_static_shape(e) for e in (a, b, var)]
        if any(s is None for s in shapes):
            return
        found = _matmul_einsum(*shapes)
        if found is None:
            return
        a_lab, b_lab, out_lab, sizes = found
        dtype = str(var.ty.dtype)
        a_opts = [o for o in (self._operand(a, a_lab), (a, a_lab)) if o is not None]
        b_opts = [o for o in (self._operand(b, b_lab), (b, b_lab)) if o is not None]
        # consumers: a sum over the leading (batch) axes, then a permute of the result
        outs = [(var, out_lab)]
        user = self._only_user(var)
        red = self._call(user, _COLLAPSE_SUM_TO)
        red = red if red is not None else self._call(user, _SUM)
        kept = self._reduced_labels(red, user, out_lab, sizes) if red is not None else None
        if kept is not None:
            outs.insert(0, (user, kept))
        last, lab = outs[0]
        user = self._only_user(last)
        perm = self._call(user, _PERMUTE)
        if perm is not None:
            outs.insert(0, (user, "".join(lab[i] for i in _axes(perm, len(lab)))))
        if kept is not None and len(kept) == 2 and len(out_lab) > 2:
            transposed = perm is not None and _axes(perm, 2) == [1, 0]
            wg = self._weight_grad(call, a_lab, b_lab, sizes, transposed)
            if wg is not None:
                self.plan[outs[0][0] if transposed else outs[-2][0]] = wg
                return
        # most folds first: output side (removes a kernel and often a big intermediate),
        # then the operands; the first one that keeps a stride-1 lane axis wins
        for out_var, out in outs:
            for a_src, a_src_lab in a_opts:
                for b_src, b_src_lab in b_opts:
                    if out_var is var and a_src is a and b_src is b:
                        return  # nothing to fold: legalization's matmul is the same kernel
                    fold = _Einsum(a_src, a_src_lab, b_src, b_src_lab, out, sizes, dtype)
                    if fold.vectorizable():
                        self.plan[out_var] = fold
                        return

    def _weight_grad(self, call, a_lab, b_lab, sizes, transposed) -> _WeightGrad | None:
        """``matmul(permute_dims(x, swap last two), g)`` summed over every batch axis."""
        a, g = call.args
        p = self._call(a, _PERMUTE)
        nd = len(a_lab)
        if p is None or len(b_lab) != nd or _axes(p, nd) != [*range(nd - 2), nd - 1, nd - 2]:
            return None
        if a_lab[:-2] != b_lab[:-2]:
            return None
        rows = 1
        for c in b_lab[:-1]:  # batch axes and S
            rows *= sizes[c]
        out_dtype = call.attrs.out_dtype
        return _WeightGrad(p.args[0], g, rows, transposed, out_dtype)

    @staticmethod
    def _reduced_labels(red: relax.Call, var, out: str, sizes: dict) -> str | None:
        """Output labels after a sum that drops whole leading axes, else None."""
        shape = _static_shape(var)
        if shape is None:
            return None
        if red.op == _SUM:
            if red.attrs.keepdims or red.attrs.axis is None:
                return None
            axes = sorted(int(a) % len(out) for a in red.attrs.axis)
            if axes != list(range(len(axes))):
                return None
            kept = out[len(axes) :]
        else:
            if len(shape) >= len(out):
                return None
            kept = out[len(out) - len(shape) :]
        return kept if len(kept) >= 2 and [sizes[c] for c in kept] == shape else None


@mutator
class _Rewriter(PyExprMutator):
    def __init__(self, mod: IRModule, plan: dict):
        super().__init__(mod)
        self.plan = plan
        self.count = 0

    def visit_var_binding_(self, binding: relax.VarBinding) -> None:
        fold = self.plan.get(binding.var)
        if fold is None:
            super().visit_var_binding_(binding)
            return
        new = fold.emit(self.builder_, self.visit_expr)
        self.count += 1
        name = var_name(binding.var)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(new, name_hint=name)
        else:
            new_var = self.builder_.emit_output(new, name_hint=name)
        self.set_var_remap(binding.var, new_var)


def rewrite_grads(mod: IRModule, weight_grads_only: bool = False) -> tuple[IRModule, int]:
    """(rewritten module, number of matmuls folded); functions without a fold are unchanged.

    ``weight_grads_only``: only the weight-gradient folds (plain Relax reshape, transpose and
    2-D matmul, which dlight's GPU matmul rule schedules), not the TE reductions of the
    other folds (GPU builds)."""
    total = 0
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        plan = _Planner(func).run()
        if weight_grads_only:
            plan = {v: f for v, f in plan.items() if isinstance(f, _WeightGrad)}
        if not plan:
            continue
        rw = _Rewriter(mod, plan)
        new = rw.visit_expr(func)
        new = relax.analysis.remove_all_unused(new)
        rw.builder_.update_func(gv, new)
        mod = rw.builder_.get()
        total += rw.count
    return mod, total


@tvm.transform.module_pass(opt_level=0, name="RewriteGrads")
class RewriteGrads:
    """``rewrite_grads`` as a module pass: after Gradient / SplitModule, before LegalizeOps."""

    def transform_module(self, mod: IRModule, _ctx) -> IRModule:
        return rewrite_grads(mod)[0]
