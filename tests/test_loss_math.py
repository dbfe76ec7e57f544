"""Closed-form StableReinforce gradients (used by the fused kernels) vs autograd."""
import math

import pytest
import torch

from r1reward.kernels.loss_math import LossSettings, loss_and_grad, per_token_loss, token_weights

SETTINGS = [
    LossSettings(),
    LossSettings(preclip=None),
    LossSettings(clip_eps=(0.1, 0.3), dual_clip=3.0),
    LossSettings(kl_coef=0.1, kl_estimator="k1"),
    LossSettings(kl_coef=0.1, kl_estimator="k2"),
    LossSettings(kl_coef=0.1, kl_estimator="k3", aggregation="seq-mean-token-mean"),
    LossSettings(aggregation="seq-mean-token-sum"),
]


@pytest.mark.parametrize("s", SETTINGS, ids=str)
def test_closed_form_grad_matches_autograd(s):
    g = torch.Generator().manual_seed(0)
    B, T = 4, 9
    lp = (-torch.rand(B, T, generator=g, dtype=torch.float64) * 5).requires_grad_()
    # Spread of log-ratios that crosses the PPO clip and the Pre-CLIP band (±log 1e3 ≈ 6.9).
    old = lp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 4
    adv = torch.randn(B, T, generator=g, dtype=torch.float64) * 2
    ref = lp.detach() + torch.randn(B, T, generator=g, dtype=torch.float64) * 0.5
    mask = torch.rand(B, T, generator=g) > 0.3
    mask[2] = False  # an all-masked sequence
    w = token_weights(mask, s.aggregation).double()
    loss = (w * per_token_loss(lp, old, adv, ref, s)).sum()
    loss.backward()
    loss_t, gr, _ = loss_and_grad(lp.detach(), old, adv, ref, w, s)
    torch.testing.assert_close((w * loss_t).sum(), loss.detach())
    torch.testing.assert_close(gr, lp.grad)


def test_preclip_zero_grad_outside_band_and_unclipped_inside():
    s = LossSettings(clip_eps=(0.99, 1e9))  # PPO clip out of the way
    lp = torch.tensor([0.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    old = torch.tensor([-10.0, 10.0, -1.0, 1.0], dtype=torch.float64)  # d = 10, -10, 1, -1
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0], dtype=torch.float64)
    w = torch.ones(4, dtype=torch.float64)
    loss, g, parts = loss_and_grad(lp, old, adv, None, w, s)
    assert g[0] == 0 and g[1] == 0
    assert not parts["in_band"][0] and not parts["in_band"][1]
    # Inside the band the gradient is the plain surrogate's: -A·ratio.
    torch.testing.assert_close(g[2:], -adv[2:] * torch.exp(-old[2:]))
    # The loss at a pre-clipped token uses the clamped ratio: finite, bounded by 1e3·|A|.
    assert torch.isfinite(loss).all() and loss[1] <= 1e3 + 1e-9
    s_off = LossSettings(preclip=None, clip_eps=(0.99, 1e9))
    _, g_off, _ = loss_and_grad(lp, old, adv, None, w, s_off)
    assert g_off[0] != 0


def test_token_weights_aggregations():
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(token_weights(mask, "token-mean").sum(), torch.tensor(1.0))
    w = token_weights(mask, "seq-mean-token-mean")
    torch.testing.assert_close(w[0, 0], torch.tensor(1 / 3 / 2))
    torch.testing.assert_close(w[1, 0], torch.tensor(1 / 2))
    assert w[2].sum() == 0
    assert token_weights(torch.zeros(2, 3), "token-mean").sum() == 0
    torch.testing.assert_close(token_weights(mask, "seq-mean-token-sum")[0, 0],
                               torch.tensor(0.5))


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="aggregation"):
        LossSettings(aggregation="sum")
    with pytest.raises(ValueError, match="preclip"):
        LossSettings(preclip=(1.0, 2.0))
    with pytest.raises(ValueError, match="kl_estimator"):
        LossSettings(kl_estimator="k4")
    assert math.isclose(LossSettings().preclip[1], math.log(1e3))
