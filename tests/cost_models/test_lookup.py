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
