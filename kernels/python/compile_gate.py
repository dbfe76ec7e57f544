"""Compile gate: build every Triton kernel for sm_80 / sm_90 without a GPU and check
register, shared-memory and spill figures from ``cuobjdump --dump-resource-usage``.

The kernels are compiled with ``triton.compile(ASTSource(...), target=GPUTarget(...))``
using exactly the block configs the launchers use (``FWD_CONFIGS``, ``COMBINE_CONFIG``,
``BWD_CONFIGS``). Argument specialisation mirrors the runtime JIT for a typical call:
pointers and the H-sized ints/strides divisible by 16.

The kernel modules are loaded from their files as private modules with the interpreter
forced off: a test session may already hold interpreted copies (TRITON_INTERPRET=1
decorates kernels at import time), which ASTSource cannot compile.
"""
from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import types
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # explicit: silences triton's warning

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

_HERE = Path(__file__).resolve().parent
_GATE_PKG = "_r1r_gate"
# Per-SM limits: dynamic shared memory per block and registers per thread.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}
MAX_REGS = 255
TARGETS = (80, 90)
_TL = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}
_TORCH = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load_kernel_module(name: str):
    """Import ``kernels/python/<name>.py`` fresh with TRITON_INTERPRET off (real JITFunctions)."""
    saved = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "0"
    # A bare package over kernels/python/ (its __init__ is not run), so the kernel files' relative
    # imports of each other resolve to fresh copies too.
    for key in [k for k in sys.modules if k == _GATE_PKG or k.startswith(_GATE_PKG + ".")]:
        del sys.modules[key]
    pkg = types.ModuleType(_GATE_PKG)
    pkg.__path__ = [str(_HERE)]
    sys.modules[_GATE_PKG] = pkg
    try:
        spec = importlib.util.spec_from_file_location(f"{_GATE_PKG}.{name}", _HERE / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
    finally:
        if saved is None:
            os.environ.pop("TRITON_INTERPRET", None)
        else:
            os.environ["TRITON_INTERPRET"] = saved
    return mod


@dataclass
class KernelCase:
    name: str
    fn: object
    types: dict  # arg name -> triton type string, for the non-constexpr args
    constexprs: dict
    num_warps: int
    num_stages: int
    divisible: tuple = ()  # arg names specialised as divisible by 16


def _float_args(*names):
    return {n: "fp32" for n in names}


def _variants(dt: str):
    """``(name suffix, DOT_PREC, SCALE_DZ, kinds)`` per operand dtype: fp32 in both TF32
    modes (torch's switch picks one at launch), fp16's backward with its ∂z scaling (its
    forward is bf16's code with another load type, so only the backward is gated)."""
    if dt == "fp32":
        return [("fp32", "ieee", False, ("forward", "backward")),
                ("fp32-tf32", "tf32", False, ("forward", "backward"))]
    if dt == "fp16":
        return [("fp16", "tf32", True, ("backward",))]
    return [(dt, "tf32", False, ("forward", "backward"))]


def cases(cc: int, dtypes=("bf16", "fp16", "fp32")) -> list[KernelCase]:
    """Every kernel variant the launchers can start, with that target's config."""
    fwd = load_kernel_module("triton_fwd")
    bwd = load_kernel_module("triton_bwd")
    cc_cfg = fwd.COMBINE_CONFIG
    out = []
    for dt in dtypes:
        t = _TL[dt]
        fc, bc = fwd.fwd_config(cc, _TORCH[dt]), bwd.bwd_config(cc, _TORCH[dt])
        ptypes = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "rows_ptr": "*i64",
                  "tgt_ptr": "*i64", "part_ptr": "*fp32", "n_rows": "i32", "V": "i32",
                  "H": "i32", "stride_h": "i32", "stride_w": "i32", "inv_temp": "fp32",
                  "tiles_per_split": "i32"}
        blocks = {k: fc[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H")}
        btypes = {"h_ptr": f"*{t}", "w_ptr": f"*{t}", "b_ptr": f"*{t}", "rows_ptr": "*i64",
                  "tgt_ptr": "*i64", "g_ptr": "*fp32", "lse_ptr": "*fp32", "dh_ptr": "*fp32",
                  "dw_ptr": "*fp32", "db_ptr": "*fp32", "n_rows": "i32", "V": "i32", "H": "i32",
                  "stride_h": "i32", "stride_w": "i32", "stride_dh": "i32", "stride_dw": "i32",
                  **_float_args("inv_temp", "filter_eps")}
        bblocks = {k: bc[k] for k in ("BLOCK_N", "BLOCK_V", "BLOCK_H", "GROUP")}
        for suffix, prec, scale_dz, kinds in _variants(dt):
            labels = ((("forward", True, True), ("forward-plain", False, False))
                      if "forward" in kinds else ())
            for label, bias, ent in labels:
                if label == "forward-plain" and suffix.endswith("-tf32"):
                    continue  # the second TF32 mode: one forward variant is enough
                out.append(KernelCase(
                    f"{label}[{suffix}]", fwd._fwd_partial_kernel, ptypes,
                    dict(HAS_BIAS=bias, ENTROPY=ent, DOT_PREC=prec, UPCAST_DOT=False, **blocks),
                    fc["num_warps"], fc["num_stages"],
                    divisible=("h_ptr", "w_ptr", "b_ptr", "rows_ptr", "tgt_ptr", "part_ptr",
                               "H", "stride_h", "stride_w")))
            blabels = ((("backward", False), ("backward-filtered", True))
                       if suffix == dt else (("backward", False),))
            for label, filt in blabels:
                out.append(KernelCase(
                    f"{label}[{suffix}]", bwd._bwd_kernel, btypes,
                    dict(HAS_BIAS=True, NEED_DH=True, NEED_DW=True, NEED_DB=True, FILTER=filt,
                         DOT_PREC=prec, UPCAST_DOT=False, SCALE_DZ=scale_dz, **bblocks),
                    bc["num_warps"], bc["num_stages"],
                    divisible=("h_ptr", "w_ptr", "b_ptr", "rows_ptr", "tgt_ptr", "g_ptr",
                               "lse_ptr", "dh_ptr", "dw_ptr", "db_ptr", "H", "stride_h",
                               "stride_w", "stride_dh", "stride_dw")))
    out += _row_cases(dtypes)
    ctypes = {"part_ptr": "*fp32", "rows_ptr": "*i64", "n_rows": "i32", "n_splits": "i32",
              **{p: "*fp32" for p in ("lp_ptr", "lse_ptr", "ent_ptr", "old_ptr", "adv_ptr",
                                      "ref_ptr", "tw_ptr", "loss_ptr", "g_ptr")},
              **_float_args("pc_lo", "pc_hi", "clip_lo", "clip_hi", "dual_c", "kl_coef")}
    for label, flags in (
            ("combine-logprobs", dict(STORE_LSE=True, ENTROPY=True, FUSED=False, PRECLIP=False,
                                      DUAL=False, KL_MODE=0)),
            ("combine-forward-only", dict(STORE_LSE=False, ENTROPY=False, FUSED=False,
                                          PRECLIP=False, DUAL=False, KL_MODE=0)),
            ("combine-fused-epilogue", dict(STORE_LSE=True, ENTROPY=True, FUSED=True,
                                            PRECLIP=True, DUAL=True, KL_MODE=3))):
        out.append(KernelCase(label, fwd._fwd_combine_kernel, ctypes,
                              dict(BLOCK=cc_cfg["BLOCK"], **flags), cc_cfg["num_warps"],
                              cc_cfg["num_stages"]))
    return out


def _row_cases(dtypes) -> list[KernelCase]:
    """The row-chunked path's row kernel: fp32 logits in, dz out in the GEMM operand dtype
    (bf16 or fp32; fp16 is refused by that backend)."""
    rows = load_kernel_module("triton_rows")
    cfg = rows.ROW_CONFIG
    out = []
    for dt in (d for d in dtypes if d in ("bf16", "fp32")):
        types = {"z_ptr": "*fp32", "dz_ptr": f"*{_TL[dt]}", "b_ptr": f"*{_TL[dt]}",
                 "rows_ptr": "*i64", "tgt_ptr": "*i64", "V": "i32", "stride_z": "i32",
                 "stride_dz": "i32",
                 **{p: "*fp32" for p in ("old_ptr", "adv_ptr", "ref_ptr", "tw_ptr", "lp_ptr",
                                         "ent_ptr", "loss_ptr")},
                 **_float_args("inv_temp", "pc_lo", "pc_hi", "clip_lo", "clip_hi", "dual_c",
                               "kl_coef")}
        for label, on in (("rows", True), ("rows-plain", False)):
            out.append(KernelCase(
                f"{label}[{dt}]", rows._row_kernel, types,
                dict(HAS_BIAS=on, ENTROPY=on, PRECLIP=on, DUAL=on, KL_MODE=3 if on else 0,
                     BLOCK_V=cfg["BLOCK_V"]), cfg["num_warps"], cfg["num_stages"],
                divisible=("z_ptr", "dz_ptr", "b_ptr", "stride_z", "stride_dz")))
    return out


def compile_case(case: KernelCase, cc: int):
    """``triton.compile`` for ``sm_<cc>``; returns the CompiledKernel."""
    fn = case.fn
    missing = [a for a in fn.arg_names if a not in case.types and a not in case.constexprs]
    if missing:
        raise KeyError(f"{case.name}: no type/constexpr given for kernel args {missing}")
    signature = {a: ("constexpr" if a in case.constexprs else case.types[a]) for a in fn.arg_names}
    attrs = {(fn.arg_names.index(a),): [["tt.divisibility", 16]] for a in case.divisible}
    src = ASTSource(fn=fn, signature=signature, constexprs=case.constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32),
                          options=dict(num_warps=case.num_warps, num_stages=case.num_stages))


def cuobjdump_path() -> Path:
    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"


_FIELD = re.compile(r"\b(REG|STACK|SHARED|LOCAL|CONSTANT\[\d+\]|TEXTURE|SURFACE|SAMPLER):(\d+)")


def resource_usage(cubin: bytes) -> dict:
    """Parse ``cuobjdump --dump-resource-usage`` of one cubin into {REG, STACK, SHARED, LOCAL}."""
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "kernel.cubin"
        path.write_bytes(cubin)
        res = subprocess.run([str(cuobjdump_path()), "--dump-resource-usage", str(path)],
                             capture_output=True, text=True, check=True)
    fields = {k: int(v) for k, v in _FIELD.findall(res.stdout)}
    for key in ("REG", "STACK", "SHARED", "LOCAL"):
        if key not in fields:
            raise RuntimeError(f"cuobjdump output lacks {key}:\n{res.stdout}")
    return fields


@dataclass
class GateRow:
    kernel: str
    cc: int
    regs: int
    shared_static: int
    shared_dynamic: int  # what the launch asks for (pipelining buffers live here)
    local: int
    stack: int
    num_warps: int
    num_stages: int

    @property
    def problems(self) -> list[str]:
        p = []
        if self.local > 0 or self.stack > 0:
            p.append(f"spills (LOCAL={self.local}, STACK={self.stack})")
        if self.regs > MAX_REGS:
            p.append(f"{self.regs} registers > {MAX_REGS}")
        smem = self.shared_static + self.shared_dynamic
        if smem > SMEM_LIMIT[self.cc]:
            p.append(f"shared memory {smem} B > sm_{self.cc} limit {SMEM_LIMIT[self.cc]} B")
        return p


def run_gate(targets=TARGETS, dtypes=("bf16", "fp16", "fp32"), only=None) -> list[GateRow]:
    """Compile and measure every case (``only``: a filter on case names)."""
    rows = []
    for cc in targets:
        for case in cases(cc, dtypes):
            if only is not None and not only(case.name):
                continue
            k = compile_case(case, cc)
            use = resource_usage(k.asm["cubin"])
            rows.append(GateRow(case.name, cc, use["REG"], use["SHARED"], int(k.metadata.shared),
                                use["LOCAL"], use["STACK"], case.num_warps, case.num_stages))
    return rows
