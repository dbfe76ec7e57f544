"""Trainer–sampler mismatch: the statistics and truncated importance sampling, and the
trainer acting on them when an engine reports log-probs (here an HF engine that reports
deliberately wrong ones, so the gap and the TIS truncation are known)."""
import json
import math

import pytest
import torch

from r1reward.config import parse_args
from r1reward.engine import HFEngine
from r1reward.mismatch import mismatch_stats, tis_weights
from r1reward.train import run


def test_stats_and_weights_by_hand():
    trainer = torch.tensor([[-1.0, -2.0, -0.5], [-3.0, 0.0, 0.0]])
    sampler = torch.tensor([[-1.5, -2.0, -0.1], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    d = torch.tensor([0.5, 0.0, -0.4, -2.0], dtype=torch.float64)
    s = mismatch_stats(trainer, sampler, mask)
    assert s["sampler_logp_diff_mean"] == pytest.approx(d.abs().mean().item())
    assert s["sampler_logp_diff_max"] == pytest.approx(2.0)
    assert s["sampler_kl"] == pytest.approx((d.exp() - 1 - d).mean().item())
    w, frac = tis_weights(trainer, sampler, mask, cap=1.2)
    want = torch.tensor([[1.2, 1.0, math.exp(-0.4)], [math.exp(-2.0), 1.0, 1.0]])
    assert torch.allclose(w, want, atol=1e-6) and frac == pytest.approx(1 / 4)
    assert mismatch_stats(trainer, sampler, torch.zeros_like(mask))["sampler_kl"] == 0.0


def skew(n_tokens):
    """The fake sampler's log-prob offset for a response of ``n_tokens`` tokens: rows differ,
    so weights applied to the wrong rows would show."""
    return 0.2 + 0.15 * (n_tokens % 5)


class SkewedSampler(HFEngine):
    """HF generate, reporting every token's log-prob as ``trainer - skew(row length)``: the
    ratio π_trainer/π_sampler is e^skew on each token of the row."""

    def generate(self, pairs, **kw):
        from r1reward.logprobs import build_seq_batch, sequence_logprobs
        from r1reward.rollout import vision_placeholder_ids
        gen = super().generate(pairs, **kw)
        batch = build_seq_batch(gen.prompt_inputs, gen.sequences, gen.prompt_len, gen.response_mask,
                                forbidden_ids=vision_placeholder_ids(self.model))
        off = torch.tensor([skew(int(n)) for n in batch.response_mask.sum(1)])[:, None]
        gen.sampler_logp = (sequence_logprobs(self.model, batch, 8) - off) * batch.response_mask
        return gen


@pytest.mark.parametrize("cap", [1.1, 1.8, 3.0])
def test_trainer_logs_the_gap_and_truncates_the_weights(tmp_path, monkeypatch, cap):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    from r1reward.trainer import Trainer
    monkeypatch.setattr(Trainer, "_build_engine",
                        lambda self, init_dir: SkewedSampler(self.policy, self.processor))
    from r1reward import trainer
    checked = []  # rows whose weights reached the policy loss as expected

    def recording_loss(*a, is_weights=None, **kw):
        mb = a[1]
        for row, n in enumerate(mb.response_mask.sum(1).tolist()):
            if n:
                w = is_weights[row][mb.response_mask[row].bool()]
                want = min(cap, math.exp(skew(int(n))))
                checked.append(torch.allclose(w, torch.full_like(w, want), atol=1e-3))
        return real_loss(*a, is_weights=is_weights, **kw)

    real_loss = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", recording_loss)
    out = tmp_path / "run"
    run(parse_args(["--rollout.engine", "vllm", "--rollout.tis_cap", str(cap), "--output", str(out),
                    "--no-progress", "--steps", "2", "--data.n_train", "8", "--data.n_heldout", "2",
                    "--no-sft.enabled", "--rollout.batch_size", "4", "--algo.train_batch_size", "2",
                    "--rollout.max_new_tokens", "8", "--eval.max_new_tokens", "8"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert checked and all(checked) and len(checked) >= 8  # every row, its own weight
    skews = [skew(n) for n in range(5)]
    for r in rows:
        # the trainer's old log-probs are what the fake sampler shifted
        assert min(skews) - 1e-4 <= r["sampler_logp_diff_mean"] <= max(skews) + 1e-4
        assert r["sampler_logp_diff_max"] <= max(skews) + 1e-4 and r["sampler_kl"] > 0
        if cap < math.exp(min(skews)):  # every token truncated to the cap
            assert r["tis_clip_frac"] == 1.0 and r["tis_weight_mean"] == pytest.approx(cap, abs=1e-4)
        elif cap > math.exp(max(skews)):
            assert r["tis_clip_frac"] == 0.0
            assert math.exp(min(skews)) - 1e-3 <= r["tis_weight_mean"] <= math.exp(max(skews)) + 1e-3
