"""Block detection, block-wise solving, reductions on DNN-shaped graphs, and the doctests."""

from __future__ import annotations

import doctest

import pytest
from splitc.cost_models.link import Link
from splitc.passes import baselines, blockwise, maxflow, partition
from splitc.passes import baselines as bl
from splitc.passes.blockwise import find_blocks
from splitc.passes.partition import _mincut, compare, solve
from splitc.tools.bench_partition import inception, resnet, transformer


@pytest.mark.parametrize("mod", [partition, blockwise, maxflow, baselines])
def test_doctests(mod):
    assert doctest.testmod(mod).failed == 0


def test_transformer_layers_are_found():
    # 3 + 14 x 20 ops: embed, 20 layers of 14 ops, final LN and head. Each layer has two
    # branching segments (attention half: ln..add = 9 ops, MLP half: ln..add = 5 ops); the
    # last MLP half takes the final ln and head (7 ops, a signature seen once: not contracted)
    g = transformer(283)
    found = find_blocks(g)
    assert len(g.ops) == 283
    assert [len(b) for b in found.blocks] == [9, 5] * 19 + [9]
    assert found.signatures == 2
    assert found.contracted_size == 283 - sum(len(b) - 1 for b in found.blocks)


def test_resnet_bottlenecks_are_found():
    g = resnet(402)  # stem 2 ops, 40 bottlenecks of 10-11 ops over 4 stages, pool, fc
    found = find_blocks(g)
    assert len(found.blocks) >= 30 and found.contracted_size < len(g.ops) // 5


@pytest.mark.parametrize("gen", [resnet, inception, transformer])
def test_blockwise_keeps_blocks_whole_and_is_never_better(gen):
    g = gen(300, seed=1)
    link = Link.parse("100Mbps")
    plans = compare(g, link, algorithms=["mincut", "blockwise"])
    m, b = plans["mincut"], plans["blockwise"]
    assert b.total >= m.total
    for block in find_blocks(g).blocks:
        assert len({op in b.placement.device for op in block}) == 1
    assert any("blockwise optimum" in n for n in m.notes)
    assert any(n.startswith("blockwise:") for n in b.notes)


def test_reductions_shrink_dnn_networks_exactly():
    g = resnet(1000, seed=2)
    link = Link.parse("10Mbps")
    pb = bl.Problem(g, link)
    st_on: dict = {}
    st_off: dict = {}
    on = _mincut(pb, "ortools", True, st_on)
    off = _mincut(pb, "ortools", False, st_off)
    assert st_on["solved"][0] * 3 < st_off["solved"][0]  # chain merges + pruning: > 3x fewer
    assert pb.exact(on) == pb.exact(off) or abs(pb.exact(on) - pb.exact(off)) < 1e-12


def test_inference_objective_on_a_dnn():
    g = inception(200)
    for mbps in (10, 1000):
        link = Link.parse(f"{mbps}Mbps", latency="5ms")
        plan = solve(g, link, objective="inference")
        base = [
            solve(g, link, objective="inference", algorithm=a).total
            for a in ("layerwise", "device-only")
        ]
        assert plan.total <= min(base)
