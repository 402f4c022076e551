"""Where kernels are timed: this process (``--target llvm``) or a board behind TVM's RPC tracker.

TVM measures on a Jetson the same way: the host compiles, uploads the shared library to an RPC
server that registered with a tracker under a key, and calls ``time_evaluator`` there. Start a
tracker and a server with::

    python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190
    python -m tvm.exec.rpc_server --tracker HOST:9190 --key jetson-orin   # on the board

(TVM 0.27 needs ``pip install "apache-tvm[rpc]"`` for tornado and cloudpickle.)

SECURITY: TVM RPC has no authentication and no encryption. Anyone who reaches the tracker or a
server can upload and run native code on the board. Run them only on a trusted network (a lab
VLAN, an SSH tunnel, 127.0.0.1), never on an interface reachable from the internet.

:class:`Runner` hides the difference: ``time_kernels`` times PrimFuncs of a built library with
``time_evaluator`` (one warm-up call, then ``repeat`` timings of ``number`` calls each, median
and spread reported), ``time_vm`` times whole Relax VM functions (the compiled training step).
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import tvm
from splitc import InputError, SplitcError
from tvm import relax

__all__ = ["Runner", "Timing", "parse_tracker", "random_args", "timing"]


@dataclass(frozen=True)
class Timing:
    """Seconds per call over ``repeats`` timings of ``number`` calls each: ``median``,
    ``best`` (the minimum: what calibration records) and ``spread`` = (max - min) / median.

    Why the minimum of short timings: on a machine shared with other jobs a timing is the
    kernel's time plus whatever preempted it, a long right tail. Measured here under load
    ~2.5 (32 kernels, each timed in 3 pairs of runs, share of pairs within +-10 %): minimum
    of 30 x 1 ms timings 82 %, lower quartile 78 %, median 57 %; 2 ms timings 82 / 47 / 26 %,
    5 ms 46 / 38 / 37 % (a longer timing is more likely to contain a preemption)."""

    median: float
    spread: float
    repeats: int
    number: int
    best: float = 0.0

    @property
    def seconds(self) -> float:
        return self.best or self.median


def parse_tracker(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"Calibrate: RPC tracker {text!r} must be HOST:PORT, e.g. "
                         "127.0.0.1:9190")
    return host, int(port)


def _array(shape, dtype: str, dev, rng: np.random.Generator):
    shape = tuple(int(s) for s in shape)
    if "float" in dtype:
        # in (0.5, 1.5): no zeros, so divides and logs time their usual path
        data = rng.uniform(0.5, 1.5, shape).astype(dtype)
    else:
        data = np.zeros(shape, dtype=dtype)
    return tvm.runtime.tensor(data, dev)


def random_args(specs, dev, seed: int = 0) -> list:
    """Device arrays for ``specs``: (shape, dtype) pairs, or nested lists of them (tuples)."""
    rng = np.random.default_rng(seed)

    def make(s):
        if isinstance(s, list):
            return [make(x) for x in s]
        return _array(s[0], s[1], dev, rng)

    return [make(s) for s in specs]


def timing(results, number: int) -> Timing:
    """Timing of raw per-call seconds: minimum (recorded), median, spread."""
    r = np.asarray(list(results), dtype=float)
    med = float(np.median(r))
    spread = float((r.max() - r.min()) / med) if med > 0 else 0.0
    return Timing(med, spread, len(r), number, float(r.min()))


class Runner:
    """Times kernels locally or on the board an RPC tracker hands out for ``key``."""

    def __init__(self, target="llvm", tracker: str | None = None, key: str | None = None,
                 session_timeout: int = 600):
        self.target = target
        self.tracker, self.key = tracker, key
        self._tmp = tempfile.TemporaryDirectory(prefix="splitc-calib-")
        self.remote = None
        if tracker is not None:
            if not key:
                raise InputError("Calibrate: --rpc-tracker needs --rpc-key (the key the board's "
                                 "rpc_server registered with)")
            host, port = parse_tracker(tracker)
            try:
                # probe first: connect_tracker retries for ~25 s before it gives up
                socket.create_connection((host, port), timeout=5).close()
                from tvm import rpc

                self.remote = rpc.connect_tracker(host, port).request(
                    key, priority=1, session_timeout=session_timeout)
            except Exception as e:  # noqa: BLE001 - socket errors, TVMError, missing tornado
                raise SplitcError(f"Calibrate: cannot get a board with key {key!r} from the "
                                  f"RPC tracker {host}:{port} ({str(e).splitlines()[0][:120]}); "
                                  "check that rpc_tracker and rpc_server are running") from None
        t = target if isinstance(target, tvm.target.Target) else tvm.target.Target(target)
        kind = t.kind.name
        if self.remote is not None:
            self.dev = self.remote.device(kind if kind != "llvm" else "cpu", 0)
        else:
            self.dev = tvm.device(kind if kind != "llvm" else "cpu", 0)

    @property
    def threads(self) -> int | None:
        """TVM runtime threads kernels run on here; None on a remote board (not reported)."""
        return None if self.remote is not None else int(tvm.runtime.num_threads())

    @property
    def board(self) -> str:
        return self.key if self.remote is not None else "local"

    def close(self) -> None:
        """Ends the RPC session (the device holds it too), so the tracker can hand the board to
        the next one, and removes the temporary files."""
        self.remote = self.dev = None
        self._tmp.cleanup()

    def pinned(self):
        """Context: the measuring thread pinned to the core it runs on (``microbench.one_core``)
        when kernels run here on one thread, so no sample pays a migration to a cold core;
        nothing on a board behind RPC or with a thread pool (its workers would inherit it)."""
        from splitc.cost_models.microbench import one_core

        if self.remote is None and self.threads == 1:
            return one_core()
        return contextlib.nullcontext()

    def sample_kernel(self, lib, symbol: str, args, repeats: int, number: int,
                      min_repeat_ms: int = 0) -> list[float]:
        """``repeats`` samples (seconds per call) of one kernel, no warm-up."""
        f = lib.time_evaluator(symbol, self.dev, number=number, repeat=repeats,
                               min_repeat_ms=min_repeat_ms)
        return [float(x) for x in f(*args).results]

    def vm(self, lib):
        """A Relax VM over a loaded ``Executable``."""
        return relax.VirtualMachine(lib, self.dev)

    def sample_vm(self, vm, name: str, args, repeats: int, number: int,
                  min_repeat_ms: int = 0) -> list[float]:
        """``repeats`` samples (seconds per call) of one VM function, no warm-up."""
        f = vm.time_evaluator(name, self.dev, number=number, repeat=repeats,
                              min_repeat_ms=min_repeat_ms)
        return [float(x) for x in f(*args).results]

    def load(self, module, name: str):
        """A built module (``tvm.tirx.build`` result or Relax ``Executable``) on the board."""
        if self.remote is None:
            return module
        path = os.path.join(self._tmp.name, f"{name}.so")
        module.export_library(path)
        self.remote.upload(path)
        return self.remote.load_module(f"{name}.so")

    def time_kernels(self, lib, calls, repeats: int, number: int, min_repeat_ms: int = 0,
                     budget_s: float | None = None) -> list[Timing]:
        """``calls``: [(symbol, [(shape, dtype), ...])] -> one Timing each. ``number`` grows
        until one timing lasts ``min_repeat_ms``: a 50 ns kernel timed 3 calls at a time is
        one timer tick, 20000 calls (1 ms) are not (calibration passes 1; 0 keeps ``number``).
        With ``budget_s``, a kernel slower than ``budget_s / repeats`` gets fewer repeats (at
        least 5): a 20 ms kernel then costs ~0.1 s, not 0.6."""
        out = []
        for i, (symbol, specs) in enumerate(calls):
            args = random_args(specs, self.dev, seed=i)
            t0 = time.perf_counter()
            lib[symbol](*args)  # warm-up: page in code and data before the first timing
            est = max(time.perf_counter() - t0, min_repeat_ms * 1e-3)
            n = repeats if budget_s is None else min(repeats, max(5, int(budget_s / est)))
            f = lib.time_evaluator(symbol, self.dev, number=number, repeat=n,
                                   min_repeat_ms=min_repeat_ms)
            out.append(timing(f(*args).results, number))
        return out

    def time_vm(self, lib, functions, repeats: int, number: int,
                min_repeat_ms: int = 0) -> dict[str, Timing]:
        """``functions``: {name: nested arg specs} -> Timing of each whole VM function."""
        vm = relax.VirtualMachine(lib, self.dev)
        out = {}
        for i, (name, specs) in enumerate(functions.items()):
            args = random_args(specs, self.dev, seed=100 + i)
            vm[name](*args)  # warm-up
            f = vm.time_evaluator(name, self.dev, number=number, repeat=repeats,
                                  min_repeat_ms=min_repeat_ms)
            out[name] = timing(f(*args).results, number)
        return out
