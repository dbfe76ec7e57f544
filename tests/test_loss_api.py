"""The loss API other trainers need: on-policy mode, an external normaliser, per-token
output, importance weights, an entropy bonus with its gradient, and clear errors for
parameters the kernels cannot use (ZeRO-3 partitions). Oracle: float64 full logits."""
import pytest
import torch

from r1reward.kernels import (
    StableReinforceLoss,
    fused_stable_reinforce_loss,
    stable_reinforce_loss,
    token_logprobs,
)
from r1reward.kernels.loss_math import LossSettings, per_token_loss, token_weights

B, T, H, V = 3, 5, 16, 37  # V not a multiple of any block


def _problem(seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(B, T, H, generator=g) * 0.7).to(dtype)
    w = (torch.randn(V, H, generator=g) * 0.5).to(dtype)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 3:] = False
    mask[2, :] = False  # one sequence with no response token
    mask[2, 0] = True
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T, generator=g) * 0.3 - 3.0
    return h, w, y, mask, adv, old


def _oracle_lp_ent(h, w, y):
    z = h.double() @ w.double().T
    logp = torch.log_softmax(z, -1)
    return logp.gather(-1, y[..., None]).squeeze(-1), -(logp.exp() * logp).sum(-1)


def _grads(loss, *ts):
    return torch.autograd.grad(loss, ts)


def test_on_policy_is_ratio_one_with_the_policy_gradient():
    h, w, y, mask, adv, _ = _problem()
    lp = torch.randn(B, T, dtype=torch.float64, requires_grad=True)
    loss, stats = stable_reinforce_loss(lp, None, adv, mask)
    (g,) = _grads(loss, lp)
    wt = token_weights(mask, "token-mean").double()
    a = adv.double()[:, None].expand(B, T)
    torch.testing.assert_close(loss, -(wt * a).sum())  # ratio 1: loss = -Σ w·A
    torch.testing.assert_close(g, -(wt * a))           # ∇ = -w·A·∇logp
    assert stats["ratio_max"] == 1 and stats["clip_frac"] == 0 and stats["preclip_frac"] == 0


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_fused_on_policy_matches_the_oracle(backend):
    h, w, y, mask, adv, _ = _problem(1)
    h.requires_grad_(True)
    w.requires_grad_(True)
    loss, _ = fused_stable_reinforce_loss(h, w, y, None, adv, mask, backend=backend)
    gh, gw = _grads(loss, h, w)
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    lp, _ = _oracle_lp_ent(h64, w64, y)
    want = stable_reinforce_loss(lp, None, adv.double(), mask)[0]
    wh, ww = _grads(want, h64, w64)
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gh.double(), wh, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(gw.double(), ww, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_micro_batches_with_a_global_normalizer_sum_to_the_full_batch_loss(aggregation):
    h, w, y, mask, adv, old = _problem(2)
    lp = _oracle_lp_ent(h, w, y)[0].float()
    full, _ = stable_reinforce_loss(lp, old, adv, mask, aggregation=aggregation)
    count = mask.sum() if aggregation == "token-mean" else (mask.sum(1) > 0).sum()
    parts = [stable_reinforce_loss(lp[i:i + 1], old[i:i + 1], adv[i:i + 1], mask[i:i + 1],
                                   aggregation=aggregation, normalizer=count)[0] for i in range(B)]
    torch.testing.assert_close(sum(parts), full)
    # and the one-pass fused kernel honours it too
    fused = sum(fused_stable_reinforce_loss(h[i:i + 1], w, y[i:i + 1], old[i:i + 1], adv[i:i + 1],
                                            mask[i:i + 1], aggregation=aggregation, normalizer=count,
                                            backend="torch")[0] for i in range(B))
    torch.testing.assert_close(fused, full, atol=1e-6, rtol=1e-5)


def test_importance_weights_scale_each_token_in_both_paths():
    h, w, y, mask, adv, old = _problem(3)
    isw = torch.rand(B, T, generator=torch.Generator().manual_seed(9)) + 0.5
    h.requires_grad_(True)
    one_pass, _ = fused_stable_reinforce_loss(h, w, y, old, adv, mask, is_weights=isw, backend="torch")
    (g1,) = _grads(one_pass, h)
    per_tok, _ = fused_stable_reinforce_loss(h, w, y, old, adv, mask, is_weights=isw,
                                             reduction="none", backend="torch")
    two_step = (token_weights(mask, "token-mean") * per_tok).sum()
    (g2,) = _grads(two_step, h)
    lp = _oracle_lp_ent(h.detach(), w, y)[0]
    s = LossSettings()
    want_t = per_token_loss(lp, old.double(), adv.double()[:, None].expand(B, T), None, s)
    want = (token_weights(mask, "token-mean").double() * isw.double() * torch.where(mask, want_t, 0)).sum()
    torch.testing.assert_close(one_pass.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(two_step.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g1, g2, atol=1e-6, rtol=1e-5)
    unweighted, _ = fused_stable_reinforce_loss(h, w, y, old, adv, mask, backend="torch")
    assert not torch.allclose(unweighted, one_pass)


def test_per_token_output_is_zero_off_the_mask_and_aggregates_to_the_loss():
    h, w, y, mask, adv, old = _problem(4)
    lp = _oracle_lp_ent(h, w, y)[0].float()
    per_tok, stats = stable_reinforce_loss(lp, old, adv, mask, reduction="none")
    assert per_tok.shape == (B, T) and bool((per_tok[~mask] == 0).all())
    agg, stats2 = stable_reinforce_loss(lp, old, adv, mask, aggregation="seq-mean-token-mean")
    torch.testing.assert_close((token_weights(mask, "seq-mean-token-mean") * per_tok).sum(), agg)
    assert stats.keys() == stats2.keys()


def test_entropy_gradient_matches_float64_autograd():
    h, w, y, mask, _, _ = _problem(5)
    bias = torch.randn(V) * 0.1
    h.requires_grad_(True)
    w.requires_grad_(True)
    tgt = torch.where(mask, y, -100)
    lp, ent = token_logprobs(h, w, tgt, bias=bias, temperature=0.7, return_entropy=True,
                             entropy_grad=True, backend="torch")
    probe = torch.randn(B, T, dtype=torch.float64)
    gh, gw = _grads((ent.double() * probe).sum() + lp.double().sum(), h, w)
    h64, w64 = h.detach().double().requires_grad_(True), w.detach().double().requires_grad_(True)
    z = (h64 @ w64.T + bias.double()) / 0.7
    logp = torch.log_softmax(z, -1)
    want_lp = torch.where(mask, logp.gather(-1, y[..., None]).squeeze(-1), 0)
    want_ent = torch.where(mask, -(logp.exp() * logp).sum(-1), 0)
    wh, ww = _grads((want_ent * probe).sum() + want_lp.sum(), h64, w64)
    torch.testing.assert_close(ent.double(), want_ent, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gh.double(), wh, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gw.double(), ww, atol=1e-5, rtol=1e-4)


def test_entropy_bonus_in_the_fused_loss():
    h, w, y, mask, adv, old = _problem(6)
    h.requires_grad_(True)
    module = StableReinforceLoss(entropy_coef=0.05, aggregation="seq-mean-token-mean", backend="torch")
    loss, stats = module.fused(h, w, y, old, adv, mask)
    (g,) = _grads(loss, h)
    h64 = h.detach().double().requires_grad_(True)
    lp, ent = _oracle_lp_ent(h64, w.double(), y)
    wt = token_weights(mask, "seq-mean-token-mean").double()
    want = stable_reinforce_loss(lp, old.double(), adv.double(), mask,
                                 aggregation="seq-mean-token-mean")[0] - 0.05 * (wt * ent).sum()
    (wg,) = _grads(want, h64)
    torch.testing.assert_close(loss.double(), want, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(g.double(), wg, atol=1e-6, rtol=1e-5)
    assert "entropy" in stats


def test_a_zero3_partitioned_weight_gets_a_message_not_a_shape_error():
    h, w, y, mask, adv, old = _problem()
    part = torch.empty(0)
    part.ds_shape = torch.Size([V, H])  # what a ZeRO-3 parameter looks like outside its gather
    with pytest.raises(ValueError, match="ZeRO-3 .*GatheredParameters"):
        fused_stable_reinforce_loss(h, part, y, old, adv, mask, backend="torch")
    with pytest.raises(ValueError, match="ZeRO-3"):
        token_logprobs(h, part, y, backend="torch")


@pytest.mark.parametrize("kwargs, match", [
    (dict(reduction="sum"), "reduction must be one of"),
    (dict(is_weights=torch.ones(B, T + 1)), "is_weights must be"),
    (dict(is_weights=torch.ones(B + 1)), "is_weights \\[B\\]"),
    (dict(normalizer=torch.ones(2)), "normalizer must be a number"),
])
def test_bad_arguments_are_named(kwargs, match):
    _, _, _, mask, adv, old = _problem()
    with pytest.raises(ValueError, match=match):
        stable_reinforce_loss(old.clone(), old, adv, mask, **kwargs)


def test_entropy_grad_needs_return_entropy():
    h, w, y, *_ = _problem()
    with pytest.raises(ValueError, match="entropy_grad=True needs return_entropy=True"):
        token_logprobs(h, w, y, entropy_grad=True, backend="torch")


def test_importance_weights_leave_the_kl_term_unweighted():
    h, w, y, mask, adv, old = _problem(7)
    ref = old + 0.2
    isw = torch.full((B, T), 2.0)
    lp = _oracle_lp_ent(h, w, y)[0]
    s = LossSettings(kl_coef=0.1)
    a = adv.double()[:, None].expand(B, T)
    want_t = 2.0 * per_token_loss(lp, old.double(), a, None, LossSettings()) + \
        0.1 * (torch.exp(ref.double() - lp) - (ref.double() - lp) - 1)
    want = (token_weights(mask, "token-mean").double() * torch.where(mask, want_t, 0)).sum()
    got, _ = stable_reinforce_loss(lp, old, adv, mask, ref_logp=ref, kl_coef=s.kl_coef, is_weights=isw)
    torch.testing.assert_close(got, want)
    fused, _ = fused_stable_reinforce_loss(h, w, y, old, adv, mask, ref_logp=ref, kl_coef=0.1,
                                           is_weights=isw, backend="torch")
    torch.testing.assert_close(fused.double(), want, atol=1e-6, rtol=1e-5)
