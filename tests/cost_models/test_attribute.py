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


def _site(function, symbol, *parts):
    return {"function": function, "symbol": symbol, "parts": [list(p) for p in parts]}


def _krow(function, symbol, calls, seconds, role="forward", family="ewise"):
    return {"function": function, "symbol": symbol, "calls": calls, "seconds": seconds,
            "role": role, "features": {"family": family}}


def test_per_binding_costs_follow_the_traced_parts_exactly():
    ops = [("fc", _dense()), ("act1", _relu(1024)), ("act2", _relu(3072))]
    f = "server_loss_adjoint"
    # roofline weights (1e11 FLOP/s, 1e10 B/s): fc 524288 FLOPs -> 5.24288 us; act1 8192 B
    # -> 0.8192 us; a zero-FLOP, zero-byte part gets the floor 1e-3 of its site's largest
    sites = [_site(f, "fused_matmul_relu", ("fc", "forward", 2 * 64**3, 0),
                   ("act1", "forward", 0, 8192)),
             _site(f, "relu1", ("act2", "forward", 0, 24576)),
             _site(f, "relu1", ("act2", "backward", 0, 24576)),  # same kernel, 2 calls
             _site(f, "log_softmax", ("<loss>", "forward", 100, 80)),
             _site("server_update", "fused_mul_sub", ("fc", "update", 0, 49152),
                   (None, "update", 0, 0))]
    kern = [_krow(f, "fused_matmul_relu", 1, 60e-6), _krow(f, "relu1", 2, 5e-6),
            _krow(f, "log_softmax", 1, 2e-6), _krow("server_update", "fused_mul_sub", 1, 4e-6)]
    # kernels: 60 + 10 + 2 + 4 = 76 us; the step measured 86 us: 2 us more per call (5 calls)
    got = attribute(ops, kern, 86e-6, PROF, sites=sites)
    assert sum(c.training for c in got.values()) == pytest.approx(86e-6, rel=1e-12)
    w_fc, w_act1 = 2 * 64**3 / 1e11, 8192 / 1e10
    assert got["act1"].forward == pytest.approx(62e-6 * w_act1 / (w_fc + w_act1), rel=1e-9)
    assert got["act2"].forward == pytest.approx(7e-6, rel=1e-9)
    assert got["act2"].backward == pytest.approx(7e-6, rel=1e-9)
    assert got["<loss>"].forward == pytest.approx(4e-6, rel=1e-9)
    # the update kernel: 6 us, 1/1001 of it to the step counter (no op), which is spread
    # over the ops in proportion to what they have
    counter = 6e-6 / 1001
    fc_own = 62e-6 * w_fc / (w_fc + w_act1) + 6e-6 - counter
    owned = 86e-6 - 4e-6 - counter  # everything but the loss and the counter
    assert got["fc"].update == pytest.approx(6e-6 - counter + counter * fc_own / owned,
                                             rel=1e-9)


def test_per_binding_falls_back_to_buckets_for_kernels_without_a_site():
    ops = [("fc", _dense()), ("act1", _relu(1024))]
    sites = [_site("f", "relu", ("act1", "forward", 0, 8192))]
    kern = [_krow("f", "relu", 1, 3e-6), _krow("f", "matmul", 1, 40e-6, family="matmul")]
    got = attribute(ops, kern, 45e-6, PROF, sites=sites)
    # 2 us beyond the kernels, 1 us per call: the traced relu's to act1, the bucketed
    # matmul's (forward/matmul: fc's only) to fc
    assert got["act1"].forward == pytest.approx(4e-6, rel=1e-9)
    assert got["fc"].forward == pytest.approx(41e-6, rel=1e-9)
    assert "<loss>" not in got
