"""ONNX clean-up before the Relax import (used by ``passes/frontend.py`` only).

Constant folding, with the input shapes fixed: a node is replaced by its value when every
input is a ``Constant``, an integer initializer or an already folded value, and ``Shape`` /
``Size`` of a tensor whose inferred shape is static are values too. Float initializers are
the trained weights and are never folded (they must stay parameters).

Why: PyTorch's exporter with ``do_constant_folding=False`` leaves shape arithmetic in the
graph. In BERT's embeddings ``ConstantOfShape(Shape(Reshape(Concat(Unsqueeze(c)))))`` makes
the TVM 0.27 importer fail (``broadcast_to`` of a rank-1 fill value to a rank-0 shape);
``x.chunk(2, dim=1)`` becomes ``Slice`` with starts computed from ``Shape(x)``, which the
importer turns into ``dynamic_strided_slice`` with unknown output shapes. Folded here, both
import as static ops. Values are computed with ``onnx.reference``; shapes with
``onnx.shape_inference`` on a copy of the graph without the weights (fast on 500 MB models).
"""

from __future__ import annotations

import numpy as np

__all__ = ["prepare"]

# ops whose value is not a pure function of their inputs, or that carry subgraphs
_NO_FOLD = {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
            "Multinomial", "Bernoulli", "Dropout", "If", "Loop", "Scan", "SequenceConstruct"}
_FLOAT_TYPES = (1, 10, 11, 16)  # TensorProto FLOAT, FLOAT16, DOUBLE, BFLOAT16
_MAX_FOLD_ELEMS = 1 << 22  # never materialise a folded constant above 16 MB of float32


def prepare(model, input_shapes: dict[str, tuple[int, ...]] | None = None):
    """Fix the real inputs' shapes, fold constants; rewrites ``model`` in place, returns it.

    ``input_shapes`` maps ONNX input names to static shapes (every real input should have
    one; ``frontend._resolve_shapes`` makes them).
    """
    _set_input_shapes(model, input_shapes or {})
    _constants_from_initializers(model)
    _fold_constants(model, _inferred_shapes(model))
    return model


def _constants_from_initializers(model) -> None:
    """Turn initializers that are not trainable weights into ``Constant`` nodes.

    The Relax importer (``keep_params_in_input=True``) makes every initializer a parameter of
    ``main``, so constants stored as initializers would look trainable: integer tensors
    (reshape targets, indices: never trained) and float scalars used only as ``Clip`` bounds
    (the dynamo exporter stores ReLU6's 0 and 6 as ``min_val_cast`` / ``max_val_cast``).
    """
    from onnx import helper

    g = model.graph
    slots: dict[str, set[bool]] = {}  # initializer -> {is a Clip bound} over its uses
    for node in g.node:
        for k, name in enumerate(node.input):
            slots.setdefault(name, set()).add(node.op_type == "Clip" and k >= 1)
    keep, consts = [], []
    for t in g.initializer:
        clip_bound_only = slots.get(t.name) == {True} and len(t.dims) == 0
        if t.data_type in _FLOAT_TYPES and not clip_bound_only:
            keep.append(t)
        else:
            consts.append(helper.make_node("Constant", [], [t.name], name=f"{t.name}_const",
                                           value=t))
    if not consts:
        return
    names = {n.output[0] for n in consts}
    inputs = [i for i in g.input if i.name not in names]  # old IR lists initializers as inputs
    del g.initializer[:]
    g.initializer.extend(keep)
    del g.input[:]
    g.input.extend(inputs)
    nodes = consts + list(g.node)
    del g.node[:]
    g.node.extend(nodes)


def _set_input_shapes(model, shapes) -> None:
    for inp in model.graph.input:
        if inp.name in shapes:
            dims = inp.type.tensor_type.shape.dim
            del dims[:]
            for d in shapes[inp.name]:
                dims.add().dim_value = int(d)


def _inferred_shapes(model) -> dict[str, tuple[int, ...]]:
    """Static shapes of every value ONNX shape inference can fix (weights left out)."""
    import onnx
    from onnx import helper

    g = model.graph
    light = onnx.GraphProto()
    light.node.extend(g.node)
    light.input.extend(g.input)
    light.output.extend(g.output)
    light.name = g.name
    seen = {i.name for i in g.input}
    for t in g.initializer:
        if t.name in seen:
            continue
        if t.data_type in _FLOAT_TYPES or t.data_location == onnx.TensorProto.EXTERNAL:
            light.input.append(helper.make_tensor_value_info(t.name, t.data_type, t.dims))
        else:  # integer initializers: reshape targets and indices that inference needs
            light.initializer.append(t)
    m = helper.make_model(light, opset_imports=model.opset_import, ir_version=model.ir_version)
    try:
        inferred = onnx.shape_inference.infer_shapes(m, strict_mode=False, data_prop=True)
    except Exception:  # inference is an optimisation here: without it, fold less
        return {}
    out: dict[str, tuple[int, ...]] = {}
    for vi in list(inferred.graph.value_info) + list(inferred.graph.input):
        tt = vi.type.tensor_type
        if not tt.HasField("shape"):
            continue
        dims = tt.shape.dim
        if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
            out[vi.name] = tuple(int(d.dim_value) for d in dims)
    return out


def _shape_value(node, shape: tuple[int, ...]) -> np.ndarray:
    """``Shape`` (with opset-15 ``start``/``end``) or ``Size`` of a tensor of ``shape``."""
    if node.op_type == "Size":
        return np.array(int(np.prod(shape, dtype=np.int64)), dtype=np.int64)
    attrs = {a.name: a.i for a in node.attribute}
    start, end = attrs.get("start", 0), attrs.get("end", len(shape))
    return np.array(shape[start:end] if "end" in attrs else shape[start:], dtype=np.int64)


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


def _fold_constants(model, shapes: dict[str, tuple[int, ...]]) -> None:
    import onnx
    from onnx import helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    g = model.graph
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 17)
    known: dict[str, np.ndarray] = {}
    for t in g.initializer:
        if t.data_type not in _FLOAT_TYPES and t.data_location != onnx.TensorProto.EXTERNAL:
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
        if node.op_type in ("Shape", "Size") and node.input[0] in shapes:
            known[node.output[0]] = _shape_value(node, shapes[node.input[0]])
            folded.add(idx)
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
