"""ONNX file -> Relax ``IRModule`` with the weights kept as function parameters.

``load_onnx`` is the first step of the flow (shared/ARCHITECTURE.md). It checks the file
before TVM sees it so that bad input gives one line, never a traceback:

- missing file, not ONNX, truncated or corrupt protobuf -> ``InputError``
- ONNX ops the Relax importer has no converter for -> ``UnsupportedError`` naming every op
  type and the nodes that use it
- symbolic dims (``N``) not pinned by ``input_shapes`` -> ``InputError`` naming the input and
  the dim; an ``input_shapes`` name that is no model input -> ``InputError``

The module it returns: ``main(inputs..., weights...)`` with one dataflow block, attrs
``num_input`` (how many real inputs come first) and ``params`` (initial weight values, in
parameter order), exactly as ``from_onnx(keep_params_in_input=True)`` makes it, normalised.
Runs before ``AnnotateCosts``; nothing runs before it.
"""

from __future__ import annotations

import hashlib
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from splitc import InputError, UnsupportedError

__all__ = ["InputInfo", "ModelInfo", "load_onnx", "onnx_op_support", "parse_input_shapes"]

_MAX_LISTED = 8  # ops / nodes named in one error line before "..."


@dataclass(frozen=True)
class InputInfo:
    """One real model input: ``name`` is the Relax parameter name (ONNX name sanitised)."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    onnx_name: str = ""


@dataclass(frozen=True)
class ModelInfo:
    """What the frontend knows about the model besides the IR.

    ``params`` maps each weight's Relax parameter name to its initial value, in the order of
    ``main``'s parameters after the inputs. ``buffers`` are the params that are state, not
    trained (batch-norm running mean / variance): updated in training mode, never by the
    optimizer.
    """

    name: str
    path: str
    sha256: str
    opset: int
    inputs: tuple[InputInfo, ...]
    outputs: tuple[str, ...]
    params: dict[str, np.ndarray] = field(default_factory=dict)
    buffers: frozenset[str] = frozenset()

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(i.name for i in self.inputs)

    @property
    def param_names(self) -> tuple[str, ...]:
        return tuple(self.params)

    @property
    def param_bytes(self) -> int:
        return sum(int(v.nbytes) for v in self.params.values())


# -- --input-shapes ---------------------------------------------------------------------------
_SHAPE_ITEM = re.compile(r"\s*([^\s,\[\]]+?)\s*:\s*\[([^\]]*)\]\s*(?:,|\s|$)")


def parse_input_shapes(text: str | None) -> dict[str, tuple[int, ...]]:
    """Parse tvmc-style shapes ``'x:[8,3,224,224],mask:[8,128]'`` into ``{name: shape}``.

    >>> parse_input_shapes("x:[8,3,224,224],mask:[8,128]")
    {'x': (8, 3, 224, 224), 'mask': (8, 128)}
    """
    if text is None or not text.strip():
        return {}
    out: dict[str, tuple[int, ...]] = {}
    pos = 0
    text = text.strip()
    while pos < len(text):
        m = _SHAPE_ITEM.match(text, pos)
        if not m:
            raise InputError(
                f"Frontend: cannot parse input shapes {text!r} at {text[pos:]!r}; "
                "use the form 'x:[8,3,224,224],mask:[8,128]'")
        name, dims = m.group(1), m.group(2).strip()
        try:
            shape = tuple(int(d) for d in dims.split(",")) if dims else ()
        except ValueError:
            raise InputError(
                f"Frontend: input shape of {name!r} has a non-integer dim in [{dims}]; "
                "use whole numbers such as 'x:[8,3,224,224]'") from None
        if any(d <= 0 for d in shape):
            raise InputError(f"Frontend: input shape of {name!r} has a dim <= 0 in [{dims}]; "
                             "every dim must be a positive integer")
        if name in out:
            raise InputError(f"Frontend: input {name!r} is given twice in --input-shapes")
        out[name] = shape
        pos = m.end()
    return out


# -- checks before the import ----------------------------------------------------------------
def onnx_op_support() -> frozenset[str]:
    """ONNX op types the installed Relax importer converts."""
    from splitc.passes import compat

    return frozenset(compat.onnx_convert_map()) | {"If", "Constant"}


def _read_model(path: Path):
    import onnx

    if not path.exists():
        raise InputError(f"Frontend: model file {str(path)!r} does not exist; check the path")
    if not path.is_file():
        raise InputError(f"Frontend: {str(path)!r} is not a file; pass an .onnx model file")
    data = path.read_bytes()
    h = hashlib.sha256(data)
    try:
        model = onnx.load_model_from_string(data)
    except Exception as e:  # DecodeError, RuntimeError on bad wire types, ...
        raise InputError(
            f"Frontend: {str(path)!r} is not a readable ONNX model (corrupt or truncated "
            f"protobuf: {str(e).splitlines()[0] if str(e) else type(e).__name__}); "
            "re-export it with torch.onnx.export") from None
    # Protobuf parses many non-ONNX byte strings into an empty message: check the content.
    if model.ir_version < 3 or not model.graph.node or not model.graph.output:
        raise InputError(
            f"Frontend: {str(path)!r} is not an ONNX model (no graph nodes or outputs, ir_version "
            f"{model.ir_version}); pass a model exported with torch.onnx.export")
    _check_references(model.graph, path)
    external = sorted({e.value for t in model.graph.initializer
                       if t.data_location == onnx.TensorProto.EXTERNAL
                       for e in t.external_data if e.key == "location"})
    if external:
        try:
            onnx.load_external_data_for_model(model, str(path.parent))
            for loc in external:  # the hash covers the weights wherever they are stored
                h.update((path.parent / loc).read_bytes())
        except Exception as e:
            raise InputError(
                f"Frontend: external weights of {str(path)!r} cannot be read "
                f"({type(e).__name__}); keep the .data file next to the model") from None
    return model, h.hexdigest()


def _check_references(graph, path: Path) -> None:
    """Every value read is defined earlier: a protobuf cut at a field boundary still parses."""
    defined = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    for i, node in enumerate(graph.node):
        missing = [x for x in node.input if x not in defined]
        if missing:
            raise InputError(
                f"Frontend: {str(path)!r} is corrupt or truncated: node {node.name or i!r} "
                f"({node.op_type}) reads undefined value {missing[0]!r}; re-export the model")
        defined.update(node.output)
    for o in graph.output:
        if o.name not in defined:
            raise InputError(f"Frontend: {str(path)!r} is corrupt or truncated: output "
                             f"{o.name!r} is never computed; re-export the model")


_CONTROL_FLOW = ("If", "Loop", "Scan")


def _check_ops(model) -> None:
    for i, node in enumerate(model.graph.node):
        if node.op_type in _CONTROL_FLOW:
            raise UnsupportedError(
                f"Frontend: control flow ({node.op_type} node {node.name or i!r}) is not "
                "supported, splitc partitions pure dataflow graphs; export with the branch or "
                "loop resolved (torch.onnx.export traces the path taken)")
    supported = onnx_op_support()
    bad: dict[str, list[str]] = {}
    for i, node in enumerate(model.graph.node):
        if node.op_type not in supported:
            bad.setdefault(node.op_type, []).append(node.name or f"#{i}")
    if not bad:
        return
    parts = []
    for op, nodes in list(bad.items())[:_MAX_LISTED]:
        more = f" and {len(nodes) - 3} more" if len(nodes) > 3 else ""
        parts.append(f"{op} (node{'s' if len(nodes) > 1 else ''} {', '.join(nodes[:3])}{more})")
    raise UnsupportedError(
        f"Frontend: unsupported ONNX op{'s' if len(bad) > 1 else ''} {'; '.join(parts)}; "
        f"the TVM Relax importer has no converter for {'them' if len(bad) > 1 else 'it'}: "
        "re-export the model without it or decompose it into supported ops")


def _resolve_shapes(model, input_shapes: dict[str, tuple[int, ...]],
                    batch_size: int | None = None):
    """Static shape of every real input; raise on a symbolic dim or an unknown shape name.

    ``batch_size`` fills a symbolic leading dim of inputs that ``input_shapes`` leaves out.
    """
    inits = {t.name for t in model.graph.initializer}
    real = [i for i in model.graph.input if i.name not in inits]
    by_name = {i.name: i for i in real}
    # accept the sanitised Relax name as well as the ONNX name (x.1 and x_1)
    alias = {i.name.replace(".", "_"): i.name for i in real}
    given: dict[str, tuple[int, ...]] = {}
    for name, shape in input_shapes.items():
        onnx_name = name if name in by_name else alias.get(name)
        if onnx_name is None:
            names = ", ".join(sorted(by_name)) or "(none)"
            raise InputError(f"Frontend: --input-shapes names {name!r}, which is not a model "
                             f"input; the inputs are: {names}")
        given[onnx_name] = shape
    shapes: dict[str, tuple[int, ...]] = {}
    for inp in real:
        tt = inp.type.tensor_type
        dims = list(tt.shape.dim) if tt.HasField("shape") else None
        if inp.name in given:
            shape = given[inp.name]
            if dims is not None and len(dims) != len(shape):
                raise InputError(
                    f"Frontend: --input-shapes gives {inp.name!r} rank {len(shape)}, the model "
                    f"says rank {len(dims)}; give {len(dims)} dims")
            for k, d in enumerate(dims or []):
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != shape[k]:
                    raise InputError(
                        f"Frontend: --input-shapes gives {inp.name!r} dim {k} = {shape[k]}, the "
                        f"model fixes it to {d.dim_value}; use {d.dim_value}")
            shapes[inp.name] = shape
            continue
        if dims is None:
            raise InputError(f"Frontend: input {inp.name!r} has unknown rank; pass "
                             f"--input-shapes \"{inp.name}:[...]\"")
        static = [int(d.dim_value) if d.HasField("dim_value") and d.dim_value > 0 else None
                  for d in dims]
        if batch_size is not None and static and static[0] is None:
            static[0] = batch_size
        for k, d in enumerate(dims):
            if static[k] is None:
                sym = d.dim_param or "?"
                hint = "--batch-size N or " if k == 0 else ""
                raise InputError(
                    f"Frontend: input {inp.name!r} has symbolic dim {k} ({sym!r}); pass "
                    f"{hint}--input-shapes \"{inp.name}:[...]\" with every dim fixed")
        shapes[inp.name] = tuple(static)
    return real, shapes


def _buffers(model) -> set[str]:
    """Initializers read only as BatchNormalization's running mean / var (inputs 3 and 4)."""
    bn_state, other = set(), set()
    for node in model.graph.node:
        for k, name in enumerate(node.input):
            (bn_state if node.op_type == "BatchNormalization" and k >= 3 else other).add(name)
    return bn_state - other


# -- the import -----------------------------------------------------------------------------
def load_onnx(path, input_shapes: dict[str, tuple[int, ...]] | None = None,
              batch_size: int | None = None):
    """Read ``path`` into ``(IRModule, ModelInfo)``; see the module docstring for the errors.

    ``batch_size`` fills a symbolic leading (batch) dim of each input that ``input_shapes``
    does not name; explicit ``input_shapes`` win.
    """
    if batch_size is not None and batch_size <= 0:
        raise InputError(f"Frontend: --batch-size must be positive, got {batch_size}")
    import tvm
    from splitc.passes import compat, onnx_prep
    from tvm.relax.frontend.onnx import from_onnx

    path = Path(path)
    model, digest = _read_model(path)
    _check_ops(model)
    real, shapes = _resolve_shapes(model, dict(input_shapes or {}), batch_size)
    onnx_prep.prepare(model, shapes)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
    try:
        with warnings.catch_warnings(), compat.relax_op_lowerings():
            warnings.simplefilter("ignore")  # renaming and checker chatter, not user errors
            mod = from_onnx(model, shape_dict={k: list(v) for k, v in shapes.items()},
                            keep_params_in_input=True)
    except tvm.error.OpNotImplemented as e:
        raise UnsupportedError(f"Frontend: {str(e).splitlines()[0]}") from None
    except Exception as e:
        msg = str(e).strip().splitlines()
        raise UnsupportedError(
            f"Frontend: the TVM ONNX importer failed on {path.name}: {type(e).__name__}: "
            f"{msg[-1] if msg else ''}; check the ONNX ops and attributes it uses") from None
    try:
        mod = _normalise(mod)
    except Exception as e:  # a TVM bug on an unusual graph must still be one line
        msg = str(e).strip().splitlines()
        raise UnsupportedError(
            f"Frontend: normalising the imported {path.name} failed: {type(e).__name__}: "
            f"{msg[-1] if msg else ''}; report the model with this message") from None
    func = mod["main"]
    n_in = compat.func_num_inputs(func)
    values = compat.func_param_values(func)
    params = func.params
    inputs = []
    for var, onnx_inp in zip(params[:n_in], real):
        ty = compat.expr_ty(var)
        inputs.append(InputInfo(compat.var_name(var), compat.static_shape(ty) or (),
                                compat.tensor_dtype(ty), onnx_inp.name))
    pnames = [compat.var_name(v) for v in params[n_in:]]
    # initializer names lose an "onnx::" prefix in the importer, nothing else
    buffers = {n.removeprefix("onnx::") for n in _buffers(model)}
    info = ModelInfo(
        name=_model_name(model, path), path=str(path), sha256=digest, opset=int(opset),
        inputs=tuple(inputs), outputs=tuple(o.name for o in model.graph.output),
        params=dict(zip(pnames, values)), buffers=frozenset(buffers & set(pnames)),
    )
    return mod, info


def _model_name(model, path: Path) -> str:
    """The ONNX graph name unless it is an exporter's default, else the file name."""
    name = model.graph.name
    if not name or name in ("main_graph", "torch_jit", "torch-jit-export", "main"):
        return path.stem
    return name


def _normalise(mod):
    """Fold what static shapes make constant, drop aliases and dead bindings.

    With static shapes the importer still emits ``shape_of(x)`` -> ``shape_to_tensor`` ->
    ``take`` chains (ViT's CLS-token slice) and constant masks; FoldConstant turns them into
    constants (0.4 s on ViT-Base). Weights are parameters, not constants, so nothing that
    reads a weight is folded. DeadCodeElimination drops unused bindings such as the
    running-statistics outputs of a training-mode batch_norm.
    """
    import tvm
    from tvm import relax

    seq = [relax.transform.Normalize(), relax.transform.FoldConstant(),
           relax.transform.CanonicalizeBindings(), relax.transform.DeadCodeElimination()]
    return tvm.transform.Sequential(seq)(mod)
