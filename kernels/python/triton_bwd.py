"""Triton backward kernel: ∂h, ∂W, ∂bias of log-probs without an [N, V] buffer.

Scheme (as in Cut Cross-Entropy's backward): a 1-D launch over (row block × vocab block)
tiles in grouped order. Each program recomputes its logit tile ``z = (h·Wᵀ + b)/τ`` over
H in BLOCK_H steps, forms ``dz = g·(onehot − softmax(z))/τ`` from the saved ``lse``, then
loops over H again adding ``dz·W`` into ``∂h`` and ``dzᵀ·h`` into ``∂W`` with fp32
``tl.atomic_add``; ``∂bias`` gets the column sums of ``dz``. Only O(BLOCK) state lives
per program; the fp32 gradient buffers are the only large writes.

Rows arrive compacted: ``rows`` lists only rows with ``g != 0`` (masked, pre-clipped and
advantage-filtered tokens are dropped before launch), so no GEMM work is spent on them.

Grouped order: GROUP consecutive programs share one vocab block (so one W tile is read
from HBM once and served from L2) while sweeping GROUP row blocks, whose ``h`` rows also
stay in L2 across the vocab sweep.

Optional filtering (``FILTER``): a tile whose largest softmax-gradient entry
``|onehot − p|`` is below ``filter_eps`` contributes at most ``filter_eps·|g|/τ`` per
entry and is skipped entirely (both GEMMs). The threshold is on the unscaled softmax
gradient, like CCE, so it means the same thing whatever the loss weights are.

fp16 operands: ``dz = g·(onehot − p)/τ`` is often ~1e-10 (small ``g``, small ``p``), far
below fp16's smallest subnormal (6e-8), so a plain cast to fp16 would flush it to zero.
With ``SCALE_DZ`` each tile is divided by its largest ``|dz|`` before the cast and both
products are multiplied back in fp32 (entries below 2⁻²⁴ of the tile's largest are lost,
the same relative resolution bf16 keeps by its exponent range; bf16 needs no scaling).

Determinism: ``∂h`` and ``∂W`` (and ``∂bias``) are sums of fp32 atomic adds from many
programs whose order the GPU scheduler picks, so on GPU they differ in the last bits
between runs with identical inputs (the forward outputs, loss and log-probs, are
deterministic). Use the "torch" backend where bitwise reproducibility is required.

This module imports nothing from the package (see triton_fwd.py for why).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_fwd import dot_precision, logit_tile

# Why these: the dz tile (64×128 fp32) is 32 registers/thread at 8 warps and the two
# partial products (dz·W: 64×BLOCK_H, dzᵀ·h: 128×BLOCK_H, fp32) live next to it; GROUP=8
# row blocks per W tile as in CCE. Measured with the compile gate: BLOCK_H=64 spills on
# sm_80 (255 regs + 56 B stack) but not on sm_90 (160 regs, wgmma keeps accumulators
# leaner), so sm_80 uses BLOCK_H=32; fp32 operands need smaller tiles on both.
BWD_CONFIGS = {
    (80, "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=32, GROUP=8, num_warps=8, num_stages=3),
    (90, "16bit"): dict(BLOCK_N=64, BLOCK_V=128, BLOCK_H=64, GROUP=8, num_warps=8, num_stages=3),
    (80, "fp32"): dict(BLOCK_N=32, BLOCK_V=64, BLOCK_H=32, GROUP=8, num_warps=8, num_stages=3),
    (90, "fp32"): dict(BLOCK_N=32, BLOCK_V=128, BLOCK_H=32, GROUP=8, num_warps=8, num_stages=3),
}
INTERPRET_BWD_CONFIG = dict(BLOCK_N=16, BLOCK_V=32, BLOCK_H=16, GROUP=2, num_warps=1,
                            num_stages=1)


def _family(cc: int) -> int:
    # sm_90/sm_100 have 227 KB of shared memory per block; everything else (sm_80: 163 KB,
    # sm_86/89/120: 99 KB) gets the sm_80 configs, which use at most 57 KB.
    return 90 if 90 <= cc < 120 else 80


def bwd_config(cc: int | None, dtype: torch.dtype) -> dict:
    """Config for compute capability ``cc`` (80, 90, ...; ``None`` = interpreter)."""
    if cc is None:
        return dict(INTERPRET_BWD_CONFIG)
    width = "fp32" if dtype == torch.float32 else "16bit"
    return dict(BWD_CONFIGS[(_family(cc), width)])


@triton.jit
def _bwd_kernel(h_ptr, w_ptr, b_ptr, rows_ptr, tgt_ptr, g_ptr, lse_ptr,
                dh_ptr, dw_ptr, db_ptr,
                n_rows, V, H, stride_h, stride_w, stride_dh, stride_dw, inv_temp, filter_eps,
                HAS_BIAS: tl.constexpr, NEED_DH: tl.constexpr, NEED_DW: tl.constexpr,
                NEED_DB: tl.constexpr, FILTER: tl.constexpr, GROUP: tl.constexpr,
                BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                DOT_PREC: tl.constexpr, UPCAST_DOT: tl.constexpr, SCALE_DZ: tl.constexpr):
    pid = tl.program_id(0)
    n_nb = tl.cdiv(n_rows, BLOCK_N)
    n_vb = tl.cdiv(V, BLOCK_V)
    per_group = GROUP * n_vb
    first_n = (pid // per_group) * GROUP
    gsize = tl.minimum(n_nb - first_n, GROUP)
    pid_n = first_n + (pid % per_group) % gsize
    pid_v = (pid % per_group) // gsize

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = offs_n < n_rows
    rows = tl.load(rows_ptr + offs_n, mask=row_ok, other=0).to(tl.int64)
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=-1).to(tl.int64)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = offs_v < V
    h_rows = h_ptr + rows[:, None] * stride_h
    w_rows = w_ptr + offs_v.to(tl.int64)[:, None] * stride_w

    acc = logit_tile(h_rows, w_rows, b_ptr, offs_v, row_ok, col_ok, H, HAS_BIAS,
                     BLOCK_N, BLOCK_V, BLOCK_H, DOT_PREC, UPCAST_DOT)
    p = tl.exp(acc * inv_temp - lse[:, None])
    onehot = offs_v[None, :] == tgt[:, None]
    d = tl.where(onehot, 1.0, 0.0) - p
    d = tl.where(row_ok[:, None] & col_ok[None, :], d, 0.0)
    if FILTER:
        if tl.max(tl.max(tl.abs(d), axis=1), axis=0) < filter_eps:
            return
    dz = d * (g * inv_temp)[:, None]
    if NEED_DB:
        tl.atomic_add(db_ptr + offs_v, tl.sum(dz, axis=0), mask=col_ok, sem="relaxed")
    if NEED_DH or NEED_DW:
        # Tensor-core operands in the input dtype; accumulation stays fp32. Relaxed atomics:
        # only atomicity is needed, no ordering with other memory traffic.
        if SCALE_DZ:  # fp16: bring the tile to unit scale before the cast (see above)
            amax = tl.max(tl.max(tl.abs(dz), axis=1), axis=0)
            dz_scale = tl.where(amax > 0.0, amax, 1.0)
            dz = dz / dz_scale
        dz_c = dz.to(h_ptr.dtype.element_ty)
        if UPCAST_DOT:
            dz_c = dz_c.to(tl.float32)  # keeps the bf16 rounding of dz, exact upcast
        for k0 in range(0, H, BLOCK_H):
            offs_k = k0 + tl.arange(0, BLOCK_H)
            k_ok = offs_k < H
            if NEED_DH:
                wb = tl.load(w_rows + offs_k[None, :], mask=col_ok[:, None] & k_ok[None, :],
                             other=0.0)
                if UPCAST_DOT:
                    wb = wb.to(tl.float32)
                dh_part = tl.dot(dz_c, wb, input_precision=DOT_PREC)
                if SCALE_DZ:
                    dh_part = dh_part * dz_scale
                tl.atomic_add(dh_ptr + rows[:, None] * stride_dh + offs_k[None, :], dh_part,
                              mask=row_ok[:, None] & k_ok[None, :], sem="relaxed")
            if NEED_DW:
                hb = tl.load(h_rows + offs_k[None, :], mask=row_ok[:, None] & k_ok[None, :],
                             other=0.0)
                if UPCAST_DOT:
                    hb = hb.to(tl.float32)
                dw_part = tl.dot(tl.trans(dz_c), hb, input_precision=DOT_PREC)
                if SCALE_DZ:
                    dw_part = dw_part * dz_scale
                tl.atomic_add(dw_ptr + offs_v.to(tl.int64)[:, None] * stride_dw + offs_k[None, :],
                              dw_part, mask=col_ok[:, None] & k_ok[None, :], sem="relaxed")


def launch_backward(h, weight, bias, targets, g, lse, *, temperature, config,
                    need_dh=True, need_dw=True, need_db=True, filter_eps=None):
    """Gradients of ``Σ g·lp`` w.r.t. h, weight, bias (fp32 buffers; ``None`` if not needed).

    ``g`` and ``lse`` are fp32 [N]; rows with ``g == 0`` are compacted away here (one
    host sync for the row count, the price of skipping their GEMM work).
    """
    N, H = h.shape
    V = weight.shape[0]
    f32 = dict(device=h.device, dtype=torch.float32)
    need_db = need_db and bias is not None
    dh = torch.zeros(N, H, **f32) if need_dh else None
    dw = torch.zeros(V, H, **f32) if need_dw else None
    db = torch.zeros(V, **f32) if need_db else None
    rows = torch.nonzero(g != 0).flatten()
    n = rows.numel()
    if n == 0 or not (need_dh or need_dw or need_db):
        return dh, dw, db
    bn, bv = config["BLOCK_N"], config["BLOCK_V"]
    grid = (triton.cdiv(n, bn) * triton.cdiv(V, bv),)
    dummy = g
    _bwd_kernel[grid](
        h, weight, bias if bias is not None else dummy, rows, targets, g, lse,
        dh if need_dh else dummy, dw if need_dw else dummy, db if need_db else dummy,
        n, V, H, h.stride(0), weight.stride(0), H, H, 1.0 / temperature,
        float(filter_eps) if filter_eps is not None else 0.0,
        HAS_BIAS=bias is not None, NEED_DH=need_dh, NEED_DW=need_dw, NEED_DB=need_db,
        FILTER=filter_eps is not None, GROUP=config["GROUP"], BLOCK_N=bn, BLOCK_V=bv,
        BLOCK_H=config["BLOCK_H"], DOT_PREC=dot_precision(h.dtype),
        # Interpreter only (its bf16 tl.dot is broken): see triton_fwd.upcast_dot.
        UPCAST_DOT=h.device.type != "cuda" and h.dtype != torch.float32,
        SCALE_DZ=h.dtype == torch.float16,
        num_warps=config["num_warps"], num_stages=config["num_stages"])
    return dh, dw, db
