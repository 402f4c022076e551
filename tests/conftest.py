"""Shared pytest fixtures. Sections are owned by their engineers; add yours below the others.

Helpers live in ``tests/helpers/*.py`` and are imported from here (tests run with
``--import-mode=importlib`` and have no ``__init__.py``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent / "helpers"))
# the tests' timings are not figures: they do not wait for a calibration timing on this machine
# (cost_models/sampling.py: timing_lock; test_timing_lock.py sets its own lock file)
os.environ["SPLITC_TIMING_LOCK"] = ""

import models as _models


# == models (frontend/costs) ===================================================================
# ONNX files exported from PyTorch, cached on disk across runs (tests/helpers/models.py).
# Small models export in ~1 s; the full ones (resnet50, mobilenet_v2, vit, bert, gpt2) take
# 1-20 s each the first time and are used by @pytest.mark.slow tests only.
@pytest.fixture(scope="session")
def onnx_model():
    """``onnx_model(name) -> Path`` of ``tests/helpers/models.MODELS[name]`` exported."""
    return _models.export_model


@pytest.fixture(scope="session")
def tiny_cnn_onnx() -> Path:
    return _models.export_model("tiny_cnn")


@pytest.fixture(scope="session")
def mbv2_block_onnx() -> Path:
    return _models.export_model("mbv2_block")


@pytest.fixture(scope="session")
def tiny_transformer_onnx() -> Path:
    return _models.export_model("tiny_transformer")


@pytest.fixture(scope="session")
def tiny_cnn(tiny_cnn_onnx):
    """``(IRModule, ModelInfo)`` of the tiny CNN (batch norm, residual, linear head)."""
    from splitc.passes.frontend import load_onnx

    return load_onnx(tiny_cnn_onnx)


@pytest.fixture(scope="session")
def roofline_pair():
    """``(device, server)`` roofline models on bundled priors (no measurement: deterministic)."""
    from splitc.cost_models.profiles import load_profile
    from splitc.cost_models.roofline import RooflineModel

    return RooflineModel(load_profile("jetson-orin-nano")), RooflineModel(load_profile("a100"))


@pytest.fixture(scope="session")
def tiny_cnn_graph(tiny_cnn, roofline_pair):
    """The annotated ``OpGraph`` of the tiny CNN (cross-entropy loss on the server)."""
    from splitc.passes.annotate_costs import annotate_costs

    mod, info = tiny_cnn
    return annotate_costs(mod, *roofline_pair, model_hash=info.sha256, buffers=info.buffers,
                          name="tiny_cnn")
