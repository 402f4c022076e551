"""Every error SplitModule and the split.tar reader raise on bad input, one line each."""

from __future__ import annotations

import io
import json
import tarfile
from dataclasses import replace

import numpy as np
import pytest
import split_models as S
from splitc import BuildError, InputError, PackageError, TransportError, UnsupportedError
from splitc.passes.package import compile_split
from splitc.passes.plan import CutTensor, Placement
from splitc.passes.split_module import split_module
from splitc.runtime.package import read_package
from splitc.runtime.tvm_halves import load_device_half, load_server_half
from tvm import relax
from tvm.relax import op as R


def _tiny(relu6=False, with_resize=False):
    """main(x[2,4], w1[4,4], w2[4,3]) = matmul(act(matmul(x, w1)), w2)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((2, 4), "float32"))
    w1 = relax.Var("w1", relax.TensorType((4, 4), "float32"))
    w2 = relax.Var("w2", relax.TensorType((4, 3), "float32"))
    with bb.function("main", [x, w1, w2], {"num_input": 1}):
        with bb.dataflow():
            lv = bb.emit(R.matmul(x, w1), "lv")
            act = R.clip(lv, 0.0, 6.0) if relu6 else R.nn.relu(lv)
            lv1 = bb.emit(act, "lv1")
            if with_resize:
                lv1 = bb.emit(R.reshape(lv1, (2, 1, 2, 2)), "lv2")
                lv1 = bb.emit(R.image.resize2d(lv1, (2, 2)), "lv3")
                lv1 = bb.emit(R.reshape(lv1, (2, 4)), "lv4")
            gv = bb.emit_output(R.matmul(lv1, w2), "gv")
        bb.emit_func_output(gv)
    return bb.get()


def test_unknown_device_op():
    mod = _tiny()
    plan = replace(S.manual_plan(mod, ["lv"]), placement=Placement.of(["lv", "conv9"]))
    with pytest.raises(BuildError, match=r"^SplitModule: plan places unknown ops \['conv9'\]"):
        split_module(mod, plan)


def test_unknown_cut_tensor():
    mod = _tiny()
    plan = S.manual_plan(mod, ["lv"])
    plan = replace(plan, cut=(CutTensor("lv77", (2, 4), "float32", 32, True),))
    with pytest.raises(BuildError, match=r"^SplitModule: cut tensor 'lv77' is not in the model"):
        split_module(mod, plan)


def test_cut_with_the_wrong_shape():
    mod = _tiny()
    plan = S.manual_plan(mod, ["lv"])
    plan = replace(plan, cut=(replace(plan.cut[0], shape=(4, 2)),))
    with pytest.raises(BuildError, match=r"^SplitModule: device_forward sends \[\(\(2, 4\), "):
        split_module(mod, plan)


def test_main_without_a_dataflow_block():
    mod = relax.transform.ToNonDataflow()(_tiny())
    with pytest.raises(BuildError, match=r"^SplitModule: main must hold exactly one dataflow"):
        split_module(mod, S.manual_plan(_tiny(), ["lv"]))


@pytest.mark.parametrize(
    "kw,msg",
    [
        ({"loss": "hinge"}, r"^SplitModule: unknown loss 'hinge'; use one of cross-entropy"),
        ({"optimizer": "lion"}, r"^SplitModule: unknown optimizer 'lion'; use one of sgd"),
    ],
)
def test_bad_loss_or_optimizer(kw, msg):
    mod = _tiny()
    with pytest.raises(InputError, match=msg):
        split_module(mod, S.manual_plan(mod, ["lv"]), **kw)


def test_relu6_clip_trains_and_resize_is_reported():
    mod = _tiny(relu6=True)
    split_module(mod, S.manual_plan(mod, ["lv"]))  # clip -> minimum(maximum): has gradients
    mod = _tiny(with_resize=True)
    with pytest.raises(
        UnsupportedError,
        match=r"^Gradient: server half: no gradient for relax.image.resize2d \(lv3\); register",
    ):
        split_module(mod, S.manual_plan(mod, ["lv"]))


def test_inference_plan_with_device_outputs():
    mod = _tiny()
    plan = S.manual_plan(mod, ["lv", "lv1", "gv"], objective="inference")
    with pytest.raises(BuildError, match=r"inference plan with model outputs made on the device"):
        split_module(mod, plan)


# -- split.tar reader and runtime halves ------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_tar(tmp_path_factory):
    mod = _tiny()
    out = tmp_path_factory.mktemp("tiny") / "split.tar"
    rng = np.random.default_rng(0)
    params = {
        "w1": rng.standard_normal((4, 4)).astype("float32"),
        "w2": rng.standard_normal((4, 3)).astype("float32"),
    }
    compile_split(mod, S.manual_plan(mod, ["lv"]), output=out, params=params)
    return out


def test_missing_initial_values(tmp_path):
    mod = _tiny()  # built by hand: no "params" attr with initial values
    with pytest.raises(BuildError, match=r"^Package: no initial value for parameters \['w1'\]"):
        compile_split(mod, S.manual_plan(mod, ["lv"]), output=tmp_path / "s.tar")
    assert not (tmp_path / "s.tar").exists()


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _write(path, files: dict[str, bytes], link: str | None = None) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            t.addfile(info)


def test_no_such_file(tmp_path):
    with pytest.raises(PackageError, match=r"^Package: .*nope.tar: no such file; check the path"):
        read_package(tmp_path / "nope.tar")


@pytest.mark.parametrize(
    "edit,msg",
    [
        (lambda f: f.pop("plan.json"), r"no plan.json; the file is corrupt"),
        (lambda f: f.update({"plan.json": b"{"}), r"plan.json is unreadable; the file is corrupt"),
        (lambda f: f.pop("server/manifest.json"), r"server/manifest.json missing or unreadable"),
        (lambda f: f.pop("device/params.npz"), r"device/params.npz is missing; rebuild"),
        (lambda f: f.update({"device/extra.so": b"x"}), r"unlisted files \['device/extra.so'\]"),
    ],
)
def test_broken_package(tmp_path, tiny_tar, edit, msg):
    files = _members(tiny_tar)
    edit(files)
    _write(tmp_path / "b.tar", files)
    with pytest.raises(PackageError, match=msg):
        read_package(tmp_path / "b.tar")


def test_link_member_is_refused(tmp_path, tiny_tar):
    _write(tmp_path / "l.tar", _members(tiny_tar), link="device/evil")
    with pytest.raises(
        PackageError, match=r"unsafe member 'device/evil'; the archive was tampered"
    ):
        read_package(tmp_path / "l.tar")


def test_transport_errors(tiny_tar):
    d, s = load_device_half(tiny_tar), load_server_half(tiny_tar)
    x = np.ones((2, 4), "float32")
    y = np.zeros((2,), "int64")
    with pytest.raises(TransportError, match=r"^device: backward before forward"):
        d.backward([np.ones((2, 4), "float32")])
    with pytest.raises(TransportError, match=r"^server: cut tensors 'lv' is float64\[2, 4\], "):
        s.step([np.ones((2, 4))], y)
    with pytest.raises(TransportError, match=r"^server: got 2 cut tensors, the transport spec"):
        s.step([x, x], y)
    _, g = s.step(d.forward([x]), y)
    with pytest.raises(TransportError, match=r"^device: cut gradients 'lv' is float32\[4, 2\]"):
        d.backward([np.ones((4, 2), "float32")])
    d.backward(g)
    assert json.loads(json.dumps(d.state_dict()["param.w1"].tolist()))  # plain arrays
