"""Rollouts (sampled judgments for RL) and greedy held-out evaluation.

Position balance: every other pair of a batch is presented swapped (responses exchanged,
``preferred`` flipped), so a policy that always answers "1" earns half the result reward
and no more; the rate of answering "1" is logged.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1reward.data import PreferencePair
from r1reward.engine import RolloutEngine
from r1reward.logprobs import SeqBatch, build_seq_batch
from r1reward.rewards import format_reward, parse_answer


@dataclass
class Rollout:
    pairs: list[PreferencePair]  # as presented (after balancing), one per prompt
    batch: SeqBatch  # B·n rows, sample-major within a prompt
    texts: list[str]
    preferred: torch.Tensor  # [B·n] gold index per row
    images: list[str]
    n_samples: int
    sampler_logp: torch.Tensor | None = None  # [B·n, R] the engine's own log-probs, if reported

    @property
    def answers(self) -> list[int | None]:
        return [parse_answer(t) for t in self.texts]


def vision_placeholder_ids(model) -> tuple[int, ...]:
    cfg = model.config
    ids = (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None))
    return tuple(i for i in ids if i is not None)


def present(pairs: list[PreferencePair], balance: bool, offset: int = 0) -> list[PreferencePair]:
    """Swap every other pair (by global position ``offset + i``) when balancing."""
    if not balance:
        return list(pairs)
    return [p.swapped() if (offset + i) % 2 else p for i, p in enumerate(pairs)]


@torch.no_grad()
def collect(engine: RolloutEngine, pairs: list[PreferencePair], *, temperature: float, top_p: float,
            max_new_tokens: int, forbidden_ids: tuple[int, ...], n_samples: int = 1,
            balance: bool = True, offset: int = 0) -> Rollout:
    """Sample ``n_samples`` judgments per pair; ``forbidden_ids``: the model's vision
    placeholder tokens (:func:`vision_placeholder_ids`, see build_seq_batch)."""
    shown = present(pairs, balance, offset)
    gen = engine.generate(shown, do_sample=True, temperature=temperature, top_p=top_p,
                          max_new_tokens=max_new_tokens, num_samples=n_samples)
    batch = build_seq_batch(gen.prompt_inputs, gen.sequences, gen.prompt_len, gen.response_mask,
                            forbidden_ids=forbidden_ids)
    pref = torch.tensor([p.preferred for p in shown for _ in range(n_samples)])
    images = [p.image for p in shown for _ in range(n_samples)]
    sampler_logp = None if gen.sampler_logp is None else gen.sampler_logp * batch.response_mask
    return Rollout(shown, batch, list(gen.texts), pref, images, n_samples, sampler_logp)


def eval_groups(pair: PreferencePair) -> tuple[str, ...]:
    """The groups a held-out pair counts in beyond the whole set: its question kind and
    (kind, shape) for generated pairs, none for release data."""
    kind, shape = pair.meta.get("kind"), pair.meta.get("shape")
    return (kind, f"{kind}/{shape}") if kind and shape else ()


def by_kind(result: dict) -> dict[str, float]:
    """``evaluate``'s accuracy per question kind (its ``by_group`` without kind/shape);
    empty when the result has none (evaluation off, release data)."""
    return {g: a for g, a in result.get("by_group", {}).items() if "/" not in g}


# How close to 0.5 a question kind's held-out accuracy counts as chance.
CHANCE_MARGIN = 0.06


def at_chance(result: dict, margin: float = CHANCE_MARGIN) -> list[str]:
    """Question kinds that ``evaluate``'s ``result`` judges at chance: within ``margin`` of
    0.5. Shown in both orders, a judge that ignores the image scores exactly 0.5."""
    return [g for g, a in by_kind(result).items() if abs(a - 0.5) <= margin]


@torch.no_grad()
def evaluate(engine: RolloutEngine, pairs: list[PreferencePair], *, batch_size: int,
             max_new_tokens: int, both_orders: bool = True) -> dict:
    """Greedy held-out accuracy, each pair shown in both orders (position bias cancels);
    ``by_group`` is the accuracy per question kind and per (kind, shape) of generated
    pairs: each comparison forms separately in the cold start, so the total can hide
    which one did.

    Under torchrun each rank takes a strided share; counts are all-reduced, so every rank
    returns the global figures.
    """
    shown = list(pairs) + ([p.swapped() for p in pairs] if both_orders else [])
    groups = sorted({g for p in shown for g in eval_groups(p)})
    slot = {g: i for i, g in enumerate(groups)}
    world = dist.get_world_size() if dist.is_initialized() else 1
    rank = dist.get_rank() if dist.is_initialized() else 0
    mine = shown[rank::world]
    counts = torch.zeros(4, dtype=torch.float64)  # correct, formatted, answered "1", total
    per_group = torch.zeros(len(groups), 2, dtype=torch.float64)  # correct, total
    n_batches = -(-len(shown) // (batch_size * world))  # every rank runs as many batches
    for b in range(n_batches):
        chunk = mine[b * batch_size:(b + 1) * batch_size] or mine[:1] or shown[:1]
        real = len(mine[b * batch_size:(b + 1) * batch_size])
        gen = engine.generate(chunk, do_sample=False, max_new_tokens=max_new_tokens, num_samples=1)
        for p, t in list(zip(chunk, gen.texts))[:real]:
            a = parse_answer(t)
            counts += torch.tensor([float(a == p.preferred), format_reward(t), float(a == 1), 1.0],
                                   dtype=torch.float64)
            for g in eval_groups(p):
                per_group[slot[g]] += torch.tensor([float(a == p.preferred), 1.0], dtype=torch.float64)
    if world > 1:
        dist.all_reduce(counts)
        dist.all_reduce(per_group)
    n = max(counts[3].item(), 1.0)
    return {"accuracy": counts[0].item() / n, "format_rate": counts[1].item() / n,
            "answer1_rate": counts[2].item() / n, "n": int(counts[3].item()),
            "by_group": {g: per_group[i, 0].item() / per_group[i, 1].item() for g, i in slot.items()}}
