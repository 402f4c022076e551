"""splitc: a compiler for split learning.

The repository root is the ``splitc`` package: ``splitc.passes`` (TVM passes and the IR-free
solver), ``splitc.cost_models``, ``splitc.runtime`` and ``splitc.tools`` (the CLI).
Nothing heavy is imported here: ``import splitc`` must not pull in TVM.
"""

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
