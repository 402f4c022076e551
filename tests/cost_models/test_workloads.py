"""cost_models/workloads.py: the random synthetic models calibration trains on."""

import numpy as np
import pytest
from splitc.cost_models.workloads import _SIZES, SYNTHETIC_KINDS, _synthetic


def test_small_synthetic_models_are_session_4s():
    """The "small" draws are unchanged, so cached ONNX files and dataset rows named
    syn0_* stay valid: the input shapes of the first four as session 4 calibrated them."""
    pytest.importorskip("torch")
    shapes = []
    for i, k in enumerate(SYNTHETIC_KINDS):
        rng = np.random.default_rng([0, i])
        rng.integers(1 << 30)  # synthetic_models draws torch's seed first
        shapes.append(_synthetic(k, rng)[1])
    assert shapes == [(1, 512), (2, 16, 32, 32), (2, 8, 14, 14), (4, 16, 256)]


@pytest.mark.parametrize("kind", SYNTHETIC_KINDS)
def test_large_synthetic_models_draw_from_the_large_ranges(kind):
    torch = pytest.importorskip("torch")
    z = _SIZES["large"]
    for i in range(4):
        model, shape, _ = _synthetic(kind, np.random.default_rng([0, i, 1]), "large")
        key = {"mlp": "mlp_b", "cnn": "cnn_b", "mbv2": "mb_b", "transformer": "tf_b"}[kind]
        assert shape[0] in z[key]
        with torch.no_grad():
            out = model(torch.zeros(shape)).shape
        assert tuple(out) == (shape if kind == "mbv2" else (shape[0], 10))
