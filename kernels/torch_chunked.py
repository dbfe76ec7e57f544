"""Chunked PyTorch backend ("torch"): never holds ``[N, V]`` logits, runs on any device.

Rows are processed ``C`` at a time against the full vocabulary, with ``C·V·4`` bytes
≤ :data:`LOGIT_BUDGET_BYTES`: one fp32 chunk of logits is alive at a time (a reused
buffer that the matmul writes with ``out=``, or on CPU the oneDNN matmul's output), and
everything after the matmul works in place on it. Inputs of any float dtype are cast to
fp32 per chunk (the weight once per call) so every reduction accumulates in fp32.

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

import contextlib
import ctypes
import mmap
import os

import numpy as np
import torch

from .loss_math import LossSettings, loss_and_grad

# Peak size of the per-chunk logit buffer (the only O(rows·V) allocation).
LOGIT_BUDGET_BYTES = 64 << 20
# In filtered mode, above this fraction of surviving vocab columns the dense GEMMs are
# cheaper than gathering the weight rows (index_select + index_put_ copy H floats per row).
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


def _check_targets(t, vocab, what):
    """A bad token id would index out of the vocabulary: name it instead (one host sync)."""
    if t.numel() and (bool((t < 0).any()) or bool((t >= vocab).any())):
        bad = t[(t < 0) | (t >= vocab)][0].item()
        raise ValueError(f"targets: {what} contains token id {bad} outside [0, V={vocab})")


# CPU fp32: compute the logits GEMM with oneDNN on a weight packed once per call. The
# default CPU BLAS (MKL) is far from peak on AMD CPUs for these shapes (measured on the
# 2-core EPYC dev box, one chunk [103, 2048]·[2048, 151936]: MKL 1.2–1.8 s, packed oneDNN
# 0.46–0.5 s, packing 0.84 s once per call). The other two GEMMs stay on torch.mm: packing
# Wᵀ costs more than it saves, and ∂W accumulates in place.
# Off by default: the packed copy is a second weight-sized buffer (1.2 GB at H=2048,
# V=151936 fp32), which breaks the fused path's O(chunk·V) extra-memory contract (SPEC §6).
# Opt in with R1REWARD_ONEDNN_PACKED_WEIGHT=1 when memory is plentiful and the BLAS is slow.
USE_ONEDNN = os.environ.get("R1REWARD_ONEDNN_PACKED_WEIGHT", "0") == "1"
ONEDNN_MIN_ROWS = 16  # below this, one pass of packing W costs more than it saves
_onednn = None  # None: not probed yet; False: unavailable; else (reorder, linear) ops


def _onednn_ops():
    """The oneDNN packed-linear ops, probed once (internal torch ops: fall back if absent)."""
    global _onednn
    if _onednn is None:
        _onednn = False
        try:
            if torch.backends.mkldnn.is_available():
                reorder = torch.ops.mkldnn._reorder_linear_weight
                linear = torch.ops.mkldnn._linear_pointwise
                x, w = torch.randn(3, 5), torch.randn(7, 5)
                if torch.allclose(linear(x, reorder(w, 3), None, "none", [], ""), x @ w.t(),
                                  atol=1e-5):
                    _onednn = (reorder, linear)
        except (AttributeError, RuntimeError):
            pass
    return _onednn or None


# CPU fp32: the chunk GEMMs go through numpy's BLAS (the OpenBLAS that numpy's wheels
# bundle) instead of torch.mm (MKL in the torch wheel). Measured on the 2-core AMD dev
# box, one chunk at H=2048, V=151936, quiet machine: logits [103, 2048]·[2048, 151936]
# MKL 0.52 s, OpenBLAS 0.38–0.41 s; ∂h [103, 151936]·[151936, 2048] MKL 0.40 s,
# OpenBLAS 0.35 s. Keeping all three GEMMs on one library also avoids handing the cores
# back and forth between two thread pools (the fused call was 5.95 s with only the
# logits GEMM on OpenBLAS, 5.4 s with ∂h too). ∂W accumulates in place (β = 1), which
# numpy's matmul cannot do, so that one calls the same library's cblas_sgemm through
# ctypes (probed and checked once; torch's addmm_ if it is missing). No copies: numpy
# and the BLAS read the tensors' memory. "torch" forces torch.mm everywhere; "auto" uses
# numpy's BLAS above NUMPY_GEMM_MIN_MACS.
CPU_BLAS = os.environ.get("R1REWARD_CPU_BLAS", "auto")
NUMPY_GEMM_MIN_MACS = 1 << 26  # below this the call overheads dominate either way
_blas_ctl = None  # threadpoolctl controller for numpy's BLAS (None: not probed; False: absent)


def _numpy_blas_threads(n: int):
    """Context that runs numpy's BLAS on ``n`` threads (torch's setting), so a process that
    lowered torch's thread count (e.g. one rank of several) does not oversubscribe cores."""
    global _blas_ctl
    if _blas_ctl is None:
        try:
            import threadpoolctl
            _blas_ctl = threadpoolctl.ThreadpoolController().select(user_api="blas")
        except Exception:  # noqa: BLE001 - without it numpy keeps its own thread count
            _blas_ctl = False
    if _blas_ctl and any(lib["num_threads"] != n for lib in _blas_ctl.info()):
        return _blas_ctl.limit(limits=n)
    return contextlib.nullcontext()


_sgemm = None  # numpy's OpenBLAS cblas_sgemm (None: not probed; False: unavailable)
_CBLAS_ROW_MAJOR, _CBLAS_NO_TRANS, _CBLAS_TRANS = 101, 111, 112


def _openblas_sgemm():
    """``cblas_sgemm`` of the OpenBLAS that numpy loaded, or None. Symbol names differ by
    build (numpy's wheels: ILP64 with a ``scipy_`` prefix), so each candidate is checked
    on a small product against numpy before it is used."""
    global _sgemm
    if _sgemm is None:
        _sgemm = False
        try:
            import threadpoolctl
            paths = [lib.filepath for lib in threadpoolctl.ThreadpoolController()
                     .select(internal_api="openblas").lib_controllers]
            for path in paths:
                dll = ctypes.CDLL(path)
                for name, int_t in (("scipy_cblas_sgemm64_", ctypes.c_int64),
                                    ("cblas_sgemm64_", ctypes.c_int64),
                                    ("scipy_cblas_sgemm", ctypes.c_int32),
                                    ("cblas_sgemm", ctypes.c_int32)):
                    fn = getattr(dll, name, None)
                    if fn is None:
                        continue
                    fn.restype = None
                    ptr, f32 = ctypes.c_void_p, ctypes.c_float
                    fn.argtypes = ([ctypes.c_int] * 3 + [int_t] * 3
                                   + [f32, ptr, int_t, ptr, int_t, f32, ptr, int_t])
                    if _sgemm_matches_numpy(fn):
                        _sgemm = fn
                        return fn
        except Exception:  # noqa: BLE001 - any failure: torch's addmm_ does the work
            _sgemm = False
    return _sgemm or None


def _sgemm_matches_numpy(fn) -> bool:
    rng = np.random.default_rng(0)
    a = rng.standard_normal((5, 7), dtype=np.float32)  # p: [c=5, V=7]
    b = rng.standard_normal((5, 3), dtype=np.float32)  # hs: [c, H=3]
    c = rng.standard_normal((7, 3), dtype=np.float32)  # ∂W: [V, H]
    want = c + a.T @ b
    fn(_CBLAS_ROW_MAJOR, _CBLAS_TRANS, _CBLAS_NO_TRANS, 7, 3, 5, 1.0, a.ctypes.data, 7,
       b.ctypes.data, 3, 1.0, c.ctypes.data, 3)
    return bool(np.allclose(c, want, atol=1e-5))


def _sgemm_at_b(sgemm, a, b, c, accumulate: bool) -> None:
    """``c (+)= aᵀ·b`` in place: a [k, m] with unit column stride, b [k, n] and c [m, n]
    contiguous, all fp32 CPU."""
    k, m = a.shape
    n = b.shape[1]
    sgemm(_CBLAS_ROW_MAJOR, _CBLAS_TRANS, _CBLAS_NO_TRANS, m, n, k, 1.0, a.data_ptr(),
          a.stride(0), b.data_ptr(), n, 1.0 if accumulate else 0.0, c.data_ptr(), n)


class _Chunker:
    """Per-call state: fp32 weight (and its oneDNN packing), scaled bias, the chunk size and
    the one reused chunk buffer (``C·V·4 ≤ LOGIT_BUDGET_BYTES``)."""

    def __init__(self, h, w, bias, temperature, n_rows):
        self.w32 = w.to(torch.float32).contiguous()  # no copy for a contiguous fp32 weight
        self.w32t = self.w32.t()
        self.inv_tau = 1.0 / temperature
        self.bz = None if bias is None else bias.to(torch.float32) * self.inv_tau
        vocab = w.shape[0]
        self.c = rows_per_chunk(n_rows, vocab)
        ops = (_onednn_ops() if USE_ONEDNN and h.device.type == "cpu"
               and n_rows >= ONEDNN_MIN_ROWS else None)
        self.buf = self.packed = self.w_np = None
        if (CPU_BLAS != "torch" and ops is None and h.device.type == "cpu"
                and (CPU_BLAS == "numpy"
                     or min(self.c, n_rows) * vocab * w.shape[1] >= NUMPY_GEMM_MIN_MACS)):
            self.w_np = self.w32.detach().numpy().T  # a view: Wᵀ as a transposed operand
        if ops is not None:
            self.linear = ops[1]
            self.packed = ops[0](self.w32, self.c)
        else:
            self.buf = torch.empty(min(self.c, max(n_rows, 1)), vocab, dtype=torch.float32,
                                   device=h.device)

    def chunks(self, h, rows_all):
        """Yield ``(rows, hc fp32)`` for consecutive row chunks."""
        for s0 in range(0, rows_all.numel(), self.c):
            rows = rows_all[s0:s0 + self.c]
            yield rows, h.index_select(0, rows).to(torch.float32)

    def logits(self, hc):
        """``(z, hz)``: ``z = (hc·Wᵀ + b)/τ`` [c, V] fp32 and ``hz = hc/τ`` (1/τ is folded into
        the small hc). Without oneDNN, z is written into the reused buffer; with it, z is
        the op's output (callers drop it before the next chunk, so one chunk is alive)."""
        hz = hc * self.inv_tau if self.inv_tau != 1.0 else hc
        if self.packed is not None:
            return self.linear(hz, self.packed, self.bz, "none", [], ""), hz
        z = self.buf[:hc.shape[0]]
        if self.w_np is not None:
            with _numpy_blas_threads(torch.get_num_threads()):
                np.matmul(hz.detach().numpy(), self.w_np, out=z.numpy())
            if self.bz is not None:
                z += self.bz
        elif self.bz is None:
            torch.mm(hz, self.w32t, out=z)
        else:
            torch.addmm(self.bz, hz, self.w32t, out=z)
        return z, hz

    def mm_w(self, p, w32):
        """``p·W`` [c, H] (∂h's GEMM); on numpy's BLAS when the logits GEMM is (see above)."""
        if self.w_np is None:
            return torch.mm(p, w32)
        out = torch.empty(p.shape[0], w32.shape[1], dtype=torch.float32)
        with _numpy_blas_threads(torch.get_num_threads()):
            np.matmul(p.detach().numpy(), w32.detach().numpy(), out=out.numpy())
        return out

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
        w32 = self.w32
        cols = None
        if filter_eps is not None:
            # Columns where some row's softmax reaches filter_eps, plus the targets (their
            # entry is p_t − 1). The threshold is relative to a unit upstream gradient, as
            # in Cut Cross-Entropy's gradient filter. One column-max pass over the chunk.
            keep = p.amax(dim=0) >= filter_eps
            keep[tc] = True
            idx = keep.nonzero().squeeze(1)
            if idx.numel() < FILTER_DENSE_FRACTION * p.shape[1]:
                cols = idx
                # Targets in the compacted column numbering, for the one-hot below.
                tc = torch.searchsorted(cols, tc)
                p = p.index_select(1, cols)
                w32 = w32.index_select(0, cols)
        flat = torch.arange(p.shape[0], device=p.device) * p.shape[1] + tc
        p.view(-1)[flat] -= 1.0  # p − onehot
        if grads.dh is not None:
            grads.dh.index_copy_(0, rows, self.mm_w(p, w32).mul_(s[:, None]))
        if grads.dw is not None:
            grads.add_dw(p, hc * s[:, None], cols,
                         _openblas_sgemm() if self.w_np is not None else None)
        if grads.db is not None:
            db = torch.mv(p.t(), s)
            if cols is None:
                grads.db += db
            else:
                grads.db.index_put_((cols,), db, accumulate=True)


# Below this target probability ``log p_t`` loses precision (fp32 subnormals start ~1e-38).
_TINY_P = 1e-30


def _entropy(p):
    """``−Σ p·log p`` per row, in vocab blocks so the temporary stays small."""
    acc = p.new_zeros(p.shape[0])
    for v0 in range(0, p.shape[1], _ENTROPY_BLOCK):
        blk = p[:, v0:v0 + _ENTROPY_BLOCK]
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


def _zeros_like(t):
    """Zeros; on CPU from a lazily zero-filled anonymous mapping without huge pages.

    In filtered mode only the surviving vocab rows of ∂W are ever written, so the rest
    never costs a page fault or a fill pass (``torch.zeros`` touches all of a [V, H]).
    Huge pages are turned off for this mapping: with transparent huge pages on, each
    scattered 8 KB row write faulted in (and zeroed) a whole 2 MB page, which made the
    few hundred surviving rows of a Qwen-sized ∂W cost 0.4–1.8 s (measured) instead of
    milliseconds.
    """
    if t.device.type == "cpu" and t.dtype == torch.float32 and t.numel():
        buf = mmap.mmap(-1, t.numel() * 4)
        if hasattr(mmap, "MADV_NOHUGEPAGE"):
            buf.madvise(mmap.MADV_NOHUGEPAGE)
        return torch.from_numpy(np.frombuffer(buf, dtype=np.float32).reshape(t.shape))
    return torch.zeros_like(t)


class _Grads:
    """fp32 gradient accumulators for one call; ``finish`` casts to the input dtypes."""

    def __init__(self, h, w, bias, need_dh, need_dw, need_db):
        self.dh = h.new_zeros(h.shape, dtype=torch.float32) if need_dh else None
        # Left uninitialised: the first dense chunk writes it with mm(out=), saving a
        # zero-fill pass over [V, H] (≈1% of the whole call at Qwen scale on CPU).
        self.dw = w.new_empty(w.shape, dtype=torch.float32) if need_dw else None
        self.dw_ready = False
        self.db = (bias.new_zeros(bias.shape, dtype=torch.float32)
                   if need_db and bias is not None else None)
        self.dtypes = (h.dtype, w.dtype, None if bias is None else bias.dtype)

    @property
    def any(self):
        return self.dh is not None or self.dw is not None or self.db is not None

    def add_dw(self, p, hs, cols, sgemm=None):
        """``∂W += pᵀ·hs`` (rows ``cols`` only in filtered mode); ``sgemm``: numpy's BLAS."""
        if cols is None:
            if (sgemm is not None and p.stride(1) == 1 and hs.is_contiguous()
                    and self.dw.is_contiguous() and self.dw.dtype == torch.float32):
                with _numpy_blas_threads(torch.get_num_threads()):
                    _sgemm_at_b(sgemm, p, hs, self.dw, accumulate=self.dw_ready)
            elif self.dw_ready:
                self.dw.addmm_(p.t(), hs)
            else:
                torch.mm(p.t(), hs, out=self.dw)
        else:
            if not self.dw_ready:
                self.dw = _zeros_like(self.dw)
            # index_put_ with accumulate: index_add_ on CPU costs time ∝ the whole [V, H].
            self.dw.index_put_((cols,), torch.mm(p.t(), hs), accumulate=True)
        self.dw_ready = True

    def finish(self, ref):
        if self.dw is not None and not self.dw_ready:
            self.dw = _zeros_like(self.dw)
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
    ck = _Chunker(h, w, bias, temperature, rows_all.numel())
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
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db)
    g_all = grad_lp.to(torch.float32)
    rows_all = ((t != ignore_index) & (g_all != 0)).nonzero().squeeze(1)
    if grads.any and rows_all.numel():
        ck = _Chunker(h, w, bias, temperature, rows_all.numel())
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
    grads = _Grads(h, w, bias, need_dh, need_dw, need_db)
    ck = _Chunker(h, w, bias, temperature, rows_all.numel())
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

__all__ = ["token_logprobs", "fused_loss", "rows_per_chunk", "LOGIT_BUDGET_BYTES"]
