"""Trainer configuration: one dataclass per component, CLI overrides built from them.

Every field is settable as ``--<section>.<field>``; the flags other tools rely on
(``--model --data --output --steps --fsdp --compile --ac --resume --seed``) are short
aliases of those fields. The resolved config is written to ``<output>/config.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
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
    # questions. With 4 vision tokens and the warm-up below, 2000 steps of 16 formed both on
    # 7 of 8 screened seeds and 3 of 5 default runs on one box; 1500 fell short of it with
    # earlier recipes, and 3000 did not rescue a seed that had missed one (docs/training_runs.md).
    steps: int = 2000
    # Share of those steps spent first on a copy warm-up (generated pairs only; 0 = none):
    # pairs of the copy_warmup_on kinds shown with a blank image (targets: copy_warmup_judge),
    # so the model learns to read a claim from the right response before the image's
    # colour can stand in for it; the rest of the cold start keeps the blank_judge_on
    # pairs, blank image and full judgment, in the mix. Without it the tiny model's colour
    # comparison never formed on one box (docs/training_runs.md).
    copy_warmup: float = 0.2
    # Question kinds the warm-up uses ("" = all). Colour alone: the copy formed in 250-375
    # steps from colour pairs (so 0.2 of 2000 = 400), in 700 to over 1200 with the shape
    # pairs mixed in.
    copy_warmup_on: str = "color"
    # The warm-up's targets: False = only the quotes; True = the full judgments with their
    # stated fact shown but carrying no loss, so each quote's comparison with the stated
    # fact is learnt from text before the image can stand in for it. With it and
    # blank_fact_loss off, one-thread screens of seeds 3-6 formed the colour comparison
    # on 4 of 4 (quotes only, fact trained: 1 of 4; docs/training_runs.md).
    copy_warmup_judge: bool = True
    # The warm-up's image: "blank" (the claim can only come from the response) or "own"
    # (each pair's image, for a base that already reads: R1REWARD_TINY_READING_STEPS; from
    # such a base it formed both comparisons on 2 of 4 screened seeds, blank on 4 of 4).
    copy_warmup_image: str = "blank"
    # Question kinds whose full judgments join the rest of the cold start a second time,
    # on a blank image, when there is a warm-up ("" = all kinds).
    blank_judge_on: str = "color"
    # Train the image's fact as the blank-image judgments state it. A blank image cannot
    # show it, so the trained target is one of the two claims: it teaches stating a
    # response's claim as the image's fact, the copy that kept colour from forming.
    blank_fact_loss: bool = False
    # Share of the steps spent before the copy warm-up on reading the image alone (0 =
    # none): pairs of the read_on kinds with their image, both responses emptied and a
    # target that only states the asked fact, so the fact cannot be copied from a claim.
    # Off: at 0.2 of the 2000 steps, on one box, both comparisons formed in 1 of 3 default
    # runs as without it, and no run gained 10 points in RL (one did without it).
    read_warmup: float = 0.0
    read_on: str = "color,shape"
    # Fraction of templated targets written by a careless teacher that guesses without
    # checking the image (r1reward.data.guessed_analysis); 0 = every target is careful.
    # The embedded default has it guess on 70 % of the triangle pairs, so the cold start
    # (greedy) guesses on triangles while it judges circles and squares by the image: the
    # noise distilled judgments carry, and what RL's outcome reward has to correct.
    guess_rate: float = 0.7
    guess_on: str = "triangle"  # comma list of question kinds or shapes it guesses on; "" = all
    # Where the cold-start traces come from: "templated" (every pair, the careless teacher
    # above optional) or "distill" (r1reward.teacher: a teacher with per-kind skill gets up
    # to teacher_k attempts per pair; first-try correct traces are the SFT set, the rest
    # the RL set; with probability teacher_slip its answer contradicts its analysis).
    teacher: str = "templated"
    teacher_k: int = 4
    teacher_slip: float = 0.15
    batch_size: int = 16
    lr: float = 3e-3
    # Images per example in the cold start proper: 1 = the pair's own; n > 1 = the pair's
    # own and n - 1 others drawn afresh with the same facts (another size and place), shown in
    # turn, so the tiny vision tower cannot tell the training images apart by heart (the
    # blank-image examples keep their blank image).
    image_variants: int = 1
    # Every training pair in both orders (responses swapped, the gold index with them), so
    # no image or question tells which position the better response is in.
    both_orders: bool = False
    # Share of the cold start proper (after the warm-ups) at a constant lr before the cosine
    # decay to 0 (0 = cosine from the first step).
    decay_from: float = 0.0
    weight_decay: float = 0.0
    # Seed of the cold start (example order, teacher coin flips); None = the run's --seed.
    # Fixing it lets RL seeds share one cold start (r1reward.experiments does).
    seed: int | None = None


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
    # What generates: hf (generate on the policy) | vllm (a colocated vLLM engine; r1reward.engine).
    engine: str = "hf"
    # Truncated importance sampling for the trainer-sampler mismatch (vllm): every token's
    # policy term is weighted by min(pi_trainer / pi_sampler, tis_cap); 0 = off.
    tis_cap: float = 0.0
    # hf under FSDP2: gather each block once per rollout, not once per decoding step.
    hf_unshard_once: bool = True
    hf_static_cache: bool = False  # hf: a preallocated KV cache (bench.rollout_engines)
    vllm_kv_cache_gb: float = 1.0  # CPU: the KV cache's size
    vllm_gpu_memory_utilization: float = 0.4  # GPU: vLLM's share of the device (weights + KV)
    vllm_sleep: bool = True  # GPU: free vLLM's memory while the trainer updates
    vllm_max_model_len: int = 0  # prompt + response tokens vLLM allows; 0 = the model's context


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
    preclip: bool = True  # StableReinforce's Pre-CLIP; off = the plain PPO ratio
    preclip_lo: float = 1e-3  # Pre-CLIP band on the ratio (δ_lo, δ_hi)
    preclip_hi: float = 1e3
    clip_eps: float = 0.2
    aggregation: str = "seq-mean-token-mean"
    ppo_epochs: int = 1
    # Prompts per optimizer step: the rollout batch is split into mini-batches of this
    # many prompts, one optimizer step each (all but the first off-policy); 0 = the whole
    # rollout batch in one step. The tiny default trains its 32 prompts in 2 × 16, off-policy
    # like the release (256 in 2 × 128), so Pre-CLIP and the PPO clip have ratios to act on.
    train_batch_size: int = 16
    micro_batch_size: int = 16
    backend: str = "auto"  # r1reward.kernels backend


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | adamw8bit (torchao)
    # The tiny default's rate. From the same cold starts on one box, 3e-4 gained less on one
    # seed of two; 1e-4 gained but left the ratios so near 1 that the PPO clip never acted on
    # one; 2e-4 did both (docs/training_runs.md).
    lr: float = 2e-4
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
    # --resume keeps the saved config.json; settings that change what the run computes
    # (seed, data, batch, lr, model, ...) may differ from it only with this flag.
    allow_config_change: bool = False
    export: bool = True  # HF-format export of the final policy


@dataclass
class HealthConfig:
    # Not part of the method (the paper has none): skip/rollback on non-finite losses and
    # gradient spikes. Off = every update is applied.
    enabled: bool = True
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
    preset: str = "tiny"  # tiny | release: the values a run starts from (see PRESETS)
    output: str | None = None  # run dir; None = runs/<timestamp>
    steps: int = 100
    seed: int = 0
    log_every: int = 1
    progress: bool = True
    stop_after: int = 0  # testing: stop after this step as if killed (0 = never)
    overwrite: bool = False  # let a fresh run replace the run files already in --output
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
        return validate(self)

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
    "--resume": "checkpoint.resume", "--seed": "seed", "--overwrite": "overwrite",
}


def _arg_type(tp):
    """(argparse type, is_bool, optional) for a dataclass field annotation (strings under
    PEP 563); ``optional``: the field accepts None (spelled none/null on the command line)."""
    if isinstance(tp, str):
        tp = eval(tp, vars(typing), {"str": str, "int": int, "float": float, "bool": bool})
    all_args = typing.get_args(tp)
    args = [a for a in all_args if a is not type(None)]
    base = args[0] if args else tp
    return base, base is bool, type(None) in all_args


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
    p.add_argument("--preset", choices=tuple(PRESETS), default=argparse.SUPPRESS,
                   help="values to start from: tiny (embedded default) or release (the "
                        "authors' train.sh); default tiny, or release when --model is given")
    for dotted, f, default in _fields("", JobConfig):
        if dotted == "preset":
            continue
        base, is_bool, optional = _arg_type(f.type)
        names = [f"--{dotted}"] + ([inverse[dotted]] if dotted in inverse else [])
        kw = dict(dest=dotted, default=argparse.SUPPRESS, help=f"(default: {default})")
        if is_bool:
            p.add_argument(*names, action=argparse.BooleanOptionalAction, **kw)
        else:
            # only an Optional field reads "none" as None: --reward.judge none is a name
            p.add_argument(*names, type=_none_or(base) if optional else base, **kw)
    return p


def _none_or(base):
    def conv(s: str):
        return None if s.lower() in ("none", "null") else base(s)
    conv.__name__ = base.__name__
    return conv


class ConfigError(ValueError):
    """A setting that cannot work; the message names the flag and what is allowed."""


# Values each preset sets on top of the dataclass defaults (which are the tiny values).
PRESETS: dict[str, dict[str, object]] = {
    # The embedded default: tiny Qwen2.5-VL, generated data, CPU, minutes.
    "tiny": {},
    # The R1-Reward authors' scripts/train.sh (SPEC §3) for a real Qwen2.5-VL checkpoint;
    # the cold start is a separate `python -m r1reward.sft --data` run on long-CoT data.
    "release": {
        "optim.lr": 3e-7, "algo.kl_coef": 1e-3, "algo.kl_estimator": "k1",
        "algo.adv_filter": "release", "rollout.batch_size": 256, "algo.train_batch_size": 128,
        "algo.micro_batch_size": 2, "rollout.n_samples": 1, "rollout.temperature": 1.0,
        "rollout.max_new_tokens": 1024, "algo.ppo_epochs": 1, "model.dtype": "bfloat16",
        "parallel.ac": True, "eval.max_new_tokens": 4096, "eval.batch_size": 8,
        "sft.enabled": False, "sft.lr": 1e-5, "sft.guess_rate": 0.0,
    },
}


# The generated set's question kinds (r1reward.data.KINDS; config stays free of data's imports).
KNOWN_KINDS = ("color", "shape", "count", "position")


def _known_kinds(spec: str) -> bool:
    return all(k.strip() in KNOWN_KINDS for k in spec.split(",") if k.strip())


def validate(cfg: JobConfig) -> JobConfig:
    """Refuse every setting that cannot work, before any work starts (ConfigError)."""
    from r1reward import registry as R

    def need(ok: bool, flag: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"--{flag}: {msg}")

    def choice(flag: str, value, reg: R.Registry) -> None:
        need(value in reg, flag, f"{value!r} is not a known {reg.kind}; "
                                 f"choose from {'|'.join(reg.names())}")

    def path(flag: str, value, *, is_dir: bool = False, inside: str | None = None) -> None:
        if value is None:
            return
        p = Path(value)
        ok = p.is_dir() if is_dir else p.is_file()
        if ok and inside:
            ok = (p / inside).is_file()
        what = f"a directory with {inside}" if inside else ("a directory" if is_dir else "a file")
        need(ok, flag, f"{value} is not {what}")

    a, r, ro, o, e, h, s, dt = (cfg.algo, cfg.reward, cfg.rollout, cfg.optim, cfg.eval,
                                cfg.health, cfg.sft, cfg.data)
    need(cfg.preset in PRESETS, "preset", f"{cfg.preset!r}; choose from {'|'.join(PRESETS)}")
    need(cfg.steps >= 0, "steps", "must be >= 0")
    need(cfg.stop_after >= 0, "stop_after", "must be >= 0")
    # algorithm
    choice("algo.estimator", a.estimator, R.ADVANTAGE_ESTIMATORS)
    choice("algo.adv_filter", a.adv_filter, R.ADVANTAGE_FILTERS)
    choice("algo.kl_estimator", a.kl_estimator, R.KL_ESTIMATOR_NAMES)
    choice("algo.aggregation", a.aggregation, R.AGGREGATION_MODES)
    choice("algo.backend", a.backend, R.KERNEL_BACKENDS)
    need(a.estimator not in R.GROUP_ESTIMATORS or ro.n_samples > 1, "algo.estimator",
         f"{a.estimator} compares samples of one prompt: it needs --rollout.n_samples > 1")
    need(a.adv_filter not in R.FILTERS_NEEDING_RAW_MEAN or a.estimator == "reinforce_pp",
         "algo.adv_filter", f"{a.adv_filter} needs --algo.estimator reinforce_pp "
                            "(it uses the returns' mean before normalization)")
    need(a.filter_k > 0, "algo.filter_k", "must be > 0")
    need(0 < a.preclip_lo < 1, "algo.preclip_lo", "must be in (0, 1)")
    need(a.preclip_hi > 1, "algo.preclip_hi", "must be > 1")
    need(0 <= a.clip_eps < 1, "algo.clip_eps", "must be in [0, 1)")
    need(a.kl_coef >= 0, "algo.kl_coef", "must be >= 0")
    need(a.ppo_epochs >= 1, "algo.ppo_epochs", "must be >= 1")
    need(a.micro_batch_size >= 1, "algo.micro_batch_size", "must be >= 1")
    need(a.train_batch_size >= 0, "algo.train_batch_size", "must be >= 0 (0 = the rollout batch)")
    tb_origin = ("" if "algo.train_batch_size" in getattr(cfg, "explicit", ())
                 else f" (the {cfg.preset} preset's; pass 0 for one optimizer step per rollout)")
    need(a.train_batch_size == 0 or ro.batch_size % a.train_batch_size == 0,
         "algo.train_batch_size", f"{a.train_batch_size}{tb_origin} must divide "
                                  f"--rollout.batch_size {ro.batch_size}")
    # rollout
    need(ro.batch_size >= 1, "rollout.batch_size", "must be >= 1")
    need(ro.n_samples >= 1, "rollout.n_samples", "must be >= 1")
    need(ro.temperature > 0, "rollout.temperature", "must be > 0")
    need(0 < ro.top_p <= 1, "rollout.top_p", "must be in (0, 1]")
    need(ro.max_new_tokens >= 1, "rollout.max_new_tokens", "must be >= 1")
    need(ro.engine in ("hf", "vllm"), "rollout.engine", f"{ro.engine!r}; choose from hf|vllm")
    need(ro.tis_cap >= 0, "rollout.tis_cap", "must be >= 0 (0 = off)")
    need(ro.tis_cap == 0 or ro.engine != "hf", "rollout.tis_cap",
         "corrects the vLLM sampler's mismatch with the trainer; --rollout.engine hf samples "
         "from the trainer's own model")
    # vLLM's log-probs come after top-p renormalization, the trainer's do not
    need(ro.tis_cap == 0 or ro.top_p == 1, "rollout.tis_cap",
         "needs --rollout.top_p 1 (vLLM reports log-probs renormalized over the top-p set)")
    need(ro.vllm_kv_cache_gb > 0 and 0 < ro.vllm_gpu_memory_utilization < 1, "rollout.vllm_*",
         "need kv_cache_gb > 0, 0 < gpu_memory_utilization < 1")
    need(ro.vllm_max_model_len == 0
         or ro.vllm_max_model_len > max(ro.max_new_tokens, cfg.eval.max_new_tokens),
         "rollout.vllm_max_model_len", f"{ro.vllm_max_model_len} leaves no room for the prompt "
         f"and {max(ro.max_new_tokens, cfg.eval.max_new_tokens)} new tokens (rollout or eval); "
         "0 = the model's context length")
    # reward
    choice("reward.judge", r.judge, R.CONSISTENCY_JUDGES)
    need(r.judge != "local" or bool(r.local_model), "reward.local_model",
         "--reward.judge local needs --reward.local_model DIR")
    path("reward.local_model", r.local_model if r.judge == "local" else None, is_dir=True,
         inside="config.json")
    need(r.w_format >= 0 and r.w_consistency >= 0, "reward.w_format/w_consistency", "must be >= 0")
    # optimizer
    need(o.name in ("adamw", "adamw8bit"), "optim.name", f"{o.name!r}; choose from adamw|adamw8bit")
    need(o.lr > 0, "optim.lr", "must be > 0")
    need(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1/beta2", "must be in [0, 1)")
    need(o.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(o.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
    need(0 <= o.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(o.max_grad_norm >= 0, "optim.max_grad_norm", "must be >= 0 (0 = no clipping)")
    # cold start, data, model
    need(s.steps >= 0 and s.batch_size >= 1 and s.lr > 0, "sft.steps/batch_size/lr",
         "need steps >= 0, batch_size >= 1, lr > 0")
    need(0 <= s.guess_rate <= 1, "sft.guess_rate", "must be in [0, 1]")
    need(s.image_variants >= 1, "sft.image_variants", "must be >= 1 (1 = each pair's own image)")
    need(0 <= s.decay_from < 1, "sft.decay_from",
         "must be in [0, 1): the share of the cold start at a constant lr before it decays")
    need(s.n_examples >= 0, "sft.n_examples", "must be >= 0 (0 = every training pair)")
    need(0 <= s.copy_warmup < 1, "sft.copy_warmup",
         "must be in [0, 1): the share of sft.steps spent on the copy warm-up")
    for name in ("copy_warmup_on", "blank_judge_on"):
        value = getattr(s, name)
        need(_known_kinds(value), f"sft.{name}",
             f"{value!r}: a comma-separated subset of {','.join(KNOWN_KINDS)} (\"\" = all)")
    need(s.copy_warmup_image in ("blank", "own"), "sft.copy_warmup_image",
         f"{s.copy_warmup_image!r}; choose from blank|own")
    need(s.teacher in ("templated", "distill"), "sft.teacher",
         f"{s.teacher!r}; choose from templated|distill")
    need(s.teacher_k >= 1, "sft.teacher_k", "must be >= 1")
    need(0 <= s.teacher_slip <= 1, "sft.teacher_slip", "must be in [0, 1]")
    path("sft.data", s.data)
    need(dt.n_train >= 1 and dt.n_heldout >= 0, "data.n_train/n_heldout",
         "need n_train >= 1, n_heldout >= 0")
    need(any(k.strip() for k in dt.kinds.split(",")) and _known_kinds(dt.kinds),
         "data.kinds", f"{dt.kinds!r}: a comma-separated subset of {','.join(KNOWN_KINDS)}")
    path("data", dt.train)
    path("data.heldout", dt.heldout)
    path("model", cfg.model.path, is_dir=True, inside="config.json")
    need(cfg.model.dtype in ("auto", "float32", "bfloat16", "float16"), "model.dtype",
         f"{cfg.model.dtype!r}; choose from auto|float32|bfloat16|float16")
    # checkpoints, health, eval
    need(cfg.checkpoint.keep >= 1, "checkpoint.keep", "must be >= 1")
    need(cfg.checkpoint.interval >= 0, "checkpoint.interval", "must be >= 0")
    need(h.spike_factor > 1 and h.window >= 1 and h.min_history >= 1 and h.max_bad_steps >= 1,
         "health.*", "need spike_factor > 1, window, min_history, max_bad_steps >= 1")
    need(0 < h.lr_backoff <= 1, "health.lr_backoff", "must be in (0, 1]")
    need(h.max_rollbacks >= 0, "health.max_rollbacks", "must be >= 0")
    need(e.batch_size >= 1 and e.max_new_tokens >= 1, "eval.batch_size/max_new_tokens", "must be >= 1")
    need(e.limit >= 0 and e.every >= 0, "eval.limit/every", "must be >= 0")
    return cfg


def _set(cfg: JobConfig, dotted: str, value) -> None:
    *parents, name = dotted.split(".")
    obj = cfg
    for part in parents:
        obj = getattr(obj, part)
    if not hasattr(obj, name):
        raise ConfigError(f"unknown setting {dotted!r}")
    setattr(obj, name, value)


def resolve(flags: dict[str, object]) -> tuple[JobConfig, str | None]:
    """Defaults → preset → explicit flags. Returns (validated config, note for the user).

    Without ``--preset``, a ``--model`` means a real checkpoint and gets ``release``: a 7B
    model must never silently train with the tiny model's learning rate and lengths.
    """
    flags = dict(flags)
    preset = flags.pop("preset", None)
    explicit_preset = preset is not None
    note = None
    if preset is None:
        preset = "release" if flags.get("model.path") else "tiny"
        if preset == "release":
            note = ("--model without --preset: using the release preset (lr 3e-7, rollout 256 "
                    "prompts in 2 mini-batches, temperature 1.0, 1024 new tokens, bf16); pass "
                    "--preset tiny or explicit flags to change it")
    if preset not in PRESETS:
        raise ConfigError(f"--preset: {preset!r}; choose from {'|'.join(PRESETS)}")
    cfg = JobConfig(preset=preset)
    for dotted, value in {**PRESETS[preset], **flags}.items():
        _set(cfg, dotted, value)
    # What the user typed (not a dataclass field, so never saved): --resume compares these
    # against the saved config.
    cfg.explicit = frozenset(flags) | ({"preset"} if explicit_preset else frozenset())
    return validate(cfg), note


# Settings that control this invocation rather than what the run computes: always taken
# from the command line, never from a saved config.
INVOCATION = frozenset({"output", "stop_after", "progress", "log_every", "overwrite",
                        "checkpoint.resume", "checkpoint.allow_config_change"})
# Settings a resumed run may change freely: length, checkpointing, evaluation (greedy, it
# draws no random numbers), compile/AC (same math).
RESUMABLE_CHANGES = ("steps", "checkpoint.", "eval.", "parallel.compile", "parallel.ac")


def _get(cfg: JobConfig, dotted: str):
    obj = cfg
    for part in dotted.split("."):
        obj = getattr(obj, part)
    return obj


def merge_for_resume(cfg: JobConfig, saved: dict) -> tuple[JobConfig, list[str], list[str]]:
    """The config a ``--resume`` continues with: the saved one, plus this command line's
    invocation settings and the flags it was given explicitly. Returns (config, changed,
    refused): ``refused`` lists run-altering changes, applied only with
    ``--checkpoint.allow_config_change`` (otherwise the caller refuses to start)."""
    out = JobConfig.from_dict(saved)
    explicit = getattr(cfg, "explicit", frozenset())
    changed, refused = [], []
    for dotted in sorted(explicit | INVOCATION):
        new, old = _get(cfg, dotted), _get(out, dotted)
        if new == old:
            continue
        if dotted not in INVOCATION:
            note = f"--{dotted} {old!r} -> {new!r}"
            ok = dotted.startswith(RESUMABLE_CHANGES) or cfg.checkpoint.allow_config_change
            (changed if ok else refused).append(note)
            if not ok:
                continue
        _set(out, dotted, new)
    out.explicit = explicit
    return validate(out), changed, refused


def parse_args(argv: list[str] | None = None, *, announce=None) -> JobConfig:
    """Parse the trainer's command line into a validated config (ConfigError if bad).

    ``announce`` (default: print to stderr) receives the note when a preset was chosen
    for the user."""
    cfg, note = resolve(vars(build_parser().parse_args(argv)))
    if note:
        (announce or (lambda m: print(m, file=sys.stderr, flush=True)))(note)
    return cfg


def default_output_dir() -> Path:
    return Path("runs") / time.strftime("%Y%m%d-%H%M%S")
