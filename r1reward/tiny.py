"""The embedded default model: a tiny Qwen2.5-VL written as a real Hugging Face checkpoint.

Nothing is downloaded: the tokenizer is a byte-level BPE trained locally (with
``tokenizers``) on the prompt and on every sentence the data generator can write, wrapped
as the Qwen2 tokenizer with the Qwen special tokens and chat template; the model is
``Qwen2_5_VLForConditionalGeneration`` from a small config with random weights (taught to
caption generated images first with ``$R1REWARD_TINY_READING_STEPS``: r1reward.tiny_reading).
The directory is then loaded with ``from_pretrained`` like any real checkpoint, so the
trainer, evaluation and server exercise the same code path they use for Qwen2.5-VL-7B.
"""
from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .cache import build_once, cache_root
from .data import vocabulary_corpus
from .processor import image_processor_for, load_processor, save_processor
from .prompt import JUDGE_PROMPT

logger = logging.getLogger(__name__)

# Bump when anything below changes what gets written: old caches are then not reused.
# 3: processor_config.json carries the video processor's config (AutoProcessor loads it).
# 4: the tokenizer learns the analyses' new words (the fact's capitals, the verdicts).
# 5: images are resized to 56*56 pixels' worth (a square one: 2x2 merged vision tokens, was 4x4).
TINY_VERSION = "5"
# Caption steps of the base model (r1reward.tiny_reading), off by default: a base that reads
# (0.98 of fresh images' colours and shapes after 1000) formed weaker colour judgments in the
# cold start than the random one (docs/training_runs.md). $R1REWARD_TINY_READING_STEPS sets it.
READING_STEPS = 0
READING_ENV = "R1REWARD_TINY_READING_STEPS"
# What the captions name (r1reward.tiny_reading.CAPTIONS); $R1REWARD_TINY_READING_CAPTIONS sets it.
READING_CAPTIONS = "color_shape"
READING_CAPTIONS_ENV = "R1REWARD_TINY_READING_CAPTIONS"

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                  "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
# Single tokens for the reward model's structure: they keep responses short for a tiny model.
STRUCTURE_TOKENS = ("<think>", "</think>", "<answer>", "</answer>")

# Qwen2-VL's chat format: default system turn, <|im_start|>role ... <|im_end|>, and an image
# content item rendered as <|vision_start|><|image_pad|><|vision_end|> (the processor then
# expands <|image_pad|> to one token per merged vision patch).
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

BPE_VOCAB = 1200
# Images are resized to about 56*56 pixels (multiples of 28 px per side): a square one becomes
# 4x4 patches, 2x2 merged vision tokens. With 16 tokens (112 px) a cold-start step cost ~15 %
# more (docs/training_runs.md).
MIN_PIXELS, MAX_PIXELS = 56 * 56, 56 * 56


# Text attention heads of the embedded model: 4 heads of 16. vLLM's CPU attention has no
# kernel for head size 16, so the vLLM rollout engine gets the same model with 2 heads of 32.
HEADS = 4
VLLM_HEADS = 2
# M-RoPE's (t, h, w) split of half the head size, per head count.
MROPE_SECTIONS = {4: [2, 2, 4], 2: [4, 6, 6]}


def reading_steps() -> int:
    """The base model's caption steps: ``$R1REWARD_TINY_READING_STEPS`` or READING_STEPS."""
    raw = os.environ.get(READING_ENV, "").strip()
    if not raw:
        return READING_STEPS
    try:
        steps = int(raw)
    except ValueError:
        steps = -1
    if steps < 0:
        raise ValueError(f"${READING_ENV}={raw!r}: expected a whole number of steps >= 0")
    return steps


def reading_captions() -> str:
    """What the base's captions name: ``$R1REWARD_TINY_READING_CAPTIONS`` or READING_CAPTIONS."""
    from .tiny_reading import CAPTIONS

    names = os.environ.get(READING_CAPTIONS_ENV, "").strip() or READING_CAPTIONS
    if names not in CAPTIONS:
        raise ValueError(f"${READING_CAPTIONS_ENV}={names!r}: expected one of {', '.join(CAPTIONS)}")
    return names


def default_model_dir(heads: int = HEADS) -> Path:
    """The embedded tiny checkpoint, built once under ``$R1REWARD_CACHE`` (default
    ``~/.cache/r1reward``) and reused; ``heads`` text attention heads (head size 64/heads)."""
    steps = reading_steps()
    names = reading_captions() if steps else READING_CAPTIONS
    name = (f"tiny-qwen2.5-vl-v{TINY_VERSION}" + ("" if heads == HEADS else f"-h{heads}")
            + ("" if steps == READING_STEPS else f"-read{steps}")
            + ("" if names == READING_CAPTIONS else f"-{names}"))
    return build_once(cache_root() / name,
                      lambda out: build_tiny_checkpoint(out, heads=heads, reading_steps=steps,
                                                        reading_captions=names),
                      marker="config.json")


def build_tokenizer():
    """Byte-level BPE trained on the project's own text, as a Qwen2 tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import Qwen2Tokenizer

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    corpus = vocabulary_corpus() + [JUDGE_PROMPT, "You are a helpful assistant."]
    bpe.train_from_iterator(corpus, trainer)
    model = json.loads(bpe.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in model["merges"]]
    tok = Qwen2Tokenizer(vocab=model["vocab"], merges=merges, unk_token=None,
                         eos_token="<|im_end|>", pad_token="<|endoftext|>")
    tok.add_special_tokens({"additional_special_tokens": list(SPECIAL_TOKENS)})
    tok.add_tokens(list(STRUCTURE_TOKENS))
    tok.chat_template = CHAT_TEMPLATE
    return tok


def tiny_config(tok, heads: int = HEADS):
    from transformers import Qwen2_5_VLConfig

    hidden = 64
    if heads not in MROPE_SECTIONS:
        raise ValueError(f"heads={heads}: the tiny model has {'|'.join(map(str, MROPE_SECTIONS))}")
    mrope = MROPE_SECTIONS[heads]
    ids = {t: tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    text = dict(vocab_size=len(tok), hidden_size=hidden, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=heads, num_key_value_heads=max(1, heads // 2),
                max_position_embeddings=4096,
                rope_scaling={"type": "mrope", "mrope_section": mrope},
                tie_word_embeddings=False, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=64, intermediate_size=128, num_heads=4, out_hidden_size=64,
                  patch_size=14, spatial_merge_size=2, temporal_patch_size=2,
                  fullatt_block_indexes=[1], window_size=56)
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False,
                            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
                            vision_start_token_id=ids["<|vision_start|>"],
                            vision_end_token_id=ids["<|vision_end|>"])


def build_tiny_checkpoint(out_dir, seed: int = 0, heads: int = HEADS,
                          reading_steps: int = READING_STEPS,
                          reading_captions: str = READING_CAPTIONS) -> Path:
    """Write a complete, ``from_pretrained``-loadable tiny Qwen2.5-VL directory: random
    weights, then ``reading_steps`` caption steps (``reading.json`` says how well it reads)."""
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer()
    cfg = tiny_config(tok, heads)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg)
    model.generation_config.eos_token_id = cfg.text_config.eos_token_id
    model.generation_config.pad_token_id = cfg.text_config.pad_token_id
    save_processor(out, tok, image_processor_for(MIN_PIXELS, MAX_PIXELS))
    if reading_steps:
        from .tiny_reading import teach_reading
        info = teach_reading(model, load_processor(out), reading_steps, seed, reading_captions)
        logger.info(f"tiny base: reads colour {info['accuracy']['color']:.2f}, shape "
                    f"{info['accuracy']['shape']:.2f} of fresh images after {reading_steps} "
                    f"caption steps ({info['seconds']:.0f} s)")
        (out / "reading.json").write_text(json.dumps(info, indent=1) + "\n")
    model.save_pretrained(out, safe_serialization=True)
    return out
