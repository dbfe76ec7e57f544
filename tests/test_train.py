"""End to end on the embedded tiny VLM (tiny step counts): summary/metrics contract,
exact resume, HF export reload, health rollback, bad input."""
import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from r1reward.config import parse_args
from r1reward.train import TIMING_KEYS, run

BACKEND = "auto"
REQUIRED_ROW = ("step", "reward", "accuracy", "format_rate", "kl", "preclip_frac", "clip_frac",
                "filtered_frac", "answer1_rate")


@pytest.fixture(scope="module", autouse=True)
def cache(tmp_path_factory):
    # One cache (tiny model, generated data, SFT result) shared by this module's runs.
    mp = pytest.MonkeyPatch()
    d = tmp_path_factory.mktemp("r1cache")
    mp.setenv("R1REWARD_CACHE", str(d))
    yield d
    mp.undo()


def tiny_args(out, *extra):
    return ["--output", str(out), "--no-progress", "--data.n_train", "12", "--data.n_heldout", "4",
            "--sft.steps", "2", "--sft.n_examples", "4", "--sft.batch_size", "4",
            "--rollout.batch_size", "4", "--algo.train_batch_size", "2",
            "--rollout.max_new_tokens", "12",
            "--eval.max_new_tokens", "12", "--eval.limit", "2", "--algo.micro_batch_size", "4",
            "--algo.backend", BACKEND, *extra]


def rows(run_dir):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_default_pipeline_contract_and_export(tmp_path):
    out = tmp_path / "run"
    summary = run(parse_args(tiny_args(out, "--steps", "2", "--checkpoint.interval", "1",
                                       "--checkpoint.keep", "1", "--eval.every", "1")))
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["steps"] == 2 and on_disk["wall_seconds"] > 0
    for k in ("heldout_accuracy_before", "heldout_accuracy_after"):
        assert 0.0 <= on_disk[k] <= 1.0
    assert on_disk["heldout_before"]["n"] == 4  # 2 pairs x both orders
    # the two held-out pairs are one colour and one shape question: each kind reported apart
    groups = on_disk["heldout_after"]["by_group"]
    assert {"color", "shape"} <= set(groups) and all(0.0 <= a <= 1.0 for a in groups.values())
    assert set(on_disk["cold_start_at_chance"]) <= {"color", "shape"}
    assert summary["sft"]["examples"] == 4
    # the numeric paths the run took are recorded (they decide which cold starts form)
    assert on_disk["machine"]["aten_cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert on_disk["machine"]["torch_threads"] == torch.get_num_threads()
    r = rows(out)
    assert [x["step"] for x in r] == [1, 2]
    for x in r:
        assert set(REQUIRED_ROW) <= set(x) and set(TIMING_KEYS) <= set(x)
        assert 0.0 <= x["answer1_rate"] <= 1.0 and 0.0 <= x["filtered_frac"] <= 1.0
        assert math.isfinite(x["loss"]) and x["health"] == "ok"
    # --eval.every 1: the held-out curve at step 1; the last step's value is the "after" one
    assert 0.0 <= r[0]["heldout_accuracy"] <= 1.0 and "heldout_accuracy" not in r[1]
    assert {"heldout_accuracy/color", "heldout_accuracy/shape"} <= set(r[0])
    assert (out / "curves.png").stat().st_size > 0
    from r1reward import compare  # reads what the trainer wrote
    cmp = compare.summarize(compare.load_run(out))
    assert cmp["steps"] == 2 and set(cmp["by_kind"]) == {"color", "shape"}
    assert cmp["clip_steps"] == sum(x["clip_frac"] > 0 for x in r)
    assert [s for s, _ in compare.heldout_curve(compare.load_run(out))] == [0, 1, 2]
    assert json.loads((out / "config.json").read_text())["steps"] == 2
    assert list((out / "tb").iterdir())  # TensorBoard events
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step_000002"]  # keep=1

    from r1reward.model import load_model_and_processor  # from_pretrained, as for real ones
    back, processor = load_model_and_processor(out / "export")
    assert type(back.lm_head) is torch.nn.Linear and processor.tokenizer is not None


def test_resume_after_kill_equals_uninterrupted(tmp_path):
    # A held-out evaluation at step 2 (the step the run is killed after) must not shift
    # what the resumed run draws.
    common = ("--steps", "3", "--checkpoint.interval", "1", "--eval.every", "2",
              "--no-checkpoint.export")
    run(parse_args(tiny_args(tmp_path / "full", *common)))
    run(parse_args(tiny_args(tmp_path / "cut", *common, "--stop_after", "2")))
    assert len(rows(tmp_path / "cut")) == 2 and not (tmp_path / "cut" / "summary.json").exists()
    run(parse_args(tiny_args(tmp_path / "cut", *common, "--resume")))

    def strip(rs):
        return [{k: v for k, v in x.items() if k not in TIMING_KEYS} for x in rs]
    assert strip(rows(tmp_path / "cut")) == strip(rows(tmp_path / "full"))
    assert "heldout_accuracy" in rows(tmp_path / "full")[1]


@pytest.fixture
def spiking_grads(monkeypatch):
    """The first optimizer step's grad norm reads 1, every later one 1e9 (a spike)."""
    import r1reward.trainer as train_mod
    real, calls = train_mod.grad_norm_and_clip, []

    def fake(model, max_norm):
        real(model, max_norm)
        calls.append(1)
        return 1.0 if len(calls) == 1 else 1e9
    monkeypatch.setattr(train_mod, "grad_norm_and_clip", fake)


def test_grad_spike_rolls_back_with_lower_lr(tmp_path, spiking_grads):
    # Step 2 is retried from the step-1 checkpoint with a halved LR each time until
    # max_rollbacks is hit.
    out = tmp_path / "run"
    summary = run(parse_args(tiny_args(
        out, "--steps", "4", "--checkpoint.interval", "1", "--no-eval.enabled",
        "--no-checkpoint.export", "--no-sft.enabled", "--health.min_history", "1",
        "--health.max_bad_steps", "1", "--health.max_rollbacks", "2",
        "--optim.warmup_steps", "0", "--optim.min_lr_ratio", "1",
        "--algo.train_batch_size", "0")))  # one optimizer step per RL step: step 2's spikes
    r = rows(out)
    assert r[0]["health"] == "ok"
    retries = [x for x in r[1:] if x["step"] == 2]
    assert len(retries) == 3 and all(x["health"].startswith("rollback:grad_spike") for x in retries)
    lrs = [x["lr"] for x in retries]
    assert lrs[0] == r[0]["lr"] and lrs[1] == lrs[0] * 0.5 and lrs[2] == lrs[1] * 0.5
    assert summary["rollbacks"] == 3 and "stopped early" in summary["stopped_early"]


def test_bad_lines_are_skipped_and_counted(tmp_path, cache):
    from r1reward.data import generate_dataset
    train, held = generate_dataset(tmp_path / "data", 6, 2, seed=5)
    lines = train.read_text().splitlines()
    broken = json.loads(lines[1])
    broken["message"] = broken["message"].replace(".png", "_missing.png")
    bad = tmp_path / "data" / "mixed.jsonl"
    bad.write_text("\n".join([lines[0], "{not json", json.dumps(broken), '{"answer": ["<answer>1</answer>"]}']
                             + lines[2:]) + "\n")
    out = tmp_path / "run"
    summary = run(parse_args(tiny_args(out, "--data", str(bad), "--data.heldout", str(held),
                                       "--steps", "1", "--no-sft.enabled", "--no-eval.enabled",
                                       "--no-checkpoint.export")))
    assert summary["data"]["skipped"] == 3 and summary["data"]["n_train"] == 5
    text = (out / "skipped_lines.txt").read_text()
    assert "mixed.jsonl:2:" in text and "mixed.jsonl:3:" in text and "'message'" in text

    allbad = tmp_path / "data" / "allbad.jsonl"
    allbad.write_text("{not json\n")
    with pytest.raises(ValueError, match="allbad.jsonl: no usable training pairs"):
        run(parse_args(tiny_args(tmp_path / "run2", "--data", str(allbad), "--steps", "1",
                                 "--no-sft.enabled", "--no-eval.enabled")))


def test_minibatch_schedule_old_logprobs_once_and_off_policy_steps(tmp_path, monkeypatch):
    # A rollout of 4 prompts trained in mini-batches of 2 for 2 epochs: 4 optimizer steps
    # per RL step, old/ref log-probs computed once per rollout (2 forward-only passes), and
    # every step after the first is off-policy, so ratios move away from 1.
    import r1reward.trainer as trainer_mod
    calls = {"logprobs": 0, "opt_steps": 0}
    real_lp, real_step = trainer_mod.sequence_logprobs, torch.optim.AdamW.step

    def counting_lp(*a, **k):
        calls["logprobs"] += 1
        return real_lp(*a, **k)

    def counting_step(self, *a, **k):
        calls["opt_steps"] += 1
        return real_step(self, *a, **k)
    monkeypatch.setattr(trainer_mod, "sequence_logprobs", counting_lp)
    monkeypatch.setattr(torch.optim.AdamW, "step", counting_step)
    # An untrained policy breaks the format, so every reward (and advantage) would be 0 and
    # nothing would move: give alternate rollouts reward 1 so the updates have a direction.
    real_rewards = trainer_mod.compute_rewards

    def alternating(*a, **k):
        rb = real_rewards(*a, **k)
        return dataclasses.replace(rb, total=torch.arange(len(rb.total)).remainder(2).float())
    monkeypatch.setattr(trainer_mod, "compute_rewards", alternating)
    out = tmp_path / "run"
    run(parse_args(tiny_args(out, "--steps", "2", "--algo.train_batch_size", "2",
                             "--algo.ppo_epochs", "2", "--algo.micro_batch_size", "1",
                             "--no-eval.enabled", "--no-checkpoint.export", "--no-sft.enabled",
                             "--optim.lr", "1e-2",
                             "--optim.warmup_steps", "0")))
    r = rows(out)
    assert [x["optimizer_steps"] for x in r] == [4, 4]
    assert calls == {"logprobs": 4, "opt_steps": 8}  # 2 steps x (policy + ref); 2 x 4
    assert max(x["ratio_max"] for x in r) > 1.0  # off-policy mini-batches moved the ratio


def test_on_policy_update_without_kl_skips_old_and_reference_forwards(tmp_path, monkeypatch):
    # One optimizer step per rollout and no KL: the old log-probs would equal the loss's
    # own (ratio 1), so neither they nor the reference model are computed or loaded.
    import r1reward.trainer as trainer_mod
    calls = {"logprobs": 0}
    real_lp = trainer_mod.sequence_logprobs

    def counting_lp(*a, **k):
        calls["logprobs"] += 1
        return real_lp(*a, **k)
    monkeypatch.setattr(trainer_mod, "sequence_logprobs", counting_lp)
    out = tmp_path / "run"
    summary = run(parse_args(tiny_args(out, "--steps", "2", "--algo.kl_coef", "0",
                                       "--algo.train_batch_size", "0", "--no-eval.enabled",
                                       "--no-checkpoint.export", "--no-sft.enabled")))
    r = rows(out)
    assert calls["logprobs"] == 0 and len(r) == 2 and summary["steps"] == 2
    assert all(x["ratio_max"] == pytest.approx(1.0) and x["clip_frac"] == 0 for x in r if x["ratio_max"])
    assert all("kl" not in x for x in r)  # no reference, no KL to report
    on_policy = ("--algo.kl_coef", "0", "--algo.train_batch_size", "0")
    assert trainer_mod.needs_logprobs(parse_args(tiny_args(out, *on_policy))) == (False, False)
    two_epochs = parse_args(tiny_args(out, *on_policy, "--algo.ppo_epochs", "2"))
    assert trainer_mod.needs_logprobs(two_epochs) == (True, False)
    assert trainer_mod.needs_logprobs(parse_args(tiny_args(out, "--algo.kl_coef", "0"))) == (True, False)
    assert trainer_mod.needs_logprobs(parse_args(tiny_args(out))) == (True, True)  # default KL 1e-3


QUICK = ("--no-eval.enabled", "--no-checkpoint.export", "--no-sft.enabled", "--checkpoint.interval", "1")


def test_fresh_run_never_writes_into_another_runs_directory(tmp_path):
    from r1reward.config import ConfigError
    out = tmp_path / "run"
    run(parse_args(tiny_args(out, "--steps", "1", *QUICK)))
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(ConfigError, match="already holds files.*--resume.*--overwrite"):
        run(parse_args(tiny_args(out, "--steps", "2", *QUICK)))
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # untouched
    run(parse_args(tiny_args(out, "--steps", "2", "--overwrite", *QUICK)))
    assert [x["step"] for x in rows(out)] == [1, 2]  # not appended to the old run's rows


def test_resume_keeps_saved_config_and_refuses_run_altering_changes(tmp_path):
    from r1reward.config import ConfigError
    out = tmp_path / "run"
    run(parse_args(tiny_args(out, "--steps", "2", "--optim.lr", "1e-3", *QUICK)))
    saved = (out / "config.json").read_text()
    for flags, name in ((("--seed", "5"), "--seed"), (("--optim.lr", "0.01"), "--optim.lr"),
                        (("--rollout.batch_size", "2"), "--rollout.batch_size")):
        with pytest.raises(ConfigError, match=f"{name}.*allow_config_change"):
            run(parse_args(tiny_args(out, "--steps", "3", "--resume", "--optim.lr", "1e-3",
                                     *QUICK, *flags)))
        assert (out / "config.json").read_text() == saved
    # Not repeating the original flags keeps the saved values; more steps is allowed.
    run(parse_args(["--output", str(out), "--resume", "--steps", "3", "--no-progress"]))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["optim"]["lr"] == 1e-3 and cfg["rollout"]["batch_size"] == 4 and cfg["steps"] == 3
    assert [x["step"] for x in rows(out)] == [1, 2, 3]
    run(parse_args(tiny_args(out, "--steps", "4", "--resume", "--seed", "5",
                             "--checkpoint.allow_config_change", *QUICK)))
    assert json.loads((out / "config.json").read_text())["seed"] == 5


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    out = tmp_path / "run"
    run(parse_args(tiny_args(out, "--steps", "3", *QUICK)))
    shard = next((out / "checkpoints" / "step_000003").glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # a few flipped bytes in the weights
    shard.write_bytes(bytes(data))
    with caplog.at_level("WARNING", logger="r1reward"):
        run(parse_args(tiny_args(out, "--steps", "3", "--resume", *QUICK)))
    assert any(shard.name in r.getMessage() and "rejected" in r.getMessage() for r in caplog.records)
    assert [x["step"] for x in rows(out)] == [1, 2, 3]  # step 3 redone from the step-2 checkpoint


def test_stable_reinforce_parts_switch_off():
    # Pre-CLIP off gives the plain PPO ratio; the advantage filter and consistency reward
    # have their own off values; together they are plain Reinforce++.
    from r1reward.trainer import loss_module
    on = loss_module(parse_args([]))
    off = loss_module(parse_args(["--no-algo.preclip", "--algo.adv_filter", "off",
                                  "--reward.w_consistency", "0"]))
    assert on.settings.preclip == pytest.approx((math.log(1e-3), math.log(1e3)))
    assert off.settings.preclip is None
    lp = torch.tensor([[10.0]], requires_grad=True)  # ratio e^10 >> δ_hi = 1e3
    old, adv, mask = torch.zeros(1, 1), torch.tensor([-1.0]), torch.ones(1, 1)
    loss_on, st_on = on(lp, old, adv, mask)
    loss_off, st_off = off(lp, old, adv, mask)
    assert st_on["preclip_frac"].item() == 1.0 and st_off["preclip_frac"].item() == 0.0
    assert loss_off.item() == pytest.approx(math.exp(10.0)) and loss_on.item() == pytest.approx(1e3)


def test_health_monitor_off_applies_every_update(tmp_path, spiking_grads):
    out = tmp_path / "run"
    summary = run(parse_args(tiny_args(
        out, "--steps", "3", "--no-health.enabled", "--health.min_history", "1",
        "--health.max_bad_steps", "1", *QUICK)))
    assert [x["health"] for x in rows(out)] == ["ok"] * 3
    assert summary["rollbacks"] == 0 and summary["skipped_steps"] == 0
