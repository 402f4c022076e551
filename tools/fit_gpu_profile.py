"""Calibrate a GPU roofline profile from measured compiled training steps (``bench_gpu``).

The bundled GPU profiles are data-sheet priors: peak FLOP/s and bandwidth that cuBLAS and
cuDNN approach, not what splitc's compiled kernels (dlight default schedules) reach. A planner
fed the H100 prior prices the server half several times too cheap. This fits the roofline's
three constants (float32 FLOP/s, bytes/s, seconds per kernel) so that the planner's own op
costs (``passes/annotate_costs.py`` over the model's ONNX, summed forward + backward +
update) match the measured step and forward times of ``bench_gpu run --json`` for every
model, and writes them as a profile (``provenance.status == "calibrated"``).

Fitted by least squares on log(predicted / measured) over all (model, step|forward) pairs,
Nelder-Mead in log space from the prior. Reported: the prior's and the fit's error per model,
and the fit's error when each model is left out of the fit (what a model the calibration
never saw can expect).

    python -m splitc.tools.fit_gpu_profile RUN.json [RUN2.json ...] --base h100 \\
        --name h100-tvm -o cost_models/profiles/h100-tvm.json
"""

from __future__ import annotations

import json
import math
import os
import statistics
import tempfile
import time

import click


def op_features(name: str, image: int = 224) -> list:
    """The planner's OpFeatures of every op of a ``bench_gpu`` model (same ONNX export)."""
    from splitc.cost_models.profiles import load_profile
    from splitc.cost_models.roofline import RooflineModel
    from splitc.passes.pipeline import PlanConfig, annotate_model
    from splitc.tools.bench_gpu import _model
    from splitc.tools.bench_vs_pytorch import export_onnx

    model, shape, _ = _model(name, image)
    prior = RooflineModel(load_profile("h100"))  # features do not depend on the profile
    with tempfile.TemporaryDirectory() as d:
        path = export_onnx(model, shape, os.path.join(d, "model.onnx"))
        _, _, graph = annotate_model(PlanConfig(model=path), (prior, prior, "h100", "h100"))
    return [op.features for op in graph.ops if op.features is not None]


def predict(feats: list, flops: float, bw: float, overhead: float) -> tuple[float, float]:
    """(step, forward) seconds of the roofline with these constants, SGD updates."""
    from splitc.cost_models.profiles import DeviceProfile
    from splitc.cost_models.roofline import RooflineModel

    prof = DeviceProfile(
        "fit", "gpu", {"float32": flops}, bw, overhead, {"status": "calibrated", "source": "fit"}
    )
    m = RooflineModel(prof)
    costs = [m.op_cost(f) for f in feats]
    return sum(c.forward + c.backward + c.update for c in costs), sum(c.forward for c in costs)


def fit(cases: dict, start: tuple[float, float, float], cap: tuple[float, float]):
    """(FLOP/s, bytes/s, overhead s) minimising squared log errors over ``cases``
    ({model: (features, step s, forward s)}); FLOP/s and bytes/s at most ``cap`` (the data
    sheet's: compiled kernels do not beat the hardware, and without the cap an unused
    bandwidth term runs off to infinity)."""
    from scipy.optimize import minimize

    def consts(v):
        f, b, o = (math.exp(t) for t in v)
        return min(f, cap[0]), min(b, cap[1]), o

    def loss(v):
        f, b, o = consts(v)
        err = 0.0
        for feats, step, fwd in cases.values():
            ps, pf = predict(feats, f, b, o)
            err += math.log(ps / step) ** 2 + math.log(pf / fwd) ** 2
        return err

    best = None
    # starts: the given one and a grid below the cap (the roofline's max() makes the loss
    # piecewise; Nelder-Mead from one start stopped 2% off on a synthetic check)
    starts = [start] + [(cap[0] / a, cap[1] / b, start[2]) for a in (2, 8, 32) for b in (1.5, 6)]
    for s0 in starts:
        x = [math.log(max(v, 1e-12)) for v in s0]
        for _ in range(2):  # a restart re-opens a collapsed simplex
            x = minimize(
                loss,
                x,
                method="Nelder-Mead",
                options={"xatol": 1e-6, "fatol": 1e-12, "maxiter": 4000},
            ).x
        if best is None or loss(x) < loss(best):
            best = x
    x = best
    return consts(x)


@click.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--base", default="h100", show_default=True, help="the prior profile to refit")
@click.option("--name", default="h100-tvm", show_default=True)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False))
def main(runs, base, name, output):
    """Fit NAME from bench_gpu RUNS (medians over runs per model) and write it to OUTPUT."""
    from splitc.cost_models.profiles import load_profile

    rows: dict = {}
    device = None
    for path in runs:
        d = json.loads(open(path).read())  # noqa: SIM115 - small JSON
        device = device or d["device"]
        for r in d["rows"]:
            rows.setdefault(r["name"], []).append((r["tvm_step_s"], r["tvm_fwd_s"]))
    prior = load_profile(base)
    cases = {}
    for m, vals in rows.items():
        click.echo(f"{m}: annotating", err=True)
        step = statistics.median(v[0] for v in vals)
        fwd = statistics.median(v[1] for v in vals)
        cases[m] = (op_features(m), step, fwd)
    p0 = (prior.peak("float32"), prior.mem_bandwidth, prior.kernel_overhead)
    t0 = time.perf_counter()
    cap = p0[:2]
    # start inside the cap (the clamped region is flat: Nelder-Mead would stall on it)
    best = fit(cases, (p0[0] / 4, p0[1] / 2, p0[2]), cap)
    loo = {m: fit({k: v for k, v in cases.items() if k != m}, best, cap) for m in cases}
    click.echo(f"fitted in {time.perf_counter() - t0:.1f} s", err=True)

    def err(consts, m):
        ps, pf = predict(cases[m][0], *consts)
        return ps / cases[m][1] - 1, pf / cases[m][2] - 1

    click.echo(
        "| model | measured step | prior step err | fit step err | left-out fit step err |"
        " left-out fit fwd err |"
    )
    click.echo("|---|---|---|---|---|---|")
    worst = 0.0
    for m in cases:
        e_prior, e_fit, e_loo = err(p0, m), err(best, m), err(loo[m], m)
        worst = max(worst, abs(e_loo[0]))
        click.echo(
            f"| {m} | {cases[m][1] * 1e3:.2f} ms | {e_prior[0]:+.0%} | {e_fit[0]:+.0%} | "
            f"{e_loo[0]:+.0%} | {e_loo[1]:+.0%} |"
        )
    f, b, o = best
    click.echo(
        f"\n{name}: {f / 1e12:.2f} TFLOP/s fp32, {b / 1e12:.2f} TB/s, {o * 1e6:.1f} us "
        f"per kernel (prior {p0[0] / 1e12:.1f} TFLOP/s, {p0[1] / 1e12:.2f} TB/s, "
        f"{p0[2] * 1e6:.1f} us)"
    )
    ratio = f / p0[0]
    prof = {
        "name": name,
        "kind": "gpu",
        "peak_flops": {k: v * ratio for k, v in prior.peak_flops.items()},
        "mem_bandwidth": b,
        "kernel_overhead": o,
        "provenance": {
            "status": "calibrated",
            "source": (
                f"tools/fit_gpu_profile.py: roofline refit of '{base}' to splitc's "
                f"compiled training steps (bench_gpu) on {device}"
            ),
            "date": time.strftime("%Y-%m"),
            "notes": (
                f"fitted on {', '.join(cases)} (medians of {len(runs)} runs); worst "
                f"left-one-model-out step error {worst:.0%}; other dtypes scaled by "
                "the float32 ratio (not measured)"
            ),
        },
    }
    with open(output, "w") as fh:
        json.dump(prof, fh, indent=2)
        fh.write("\n")
    click.echo(f"wrote {output}", err=True)


if __name__ == "__main__":
    main()
