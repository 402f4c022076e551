"""RewriteGrads: each matmul of a training step as ONE kernel that reads its operands in place.

``relax.transform.Gradient`` differentiates ``y = x @ W.T`` (x of shape (B, S, K)) into
``permute_dims(x) -> batched matmul (B, K, N) -> collapse_sum_to (K, N) -> permute_dims``:
four kernels, a (B, K, N) intermediate (75 MB for a GPT-2 MLP weight at batch 8) and matmuls
of reduction length S (64) instead of B x S (512). Attention adds transposes of Q, K, V and
of their gradients around every batched matmul. This pass folds, per ``matmul``:

- a ``permute_dims`` producing either operand (the kernel reads the original layout);
- a ``collapse_sum_to`` / ``sum`` over the leading (batch) axes consuming it (those axes
  become reduction axes of the same kernel);
- a ``permute_dims`` consuming the result (the kernel writes the permuted layout);

into one ``call_tir`` of a TE reduction ``out[o...] = sum_r A[...] * B[...]``. A fold is made
only when the output's innermost axis is still read with stride 1 by one operand (the lane
axis the register tiling of ``passes/schedule_tiling.py`` vectorises), so ``x @ W.T`` in the
forward keeps its weight transpose (folding it would make every vector lane a strided
gather). Folds that need data computed once for several readers (an intermediate with other
users) are skipped. The result is numerically the same function (the sum order changes:
float32 rounding only).

GPT-2 block at batch 8 (1 thread): the three weight gradients went from 39 + 33 + 27 ms
(batched matmul + sum) plus 9.5 ms per weight-gradient transpose to ... (see
tools/bench_vs_pytorch.py).

Run it on the Relax module after Gradient (SetupTrainer, SplitModule) and before
``LegalizeOps``: it rewrites ``relax.matmul`` calls, which legalization removes. It is a pure
graph rewrite (no target knowledge), valid for every target; ``default_cpu_schedule`` runs it
first, and on an already legalized module it changes nothing.
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
        new = self.builder_.call_te(
            fold.te_func(),
            self.visit_expr(fold.a),
            self.visit_expr(fold.b),
            primfunc_name_hint="matmul_folded",
        )
        self.count += 1
        name = var_name(binding.var)
        if isinstance(binding.var, relax.DataflowVar):
            new_var = self.builder_.emit(new, name_hint=name)
        else:
            new_var = self.builder_.emit_output(new, name_hint=name)
        self.set_var_remap(binding.var, new_var)


def rewrite_grads(mod: IRModule) -> tuple[IRModule, int]:
    """(rewritten module, number of matmuls folded); functions without a fold are unchanged."""
    total = 0
    for gv, func in list(mod.functions.items()):
        if not isinstance(func, relax.Function):
            continue
        plan = _Planner(func).run()
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
