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


class SkewedSampler(HFEngine):
    """HF generate, reporting every token's log-prob as ``trainer - 0.5``: the ratio
    π_trainer/π_sampler is e^0.5 ≈ 1.65 on every token."""

    reports_logprobs = True

    def generate(self, pairs, **kw):
        from r1reward.logprobs import build_seq_batch, sequence_logprobs
        from r1reward.rollout import vision_placeholder_ids
        gen = super().generate(pairs, **kw)
        batch = build_seq_batch(gen.prompt_inputs, gen.sequences, gen.prompt_len, gen.response_mask,
                                forbidden_ids=vision_placeholder_ids(self.model))
        gen.sampler_logp = (sequence_logprobs(self.model, batch, 8) - 0.5) * batch.response_mask
        return gen


@pytest.mark.parametrize("cap", [1.2, 3.0])
def test_trainer_logs_the_gap_and_truncates_the_weights(tmp_path, monkeypatch, cap):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    from r1reward.trainer import Trainer
    monkeypatch.setattr(Trainer, "_build_engine",
                        lambda self, init_dir: SkewedSampler(self.policy, self.processor))
    from r1reward import trainer
    seen = []  # the per-token weights the policy loss receives

    def recording_loss(*a, is_weights=None, **kw):
        m = a[1].response_mask.bool()
        seen.append(is_weights[m] if is_weights is not None else None)
        return real_loss(*a, is_weights=is_weights, **kw)

    real_loss = trainer.policy_loss
    monkeypatch.setattr(trainer, "policy_loss", recording_loss)
    out = tmp_path / "run"
    run(parse_args(["--rollout.engine", "vllm", "--rollout.tis_cap", str(cap), "--output", str(out),
                    "--no-progress", "--steps", "2", "--data.n_train", "8", "--data.n_heldout", "2",
                    "--no-sft.enabled", "--rollout.batch_size", "4", "--algo.train_batch_size", "2",
                    "--rollout.max_new_tokens", "8", "--eval.max_new_tokens", "8"]))
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    for r in rows:
        # the trainer's old log-probs are what the fake sampler shifted: the gap is 0.5
        assert r["sampler_logp_diff_mean"] == pytest.approx(0.5, abs=1e-4)
        assert r["sampler_kl"] == pytest.approx(math.exp(0.5) - 1.5, abs=1e-4)
        if cap < math.exp(0.5):  # every token truncated to the cap
            assert r["tis_clip_frac"] == 1.0 and r["tis_weight_mean"] == pytest.approx(cap, abs=1e-4)
        else:
            assert r["tis_clip_frac"] == 0.0
            assert r["tis_weight_mean"] == pytest.approx(math.exp(0.5), abs=1e-3)
    assert seen and all(w is not None for w in seen)
    w = torch.cat(seen)
    assert torch.allclose(w, torch.full_like(w, min(cap, math.exp(0.5))), atol=1e-3)
