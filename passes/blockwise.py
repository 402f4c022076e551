"""Repeated-block detection for block-wise partitioning (arXiv 2507.01041), IR-free.

The block-wise partitioner contracts each repeated block of a DNN (a ResNet bottleneck, a
transformer layer half) to one vertex, so the min cut runs on a graph 5-20x smaller and can
only place whole blocks; ``passes/partition.py`` solves the contracted graph and reports how
far its optimum is from the op-level one.

Detection on the topological order: a boundary is a position k where at most one activation
made before k is still read at or after k (model inputs, resident on the device, do not
count). Between boundaries lie minimal segments; a segment of two or more ops branches
inside (a residual or attention sub-graph). A block is a branching segment plus the
single-op segments that follow it (the ``relu`` after a residual ``add``). Blocks whose
op-type signature occurs at least twice are contracted.

>>> from splitc.passes.opgraph import OpGraph, OpNode, Tensor
>>> # x -> a -> (b, c) -> d(b, c) -> e -> (f, g) -> h(f, g) -> i: two identical diamonds
>>> spec = {"a": ["x"], "b": ["a"], "c": ["a"], "d": ["b", "c"], "e": ["d"],
...         "f": ["e"], "g": ["e"], "h": ["f", "g"], "i": ["h"]}
>>> kinds = {"a": "relu", "b": "conv", "c": "conv", "d": "add", "e": "relu",
...          "f": "conv", "g": "conv", "h": "add", "i": "relu"}
>>> ops = tuple(OpNode(k, kinds[k], tuple(v), (k,)) for k, v in spec.items())
>>> cons = {k: tuple(o for o, ins in spec.items() if k in ins) for k in ["x", *spec]}
>>> ts = {k: Tensor(k, (4,), "float32", None if k == "x" else k, cons[k], k == "i")
...       for k in cons}
>>> g = OpGraph("diamonds", ops, ts, {}, ("x",), ("i",))
>>> find_blocks(g).blocks
(('b', 'c', 'd', 'e'), ('f', 'g', 'h', 'i'))
>>> find_blocks(g).contracted_size  # a + two block vertices
3
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
from splitc.passes.opgraph import OpGraph

__all__ = ["Blocks", "find_blocks"]


@dataclass(frozen=True)
class Blocks:
    """Blocks to contract (op names in topological order) and what the detection saw."""

    blocks: tuple[tuple[str, ...], ...]
    signatures: int  # distinct op-type signatures among the contracted blocks
    n_ops: int

    @property
    def contracted_size(self) -> int:
        """Vertices after contracting each block to one: n - sum(|block| - 1)."""
        return self.n_ops - sum(len(b) - 1 for b in self.blocks)


def _blocks(segs: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Branching segments plus their trailing single-op segments, as [lo, hi) ranges."""
    blocks: list[list[int]] = []
    for lo, hi in segs:
        if hi - lo > 1:
            blocks.append([lo, hi])
        elif blocks and blocks[-1][1] == lo:
            blocks[-1][1] = hi
    return [(lo, hi) for lo, hi in blocks]


def find_blocks(graph: OpGraph, min_repeats: int = 2, edges=None) -> Blocks:
    """Detect repeated blocks; see the module docstring for the rule.

    ``edges``: optional ``(producer, consumer)`` op-index arrays of the data edges (a
    partition ``Problem`` has them), to skip re-reading the graph.
    """
    ops = graph.ops
    n = len(ops)
    if edges is None:
        idx = {op.name: i for i, op in enumerate(ops)}
        pairs = [
            (idx[t.producer], idx[c])
            for t in graph.tensors.values()
            if t.producer is not None
            for c in t.consumers
        ]
        edges = np.array(pairs, dtype=np.int64).reshape(-1, 2).T
    prod, cons = (np.asarray(a, dtype=np.int64) for a in edges)
    last = np.full(n, -1, dtype=np.int64)  # last reader of each op's outputs
    np.maximum.at(last, prod, cons)
    live = np.zeros(n + 2, dtype=np.int64)  # live[k]: activations crossing position k
    made = np.nonzero(last > np.arange(n))[0]  # live for k in [p + 1, last]
    np.add.at(live, made + 1, 1)
    np.add.at(live, last[made] + 1, -1)
    live = np.cumsum(live)
    cuts = [0, *(np.nonzero(live[1:n] <= 1)[0] + 1).tolist(), n]
    segs = [(a, b) for a, b in pairwise(cuts) if b > a]
    cands = _blocks(segs)
    sig = {r: tuple(ops[i].op for i in range(*r)) for r in cands}
    count = Counter(sig.values())
    chosen = [r for r in cands if count[sig[r]] >= min_repeats]
    blocks = tuple(tuple(ops[i].name for i in range(lo, hi)) for lo, hi in chosen)
    return Blocks(blocks, len({sig[r] for r in chosen}), n)
