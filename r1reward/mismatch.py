"""Trainer–sampler mismatch: how far the engine's log-probs are from the trainer's.

A separate rollout engine (vLLM) computes the sampled tokens' log-probs with other kernels
(and on GPUs another precision) than the trainer's forward, so the "old" policy the
ratio divides by is not exactly the policy that sampled. The statistics show how far
apart they are; truncated importance sampling (TIS) reweights each token's policy term
by min(π_trainer / π_sampler, C), as verl, OpenRLHF and TRL offer.
"""
from __future__ import annotations

import torch


def mismatch_stats(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor,
                   mask: torch.Tensor) -> dict[str, float]:
    """Over response tokens: mean and max |Δ log p|, and KL(sampler ‖ trainer) by the k3
    estimator on the sampler's own tokens."""
    m = mask.bool()
    if not m.any():
        return {"sampler_logp_diff_mean": 0.0, "sampler_logp_diff_max": 0.0, "sampler_kl": 0.0}
    d = (trainer_logp.double() - sampler_logp.double())[m]
    return {"sampler_logp_diff_mean": d.abs().mean().item(),
            "sampler_logp_diff_max": d.abs().max().item(),
            "sampler_kl": (d.exp() - 1 - d).mean().item()}


def tis_weights(trainer_logp: torch.Tensor, sampler_logp: torch.Tensor, mask: torch.Tensor,
                cap: float) -> tuple[torch.Tensor, float]:
    """Per-token weights min(exp(trainer - sampler), cap) (1 off the mask), and the
    fraction of response tokens the cap truncated."""
    ratio = (trainer_logp.float() - sampler_logp.float()).exp()
    w = torch.where(mask.bool(), ratio.clamp(max=cap), torch.ones_like(ratio))
    n = mask.sum().clamp_min(1)
    return w.detach(), ((ratio > cap) & mask.bool()).sum().item() / n.item()
