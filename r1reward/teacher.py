"""The paper's data pipeline in miniature (SPEC §4): a teacher distils the cold start and
decides which pairs are hard enough for RL.

In the embedded world the "stronger model" is a programmatic teacher whose skill differs
by question kind: on a careful attempt it reads the image and writes the templated
analysis; otherwise it misperceives the asked fact half the time and argues for whichever
response its (mis)perception favours. Now and then it slips and writes the other answer
than the one its analysis argues for — the inconsistency the consistency reward exists
for. Each training pair gets up to ``k`` attempts: pairs solved on the first attempt give
the cold-start traces (only correct answers are kept, as the paper keeps only correct
analyses); pairs that needed more attempts, or were never solved, are the RL set.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

from r1reward.data import ASPECT, PreferencePair, _fact_phrase, _value_phrase, judged_claim

# Probability of a careful attempt per question kind (the teacher reads colours well and
# shapes and counts poorly).
DEFAULT_SKILL = {"color": 0.9, "shape": 0.45, "count": 0.45, "position": 0.6}


def misperceived_analysis(pair: PreferencePair, seen: str) -> tuple[str, int]:
    """An analysis that takes ``seen`` (the truth or the wrong value) for the image's fact
    and concludes for the response that says it; returns (text without the answer tag,
    the response it argues for). With ``seen`` the truth it is the templated analysis."""
    m = pair.meta
    kind, shape, color = m["kind"], m["shape"], m["color"]
    vals = {pair.preferred: m["truth"], 3 - pair.preferred: m["wrong"]}
    pick = 1 if vals[1] == seen else 2
    return (f"<think>The question asks about the {ASPECT[kind]}. "
            f"The image shows {_fact_phrase(kind, shape, color, seen)}. "
            f"{judged_claim(1, _value_phrase(kind, shape, vals[1]), pick == 1)}. "
            f"{judged_claim(2, _value_phrase(kind, shape, vals[2]), pick == 2)}. "
            f"Response {pick} is faithful to the image, so Response {pick} is better.</think>"), pick


@dataclass
class Attempt:
    text: str
    argued: int  # the response the analysis argues for
    answer: int  # the response in <answer>

    @property
    def consistent(self) -> bool:
        return self.argued == self.answer


class Teacher:
    def __init__(self, skill: dict[str, float] | None = None, slip: float = 0.15, seed: int = 0):
        if not 0.0 <= slip <= 1.0:
            raise ValueError(f"teacher slip must be in [0, 1], got {slip!r}")
        self.skill = dict(DEFAULT_SKILL if skill is None else skill)
        self.slip = slip
        self.rng = random.Random(f"teacher-{seed}")

    def attempt(self, pair: PreferencePair) -> Attempt:
        kind = pair.meta.get("kind")
        if kind not in ASPECT:
            raise ValueError(f"teacher: pair {pair.id!r} has no generated-data meta (kind)")
        if self.rng.random() < self.skill.get(kind, 0.5):
            seen = pair.meta["truth"]
        else:
            seen = self.rng.choice((pair.meta["truth"], pair.meta["wrong"]))
        body, argued = misperceived_analysis(pair, seen)
        answer = 3 - argued if self.rng.random() < self.slip else argued
        return Attempt(f"{body}<answer>{answer}</answer>", argued, answer)


@dataclass
class Distilled:
    sft: list[tuple[PreferencePair, str]]  # first-try correct traces (as presented)
    rl: list[PreferencePair]  # needed several attempts or never solved
    stats: dict


def distill(pairs: list[PreferencePair], k: int = 4, *, slip: float = 0.15, seed: int = 0,
            skill: dict[str, float] | None = None) -> Distilled:
    """Up to ``k`` teacher attempts per pair (every other pair shown swapped)."""
    if k < 1:
        raise ValueError(f"teacher attempts k must be >= 1, got {k}")
    teacher = Teacher(skill, slip, seed)
    sft, rl, tries, inconsistent = [], [], [], 0
    for i, pair in enumerate(pairs):
        shown = pair.swapped() if i % 2 else pair
        n, a = 0, None
        while n < k:
            n += 1
            a = teacher.attempt(shown)
            if a.answer == shown.preferred:
                break
        else:
            n = k + 1  # never solved
        tries.append(n)
        if n == 1:
            sft.append((shown, a.text))
            inconsistent += not a.consistent
        else:
            rl.append(pair)
    by_kind: dict[str, list[int]] = {}
    for p, n in zip(pairs, tries):
        by_kind.setdefault(p.meta.get("kind"), []).append(n)
    stats = {"pairs": len(pairs), "sft_traces": len(sft), "rl_pairs": len(rl),
             "unsolved": sum(n > k for n in tries),
             "sft_inconsistent_rate": inconsistent / max(len(sft), 1),
             "first_try_rate_by_kind": {kd: sum(n == 1 for n in ns) / len(ns)
                                        for kd, ns in sorted(by_kind.items())}}
    return Distilled(sft, rl, stats)
