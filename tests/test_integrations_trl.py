"""r1reward.integrations.trl against the installed TRL: with Pre-CLIP and the filter off
the loss equals TRL's own GRPO loss (value and gradient) for each supported loss_type, with
and without a KL term; Pre-CLIP and the filter act when on; unsupported settings are
refused by name; a short real training run goes through and logs our statistics."""
import math

import pytest
import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM
from trl import GRPOConfig, GRPOTrainer

from r1reward.integrations.trl import StableReinforceGRPOTrainer
from r1reward.tiny import build_tokenizer

B, P, C = 4, 5, 6


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(scope="module")
def model_dir(tok, tmp_path_factory):
    """A tiny causal LM saved locally: TRL loads it (and its reference copy) from the path."""
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    path = tmp_path_factory.mktemp("tiny-causal-lm")
    Qwen2ForCausalLM(cfg).float().save_pretrained(path)
    return str(path)


def _reward(completions, **kw):
    return [float(len(c) % 3) for c in completions]


def _trainer(tok, model_dir, tmp_path, cls=StableReinforceGRPOTrainer, **kw):
    loss_type = kw.pop("loss_type", "grpo")
    beta = kw.pop("beta", 0.0)
    max_steps = kw.pop("max_steps", 1)
    args = GRPOConfig(output_dir=str(tmp_path / "out"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=C, max_steps=max_steps, report_to="none", use_cpu=True,
                      logging_steps=1, learning_rate=1e-3, save_strategy="no", bf16=False,
                      loss_type=loss_type, beta=beta, epsilon_high=0.28, use_bias_correction_kl=False)
    ds = Dataset.from_list([{"prompt": f"Which response is better? {i}"} for i in range(16)])
    tr = cls(model=model_dir, reward_funcs=_reward, args=args, train_dataset=ds, processing_class=tok, **kw)
    tr.current_gradient_accumulation_steps = 2  # a training step's state, exercised by the normalizers
    tr.model.train()
    return tr


def _inputs(tr, spread=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    vocab = tr.model.config.vocab_size
    completion_mask = torch.ones(B, C, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    inputs = {"prompt_ids": torch.randint(0, vocab, (B, P), generator=g),
              "prompt_mask": torch.ones(B, P, dtype=torch.long),
              "completion_ids": torch.randint(0, vocab, (B, C), generator=g),
              "completion_mask": completion_mask,
              "advantages": torch.randn(B, generator=g),
              "num_items_in_batch": completion_mask.sum() * 2}
    with torch.no_grad():
        ids = torch.cat([inputs["prompt_ids"], inputs["completion_ids"]], 1)
        am = torch.cat([inputs["prompt_mask"], completion_mask], 1)
        lp, _, _ = tr._get_per_token_logps_and_entropies(tr.model, ids, am, C)
    inputs["old_per_token_logps"] = lp + spread * torch.randn(B, C, generator=g)
    inputs["ref_per_token_logps"] = lp + 0.1 * torch.randn(B, C, generator=g)
    return inputs


def _loss_and_grads(fn, tr, inputs):
    tr.model.zero_grad()
    loss = fn(tr, tr.model, inputs)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in tr.model.parameters() if p.grad is not None]


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dapo"])
@pytest.mark.parametrize("beta", [0.0, 0.05])
def test_equals_trls_own_loss_with_preclip_off(tok, model_dir, tmp_path, loss_type, beta):
    tr = _trainer(tok, model_dir, tmp_path, loss_type=loss_type, beta=beta, preclip=None, adv_filter_k=None)
    inputs = _inputs(tr, spread=0.5)  # wide enough that the PPO clip acts
    ours, g_ours = _loss_and_grads(StableReinforceGRPOTrainer._compute_loss, tr, inputs)
    theirs, g_theirs = _loss_and_grads(GRPOTrainer._compute_loss, tr, inputs)
    torch.testing.assert_close(ours, theirs, atol=1e-6, rtol=1e-5)
    assert len(g_ours) == len(g_theirs) > 0
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert tr._metrics["train"]["stable_reinforce/clip_frac"][-1] > 0


def test_preclip_acts_on_far_off_policy_tokens(tok, model_dir, tmp_path):
    band = (math.log(0.5), math.log(2.0))
    tr = _trainer(tok, model_dir, tmp_path, preclip=band, adv_filter_k=None)
    inputs = _inputs(tr, spread=3.0)
    ours, _ = _loss_and_grads(StableReinforceGRPOTrainer._compute_loss, tr, inputs)
    theirs, _ = _loss_and_grads(GRPOTrainer._compute_loss, tr, inputs)
    m = tr._metrics["train"]
    assert m["stable_reinforce/preclip_frac"][-1] > 0
    assert m["stable_reinforce/ratio_max"][-1] <= 2.0 + 1e-5
    assert not torch.allclose(ours, theirs)


@pytest.mark.parametrize("setting, match", [
    (dict(loss_type="dr_grpo"), "loss_type"),
    (dict(delta=2.0), "delta"),
    (dict(top_entropy_quantile=0.5), "top_entropy_quantile"),
    (dict(beta=0.1), "use_bias_correction_kl"),
])
def test_unsupported_settings_are_refused_by_name(tok, model_dir, tmp_path, setting, match):
    args = GRPOConfig(output_dir=str(tmp_path / "o"), per_device_train_batch_size=4, num_generations=4,
                      max_completion_length=C, report_to="none", use_cpu=True, **setting)
    ds = Dataset.from_list([{"prompt": "p"}] * 4)
    with pytest.raises(ValueError, match=match):
        StableReinforceGRPOTrainer(model=model_dir, reward_funcs=_reward, args=args, train_dataset=ds,
                                   processing_class=tok)


def test_a_short_training_run_filters_and_logs(tok, model_dir, tmp_path):
    # k=0.5 so the filter acts on ordinary group-normalised advantages
    tr = _trainer(tok, model_dir, tmp_path, max_steps=2, adv_filter_k=0.5)
    before = [p.detach().clone() for p in tr.model.parameters()]
    tr.train()
    logs = [h for h in tr.state.log_history if "loss" in h]
    assert len(logs) == 2
    assert all(math.isfinite(h["loss"]) for h in logs)
    assert any(h["stable_reinforce/filtered_frac"] > 0 for h in logs)
    assert "stable_reinforce/preclip_frac" in logs[0]
    assert any(not torch.equal(a, b) for a, b in zip(before, tr.model.parameters()))
