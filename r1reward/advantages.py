"""Advantage estimators (SPEC §3.4) and the StableReinforce Advantage Filter (SPEC §3.5).

Shapes: ``rewards [B]`` (one scalar per rollout), ``response_mask [B, R]`` (1 on the
response tokens, up to and including the first end-of-turn token), log-probs ``[B, R]``.
Every function returns per-token fp32 advantages ``[B, R]`` that are 0 outside the mask.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1reward.kernels.loss_math import KL_ESTIMATORS, kl_penalty

# The names each setting accepts, for validating a config before anything runs.
# KL_ESTIMATORS ("k1", "k2", "k3") is the kernels' list: the penalty in the reward and the
# one in the loss are the same function.
ESTIMATORS = ("reinforce_pp", "grpo", "rloo")
ADV_FILTERS = ("zscore", "release", "off")


@dataclass(frozen=True)
class NormStats:
    """Global statistics used to normalize returns (0-dim fp32 tensors, no host sync)."""

    mean: torch.Tensor
    std: torch.Tensor
    count: torch.Tensor


def _check_mask(response_mask: torch.Tensor, B: int | None = None) -> torch.Tensor:
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be [B, R], got shape {tuple(response_mask.shape)}")
    if B is not None and response_mask.shape[0] != B:
        raise ValueError(f"rewards has B={B} but response_mask is {tuple(response_mask.shape)}")
    return response_mask.bool()


def _check_rewards(rewards: torch.Tensor) -> torch.Tensor:
    if rewards.dim() != 1:
        raise ValueError(f"rewards must be [B] (one scalar per rollout), got shape {tuple(rewards.shape)}")
    return rewards.to(torch.float32)


def kl_per_token(old_logp: torch.Tensor, ref_logp: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """KL(π_old ‖ π_ref) estimate per sampled token, in fp32: with ``log r = old - ref``,
    k1 = log r, k2 = (log r)² / 2, k3 = r⁻¹ - 1 + log r (k2, k3 are non-negative and
    lower-variance). The kernels' :func:`kl_penalty`, with the estimator checked."""
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    return kl_penalty(old_logp.float(), ref_logp.float(), estimator)


def last_token_rewards(rewards: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """``[B, R]`` zeros with each rollout's reward on its last valid token.

    A rollout with no valid token (empty response) carries no reward.
    """
    r = _check_rewards(rewards)
    m = _check_mask(response_mask, r.shape[0])
    R = m.shape[1]
    pos = torch.arange(R, device=m.device).expand_as(m)
    last = torch.where(m, pos, torch.full_like(pos, -1)).max(dim=1).values
    out = torch.zeros(m.shape, dtype=torch.float32, device=m.device)
    has = last >= 0
    out[has.nonzero(as_tuple=True)[0], last[has]] = r.to(m.device)[has]
    return out


def masked_normalize(x: torch.Tensor, mask: torch.Tensor, process_group=None,
                     eps: float = 1e-8) -> tuple[torch.Tensor, NormStats]:
    """``(x - mean) / std`` with mean and (population) std over all valid tokens.

    With ``process_group``, the statistics cover the valid tokens of every rank: one
    all_reduce of ``[Σx, Σx², n]`` in fp64 (fp64 so that Σx² - n·mean² does not cancel).
    The result equals normalizing the concatenation of all ranks' batches. Masked
    positions are 0. A constant batch (std 0) gives all-zero advantages.
    """
    m = mask.bool()
    xf = torch.where(m, x.to(torch.float64), torch.zeros((), dtype=torch.float64, device=x.device))
    sums = torch.stack([xf.sum(), (xf * xf).sum(), m.sum().to(torch.float64)])
    if process_group is not None:
        dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=process_group)
    s, ss, n = sums.unbind()
    n_safe = n.clamp_min(1.0)
    mean = s / n_safe
    std = (ss / n_safe - mean * mean).clamp_min(0.0).sqrt()
    out = torch.where(m, (xf - mean) / std.clamp_min(eps), torch.zeros_like(xf))
    return out.to(torch.float32), NormStats(mean.float(), std.float(), n.float())


def reinforce_pp_advantages(rewards: torch.Tensor, response_mask: torch.Tensor,
                            old_logp: torch.Tensor | None = None, ref_logp: torch.Tensor | None = None,
                            kl_coef: float = 1e-3, kl_estimator: str = "k1", process_group=None,
                            *, normalize: bool = True, return_stats: bool = False):
    """Reinforce++ advantages (the release's ``--advantage_estimator reinforce``).

    token reward = reward on the last valid token − kl_coef · KL(old ‖ ref) per token;
    returns = reverse cumulative sum (γ = 1) over the valid tokens; advantages = returns
    normalized over all valid tokens of the global batch (``process_group``: all DP ranks).
    ``return_stats=True`` also returns the :class:`NormStats` (its ``mean`` is the raw
    mean the release's filter centres on, see :func:`advantage_filter`).
    """
    m = _check_mask(response_mask, _check_rewards(rewards).shape[0])
    token_r = last_token_rewards(rewards, m)
    if kl_coef < 0:
        raise ValueError(f"kl_coef must be >= 0, got {kl_coef}")
    if kl_coef > 0:
        if old_logp is None or ref_logp is None:
            raise ValueError("kl_coef > 0 needs both old_logp and ref_logp [B, R] (or set kl_coef=0)")
        for name, t in (("old_logp", old_logp), ("ref_logp", ref_logp)):
            if t.shape != m.shape:
                raise ValueError(f"{name} must have response_mask's shape {tuple(m.shape)}, "
                                 f"got {tuple(t.shape)}")
        token_r = token_r - kl_coef * kl_per_token(old_logp, ref_logp, kl_estimator)
    token_r = torch.where(m, token_r, torch.zeros_like(token_r))
    returns = token_r.flip(1).cumsum(1).flip(1)
    returns = torch.where(m, returns, torch.zeros_like(returns))
    if not normalize:
        return (returns, None) if return_stats else returns
    adv, stats = masked_normalize(returns, m, process_group)
    return (adv, stats) if return_stats else adv


def _groups(rewards: torch.Tensor, n_samples: int, name: str) -> torch.Tensor:
    r = _check_rewards(rewards)
    if n_samples < 2:
        raise ValueError(f"{name} needs n_samples >= 2 rollouts per prompt, got {n_samples}")
    if r.shape[0] % n_samples:
        raise ValueError(f"{name}: batch of {r.shape[0]} rewards is not a multiple of n_samples={n_samples}")
    # Rollouts of one prompt are consecutive (the order HF generate(num_return_sequences) uses).
    return r.view(-1, n_samples)


def _broadcast(group_adv: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    m = _check_mask(response_mask, group_adv.numel())
    a = group_adv.reshape(-1, 1).to(m.device).expand(m.shape)
    return torch.where(m, a, torch.zeros_like(a))


def grpo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, n_samples: int,
                    *, scale_by_std: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO: ``(r - mean_group) / (std_group + eps)`` (unbiased std; ``scale_by_std=False``
    keeps only the mean baseline, as in Dr. GRPO), broadcast over response tokens."""
    g = _groups(rewards, n_samples, "grpo_advantages")
    a = g - g.mean(dim=1, keepdim=True)
    if scale_by_std:
        std = g.std(dim=1, keepdim=True)
        # a group whose rollouts all scored the same has nothing to learn: 0, never NaN
        a = torch.where(std > 0, a / (std + eps), torch.zeros_like(a))
    return _broadcast(a, response_mask)


def rloo_advantages(rewards: torch.Tensor, response_mask: torch.Tensor, n_samples: int) -> torch.Tensor:
    """RLOO: ``r_i - mean_{j≠i} r_j`` within each prompt's group, broadcast over tokens."""
    g = _groups(rewards, n_samples, "rloo_advantages")
    baseline = (g.sum(dim=1, keepdim=True) - g) / (n_samples - 1)
    return _broadcast(g - baseline, response_mask)


def advantage_filter(adv: torch.Tensor, mask: torch.Tensor, mode: str = "zscore", k: float = 3.0,
                     *, raw_mean: torch.Tensor | float | None = None, abs_limit: float = 10.0):
    """The 3-sigma Advantage Filter applied to normalized advantages.

    mode "zscore" (paper): zero every valid token with |A| > k or A non-finite.
    mode "release" (the authors' code): zero tokens outside ``[raw_mean - k, raw_mean + k]``,
        then any non-finite token or |A| > ``abs_limit`` (10); ``raw_mean`` is the mean of
        the returns *before* normalization (``NormStats.mean``), as the release uses it.
    mode "off": nothing is filtered.
    Returns ``(filtered_adv, filtered_mask)``: filtered_adv is 0 on filtered and masked
    tokens (so they add nothing to the loss gradient), filtered_mask marks the valid
    tokens that were zeroed (``filtered_mask.sum() / mask.sum()`` = filtered_frac).
    """
    if mode not in ADV_FILTERS:
        raise ValueError(f"advantage filter mode must be one of {ADV_FILTERS}, got {mode!r}")
    if adv.shape != mask.shape:
        raise ValueError(f"adv {tuple(adv.shape)} and mask {tuple(mask.shape)} must have the same shape")
    if k <= 0:
        raise ValueError(f"filter k must be > 0, got {k}")
    m = mask.bool()
    a = adv.to(torch.float32)
    if mode == "off":
        bad = torch.zeros_like(m)
    elif mode == "zscore":
        bad = ~torch.isfinite(a) | (a.abs() > k)
    else:
        if raw_mean is None:
            raise ValueError("advantage_filter(mode='release') needs raw_mean: the mean of the "
                             "returns before normalization (reinforce_pp_advantages(..., "
                             "return_stats=True)[1].mean)")
        mu = torch.as_tensor(raw_mean, dtype=torch.float32, device=a.device)
        bad = (a < mu - k) | (a > mu + k) | ~torch.isfinite(a) | (a.abs() > abs_limit)
    filtered = bad & m
    out = torch.where(m & ~filtered, a, torch.zeros_like(a))
    return out, filtered


__all__ = ["NormStats", "kl_per_token", "last_token_rewards", "masked_normalize",
           "reinforce_pp_advantages", "grpo_advantages", "rloo_advantages", "advantage_filter",
           "KL_ESTIMATORS", "ESTIMATORS", "ADV_FILTERS"]
