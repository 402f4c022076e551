"""The split's contract: argument orders of the emitted functions and their invariants.

Plain data and checks for ``passes/split_module.py`` (kept apart so the pass stays readable):
``SplitSpec`` holds the argument orders that the builder writes into each side's manifest,
``check_split`` re-checks, after the split, that every function is well formed and that the
boundary signatures equal the transport spec (the cut tensors up, their gradients down).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import tvm
from splitc import BuildError
from tvm import relax

__all__ = ["SplitSpec", "TensorSpec", "check_split", "tensor_spec"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_json(self) -> dict:
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class SplitSpec:
    """Argument orders of the emitted functions (plain data, written to the manifests)."""

    plan_id: str
    cut: tuple  # CutTensor, plan order
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    labels: TensorSpec | None
    device_params: tuple[str, ...]  # trainable, in argument order
    device_state: tuple[str, ...]  # running stats
    server_params: tuple[str, ...]
    server_state: tuple[str, ...]
    residuals: tuple[TensorSpec, ...]
    loss: str
    optimizer: str
    lr: float
    recompute: bool
    opt_state: dict = field(default_factory=dict)  # side -> list of numpy arrays
    objective: str = "training"

    def side_json(self, side: str) -> dict:
        d = {
            "plan_id": self.plan_id,
            "cut": [c.to_json() for c in self.cut],
            "params": list(getattr(self, f"{side}_params")),
            "state": list(getattr(self, f"{side}_state")),
            "optimizer": self.optimizer,
            "lr": self.lr,
            "loss": self.loss,
        }
        train = self.objective == "training"
        if side == "device":
            d.update(
                inputs=[t.to_json() for t in self.inputs],
                residuals=[t.to_json() for t in self.residuals],
                recompute=self.recompute,
                functions=(["device_forward", "device_backward"] if train else [])
                + (["device_update"] if train and self.device_params else [])
                + ["device_infer"],
            )
        else:
            d.update(
                outputs=[t.to_json() for t in self.outputs],
                labels=self.labels.to_json() if self.labels else None,
                functions=(["server_step"] if train else [])
                + (["server_update"] if train and self.server_params else [])
                + ["server_infer"],
            )
        d["objective"] = self.objective
        return d


def tensor_spec(name: str, ty) -> TensorSpec:
    return TensorSpec(name, tuple(int(d) for d in ty.shape), str(ty.dtype))


def _ty_of(ty) -> tuple:
    return tuple(int(d) for d in ty.shape), str(ty.dtype)


def check_split(mod: tvm.IRModule, spec: SplitSpec) -> None:
    """Invariants after the split; ``BuildError`` naming the function that breaks one."""
    helper = {gv: f for gv, f in mod.functions.items() if gv.name_hint == "server_loss_adjoint"}
    for gv, f in mod.functions.items():
        try:  # 0.27 raises on an ill-formed module (older versions returned False)
            ok = relax.analysis.well_formed(tvm.IRModule({**helper, gv: f}))
        except Exception as e:  # noqa: BLE001
            ok, why = False, str(e).splitlines()[-1]
        else:
            why = "well_formed returned False"
        if ok is False:
            raise BuildError(
                f"SplitModule: {gv.name_hint} is not well formed ({why}); report a bug"
            )
    want = [(tuple(c.shape), c.dtype) for c in spec.cut]
    names = {gv.name_hint for gv in mod.functions}
    for fname in [f for f in ("device_forward", "device_infer") if f in names]:
        got = [_ty_of(t) for t in mod[fname].ret_ty.fields[: len(want)]]
        if got != want:
            raise BuildError(
                f"SplitModule: {fname} sends {got}, the plan's transport spec says "
                f"{want}; the plan does not match this model"
            )
    for fname in [f for f in ("server_step", "server_infer") if f in names]:
        f = mod[fname]
        got = [(p.name, *_ty_of(p.ty)) for p in f.params[: len(want)]]
        exp = [(c.name, tuple(c.shape), c.dtype) for c in spec.cut]
        if got != exp:
            raise BuildError(
                f"SplitModule: {fname} receives {got}, the plan's transport spec "
                f"says {exp}; the plan does not match this model"
            )
    if "server_step" not in names:
        return
    ng = sum(c.grad for c in spec.cut)
    gdown = [_ty_of(t) for t in mod["server_step"].ret_ty.fields[1 : 1 + ng]]
    if gdown != [w for w, c in zip(want, spec.cut) if c.grad]:
        raise BuildError(
            f"SplitModule: server_step returns cut gradients {gdown} that do not "
            "match the grad=True cut tensors; report a bug"
        )
