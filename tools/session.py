"""Glue the CLI's serve / train / demo commands need: data sources and the demo run.

Library users call ``splitc.runtime`` directly; this module only wires CLI options to it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from splitc import InputError

__all__ = ["DEMO_MODEL", "DemoConfig", "load_data", "run_demo"]

DEMO_MODEL = Path(__file__).resolve().parent / "models" / "demo_cnn.onnx"


def load_data(spec: str):
    """``digits`` (scikit-learn's bundled 8x8 digits, fixed split) or an ``.npz`` with arrays
    ``x``, ``y`` and optionally ``x_test``, ``y_test``. Returns (x, y, x_test, y_test)."""
    from splitc.runtime.data import load_digits_split

    if spec == "digits":
        return load_digits_split()
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"Data: {spec!r} is neither 'digits' nor an existing .npz file")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as e:  # zipfile/npy errors: one line, not a traceback
        raise InputError(f"Data: cannot read {spec!r} as .npz ({e.__class__.__name__})") from None
    if "x" not in arrays or "y" not in arrays:
        raise InputError(f"Data: {spec!r} needs arrays 'x' and 'y', has {sorted(arrays)}")
    return arrays["x"], arrays["y"], arrays.get("x_test"), arrays.get("y_test")


@dataclass(frozen=True)
class DemoConfig:
    workdir: Path
    epochs: int = 15
    batch_size: int = 32
    optimizer: str = "adam"
    lr: float = 0.003
    uplink: str = "100Mbps"
    device: str = "local-cpu"
    server: str = "local-cpu"
    pins: tuple = ()
    codec: str = "none"


def run_demo(cfg: DemoConfig, say: Callable[[str], None], on_plan, on_progress) -> dict:
    """Compile the bundled CNN, serve it on loopback, train on digits, return the accuracy."""
    from splitc.passes.pipeline import CompileConfig, PlanConfig, compile_model
    from splitc.runtime.data import DataLoader
    from splitc.runtime.device_agent import evaluate, train
    from splitc.runtime.server_agent import ServerAgent
    from splitc.runtime.tvm_halves import load_device_half, load_server_half

    cfg.workdir.mkdir(parents=True, exist_ok=True)
    tar = cfg.workdir / "demo_split.tar"
    pcfg = PlanConfig(model=DEMO_MODEL, device=cfg.device, server=cfg.server,
                      uplink=cfg.uplink, batch_size=cfg.batch_size, pins=dict(cfg.pins),
                      optimizer=cfg.optimizer, baselines=True)
    summary = compile_model(CompileConfig(plan=pcfg, output=tar, lr=cfg.lr), progress=say,
                            on_plan=on_plan)
    x, y, xt, yt = load_data("digits")
    server = ServerAgent(load_server_half(tar), "127.0.0.1:0")
    stop = server.stop_event
    thread = threading.Thread(target=server.run, name="splitc-server", daemon=True)
    thread.start()
    say(f"server listening on {server.address}; training on {len(x)} digits")
    device = load_device_half(tar)
    t0 = time.perf_counter()
    try:
        res = train(device, server.address, DataLoader(x, y, cfg.batch_size, seed=0),
                    epochs=cfg.epochs, codec=cfg.codec, on_progress=on_progress)
        train_s = time.perf_counter() - t0
        acc = evaluate(device, server.address, xt, yt, batch_size=cfg.batch_size)
    finally:
        stop.set()
        thread.join(timeout=10)
    return {"accuracy": acc, "test_samples": len(xt), "steps": len(res.losses),
            "final_loss": res.losses[-1] if res.losses else None, "train_seconds": train_s,
            "bytes_up": res.bytes_up, "bytes_down": res.bytes_down,
            "plan_id": summary.get("plan_id"), "split_tar": str(tar)}
