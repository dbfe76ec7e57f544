"""r1reward.integrations.verl against the installed verl: the registered loss equals verl's
own ``vanilla`` loss where the settings coincide (Pre-CLIP off), in value and gradient, for
every aggregation, with rollout importance weights and global batch info; Pre-CLIP acts
where it should; the filtered estimator zeroes only the outliers of verl's estimator."""
import math

import numpy as np
import pytest
import torch
from verl.trainer.ppo import core_algos
from verl.workers.config import FSDPActorConfig

import r1reward.integrations.verl as srv

B, T = 4, 6


def _config(**kw):
    return FSDPActorConfig(strategy="fsdp", clip_ratio_low=0.2, clip_ratio_high=0.28, rollout_n=2,
                           ppo_mini_batch_size=4, ppo_micro_batch_size_per_gpu=1, **kw)


def _batch(seed, spread=0.3):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    new = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 4:] = False
    mask[3, 1:] = False
    return old, new, adv, mask


@pytest.mark.parametrize("agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "token-sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_equals_verl_vanilla_with_preclip_off(agg, weighted):
    cfg = _config()
    cfg.global_batch_info.update(dp_size=2, batch_num_tokens=30.0, global_batch_size=7.0)
    old, new, adv, mask = _batch(0, spread=0.5)  # wide enough that PPO and dual clips act
    isw = torch.rand(B, T, generator=torch.Generator().manual_seed(1), dtype=torch.float64) + 0.5 \
        if weighted else None
    ours, metrics = srv.make_policy_loss(preclip=None)(old, new, adv, mask, agg, cfg, isw)
    (g_ours,) = torch.autograd.grad(ours, new)
    theirs, their_metrics = core_algos.get_policy_loss_fn("vanilla")(
        old_log_prob=old, log_prob=new, advantages=adv, response_mask=mask, loss_agg_mode=agg,
        config=cfg, rollout_is_weights=isw)
    (g_theirs,) = torch.autograd.grad(theirs, new)
    torch.testing.assert_close(ours, theirs)
    torch.testing.assert_close(g_ours, g_theirs)
    assert metrics["actor/pg_clipfrac"] > 0
    assert metrics["actor/ppo_kl"] == pytest.approx(their_metrics["actor/ppo_kl"])


def test_preclip_bounds_the_ratio_where_vanilla_does_not():
    cfg = _config()
    old, new, adv, mask = _batch(2)
    with torch.no_grad():
        new[0, 0] = old[0, 0] + 12.0  # ratio e^12 before Pre-CLIP
    adv[0, 0] = -1.0  # negative advantage: only the dual clip bounds vanilla's loss
    band = (math.log(0.5), math.log(2.0))
    ours, metrics = srv.make_policy_loss(preclip=band)(old, new, adv, mask, "token-mean", cfg, None)
    (g,) = torch.autograd.grad(ours, new)
    vanilla, _ = core_algos.get_policy_loss_fn("vanilla")(old, new, adv, mask, "token-mean", cfg, None)
    assert metrics["actor/preclip_frac"] > 0 and metrics["actor/ratio_max"] == pytest.approx(2.0)
    assert g[0, 0] == 0  # outside the band: no gradient through that token
    assert not torch.allclose(ours, vanilla)


def test_register_puts_the_loss_and_filtered_estimators_in_verls_registries():
    srv.register()
    srv.register()  # idempotent
    registered = core_algos.POLICY_LOSS_REGISTRY["stable_reinforce"]
    assert core_algos.get_policy_loss_fn("stable_reinforce") is registered
    est = core_algos.get_adv_estimator_fn("grpo_filtered")
    g = torch.Generator().manual_seed(3)
    n = 40
    rewards = torch.zeros(n, T, dtype=torch.float64)
    rewards[:, -1] = torch.randn(n, generator=g, dtype=torch.float64) * 0.01
    rewards[0, -1] = 5.0  # one outlier, in a group with the rest
    mask = torch.ones(n, T)
    index = np.array(["a"] * n, dtype=object)
    base_adv, base_ret = core_algos.compute_grpo_outcome_advantage(rewards, mask, index)
    adv, ret = est(token_level_rewards=rewards, response_mask=mask, index=index, config=None)
    outlier = base_adv.abs() > 3
    assert bool(outlier[0].all()) and int(outlier.sum()) == T
    assert bool((adv[outlier] == 0).all())
    torch.testing.assert_close(adv[~outlier], base_adv[~outlier])
    torch.testing.assert_close(ret, base_ret)
