"""The StableReinforce RL trainer: one object whose stages read top to bottom.

``Trainer.run()``: held-out accuracy before RL, then per RL step
``rollout → logprobs → score → advantages → update (→ health) → log → checkpoint``
(the rollout engine, r1reward.engine, takes the policy's weights whenever they changed),
then held-out accuracy after, export and ``summary.json``. Every stateful part (model and
optimizer through DCP, the pair stream, RNG, health monitor, progress, the recovery
ledger) saves and restores its own state, so resume and rollback both mean "restore
everything from a checkpoint"; only the recovery ledger (learning-rate backoff, counts
of skips and rollbacks) survives a rollback, by design.
"""
from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from r1reward import machine, registry, rollout
from r1reward.checkpoint import Checkpointer, CorruptCheckpoint
from r1reward.config import JobConfig
from r1reward.health import Action, Decision, HealthMonitor
from r1reward.kernels import StableReinforceLoss
from r1reward.log import logger as log
from r1reward.logprobs import FusedLMHead, micro_batches, policy_loss, sequence_logprobs
from r1reward.metrics import MetricsLogger, plot_training_curves
from r1reward.mismatch import mismatch_stats, tis_weights
from r1reward.parallelize import Dist, all_reduce_sum, parallelize
from r1reward.rewards import compute_rewards

# Per-step fields that depend on wall time (everything else must be reproducible).
TIMING_KEYS = ("time_rollout", "time_logprobs", "time_update", "time_step", "tokens_per_s",
               "rollout_tokens_per_s")
PHASES = ("rollout", "logprobs", "update")
# Loss statistics averaged over an RL step's tokens, and those whose extreme is kept
# (the log-ratio median is averaged; its 5 % / 95 % quantiles keep the widest value).
WEIGHTED_STATS = ("preclip_frac", "clip_frac", "entropy", "approx_kl", "log_ratio_q50")
EXTREME_STATS = {"ratio_max": max, "ratio_min": min, "log_ratio_q05": min, "log_ratio_q95": max}


# ------------------------------------------------------------------------ state pieces
class PairStream:
    """The training pairs in an order reshuffled every epoch; its state is a cursor."""

    def __init__(self, pairs: list, seed: int):
        self.pairs, self.seed, self.cursor = pairs, seed, 0

    def take(self, n: int) -> tuple[list, int]:
        """The next ``n`` pairs and the global position of the first."""
        start, out = self.cursor, []
        for g in range(start, start + n):
            epoch, i = divmod(g, len(self.pairs))
            gen = torch.Generator().manual_seed(self.seed * 7919 + epoch)
            out.append(self.pairs[torch.randperm(len(self.pairs), generator=gen)[i].item()])
        self.cursor += n
        return out, start

    def state_dict(self) -> dict:
        return {"cursor": self.cursor}

    def load_state_dict(self, d: dict) -> None:
        self.cursor = d["cursor"]


@dataclass
class Progress:
    """Where the run is: step, held-out result before RL, cold-start info, phase times."""

    step: int = 0
    before: dict | None = None
    sft: dict = field(default_factory=dict)
    phase_seconds: dict = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


@dataclass
class Recovery:
    """What a rollback must not undo: the learning-rate backoff and the event counts."""

    lr_scale: float = 1.0
    rollbacks: int = 0
    skipped_steps: int = 0

    def state_dict(self) -> dict:
        return asdict(self)

    def load_state_dict(self, d: dict) -> None:
        for k, v in d.items():
            setattr(self, k, v)


class LRSchedule:
    """Linear warmup then cosine to ``min_lr_ratio`` over the RL steps, times the
    recovery backoff: a pure function of the step, so it has no state to restore."""

    def __init__(self, cfg: JobConfig, optimizer, recovery: Recovery):
        self.o, self.total, self.opt, self.recovery = cfg.optim, cfg.steps, optimizer, recovery

    def factor(self, step: int) -> float:  # step counts from 0
        o = self.o
        if step < o.warmup_steps:
            f = (step + 1) / (o.warmup_steps + 1)
        else:
            t = (step - o.warmup_steps) / max(1, self.total - o.warmup_steps)
            f = o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(t, 1.0)))
        return f * self.recovery.lr_scale

    def apply(self, step: int) -> float:
        lr = self.o.lr * self.factor(step)
        for g in self.opt.param_groups:
            g["lr"] = lr
        return lr


@dataclass
class AdvantageInputs:
    """What an advantage estimator (r1reward.registry) reads."""

    rewards: torch.Tensor
    mask: torch.Tensor
    old_logp: torch.Tensor
    ref_logp: torch.Tensor
    kl_coef: float
    kl_estimator: str
    n_samples: int
    process_group: object


@dataclass
class UpdateResult:
    loss: float
    grad_norm: float
    decision: Decision  # of the last optimizer step
    optimizer_steps: int
    stats: dict


@dataclass
class Sampler:
    """The rollout engine's log-probs against the trainer's: mismatch statistics and the
    optional TIS weights (empty when the engine reports no log-probs)."""

    stats: dict
    is_weights: torch.Tensor | None = None


# ------------------------------------------------------------------------ components
def needs_logprobs(cfg: JobConfig) -> tuple[bool, bool]:
    """(old, reference) log-probs needed before the update: the reference for the KL
    (reward penalty and its metric), the old ones for that KL or an off-policy update
    (several mini-batches or epochs per rollout)."""
    a = cfg.algo
    on_policy = (a.train_batch_size in (0, cfg.rollout.batch_size)) and a.ppo_epochs == 1
    kl = a.kl_coef > 0
    # a separate engine sampled: the trainer's own log-probs measure (and correct) the gap
    separate_sampler = cfg.rollout.engine != "hf"
    return kl or not on_policy or separate_sampler, kl


def _rows(t, rows):
    return None if t is None else t[rows]


def loss_module(cfg: JobConfig) -> StableReinforceLoss:
    """The one place the config's loss settings become kernel arguments."""
    a = cfg.algo
    # Reinforce++ puts the KL penalty in the reward (advantages), not in the loss.
    preclip = (math.log(a.preclip_lo), math.log(a.preclip_hi)) if a.preclip else None
    return StableReinforceLoss(preclip=preclip,
                               clip_eps=(a.clip_eps, a.clip_eps), aggregation=a.aggregation,
                               kl_coef=0.0, kl_estimator=a.kl_estimator,
                               temperature=cfg.rollout.temperature, backend=a.backend)


def model_dtype(cfg: JobConfig, device: torch.device) -> torch.dtype:
    return {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
            "float32": torch.float32, "bfloat16": torch.bfloat16,
            "float16": torch.float16}[cfg.model.dtype]


def build_optimizer(cfg: JobConfig, model) -> torch.optim.Optimizer:
    o = cfg.optim
    params = [p for p in model.parameters() if p.requires_grad]
    kw = dict(lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay)
    if o.name == "adamw8bit":
        try:
            from torchao.optim import AdamW8bit
        except ImportError as e:
            raise ImportError("optim.name=adamw8bit needs torchao (pip install torchao)") from e
        return AdamW8bit(params, **kw)
    return torch.optim.AdamW(params, **kw)


def grad_norm_and_clip(model, max_norm: float) -> float:
    params = [p for p in model.parameters() if p.grad is not None]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm if max_norm > 0 else float("inf"))
    if hasattr(norm, "full_tensor"):  # FSDP2: a DTensor over the shards
        norm = norm.full_tensor()
    return float(norm)


# Per-step extremes: the global value is the extreme over ranks, not their mean.
RANK_MAX = ("ratio_max", "log_ratio_q95", "sampler_logp_diff_max")
RANK_MIN = ("ratio_min", "log_ratio_q05")


def global_mean(d: Dist, row: dict) -> dict:
    """Average scalar metrics over ranks (each rank holds an equal share of the batch);
    the extremes in RANK_MAX / RANK_MIN take the max / min over ranks."""
    if d.world == 1:
        return row
    import torch.distributed as dist
    keys = sorted(k for k, v in row.items() if isinstance(v, (int, float)) and not isinstance(v, bool))
    t = all_reduce_sum(torch.tensor([float(row[k]) for k in keys], dtype=torch.float64))
    out = {**row, **{k: (t[i] / d.world).item() for i, k in enumerate(keys)}}
    for names, op in ((RANK_MAX, dist.ReduceOp.MAX), (RANK_MIN, dist.ReduceOp.MIN)):
        present = [k for k in names if k in row]  # the same keys on every rank
        if present:
            x = torch.tensor([float(row[k]) for k in present], dtype=torch.float64)
            dist.all_reduce(x, op=op)
            out.update({k: x[i].item() for i, k in enumerate(present)})
    return out


# ------------------------------------------------------------------------ the trainer
class Trainer:
    def __init__(self, cfg: JobConfig, d: Dist, out: Path, train_pairs: list, held_pairs: list,
                 init_dir: Path, progress: Progress, data_info: dict):
        self.cfg, self.d, self.out = cfg, d, out
        self.held_pairs, self.data_info = held_pairs, data_info
        self.t_start = time.time()
        self.policy, self.ref, self.processor = self._load_models(init_dir)
        self.engine = self._build_engine(init_dir)
        # The engine holds weights of version engine_version; the policy's change with every
        # optimizer step and restore, and the engine is synced lazily before it generates.
        self.weights_version, self.engine_version = 0, 0
        self.optimizer = build_optimizer(cfg, self.policy)
        self.recovery = Recovery()
        self.schedule = LRSchedule(cfg, self.optimizer, self.recovery)
        self.stream = PairStream(train_pairs, cfg.seed)
        self.progress = progress
        h = cfg.health
        self.health = HealthMonitor(h.spike_factor, h.window, h.min_history, h.max_bad_steps,
                                    min_spike_norm=h.min_spike_norm)
        self.judge = registry.CONSISTENCY_JUDGES.get(cfg.reward.judge)(cfg.reward, d.device)
        self.ckpt = Checkpointer(out, keep=cfg.checkpoint.keep)
        self.metrics = MetricsLogger(out, enabled=d.is_main)
        self.bar = None

    def _load_models(self, init_dir):
        from r1reward.model import load_model_and_processor
        cfg, d = self.cfg, self.d
        dtype = model_dtype(cfg, d.device)
        policy, processor = load_model_and_processor(init_dir, dtype=dtype, device=d.device)
        loss = loss_module(cfg)
        FusedLMHead.install(policy, loss=loss, backend=loss.backend, temperature=loss.temperature)
        p = cfg.parallel
        parallelize(policy, fsdp=p.fsdp, compile=p.compile, ac=p.ac, device=d.device)
        policy.train()
        ref = None
        if needs_logprobs(cfg)[1]:  # no KL: no reference model in memory
            ref, _ = load_model_and_processor(init_dir, dtype=dtype, device=d.device)
            ref.requires_grad_(False).eval()
            FusedLMHead.install(ref, backend=loss.backend, temperature=loss.temperature)
            parallelize(ref, fsdp=p.fsdp, compile=p.compile, ac=False, device=d.device, trainable=False)
        return policy, ref, processor

    def _build_engine(self, init_dir):
        """The rollout engine the config names; vLLM starts from ``init_dir``'s weights."""
        r, d = self.cfg.rollout, self.d
        if r.engine == "hf":
            from r1reward.engine import HFEngine
            return HFEngine(self.policy, self.processor, unshard_once=r.hf_unshard_once,
                            static_cache=r.hf_static_cache)
        from r1reward.engine_vllm import VLLMEngine
        return VLLMEngine(init_dir, self.processor, dtype=model_dtype(self.cfg, d.device),
                          seed=self.cfg.seed * 1000 + d.rank, device=d.device,
                          max_model_len=r.vllm_max_model_len or None,
                          kv_cache_gb=r.vllm_kv_cache_gb,
                          gpu_memory_utilization=r.vllm_gpu_memory_utilization,
                          sleep_between=r.vllm_sleep)

    def _engine_ready(self):
        """The engine, awake and holding the policy's current weights."""
        self.engine.wake()
        if self.engine_version != self.weights_version:
            self.engine.sync_weights(self.policy)
            self.engine_version = self.weights_version
        return self.engine

    # ---------------------------------------------------------------- state
    def state_dict(self) -> dict:
        """Everything besides model/optimizer (DCP) and RNG (per rank, by Checkpointer)."""
        return {"progress": self.progress.state_dict(), "stream": self.stream.state_dict(),
                "health": self.health.state_dict(), "recovery": self.recovery.state_dict()}

    def load_state_dict(self, sd: dict, *, keep: tuple[str, ...] = ()) -> None:
        parts = {"progress": self.progress, "stream": self.stream, "health": self.health,
                 "recovery": self.recovery}
        for name, part in parts.items():
            if name not in keep:
                part.load_state_dict(sd[name])

    def save_checkpoint(self) -> Path:
        return self.ckpt.save(self.progress.step, self.policy, self.optimizer, self.state_dict())

    def restore(self, path: Path, *, keep: tuple[str, ...] = ()) -> None:
        """Model, optimizer, RNG and every state piece from ``path`` (except ``keep``)."""
        self.load_state_dict(self.ckpt.load(path, self.policy, self.optimizer), keep=keep)
        self.weights_version += 1

    def restore_latest(self, *, keep: tuple[str, ...] = ()) -> Path | None:
        """Restore the newest checkpoint that loads; a corrupt one is named and skipped in
        favour of the one before it. None when there is none."""
        for path in reversed(self.ckpt.complete()):
            try:
                self.restore(path, keep=keep)
                return path
            except CorruptCheckpoint as err:
                log.warning("checkpoint %s rejected: %s; trying the previous one", path, err)
        return None

    def resume(self) -> None:
        path = self.restore_latest()
        if path is None:
            log.info("--resume: no usable checkpoint under %s, starting fresh", self.ckpt.root)
            return
        self.metrics.truncate_after(self.progress.step)
        log.info("resumed from %s at step %d", path, self.progress.step)

    # ---------------------------------------------------------------- the run
    def run(self) -> dict | None:
        cfg = self.cfg
        if cfg.checkpoint.resume:
            self.resume()
        if self.progress.before is None:
            self.progress.before = self.evaluate("before RL")
            if unformed := rollout.at_chance(self.progress.before):
                log.warning("the cold start judges %s questions at chance: RL seldom forms a comparison "
                            "the cold start lacks (python -m r1reward.sft_probe shows which step is "
                            "missing; docs/training_runs.md)", " and ".join(unformed))
        self._open_bar()
        stopped_early = None
        try:
            while self.progress.step < cfg.steps:
                row, decision = self.train_step()
                if self._is_rollback(decision):
                    if self.recovery.rollbacks > cfg.health.max_rollbacks:
                        stopped_early = (f"step {row['step']}: {decision} after "
                                         f"{cfg.health.max_rollbacks} rollbacks; RL stopped early")
                        log.warning(stopped_early)
                        break
                    self.rollback(decision, row["step"])
                    continue
                self.checkpoint()
                if cfg.stop_after and self.progress.step >= cfg.stop_after:
                    # Simulated interruption: leaves the run as a kill would (for resume tests).
                    log.info("stopping after step %d (--stop_after)", self.progress.step)
                    return None
            return self.finish(stopped_early)
        finally:
            if self.bar is not None:
                self.bar.close()
            self.metrics.close()
            self.engine.close()

    def train_step(self) -> tuple[dict, Decision]:
        """One RL step; returns its metrics row and the health decision."""
        step = self.progress.step + 1
        t0 = time.time()
        ro = self.rollout()
        t1 = time.time()
        old_lp, ref_lp = self.logprobs(ro)
        t2 = time.time()
        rewards = self.score(ro)
        adv, filtered = self.advantages(rewards.total, ro.batch.response_mask, old_lp, ref_lp)
        sampler = self.sampler_mismatch(ro, old_lp)
        lr = self.schedule.apply(self.progress.step)
        upd = self.update(ro, old_lp, ref_lp, adv, sampler.is_weights)
        t3 = time.time()
        times = {"rollout": t1 - t0, "logprobs": t2 - t1, "update": t3 - t2}
        row = self.log(step, ro, rewards, old_lp, ref_lp, filtered, upd, lr, times, sampler)
        if not self._is_rollback(upd.decision):
            self.progress.step = step
            for k in PHASES:
                self.progress.phase_seconds[k] += times[k]
        return row, upd.decision

    # ---------------------------------------------------------------- stages
    def rollout(self) -> rollout.Rollout:
        """Sample judgments for this rank's share of the next rollout batch."""
        cfg, d = self.cfg, self.d
        per_rank = cfg.rollout.batch_size // d.world
        pairs, start = self.stream.take(cfg.rollout.batch_size)
        mine = pairs[d.rank * per_rank:(d.rank + 1) * per_rank]
        r = cfg.rollout
        try:
            return rollout.collect(self._engine_ready(), mine, temperature=r.temperature,
                                   top_p=r.top_p, max_new_tokens=r.max_new_tokens,
                                   n_samples=r.n_samples, balance=r.balance_positions,
                                   offset=start + d.rank * per_rank,
                                   forbidden_ids=rollout.vision_placeholder_ids(self.policy))
        finally:
            self.engine.sleep()

    def logprobs(self, ro: rollout.Rollout) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Old (rollout-policy) and reference log-probs, once per rollout, each only when
        something reads it: None when the update is on-policy (one optimizer step on the
        rollout: the loss uses the current log-probs, ratio 1, and the forward is saved)
        and no KL is asked for."""
        mb = self.cfg.algo.micro_batch_size
        need_old, need_ref = needs_logprobs(self.cfg)
        old = sequence_logprobs(self.policy, ro.batch, mb) if need_old else None
        ref = sequence_logprobs(self.ref, ro.batch, mb) if need_ref else None
        return old, ref

    def score(self, ro: rollout.Rollout):
        r = self.cfg.reward
        return compute_rewards(ro.texts, ro.preferred, self.judge, r.w_format, r.w_consistency,
                               images=ro.images)

    def sampler_mismatch(self, ro: rollout.Rollout, old_lp) -> Sampler:
        """How far the engine's log-probs are from the trainer's old ones, and the TIS
        weights when ``--rollout.tis_cap`` is set."""
        if ro.sampler_logp is None or old_lp is None:
            return Sampler({})
        mask = ro.batch.response_mask
        stats = mismatch_stats(old_lp, ro.sampler_logp, mask)
        cap = self.cfg.rollout.tis_cap
        if cap <= 0:
            return Sampler(stats)
        w, frac = tis_weights(old_lp, ro.sampler_logp, mask, cap)
        stats.update(tis_clip_frac=frac,
                     tis_weight_mean=(w * mask).sum().item() / max(mask.sum().item(), 1))
        return Sampler(stats, w)

    def advantages(self, rewards, mask, old_lp, ref_lp) -> tuple[torch.Tensor, torch.Tensor]:
        """Estimator then Advantage Filter; returns (advantages, filtered-token mask)."""
        a = self.cfg.algo
        x = AdvantageInputs(rewards, mask, old_lp, ref_lp, a.kl_coef, a.kl_estimator,
                            self.cfg.rollout.n_samples, self.d.group)
        adv, raw_mean = registry.ADVANTAGE_ESTIMATORS.get(a.estimator)(x)
        return registry.ADVANTAGE_FILTERS.get(a.adv_filter)(adv, mask, a.filter_k, raw_mean)

    def update(self, ro, old_lp, ref_lp, adv, is_weights=None) -> UpdateResult:
        """``ppo_epochs`` passes over the rollout in mini-batches, one optimizer step each;
        every step is checked by the health monitor first (a bad one is not applied)."""
        cfg = self.cfg
        rows = len(ro.batch)
        tb = cfg.algo.train_batch_size or cfg.rollout.batch_size
        rows_per_step = rows * tb // cfg.rollout.batch_size
        mask = ro.batch.response_mask
        n_tok = mask.sum().clamp_min(1).item()
        stats = dict.fromkeys(WEIGHTED_STATS, 0.0)
        stats.update(ratio_max=0.0, ratio_min=math.inf, log_ratio_q05=math.inf,
                     log_ratio_q95=-math.inf)
        losses, norms, decision, n_steps = [], [], None, 0
        self.optimizer.zero_grad(set_to_none=True)
        for _ in range(cfg.algo.ppo_epochs):
            for idx in micro_batches(rows, rows_per_step):
                loss, st = self._backward(ro, idx, old_lp, ref_lp, adv, is_weights)
                for k in WEIGHTED_STATS:
                    stats[k] += st[k] * mask[idx].sum().item() / n_tok / cfg.algo.ppo_epochs
                for k, pick in EXTREME_STATS.items():
                    stats[k] = pick(stats[k], st[k])
                gnorm = grad_norm_and_clip(self.policy, cfg.optim.max_grad_norm)
                loss_all = all_reduce_sum(torch.tensor([loss], dtype=torch.float64)).item()
                decision = (self.health.check(loss_all, gnorm) if cfg.health.enabled
                            else Decision(Action.OK))
                if self._is_ok(decision):
                    self.optimizer.step()
                    self.weights_version += 1
                else:
                    self.recovery.skipped_steps += 1
                    self.recovery.rollbacks += self._is_rollback(decision)
                self.optimizer.zero_grad(set_to_none=True)
                losses.append(loss)
                norms.append(gnorm)
                n_steps += 1
                if not self._is_ok(decision):
                    break
            if not self._is_ok(decision):
                break
        for k in EXTREME_STATS:  # no valid token at all: report 0, not ±inf
            stats[k] = stats[k] if math.isfinite(stats[k]) else 0.0
        return UpdateResult(loss=sum(losses) / max(len(losses), 1), grad_norm=max(norms),
                            decision=decision, optimizer_steps=n_steps, stats=stats)

    def _backward(self, ro, idx: list[int], old_lp, ref_lp, adv, is_weights=None
                  ) -> tuple[float, dict]:
        """Backward of one mini-batch (rows ``idx``), micro-batched; returns its loss and
        token-weighted statistics."""
        mask = ro.batch.response_mask
        # Micro-batch losses are means over their own rows/tokens: weight them so the sum
        # is the mini-batch's aggregate (token-level for token-mean, else sequence-level).
        unit = mask.sum(1) if self.cfg.algo.aggregation == "token-mean" else (mask.sum(1) > 0).float()
        total_units = unit[idx].sum().clamp_min(1.0)
        n_tok = mask[idx].sum().clamp_min(1).item()
        loss_sum = 0.0
        st_sum = dict.fromkeys(WEIGHTED_STATS, 0.0)
        st_sum.update(ratio_max=0.0, ratio_min=math.inf, log_ratio_q05=math.inf,
                      log_ratio_q95=-math.inf)
        for part in micro_batches(len(idx), self.cfg.algo.micro_batch_size):
            rows = [idx[i] for i in part]
            mb = ro.batch.select(rows)
            loss, st = policy_loss(self.policy, mb, _rows(old_lp, rows), adv[rows], _rows(ref_lp, rows),
                                   return_entropy=True, is_weights=_rows(is_weights, rows))
            scaled = loss * (unit[rows].sum() / total_units)
            scaled.backward()
            loss_sum += scaled.item()
            w = mask[rows].sum().item() / n_tok
            for k in WEIGHTED_STATS:
                st_sum[k] += st[k].item() * w
            if mask[rows].sum() > 0:  # an all-padding micro-batch reports no ratios
                for k, pick in EXTREME_STATS.items():
                    st_sum[k] = pick(st_sum[k], st[k].item())
        return loss_sum, st_sum

    def log(self, step, ro, rw, old_lp, ref_lp, filtered, upd: UpdateResult, lr, times,
            sampler: Sampler) -> dict:
        """The step's metrics row (averaged over ranks) → metrics.jsonl, TensorBoard, bar."""
        from r1reward.advantages import kl_per_token
        d = self.d
        m = ro.batch.response_mask.float()
        n_tok = m.sum().item()
        answers = ro.answers
        t_step = sum(times.values())
        row = {
            "reward": rw.total.mean().item(), "reward_format": rw.format.mean().item(),
            "reward_result": rw.result.mean().item(),
            "reward_consistency": rw.consistency.mean().item(),
            "accuracy": rw.result.mean().item(), "format_rate": rw.format.mean().item(),
            "consistency_rate": (rw.consistency > 0).float().mean().item(),
            "inconsistent_rate": (rw.consistency < 0).float().mean().item(),
            "judge_failures": rw.judge_failures, "parse_failures": rw.parse_failures,
            "preclip_frac": upd.stats["preclip_frac"], "clip_frac": upd.stats["clip_frac"],
            "filtered_frac": (filtered.float().sum() / m.sum().clamp_min(1)).item(),
            **{k: upd.stats[k] for k in (*WEIGHTED_STATS, *EXTREME_STATS)
               if k not in ("preclip_frac", "clip_frac")},
            "optimizer_steps": upd.optimizer_steps,
            "response_length": m.sum(1).mean().item(),
            "answer1_rate": sum(a == 1 for a in answers) / max(len(answers), 1),
            "loss": upd.loss, "grad_norm": upd.grad_norm, "lr": lr,
            **{f"time_{k}": v for k, v in times.items()},
            "time_step": t_step, "tokens_per_s": n_tok / max(t_step, 1e-9),
            "rollout_tokens_per_s": n_tok / max(times["rollout"], 1e-9),
            **sampler.stats,
        }
        if old_lp is not None and ref_lp is not None:  # KL(old ‖ ref) when both were computed
            row["kl"] = ((kl_per_token(old_lp, ref_lp, "k1") * m).sum() / m.sum().clamp_min(1)).item()
        row = global_mean(d, row)
        for k in ("judge_failures", "parse_failures"):
            row[k] = int(round(row[k] * d.world))
        row["health"] = str(upd.decision)
        row["skipped_steps"] = self.recovery.skipped_steps
        row["rollbacks"] = self.recovery.rollbacks
        e = self.cfg.eval
        if e.every > 0 and step % e.every == 0 and step < self.cfg.steps:
            # The held-out curve during RL (greedy: draws no random numbers, so a resumed
            # run logs the same values); the last step's value is the "after" evaluation.
            r = self.evaluate(f"at step {step}")
            if r["accuracy"] is not None:
                row["heldout_accuracy"] = r["accuracy"]
                row["heldout_answer1_rate"] = r["answer1_rate"]
                row.update({f"heldout_accuracy/{g}": a for g, a in rollout.by_kind(r).items()})
        row = self.metrics.log(step, row)
        if self.bar is not None:
            self.bar.set_postfix(reward=f"{row['reward']:.2f}", acc=f"{row['accuracy']:.2f}",
                                 fmt=f"{row['format_rate']:.2f}", refresh=False)
            self.bar.update(1)
        if not self._is_ok(upd.decision) and not self._is_rollback(upd.decision):
            log.warning("step %d: %s; update skipped", step, upd.decision)
        return row

    def checkpoint(self) -> None:
        c, step = self.cfg.checkpoint, self.progress.step
        if (c.interval > 0 and step % c.interval == 0) or step == self.cfg.steps:
            self.save_checkpoint()

    def rollback(self, decision, step: int) -> None:
        """Back to the latest checkpoint with a lower learning rate."""
        self.recovery.lr_scale *= self.cfg.health.lr_backoff
        path = self.restore_latest(keep=("recovery",))
        where = f"rolled back to {path}" if path else "no checkpoint to roll back to, weights kept"
        log.warning("step %d: %s; %s, lr x%g", step, decision, where, self.recovery.lr_scale)
        if self.bar is not None:
            self.bar.n = self.progress.step
            self.bar.refresh()

    def evaluate(self, tag: str) -> dict:
        """Greedy held-out accuracy, every pair in both orders."""
        e = self.cfg.eval
        if not e.enabled or not self.held_pairs:
            return {"accuracy": None, "n": 0}
        pairs = self.held_pairs[:e.limit] if e.limit > 0 else self.held_pairs
        t0 = time.time()
        try:
            r = rollout.evaluate(self._engine_ready(), pairs, batch_size=e.batch_size,
                                 max_new_tokens=e.max_new_tokens)
        finally:
            self.engine.sleep()
        r["seconds"] = time.time() - t0
        kinds = "".join(f", {g} {a:.3f}" for g, a in rollout.by_kind(r).items())
        log.info("held-out %s: accuracy %.3f%s; format %.3f answer-1 rate %.3f (n=%d, %.1fs)", tag,
                 r["accuracy"], kinds, r["format_rate"], r["answer1_rate"], r["n"], r["seconds"])
        return r

    def finish(self, stopped_early: str | None) -> dict:
        """Held-out accuracy after RL, HF export, summary.json and curves.png."""
        cfg, d, p = self.cfg, self.d, self.progress
        after = self.evaluate("after RL")
        export_dir = None
        if cfg.checkpoint.export:
            from r1reward.export import export_hf
            export_dir = export_hf(self.policy, self.processor, self.out / "export")
        summary = {
            "heldout_accuracy_before": p.before["accuracy"],
            "heldout_accuracy_after": after["accuracy"],
            "heldout_before": p.before, "heldout_after": after,
            "cold_start_at_chance": rollout.at_chance(p.before),
            "steps": p.step, "wall_seconds": time.time() - self.t_start,
            "phase_seconds": p.phase_seconds, "sft": p.sft, "data": self.data_info,
            "skipped_steps": self.recovery.skipped_steps, "rollbacks": self.recovery.rollbacks,
            "stopped_early": stopped_early, "preset": cfg.preset,
            "world_size": d.world, "export_dir": str(export_dir) if export_dir else None,
            "run_dir": str(self.out), "machine": machine.describe(),
        }
        if d.is_main:
            (self.out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
            plot_training_curves(self.out, p.before["accuracy"], after["accuracy"],
                                 rollout.by_kind(p.before), rollout.by_kind(after))
            log.info("held-out accuracy %s -> %s; %.0fs; run dir %s", summary["heldout_accuracy_before"],
                     summary["heldout_accuracy_after"], summary["wall_seconds"], self.out)
        return summary

    # ---------------------------------------------------------------- helpers
    def _open_bar(self) -> None:
        if self.d.is_main and self.cfg.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=self.cfg.steps, initial=self.progress.step, desc="RL", unit="step",
                            dynamic_ncols=True, file=sys.stderr)

    @staticmethod
    def _is_ok(decision: Decision) -> bool:
        return decision.action is Action.OK

    @staticmethod
    def _is_rollback(decision: Decision) -> bool:
        return decision.action is Action.ROLLBACK
