"""Response-position log-probs and the fused policy loss against the full-logits oracle."""
import math

import pytest
import torch
from test_train_utils import full_logits_logprobs, seq_batch, tiny_vlm

from r1reward.kernels import stable_reinforce_loss
from r1reward.logprobs import FusedLMHead, policy_loss, sequence_logprobs


@pytest.fixture(scope="module")
def model():
    m = tiny_vlm()
    FusedLMHead.install(m, backend="auto", preclip=(math.log(1e-3), math.log(1e3)),
                        aggregation="seq-mean-token-mean")
    return m


def test_install_keeps_parameters_and_plain_forward(model):
    assert isinstance(model.lm_head, FusedLMHead)
    assert list(dict(model.named_parameters())).count("lm_head.weight") == 1
    h = torch.randn(2, 3, 32)
    torch.testing.assert_close(model.lm_head(h), h @ model.lm_head.weight.T)


def test_sequence_logprobs_match_full_logits(model):
    b = seq_batch()
    with torch.no_grad():
        want = full_logits_logprobs(model, b)
    got = sequence_logprobs(model, b, micro_batch_size=2)  # micro-batches split the images
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    assert (got[b.response_mask == 0] == 0).all()


def test_policy_loss_matches_oracle_loss_and_grads(model):
    b = seq_batch(seed=1)
    with torch.no_grad():
        old = full_logits_logprobs(model, b) + 0.05 * torch.randn(b.response_ids.shape)
    adv = torch.randn(b.response_ids.shape) * b.response_mask
    model.zero_grad()
    loss, stats = policy_loss(model, b, old, adv)
    loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    lp = full_logits_logprobs(model, b)
    want_loss, _ = stable_reinforce_loss(lp, old, adv, b.response_mask,
                                         aggregation="seq-mean-token-mean")
    want_loss.backward()
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-4)
    for n, p in model.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got[n], p.grad, atol=1e-5, rtol=1e-3, msg=n)
    assert 0.0 <= stats["clip_frac"].item() <= 1.0
    assert "lm_head.weight" in got and got["lm_head.weight"].abs().sum() > 0
