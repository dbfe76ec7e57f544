"""Benchmark loaders and official metrics on the real VL-RewardBench text records
(tests/fixtures, a copy of the released text records) with generated placeholder images
and scripted verdicts."""
import json
import shutil
from pathlib import Path

import pytest

from r1reward import benchmarks as B

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "vl_reward_bench.jsonl"

# Published VL-RewardBench category sizes (1,250 pairs).
SIZES = {"general": 183, "hallucination": 749, "reasoning": 318}


def _placeholder_images(root: Path, records, skip_ids=()):
    png = root / "_one.png"
    from PIL import Image
    Image.new("RGB", (8, 8), (120, 30, 200)).save(png)
    for r in records:
        if r["id"] in skip_ids:
            continue
        dst = root / r["image"]
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(png, dst)


@pytest.fixture(scope="module")
def records():
    return [json.loads(l) for l in FIXTURE.open()]


def test_categories_of_all_1250_records(records, tmp_path):
    _placeholder_images(tmp_path, records)
    load = B.load_vl_reward_bench(FIXTURE, tmp_path)
    assert len(load.items) == 1250 and load.skipped == []
    counts = {c: sum(it.category == c for it in load.items) for c in SIZES}
    assert counts == SIZES
    keys = [it.key for it in load.items]
    assert len(set(keys)) == 1250  # ids repeat (1,225 distinct) but keys are unique
    assert len({it.id for it in load.items}) == 1225
    assert all(Path(it.image).is_file() for it in load.items)


def _scripted_votes(item, order, k=5):
    """reasoning: always right; hallucination: always answers 1; general: always wrong."""
    t = B.target(order)
    if item.category == "reasoning":
        return [t] * k
    if item.category == "hallucination":
        return [1] * k
    return [3 - t] * k


def test_metrics_on_scripted_verdicts_with_skips(records, tmp_path):
    # Two hallucination and one reasoning record lose their image; one line is broken.
    gone = {"hallucination_pair-1003", "RLHF-V-1310", "mathverse_2714"}
    _placeholder_images(tmp_path, records, skip_ids=gone)
    data = tmp_path / "bench.jsonl"
    lines = FIXTURE.read_text().splitlines()
    data.write_text("\n".join(lines[:10] + ['{"id": "broken", "prompt": 3}', "{not json"]
                              + lines[10:]) + "\n")
    load = B.load_vl_reward_bench(data, tmp_path)
    skipped = dict(load.skipped)
    assert len(load.items) == 1250 - 3
    assert set(skipped) == gone | {"broken", "line 12"}
    assert "image not found" in skipped["RLHF-V-1310"]
    assert "'prompt'" in skipped["broken"] and "JSON" in skipped["line 12"]

    rows = [{"key": it.key, "order": o, "votes": _scripted_votes(it, o)}
            for it in load.items for o in B.ORDERS]
    s = B.summarize("vl_reward_bench", load.items, rows, k_max=5)
    n = {"general": 183, "hallucination": 749 - 2, "reasoning": 318 - 1}
    assert s["per_category"] == {"general": 0.0, "hallucination": 0.5, "reasoning": 1.0}
    assert s["macro_accuracy"] == pytest.approx(0.5)
    total = 2 * sum(n.values())
    assert s["overall_accuracy"] == pytest.approx((2 * n["reasoning"] + n["hallucination"]) / total)
    assert s["accuracy_by_order"]["chosen_first"] == pytest.approx(
        (n["reasoning"] + n["hallucination"]) / sum(n.values()))
    assert s["flip_rate"] == pytest.approx(n["hallucination"] / sum(n.values()))
    # answer "1": half of the reasoning and general rows, all hallucination rows
    assert s["answer1_rate"] == pytest.approx(
        (n["reasoning"] + n["general"] + 2 * n["hallucination"]) / total)
    assert set(s["by_k"]) == {"1", "3", "5"}


def test_voting_at_k_any_at_k_and_none_votes():
    items = [B.BenchItem("a", "a", "general", None, "q", "c", "r")]
    rows = [{"key": "a", "order": "chosen_first", "votes": [1, 2, 1, 2, 2]}]
    by_k = B.summarize("vl_reward_bench", items, rows, 5)["by_k"]
    assert [by_k[k]["overall_accuracy"] for k in ("1", "3", "5")] == [1.0, 1.0, 0.0]
    assert by_k["5"]["any_at_k"] == 1.0
    assert by_k["5"]["debiased_score_accuracy"] is None  # no p1, no second order
    # the calibrated score cancels a position bias that the votes keep
    rows = [{"key": "a", "order": "chosen_first", "votes": [1], "p1": [0.9]},
            {"key": "a", "order": "chosen_second", "votes": [1], "p1": [0.6]}]
    s = B.summarize("vl_reward_bench", items, rows, 1)
    assert s["flip_rate"] == 1.0 and s["debiased_score_accuracy"] == 1.0
    assert B.majority([None, None, 1]) == 1
    assert B.majority([1, 2]) is None and B.majority([None]) is None
    # an unparseable answer is wrong, never right
    rows = [{"key": "a", "order": "chosen_second", "votes": [None]},
            {"key": "a", "order": "chosen_first", "votes": [2]}]
    s = B.summarize("vl_reward_bench", items, rows, 1)
    assert s["accuracy_by_order"]["chosen_second"] == 0.0 and s["no_verdict_rate"] == 0.5
    assert s["flip_rate"] is None  # no verdict in one order: neither a flip nor consistent


def _png(path, size=(8, 8)):
    from PIL import Image
    Image.new("RGB", size, (10, 20, 30)).save(path, format="PNG")


def test_images_the_judge_cannot_take_are_skipped_by_id(tmp_path):
    _png(tmp_path / "ok.png")
    _png(tmp_path / "strip.png", (4000, 10))
    (tmp_path / "junk.png").write_bytes(b"x")
    recs = [{"id": i, "prompt": "p", "chosen": "a", "rejected": "b", "image": f"{i}.png"}
            for i in ("ok", "strip", "junk")]
    path = tmp_path / "vl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    load = B.load_vl_reward_bench(path, tmp_path)
    assert [it.id for it in load.items] == ["ok"]
    why = dict(load.skipped)
    assert "strip.png is 4000x10: aspect ratio" in why["strip"]
    assert "junk.png is not a readable image" in why["junk"]


def test_mm_rlhf_acc_plus_and_categories(tmp_path):
    (tmp_path / "mcq").mkdir()
    _png(tmp_path / "mcq" / "x.png")
    recs = [
        {"id": "q1", "prompt": "p", "chosen": "a", "rejected": "b", "image": "mcq/x.png"},
        {"id": "q1", "prompt": "p", "chosen": "a", "rejected": "c", "image": "mcq/x.png"},
        {"id": "q2", "prompt": "p", "chosen": "a", "rejected": "b", "image": "mcq/x.png"},
        {"id": "v1", "prompt": "p", "chosen": "a", "rejected": "b", "video": ["f1.png"]},
    ]
    path = tmp_path / "mm.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    load = B.load_mm_rlhf_reward_bench(path, tmp_path)
    assert [it.key for it in load.items] == ["q1", "q1#2", "q2"]
    assert {it.category for it in load.items} == {"mcq"}
    assert load.skipped[0][0] == "v1" and "video" in load.skipped[0][1]
    right = {"q1": [1], "q1#2": [2], "q2": [1]}  # q1's second pair is wrong
    rows = [{"key": k, "order": "chosen_first", "votes": v} for k, v in right.items()]
    s = B.summarize("mm_rlhf_reward_bench", load.items, rows, 1)
    assert s["overall_accuracy"] == pytest.approx(2 / 3)
    assert s["acc_plus"] == pytest.approx(1 / 2)


def test_multimodal_rewardbench_loader(tmp_path):
    _png(tmp_path / "i.png")
    base = {"Text": "q", "Image": "i.png", "Output1": "o1", "Output2": "o2"}
    recs = [dict(base, ID="pairs-1", Better="Output2", Category="safety"),
            dict(base, ID="tox-1", Better="Output1", Category="safety"),
            dict(base, ID="math-3", Better="Output1", Category="reasoning"),
            dict(base, ID="code-3", Better="Output1", Category="Reasoning"),
            dict(base, ID="k-1", Better="Output1", Category="knowledge"),
            dict(base, ID="bad", Better="both", Category="vqa")]
    path = tmp_path / "mmrb.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    load = B.load_multimodal_rewardbench(path, tmp_path)
    cats = [it.category for it in load.items]
    assert cats == ["safety/bias", "safety/toxicity", "reasoning/math", "reasoning/coding",
                    "knowledge"]
    assert load.items[0].chosen == "o2" and load.items[0].rejected == "o1"
    assert load.skipped == [("bad", "field 'Better' must be 'Output1' or 'Output2', got 'both'")]
    with pytest.raises(ValueError, match="--bench"):
        B.load_bench("nope", path)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        B.load_bench("vl_reward_bench", tmp_path / "missing.jsonl")


def test_repeated_ids_get_distinct_keys_and_a_bad_byte_costs_one_line(tmp_path):
    from collections import Counter

    from r1reward.benchmarks import _read_jsonl, unique_key
    used = Counter()
    keys = [unique_key(x, used) for x in ("dup", "dup", "dup#2", "dup")]
    assert len(set(keys)) == 4 and keys[0] == "dup"
    f = tmp_path / "b.jsonl"
    f.write_bytes(b'{"id": "a"}\n{"id": "\xff"}\n{"id": "c"}\n')
    out = list(_read_jsonl(f))
    assert [n for n, rec, _ in out if rec] == [1, 3] and "not UTF-8" in out[1][2]


def test_eval_resume_reads_past_a_write_cut_inside_a_character(tmp_path):
    import json as _json

    from r1reward.eval import read_results
    path = tmp_path / "results.jsonl"
    good = {"key": "a", "order": "chosen_first", "votes": [1]}
    path.write_bytes((_json.dumps(good) + "\n").encode() + '{"key": "é'.encode()[:-1])
    assert list(read_results(path, 1)) == [("a", "chosen_first")]
