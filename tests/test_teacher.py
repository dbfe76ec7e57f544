"""The miniature data pipeline: a teacher with per-kind skill, k attempts per pair,
first-try correct traces for the cold start, the rest for RL, and inconsistent traces."""
from r1reward.data import PreferencePair, templated_analysis
from r1reward.rewards import JudgeSample, RuleJudge, parse_answer
from r1reward.teacher import Teacher, distill, misperceived_analysis


def pair(i, kind="color", preferred=1):
    meta = {"kind": kind, "shape": "circle", "color": "red", "truth": "red" if kind == "color" else "circle",
            "wrong": "blue" if kind == "color" else "square"}
    return PreferencePair(f"p{i}", "img.png", "q", "a", "b", preferred, meta)


def test_seeing_the_truth_is_the_templated_analysis_and_a_misperception_argues_wrong():
    p = pair(0, preferred=2)
    text, argued = misperceived_analysis(p, "red")
    assert argued == 2 and text + "<answer>2</answer>" == templated_analysis(p)
    text, argued = misperceived_analysis(p, "blue")
    assert argued == 1 and "The image shows a BLUE circle" in text


def test_skill_by_kind_and_slips_make_inconsistent_answers():
    t = Teacher(skill={"color": 1.0, "shape": 0.0}, slip=0.0, seed=1)
    assert all(t.attempt(pair(i)).answer == 1 for i in range(50))  # careful: always right
    shape = [t.attempt(pair(i, "shape")).answer for i in range(400)]
    assert 0.4 < sum(a == 1 for a in shape) / 400 < 0.6  # careless: a coin flip
    slipper = Teacher(skill={"color": 1.0}, slip=1.0, seed=1)
    a = slipper.attempt(pair(0))
    assert not a.consistent and a.answer == 2 and parse_answer(a.text) == 2
    # the consistency judge sees the contradiction the reward is meant to punish
    assert RuleJudge().judge([JudgeSample(a.text, a.answer)]) == [-1]


def test_distill_splits_first_try_traces_from_hard_pairs():
    pairs = [pair(i, "color" if i % 2 else "shape") for i in range(400)]
    out = distill(pairs, k=3, slip=0.2, seed=0, skill={"color": 0.95, "shape": 0.3})
    assert len(out.sft) + len(out.rl) == 400 and out.stats["sft_traces"] == len(out.sft)
    assert all(parse_answer(text) == shown.preferred for shown, text in out.sft)  # correct only
    by_kind = out.stats["first_try_rate_by_kind"]
    assert by_kind["color"] > by_kind["shape"] + 0.08  # expected 0.79 vs 0.59
    rl_ids = {p.id for p in out.rl}
    assert sum(int(i[1:]) % 2 == 0 for i in rl_ids) > len(rl_ids) / 2  # mostly shape pairs
    assert 0 < out.stats["sft_inconsistent_rate"] < 0.3  # right answers argued the other way
    again = distill(pairs, k=3, slip=0.2, seed=0, skill={"color": 0.95, "shape": 0.3})
    assert again.stats == out.stats  # a pure function of the seed
