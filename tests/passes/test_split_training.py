"""20 optimizer steps through split.tar: split parameters == unsplit parameters (== PyTorch).

Goes through the whole compile path: compile_split -> split.tar -> runtime/tvm_halves.py, so the
packaging, argument orders and optimizer state are exercised too.
"""

from __future__ import annotations

import numpy as np
import pytest
import split_models as S
import torch
from splitc.passes.package import compile_split
from splitc.runtime.tvm_halves import load_device_half, load_server_half

STEPS, LR = 20, 0.05


def _train(tar, xs, ys):
    d, s = load_device_half(tar), load_server_half(tar)
    losses = []
    for x, y in zip(xs, ys):
        loss, g = s.step(d.forward([x]), y)
        d.backward(g)
        losses.append(loss)
    params = {
        k.split(".", 1)[1]: v
        for k, v in (d.state_dict() | s.state_dict()).items()
        if k.startswith(("param.", "state."))
    }
    return np.array(losses), params


def _batches(model_kind, x, y):
    # 20 different batches of the example's shape, so running stats and Adam moments move
    rng = np.random.default_rng(0)
    classes = S.MODELS[model_kind][2]
    xs = [rng.standard_normal(x.shape).astype("float32") for _ in range(STEPS)]
    ys = [rng.integers(0, classes, y.shape).astype("int64") for _ in range(STEPS)]
    return xs, ys


@pytest.mark.parametrize(
    "kind,optimizer",
    [
        ("cnn", "sgd"),
        pytest.param("cnn", "adam", marks=pytest.mark.slow),
        pytest.param("mobile", "sgd", marks=pytest.mark.slow),
        pytest.param("mobile", "adam", marks=pytest.mark.slow),
        pytest.param("transformer", "sgd", marks=pytest.mark.slow),
        pytest.param("transformer", "adam", marks=pytest.mark.slow),
    ],
)
def test_twenty_steps_split_equals_unsplit(tmp_path, kind, optimizer):
    model, onnx_bytes, x, y = S.make_model(kind)
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    xs, ys = _batches(kind, x.numpy(), y.numpy())
    tars = {}
    for name, device_ops in (("split", ops[: len(ops) // 2]), ("whole", [])):
        tars[name] = tmp_path / f"{name}.tar"
        compile_split(
            mod, S.manual_plan(mod, device_ops), optimizer=optimizer, lr=LR, output=tars[name]
        )
    loss_s, p_s = _train(tars["split"], xs, ys)
    loss_w, p_w = _train(tars["whole"], xs, ys)
    np.testing.assert_allclose(loss_s, loss_w, rtol=1e-4, atol=1e-6)
    assert sorted(p_s) == sorted(p_w)
    for k in p_s:
        np.testing.assert_allclose(p_s[k], p_w[k], rtol=1e-4, atol=1e-6, err_msg=k)
    # and PyTorch's own optimizer on the same batches (TVM's SGD and Adam are torch's defaults:
    # no weight decay, Adam betas (0.9, 0.999), eps 1e-8)
    opt = (torch.optim.SGD if optimizer == "sgd" else torch.optim.Adam)(model.parameters(), lr=LR)
    for xb, yb in zip(xs, ys):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(
            model(torch.from_numpy(xb)), torch.from_numpy(yb)
        ).backward()
        opt.step()
    sd = model.state_dict()
    # A conv bias right before batch norm has zero gradient analytically (BN subtracts the mean)
    # and ~1e-9 rounding noise in fp32; Adam divides by sqrt(v) ~ 1e-9 and steps +-lr on noise,
    # in TVM and PyTorch alike, so those two (and the running means they shift) are compared
    # split vs unsplit only (above).
    # Likewise the key bias of attention: softmax over keys ignores q.b_k, the same for every key.
    noise = set()
    if optimizer == "adam":
        noise = {"c1.bias", "c2.bias", "b1.running_mean", "b2.running_mean", "k.bias"}
    for k in sorted(set(p_s) - noise):
        np.testing.assert_allclose(p_s[k], sd[k].numpy(), rtol=1e-4, atol=1e-5, err_msg=k)
