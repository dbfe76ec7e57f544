"""Chunked PyTorch backend ("torch"): never holds ``[N, V]`` logits, runs on any device.

Rows are processed ``C`` at a time against the full vocabulary. ``C`` comes from
:mod:`.chunk_plan`, which counts every temporary a chunk holds (the fp32 logit chunk, the
``[C, H]`` operands, the entropy block, filtered mode's gathered blocks) so the call's
extra memory beyond the gradients stays within ``EXTRA_BUDGET_BYTES`` (64 MiB) at any N.
The logit chunk is one reused buffer written by the GEMM; everything after the GEMM works
in place on it. Inputs of any float dtype are cast to fp32 per chunk (the weight once per
call) so every reduction accumulates in fp32.

* ``fused_loss``: gradients are computed during the forward pass (SPEC §6): per chunk
  ``z → lse → lp → g = dL/dlp → dz = g·(onehot − softmax)/τ → ∂h = dz·W, ∂W += dzᵀ·h``.
  That is the minimum of 3 GEMMs of ``N·H·V``; backward only scales the stored grads.
* ``token_logprobs``: forward saves only ``lse`` (O(N)); backward recomputes ``z`` once
  per chunk with the incoming gradient (4 GEMMs in total).

On CPU the logits and ∂h GEMMs run on the engine :mod:`.cpu_blas` measured fastest on
this machine (torch.mm or numpy's BLAS); ∂W accumulates in place with ``addmm_``.

When the active rows fit in the weight gradient's own storage (``n ≤ H``, dense mode),
``fused_loss`` holds all the logits there instead (:mod:`.whole_batch`): three GEMMs over
all rows, no chunking.

The ``*_impl`` functions below are plain tensor code; :mod:`.custom_ops` wraps them as
``torch.library`` custom ops (so ``torch.compile(fullgraph=True)`` treats each as one
opaque node) and provides the backend entry points ``token_logprobs``/``fused_loss``.
"""
from __future__ import annotations

import functools
import math
import mmap

import numpy as np
import torch

from . import chunk_plan, cpu_blas, whole_batch
from .loss_math import LossSettings, loss_and_grad

# Extra memory of one call beyond its gradients (tests lower it to force many chunks).
EXTRA_BUDGET_BYTES = chunk_plan.EXTRA_BUDGET_BYTES
# Tests only: cap on rows per chunk (None: the plan's).
MAX_CHUNK_ROWS = None
# In filtered mode, above this fraction of surviving vocab columns the dense GEMMs are
# cheaper than gathering the weight rows (index_select + index_put_ copy H floats per row).
FILTER_DENSE_FRACTION = 0.5


def _check_targets(t, vocab, what):
    """A bad token id would index out of the vocabulary: name it instead (one host sync)."""
    if t.numel() and (bool((t < 0).any()) or bool((t >= vocab).any())):
        bad = t[(t < 0) | (t >= vocab)][0].item()
        raise ValueError(f"targets: {what} contains token id {bad} outside [0, V={vocab})")


class _Chunker:
    """Per-call state: fp32 weight, scaled bias, the chunk plan, the GEMM engine and the one
    reused logit buffer."""

    def __init__(self, h, w, bias, temperature, n_rows, *, grads, entropy=False,
                 filtered=False, dw_scratch=None):
        self.w32 = w.to(torch.float32).contiguous()  # no copy for a contiguous fp32 weight
        self.inv_tau = 1.0 / temperature
        self.bz = None if bias is None else bias.to(torch.float32) * self.inv_tau
        vocab, hidden = w.shape
        self.plan = chunk_plan.plan(n_rows, hidden, vocab, grads=grads, entropy=entropy,
                                    filtered=filtered, bias=bias is not None,
                                    tau_scaled=self.inv_tau != 1.0, in_bytes=h.element_size(),
                                    budget=EXTRA_BUDGET_BYTES)
        self.c = self.plan.rows if MAX_CHUNK_ROWS is None else min(self.plan.rows, MAX_CHUNK_ROWS)
        self.rows = min(self.c, max(n_rows, 1))
        self.device = h.device
        self.with_grads = grads
        # ∂W's storage before the first chunk writes it: the engine probe may scribble there.
        self.dw_scratch = dw_scratch
        self.engine = None  # chosen at the first chunk (the whole-batch path needs none)

    def choose_engine(self, hc):
        """The GEMM engine; on CPU a shape class's first call times this call's own first
        chunk with each engine (:func:`.cpu_blas.chunk_probe`), results discarded."""
        if self.engine is None:
            vocab, hidden = self.w32.shape
            if self.device.type != "cpu":
                self.engine = "torch"
            else:
                probe = cpu_blas.chunk_probe(hc, self.w32, self.buf[:hc.shape[0]],
                                             self.with_grads, self.dw_scratch)
                self.engine = cpu_blas.engine(hidden, vocab, self.rows, self.with_grads, probe)
        return self.engine

    @functools.cached_property
    def buf(self):
        return torch.empty(self.rows, self.w32.shape[0], dtype=torch.float32, device=self.device)

    def chunks(self, h, rows_all):
        """Yield ``(rows, hc fp32)`` for consecutive row chunks."""
        for s0 in range(0, rows_all.numel(), self.c):
            rows = rows_all[s0:s0 + self.c]
            yield rows, h.index_select(0, rows).to(torch.float32)

    def logits(self, hc):
        """``(z, hz)``: ``z = (hc·Wᵀ + b)/τ`` [c, V] fp32 in the reused buffer and ``hz = hc/τ``
        (1/τ is folded into the small hc)."""
        engine = self.choose_engine(hc)
        hz = hc * self.inv_tau if self.inv_tau != 1.0 else hc
        z = self.buf[:hc.shape[0]]
        if engine == "numpy" or self.bz is None:
            cpu_blas.logits(engine, hz, self.w32, z)
            if self.bz is not None:
                z += self.bz
        else:
            torch.addmm(self.bz, hz, self.w32.t(), out=z)
        return z, hz

    def softmax_(self, z, tc, hz):
        """Softmax of ``z`` in place; returns ``(lse, z_target)`` [c] (fp32).

        One fused, row-by-row pass (the row stays in L2) instead of max/sub/exp/sum passes
        over the whole chunk. ``lse = z_t − log p_t``; in the rare rows where ``p_t``
        underflows that is inexact, so the row's logits are recomputed (a GEMV) instead.
        """
        zt = z.gather(1, tc[:, None]).squeeze(1)
        torch._softmax(z, 1, False, out=z)
        pt = z.gather(1, tc[:, None]).squeeze(1)
        lse = zt - pt.log()
        tiny = pt < _TINY_P
        if bool(tiny.any()):
            for r in tiny.nonzero().squeeze(1).tolist():
                zr = torch.mv(self.w32, hz[r])
                if self.bz is not None:
                    zr += self.bz
                lse[r] = torch.logsumexp(zr, 0)
        return lse, zt

    def grads(self, p, hc, tc, g, grads, rows, filter_eps):
        """Add one chunk's gradients given the softmax ``p`` (in the buffer) and ``g = dL/dlp``.

        ``dz = (g/τ)·(onehot − p) = s·(p − onehot)`` with ``s = −g/τ`` per row: the buffer
        only gets ``−1`` at the targets, and ``s`` scales the small ``[c, H]`` operands and
        results instead of the ``[c, V]`` chunk (one pass over the chunk saved).
        """
        s = g * -self.inv_tau
        cols = None
        if filter_eps is not None:
            # Columns where some row's softmax reaches filter_eps, plus the targets (their
            # entry is p_t − 1). The threshold is relative to a unit upstream gradient, as
            # in Cut Cross-Entropy's gradient filter. One column-max pass over the chunk.
            keep = p.amax(dim=0) >= filter_eps
            keep[tc] = True
            idx = keep.nonzero().squeeze(1)
            del keep
            if idx.numel() < FILTER_DENSE_FRACTION * p.shape[1]:
                cols = idx
        flat = torch.arange(p.shape[0], device=p.device) * p.shape[1] + tc
        p.view(-1)[flat] -= 1.0  # p − onehot
        hs = hc * s[:, None] if grads.dw is not None else None
        if cols is None:
            if grads.dh is not None:
                dh = cpu_blas.mm_w(self.engine, p, self.w32).mul_(s[:, None])
                grads.dh.index_copy_(0, rows, dh.to(grads.dh.dtype))
                del dh
            if grads.dw is not None:
                grads.add_dw(p, hs)
            if grads.db is not None:
                grads.db += torch.mv(p.t(), s)
            return
        self._filtered_grads(p, hs, s, cols, grads, rows)

    def _filtered_grads(self, p, hs, s, cols, grads, rows):
        """Gradients from the kept vocab columns only, gathered ``filter_cols`` at a time so
        the gathered copies stay within the chunk plan."""
        dh = (torch.zeros(p.shape[0], self.w32.shape[1], dtype=torch.float32, device=p.device)
              if grads.dh is not None else None)
        step = max(1, self.plan.filter_cols)
        for b0 in range(0, cols.numel(), step):
            cb = cols[b0:b0 + step]
            pb = p.index_select(1, cb)
            if dh is not None:
                dh.addmm_(pb, self.w32.index_select(0, cb))
            if grads.dw is not None:
                grads.add_dw_rows(cb, torch.mm(pb.t(), hs))
            if grads.db is not None:
                grads.db.index_put_((cb,), torch.mv(pb.t(), s), accumulate=True)
        if dh is not None:
            grads.dh.index_copy_(0, rows, dh.mul_(s[:, None]).to(grads.dh.dtype))


# Below this target probability ``log p_t`` loses precision (fp32 subnormals start ~1e-38).
_TINY_P = 1e-30


def _entropy(p):
    """``−Σ p·log p`` per row, in vocab blocks so the temporary stays small."""
    acc = p.new_zeros(p.shape[0])
    for v0 in range(0, p.shape[1], chunk_plan.ENTROPY_BLOCK):
        blk = p[:, v0:v0 + chunk_plan.ENTROPY_BLOCK]
        acc -= torch.xlogy(blk, blk).sum(dim=1)
    return acc


def _compact_rows(z, keep):
    """Pack the kept rows of ``z`` into its first ``k`` rows in place; return their order.

    Holes among the first ``k`` rows are filled from kept rows beyond ``k`` (at most one
    row copy per dropped row). On CPU the copies go through numpy (a plain memcpy): a
    torch copy between rows of one tensor takes a slow overlapping-memory path, and each
    small parallel op can wait a scheduler time slice when the cores are shared.
    """
    keep_l = keep.tolist()
    k = sum(keep_l)
    holes = [i for i in range(k) if not keep_l[i]]
    sources = [i for i in range(k, len(keep_l)) if keep_l[i]]
    order = list(range(k))
    if holes:
        if z.device.type == "cpu":
            a = z.numpy()
            for hole, src in zip(holes, sources):
                a[hole] = a[src]
        else:
            tmp = torch.empty_like(z[0])
            for hole, src in zip(holes, sources):
                tmp.copy_(z[src])
                z[hole].copy_(tmp)
        for hole, src in zip(holes, sources):
            order[hole] = src
    return torch.tensor(order, dtype=torch.long, device=z.device)


def _zeros(shape, device):
    """fp32 zeros; on CPU from a lazily zero-filled anonymous mapping without huge pages.

    In filtered mode only the surviving vocab rows of ∂W are ever written, so the rest
    never costs a page fault or a fill pass (``torch.zeros`` touches all of a [V, H]).
    Huge pages are turned off for this mapping: with transparent huge pages on, each
    scattered 8 KB row write faulted in (and zeroed) a whole 2 MB page, which made the
    few hundred surviving rows of a Qwen-sized ∂W cost 0.4–1.8 s (measured) instead of
    milliseconds.
    """
    numel = math.prod(shape)
    if torch.device(device).type == "cpu" and numel:
        buf = mmap.mmap(-1, numel * 4)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            buf.madvise(mmap.MADV_NOHUGEPAGE)
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(shape))
    return torch.zeros(shape, dtype=torch.float32, device=device)


class _Grads:
    """Gradient accumulators for one call; ``finish`` casts to the input dtypes.

    ∂h is kept in the hidden states' dtype (each row is written once, by its chunk), so a
    16-bit input needs no fp32 ``[N, H]`` copy; ∂W and ∂b accumulate over chunks in fp32.
    """

    def __init__(self, h, w, bias, need_dh, need_dw, need_db, filtered=False):
        self.dh = h.new_zeros(h.shape) if need_dh else None
        # Dense: left uninitialised, the first chunk writes it with mm(out=), saving a
        # zero-fill pass over [V, H] (≈1% of the whole call at Qwen scale on CPU).
        # Filtered: lazily zeroed from the start (most rows are never written).
        self.dw_ready = filtered
        self.dw = None
        if need_dw:
            self.dw = (_zeros(w.shape, w.device) if filtered
                       else w.new_empty(w.shape, dtype=torch.float32))
        self.db = (bias.new_zeros(bias.shape, dtype=torch.float32)
                   if need_db and bias is not None else None)
        self.dtypes = (h.dtype, w.dtype, None if bias is None else bias.dtype)

    @property
    def dw_scratch(self):
        """∂W's storage while nothing is in it yet (dense mode, before the first chunk)."""
        return None if self.dw is None or self.dw_ready else self.dw

    @property
    def any(self):
        return self.dh is not None or self.dw is not None or self.db is not None

    def add_dw(self, p, hs):
        """``∂W += pᵀ·hs`` over the whole vocabulary."""
        if self.dw_ready:
            self.dw.addmm_(p.t(), hs)
        else:
            torch.mm(p.t(), hs, out=self.dw)
        self.dw_ready = True

    def add_dw_rows(self, cols, part):
        """``∂W[cols] += part`` (filtered mode: ∂W starts as lazily zeroed memory)."""
        # index_put_ with accumulate: index_add_ on CPU costs time ∝ the whole [V, H].
        self.dw.index_put_((cols,), part, accumulate=True)

    def finish(self, ref):
        if self.dw is not None and not self.dw_ready:
            self.dw = _zeros(self.dw.shape, self.dw.device)
        def out(g, dt):
            return ref.new_empty(0) if g is None else g.to(dt)
        return out(self.dh, self.dtypes[0]), out(self.dw, self.dtypes[1]), out(self.db, self.dtypes[2])


def token_logprobs_fwd_impl(h, w, t, bias, temperature, ignore_index, return_entropy):
    """Chunked log-probs: returns ``(lp [N], lse [N], entropy [N] or [0])``, all fp32."""
    n, vocab = h.shape[0], w.shape[0]
    rows_all = (t != ignore_index).nonzero().squeeze(1)
    _check_targets(t[rows_all], vocab, "a non-ignored position")
    lp = h.new_zeros(n, dtype=torch.float32)
    lse = h.new_zeros(n, dtype=torch.float32)
    ent = h.new_zeros(n if return_entropy else 0, dtype=torch.float32)
    ck = _Chunker(h, w, bias, temperature, rows_all.numel(), grads=False,
                  entropy=return_entropy)
    for rows, hc in ck.chunks(h, rows_all):
        # One function call per chunk: its chunk-sized temporaries die before the next.
        _lp_chunk(ck, rows, hc, t[rows], lp, lse, ent if return_entropy else None)
    return lp, lse, ent


def _lp_chunk(ck, rows, hc, tc, lp, lse, ent):
    z, hz = ck.logits(hc)
    lse_c, zt = ck.softmax_(z, tc, hz)
    lp[rows] = zt - lse_c
    lse[rows] = lse_c
    if ent is not None:
        ent[rows] = _entropy(z)


def token_logprobs_bwd_impl(grad_lp, h, w, t, bias, lse, temperature, ignore_index,
                            need_dh, need_dw, need_db, filter_eps=None):
    """Backward of :func:`token_logprobs_fwd_impl`: recompute ``z`` per chunk (4th GEMM)."""
    del lse  # the in-place softmax recomputes it; kept in the signature for other backends
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db, filter_eps is not None)
    g_all = grad_lp.to(torch.float32)
    rows_all = ((t != ignore_index) & (g_all != 0)).nonzero().squeeze(1)
    if grads.any and rows_all.numel():
        ck = _Chunker(h, w, bias, temperature, rows_all.numel(), grads=True,
                      filtered=filter_eps is not None, dw_scratch=grads.dw_scratch)
        for rows, hc in ck.chunks(h, rows_all):
            _lp_bwd_chunk(ck, rows, hc, t[rows], g_all[rows], grads, filter_eps)
    return grads.finish(h)


def _lp_bwd_chunk(ck, rows, hc, tc, g, grads, filter_eps):
    z, _ = ck.logits(hc)
    torch._softmax(z, 1, False, out=z)
    ck.grads(z, hc, tc, g, grads, rows, filter_eps)


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
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db, filter_eps is not None)
    ck = _Chunker(h, w, bias, temperature, rows_all.numel(), grads=grads.any,
                  entropy=return_entropy, filtered=filter_eps is not None,
                  dw_scratch=grads.dw_scratch)
    wide = whole_batch.plan(h, w, rows_all, grads, filter_eps, ck.c, EXTRA_BUDGET_BYTES,
                            bias=bias is not None)
    if wide is not None:
        loss = whole_batch.fused(*wide, h, ck.w32, ck.bz, ck.inv_tau, t, old_lp, adv, ref_lp,
                                 tok_weight, rows_all, settings, lp,
                                 ent if return_entropy else None, grads)
        return (loss, lp, ent) + grads.finish(h)
    for rows, hc in ck.chunks(h, rows_all):
        loss += _fused_chunk(ck, rows, hc, t[rows], old_lp, adv, ref_lp, tok_weight,
                             settings, lp, ent if return_entropy else None, grads, filter_eps)
    return (loss, lp, ent) + grads.finish(h)


def _fused_chunk(ck, rows, hc, tc, old_lp, adv, ref_lp, tok_weight, settings, lp, ent,
                 grads, filter_eps):
    """One chunk of the fused loss; returns its share of the loss."""
    z, hz = ck.logits(hc)
    lse_c, zt = ck.softmax_(z, tc, hz)  # z now holds the softmax p
    lp_c = zt - lse_c
    lp[rows] = lp_c
    if ent is not None:
        ent[rows] = _entropy(z)
    ref_c = None if ref_lp is None else ref_lp[rows]
    tw = tok_weight[rows]
    loss_t, g, _ = loss_and_grad(lp_c, old_lp[rows], adv[rows], ref_c, tw, settings)
    keep = g != 0  # Pre-CLIP / PPO-clipped / zero-weight rows: no gradient GEMMs
    if grads.any and bool(keep.any()):
        if not bool(keep.all()):
            order = _compact_rows(z, keep)
            z = z[:order.numel()]
            rows, hc, tc, g = rows[order], hc[order], tc[order], g[order]
        ck.grads(z, hc, tc, g, grads, rows, filter_eps)
    return (tw * loss_t).sum()


# Backend entry points (called by functional.py) are the custom-op wrappers.
from .custom_ops import make_backend  # noqa: E402  (needs the impls above)

# The op bodies run this module's impls under its canonical name (see custom_ops).
token_logprobs, fused_loss = make_backend("torch_chunked", "r1reward.kernels.torch_chunked")

__all__ = ["token_logprobs", "fused_loss", "EXTRA_BUDGET_BYTES"]
