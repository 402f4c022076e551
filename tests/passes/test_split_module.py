"""SplitModule: split == unsplit == PyTorch, forward, gradients and running stats (llvm).

Each model is exported from PyTorch in training mode (tests/helpers/split_models.py), split in
the middle by a hand-made placement, and compiled for llvm (~1 s per side on this machine).
"""

from __future__ import annotations

import numpy as np
import pytest
import split_models as S
import torch
from splitc import BuildError, UnsupportedError
from splitc.passes.split_module import check_split, split_module

RTOL, ATOL = 1e-4, 1e-6


def _close(a, b, what):
    np.testing.assert_allclose(a, b, rtol=RTOL, atol=ATOL, err_msg=what)


@pytest.fixture(scope="module", params=["cnn", "mobile", "transformer"])
def case(request):
    kind = request.param
    model, onnx_bytes, x, y = S.make_model(kind)
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    return kind, model, mod, ops, x.numpy(), y.numpy()


def test_split_forward_and_gradients_match_unsplit_and_pytorch(case):
    kind, model, mod, ops, x, y = case
    values = S.param_values(mod)
    split = split_module(mod, S.manual_plan(mod, ops[: len(ops) // 2]))
    whole = split_module(mod, S.manual_plan(mod, []))  # everything on the server: unsplit
    vm_split, vm_whole = S.compile_sides(split[0]), S.compile_sides(whole[0])
    # forward (inference, running stats): device∘server == unsplit
    out_split = S.split_infer(vm_split, split[1], values, x)
    out_whole = S.split_infer(vm_whole, whole[1], values, x)
    _close(out_split[0], out_whole[0], f"{kind}: infer")
    model.eval()
    with torch.no_grad():
        _close(out_whole[0], model(torch.from_numpy(x)).numpy(), f"{kind}: infer vs torch")
    model.train()
    # one training step: loss, every parameter gradient and the new running stats
    loss_s, grads_s, stats_s = S.split_step(vm_split, split[1], values, x, y)
    loss_w, grads_w, stats_w = S.split_step(vm_whole, whole[1], values, x, y)
    loss_t, grads_t = S.torch_step(model, torch.from_numpy(x), torch.from_numpy(y))
    assert split[1].device_params and split[1].server_params  # a real split
    assert sorted(grads_s) == sorted(grads_w) == sorted(grads_t)
    _close(loss_s, loss_w, "loss split vs unsplit")
    _close(loss_s, loss_t, "loss vs torch")
    for name in grads_t:
        _close(grads_s[name], grads_w[name], f"{kind}: grad {name} split vs unsplit")
        _close(grads_s[name], grads_t[name], f"{kind}: grad {name} vs torch")
    sd = model.state_dict()
    for name, v in stats_s.items():  # BatchNorm running stats after one step, as PyTorch's
        _close(v, stats_w[name], f"{kind}: {name} split vs unsplit")
        _close(v, sd[name].numpy(), f"{kind}: {name} vs torch")


def test_recompute_gives_the_same_gradients():
    _, onnx_bytes, x, y = S.make_model("cnn")
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    plan = S.manual_plan(mod, ops[:4])
    values = S.param_values(mod)
    keep, spec_keep = split_module(mod, plan)
    rec, spec_rec = split_module(mod, plan, recompute=True)
    # recompute keeps only function inputs (x and the device weights; the backward does not
    # read the running stats) as residuals
    assert [r.name for r in spec_rec.residuals] == ["x", *spec_rec.device_params]
    assert len(spec_keep.residuals) > len(spec_rec.residuals)
    a = S.split_step(S.compile_sides(keep), spec_keep, values, x.numpy(), y.numpy())
    b = S.split_step(S.compile_sides(rec), spec_rec, values, x.numpy(), y.numpy())
    for name in a[1]:
        _close(a[1][name], b[1][name], f"recompute grad {name}")


def test_boundary_signature_is_the_plan_cut_in_order():
    _, onnx_bytes, _, _ = S.make_model("cnn")
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    # ops[:8] ends at the second conv's batch norm: lv12 (bn output) and lv7 (the residual
    # branch) both cross, in graph order
    plan = S.manual_plan(mod, ops[:7])
    smod, spec = split_module(mod, plan)
    names = [c.name for c in plan.cut]
    assert len(names) == 2
    assert [p.name for p in smod["server_step"].params[:2]] == names
    fwd = smod["device_forward"].ret_ty.fields
    assert [tuple(int(d) for d in t.shape) for t in fwd[:2]] == [c.shape for c in plan.cut]
    # server_step -> (loss, g_cut..., grads θs..., new running stats...)
    ret = smod["server_step"].ret_ty.fields
    assert tuple(int(d) for d in ret[0].shape) == ()
    assert [tuple(int(d) for d in t.shape) for t in ret[1:3]] == [c.shape for c in plan.cut]
    assert len(ret) == 1 + 2 + len(spec.server_params) + len(spec.server_state)


def test_check_split_names_the_broken_function():
    _, onnx_bytes, _, _ = S.make_model("cnn")
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    smod, _ = split_module(mod, S.manual_plan(mod, ops[:4]))
    other = split_module(mod, S.manual_plan(mod, ops[:7]))[1]
    with pytest.raises(BuildError, match=r"^SplitModule: device_forward sends .* transport spec"):
        check_split(smod, other)


def test_plan_from_another_model_is_refused():
    _, cnn, _, _ = S.make_model("cnn")
    _, tr, _, _ = S.make_model("transformer")
    cnn_mod, tr_mod = S.import_onnx(cnn), S.import_onnx(tr)
    plan = S.manual_plan(tr_mod, S.op_names(tr_mod)[:20])
    with pytest.raises(BuildError, match=r"^SplitModule: plan places unknown ops .* re-run"):
        split_module(cnn_mod, plan)


def test_tied_weights_across_the_cut_are_refused():
    from dataclasses import replace

    _, onnx_bytes, _, _ = S.make_model("cnn")
    mod = S.import_onnx(onnx_bytes)
    plan = replace(S.manual_plan(mod, S.op_names(mod)[:4]), tied_weights=("fc.weight",))
    with pytest.raises(UnsupportedError, match=r"read on both sides; re-plan with --tied-weights pin"):
        split_module(mod, plan)


def test_worked_example_of_the_docstring():
    """The four-op model of passes/split_module.py's docstring, split after the relu."""
    from splitc.passes.split_module import SplitModule
    from tvm import relax
    from tvm.relax import op as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 8), "float32"))
    w1 = relax.Var("w1", relax.TensorType((8, 6), "float32"))
    w2 = relax.Var("w2", relax.TensorType((6, 3), "float32"))
    with bb.function("main", [x, w1, w2], {"num_input": 1}):
        with bb.dataflow():
            lv = bb.emit(R.matmul(x, w1), "lv")
            lv1 = bb.emit(R.nn.relu(lv), "lv1")
            lv2 = bb.emit(R.matmul(lv1, w2), "lv2")
            gv = bb.emit_output(R.nn.softmax(lv2), "gv")
        bb.emit_func_output(gv)
    mod = bb.get()
    plan = S.manual_plan(mod, ["lv", "lv1"])
    assert [(c.name, c.shape, c.grad) for c in plan.cut] == [("lv1", (2, 6), True)]
    out = SplitModule(plan, optimizer="sgd")(mod)
    sig = {
        gv.name_hint: [p.name for p in f.params]
        for gv, f in out.functions.items()
        if isinstance(f, relax.Function) and gv.name_hint != "server_loss_adjoint"
    }
    assert sig["device_forward"] == ["x", "w1"]
    assert sig["device_infer"] == ["x", "w1"]
    assert sig["device_backward"][-1] == "g_lv1"  # residuals first, then the cut gradients
    assert sig["server_step"] == ["lv1", "w2", "labels"]
    assert sig["server_infer"] == ["lv1", "w2"]
    assert sig["device_update"] == sig["server_update"] == ["params", "gradients", "optim_states"]
    # server_step -> (loss, g_lv1, grad_w2): shapes (), (2, 6), (6, 3)
    ret = out["server_step"].ret_ty.fields
    assert [tuple(int(d) for d in t.shape) for t in ret] == [(), (2, 6), (6, 3)]
    # device_backward -> (grad_w1,)
    assert [tuple(int(d) for d in t.shape) for t in out["device_backward"].ret_ty.fields] == [
        (8, 6)
    ]


def test_model_that_ends_in_its_own_loss():
    """--loss none: the scalar model output is the loss; server_step takes no labels."""
    import tvm
    from tvm import relax
    from tvm.relax import op as R

    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    w1 = relax.Var("w1", relax.TensorType((4, 4), "float32"))
    w2 = relax.Var("w2", relax.TensorType((4, 1), "float32"))
    with bb.function("main", [x, w1, w2], {"num_input": 1}):
        with bb.dataflow():
            lv = bb.emit(R.nn.relu(R.matmul(x, w1)), "lv")
            lv1 = bb.emit(R.matmul(lv, w2), "lv1")
            gv = bb.emit_output(R.mean(R.multiply(lv1, lv1)), "gv")
        bb.emit_func_output(gv)
    mod = bb.get()
    smod, spec = split_module(mod, S.manual_plan(mod, ["lv"]), loss="none")
    assert spec.labels is None
    assert [p.name for p in smod["server_step"].params] == ["lv", "w2"]
    rng = np.random.default_rng(0)
    xv, w1v, w2v = (rng.standard_normal(s).astype("float32") for s in ((2, 4), (4, 4), (4, 1)))
    vd, vs = S.compile_sides(smod)
    t = tvm.runtime.tensor
    (cut, *res) = vd["device_forward"](t(xv), t(w1v))
    loss, g_cut, g_w2 = vs["server_step"](cut, t(w2v))
    (g_w1,) = vd["device_backward"](*res, g_cut)
    xt, w1t, w2t = (torch.from_numpy(a).requires_grad_() for a in (xv, w1v, w2v))
    ref = ((torch.relu(xt @ w1t) @ w2t) ** 2).mean()
    ref.backward()
    _close(loss.numpy(), ref.item(), "loss")
    _close(g_w1.numpy(), w1t.grad.numpy(), "grad w1")
    _close(g_w2.numpy(), w2t.grad.numpy(), "grad w2")
