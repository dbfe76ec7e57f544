"""The embedded base model's caption pretraining (r1reward.tiny_reading) and its cache entry."""
import json

import pytest
import torch

from r1reward import tiny
from r1reward.data import COLORS, SHAPES
from r1reward.model import load_model_and_processor
from r1reward.tiny_reading import (
    CaptionPool,
    caption_batch,
    draw_captioned,
    pretrain_reading,
    reading_accuracy,
)


def test_the_environment_picks_the_cache_entry_and_bad_values_are_refused(monkeypatch, tmp_path):
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path))
    monkeypatch.delenv(tiny.READING_ENV, raising=False)
    assert tiny.reading_steps() == tiny.READING_STEPS == 0
    path = tiny.default_model_dir()
    assert path.name == f"tiny-qwen2.5-vl-v{tiny.TINY_VERSION}"  # the random base, unchanged
    assert not (path / "reading.json").exists()
    monkeypatch.setenv(tiny.READING_ENV, "2")
    assert tiny.reading_steps() == 2
    taught = tiny.default_model_dir()
    assert taught.name == f"tiny-qwen2.5-vl-v{tiny.TINY_VERSION}-read2"
    assert json.loads((taught / "reading.json").read_text())["steps"] == 2
    for bad in ("-1", "many", "1.5"):
        monkeypatch.setenv(tiny.READING_ENV, bad)
        with pytest.raises(ValueError, match="R1REWARD_TINY_READING_STEPS"):
            tiny.default_model_dir()
    monkeypatch.setenv(tiny.READING_ENV, "2")
    monkeypatch.setenv(tiny.READING_CAPTIONS_ENV, "shape")
    shape_only = tiny.default_model_dir()
    assert shape_only.name == f"tiny-qwen2.5-vl-v{tiny.TINY_VERSION}-read2-shape"
    assert json.loads((shape_only / "reading.json").read_text())["captions"] == "shape"
    monkeypatch.setenv(tiny.READING_CAPTIONS_ENV, "colour")
    with pytest.raises(ValueError, match="R1REWARD_TINY_READING_CAPTIONS='colour'"):
        tiny.default_model_dir()
    monkeypatch.setenv(tiny.READING_ENV, "0")  # no caption steps: the setting has nothing to act on
    assert tiny.default_model_dir().name == f"tiny-qwen2.5-vl-v{tiny.TINY_VERSION}"


def test_caption_batch_puts_labels_on_the_caption_only(tiny_dir):
    import random
    _, proc = load_model_and_processor(tiny_dir)
    images, captions, facts = draw_captioned(random.Random(0), 3)
    assert all(c == f"A {col} {shape}." and col in COLORS and shape in SHAPES
               for c, (col, shape) in zip(captions, facts))
    enc = caption_batch(proc, images, captions)
    tok = proc.tokenizer
    for row, cap in zip(enc["labels"], captions):
        assert tok.decode(row[row != -100]) == cap + "<|im_end|>"
    _, shape_captions, shape_facts = draw_captioned(random.Random(0), 3, names="shape")
    assert shape_facts == facts  # the same images, captioned by shape alone
    assert shape_captions == [f"A {shape}." for _, shape in facts]
    with pytest.raises(ValueError, match="names='size'"):
        draw_captioned(random.Random(0), 1, names="size")


def test_the_pool_batches_as_the_processor_does(tiny_dir):
    """A batch of pooled rows equals the processor's batch of the same images."""
    import random
    _, proc = load_model_and_processor(tiny_dir)
    pool = CaptionPool(proc, 7, random.Random(3), chunk=4)
    images, captions, _ = draw_captioned(random.Random(3), 7)
    assert len(pool) == 7
    for idx in ([0, 1, 2], [6, 4], [5]):
        want = caption_batch(proc, [images[i] for i in idx], [captions[i] for i in idx])
        got = pool.batch(idx)
        assert set(got) == set(want)
        for k in want:
            assert torch.equal(got[k], want[k]), k


def test_caption_steps_teach_the_random_base_to_name_colours(tiny_dir):
    """Chance is 1/6 for the colour and 1/3 for the shape; 200 steps name most colours."""
    model, proc = load_model_and_processor(tiny_dir)
    before = reading_accuracy(model, proc, n=96)
    losses = pretrain_reading(model, proc, steps=200, seed=0)
    after = reading_accuracy(model, proc, n=96)
    assert before["color"] < 0.3 and after["color"] > 0.5, (before, after)
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


def test_a_built_checkpoint_records_how_well_it_reads(tmp_path):
    out = tiny.build_tiny_checkpoint(tmp_path / "m", reading_steps=5)
    info = json.loads((out / "reading.json").read_text())
    assert info["steps"] == 5 and info["loss_last"] < info["loss_first"]
    assert set(info["accuracy"]) == {"color", "shape", "both", "n"}
    assert all(0 <= info["accuracy"][k] <= 1 for k in ("color", "shape", "both"))
    random_base = tiny.build_tiny_checkpoint(tmp_path / "r", reading_steps=0)
    trained, _ = load_model_and_processor(out)
    untrained, _ = load_model_and_processor(random_base)
    name = "model.visual.patch_embed.proj.weight"
    changed = dict(trained.named_parameters())
    assert name in changed and not torch.equal(changed[name], dict(untrained.named_parameters())[name])
