"""splitc: a compiler for split learning.

The repository root is the ``splitc`` package: ``splitc.passes`` (TVM passes and the IR-free
solver), ``splitc.cost_models``, ``splitc.runtime`` and ``splitc.tools`` (the CLI).
Nothing heavy is imported here: ``import splitc`` must not pull in TVM.
"""

import os as _os

__version__ = "0.1.0"

__all__ = [
    "SplitcError",
    "InputError",
    "UnsupportedError",
    "PlanError",
    "BuildError",
    "PackageError",
    "TransportError",
]


class SplitcError(Exception):
    """Base of every error splitc raises on purpose.

    Messages are one line: ``"<Pass or component>: <what is wrong>; <how to fix it>"``.
    ``exit_code`` is what the CLI exits with.
    """

    exit_code = 1


class InputError(SplitcError):
    """Bad user input: missing or corrupt files, bad shapes, bad options, unknown names."""

    exit_code = 2


class UnsupportedError(SplitcError):
    """The model uses something splitc cannot handle (an op, a gradient, a dtype)."""

    exit_code = 3


class PlanError(SplitcError):
    """No feasible placement (contradictory pins) or an invariant of a plan is broken."""

    exit_code = 4


class BuildError(SplitcError):
    """Splitting or compiling failed: target, toolchain or invariant after the split."""

    exit_code = 5


class PackageError(SplitcError):
    """A split.tar is corrupt, tampered with, or its halves do not belong together."""

    exit_code = 6


class TransportError(SplitcError):
    """A message on the link broke the transport spec, or the peer went away."""

    exit_code = 7


def _keep_cpu_set() -> None:
    """Keep TVM's threads on the cores this process was started on.

    TVM's thread pool binds its threads, the calling one included, to cores 0..n-1 when it
    first starts (``threading::ThreadGroup::Configure``), whatever cores the process may use.
    Under ``taskset -c 1`` a calibration went on to time every kernel on core 0 (session 17,
    seen with strace); work started on core 0 "beside it" then shared its core, and steps of
    56-67 ms read 115-145 ms. Where the process may not use every core, binding is turned off
    (``TVM_BIND_THREADS=0``, read when the pool starts, after this import), so the threads
    stay on the cores given. A ``TVM_BIND_THREADS`` the user set is left alone."""
    if "TVM_BIND_THREADS" in _os.environ or not hasattr(_os, "sched_getaffinity"):
        return
    if len(_os.sched_getaffinity(0)) < (_os.cpu_count() or 1):
        _os.environ["TVM_BIND_THREADS"] = "0"


_keep_cpu_set()
