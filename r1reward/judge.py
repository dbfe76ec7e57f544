"""RewardJudge: a trained generative reward model as a library.

A judgment samples K analyses per presentation order (``<think>…</think><answer>N``),
votes on them, and reads a calibrated preference score from the answer token: one
forward over prompt + generated text up to and including ``<answer>`` gives the
next-token logits of "1" and "2"; p1 = softmax over those two. Averaging p1 of the
original order with 1 - p1 of the swapped order cancels the position bias. That score
is the scalar a downstream RL trainer needs (``score``), and ``rank`` orders N
candidates from pairwise scores.

Only ``_generate_texts`` and ``_answer_p1`` touch the model; everything else (voting,
early stopping, order debiasing, ranking) is plain logic over their outputs, so tests
can script them.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass, field

from .benchmarks import majority
from .images import open_image
from .rewards import parse_answer

# A deliberately uninformative answer: score(response) without a reference is the
# probability that the response beats "no answer at all".
DEFAULT_BASELINE = "I cannot answer this question."


@dataclass
class PairRequest:
    image: object  # PIL image (after to_image) or None for a text-only pair
    question: str
    response_1: str
    response_2: str

    def swapped(self) -> PairRequest:
        return PairRequest(self.image, self.question, self.response_2, self.response_1)


@dataclass
class OrderSamples:
    """Samples for one presentation order, numbered as presented."""
    texts: list[str] = field(default_factory=list)
    votes: list = field(default_factory=list)      # 1, 2 or None (unparseable)
    p1: list[float] = field(default_factory=list)  # calibrated P("1") per sample


class JudgeCancelled(Exception):
    """``should_stop()`` said yes: nobody is waiting for this batch any more."""


class _StopWhen:
    """HF stopping criterion: end generation for the whole batch once ``should_stop()``."""

    def __init__(self, should_stop):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs):
        import torch
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool,
                          device=input_ids.device)


@dataclass
class Judgment:
    verdict: int                 # 1 | 2 in the caller's numbering
    score: float                 # P(response_1 better), averaged over orders when swap
    votes: list                  # all votes in the caller's numbering (order A, then swapped)
    analyses: list[str]
    vote_verdict: int | None     # Voting@K (majority) over all votes; None on a tie
    weighted_verdict: int | None  # confidence-weighted vote
    order_scores: dict           # {"original": p1, "swapped": 1 - p1'}
    samples: int                 # analyses generated (fewer than 2K after early stopping)

    def to_dict(self) -> dict:
        return dict(self.__dict__)


# ----------------------------------------------------------------------------- voting
# Voting@K itself is r1reward.benchmarks.majority (the benchmarks' metric and the verdict
# of a judgment are the same vote).

def weighted_vote(votes, p1s) -> int | None:
    """Each vote counts with the probability the model gave the answer it wrote."""
    w = {1: 0.0, 2: 0.0}
    for v, p in zip(votes, p1s):
        if v in (1, 2):
            w[v] += p if v == 1 else 1.0 - p
    return None if w[1] == w[2] else (1 if w[1] > w[2] else 2)


def any_at_k(votes, target: int) -> bool:
    return any(v == target for v in votes)


def samples_to_decide(votes, k: int) -> int:
    """How many more samples (of k in all) may still change the majority: 0 when the
    leader's lead exceeds what is left; otherwise the fewest that could settle it if
    they all agreed with the leader."""
    c = Counter(v for v in votes if v in (1, 2))
    left, lead = k - len(votes), abs(c[1] - c[2])
    if lead > left or left == 0:
        return 0
    return min(left, (left - lead) // 2 + 1)


# ----------------------------------------------------------------------------- ranking

def bradley_terry(n: int, games, iters: int = 200, prior: float = 0.1) -> list[float]:
    """Bradley-Terry strengths (log scale) from soft games ``(i, j, p_i_beats_j)`` by
    Hunter's MM updates; ``prior`` pseudo-games against a virtual average player keep
    undefeated or winless candidates finite."""
    wins = [prior] * n
    pairs = Counter()
    for i, j, p in games:
        wins[i] += p
        wins[j] += 1.0 - p
        pairs[(min(i, j), max(i, j))] += 1
    s = [1.0] * n
    for _ in range(iters):
        new = []
        for i in range(n):
            den = 2 * prior / (s[i] + 1.0)
            for (a, b), m in pairs.items():
                if i in (a, b):
                    den += m / (s[a] + s[b])
            new.append(wins[i] / den)
        g = math.exp(sum(math.log(x) for x in new) / n)  # fix the scale (geometric mean 1)
        s = [x / g for x in new]
    return [math.log(x) for x in s]


@dataclass
class Ranking:
    order: list[int]           # candidate indices, best first
    strengths: list[float]     # Bradley-Terry log-strength per candidate
    method: str                # "round_robin" | "swiss"
    comparisons: int           # pairwise judgments (each: both orders, K samples)
    model_calls: int           # batched generate + scoring forward passes


# ----------------------------------------------------------------------------- images

def to_image(image):
    """Paths, PIL images and encoded bytes all become an RGB PIL image (None stays);
    see :func:`r1reward.images.open_image`."""
    return None if image is None else open_image(image)


# ----------------------------------------------------------------------------- the judge

def add_engine_args(ap) -> None:
    """The ``--engine`` flags of ``r1reward.eval`` and ``r1reward.serve``."""
    ap.add_argument("--engine", choices=("hf", "vllm"), default="hf",
                    help="what generates the analyses: HF generate or vLLM (the vllm extra); "
                         "with vllm a cancelled request stops at the end of its batch")
    ap.add_argument("--vllm-kv-cache-gb", type=float, default=1.0, help="vLLM's KV cache on CPU")


def engine_kwargs(args) -> dict:
    """:meth:`RewardJudge.from_pretrained` arguments from :func:`add_engine_args`' flags."""
    return {"engine": args.engine, "engine_options": {"kv_cache_gb": args.vllm_kv_cache_gb}}


def model_label(args) -> str:
    """The model a run names: ``--model``, or the embedded tiny model (its vLLM variant)."""
    if args.model:
        return str(args.model)
    return "embedded tiny model" + (" (vLLM variant)" if args.engine == "vllm" else "")


class RewardJudge:
    def __init__(self, model, processor, *, max_new_tokens: int = 256, temperature: float = 1.0,
                 top_p: float = 1.0, max_batch: int = 8, baseline: str = DEFAULT_BASELINE,
                 rank_round_robin_max: int = 8, engine=None):
        self.model, self.processor = model, processor
        # a rollout engine (r1reward.engine) generating the analyses; None = HF generate on
        # the model, which also scores the answers in both cases
        self.engine = engine
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.max_batch, self.baseline = max_batch, baseline
        self.rank_round_robin_max = rank_round_robin_max
        self.calls = Counter()  # generate / forward batches and sequences, for reports
        self._answer_ids = None

    @classmethod
    def from_pretrained(cls, path=None, *, device: str = "cpu", dtype=None, engine: str = "hf",
                        engine_options: dict | None = None, **kw) -> RewardJudge:
        """A trained export or, with ``path=None``, the embedded tiny model (for ``engine
        "vllm"`` its variant with a head size vLLM's CPU attention supports)."""
        from .model import load_model_and_processor
        if engine not in ("hf", "vllm"):
            raise ValueError(f"engine {engine!r}: choose from hf|vllm")
        if engine == "vllm" and path is None:
            from .tiny import VLLM_HEADS, default_model_dir
            path = default_model_dir(VLLM_HEADS)
        model, processor = load_model_and_processor(path, dtype=dtype, device=device)
        model.eval()
        if engine == "vllm":
            from .engine_vllm import VLLMEngine
            kw["engine"] = VLLMEngine(path, processor, dtype=next(model.parameters()).dtype,
                                      device=device, **(engine_options or {}))
        return cls(model, processor, **kw)

    # ---- the two model-touching primitives -------------------------------------------
    def _pairs(self, reqs):
        from .data import PreferencePair
        # preferred is unknown at inference; 1 is a placeholder the generator ignores
        return [PreferencePair(id=str(i), image=r.image, question=r.question,
                               response_1=r.response_1, response_2=r.response_2, preferred=1)
                for i, r in enumerate(reqs)]

    def _chunks(self, items, has_image):
        """Batches of at most max_batch, never mixing pairs with and without an image
        (the processor takes images for all prompts of a batch or for none)."""
        for flag in (True, False):
            idx = [i for i, it in enumerate(items) if has_image(it) == flag]
            for s in range(0, len(idx), self.max_batch):
                yield idx[s:s + self.max_batch]

    def _generate_texts(self, reqs, n: int, do_sample: bool, should_stop=None) -> list[list[str]]:
        """n analyses per request (greedy when not do_sample); ``should_stop`` is polled
        while generating and ends the call with :class:`JudgeCancelled`."""
        import torch
        from transformers import StoppingCriteriaList

        from .generation import generate
        extra = {"stopping_criteria": StoppingCriteriaList([_StopWhen(should_stop)])} \
            if should_stop is not None else None
        out = [None] * len(reqs)
        for idx in self._chunks(reqs, lambda r: r.image is not None):
            chunk = [reqs[i] for i in idx]
            sampling = dict(do_sample=do_sample, temperature=self.temperature, top_p=self.top_p,
                            max_new_tokens=self.max_new_tokens, num_samples=n)
            if self.engine is not None:  # should_stop is polled between batches only
                gen = self.engine.generate(self._pairs(chunk), **sampling)
            else:
                with torch.no_grad():
                    gen = generate(self.model, self.processor, self._pairs(chunk),
                                   generate_kwargs=extra, **sampling)
            if should_stop is not None and should_stop():
                raise JudgeCancelled("every client of this batch has left")
            self.calls["generate"] += 1
            self.calls["sequences"] += len(gen.texts)
            # HF generate returns the n samples of a prompt next to each other
            for j, i in enumerate(idx):
                out[i] = gen.texts[j * n:(j + 1) * n]
        return out

    def answer_token_ids(self) -> tuple[int, int]:
        if self._answer_ids is None:
            tok = getattr(self.processor, "tokenizer", self.processor)
            ids = [tok.encode(d, add_special_tokens=False) for d in ("1", "2")]
            if any(len(i) != 1 for i in ids):
                raise ValueError(f"the tokenizer splits the answers '1'/'2' into {ids}: "
                                 "the calibrated score needs one token each")
            self._answer_ids = (ids[0][0], ids[1][0])
        return self._answer_ids

    @staticmethod
    def answer_prefix(text: str) -> str:
        """Generated text up to and including ``<answer>``; an analysis that never wrote
        it is closed and forced into the answer slot so every sample gets a score."""
        at = text.find("<answer>")
        if at >= 0:
            return text[:at + len("<answer>")]
        end = text.find("</think>")
        if end >= 0:
            return text[:end + len("</think>")] + "<answer>"
        return text.rstrip() + "</think><answer>"

    def _answer_p1(self, rows) -> list[float]:
        """rows: (request, generated text). One forward per chunk over prompt + answer
        prefix; P("1") from the two answer logits at the last position."""
        import torch

        from .generation import build_prompt_inputs
        tok = getattr(self.processor, "tokenizer", self.processor)
        i1, i2 = self.answer_token_ids()
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        device = next(self.model.parameters()).device
        out = [None] * len(rows)
        for idx in self._chunks(rows, lambda row: row[0].image is not None):
            chunk = [rows[i] for i in idx]
            inputs = build_prompt_inputs(self.processor, self._pairs([r for r, _ in chunk]), device)
            ids, mask = inputs["input_ids"], inputs["attention_mask"]
            per_token = [k for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                         and torch.is_tensor(v) and v.shape[:2] == ids.shape]
            conts = [tok.encode(self.answer_prefix(t), add_special_tokens=False) for _, t in chunk]
            seqs = [ids[b][mask[b].bool()].tolist() + c for b, c in enumerate(conts)]
            width = max(map(len, seqs))
            new = {"input_ids": torch.tensor([[pad] * (width - len(q)) + q for q in seqs]),
                   "attention_mask": torch.tensor([[0] * (width - len(q)) + [1] * len(q) for q in seqs])}
            for k in per_token:  # e.g. token-type ids: prompt values, zeros for the text
                rows_k = [inputs[k][b][mask[b].bool()].tolist() + [0] * len(c) for b, c in enumerate(conts)]
                new[k] = torch.tensor([[0] * (width - len(r)) + r for r in rows_k])
            kw = {k: v for k, v in inputs.items() if k not in new and k not in per_token}
            kw.update({k: v.to(device) for k, v in new.items()})
            with torch.no_grad():
                logits = self.model(**kw, logits_to_keep=1).logits[:, -1, :].float()
            self.calls["forward"] += 1
            two = torch.stack([logits[:, i1], logits[:, i2]], dim=-1).softmax(-1)
            for i, p in zip(idx, two[:, 0].tolist()):
                out[i] = p
        return out

    # ---- sampling, voting, debiasing --------------------------------------------------
    def sample(self, reqs, k: int = 1, early_stop: bool = False, should_stop=None
               ) -> list[OrderSamples]:
        """K analyses per request (greedy for K = 1, sampled otherwise) with votes and
        calibrated p1. With early_stop, sampling happens in rounds and stops once the
        remaining samples cannot change the majority."""
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k must be a positive integer, got {k!r}")
        res = [OrderSamples() for _ in reqs]
        todo = list(range(len(reqs)))
        while todo:
            need = {i: (samples_to_decide(res[i].votes, k) if early_stop else k - len(res[i].votes))
                    for i in todo}
            todo = [i for i in todo if need[i] > 0]
            for n in sorted({need[i] for i in todo}):  # one batched call per round size
                idx = [i for i in todo if need[i] == n]
                stop = {"should_stop": should_stop} if should_stop is not None else {}
                texts = self._generate_texts([reqs[i] for i in idx], n, do_sample=k > 1, **stop)
                if should_stop is not None and should_stop():
                    raise JudgeCancelled("every client of this batch has left")
                flat = [(i, t) for i, ts in zip(idx, texts) for t in ts]
                p1 = self._answer_p1([(reqs[i], t) for i, t in flat])
                for (i, t), p in zip(flat, p1):
                    res[i].texts.append(t)
                    v = parse_answer(t)
                    res[i].votes.append(v if v in (1, 2) else None)
                    res[i].p1.append(p)
        return res

    def judge_batch(self, reqs, k: int = 1, swap: bool = True, early_stop: bool = True,
                    should_stop=None) -> list[Judgment]:
        """Judgments of ``reqs``; ``should_stop`` (polled during generation) cancels the
        whole batch with :class:`JudgeCancelled` when nobody waits for it any more."""
        reqs = [r if isinstance(r, PairRequest) else PairRequest(*r) for r in reqs]
        reqs = [PairRequest(to_image(r.image), r.question, r.response_1, r.response_2) for r in reqs]
        views = reqs + ([r.swapped() for r in reqs] if swap else [])
        samples = self.sample(views, k, early_stop=early_stop, should_stop=should_stop)
        out = []
        for i in range(len(reqs)):
            a = samples[i]
            votes, p1s, texts = list(a.votes), list(a.p1), list(a.texts)
            scores = {"original": sum(a.p1) / len(a.p1)}
            if swap:  # map the swapped presentation back to the caller's numbering
                b = samples[len(reqs) + i]
                votes += [None if v is None else 3 - v for v in b.votes]
                p1s += [1.0 - p for p in b.p1]
                texts += b.texts
                scores["swapped"] = 1.0 - sum(b.p1) / len(b.p1)
            score = sum(scores.values()) / len(scores)
            mv = majority(votes)
            out.append(Judgment(verdict=mv if mv is not None else (1 if score >= 0.5 else 2),
                                score=score, votes=votes, analyses=texts, vote_verdict=mv,
                                weighted_verdict=weighted_vote(votes, p1s), order_scores=scores,
                                samples=len(texts)))
        return out

    def judge(self, image, question, response_1, response_2, k: int = 1, swap: bool = True,
              early_stop: bool = True) -> Judgment:
        return self.judge_batch([PairRequest(image, question, response_1, response_2)], k=k,
                                swap=swap, early_stop=early_stop)[0]

    def score_batch(self, items, k: int = 1) -> list[float]:
        """items: (image, question, response, reference or None) -> P(response beats the
        reference, or the baseline answer), position-debiased."""
        reqs = [PairRequest(im, q, r, ref if ref else self.baseline) for im, q, r, ref in items]
        return [j.score for j in self.judge_batch(reqs, k=k, swap=True)]

    def score(self, image, question, response, reference=None, k: int = 1) -> float:
        return self.score_batch([(image, question, response, reference)], k=k)[0]

    def rank(self, image, question, responses, k: int = 1, method: str = "auto") -> Ranking:
        """Order N candidates: every pair (round robin) for N <= rank_round_robin_max,
        else a Swiss tournament of ceil(log2 N) + 1 rounds pairing neighbours in the
        current standing; both fit Bradley-Terry strengths to the debiased scores."""
        n = len(responses)
        if n < 2:
            raise ValueError(f"rank needs at least 2 responses, got {n}")
        if method == "auto":
            method = "round_robin" if n <= self.rank_round_robin_max else "swiss"
        if method not in ("round_robin", "swiss"):
            raise ValueError(f"method must be 'auto', 'round_robin' or 'swiss', got {method!r}")
        image = to_image(image)
        before = self.calls["generate"] + self.calls["forward"]
        games, played = [], set()

        def play(pairs):
            js = self.judge_batch([PairRequest(image, question, responses[i], responses[j])
                                   for i, j in pairs], k=k, swap=True)
            games.extend((i, j, jd.score) for (i, j), jd in zip(pairs, js))
            played.update(frozenset(p) for p in pairs)

        if method == "round_robin":
            play([(i, j) for i in range(n) for j in range(i + 1, n)])
        else:
            half = (n + 1) // 2
            play([(i, i + half) for i in range(n - half)])
            for _ in range(math.ceil(math.log2(n))):
                strength = bradley_terry(n, games)
                standing = sorted(range(n), key=lambda c: -strength[c])
                pairs, free = [], list(standing)
                while len(free) > 1:  # the best unpaired candidate meets the next unplayed one
                    a = free.pop(0)
                    b = next((c for c in free if frozenset((a, c)) not in played), None)
                    if b is not None:
                        free.remove(b)
                        pairs.append((a, b))
                if not pairs:
                    break
                play(pairs)
        strength = bradley_terry(n, games)
        order = sorted(range(n), key=lambda c: -strength[c])
        return Ranking(order=order, strengths=strength, method=method, comparisons=len(games),
                       model_calls=self.calls["generate"] + self.calls["forward"] - before)
