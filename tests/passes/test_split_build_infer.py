"""An inference plan compiles to device_infer / server_infer only and runs like PyTorch eval."""

from __future__ import annotations

import numpy as np
import split_models as S
import torch
from splitc.passes.package import compile_split
from splitc.runtime.package import read_package
from splitc.runtime.tvm_halves import load_device_half, load_server_half


def test_inference_plan_package(tmp_path):
    model, onnx_bytes, x, _ = S.make_model("mobile")
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    plan = S.manual_plan(mod, ops[:5], objective="inference")
    compile_split(mod, plan, output=tmp_path / "infer.tar")
    pkg = read_package(tmp_path / "infer.tar")
    assert pkg.manifest("device")["functions"] == ["device_infer"]
    assert pkg.manifest("server")["functions"] == ["server_infer"]
    assert pkg.manifest("device")["objective"] == "inference"
    d, s = load_device_half(tmp_path / "infer.tar"), load_server_half(tmp_path / "infer.tar")
    (out,) = s.infer(d.infer([x.numpy()]))
    model.eval()
    with torch.no_grad():
        np.testing.assert_allclose(out, model(x).numpy(), rtol=1e-4, atol=1e-6)
