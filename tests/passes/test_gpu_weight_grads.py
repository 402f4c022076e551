"""GPU conv weight gradients (passes/gpu_weight_grads.py): the split reduction equals torch's
conv2d_weight, with and without partial sums, and the split fills the GPU's thread blocks.

The kernels are checked here on llvm (the TE is target-independent); the CUDA build of the
same pass runs in ``tools/bench_gpu.py``, which checks every parameter after a training step
against PyTorch on the GPU. Tolerance: against float64, growing like sqrt of the sum's length.
"""

from __future__ import annotations

import os
import sys

import numpy as np
import pytest
import torch
import tvm
from splitc.passes.gpu_weight_grads import (
    _BLOCKS,
    _MIN_K,
    _PART_BYTES,
    choose_split,
    legalize_gpu_weight_grads,
)
from tvm import relax

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "helpers"))
from relax_grads import call_names, conv_grad_module

CASES = [  # x shape, w shape, stride, pad
    ((2, 16, 8, 8), (24, 16, 1, 1), 2, 0),  # 2x2 window sliced to 1x1
    ((4, 16, 8, 8), (8, 16, 3, 3), 2, 1),  # 4x4 window sliced to 3x3
    ((2, 16, 9, 9), (8, 16, 3, 3), 2, 1),  # the window is the filter, no slice
    ((8, 8, 32, 32), (8, 8, 3, 3), 1, 1),  # small ResNet-like: split into partial sums
    ((2, 3, 16, 16), (16, 3, 7, 7), 2, 3),  # RGB stem
]


@pytest.mark.parametrize("xs,ws,stride,pad", CASES)
def test_weight_grad_equals_torch(xs, ws, stride, pad):
    mod, gs = conv_grad_module(xs, ws, stride, pad)
    new = legalize_gpu_weight_grads(mod)
    ops = call_names(new)
    assert "conv2d_wgrad_gemm" in ops and "relax.strided_slice" not in ops
    assert ops.count("relax.nn.conv2d") == 1  # the forward conv alone
    vm = relax.VirtualMachine(tvm.compile(new, "llvm"), tvm.cpu())
    rng = np.random.default_rng(0)
    x, w, g = (rng.standard_normal(s).astype("float32") for s in (xs, ws, gs))
    out = vm["main_adjoint"](*(tvm.runtime.tensor(a) for a in (x, w, g)))
    want = torch.nn.grad.conv2d_weight(
        torch.from_numpy(x).double(), ws, torch.from_numpy(g).double(), stride=stride, padding=pad
    ).numpy()
    # float32 sums of K products of unit normals: rounding grows like sqrt(K) (K = 8192 for
    # the split case: ~4e-4 on values up to ~20)
    k = xs[0] * gs[2] * gs[3]
    np.testing.assert_allclose(out[1][0].numpy(), want, atol=4e-6 * k**0.5, rtol=1e-5)


def test_split_of_the_small_resnet_layer_uses_partial_sums():
    # the case CASES[3] scales up from: 32 images of 32x32, 32 -> 32 channels, 3x3
    n, gh, gw, co, ck = 32, 32, 32, 32, 32 * 9
    nb, band = choose_split(n, gh, gw, co, ck)
    parts = (n // nb) * (gh // band)
    tiles = 1 * 5  # 32 output channels x 288 columns in 32 x 64 tiles
    assert parts * tiles >= _BLOCKS and nb * band * gw >= _MIN_K
    assert (nb, band) == (1, 16)  # the fewest partials that fill the blocks: 64


@pytest.mark.parametrize(
    "shape,want",
    [
        ((32, 7, 7, 512, 512 * 9), (32, 7)),  # 1152 output tiles already: no split
        ((32, 112, 112, 64, 3 * 49), (4, 16)),  # ResNet-50's stem at batch 32: 56 partials
    ],
)
def test_split_choice(shape, want):
    n, gh, _, co, ck = shape
    got = choose_split(*shape)
    assert got == want
    assert (n // got[0]) * (gh // got[1]) * co * ck * 4 <= _PART_BYTES


def test_gather_larger_than_the_limit_keeps_tvm_form(monkeypatch):
    import splitc.passes.gpu_weight_grads as G

    mod, _ = conv_grad_module((2, 16, 8, 8), (8, 16, 3, 3), 1, 1)
    monkeypatch.setattr(G, "_COLS_BYTES", 2 * 16 * 9 * 8 * 8 * 4 - 1)  # one byte too few
    tvm.ir.assert_structural_equal(legalize_gpu_weight_grads(mod), mod)
    monkeypatch.setattr(G, "_COLS_BYTES", 2 * 16 * 9 * 8 * 8 * 4)
    assert "conv2d_wgrad_gemm" in call_names(legalize_gpu_weight_grads(mod))
