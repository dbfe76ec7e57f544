"""Whole-batch path of the torch backend: the logits live in the weight gradient's storage.

The dense fused loss returns a fresh fp32 ∂W of ``V·H`` floats and may write it last. When
the rows fit (``n ≤ H``), the transposed logits ``zᵀ [V, n]`` are held in that storage,
so each of the three GEMMs runs once over all rows, as the unfused 3-GEMM bound does,
instead of once per ~100-row chunk of a large vocabulary (which streams W and ∂W again
for every chunk: 1.3–1.5× the bound on CPU, docs/kernels_cpu.md). The call's extra
memory stays O(block) beyond the gradients.

∂W is written in vocab blocks from the last one down. Block ``[v0, v1)`` of ∂W covers flat
offsets ``[v0·H, v1·H)``, which hold ``zᵀ`` rows ``≥ v0`` only (``H ≥ n``): rows past the
block were consumed already, and the block's own rows are copied aside first when they
overlap.
"""
from __future__ import annotations

import torch

from . import chunk_plan
from .loss_math import loss_and_grad

# Tests switch the path off to compare with the row-chunked one.
ENABLED = True
# Runs of consecutive active rows are used in place when there are at most
# 1 + rows // RUN_ROWS of them: each extra run adds one read+write pass over ∂W (the
# K-split of its GEMM), ~1.5 % of the call per 1024 rows; beyond that the rows are gathered.
RUN_ROWS = 1024
# Calls that took this path in this process (benchmarks report it).
calls = 0


def plan(h, w, rows_all, grads, filter_eps, chunk_rows, budget, *, bias):
    """``(runs, block_bytes)`` when the whole-batch path applies, else None.

    ``runs``: ``[(r0, r1, c0)]``, rows ``r0:r1`` of ``h`` (fp32, contiguous) used in place as
    columns ``c0:`` of the logits, or None: the active rows are gathered into an fp32 copy
    (when that copy fits the budget)."""
    n = rows_all.numel()
    hidden = w.shape[1]
    if not (ENABLED and filter_eps is None and grads.dw is not None and not grads.dw_ready
            and grads.dw.is_contiguous() and chunk_rows < n <= hidden):
        return None
    if h.dtype == torch.float32 and h.is_contiguous():
        runs = _runs(rows_all)
        if len(runs) <= 1 + n // RUN_ROWS:
            block = chunk_plan.whole_batch_block(n, hidden, w.shape[0], copy_bytes=0,
                                                 bias=bias, budget=budget)
            return (runs, block) if block else None
    # fp32 copy of the active rows (a 16-bit one is gathered before its cast)
    copy_bytes = n * hidden * (4 + (h.element_size() if h.element_size() != 4 else 0))
    block = chunk_plan.whole_batch_block(n, hidden, w.shape[0], copy_bytes=copy_bytes,
                                         bias=bias, budget=budget)
    return (None, block) if block else None


def _runs(rows_all):
    """Maximal runs of consecutive row indices: ``[(r0, r1, c0)]`` (one host sync)."""
    starts = ((rows_all[1:] - rows_all[:-1]) != 1).nonzero().squeeze(1) + 1
    cuts = [0] + starts.tolist() + [rows_all.numel()]
    firsts = rows_all[cuts[:-1]].tolist()
    return [(r0, r0 + c1 - c0, c0) for r0, c0, c1 in zip(firsts, cuts[:-1], cuts[1:])]


def fused(runs, block_bytes, h, w32, bz, inv_tau, t, old_lp, adv, ref_lp, tok_weight,
          rows, settings, lp, ent, grads):
    """The fused loss over all active ``rows`` at once; fills ``lp``/``ent`` and ``grads``
    (∂W written last) and returns the loss."""
    global calls
    calls += 1
    vocab, hidden = w32.shape
    dev, n = h.device, rows.numel()
    if runs is None:
        hb, runs = h.index_select(0, rows).to(torch.float32), [(0, n, 0)]
    else:
        hb = h
    tc = t[rows]
    zt_ = grads.dw.view(-1)[:vocab * n].view(vocab, n)  # zᵀ in ∂W's storage
    for r0, r1, c0 in runs:
        out = zt_[:, c0:c0 + r1 - r0]
        if bz is None:
            torch.addmm(out, w32, hb[r0:r1].t(), beta=0, alpha=inv_tau, out=out)
        else:
            torch.addmm(bz[:, None], w32, hb[r0:r1].t(), alpha=inv_tau, out=out)
    vb = max(1, block_bytes // (4 * n))
    cols = torch.arange(n, device=dev)
    z_t = zt_[tc, cols]
    m = zt_.amax(0)
    # exp(z − m) in place, blockwise so each block's column sums run while it is in cache;
    # entropy = log S − Σ e·log e / S with e = exp(z − m), S = Σ e.
    s_exp = torch.zeros(n, dtype=torch.float32, device=dev)
    e_log_e = torch.zeros(n, dtype=torch.float32, device=dev) if ent is not None else None
    for v0 in range(0, vocab, vb):
        blk = zt_[v0:v0 + vb]
        blk.sub_(m).exp_()
        s_exp += blk.sum(0)
        if e_log_e is not None:
            e_log_e += torch.xlogy(blk, blk).sum(0)
    log_s = s_exp.log()
    lp_c = z_t - m - log_s
    lp[rows] = lp_c
    if ent is not None:
        ent[rows] = log_s - e_log_e / s_exp
    tw = tok_weight[rows]
    ref_c = None if ref_lp is None else ref_lp[rows]
    loss_t, g, _ = loss_and_grad(lp_c, old_lp[rows], adv[rows], ref_c, tw, settings)
    s = g * -inv_tau
    # zᵀ ← s·(p − onehot)ᵀ per column: p = e/S, so one pass scales by s/S.
    scale = s / s_exp
    for v0 in range(0, vocab, vb):
        zt_[v0:v0 + vb].mul_(scale)
    zt_[tc, cols] -= s
    if grads.db is not None:
        grads.db += zt_.sum(1)
    if grads.dh is not None:
        _dh(zt_, w32, rows, runs, hb is h, grads.dh, block_bytes)
    _dw_downwards(zt_, hb, runs, grads.dw, vb)
    grads.dw_ready = True
    return (tw * loss_t).sum()


def _dh(zt_, w32, rows, runs, in_place, dh, block_bytes):
    """``∂h[rows] = (s·(p − onehot)) · W``, straight into ∂h's runs when it is fp32."""
    rb = max(1, block_bytes // (4 * w32.shape[1]))
    if in_place and dh.dtype == torch.float32 and dh.is_contiguous():
        for r0, r1, c0 in runs:
            torch.mm(zt_[:, c0:c0 + r1 - r0].t(), w32, out=dh[r0:r1])
        return
    for c0 in range(0, rows.numel(), rb):
        part = torch.mm(zt_[:, c0:c0 + rb].t(), w32)
        dh.index_copy_(0, rows[c0:c0 + rb], part.to(dh.dtype))


def _dw_downwards(zt_, hb, runs, dw, vb):
    """``∂W = zᵀ·h`` (summed over the runs) written over zᵀ's own storage, last vocab
    block first."""
    vocab, n = zt_.shape
    hidden = dw.shape[1]
    tmp = None
    for v1 in range(vocab, 0, -vb):
        v0 = max(0, v1 - vb)
        src = zt_[v0:v1]
        if v0 * hidden < v1 * n:  # the block's writes reach its own rows of zᵀ
            if tmp is None:
                tmp = torch.empty(vb, n, dtype=torch.float32, device=zt_.device)
            src = tmp[:v1 - v0].copy_(src)
        out = dw[v0:v1]
        for i, (r0, r1, c0) in enumerate(runs):
            a = src[:, c0:c0 + r1 - r0]
            if i == 0:
                torch.mm(a, hb[r0:r1], out=out)
            else:
                out.addmm_(a, hb[r0:r1])
