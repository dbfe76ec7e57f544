"""Wrap a backend's plain-tensor kernels as ``torch.library`` custom ops.

Why: ``torch.compile`` would otherwise trace into the chunk loops (data-dependent
``nonzero``/``.item()`` → graph breaks) or give up on an ``autograd.Function``. As custom
ops with a fake (shape-only) implementation and a registered autograd formula, each
entry point is one opaque node, so ``torch.compile(fullgraph=True)`` works and eager
behaviour is unchanged.

:func:`make_backend` takes the import path of a module defining
``token_logprobs_fwd_impl``, ``token_logprobs_bwd_impl`` and ``fused_loss_impl`` (the
signatures of :mod:`.torch_chunked`'s) and returns the two backend entry points that
``functional.py`` calls. Any backend (e.g. Triton) can reuse it with its own module.

Registration happens once per process and the op bodies always look the impls up in
the canonical module (``r1reward.kernels.…``), so a second import of these sources under
another package name cannot register the same op names twice (that would break the ops).
"""
import importlib

import torch
from torch import Tensor

from .loss_math import LossSettings

NAMESPACE = "r1reward"


def _needs(t):
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _settings_args(s: LossSettings):
    return ([] if s.preclip is None else list(s.preclip), list(s.clip_eps), s.dual_clip,
            float(s.kl_coef), s.kl_estimator)


def _impl(module, attr):
    return getattr(importlib.import_module(module), attr)


def _registered(opname):
    try:
        getattr(getattr(torch.ops, NAMESPACE), opname)
    except (AttributeError, RuntimeError):
        return False
    return True


def make_backend(name, impl_module):
    """``(token_logprobs, fused_loss)`` entry points over ``r1reward::{name}_*`` custom ops
    whose bodies call the ``*_impl`` functions of ``impl_module`` (registered once)."""
    if not _registered(f"{name}_fused_loss"):
        _register(name, impl_module)
    ops = getattr(torch.ops, NAMESPACE)
    lp_fwd = getattr(ops, f"{name}_token_logprobs").default
    fused = getattr(ops, f"{name}_fused_loss").default

    def token_logprobs(h, weight, targets, *, bias, temperature, ignore_index, return_entropy):
        lp, _, ent = lp_fwd(h, weight, targets, bias, float(temperature), int(ignore_index),
                            bool(return_entropy))
        return lp, (ent if return_entropy else None)

    def fused_loss(h, weight, targets, old_lp, adv, ref_lp, tok_weight, valid, *, bias,
                   temperature, settings, return_entropy, filter_eps):
        preclip, clip_eps, dual_clip, kl_coef, kl_est = _settings_args(settings)
        loss, lp, ent, _, _, _ = fused(
            h, weight, targets, old_lp, adv, ref_lp, tok_weight, valid, bias,
            float(temperature), preclip, clip_eps, dual_clip, kl_coef, kl_est,
            bool(return_entropy), None if filter_eps is None else float(filter_eps),
            _needs(h), _needs(weight), _needs(bias))
        return loss, lp, (ent if return_entropy else None)

    return token_logprobs, fused_loss


def _register(name, impl_module):
    def lp_fwd_impl(*a):
        return _impl(impl_module, "token_logprobs_fwd_impl")(*a)

    def lp_bwd_impl(*a):
        return _impl(impl_module, "token_logprobs_bwd_impl")(*a)

    def fused_impl(*a):
        return _impl(impl_module, "fused_loss_impl")(*a)

    # ---- token log-probs: forward op, backward op, autograd glue -------------------
    @torch.library.custom_op(f"{NAMESPACE}::{name}_token_logprobs", mutates_args=())
    def lp_fwd(h: Tensor, w: Tensor, t: Tensor, bias: Tensor | None, temperature: float,
               ignore_index: int, return_entropy: bool) -> tuple[Tensor, Tensor, Tensor]:
        return lp_fwd_impl(h, w, t, bias, temperature, ignore_index, return_entropy)

    @lp_fwd.register_fake
    def _(h, w, t, bias, temperature, ignore_index, return_entropy):
        n = h.shape[0]
        f32 = dict(dtype=torch.float32)
        return h.new_empty(n, **f32), h.new_empty(n, **f32), h.new_empty(n if return_entropy else 0, **f32)

    @torch.library.custom_op(f"{NAMESPACE}::{name}_token_logprobs_bwd", mutates_args=())
    def lp_bwd(grad_lp: Tensor, h: Tensor, w: Tensor, t: Tensor, bias: Tensor | None,
               lse: Tensor, temperature: float, ignore_index: int, need_dh: bool,
               need_dw: bool, need_db: bool) -> tuple[Tensor, Tensor, Tensor]:
        return lp_bwd_impl(grad_lp, h, w, t, bias, lse, temperature, ignore_index,
                           need_dh, need_dw, need_db)

    @lp_bwd.register_fake
    def _(grad_lp, h, w, t, bias, lse, temperature, ignore_index, need_dh, need_dw, need_db):
        return (h.new_empty(h.shape if need_dh else (0,)),
                w.new_empty(w.shape if need_dw else (0,)),
                h.new_empty(0) if bias is None or not need_db else bias.new_empty(bias.shape))

    def lp_setup(ctx, inputs, output):
        h, w, t, bias, temperature, ignore_index, _ = inputs
        ctx.save_for_backward(h, w, t, bias, output[1])
        ctx.temperature, ctx.ignore_index = temperature, ignore_index
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.set_materialize_grads(False)

    def lp_backward(ctx, g_lp, g_lse, g_ent):
        h, w, t, bias, lse = ctx.saved_tensors
        if g_lp is None:  # grads are not materialized: nothing flowed into lp
            return (None,) * 7
        nh, nw, nb = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[3]
        dh, dw, db = lp_bwd(g_lp, h, w, t, bias, lse, ctx.temperature, ctx.ignore_index,
                            nh, nw, nb and bias is not None)
        return (dh if nh else None, dw if nw else None, None,
                db if nb and bias is not None else None, None, None, None)

    lp_fwd.register_autograd(lp_backward, setup_context=lp_setup)

    # ---- fused loss: gradients computed in the forward, backward only scales them ----
    @torch.library.custom_op(f"{NAMESPACE}::{name}_fused_loss", mutates_args=())
    def fused(h: Tensor, w: Tensor, t: Tensor, old_lp: Tensor, adv: Tensor,
              ref_lp: Tensor | None, tok_weight: Tensor, valid: Tensor,
              bias: Tensor | None, temperature: float, preclip: list[float],
              clip_eps: list[float], dual_clip: float | None, kl_coef: float,
              kl_estimator: str, return_entropy: bool, filter_eps: float | None,
              need_dh: bool, need_dw: bool, need_db: bool
              ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
        s = LossSettings(preclip=tuple(preclip) if preclip else None, clip_eps=tuple(clip_eps),
                         dual_clip=dual_clip, kl_coef=kl_coef, kl_estimator=kl_estimator)
        return fused_impl(h, w, t, old_lp, adv, ref_lp, tok_weight, valid, bias, temperature,
                          s, return_entropy, filter_eps, need_dh, need_dw, need_db)

    @fused.register_fake
    def _(h, w, t, old_lp, adv, ref_lp, tok_weight, valid, bias, temperature, preclip,
          clip_eps, dual_clip, kl_coef, kl_estimator, return_entropy, filter_eps,
          need_dh, need_dw, need_db):
        n = h.shape[0]
        f32 = dict(dtype=torch.float32)
        return (h.new_empty((), **f32), h.new_empty(n, **f32),
                h.new_empty(n if return_entropy else 0, **f32),
                h.new_empty(h.shape if need_dh else (0,)),
                w.new_empty(w.shape if need_dw else (0,)),
                h.new_empty(0) if bias is None or not need_db else bias.new_empty(bias.shape))

    def fused_setup(ctx, inputs, output):
        ctx.has_bias = inputs[8] is not None
        ctx.save_for_backward(*output[3:])
        ctx.mark_non_differentiable(*output[1:])
        # Otherwise autograd hands backward zero-filled grads for the unused outputs,
        # one of them [V, H]: a 1.2 GB fill (seconds on CPU) at Qwen scale.
        ctx.set_materialize_grads(False)

    def fused_backward(ctx, g_loss, *_):
        dh, dw, db = ctx.saved_tensors
        need = ctx.needs_input_grad
        if g_loss is None:
            return (None,) * 20
        # The stored grads are d(loss)/d(input); the chain rule only rescales them.
        # loss.backward() seeds 1.0: on CPU, skip the scaling pass over the [V, H] weight
        # grad (≈2% of the call at Qwen scale). Eager only (a data-dependent branch).
        unit = (not torch.compiler.is_compiling() and g_loss.device.type == "cpu"
                and g_loss.item() == 1.0)

        def scale(x):
            return x if unit else (x * g_loss).to(x.dtype)
        return (scale(dh) if need[0] else None, scale(dw) if need[1] else None,
                None, None, None, None, None, None,
                scale(db) if need[8] and ctx.has_bias else None) + (None,) * 11

    fused.register_autograd(fused_backward, setup_context=fused_setup)


__all__ = ["make_backend", "NAMESPACE"]
