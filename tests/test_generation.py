"""Batched generation: mixed image sizes, left padding, sample order, masks at end of turn."""
import pytest
import torch
from PIL import Image
from transformers import LogitsProcessor, LogitsProcessorList

from r1reward.data import PreferencePair
from r1reward.generation import build_prompt_inputs, generate
from r1reward.model import load_model_and_processor


@pytest.fixture(scope="module")
def tiny(tiny_dir):
    model, proc = load_model_and_processor(tiny_dir)
    model.eval()
    return model, proc


def _pairs(tmp_path):
    # Different sizes (one oversized, one below min_pixels) -> different vision grids, and
    # different question lengths -> different prompt lengths to pad.
    sizes = [(112, 112), (300, 150), (20, 80)]
    pairs = []
    for i, (w, h) in enumerate(sizes):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (w, h), (40 * i, 100, 200)).save(path)
        pairs.append(PreferencePair(f"p{i}", str(path), "What color is it?" + " Really?" * i * 3,
                                    "It is blue.", "It is red.", 1 + i % 2))
    return pairs


def test_batch_of_different_images_is_left_padded(tiny, tmp_path):
    _, proc = tiny
    inputs = build_prompt_inputs(proc, _pairs(tmp_path))
    grid = inputs["image_grid_thw"]
    assert grid.shape == (3, 3) and len({tuple(g.tolist()) for g in grid}) == 3
    assert inputs["pixel_values"].shape[0] == int(grid.prod(-1).sum())
    mask, ids = inputs["attention_mask"], inputs["input_ids"]
    assert (mask[:, -1] == 1).all() and (mask.sum(1) < mask.shape[1]).any()
    pad_id = proc.tokenizer.pad_token_id
    for row, m in zip(ids, mask):
        n_pad = int((m == 0).sum())
        assert (m[:n_pad] == 0).all() and (row[:n_pad] == pad_id).all()  # padding on the left only
    image_pad = proc.tokenizer.convert_tokens_to_ids("<|image_pad|>")
    assert (ids == image_pad).sum(1).tolist() == (grid.prod(-1) // 4).tolist()


class _ForceEndAt(LogitsProcessor):
    """Forces <|im_end|> for row 0 at step ``at``; other rows never end."""

    def __init__(self, prompt_len, end_id, at):
        self.p, self.end, self.at = prompt_len, end_id, at

    def __call__(self, input_ids, scores):
        scores[:, self.end] = -float("inf")
        if input_ids.shape[1] - self.p == self.at:
            scores[0] = -float("inf")
            scores[0, self.end] = 0.0
        return scores


def test_masks_and_texts_follow_the_first_end_of_turn(tiny, tmp_path):
    model, proc = tiny
    pairs = _pairs(tmp_path)
    end = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    P = build_prompt_inputs(proc, pairs)["input_ids"].shape[1]
    torch.manual_seed(0)
    g = generate(model, proc, pairs, do_sample=True, max_new_tokens=8, num_samples=2,
                 generate_kwargs={"logits_processor": LogitsProcessorList([_ForceEndAt(P, end, 3)])})
    assert g.prompt_len == P and g.sequences.shape[0] == 6
    assert torch.equal(g.sequences[:, P:], g.response_ids)
    # sample-major within a pair: rows 2j and 2j+1 share pair j's prompt
    assert torch.equal(g.sequences[0, :P], g.sequences[1, :P])
    assert not torch.equal(g.sequences[0, :P], g.sequences[2, :P])
    assert g.response_ids[0, 3] == end and g.response_mask[0].tolist() == [1, 1, 1, 1] + [0] * 4
    assert (g.response_ids[0, 4:] == proc.tokenizer.pad_token_id).all()
    assert g.response_mask[1:].sum(1).tolist() == [8] * 5  # never ended: all tokens count
    for row, mask, text in zip(g.response_ids, g.response_mask, g.texts):
        kept = row[mask.bool()]
        assert text == proc.tokenizer.decode(kept, skip_special_tokens=True)
        assert "<|im_end|>" not in text


def test_text_only_batches_work_and_mixed_batches_are_refused(tiny, tmp_path):
    model, proc = tiny
    text_only = [PreferencePair("t", None, "Which is better?", "A.", "B.", 1)]
    g = generate(model, proc, text_only, max_new_tokens=3)
    assert "pixel_values" not in g.prompt_inputs and len(g.texts) == 1
    with pytest.raises(ValueError, match="mixes pairs with and without an image"):
        build_prompt_inputs(proc, text_only + _pairs(tmp_path)[:1])
