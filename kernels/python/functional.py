"""Public functional API: shape handling, validation, backend choice (in one place).

Backends implement the same two entry points on flattened ``[N, H]`` inputs:
``token_logprobs(...) -> (lp, entropy)`` and ``fused_loss(...) -> (loss, lp, entropy)``.
"""
from __future__ import annotations

import importlib

import torch

from . import entropy as _entropy
from . import reference as _reference
from . import torch_chunked as _torch_chunked
from .loss_math import (
    DEFAULT_PRECLIP,
    LossSettings,
    broadcast_advantages,
    kl_penalty,
    loss_and_grad,
    loss_stats,
    per_token_loss,
    token_weights,
)

# "triton-rows": the row-chunked exact path (cuBLAS GEMMs + a Triton row kernel), named
# only: it is not "auto"'s choice on CUDA until a GPU measurement says it should be.
BACKENDS = ("auto", "triton", "triton-rows", "torch", "reference")
_MODULES = {"triton": ".triton_ops", "triton-rows": ".rows_chunked", "torch": ".torch_chunked",
            "reference": ".reference"}
# Backends without optional dependencies are imported up front: torch.compile cannot trace
# importlib.import_module, so a lazy import inside a compiled function would break the graph.
_LOADED = {"torch": _torch_chunked, "reference": _reference}


def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if device.type == "cuda" and _triton_available() else "torch"
    if backend.startswith("triton") and device.type != "cuda" and not _interpreting():
        raise ValueError(f"backend={backend!r} needs CUDA tensors (or TRITON_INTERPRET=1 for "
                         "CPU testing); use backend='torch' on CPU")
    return backend


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _backend_module(name: str):
    mod = _LOADED.get(name)
    if mod is None:
        mod = _LOADED[name] = importlib.import_module(_MODULES[name], __package__)
    return mod


def _check_plain_tensors(**tensors):
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch without distributed
        DTensor = ()
    for name, t in tensors.items():
        if t is None:
            continue
        if isinstance(t, DTensor):
            raise TypeError(
                f"{name} is a DTensor (an FSDP2-sharded parameter). The fused kernels need the "
                "full, unsharded lm_head weight: call the loss inside the forward of an FSDP "
                "unit that owns lm_head (e.g. fully_shard([norm, lm_head], "
                "reshard_after_forward=False) and compute the loss in that module), or pass "
                f"{name}.full_tensor() yourself.")
        full = getattr(t, "ds_shape", None)  # DeepSpeed ZeRO-3 keeps the full shape here
        if full is not None and tuple(t.shape) != tuple(full):
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but its full shape is {tuple(full)}: it is a "
                "DeepSpeed ZeRO-3 partitioned parameter. Gather it around the loss call: "
                f"`with deepspeed.zero.GatheredParameters([lm_head.{name}]): ...`.")


def _flatten(hidden, weight, targets):
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, H], got shape {tuple(weight.shape)}")
    if hidden.shape[-1] != weight.shape[-1]:
        raise ValueError(f"hidden [..., H={hidden.shape[-1]}] does not match weight "
                         f"[V, H={weight.shape[-1]}]")
    if targets.shape != hidden.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must equal hidden's leading "
                         f"shape {tuple(hidden.shape[:-1])}")
    return hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, entropy_grad=False, backend="auto"):
    """Log-probability of each target token, without building ``[tokens × vocab]`` logits.

    hidden ``[..., H]``, weight ``[V, H]`` (lm_head), targets ``[...]`` (int64). Returns fp32
    ``logp`` of shape ``[...]`` (0 where ``targets == ignore_index``), differentiable with
    respect to ``hidden``, ``weight`` and ``bias``; with ``return_entropy=True`` also the
    entropy of each position's distribution, detached unless ``entropy_grad=True`` (for an
    entropy bonus: a checkpointed chunked path, about two logit GEMMs dearer, any device).
    """
    _check_plain_tensors(hidden=hidden, weight=weight, bias=bias)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if entropy_grad and not return_entropy:
        raise ValueError("entropy_grad=True needs return_entropy=True")
    lead = targets.shape
    h2, t2 = _flatten(hidden, weight, targets)
    if entropy_grad:
        resolve_backend(backend, hidden.device)  # the same errors for a bad name
        lp, ent = _entropy.token_logprobs_entropy(h2, weight, t2, bias=bias,
                                                  temperature=float(temperature),
                                                  ignore_index=ignore_index)
        return lp.reshape(lead), ent.reshape(lead)
    mod = _backend_module(resolve_backend(backend, hidden.device))
    lp, ent = mod.token_logprobs(h2, weight, t2, bias=bias, temperature=float(temperature),
                                 ignore_index=ignore_index, return_entropy=return_entropy)
    lp = lp.reshape(lead)
    if return_entropy:
        return lp, ent.reshape(lead)
    return lp


REDUCTIONS = ("aggregate", "none")


def stable_reinforce_loss(logp, old_logp, advantages, mask, *, ref_logp=None,
                          preclip=DEFAULT_PRECLIP, clip_eps=(0.2, 0.2), dual_clip=None,
                          kl_coef=0.0, kl_estimator="k3", aggregation="token-mean",
                          normalizer=None, is_weights=None, reduction="aggregate"):
    """StableReinforce loss from per-token log-probs ``[B, T]``.

    ``advantages`` is per token ``[B, T]`` or per sequence ``[B]``; ``mask`` ``[B, T]``
    marks response tokens. ``old_logp=None`` is the on-policy case (old = ``logp``
    detached: ratio 1, policy-gradient gradient, no extra forward for old log-probs).
    ``is_weights`` ``[B, T]`` or ``[B]`` multiply each token's policy term (detached
    importance weights, e.g. trainer/sampler mismatch; the KL term is not weighted).
    ``normalizer`` replaces the aggregation's local denominator by a global one (see
    :func:`token_weights`). ``reduction="none"``
    returns the per-token loss ``[B, T]`` (importance-weighted, 0 off the mask) for the
    caller's own aggregation. Returns ``(loss, stats)``; stats are detached 0-dim tensors:
    preclip_frac, clip_frac, ratio_mean/max/min, log-ratio quantiles, approx_kl (ref_kl).
    """
    s = LossSettings(preclip=preclip, clip_eps=tuple(clip_eps), dual_clip=dual_clip,
                     kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation)
    _check_reduction(reduction)
    old_logp = logp.detach() if old_logp is None else old_logp
    _check_loss_shapes(logp, old_logp, mask, ref_logp)
    cd = torch.promote_types(logp.dtype, torch.float32)  # fp32, or fp64 for an oracle
    adv = broadcast_advantages(advantages, mask).to(cd)
    isw = _importance_weights(is_weights, mask)
    valid = mask.bool()
    old = old_logp.to(cd)
    ref = None if ref_logp is None else ref_logp.to(cd)
    if isw is None:
        loss_t = per_token_loss(logp.to(cd), old, adv, ref, s)
    else:  # the weights correct the policy term only, as in verl, TRL and OpenRLHF
        loss_t = per_token_loss(logp.to(cd), old, adv, None, s) * isw.to(cd)
        if s.kl_coef > 0 and ref is not None:
            loss_t = loss_t + s.kl_coef * kl_penalty(logp.to(cd), ref, s.kl_estimator)
    loss_t = torch.where(valid, loss_t, torch.zeros_like(loss_t))
    w = token_weights(mask, s.aggregation, normalizer).to(cd)
    f32 = [None if t is None else t.float() for t in (old, adv, ref)]
    _, _, parts = loss_and_grad(logp.detach().float(), *f32, w.float(), s)
    stats = loss_stats(logp.detach(), f32[0], f32[2], valid, parts)
    if reduction == "none":
        return loss_t, stats
    return (w * loss_t).sum(), stats


def fused_stable_reinforce_loss(hidden, weight, targets, old_logp, advantages, mask, *,
                                ref_logp=None, preclip=DEFAULT_PRECLIP, clip_eps=(0.2, 0.2),
                                dual_clip=None, kl_coef=0.0, kl_estimator="k3",
                                aggregation="token-mean", normalizer=None, is_weights=None,
                                entropy_coef=0.0, reduction="aggregate", bias=None,
                                temperature=1.0, return_entropy=False, filter_eps=None,
                                backend="auto"):
    """StableReinforce loss straight from hidden states ``[B, T, H]`` and lm_head ``[V, H]``.

    Same settings and return value as :func:`stable_reinforce_loss`; targets ``[B, T]``
    are the sampled tokens. ``filter_eps`` (float or ``"auto"`` = bf16 resolution) skips
    vocabulary tiles whose softmax gradient is below it; ``None`` (default) is exact.
    ``entropy_coef`` > 0 subtracts ``entropy_coef · Σ w·H`` (an entropy bonus with its
    gradient, aggregated with the loss's own weights). The one-pass fused kernel serves
    the off-policy case; on-policy (``old_logp=None``), ``reduction="none"`` and the
    entropy bonus go through :func:`token_logprobs` and then the loss math, still without
    ``[tokens × vocab]`` logits.
    """
    s = LossSettings(preclip=preclip, clip_eps=tuple(clip_eps), dual_clip=dual_clip,
                     kl_coef=kl_coef, kl_estimator=kl_estimator, aggregation=aggregation)
    _check_plain_tensors(hidden=hidden, weight=weight, bias=bias)
    _check_reduction(reduction)
    if entropy_coef < 0:
        raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
    _check_loss_shapes(targets, old_logp, mask, ref_logp)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if filter_eps == "auto":
        filter_eps = BF16_FILTER_EPS
    kw = dict(ref_logp=ref_logp, preclip=s.preclip, clip_eps=s.clip_eps, dual_clip=s.dual_clip,
              kl_coef=s.kl_coef, kl_estimator=s.kl_estimator, aggregation=s.aggregation,
              normalizer=normalizer, is_weights=is_weights)
    kl_weighted = is_weights is not None and s.kl_coef > 0 and ref_logp is not None
    if old_logp is None or reduction == "none" or entropy_coef > 0 or kl_weighted:
        # Two steps: log-probs (and entropy) by the kernels, then the O(tokens) loss math.
        tgt = torch.where(mask.bool(), targets, torch.full_like(targets, -100))
        with_ent = return_entropy or entropy_coef > 0
        out = token_logprobs(hidden, weight, tgt, bias=bias, temperature=temperature,
                             return_entropy=with_ent, entropy_grad=entropy_coef > 0,
                             backend=backend)
        lp, ent = out if with_ent else (out, None)
        loss, stats = stable_reinforce_loss(lp, old_logp, advantages, mask, reduction=reduction, **kw)
        if ent is not None:
            stats["entropy"] = _masked_mean(ent.detach(), mask)
        if entropy_coef > 0:
            if reduction == "none":
                loss = loss - entropy_coef * torch.where(mask.bool(), ent, torch.zeros_like(ent))
            else:
                loss = loss - entropy_coef * (token_weights(mask, s.aggregation, normalizer) * ent).sum()
        return loss, stats
    h2, t2 = _flatten(hidden, weight, targets)
    valid = mask.bool()
    adv = broadcast_advantages(advantages, mask).to(torch.float32).reshape(-1)
    w = token_weights(mask, s.aggregation, normalizer)
    isw = _importance_weights(is_weights, mask)
    if isw is not None:
        w = w * isw
    w = w.reshape(-1)
    old = old_logp.to(torch.float32).reshape(-1)
    ref = None if ref_logp is None else ref_logp.to(torch.float32).reshape(-1)
    mod = _backend_module(resolve_backend(backend, hidden.device))
    loss, lp, ent = mod.fused_loss(h2, weight, t2, old, adv, ref, w, valid.reshape(-1),
                                   bias=bias, temperature=float(temperature), settings=s,
                                   return_entropy=return_entropy, filter_eps=filter_eps)
    _, _, parts = loss_and_grad(lp, old, adv, ref, w, s)
    stats = loss_stats(lp, old, ref, valid.reshape(-1), parts, entropy=ent)
    return loss, stats


def _check_reduction(reduction):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def _importance_weights(is_weights, mask):
    """``[B]`` or ``[B, T]`` importance weights as detached fp32 ``[B, T]`` (or None)."""
    if is_weights is None:
        return None
    if is_weights.dim() == 1:
        if is_weights.shape[0] != mask.shape[0]:
            raise ValueError(f"is_weights [B] has B={is_weights.shape[0]} but mask is "
                             f"{tuple(mask.shape)}")
        is_weights = is_weights[:, None].expand_as(mask)
    elif is_weights.shape != mask.shape:
        raise ValueError(f"is_weights must be [B] or [B, T] = {tuple(mask.shape)}, got "
                         f"{tuple(is_weights.shape)}")
    return is_weights.detach().to(torch.float32)


def _masked_mean(x, mask):
    m = mask.to(torch.float32)
    return (x.float() * m).sum() / m.sum().clamp_min(1.0)


# Softmax-gradient entries below this are invisible in a bf16 gradient of magnitude ~1.
BF16_FILTER_EPS = 2.0 ** -8 / 32


def _check_loss_shapes(logp, old_logp, mask, ref_logp):
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in (("logp/targets", logp), ("old_logp", old_logp), ("ref_logp", ref_logp)):
        if t is not None and t.shape != mask.shape:
            raise ValueError(f"{name} must have the mask's shape {tuple(mask.shape)}, "
                             f"got {tuple(t.shape)}")


__all__ = ["token_logprobs", "stable_reinforce_loss", "fused_stable_reinforce_loss",
           "resolve_backend", "BACKENDS", "BF16_FILTER_EPS", "REDUCTIONS"]
