"""Targets by name: the ``tvm.target.Target`` for each side's ``--device``/``--server`` text.

Target names accepted (``resolve_target``):
- ``host``: ``llvm`` with this machine's CPU as ``mcpu`` (LLVM's host detection). Bare ``llvm``
  compiles for the generic CPU of the triple (x86-64: SSE2, 128-bit vectors) whatever the
  machine has; on the AVX-512 dev box a scheduled 512x768x3072 matmul runs ~3.6x faster for
  ``host`` (``znver4``). Use ``host`` when the build machine is the machine that runs the
  half, and ``llvm -mcpu=...`` (or a JSON target) for another CPU;
- ``llvm`` (generic CPU of this triple) and any other plain kind or tag
  (``nvidia/jetson-orin-nano``, ``nvidia/jetson-agx-orin-32gb``... see
  ``tvm.target.list_tags()``);
- tvmc-style strings with options, ``"cuda -arch=sm_90"``, which TVM 0.27 no longer parses:
  translated to a dict target (``{"kind": "cuda", "arch": "sm_90"}``);
- a JSON object.

TVM 0.27 pitfall handled here: Jetson Orin tags carry the Xavier host ``mcpu=carmel``
(orin-nano) or ``cortex-a78`` (agx-orin); Orin is Cortex-A78AE, so the host becomes
``cortex-a78ae``. ``passes/build.py`` re-exports ``resolve_target``.
"""

from __future__ import annotations

import json
import re

import tvm
from splitc import BuildError

__all__ = ["host_target", "resolve_target"]

# Tags whose host is an Orin (Cortex-A78AE) though TVM's tag says Xavier's "carmel".
_ORIN_HOST_CPU = "cortex-a78ae"
_OPT = re.compile(r"^-{1,2}([A-Za-z0-9_.-]+)=(.*)$")


def _value(v: str):
    if re.fullmatch(r"-?\d+", v):
        return int(v)
    if v in ("true", "false"):
        return v == "true"
    return v


def _target_dict(text: str) -> dict:
    """``"cuda -arch=sm_90 -max_num_threads=1024"`` -> ``{"kind": "cuda", "arch": ...}``."""
    kind, *opts = text.split()
    d: dict = {"kind": kind}
    for o in opts:
        m = _OPT.match(o)
        if not m:
            raise BuildError(
                f"Build: cannot read option {o!r} of target {text!r}; write options "
                "as -key=value, e.g. 'cuda -arch=sm_90'"
            )
        k, v = m.group(1), m.group(2)
        d[k] = v.split(",") if k in ("mattr", "libs", "keys") else _value(v)
    return d


def host_target() -> tvm.target.Target:
    """``llvm`` for this machine's CPU (``mcpu`` from LLVM's host detection; TVM 0.27's LLVM
    rejects ``mcpu=native``)."""
    from tvm.target.codegen import llvm_get_system_cpu

    return tvm.target.Target({"kind": "llvm", "mcpu": str(llvm_get_system_cpu())})


def resolve_target(text: str) -> tvm.target.Target:
    """A ``tvm.target.Target`` for a name, tag, tvmc-style string or JSON (module docstring)."""
    spec = str(text).strip()
    if spec == "host":
        return host_target()
    try:
        if spec.startswith("{"):
            target = tvm.target.Target(json.loads(spec))
        elif " " in spec:
            target = tvm.target.Target(_target_dict(spec))
        else:
            target = tvm.target.Target(spec)
    except BuildError:
        raise
    except Exception as e:  # noqa: BLE001 - TVM raises ValueError / TVMError subclasses
        why = str(e).strip().splitlines()[0][:160] if str(e).strip() else type(e).__name__
        raise BuildError(
            f"Build: TVM rejects target {spec!r} ({why}); use host, llvm, a tag such as "
            "nvidia/jetson-orin-nano, 'cuda -arch=sm_90' or a JSON target"
        ) from None
    host = target.host
    # orin-nano says "carmel" (Xavier), agx-orin "cortex-a78": both are Cortex-A78AE, which
    # this LLVM knows (llvm_get_cpu_archlist lists "cortex-a78ae")
    if (
        spec.startswith("nvidia/jetson")
        and "orin" in spec
        and host is not None
        and str(host.attrs.get("mcpu", "")) != _ORIN_HOST_CPU
    ):
        d = dict(target.export())
        h = dict(d.pop("host"))
        h["mcpu"] = _ORIN_HOST_CPU
        d.pop("tag", None)
        target = tvm.target.Target(d, host=h)
    return target


def _is_gpu(target: tvm.target.Target) -> bool:
    return target.kind.name in ("cuda", "rocm", "vulkan", "metal", "opencl")


def _host(target: tvm.target.Target) -> tvm.target.Target:
    return target.host if target.host is not None else target


def _is_aarch64(target: tvm.target.Target) -> bool:
    h = _host(target)
    return "aarch64" in str(h.attrs.get("mtriple", ""))


def _export(t: tvm.target.Target) -> dict:
    return json.loads(str(t))
