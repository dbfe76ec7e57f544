"""The trainer's CLI surface (other tools rely on these flags) and config validation."""
import json

import pytest

from r1reward.config import PRESETS, ConfigError, JobConfig, build_parser, parse_args, resolve

REQUIRED_FLAGS = ["--model", "--data", "--output", "--steps", "--fsdp", "--compile", "--ac",
                  "--resume", "--seed"]


def test_required_flags_exist():
    helptext = build_parser().format_help()
    for flag in REQUIRED_FLAGS:
        assert f"{flag} " in helptext or f"{flag}," in helptext, flag


def test_aliases_and_dotted_overrides(tmp_path):
    model = tmp_path / "m"
    model.mkdir()
    (model / "config.json").write_text("{}")
    data = tmp_path / "d.jsonl"
    data.write_text("")
    cfg = parse_args(["--model", str(model), "--data", str(data), "--output", "o", "--steps", "7",
                      "--fsdp", "--ac", "--resume", "--seed", "3", "--algo.adv_filter", "release",
                      "--rollout.top_p", "0.9", "--no-sft.enabled", "--reward.local_model", "none",
                      "--sft.both_orders", "--preset", "tiny"])
    assert (cfg.model.path, cfg.data.train, cfg.output, cfg.steps, cfg.seed) == (
        str(model), str(data), "o", 7, 3)
    assert cfg.parallel.fsdp and cfg.parallel.ac and not cfg.parallel.compile
    assert cfg.checkpoint.resume and cfg.algo.adv_filter == "release" and cfg.rollout.top_p == 0.9
    assert cfg.sft.enabled is False and cfg.reward.local_model is None and cfg.sft.both_orders
    assert parse_args([]).to_dict() == JobConfig().to_dict()


# Every bad name or out-of-range value, with the flag its message must name. Each of these
# used to be accepted and fail only at the first RL step, after the cold start.
BAD_SETTINGS = [
    (["--algo.estimator", "ppo"], "--algo.estimator", "reinforce_pp|grpo|rloo"),
    (["--algo.estimator", "grpo"], "--algo.estimator", "n_samples"),
    (["--algo.kl_estimator", "bogus"], "--algo.kl_estimator", "k1|k2|k3"),
    (["--algo.aggregation", "mean"], "--algo.aggregation", "token-mean"),
    (["--algo.backend", "cuda"], "--algo.backend", "choose from auto|"),
    (["--algo.adv_filter", "sigma"], "--algo.adv_filter", "zscore|release|off"),
    (["--algo.adv_filter", "release", "--algo.estimator", "rloo", "--rollout.n_samples", "2"],
     "--algo.adv_filter", "reinforce_pp"),
    (["--reward.judge", "gpt"], "--reward.judge", "rule|openai|local|none"),
    (["--reward.judge", "local"], "--reward.local_model", "needs"),
    (["--rollout.temperature", "0"], "--rollout.temperature", "> 0"),
    (["--optim.name", "sgd"], "--optim.name", "adamw"),
    (["--algo.preclip_lo", "2"], "--algo.preclip_lo", "(0, 1)"),
    (["--algo.clip_eps", "1.5"], "--algo.clip_eps", "[0, 1)"),
    (["--algo.train_batch_size", "5"], "--algo.train_batch_size", "divide"),
    (["--sft.guess_rate", "2"], "--sft.guess_rate", "[0, 1]"),
    (["--sft.copy_warmup", "1"], "--sft.copy_warmup", "[0, 1)"),
    (["--sft.copy_warmup_on", "smell"], "--sft.copy_warmup_on", "subset"),
    (["--sft.image_variants", "0"], "--sft.image_variants", ">= 1"),
    (["--sft.decay_from", "1"], "--sft.decay_from", "[0, 1)"),
    (["--sft.blank_judge_on", "color,smell"], "--sft.blank_judge_on", "subset"),
    (["--sft.copy_warmup_image", "noise"], "--sft.copy_warmup_image", "blank|own"),
    (["--data.kinds", "smell"], "--data.kinds", "subset"),
    (["--model", "/no/such/dir"], "--model", "config.json"),
    (["--data", "/no/such.jsonl"], "--data", "not a file"),
]


@pytest.mark.parametrize("argv,flag,allowed", BAD_SETTINGS)
def test_bad_values_name_the_flag_and_allowed_values(argv, flag, allowed):
    with pytest.raises(ConfigError) as err:
        parse_args(argv)
    assert str(err.value).startswith(flag) and allowed in str(err.value)


def test_cli_refuses_bad_settings_at_parse_time_and_writes_nothing(tmp_path):
    # The whole CLI, as a user runs it: exit status 2 within seconds (nothing loaded, no
    # cold start), the message names the flag, and the output directory is never created.
    import subprocess
    import sys
    import time
    for argv, flag, allowed in BAD_SETTINGS[:6]:
        out = tmp_path / "run"
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "r1reward.train", "--output", str(out), *argv],
                              capture_output=True, text=True, timeout=120)
        took = time.time() - t0
        assert proc.returncode == 2, proc.stderr
        assert flag in proc.stderr and allowed in proc.stderr
        assert not out.exists()
        assert took < 30, took  # a generous bound for a loaded 2-core box; ~3 s when idle


def test_presets_release_for_a_real_model_and_explicit_flags_win(tiny_dir):
    notes = []
    cfg = parse_args(["--model", str(tiny_dir)], announce=notes.append)
    assert cfg.preset == "release" and "release preset" in notes[0]
    assert (cfg.optim.lr, cfg.algo.kl_coef, cfg.rollout.batch_size, cfg.algo.train_batch_size,
            cfg.rollout.n_samples, cfg.rollout.temperature, cfg.rollout.max_new_tokens,
            cfg.algo.ppo_epochs, cfg.model.dtype, cfg.parallel.ac, cfg.eval.max_new_tokens) == (
        3e-7, 1e-3, 256, 128, 1, 1.0, 1024, 1, "bfloat16", True, 4096)
    for dotted, value in PRESETS["release"].items():  # every preset value applied
        section, name = dotted.split(".")
        assert getattr(getattr(cfg, section), name) == value, dotted
    cfg = parse_args(["--model", str(tiny_dir), "--optim.lr", "1e-6", "--rollout.batch_size", "64",
                      "--algo.train_batch_size", "32"], announce=notes.append)
    assert (cfg.preset, cfg.optim.lr, cfg.rollout.batch_size) == ("release", 1e-6, 64)
    cfg = parse_args(["--model", str(tiny_dir), "--preset", "tiny"], announce=notes.append)
    assert cfg.preset == "tiny" and cfg.optim.lr == JobConfig().optim.lr and len(notes) == 2
    assert parse_args([]).preset == "tiny"


def test_release_preset_is_written_to_config_json(tiny_dir, tmp_path):
    # A run on a local Qwen2.5-VL-shaped checkpoint resolves to release values unless told
    # otherwise, says so, and config.json records them.
    import subprocess
    import sys
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "r1reward.train", "--model", str(tiny_dir),
                           "--output", str(out), "--steps", "0", "--no-eval.enabled",
                           "--no-checkpoint.export", "--no-progress", "--data.n_train", "8",
                           "--data.n_heldout", "2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "release preset" in proc.stderr
    saved = json.loads((out / "config.json").read_text())
    assert saved["preset"] == "release" and saved["optim"]["lr"] == 3e-7
    assert saved["rollout"]["max_new_tokens"] == 1024 and saved["algo"]["train_batch_size"] == 128
    assert json.loads((out / "summary.json").read_text())["preset"] == "release"


def test_bad_type_is_an_argparse_error():
    with pytest.raises(SystemExit):
        parse_args(["--steps", "many"])


def test_save_and_reload(tmp_path):
    cfg = parse_args(["--steps", "5", "--algo.kl_coef", "0.01"])
    cfg.save(tmp_path / "config.json")
    back = JobConfig.from_dict(json.loads((tmp_path / "config.json").read_text()))
    assert back.to_dict() == cfg.to_dict()


def test_adamw8bit_without_torchao_is_a_clear_error():
    import importlib.util

    import torch

    from r1reward.trainer import build_optimizer
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed")
    cfg = parse_args(["--optim.name", "adamw8bit"])
    with pytest.raises(ImportError, match="torchao"):
        build_optimizer(cfg, torch.nn.Linear(2, 2))


def test_none_is_a_name_for_choices_and_null_only_for_optional_fields():
    # before: "--reward.judge none" became None and was refused as an unknown judge
    cfg = parse_args(["--reward.judge", "none", "--model.path", "none", "--sft.seed", "null"])
    assert cfg.reward.judge == "none" and cfg.model.path is None and cfg.sft.seed is None


def test_the_tiny_default_is_off_policy_and_a_non_dividing_preset_value_says_where_it_came_from():
    cfg = parse_args([])
    assert (cfg.rollout.batch_size, cfg.algo.train_batch_size) == (32, 16)  # 2 optimizer steps per rollout
    with pytest.raises(ConfigError, match="16 \\(the tiny preset's; pass 0 for one optimizer step per "
                                          "rollout\\) must divide --rollout.batch_size 8"):
        resolve({"rollout.batch_size": 8})
    with pytest.raises(ConfigError, match="--algo.train_batch_size: 3 must divide"):
        resolve({"algo.train_batch_size": 3})


def test_config_knows_the_generated_sets_kinds():
    from r1reward.config import KNOWN_KINDS
    from r1reward.data import KINDS
    assert KNOWN_KINDS == KINDS
