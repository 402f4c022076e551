"""The Relax rewrites of the GPU build (passes/build_gpu.py: gpu_pipeline), checked on llvm where
the TE is target-independent: RewriteGrads' weight-gradient folds alone give the same step
as no fold (the GPU runs of tools/bench_gpu.py check every parameter against PyTorch)."""

from __future__ import annotations

import numpy as np
import torch
import tvm
from splitc.passes.rewrite_grads import _Planner, _WeightGrad, rewrite_grads
from splitc.tools.bench_vs_pytorch import train_module
from tvm import relax


class _Mlp(torch.nn.Module):
    """Two linears over (batch, seq, features), mean over seq: batched weight gradients."""

    def __init__(self):
        super().__init__()
        self.a, self.b = torch.nn.Linear(16, 32), torch.nn.Linear(32, 8)

    def forward(self, x):
        return self.b(torch.nn.functional.gelu(self.a(x))).mean(1)


def _mlp():
    torch.manual_seed(0)
    return _Mlp(), (4, 6, 16), 8


def test_weight_grad_folds_alone_equal_the_unfolded_step():
    model, shape, classes = _mlp()
    mod, params, _ = train_module(model, shape, classes)
    new, n = rewrite_grads(mod, weight_grads_only=True)
    plan = _Planner(mod["backbone_loss_adjoint"]).run()
    assert n == sum(isinstance(f, _WeightGrad) for f in plan.values()) == 2
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape).astype("float32")
    y = rng.integers(0, classes, shape[0]).astype("int64")
    outs = []
    for m in (mod, new):
        vm = relax.VirtualMachine(tvm.compile(m, "llvm"), tvm.cpu())
        args = [tvm.runtime.tensor(a) for a in (x, *params, y)]
        out = vm["backbone_loss_adjoint"](*args)
        outs.append([out[0].numpy()] + [g.numpy() for g in out[1]])
    for a, b in zip(*outs):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
