"""DCP checkpoints: exact continuation, keep-last-k, incomplete checkpoints ignored."""
import json
import random

import numpy as np
import pytest
import torch

from r1reward.checkpoint import MARKER, Checkpointer
from r1reward.config import HealthConfig
from r1reward.health import Action, Decision, HealthMonitor


def _setup(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    return model, opt


def _train(model, opt, steps):
    trace = []
    for _ in range(steps):
        x = torch.randn(4, 6)  # draws from the global RNG: restoring it matters
        noise = random.random() + np.random.rand()
        loss = (model(x) ** 2).mean() + 0 * noise
        opt.zero_grad()
        loss.backward()
        opt.step()
        trace.append((loss.item(), noise))
    return trace


def test_resume_continues_exactly(tmp_path):
    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model, opt = _setup()
    full = _train(model, opt, 6)
    final = [p.detach().clone() for p in model.parameters()]

    torch.manual_seed(1)
    random.seed(1)
    np.random.seed(1)
    model, opt = _setup()
    first = _train(model, opt, 3)
    ck = Checkpointer(tmp_path, keep=2)
    ck.save(3, model, opt, {"step": 3, "cursor": 12})
    _train(model, opt, 2)  # work after the checkpoint that a kill would lose

    model2, opt2 = _setup(seed=99)  # a fresh process: different init, empty optimizer
    state = ck.load(ck.latest(), model2, opt2)
    assert state == {"step": 3, "cursor": 12}
    rest = _train(model2, opt2, 3)
    assert first + rest == full
    for a, b in zip(final, model2.parameters()):
        assert torch.equal(a, b)


def test_keep_last_k_and_incomplete_ignored(tmp_path):
    model, opt = _setup()
    _train(model, opt, 1)
    ck = Checkpointer(tmp_path, keep=2)
    for s in (1, 2, 3):
        ck.save(s, model, opt, {"step": s})
    assert [p.name for p in ck.complete()] == ["step_000002", "step_000003"]
    (ck.path(3) / MARKER).unlink()  # as if killed while writing step 3
    assert ck.latest() == ck.path(2)
    with pytest.raises(FileNotFoundError, match="not a complete checkpoint"):
        ck.load(ck.path(3), model, opt)


def test_health_skip_spike_and_rollback():
    h = HealthMonitor(spike_factor=10, window=10, min_history=3, max_bad_steps=2)
    for g in (1.0, 1.2, 0.9, 1.1):
        assert h.check(0.5, g) == Decision(Action.OK)
    spike = h.check(0.5, 50.0)
    assert spike.action is Action.SKIP and spike.reason.startswith("grad_spike")
    assert h.check(0.5, 2.0).action is Action.OK  # a healthy step resets the streak
    assert h.check(float("nan"), 1.0) == Decision(Action.SKIP, "nonfinite_loss")
    assert h.check(0.5, float("inf")) == Decision(Action.ROLLBACK, "nonfinite_grad")
    assert (h.skipped_total, h.rollbacks) == (3, 1)
    # str() is what metrics.jsonl's "health" field holds
    assert [str(Decision(Action.OK)), str(Decision(Action.SKIP, "nonfinite_loss")),
            str(Decision(Action.ROLLBACK, "nonfinite_grad"))] == [
        "ok", "skip:nonfinite_loss", "rollback:nonfinite_grad"]
    assert str(spike) == "skip:grad_spike(50>10x1.05)"
    # a converged policy: median norm 0.01, then a step at 0.2 (20x, but below the floor,
    # which defaults to the trainer's 1.0)
    assert HealthMonitor().min_spike_norm == 1.0 == HealthConfig().min_spike_norm
    h3 = HealthMonitor(spike_factor=10, min_history=3)
    for g in (0.01, 0.012, 0.009, 0.2):
        assert h3.check(0.5, g).action is Action.OK
    assert h3.check(0.5, 5.0).action is Action.SKIP  # above both: still a spike
    h0 = HealthMonitor(spike_factor=10, min_history=3, min_spike_norm=0.0)
    for g in (0.01, 0.012, 0.009):
        h0.check(0.5, g)
    assert h0.check(0.5, 0.2).action is Action.SKIP  # without the floor it is a spike
    h2 = HealthMonitor()
    h2.load_state_dict(h.state_dict())
    assert h2.state_dict() == h.state_dict()


def test_hf_export_reloads_with_from_pretrained(tmp_path):
    from test_train_utils import seq_batch, tiny_vlm
    from transformers import Qwen2_5_VLForConditionalGeneration

    from r1reward.export import export_hf
    from r1reward.logprobs import FusedLMHead

    model = tiny_vlm(seed=4)
    FusedLMHead.install(model, backend="reference")  # the trainer's head must not leak out
    export_hf(model, None, tmp_path / "export")
    assert (tmp_path / "export" / "model.safetensors").is_file()
    back = Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "export").eval()
    assert type(back.lm_head) is torch.nn.Linear
    b = seq_batch()
    kw = dict(input_ids=b.input_ids, attention_mask=b.attention_mask, use_cache=False, **b.vision)
    with torch.no_grad():
        torch.testing.assert_close(back(**kw).logits, model(**kw).logits)


def test_metrics_truncate_survives_a_torn_last_line(tmp_path):
    from r1reward.metrics import MetricsLogger
    m = MetricsLogger(tmp_path, tensorboard=False)
    for s in (1, 2, 3):
        m.log(s, {"reward": 0.5})
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 4, "rew\xc3')  # killed mid-write, mid-character
    m.truncate_after(2)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]
