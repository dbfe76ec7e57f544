"""python -m r1reward.experiments stability: collapse rules, and the whole sweep at a toy
size (files, schema, one shared cold start, finished runs reused)."""
import json

import pytest

from r1reward import experiments as E


def row(step, **kw):
    return {"step": step, "loss": 0.1, "grad_norm": 0.5, "format_rate": 1.0, **kw}


def test_collapse_rules():
    assert E.collapse([row(1), row(2)], before=0.8) is None
    assert "non-finite loss" in E.collapse([row(1), row(2, loss="nan")], before=0.8)
    assert "non-finite grad_norm" in E.collapse([row(1, grad_norm=float("inf"))], before=0.8)
    low = [row(i, format_rate=0.3) for i in range(1, 5)]
    assert E.collapse(low, before=0.8) is None  # fewer than 5 steps: not yet a mean of 5
    assert "format rate" in E.collapse(low + [row(5, format_rate=0.4)], before=0.8)
    assert E.collapse([row(1, heldout_accuracy=0.61)], before=0.8) is None
    assert "held-out 0.590" in E.collapse([row(1, heldout_accuracy=0.59)], before=0.8)


@pytest.fixture
def toy_sizes(monkeypatch, tmp_path):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    monkeypatch.setitem(E.SIZES, "quick", (2, 2, 2, 1, 2))
    monkeypatch.setattr(E, "STRESS", E.STRESS + (
        "--rollout.batch_size", "4", "--algo.train_batch_size", "2", "--rollout.max_new_tokens", "8",
        "--eval.max_new_tokens", "8", "--data.n_train", "8", "--sft.batch_size", "2",
        "--sft.n_examples", "4", "--algo.micro_batch_size", "2"))


def test_stability_quick_writes_summary_table_and_plot(toy_sizes, tmp_path):
    out = tmp_path / "exp"
    E.main(["stability", "--quick", "--output", str(out), "--variants", "stable_reinforce,reinforce_pp",
            "--lr", "1e-3", "--jobs", "2"])  # runs 2-4 in two worker processes
    s = json.loads((out / "summary.json").read_text())
    assert s["setting"]["steps"] == 2 and s["setting"]["seeds"] == 2
    for name in ("stable_reinforce", "reinforce_pp"):
        v = s["variants"][name]
        assert v["seeds"] == 2 and 0 <= v["collapsed"] <= 2
        assert len(v["heldout_final"]) == 2 and len(v["ratio_max"]) == 2
        assert v["heldout_before"][0] == v["heldout_before"][1]  # one shared cold start
    saved = json.loads((out / "runs" / "reinforce_pp" / "seed1" / "config.json").read_text())
    assert saved["algo"]["preclip"] is False and saved["algo"]["adv_filter"] == "off"
    assert saved["seed"] == 1 and saved["health"]["enabled"] is False and saved["optim"]["lr"] == 1e-3
    assert "| reinforce_pp |" in (out / "summary.md").read_text()
    assert (out / "stability.png").stat().st_size > 0
    summary0 = out / "runs" / "stable_reinforce" / "seed0" / "summary.json"
    mtime = summary0.stat().st_mtime
    E.main(["stability", "--quick", "--output", str(out), "--variants", "stable_reinforce", "--lr", "1e-3"])
    assert summary0.stat().st_mtime == mtime  # same settings: reused
    E.main(["stability", "--quick", "--output", str(out), "--variants", "stable_reinforce", "--seeds", "1"])
    assert summary0.stat().st_mtime != mtime  # another lr: run again, never mixed
    config0 = json.loads((out / "runs" / "stable_reinforce" / "seed0" / "config.json").read_text())
    assert config0["optim"]["lr"] == E.STRESS_LR


def test_unknown_variant_and_negative_jobs_are_refused(tmp_path):
    with pytest.raises(SystemExit):
        E.main(["stability", "--output", str(tmp_path), "--variants", "ppo"])
    with pytest.raises(SystemExit):
        E.main(["stability", "--output", str(tmp_path), "--jobs", "-1"])
