"""ONNX clean-up before the Relax import (used by ``passes/frontend.py`` only).

Constant folding of subgraphs that read only ``Constant`` nodes and integer initializers
   (never the float initializers: those are the trained weights and must stay parameters).
   PyTorch's exporter with ``do_constant_folding=False`` leaves shape arithmetic such as
   ``ConstantOfShape(Shape(Reshape(Concat(Unsqueeze(c), ...))))`` in BERT's embeddings, and
   the TVM 0.27 importer fails on that chain (``broadcast_to`` of a rank-1 fill value to a
   rank-0 shape). Folded values are evaluated with ``onnx.reference``.
"""

from __future__ import annotations

import numpy as np

__all__ = ["prepare"]

# ops whose value is not a pure function of their inputs, or that carry subgraphs
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct"}
_MAX_FOLD_ELEMS = 1 << 22  # never materialise a folded constant above 16 MB of float32


def prepare(model):
    """Rewrite ``model`` (an ``onnx.ModelProto``) in place and return it."""
    _fold_constants(model)
    return model


def _const_value(node):
    from onnx import numpy_helper

    for a in node.attribute:
        if a.name == "value":
            return numpy_helper.to_array(a.t)
        if a.name == "value_float":
            return np.array(a.f, dtype=np.float32)
        if a.name == "value_int":
            return np.array(a.i, dtype=np.int64)
        if a.name == "value_floats":
            return np.array(list(a.floats), dtype=np.float32)
        if a.name == "value_ints":
            return np.array(list(a.ints), dtype=np.int64)
    return None


def _fold_constants(model) -> None:
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    known: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16,
                               onnx.TensorProto.DOUBLE, onnx.TensorProto.BFLOAT16):
            known[t.name] = numpy_helper.to_array(t)
    graph_inputs = {i.name for i in g.input}
    folded: set[int] = set()
    for idx, node in enumerate(g.node):
        if node.domain not in ("", "ai.onnx") or node.op_type in _NO_FOLD:
            continue
        if node.op_type == "Constant":
            v = _const_value(node)
            if v is not None:
                known[node.output[0]] = v
            continue
        ins = [i for i in node.input if i]
        if not ins or not all(i in known and i not in graph_inputs for i in ins):
            continue
        try:
            ev = ReferenceEvaluator(node, opsets={"": opset})
            outs = ev.run(None, {i: known[i] for i in ins})
        except Exception:  # leave anything the reference cannot evaluate to the importer
            continue
        if any(np.asarray(o).size > _MAX_FOLD_ELEMS for o in outs):
            continue
        for name, val in zip(node.output, outs):
            known[name] = np.asarray(val)
        folded.add(idx)
    if not folded:
        return
    used = {i for k, n in enumerate(g.node) if k not in folded for i in n.input}
    used |= {o.name for o in g.output}
    new_consts = []
    for k in sorted(folded):
        for name in g.node[k].output:
            if name in used:
                new_consts.append(helper.make_node(
                    "Constant", [], [name], name=f"{name}_folded",
                    value=numpy_helper.from_array(known[name], name)))
    keep = [n for k, n in enumerate(g.node) if k not in folded]
    del g.node[:]
    g.node.extend(new_consts + keep)  # constants first: still a topological order
