"""Generated shapes data: determinism, balance, learnable facts; release-format loader errors."""
import hashlib
import json

import pytest

from r1reward.data import generate_dataset, load_pairs, templated_analysis
from r1reward.rewards import format_reward, parse_answer


def _digest(folder):
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(p.name.encode() + p.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_and_balanced(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate_dataset(a, 12, 6, seed=3)
    generate_dataset(b, 12, 6, seed=3)
    assert _digest(a) == _digest(b)
    generate_dataset(tmp_path / "c", 12, 6, seed=4)
    assert _digest(tmp_path / "c") != _digest(a)
    res = load_pairs(a / "train.jsonl", strict=True)
    assert len(res.pairs) == 12 and not res.skipped
    assert sum(p.preferred == 1 for p in res.pairs) == 6
    for p in res.pairs:
        good = p.response_1 if p.preferred == 1 else p.response_2
        assert p.meta["truth"] in good and p.response_1 != p.response_2
        s = p.swapped()
        assert (s.response_1, s.response_2, s.preferred) == (p.response_2, p.response_1, 3 - p.preferred)


def test_templated_analysis_has_the_format_and_gold_answer(tmp_path):
    train, _ = generate_dataset(tmp_path, 6, 0)
    for p in load_pairs(train).pairs:
        text = templated_analysis(p)
        assert format_reward(text) == 1.0
        assert parse_answer(text) == p.preferred


def _write(tmp_path, lines):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines) + "\n")
    return f


def test_loader_reports_each_bad_line_by_field(tmp_path):
    train, _ = generate_dataset(tmp_path / "d", 2, 0)
    good = json.loads(train.read_text().splitlines()[0])
    good["message"] = good["message"].replace("images/", str(tmp_path / "d" / "images") + "/")
    no_answer = dict(good)
    no_answer.pop("answer")
    bad_answer = dict(good, answer=["<answer>3</answer>"])
    missing_img = dict(good, message=good["message"].replace("train_000000.png", "nope.png"))
    (tmp_path / "broken.png").write_bytes(b"not a png")
    broken_img = dict(good, message=good["message"].replace(
        str(tmp_path / "d" / "images" / "train_000000.png"), str(tmp_path / "broken.png")))
    lines = [json.dumps(good), "{not json", json.dumps(no_answer), json.dumps(bad_answer),
             json.dumps(dict(good, message="[")), json.dumps(missing_img), json.dumps(broken_img)]
    res = load_pairs(_write(tmp_path, lines))
    assert len(res.pairs) == 1
    reasons = dict(res.skipped)
    assert "not valid JSON" in reasons[2]
    assert "'answer'" in reasons[3] and "'answer'" in reasons[4]
    assert "'message'" in reasons[5]
    assert "not found" in reasons[6] and "broken.png is not a readable image" in reasons[7]
    with pytest.raises(ValueError, match=r"bad.jsonl:2"):
        load_pairs(tmp_path / "bad.jsonl", strict=True)
    with pytest.raises(FileNotFoundError, match="nothere"):
        load_pairs(tmp_path / "nothere.jsonl")


def test_a_bad_byte_or_a_repeated_id_costs_only_its_line(tmp_path):
    import json as _json

    from r1reward.data import generate_dataset, load_pairs
    train, _ = generate_dataset(tmp_path / "d", 4, 1, seed=0)
    lines = train.read_bytes().splitlines()
    recs = [_json.loads(x) for x in lines]
    recs[2]["id"] = recs[1]["id"]
    body = [lines[0], b'{"id": "x\xff"}', *(_json.dumps(r).encode() for r in recs[1:])]
    bad = tmp_path / "d" / "mixed.jsonl"
    bad.write_bytes(b"\n".join(body) + b"\n")
    out = load_pairs(bad)
    assert len(out.pairs) == 3
    reasons = dict(out.skipped)
    assert "not UTF-8" in reasons[2] and "mixed.jsonl:2:" in reasons[2]
    assert "already used on line 3" in reasons[4]


def test_image_variants_draw_the_same_facts_afresh_once(tmp_path):
    import dataclasses

    from PIL import Image

    from r1reward.data import COLORS, KINDS, image_variants
    train, _ = generate_dataset(tmp_path, 8, 0, seed=2, kinds=KINDS)
    for pair in load_pairs(train, strict=True).pairs:
        views = image_variants(pair, 3)
        assert views[0] is pair and len(views) == 3
        assert [v.meta for v in views[1:]] == [pair.meta] * 2 and {v.id for v in views} == {pair.id}
        images = [Image.open(v.image).convert("RGB") for v in views]
        assert len({im.tobytes() for im in images}) == 3  # drawn at other sizes and places
        for im in images:  # each shows the pair's colour on the white background
            assert {c for _, c in im.getcolors(1 << 16)} <= {(255, 255, 255), COLORS[pair.meta["color"]]}
        # written once: a second call reuses the files, and a fresh draw has the same bytes
        again = image_variants(pair, 3)
        assert [v.image for v in again] == [v.image for v in views]
        first = open(views[1].image, "rb").read()
        (tmp_path / "variants" / f"{tmp_path.joinpath(pair.image).stem}_v1.png").unlink()
        assert open(image_variants(pair, 2)[1].image, "rb").read() == first
    assert image_variants(pair, 1) == [pair]
    assert image_variants(dataclasses.replace(pair, meta={}), 3) == [dataclasses.replace(pair, meta={})]
