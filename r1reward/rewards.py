"""Rule-based rewards for generated judgments (SPEC §2) and the consistency judges.

A rollout is free text ``<think>analysis</think><answer>N</answer>``. Its reward is

    total = w_format * format + result * (1 + w_consistency * consistency)

with format, result in {0, 1} and consistency in {-1, 0, +1}. Release defaults are
w_format = w_consistency = 0.5; the paper writes w_format = 1.

Safety rule used everywhere here: anything that cannot be parsed or checked earns
nothing. The release grants 1.0 when answer checking raises; we give 0 and count it
(``RewardBatch.parse_failures``); a judge that errors, times out or answers gibberish
gives consistency 0 and is counted (``RewardBatch.judge_failures``).
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import logging
import mimetypes
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch

log = logging.getLogger(__name__)

# Tokens a decoder may leave at the end of a response (Qwen, Llama-3, SentencePiece).
END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "</s>")
_FORMAT_RE = re.compile(r"^<think>.*?</think><answer>.*?</answer>$", re.DOTALL)
_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_INT_RE = re.compile(r"[+-]?[0-9]+")


def strip_end_of_turn(text: str) -> str:
    """Remove surrounding whitespace and any run of trailing end-of-turn tokens."""
    prev = None
    t = text
    while t != prev:
        prev = t
        t = t.strip()
        for tok in END_OF_TURN_TOKENS:
            if t.endswith(tok):
                t = t[: -len(tok)]
    return t


def format_reward(text: str) -> float:
    """1.0 iff the response is exactly ``<think>…</think><answer>…</answer>`` (SPEC §2).

    Each of the four tags must occur exactly once: the lazy regex alone would accept a
    stray ``</think>`` inside the analysis, which is not the format we train for.
    """
    t = strip_end_of_turn(text)
    if not _FORMAT_RE.match(t):
        return 0.0
    if any(t.count(tag) != 1 for tag in ("<think>", "</think>", "<answer>", "</answer>")):
        return 0.0
    return 1.0


def parse_answer(text: str) -> int | None:
    """The integer inside the last ``<answer>…</answer>``, or None.

    The block must contain exactly one integer ("2", " 2 ", "Response 2"); a hedge such
    as the prompt's own template "1/2", an empty block, an unclosed (truncated) block or
    no block at all give None, which earns no result reward.
    """
    blocks = _ANSWER_RE.findall(text)
    if not blocks:
        return None
    ints = _INT_RE.findall(blocks[-1])
    if len(ints) != 1:
        return None
    return int(ints[0])


def _check_preferred(preferred, where: str) -> int:
    if isinstance(preferred, torch.Tensor):
        preferred = preferred.item()
    if isinstance(preferred, bool) or not isinstance(preferred, int) or preferred not in (1, 2):
        raise ValueError(f"{where}: preferred must be 1 or 2, got {preferred!r}")
    return preferred


def result_reward(text: str, preferred: int) -> float:
    """1.0 iff the parsed answer equals ``preferred`` (1 or 2)."""
    preferred = _check_preferred(preferred, "result_reward")
    return 1.0 if parse_answer(text) == preferred else 0.0


# ---------------------------------------------------------------------------------------
# What a consistency judge sees.

@dataclass(frozen=True)
class JudgeSample:
    """One rollout to check: the full response text, its parsed answer, optional image path."""

    response: str
    answer: int | None
    image: str | None = None


def analysis_text(response: str) -> str:
    """The analysis: inside ``<think>…</think>``, else everything before ``<answer>``."""
    t = strip_end_of_turn(response)
    m = re.search(r"<think>(.*?)(?:</think>|$)", t, re.DOTALL)
    body = m.group(1) if m else t
    return body.split("<answer>")[0].strip()


_SENTENCE_SPLIT = re.compile(r"(?<=[.!?])\s+|\n+")


def analysis_tail(response: str, n_sentences: int = 3, max_chars: int = 1500) -> str:
    """The last ``n_sentences`` sentences of the analysis (what the judge reads)."""
    parts = [s.strip() for s in _SENTENCE_SPLIT.split(analysis_text(response)) if s.strip()]
    return " ".join(parts[-n_sentences:])[-max_chars:]


class Judge(Protocol):
    def judge(self, samples: Sequence[JudgeSample]) -> list[int | None]:
        """+1 analysis supports the answer, -1 it argues for the other, 0 undecidable,
        None the judge failed (counted; worth 0)."""


# ---------------------------------------------------------------------------------------
# RuleJudge: offline heuristic over the last sentences.

# "Option A"/"option 2" usually name a question's choices, not the responses: not a ref.
_REF = (r"\b(?:response|output|candidate|assistant)\s*#?\s*(1|2|one|two|a|b)\b"
        r"|\banswer\s*#?\s*(1|2)\b")
_ORDINAL = r"\bthe\s+(first|second)\s+(?:response|answer|output|option|one)\b"
_GOOD = (r"better|superior|preferable|preferred|stronger|best|correctly|correct|accurately|"
         r"accurate|outperforms?|excels?|surpass(?:es)?|wins?|the winner")
_QUAL = (r"accurate|correct|helpful|detailed|comprehensive|precise|relevant|complete|"
         r"appropriate|informative|faithful|thorough|reliable|coherent|clear|factual")
_BAD = (r"worse|inferior|weaker|incorrectly|incorrect|inaccurately|inaccurate|wrong|wrongly|"
        r"flawed|falls short|fails|hallucinates")
# Alternatives are tried left to right at each position, so "less accurate" is found as
# negative before "accurate" could match as positive; "more accurate" is positive.
_CLAIM = re.compile(rf"\b(?P<neg>less\s+(?:{_QUAL})|{_BAD})\b|\b(?P<pos>more\s+(?:{_QUAL})|{_GOOD})\b")
_NEGATION = re.compile(r"\b(?:not|never|no|neither|nor)\b|n't\b")
_CHOOSE = re.compile(r"\b(?:prefer|choose|chose|select|pick|favou?r|recommend|go with)\w*\s+"
                     r"(?:\w+\s+){0,2}?R([12])\b")
_BEST_IS = re.compile(rf"\b(?:{_GOOD}|more\s+(?:{_QUAL}))\s+(?:\w+\s+){{0,2}}?"
                      r"(?:is|would be|:)\s+R([12])\b")
_FINAL_IS = re.compile(r"\b(?:answer|choice|verdict|decision)\s+(?:is|would be|should be|:)\s*R?([12])\b")
# In "X, but Y" the clause after the contrast word carries the conclusion.
_CONTRAST = re.compile(r"\b(?:but|however|nevertheless|nonetheless)\b")


def _normalize_refs(sentence: str) -> str:
    """Lower-case and rewrite every way of naming a response as ``R1``/``R2``."""
    s = sentence.lower()
    words = {"1": "1", "one": "1", "a": "1", "first": "1", "2": "2", "two": "2", "b": "2",
             "second": "2"}
    s = re.sub(_REF, lambda m: f"R{words[m.group(1) or m.group(2)]}", s)
    return re.sub(_ORDINAL, lambda m: f"R{words[m.group(1)]}", s)


def _clause_votes(s: str) -> set[int]:
    votes: set[int] = set()
    for m in _CHOOSE.finditer(s):
        if not _NEGATION.search(s[max(0, m.start() - 12):m.start()]):
            votes.add(int(m.group(1)))
    for rx in (_BEST_IS, _FINAL_IS):
        votes.update(int(m.group(1)) for m in rx.finditer(s))
    refs = list(re.finditer(r"\bR([12])\b", s))
    for i, ref in enumerate(refs):
        # A claim about R<k> lies between its mention and the next mention.
        end = refs[i + 1].start() if i + 1 < len(refs) else len(s)
        window = s[ref.end():end][:80]
        claim = _CLAIM.search(window)
        if claim:
            good = claim.group("pos") is not None
            if _NEGATION.search(window[: claim.start()]):
                good = not good  # "R1 is not as accurate as", "R2 isn't worse"
            k = int(ref.group(1))
            votes.add(k if good else 3 - k)
    return votes


def sentence_vote(sentence: str) -> int:
    """Which response (1 or 2) one sentence argues for; 0 if none or contradictory."""
    s = _normalize_refs(sentence)
    for clause in reversed(_CONTRAST.split(s)):
        votes = _clause_votes(clause)
        if len(votes) == 1:
            return votes.pop()
        if votes:
            return 0  # the same clause argues both ways
    # "R2, however, is better": the split cut the claim from its subject; read it whole
    votes = _clause_votes(_CONTRAST.sub(" ", s))
    return votes.pop() if len(votes) == 1 else 0


class RuleJudge:
    """Offline consistency judge: reads the analysis' last sentences, from the end
    backwards, and takes the first sentence that clearly argues for one response."""

    def __init__(self, tail_sentences: int = 3):
        if tail_sentences < 1:
            raise ValueError(f"tail_sentences must be >= 1, got {tail_sentences}")
        self.tail_sentences = tail_sentences

    def verdict(self, sample: JudgeSample) -> int:
        if sample.answer not in (1, 2):
            return 0
        parts = [p for p in _SENTENCE_SPLIT.split(analysis_text(sample.response)) if p.strip()]
        for sentence in reversed(parts[-self.tail_sentences:]):
            side = sentence_vote(sentence)
            if side:
                return 1 if side == sample.answer else -1
        return 0

    def judge(self, samples: Sequence[JudgeSample]) -> list[int | None]:
        return [self.verdict(s) for s in samples]


# ---------------------------------------------------------------------------------------
# Model judges (HTTP endpoint or local model) share the prompt and the verdict parser.

CONSISTENCY_PROMPT = (
    "A judge compared two candidate responses (Response 1 and Response 2) to a question "
    "and wrote an analysis before choosing one. Below are the last sentences of that "
    "analysis and the response it finally chose.\n\n"
    "End of the analysis:\n{tail}\n\n"
    "Final choice: Response {answer}\n\n"
    "Does the analysis support choosing Response {answer}, rather than arguing for the "
    "other response? Reply with one word: yes or no.")


def consistency_prompt(sample: JudgeSample, tail_sentences: int = 3) -> str:
    return CONSISTENCY_PROMPT.format(tail=analysis_tail(sample.response, tail_sentences) or "(empty)",
                                     answer=sample.answer)


_YES = {"yes", "consistent", "supports", "true", "y"}
_NO = {"no", "inconsistent", "contradicts", "false", "n"}


def parse_verdict(reply: str | None) -> int | None:
    """``yes`` → +1, ``no`` → -1, anything else → None (not a usable verdict)."""
    if not reply:
        return None
    t = reply.split("</think>")[-1].strip().lower()  # reasoning judges may think first
    words = re.findall(r"[a-z]+", t)
    if not words:
        return None
    if words[0] in _YES | _NO:
        if len(words) >= 3 and words[1] in ("and", "or") and words[2] in _YES | _NO:
            return None  # "yes and no", "no or yes": a hedge, not a verdict
        return 1 if words[0] in _YES else -1
    has_yes = bool(re.search(r"\byes\b", t))
    has_no = bool(re.search(r"\bno\b", t))
    if has_yes != has_no:
        return 1 if has_yes else -1
    return None


def _image_data_url(path: str) -> str | None:
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        log.warning("judge: cannot read image %s (%s); sending text only", path, e)
        return None
    mime = mimetypes.guess_type(path)[0] or "image/png"
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def _run_sync(coro):
    """Run a coroutine from sync code, also when the caller already runs an event loop."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()


class OpenAIJudge:
    """Consistency judge behind an OpenAI-compatible ``/v1/chat/completions`` endpoint
    (vLLM, SGLang, TGI, OpenAI…), queried concurrently with httpx.

    ``base_url`` may be ``http://host:port``, ``…/v1`` or the full ``…/chat/completions``
    URL. Each sample gets at most ``max_retries`` tries (timeouts, connection errors,
    429/5xx and unparsable replies are retried; other 4xx are not), then None.
    ``api_key`` defaults to the ``OPENAI_API_KEY`` environment variable, if set.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, timeout: float = 60.0,
                 max_retries: int = 3, concurrency: int = 32, *, max_tokens: int = 16,
                 temperature: float = 0.0, backoff: float = 0.5, tail_sentences: int = 3,
                 send_image: bool = True):
        if max_retries < 1:
            raise ValueError(f"max_retries must be >= 1 (it counts tries), got {max_retries}")
        if concurrency < 1:
            raise ValueError(f"concurrency must be >= 1, got {concurrency}")
        self.url = self._endpoint(base_url)
        self.model, self.timeout, self.max_retries = model, timeout, max_retries
        self.concurrency, self.max_tokens, self.temperature = concurrency, max_tokens, temperature
        self.backoff, self.tail_sentences, self.send_image = backoff, tail_sentences, send_image
        self.api_key = api_key if api_key is not None else os.environ.get("OPENAI_API_KEY")

    @staticmethod
    def _endpoint(base_url: str) -> str:
        u = base_url.rstrip("/")
        if not u.startswith(("http://", "https://")):
            raise ValueError(f"OpenAIJudge base_url must start with http:// or https://, got {base_url!r}")
        if u.endswith("/chat/completions"):
            return u
        return u + ("/chat/completions" if u.endswith("/v1") else "/v1/chat/completions")

    def request_body(self, sample: JudgeSample) -> dict:
        content: list[dict] = []
        if self.send_image and sample.image:
            url = _image_data_url(sample.image)
            if url:
                content.append({"type": "image_url", "image_url": {"url": url}})
        content.append({"type": "text", "text": consistency_prompt(sample, self.tail_sentences)})
        return {"model": self.model, "messages": [{"role": "user", "content": content}],
                "max_tokens": self.max_tokens, "temperature": self.temperature}

    def judge(self, samples: Sequence[JudgeSample]) -> list[int | None]:
        return _run_sync(self.ajudge(samples))

    async def ajudge(self, samples: Sequence[JudgeSample]) -> list[int | None]:
        import httpx  # imported here so rule-only users do not need it at import time

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        sem = asyncio.Semaphore(self.concurrency)
        async with httpx.AsyncClient(timeout=self.timeout, headers=headers) as client:
            return list(await asyncio.gather(*(self._one(client, sem, s) for s in samples)))

    async def _one(self, client, sem, sample: JudgeSample) -> int | None:
        import httpx

        if sample.answer not in (1, 2):
            return 0  # nothing to be consistent with; not a judge failure
        body = self.request_body(sample)
        for attempt in range(self.max_retries):
            if attempt:
                await asyncio.sleep(self.backoff * 2 ** (attempt - 1))
            try:
                async with sem:
                    resp = await client.post(self.url, json=body)
            except httpx.HTTPError as e:  # timeouts, refused connections, protocol errors
                log.debug("judge try %d: %s", attempt + 1, e)
                continue
            if resp.status_code >= 400:
                if resp.status_code in (408, 429) or resp.status_code >= 500:
                    continue
                log.warning("judge endpoint %s answered %d: %s", self.url, resp.status_code,
                            resp.text[:200])
                return None  # bad request / auth / unknown model: retrying cannot help
            try:
                reply = resp.json()["choices"][0]["message"]["content"]
            except (ValueError, KeyError, IndexError, TypeError):
                continue
            verdict = parse_verdict(reply if isinstance(reply, str) else None)
            if verdict is not None:
                return verdict
        return None


class _HFGreedy:
    """``generate_texts`` for a Hugging Face model + processor/tokenizer (text prompts)."""

    def __init__(self, model, processor, max_new_tokens: int = 8):
        self.model, self.processor, self.max_new_tokens = model, processor, max_new_tokens

    @torch.no_grad()
    def generate_texts(self, prompts: Sequence[str]) -> list[str]:
        tok = getattr(self.processor, "tokenizer", self.processor)
        chats = [self.processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "text", "text": p}]}],
            tokenize=False, add_generation_prompt=True) for p in prompts]
        side, tok.padding_side = tok.padding_side, "left"  # generation appends on the right
        try:
            inputs = tok(chats, return_tensors="pt", padding=True).to(self.model.device)
        finally:
            tok.padding_side = side  # the processor may be shared with other code
        out = self.model.generate(**inputs, do_sample=False, max_new_tokens=self.max_new_tokens,
                                  pad_token_id=tok.pad_token_id)
        return tok.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


class LocalJudge:
    """Consistency judge run by a local model with greedy decoding.

    ``model`` is either any object with ``generate_texts(prompts) -> list[str]`` or a
    Hugging Face generative model, then ``processor`` (processor or tokenizer with a chat
    template) is required. Text only: like the release's judge it does not see the image.
    """

    def __init__(self, model, processor=None, *, max_new_tokens: int = 8, batch_size: int = 16,
                 tail_sentences: int = 3):
        if hasattr(model, "generate_texts"):
            self.generator = model
        elif processor is None:
            raise ValueError("LocalJudge: a Hugging Face model needs its processor/tokenizer "
                             "(or pass an object with generate_texts(prompts))")
        else:
            self.generator = _HFGreedy(model, processor, max_new_tokens)
        self.batch_size, self.tail_sentences = batch_size, tail_sentences

    def judge(self, samples: Sequence[JudgeSample]) -> list[int | None]:
        out: list[int | None] = [0] * len(samples)
        todo = [i for i, s in enumerate(samples) if s.answer in (1, 2)]
        for start in range(0, len(todo), self.batch_size):
            idx = todo[start:start + self.batch_size]
            prompts = [consistency_prompt(samples[i], self.tail_sentences) for i in idx]
            try:
                replies = self.generator.generate_texts(prompts)
                if len(replies) != len(prompts):
                    raise ValueError(f"generate_texts returned {len(replies)} texts "
                                     f"for {len(prompts)} prompts")
            except Exception as e:  # a broken judge must not stop training; it earns nothing
                log.warning("local judge failed on %d samples: %s", len(idx), e)
                replies = [None] * len(idx)
            for i, r in zip(idx, replies):
                out[i] = parse_verdict(r)
        return out


# ---------------------------------------------------------------------------------------
# The batch reward.

@dataclass
class RewardBatch:
    """Per-rollout rewards ([B] float32 tensors) and failure counts for logging."""

    total: torch.Tensor
    format: torch.Tensor
    result: torch.Tensor
    consistency: torch.Tensor
    answers: list[int | None]
    judge_failures: int
    parse_failures: int
    judged: int

    def metrics(self) -> dict[str, float]:
        judged = max(self.judged, 1)
        return {"reward/total": self.total.mean().item(), "reward/format": self.format.mean().item(),
                "reward/accuracy": self.result.mean().item(),
                "reward/consistency": self.consistency.sum().item() / judged,
                "reward/judge_failures": float(self.judge_failures),
                "reward/parse_failures": float(self.parse_failures)}


def compute_rewards(texts: Sequence[str], preferred, judge: Judge | None = None,
                    w_format: float = 0.5, w_consistency: float = 0.5, *,
                    images: Sequence[str | None] | None = None, judge_all: bool = False) -> RewardBatch:
    """Rewards for decoded responses ``texts`` against ``preferred`` (1|2 per text).

    The judge is asked only about rollouts whose answer is right (``result == 1``): the
    consistency term is multiplied by ``result``, so other calls would be wasted
    (``judge_all=True`` asks for all, e.g. to log consistency). ``judge=None`` means no
    consistency term (0). ``images`` are optional paths passed on to the judge.
    """
    if isinstance(preferred, torch.Tensor):
        preferred = preferred.tolist()
    preferred = list(preferred)
    n = len(texts)
    if len(preferred) != n:
        raise ValueError(f"compute_rewards: {n} texts but {len(preferred)} preferred labels")
    if images is not None and len(images) != n:
        raise ValueError(f"compute_rewards: {n} texts but {len(images)} images")
    prefs = [_check_preferred(p, f"compute_rewards (preferred[{i}])") for i, p in enumerate(preferred)]
    answers = [parse_answer(t) for t in texts]
    fmt = [format_reward(t) for t in texts]
    res = [1.0 if a == p else 0.0 for a, p in zip(answers, prefs)]

    cons = [0.0] * n
    failures = 0
    ask = [i for i in range(n) if answers[i] is not None and (judge_all or res[i] == 1.0)]
    if judge is not None and ask:
        samples = [JudgeSample(texts[i], answers[i], None if images is None else images[i]) for i in ask]
        try:
            verdicts = list(judge.judge(samples))
            if len(verdicts) != len(samples):
                raise ValueError(f"judge returned {len(verdicts)} verdicts for {len(samples)} samples")
        except Exception as e:  # never let the judge crash a training step, never reward it
            log.warning("consistency judge failed on the whole batch: %s", e)
            verdicts = [None] * len(samples)
        for i, v in zip(ask, verdicts):
            if v in (-1, 0, 1) and not isinstance(v, bool):
                cons[i] = float(v)
            else:
                failures += 1
    f, r, c = (torch.tensor(x, dtype=torch.float32) for x in (fmt, res, cons))
    total = w_format * f + r * (1.0 + w_consistency * c)
    return RewardBatch(total=total, format=f, result=r, consistency=c, answers=answers,
                       judge_failures=failures, parse_failures=sum(a is None for a in answers),
                       judged=len(ask) if judge is not None else 0)


__all__ = ["END_OF_TURN_TOKENS", "strip_end_of_turn", "format_reward", "parse_answer",
           "result_reward", "JudgeSample", "analysis_text", "analysis_tail", "sentence_vote",
           "RuleJudge", "OpenAIJudge", "LocalJudge", "CONSISTENCY_PROMPT", "consistency_prompt",
           "parse_verdict", "RewardBatch", "compute_rewards"]
