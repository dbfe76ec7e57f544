"""Row-chunked exact backend ("triton-rows"): cuBLAS GEMMs + one Triton row kernel per chunk.

Per chunk of ``C`` active rows: ``z = hc·Wᵀ`` (cuBLAS, fp32 output), the row kernel
(:mod:`.triton_rows`: lse, log-prob, entropy, loss, ``g`` and ``dz`` in the operand
dtype), then ``∂h[rows] = dz·W`` and ``∂W += dzᵀ·hc`` (cuBLAS, fp32 accumulation). The
only host sync is the active-row count, once per call. Exact only (no ``filter_eps``);
bf16/fp32 (fp16's ``dz`` would underflow in the GEMM operand: use backend "triton").

A named backend, not the CUDA default: whether it beats the fused Triton kernels needs a
GPU measurement (``python -m bench.gpu_check``). ``token_logprobs`` is the Triton one.
"""
from __future__ import annotations

import torch

from . import triton_ops, triton_rows
from .loss_math import LossSettings
from .torch_chunked import _check_targets, token_logprobs_bwd_impl, token_logprobs_fwd_impl

# The fp32 logit chunk plus the dz chunk of a call (GPU: big chunks keep cuBLAS efficient).
CHUNK_BYTES = 1 << 30
MAX_CHUNK_ROWS = None  # tests: force several chunks


def _mm32(a, b, out=None):
    """``a·b`` with an fp32 result. 16-bit CUDA operands: cuBLAS with fp32 output; on CPU
    (interpreter tests only) the operands are upcast."""
    if a.dtype == torch.float32:
        return torch.mm(a, b, out=out)
    if a.is_cuda:
        if out is None:
            return torch.ops.aten.mm.dtype(a, b, torch.float32)
        return torch.ops.aten.mm.dtype_out(a, b, torch.float32, out=out)
    return torch.mm(a.float(), b.float(), out=out)


def _addmm32_(c, a, b):
    """``c += a·b`` in place, ``c`` fp32."""
    if a.dtype == torch.float32:
        c.addmm_(a, b)
    elif a.is_cuda:
        torch.ops.aten.addmm.dtype_out(c, a, b, torch.float32, out=c)
    else:
        c.addmm_(a.float(), b.float())


def chunk_rows(n_rows: int, vocab: int, dz_bytes: int) -> int:
    per_row = vocab * (4 + dz_bytes)
    c = max(1, min(max(n_rows, 1), CHUNK_BYTES // per_row))
    return c if MAX_CHUNK_ROWS is None else min(c, MAX_CHUNK_ROWS)


def fused_loss_impl(h, w, t, old_lp, adv, ref_lp, tok_weight, valid, bias, temperature,
                    settings: LossSettings, return_entropy, filter_eps,
                    need_dh, need_dw, need_db):
    """Same contract as :func:`.torch_chunked.fused_loss_impl` (exact mode only)."""
    if filter_eps is not None:
        raise ValueError("backend='triton-rows' is exact only: use backend='triton' for filter_eps")
    if h.dtype == torch.float16:
        raise TypeError("backend='triton-rows' takes bf16 or fp32 (fp16 dz underflows in the "
                        "GEMM operand); use backend='triton' for fp16")
    if h.dtype != w.dtype:
        raise TypeError(f"hidden dtype {h.dtype} differs from weight dtype {w.dtype}")
    n, vocab = h.shape[0], w.shape[0]
    h, w = h.contiguous(), w.contiguous()
    rows_all = valid.nonzero().squeeze(1)  # the one host sync of the call
    _check_targets(t[rows_all], vocab, "a position where mask is true")
    f32 = dict(device=h.device, dtype=torch.float32)
    out = {"lp": torch.zeros(n, **f32), "loss_t": torch.zeros(n, **f32),
           "entropy": torch.zeros(n if return_entropy else 0, **f32)}
    la = _loss_args(old_lp, adv, ref_lp, tok_weight, settings)
    dh = torch.zeros_like(h) if need_dh else None
    dw = torch.zeros(w.shape, **f32) if need_dw else None
    db = torch.zeros(vocab, **f32) if need_db and bias is not None else None
    c = chunk_rows(rows_all.numel(), vocab, 0 if h.dtype == torch.float32 else h.element_size())
    z = torch.empty(min(c, max(rows_all.numel(), 1)), vocab, **f32)
    dzb = z if h.dtype == torch.float32 else torch.empty(z.shape, device=h.device, dtype=h.dtype)
    cfg = triton_rows.row_config(h.device)
    tc = t.contiguous()
    with triton_ops._on_device(h):
        for s0 in range(0, rows_all.numel(), c):
            rows = rows_all[s0:s0 + c]
            hc = h.index_select(0, rows)
            zc, dz = z[:rows.numel()], dzb[:rows.numel()]
            _mm32(hc, w.t(), out=zc)
            triton_rows.launch_rows(zc, dz, bias, rows, tc, la, out, temperature=temperature,
                                    entropy=return_entropy, config=cfg)
            if dh is not None:
                dh.index_copy_(0, rows, _mm32(dz, w).to(dh.dtype))
            if dw is not None:
                _addmm32_(dw, dz.t(), hc)
            if db is not None:
                db += dz.sum(0, dtype=torch.float32)
    loss = (la["tok_w"] * out["loss_t"]).sum()
    empty = h.new_empty(0)
    return (loss, out["lp"], out["entropy"],
            dh if dh is not None else empty,
            dw.to(w.dtype) if dw is not None else empty,
            db.to(bias.dtype) if db is not None else empty)


def _loss_args(old_lp, adv, ref_lp, tok_weight, s: LossSettings) -> dict:
    f = lambda x: x.to(torch.float32).contiguous()  # noqa: E731
    return dict(old=f(old_lp), adv=f(adv), ref=None if ref_lp is None else f(ref_lp),
                tok_w=f(tok_weight), preclip=s.preclip, clip=(1.0 - s.clip_eps[0], 1.0 + s.clip_eps[1]),
                dual_clip=s.dual_clip, kl_coef=s.kl_coef, kl_estimator=s.kl_estimator)


# token_logprobs of this backend is the fused Triton one; the chunked torch impls only
# complete the custom-op set that make_backend registers.
__all__ = ["fused_loss", "token_logprobs", "token_logprobs_fwd_impl", "token_logprobs_bwd_impl",
           "fused_loss_impl"]

from .custom_ops import make_backend  # noqa: E402  (needs the impls above)

_, _fused_loss = make_backend("triton_rows", "r1reward.kernels.rows_chunked")
token_logprobs = triton_ops.token_logprobs


def fused_loss(*args, filter_eps=None, **kwargs):
    """Backend entry point (as :mod:`.triton_ops`'s: ``filter_eps`` optional)."""
    return _fused_loss(*args, filter_eps=filter_eps, **kwargs)
