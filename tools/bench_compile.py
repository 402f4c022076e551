"""Compile-time and artifact-size benchmark for ``compile_split``.

    python -m splitc.tools.bench_compile [MODEL.onnx ...] [--test-models] \
        [--device-target llvm] [--server-target llvm] [--batch-size N] [--json]

Each model is imported and annotated (``passes/pipeline.py: annotate_model``), split after the
first half of its ops (a fixed placement, so the numbers do not depend on the cost model), and
compiled; the table lists compile seconds per side and the bytes of every artifact.
``--test-models`` adds the shared test models (tests/helpers/models.py: tiny_cnn, mbv2_block,
tiny_transformer). Without arguments it runs the demo model shipped in tools/models.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import tempfile
import time
from pathlib import Path

import click

HERE = Path(__file__).resolve().parent


def _test_models() -> list[Path]:
    path = HERE.parent / "tests" / "helpers" / "models.py"
    spec = importlib.util.spec_from_file_location("splitc_test_models", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return [mod.export_model(n) for n in ("tiny_cnn", "mbv2_block", "tiny_transformer")]


def bench_one(
    model: Path,
    device_target: str,
    server_target: str,
    batch_size: int | None,
    cross_compiler: str | None,
) -> dict:
    from splitc.cost_models.link import Link
    from splitc.passes.package import compile_split
    from splitc.passes.pipeline import PlanConfig, annotate_model
    from splitc.passes.plan import Placement, Plan

    t0 = time.perf_counter()
    mod, _, graph = annotate_model(PlanConfig(model=model, batch_size=batch_size))
    ops = [o.name for o in graph.ops]
    plan = Plan.build(
        graph,
        Placement.of(ops[: len(ops) // 2]),
        Link.parse("100Mbps"),
        "training",
        "half",
        "bench",
        "bench",
    )
    import_s = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as d:
        s = compile_split(
            mod,
            plan,
            device_target=device_target,
            server_target=server_target,
            cross_compiler=cross_compiler,
            output=Path(d) / "split.tar",
        )
    row = {
        "model": model.name,
        "ops": len(ops),
        "import_s": round(import_s, 2),
        "split_s": round(s["split_seconds"], 2),
        "tar_bytes": s["tar_bytes"],
        "cuda": s["cuda"],
    }
    for side, v in s["sides"].items():
        row[f"{side}_compile_s"] = round(v["compile_seconds"], 2)
        row[f"{side}_lib_bytes"] = v["library_bytes"]
        row[f"{side}_params_bytes"] = v["params_bytes"]
        row[f"{side}_opt_state_bytes"] = v["opt_state_bytes"]
    return row


@click.command()
@click.argument("models", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option(
    "--test-models", is_flag=True, help="Also run tiny_cnn, mbv2_block, tiny_transformer."
)
@click.option("--device-target", default="llvm", show_default=True)
@click.option("--server-target", default="llvm", show_default=True)
@click.option("--cross-compiler", default=None)
@click.option(
    "--batch-size",
    type=int,
    default=8,
    show_default=True,
    help="For models with a symbolic batch dim.",
)
@click.option("--json", "as_json", is_flag=True)
def main(models, test_models, device_target, server_target, cross_compiler, batch_size, as_json):
    paths = list(models) or ([] if test_models else [HERE / "models" / "demo_cnn.onnx"])
    if test_models:
        paths += _test_models()
    rows = [bench_one(p, device_target, server_target, batch_size, cross_compiler) for p in paths]
    if as_json:
        json.dump(rows, sys.stdout, indent=1)
        print()
        return
    cols = [
        "model",
        "ops",
        "split_s",
        "device_compile_s",
        "server_compile_s",
        "device_lib_bytes",
        "server_lib_bytes",
        "device_params_bytes",
        "server_params_bytes",
        "tar_bytes",
    ]
    print(f"device={device_target} server={server_target}")
    print(" ".join(f"{c:>18}" for c in cols))
    for r in rows:
        print(" ".join(f"{r[c]!s:>18}" for c in cols))


if __name__ == "__main__":
    main()
