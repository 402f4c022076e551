"""The CUDA side of ``passes/build.py``: the Relax pipeline and the library packer.

``gpu_pipeline(target, on_fallback)`` is TVM's CUDA pipeline with this project's rewrites
before legalization (``passes/rewrite_grads.py``'s weight-gradient folds,
``passes/gpu_weight_grads.py``) and dlight's rules applied kernel by kernel, reporting the
kernels on which a rule failed. ``FatbinPacker`` embeds nvcc-compiled fatbins in the exported
library instead of CUDA source. ``build_side`` uses both for GPU targets, as does
``tools/bench_gpu.py``.
"""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

import tvm
from splitc import BuildError

__all__ = ["FatbinPacker", "gpu_pipeline"]


def _u64(n: int) -> bytes:
    return struct.pack("<Q", n)


class FatbinPacker:
    """``export_library(fpack_imports=...)``: embed nvcc-compiled fatbins instead of source.

    TVM 0.27's CUDA codegen keeps kernels as CUDA source (module format ``"cuda"``) that the
    runtime JIT-compiles with nvrtc when the library is loaded, i.e. on the board. Here each
    CUDA module's serialized bytes ``[kind "cuda"][u64 n][fmt "cuda"][fmap][u64 len][source]``
    become ``[fmt "fatbin"][fmap][fatbin]``, compiled now by nvcc for ``arch`` (SASS plus PTX
    for forward compatibility), and the blob is written as TVM's own C packer writes it.
    """

    def __init__(self, arch: str):
        self.arch = arch

    def _fatbin(self, code: str) -> bytes:
        num = self.arch.replace("sm_", "")
        with tempfile.TemporaryDirectory(prefix="splitc-nvcc-") as d:
            src, out = os.path.join(d, "k.cu"), os.path.join(d, "k.fatbin")
            Path(src).write_text(code)
            cmd = [
                shutil.which("nvcc") or "/usr/local/cuda/bin/nvcc",
                "--fatbin",
                "-O3",
                f"-gencode=arch=compute_{num},code=[sm_{num},compute_{num}]",
                "-o",
                out,
                src,
            ]
            r = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if r.returncode != 0:
                # the first error, not nvcc's last line ("Compilation terminated.")
                lines = r.stderr.strip().splitlines() or ["?"]
                tail = next((ln for ln in lines if " error" in ln), lines[-1])[:200]
                raise BuildError(
                    f"Build: nvcc failed for {self.arch} ({tail}); check the CUDA "
                    "toolkit supports this arch"
                )
            return Path(out).read_bytes()

    def __call__(self, mod, is_system_lib, prefix, workspace_dir):
        api = tvm.runtime._ffi_api
        blob = bytes(api.ModulePackImportsToTensor(mod).numpy())
        kind = _u64(4) + b"cuda"
        for cu in _cuda_modules(mod):
            src = cu.inspect_source("").encode()
            data = _u64(len(src)) + src
            at = blob.find(data)
            fmt_at = blob.rfind(kind, 0, at)  # fmt "cuda", then the fmap, then the source
            head = fmt_at - 20  # kind "cuda", u64 payload size, payload
            end = at + len(data)
            if (
                at < 0
                or head < 0
                or blob[head : head + 12] != kind
                or struct.unpack_from("<Q", blob, head + 12)[0] != end - fmt_at
            ):
                raise BuildError(
                    "Build: unexpected CUDA module layout in TVM's library blob; "
                    "report the TVM version"
                )
            fb = self._fatbin(src.decode())
            payload = _u64(6) + b"fatbin" + blob[fmt_at + 12 : at] + _u64(len(fb)) + fb
            blob = blob[: head + 12] + _u64(len(payload)) + payload + blob[end:]
        blob = _u64(len(blob) - 8) + blob[8:]
        c = api.ModulePackImportsToC(mod, is_system_lib, prefix)
        start = c.index("__tvm_ffi__library_bin[", c.index("const unsigned char"))
        body_end = c.index("};", start)
        rows = ",\n".join(
            ",".join(f"0x{v:02x}" for v in blob[i : i + 20]) for i in range(0, len(blob), 20)
        )
        c = c[:start] + f"__tvm_ffi__library_bin[{len(blob)}] = {{\n" + rows + ",\n" + c[body_end:]
        path = os.path.join(workspace_dir, f"{prefix}devc.c")
        Path(path).write_text(c)
        return path


def _cuda_modules(mod) -> list:
    out, stack = [], list(mod.imports)
    while stack:
        m = stack.pop()
        if m.kind == "cuda":
            out.append(m)
        stack.extend(m.imports)
    return out


@tvm.transform.module_pass(opt_level=0, name="GPUWeightGrads")
def _GPU_WEIGHT_GRADS(mod, _ctx):
    """``passes/gpu_weight_grads.py``: conv weight gradients as an im2col gather and one
    batched GEMM of partial sums (dlight tiles only the outputs of TVM's form)."""
    from splitc.passes.gpu_weight_grads import legalize_gpu_weight_grads

    return legalize_gpu_weight_grads(mod)


@tvm.transform.module_pass(opt_level=0, name="GPUMatmulWeightGrads")
def _GPU_MATMUL_WEIGHT_GRADS(mod, _ctx):
    """``passes/rewrite_grads.py``'s weight-gradient folds only: the weight gradient of
    ``x @ W.T`` as one 2-D matmul over B x S rows instead of a batched matmul into a (B, K, N)
    intermediate and its sum over the batch (GPT-2 b8 on an H100: three such sums took 0.7 of
    2.7 ms of kernels)."""
    from splitc.passes.rewrite_grads import rewrite_grads

    return rewrite_grads(mod, weight_grads_only=True)[0]


def gpu_pipeline(target: tvm.target.Target, on_fallback=None) -> tvm.transform.Pass:
    """TVM's CUDA pipeline with dlight rules that cannot abort the build.

    In 0.27 ``dl.gpu.Reduction`` asserts on some backward kernels (``detect_dominant_read`` on
    the fused nll_loss backward) and makes schedules that lowering rejects for others; such a
    rule now falls through to the next one, ending with ``Fallback``, instead of failing the
    whole compile. ``on_fallback(KernelFallback)`` is called once per kernel on which a rule
    failed, naming the rule that scheduled it instead and the failures.
    """
    from splitc.passes.build import _why as why  # a TVM error's informative line
    from splitc.passes.schedules import _SCHEDULED_ATTRS, KernelFallback
    from tvm import s_tir
    from tvm.relax.backend.cuda import pipeline as cp
    from tvm.s_tir import dlight as dl

    # the first lowering steps of the TIR pipeline: a schedule they reject (a cross-thread
    # reduction over max_pool2d_backward's select combiner: "No matched reducer") would abort
    # the whole build later, so such a rule counts as not applicable
    check = tvm.transform.Sequential(
        [s_tir.transform.CanonicalizeLoop(), s_tir.transform.LowerCrossThreadReduction()]
    )
    rules = [
        dl.gpu.Matmul(),
        dl.gpu.GEMV(),
        dl.gpu.Reduction(),
        dl.gpu.GeneralReduction(),
        dl.gpu.Fallback(),
    ]

    def schedule(func, tgt, name):
        failed = []
        for rule in rules:
            try:
                space = rule.apply(func, tgt, False)
                if space is None:
                    continue
                space = space if isinstance(space, list) else [space]
                for sch in space:
                    check(sch.mod)
            except Exception as e:  # noqa: BLE001 - try the next rule
                failed.append(f"{type(rule).__name__}: {why(e)}")
                continue
            if failed and on_fallback is not None:
                on_fallback(KernelFallback(name, type(rule).__name__, "; ".join(failed)))
            return space[0].mod["main"].with_attr("tirx.is_scheduled", True)
        return None

    @tvm.transform.module_pass(opt_level=0, name="SplitcGPUSchedule")
    def apply_rules(mod, _ctx):
        """dlight's ApplyDefaultSchedule, kernel by kernel, with the failures reported."""
        updates = {}
        for gv, func in mod.functions_items():
            if not isinstance(func, tvm.tirx.PrimFunc) or (
                func.attrs is not None
                and any(k in func.attrs and bool(func.attrs[k]) for k in _SCHEDULED_ATTRS)
            ):
                continue  # tuned (MetaSchedule records): keep it
            tgt = func.attrs["target"] if func.attrs and "target" in func.attrs else target
            new = schedule(func, tgt, gv.name_hint)
            if new is not None:
                updates[gv] = new
        for gv, func in updates.items():
            mod[gv] = func
        return mod

    legalize = cp.legalize_passes(target)[:-1]  # all but TVM's ApplyDefaultSchedule
    return tvm.transform.Sequential(
        cp.library_dispatch_passes(target)
        + [_GPU_MATMUL_WEIGHT_GRADS, _GPU_WEIGHT_GRADS]
        + legalize
        + [apply_rules]
        + cp.dataflow_lower_passes(target)
        + cp.finalize_passes(target)
    )
