"""Benchmark the partition solver on synthetic DNN-shaped graphs (or an OpGraph JSON).

    python -m splitc.tools.bench_partition --sizes 1000 10000 100000 --graphs 3
    python -m splitc.tools.bench_partition --graph-json model.opgraph.json --json out.json

Prints markdown tables: build + solve time of the min cut per engine, with and without the
exact reductions, of the block-wise solver (median / worst over the graphs of each size),
and the predicted per-step delay of every algorithm and baseline at 10, 100 and 1000 Mbps.
Columns: ``problem`` reads the OpGraph into arrays (pins, forced sides; once per solve);
each engine column is network construction + int64 scaling + reductions + max-flow +
feasibility check on that problem; ``blockwise`` includes block detection and its own
problem; ``recost`` is the exact Fraction re-cost of the final plan (``Plan.build``).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import sys
import time

import numpy as np
from splitc.cost_models.base import OpCost
from splitc.cost_models.link import Link
from splitc.passes import baselines as bl
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
from splitc.passes.partition import _blockwise, _mincut, compare
from splitc.passes.plan import Plan

FAMILIES = ("resnet", "inception", "transformer")
# Device ~ Jetson Orin Nano class (1 TFLOP/s effective fp32, 20 us per kernel), server ~ one
# data-centre GPU (50 TFLOP/s, 5 us per kernel); +-20 % jitter per op so graphs differ.
_DEV, _SRV = (1e12, 20e-6, 50e9), (5e13, 5e-6, 1e12)  # FLOP/s, s per kernel, update B/s


class _Builder:
    def __init__(self, name: str, seed: int):
        self.name, self.rng = name, np.random.default_rng(seed)
        self.ops: list[OpNode] = []
        self.shapes: dict[str, tuple] = {}
        self.producer: dict[str, str | None] = {}
        self.readers: dict[str, list[str]] = {}
        self.params: dict[str, tuple[tuple, list[str]]] = {}

    def input(self, name, shape):
        self.shapes[name], self.producer[name] = shape, None
        return name

    def op(self, kind, ins, shape, flops, param=None, pshape=None):
        name = f"{kind}_{len(self.ops)}"
        pnames = ()
        if pshape is not None:
            param = param or f"w_{name}"
            self.params.setdefault(param, (pshape, []))[1].append(name)
            pnames = (param,)
        pbytes = 4 * int(np.prod(self.params[param][0])) if pnames else 0

        def cost(peak, kernel, upd):
            f = flops / peak * self.rng.uniform(0.8, 1.2) + kernel
            return OpCost(f, 2 * f, pbytes / upd)

        self.ops.append(
            OpNode(
                name,
                kind,
                tuple(ins),
                (name,),
                pnames,
                device=cost(*_DEV),
                server=cost(*_SRV),
            )
        )
        self.shapes[name], self.producer[name] = shape, name
        for t in set(ins):
            self.readers.setdefault(t, []).append(name)
        return name

    def build(self, outputs, label_shape=(8,)) -> OpGraph:
        ts = {
            t: Tensor(
                t,
                s,
                "float32",
                self.producer[t],
                tuple(self.readers.get(t, ())),
                t in outputs,
            )
            for t, s in self.shapes.items()
        }
        ps = {p: Param(p, s, "float32", tuple(r)) for p, (s, r) in self.params.items()}
        ins = tuple(t for t, p in self.producer.items() if p is None)
        return OpGraph(
            self.name,
            tuple(self.ops),
            ts,
            ps,
            ins,
            tuple(outputs),
            (Tensor("labels", label_shape, "int64", None),),
            OpCost(1e-4),
        )


def _conv(b, x, cin, cout, hw, k=1, batch=8):
    return b.op(
        "conv",
        [x],
        (batch, cout, hw, hw),
        2 * batch * cout * hw * hw * cin * k * k,
        pshape=(cout, cin, k, k),
    )


def resnet(n_ops: int, seed: int = 0) -> OpGraph:
    """Stem, then bottleneck blocks (conv-bn-relu x3, residual add, relu) over 4 stages."""
    b = _Builder(f"resnet{n_ops}", seed)
    x = b.input("images", (8, 3, 224, 224))
    x = b.op("relu", [_conv(b, x, 3, 64, 112, 7)], (8, 64, 112, 112), 8 * 64 * 112 * 112)
    per_stage = max(1, (n_ops - 2) // (4 * 10))
    c, hw = 64, 56
    for stage in range(4):
        for _ in range(per_stage):
            y = x
            for k in (1, 3, 1):
                y = _conv(b, y, c, c, hw, k)
                y = b.op("bn", [y], (8, c, hw, hw), 4 * 8 * c * hw * hw, pshape=(2, c))
                if k != 1 or len(b.ops) % 2:
                    y = b.op("relu", [y], (8, c, hw, hw), 8 * c * hw * hw)
            x = b.op("add", [x, y], (8, c, hw, hw), 8 * c * hw * hw)
            x = b.op("relu", [x], (8, c, hw, hw), 8 * c * hw * hw)
        hw = max(7, hw // 2)
    pooled = b.op("pool", [x], (8, c), 8 * c * hw * hw)
    return b.build([b.op("fc", [pooled], (8, 1000), 2 * 8 * c * 1000, pshape=(1000, c))])


def inception(n_ops: int, seed: int = 0) -> OpGraph:
    """Modules of four parallel branches (1x1; 1x1-3x3; 1x1-5x5; pool-1x1) and a concat."""
    b = _Builder(f"inception{n_ops}", seed)
    x = _conv(b, b.input("images", (8, 3, 224, 224)), 3, 192, 28, 7)
    for _ in range(max(1, (n_ops - 3) // 8)):
        br = [
            _conv(b, x, 256, 64, 28),
            _conv(b, _conv(b, x, 256, 96, 28), 96, 128, 28, 3),
            _conv(b, _conv(b, x, 256, 16, 28), 16, 32, 28, 5),
            _conv(b, b.op("pool", [x], (8, 256, 28, 28), 9 * 8 * 256 * 784), 256, 32, 28),
        ]
        x = b.op("concat", br, (8, 256, 28, 28), 0)
    pooled = b.op("pool", [x], (8, 256), 8 * 256 * 784)
    return b.build([b.op("fc", [pooled], (8, 1000), 2 * 8 * 256 * 1000, pshape=(1000, 256))])


def transformer(n_ops: int, seed: int = 0, d: int = 768, seq: int = 128) -> OpGraph:
    """Pre-LN layers (LN, q/k/v, scores, softmax, context, proj, add, LN, MLP, add) with a
    tied input embedding / output head (a weight read on both ends of the graph)."""
    b = _Builder(f"transformer{n_ops}", seed)
    tok = b.input("tokens", (8, seq))
    x = b.op("embed", [tok], (8, seq, d), 8 * seq * d, param="wte", pshape=(50257, d))
    bsd, mm = (8, seq, d), 2 * 8 * seq * d * d
    for _ in range(max(1, (n_ops - 3) // 14)):
        h = b.op("ln", [x], bsd, 8 * 8 * seq * d, pshape=(2, d))
        q, k, v = (b.op("matmul", [h], bsd, mm, pshape=(d, d)) for _ in range(3))
        s = b.op("scores", [q, k], (8, 12, seq, seq), 2 * 8 * seq * seq * d)
        p = b.op("softmax", [s], (8, 12, seq, seq), 5 * 8 * 12 * seq * seq)
        c = b.op("context", [p, v], bsd, 2 * 8 * seq * seq * d)
        x = b.op("add", [x, b.op("matmul", [c], bsd, mm, pshape=(d, d))], bsd, 8 * seq * d)
        h = b.op("ln", [x], bsd, 8 * 8 * seq * d, pshape=(2, d))
        h = b.op("matmul", [h], (8, seq, 4 * d), 4 * mm, pshape=(4 * d, d))
        h = b.op("gelu", [h], (8, seq, 4 * d), 8 * 8 * seq * 4 * d)
        h = b.op("matmul", [h], bsd, 4 * mm, pshape=(d, 4 * d))
        x = b.op("add", [x, h], bsd, 8 * seq * d)
    x = b.op("ln", [x], bsd, 8 * 8 * seq * d, pshape=(2, d))
    logits = b.op(
        "lm_head",
        [x],
        (8, seq, 50257),
        2 * 8 * seq * d * 50257,
        param="wte",
        pshape=(50257, d),
    )
    return b.build([logits], (8, seq))


def _time(fn, reps=1):
    best = None
    for _ in range(reps):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def bench_graph(g: OpGraph, link: Link, objective: str, engines, nx_max: int) -> dict:
    row: dict = {"graph": g.name, "ops": len(g.ops)}
    reps = 3 if len(g.ops) <= 20000 else 1
    row["problem"], pb = _time(lambda: bl.Problem(g, link, objective), reps)
    for engine in engines:
        for reduce in (True, False):
            key = f"{engine}{'' if reduce else '-noreduce'}"
            if engine == "networkx" and len(g.ops) > nx_max:
                row[key] = None
                continue
            stats: dict = {}
            run = functools.partial(_mincut, pb, engine, reduce, stats)
            row[key], _ = _time(run, reps)
            if reduce and engine == engines[0]:
                row["network"], row["reduced"] = (
                    stats.get("network"),
                    stats.get("solved"),
                )
    notes: list[str] = []
    row["blockwise"], dev_b = _time(lambda: _blockwise(pb, engines[0], True, notes), reps)
    row["blockwise_note"] = notes[-1] if notes else ""
    dev = _mincut(pb, engines[0], True)
    row["recost"], plan = _time(
        lambda: Plan.build(g, pb.placement(dev), link, objective, "mincut", "", "")
    )
    gap = pb.exact(dev_b) - plan.total
    row["blockwise_gap"] = float(gap / plan.total) if plan.total else 0.0
    return row


def _ms(xs):
    xs = [x for x in xs if x is not None]
    if not xs:
        return "skipped"
    return f"{1e3 * statistics.median(xs):.1f} / {1e3 * max(xs):.1f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--graphs", type=int, default=2, help="seeds per family and size")
    ap.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    ap.add_argument("--engines", nargs="+", default=["ortools", "networkx"])
    ap.add_argument(
        "--networkx-max-ops",
        type=int,
        default=20000,
        help="skip networkx above this size (it takes > 50 s at 100k ops)",
    )
    ap.add_argument("--objective", default="training", choices=["training", "inference"])
    ap.add_argument("--rates", type=float, nargs="+", default=[10, 100, 1000], help="Mbps")
    ap.add_argument("--delay-size", type=int, default=1000, help="synthetic size for delays")
    ap.add_argument(
        "--graph-json",
        action="append",
        default=[],
        help="an OpGraph JSON (OpGraph.dumps) to benchmark as well",
    )
    ap.add_argument("--json", help="write all rows here")
    a = ap.parse_args(argv)
    link = Link.parse("100Mbps")
    gens = {"resnet": resnet, "inception": inception, "transformer": transformer}
    groups: dict[str, list] = {}
    for path in a.graph_json:
        with open(path) as f:
            g = OpGraph.from_json(json.load(f))
        groups.setdefault(g.name, []).append(g)
    for n in a.sizes:
        groups[f"{n} ops"] = [gens[f](n, seed) for f in a.families for seed in range(a.graphs)]
    rows = []
    cols = [
        "problem",
        *(f"{e}{s}" for e in a.engines for s in ("", "-noreduce")),
        "blockwise",
        "recost",
    ]
    print(f"## Build + solve time, ms (median / worst), {a.objective}, 100 Mbps\n")
    print("| graphs | n | " + " | ".join(cols) + " | network -> reduced nodes | blockwise gap |")
    print("|---" * (len(cols) + 4) + "|")
    for label, gs in groups.items():
        rs = [bench_graph(g, link, a.objective, a.engines, a.networkx_max_ops) for g in gs]
        rows += rs
        red = ", ".join(f"{r['network'][0]}->{r['reduced'][0]}" for r in rs if r["network"])
        gaps = max(r["blockwise_gap"] for r in rs)
        print(
            f"| {label} | {len(gs)} | "
            + " | ".join(_ms([r[c] for r in rs]) for c in cols)
            + f" | {red} | max {gaps:.2%} |",
            flush=True,
        )
    print(f"\n## Predicted delay per step, ms ({a.objective})\n")
    algos = ["mincut", "blockwise", "layerwise", "device-only", "server-only"]
    print("| graph | link | " + " | ".join(algos) + " |")
    print("|---" * (len(algos) + 2) + "|")
    delay_graphs = [gs[0] for label, gs in groups.items() if not label.endswith(" ops")]
    delay_graphs += [gens[f](a.delay_size, 0) for f in a.families]
    delays = []
    for g in delay_graphs:
        for mbps in a.rates:
            plans = compare(g, Link.parse(f"{mbps:g}Mbps"), objective=a.objective, algorithms=algos)
            d = {k: float(p.total) for k, p in plans.items()}
            delays.append({"graph": g.name, "mbps": mbps, **d})
            print(
                f"| {g.name} | {mbps:g} Mbps | "
                + " | ".join(f"{1e3 * d[k]:.2f}" for k in algos)
                + " |",
                flush=True,
            )
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"timing": rows, "delay": delays}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
