"""The split-package check of ``tools/bench_gpu.py`` (``build --split``, then ``run``).

``build_split`` compiles an ONNX model with ``splitc compile``: the device half on generic
``llvm``, the server half on CUDA, into ``DIR/split.tar``. It runs three split training steps
here with the same package built for an ``llvm`` server and stores their inputs and results
in ``DIR/split_ref.npz``. ``check_split`` repeats the steps with the server half on the GPU
(loaded by ``runtime/tvm_halves.py`` with TVM's runtime only) and compares losses, cut
gradients and both halves' parameters.
"""

from __future__ import annotations

import os

import click
import numpy as np


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    """Relative L2 error of ``a`` against ``b``, in float64."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def build_split(onnx_path: str, arch: str, out_dir: str, steps: int = 3) -> dict:
    """``DIR/split.tar`` (CUDA server) and ``DIR/split_ref.npz`` (the same split with an llvm
    server, ``steps`` training steps run here); returns the manifest entry."""
    import subprocess
    import sys
    import tempfile

    def compile_(server_target: str, out: str) -> None:
        # a Jetson against an H100 over 10 Gbps: the planner keeps one op on the device and
        # gives the server the rest (convs, pooling, dense, loss), so the GPU half has work
        cmd = [
            sys.executable,
            "-m",
            "splitc.tools.cli",
            "compile",
            onnx_path,
            "-q",
            "--batch-size",
            "16",
            "--device",
            "jetson-orin-nano",
            "--server",
            "h100",
            "--uplink",
            "10Gbps",
            "--device-target",
            "llvm",
            "--server-target",
            server_target,
            "-o",
            out,
        ]
        r = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise click.ClickException(f"bench_gpu: splitc compile failed: {r.stderr[-400:]}")

    tar = os.path.join(out_dir, "split.tar")
    compile_("llvm" if arch == "cpu" else f"cuda -arch={arch}", tar)
    with tempfile.TemporaryDirectory() as d:
        ref_tar = os.path.join(d, "ref.tar")
        compile_("llvm", ref_tar)
        ref = split_steps(ref_tar, None, steps)
    np.savez(os.path.join(out_dir, "split_ref.npz"), **ref)
    return {"onnx": os.path.basename(onnx_path), "steps": steps}


def split_steps(tar: str, inputs: dict | None, steps: int, server_dev=None) -> dict:
    """Run ``steps`` split training steps in one process (device half on the CPU); ``inputs``
    (x0.., y0..) from a reference run, or drawn here. Returns inputs and results by name."""
    from splitc.runtime.tvm_halves import load_device_half, load_server_half

    dh = load_device_half(tar)
    sh = load_server_half(tar, dev=server_dev)
    out: dict = {}
    rng = np.random.default_rng(0)
    for i in range(steps):
        if inputs is None:
            spec = dh.manifest["inputs"][0]
            x = rng.standard_normal(spec["shape"]).astype(spec["dtype"])
            y = rng.integers(0, 10, size=(x.shape[0],)).astype("int64")
        else:
            x, y = inputs[f"x{i}"], inputs[f"y{i}"]
        cut = dh.forward([x])
        loss, gcut = sh.step(cut, y)
        dh.backward(gcut)
        out |= {f"x{i}": x, f"y{i}": y, f"loss{i}": np.float64(loss), f"gcut{i}": gcut[0]}
    out |= {f"device.{k}": v for k, v in dh.state_dict().items()}
    out |= {f"server.{k}": v for k, v in sh.state_dict().items()}
    return out


def check_split(build_dir: str, steps: int, arch: str = "sm_90") -> str:
    """The split steps with the server half on the GPU against the llvm reference (a line)."""
    from splitc.runtime.tvm_halves import tvm_device

    dev = tvm_device("llvm" if arch == "cpu" else "cuda")
    ref = dict(np.load(os.path.join(build_dir, "split_ref.npz")))
    got = split_steps(os.path.join(build_dir, "split.tar"), ref, steps, server_dev=dev)
    errs = {k: rel_err(got[k], ref[k]) for k in ref if not k.startswith(("x", "y"))}
    worst = max(errs, key=errs.get)
    return (
        f"split package, server half on {dev.device_name or dev}: {steps} steps, "
        f"{len(errs)} results vs the llvm server, worst rel err {errs[worst]:.1e} ({worst}); "
        f"losses {[round(float(got[f'loss{i}']), 6) for i in range(steps)]}"
    )
