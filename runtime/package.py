"""Read split.tar (written by ``passes/package.py``) and refuse anything that does not belong.

Checks, in order, each a one-line ``PackageError``: the file is a readable tar with a
``plan.json``; no member escapes the archive (absolute paths, ``..``, links); each side's
manifest carries the model hash of plan.json (else: a plan from another model) and its plan id
(else: halves from different plans); every file listed in plan.json exists and matches its
sha256, and no unlisted file is present (else: tampered or corrupt).
No TVM and no pickle here: parameters are loaded with ``np.load(allow_pickle=False)``.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from splitc import PackageError
from splitc.runtime.halves import CutSpec

__all__ = ["SplitPackage", "read_package"]


@dataclass(frozen=True)
class SplitPackage:
    path: str
    plan: dict
    files: dict[str, bytes]

    @property
    def plan_id(self) -> str:
        return self.plan["plan_id"]

    @property
    def cut(self) -> tuple[CutSpec, ...]:
        return tuple(CutSpec.from_json(c) for c in self.plan["transport"])

    def manifest(self, side: str) -> dict:
        return json.loads(self.files[f"{side}/manifest.json"])

    def arrays(self, side: str, name: str) -> dict[str, np.ndarray]:
        with np.load(io.BytesIO(self.files[f"{side}/{name}"]), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}

    def library(self, side: str) -> bytes:
        return self.files[f"{side}/lib.so"]


def _err(path, what: str, fix: str) -> PackageError:
    return PackageError(f"Package: {path}: {what}; {fix}")


def _core_sha(plan: dict) -> str:
    # same rule as passes/package.py: plan_core_sha256 (the runtime must not import passes)
    core = {k: v for k, v in plan.items() if k not in ("files", "versions", "targets")}
    return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()


def read_package(path: str | Path, *, model_hash: str | None = None) -> SplitPackage:
    """Load and verify ``path``; ``model_hash`` (optional) must match the plan's model."""
    path = str(path)
    try:
        with tarfile.open(path, "r") as tar:
            files = {}
            for m in tar.getmembers():
                if m.isdir():
                    continue
                if not m.isfile() or m.name.startswith("/") or ".." in Path(m.name).parts:
                    raise _err(
                        path,
                        f"unsafe member {m.name!r}",
                        "the archive was tampered with; rebuild it with splitc compile",
                    )
                files[m.name] = tar.extractfile(m).read()
    except PackageError:
        raise
    except FileNotFoundError:
        raise _err(path, "no such file", "check the path or run splitc compile") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise _err(
            path,
            f"not a readable split.tar ({type(e).__name__})",
            "the file is corrupt; rebuild it with splitc compile",
        ) from None
    if "plan.json" not in files:
        raise _err(path, "no plan.json", "the file is corrupt; rebuild it with splitc compile")
    try:
        plan = json.loads(files["plan.json"])
        listed = dict(plan["files"])
        plan_id, mhash = plan["plan_id"], plan["model_hash"]
    except (ValueError, KeyError, TypeError):
        raise _err(
            path, "plan.json is unreadable", "the file is corrupt; rebuild it with splitc compile"
        ) from None
    if model_hash is not None and mhash != model_hash:
        raise _err(
            path,
            f"plan is for model {mhash!r}, not {model_hash!r}",
            "compile a plan made for this model",
        )
    for side in ("device", "server"):
        name = f"{side}/manifest.json"
        try:
            man = json.loads(files[name])
        except (KeyError, ValueError):
            raise _err(
                path,
                f"{name} missing or unreadable",
                "the file is corrupt; rebuild it with splitc compile",
            ) from None
        if man.get("model_hash") != mhash:
            raise _err(
                path,
                f"the {side} half was built for model {man.get('model_hash')!r} "
                f"but plan.json is for {mhash!r}",
                "rebuild both halves from one plan",
            )
        if man.get("plan_id") != plan_id:
            raise _err(
                path,
                f"the {side} half belongs to plan {man.get('plan_id')!r}, not {plan_id!r}",
                "rebuild both halves from one plan with splitc compile",
            )
        if man.get("plan_sha256") != _core_sha(plan):
            raise _err(
                path,
                f"plan.json differs from the plan the {side} half was built with (tampered)",
                "rebuild it with splitc compile",
            )
    for name, digest in listed.items():
        if name not in files:
            raise _err(path, f"{name} is missing", "rebuild it with splitc compile")
        if hashlib.sha256(files[name]).hexdigest() != digest:
            raise _err(
                path,
                f"sha256 of {name} does not match plan.json (tampered or corrupt)",
                "rebuild it with splitc compile",
            )
    extra = sorted(set(files) - set(listed) - {"plan.json"})
    if extra:
        raise _err(
            path,
            f"unlisted files {extra[:3]}",
            "the archive was tampered with; rebuild it with splitc compile",
        )
    return SplitPackage(path, plan, files)
