"""The embedded base model's own pretraining: it learns to say what a generated image shows.

A real reward model starts from an instruct VLM that already reads images; the tiny model
starts from random weights, so its cold start has to teach the vision tower to see and the
judge to compare at once. This stage (off by default: ``$R1REWARD_TINY_READING_STEPS``)
stands in for the base model's pretraining: captions ("A red circle.") of single shapes
drawn by the data generator's own drawing code, a pool of thousands, so little is learnt by
heart. The caption is worded like neither a response nor the judge's stated fact: the base
learns to see, not the judge's sentences.
"""
from __future__ import annotations

import logging
import random
import time

import torch

from .data import COLORS, SHAPES, draw_facts
from .patch_embed import linear_patch_embed

logger = logging.getLogger(__name__)

CAPTION_QUESTION = "What does the image show?"


# What a caption names: "color_shape" ("A red circle.") or "shape" ("A circle.": the base
# learns to see shapes and leaves colour to the cold start).
CAPTIONS = ("color_shape", "shape")


def caption(shape: str, color: str, names: str = CAPTIONS[0]) -> str:
    if names not in CAPTIONS:
        raise ValueError(f"caption names={names!r}: expected one of {', '.join(CAPTIONS)}")
    return f"A {shape}." if names == "shape" else f"A {color} {shape}."


def draw_captioned(rng: random.Random, n: int, names: str = CAPTIONS[0]):
    """``n`` fresh images of one shape each (the colour and shape pairs' drawing), with
    their captions (naming ``names``) and their (colour, shape)."""
    images, captions, facts = [], [], []
    for _ in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        images.append(draw_facts(rng, "color", shape, color, color))
        captions.append(caption(shape, color, names))
        facts.append((color, shape))
    return images, captions, facts


def caption_prompt(processor) -> str:
    messages = [{"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": CAPTION_QUESTION}]}]
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def caption_batch(processor, images, captions) -> dict:
    """Prompt + caption + end of turn, right-padded, with labels on the caption only."""
    tok = processor.tokenizer
    prompt = caption_prompt(processor)
    tok.padding_side = "right"
    enc = processor(text=[prompt + c + "<|im_end|>" for c in captions], images=images,
                    padding=True, return_tensors="pt")
    # one prompt text, and every image has the same size, so the same number of vision tokens
    n_prompt = processor(text=[prompt], images=images[:1], return_tensors="pt")["input_ids"].shape[1]
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    labels[:, :n_prompt] = -100
    enc["labels"] = labels
    return enc


class CaptionPool:
    """``n`` captioned images put through the processor once (in chunks), batched by index:
    in a profile the processor took ~45 of the ~145 ms of a step on a fresh batch of 32."""

    TOKEN_FILL = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0, "labels": -100}

    def __init__(self, processor, n: int, rng: random.Random, chunk: int = 256,
                 names: str = CAPTIONS[0]):
        self.pad = processor.tokenizer.pad_token_id
        self.rows: list[dict] = []
        for start in range(0, n, chunk):
            images, captions, _ = draw_captioned(rng, min(chunk, n - start), names)
            enc = caption_batch(processor, images, captions)
            per_image = int(enc["image_grid_thw"][0].prod())  # every image has the same size
            for i, length in enumerate(enc["attention_mask"].sum(1).tolist()):
                row = {k: enc[k][i, :length] for k in self.TOKEN_FILL if k in enc}
                row["pixel_values"] = enc["pixel_values"][i * per_image:(i + 1) * per_image]
                row["image_grid_thw"] = enc["image_grid_thw"][i:i + 1]
                self.rows.append(row)

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, idx: list[int]) -> dict:
        rows = [self.rows[i] for i in idx]
        width = max(len(r["input_ids"]) for r in rows)
        out = {}
        for k, fill in self.TOKEN_FILL.items():
            if k in rows[0]:
                value = self.pad if fill is None else fill
                out[k] = torch.stack([torch.nn.functional.pad(r[k], (0, width - len(r[k])), value=value)
                                      for r in rows])
        for k in ("pixel_values", "image_grid_thw"):
            out[k] = torch.cat([r[k] for r in rows])
        return out


def pretrain_reading(model, processor, steps: int, batch_size: int = 32, lr: float = 3e-3,
                     pool: int = 4096, seed: int = 0, log=None,
                     names: str = CAPTIONS[0]) -> list[float]:
    """``steps`` AdamW steps (constant lr, grad clip 1) on batches drawn from ``pool``
    images captioned by ``names``; returns the per-step losses."""
    log = log or logger.info
    rng = random.Random(f"tiny-reading-{seed}")
    torch.manual_seed(seed)
    t0 = time.perf_counter()
    data = CaptionPool(processor, pool, rng, names=names)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**data.batch([rng.randrange(len(data)) for _ in range(batch_size)])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if step % max(1, steps // 10) == 0 or step == steps - 1:
            log(f"tiny base reading step {step + 1}/{steps} loss {losses[-1]:.4f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return losses


def teach_reading(model, processor, steps: int, seed: int = 0, names: str = CAPTIONS[0]) -> dict:
    """``steps`` caption steps on ``model``, then how well it reads: what ``reading.json``
    records."""
    linear_patch_embed(model)
    t0 = time.perf_counter()
    losses = pretrain_reading(model, processor, steps, seed=seed, names=names)
    return {"steps": steps, "captions": names, "seconds": round(time.perf_counter() - t0, 1),
            "loss_first": losses[0], "loss_last": losses[-1],
            "accuracy": reading_accuracy(model, processor)}


@torch.no_grad()
def reading_accuracy(model, processor, n: int = 192, seed: int = 12345) -> dict[str, float]:
    """Greedy captions of ``n`` fresh images: the share naming the right colour, the
    right shape, and both."""
    images, _, facts = draw_captioned(random.Random(f"tiny-reading-eval-{seed}"), n)
    tok = processor.tokenizer
    tok.padding_side = "left"
    enc = processor(text=[caption_prompt(processor)] * n, images=images, padding=True,
                    return_tensors="pt")
    was_training = model.training
    model.eval()
    out = model.generate(**enc, max_new_tokens=12, do_sample=False)
    model.train(was_training)
    texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    words = [t.lower().replace(".", " ").split() for t in texts]
    color = [c in w for w, (c, _) in zip(words, facts)]
    shape = [s in w for w, (_, s) in zip(words, facts)]
    return {"color": sum(color) / n, "shape": sum(shape) / n,
            "both": sum(a and b for a, b in zip(color, shape)) / n, "n": n}
