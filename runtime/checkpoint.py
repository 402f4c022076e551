"""Atomic checkpoints of a half's state: ``.npz`` arrays (allow_pickle=False) + JSON manifest.

Layout of a checkpoint directory::

    ckpt-00000012.npz   arrays (state_dict of the half, plus agent data such as reply caches)
    ckpt-00000012.json  manifest: {"step", "meta", "sha256" of the npz, "format"}

Each file is written to a temporary name, fsynced, renamed into place and the directory fsynced,
the npz before its manifest: a checkpoint exists once its manifest does, so a crash at any point
leaves the previous checkpoint intact. Loading re-hashes the npz against the manifest.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
from splitc import InputError

__all__ = ["FORMAT", "load", "prune", "save", "steps"]

FORMAT = "splitc-ckpt-1"
_NAME = re.compile(r"^ckpt-(\d{8})\.json$")


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(d: Path) -> None:
    fd = os.open(d, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(directory, step: int, arrays: dict[str, np.ndarray], meta: dict) -> Path:
    """Write checkpoint ``step`` atomically; return the manifest path."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    npz = d / f"ckpt-{step:08d}.npz"
    h = hashlib.sha256()

    def write_npz(f):
        np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})

    _write_atomic(npz, write_npz)
    with open(npz, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    manifest = {"format": FORMAT, "step": step, "sha256": h.hexdigest(), "meta": meta}
    path = d / f"ckpt-{step:08d}.json"
    _write_atomic(path, lambda f: f.write(json.dumps(manifest, sort_keys=True).encode()))
    _fsync_dir(d)
    return path


def steps(directory) -> list[int]:
    """Steps of the complete checkpoints in ``directory``, ascending."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := _NAME.match(p.name)))


def load(directory, step: int | None = None) -> tuple[int, dict[str, np.ndarray], dict] | None:
    """(step, arrays, meta) of checkpoint ``step`` (default: the latest), or None if none."""
    avail = steps(directory)
    if not avail:
        return None
    step = avail[-1] if step is None else step
    d = Path(directory)
    try:
        manifest = json.loads((d / f"ckpt-{step:08d}.json").read_text())
        data = (d / f"ckpt-{step:08d}.npz").read_bytes()
    except (OSError, ValueError) as e:
        raise InputError(f"Checkpoint: cannot read step {step} in {d} ({e})") from None
    if manifest.get("format") != FORMAT or hashlib.sha256(data).hexdigest() != manifest["sha256"]:
        raise InputError(
            f"Checkpoint: {d}/ckpt-{step:08d}.npz does not match its manifest hash; the file "
            f"is corrupt, delete it to fall back to an older checkpoint"
        )
    import io

    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        arrays = {k: z[k] for k in z.files}
    return step, arrays, manifest["meta"]


def prune(directory, keep_from: int, keep_last: int = 1) -> None:
    """Delete checkpoints older than ``keep_from``, always keeping the newest ``keep_last``."""
    avail = steps(directory)
    protected = set(avail[-keep_last:]) if keep_last else set()
    for s in avail:
        if s < keep_from and s not in protected:
            d = Path(directory)
            # Manifest first: without it the npz is not a checkpoint any more.
            (d / f"ckpt-{s:08d}.json").unlink(missing_ok=True)
            (d / f"ckpt-{s:08d}.npz").unlink(missing_ok=True)
