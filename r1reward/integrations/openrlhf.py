"""OpenRLHF: a drop-in for ``openrlhf.models.PolicyLoss`` with Pre-CLIP.

    from r1reward.integrations.openrlhf import StableReinforcePolicyLoss
    actor_loss_fn = StableReinforcePolicyLoss(clip_eps_low=0.2, clip_eps_high=0.28)

Same constructor settings for the PPO loss (``clip_eps_low/high``, ``dual_clip``,
``token_level_loss``, token-level importance correction by ratio) and the same
``forward`` signature and return value ``(loss, clip_ratio, ppo_kl, vllm_kl,
is_filter_ratio)``, with OpenRLHF's global aggregation (``dp_size``,
``batch_num_tokens``, ``global_batch_size``). Settings with no counterpart here (GSPO,
sequence-level or divergence-gated correction) are refused at construction.
"""
from __future__ import annotations

import torch
from torch import nn

from r1reward.kernels import stable_reinforce_loss
from r1reward.kernels.loss_math import DEFAULT_PRECLIP


def _masked_mean(x, mask):
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


class StableReinforcePolicyLoss(nn.Module):
    def __init__(self, clip_eps_low: float = 0.2, clip_eps_high: float = 0.2, dual_clip: float | None = None,
                 token_level_loss: bool = True, policy_loss_type: str = "ppo",
                 is_correction_level: str = "off", is_correction_mode: str = "mask",
                 is_correction_gating: str = "ratio", is_correction_threshold=(0.5, 5.0),
                 preclip=DEFAULT_PRECLIP):
        super().__init__()
        if policy_loss_type != "ppo":
            raise ValueError(f"policy_loss_type={policy_loss_type!r}: only 'ppo' has a StableReinforce form")
        if is_correction_level not in ("off", "token") or is_correction_gating != "ratio":
            raise ValueError("importance correction: only is_correction_level 'off' or 'token' with "
                             "is_correction_gating 'ratio' (got "
                             f"{is_correction_level!r}, {is_correction_gating!r})")
        if is_correction_mode not in ("mask", "clip"):
            raise ValueError(f"is_correction_mode must be 'mask' or 'clip', got {is_correction_mode!r}")
        self.clip_eps = (clip_eps_low, clip_eps_high)
        self.dual_clip, self.token_level_loss, self.preclip = dual_clip, token_level_loss, preclip
        self.is_level, self.is_mode = is_correction_level, is_correction_mode
        self.is_low, self.is_high = is_correction_threshold

    def _is_weights(self, old_log_probs, rollout_log_probs, action_mask):
        """Token-level train/rollout correction weights and the filtered fraction."""
        if self.is_level == "off":
            return None, None
        if rollout_log_probs is None:
            raise ValueError("is_correction_level='token' needs rollout_log_probs")
        ratio = (old_log_probs - rollout_log_probs).detach().exp()
        filtered = (ratio < self.is_low) | (ratio > self.is_high)
        if self.is_mode == "clip":
            weights = ratio.clamp(self.is_low, self.is_high)
        else:
            weights = torch.where(filtered, torch.zeros_like(ratio), ratio)
        return weights, _masked_mean(filtered.float(), action_mask)

    def forward(self, log_probs, old_log_probs, advantages, action_mask=None, rollout_log_probs=None,
                dp_size: int = 1, batch_num_tokens=None, global_batch_size=None):
        mask = torch.ones_like(log_probs, dtype=torch.bool) if action_mask is None else action_mask.bool()
        is_weights, is_filter_ratio = self._is_weights(old_log_probs, rollout_log_probs, mask)
        if self.token_level_loss:
            aggregation, total = "token-mean", batch_num_tokens
        else:
            aggregation, total = "seq-mean-token-mean", global_batch_size
        normalizer = None if total is None else torch.as_tensor(total, dtype=torch.float32) / dp_size
        loss, stats = stable_reinforce_loss(
            log_probs, old_log_probs, advantages, mask, preclip=self.preclip, clip_eps=self.clip_eps,
            dual_clip=self.dual_clip, aggregation=aggregation, normalizer=normalizer, is_weights=is_weights)
        self.last_stats = stats  # preclip_frac, ratio_max, ... for the caller's logs
        ppo_kl = _masked_mean(-(log_probs - old_log_probs).detach(), mask)
        vllm_kl = None if is_weights is None else _masked_mean(rollout_log_probs - old_log_probs, mask)
        return loss, stats["clip_frac"], ppo_kl, vllm_kl, is_filter_ratio
