"""Register tiling (passes/schedule_tiling.py): every tile shape computes what the naive loops
compute, on awkward shapes (prime extents, K not a multiple of the K panel, batched and
transposed operands, weight-gradient convs through rfactor), and the knobs a tuner sees.

Float32 sums in a different order: rtol 1e-5 with an absolute floor of 1e-5 x sqrt(K) (K
products of unit normals per output; reordering moves each by a few ulps of the partial sums).
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import tvm
from splitc.passes.schedule_rules import lanes_for, schedule_prim_func
from splitc.passes.schedule_tiling import (
    TileKnobs,
    _block_facts,
    _find_rfactor_axis,
    _find_vector_axis,
    _register_tile,
    _rfactor_block,
    tile_candidates,
)
from splitc.passes.schedules import host_llvm_target
from tvm import te, topi

TARGET = host_llvm_target()
LANES = lanes_for(TARGET, 32)


def _matmul(m, n, k, batch=None, trans_a=False):
    """C = A @ B, A read transposed (A[k, m], a weight gradient X^T dY) when ``trans_a``."""
    pre = (batch,) if batch else ()
    a = te.placeholder((*pre, k, m) if trans_a else (*pre, m, k), name="A")
    b = te.placeholder((*pre, k, n), name="B")
    r = te.reduce_axis((0, k), name="k")

    def body(*ix):
        *bi, i, j = ix
        av = a[(*bi, r, i)] if trans_a else a[(*bi, i, r)]
        return te.sum(av * b[(*bi, r, j)], axis=r)

    c = te.compute((*pre, m, n), body, name="matmul")
    return te.create_prim_func([a, b, c])


def _conv_wgrad(n, c, f, hw):
    """The weight gradient of a 3x3 pad-1 conv, as Relax legalizes it: conv2d in CNHW layout
    (output [f, c, 3, 3], reduction over batch and the image)."""
    x = te.placeholder((n, c, hw, hw), name="x")
    dy = te.placeholder((n, f, hw, hw), name="dy")
    pad = topi.nn.pad(x, [0, 0, 1, 1], [0, 0, 1, 1], name="pad_temp")
    rc = te.reduce_axis((0, n), "rc")
    ry = te.reduce_axis((0, hw), "ry")
    rx = te.reduce_axis((0, hw), "rx")
    out = te.compute(
        (f, c, 3, 3),
        lambda ff, nn, yy, xx: te.sum(
            pad[rc, nn, yy + ry, xx + rx] * dy[rc, ff, ry, rx], axis=[rc, ry, rx]
        ),
        name="conv2d_cnhw",
    )
    return te.create_prim_func([x, dy, out])


def _run(func, *inputs):
    lib = tvm.compile(tvm.IRModule({"k": func.with_attr("global_symbol", "k")}), TARGET).jit()
    out_t = func.params[-1].ty
    out = np.zeros([int(d) for d in out_t.shape], "float32")
    args = [tvm.runtime.tensor(a) for a in (*inputs, out)]
    lib["k"](*args)
    return args[-1].numpy()


def _inputs(func, seed=0):
    rng = np.random.default_rng(seed)
    return [
        rng.standard_normal([int(d) for d in p.ty.shape]).astype("float32")
        for p in func.params[:-1]
    ]


def _tiled(func, knobs):
    """``func`` with its reduction block register-tiled by ``knobs`` (None: the heuristic),
    through rfactor when the output has no lane axis (what schedule_rules does)."""
    sch = tvm.s_tir.Schedule(func)
    blocks = [sch.get_sblock(n) for n in _TILED if _has(sch, n)]
    info = _block_facts(sch, blocks[0])
    found = _find_vector_axis(info, LANES)
    if found is None:
        info = _rfactor_block(sch, info, _find_rfactor_axis(info, LANES), LANES)
        found = _find_vector_axis(info, LANES)
    _register_tile(sch, info, *found, LANES, knobs)
    return sch.mod["main"]


_TILED = ("matmul", "conv2d_cnhw", "conv2d_nchw")


def _candidates(func, block, lanes=LANES):
    sch = tvm.s_tir.Schedule(func)
    return tile_candidates(_block_facts(sch, sch.get_sblock(block)), lanes)


def _has(sch, name):
    try:
        sch.get_sblock(name)
        return True
    except Exception:  # noqa: BLE001
        return False


def _close(got, want, k):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.sqrt(k))


@pytest.mark.parametrize(
    ("m", "n", "k", "batch", "trans_a"),
    [
        (40, 64, 37, None, False),  # prime K
        (13, 48, 29, None, False),  # prime rows: rows tile 1
        (24, 96, 300, 3, False),  # batched, K not a multiple of 128/256/512
        (48, 32, 96, None, True),  # A read transposed (weight gradient X^T @ dY)
        (16, 1024, 1024, None, False),  # B of 4 MiB: rows innermost + 256-long K panels
    ],
)
def test_every_candidate_matches_numpy(m, n, k, batch, trans_a):
    func = _matmul(m, n, k, batch, trans_a)
    a, b = _inputs(func)
    want = np.matmul(np.swapaxes(a, -1, -2) if trans_a else a, b)
    cands = _candidates(func, "matmul")
    assert 2 <= len(cands) <= 12
    for knobs in [None, *cands]:
        _close(_run(_tiled(func, knobs), a, b), want, k)


def test_heuristic_is_the_first_candidate_and_the_default():
    func = _matmul(16, 1024, 1024)
    cands = _candidates(func, "matmul", 16)
    # B is 1024 x 1024 x 4 B = 4 MiB > 2 MiB: row tiles innermost; K = 1024 >= 4 x 256: panels
    assert cands[0] == TileKnobs(lane_tile=32, rows=8, rows2=1, rows_inner=True, k_block=256)
    assert len(set(cands)) == len(cands)
    # knobs=None and the first candidate give the same schedule
    tvm.ir.assert_structural_equal(_tiled(func, None), _tiled(func, cands[0]))


def test_small_lane_operand_keeps_lanes_innermost():
    # B is 64 x 256 x 4 B = 64 KiB: lanes innermost, no K panels
    assert _candidates(_matmul(64, 256, 64), "matmul", 16)[0] == TileKnobs(
        lane_tile=32, rows=8, rows2=1, rows_inner=False, k_block=0
    )


def test_conv_weight_gradient_candidates_match_numpy():
    func = _conv_wgrad(4, 8, 12, 16)
    x, dy = _inputs(func, 1)
    xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
    want = np.zeros((12, 8, 3, 3), "float32")
    for yy in range(3):
        for xx in range(3):
            want[:, :, yy, xx] = np.einsum(
                "nchw,nfhw->fc", xp[:, :, yy : yy + 16, xx : xx + 16], dy
            )
    cands = _candidates(func, "conv2d_cnhw")
    assert cands and all(c.lane_tile <= LANES for c in cands)  # lanes of the rfactor block
    for knobs in [None, *cands]:
        _close(_run(_tiled(func, knobs), x, dy), want, 4 * 16 * 16)


def test_the_driver_schedules_awkward_shapes_exactly():
    for func in (_matmul(37, 41, 43), _matmul(8, 96, 1024, 2), _conv_wgrad(3, 5, 7, 12)):
        new, problems = schedule_prim_func(func, TARGET)
        assert problems == []
        inputs = _inputs(func, 2)
        _close(_run(new, *inputs), _run(func, *inputs), 1024)


@pytest.mark.parametrize(
    ("knobs", "match"),
    [
        (TileKnobs(lane_tile=24, rows=8), "lane_tile=24 does not divide the axis extent 64"),
        (TileKnobs(lane_tile=32, rows=3), "rows=3 does not divide the axis extent 16"),
        (TileKnobs(lane_tile=2, rows=8), "lane_tile=2 is below 4"),
        (TileKnobs(lane_tile=32, rows=8, k_block=40), "k_block=40 does not divide .* 96 into"),
    ],
)
def test_invalid_knobs_raise(knobs, match):
    func = _matmul(16, 64, 96)
    sch = tvm.s_tir.Schedule(func)
    info = _block_facts(sch, sch.get_sblock("matmul"))
    with pytest.raises(ValueError, match=match):
        _register_tile(sch, info, *_find_vector_axis(info, 16), 16, knobs)


def _strided_wgrad(n, c, f, hw):
    """Weight gradient of a 3x3 stride-2 pad-1 conv as legalized: a 4x4 window (sliced to 3x3
    afterwards) read with stride 2 from the padded input."""
    x = te.placeholder((n, c, hw, hw), name="x")
    dy = te.placeholder((n, f, hw // 2, hw // 2), name="dy")
    pad = topi.nn.pad(x, [0, 0, 1, 1], [0, 0, 1, 1], name="pad_temp")
    rc = te.reduce_axis((0, n), "rc")
    ry = te.reduce_axis((0, hw // 2), "ry")
    rx = te.reduce_axis((0, hw // 2), "rx")
    out = te.compute(
        (f, c, 4, 4),
        lambda ff, nn, yy, xx: te.sum(
            pad[rc, nn, ry * 2 + yy, rx * 2 + xx] * dy[rc, ff, ry, rx], axis=[rc, ry, rx]
        ),
        name="conv2d_cnhw",
    )
    return te.create_prim_func([x, dy, out])


@pytest.mark.parametrize(
    "func",
    [
        pytest.param(_strided_wgrad(4, 8, 8, 32), id="stride2-weight-grad"),
        pytest.param(
            te.create_prim_func(
                [
                    x := te.placeholder((2, 8, 32, 32), name="x"),
                    w := te.placeholder((16, 8, 3, 3), name="w"),
                    topi.nn.conv2d_nchw(x, w, 2, 1, 1),
                ]
            ),
            id="stride2-forward",
        ),
    ],
)
def test_stride2_reads_become_contiguous_and_stay_exact(func):
    new, problems = schedule_prim_func(func, TARGET)
    assert problems == []
    # the padded input (34 x 34) is stored as 2 x 2 phases of 17 x 17: [n, c, 2, 2, 17, 17]
    alloc = next(ln for ln in new.script().splitlines() if "pad_temp = T.sblock_alloc" in ln)
    assert re.sub(r"T\.int64\((\d+)\)", r"\1", alloc).endswith(", 2, 2, 17, 17))")
    inputs = _inputs(func, 3)
    _close(_run(new, *inputs), _run(func, *inputs), 4 * 16 * 16)


def _matmul_bt(m, n, k, batch=None):
    """C = A @ B^T with B stored [n, k] (a linear layer's data gradient dY @ W)."""
    pre = (batch,) if batch else ()
    a = te.placeholder((*pre, m, k), name="A")
    b = te.placeholder((*pre, n, k), name="B")
    r = te.reduce_axis((0, k), name="k")
    c = te.compute(
        (*pre, m, n),
        lambda *ix: te.sum(a[(*ix[:-1], r)] * b[(*ix[:-2], ix[-1], r)], axis=r),
        name="matmul",
    )
    return te.create_prim_func([a, b, c])


@pytest.mark.parametrize(("m", "n", "k", "batch"), [(24, 64, 40, None), (13, 32, 96, 3)])
def test_transposed_lane_operand_is_packed_and_exact(m, n, k, batch):
    func = _matmul_bt(m, n, k, batch)
    new, problems = schedule_prim_func(func, TARGET)
    assert problems == []
    # B [n, k] is copied to B_global [k, n] inside the kernel: the lane axis n is contiguous
    alloc = next(ln for ln in new.script().splitlines() if "B_global = T.sblock_alloc" in ln)
    want_shape = ", ".join(str(d) for d in (*((batch,) if batch else ()), k, n))
    assert f"(({want_shape}))" in alloc
    a, b = _inputs(func, 4)
    _close(_run(new, a, b), np.matmul(a, np.swapaxes(b, -1, -2)), k)


def test_row_sum_is_not_packed():
    # one reader: a row sum stays on the rfactor path (no transposed copy of its input)
    x = te.placeholder((64, 128), name="x")
    r = te.reduce_axis((0, 128), name="k")
    func = te.create_prim_func([x, te.compute((64,), lambda i: te.sum(x[i, r], axis=r))])
    new, problems = schedule_prim_func(func, TARGET)
    assert problems == [] and "_global" not in new.script() and "_rf" in new.script()


def _conv(n, c, f, hw, stride):
    x = te.placeholder((n, c, hw, hw), name="x")
    w = te.placeholder((f, c, 3, 3), name="w")
    return te.create_prim_func([x, w, topi.nn.conv2d_nchw(x, w, stride, 1, 1)])


@pytest.mark.parametrize(
    ("func", "block"),
    [
        pytest.param(_conv(2, 8, 16, 16, 1), "conv2d_nchw", id="conv-forward"),
        pytest.param(_conv(2, 8, 16, 32, 2), "conv2d_nchw", id="conv-stride2-forward"),
        pytest.param(_strided_wgrad(2, 8, 8, 32), "conv2d_cnhw", id="conv-stride2-weight-grad"),
        pytest.param(_matmul_bt(40, 64, 96, 2), "matmul", id="matmul-b-transposed"),
    ],
)
def test_every_candidate_is_exact_on_convs_and_packed_operands(func, block):
    # what a tuner times must compute the same thing: each candidate against the naive loops
    inputs = _inputs(func, 5)
    want = _run(func, *inputs)
    cands = _candidates(func, block)
    assert len(cands) >= 2
    for knobs in [None, *cands]:
        _close(_run(_tiled(func, knobs), *inputs), want, 8 * 9 * 32)


@pytest.mark.parametrize(
    "func",
    [
        pytest.param(_conv_wgrad(4, 16, 32, 8), id="3x3"),
        pytest.param(_strided_wgrad(2, 16, 16, 16), id="3x3-stride2"),
        pytest.param(_conv_wgrad(2, 16, 32, 16), id="3x3-16x16-k-panels"),
    ],
)
def test_weight_gradient_with_channel_lanes_is_a_gemm_tile_and_exact(func):
    # 16 and 32 channels fill 16-lane vectors: lanes along a channel (its operand packed with
    # the channel innermost), no rfactor; a 3-channel gradient would keep rfactor
    new, problems = schedule_prim_func(func, TARGET)
    assert problems == []
    script = new.script()
    if LANES == 16:  # the host has AVX-512 (a 4-lane generic target tiles other axes)
        assert "_global = T.sblock_alloc_buffer" in script and "_rf" not in script
    inputs = _inputs(func, 6)
    _close(_run(new, *inputs), _run(func, *inputs), 4 * 8 * 8)
    for knobs in _candidates(func, "conv2d_cnhw"):
        _close(_run(_tiled(func, knobs), *inputs), _run(func, *inputs), 4 * 8 * 8)


def test_channel_lanes_with_k_panels_accumulate_in_a_local_tile():
    # 16-long image rows: panels of 8 columns run outside the row tiles; the accumulators of
    # all rows of a task live in a local buffer across the panels
    func = _conv_wgrad(2, 16, 32, 16)
    knobs = TileKnobs(lane_tile=2 * LANES, rows=8, rows2=1, rows_inner=True, k_block=8)
    if LANES == 16:
        assert knobs in _candidates(func, "conv2d_cnhw")
    inputs = _inputs(func, 8)
    _close(_run(_tiled(func, knobs), *inputs), _run(func, *inputs), 2 * 16 * 16)


@pytest.mark.parametrize(
    ("n", "hw", "channel_lanes"),
    [(1, 28, True), (1, 14, True), (8, 7, True), (1, 7, False), (1, 32, False), (1, 16, False)],
)
def test_rows_of_no_whole_vectors_take_channel_lanes(n, hw, channel_lanes):
    # 28 = 1.75 vectors, 14 = 0.875, 7 = 0.44: output channels become the lanes (weights packed
    # [c, kh, kw, f]) and rows an image axis of at least 8 (the batch of 8 at 7x7; one 7x7
    # image has none: it keeps a partial vector along the row); 32 and 16 are whole vectors
    func = _conv(n, 8, 16, hw, 1)
    new, problems = schedule_prim_func(func, TARGET)
    assert problems == []
    if LANES == 16:
        assert ("_global = T.sblock_alloc_buffer" in new.script()) == channel_lanes
    inputs = _inputs(func, 7)
    _close(_run(new, *inputs), _run(func, *inputs), 8 * 9)
