"""Triton backend: custom ops + autograd wiring for ``functional.py`` (backend "triton").

The kernels are wrapped as ``torch.library`` custom ops (``r1reward::triton_*``) with
fake (meta) implementations and ``register_autograd``, so ``torch.compile`` sees one
opaque node per call instead of tracing into Triton launch code or breaking the graph;
the data-dependent row compaction (a host sync) happens inside the ops. Gradients come
back in the input dtypes (fp32 accumulation inside the kernels).

Entry points (same semantics as ``reference.py``):
``token_logprobs(h2, weight, targets, *, bias, temperature, ignore_index, return_entropy)``
and ``fused_loss(h2, weight, targets, old_lp, adv, ref_lp, tok_weight, valid, *, bias,
temperature, settings, return_entropy, filter_eps)``.
"""
from __future__ import annotations

import contextlib

import torch
from torch import Tensor

from . import triton_bwd, triton_fwd
from .loss_math import LossSettings

_override: dict = {}


@contextlib.contextmanager
def use_config(fwd: dict | None = None, bwd: dict | None = None, splits: int | None = None):
    """Force block configs / vocab split count (tests: tiny shapes, large BLOCK_V)."""
    global _override
    saved = _override
    _override = {"fwd": fwd, "bwd": bwd, "splits": splits}
    try:
        yield
    finally:
        _override = saved


def _cc(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None  # CPU tensors only run under TRITON_INTERPRET=1
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def _fwd_kwargs(h: Tensor) -> dict:
    cfg = _override.get("fwd") or triton_fwd.fwd_config(_cc(h.device), h.dtype)
    sm = (torch.cuda.get_device_properties(h.device).multi_processor_count
          if h.device.type == "cuda" else None)
    return dict(config=cfg, splits=_override.get("splits"), sm_count=sm)


def _bwd_cfg(h: Tensor) -> dict:
    return _override.get("bwd") or triton_bwd.bwd_config(_cc(h.device), h.dtype)


def _prep(h, weight, bias, targets, active):
    """Contiguous operands, the active row index, and a clear error on bad targets."""
    if h.dtype != weight.dtype:
        raise TypeError(f"hidden dtype {h.dtype} differs from weight dtype {weight.dtype}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be [V={weight.shape[0]}], got {tuple(bias.shape)}")
    rows = torch.nonzero(active).flatten()
    bad = (targets[rows] < 0) | (targets[rows] >= weight.shape[0])
    if bool(bad.any()):
        raise ValueError(f"targets: token ids out of range [0, V={weight.shape[0]}) at rows "
                         f"{rows[bad][:5].tolist()} (values {targets[rows][bad][:5].tolist()})")
    return (h.contiguous(), weight.contiguous(),
            None if bias is None else bias.contiguous(), targets.contiguous(), rows)


def _on_device(t: Tensor):
    """Launch on ``t``'s GPU: Triton launches on the *current* CUDA device, which need not
    be the one holding the tensors (e.g. cuda:1 tensors while cuda:0 is current)."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def _empty(h: Tensor) -> Tensor:
    return h.new_empty(0, dtype=torch.float32)


# ---------------------------------------------------------------------------- ops
@torch.library.custom_op("r1reward::triton_logits_bwd", mutates_args=())
def _bwd_op(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor, g: Tensor,
            lse: Tensor, temperature: float, filter_eps: float, need_dh: bool,
            need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
    h, weight = h.contiguous(), weight.contiguous()
    with _on_device(h):
        dh, dw, db = triton_bwd.launch_backward(
            h, weight, bias, targets.contiguous(), g.contiguous(), lse.contiguous(),
            temperature=temperature, config=_bwd_cfg(h), need_dh=need_dh, need_dw=need_dw,
            need_db=need_db, filter_eps=filter_eps if filter_eps >= 0 else None)
    cast = lambda t, like: _empty(h) if t is None else t.to(like.dtype)  # noqa: E731
    return cast(dh, h), cast(dw, weight), cast(db, bias if bias is not None else h)


@_bwd_op.register_fake
def _(h, weight, bias, targets, g, lse, temperature, filter_eps, need_dh, need_dw, need_db):
    return (torch.empty_like(h) if need_dh else _empty(h),
            torch.empty_like(weight) if need_dw else _empty(h),
            torch.empty_like(bias) if (need_db and bias is not None) else _empty(h))


@torch.library.custom_op("r1reward::triton_token_logprobs", mutates_args=())
def _tlp_op(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
            temperature: float, ignore_index: int, need_lse: bool,
            want_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
    h, weight, bias, targets, rows = _prep(h, weight, bias, targets, targets != ignore_index)
    with _on_device(h):
        out = triton_fwd.launch_forward(h, weight, bias, targets, rows, temperature=temperature,
                                        entropy=want_entropy, store_lse=need_lse,
                                        **_fwd_kwargs(h))
    return (out["lp"], out["lse"] if need_lse else _empty(h),
            out["entropy"] if want_entropy else _empty(h))


@_tlp_op.register_fake
def _(h, weight, bias, targets, temperature, ignore_index, need_lse, want_entropy):
    n = h.shape[0]
    f = dict(dtype=torch.float32)
    return (h.new_empty(n, **f), h.new_empty(n if need_lse else 0, **f),
            h.new_empty(n if want_entropy else 0, **f))


def _tlp_setup(ctx, inputs, output):
    h, weight, bias, targets, temperature, ignore_index, _, _ = inputs
    ctx.save_for_backward(h, weight, bias, targets, output[1])
    ctx.temperature, ctx.ignore_index = temperature, ignore_index


def _tlp_backward(ctx, grad_lp, grad_lse, grad_ent):
    h, weight, bias, targets, lse = ctx.saved_tensors
    # lp is the constant 0 at ignored rows: their incoming gradient must not leak in.
    g = torch.where(targets != ctx.ignore_index, grad_lp.float(), 0.0)
    return _grads(ctx, h, weight, bias, targets, g, lse, -1.0, n_rest=5)


_tlp_op.register_autograd(_tlp_backward, setup_context=_tlp_setup)


@torch.library.custom_op("r1reward::triton_fused_loss", mutates_args=())
def _fused_op(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
              old_lp: Tensor, adv: Tensor, ref_lp: Tensor | None, tok_weight: Tensor,
              valid: Tensor, temperature: float, preclip_lo: float, preclip_hi: float,
              use_preclip: bool, clip_lo: float, clip_hi: float, dual_c: float,
              use_dual: bool, kl_coef: float, kl_estimator: str, want_entropy: bool,
              filter_eps: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    # Every valid row needs a real token id (-100 there is an error, as in the torch backend).
    h, weight, bias, targets, rows = _prep(h, weight, bias, targets, valid)
    f = lambda t: t.to(torch.float32).contiguous()  # noqa: E731
    loss_args = dict(old=f(old_lp), adv=f(adv), ref=None if ref_lp is None else f(ref_lp),
                     tok_w=f(tok_weight), preclip=(preclip_lo, preclip_hi) if use_preclip else None,
                     clip=(clip_lo, clip_hi), dual_clip=dual_c if use_dual else None,
                     kl_coef=kl_coef, kl_estimator=kl_estimator)
    with _on_device(h):
        out = triton_fwd.launch_forward(h, weight, bias, targets, rows, temperature=temperature,
                                        entropy=want_entropy, store_lse=True,
                                        loss_args=loss_args, **_fwd_kwargs(h))
    # loss_t is 0 off the active rows, so the weighted sum needs no extra mask.
    loss = (loss_args["tok_w"] * out["loss_t"]).sum()
    return (loss, out["lp"], out["entropy"] if want_entropy else _empty(h), out["g"], out["lse"])


@_fused_op.register_fake
def _(h, weight, bias, targets, old_lp, adv, ref_lp, tok_weight, valid, temperature,
      preclip_lo, preclip_hi, use_preclip, clip_lo, clip_hi, dual_c, use_dual, kl_coef,
      kl_estimator, want_entropy, filter_eps):
    n = h.shape[0]
    f = dict(dtype=torch.float32)
    return (h.new_empty((), **f), h.new_empty(n, **f), h.new_empty(n if want_entropy else 0, **f),
            h.new_empty(n, **f), h.new_empty(n, **f))


def _fused_setup(ctx, inputs, output):
    h, weight, bias, targets = inputs[:4]
    ctx.save_for_backward(h, weight, bias, targets, output[3], output[4])
    ctx.temperature, ctx.filter_eps = inputs[9], inputs[20]


def _fused_backward(ctx, grad_loss, grad_lp, grad_ent, grad_g, grad_lse):
    h, weight, bias, targets, g, lse = ctx.saved_tensors
    # g = w·dloss/dlp was computed in the forward epilogue; only rescale it.
    return _grads(ctx, h, weight, bias, targets, g * grad_loss.float(), lse, ctx.filter_eps,
                  n_rest=18)


_fused_op.register_autograd(_fused_backward, setup_context=_fused_setup)


def _grads(ctx, h, weight, bias, targets, g, lse, filter_eps, n_rest):
    need_dh, need_dw, need_db = ctx.needs_input_grad[:3]
    dh, dw, db = _bwd_op(h, weight, bias, targets, g, lse, ctx.temperature, filter_eps,
                         need_dh, need_dw, bool(need_db and bias is not None))
    return ((dh if need_dh else None), (dw if need_dw else None),
            (db if need_db and bias is not None else None)) + (None,) * n_rest


# ---------------------------------------------------------------------- entry points
def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def token_logprobs(h2, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False):
    """``(lp fp32 [N], entropy fp32 [N] or None)``; lp differentiable w.r.t. h2/weight/bias.

    Without grad (old / reference log-probs) the forward-only variant runs: it stores no
    log-sum-exp for a backward pass.
    """
    lp, _, ent = _tlp_op(h2, weight, bias, targets, float(temperature), int(ignore_index),
                         _needs_grad(h2, weight, bias), bool(return_entropy))
    return lp, (ent.detach() if return_entropy else None)


def fused_loss(h2, weight, targets, old_lp, adv, ref_lp, tok_weight, valid, *, bias,
               temperature, settings: LossSettings, return_entropy, filter_eps=None):
    """``(loss 0-dim fp32, lp detached fp32 [N], entropy detached or None)``.

    ``filter_eps`` (float or None = exact) skips backward vocab tiles whose softmax
    gradient is below it everywhere.
    """
    s = settings
    pre = s.preclip if s.preclip is not None else (0.0, 0.0)
    use_kl = s.kl_coef > 0 and ref_lp is not None
    loss, lp, ent, _, _ = _fused_op(
        h2, weight, bias, targets, old_lp, adv, ref_lp if use_kl else None, tok_weight,
        valid.bool(), float(temperature), float(pre[0]), float(pre[1]), s.preclip is not None,
        1.0 - s.clip_eps[0], 1.0 + s.clip_eps[1],
        float(s.dual_clip) if s.dual_clip is not None else 0.0, s.dual_clip is not None,
        float(s.kl_coef) if use_kl else 0.0, s.kl_estimator, bool(return_entropy),
        -1.0 if filter_eps is None else float(filter_eps))
    return loss, lp.detach(), (ent.detach() if return_entropy else None)
