"""compile_split: split, build both halves and write split.tar (the one library entry point).

Runs last: ``split_module`` (passes/split_module.py) -> ``build_side`` per side
(passes/build.py) -> this writer. ``runtime/package.py`` is the reader.

split.tar layout::

    plan.json            Plan.to_json() + "transport" (ordered cut tensors: name, shape, dtype,
                         bytes, grad) + "labels" + "versions" (splitc, tvm, cuda) + "targets"
                         + "files" (sha256 of every other file) + "plan_id" + "model_hash"
    device/lib.so        compiled device_* functions
    device/params.npz    trainable parameters and running stats (np.savez: no pickle)
    device/opt_state.npz optimizer state s0, s1, ... in the optimizer's order
    device/manifest.json function names, argument orders, plan id, model hash, target
    server/...           the same for server_*
    ir/split.py          the split IRModule (device_* and server_* Relax functions, no weights)
                         as TVMScript, read back by ``splitc tune split.tar``

plan.json's ``"schedules"`` says, per side, whether MetaSchedule tuning records were applied
and which kernels got a tuned schedule (``tuned``) and which the default rules (``default``).

The tar is written to a temporary file next to ``output`` and renamed into place, so a failed
compile never leaves a half-written split.tar.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import splitc
from splitc import BuildError
from splitc.passes.plan import Plan
from splitc.passes.tune import SPLIT_IR

__all__ = ["PACKAGE_SCHEMA_VERSION", "compile_split"]

PACKAGE_SCHEMA_VERSION = 1


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _npz(arrays: dict[str, np.ndarray]) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(v) for k, v in arrays.items()})  # keeps 0-d arrays 0-d
    return buf.getvalue()


def initial_params(mod) -> dict[str, np.ndarray]:
    """Initial weights kept by the ONNX import (``main`` attr ``params``), by parameter name."""
    from splitc.passes.compat import func_num_inputs, func_param_values, var_name

    main = mod["main"]
    n = func_num_inputs(main)
    return {var_name(p): v for p, v in zip(main.params[n:], func_param_values(main))}


def compile_split(
    mod,
    plan: Plan,
    *,
    device_target: str = "llvm",
    server_target: str = "llvm",
    loss: str = "cross-entropy",
    optimizer: str = "sgd",
    lr: float = 0.01,
    recompute: bool = False,
    cross_compiler: str | None = None,
    output: str | Path = "split.tar",
    progress: Callable[[str], None] | None = None,
    params: dict[str, np.ndarray] | None = None,
    tuning_records: str | Path | None = None,
) -> dict:
    """Split ``mod`` by ``plan``, compile both halves and write ``output``; returns a summary
    (plan id, targets, CUDA version, compile seconds and artifact bytes per side).

    ``tuning_records``: a ``splitc tune`` database directory applied to both halves."""
    from splitc.passes.build import build_side, resolve_target
    from splitc.passes.split_module import split_module

    say = progress or (lambda msg: None)
    output = Path(output)
    # resolve both targets first: a bad target string fails before any compile work
    targets = {"device": resolve_target(device_target), "server": resolve_target(server_target)}
    say("splitting the module")
    t0 = time.perf_counter()
    smod, spec = split_module(mod, plan, loss=loss, optimizer=optimizer, lr=lr, recompute=recompute)
    split_s = time.perf_counter() - t0
    values = dict(initial_params(mod))
    values.update(params or {})
    # everything in plan.json but the parts only known after the build; each manifest carries
    # its sha256 so an edited plan.json (e.g. a changed transport order) is refused on load
    core = plan.to_json() | {
        "package_schema": PACKAGE_SCHEMA_VERSION,
        "transport": [c.to_json() for c in plan.cut],
        "labels": spec.labels.to_json() if spec.labels else None,
        "training": {"loss": loss, "optimizer": optimizer, "lr": lr, "recompute": recompute},
    }
    files: dict[str, bytes] = {SPLIT_IR: _split_ir_text(smod)}
    summary: dict = {
        "plan_id": plan.plan_id,
        "output": str(output),
        "split_seconds": split_s,
        "sides": {},
    }
    cuda = None
    builts = {}
    with tempfile.TemporaryDirectory(prefix="splitc-build-") as tmp:
        for side in ("device", "server"):
            say(f"compiling the {side} half for {targets[side].kind.name}")
            lib = os.path.join(tmp, f"{side}.so")
            builts[side] = build_side(
                smod, side, targets[side], lib, cross_compiler, tuning_records=tuning_records
            )
            files[f"{side}/lib.so"] = Path(lib).read_bytes()
        # which kernels are tuned is known only after the build; it is part of the plan core
        core["schedules"] = {
            s: {
                "tuning_records": str(tuning_records) if tuning_records is not None else None,
                "tuned": list(b.tuned),
                "default": list(b.default),
                # kernels a schedule rule could not handle: correct, slower (issue 6)
                "fallbacks": [
                    {"kernel": f.kernel, "rule": f.rule, "reason": f.reason} for f in b.fallbacks
                ],
            }
            for s, b in builts.items()
        }
        core_sha = plan_core_sha256(core)
        for side in ("device", "server"):
            built = builts[side]
            cuda = cuda or built.cuda
            names = getattr(spec, f"{side}_params") + getattr(spec, f"{side}_state")
            missing = [n for n in names if n not in values]
            if missing:
                raise BuildError(
                    f"Package: no initial value for parameters {missing[:3]}; "
                    "import the model with keep_params_in_input=True"
                )
            files[f"{side}/params.npz"] = _npz({n: values[n] for n in names})
            st = spec.opt_state.get(side, [])
            files[f"{side}/opt_state.npz"] = _npz({f"s{i}": a for i, a in enumerate(st)})
            manifest = spec.side_json(side) | {
                "schema": PACKAGE_SCHEMA_VERSION,
                "side": side,
                "model_hash": plan.model_hash,
                "plan_sha256": core_sha,
                "target": built.target,
                "library": "lib.so",
                "cuda": built.cuda,
                "has_update": bool(getattr(spec, f"{side}_params")),
                "opt_state": [{"shape": list(a.shape), "dtype": str(a.dtype)} for a in st],
            }
            files[f"{side}/manifest.json"] = json.dumps(manifest, indent=1).encode()
            summary["sides"][side] = {
                "target": built.target,
                "compile_seconds": built.seconds,
                "library_bytes": len(files[f"{side}/lib.so"]),
                "params_bytes": len(files[f"{side}/params.npz"]),
                "opt_state_bytes": len(files[f"{side}/opt_state.npz"]),
                "cross_compiler": built.cross_compiler,
                "tuned_kernels": len(built.tuned),
                "default_kernels": len(built.default),
                "fallback_kernels": len(built.fallbacks),
            }
    plan_json = core | {
        "versions": {"splitc": splitc.__version__, "tvm": _tvm_version(), "cuda": cuda},
        "targets": {s: summary["sides"][s]["target"] for s in ("device", "server")},
        "files": {k: _sha256(v) for k, v in sorted(files.items())},
    }
    files = {"plan.json": json.dumps(plan_json, indent=1).encode(), **files}
    say(f"writing {output}")
    _write_tar(output, files)
    summary["cuda"] = cuda
    summary["tar_bytes"] = output.stat().st_size
    return summary


def _split_ir_text(smod) -> bytes:
    """TVMScript of the device_*/server_* functions (``tvm.ir.save_json`` segfaults with
    apache-tvm-ffi 0.1.15.post2; the script round-trips, checked in tests/passes/test_tune.py)."""
    import tvm

    keep = {
        gv: f for gv, f in smod.functions.items() if gv.name_hint.startswith(("device_", "server_"))
    }
    return tvm.IRModule(keep).script(show_meta=True).encode()


def plan_core_sha256(plan_json: dict) -> str:
    """sha256 of plan.json without ``files``, ``versions`` and ``targets`` (same rule as the
    reader in runtime/package.py)."""
    core = {k: v for k, v in plan_json.items() if k not in _NOT_CORE}
    return _sha256(json.dumps(core, sort_keys=True).encode())


_NOT_CORE = ("files", "versions", "targets")


def _tvm_version() -> str:
    import tvm

    return str(tvm.__version__)


def _write_tar(output: Path, files: dict[str, bytes]) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{output.name}.", suffix=".tmp", dir=output.parent)
    try:
        with os.fdopen(fd, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
            for name, data in files.items():
                info = tarfile.TarInfo(name)
                info.size, info.mode, info.mtime = len(data), 0o644, 0
                tar.addfile(info, io.BytesIO(data))
        os.replace(tmp, output)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
