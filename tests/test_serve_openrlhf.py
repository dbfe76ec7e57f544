"""/get_reward with queries built the way OpenRLHF 0.11's remote-reward client builds them
(SingleTurnAgentExecutor: the Qwen-VL processor expands the prompt's image pad per patch,
the response ends in <|im_end|>, the query is decoded with special tokens kept, no image is
sent). OpenRLHF itself cannot be imported here (its package imports deepspeed and
flash-attn), so the client's three steps are reproduced with the tiny model's processor."""
import json

import pytest
from PIL import Image
from test_serve_hostile import RecordingJudge, call, debiased, serving

from r1reward.processor import load_processor
from r1reward.reward_query import collapse_pads, parse_label, question_of, split_response


def _openrlhf_query(processor, prompt, image, response_text):
    """OpenRLHF's steps: processor(text=[prompt], images=...), + the generated ids, decode."""
    tok = processor.tokenizer
    prompt_ids = processor(text=[prompt], images=[image], add_special_tokens=False,
                           return_tensors="pt")["input_ids"][0].tolist()
    action_ids = tok(response_text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    return tok.decode(prompt_ids + action_ids, skip_special_tokens=False), len(prompt_ids)


def test_get_reward_reads_an_openrlhf_vlm_query(tiny_dir, tmp_path):
    processor = load_processor(tiny_dir)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    image.save(tmp_path / "red.png")
    content = [{"type": "image"}, {"type": "text", "text": "What colour is it?"}]
    messages = [{"role": "user", "content": content}]
    prompt = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    query, _ = _openrlhf_query(processor, prompt, image, "q=2")
    assert query.count("<|image_pad|>") > 1 and not query.startswith(prompt)  # what broke before
    label = json.dumps({"reference": "q=0", "image": "red.png"})
    with serving(RecordingJudge(), root=tmp_path) as (url, srv, judge):
        st, out = call(url, "/get_reward", {"query": [query], "prompts": [prompt], "labels": [label]})
        assert st == 200, out
        assert out["rewards"] == [pytest.approx(debiased("q=2", "q=0"))]
        assert set(judge.questions) == {"What colour is it?"}
        # a prompt the query was not generated from is refused, not judged as a whole transcript
        st, out = call(url, "/get_reward", {"query": [query], "prompts": ["another prompt"]})
        assert st == 400 and "query[0]" in out["error"] and "does not start with its prompt" in out["error"]
        # a missing image in the label is a 400 naming where it came from
        st, out = call(url, "/get_reward", {"query": [query], "prompts": [prompt],
                                            "labels": [json.dumps({"image": "missing.png"})]})
        assert st in (400, 404) and "labels[0].image" in out["error"]


def test_query_helpers():
    pads = "a<|image_pad|><|image_pad|>b<|video_pad|><|video_pad|>"
    assert collapse_pads(pads) == "a<|image_pad|>b<|video_pad|>"
    assert split_response("P: x<|im_end|><|endoftext|>\n", "P:") == "x"
    assert split_response("whole answer", "") == "whole answer"
    with pytest.raises(ValueError, match="does not start with its prompt"):
        split_response("Q: x", "P:")
    templated = ("<|im_start|>system\nsys<|im_end|>\n<|im_start|>user\n<|vision_start|><|image_pad|>"
                 "<|vision_end|>Which?<|im_end|>\n<|im_start|>assistant\n")
    assert question_of(templated) == "Which?" and question_of("plain") == "plain"
    assert parse_label(None) == (None, None) and parse_label("ref") == ("ref", None)
    assert parse_label('{"reference": "r", "image": "a.png"}') == ("r", "a.png")
    assert parse_label("{not json") == ("{not json", None)
    with pytest.raises(ValueError, match="unknown keys \\['img'\\]"):
        parse_label('{"img": "a.png"}')
    with pytest.raises(ValueError, match="'image' must be a string"):
        parse_label('{"image": 3}')
