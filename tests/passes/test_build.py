"""Build: target names, Jetson/CUDA cross builds read back from the ELF, split.tar checks."""

from __future__ import annotations

import io
import json
import shutil
import struct
import tarfile

import numpy as np
import pytest
import split_models as S
from splitc import BuildError, PackageError
from splitc.passes.build import build_side, cuda_version, resolve_target
from splitc.passes.package import compile_split
from splitc.passes.split_module import split_module
from splitc.runtime.package import read_package
from splitc.runtime.tvm_halves import load_device_half, load_server_half

EM_AARCH64, EM_X86_64 = 183, 62  # ELF e_machine values
FATBIN_MAGIC = 0xBA55ED50


def elf_machine(data: bytes) -> int:
    assert data[:4] == b"\x7fELF"
    return struct.unpack_from("<H", data, 18)[0]


def fatbin_entries(data: bytes) -> list[tuple[str, int]]:
    """``[(kind, sm)]`` of the first fatbin in ``data``: kind "sass" (cubin ELF) or "ptx".

    Fatbin layout: u32 magic, u16 version, u16 header size, u64 size; then entries of
    u16 kind (1 PTX, 2 ELF), u16, u32 header size, u64 payload size, u32, u32, u16, u16,
    u32 sm (87 for sm_87), ...
    """
    i = data.find(struct.pack("<I", FATBIN_MAGIC))
    assert i >= 0, "no fatbin in the library"
    _, hs, size = struct.unpack_from("<HHQ", data, i + 4)
    out, j = [], i + hs
    while j < i + hs + size:
        kind, _, ehs, psize = struct.unpack_from("<HHIQ", data, j)
        sm = struct.unpack_from("<I", data, j + 28)[0]
        out.append(({1: "ptx", 2: "sass"}[kind], sm))
        j += ehs + psize
    return out


# -- target names -----------------------------------------------------------------------------
def test_tvmc_style_string_becomes_a_dict_target():
    t = resolve_target("cuda -arch=sm_90")
    assert t.kind.name == "cuda" and str(t.attrs["arch"]) == "sm_90"


@pytest.mark.parametrize(
    "tag", ["nvidia/jetson-orin-nano", "nvidia/jetson-agx-orin-32gb", "nvidia/jetson-agx-orin-64gb"]
)
def test_orin_tag_gets_the_orin_host_cpu(tag):
    t = resolve_target(tag)
    assert str(t.attrs["arch"]) == "sm_87"
    assert str(t.host.attrs["mcpu"]) == "cortex-a78ae"  # the tag says Xavier's "carmel"
    assert str(t.host.attrs["mtriple"]) == "aarch64-linux-gnu"
    # Xavier keeps its own (correct) carmel host
    assert str(resolve_target("nvidia/jetson-agx-xavier").host.attrs["mcpu"]) == "carmel"


def test_host_is_llvm_for_this_cpu():
    from tvm.target.codegen import llvm_get_system_cpu

    t = resolve_target("host")
    assert t.kind.name == "llvm" and str(t.attrs["mcpu"]) == str(llvm_get_system_cpu())


def test_json_target():
    t = resolve_target('{"kind": "llvm", "mcpu": "skylake"}')
    assert t.kind.name == "llvm" and str(t.attrs["mcpu"]) == "skylake"


@pytest.mark.parametrize("text", ["cuda -arch", "nosuchkind", "llvm -mcpu=x -bogus_option=3"])
def test_target_tvm_rejects_is_one_clear_line(text):
    with pytest.raises(
        BuildError,
        match=r"^Build: (TVM rejects target|cannot read option)"
        r"[^\n]*$",
    ):
        resolve_target(text)


@pytest.fixture(scope="module")
def cnn_split():
    _, onnx_bytes, x, y = S.make_model("cnn")
    mod = S.import_onnx(onnx_bytes)
    ops = S.op_names(mod)
    return mod, ops, x.numpy(), y.numpy()


def test_missing_cross_compiler(tmp_path, cnn_split):
    mod, ops, _, _ = cnn_split
    smod, _ = split_module(mod, S.manual_plan(mod, ops[:4]))
    with pytest.raises(
        BuildError,
        match=r"^Build: cross compiler 'no-such-gcc' not found for "
        r"the aarch64 device target; apt-get install",
    ):
        build_side(
            smod,
            "device",
            "nvidia/jetson-orin-nano",
            str(tmp_path / "d.so"),
            cross_compiler="no-such-gcc",
        )


needs_cuda_toolchain = pytest.mark.skipif(
    cuda_version() is None or shutil.which("aarch64-linux-gnu-gcc") is None,
    reason="needs nvcc and aarch64-linux-gnu-gcc (installed by .ci/run)",
)


@pytest.mark.slow
@needs_cuda_toolchain
def test_jetson_device_and_sm90_server_libraries(tmp_path):
    # the shipped demo CNN: nn.Sequential weights named "0.weight" (kernel identifiers must not
    # start with a digit) and a max_pool2d backward (a dlight rule that lowering rejects)
    from pathlib import Path

    from splitc.cost_models.link import Link
    from splitc.passes.pipeline import PlanConfig, annotate_model
    from splitc.passes.plan import Placement, Plan

    demo = Path(__file__).resolve().parents[2] / "tools" / "models" / "demo_cnn.onnx"
    mod, _, graph = annotate_model(PlanConfig(model=demo, batch_size=8))
    ops = [o.name for o in graph.ops]
    plan = Plan.build(
        graph,
        Placement.of(ops[: len(ops) // 2]),
        Link.parse("100Mbps"),
        "training",
        "manual",
        "p",
        "p",
    )
    # a `splitc tune --strategy knobs` directory (llvm records only) does not stop GPU sides
    knob_dir = tmp_path / "tuning"
    knob_dir.mkdir()
    (knob_dir / "knobs.json").write_text('{"schema": 1, "target": "llvm", "records": {}}')
    summary = compile_split(
        mod,
        plan,
        device_target="nvidia/jetson-orin-nano",
        server_target="cuda -arch=sm_90",
        output=tmp_path / "split.tar",
        tuning_records=knob_dir,
    )
    pkg = read_package(tmp_path / "split.tar")
    dev, srv = pkg.library("device"), pkg.library("server")
    assert elf_machine(dev) == EM_AARCH64
    assert sorted(set(fatbin_entries(dev))) == [("ptx", 87), ("sass", 87)]
    assert elf_machine(srv) == EM_X86_64
    assert sorted(set(fatbin_entries(srv))) == [("ptx", 90), ("sass", 90)]
    # kernels are compiled, not carried as source for the board to JIT
    assert b"#ifdef __CUDACC_RTC__" not in dev
    assert pkg.plan["versions"]["cuda"] == summary["cuda"] == cuda_version()
    assert pkg.manifest("device")["target"]["host"]["mcpu"] == "cortex-a78ae"
    # the max-pool backward that dlight's reduction rules cannot lower is reported, not fatal
    falls = [f for s in ("device", "server") for f in pkg.plan["schedules"][s]["fallbacks"]]
    pool = [f for f in falls if "max_pool2d_backward" in f["kernel"]]
    assert pool and all(f["rule"] == "Fallback" for f in pool)
    assert "No matched reducer" in pool[0]["reason"]
    assert sum(summary["sides"][s]["fallback_kernels"] for s in summary["sides"]) == len(falls)


# -- split.tar ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def packages(tmp_path_factory, cnn_split):
    mod, ops, _, _ = cnn_split
    d = tmp_path_factory.mktemp("pkg")
    a, b = d / "a.tar", d / "b.tar"
    compile_split(mod, S.manual_plan(mod, ops[:4]), output=a)
    compile_split(mod, S.manual_plan(mod, ops[:7]), output=b)
    return a, b


def _members(path) -> dict[str, bytes]:
    with tarfile.open(path) as t:
        return {m.name: t.extractfile(m).read() for m in t.getmembers()}


def _write(path, files: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))


def test_package_contents(packages, cnn_split):
    mod, ops, _, _ = cnn_split
    a, _ = packages
    pkg = read_package(a)
    plan = S.manual_plan(mod, ops[:4])
    assert pkg.plan_id == plan.plan_id
    assert pkg.plan["transport"] == [c.to_json() for c in plan.cut]
    assert sorted(pkg.plan["files"]) == [
        "device/lib.so",
        "device/manifest.json",
        "device/opt_state.npz",
        "device/params.npz",
        "ir/split.py",  # the split IRModule as TVMScript, for splitc tune split.tar
        "server/lib.so",
        "server/manifest.json",
        "server/opt_state.npz",
        "server/params.npz",
    ]
    params = pkg.arrays("device", "params.npz")
    values = S.param_values(mod)
    assert sorted(params) == sorted(
        pkg.manifest("device")["params"] + pkg.manifest("device")["state"]
    )
    for k, v in params.items():
        np.testing.assert_array_equal(v, values[k])


def test_halves_from_a_package_match_the_raw_functions(packages, cnn_split):
    mod, ops, x, y = cnn_split
    a, _ = packages
    d, s = load_device_half(a), load_server_half(a)
    smod, spec = split_module(mod, S.manual_plan(mod, ops[:4]))
    loss_raw, _, _ = S.split_step(S.compile_sides(smod), spec, S.param_values(mod), x, y)
    loss, g = s.step(d.forward([x]), y)
    assert loss == pytest.approx(loss_raw, rel=1e-6)
    assert [gi.shape for gi in g] == [c.shape for c in d.cut if c.grad]


def test_halves_follow_the_runtime_protocol_and_checkpoint(packages, cnn_split):
    from splitc.runtime.halves import DeviceHalf, ServerHalf

    _, _, x, y = cnn_split
    d, s = load_device_half(packages[0]), load_server_half(packages[0])
    assert isinstance(d, DeviceHalf) and isinstance(s, ServerHalf)
    for _ in range(2):
        _, g = s.step(d.forward([x]), y)
        d.backward(g)
    saved = (d.state_dict(), s.state_dict())
    # the step counter of SGD's state and the running stats are part of the checkpoint
    assert int(saved[0]["opt.0"]) == 2 and "state.b1.running_mean" in saved[0]
    d2, s2 = load_device_half(packages[0]), load_server_half(packages[0])
    d2.load_state_dict(saved[0])
    s2.load_state_dict(saved[1])
    loss_a, g_a = s.step(d.forward([x]), y)
    loss_b, g_b = s2.step(d2.forward([x]), y)
    d.backward(g_a)
    d2.backward(g_b)
    assert loss_a == loss_b
    for k, v in d.state_dict().items():
        np.testing.assert_array_equal(v, d2.state_dict()[k], err_msg=k)


def test_corrupt_tar(tmp_path, packages):
    bad = tmp_path / "bad.tar"
    bad.write_bytes(packages[0].read_bytes()[:5000])
    with pytest.raises(
        PackageError,
        match=r"^Package: .*bad.tar: (not a readable split.tar|"
        r".* is missing|no plan.json)[^\n]*$",
    ):
        read_package(bad)


def test_tampered_file(tmp_path, packages):
    files = _members(packages[0])
    lib = bytearray(files["server/lib.so"])
    lib[len(lib) // 2] ^= 0xFF
    files["server/lib.so"] = bytes(lib)
    _write(tmp_path / "t.tar", files)
    with pytest.raises(
        PackageError,
        match=r"sha256 of server/lib.so does not match plan.json "
        r"\(tampered or corrupt\); rebuild",
    ):
        load_server_half(tmp_path / "t.tar")


def test_halves_from_different_plans(tmp_path, packages):
    a, b = (_members(p) for p in packages)
    mixed = {k: v for k, v in a.items() if not k.startswith("server/")}
    mixed |= {k: v for k, v in b.items() if k.startswith("server/")}
    _write(tmp_path / "m.tar", mixed)
    with pytest.raises(
        PackageError,
        match=r"the server half belongs to plan '[0-9a-f]+', not "
        r"'[0-9a-f]+'; rebuild both halves from one plan",
    ):
        read_package(tmp_path / "m.tar")


def test_plan_from_another_model(tmp_path, packages):
    files = _members(packages[0])
    plan = json.loads(files["plan.json"])
    plan["model_hash"] = "another-model"
    files["plan.json"] = json.dumps(plan).encode()
    _write(tmp_path / "o.tar", files)
    with pytest.raises(
        PackageError,
        match=r"the device half was built for model 'm' but "
        r"plan.json is for 'another-model'",
    ):
        read_package(tmp_path / "o.tar")
    with pytest.raises(PackageError, match=r"plan is for model 'm', not 'other'; compile a plan"):
        read_package(packages[0], model_hash="other")


def test_edited_plan_json(tmp_path, packages):
    files = _members(packages[0])
    plan = json.loads(files["plan.json"])
    plan["transport"][0]["grad"] = not plan["transport"][0]["grad"]
    files["plan.json"] = json.dumps(plan).encode()
    _write(tmp_path / "e.tar", files)
    with pytest.raises(
        PackageError,
        match=r"plan.json differs from the plan the device half "
        r"was built with \(tampered\)",
    ):
        read_package(tmp_path / "e.tar")


def test_failed_compile_keeps_the_old_file(tmp_path, cnn_split):
    # fails inside build_side (after the split), with an older split.tar already in place
    mod, ops, _, _ = cnn_split
    out = tmp_path / "split.tar"
    out.write_bytes(b"old")
    with pytest.raises(BuildError, match="cross compiler 'no-such-gcc' not found"):
        compile_split(
            mod,
            S.manual_plan(mod, ops[:4]),
            device_target="nvidia/jetson-orin-nano",
            cross_compiler="no-such-gcc",
            output=out,
        )
    assert [p.name for p in tmp_path.iterdir()] == ["split.tar"]
    assert out.read_bytes() == b"old"


def test_cuda_target_without_nvcc(tmp_path, cnn_split, monkeypatch):
    import splitc.passes.build as B

    mod, ops, _, _ = cnn_split
    smod, _ = split_module(mod, S.manual_plan(mod, ops[:4]))
    monkeypatch.setattr(B, "cuda_version", lambda: None)
    with pytest.raises(BuildError, match=r"^Build: server target cuda needs nvcc \(CUDA toolkit\)"):
        build_side(smod, "server", "cuda -arch=sm_90", str(tmp_path / "s.so"))


def test_compile_failure_is_one_line(tmp_path, cnn_split):
    mod, ops, _, _ = cnn_split
    smod, _ = split_module(mod, S.manual_plan(mod, ops[:4]))
    # LLVM emits riscv64 code, then the host linker cannot link it: caught and reported
    with pytest.raises(
        BuildError,
        match=r"^Build: compiling the server half for llvm failed "
        r"\([^\n]*\); check the target and toolchain$",
    ):
        build_side(
            smod,
            "server",
            '{"kind": "llvm", "mtriple": "riscv64-unknown-linux-gnu"}',
            str(tmp_path / "s.so"),
        )
