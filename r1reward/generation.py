"""Batched judgments with Hugging Face ``generate``: the one path rollouts, evaluation and
the reward server share."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .data import PreferencePair
from .images import open_image
from .prompt import build_messages

END_OF_TURN = "<|im_end|>"


@dataclass
class Generation:
    prompt_inputs: dict  # processor output for the prompts (left-padded)
    sequences: torch.Tensor  # [B·n, P+R] prompt + response ids
    prompt_len: int  # P
    response_ids: torch.Tensor  # [B·n, R]
    response_mask: torch.Tensor  # [B·n, R] 1 up to and including the first end of turn
    texts: list[str]  # decoded responses, special tokens stripped
    # [B·n, R] log-prob of each generated token under the sampler, 0 past the mask; None
    # when the engine does not report them (HF generate)
    sampler_logp: torch.Tensor | None = None


def prompt_texts(processor, pairs: list[PreferencePair]) -> list[str]:
    return [processor.apply_chat_template(
        build_messages(p.question, p.response_1, p.response_2, p.image),
        tokenize=False, add_generation_prompt=True) for p in pairs]


def build_prompt_inputs(processor, pairs: list[PreferencePair], device="cpu"):
    """Tokenized chat prompts with their images, left-padded for generation.

    Images may differ in size: the processor concatenates their patches into one
    ``pixel_values`` and gives one ``image_grid_thw`` row per image. A batch is either
    all image pairs or all text-only pairs (``image=None``); the processor cannot mix them.
    """
    if not pairs:
        raise ValueError("build_prompt_inputs: empty batch of pairs")
    has_image = [p.image is not None for p in pairs]
    if any(has_image) and not all(has_image):
        raise ValueError("build_prompt_inputs: a batch mixes pairs with and without an image "
                         f"(ids without: {[p.id for p, h in zip(pairs, has_image) if not h]}); "
                         "batch them separately")
    processor.tokenizer.padding_side = "left"
    images = [open_image(p.image) for p in pairs] if all(has_image) else None
    return processor(text=prompt_texts(processor, pairs), images=images, padding=True,
                     return_tensors="pt").to(device)


def response_mask(response_ids: torch.Tensor, end_ids) -> torch.Tensor:
    """1 for tokens up to and including the first end-of-turn/eos token, 0 after."""
    is_end = torch.zeros_like(response_ids, dtype=torch.bool)
    for i in end_ids:
        is_end |= response_ids == i
    ended_before = (is_end.long().cumsum(1) - is_end.long()) > 0
    return (~ended_before).long()


def end_token_ids(processor, model=None) -> list[int]:
    tok = processor.tokenizer
    ids = {tok.convert_tokens_to_ids(END_OF_TURN)}
    if tok.eos_token_id is not None:
        ids.add(tok.eos_token_id)
    if model is not None:
        eos = model.generation_config.eos_token_id
        ids.update(eos if isinstance(eos, (list, tuple)) else [eos] if eos is not None else [])
    return sorted(i for i in ids if i is not None and i >= 0)


@torch.no_grad()
def generate(model, processor, pairs: list[PreferencePair], *, do_sample=False, temperature=1.0,
             top_p=1.0, max_new_tokens=256, num_samples=1, synced_gpus=False,
             generate_kwargs=None) -> Generation:
    """Judge each pair ``num_samples`` times; row ``b*num_samples + j`` is sample j of pair b."""
    device = next(model.parameters()).device
    inputs = build_prompt_inputs(processor, pairs, device)
    end_ids = end_token_ids(processor, model)
    kw = dict(max_new_tokens=max_new_tokens, num_return_sequences=num_samples,
              do_sample=do_sample, eos_token_id=end_ids,
              pad_token_id=processor.tokenizer.pad_token_id)
    if do_sample:
        kw.update(temperature=temperature, top_p=top_p, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if synced_gpus:
        kw["synced_gpus"] = True
    kw.update(generate_kwargs or {})
    sequences = model.generate(**inputs, **kw)
    return assemble(processor, inputs, sequences[:, inputs["input_ids"].shape[1]:], end_ids,
                    num_samples)


def assemble(processor, inputs, resp: torch.Tensor, end_ids, num_samples: int,
             lengths: torch.Tensor | None = None, sampler_logp: torch.Tensor | None = None
             ) -> Generation:
    """A Generation from the prompt inputs and the responses ``[B·n, R]``, the layout every
    engine returns: each row's tokens count up to its first end-of-turn token, and no
    further than ``lengths`` (the engine's own count) when given."""
    prompt_ids = inputs["input_ids"].to(resp.device).repeat_interleave(num_samples, 0)
    mask = response_mask(resp, end_ids)
    if lengths is not None:
        mask = mask * (torch.arange(resp.shape[1], device=resp.device) < lengths[:, None])
    pad = processor.tokenizer.pad_token_id
    texts = processor.batch_decode(torch.where(mask.bool(), resp, torch.full_like(resp, pad)),
                                   skip_special_tokens=True)
    if sampler_logp is not None:
        sampler_logp = sampler_logp * mask
    return Generation(inputs, torch.cat([prompt_ids, resp], 1), prompt_ids.shape[1], resp, mask,
                      texts, sampler_logp)
