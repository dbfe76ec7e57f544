"""Advantage estimators and the Advantage Filter, checked on hand-worked examples."""
import math
import os
import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from r1reward.advantages import (
    advantage_filter,
    grpo_advantages,
    kl_per_token,
    last_token_rewards,
    masked_normalize,
    reinforce_pp_advantages,
    rloo_advantages,
)
from r1reward.kernels import stable_reinforce_loss


def close(t, expected, atol=1e-6):
    torch.testing.assert_close(t, torch.tensor(expected, dtype=t.dtype), atol=atol, rtol=0)


MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
OLD = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, -7.0]])
REF = torch.tensor([[-1.5, -2.0, -1.0], [-0.5, -1.0, 3.0]])  # [1, 2] lies outside the mask


def test_last_token_rewards():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [0, 0, 0, 0]])
    out = last_token_rewards(torch.tensor([1.0, 2.0, 3.0]), mask)
    # reward sits on the last valid token; an empty response drops its reward
    assert out.tolist() == [[0, 0, 1, 0], [0, 2, 0, 0], [0, 0, 0, 0]]


def test_reinforce_pp_returns_with_k1_kl_by_hand():
    rets = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, OLD, REF, kl_coef=0.1,
                                   kl_estimator="k1", normalize=False)
    # k1 KL = old - ref:  row0 [0.5, 0, 0.5], row1 [-0.5, 0, (masked)]
    # token rewards = -0.1*KL (+ reward on last token):
    #   row0 [-0.05, 0, -0.05 + 1] = [-0.05, 0, 0.95];  row1 [0.05, 0 + 0]
    # returns = reverse cumsum: row0 [0.9, 0.95, 0.95];  row1 [0.05, 0, 0]
    close(rets, [[0.9, 0.95, 0.95], [0.05, 0.0, 0.0]])


def test_reinforce_pp_normalized_by_hand():
    adv, st = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, OLD, REF, kl_coef=0.1,
                                      return_stats=True)
    # valid returns 0.9, 0.95, 0.95, 0.05, 0: n = 5, sum 2.85, mean 0.57
    # sum of squares 0.81 + 0.9025 + 0.9025 + 0.0025 + 0 = 2.6175; /5 = 0.5235
    # var = 0.5235 - 0.57^2 = 0.1986;  std = 0.445645...
    std = math.sqrt(0.1986)
    exp = [[(0.9 - 0.57) / std, (0.95 - 0.57) / std, (0.95 - 0.57) / std],
           [(0.05 - 0.57) / std, (0.0 - 0.57) / std, 0.0]]   # masked token stays 0
    close(adv, exp, atol=1e-5)
    assert (st.mean.item(), st.std.item(), st.count.item()) == pytest.approx((0.57, std, 5.0))


def test_kl_is_the_kernels_penalty_with_one_list_of_estimators():
    from r1reward import advantages as A
    from r1reward.kernels import loss_math

    assert A.KL_ESTIMATORS is loss_math.KL_ESTIMATORS == ("k1", "k2", "k3")
    for est in A.KL_ESTIMATORS:  # the reward's penalty is the loss's, on (old, ref)
        torch.testing.assert_close(kl_per_token(OLD, REF, est), loss_math.kl_penalty(OLD, REF, est))
    # k2 = (log r)^2 / 2 with log r = old - ref = 0.5
    assert kl_per_token(torch.tensor([-1.0]), torch.tensor([-1.5]), "k2").item() == pytest.approx(0.125)
    assert kl_per_token(OLD.half(), REF.half()).dtype == torch.float32
    with pytest.raises(ValueError, match="kl_estimator must be one of"):
        kl_per_token(OLD, REF, "k4")
    assert A.ESTIMATORS == ("reinforce_pp", "grpo", "rloo")
    assert all(callable(getattr(A, f"{e}_advantages")) for e in A.ESTIMATORS)
    assert A.ADV_FILTERS == ("zscore", "release", "off")
    for mode in A.ADV_FILTERS:  # every listed filter runs; anything else is refused
        advantage_filter(torch.zeros(2, 3), MASK, mode, raw_mean=0.0)
    with pytest.raises(ValueError, match="zscore"):
        advantage_filter(torch.zeros(2, 3), MASK, "clip")


def test_kl_k3_by_hand_and_no_kl_path():
    # k3 with log r = old - ref = 0.5:  e^-0.5 - 1 + 0.5 = 0.6065307 - 0.5 = 0.1065307
    assert kl_per_token(torch.tensor([-1.0]), torch.tensor([-1.5]), "k3").item() == pytest.approx(0.1065307)
    assert (kl_per_token(OLD, REF, "k3") >= 0).all()  # k3 is never negative
    r = reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, OLD, REF, kl_coef=0.1,
                                kl_estimator="k3", normalize=False)
    # row1 token0: -0.1 * k3(log r = -0.5) = -0.1 * (e^0.5 - 1 - 0.5) = -0.1 * 0.1487213
    assert r[1, 0].item() == pytest.approx(-0.01487213, abs=1e-6)
    # kl_coef = 0: no log-probs needed; returns are the reward on every valid token
    assert reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, kl_coef=0.0,
                                   normalize=False).tolist() == [[1, 1, 1], [0, 0, 0]]
    with pytest.raises(ValueError, match="old_logp and ref_logp"):
        reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, kl_coef=0.1)
    with pytest.raises(ValueError, match="kl_estimator"):
        reinforce_pp_advantages(torch.tensor([1.0, 0.0]), MASK, OLD, REF, kl_estimator="k4")
    with pytest.raises(ValueError, match="rewards must be"):
        reinforce_pp_advantages(torch.ones(2, 1), MASK, kl_coef=0.0)


def test_masked_normalize_matches_torch_and_constant_batch():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 7, generator=g) * 3 + 1
    mask = torch.rand(4, 7, generator=g) > 0.3
    out, st = masked_normalize(x, mask)
    v = x[mask]
    assert out[mask].tolist() == pytest.approx(((v - v.mean()) / v.std(unbiased=False)).tolist(), abs=1e-5)
    assert (out[~mask] == 0).all()
    # every valid return equal (all rewards 1, no KL): std 0 → advantages 0, never NaN
    flat, _ = masked_normalize(torch.ones(2, 3), MASK)
    assert flat.tolist() == [[0, 0, 0], [0, 0, 0]]


def _dist_worker(rank, world, init_file, out_dir, batches):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        rewards, mask, old, ref = batches[rank]
        adv = reinforce_pp_advantages(rewards, mask, old, ref, kl_coef=0.05, kl_estimator="k3",
                                      process_group=dist.group.WORLD)
        torch.save(adv, os.path.join(out_dir, f"adv{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_reinforce_pp_global_normalization_across_two_ranks():
    g = torch.Generator().manual_seed(1)

    def batch(b, r):
        lens = torch.randint(1, r + 1, (b,), generator=g)
        mask = (torch.arange(r)[None, :] < lens[:, None]).long()
        return (torch.randint(0, 3, (b,), generator=g).float(), mask,
                -torch.rand(b, r, generator=g) * 3, -torch.rand(b, r, generator=g) * 3)

    batches = [batch(3, 5), batch(2, 5)]  # ranks hold different numbers of tokens
    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_dist_worker, args=(2, os.path.join(d, "init"), d, batches), nprocs=2, join=True)
        per_rank = [torch.load(os.path.join(d, f"adv{r}.pt")) for r in range(2)]
    cat = [torch.cat([b[i] for b in batches]) for i in range(4)]
    expected = reinforce_pp_advantages(*cat, kl_coef=0.05, kl_estimator="k3")
    assert torch.allclose(torch.cat(per_rank), expected, atol=1e-5)
    # and each rank's local-only normalization would have differed
    local0 = reinforce_pp_advantages(*batches[0], kl_coef=0.05, kl_estimator="k3")
    assert not torch.allclose(local0, expected[:3], atol=1e-3)


def test_grpo_by_hand():
    mask = torch.tensor([[1, 1], [1, 0], [1, 1], [1, 1], [1, 1], [0, 0]])
    adv = grpo_advantages(torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, 3.0]), mask, n_samples=2, eps=0.0)
    # groups [1,0]: mean .5, unbiased std sqrt(.25+.25) = 0.70711 → ±0.70711
    #        [2,2]: 0;  [1,3]: mean 2, std sqrt(1+1) = 1.41421 → ∓0.70711
    s = 0.5 / math.sqrt(0.5)
    close(adv, [[s, s], [-s, 0], [0, 0], [0, 0], [-s, -s], [0, 0]])
    adv = grpo_advantages(torch.tensor([3.0, 0.0, 0.0]), torch.ones(3, 1), n_samples=3, eps=0.0)
    # mean 1, std sqrt((4 + 1 + 1) / 2) = sqrt(3) → [2, -1, -1] / 1.73205
    assert adv[:, 0].tolist() == pytest.approx([2 / math.sqrt(3), -1 / math.sqrt(3), -1 / math.sqrt(3)])
    no_std = grpo_advantages(torch.tensor([1.0, 0.0, 1.0, 3.0]), torch.ones(4, 1), 2, scale_by_std=False)
    assert no_std[:, 0].tolist() == [0.5, -0.5, -1.0, 1.0]


def test_rloo_by_hand_and_group_errors():
    adv = rloo_advantages(torch.tensor([3.0, 0.0, 0.0]), torch.tensor([[1, 1], [1, 0], [1, 1]]), 3)
    # baselines: (0+0)/2 = 0, (3+0)/2 = 1.5, 1.5  →  advantages 3, -1.5, -1.5
    assert adv.tolist() == [[3.0, 3.0], [-1.5, 0.0], [-1.5, -1.5]]
    assert rloo_advantages(torch.tensor([1.0, 0.0]), torch.ones(2, 1), 2)[:, 0].tolist() == [1.0, -1.0]
    with pytest.raises(ValueError, match="n_samples >= 2"):
        grpo_advantages(torch.tensor([1.0]), torch.ones(1, 1), 1)
    with pytest.raises(ValueError, match="multiple of n_samples"):
        rloo_advantages(torch.ones(3), torch.ones(3, 1), 2)


def test_filter_zscore_by_hand():
    adv = torch.tensor([[0.5, -3.5, 3.0], [10.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out, filt = advantage_filter(adv, mask, "zscore", k=3.0)
    # |-3.5| > 3, |10| > 3, NaN: zeroed; 3.0 is on the bound and kept; 7.0 is masked (not counted)
    assert out.tolist() == [[0.5, 0.0, 3.0], [0.0, 0.0, 0.0]]
    assert filt.tolist() == [[False, True, False], [True, True, False]]


def test_filter_release_by_hand():
    adv = torch.tensor([[3.2, -2.7, 3.5], [-2.5, float("inf"), 0.0]])
    out, filt = advantage_filter(adv, torch.ones(2, 3), "release", k=3.0, raw_mean=0.4)
    # bounds [0.4 - 3, 0.4 + 3] = [-2.6, 3.4]: 3.2 and -2.5 and 0 kept, -2.7 / 3.5 / inf zeroed
    close(out, [[3.2, 0.0, 0.0], [-2.5, 0.0, 0.0]])
    assert filt.tolist() == [[False, True, True], [False, True, False]]
    # raw mean 9 → bounds [6, 12]: 11 is inside but |11| > 10 → zeroed; 7 kept; 0 below 6 → zeroed
    out, filt = advantage_filter(torch.tensor([[11.0, 7.0, 0.0]]), torch.ones(1, 3), "release", raw_mean=9.0)
    assert out.tolist() == [[0.0, 7.0, 0.0]] and filt.tolist() == [[True, False, True]]
    with pytest.raises(ValueError, match="raw_mean"):
        advantage_filter(adv, torch.ones(2, 3), "release")


def test_filter_off_and_bad_mode():
    adv = torch.tensor([[5.0, -9.0], [1.0, 2.0]])
    out, filt = advantage_filter(adv, torch.tensor([[1, 1], [1, 0]]), "off")
    assert out.tolist() == [[5.0, -9.0], [1.0, 0.0]] and not filt.any()
    with pytest.raises(ValueError, match="mode"):
        advantage_filter(adv, torch.ones(2, 2), "sigma")


def test_filtered_tokens_get_zero_gradient_through_the_loss():
    torch.manual_seed(0)
    B, T = 3, 6
    mask = torch.ones(B, T)
    mask[2, 4:] = 0
    adv = torch.randn(B, T)
    adv[0, 1], adv[1, 3], adv[2, 0] = 8.0, -5.0, 4.0   # outliers the filter must remove
    filtered_adv, filt = advantage_filter(adv, mask, "zscore")
    assert filt.sum().item() >= 3
    old = -torch.rand(B, T) * 2
    logp = (old + 0.05 * torch.randn(B, T)).requires_grad_()
    loss, _ = stable_reinforce_loss(logp, old, filtered_adv, mask)
    loss.backward()
    assert (logp.grad[filt] == 0).all()                  # filtered tokens add nothing
    kept = mask.bool() & ~filt
    assert (logp.grad[kept] != 0).all()                  # every other valid token does
    # without the filter the outliers do receive gradient
    logp.grad = None
    stable_reinforce_loss(logp, old, adv, mask)[0].backward()
    assert (logp.grad[filt] != 0).all()


def test_end_to_end_release_rule_uses_the_raw_mean():
    # rewards mostly 0 with one 3: the lone outlier's normalized return is far above 3
    rewards = torch.tensor([0.0] * 15 + [3.0])
    mask = torch.ones(16, 1)
    adv, st = reinforce_pp_advantages(rewards, mask, kl_coef=0.0, return_stats=True)
    # mean 3/16 = 0.1875, std = sqrt(9/16 - 0.1875^2) = 0.72618; outlier (3 - 0.1875)/0.72618 = 3.873
    assert adv[-1, 0].item() == pytest.approx(3.873, abs=1e-3)
    z, fz = advantage_filter(adv, mask, "zscore")
    r, fr = advantage_filter(adv, mask, "release", raw_mean=st.mean)
    # zscore: 3.873 > 3 → zeroed; release: 3.873 > 0.1875 + 3 = 3.1875 → zeroed too
    assert fz[-1, 0] and fr[-1, 0] and fz.sum() == 1 and fr.sum() == 1
