"""Property tests of the partition solver against exhaustive search on random DAGs.

Graphs are built directly as OpGraphs from plain data: random fan-out, skip connections,
several inputs and outputs, tied weights, integer tensors (no gradient), and costs spanning
1e-9..1e3 s with tensors of 4 B..1 GB, so capacities span 18 orders of magnitude.

Tolerance: capacities are scaled to int64 with the device-only cut mapped to
``2**62 // (E + 2)`` (E finite arcs, at most ~150 here); rounding moves a cut by at most
1.5 units per arc, so the min cut is within ``3 * E * (E + 2) / 2**62 ~ 1.5e-14`` x the
device-only cost of the true optimum. We allow ``1e-12`` x the device-only total (which
bounds the device-only network value) plus the float pre-ranking margin of 1e-9 x the
optimum (candidates that close are re-costed exactly, so in practice results are equal).
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from splitc import InputError, PlanError
from splitc.cost_models.base import OpCost
from splitc.cost_models.link import Link
from splitc.passes import baselines as bl
from splitc.passes.opgraph import OpGraph, OpNode, Param, Tensor
from splitc.passes.partition import _mincut, build_network, compare, solve
from splitc.passes.plan import Placement, evaluate

_COST = st.floats(-9, 3).map(lambda e: 10.0**e)
_SETTINGS = {"deadline": None, "suppress_health_check": [HealthCheck.too_slow]}


@st.composite
def dags(draw, max_ops=8):
    """A random OpGraph: each op reads 1-3 earlier tensors, biased to recent ones."""
    n_in = draw(st.integers(1, 2))
    n = draw(st.integers(1, max_ops))
    avail = [f"x{i}" for i in range(n_in)]
    shape = {a: (draw(st.integers(1, 4)),) for a in avail}
    dtype = {a: "float32" for a in avail}
    reads: dict[str, list[str]] = {}
    ops_spec = []
    for i in range(n):
        k = draw(st.integers(1, min(3, len(avail))))
        ins = draw(
            st.lists(
                st.sampled_from(avail[-4:] + avail[:1]),
                min_size=k,
                max_size=k,
                unique=True,
            )
        )
        outs = [f"t{i}"] + ([f"t{i}b"] if draw(st.integers(0, 5)) == 0 else [])
        for o in outs:
            shape[o] = (int(10.0 ** draw(st.floats(0, 8.4))),)
            dtype[o] = "int64" if draw(st.integers(0, 7)) == 0 else "float32"
        has_param = draw(st.booleans())
        dev = OpCost(draw(_COST), draw(_COST), draw(_COST))
        srv = OpCost(draw(_COST), draw(_COST), draw(_COST))
        ops_spec.append((f"op{i}", ins, outs, has_param, dev, srv))
        for t in ins:
            reads.setdefault(t, []).append(f"op{i}")
        avail += outs
    params: dict[str, list[str]] = {}
    for name, _, _, has_param, _, _ in ops_spec:
        if has_param:
            params[f"w_{name}"] = [name]
    if n >= 2 and draw(st.booleans()):  # a tied weight read by two or three ops
        readers = draw(
            st.lists(
                st.sampled_from([s[0] for s in ops_spec]),
                min_size=2,
                max_size=3,
                unique=True,
            )
        )
        params["tied"] = readers
    ops = []
    for name, ins, outs, _, dev, srv in ops_spec:
        ps = tuple(p for p, rd in params.items() if name in rd)
        ops.append(OpNode(name, "op", tuple(ins), tuple(outs), ps, device=dev, server=srv))
    unread = [t for t in avail if t not in reads and not t.startswith("x")]
    extra = [
        t for t in avail if t in reads and not t.startswith("x") and draw(st.integers(0, 6)) == 0
    ]
    outputs = tuple(unread + extra)
    tensors = {}
    for t in avail:
        prod = None if t.startswith("x") else "op" + t[1:].rstrip("b")
        tensors[t] = Tensor(t, shape[t], dtype[t], prod, tuple(reads.get(t, ())), t in outputs)
    ps = {
        p: Param(p, (draw(st.integers(1, 10**6)),), "float32", tuple(rd))
        for p, rd in params.items()
    }
    labels = (Tensor("label", (draw(st.integers(1, 100)),), "int64", None),)
    return OpGraph(
        "rand",
        tuple(ops),
        tensors,
        ps,
        tuple(avail[:n_in]),
        outputs,
        labels,
        OpCost(draw(_COST)),
    )


links = st.builds(
    Link,
    st.floats(3, 10).map(lambda e: 10.0**e),
    st.floats(3, 10).map(lambda e: 10.0**e),
    st.sampled_from([0.0, 1e-3, 0.05]),
)


def _tol(pb, opt):
    return 1e-12 * float(pb.exact(bl.device_only(pb))) + 1e-9 * float(opt)


def _check_plan(graph, plan, pins, objective, raw=False):
    dev = plan.placement.device
    for u, w, _ in graph.edges():
        assert not (u not in dev and w in dev), f"server op {u} feeds device op {w}"
    for t in graph.inputs:
        for c in graph.tensors[t].consumers:
            assert raw or c in dev, "raw input left the device"
    for name, side in (pins or {}).items():
        assert (name in dev) == (side == "device")
    bd = plan.breakdown
    assert bd.total == bd.device + bd.uplink + bd.server + bd.downlink + bd.fixed
    assert bd == evaluate(graph, plan.placement, plan.link, objective)


@st.composite
def problems(draw, max_ops=8):
    g = draw(dags(max_ops))
    pins = {}
    if draw(st.integers(0, 3)) == 0:
        pins[draw(st.sampled_from([o.name for o in g.ops]))] = draw(
            st.sampled_from(["device", "server"])
        )
    return g, draw(links), draw(st.sampled_from(["training", "inference"])), pins


def _problem(g, link, obj, pins, **kw):
    try:
        return bl.Problem(g, link, obj, pins, **kw)
    except PlanError:
        return None  # contradictory random pins: tested separately


@settings(max_examples=1000, **_SETTINGS)
@given(problems(), st.sampled_from(["sync", "pin"]), st.booleans())
def test_mincut_equals_exhaustive(case, tied_policy, raw):
    g, link, obj, pins = case
    kw = {"tied_policy": tied_policy, "allow_raw_upload": raw}
    pb = _problem(g, link, obj, pins, **kw)
    if pb is None:
        return
    best = solve(g, link, objective=obj, algorithm="exhaustive", pins=pins, **kw)
    plan = solve(g, link, objective=obj, pins=pins, **kw)
    _check_plan(g, plan, pins, obj, raw)
    assert plan.tied_policy == tied_policy
    assert abs(plan.total - best.total) <= _tol(pb, best.total)
    assert plan.total >= best.total  # exhaustive is the optimum: nothing beats it


@pytest.mark.slow
@settings(max_examples=300, **_SETTINGS)
@given(problems(max_ops=14))
def test_mincut_equals_exhaustive_on_larger_graphs(case):
    g, link, obj, pins = case
    pb = _problem(g, link, obj, pins)
    if pb is None:
        return
    best = pb.exact(bl.exhaustive(pb))
    for engine in ("ortools", "networkx"):
        plan = solve(g, link, objective=obj, pins=pins, engine=engine)
        _check_plan(g, plan, pins, obj)
        assert best <= plan.total <= best + _tol(pb, best)


@settings(max_examples=300, **_SETTINGS)
@given(problems())
def test_every_engine_and_reduction_agrees(case):
    g, link, obj, pins = case
    pb = _problem(g, link, obj, pins)
    if pb is None:
        return
    best = pb.exact(bl.exhaustive(pb))
    for reduce in (True, False):
        values = set()
        for engine in ("ortools", "networkx"):
            stats: dict = {}
            dev = _mincut(pb, engine, reduce, stats)
            assert abs(pb.exact(dev) - best) <= _tol(pb, best), (engine, reduce)
            if "value" not in stats:
                continue  # device-only costs nothing in the network: nothing to cut
            # certificate: the engine's cut value is the sum of the crossing capacities,
            # recomputed here from the full integer network and the expanded node sides
            side, caps, net = stats["side"], stats["caps"], stats["net"]
            crossing = side[net.tails] & ~side[net.heads]
            assert stats["value"] == int(caps[crossing].sum())
            assert not (caps[crossing] >= stats["inf"]).any()
            values.add(stats["value"])
        assert len(values) <= 1  # both engines: the same exact integer min cut


@settings(max_examples=300, **_SETTINGS)
@given(problems(max_ops=6), st.sampled_from(["sync", "pin"]))
def test_network_prices_every_placement_like_evaluate(case, tied_policy):
    """network value + constant == evaluate total for every valid placement (float caps)."""
    g, link, obj, pins = case
    pb = _problem(g, link, obj, pins, tied_policy=tied_policy)
    if pb is None:
        return
    net = build_network(pb, reduce=False)
    n = len(g.ops)
    for bits in range(2**n):
        dev = np.array([(bits >> i) & 1 for i in range(n)], dtype=bool)
        if not pb.valid(dev):
            continue
        bd = evaluate(g, pb.placement(dev), link, obj)
        var = bd.total - (bd.fixed if obj == "inference" else 0)
        got = net.value(dev) + net.constant
        assert math.isclose(got, float(var), rel_tol=1e-9, abs_tol=1e-12 * float(bd.total))
        assert math.isclose(pb.cost(dev), float(bd.total), rel_tol=1e-9)


@settings(max_examples=200, **_SETTINGS)
@given(problems(max_ops=10))
def test_baselines_and_blockwise_never_beat_mincut(case):
    g, link, obj, pins = case
    pb = _problem(g, link, obj, pins)
    if pb is None:
        return
    plans = compare(g, link, objective=obj, pins=pins)
    m = plans["mincut"]
    _check_plan(g, m, pins, obj)
    for name, p in plans.items():
        if name != "server-only":  # the one baseline that may upload raw data and ignore pins
            assert p.total >= m.total - _tol(pb, m.total), name
            _check_plan(g, p, pins, obj)
    srv = plans["server-only"]
    assert srv.placement.device == frozenset()
    assert "raw data leaves the device" in " ".join(srv.notes)
    raw = solve(g, link, objective=obj, allow_raw_upload=True)
    assert srv.total >= raw.total - _tol(pb, raw.total)


# -- worked examples with exact arithmetic -------------------------------------------------


def _chain(costs, nbytes, tied=False):
    """x -> op0 -> op1 -> ... ; op i costs (device, server); tensor i has nbytes[i] bytes."""
    ops, tensors = [], {"x": Tensor("x", (nbytes[0] // 4,), "float32", None, ("op0",))}
    for i, (d, s) in enumerate(costs):
        out = f"t{i + 1}"
        last = i == len(costs) - 1
        tensors[out] = Tensor(
            out,
            (nbytes[i + 1] // 4,),
            "float32",
            f"op{i}",
            () if last else (f"op{i + 1}",),
            last,
        )
        ps = ("w",) if tied and i in (0, len(costs) - 1) else (f"w{i}",)
        ops.append(
            OpNode(
                f"op{i}",
                "op",
                ("x" if i == 0 else f"t{i}",),
                (out,),
                ps,
                device=OpCost(d),
                server=OpCost(s),
            )
        )
    params = {
        p: Param(p, (250,), "float32", tuple(o.name for o in ops if p in o.params))
        for o in ops
        for p in o.params
    }
    return OpGraph("chain", tuple(ops), tensors, params, ("x",), (f"t{len(costs)}",))


def test_tied_weight_sync_is_charged_exactly():
    # op0 and op2 share the 1000-byte weight w; at 1 MB/s a sync costs 1 ms up + 1 ms down.
    g = _chain([(0.001, 0.001), (0.5, 0.001), (0.5, 0.001)], [4000, 1000, 1000, 40], tied=True)
    link = Link(1e6, 1e6)
    plan = solve(g, link)
    # best: op0 on device (op0 reads x); t1 crosses: 1000 B up + down = 2 ms; w split: 2 ms
    assert plan.placement.device == frozenset({"op0"})
    assert plan.tied_weights == ("w",)
    assert plan.breakdown.uplink == Fraction(1000, 10**6) + Fraction(1000, 10**6)
    assert plan.breakdown.downlink == Fraction(2000, 10**6)
    assert plan.total == Fraction(0.001) + 2 * Fraction(0.001) + Fraction(4, 1000)
    assert any("synced per step" in n for n in plan.notes)
    pinned = solve(g, link, tied_policy="pin")  # readers together: all on the device
    assert pinned.placement.device == frozenset({"op0", "op1", "op2"})
    assert pinned.tied_weights == () and pinned.tied_policy == "pin"


def test_inference_latency_paid_only_when_something_crosses():
    # op1 saves 0.1 s on the server, but crossing costs 2 x 60 ms latency + transfers.
    g = _chain([(0.001, 0.001), (0.2, 0.1)], [400, 400, 400])
    link = Link(1e9, 1e9, latency=0.06)
    plan = solve(g, link, objective="inference")
    assert plan.placement.device == frozenset({"op0", "op1"})
    assert plan.breakdown.fixed == 0 and plan.total == Fraction(0.001) + Fraction(0.2)
    fast = solve(g, Link(1e9, 1e9, latency=0.01), objective="inference")
    assert fast.placement.device == frozenset({"op0"})  # 0.1 s saved > 20 ms + 0.8 us
    assert fast.breakdown.fixed == 2 * Fraction(0.01)


def test_reductions_shrink_a_chain():
    # server 10x faster everywhere and tensors shrink: the chain merges collapse the network
    g = _chain([(0.01, 0.001)] * 50, [4000] * 51)
    pb = bl.Problem(g, Link(1e6, 1e6))
    stats: dict = {}
    _mincut(pb, "ortools", True, stats)
    assert stats["solved"][0] < 5 < stats["network"][0]


# -- errors ----------------------------------------------------------------------------------


@pytest.fixture
def chain():
    return _chain([(0.01, 0.001)] * 3, [400] * 4)


def test_pin_matching_no_op(chain):
    with pytest.raises(InputError, match=r"Partition: pin 'xyz\*' matches no op; use an op name"):
        solve(chain, Link(1e6, 1e6), pins={"xyz*": "device"})


def test_pin_bad_side(chain):
    with pytest.raises(InputError, match=r"pin 'op1'='gpu'; the side must be device or server"):
        solve(chain, Link(1e6, 1e6), pins={"op1": "gpu"})


def test_contradictory_pins_name_the_ops(chain):
    with pytest.raises(
        PlanError,
        match=r"contradictory pins: 'op1' \(pinned to server by 'op1'\)"
        r" must run on the server and 'op2' \(pinned to device by 'op2'\) on the "
        r"device, but the first feeds the second \(op1 -> op2\)",
    ):
        solve(chain, Link(1e6, 1e6), pins={"op1": "server", "op2": "device"})


def test_pin_both_sides(chain):
    with pytest.raises(
        PlanError,
        match=r"op 'op1' is pinned to device by 'op1' and to server "
        r"by 'op\*'",
    ):
        solve(chain, Link(1e6, 1e6), pins={"op1": "device", "op*": "server"})


def test_server_pin_on_input_reader(chain):
    with pytest.raises(
        PlanError,
        match=r"op 'op0' is pinned to server by 'op0' but reads model "
        r"input 'x' and raw data never leaves the device",
    ):
        solve(chain, Link(1e6, 1e6), pins={"op0": "server"})
    plan = solve(chain, Link(1e6, 1e6), pins={"op0": "server"}, allow_raw_upload=True)
    assert plan.placement.device == frozenset() and plan.cut[0].name == "x"


@pytest.mark.parametrize(
    "kw, msg",
    [
        (
            {"algorithm": "magic"},
            r"unknown algorithm 'magic'; use one of mincut, blockwise",
        ),
        ({"engine": "scipy"}, r"unknown engine 'scipy'; use one of ortools, networkx"),
        ({"objective": "fun"}, r"unknown objective 'fun'; use training or inference"),
        ({"tied_policy": "ignore"}, r"unknown tied_policy 'ignore'; use sync or pin"),
    ],
)
def test_unknown_options(chain, kw, msg):
    with pytest.raises(InputError, match=msg):
        solve(chain, Link(1e6, 1e6), **kw)


def test_exhaustive_refuses_large_graphs():
    g = _chain([(0.01, 0.001)] * 22, [400] * 23)
    with pytest.raises(InputError, match=r"exhaustive search over 21 free ops is too large"):
        solve(g, Link(1e6, 1e6), algorithm="exhaustive")
    plans = compare(g, Link(1e6, 1e6))
    assert "exhaustive" not in plans
    assert any("exhaustive skipped" in n for n in plans["mincut"].notes)


def test_layerwise_without_valid_cut():
    # diamond x -> a -> (b, c) -> d with order a, b, c, d: pins b=server, c=device leave no prefix
    ts = {
        "x": Tensor("x", (1,), "float32", None, ("a",)),
        "ta": Tensor("ta", (1,), "float32", "a", ("b", "c")),
        "tb": Tensor("tb", (1,), "float32", "b", ("d",)),
        "tc": Tensor("tc", (1,), "float32", "c", ("d",)),
        "td": Tensor("td", (1,), "float32", "d", (), True),
    }
    ops = tuple(
        OpNode(n, "op", ins, (f"t{n}",))
        for n, ins in [
            ("a", ("x",)),
            ("b", ("ta",)),
            ("c", ("ta",)),
            ("d", ("tb", "tc")),
        ]
    )
    g = OpGraph("d", ops, ts, {}, ("x",), ("td",))
    with pytest.raises(PlanError, match=r"no single cut of the topological order respects"):
        solve(
            g,
            Link(1e6, 1e6),
            algorithm="layerwise",
            pins={"b": "server", "c": "device"},
        )
    plan = solve(g, Link(1e6, 1e6), pins={"b": "server", "c": "device"})
    assert plan.placement.device == frozenset({"a", "c"})


def test_pin_globs_respected(chain):
    plan = solve(chain, Link(1e6, 1e6), pins={"op[12]": "device"})
    assert plan.placement.device == frozenset({"op0", "op1", "op2"})
    assert plan.pins == {"op[12]": "device"}


def test_placement_of_unknown_op_rejected(chain):
    with pytest.raises(PlanError, match=r"placement names unknown ops \['nope'\]"):
        evaluate(chain, Placement.of(["nope"]), Link(1e6, 1e6))


def test_server_pin_below_a_merged_chain(chain):
    # op1 -> op2 merge (server 10x faster) while op2 is pinned to the server: the device-only
    # reference violates the merge and must be fixed up before it sets the scaling clamp.
    link = Link(1e6, 1e6)
    plan = solve(chain, link, pins={"op2": "server"})
    best = solve(chain, link, pins={"op2": "server"}, algorithm="exhaustive")
    assert plan.placement == best.placement == Placement.of(["op0"])


def test_plan_notes_report_the_network_and_reductions():
    # 50-op chain: 52 op nodes + s/t; the reductions merge op1..op49 into one node (see above)
    g = _chain([(0.01, 0.001)] * 50, [4000] * 51)
    plans = compare(g, Link(1e6, 1e6), algorithms=["mincut", "blockwise"])
    note = next(n for n in plans["mincut"].notes if n.startswith("mincut (ortools)"))
    assert note.startswith("mincut (ortools): flow network 52 nodes")
    assert "after exact reductions" in note
    assert any("blockwise: 0 repeated blocks" in n for n in plans["blockwise"].notes)
