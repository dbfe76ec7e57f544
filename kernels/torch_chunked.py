"""Chunked PyTorch backend ("torch"): never holds ``[N, V]`` logits, runs on any device.

Rows are processed ``C`` at a time against the full vocabulary, with ``C·V·4`` bytes
≤ :data:`LOGIT_BUDGET_BYTES` (one preallocated fp32 buffer, reused in place; the matmul
writes into it with ``out=``). Inputs of any float dtype are cast to fp32 per chunk (the
weight once per call) so every reduction accumulates in fp32.

* ``fused_loss``: gradients are computed during the forward pass (SPEC §6): per chunk
  ``z → lse → lp → g = dL/dlp → dz = g·(onehot − softmax)/τ → ∂h = dz·W, ∂W += dzᵀ·h``.
  That is the minimum of 3 GEMMs of ``N·H·V``; backward only scales the stored grads.
* ``token_logprobs``: forward saves only ``lse`` (O(N)); backward recomputes ``z`` once
  per chunk with the incoming gradient (4 GEMMs in total).

The ``*_impl`` functions below are plain tensor code; :mod:`.custom_ops` wraps them as
``torch.library`` custom ops (so ``torch.compile(fullgraph=True)`` treats each as one
opaque node) and provides the backend entry points ``token_logprobs``/``fused_loss``.
"""
from __future__ import annotations

import torch

from .loss_math import LossSettings, loss_and_grad

# Peak size of the per-chunk logit buffer (the only O(rows·V) allocation).
LOGIT_BUDGET_BYTES = 64 << 20
# In filtered mode, above this fraction of surviving vocab columns the dense GEMMs are
# cheaper than gathering the weight rows (index_select + index_add_ copy H floats per row).
FILTER_DENSE_FRACTION = 0.5
# Vocab block for the entropy reduction, so its temporary stays small.
_ENTROPY_BLOCK = 8192


def rows_per_chunk(n_rows: int, vocab: int) -> int:
    """Chunk size ``C`` with ``C·V·4 ≤ LOGIT_BUDGET_BYTES``, balanced over the chunks."""
    if n_rows <= 0:
        return 1
    c = max(1, min(n_rows, LOGIT_BUDGET_BYTES // (4 * vocab)))
    n_chunks = -(-n_rows // c)
    return -(-n_rows // n_chunks)  # equal-sized chunks: no short tail GEMM


def _as_f32(x):
    return None if x is None else x.to(torch.float32)


def _check_targets(t, vocab, what):
    if t.numel() and (bool((t < 0).any()) or bool((t >= vocab).any())):
        bad = t[(t < 0) | (t >= vocab)][0].item()
        raise ValueError(f"targets: {what} contains token id {bad} outside [0, V={vocab})")


def _logits_into(z, hc, w32t, b32, inv_tau):
    """``z[:] = (hc·Wᵀ + b)/τ`` written straight into the chunk buffer."""
    if b32 is None:
        torch.mm(hc, w32t, out=z)
        if inv_tau != 1.0:
            z.mul_(inv_tau)
    else:
        torch.addmm(b32, hc, w32t, beta=inv_tau, alpha=inv_tau, out=z)


def _softmax_stats(z, tc, want_entropy):
    """Turn ``z`` into ``exp(z − max)`` in place; return ``(lse, z_target, sumexp, entropy)``."""
    m = z.amax(dim=1)
    zt = z.gather(1, tc[:, None]).squeeze(1)
    z.sub_(m[:, None])
    z.exp_()
    s = z.sum(dim=1)
    ent = None
    if want_entropy:
        # H = log s − Σ e·log e / s with e = exp(z − m); e·log e = 0 where e underflows.
        acc = torch.zeros_like(s)
        for v0 in range(0, z.shape[1], _ENTROPY_BLOCK):
            blk = z[:, v0:v0 + _ENTROPY_BLOCK]
            acc += torch.xlogy(blk, blk).sum(dim=1)
        ent = s.log() - acc / s
    return m + s.log(), zt, s, ent


def _compact_rows(z, keep_idx):
    """Move rows ``keep_idx`` (ascending) to the top of ``z`` in place (no new buffer)."""
    for j, k in enumerate(keep_idx.tolist()):
        if j != k:
            z[j].copy_(z[k])


def _filter_columns(p, tc, filter_eps):
    """Vocab columns whose softmax-gradient ``|onehot − p|`` reaches ``filter_eps`` in some row.

    ``p`` is the chunk's softmax (before scaling by the per-token gradient, as in Cut
    Cross-Entropy, so the threshold is relative to a unit upstream gradient). Target
    columns always stay. Returns the column indices, or None when the dense GEMMs are
    cheaper than gathering that many weight rows.
    """
    cols = p.amax(dim=0) >= filter_eps
    cols[tc] = True
    idx = cols.nonzero().squeeze(1)
    return idx if idx.numel() < FILTER_DENSE_FRACTION * p.shape[1] else None


def _grad_gemms(dz, hc, w32, dw32, db32, need_dh, cols):
    """The two gradient GEMMs of one chunk: returns ``dz·W`` (or None), accumulates ``dzᵀ·h``.

    With ``cols`` (filtered mode) only those vocab columns take part.
    """
    if cols is not None:
        dzs = dz.index_select(1, cols)
        dh = torch.mm(dzs, w32.index_select(0, cols)) if need_dh else None
        if dw32 is not None:
            dw32.index_add_(0, cols, torch.mm(dzs.t(), hc))
        if db32 is not None:
            db32.index_add_(0, cols, dzs.sum(dim=0))
        return dh
    dh = torch.mm(dz, w32) if need_dh else None
    if dw32 is not None:
        dw32.addmm_(dz.t(), hc)
    if db32 is not None:
        db32 += dz.sum(dim=0)
    return dh


class _Grads:
    """fp32 gradient accumulators for one call; ``finish`` casts to the input dtypes."""

    def __init__(self, h, w, bias, need_dh, need_dw, need_db):
        self.dh = h.new_zeros(h.shape, dtype=torch.float32) if need_dh else None
        self.dw = w.new_zeros(w.shape, dtype=torch.float32) if need_dw else None
        self.db = (bias.new_zeros(bias.shape, dtype=torch.float32)
                   if need_db and bias is not None else None)
        self.dtypes = (h.dtype, w.dtype, None if bias is None else bias.dtype)

    @property
    def any(self):
        return self.dh is not None or self.dw is not None or self.db is not None

    def chunk(self, dz, hc, w32, rows, cols):
        dh = _grad_gemms(dz, hc, w32, self.dw, self.db, self.dh is not None, cols)
        if dh is not None:
            self.dh.index_copy_(0, rows, dh)

    def finish(self, ref):
        def out(g, dt):
            return ref.new_empty(0) if g is None else g.to(dt)
        return out(self.dh, self.dtypes[0]), out(self.dw, self.dtypes[1]), out(self.db, self.dtypes[2])


def _setup(h, w, bias, n_rows):
    w32 = w.to(torch.float32).contiguous()  # no copy for a contiguous fp32 weight
    b32 = _as_f32(bias)
    vocab = w.shape[0]
    c = rows_per_chunk(n_rows, vocab)
    buf = torch.empty(min(c, max(n_rows, 1)), vocab, dtype=torch.float32, device=h.device)
    return w32, b32, c, buf


def token_logprobs_fwd_impl(h, w, t, bias, temperature, ignore_index, return_entropy):
    """Chunked log-probs: returns ``(lp [N], lse [N], entropy [N] or [0])``, all fp32."""
    n, vocab = h.shape[0], w.shape[0]
    valid = t != ignore_index
    rows_all = valid.nonzero().squeeze(1)
    _check_targets(t[rows_all], vocab, "a non-ignored position")
    lp = h.new_zeros(n, dtype=torch.float32)
    lse = h.new_zeros(n, dtype=torch.float32)
    ent = h.new_zeros(n if return_entropy else 0, dtype=torch.float32)
    w32, b32, c, buf = _setup(h, w, bias, rows_all.numel())
    inv_tau = 1.0 / temperature
    w32t = w32.t()
    for s0 in range(0, rows_all.numel(), c):
        rows = rows_all[s0:s0 + c]
        z = buf[:rows.numel()]
        _logits_into(z, h.index_select(0, rows).to(torch.float32), w32t, b32, inv_tau)
        lse_c, zt, _, ent_c = _softmax_stats(z, t[rows], return_entropy)
        lp[rows] = zt - lse_c
        lse[rows] = lse_c
        if return_entropy:
            ent[rows] = ent_c
    return lp, lse, ent


def token_logprobs_bwd_impl(grad_lp, h, w, t, bias, lse, temperature, ignore_index,
                            need_dh, need_dw, need_db, filter_eps=None):
    """Backward of :func:`token_logprobs_fwd_impl`: recompute ``z`` per chunk (4th GEMM)."""
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db)
    g_all = grad_lp.to(torch.float32) / temperature
    rows_all = ((t != ignore_index) & (g_all != 0)).nonzero().squeeze(1)
    if grads.any and rows_all.numel():
        w32, b32, c, buf = _setup(h, w, bias, rows_all.numel())
        w32t = w32.t()
        for s0 in range(0, rows_all.numel(), c):
            rows = rows_all[s0:s0 + c]
            z = buf[:rows.numel()]
            hc = h.index_select(0, rows).to(torch.float32)
            tc = t[rows]
            g = g_all[rows]
            _logits_into(z, hc, w32t, b32, 1.0 / temperature)
            z.sub_(lse[rows][:, None]).exp_()  # softmax
            cols = None if filter_eps is None else _filter_columns(z, tc, filter_eps)
            z.mul_(-g[:, None])
            z.scatter_add_(1, tc[:, None], g[:, None])  # dz = g·(onehot − softmax)/τ
            grads.chunk(z, hc, w32, rows, cols)
    return grads.finish(h)


def fused_loss_impl(h, w, t, old_lp, adv, ref_lp, tok_weight, valid, bias, temperature,
                    settings: LossSettings, return_entropy, filter_eps,
                    need_dh, need_dw, need_db):
    """Loss, detached lp/entropy and the gradients of the loss, in one chunked pass.

    Returns ``(loss 0-dim, lp [N], entropy [N] or [0], ∂h, ∂W, ∂b)`` (grads ``[0]`` when
    not needed), each grad in its input's dtype.
    """
    n, vocab = h.shape[0], w.shape[0]
    rows_all = valid.nonzero().squeeze(1)  # invalid rows never reach a GEMM
    _check_targets(t[rows_all], vocab, "a position where mask is true")
    lp = h.new_zeros(n, dtype=torch.float32)
    ent = h.new_zeros(n if return_entropy else 0, dtype=torch.float32)
    loss = h.new_zeros((), dtype=torch.float32)
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db)
    w32, b32, c, buf = _setup(h, w, bias, rows_all.numel())
    inv_tau = 1.0 / temperature
    w32t = w32.t()
    for s0 in range(0, rows_all.numel(), c):
        rows = rows_all[s0:s0 + c]
        z = buf[:rows.numel()]
        hc = h.index_select(0, rows).to(torch.float32)
        tc = t[rows]
        _logits_into(z, hc, w32t, b32, inv_tau)
        lse_c, zt, sumexp, ent_c = _softmax_stats(z, tc, return_entropy)
        lp_c = zt - lse_c
        lp[rows] = lp_c
        if return_entropy:
            ent[rows] = ent_c
        ref_c = None if ref_lp is None else ref_lp[rows]
        tw = tok_weight[rows]
        loss_t, g, _ = loss_and_grad(lp_c, old_lp[rows], adv[rows], ref_c, tw, settings)
        loss += (tw * loss_t).sum()
        if not grads.any:
            continue
        g = g * inv_tau
        keep = g != 0  # Pre-CLIP / PPO-clipped / zero-advantage rows: no gradient GEMMs
        if not bool(keep.all()):
            keep_idx = keep.nonzero().squeeze(1)
            if keep_idx.numel() == 0:
                continue
            _compact_rows(z, keep_idx)
            z = z[:keep_idx.numel()]
            rows, hc, tc = rows[keep_idx], hc[keep_idx], tc[keep_idx]
            g, sumexp = g[keep_idx], sumexp[keep_idx]
        # z holds exp(z − m); turn it into dz = g·(onehot − softmax)/τ in place.
        if filter_eps is None:
            cols = None
            z.mul_((-g / sumexp)[:, None])
        else:
            z.mul_((1.0 / sumexp)[:, None])
            cols = _filter_columns(z, tc, filter_eps)
            z.mul_(-g[:, None])
        z.scatter_add_(1, tc[:, None], g[:, None])
        grads.chunk(z, hc, w32, rows, cols)
    return (loss, lp, ent) + grads.finish(h)


# Backend entry points (called by functional.py) are the custom-op wrappers.
from .custom_ops import make_backend  # noqa: E402  (needs the impls above)

token_logprobs, fused_loss = make_backend(
    "torch_chunked", token_logprobs_fwd_impl, token_logprobs_bwd_impl, fused_loss_impl)

__all__ = ["token_logprobs", "fused_loss", "rows_per_chunk", "LOGIT_BUDGET_BYTES"]
