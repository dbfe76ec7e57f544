"""Triton forward kernels: token log-probs (+ entropy) and the StableReinforce epilogue.

Two launches, both O(N) in what they store (SPEC §6):

1. ``_fwd_partial_kernel`` — grid ``(row blocks, vocab splits)``. A program owns
   BLOCK_N (active) rows and loops over its share of the vocabulary in BLOCK_V tiles;
   each tile is ``h·Wᵀ`` accumulated over H in BLOCK_H steps into fp32 (``tl.dot``),
   ``+ bias``, ``× 1/τ``, folded into an online log-sum-exp (running max ``m``, sum ``s``),
   an online entropy accumulator ``u = Σ e^{z-m}(z-m)`` and the target logit. It writes
   4 fp32 numbers per (row, split). Splitting the vocabulary keeps a GPU busy when the
   batch has few rows (e.g. 2 048 response tokens = 32 row blocks for 132 SMs).
2. ``_fwd_combine_kernel`` — merges the splits into ``lse``, ``lp`` and entropy and, in
   fused-loss mode, runs :func:`_loss_epilogue` (the Triton twin of
   ``loss_math.loss_and_grad``), writing ``loss_t`` and ``g = w·dloss/dlp`` per row.

Rows are addressed through an int64 index array (``rows``) holding the active rows
only, so masked rows (ignored targets, padding, prompt tokens) cost no GEMM work and
their outputs stay exactly 0. All pointer offsets are int64 (V·H > 2^31 for real
lm_heads). This module imports nothing from the package so that
``kernels/python/compile_gate.py`` can load it standalone with the interpreter off.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Block configs per (target, operand width). Why these: a 64×128 fp32 logit tile is 32
# registers/thread at 8 warps and the bf16 operand tiles (64×64 + 128×64)·2 B = 24 KB per
# pipeline stage, so 3 stages fit easily in shared memory on sm_80 (163 KB) and sm_90
# (227 KB). fp32 operands double register pressure on sm_80 (no wgmma): 64×128×64 spilled
# there (cuobjdump STACK 248 B), so sm_80/fp32 uses 64×64×32. The compile gate
# (kernels/python/compile_gate.py) checks exactly these for spills, registers and shared memory.
FWD_CONFIGS = {
    (80, "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    (90, "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
    (80, "fp32"): dict(BLOCK_N=64, BLOCK_V=64, BLOCK_H=32, num_warps=8, num_stages=3),
    (90, "fp32"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, num_warps=8, num_stages=3),
}
# The combine/epilogue kernel is elementwise over rows.
COMBINE_CONFIG = dict(BLOCK=256, num_warps=4, num_stages=1)
# TRITON_INTERPRET=1 (CPU tests): the interpreter runs numpy per block, small is fast.
INTERPRET_FWD_CONFIG = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, num_warps=1, num_stages=1)

# Below any real logit, but finite: the online updates multiply s·(m_old − m_new), which
# would be 0·(−inf) = NaN with a −inf start.
_NEG_BIG = tl.constexpr(-1.0e30)
KL_MODES = {None: 0, "k1": 1, "k2": 2, "k3": 3}


def width_key(dtype: torch.dtype) -> str:
    return "fp32" if dtype == torch.float32 else "16bit"


def _family(cc: int) -> int:
    # sm_90/sm_100 have 227 KB of shared memory per block; everything else (sm_80: 163 KB,
    # sm_86/89/120: 99 KB) gets the sm_80 configs, which use at most 57 KB.
    return 90 if 90 <= cc < 120 else 80


def fwd_config(cc: int | None, dtype: torch.dtype) -> dict:
    """Config for compute capability ``cc`` (80, 90, ...; ``None`` = interpreter)."""
    if cc is None:
        return dict(INTERPRET_FWD_CONFIG)
    return dict(FWD_CONFIGS[(_family(cc), width_key(dtype))])


def upcast_dot(t: torch.Tensor) -> bool:
    """True when the kernels must feed ``tl.dot`` fp32 copies of 16-bit operands.

    Triton 3.9's interpreter multiplies bf16 tiles as their raw uint16 bit patterns
    (garbage), so on CPU (interpreter) 16-bit tiles are upcast first. bf16→fp32 is exact
    and the GPU's tensor cores also form exact products with fp32 accumulation, so the
    interpreter still checks the GPU arithmetic. Never set on CUDA.
    """
    return t.device.type != "cuda" and t.dtype != torch.float32


def dot_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` input precision: fp32 inputs follow torch's TF32 switch for matmuls
    (``torch.backends.cuda.matmul``), as cuBLAS would; 16-bit products are exact anyway."""
    if dtype != torch.float32:
        return "tf32"
    return "tf32" if tf32_enabled() else "ieee"


def tf32_enabled() -> bool:
    """torch's TF32 setting for CUDA matmuls, through whichever API set it (torch ≥ 2.9
    refuses to read the legacy flag once the new one was used)."""
    m = torch.backends.cuda.matmul
    prec = getattr(m, "fp32_precision", None)
    if prec in ("tf32", "ieee"):
        return prec == "tf32"
    try:
        return bool(m.allow_tf32)
    except RuntimeError:
        return False


@triton.jit
def logit_tile(h_rows, w_rows, b_ptr, offs_v, row_ok, col_ok, H, HAS_BIAS: tl.constexpr,
               BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
               DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``h·Wᵀ (+ b)`` for one [BLOCK_N, BLOCK_V] tile, accumulated over H in fp32 (before
    1/τ). Shared by the forward and the backward (which recomputes the tile)."""
    acc = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    for k0 in range(0, H, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_ok = offs_k < H
        hb = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wb = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        if UPCAST_DOT:  # interpreter only, see upcast_dot()
            hb, wb = hb.to(tl.float32), wb.to(tl.float32)
        acc = tl.dot(hb, tl.trans(wb), acc, input_precision=DOT_PREC)
    if HAS_BIAS:
        acc = acc + tl.load(b_ptr + offs_v, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def _fwd_partial_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, part_ptr,
                        n_rows, V, H, stride_h, stride_w, inv_temp, tiles_per_split,
                        HAS_BIAS: tl.constexpr, ENTROPY: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                        DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_s = tl.program_id(1)
    n_splits = tl.num_programs(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    h_rows = h_ptr + rows[:, None] * stride_h

    m = tl.full([BLOCK_N], _NEG_BIG, tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    u = tl.zeros([BLOCK_N], tl.float32)
    zt = tl.zeros([BLOCK_N], tl.float32)
    v_start = pid_s * tiles_per_split * BLOCK_V
    v_end = tl.minimum(V, v_start + tiles_per_split * BLOCK_V)
    for v0 in range(v_start, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        col_ok = offs_v < V
        w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w
        acc = logit_tile(h_rows, w_rows, b_ptr, offs_v, row_ok, col_ok, H, HAS_BIAS,
                         BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST_DOT)
        # Padded columns get a finite floor, so e = exp(z - m) is exactly 0 there and
        # e·(z - m) is 0, not 0·inf = NaN.
        z = tl.where(col_ok[None, :], acc * inv_temp, _NEG_BIG)
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)
        zc = z - m_new[:, None]
        e = tl.exp(zc)
        if ENTROPY:
            # Rebase Σ e^{z-m}(z-m) onto the new max: no large-|z| cancellation later.
            # A −inf logit (e.g. from a bias) has p = 0 and contributes p·z = 0, not 0·−inf.
            u = alpha * (u + s * (m - m_new)) + tl.sum(tl.where(e > 0.0, e * zc, 0.0), axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
        zt += tl.sum(tl.where(offs_v[None, :] == tgt[:, None], z, 0.0), axis=1)

    plane = n_splits * n_rows
    out = part_ptr + pid_s * n_rows + offs_n
    tl.store(out, m, mask=row_ok)
    tl.store(out + plane, s, mask=row_ok)
    tl.store(out + 2 * plane, u, mask=row_ok)
    tl.store(out + 3 * plane, zt, mask=row_ok)


@triton.jit
def _loss_epilogue(lp, old, adv, ref, w, pc_lo, pc_hi, clip_lo, clip_hi, dual_c, kl_coef,
                   PRECLIP: tl.constexpr, DUAL: tl.constexpr, KL_MODE: tl.constexpr):
    """Per-token StableReinforce loss and ``g = w·dloss/dlp``; mirrors loss_and_grad."""
    d = lp - old
    if PRECLIP:
        in_band = (d >= pc_lo) & (d <= pc_hi)
        d = tl.minimum(tl.maximum(d, pc_lo), pc_hi)
    ratio = tl.exp(d)
    surr1 = ratio * adv
    surr2 = tl.minimum(tl.maximum(ratio, clip_lo), clip_hi) * adv
    loss = -tl.minimum(surr1, surr2)
    # The clipped branch is flat where it is strictly smaller (ties: equal gradients).
    dloss = tl.where(surr2 < surr1, 0.0, -adv * ratio)
    if DUAL:
        dual = (adv < 0) & (loss > -dual_c * adv)
        loss = tl.where(dual, -dual_c * adv, loss)
        dloss = tl.where(dual, 0.0, dloss)
    if PRECLIP:
        dloss = tl.where(in_band, dloss, 0.0)
    if KL_MODE == 1:  # k1: lp - ref
        loss += kl_coef * (lp - ref)
        dloss += kl_coef
    elif KL_MODE == 2:  # k2: ½ (ref - lp)²
        log_r = ref - lp
        loss += kl_coef * 0.5 * log_r * log_r
        dloss += kl_coef * (-log_r)
    elif KL_MODE == 3:  # k3: e^{ref-lp} - (ref-lp) - 1
        log_r = ref - lp
        er = tl.exp(log_r)
        loss += kl_coef * (er - log_r - 1.0)
        dloss += kl_coef * (1.0 - er)
    return loss, w * dloss


@triton.jit
def _fwd_combine_kernel(part_ptr, rows_ptr, n_rows, n_splits,
                        lp_ptr, lse_ptr, ent_ptr,
                        old_ptr, adv_ptr, ref_ptr, tw_ptr, loss_ptr, g_ptr,
                        pc_lo, pc_hi, clip_lo, clip_hi, dual_c, kl_coef,
                        STORE_LSE: tl.constexpr, ENTROPY: tl.constexpr, FUSED: tl.constexpr,
                        PRECLIP: tl.constexpr, DUAL: tl.constexpr, KL_MODE: tl.constexpr,
                        BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < n_rows
    rows = tl.load(rows_ptr + offs, mask=ok, other=0).to(tl.int64)
    plane = n_splits * n_rows
    M = tl.full([BLOCK], _NEG_BIG, tl.float32)
    S = tl.zeros([BLOCK], tl.float32)
    U = tl.zeros([BLOCK], tl.float32)
    ZT = tl.zeros([BLOCK], tl.float32)
    for sp in range(0, n_splits):
        p = part_ptr + sp * n_rows + offs
        mk = tl.load(p, mask=ok, other=_NEG_BIG)
        sk = tl.load(p + plane, mask=ok, other=0.0)
        M_new = tl.maximum(M, mk)
        a = tl.exp(M - M_new)
        b = tl.exp(mk - M_new)
        if ENTROPY:
            uk = tl.load(p + 2 * plane, mask=ok, other=0.0)
            U = a * (U + S * (M - M_new)) + b * (uk + sk * (mk - M_new))
        S = a * S + b * sk
        M = M_new
        ZT += tl.load(p + 3 * plane, mask=ok, other=0.0)
    # Padded lanes: S = 1 and M = 0 keep every later op finite (no 0·inf, no exp(1e30)).
    S = tl.where(ok, S, 1.0)
    M = tl.where(ok, M, 0.0)
    log_s = tl.log(S)
    lse = M + log_s
    lp = ZT - lse
    tl.store(lp_ptr + rows, lp, mask=ok)
    if STORE_LSE:
        tl.store(lse_ptr + rows, lse, mask=ok)
    if ENTROPY:
        tl.store(ent_ptr + rows, log_s - U / S, mask=ok)
    if FUSED:
        old = tl.load(old_ptr + rows, mask=ok, other=0.0)
        adv = tl.load(adv_ptr + rows, mask=ok, other=0.0)
        tw = tl.load(tw_ptr + rows, mask=ok, other=0.0)
        if KL_MODE > 0:
            ref = tl.load(ref_ptr + rows, mask=ok, other=0.0)
        else:
            ref = lp
        loss_t, g = _loss_epilogue(lp, old, adv, ref, tw, pc_lo, pc_hi, clip_lo, clip_hi,
                                   dual_c, kl_coef, PRECLIP, DUAL, KL_MODE)
        tl.store(loss_ptr + rows, loss_t, mask=ok)
        tl.store(g_ptr + rows, g, mask=ok)


def pick_splits(n_rows: int, n_tiles: int, block_n: int, sm_count: int | None) -> tuple[int, int]:
    """(splits, tiles_per_split): enough programs to fill the GPU, every split non-empty."""
    row_blocks = triton.cdiv(max(n_rows, 1), block_n)
    target = 4 * sm_count if sm_count else 2
    splits = max(1, min(n_tiles, triton.cdiv(target, row_blocks)))
    per = triton.cdiv(n_tiles, splits)
    return triton.cdiv(n_tiles, per), per


def launch_forward(h, weight, bias, targets, rows, *, temperature, config, entropy,
                   store_lse, loss_args=None, splits=None, sm_count=None):
    """Run both forward kernels on the active ``rows`` (int64 indices into ``h``).

    ``loss_args`` (fused mode) = dict(old, adv, ref, tok_w: fp32 [N]; preclip (lo, hi) or
    None; clip (1-ε_lo, 1+ε_hi); dual_clip or None; kl_coef; kl_estimator). Returns a dict
    of fp32 [N] tensors, zero outside ``rows``: lp, and lse / entropy / loss_t / g when
    requested (lse and entropy absent when not).
    """
    N, H = h.shape
    V = weight.shape[0]
    dev = h.device
    f32 = dict(device=dev, dtype=torch.float32)
    n = rows.numel()
    out = {"lp": torch.zeros(N, **f32)}
    out["lse"] = torch.zeros(N, **f32) if store_lse else None
    out["entropy"] = torch.zeros(N, **f32) if entropy else None
    fused = loss_args is not None
    if fused:
        out["loss_t"] = torch.zeros(N, **f32)
        out["g"] = torch.zeros(N, **f32)
    if n == 0:
        return out
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    n_tiles = triton.cdiv(V, bv)
    if splits is None:
        n_splits, per = pick_splits(n, n_tiles, bn, sm_count)
    else:
        per = triton.cdiv(n_tiles, max(1, min(splits, n_tiles)))
        n_splits = triton.cdiv(n_tiles, per)
    part = torch.empty(4, n_splits, n, **f32)
    dummy = out["lp"]
    _fwd_partial_kernel[(triton.cdiv(n, bn), n_splits)](
        h, weight, bias if bias is not None else dummy, rows, targets, part,
        n, V, H, h.stride(0), weight.stride(0), 1.0 / temperature, per,
        HAS_BIAS=bias is not None, ENTROPY=entropy, BLOCK_N=bn, BLOCK_V=bv,
        BLOCK_H=config["BLOCK_H"], DOT_PREC=dot_precision(h.dtype), UPCAST_DOT=upcast_dot(h),
        num_warps=config["num_warps"], num_stages=config["num_stages"])

    la = loss_args or {}
    pre = la.get("preclip")
    dual = la.get("dual_clip")
    kl_mode = KL_MODES[la.get("kl_estimator")] if fused and la.get("ref") is not None \
        and la.get("kl_coef", 0.0) > 0 else 0
    clip = la.get("clip", (0.8, 1.2))
    cfg = COMBINE_CONFIG
    _fwd_combine_kernel[(triton.cdiv(n, cfg["BLOCK"]),)](
        part, rows, n, n_splits,
        out["lp"], out["lse"] if store_lse else dummy, out["entropy"] if entropy else dummy,
        la.get("old", dummy), la.get("adv", dummy),
        la["ref"] if kl_mode else dummy, la.get("tok_w", dummy),
        out.get("loss_t", dummy), out.get("g", dummy),
        float(pre[0]) if pre else 0.0, float(pre[1]) if pre else 0.0,
        float(clip[0]), float(clip[1]), float(dual) if dual else 0.0,
        float(la.get("kl_coef", 0.0)),
        STORE_LSE=store_lse, ENTROPY=entropy, FUSED=fused, PRECLIP=pre is not None,
        DUAL=dual is not None, KL_MODE=kl_mode, BLOCK=cfg["BLOCK"],
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out
