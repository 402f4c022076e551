"""cost_models/attribute.py: measured kernel time back to the planner's ops, exact in sum."""

import pytest
from splitc.cost_models.attribute import attribute
from splitc.cost_models.base import OpFeatures
from splitc.cost_models.profiles import DeviceProfile

PROF = DeviceProfile("p", "cpu", {"float32": 1e11}, 1e10, 0.0,
                     {"status": "prior", "source": "test", "date": "2026-01-01", "notes": ""})


def _relu(n):
    return OpFeatures("relax.nn.relu", n, 4 * n, 4 * n, 0, ((n,),), ((n,),))


def _dense():
    # 64 x 64 @ 64 x 64 with a weight: forward, data and weight gradients, SGD update
    return OpFeatures("relax.matmul", 2 * 64**3, 2 * 64 * 64 * 4, 64 * 64 * 4, 64 * 64 * 4,
                      ((64, 64), (64, 64)), ((64, 64),), has_params=True)


def _row(role, family, calls, seconds):
    return {"role": role, "features": {"family": family}, "calls": calls, "seconds": seconds}


def test_costs_add_up_to_the_step_and_follow_role_and_family():
    ops = [("fc", _dense()), ("act1", _relu(1024)), ("act2", _relu(3072))]
    kern = [_row("forward", "matmul", 1, 40e-6), _row("forward", "ewise", 2, 4e-6),
            _row("backward", "matmul", 2, 30e-6), _row("backward", "ewise", 1, 16e-6),
            _row("update", "ewise", 1, 5e-6), _row("forward", "loss", 1, 3e-6)]
    # kernels: 40 + 8 + 60 + 16 + 5 + 3 = 132 us; the step measured 150 us
    got = attribute(ops, kern, 150e-6, PROF)
    assert sum(c.training for c in got.values()) == pytest.approx(150e-6, rel=1e-12)
    # op kernels: fc 1 fwd + 2 bwd matmul + 1 update; act1, act2 1 fwd + 1 bwd ewise: 8 in
    # all, the 18 us beyond the kernels is 2.25 us each
    extra = 18e-6 / 8
    # forward/matmul (40 us) only has fc's kernel; the loss (no op here) goes over the role's
    # 3 forward op kernels in proportion to roofline time (bytes: fc 49152, act1 8192, act2
    # 24576; FLOPs: 524288 / 1e11 = 5.24 us vs 49152 / 1e10 = 4.92 us -> fc is FLOP-bound)
    w = [2 * 64**3 / 1e11, 8192 / 1e10, 24576 / 1e10]
    loss = [3e-6 * x / sum(w) for x in w]
    assert got["fc"].forward == pytest.approx(40e-6 + loss[0] + extra, rel=1e-9)
    # forward/ewise (8 us) over act1 and act2 by bytes: 1 : 3
    assert got["act1"].forward == pytest.approx(2e-6 + loss[1] + extra, rel=1e-9)
    assert got["act2"].forward == pytest.approx(6e-6 + loss[2] + extra, rel=1e-9)
    assert got["fc"].backward == pytest.approx(60e-6 + 2 * extra, rel=1e-9)
    assert got["fc"].update == pytest.approx(5e-6 + extra, rel=1e-9)
    # a step faster than its kernels (noise): nothing is taken away from the kernels
    fast = attribute(ops, kern, 100e-6, PROF)
    assert sum(c.training for c in fast.values()) == pytest.approx(132e-6, rel=1e-12)


def test_nothing_measured_costs_nothing():
    got = attribute([("x", OpFeatures("relax.nn.relu", 0, 0, 0, 0, input_grad=False))], [],
                    None, PROF)
    assert got["x"].training == 0.0
