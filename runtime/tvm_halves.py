"""DeviceHalf / ServerHalf (runtime/halves.py) over the TVM runtime and a verified split.tar.

Only runtime APIs, ``tvm.runtime.load_module`` and ``tvm.runtime.vm.VirtualMachine`` (not
``tvm.relax``, whose import needs the compiler library): a server or board needs only TVM's
runtime (``TVM_USE_RUNTIME_LIB=1``, or a copy without ``libtvm_compiler.so``). Argument
orders come from each side's manifest.json (written by passes/package.py):

- ``device_forward(inputs..., params..., state...) -> (cut..., residuals..., new state...)``
- ``device_backward(residuals..., g_cut...) -> (param grads...)``
- ``server_step(cut..., params..., state..., labels) -> (loss, g_cut..., param grads...,
  new state...)``
- ``<side>_update((params), (grads), (opt state)) -> ((new params), (new opt state))``
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
from splitc import TransportError
from splitc.runtime.halves import CutSpec
from splitc.runtime.package import SplitPackage, read_package

__all__ = [
    "TVMDeviceHalf",
    "TVMServerHalf",
    "load_device_half",
    "load_server_half",
    "tvm_device",
]


def tvm_device(kind: str, index: int = 0):
    """TVM's device for a half's target kind. With TVM's runtime alone, CUDA's device API
    (``libtvm_runtime_cuda.so``) is not loaded by ``import tvm``: its backend hook imports
    compiler modules first and fails, so it is loaded here."""
    import tvm

    if kind != "cuda":
        return tvm.cpu(index)
    libs = tvm.base._LOADED_LIBS
    if "tvm_runtime_cuda" not in libs:
        from tvm_ffi.libinfo import load_lib_ctypes

        libs["tvm_runtime_cuda"] = load_lib_ctypes(
            package="tvm",
            target_name="tvm_runtime_cuda",
            extra_lib_paths=[Path(libs["tvm_runtime"]._name).resolve().parent],
            mode="RTLD_LOCAL",
        )
    return tvm.cuda(index)


class _Half:
    side = ""

    def __init__(self, pkg: SplitPackage, dev=None):
        import tvm
        from tvm.runtime.vm import VirtualMachine

        self._tvm = tvm
        man = pkg.manifest(self.side)
        self.manifest = man
        self.plan_id = pkg.plan_id
        self.cut: tuple[CutSpec, ...] = pkg.cut
        kind = man["target"].get("kind", "llvm") if isinstance(man["target"], dict) else "llvm"
        self.dev = dev or tvm_device(kind)
        # load_module wants a path: keep the library in a private temp dir for the process
        self._dir = tempfile.TemporaryDirectory(prefix=f"splitc-{self.side}-")
        lib_path = os.path.join(self._dir.name, "lib.so")
        Path(lib_path).write_bytes(pkg.library(self.side))
        self.vm = VirtualMachine(tvm.runtime.load_module(lib_path), self.dev)
        self.param_names = list(man["params"])
        self.state_names = list(man["state"])
        p = pkg.arrays(self.side, "params.npz")
        self.params = [self._t(p[n]) for n in self.param_names]
        self.state = [self._t(p[n]) for n in self.state_names]
        o = pkg.arrays(self.side, "opt_state.npz")
        self.opt_state = [self._t(o[f"s{i}"]) for i in range(len(o))]
        self.has_update = bool(man.get("has_update"))

    def _t(self, a: np.ndarray):
        a = np.asarray(a)  # not ascontiguousarray: it turns 0-d state (step count) into 1-d
        return self._tvm.runtime.tensor(a if a.flags.c_contiguous else a.copy(), self.dev)

    def _update(self, grads: list) -> None:
        if not self.has_update:
            return
        new_params, new_state = self.vm[f"{self.side}_update"](
            list(self.params), list(grads), list(self.opt_state)
        )
        self.params, self.opt_state = list(new_params), list(new_state)

    def state_dict(self) -> dict[str, np.ndarray]:
        d = {f"param.{n}": a.numpy() for n, a in zip(self.param_names, self.params)}
        d |= {f"state.{n}": a.numpy() for n, a in zip(self.state_names, self.state)}
        d |= {f"opt.{i}": a.numpy() for i, a in enumerate(self.opt_state)}
        return d

    def load_state_dict(self, state: dict[str, np.ndarray]) -> None:
        self.params = [self._t(state[f"param.{n}"]) for n in self.param_names]
        self.state = [self._t(state[f"state.{n}"]) for n in self.state_names]
        self.opt_state = [self._t(state[f"opt.{i}"]) for i in range(len(self.opt_state))]

    def _check(self, arrays: list, specs: list, what: str) -> list:
        if len(arrays) != len(specs):
            raise TransportError(
                f"{self.side}: got {len(arrays)} {what}, the transport spec "
                f"says {len(specs)}; both agents must load the same split.tar"
            )
        out = []
        for a, s in zip(arrays, specs):
            a = np.asarray(a)
            if tuple(a.shape) != tuple(s.shape) or str(a.dtype) != s.dtype:
                raise TransportError(
                    f"{self.side}: {what} {s.name!r} is {a.dtype}{list(a.shape)}"
                    f", expected {s.dtype}{list(s.shape)}; check the peer's "
                    "split.tar"
                )
            out.append(self._t(a))
        return out


class TVMDeviceHalf(_Half):
    side = "device"

    def __init__(self, pkg: SplitPackage, dev=None):
        super().__init__(pkg, dev)
        self.n_res = len(self.manifest["residuals"])
        self._residuals = None

    def forward(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        xs = [self._t(np.asarray(x)) for x in inputs]
        out = list(self.vm["device_forward"](*xs, *self.params, *self.state))
        nc = len(self.cut)
        self._residuals = out[nc : nc + self.n_res]
        self.state = out[nc + self.n_res :]
        return [a.numpy() for a in out[:nc]]

    def backward(self, grads: list[np.ndarray]) -> None:
        if self._residuals is None:
            raise TransportError("device: backward before forward; the agents lost step order")
        gs = self._check(grads, [c for c in self.cut if c.grad], "cut gradients")
        pgrads = list(self.vm["device_backward"](*self._residuals, *gs))
        self._residuals = None
        self._update(pgrads)

    def infer(self, inputs: list[np.ndarray]) -> list[np.ndarray]:
        xs = [self._t(np.asarray(x)) for x in inputs]
        return [a.numpy() for a in self.vm["device_infer"](*xs, *self.params, *self.state)]


class TVMServerHalf(_Half):
    side = "server"

    def step(self, cut: list[np.ndarray], labels: np.ndarray) -> tuple[float, list[np.ndarray]]:
        xs = self._check(cut, list(self.cut), "cut tensors")
        extra = [] if self.manifest.get("labels") is None else [self._t(np.asarray(labels))]
        out = list(self.vm["server_step"](*xs, *self.params, *self.state, *extra))
        ng = sum(c.grad for c in self.cut)
        npar = len(self.params)
        loss = float(out[0].numpy())
        gcut = [a.numpy() for a in out[1 : 1 + ng]]
        self._update(out[1 + ng : 1 + ng + npar])
        self.state = out[1 + ng + npar :]
        return loss, gcut

    def infer(self, cut: list[np.ndarray]) -> list[np.ndarray]:
        xs = self._check(cut, list(self.cut), "cut tensors")
        return [a.numpy() for a in self.vm["server_infer"](*xs, *self.params, *self.state)]


def load_device_half(
    tar_path: str | Path, *, model_hash: str | None = None, dev=None
) -> TVMDeviceHalf:
    return TVMDeviceHalf(read_package(tar_path, model_hash=model_hash), dev)


def load_server_half(
    tar_path: str | Path, *, model_hash: str | None = None, dev=None
) -> TVMServerHalf:
    return TVMServerHalf(read_package(tar_path, model_hash=model_hash), dev)
