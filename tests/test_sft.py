"""Cold-start SFT: it learns the format targets, its result is cached, bad SFT files are
reported by line and field."""
import dataclasses
import json
import time

import pytest

from r1reward.config import SFTConfig
from r1reward.sft import cold_start, load_sft_file, templated_examples


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    from r1reward.data import generate_dataset, load_pairs
    train, _ = generate_dataset(tmp_path_factory.mktemp("sftdata"), 8, 0, seed=1)
    return load_pairs(train, strict=True).pairs, train


def test_examples_are_balanced_and_formatted(pairs):
    ex = templated_examples(pairs[0], 6, seed=0)
    assert len(ex) == 6
    for p, target in ex:
        assert target.startswith("<think>") and target.endswith(f"<answer>{p.preferred}</answer>")
    assert {p.preferred for p, _ in ex} == {1, 2}


def test_both_orders_shows_each_pair_with_the_better_response_in_each_place(pairs):
    from r1reward.data import templated_analysis
    one = templated_examples(pairs[0], 6, seed=0)
    both = templated_examples(pairs[0], 6, seed=0, both_orders=True)
    assert both[:6] == one and len(both) == 12
    for (p, _), (q, target) in zip(one, both[6:]):
        assert q.id == p.id and q.image == p.image and q.preferred == 3 - p.preferred
        assert (q.response_1, q.response_2) == (p.response_2, p.response_1)
        assert target == templated_analysis(q)
    from r1reward.config import SFTConfig
    from r1reward.sft import examples_for
    assert len(examples_for(pairs[0], SFTConfig(both_orders=True), seed=0)) == 2 * len(pairs[0])


def test_guess_rate_mixes_in_careless_judgments(pairs):
    from r1reward.data import guessed_analysis, templated_analysis
    from r1reward.rewards import format_reward, parse_answer
    many = pairs[0] * 50  # 400 examples
    clean = templated_examples(many, 0, seed=3)
    mixed = templated_examples(many, 0, seed=3, guess_rate=0.6)
    assert [p for p, _ in clean] == [p for p, _ in mixed]  # same pairs, same orders
    guessed = [(p, t) for p, t in mixed if "Without checking the image" in t]
    assert 0.5 < len(guessed) / len(mixed) < 0.7
    for p, t in mixed:
        assert format_reward(t) == 1.0
        if (p, t) not in guessed:
            assert t == templated_analysis(p)
    # the careless teacher picks either response regardless of the gold
    right = sum(parse_answer(t) == p.preferred for p, t in guessed) / len(guessed)
    assert 0.35 < right < 0.65
    p = pairs[0][0]
    t = guessed_analysis(p, 3 - p.preferred)
    assert parse_answer(t) == 3 - p.preferred and "image shows" not in t
    assert p.meta["truth"] in t and p.meta["wrong"] in t  # it quotes both claims
    # only the named kinds get careless judgments
    by_kind = templated_examples(many, 0, seed=3, guess_rate=1.0, guess_on=("shape",))
    kinds = {p.meta["kind"]: "Without checking" in t for p, t in by_kind}
    assert kinds == {"color": False, "shape": True, "count": False}
    by_shape = templated_examples(many, 0, seed=3, guess_rate=1.0, guess_on=("triangle",))
    assert {(p.meta["shape"] == "triangle") == ("Without checking" in t) for p, t in by_shape} == {True}
    # the config path (trainer and `python -m r1reward.sft`): the default guesses on triangles only
    from r1reward.sft import examples_for
    from_cfg = examples_for(many, SFTConfig(guess_rate=1.0), seed=3)
    assert {(p.meta["shape"] == "triangle") == ("Without checking" in t) for p, t in from_cfg} == {True}
    with pytest.raises(ValueError, match="guess_rate"):
        templated_examples(many, 0, seed=3, guess_rate=1.5)


def test_cold_start_learns_and_is_cached(pairs, tmp_path, monkeypatch):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    ex = templated_examples(pairs[0], 4, seed=0)
    cfg = SFTConfig(steps=6, batch_size=4, lr=3e-3)
    out, info = cold_start(None, ex, cfg, seed=0, log=None, cache=tmp_path / "cache")
    assert info["cached"] is False and info["final_loss"] < info["first_loss"]
    assert (out / "model.safetensors").is_file() and (out / "sft_info.json").is_file()
    t0 = time.time()
    out2, info2 = cold_start(None, ex, cfg, seed=0, log=None, cache=tmp_path / "cache")
    assert out2 == out and info2["cached"] is True and time.time() - t0 < 30
    out3, _ = cold_start(None, ex, SFTConfig(steps=1, batch_size=4), seed=0, log=None,
                         cache=tmp_path / "cache")
    assert out3 != out  # different settings, different cache entry


def test_sft_file_requires_response_field(pairs, tmp_path):
    _, train = pairs
    lines = train.read_text().splitlines()
    recs = [json.loads(x) for x in lines[:3]]
    recs[0]["response"] = "<think>Response 1 is right.</think><answer>1</answer>"
    recs[1]["response"] = ""
    f = train.parent / "sft.jsonl"  # image paths are relative to the data folder
    f.write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    examples, skipped = load_sft_file(f)
    assert len(examples) == 1 and examples[0][1].endswith("<answer>1</answer>")
    assert any("sft.jsonl:2: field 'response'" in s for s in skipped)
    assert any("sft.jsonl:3: field 'response'" in s for s in skipped)
    f.write_text(json.dumps(recs[1]) + "\n")
    with pytest.raises(ValueError, match="no usable SFT examples"):
        load_sft_file(f)


def test_prompt_cache_collates_what_the_processor_does(pairs, tiny_dir):
    # SFT processes each prompt once and pads per batch itself: the tensors (and so the
    # loss) must be the processor's own, for batches of prompts of different lengths.
    import random

    import torch

    from r1reward.generation import build_prompt_inputs
    from r1reward.model import load_model_and_processor
    from r1reward.sft import PromptCache

    _, proc = load_model_and_processor(tiny_dir)
    cache = PromptCache(proc)
    shown = [p.swapped() if i % 2 else p for i, p in enumerate(pairs[0])]
    rng = random.Random(0)
    widths = set()
    for _ in range(4):
        batch = rng.sample(shown, 5)
        got, want = cache(batch, "cpu"), build_prompt_inputs(proc, batch)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k
        widths.add(tuple(want["attention_mask"].sum(1).tolist()))
    assert any(len(set(w)) > 1 for w in widths)  # some batch really was padded
    assert len(cache.single) <= len(shown)


def test_make_batch_with_a_target_memo_builds_the_same_batch_and_tokenizes_once(pairs, tiny_dir):
    import torch

    from r1reward.generation import build_prompt_inputs
    from r1reward.model import load_model_and_processor
    from r1reward.sft import make_batch

    _, proc = load_model_and_processor(tiny_dir)
    ex = templated_examples(pairs[0], 6, seed=0, guess_rate=0.5)
    memo: dict = {}
    want, got = make_batch(proc, ex, "cpu"), make_batch(proc, ex, "cpu", encoded=memo)
    for f in ("input_ids", "attention_mask", "response_ids", "response_mask"):
        assert torch.equal(getattr(got, f), getattr(want, f)), f
    assert set(memo) == {(t, ()) for _, t in ex}
    prompt = build_prompt_inputs(proc, [p for p, _ in ex])
    calls = []  # the targets' tokenizer calls (the prompt is built above)
    real = proc.tokenizer.__class__.__call__
    proc.tokenizer.__class__.__call__ = lambda self, *a, **k: calls.append(a) or real(self, *a, **k)
    try:
        again = make_batch(proc, ex, "cpu", prompt=prompt, encoded=memo)
    finally:
        proc.tokenizer.__class__.__call__ = real
    assert calls == [] and torch.equal(again.input_ids, want.input_ids)


def test_blank_image_examples_quote_each_claim_or_keep_the_judgment(pairs):
    from PIL import Image

    from r1reward.data import PreferencePair, claims
    from r1reward.sft import on_blank_image
    ex = templated_examples(pairs[0], 6, seed=0)
    release = PreferencePair("r", pairs[0][0].image, "q", "a", "b", 1)  # no generated meta
    warm = on_blank_image(ex + [(release, "<think>x</think><answer>1</answer>")], quote_only=True)
    assert len(warm) == 6  # the release-format pair has no claim to quote
    for (p, _), (w, target) in zip(ex, warm):
        said = claims(p)
        assert target == f"<think>Response 1 says {said[1]}. Response 2 says {said[2]}.</think>"
        assert said[1] != said[2] and (w.response_1, w.response_2) == (p.response_1, p.response_2)
        assert w.image != p.image
        assert Image.open(w.image).convert("RGB").getextrema() == ((255, 255),) * 3
    full = on_blank_image(ex)
    assert [t for _, t in full] == [t for _, t in ex] and {w.image for w, _ in full} == {warm[0][0].image}
    own = on_blank_image(ex, quote_only=True, keep_image=True)  # same targets, each pair's image
    assert [t for _, t in own] == [t for _, t in warm] and [w for w, _ in own] == [p for p, _ in ex]
    colour = on_blank_image(ex, ("color",), quote_only=True)
    assert colour and {w.meta["kind"] for w, _ in colour} == {"color"} and len(colour) < len(warm)
    # the preferred response claims the image's truth, whichever order it is shown in
    for p, _ in ex:
        assert p.meta["truth"] in claims(p)[p.preferred]
        assert p.meta["wrong"] in claims(p)[3 - p.preferred]


def test_blank_judgments_without_fact_loss_show_the_fact_but_do_not_train_it(pairs, tiny_dir):
    import torch

    from r1reward.data import image_fact
    from r1reward.logprobs import FusedLMHead, head_call, sft_loss
    from r1reward.model import load_model_and_processor
    from r1reward.sft import make_batch, on_blank_image

    ex = templated_examples(pairs[0], 8, seed=0)
    kept, masked = on_blank_image(ex), on_blank_image(ex, fact_loss=False)
    assert [t for _, t in masked] == [t for _, t in kept]  # the same text is shown
    model, proc = load_model_and_processor(tiny_dir)
    full, part = make_batch(proc, kept[:4], "cpu"), make_batch(proc, masked[:4], "cpu")
    for f in ("input_ids", "attention_mask", "response_ids"):
        assert torch.equal(getattr(part, f), getattr(full, f)), f
    tok = proc.tokenizer
    for i, (p, _) in enumerate(masked[:4]):
        off = (full.response_mask[i] == 1) & (part.response_mask[i] == 0)
        assert tok.decode(full.response_ids[i][off]).strip() == image_fact(p)
    FusedLMHead.install(model)
    with torch.no_grad():
        lp = head_call(model, full, targets=full.response_ids)
        m = part.response_mask.float()
        assert torch.allclose(sft_loss(model, part), -(lp * m).sum() / m.sum(), atol=1e-6)
        assert not torch.allclose(sft_loss(model, part), sft_loss(model, full), atol=1e-4)


def test_reading_examples_hide_the_claims_and_state_only_the_fact(pairs):
    from r1reward.data import PreferencePair, image_fact
    from r1reward.sft import reading_only
    ex = templated_examples(pairs[0], 6, seed=0)
    release = PreferencePair("r", pairs[0][0].image, "q", "a", "b", 1)  # no generated meta
    read = reading_only(ex + [(release, "<think>x</think><answer>1</answer>")], ("color", "shape"))
    assert len(read) == 6
    for (p, _), (r, target) in zip(ex, read):
        assert (r.response_1, r.response_2) == ("", "") and r.image == p.image
        assert target.endswith(f"The image shows {image_fact(p)}.</think>")
        assert p.meta["wrong"].upper() not in target and "<answer>" not in target
    colour = reading_only(ex, ("color",))
    assert colour and {r.meta["kind"] for r, _ in colour} == {"color"} and len(colour) < len(read)
    assert reading_only(ex, ()) == []


@pytest.mark.parametrize("share,steps,warm", [(0.4, 10, 4), (0.0, 10, 0), (0.5, 1, 0), (0.9, 2, 1)])
def test_the_warmup_takes_its_share_of_the_steps(share, steps, warm):
    from r1reward.sft import warmup_steps
    assert warmup_steps(SFTConfig(steps=steps, copy_warmup=share)) == warm


def test_lr_holds_for_the_flat_share_then_decays_to_zero():
    import math

    from r1reward.sft import lr_factor
    # decay_from 0 is the plain cosine over all the steps
    assert [lr_factor(s, 8) for s in range(9)] == pytest.approx(
        [0.5 * (1 + math.cos(math.pi * s / 8)) for s in range(9)])
    flat = [lr_factor(s, 10, 0.6) for s in range(11)]
    assert flat[:6] == [1.0] * 6 and flat[6] == 1.0 and flat[-1] == pytest.approx(0.0)
    assert all(a > b for a, b in zip(flat[6:], flat[7:]))  # strictly decreasing after the flat part


def test_each_draw_of_an_example_shows_its_next_image(pairs, tiny_dir, monkeypatch):
    from r1reward import sft
    from r1reward.data import image_variants
    from r1reward.model import load_model_and_processor
    drawn = []
    real = sft.make_batch

    def spy(processor, examples, device, **kw):
        drawn.extend((p.id, p.image, t) for p, t in examples)
        return real(processor, examples, device, **kw)

    monkeypatch.setattr(sft, "make_batch", spy)
    model, processor = load_model_and_processor(tiny_dir)
    ex = templated_examples(pairs[0], 2, seed=0)
    views = [image_variants(ex[0][0], 3), [ex[1][0]]]
    sft.train_sft(model, processor, ex, SFTConfig(steps=4, batch_size=2, lr=1e-3), log=lambda _: None,
                  views=views)
    first = [img for pid, img, _ in drawn if pid == ex[0][0].id]
    assert first == [v.image for v in views[0]] + [views[0][0].image]  # in turn, then again
    assert {img for pid, img, _ in drawn if pid == ex[1][0].id} == {ex[1][0].image}
    assert {t for _, _, t in drawn} == {t for _, t in ex}  # the targets are the examples' own


def test_cold_start_variants_are_for_the_image_examples_only(pairs, tiny_dir, monkeypatch):
    from r1reward import sft
    from r1reward.data import blank_image
    from r1reward.model import load_model_and_processor
    seen = []
    real = sft.train_sft

    def spy(model, processor, examples, cfg, views=None, **kw):
        seen.append(views)
        return real(model, processor, examples, cfg, views=views, **kw)

    monkeypatch.setattr(sft, "train_sft", spy)
    model, processor = load_model_and_processor(tiny_dir)
    ex = templated_examples(pairs[0], 4, seed=0)
    cfg = SFTConfig(steps=3, batch_size=2, copy_warmup=0.34, copy_warmup_on="", blank_judge_on="",
                    image_variants=2)
    sft.train_cold_start(model, processor, ex, cfg, log=lambda _: None)
    assert seen[0] is None  # the warm-up: blank images only
    views = seen[1]
    assert [len(v) for v in views] == [2] * len(ex) + [1] * len(ex)
    assert all(v[0] is p and v[1].image != p.image for v, (p, _) in zip(views, ex))
    assert all(v[0].image == str(blank_image()) for v in views[len(ex):])


def test_cold_start_runs_the_warmup_then_the_judgments(pairs, tiny_dir, monkeypatch):
    from r1reward import sft
    from r1reward.data import image_fact
    from r1reward.model import load_model_and_processor
    seen, images = [], []
    real = sft.train_sft

    def spy(model, processor, examples, cfg, **kw):
        seen.append(([t for _, t in examples], cfg.steps))
        images.append([p.image for p, _ in examples])
        return real(model, processor, examples, cfg, **kw)

    monkeypatch.setattr(sft, "train_sft", spy)
    model, processor = load_model_and_processor(tiny_dir)
    ex = templated_examples(pairs[0], 4, seed=0)
    steps = []
    cfg = SFTConfig(steps=5, batch_size=2, copy_warmup=0.4, copy_warmup_on="", blank_judge_on="",
                    read_warmup=0.0, copy_warmup_judge=False, blank_fact_loss=False)
    losses = sft.train_cold_start(model, processor, ex, cfg,
                                  after_step=lambda s, ls: steps.append((s, len(ls))))
    assert [n for _, n in seen] == [2, 3] and len(losses) == 5
    warm, rest = seen[0][0], seen[1][0]
    assert warm and all("<answer>" not in t for t in warm)
    # then every judgment, plus every judgment again on the blank image (blank_judge_on "")
    assert rest == [t for _, t in ex] * 2
    # the blank-image half shows the stated fact without training it; the image half trains it
    facts = [image_fact(p) for p, _ in ex]
    assert all(not getattr(t, "unsupervised", ()) for t in rest[:len(ex)])
    assert [[t[a:b] for a, b in t.unsupervised] for t in rest[len(ex):]] == [[f] for f in facts]
    # copy_warmup_judge: the warm-up trains the full judgments, again without the fact
    seen.clear()
    sft.train_cold_start(model, processor, ex, dataclasses.replace(cfg, copy_warmup_judge=True),
                         log=lambda _: None)
    assert seen[0][0] == [t for _, t in ex]
    assert [[t[a:b] for a, b in t.unsupervised] for t in seen[0][0]] == [[f] for f in facts]
    assert steps == [(s, s) for s in range(1, 6)]  # one count through both phases
    # the warm-up's image: blank by default, each pair's own with copy_warmup_image "own"
    assert all(i != p.image for i, (p, _) in zip(images[0], ex))
    images.clear()
    sft.train_cold_start(model, processor, ex, dataclasses.replace(cfg, copy_warmup_image="own"),
                         log=lambda _: None)
    assert images[0] == [p.image for p, _ in ex]
    # blank_judge_on picks the kinds whose judgments come back on the blank image
    kinds = {p.meta["kind"] for p, _ in ex}
    assert len(kinds) > 1
    for only in sorted(kinds):
        seen.clear()
        sft.train_cold_start(model, processor, ex, dataclasses.replace(cfg, blank_judge_on=only),
                             log=lambda _: None)
        assert seen[1][0] == [t for _, t in ex] + [t for p, t in ex if p.meta["kind"] == only]
    # the reading warm-up comes first, on the images with the responses emptied
    seen.clear()
    steps.clear()
    sft.train_cold_start(model, processor, ex, dataclasses.replace(cfg, steps=6, read_warmup=0.34),
                         log=lambda _: None, after_step=lambda s, ls: steps.append((s, len(ls))))
    assert [n for _, n in seen] == [2, 2, 2]
    assert seen[0][0] == [t for _, t in sft.reading_only(ex, ("color", "shape"))]
    assert all(t.endswith(".</think>") and "Response" not in t for t in seen[0][0])
    assert steps == [(s, s) for s in range(1, 7)]
    # release-format pairs: nothing to quote, every step is the cold start proper
    seen.clear()
    bare = [(dataclasses.replace(p, meta={}), t) for p, t in ex]
    assert len(sft.train_cold_start(model, processor, bare, cfg, log=lambda _: None)) == 5
    assert [n for _, n in seen] == [5]
