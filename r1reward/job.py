"""Everything before the RL loop: process group, run directory, data, the embedded model,
the cold start, then the :class:`~r1reward.trainer.Trainer`.

Same code on one CPU and under ``torchrun`` with ``--fsdp`` (gloo on CPU, nccl on GPUs):
rank 0 builds what is cached (data, tiny model, cold start) and the others wait.
"""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from r1reward import machine
from r1reward.config import ConfigError, JobConfig, default_output_dir, merge_for_resume
from r1reward.data import load_pairs
from r1reward.log import logger as log
from r1reward.log import setup_logging
from r1reward.parallelize import Dist, barrier, init_distributed
from r1reward.trainer import Progress, Trainer


def broadcast(d: Dist, obj):
    """Rank 0's value of a picklable object, on every rank."""
    if d.world == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def check_world(cfg: JobConfig, d: Dist) -> None:
    """Settings that depend on the number of ranks (known only once the group is up)."""
    if d.world > 1 and not cfg.parallel.fsdp:
        raise ConfigError("several ranks need --fsdp (gradients are synchronized by FSDP2)")
    tb = cfg.algo.train_batch_size or cfg.rollout.batch_size
    for flag, n in (("rollout.batch_size", cfg.rollout.batch_size), ("algo.train_batch_size", tb)):
        if n % d.world:
            raise ConfigError(f"--{flag}: {n} must be divisible by the {d.world} ranks")


# What a run writes into its directory (``--overwrite`` removes exactly these).
RUN_FILES = ("config.json", "metrics.jsonl", "summary.json", "curves.png", "skipped_lines.txt",
             "tb", "checkpoints", "export")


def prepare_output(cfg: JobConfig, out: Path) -> JobConfig:
    """Check the run directory against the request; returns the config to run with.

    A fresh run never writes into another run's directory (``--overwrite`` to replace it);
    ``--resume`` continues with the saved config.json and refuses run-altering changes."""
    saved = out / "config.json"
    if cfg.checkpoint.resume:
        if not saved.exists():
            log.info("--resume: %s has no config.json, starting a fresh run there", out)
            return cfg
        merged, changed, refused = merge_for_resume(cfg, json.loads(saved.read_text()))
        if refused:
            raise ConfigError(
                f"--resume: {saved} was written with other values for settings that change "
                f"what the run computes: {'; '.join(refused)}. Drop those flags to continue "
                "the saved run, or pass --checkpoint.allow_config_change to change them")
        log.info("--resume: continuing with the saved %s%s", saved,
                 f"; changed: {'; '.join(changed)}" if changed else " unchanged")
        return merged
    existing = sorted(p.name for p in out.iterdir()) if out.is_dir() else []
    if existing and not cfg.overwrite:
        raise ConfigError(f"--output: {out} already holds files ({', '.join(existing[:5])}"
                          f"{', ...' if len(existing) > 5 else ''}); pass --resume to continue "
                          "that run, --overwrite to replace it, or another --output")
    if existing:
        for name in RUN_FILES:
            path = out / name
            if path.is_dir():
                shutil.rmtree(path)
            elif path.exists():
                path.unlink()
        log.info("--overwrite: removed the previous run's files from %s", out)
    return cfg


def prepare_data(cfg: JobConfig, d: Dist, out: Path) -> tuple[list, list, dict]:
    """(train pairs, held-out pairs, info). Bad lines are skipped, counted and listed."""
    if cfg.data.train is None:
        from r1reward.data import generated_split
        kinds = tuple(k.strip() for k in cfg.data.kinds.split(",") if k.strip())
        if d.is_main:
            generated_split(cfg.data.n_train, cfg.data.n_heldout, cfg.data.gen_seed, kinds)
        barrier()
        train_file, heldout_file = generated_split(cfg.data.n_train, cfg.data.n_heldout,
                                                   cfg.data.gen_seed, kinds)
    else:
        train_file, heldout_file = Path(cfg.data.train), cfg.data.heldout
    train = load_pairs(train_file)
    skipped = list(train.skipped)
    if heldout_file is not None:
        held = load_pairs(heldout_file)
        skipped += held.skipped
        train_pairs, held_pairs = train.pairs, held.pairs
    else:  # real data without a held-out file: hold out the tail
        n_h = min(cfg.data.n_heldout, len(train.pairs) // 10)
        train_pairs, held_pairs = train.pairs[:len(train.pairs) - n_h], train.pairs[len(train.pairs) - n_h:]
    if not train_pairs:
        raise ValueError(f"{train_file}: no usable training pairs "
                         f"({len(skipped)} lines skipped, first: {skipped[:3]})")
    if d.is_main and skipped:
        (out / "skipped_lines.txt").write_text("".join(f"{r}\n" for _, r in skipped))
        log.warning("data: skipped %d bad lines (see %s)", len(skipped), out / "skipped_lines.txt")
    info = {"train_file": str(train_file), "heldout_file": str(heldout_file),
            "n_train": len(train_pairs), "n_heldout": len(held_pairs), "skipped": len(skipped)}
    return train_pairs, held_pairs, info


def base_model_dir(cfg: JobConfig, d: Dist) -> Path:
    """``--model``, or the embedded tiny checkpoint (built once, by rank 0); the vLLM engine
    gets its variant with a head size vLLM's CPU attention supports (r1reward.tiny)."""
    if cfg.model.path:
        return Path(cfg.model.path)
    from r1reward.tiny import HEADS, VLLM_HEADS, default_model_dir
    heads = VLLM_HEADS if cfg.rollout.engine == "vllm" else HEADS
    if d.is_main:
        default_model_dir(heads)
    barrier()
    return default_model_dir(heads)


def cold_start(cfg: JobConfig, d: Dist, base_dir: Path, train_pairs: list
               ) -> tuple[Path, dict, list]:
    """SFT before RL (cached by a hash of its inputs; rank 0 trains, the others wait).

    Returns (the policy's starting checkpoint, cold-start info, the RL training pairs):
    with ``--sft.teacher distill`` the RL pairs are those the teacher did not solve on its
    first attempt (SPEC §4's progressive difficulty); otherwise all of them."""
    if not (cfg.sft.enabled and cfg.sft.steps > 0):
        return base_dir, {}, train_pairs
    result = None
    seed = cfg.seed if cfg.sft.seed is None else cfg.sft.seed
    if d.is_main:
        from r1reward import sft
        rl_ids, teacher_stats = None, None
        if cfg.sft.data:
            examples, _ = sft.load_sft_file(cfg.sft.data)
        elif cfg.sft.teacher == "distill":
            from r1reward.teacher import distill
            dist_out = distill(train_pairs, cfg.sft.teacher_k, slip=cfg.sft.teacher_slip, seed=seed)
            examples, teacher_stats = dist_out.sft, dist_out.stats
            rl_ids = {p.id for p in dist_out.rl}
            log.info("teacher: %d first-try traces for SFT (%.1f %% inconsistent), %d pairs for RL",
                     len(examples), 100 * teacher_stats["sft_inconsistent_rate"], len(rl_ids))
        else:
            examples = sft.examples_for(train_pairs, cfg.sft, seed)
        if cfg.sft.data or cfg.sft.teacher == "distill":
            examples = examples[:cfg.sft.n_examples] if cfg.sft.n_examples > 0 else examples
        init_dir, info = sft.cold_start(base_dir, examples, cfg.sft, seed=seed, log=log.info)
        if teacher_stats is not None:
            info["teacher"] = teacher_stats
        result = (init_dir, info, rl_ids)
    init_dir, info, rl_ids = broadcast(d, result)
    rl_pairs = [p for p in train_pairs if p.id in rl_ids] if rl_ids else train_pairs
    return init_dir, info, rl_pairs


def prepare(cfg: JobConfig, d: Dist, out: Path):
    """Data, base model and cold start (each built once and cached): returns the RL and
    held-out pairs, data info, the policy's starting checkpoint and the cold-start info."""
    seed_all(cfg.seed)
    train_pairs, held_pairs, data_info = prepare_data(cfg, d, out)
    base_dir = base_model_dir(cfg, d)
    init_dir, sft_info, train_pairs = cold_start(cfg, d, base_dir, train_pairs)
    data_info["n_rl"] = len(train_pairs)
    if (base_dir / "reading.json").exists():  # the embedded base's caption pretraining
        sft_info = {**sft_info, "base_reading": json.loads((base_dir / "reading.json").read_text())}
    return train_pairs, held_pairs, data_info, init_dir, sft_info


def run(cfg: JobConfig) -> dict | None:
    """The whole job; returns the summary (None when stopped by ``--stop_after``)."""
    d = init_distributed(cfg.parallel.fsdp)
    setup_logging(d.is_main)
    log.info("machine: %s", machine.one_line(machine.describe()))
    check_world(cfg, d)
    out = Path(broadcast(d, str(cfg.output or default_output_dir())))
    cfg.output = str(out)
    outcome = None
    if d.is_main:  # one rank decides, so every rank agrees even while files appear
        try:
            outcome = prepare_output(cfg, out).to_dict()
            out.mkdir(parents=True, exist_ok=True)
            JobConfig.from_dict(outcome).save(out / "config.json")
        except ConfigError as err:
            outcome = err
    outcome = broadcast(d, outcome)
    if isinstance(outcome, ConfigError):
        raise outcome
    cfg = JobConfig.from_dict(outcome)
    train_pairs, held_pairs, data_info, init_dir, sft_info = prepare(cfg, d, out)
    seed_all(cfg.seed * 1000 + d.rank)  # rollouts differ per rank, reproducibly
    trainer = Trainer(cfg, d, out, train_pairs, held_pairs, init_dir, Progress(sft=sft_info),
                      data_info)
    return trainer.run()
