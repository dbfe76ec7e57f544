"""StableReinforce per-token loss math (SPEC §3), shared by every backend.

Everything here is O(tokens): it turns per-token log-probs into per-token losses and
``g = dL/dlogp``. The fused kernels compute log-probs from hidden states and then call
into this math (the Triton forward kernel re-implements :func:`loss_and_grad` in its
epilogue and is tested against it).

Aggregation is expressed as per-token weights ``w`` derived from the mask, so that the
batch loss is always ``sum_t w_t * loss_t`` and ``dL/dlogp_t = w_t * dloss_t/dlogp_t``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")
DEFAULT_PRECLIP = (math.log(1e-3), math.log(1e3))


@dataclass(frozen=True)
class LossSettings:
    """Hyper-parameters of the StableReinforce surrogate.

    preclip: ``(log δ_lo, log δ_hi)`` band applied to ``logp - old_logp`` before ``exp``
        (Pre-CLIP); ``None`` disables it.
    clip_eps: PPO ``(ε_low, ε_high)``.
    dual_clip: dual-clip constant ``c > 1`` for negative advantages, or ``None``.
    kl_coef / kl_estimator: KL-to-reference penalty added to the loss (0 = off).
    aggregation: how token losses become the batch loss, see :func:`token_weights`.
    """

    preclip: tuple[float, float] | None = DEFAULT_PRECLIP
    clip_eps: tuple[float, float] = (0.2, 0.2)
    dual_clip: float | None = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    aggregation: str = "token-mean"

    def __post_init__(self):
        if self.preclip is not None:
            lo, hi = self.preclip
            if not (lo < 0.0 < hi):
                raise ValueError(f"preclip must be (log δ_lo < 0, log δ_hi > 0), got {self.preclip}")
            object.__setattr__(self, "preclip", (float(lo), float(hi)))
        el, eh = self.clip_eps
        if not (0.0 <= el < 1.0 and eh >= 0.0):
            raise ValueError(f"clip_eps must be (0 <= ε_low < 1, ε_high >= 0), got {self.clip_eps}")
        object.__setattr__(self, "clip_eps", (float(el), float(eh)))
        if self.dual_clip is not None and not self.dual_clip > 1.0:
            raise ValueError(f"dual_clip must be > 1 or None, got {self.dual_clip}")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {self.kl_estimator!r}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {self.aggregation!r}")


def token_weights(mask: torch.Tensor, aggregation: str, normalizer=None) -> torch.Tensor:
    """Per-token weights ``w`` [B, T] (fp32) such that the loss is ``Σ w·loss_t``.

    token-mean:           w = m / Σm                     (mean over all valid tokens)
    seq-mean-token-mean:  w = m / (len_b · B_valid)      (the release's aggregation)
    seq-mean-token-sum:   w = m / B_valid
    Sequences with no valid token get weight 0 and do not count in ``B_valid``; an
    all-masked batch gives all-zero weights (loss 0, gradient 0), never NaN.

    ``normalizer`` (a number or 0-dim tensor) replaces the local denominator (``Σm`` for
    token-mean, ``B_valid`` for the seq-mean modes): pass the global count across
    data-parallel ranks and accumulation steps so micro-batches sum to one global mean.
    """
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    m = mask.to(torch.float32)
    if normalizer is not None:
        normalizer = torch.as_tensor(normalizer, dtype=torch.float32, device=m.device)
        if normalizer.dim() != 0:
            raise ValueError(f"normalizer must be a number or a 0-dim tensor, got shape "
                             f"{tuple(normalizer.shape)}")
    if aggregation == "token-mean":
        return m / (m.sum().clamp_min(1.0) if normalizer is None else normalizer)
    lengths = m.sum(dim=1, keepdim=True)
    n_seqs = ((lengths > 0).sum().clamp_min(1).to(torch.float32) if normalizer is None
              else normalizer)
    if aggregation == "seq-mean-token-mean":
        return m / lengths.clamp_min(1.0) / n_seqs
    if aggregation == "seq-mean-token-sum":
        return m / n_seqs
    raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def broadcast_advantages(advantages: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence ``[B]`` advantages become per-token ``[B, T]``; ``[B, T]`` pass through."""
    if advantages.dim() == 1:
        if advantages.shape[0] != mask.shape[0]:
            raise ValueError(
                f"advantages [B] has B={advantages.shape[0]} but mask is {tuple(mask.shape)}")
        return advantages[:, None].expand_as(mask)
    if advantages.shape != mask.shape:
        raise ValueError(
            f"advantages must be [B] or [B, T] = {tuple(mask.shape)}, got {tuple(advantages.shape)}")
    return advantages


def per_token_loss(lp, old_lp, adv, ref_lp, s: LossSettings) -> torch.Tensor:
    """Differentiable per-token loss written with plain torch ops (the oracle's form)."""
    d = lp - old_lp
    if s.preclip is not None:
        d = torch.clamp(d, s.preclip[0], s.preclip[1])
    ratio = torch.exp(d)
    surr1 = ratio * adv
    surr2 = torch.clamp(ratio, 1.0 - s.clip_eps[0], 1.0 + s.clip_eps[1]) * adv
    loss = -torch.minimum(surr1, surr2)
    if s.dual_clip is not None:
        loss = torch.where(adv < 0, torch.minimum(loss, -s.dual_clip * adv), loss)
    if s.kl_coef > 0 and ref_lp is not None:
        loss = loss + s.kl_coef * kl_penalty(lp, ref_lp, s.kl_estimator)
    return loss


def kl_penalty(lp, ref_lp, estimator: str) -> torch.Tensor:
    """Per-token KL(π‖π_ref) estimate from samples of π (Schulman's k1/k2/k3)."""
    log_r = ref_lp - lp
    if estimator == "k1":
        return -log_r
    if estimator == "k2":
        return 0.5 * log_r * log_r
    return torch.exp(log_r) - log_r - 1.0


def loss_and_grad(lp, old_lp, adv, ref_lp, weight, s: LossSettings):
    """Closed-form per-token loss and ``g = w · dloss/dlp`` (no autograd).

    Matches autograd of :func:`per_token_loss` (ties of the PPO ``min`` have equal
    branch gradients, so no convention is needed). Returns ``(loss_t, g, parts)`` with
    ``parts`` the intermediate masks used for statistics. All fp32.
    """
    lp = lp.float()
    d_raw = lp - old_lp
    if s.preclip is not None:
        in_band = (d_raw >= s.preclip[0]) & (d_raw <= s.preclip[1])
        d = d_raw.clamp(s.preclip[0], s.preclip[1])
    else:
        in_band = torch.ones_like(d_raw, dtype=torch.bool)
        d = d_raw
    ratio = torch.exp(d)
    lo, hi = 1.0 - s.clip_eps[0], 1.0 + s.clip_eps[1]
    surr1 = ratio * adv
    surr2 = ratio.clamp(lo, hi) * adv
    # The clipped branch is active (and flat) when it is strictly smaller.
    ppo_clipped = surr2 < surr1
    loss = -torch.minimum(surr1, surr2)
    dloss = torch.where(ppo_clipped, torch.zeros_like(ratio), -adv * ratio)
    if s.dual_clip is not None:
        dual = (adv < 0) & (loss > -s.dual_clip * adv)
        loss = torch.where(dual, -s.dual_clip * adv, loss)
        dloss = torch.where(dual, torch.zeros_like(dloss), dloss)
    else:
        dual = torch.zeros_like(ppo_clipped)
    dloss = torch.where(in_band, dloss, torch.zeros_like(dloss))
    if s.kl_coef > 0 and ref_lp is not None:
        log_r = ref_lp - lp
        if s.kl_estimator == "k1":
            kl, dkl = -log_r, torch.ones_like(lp)
        elif s.kl_estimator == "k2":
            kl, dkl = 0.5 * log_r * log_r, -log_r
        else:
            e = torch.exp(log_r)
            kl, dkl = e - log_r - 1.0, 1.0 - e
        loss = loss + s.kl_coef * kl
        dloss = dloss + s.kl_coef * dkl
    parts = {"in_band": in_band, "ppo_clipped": ppo_clipped | dual, "ratio": ratio, "d_raw": d_raw}
    return loss, weight * dloss, parts


def loss_stats(lp, old_lp, ref_lp, valid, parts, entropy=None) -> dict[str, torch.Tensor]:
    """Detached per-batch statistics over valid tokens (0-dim tensors: no host sync)."""
    with torch.no_grad():
        v = valid.to(torch.float32)
        n_valid = v.sum()
        n = n_valid.clamp_min(1.0)

        def mean(x):
            return (x.float() * v).sum() / n

        ratio = parts["ratio"]
        neg_inf = torch.tensor(float("-inf"), device=ratio.device)
        d_raw = parts["d_raw"]
        stats = {
            "preclip_frac": mean(~parts["in_band"]),
            "clip_frac": mean(parts["ppo_clipped"]),
            "ratio_mean": mean(ratio),
            # No Python branch on valid.any(): that would sync and break torch.compile graphs.
            "ratio_max": torch.where(n_valid > 0, torch.where(valid, ratio, neg_inf).amax()
                                     if ratio.numel() else ratio.new_zeros(()), ratio.new_zeros(())),
            "ratio_min": torch.where(n_valid > 0, torch.where(valid, ratio, -neg_inf).amin()
                                     if ratio.numel() else ratio.new_zeros(()), ratio.new_zeros(())),
            # k3 estimate of KL(π_old ‖ π) from samples of π_old, on the unclipped ratio.
            "approx_kl": mean(torch.expm1(d_raw.clamp(max=20.0)) - d_raw),
            "valid_tokens": v.sum(),
        }
        # Quantiles of the raw log-ratio (before Pre-CLIP) over valid tokens: how far off
        # policy the update is. Static shapes (NaN outside the mask), so compile-friendly.
        if d_raw.numel():
            q = torch.nanquantile(torch.where(valid, d_raw.float(), float("nan")),
                                  torch.tensor([0.05, 0.5, 0.95], device=d_raw.device))
            q = torch.nan_to_num(q, nan=0.0)
            stats["log_ratio_q05"], stats["log_ratio_q50"], stats["log_ratio_q95"] = q.unbind()
        if ref_lp is not None:
            stats["ref_kl"] = mean(kl_penalty(lp.float(), ref_lp, "k3"))
        if entropy is not None:
            stats["entropy"] = mean(entropy)
    return stats
