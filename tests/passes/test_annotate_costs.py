"""passes/annotate_costs.py and passes/op_rules.py: OpGraph structure and exact FLOP counts."""

import json
import re

import pytest
import tvm
from tvm import relax

from splitc import InputError, UnsupportedError
from splitc.cost_models.base import OpCost, OpFeatures
from splitc.passes import op_rules
from splitc.passes.annotate_costs import AnnotateCosts, annotate_costs
from splitc.passes.frontend import load_onnx
from splitc.passes.op_rules import Arg, CallInfo
from splitc.passes.opgraph import OpGraph, needs_grad


def _flops(graph, name):
    return graph.op(name).features.flops


# -- the tiny CNN, op by op ---------------------------------------------------------------------
def test_tiny_cnn_ops_tensors_params(tiny_cnn_graph):
    g = tiny_cnn_graph
    assert [(o.name, o.op) for o in g.ops] == [
        ("lv", "relax.nn.conv2d"), ("lv2", "relax.add"), ("lv3", "relax.nn.batch_norm"),
        ("lv7", "relax.nn.relu"), ("lv8", "relax.nn.conv2d"), ("lv10", "relax.add"),
        ("lv11", "relax.add"), ("lv12", "relax.mean"), ("lv14", "relax.matmul"),
        ("gv", "relax.add"),
    ]
    assert g.inputs == ("x",) and g.outputs == ("gv",)
    # batch_norm owns the tensor its TupleGetItem defines (lv4); the running-stat outputs
    # are dead after DeadCodeElimination and never become tensors
    assert g.op("lv3").outputs == ("lv4",) and g.tensors["lv4"].producer == "lv3"
    # the residual: relu's output read by conv2 and by the skip add, one tensor, two readers
    assert g.tensors["lv7"].consumers == ("lv8", "lv11")
    assert g.op("lv11").inputs == ("lv7", "lv10")
    assert g.tensors["x"].producer is None and g.tensors["x"].consumers == ("lv",)
    assert g.tensors["gv"].is_output and not g.tensors["lv14"].is_output
    # weight-only bindings are folded into their reader: reshape(conv1.bias) -> lv2,
    # permute_dims(fc.weight) -> the matmul; they are neither ops nor tensors
    assert g.op("lv2").weight_prep == ("lv1",) and g.op("lv2").params == ("conv1.bias",)
    assert g.op("lv14").weight_prep == ("lv13",) and g.op("lv14").params == ("fc.weight",)
    assert not {"lv1", "lv13"} & (set(g.tensors) | {o.name for o in g.ops})
    assert g.params["fc.weight"].readers == ("lv14",)
    assert g.op("lv3").params == ("bn1.weight", "bn1.bias", "bn1.running_mean",
                                  "bn1.running_var")
    assert g.meta["buffers"] == ["bn1.running_mean", "bn1.running_var"]
    assert set(g.params) == {"conv1.weight", "conv1.bias", "bn1.weight", "bn1.bias",
                             "bn1.running_mean", "bn1.running_var", "conv2.weight",
                             "conv2.bias", "fc.weight", "fc.bias"}
    # labels for cross-entropy: one int64 class index per row of the (2, 10) logits
    assert [(t.name, t.shape, t.dtype) for t in g.labels] == [("labels", (2,), "int64")]
    assert len(g.model_hash) == 64


def test_tiny_cnn_exact_flops_and_bytes(tiny_cnn_graph):
    g = tiny_cnn_graph
    # conv1: out (2,8,8,8) = 1024 elements, each 3*3*3 = 27 MACs: 2 * 1024 * 27 = 55,296
    assert _flops(g, "lv") == 55_296
    # conv2: 1024 outputs x 8*3*3 = 72 MACs: 2 * 1024 * 72 = 147,456
    assert _flops(g, "lv8") == 147_456
    # fc: (2,8) x (8,10): 20 outputs x 8 MACs: 2 * 20 * 8 = 320
    assert _flops(g, "lv14") == 320
    # bias add over (2,8,8,8): 1024; mean over (2,8,8,8) to (2,8): 1024 adds + 16 divides
    assert _flops(g, "lv2") == 1024 and _flops(g, "lv12") == 1040
    # training batch norm: 8 per element + 6 per channel: 8 * 1024 + 6 * 8 = 8,240
    assert _flops(g, "lv3") == 8_240
    f = g.op("lv").features
    # reads x (2*3*8*8 = 384 floats) + weight (8*3*3*3 = 216), writes 1024 floats
    assert (f.bytes_read, f.bytes_written, f.param_bytes) == (600 * 4, 1024 * 4, 216 * 4)
    # batch norm: running stats are buffers, not trained: param_bytes = gamma + beta only
    assert g.op("lv3").features.param_bytes == 16 * 4


def test_input_grad_and_params_flags(tiny_cnn_graph):
    g = tiny_cnn_graph
    first = g.op("lv").features
    # the first conv reads only the model input: weight gradient, no input gradient
    assert first.has_params and not first.input_grad
    assert all(o.features.input_grad for o in g.ops[1:])
    assert not g.op("lv7").features.has_params and g.op("lv8").features.has_params
    assert needs_grad(g) == frozenset(set(g.tensors) - {"x"})


def test_costs_come_from_the_cost_models(tiny_cnn_graph, roofline_pair):
    dev, srv = roofline_pair
    for op in tiny_cnn_graph.ops:
        assert op.device == dev.op_cost(op.features)
        assert op.server == srv.op_cost(op.features)
    assert tiny_cnn_graph.cost_model == ("device=roofline:jetson-orin-nano(prior); "
                                         "server=roofline:a100(prior)")
    # cross-entropy on (2,10) logits: 5 * 20 + 3 * 2 = 106 FLOPs, reads logits 80 B + labels
    # 16 B, writes 80 B (the gradient); on the a100 it is overhead-bound: 5 us fwd and bwd
    loss_f = OpFeatures("loss.cross-entropy", 106, 96, 80, 0, ((2, 10), (2,)), ((),),
                        "float32", False, True)
    assert tiny_cnn_graph.loss_server == srv.op_cost(loss_f)


def test_mse_labels_and_no_loss(tiny_cnn, roofline_pair):
    mod, _ = tiny_cnn
    g = annotate_costs(mod, *roofline_pair, loss="mse")
    assert [(t.shape, t.dtype) for t in g.labels] == [((2, 10), "float32")]
    g = annotate_costs(mod, *roofline_pair, loss="none")
    assert g.labels == () and g.loss_server == OpCost()
    with pytest.raises(InputError, match=re.escape(
            "AnnotateCosts: unknown loss 'hinge'; use one of ('cross-entropy', 'mse', 'none')")):
        annotate_costs(mod, *roofline_pair, loss="hinge")


def test_pass_returns_module_unchanged_and_json_round_trip(tiny_cnn, roofline_pair):
    mod, info = tiny_cnn
    p = AnnotateCosts(*roofline_pair, model_hash=info.sha256)
    out = p(mod)
    tvm.ir.assert_structural_equal(out, mod)
    g = p.graph
    assert g.model_hash == info.sha256
    assert OpGraph.from_json(json.loads(g.dumps())) == g


def test_structural_hash_without_onnx_hash(tiny_cnn, roofline_pair):
    mod, _ = tiny_cnn
    a = annotate_costs(mod, *roofline_pair).model_hash
    assert a == annotate_costs(mod, *roofline_pair).model_hash and len(a) == 64


# -- other small models ----------------------------------------------------------------------------
def test_depthwise_and_pointwise_conv_flops(mbv2_block_onnx, roofline_pair):
    mod, info = load_onnx(mbv2_block_onnx)
    g = annotate_costs(mod, *roofline_pair, loss="mse", buffers=info.buffers)
    convs = [o for o in g.ops if o.op == "relax.nn.conv2d"]
    # expand 1x1 16->96 on (2,16,8,8): 2*96*8*8 = 12,288 outputs x 16 MACs x 2 = 393,216
    # depthwise 3x3 (groups=96): 12,288 outputs x 1*3*3 MACs x 2 = 221,184
    # project 1x1 96->16: 2*16*8*8 = 2,048 outputs x 96 MACs x 2 = 393,216
    assert [o.features.flops for o in convs] == [393_216, 221_184, 393_216]
    # ReLU6 (Clip 0..6) is maximum + minimum: one FLOP per element each (12,288)
    assert [o.op for o in g.ops if o.op.endswith(("maximum", "minimum"))] == [
        "relax.maximum", "relax.minimum"] * 2
    assert g.op(g.outputs[0]).inputs == ("x", g.ops[-2].outputs[0])  # the skip add


def test_transformer_block_split_and_batched_matmul(tiny_transformer_onnx, roofline_pair):
    mod, _ = load_onnx(tiny_transformer_onnx)
    g = annotate_costs(mod, *roofline_pair)
    split = next(o for o in g.ops if o.op == "relax.split")
    # one op owns the three tensors q, k, v that its TupleGetItem bindings define
    assert len(split.outputs) == 3
    assert all(g.tensors[t].producer == split.name for t in split.outputs)
    mm = [o for o in g.ops if o.op == "relax.matmul" and not o.params]
    # q @ k^T: (2,4,8,8) x (2,4,8,8): 2*4*8*8 = 512 outputs x 8 MACs x 2 = 8,192; att @ v same
    assert [o.features.flops for o in mm] == [8_192, 8_192]
    # qkv projection (2,8,32) x (32,96): 2*8*96 = 1,536 outputs x 32 MACs x 2 = 98,304
    qkv = next(o for o in g.ops if o.op == "relax.matmul" and o.params == ("qkv.weight",))
    assert qkv.features.flops == 98_304
    # softmax over (2,4,8,8) = 512 elements: 5 * 512 = 2,560; layer norm (2,8,32): 8*512
    assert [o.features.flops for o in g.ops if o.op == "relax.nn.softmax"] == [2_560]
    assert [o.features.flops for o in g.ops if o.op == "relax.nn.layer_norm"] == [4_096] * 2


# -- op rules directly -------------------------------------------------------------------------
F32 = "float32"


def _call(op, args, outs, **attrs):
    return CallInfo(op, "b", tuple(Arg(a, F32) if a is not None else None for a in args),
                    tuple(Arg(o, F32) for o in outs), type("A", (), attrs)())


def _count(name, call):
    return op_rules.count(tvm.ir.Op.get(name), call)


def test_rule_conv1d_grouped_and_transpose():
    # conv1d: out (1,8,30) = 240 outputs, weight (8,2,3) with groups=2: 2*3 = 6 MACs each
    c = _call("relax.nn.conv1d", [(1, 4, 32), (8, 2, 3)], [(1, 8, 30)], kernel_layout="OIW")
    assert _count("relax.nn.conv1d", c).flops == 2 * 240 * 6
    # conv2d_transpose: x (1,4,5,5) = 100 elements each scattering into 8*3*3 = 72 outputs
    # (weight IOHW (4,8,3,3)): 2 * 100 * 72 = 14,400
    c = _call("relax.nn.conv2d_transpose", [(1, 4, 5, 5), (4, 8, 3, 3)], [(1, 8, 7, 7)],
              kernel_layout="IOHW")
    assert _count("relax.nn.conv2d_transpose", c).flops == 14_400
    # NHWC / HWIO conv: O is found by the layout: out 1*4*4*6 = 96 x 3*3*5 = 45 MACs x 2
    c = _call("relax.nn.conv2d", [(1, 6, 6, 5), (3, 3, 5, 6)], [(1, 4, 4, 6)],
              kernel_layout="HWIO")
    assert _count("relax.nn.conv2d", c).flops == 2 * 96 * 45


def test_rule_matmul_broadcast_and_vector():
    # (4,1,5,6) x (3,6,7) -> (4,3,5,7) = 420 outputs x K=6 x 2 = 5,040
    c = _call("relax.matmul", [(4, 1, 5, 6), (3, 6, 7)], [(4, 3, 5, 7)])
    assert _count("relax.matmul", c).flops == 5_040
    # vector x matrix: (6,) x (6,7) -> (7,): 7 x 6 x 2 = 84
    assert _count("relax.matmul", _call("relax.matmul", [(6,), (6, 7)], [(7,)])).flops == 84


def test_rule_attention_pooling_take():
    # q (2,16,4,8), k/v (2,16,4,8): n = B*H*S*T = 2*4*16*16 = 2,048;
    # 2n*8 (QK^T) + 5n (softmax) + 2n*8 (PV) = 32,768 + 10,240 + 32,768 = 75,776
    c = _call("relax.nn.attention", [(2, 16, 4, 8)] * 3, [(2, 16, 4, 8)])
    assert _count("relax.nn.attention", c).flops == 75_776
    # max pool 3x3 stride 2 on (1,4,9,9) -> (1,4,4,4): 64 outputs x 9 compares = 576
    c = _call("relax.nn.max_pool2d", [(1, 4, 9, 9)], [(1, 4, 4, 4)], pool_size=(3, 3))
    assert _count("relax.nn.max_pool2d", c).flops == 576
    # avg pool: 64 outputs x (9 adds + 1 divide) = 640; adaptive to 1x1: 324 adds + 4 divides
    c = _call("relax.nn.avg_pool2d", [(1, 4, 9, 9)], [(1, 4, 4, 4)], pool_size=(3, 3))
    assert _count("relax.nn.avg_pool2d", c).flops == 640
    c = _call("relax.nn.adaptive_avg_pool2d", [(1, 4, 9, 9)], [(1, 4, 1, 1)])
    assert _count("relax.nn.adaptive_avg_pool2d", c).flops == 328
    # take (embedding lookup) reads the indices and the gathered rows, not the table:
    # table (50257,768) float32, 32 int64 ids -> 32*8 + 32*768*4 = 98,560 B read
    c = CallInfo("relax.take", "b", (Arg((50257, 768), F32), Arg((32,), "int64")),
                 (Arg((32, 768), F32),))
    n = _count("relax.take", c)
    assert (n.flops, n.bytes_read, n.bytes_written) == (0, 98_560, 98_304)


def test_missing_rule_names_op_and_binding(roofline_pair):
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((4,), "float32"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.sort(x))
            out = bb.emit_output(relax.op.add(y, y))
        bb.emit_func_output(out)
    with pytest.raises(UnsupportedError, match=re.escape(
            "AnnotateCosts: no FLOP rule for op relax.sort (binding 'lv'); add one to "
            "passes/op_rules.py")):
        annotate_costs(bb.get(), *roofline_pair)


def test_rules_registry_is_keyed_by_op():
    assert all(isinstance(k, tvm.ir.Op) for k in op_rules.RULES)
    assert op_rules.has_rule(tvm.ir.Op.get("relax.nn.conv2d"))
    assert not op_rules.has_rule(tvm.ir.Op.get("relax.sort"))


# -- real models against PyTorch's own FLOP counter ------------------------------------------------
def _torch_flops(name):
    """Conv + matmul FLOPs of one forward pass by ``torch.utils.flop_counter`` (2 per MAC)."""
    import models  # tests/helpers/models.py
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    model, shapes, has_bn = models.MODELS[name]()
    model.train(has_bn)
    args = [torch.ones(s, dtype=torch.int64) if k in ("input_ids", "attention_mask")
            else torch.randn(s) for k, s in shapes.items()]
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(*args)
    return counter.get_total_flops()


def _conv_matmul_flops(graph):
    return sum(o.features.flops for o in graph.ops
               if o.op == "relax.matmul" or o.op.startswith("relax.nn.conv"))


def _annotate_model(onnx_model, roofline_pair, name, loss="cross-entropy"):
    mod, info = load_onnx(onnx_model(name))
    return annotate_costs(mod, *roofline_pair, loss=loss, model_hash=info.sha256,
                          buffers=info.buffers, name=name)


@pytest.mark.parametrize("name,loss", [("tiny_cnn", "cross-entropy"), ("mbv2_block", "mse"),
                                       ("tiny_transformer", "cross-entropy")])
def test_small_models_flops_equal_pytorch(onnx_model, roofline_pair, name, loss):
    g = _annotate_model(onnx_model, roofline_pair, name, loss)
    # tiny_cnn: 55,296 + 147,456 (convs, above) + 320 (fc) = 203,072
    assert _conv_matmul_flops(g) == _torch_flops(name)


# Reference totals (conv + matmul, 2 FLOPs per MAC, batch 1; 32 tokens for BERT / GPT-2), all
# equal to torch.utils.flop_counter on the same module: ResNet-50 8,178,368,512 (the usual
# "4.1 GMACs"), MobileNetV2 601,548,544 ("300 MMACs"), ViT-B/16 35,126,135,808 ("17.6
# GMACs"), BERT-base 5,474,749,440, GPT-2 7,943,798,784 (2,470,232,064 of it the tied
# 768 x 50,257 LM head: 2 * 32 * 768 * 50,257).
FULL_MODELS = {"resnet50": 8_178_368_512, "mobilenet_v2": 601_548_544, "vit": 35_126_135_808,
               "bert": 5_474_749_440, "gpt2": 7_943_798_784}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FULL_MODELS))
def test_full_models_annotate_round_trip_and_flops(onnx_model, roofline_pair, name):
    g = _annotate_model(onnx_model, roofline_pair, name)
    assert OpGraph.from_json(json.loads(g.dumps())) == g
    assert _conv_matmul_flops(g) == FULL_MODELS[name] == _torch_flops(name)
    # every op has costs on both sides and every tensor is accounted for
    assert all(o.device.forward > 0 and o.server.forward > 0 for o in g.ops)
    assert all(t.producer is None or t.consumers or t.is_output for t in g.tensors.values())


@pytest.mark.slow
def test_gpt2_tied_embedding_is_one_param_read_at_both_ends(onnx_model, roofline_pair):
    g = _annotate_model(onnx_model, roofline_pair, "gpt2")
    wte = g.params["model.transformer.wte.weight"]
    assert wte.shape == (50257, 768)
    first, last = wte.readers
    # read by the token-embedding gather at the start and the LM-head matmul at the end
    assert g.op(first).op == "relax.take" and g.op(last).op == "relax.matmul"
    assert last == g.ops[-1].name and g.op_index[first] < 5
    # the LM head: (1,32,768) x (768,50257) = 2 * 32 * 768 * 50,257 = 2,470,232,064 FLOPs
    assert g.op(last).features.flops == 2_470_232_064
    assert g.op(last).weight_prep  # permute_dims(wte) folded into the LM head
    # both readers compute a weight gradient; only the first owns (and updates) the weight:
    # 50,257 x 768 x 4 B = 154,389,504 B
    assert g.op(first).features.has_params and g.op(last).features.has_params
    assert g.op(first).features.param_bytes == 154_389_504
    assert g.op(last).features.param_bytes == 0 and g.op(last).device.update == 0.0
    # labels for next-token cross-entropy: one id per position
    assert [(t.shape, t.dtype) for t in g.labels] == [((1, 32), "int64")]


def test_opaque_tir_kernel_is_rejected_by_name(tmp_path, roofline_pair):
    # Clip with a bound known only at run time stays the importer's call_tir(maximum):
    # no FLOP rule, no gradient
    import onnx
    from onnx import TensorProto, helper

    vi = helper.make_tensor_value_info
    graph = helper.make_graph([helper.make_node("Clip", ["x", "lo"], ["y"], name="clip")], "g",
                              [vi("x", TensorProto.FLOAT, [2, 3]), vi("lo", TensorProto.FLOAT, [])],
                              [vi("y", TensorProto.FLOAT, [2, 3])])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]),
              str(tmp_path / "clip.onnx"))
    mod, _ = load_onnx(tmp_path / "clip.onnx")
    with pytest.raises(UnsupportedError, match=re.escape(
            "AnnotateCosts: binding 'gv' is an opaque TIR kernel (maximum) with no FLOP rule "
            "and no gradient; the ONNX importer lowers some ops this way (Clip, Pad or Tile "
            "with bounds computed at run time): re-export them with constants")):
        annotate_costs(mod, *roofline_pair)


def test_aliases_tuples_and_tuple_return(roofline_pair):
    # a hand-built main: an alias, an R.tuple read back through TupleGetItem, a weight-only
    # permute shared by nothing else, and a tuple of two outputs
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    w = relax.Var("w", relax.TensorType((4, 4), "float32"))
    with bb.function("main", [x, w], attrs={"num_input": 1}):
        with bb.dataflow():
            mm = bb.emit(relax.op.matmul(x, w), name_hint="mm")
            alias = bb.emit(mm, name_hint="alias")
            tup = bb.emit(relax.Tuple([alias, x]), name_hint="tup")
            first = bb.emit(relax.TupleGetItem(tup, 0), name_hint="first")
            act = bb.emit(relax.op.nn.relu(first), name_hint="act")
            wt = bb.emit(relax.op.permute_dims(w), name_hint="wt")
            head = bb.emit(relax.op.matmul(act, wt), name_hint="head")
            out = bb.emit_output(relax.Tuple([act, head]))
        bb.emit_func_output(out)
    g = annotate_costs(bb.get(), *roofline_pair, loss="mse")
    assert [(o.name, o.op) for o in g.ops] == [
        ("mm", "relax.matmul"), ("act", "relax.nn.relu"), ("head", "relax.matmul")]
    assert g.op("act").inputs == ("mm",)  # through the alias and the tuple, to the producer
    assert g.op("head").weight_prep == ("wt",) and g.op("head").params == ("w",)
    assert g.params["w"].readers == ("mm", "head")
    # w (4x4 floats = 64 B) is owned, and its update paid, by its first reader only
    assert [o.features.param_bytes for o in g.ops] == [64, 0, 0]
    assert g.outputs == ("act", "head")
    assert g.tensors["act"].is_output and g.tensors["act"].consumers == ("head",)
    assert set(g.tensors) == {"x", "mm", "act", "head"}  # aliases and tuples are not tensors
    # the loss trains on the first output: mse labels shaped like it
    assert [(t.shape, t.dtype) for t in g.labels] == [((2, 4), "float32")]
    # (2,4) x (4,4): 8 outputs x 4 MACs x 2 = 64 FLOPs, both matmuls
    assert [o.features.flops for o in g.ops] == [64, 8, 64]
