"""Response-position log-probs and the fused policy loss against the full-logits oracle."""
import math

import pytest
import torch
from test_train_utils import full_logits_logprobs, seq_batch, tiny_vlm

from r1reward.kernels import stable_reinforce_loss
from r1reward.logprobs import FusedLMHead, causal_layout, policy_loss, sequence_logprobs


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


def test_causal_layout_moves_left_pads_behind_each_row():
    b = seq_batch(B=4)
    inputs, shift = causal_layout(b)
    mask = b.attention_mask.bool()
    assert "attention_mask" not in inputs
    assert shift.tolist() == [int((~mask[i]).long().cumprod(0).sum()) for i in range(len(b))]
    assert shift.max() > 0 and len(set(shift.tolist())) > 1  # rows of different lengths
    for i in range(len(b)):
        n = int(mask[i].sum())
        real = b.input_ids[i][mask[i]]
        assert torch.equal(inputs["input_ids"][i, :n], real)  # real tokens first, in order
        assert torch.equal(inputs["mm_token_type_ids"][i, :n], b.vision["mm_token_type_ids"][i][mask[i]])
    assert inputs["pixel_values"] is b.vision["pixel_values"]  # per-image inputs untouched


def test_forward_runs_without_a_padding_mask_and_keeps_one_for_holes(model):
    """Contiguous rows: the model gets no attention mask (SDPA's causal path). A row whose
    mask has a hole inside keeps the mask, and both still match the masked oracle."""
    seen = []
    hook = model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    try:
        b = seq_batch(seed=2)
        with torch.no_grad():
            want = full_logits_logprobs(model, b)
        seen.clear()
        torch.testing.assert_close(sequence_logprobs(model, b, micro_batch_size=3), want,
                                   atol=1e-5, rtol=1e-4)
        assert seen == [None]
        holed = seq_batch(seed=2)
        holed.attention_mask[0, holed.prompt_len - 2] = 0  # a prompt token hidden mid-row
        assert causal_layout(holed) is None
        with torch.no_grad():
            want = full_logits_logprobs(model, holed)
        seen.clear()
        got = sequence_logprobs(model, holed, micro_batch_size=3)
        assert seen[0] is not None
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    finally:
        hook.remove()
