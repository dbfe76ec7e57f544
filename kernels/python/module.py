"""``nn.Module`` wrapper holding the StableReinforce settings."""
from __future__ import annotations

import torch
from torch import nn

from .functional import fused_stable_reinforce_loss, stable_reinforce_loss
from .loss_math import DEFAULT_PRECLIP, LossSettings


class StableReinforceLoss(nn.Module):
    """StableReinforce loss with its settings fixed at construction.

    ``forward(logp, old_logp, advantages, mask, ref_logp=None)`` works from log-probs;
    ``fused(hidden, weight, targets, old_logp, advantages, mask, ref_logp=None)`` goes from
    hidden states and the lm_head weight without ``[tokens × vocab]`` logits. Both return
    ``(loss, stats)`` and take the per-call ``normalizer``, ``is_weights`` and
    ``reduction`` of the functional API; ``old_logp=None`` is the on-policy case.
    """

    def __init__(self, *, preclip=DEFAULT_PRECLIP, clip_eps=(0.2, 0.2), dual_clip=None,
                 kl_coef=0.0, kl_estimator="k3", aggregation="token-mean", temperature=1.0,
                 entropy_coef=0.0, filter_eps=None, backend="auto"):
        super().__init__()
        # Validate once, up front, so a bad setting fails at construction.
        self.settings = LossSettings(preclip=preclip, clip_eps=tuple(clip_eps),
                                     dual_clip=dual_clip, kl_coef=kl_coef,
                                     kl_estimator=kl_estimator, aggregation=aggregation)
        if entropy_coef < 0:
            raise ValueError(f"entropy_coef must be >= 0, got {entropy_coef}")
        self.temperature = temperature
        self.entropy_coef = entropy_coef
        self.filter_eps = filter_eps
        self.backend = backend

    def _kwargs(self):
        s = self.settings
        return dict(preclip=s.preclip, clip_eps=s.clip_eps, dual_clip=s.dual_clip,
                    kl_coef=s.kl_coef, kl_estimator=s.kl_estimator, aggregation=s.aggregation)

    def forward(self, logp, old_logp, advantages, mask, ref_logp=None, *, normalizer=None,
                is_weights=None, reduction="aggregate"):
        return stable_reinforce_loss(logp, old_logp, advantages, mask, ref_logp=ref_logp,
                                     normalizer=normalizer, is_weights=is_weights,
                                     reduction=reduction, **self._kwargs())

    def fused(self, hidden: torch.Tensor, weight: torch.Tensor, targets, old_logp, advantages,
              mask, ref_logp=None, bias=None, return_entropy=False, *, normalizer=None,
              is_weights=None, reduction="aggregate"):
        return fused_stable_reinforce_loss(
            hidden, weight, targets, old_logp, advantages, mask, ref_logp=ref_logp,
            bias=bias, temperature=self.temperature, return_entropy=return_entropy,
            normalizer=normalizer, is_weights=is_weights, entropy_coef=self.entropy_coef,
            reduction=reduction, filter_eps=self.filter_eps, backend=self.backend,
            **self._kwargs())

    def extra_repr(self):
        return (f"{self.settings}, temperature={self.temperature}, "
                f"entropy_coef={self.entropy_coef}, backend={self.backend!r}")
