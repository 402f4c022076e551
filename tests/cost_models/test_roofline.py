"""cost_models/roofline.py: the analytic prior, on hand-checked numbers."""

import re

import pytest
from splitc import InputError
from splitc.cost_models.base import CostModel, OpCost, OpFeatures
from splitc.cost_models.profiles import DeviceProfile
from splitc.cost_models.roofline import RooflineModel

# powers of two keep every quotient exact in binary floating point
PROFILE = DeviceProfile("toy", "gpu", {"float32": 2.0**40, "float16": 2.0**42}, 2.0**36,
                        2.0**-16, {"status": "prior", "source": "test"})


def _f(flops, read, written, param_bytes=0, has_params=False, input_grad=True, dtype="float32"):
    return OpFeatures("relax.matmul", flops, read, written, param_bytes, dtype=dtype,
                      has_params=has_params, input_grad=input_grad)


def test_is_a_cost_model_with_provenance_in_its_name():
    m = RooflineModel(PROFILE)
    assert isinstance(m, CostModel) and m.name == "roofline:toy(prior)"


def test_compute_bound_matmul_in_the_middle_of_a_net():
    m = RooflineModel(PROFILE)
    # 2^31 FLOPs / 2^40 FLOP/s = 2^-9 s; 2^20 B / 2^36 B/s = 2^-16 s -> compute-bound 2^-9
    # forward = 2^-9 + 2^-16 (overhead); backward = 2 x forward (grad-input + grad-weight)
    # update (SGD) = max(2 FLOP x 2^16 weights / 2^40, 3 x 2^18 B / 2^36) + 2^-16
    #              = max(2^-23, 3 x 2^-18) + 2^-16 = 3 x 2^-18 + 2^-16
    c = m.op_cost(_f(2**31, 2**19, 2**19, param_bytes=2**18, has_params=True))
    assert c == OpCost(2**-9 + 2**-16, 2 * (2**-9 + 2**-16), 3 * 2**-18 + 2**-16)
    assert c.training == 3 * (2**-9 + 2**-16) + 3 * 2**-18 + 2**-16


def test_memory_bound_elementwise_and_first_layer():
    m = RooflineModel(PROFILE)
    # relu on 2^24 B in + 2^24 B out: 2^25 / 2^36 = 2^-11 s >> 2^22 FLOPs / 2^40 = 2^-18 s
    c = m.op_cost(_f(2**22, 2**24, 2**24))
    assert c == OpCost(2**-11 + 2**-16, 2**-11 + 2**-16, 0.0)  # backward 1x, no weights
    # first conv: weight gradient only (input_grad False): backward = 1x forward
    c = m.op_cost(_f(2**31, 2**10, 2**10, param_bytes=2**10, has_params=True,
                     input_grad=False))
    assert c.backward == c.forward == 2**-9 + 2**-16
    # mask arithmetic on inputs: no gradient at all
    assert m.op_cost(_f(2**10, 2**10, 2**10, input_grad=False)).backward == 0.0


def test_dtype_peak_and_optimizers():
    # float16 peak 2^42: 2^31 FLOPs -> 2^-11 s
    assert RooflineModel(PROFILE).op_cost(_f(2**31, 0, 0, dtype="float16")).forward == (
        2**-11 + 2**-16)
    # Adam moves 7 x param bytes: 7 x 2^18 / 2^36 = 7 x 2^-18; momentum 5 x 2^-18
    f = _f(0, 0, 0, param_bytes=2**18, has_params=True)
    assert RooflineModel(PROFILE, "adam").op_cost(f).update == 7 * 2**-18 + 2**-16
    assert RooflineModel(PROFILE, "momentum").op_cost(f).update == 5 * 2**-18 + 2**-16
    with pytest.raises(InputError, match=re.escape(
            "RooflineModel: unknown optimizer 'lamb'; use one of sgd, momentum, adam")):
        RooflineModel(PROFILE, "lamb")
