"""RewardJudge logic (voting, early stopping, order debiasing, scoring, ranking) with a
scripted model, and the calibrated answer-token score on the embedded tiny model.

The scripted judge here (ScriptedJudge) is also used by test_eval_cli.py and
test_serve.py: each response carries its quality as "q=<int>"; the scripted model prefers
the higher quality with a position bias: p1 = sigmoid(q1 - q2) + BIAS (clamped), so the
debiased score must cancel BIAS exactly.
"""
import io
import math
import re
import threading
from collections import Counter

import pytest
from PIL import Image

from r1reward import judge as J
from r1reward.benchmarks import majority
from r1reward.judge import RewardJudge

BIAS = 0.1


def quality(text: str) -> int:
    m = re.search(r"q=(-?\d+)", text)
    return int(m.group(1)) if m else 0


def scripted_p1(r1: str, r2: str) -> float:
    return min(0.99, max(0.01, 1 / (1 + math.exp(quality(r2) - quality(r1))) + BIAS))


class ScriptedJudge(RewardJudge):
    def __init__(self, answers=None, **kw):
        super().__init__(model=None, processor=None, **kw)
        self.answers = answers  # optional answers each request cycles through, across rounds
        self._seen = Counter()
        self.batches = []       # sizes of the generate batches, to check batching
        self._lock = threading.Lock()

    def _generate_texts(self, reqs, n, do_sample, should_stop=None):
        with self._lock:
            self.calls["generate"] += 1
            self.batches.append(len(reqs))
        out = []
        for r in reqs:
            texts = []
            for _ in range(n):
                if self.answers is not None:
                    a = self.answers[self._seen[id(r)] % len(self.answers)]
                    self._seen[id(r)] += 1
                else:
                    a = 1 if scripted_p1(r.response_1, r.response_2) >= 0.5 else 2
                texts.append("<think>compared</think>" + (f"<answer>{a}</answer>" if a else "no answer"))
            out.append(texts)
        return out

    def _answer_p1(self, rows):
        with self._lock:
            self.calls["forward"] += 1
        return [scripted_p1(r.response_1, r.response_2) for r, _ in rows]



def _png_bytes():
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), (0, 200, 0)).save(buf, format="PNG")
    return buf.getvalue()


def test_debiased_score_cancels_position_bias():
    j = ScriptedJudge().judge(_png_bytes(), "q", "good q=2", "bad q=0", k=1, swap=True)
    unbiased = scripted_p1("good q=2", "bad q=0") - BIAS
    assert j.order_scores["original"] == pytest.approx(unbiased + BIAS)
    assert j.order_scores["swapped"] == pytest.approx(unbiased - BIAS)
    assert j.score == pytest.approx(unbiased)
    assert j.verdict == 1 and j.votes == [1, 1] and j.samples == 2
    # without swapping the bias stays in the score
    assert ScriptedJudge().judge(None, "q", "q=2", "q=0", swap=False).score == pytest.approx(unbiased + BIAS)


def test_voting_weighted_any_and_ties():
    # the judge's verdict is the benchmarks' Voting@K (one implementation)
    assert J.majority is majority
    assert majority([1, 2, 2, None]) == 2
    assert majority([1, 2, None]) is None and majority([2, 1, 1], k=2) is None
    # two weak "1" votes lose to one confident "2"
    assert J.weighted_vote([1, 1, 2], [0.4, 0.4, 0.05]) == 2
    assert J.any_at_k([2, 2, 1], 1) and not J.any_at_k([2, None], 1)
    # a tied vote falls back to the calibrated score
    j = ScriptedJudge(answers=[1, 2]).judge(None, "q", "q=0", "q=3", k=2, swap=False)
    assert j.vote_verdict is None and j.verdict == 2


def test_early_stopping_stops_when_majority_is_decided():
    assert J.samples_to_decide([], 5) == 3
    assert J.samples_to_decide([1, 1, 1], 5) == 0
    assert J.samples_to_decide([1, 1, 2], 5) == 1
    assert J.samples_to_decide([1, 2, 1, 2], 5) == 1
    assert J.samples_to_decide([None] * 5, 5) == 0
    unanimous = ScriptedJudge().judge(None, "q", "q=1", "q=0", k=5, swap=True)
    assert unanimous.samples == 6 and unanimous.votes == [1] * 6  # 3 per order, not 5
    full = ScriptedJudge().judge(None, "q", "q=1", "q=0", k=5, swap=True, early_stop=False)
    assert full.samples == 10
    split = ScriptedJudge(answers=[1, 2, 1, 2, 2]).sample([J.PairRequest(None, "q", "a", "b")], 5,
                                                         early_stop=True)[0]
    assert len(split.votes) == 5  # 1,2,1 then 1 more (2) then 1 more: never decided early
    with pytest.raises(ValueError, match="k must be"):
        ScriptedJudge().sample([], 0)


def test_unparseable_answers_are_votes_of_none():
    j = ScriptedJudge(answers=[None]).judge(None, "q", "q=1", "q=0", k=1, swap=True)
    assert j.votes == [None, None] and j.vote_verdict is None and j.verdict == 1


def test_score_uses_reference_or_baseline():
    sj = ScriptedJudge(baseline="q=0")
    better, worse = sj.score(None, "q", "q=2", reference="q=1"), sj.score(None, "q", "q=0", "q=1")
    assert better > 0.5 > worse
    assert sj.score(None, "q", "q=1") == pytest.approx(scripted_p1("q=1", "q=0") - BIAS)


def test_rank_round_robin_and_swiss():
    sj = ScriptedJudge()
    cands = [f"cand q={q}" for q in (3, 0, 5, 1)]
    r = sj.rank(None, "q", cands)
    assert r.method == "round_robin" and r.comparisons == 6 and r.order == [2, 0, 3, 1]
    assert r.model_calls == 2  # one batched generate + one scoring forward
    qs = [7, 2, 11, 0, 5, 9, 1, 3, 10, 4, 8, 6, 12, 13, 14, 15, 16, 17, 18, 19]
    big = sj.rank(None, "q", [f"q={q}" for q in qs])
    assert big.method == "swiss" and big.comparisons < 20 * 19 // 2
    top = sorted(range(len(qs)), key=lambda i: -qs[i])
    assert big.order[0] == top[0]
    assert set(big.order[:5]) & set(top[:5]) and sorted(big.order) == list(range(20))
    with pytest.raises(ValueError, match="at least 2"):
        sj.rank(None, "q", ["only"])


def test_bradley_terry_recovers_order():
    games = [(0, 1, 0.9), (1, 2, 0.8), (0, 2, 0.95)]
    s = J.bradley_terry(3, games)
    assert s[0] > s[1] > s[2]


def test_images_from_path_pil_bytes(tmp_path):
    p = tmp_path / "i.png"
    Image.new("RGBA", (5, 4)).save(p)
    for src in (p, str(p), Image.open(p), p.read_bytes()):
        im = J.to_image(src)
        assert im.mode == "RGB" and im.size == (5, 4)
    with pytest.raises(ValueError, match="not a readable image"):
        J.to_image(b"junk")
    with pytest.raises(TypeError, match="image must be"):
        J.to_image(3)


def test_answer_prefix_forces_an_answer_slot():
    assert J.RewardJudge.answer_prefix("<think>a</think><answer>2</answer>") == "<think>a</think><answer>"
    assert J.RewardJudge.answer_prefix("<think>a</think> trailing") == "<think>a</think><answer>"
    assert J.RewardJudge.answer_prefix("<think>cut off ") == "<think>cut off</think><answer>"


# ----------------------------------------------------------------------------- tiny model

@pytest.fixture(scope="module")
def tiny_judge(tiny_dir):
    return RewardJudge.from_pretrained(tiny_dir, max_new_tokens=8, max_batch=4)


def test_calibrated_p1_equals_a_direct_forward(tiny_judge):
    """The spliced, left-padded batch forward gives the same P("1") as one unpadded
    forward over the chat prompt + analysis up to <answer> for each row alone."""
    import torch

    from r1reward.generation import prompt_texts
    j, proc = tiny_judge, tiny_judge.processor
    red, blue = Image.new("RGB", (112, 112), (220, 30, 30)), Image.new("RGB", (64, 96), (30, 60, 220))
    rows = [(J.PairRequest(red, "What colour is the circle?", "Red.", "Blue."),
             "<think>The circle is red, so response 1 is right.</think><answer>1</answer>"),
            (J.PairRequest(blue, "Colour?", "It is green, surely, without any doubt.", "Blue."),
             "<think>cut short"),
            (J.PairRequest(red, "Shape?", "A circle.", "A square."), "")]
    got = j._answer_p1(rows)
    i1, i2 = j.answer_token_ids()
    for (req, text), p in zip(rows, got):
        prompt = prompt_texts(proc, j._pairs([req]))[0] + J.RewardJudge.answer_prefix(text)
        inputs = proc(text=[prompt], images=[req.image], return_tensors="pt")
        with torch.no_grad():
            z = j.model(**inputs).logits[0, -1].float()
        want = torch.softmax(torch.stack([z[i1], z[i2]]), 0)[0].item()
        assert p == pytest.approx(want, abs=1e-4)


def test_judge_and_rank_on_tiny_model(tiny_judge):
    j = tiny_judge
    img = _png_bytes()
    r = j.judge(img, "What colour is it?", "Green.", "Red.", k=3, swap=True, early_stop=False)
    assert r.samples == 6 and len(r.votes) == 6 and r.verdict in (1, 2)
    assert 0.0 <= r.score <= 1.0
    assert r.score == pytest.approx((r.order_scores["original"] + r.order_scores["swapped"]) / 2)
    # swapping the responses mirrors the debiased score (greedy, so deterministic)
    a = j.judge(img, "What colour is it?", "Green.", "Red.", k=1)
    b = j.judge(img, "What colour is it?", "Red.", "Green.", k=1)
    assert a.score == pytest.approx(1 - b.score, abs=1e-5)
    calls = j.calls["generate"] + j.calls["forward"]
    rk = j.rank(img, "What colour is it?", ["Green.", "Red.", "Blue."])
    assert sorted(rk.order) == [0, 1, 2] and rk.comparisons == 3
    # 3 pairs x 2 orders = 6 prompts in batches of 4: 2 generate + 2 scoring calls
    assert rk.model_calls == j.calls["generate"] + j.calls["forward"] - calls == 4


def test_mixed_image_and_text_only_batch_on_tiny_model(tiny_judge):
    """A batch with and without images is split into separate model calls and each
    result equals judging that pair alone."""
    j = tiny_judge
    reqs = [J.PairRequest(_png_bytes(), "Colour?", "Green.", "Red."),
            J.PairRequest(None, "Capital of France?", "Paris.", "Rome.")]
    both = j.judge_batch(reqs, k=1)
    for req, got in zip(reqs, both):
        alone = j.judge(req.image, req.question, req.response_1, req.response_2, k=1)
        assert got.votes == alone.votes and got.score == pytest.approx(alone.score, abs=1e-4)
