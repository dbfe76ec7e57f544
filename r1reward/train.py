"""``python -m r1reward.train``: cold-start SFT then StableReinforce RL, end to end.

Read top to bottom: set-up (process group, data, cold start, models, optimizer,
checkpoint) → held-out accuracy before RL → the RL loop (rollout → log-probs → rewards →
advantages → update → health → log → checkpoint) → held-out accuracy after → export.
Same command on one CPU, under ``torchrun`` with ``--fsdp`` (gloo on CPU, nccl on GPUs).
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from r1reward import rollout as rollout_mod
from r1reward.advantages import (
    advantage_filter,
    grpo_advantages,
    kl_per_token,
    reinforce_pp_advantages,
    rloo_advantages,
)
from r1reward.checkpoint import Checkpointer
from r1reward.config import JobConfig, default_output_dir, parse_args
from r1reward.data import DATA_VERSION, generate_dataset, load_pairs
from r1reward.health import HealthMonitor
from r1reward.logprobs import FusedLMHead, micro_batches, policy_loss, sequence_logprobs
from r1reward.metrics import MetricsLogger
from r1reward.parallelize import Dist, all_reduce_sum, barrier, init_distributed, parallelize
from r1reward.rewards import compute_rewards
from r1reward.sft import cache_root, cold_start, examples_for, load_sft_file

# Per-step fields that depend on wall time (everything else must be reproducible).
TIMING_KEYS = ("time_rollout", "time_logprobs", "time_update", "time_step", "tokens_per_s")


@dataclass
class TrainState:
    """Everything besides model/optimizer that a resumed run needs to continue exactly."""

    step: int = 0
    cursor: int = 0  # global index into the (epoch-shuffled) training stream
    lr_scale: float = 1.0  # lowered on each health rollback
    before: dict | None = None  # held-out metrics before RL
    sft: dict = field(default_factory=dict)
    scheduler: dict = field(default_factory=dict)
    health: dict = field(default_factory=dict)
    phase_seconds: dict = field(default_factory=dict)


def log0(d: Dist, *msg) -> None:
    if d.is_main:
        print(*msg, file=sys.stderr, flush=True)


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


# ------------------------------------------------------------------------------ data
def prepare_data(cfg: JobConfig, d: Dist, out: Path):
    """(train pairs, held-out pairs, info). Bad lines are skipped, counted and listed."""
    if cfg.data.train is None:
        kinds = tuple(k.strip() for k in cfg.data.kinds.split(",") if k.strip())
        key = (f"gen-v{DATA_VERSION}-s{cfg.data.gen_seed}-n{cfg.data.n_train}-h{cfg.data.n_heldout}"
               f"-{'_'.join(kinds)}")
        root = cache_root() / "data" / key
        if d.is_main and not (root / "heldout.jsonl").exists():
            tmp = root.with_name(f"{key}.tmp{id(cfg)}")
            generate_dataset(tmp, cfg.data.n_train, cfg.data.n_heldout, seed=cfg.data.gen_seed,
                             kinds=kinds)
            tmp.rename(root) if not root.exists() else None
        barrier()
        train_file, heldout_file = root / "train.jsonl", root / "heldout.jsonl"
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
        log0(d, f"data: skipped {len(skipped)} bad lines (see {out / 'skipped_lines.txt'})")
    info = {"train_file": str(train_file), "heldout_file": str(heldout_file),
            "n_train": len(train_pairs), "n_heldout": len(held_pairs), "skipped": len(skipped)}
    return train_pairs, held_pairs, info


def batch_pairs(pairs, cursor: int, size: int, seed: int):
    """``size`` pairs from the global stream at ``cursor`` (reshuffled every epoch)."""
    out = []
    for g in range(cursor, cursor + size):
        epoch, i = divmod(g, len(pairs))
        perm = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        out.append(pairs[perm[i].item()])
    return out


# ------------------------------------------------------------------------------ models
def load_models(cfg: JobConfig, d: Dist, init_dir):
    from r1reward.model import load_model_and_processor
    dtype = {"auto": torch.bfloat16 if d.device.type == "cuda" else torch.float32,
             "float32": torch.float32, "bfloat16": torch.bfloat16,
             "float16": torch.float16}[cfg.model.dtype]
    policy, processor = load_model_and_processor(init_dir, dtype=dtype, device=d.device)
    ref, _ = load_model_and_processor(init_dir, dtype=dtype, device=d.device)
    ref.requires_grad_(False).eval()
    a = cfg.algo
    loss_kwargs = dict(preclip=(math.log(a.preclip_lo), math.log(a.preclip_hi)),
                       clip_eps=(a.clip_eps, a.clip_eps), aggregation=a.aggregation,
                       kl_coef=0.0)  # Reinforce++ puts the KL penalty in the reward
    FusedLMHead.install(policy, backend=a.backend, temperature=cfg.rollout.temperature, **loss_kwargs)
    FusedLMHead.install(ref, backend=a.backend, temperature=cfg.rollout.temperature)
    p = cfg.parallel
    parallelize(policy, fsdp=p.fsdp, compile=p.compile, ac=p.ac, device=d.device)
    parallelize(ref, fsdp=p.fsdp, compile=p.compile, ac=False, device=d.device, trainable=False)
    policy.train()
    return policy, ref, processor


def build_optimizer(cfg: JobConfig, model, state: TrainState):
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ImportError("optim.name=adamw8bit needs torchao (pip install torchao)") from e
        opt = AdamW8bit(params, **kw)
    else:
        opt = torch.optim.AdamW(params, **kw)

    def lr_factor(step: int) -> float:  # linear warmup then cosine to min_lr_ratio
        if step < o.warmup_steps:
            f = (step + 1) / (o.warmup_steps + 1)
        else:
            t = (step - o.warmup_steps) / max(1, cfg.steps - o.warmup_steps)
            f = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return f * state.lr_scale  # state is read live, so a rollback's backoff applies

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_factor)


def build_judge(cfg: JobConfig, device):
    from r1reward import rewards
    r = cfg.reward
    if r.judge == "none":
        return None
    if r.judge == "rule":
        return rewards.RuleJudge()
    if r.judge == "openai":
        return rewards.OpenAIJudge(r.openai_url, r.openai_model)
    if not r.local_model:
        raise ValueError("reward.judge=local needs --reward.local_model DIR")
    from r1reward.model import load_model_and_processor
    jm, jp = load_model_and_processor(r.local_model, device=device)
    return rewards.LocalJudge(jm, jp)


# ------------------------------------------------------------------------------ RL step
def advantages(cfg: JobConfig, d: Dist, total, mask, old_lp, ref_lp):
    a = cfg.algo
    raw_mean = None
    if a.estimator == "reinforce_pp":
        adv, stats = reinforce_pp_advantages(total, mask, old_lp, ref_lp, a.kl_coef, a.kl_estimator,
                                             process_group=d.group, return_stats=True)
        raw_mean = stats.mean
    elif a.estimator == "grpo":
        adv = grpo_advantages(total, mask, cfg.rollout.n_samples)
    else:
        adv = rloo_advantages(total, mask, cfg.rollout.n_samples)
    if a.adv_filter == "release" and raw_mean is None:
        raise ValueError("algo.adv_filter=release needs algo.estimator=reinforce_pp")
    return advantage_filter(adv, mask, a.adv_filter, a.filter_k, raw_mean=raw_mean)


def update(cfg: JobConfig, policy, ro, old_lp, ref_lp, adv):
    """One optimizer step's worth of backward passes (micro-batched); returns stats sums."""
    mask = ro.batch.response_mask
    agg = cfg.algo.aggregation
    # Micro-batch losses are means over their own rows/tokens: weight them so the sum is
    # the full batch's aggregate (seq-level for seq-mean, token-level for token-mean).
    unit = mask.sum(1) if agg == "token-mean" else (mask.sum(1) > 0).float()
    total_units = unit.sum().clamp_min(1.0)
    sums = {"loss": 0.0, "preclip_frac": 0.0, "clip_frac": 0.0, "entropy": 0.0, "ratio_max": 0.0}
    n_tok = mask.sum().clamp_min(1).item()
    for idx in micro_batches(len(ro.batch), cfg.algo.micro_batch_size):
        mb = ro.batch.select(idx)
        loss, st = policy_loss(policy, mb, old_lp[idx], adv[idx], ref_lp[idx], return_entropy=True)
        scale = unit[idx].sum() / total_units
        (loss * scale).backward()
        w = mask[idx].sum().item() / n_tok  # token-weighted statistics
        sums["loss"] += (loss * scale).item()
        for k in ("preclip_frac", "clip_frac", "entropy"):
            sums[k] += st[k].item() * w
        sums["ratio_max"] = max(sums["ratio_max"], st["ratio_max"].item())
    return sums


def grad_norm_and_clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


def global_mean(d: Dist, row: dict) -> dict:
    """Average scalar metrics over ranks (each rank holds an equal share of the batch)."""
    if d.world == 1:
        return row
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    t = all_reduce_sum(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64))
    return {**row, **{k: (t[i] / d.world).item() for i, k in enumerate(keys)}}


# ------------------------------------------------------------------------------ main
def run(cfg: JobConfig) -> dict | None:
    t_start = time.time()
    d = init_distributed(cfg.parallel.fsdp)
    if d.world > 1 and not cfg.parallel.fsdp:
        raise ValueError("several ranks need --fsdp (gradients are synchronized by FSDP2)")
    if cfg.rollout.batch_size % d.world:
        raise ValueError(f"rollout.batch_size={cfg.rollout.batch_size} must be divisible by the "
                         f"{d.world} ranks")
    out = Path(broadcast(d, str(cfg.output or default_output_dir())))
    cfg.output = str(out)
    if d.is_main:
        out.mkdir(parents=True, exist_ok=True)
        cfg.save(out / "config.json")
    barrier()
    seed_all(cfg.seed)

    # Data and the embedded tiny model (built once, by rank 0).
    train_pairs, held_pairs, data_info = prepare_data(cfg, d, out)
    if cfg.model.path is None and d.is_main:
        from r1reward.tiny import default_model_dir
        default_model_dir()
    barrier()
    from r1reward.tiny import default_model_dir
    base_dir = Path(cfg.model.path) if cfg.model.path else default_model_dir()

    # Cold-start SFT (cached by a hash of its inputs; rank 0 trains, the others wait).
    state = TrainState()
    init_dir = base_dir
    if cfg.sft.enabled and cfg.sft.steps > 0:
        if d.is_main:
            if cfg.sft.data:
                examples, _ = load_sft_file(cfg.sft.data)
                examples = examples[:cfg.sft.n_examples] if cfg.sft.n_examples > 0 else examples
            else:
                examples = examples_for(train_pairs, cfg.sft, cfg.seed)
            init_dir, state.sft = cold_start(base_dir, examples, cfg.sft, seed=cfg.seed,
                                             log=lambda m: log0(d, m))
        init_dir, state.sft = broadcast(d, (init_dir, state.sft))
    seed_all(cfg.seed * 1000 + d.rank)  # rollouts differ per rank, reproducibly

    policy, ref, processor = load_models(cfg, d, init_dir)
    opt, sched = build_optimizer(cfg, policy, state)
    judge = build_judge(cfg, d.device)
    ckpt = Checkpointer(out, keep=cfg.checkpoint.keep)
    health = HealthMonitor(cfg.health.spike_factor, cfg.health.window, cfg.health.min_history,
                           cfg.health.max_bad_steps, min_spike_norm=cfg.health.min_spike_norm)
    metrics = MetricsLogger(out, enabled=d.is_main)

    def restore(path) -> None:
        s = ckpt.load(path, policy, opt)
        for k, v in s.items():
            setattr(state, k, v)
        sched.load_state_dict(state.scheduler)
        health.load_state_dict(state.health)

    if cfg.checkpoint.resume:
        latest = ckpt.latest()
        if latest is None:
            log0(d, f"--resume: no complete checkpoint under {ckpt.root}, starting fresh")
        else:
            restore(latest)
            metrics.truncate_after(state.step)
            log0(d, f"resumed from {latest} at step {state.step}")

    def evaluate(tag: str) -> dict:
        if not cfg.eval.enabled or not held_pairs:
            return {"accuracy": None, "n": 0}
        pairs = held_pairs[:cfg.eval.limit] if cfg.eval.limit > 0 else held_pairs
        t0 = time.time()
        r = rollout_mod.evaluate(policy, processor, pairs, batch_size=cfg.eval.batch_size,
                                 max_new_tokens=cfg.eval.max_new_tokens)
        r["seconds"] = time.time() - t0
        log0(d, f"held-out {tag}: accuracy {r['accuracy']:.3f} format {r['format_rate']:.3f} "
                f"answer-1 rate {r['answer1_rate']:.3f} (n={r['n']}, {r['seconds']:.1f}s)")
        return r

    if state.before is None:
        state.before = evaluate("before RL")

    # ---------------------------------------------------------------- the RL loop
    per_rank = cfg.rollout.batch_size // d.world
    bar = None
    if d.is_main and cfg.progress:
        from tqdm import tqdm
        bar = tqdm(total=cfg.steps, initial=state.step, desc="RL", unit="step", dynamic_ncols=True)
    phase = state.phase_seconds or {"rollout": 0.0, "logprobs": 0.0, "update": 0.0}
    stopped_early = None
    while state.step < cfg.steps:
        step = state.step + 1
        t0 = time.time()
        pairs = batch_pairs(train_pairs, state.cursor, cfg.rollout.batch_size, cfg.seed)
        mine = pairs[d.rank * per_rank:(d.rank + 1) * per_rank]
        ro = rollout_mod.collect(policy, processor, mine, temperature=cfg.rollout.temperature,
                                 top_p=cfg.rollout.top_p, max_new_tokens=cfg.rollout.max_new_tokens,
                                 n_samples=cfg.rollout.n_samples,
                                 balance=cfg.rollout.balance_positions,
                                 offset=state.cursor + d.rank * per_rank)
        t1 = time.time()
        mb = cfg.algo.micro_batch_size
        old_lp = sequence_logprobs(policy, ro.batch, mb)
        ref_lp = sequence_logprobs(ref, ro.batch, mb)
        t2 = time.time()
        mask = ro.batch.response_mask
        rw = compute_rewards(ro.texts, ro.preferred, judge, cfg.reward.w_format,
                             cfg.reward.w_consistency, images=ro.images)
        adv, filtered = advantages(cfg, d, rw.total, mask, old_lp, ref_lp)
        opt.zero_grad(set_to_none=True)
        lr = opt.param_groups[0]["lr"]  # the LR this step's update uses
        decision = "ok"
        for _ in range(cfg.algo.ppo_epochs):
            sums = update(cfg, policy, ro, old_lp, ref_lp, adv)
            gnorm = grad_norm_and_clip(policy, cfg.optim.max_grad_norm)
            loss_all = all_reduce_sum(torch.tensor([sums["loss"]], dtype=torch.float64)).item()
            decision = health.check(loss_all, gnorm)
            if decision == "ok":
                opt.step()
            opt.zero_grad(set_to_none=True)
            if decision != "ok":
                break
        sched.step()
        t3 = time.time()

        m = mask.float()
        answers = ro.answers
        n_tok = m.sum().item()
        row = {
            "reward": rw.total.mean().item(), "reward_format": rw.format.mean().item(),
            "reward_result": rw.result.mean().item(),
            "reward_consistency": rw.consistency.mean().item(),
            "accuracy": rw.result.mean().item(), "format_rate": rw.format.mean().item(),
            "consistency_rate": (rw.consistency > 0).float().mean().item(),
            "judge_failures": rw.judge_failures, "parse_failures": rw.parse_failures,
            "kl": ((kl_per_token(old_lp, ref_lp, "k1") * m).sum() / m.sum().clamp_min(1)).item(),
            "preclip_frac": sums["preclip_frac"], "clip_frac": sums["clip_frac"],
            "filtered_frac": (filtered.float().sum() / m.sum().clamp_min(1)).item(),
            "entropy": sums["entropy"], "ratio_max": sums["ratio_max"],
            "response_length": m.sum(1).mean().item(),
            "answer1_rate": sum(a == 1 for a in answers) / max(len(answers), 1),
            "loss": sums["loss"], "grad_norm": gnorm, "lr": lr,
            "time_rollout": t1 - t0, "time_logprobs": t2 - t1, "time_update": t3 - t2,
            "time_step": t3 - t0, "tokens_per_s": n_tok / max(t3 - t0, 1e-9),
        }
        row = global_mean(d, row)
        row["judge_failures"] = int(round(row["judge_failures"] * d.world))
        row["parse_failures"] = int(round(row["parse_failures"] * d.world))
        row["health"] = decision
        row["skipped_steps"] = health.skipped_total
        row["rollbacks"] = health.rollbacks
        if cfg.eval.every > 0 and step % cfg.eval.every == 0 and step < cfg.steps:
            # The held-out curve during RL (greedy, so it draws no random numbers and a
            # resumed run logs the same values); the last step is the "after" evaluation.
            r = evaluate(f"at step {step}")
            if r["accuracy"] is not None:
                row["heldout_accuracy"] = r["accuracy"]
                row["heldout_answer1_rate"] = r["answer1_rate"]
        for k in phase:
            phase[k] += row[f"time_{k}"]
        state.step, state.cursor = step, state.cursor + cfg.rollout.batch_size
        metrics.log(step, row)
        if bar is not None:
            bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                            fmt=f"{row['format_rate']:.2f}", refresh=False)
            bar.update(1)

        if decision.startswith("rollback") and health.rollbacks > cfg.health.max_rollbacks:
            stopped_early = (f"step {step}: {decision} after {cfg.health.max_rollbacks} "
                             "rollbacks; RL stopped early")
            log0(d, stopped_early)
            break
        if decision.startswith("rollback"):
            state.lr_scale *= cfg.health.lr_backoff
            latest = ckpt.latest()
            log0(d, f"step {step}: {decision}; rolling back to {latest} with lr x{state.lr_scale:g}")
            if latest is not None:
                scale, rollbacks, skipped = state.lr_scale, health.rollbacks, health.skipped_total
                restore(latest)
                state.lr_scale = scale
                health.rollbacks, health.skipped_total = rollbacks, skipped
                if bar is not None:
                    bar.n = state.step
            for g, base, f in zip(opt.param_groups, sched.base_lrs, sched.lr_lambdas):
                g["lr"] = base * f(sched.last_epoch)  # the next step's LR, with the backoff
            continue
        if decision != "ok":
            log0(d, f"step {step}: {decision}; update skipped")

        at_interval = cfg.checkpoint.interval > 0 and step % cfg.checkpoint.interval == 0
        if at_interval or step == cfg.steps:
            state.scheduler, state.health = sched.state_dict(), health.state_dict()
            state.phase_seconds = dict(phase)
            ckpt.save(step, policy, opt, vars(state).copy())
        if cfg.stop_after and step >= cfg.stop_after:  # simulated interruption (tests)
            log0(d, f"stopping after step {step} (--stop_after)")
            if bar is not None:
                bar.close()
            metrics.close()
            return None
    if bar is not None:
        bar.close()

    after = evaluate("after RL")
    export_dir = None
    if cfg.checkpoint.export:
        from r1reward.export import export_hf
        export_dir = export_hf(policy, processor, out / "export")
    summary = {
        "heldout_accuracy_before": state.before["accuracy"],
        "heldout_accuracy_after": after["accuracy"],
        "heldout_before": state.before, "heldout_after": after,
        "steps": state.step, "wall_seconds": time.time() - t_start,
        "phase_seconds": phase, "sft": state.sft, "data": data_info,
        "skipped_steps": health.skipped_total, "rollbacks": health.rollbacks,
        "stopped_early": stopped_early,
        "world_size": d.world, "export_dir": str(export_dir) if export_dir else None,
        "run_dir": str(out),
    }
    if d.is_main:
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        from r1reward.metrics import plot_training_curves
        plot_training_curves(out, state.before["accuracy"], after["accuracy"])
        log0(d, f"held-out accuracy {summary['heldout_accuracy_before']} -> "
                f"{summary['heldout_accuracy_after']}; {summary['wall_seconds']:.0f}s; "
                f"run dir {out}")
    metrics.close()
    return summary


def main(argv=None) -> None:
    cfg = parse_args(argv)
    try:
        run(cfg)
    finally:
        from r1reward.parallelize import destroy
        destroy()


if __name__ == "__main__":
    main()
