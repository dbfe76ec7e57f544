"""The trainer's CLI surface (other tools rely on these flags) and config validation."""
import json

import pytest

from r1reward.config import JobConfig, build_parser, parse_args

REQUIRED_FLAGS = ["--model", "--data", "--output", "--steps", "--fsdp", "--compile", "--ac",
                  "--resume", "--seed"]


def test_required_flags_exist():
    helptext = build_parser().format_help()
    for flag in REQUIRED_FLAGS:
        assert f"{flag} " in helptext or f"{flag}," in helptext, flag


def test_aliases_and_dotted_overrides():
    cfg = parse_args(["--model", "/m", "--data", "d.jsonl", "--output", "o", "--steps", "7",
                      "--fsdp", "--ac", "--resume", "--seed", "3", "--algo.adv_filter", "release",
                      "--rollout.top_p", "0.9", "--no-sft.enabled", "--reward.local_model", "none"])
    assert (cfg.model.path, cfg.data.train, cfg.output, cfg.steps, cfg.seed) == ("/m", "d.jsonl", "o", 7, 3)
    assert cfg.parallel.fsdp and cfg.parallel.ac and not cfg.parallel.compile
    assert cfg.checkpoint.resume and cfg.algo.adv_filter == "release" and cfg.rollout.top_p == 0.9
    assert cfg.sft.enabled is False and cfg.reward.local_model is None
    assert parse_args([]).to_dict() == JobConfig().to_dict()


@pytest.mark.parametrize("argv,field", [
    (["--algo.estimator", "ppo"], "algo.estimator"),
    (["--algo.estimator", "grpo"], "n_samples"),
    (["--rollout.temperature", "0"], "rollout.temperature"),
    (["--optim.name", "sgd"], "optim.name"),
    (["--algo.preclip_lo", "2"], "algo.preclip_lo"),
])
def test_bad_values_name_the_field(argv, field):
    with pytest.raises(ValueError, match=field):
        parse_args(argv)


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

    from r1reward.train import TrainState, build_optimizer
    if importlib.util.find_spec("torchao") is not None:
        pytest.skip("torchao is installed")
    cfg = parse_args(["--optim.name", "adamw8bit"])
    with pytest.raises(ImportError, match="torchao"):
        build_optimizer(cfg, torch.nn.Linear(2, 2), TrainState())
