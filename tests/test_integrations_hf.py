"""r1reward.integrations.hf with the real transformers Trainer: the fused loss it computes
equals the full-logits loss of the same batch, and a short training run updates the model."""
import math

import torch
from datasets import Dataset
from transformers import Qwen2Config, Qwen2ForCausalLM, TrainingArguments

from r1reward.integrations.hf import StableReinforceTrainer
from r1reward.kernels import StableReinforceLoss, stable_reinforce_loss

B, T, V = 8, 10, 97


def _model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    return Qwen2ForCausalLM(cfg).float()


def _rows(seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=g)
    mask = torch.zeros(B, T, dtype=torch.long)
    mask[:, 4:] = 1
    mask[1, 8:] = 0
    adv = torch.randn(B, generator=g)
    old = torch.randn(B, T - 1, generator=g) * 0.1 - 4.6
    return [{"input_ids": ids[i], "attention_mask": torch.ones(T, dtype=torch.long), "response_mask": mask[i],
             "advantages": adv[i], "old_logp": old[i]} for i in range(B)]


def _trainer(tmp_path, model, rows, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=3,
                             learning_rate=1e-2, report_to="none", use_cpu=True, save_strategy="no",
                             logging_steps=1, **kw)
    loss = StableReinforceLoss(aggregation="seq-mean-token-mean", backend="torch")
    ds = Dataset.from_list(rows).with_format("torch")
    return StableReinforceTrainer(model=model, args=args, train_dataset=ds, loss=loss)


def test_compute_loss_equals_the_full_logits_loss(tmp_path):
    rows = _rows()
    tr = _trainer(tmp_path, _model(), rows)
    batch = {k: torch.stack([r[k] for r in rows]) for k in rows[0]}
    got = tr.compute_loss(tr.model, batch)
    logits = tr.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:, None]
    lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets).squeeze(-1)
    mask = batch["response_mask"][:, 1:].bool()
    want, _ = stable_reinforce_loss(lp, batch["old_logp"], batch["advantages"], mask,
                                    aggregation="seq-mean-token-mean")
    torch.testing.assert_close(got.double(), want, atol=1e-6, rtol=1e-5)
    assert tr.last_loss_stats["preclip_frac"] >= 0 and "clip_frac" in tr.last_loss_stats


def test_a_short_training_run_updates_the_model(tmp_path):
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    tr = _trainer(tmp_path, model, _rows(1), gradient_accumulation_steps=2)
    tr.train()
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
