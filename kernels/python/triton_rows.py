"""Triton row kernel of the row-chunked exact path (backend "triton-rows").

Given one chunk's fp32 logits ``h·Wᵀ`` (from a cuBLAS GEMM), one program per row does, in
two passes over the row: (1) bias, 1/τ, online log-sum-exp, entropy and the target logit,
then the StableReinforce epilogue (``_loss_epilogue``, the same code as the fused
forward) giving ``loss_t`` and ``g = w·dloss/dlp``; (2) ``dz = (g/τ)·(onehot − p)`` written
in the GEMM operand dtype, ready for the ∂h and ∂W GEMMs. Everything per row stays on the
GPU (no host sync per chunk). This module imports nothing from the package but the
fused forward's epilogue (see triton_fwd.py for why).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import KL_MODES, _loss_epilogue

# A row of V=151936 fp32 logits is 600 KB: it streams from L2/HBM twice. 4096-wide blocks
# at 8 warps are 16 fp32 values per thread and per array: no spills (compile gate).
ROW_CONFIG = dict(BLOCK_V=4096, num_warps=8, num_stages=1)
INTERPRET_ROW_CONFIG = dict(BLOCK_V=32, num_warps=1, num_stages=1)
_NEG_BIG = tl.constexpr(-1.0e30)


@triton.jit
def _row_kernel(z_ptr, dz_ptr, b_ptr, rows_ptr, tgt_ptr, old_ptr, adv_ptr, ref_ptr, tw_ptr,
                lp_ptr, ent_ptr, loss_ptr, V, stride_z, stride_dz, inv_temp,
                pc_lo, pc_hi, clip_lo, clip_hi, dual_c, kl_coef,
                HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr, PRECLIP: tl.constexpr,
                DUAL: tl.constexpr, KL_MODE: tl.constexpr, BLOCK_V: tl.constexpr):
    r = tl.program_id(0).to(tl.int64)
    row = tl.load(rows_ptr + r).to(tl.int64)
    tgt = tl.load(tgt_ptr + row).to(tl.int64)
    z_row = z_ptr + r * stride_z
    m = tl.full([], _NEG_BIG, tl.float32)
    s = tl.zeros([], tl.float32)
    u = tl.zeros([], tl.float32)
    zt = tl.zeros([], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        z = tl.where(ok, z * inv_temp, _NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        alpha = tl.exp(m - m_new)
        zc = z - m_new
        e = tl.exp(zc)
        if ENTROPY:  # p·z = 0 where p = 0 (a −inf logit), never 0·(−inf)
            u = alpha * (u + s * (m - m_new)) + tl.sum(tl.where(e > 0.0, e * zc, 0.0), axis=0)
        s = alpha * s + tl.sum(e, axis=0)
        m = m_new
        zt += tl.sum(tl.where(offs == tgt, z, 0.0), axis=0)
    log_s = tl.log(s)
    lse = m + log_s
    lp = zt - lse
    tl.store(lp_ptr + row, lp)
    if ENTROPY:
        tl.store(ent_ptr + row, log_s - u / s)
    old = tl.load(old_ptr + row)
    adv = tl.load(adv_ptr + row)
    tw = tl.load(tw_ptr + row)
    if KL_MODE > 0:
        ref = tl.load(ref_ptr + row)
    else:
        ref = lp
    loss_t, g = _loss_epilogue(lp, old, adv, ref, tw, pc_lo, pc_hi, clip_lo, clip_hi, dual_c,
                               kl_coef, PRECLIP, DUAL, KL_MODE)
    tl.store(loss_ptr + row, loss_t)
    gs = g * inv_temp
    dz_row = dz_ptr + r * stride_dz
    for v0 in range(0, V, BLOCK_V):
        offs = v0 + tl.arange(0, BLOCK_V)
        ok = offs < V
        z = tl.load(z_row + offs, mask=ok, other=0.0)
        if HAS_BIAS:
            z += tl.load(b_ptr + offs, mask=ok, other=0.0).to(tl.float32)
        p = tl.exp(z * inv_temp - lse)
        dz = gs * (tl.where(offs == tgt, 1.0, 0.0) - p)
        tl.store(dz_row + offs, dz.to(dz_ptr.dtype.element_ty), mask=ok)


def launch_rows(z, dz, bias, rows, targets, loss_args, out, *, temperature, entropy, config):
    """Run the row kernel on the chunk ``z`` [c, V] fp32 (rows ``rows`` of the batch).

    ``loss_args``: fp32 [N] ``old``, ``adv``, ``ref`` (or None), ``tok_w`` and the settings
    (``preclip`` (lo, hi) or None, ``clip`` (1−ε_lo, 1+ε_hi), ``dual_clip``, ``kl_coef``,
    ``kl_estimator``). ``out``: fp32 [N] ``lp``, ``entropy`` (if ``entropy``), ``loss_t``.
    Writes ``dz`` [c, V] (the GEMM operand dtype; may be ``z`` itself for fp32).
    """
    c, V = z.shape
    la = loss_args
    pre, dual = la.get("preclip"), la.get("dual_clip")
    kl_mode = (KL_MODES[la["kl_estimator"]] if la.get("ref") is not None
               and la.get("kl_coef", 0.0) > 0 else 0)
    dummy = out["lp"]
    _row_kernel[(c,)](
        z, dz, bias if bias is not None else dummy, rows, targets, la["old"], la["adv"],
        la["ref"] if kl_mode else dummy, la["tok_w"], out["lp"],
        out["entropy"] if entropy else dummy, out["loss_t"], V, z.stride(0), dz.stride(0),
        1.0 / temperature, float(pre[0]) if pre else 0.0, float(pre[1]) if pre else 0.0,
        float(la["clip"][0]), float(la["clip"][1]), float(dual) if dual else 0.0,
        float(la.get("kl_coef", 0.0)),
        HAS_BIAS=bias is not None, ENTROPY=entropy, PRECLIP=pre is not None,
        DUAL=dual is not None, KL_MODE=kl_mode, BLOCK_V=config["BLOCK_V"],
        num_warps=config["num_warps"], num_stages=config["num_stages"])


def row_config(device: torch.device) -> dict:
    return dict(ROW_CONFIG if device.type == "cuda" else INTERPRET_ROW_CONFIG)
