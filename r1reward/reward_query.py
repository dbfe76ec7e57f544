"""Reading OpenRLHF's remote-reward queries (``/get_reward``).

OpenRLHF (0.11) posts ``{"query": [...], "prompts": [...], "labels": [...]}`` where each
query is ``tokenizer.decode(prompt_ids + response_ids, skip_special_tokens=False)``: the
chat template's special tokens are kept, a Qwen-VL prompt's single ``<|image_pad|>`` comes
back once per image patch, and the response ends in ``<|im_end|>``. No image is sent; a
label may carry one (see :func:`parse_label`).
"""
from __future__ import annotations

import json
import re

_PAD_RUNS = re.compile(r"(?:<\|image_pad\|>)+|(?:<\|video_pad\|>)+")
_TRAILING_SPECIALS = re.compile(r"(?:\s|<\|im_end\|>|<\|endoftext\|>)+\Z")
_VISION_BLOCK = re.compile(r"<\|vision_start\|>.*?<\|vision_end\|>", re.S)
_USER_TURN = re.compile(r"<\|im_start\|>user\n(.*?)(?:<\|im_end\|>|\Z)", re.S)
LABEL_KEYS = ("reference", "image")


def collapse_pads(text: str) -> str:
    """Each run of image (or video) pad tokens becomes one pad token."""
    return _PAD_RUNS.sub(lambda m: m.group(0)[:m.group(0).index(">") + 1], text)


def split_response(query: str, prompt: str) -> str:
    """The response part of ``query``: what follows ``prompt`` (compared with image pad
    runs collapsed), without trailing end-of-turn tokens. ValueError if ``prompt`` is not
    a prefix either way; an empty prompt means the whole query is the response."""
    if not prompt:
        response = query
    elif query.startswith(prompt):
        response = query[len(prompt):]
    else:
        q, p = collapse_pads(query), collapse_pads(prompt)
        if not q.startswith(p):
            raise ValueError("does not start with its prompt (also compared with image pad "
                             "runs collapsed): send the prompt the query was generated from")
        response = q[len(p):]
    return _TRAILING_SPECIALS.sub("", response).strip()


def question_of(prompt: str) -> str:
    """The question the judge sees: the last user turn of a chat-templated prompt, without
    its vision block; any other prompt as it is."""
    turns = _USER_TURN.findall(prompt)
    text = turns[-1] if turns else prompt
    return _VISION_BLOCK.sub("", text).strip()


def parse_label(label: str | None) -> tuple[str | None, str | None]:
    """``(reference answer, image)`` from a label: plain text is the reference; a JSON
    object ``{"reference": str|null, "image": str|null}`` carries both (how an OpenRLHF
    dataset's ``--label_key`` column can bring the image, which its client never sends)."""
    if label is None or not label.lstrip().startswith("{"):
        return label or None, None
    try:
        obj = json.loads(label)
    except ValueError:
        return label, None  # text that happens to start with "{"
    if not isinstance(obj, dict):
        return label, None
    unknown = sorted(set(obj) - set(LABEL_KEYS))
    if unknown:
        raise ValueError(f"JSON label has unknown keys {unknown}; allowed: {list(LABEL_KEYS)}")
    for k in LABEL_KEYS:
        if obj.get(k) is not None and not isinstance(obj[k], str):
            raise ValueError(f"JSON label key {k!r} must be a string or null")
    return obj.get("reference") or None, obj.get("image")
