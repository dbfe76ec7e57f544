"""verl: StableReinforce as a registered policy loss and the Advantage Filter as an
advantage estimator wrapper.

    import r1reward.integrations.verl as srv
    srv.register()   # in the process that builds the actor (e.g. a custom entry point)
    # actor_rollout_ref.actor.policy_loss.loss_mode=stable_reinforce
    # algorithm.adv_estimator=reinforce_plus_plus_filtered

The loss reads verl's own settings (``clip_ratio_low/high``, ``clip_ratio_c`` as the dual
clip, ``loss_agg_mode``, ``config.global_batch_info``) and aggregates with verl's
``agg_loss``, so it drops in where ``vanilla`` was; Pre-CLIP is the only addition.
"""
from __future__ import annotations

from r1reward.advantages import advantage_filter
from r1reward.kernels import stable_reinforce_loss
from r1reward.kernels.loss_math import DEFAULT_PRECLIP


def make_policy_loss(preclip=DEFAULT_PRECLIP):
    """A verl policy-loss function (verl's ``PolicyLossFn`` signature) with this Pre-CLIP
    band (``(log δ_lo, log δ_hi)``; ``None`` turns Pre-CLIP off)."""
    from verl.trainer.ppo.core_algos import agg_loss

    def stable_reinforce_policy_loss(old_log_prob, log_prob, advantages, response_mask,
                                     loss_agg_mode="token-mean", config=None,
                                     rollout_is_weights=None):
        if config is None:
            raise ValueError("the stable_reinforce policy loss needs verl's actor config")
        lo = config.clip_ratio_low if config.clip_ratio_low is not None else config.clip_ratio
        hi = config.clip_ratio_high if config.clip_ratio_high is not None else config.clip_ratio
        per_token, stats = stable_reinforce_loss(
            log_prob, old_log_prob, advantages, response_mask, preclip=preclip,
            clip_eps=(lo, hi), dual_clip=config.get("clip_ratio_c", 3.0),
            is_weights=rollout_is_weights, reduction="none")
        loss = agg_loss(loss_mat=per_token, loss_mask=response_mask, loss_agg_mode=loss_agg_mode,
                        **config.global_batch_info)
        m = response_mask.to(log_prob.dtype)
        ppo_kl = ((old_log_prob - log_prob).detach() * m).sum() / m.sum().clamp_min(1.0)
        metrics = {"actor/pg_clipfrac": stats["clip_frac"].item(),
                   "actor/ppo_kl": ppo_kl.item(),
                   "actor/preclip_frac": stats["preclip_frac"].item(),
                   "actor/ratio_max": stats["ratio_max"].item(),
                   "actor/approx_kl": stats["approx_kl"].item()}
        return loss, metrics

    return stable_reinforce_policy_loss


def make_filtered_estimator(base: str = "reinforce_plus_plus", k: float = 3.0):
    """verl's ``base`` advantage estimator followed by the 3-sigma Advantage Filter: tokens
    with ``|A| > k`` (or non-finite) get advantage 0."""
    from verl.trainer.ppo.core_algos import get_adv_estimator_fn

    base_fn = get_adv_estimator_fn(base)

    def filtered(**kwargs):
        advantages, returns = base_fn(**kwargs)
        advantages, _ = advantage_filter(advantages, kwargs["response_mask"], "zscore", k)
        return advantages.to(returns.dtype), returns

    return filtered


def register(loss_name: str = "stable_reinforce", preclip=DEFAULT_PRECLIP,
             filtered_bases=("reinforce_plus_plus", "grpo"), k: float = 3.0) -> None:
    """Register the loss as ``loss_name`` and ``<base>_filtered`` estimators in verl's
    registries. Idempotent (verl refuses a second, different estimator of one name)."""
    from verl.trainer.ppo import core_algos

    core_algos.POLICY_LOSS_REGISTRY[loss_name] = make_policy_loss(preclip)
    for base in filtered_bases:
        name = f"{base}_filtered"
        if name not in core_algos.ADV_ESTIMATOR_REGISTRY:
            core_algos.register_adv_est(name)(make_filtered_estimator(base, k))
