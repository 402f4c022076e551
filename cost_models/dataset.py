"""The calibration dataset: JSON lines, one row per measured kernel, ``step``, ``ops`` (the
model's OpFeatures, as the planner sees them) or ``done``.

Each row carries its provenance (target, board, TVM version, date, repeats, ``schema``); see
``calibrate.py`` for what is measured. ``done_keys`` says what a resumed run may skip.
"""

from __future__ import annotations

import datetime
import json
from pathlib import Path

from splitc import InputError

__all__ = ["DATASET_VERSION", "done_keys", "load_rows", "load_train_rows", "now", "row_key"]

DATASET_VERSION = 1


def now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def row_key(workload: str, function: str, role: str, symbol: str) -> tuple:
    return (workload, function, role, symbol)


def load_rows(path: Path, target: str | None = None, board: str | None = None) -> list[dict]:
    """Rows of a dataset file (optionally only those measured on ``target`` / ``board``).
    A torn last line (calibration killed mid-write) is skipped."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for n, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(r, dict) or r.get("schema") != DATASET_VERSION:
            raise InputError(f"Calibrate: {str(path)!r} line {n + 1} is not a splitc dataset "
                             f"row (schema {DATASET_VERSION}); use another --dataset path")
        if (target is None or r.get("target") == target) and (board is None or
                                                                 r.get("board") == board):
            rows.append(r)
    return rows


def done_keys(rows: list[dict]) -> set:
    keys = set()
    for r in rows:
        if r["type"] == "kernel":
            keys.add(row_key(r["workload"], r["function"], r["role"], r["symbol"]))
        else:  # "step", "ops" or "done" (every row of the workload is in the file)
            keys.add(row_key(r["workload"], r["type"], "", ""))
    return keys


def load_train_rows(paths, target: str | None = None, board: str | None = None,
                    skip: set | frozenset = frozenset()) -> list[dict]:
    """The training-only rows (op sweep, synthetic models, family blocks: ``train_only``) of
    other datasets, measured on ``target`` / ``board``, without the workloads in ``skip``
    (those measured in the calibration that reuses them). A test model's rows are never
    taken: reusing a cached sweep must not put a held-out model's kernels in the fit."""
    out = []
    for p in paths:
        if not Path(p).is_file():
            raise InputError(f"Calibrate: training dataset {str(p)!r} does not exist; pass the "
                             ".jsonl of an earlier calibration")
        out += [r for r in load_rows(p, target, board)
                if r.get("train_only") and r["workload"] not in skip]
    return out
