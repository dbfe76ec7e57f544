"""Trainer configuration: one dataclass per component, CLI overrides built from them.

Every field is settable as ``--<section>.<field>``; the flags other tools rely on
(``--model --data --output --steps --fsdp --compile --ac --resume --seed``) are short
aliases of those fields. The resolved config is written to ``<output>/config.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class ModelConfig:
    path: str | None = None  # local HF dir (Qwen2.5-VL / Qwen2-VL); None = embedded tiny model
    dtype: str = "auto"  # auto = bf16 on CUDA, fp32 on CPU


@dataclass
class DataConfig:
    train: str | None = None  # release-format JSONL; None = generate the embedded set
    heldout: str | None = None  # held-out JSONL; None = generated split (or none with --data)
    n_train: int = 1024  # the cold start generalizes from 1024 pairs, memorizes 256
    n_heldout: int = 256
    gen_seed: int = 0  # seed of the generated set (independent of the training seed)
    # Kinds of the generated set (comma-separated subset of color,shape,count,position).
    kinds: str = "color,shape"


@dataclass
class SFTConfig:
    enabled: bool = True
    data: str | None = None  # JSONL with {"message"|pair fields, "response"}; None = templated
    # Size of the cold-start subset; 0 = every training pair. The paper's cold start is a
    # small subset; the tiny default model memorizes a small one without learning to read
    # the image, so the embedded run uses all generated pairs.
    n_examples: int = 0
    # The tiny model learns the format in ~250 steps, the image's fact by ~600 and the
    # response-vs-image comparison late and abruptly, separately for colour and shape
    # questions: with the careless teacher below, 2000 steps of 16 learned it for one of
    # the two kinds (two runs, one each), 3000 for both.
    steps: int = 3000
    # Fraction of templated targets written by a careless teacher that guesses without
    # checking the image (r1reward.data.guessed_analysis); 0 = every target is careful.
    # The embedded default has it guess on 70 % of the triangle pairs, so the cold start
    # (greedy) guesses on triangles while it judges circles and squares by the image: the
    # noise distilled judgments carry, and what RL's outcome reward has to correct.
    guess_rate: float = 0.7
    guess_on: str = "triangle"  # comma list of question kinds or shapes it guesses on; "" = all
    batch_size: int = 16
    lr: float = 3e-3
    weight_decay: float = 0.0


@dataclass
class RolloutConfig:
    batch_size: int = 32  # prompts per RL step
    n_samples: int = 1  # samples per prompt (GRPO/RLOO need > 1)
    # The release samples at 1.0; the tiny default model's distributions are broad enough
    # that at 1.0 most ~65-token judgments break the format, so its default is 0.7.
    temperature: float = 0.7
    top_p: float = 1.0
    max_new_tokens: int = 80
    balance_positions: bool = True  # present every other pair swapped


@dataclass
class RewardConfig:
    judge: str = "rule"  # rule | openai | local | none
    w_format: float = 0.5
    w_consistency: float = 0.5
    openai_url: str = "http://localhost:8000/v1"
    openai_model: str = "Qwen2.5-VL-7B-Instruct"
    local_model: str | None = None


@dataclass
class AlgoConfig:
    estimator: str = "reinforce_pp"  # reinforce_pp | grpo | rloo
    kl_coef: float = 1e-3  # KL penalty in the reward (Reinforce++)
    kl_estimator: str = "k1"
    adv_filter: str = "zscore"  # zscore | release | off
    filter_k: float = 3.0
    preclip_lo: float = 1e-3  # Pre-CLIP band on the ratio (δ_lo, δ_hi)
    preclip_hi: float = 1e3
    clip_eps: float = 0.2
    aggregation: str = "seq-mean-token-mean"
    ppo_epochs: int = 1
    micro_batch_size: int = 16
    backend: str = "auto"  # r1reward.kernels backend


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (torchao)
    lr: float = 3e-4
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.95
    warmup_steps: int = 2
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 1.0


@dataclass
class ParallelConfig:
    fsdp: bool = False
    compile: bool = False
    ac: bool = False


@dataclass
class CheckpointConfig:
    interval: int = 10  # steps between DCP checkpoints (0 = only at the end)
    keep: int = 2
    resume: bool = False
    export: bool = True  # HF-format export of the final policy


@dataclass
class HealthConfig:
    spike_factor: float = 10.0  # grad norm > factor × running median = spike
    window: int = 20
    min_history: int = 5
    max_bad_steps: int = 3  # consecutive bad steps before rolling back
    lr_backoff: float = 0.5
    max_rollbacks: int = 3  # more than this and RL stops early (reported in summary.json)
    min_spike_norm: float = 1.0  # grad norms up to this (the clip threshold) are never spikes


@dataclass
class EvalConfig:
    enabled: bool = True
    batch_size: int = 32
    max_new_tokens: int = 80
    limit: int = 0  # 0 = whole held-out split
    every: int = 25  # also evaluate every N RL steps (logged as heldout_accuracy); 0 = only before/after


@dataclass
class JobConfig:
    output: str | None = None  # run dir; None = runs/<timestamp>
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    stop_after: int = 0  # testing: stop after this step as if killed (0 = never)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    health: HealthConfig = field(default_factory=HealthConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> JobConfig:
        checks = [
            (self.steps >= 0, "steps must be >= 0"),
            (self.rollout.batch_size >= 1, "rollout.batch_size must be >= 1"),
            (self.rollout.n_samples >= 1, "rollout.n_samples must be >= 1"),
            (self.rollout.temperature > 0, "rollout.temperature must be > 0"),
            (0 < self.rollout.top_p <= 1, "rollout.top_p must be in (0, 1]"),
            (self.algo.estimator in ("reinforce_pp", "grpo", "rloo"),
             f"algo.estimator must be reinforce_pp|grpo|rloo, got {self.algo.estimator!r}"),
            (self.algo.estimator == "reinforce_pp" or self.rollout.n_samples > 1,
             f"algo.estimator={self.algo.estimator} needs rollout.n_samples > 1"),
            (self.algo.adv_filter in ("zscore", "release", "off"),
             f"algo.adv_filter must be zscore|release|off, got {self.algo.adv_filter!r}"),
            (0 < self.algo.preclip_lo < 1 < self.algo.preclip_hi,
             "algo.preclip_lo must be in (0, 1) and algo.preclip_hi > 1"),
            (self.algo.micro_batch_size >= 1, "algo.micro_batch_size must be >= 1"),
            (self.algo.ppo_epochs >= 1, "algo.ppo_epochs must be >= 1"),
            (self.reward.judge in ("rule", "openai", "local", "none"),
             f"reward.judge must be rule|openai|local|none, got {self.reward.judge!r}"),
            (self.optim.name in ("adamw", "adamw8bit"),
             f"optim.name must be adamw|adamw8bit, got {self.optim.name!r}"),
            (self.optim.lr > 0, "optim.lr must be > 0"),
            (bool(self.data.kinds.strip()) and all(
                k.strip() in ("color", "shape", "count", "position")
                for k in self.data.kinds.split(",") if k.strip()),
             f"data.kinds must be a comma-separated subset of color,shape,count,position, "
             f"got {self.data.kinds!r}"),
            (self.checkpoint.keep >= 1, "checkpoint.keep must be >= 1"),
            (self.model.dtype in ("auto", "float32", "bfloat16", "float16"),
             f"model.dtype must be auto|float32|bfloat16|float16, got {self.model.dtype!r}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise ValueError(f"bad config: {msg}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")

    @classmethod
    def from_dict(cls, d: dict) -> JobConfig:
        cfg = cls()
        for k, v in d.items():
            sub = getattr(cfg, k, None)
            if dataclasses.is_dataclass(sub):
                for kk, vv in v.items():
                    setattr(sub, kk, vv)
            else:
                setattr(cfg, k, v)
        return cfg


# Short flags users and the README rely on → dotted field.
ALIASES = {
    "--model": "model.path", "--data": "data.train", "--output": "output", "--steps": "steps",
    "--fsdp": "parallel.fsdp", "--compile": "parallel.compile", "--ac": "parallel.ac",
    "--resume": "checkpoint.resume", "--seed": "seed",
}


def _arg_type(tp):
    """(argparse type, is_bool) for a dataclass field annotation (strings under PEP 563)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {"str": str, "int": int, "float": float, "bool": bool})
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    base = args[0] if args else tp
    return base, base is bool


def _fields(prefix: str, cls):
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default is dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _fields(f"{prefix}{f.name}.", type(default))
        else:
            yield prefix + f.name, f, default


def build_parser(prog: str = "python -m r1reward.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="StableReinforce trainer (R1-Reward).")
    inverse = {v: k for k, v in ALIASES.items()}
    for dotted, f, default in _fields("", JobConfig):
        base, is_bool = _arg_type(f.type)
        names = [f"--{dotted}"] + ([inverse[dotted]] if dotted in inverse else [])
        kw = dict(dest=dotted, default=argparse.SUPPRESS, help=f"(default: {default})")
        if is_bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        else:
            p.add_argument(*names, type=_none_or(base), **kw)
    return p


def _none_or(base):
    def conv(s: str):
        return None if s.lower() in ("none", "null") else base(s)
    conv.__name__ = base.__name__
    return conv


def parse_args(argv: list[str] | None = None) -> JobConfig:
    ns = vars(build_parser().parse_args(argv))
    cfg = JobConfig()
    for dotted, value in ns.items():
        *path, name = dotted.split(".")
        obj = cfg
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)
    return cfg.validate()


def default_output_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
