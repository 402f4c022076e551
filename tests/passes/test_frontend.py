"""passes/frontend.py: ONNX -> Relax, input shapes, and one-line errors for bad input."""

import hashlib
import re

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from splitc import InputError, UnsupportedError
from splitc.passes import compat
from splitc.passes.frontend import load_onnx, parse_input_shapes


def _save(tmp_path, nodes, inputs, outputs, inits=(), name="m.onnx", opset=17):
    graph = helper.make_graph(nodes, "g", inputs, outputs, initializer=list(inits))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    path = tmp_path / name
    onnx.save(model, str(path))
    return path


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _run(mod, *args):
    """Compile and run ``main`` on CPU (a handful of tiny kernels: ~1 s)."""
    import tvm
    from tvm import relax

    ex = tvm.compile(mod, target="llvm")
    vm = relax.VirtualMachine(ex, tvm.cpu())
    out = vm["main"](*[tvm.runtime.tensor(a) for a in args])
    return out.numpy()


# -- parse_input_shapes -------------------------------------------------------------------------
def test_parse_input_shapes_tvmc_syntax():
    assert parse_input_shapes("x:[8,3,224,224],mask:[8,128]") == {
        "x": (8, 3, 224, 224), "mask": (8, 128)}
    # spaces and space separators as tvmc accepts them; a scalar has no dims
    assert parse_input_shapes(" x : [1, 2] y:[3] s:[]") == {"x": (1, 2), "y": (3,), "s": ()}
    # names with dots and colons (ONNX allows them)
    assert parse_input_shapes("input.1:[2,3],a:b:[4]") == {"input.1": (2, 3), "a:b": (4,)}
    assert parse_input_shapes(None) == {} and parse_input_shapes("  ") == {}


@pytest.mark.parametrize("text,msg", [
    ("x[8,3]", r"^Frontend: cannot parse input shapes 'x\[8,3\]' at 'x\[8,3\]'; use the form "
               r"'x:\[8,3,224,224\],mask:\[8,128\]'$"),
    ("x:[8,a]", r"^Frontend: input shape of 'x' has a non-integer dim in \[8,a\]; use whole "
                r"numbers such as 'x:\[8,3,224,224\]'$"),
    ("x:[8,0]", r"^Frontend: input shape of 'x' has a dim <= 0 in \[8,0\]; every dim must be a "
                r"positive integer$"),
    ("x:[1],x:[2]", r"^Frontend: input 'x' is given twice in --input-shapes$"),
    ("x:[8],,y:[2]", r"^Frontend: cannot parse input shapes 'x:\[8\],,y:\[2\]' at ',y:\[2\]'"),
])
def test_parse_input_shapes_errors(text, msg):
    with pytest.raises(InputError, match=msg):
        parse_input_shapes(text)


# -- bad files -------------------------------------------------------------------------------------
def test_missing_file(tmp_path):
    p = tmp_path / "nope.onnx"
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: model file '{p}' does not exist; check the path")):
        load_onnx(p)


def test_directory_is_not_a_model(tmp_path):
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: '{tmp_path}' is not a file; pass an .onnx model file")):
        load_onnx(tmp_path)


@pytest.mark.parametrize("content", [b"hello, this is text\n", bytes(range(256)) * 4])
def test_not_onnx(tmp_path, content):
    p = tmp_path / "x.onnx"
    p.write_bytes(content)
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: '{p}' is not a readable ONNX model (corrupt or truncated protobuf: "
            "Error parsing message with type 'onnx.ModelProto'); re-export it with "
            "torch.onnx.export")):
        load_onnx(p)


def test_empty_file_is_not_onnx(tmp_path):
    p = tmp_path / "empty.onnx"
    p.write_bytes(b"")
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: '{p}' is not an ONNX model (no graph nodes or outputs, ir_version 0); "
            "pass a model exported with torch.onnx.export")):
        load_onnx(p)


def test_truncated_protobuf(tmp_path, tiny_cnn_onnx):
    data = tiny_cnn_onnx.read_bytes()
    p = tmp_path / "cut.onnx"
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"^Frontend: '.*cut.onnx' is not a readable ONNX model "
                                         r"\(corrupt or truncated protobuf"):
        load_onnx(p)


def test_truncated_at_node_boundary(tmp_path):
    # a graph whose second node lost its producer: parses, but reads an undefined value
    path = _save(tmp_path, [helper.make_node("Relu", ["h"], ["y"], name="r2")],
                 [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: '{path}' is corrupt or truncated: node 'r2' (Relu) reads undefined "
            "value 'h'; re-export the model")):
        load_onnx(path)


def test_unsupported_ops_named_with_nodes(tmp_path):
    nodes = [helper.make_node("FooBar", ["x"], ["a"], name="foo1"),
             helper.make_node("FooBar", ["a"], ["b"], name="foo2"),
             helper.make_node("Relu", ["b"], ["c"], name="ok"),
             helper.make_node("Bazz", ["c"], ["y"], name="bz")]
    path = _save(tmp_path, nodes, [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(UnsupportedError, match=re.escape(
            "Frontend: unsupported ONNX ops FooBar (nodes foo1, foo2); Bazz (node bz); the TVM "
            "Relax importer has no converter for them: re-export the model without it or "
            "decompose it into supported ops")):
        load_onnx(path)


# -- shapes --------------------------------------------------------------------------------------
@pytest.fixture
def symbolic(tmp_path):
    return _save(tmp_path, [helper.make_node("Relu", ["x"], ["y"], name="r")],
                 [_vi("x", ["N", 3])], [_vi("y", ["N", 3])])


def test_symbolic_dim_needs_input_shapes(symbolic):
    with pytest.raises(InputError, match=re.escape(
            "Frontend: input 'x' has symbolic dim 0 ('N'); pass --batch-size N or "
            "--input-shapes \"x:[...]\" with "
            "every dim fixed")):
        load_onnx(symbolic)


def test_input_shapes_fix_symbolic_dims(symbolic):
    mod, info = load_onnx(symbolic, {"x": (4, 3)})
    assert info.inputs[0].shape == (4, 3) and info.inputs[0].dtype == "float32"
    ty = compat.expr_ty(mod["main"].params[0])
    assert compat.static_shape(ty) == (4, 3)


def test_input_shapes_unknown_name(symbolic):
    with pytest.raises(InputError, match=re.escape(
            "Frontend: --input-shapes names 'z', which is not a model input; the inputs are: x")):
        load_onnx(symbolic, {"z": (4, 3)})


def test_input_shapes_wrong_rank_and_conflict(symbolic):
    with pytest.raises(InputError, match=re.escape(
            "Frontend: --input-shapes gives 'x' rank 1, the model says rank 2; give 2 dims")):
        load_onnx(symbolic, {"x": (4,)})
    with pytest.raises(InputError, match=re.escape(
            "Frontend: --input-shapes gives 'x' dim 1 = 5, the model fixes it to 3; use 3")):
        load_onnx(symbolic, {"x": (4, 5)})


# -- what comes out -----------------------------------------------------------------------------
def test_model_info_of_tiny_cnn(tiny_cnn_onnx, tiny_cnn):
    mod, info = tiny_cnn
    assert info.sha256 == hashlib.sha256(tiny_cnn_onnx.read_bytes()).hexdigest()
    assert info.input_names == ("x",) and info.inputs[0].shape == (2, 3, 8, 8)
    onnx_model = onnx.load(str(tiny_cnn_onnx))
    inits = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
    assert set(info.params) == set(inits)  # conv1.weight ... fc.bias: names kept verbatim
    for name, value in info.params.items():
        np.testing.assert_array_equal(value, inits[name])
    assert info.buffers == {"bn1.running_mean", "bn1.running_var"}
    func = mod["main"]
    # weights are parameters after the real inputs, in ModelInfo.params order
    assert compat.func_num_inputs(func) == 1
    assert [compat.var_name(v) for v in func.params] == ["x", *info.params]
    # 3*8*3*3 + 8 + 4*8 + 8*8*3*3 + 8 + 10*8 + 10 floats = 216+8+32+576+8+80+10 = 930
    assert info.param_bytes == 930 * 4
    # one dataflow block; the batch-norm running-stat outputs are dead code and gone
    blocks = func.body.blocks
    assert len(blocks) == 1 and isinstance(blocks[0], __import__("tvm").relax.DataflowBlock)


def test_clip_becomes_maximum_minimum(tmp_path):
    # ReLU6 as exported by PyTorch: Clip with constant bounds -> relax.maximum / minimum
    nodes = [helper.make_node("Constant", [], ["lo"], value=numpy_helper.from_array(
                 np.array(0, np.float32), "lo")),
             helper.make_node("Constant", [], ["hi"], value=numpy_helper.from_array(
                 np.array(6, np.float32), "hi")),
             helper.make_node("Clip", ["x", "lo", "hi"], ["y"], name="relu6")]
    path = _save(tmp_path, nodes, [_vi("x", [2, 4])], [_vi("y", [2, 4])])
    mod, _ = load_onnx(path)
    ops = [b.value.op.name for b in mod["main"].body.blocks[0].bindings]
    assert ops == ["relax.maximum", "relax.minimum"]
    x = np.array([[-3, 0, 2, 5], [6, 7, -0.5, 100]], np.float32)
    np.testing.assert_array_equal(_run(mod, x), np.clip(x, 0, 6))


def test_constant_shape_chain_is_folded(tmp_path):
    # BERT's embeddings: ConstantOfShape(Shape(Reshape(Concat(Unsqueeze(c))))) on constants;
    # TVM's importer fails on it unfolded, the frontend folds it in ONNX first.
    def c(n, v):
        return helper.make_node("Constant", [], [n], value=numpy_helper.from_array(
            np.array(v, np.int64), n))

    nodes = [c("a", 2), c("b", 3), c("ax", [0]), c("flat", [-1]),
             helper.make_node("Unsqueeze", ["a", "ax"], ["ua"]),
             helper.make_node("Unsqueeze", ["b", "ax"], ["ub"]),
             helper.make_node("Concat", ["ua", "ub"], ["cat"], axis=0),
             helper.make_node("Reshape", ["cat", "flat"], ["r"]),
             helper.make_node("Shape", ["r"], ["s"]),
             helper.make_node("ConstantOfShape", ["s"], ["z"], value=numpy_helper.from_array(
                 np.array([1.5], np.float32), "v")),
             helper.make_node("Add", ["x", "z"], ["y"], name="add")]
    path = _save(tmp_path, nodes, [_vi("x", [2])], [_vi("y", [2])])
    mod, _ = load_onnx(path)
    ops = [b.value.op.name for b in mod["main"].body.blocks[0].bindings]
    assert ops == ["relax.add"]
    np.testing.assert_array_equal(_run(mod, np.array([1, 2], np.float32)), [2.5, 3.5])


@pytest.mark.parametrize("name", ["tiny_cnn", "mbv2_block", "tiny_transformer"])
def test_small_models_compute_what_the_onnx_file_says(onnx_model, name):
    # the imported module (constant folding, Clip as maximum/minimum, training-mode batch
    # norm, split/erf attention) computes what onnx's reference evaluator computes on the file
    from onnx.reference import ReferenceEvaluator

    path = onnx_model(name)
    mod, info = load_onnx(path)
    x = np.random.default_rng(0).standard_normal(info.inputs[0].shape).astype(np.float32)
    want = ReferenceEvaluator(str(path)).run(None, {info.inputs[0].onnx_name: x})[0]
    got = _run(mod, x, *info.params.values())
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_external_weights(tmp_path, tiny_cnn_onnx, tiny_cnn):
    # models over 2 GB keep their weights in a side file; the hash covers both files
    model = onnx.load(str(tiny_cnn_onnx))
    path = tmp_path / "m.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="m.data",
                    all_tensors_to_one_file=True, size_threshold=0)
    _, info = load_onnx(path)
    for name, value in tiny_cnn[1].params.items():
        np.testing.assert_array_equal(info.params[name], value)
    want = hashlib.sha256(path.read_bytes() + (tmp_path / "m.data").read_bytes()).hexdigest()
    assert info.sha256 == want
    (tmp_path / "m.data").unlink()
    with pytest.raises(InputError, match=re.escape(
            f"Frontend: external weights of '{path}' cannot be read (ValidationError); keep the "
            ".data file next to the model")):
        load_onnx(path)


def test_slice_bounds_from_shape_are_folded(tmp_path):
    # x.chunk(2, dim=1) as the TorchScript exporter writes it: the slice end is computed from
    # Shape(x); with the input shape fixed it folds to a static strided_slice (unfolded, the
    # importer emits dynamic_strided_slice with an unknown output shape)
    def c(n, v):
        return helper.make_node("Constant", [], [n], value=numpy_helper.from_array(
            np.array(v, np.int64), n))

    nodes = [c("one", 1), c("two", 2), c("zero", [0]), c("ax", [0]), c("axes", [1]),
             helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Gather", ["s", "one"], ["d"], axis=0),
             helper.make_node("Div", ["d", "two"], ["h"]),
             helper.make_node("Unsqueeze", ["h", "ax"], ["end"]),
             helper.make_node("Slice", ["x", "zero", "end", "axes"], ["y"], name="chunk0")]
    path = _save(tmp_path, nodes, [_vi("x", ["N", 4])], [_vi("y", ["N", 2])])
    mod, _ = load_onnx(path, {"x": (3, 4)})
    bindings = mod["main"].body.blocks[0].bindings
    assert [b.value.op.name for b in bindings] == ["relax.strided_slice"]
    assert compat.static_shape(compat.expr_ty(bindings[0].var)) == (3, 2)
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_run(mod, x), x[:, :2])


@pytest.mark.parametrize("mode,np_mode", [("constant", "constant"), ("reflect", "reflect"),
                                          ("edge", "edge")])
def test_pad_becomes_relax_pad(tmp_path, mode, np_mode):
    # the importer would emit an opaque call_tir(pad); the frontend imports relax.nn.pad
    pads = numpy_helper.from_array(np.array([0, 1, 0, 2], np.int64), "pads")
    nodes = [helper.make_node("Constant", [], ["p"], value=pads),
             helper.make_node("Pad", ["x", "p"], ["y"], mode=mode)]
    path = _save(tmp_path, nodes, [_vi("x", [2, 3])], [_vi("y", [2, 6])])
    mod, _ = load_onnx(path)
    assert [b.value.op.name for b in mod["main"].body.blocks[0].bindings] == ["relax.nn.pad"]
    x = np.arange(6, dtype=np.float32).reshape(2, 3)
    np.testing.assert_array_equal(_run(mod, x), np.pad(x, ((0, 0), (1, 2)), mode=np_mode))


def test_einsum_becomes_relax_einsum(tmp_path):
    path = _save(tmp_path, [helper.make_node("Einsum", ["a", "b"], ["y"], equation="ij,jk->ik")],
                 [_vi("a", [2, 3]), _vi("b", [3, 4])], [_vi("y", [2, 4])])
    mod, _ = load_onnx(path)
    assert [b.value.op.name for b in mod["main"].body.blocks[0].bindings] == ["relax.einsum"]
    a, b = np.ones((2, 3), np.float32), np.arange(12, dtype=np.float32).reshape(3, 4)
    np.testing.assert_array_equal(_run(mod, a, b), a @ b)


def test_constant_initializers_are_not_parameters(tmp_path):
    # the dynamo exporter stores constants as initializers: an int64 reshape target and
    # ReLU6's bounds (min_val_cast / max_val_cast); only the real weight stays a parameter
    inits = [numpy_helper.from_array(np.array([2, 4], np.int64), "val_9"),
             numpy_helper.from_array(np.array(0, np.float32), "min_val_cast"),
             numpy_helper.from_array(np.array(6, np.float32), "max_val_cast"),
             numpy_helper.from_array(np.full((2, 4), 3, np.float32), "w")]
    nodes = [helper.make_node("Reshape", ["x", "val_9"], ["r"]),
             helper.make_node("Mul", ["r", "w"], ["m"]),
             helper.make_node("Clip", ["m", "min_val_cast", "max_val_cast"], ["y"])]
    path = _save(tmp_path, nodes, [_vi("x", [8])], [_vi("y", [2, 4])], inits=inits)
    mod, info = load_onnx(path)
    assert list(info.params) == ["w"]
    assert [compat.var_name(v) for v in mod["main"].params] == ["x", "w"]
    ops = [b.value.op.name for b in mod["main"].body.blocks[0].bindings]
    assert ops == ["relax.reshape", "relax.multiply", "relax.maximum", "relax.minimum"]
    x = np.linspace(-2, 2, 8, dtype=np.float32)
    np.testing.assert_allclose(_run(mod, x, info.params["w"]),
                               np.clip(x.reshape(2, 4) * 3, 0, 6), rtol=1e-6)


def test_control_flow_is_rejected(tmp_path):
    branch = helper.make_graph([helper.make_node("Relu", ["x"], ["a"])], "b", [],
                               [_vi("a", [2])])
    nodes = [helper.make_node("Constant", [], ["c"], value=numpy_helper.from_array(
                 np.array(True), "c")),
             helper.make_node("If", ["c"], ["y"], name="branch", then_branch=branch,
                              else_branch=branch)]
    path = _save(tmp_path, nodes, [_vi("x", [2])], [_vi("y", [2])])
    with pytest.raises(UnsupportedError, match=re.escape(
            "Frontend: control flow (If node 'branch') is not supported, splitc partitions pure "
            "dataflow graphs; export with the branch or loop resolved (torch.onnx.export traces "
            "the path taken)")):
        load_onnx(path)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "gpt2"])
def test_full_models_compute_what_pytorch_computes(onnx_model, name):
    # import -> compile (llvm, default schedules) -> run, against the PyTorch module holding
    # the very weights of the ONNX file (initializer names are the state_dict keys); ResNet-50
    # runs batch norm in training mode on both sides. 40-90 s each on 2 shared cores, so
    # BERT (max error 6.6e-7 of 0.86, measured once) and ViT are left out of the suite.
    import models  # tests/helpers/models.py
    import torch

    mod, info = load_onnx(onnx_model(name))
    model, _, has_bn = models.MODELS[name]()
    state = model.state_dict()
    # every ONNX weight is a state_dict entry; the only entries without one are BN step
    # counters and GPT-2's lm_head.weight (tied to wte: loading wte sets both)
    assert set(info.params) <= set(state)
    assert all(k.endswith("num_batches_tracked") or k == "model.lm_head.weight"
               for k in set(state) - set(info.params))
    model.load_state_dict({k: torch.from_numpy(v) for k, v in info.params.items()},
                          strict=False)
    model.train(has_bn)
    rng = np.random.default_rng(0)
    args = [rng.integers(0, 1000, i.shape) if i.name == "input_ids" else
            np.ones(i.shape, np.int64) if i.dtype == "int64" else
            rng.standard_normal(i.shape).astype(np.float32) for i in info.inputs]
    got = _run(mod, *args, *info.params.values())
    with torch.no_grad():
        want = model(*[torch.from_numpy(a) for a in args]).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
