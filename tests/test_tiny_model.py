"""The embedded tiny checkpoint loads like a real one and generates judgments."""
import json

import pytest
import torch

from r1reward.data import generate_dataset, load_pairs
from r1reward.generation import generate, response_mask
from r1reward.model import load_model_and_processor


def test_checkpoint_reloads_and_places_vision_tokens(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["vision_config"]["depth"] == 2
    model, proc = load_model_and_processor(tiny_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    train, _ = generate_dataset(tmp_path, 2, 0)
    pair = load_pairs(train).pairs[0]
    from r1reward.generation import build_prompt_inputs
    inputs = build_prompt_inputs(proc, [pair])
    ids = inputs["input_ids"][0].tolist()
    tok = proc.tokenizer
    vs, pad, ve = (tok.convert_tokens_to_ids(t)
                   for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    n_pad = ids.count(pad)
    assert n_pad == int(inputs["image_grid_thw"][0].prod()) // 4  # merge 2x2
    start = ids.index(vs)
    assert ids[start + 1:start + 1 + n_pad] == [pad] * n_pad and ids[start + 1 + n_pad] == ve
    text = tok.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant")
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.logits).all()
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.tokenize(t)) == 1


def test_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_processor(tmp_path / "nowhere")


def test_generation_masks_stop_at_end_of_turn(tiny_dir, tmp_path):
    model, proc = load_model_and_processor(tiny_dir)
    train, _ = generate_dataset(tmp_path, 3, 0)
    pairs = load_pairs(train).pairs
    torch.manual_seed(0)
    g = generate(model, proc, pairs, do_sample=True, max_new_tokens=6, num_samples=2)
    assert g.sequences.shape[0] == 6 and g.response_ids.shape == g.response_mask.shape
    assert len(g.texts) == 6 and g.prompt_len == g.prompt_inputs["input_ids"].shape[1]
    eot = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([[5, 6, eot, 7, eot], [5, 6, 7, 8, 9]])
    assert response_mask(ids, [eot]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_build_is_byte_deterministic_and_auto_classes_load(tmp_path):
    import hashlib

    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from r1reward.tiny import build_tiny_checkpoint
    a, b = build_tiny_checkpoint(tmp_path / "a", seed=0), build_tiny_checkpoint(tmp_path / "b", seed=0)
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json"} <= set(names)
    for n in names:
        digest = [hashlib.sha256((d / n).read_bytes()).digest() for d in (a, b)]
        assert digest[0] == digest[1], n
    cfg = AutoConfig.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.eos_token == "<|im_end|>"
    # Structure tokens survive decoding with special tokens stripped (the format reward
    # reads decoded text); the end-of-turn token does not.
    s = "<think>Response 2 is better.</think><answer>2</answer>"
    assert tok.decode(tok.encode(s + "<|im_end|>"), skip_special_tokens=True) == s
    ip = AutoImageProcessor.from_pretrained(a)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (56 * 56, 112 * 112)
