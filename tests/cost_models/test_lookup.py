"""Batch-scaled look-up (cost_models/lookup.py): exact keys, ratios and the model's use."""

import dataclasses

import pytest
from splitc.cost_models.features import KernelFeatures
from splitc.cost_models.lookup import batch_key, scaled_time, scaled_twins


def _conv(n, cin=64, cout=64, hw=16):
    """A 3x3 conv on a batch of n: FLOPs, bytes and shapes all follow n."""
    flops = 2.0 * n * cout * hw * hw * cin * 9
    return KernelFeatures(("conv2d", "add"), flops, 4 * n * cin * hw * hw + 4 * cout * cin * 9,
                          4 * n * cout * hw * hw, 4 * cout * cin * 9, "forward",
                          ((n, cin, hw, hw), (cout, cin, 3, 3), (1, cout, 1, 1)),
                          ((n, cout, hw, hw),))


def test_batch_key_drops_only_the_leading_dimension():
    assert batch_key(_conv(8)) == batch_key(_conv(32)) \
        == "^conv2d+add|64x16x16,64x3x3,64x1x1|64x16x16|float32"
    assert batch_key(_conv(8, cin=32)) != batch_key(_conv(8))
    assert batch_key(dataclasses.replace(_conv(8), kinds=("conv2d",))) != batch_key(_conv(8))
    # 1-d tensors are kept whole; no shaped first argument: no key
    k = KernelFeatures(("add",), 64.0, 512, 256, 0, "forward", ((64,), (64,)), ((64,),))
    assert batch_key(k) == "^add|64,64|64|float32"
    assert batch_key(dataclasses.replace(k, in_shapes=())) is None
    # reductions are never scaled: the leading dim is often what they sum over
    bias_grad = KernelFeatures(("collapse_sum",), 4096.0, 16384, 256, 0, "backward",
                               ((64, 64),), ((64,),))
    assert batch_key(bias_grad) is None
    assert scaled_twins([(bias_grad, 1e-5)]) == {}


def test_scaled_time_takes_the_nearest_batch_times_the_work_ratio():
    table = scaled_twins([(_conv(8), 2e-3), (_conv(8), 1.9e-3), (_conv(32), 9e-3)])
    # the fastest of repeated measurements, one entry per batch
    key = batch_key(_conv(8))
    assert table == {key: [[8, _conv(8).flops, 1.9e-3], [32, _conv(32).flops, 9e-3]]}
    # batch 16: 2x batch 8 and 0.5x batch 32 are equally near; the longer run wins
    assert scaled_time(table, _conv(16)) == pytest.approx(4.5e-3)
    assert scaled_time(table, _conv(12)) == pytest.approx(1.9e-3 * 1.5)
    assert scaled_time(table, _conv(64)) == pytest.approx(1.8e-2)
    assert scaled_time(table, _conv(2)) == pytest.approx(1.9e-3 / 4)
    # more than 4x away from every measured batch, or another kernel: not scaled
    assert scaled_time(table, _conv(1)) is None
    assert scaled_time(table, _conv(256)) is None
    assert scaled_time(table, _conv(16, cin=32)) is None


def test_scaled_time_needs_the_work_to_follow_the_leading_dimension():
    table = scaled_twins([(_conv(8), 2e-3)])
    # same shapes but twice the FLOPs at the same batch (another algorithm): not the same loop
    odd = dataclasses.replace(_conv(16), flops=4 * _conv(8).flops)
    assert scaled_time(table, odd) is None
    # layout kernels have no FLOPs: bytes moved are the work
    tr = lambda n: KernelFeatures(("transpose",), 0.0, 4096 * n, 4096 * n, 0, "backward",
                                  ((n, 32, 32),), ((n, 32, 32),))
    assert scaled_time(scaled_twins([(tr(4), 1e-5)]), tr(8)) == pytest.approx(2e-5)


def test_lookup_doctests():
    import doctest

    from splitc.cost_models import lookup

    assert doctest.testmod(lookup).failed == 0


def _sum(sched, n=8):
    """A sum over one axis of an n x n matrix: the same kernel_key whichever axis it sums."""
    return KernelFeatures(("sum",), float(n * n), 4 * n * n, 4 * n, 0, "backward", ((n, n),),
                          ((n,),), sched=sched)


def test_twins_tell_loop_nests_apart_and_take_the_median():
    from splitc.cost_models.lookup import kernel_key, measured_time, structure_key, twins

    rows_, cols = _sum((1.0, 2.0)), _sum((1.0, 3.0))
    assert kernel_key(rows_) == kernel_key(cols)
    assert structure_key(rows_) != structure_key(cols)
    rows = [{"features": k.to_json(), "seconds": s}
            for k, s in ((rows_, 1e-6), (rows_, 3e-6), (rows_, 8e-6), (cols, 20e-6))]
    table = twins(rows)
    # each loop nest at the median of its own twins; the kernel_key at the median of all
    assert measured_time(table, rows_) == 3e-6
    assert measured_time(table, cols) == 20e-6
    assert table[kernel_key(rows_)] == pytest.approx(5.5e-6)
    assert twins(rows, "min")[structure_key(rows_)] == 1e-6
    # a loop nest never measured: the kernel_key's figure, or nothing when strict
    other = _sum((4.0, 5.0))
    assert measured_time(table, other) == pytest.approx(5.5e-6)
    assert measured_time(table, other, strict=True) is None
    # kernels without schedule features (the planner's op kernels) have only the kernel_key
    assert structure_key(_sum(None)) is None
    assert measured_time(table, _sum(None), strict=True) == pytest.approx(5.5e-6)
    with pytest.raises(ValueError, match="twins: unknown stat 'mean'; use min or median"):
        twins(rows, "mean")


def test_elementwise_twins_by_element_counts_need_the_same_loops():
    from splitc.cost_models.lookup import loose_key, measured_time, twins

    loops = lambda inner: (1.0, 0.0, 2.76, 2.76, 0.0, 0.0, 1.0, 0.0, inner, 0.0, 0.0, 1.0, 0.0,
                           0.0, 0.0)
    sgd = lambda shape, inner: KernelFeatures(
        ("multiply", "subtract"), 1152.0, 4608, 2304, 0, "update", (shape, shape), (shape,),
        sched=loops(inner) + (7.0,))
    flat, conv_w = sgd((576,), 2.76), sgd((64, 1, 3, 3), 0.48)
    assert loose_key(flat) != loose_key(conv_w)
    assert loose_key(flat).startswith("~multiply+subtract|576,576|576|float32|1152|1,0,2.76,")
    table = twins([{"features": flat.to_json(), "seconds": 15e-9}])
    # the same element counts and loops in another shape: found; another innermost extent: not
    assert measured_time(table, sgd((8, 72), 2.76)) == 15e-9
    assert measured_time(table, conv_w) is None


def test_features_doctests():
    import doctest

    from splitc.cost_models import features

    assert doctest.testmod(features).failed == 0
