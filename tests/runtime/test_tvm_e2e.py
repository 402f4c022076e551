"""The compiled halves (runtime/tvm_halves.py) over the real agents on loopback.

Split training through split.tar over the network equals the unsplit package trained in one
process (losses and parameters, rtol 1e-4), and a device resumed from its checkpoint ends where
an uninterrupted run ends. Compiles two packages of the tiny CNN: slow.
"""

from __future__ import annotations

import numpy as np
import pytest
from splitc.runtime.data import DataLoader
from splitc.runtime.device_agent import train

pytestmark = [pytest.mark.slow, pytest.mark.network]


@pytest.fixture(scope="module")
def packages(tmp_path_factory, onnx_model):
    from splitc.cost_models.link import Link
    from splitc.passes.package import compile_split
    from splitc.passes.pipeline import PlanConfig, annotate_model
    from splitc.passes.plan import Placement, Plan

    mod, _, graph = annotate_model(PlanConfig(model=onnx_model("tiny_cnn")))
    ops = [o.name for o in graph.ops]
    out = tmp_path_factory.mktemp("tvm_e2e")
    tars = {}
    for tag, device_ops in (("split", ops[: len(ops) // 2]), ("whole", [])):
        plan = Plan.build(
            graph,
            Placement.of(device_ops),
            Link.parse("100Mbps"),
            "training",
            "manual",
            "local-cpu",
            "local-cpu",
        )
        tars[tag] = out / f"{tag}.tar"
        compile_split(mod, plan, optimizer="momentum", lr=0.05, output=tars[tag])
    return tars


def _halves(tar):
    from splitc.runtime.tvm_halves import load_device_half, load_server_half

    return load_device_half(tar), load_server_half(tar)


def _data(dev, srv, n_batches=3):
    shape = dev.manifest["inputs"][0]["shape"]
    lab = srv.manifest["labels"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((shape[0] * n_batches, *shape[1:])).astype("float32")
    y = rng.integers(0, 4, (lab["shape"][0] * n_batches, *lab["shape"][1:])).astype(lab["dtype"])
    return DataLoader(x, y, shape[0], seed=0)


def _params(dev, srv):
    return {k: v for k, v in (dev.state_dict() | srv.state_dict()).items() if k.startswith("param")}


def test_split_over_loopback_equals_unsplit(packages, start_server, tmp_path):
    dev, srv = _halves(packages["split"])
    loader = _data(dev, srv)
    server = start_server(srv)
    res = train(dev, server.address, loader, epochs=2, timeout_s=60)
    server.stop()
    wdev, wsrv = _halves(packages["whole"])
    ref = []
    for i in range(6):  # 3 batches x 2 epochs, the same order
        x, y = loader.batch(i)
        loss, g = wsrv.step(wdev.forward([x]), y)
        wdev.backward(g)
        ref.append(loss)
    np.testing.assert_allclose(res.losses, ref, rtol=1e-4)
    p_split, p_whole = _params(dev, srv), _params(wdev, wsrv)
    assert sorted(p_split) == sorted(p_whole)
    for k in p_split:
        np.testing.assert_allclose(p_split[k], p_whole[k], rtol=1e-4, atol=1e-6, err_msg=k)

    # Resume: 3 steps with a checkpoint, then a fresh device half from that checkpoint.
    dev2, srv2 = _halves(packages["split"])
    server = start_server(srv2)
    ckpt = tmp_path / "dev"
    train(
        dev2,
        server.address,
        loader,
        max_steps=3,
        checkpoint_dir=ckpt,
        checkpoint_every=3,
        timeout_s=60,
    )
    dev3, _ = _halves(packages["split"])
    res3 = train(
        dev3, server.address, loader, epochs=2, checkpoint_dir=ckpt, resume=True, timeout_s=60
    )
    server.stop()
    assert res3.resumed_from == 3 and res3.steps == [4, 5, 6]
    np.testing.assert_allclose(res3.losses, res.losses[3:], rtol=1e-6)
    for k, v in _params(dev3, srv2).items():
        np.testing.assert_allclose(v, p_split[k], rtol=1e-6, atol=1e-7, err_msg=k)


_RUNTIME_ONLY_SCRIPT = """
import json, sys
import numpy as np
import tvm
from splitc.runtime.tvm_halves import load_device_half, load_server_half

dev, srv = load_device_half(sys.argv[1]), load_server_half(sys.argv[1])
inp = np.load(sys.argv[2])
loss, g = srv.step(dev.forward([inp["x"]]), inp["y"])
dev.backward(g)
np.savez(sys.argv[3], loss=loss, **(dev.state_dict() | srv.state_dict()))
print(json.dumps({"runtime_only": bool(tvm.base._RUNTIME_ONLY),
                  "relax": sorted(m for m in sys.modules if m.startswith("tvm.relax"))}))
"""


def test_halves_run_on_the_tvm_runtime_alone(packages, tmp_path):
    """A server or board needs TVM's runtime only (no ``libtvm_compiler.so``, no
    ``tvm.relax``): one split step in a process with TVM_USE_RUNTIME_LIB=1 equals the same step
    here, where the compiler is loaded."""
    import json
    import os
    import subprocess
    import sys

    dev, srv = _halves(packages["split"])
    loader = _data(dev, srv)
    x, y = loader.batch(0)
    np.savez(tmp_path / "in.npz", x=x, y=y)
    loss, g = srv.step(dev.forward([x]), y)
    dev.backward(g)
    env = dict(os.environ, TVM_USE_RUNTIME_LIB="1")
    r = subprocess.run(
        [sys.executable, "-c", _RUNTIME_ONLY_SCRIPT, str(packages["split"]),
         str(tmp_path / "in.npz"), str(tmp_path / "out.npz")],
        capture_output=True, text=True, env=env, timeout=120, check=False,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout.strip().splitlines()[-1]) == {"runtime_only": True, "relax": []}
    got = np.load(tmp_path / "out.npz")
    assert float(got["loss"]) == loss
    for k, v in (dev.state_dict() | srv.state_dict()).items():
        np.testing.assert_array_equal(got[k], v, err_msg=k)
