"""Fitting the learned cost model to a calibration dataset (rows of ``dataset.py``).

Linear and tree regressors in log space, compared by leave-one-model-out error
(``heldout_report``); the better one is refitted on every row (``fit_learned``), with the
whole-step correction ``step ~ step_scale x sum(kernels) + call_overhead x calls``
(``_step_fit``).
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np
from splitc import SplitcError
from splitc.cost_models.features import FAMILIES, FEATURE_NAMES, KernelFeatures, vector
from splitc.cost_models.learned import LEARNED_VERSION, Regressor, fit_regressor, mape, within
from splitc.cost_models.profiles import DeviceProfile

__all__ = ["fit_learned", "heldout_report"]


def _xy(rows: list[dict], prof: DeviceProfile):
    ks = [KernelFeatures.from_json(r["features"]) for r in rows]
    X = np.array([vector(k, prof.peak("float32"), prof.mem_bandwidth) for k in ks])
    y = np.log10(np.maximum([r["seconds"] for r in rows], 1e-9))
    return ks, X, y


def _roofline(ks: list[KernelFeatures], prof: DeviceProfile) -> np.ndarray:
    return np.array([max(k.flops / prof.peak(k.dtype),
                         (k.bytes_read + k.bytes_written) / prof.mem_bandwidth)
                     + prof.kernel_overhead for k in ks])


def _step_fit(kernels: list[dict], steps: list[dict]) -> tuple[float, float]:
    """(scale, call_overhead): the compiled step ~ scale x (sum of its kernels timed alone) +
    call_overhead x (kernel calls). Isolated kernels run with hot caches and no VM around
    them, so scale >= 1 in practice (1.2-2 measured here). Fitted by non-negative least squares
    on relative errors, so a 0.1 ms model weighs as much as a 40 ms one."""
    from scipy.optimize import nnls

    per = defaultdict(float)
    for r in kernels:
        per[r["workload"]] += r["calls"] * r["seconds"]
    eq = [(per[s["workload"]] / s["seconds"], s["n_calls"] / s["seconds"]) for s in steps
          if s["workload"] in per and s["n_calls"] and s["seconds"] > 0]
    if not eq:
        return 1.0, 0.0
    A = np.array(eq)
    A[:, 1] *= 1e-6  # overhead in microseconds: columns of similar size for NNLS
    (scale, ovh_us), _ = nnls(A, np.ones(len(eq)))
    if scale <= 0:  # degenerate (one tiny workload): keep kernels as they are
        return 1.0, float(max((1 - A[:, 0]).mean() / max(A[:, 1].mean(), 1e-12), 0) * 1e-6)
    return float(scale), float(ovh_us * 1e-6)


def heldout_report(rows: list[dict], prof: DeviceProfile, kinds=("linear", "trees")) -> dict:
    """Leave-one-model-out: for each model, fit on every other model's kernels plus the sweep
    and predict this model's kernels and whole step. Returns per regressor (and ``roofline``)
    the share of kernels within +-10 %, the MAPE (%), and per model the predicted and measured
    step."""
    kern = [r for r in rows if r["type"] == "kernel"]
    steps = {r["workload"]: r for r in rows if r["type"] == "step"}
    models = sorted({r["model"] for r in kern if r["model"] != "sweep"})
    out: dict = {"models": models, "kernels": 0}
    preds: dict[str, list] = defaultdict(list)
    meas, step_rep = [], defaultdict(dict)
    for m in models:
        train = [r for r in kern if r["model"] != m]
        test = [r for r in kern if r["model"] == m]
        if not train or not test:
            continue
        ks_tr, Xtr, ytr = _xy(train, prof)
        ks, X, _ = _xy(test, prof)
        y = np.array([r["seconds"] for r in test])
        meas.extend(y)
        scale, ovh = _step_fit(train, [s for w, s in steps.items() if s["model"] != m])
        seen = {k.family for k in ks_tr}
        roof = _roofline(ks, prof)
        cand = {"roofline": roof}
        for kind in kinds:
            p = 10.0 ** fit_regressor(kind, Xtr, ytr).predict(X)
            fb = np.array([k.family not in seen for k in ks])
            cand[kind] = np.where(fb, roof, p)
        for name, p in cand.items():
            preds[name].extend(p)
            for w in {r["workload"] for r in test}:
                if w not in steps:
                    continue
                idx = [i for i, r in enumerate(test) if r["workload"] == w]
                calls = np.array([test[i]["calls"] for i in idx])
                pred = float((calls * p[idx]).sum())
                if name != "roofline":
                    pred = scale * pred + ovh * steps[w]["n_calls"]
                step_rep[w][name] = pred
                step_rep[w]["measured"] = steps[w]["seconds"]
    out["kernels"] = len(meas)
    meas = np.asarray(meas)
    big = meas >= 1e-5  # kernels of 10 us or more: below, timer resolution and noise dominate
    out["kernels_ge_10us"] = int(big.sum())
    for name, p in preds.items():
        p = np.asarray(p)
        out[name] = {"within_10pct": within(p, meas), "mape_pct": mape(p, meas)}
        if big.any():
            out[name].update(within_10pct_ge_10us=within(p[big], meas[big]),
                             mape_pct_ge_10us=mape(p[big], meas[big]))
    out["steps"] = dict(step_rep)
    return out


def fit_learned(rows: list[dict], prof: DeviceProfile, kinds=("linear", "trees"),
                heldout: bool = True) -> dict:
    """The ``learned`` section of a calibrated profile: the regressor with the lower held-out
    MAPE (trees when there is only one model to hold out), refitted on every row.
    ``heldout=False`` skips the leave-one-model-out comparison and fits ``kinds[0]``."""
    kern = [r for r in rows if r["type"] == "kernel"]
    if len(kern) < 8:
        raise SplitcError(f"Calibrate: only {len(kern)} kernels measured; add models or enable "
                          "the op sweep")
    report = heldout_report(rows, prof, kinds) if heldout else {"models": [], "kernels": 0}
    scored = [k for k in kinds if k in report]
    best = min(scored, key=lambda k: report[k]["mape_pct"]) if scored else kinds[-1]
    ks, X, y = _xy(kern, prof)
    reg: Regressor = fit_regressor(best, X, y)
    steps = [r for r in rows if r["type"] == "step"]
    scale, ovh = _step_fit(kern, steps)
    sample = kern[0]
    return {"version": LEARNED_VERSION, "features": list(FEATURE_NAMES),
            "regressor": reg.to_json(), "families": sorted({k.family for k in ks}),
            "all_families": list(FAMILIES), "step_scale": scale, "call_overhead": ovh,
            "accuracy": {k: v for k, v in report.items() if k != "steps"},
            "steps": report.get("steps", {}),
            "dataset": {"rows": len(rows), "kernels": len(kern), "steps": len(steps),
                        "models": sorted({r["model"] for r in kern}),
                        "target": sample["target"], "board": sample["board"],
                        "tvm": sample["tvm"], "repeats": sample["repeats"]}}
