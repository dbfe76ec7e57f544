"""Response-position log-probs and the policy loss, never through full-vocabulary logits.

The model's forward is asked (``logits_to_keep`` = the response positions) to hand only
the hidden states that predict response tokens to the lm_head, and the lm_head sends them
through ``r1reward.kernels`` instead of building logits.

The lm_head is replaced by :class:`FusedLMHead`, an ``nn.Linear`` subclass (so state-dict
keys, ``save_pretrained`` and HF ``generate`` are unchanged) whose forward can also take
targets and return log-probs or the StableReinforce loss. Computing the loss *inside* the
lm_head's forward is what lets FSDP2 hand the kernel a plain, unsharded weight: the
``[norm, lm_head]`` FSDP unit is unsharded around that forward (see parallelize.py).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1reward.kernels import StableReinforceLoss, token_logprobs


@dataclass
class SeqBatch:
    """Prompt + response sequences ready for a teacher-forced forward.

    input_ids / attention_mask ``[B, P+R]`` (prompt left-padded, response right-padded);
    response_ids / response_mask ``[B, R]``; vision inputs for the prompts' images.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    prompt_len: int
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    vision: dict  # pixel_values, image_grid_thw, mm_token_type_ids (any may be absent)

    def __len__(self):
        return self.input_ids.shape[0]

    def select(self, idx: list[int]) -> SeqBatch:
        """Rows ``idx`` (micro-batches): pixel_values are split per image by its grid size."""
        vision = {}
        grid = self.vision.get("image_grid_thw")
        for k, v in self.vision.items():
            if k == "pixel_values" and grid is not None:
                counts = grid.prod(-1).tolist()
                starts = [0]
                for c in counts:
                    starts.append(starts[-1] + c)
                vision[k] = torch.cat([v[starts[i]:starts[i + 1]] for i in idx])
            elif torch.is_tensor(v) and v.shape[0] == len(self):
                vision[k] = v[idx]
            else:
                vision[k] = v
        return SeqBatch(self.input_ids[idx], self.attention_mask[idx], self.prompt_len,
                        self.response_ids[idx], self.response_mask[idx], vision)

    def to(self, device) -> SeqBatch:
        vision = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.vision.items()}
        return SeqBatch(self.input_ids.to(device), self.attention_mask.to(device), self.prompt_len,
                        self.response_ids.to(device), self.response_mask.to(device), vision)


def build_seq_batch(prompt_inputs, sequences, prompt_len, response_mask,
                    forbidden_ids: tuple[int, ...] = ()) -> SeqBatch:
    """Join generated sequences with their prompt inputs (repeated per sample if needed).

    ``forbidden_ids`` (the image/video placeholder tokens): a sampled response containing
    one would be taken for an extra image in the teacher-forced forward, so the response
    is cut just before it (those ids are replaced and masked out).
    """
    if forbidden_ids:
        resp = sequences[:, prompt_len:]
        bad = torch.isin(resp, torch.tensor(forbidden_ids, device=resp.device))
        if bad.any():
            after = bad.long().cumsum(1) > 0
            response_mask = response_mask.masked_fill(after, 0)
            sequences = sequences.clone()
            sequences[:, prompt_len:] = resp.masked_fill(bad, 0)
    n_rows = sequences.shape[0]
    n_prompts = prompt_inputs["input_ids"].shape[0]
    if n_rows % n_prompts:
        raise ValueError(f"{n_rows} sequences is not a multiple of {n_prompts} prompts")
    reps = n_rows // n_prompts
    prompt_mask = prompt_inputs["attention_mask"].repeat_interleave(reps, 0)
    response_ids = sequences[:, prompt_len:]
    response_mask = response_mask.to(prompt_mask.dtype)
    vision = {}
    if "image_grid_thw" in prompt_inputs and prompt_inputs["image_grid_thw"] is not None:
        grid = prompt_inputs["image_grid_thw"]
        if grid.shape[0] != n_prompts:
            raise ValueError("expected exactly one image per prompt, got "
                             f"{grid.shape[0]} images for {n_prompts} prompts")
        pix = prompt_inputs["pixel_values"]
        chunks = torch.split(pix, grid.prod(-1).tolist())
        vision["pixel_values"] = torch.cat([c for c in chunks for _ in range(reps)])
        vision["image_grid_thw"] = grid.repeat_interleave(reps, 0)
    if prompt_inputs.get("mm_token_type_ids") is not None:
        tt = prompt_inputs["mm_token_type_ids"].repeat_interleave(reps, 0)
        vision["mm_token_type_ids"] = torch.cat([tt, tt.new_zeros(response_ids.shape)], 1)
    return SeqBatch(sequences, torch.cat([prompt_mask, response_mask], 1), prompt_len,
                    response_ids, response_mask, vision)


def head_call(model: nn.Module, batch: SeqBatch, **request):
    """Run the model's own forward with only the response positions reaching the lm_head.

    ``logits_to_keep`` (a tensor of positions) makes HF slice the final hidden states to
    the positions that predict response tokens before calling ``lm_head``; ``request``
    (targets, old_logp, …) is handed to :class:`FusedLMHead`'s forward as keyword
    arguments by a forward pre-hook that lives only for this call, so the head returns
    log-probs or the loss there instead of logits. Going through ``model(...)`` rather
    than ``model.model`` keeps the FSDP2 root's hooks (lazy init, unsharding the
    embeddings) in play.

    The forward runs without a padding mask (:func:`causal_layout`): each row's left
    padding is moved behind its last token, so causal attention alone keeps every real
    token from seeing a pad, and SDPA takes its ``is_causal`` path with no ``[B, 1, T, T]``
    mask to build and convert (``python -m bench.train_step`` times both layouts).
    """
    p, r = batch.prompt_len, batch.response_ids.shape[1]
    head = model.lm_head
    if not isinstance(head, FusedLMHead):
        raise TypeError("head_call needs FusedLMHead.install(model) first")
    layout = causal_layout(batch)
    if layout is None:  # a mask with holes inside a row: keep it
        inputs = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                      **batch.vision)
        keep, take = torch.arange(p - 1, p - 1 + r, device=batch.input_ids.device), None
    else:
        inputs, shift = layout
        # Rows now start their response `shift` positions early: keep the span covering
        # every row, then take each row's own r positions from it.
        top = int(shift.max())
        keep = torch.arange(p - 1 - top, p - 1 + r, device=batch.input_ids.device)
        take = (top - shift)[:, None] + torch.arange(r, device=shift.device)

    def add_request(_module, args, kwargs):
        if take is not None:
            hidden = args[0]
            args = (hidden.gather(1, take[..., None].expand(-1, -1, hidden.shape[-1])),)
        return args, {**kwargs, **request}

    handle = head.register_forward_pre_hook(add_request, with_kwargs=True)
    try:
        out = model(**inputs, logits_to_keep=keep, use_cache=False)
    finally:
        handle.remove()
    return out.logits  # what FusedLMHead returned for the request


def causal_layout(batch: SeqBatch):
    """``(inputs, shift)``: the batch's per-token inputs with each row rolled left by its
    count of leading pads (``shift`` ``[B]``), and no attention mask; ``None`` when a row's
    mask is not ``0…0 1…1 0…0`` with a real prompt token (its real tokens must be
    contiguous for this to be exact).

    The pads end up after the row's last real token, where causal attention hides them
    from every real token; positions (Qwen2.5-VL's 3-D RoPE included) are computed from
    the row's first real token on, as with the mask.
    """
    mask = batch.attention_mask.bool()
    starts = (mask[:, 1:] & ~mask[:, :-1]).sum(1) + mask[:, 0]
    shift = (~mask).long().cumprod(1).sum(1)  # leading pads per row
    if bool(((starts > 1) | (shift >= batch.prompt_len)).any()):  # one host sync
        return None
    t = mask.shape[1]
    idx = (torch.arange(t, device=mask.device)[None, :] + shift[:, None]) % t
    inputs = {"input_ids": batch.input_ids.gather(1, idx)}
    for k, v in batch.vision.items():
        per_token = torch.is_tensor(v) and v.dim() == 2 and v.shape == mask.shape
        inputs[k] = v.gather(1, idx) if per_token else v
    return inputs, shift


class FusedLMHead(nn.Linear):
    """lm_head that also computes response log-probs / the StableReinforce loss.

    ``head(h)`` is the ordinary linear layer (HF generate). ``head(h, targets=...)`` returns
    per-token log-probs (and entropy). ``head(h, targets=..., old_logp=..., advantages=...,
    mask=...)`` returns ``(loss, stats)`` from the public :class:`StableReinforceLoss`
    module it holds (one place maps settings to kernel arguments); ``old_logp=None`` there
    is the on-policy loss (ratio 1).
    """

    loss_fn: StableReinforceLoss

    @classmethod
    def install(cls, model: nn.Module, *, backend="auto", temperature=1.0,
                loss: StableReinforceLoss | None = None, **loss_kwargs):
        """Swap ``model.lm_head`` for a FusedLMHead sharing the same parameters.

        The loss is ``loss`` or ``StableReinforceLoss(**loss_kwargs)``; ``backend`` and
        ``temperature`` apply to both the log-prob and the loss paths."""
        old = model.lm_head
        if not isinstance(old, FusedLMHead):
            head = cls.__new__(cls)
            nn.Module.__init__(head)
            head.in_features, head.out_features = old.in_features, old.out_features
            head.weight = old.weight  # the same Parameter: ties and optimizer refs survive
            head.bias = old.bias
            model.lm_head = head
        if loss is None:
            loss = StableReinforceLoss(**loss_kwargs)
        loss.backend, loss.temperature = backend, float(temperature)
        # Not a submodule: state-dict keys and FSDP units stay those of a plain nn.Linear.
        object.__setattr__(model.lm_head, "loss_fn", loss)
        return model.lm_head

    def forward(self, hidden, targets=None, *, old_logp=None, advantages=None, mask=None,
                ref_logp=None, is_weights=None, return_entropy=False):
        if targets is None:
            return F.linear(hidden, self.weight, self.bias)
        fn = self.loss_fn
        if advantages is None:
            return token_logprobs(hidden, self.weight, targets, bias=self.bias,
                                  temperature=fn.temperature, return_entropy=return_entropy,
                                  backend=fn.backend)
        return fn.fused(hidden, self.weight, targets, old_logp, advantages, mask,
                        ref_logp=ref_logp, bias=self.bias, return_entropy=return_entropy,
                        is_weights=is_weights)


def micro_batches(n: int, size: int) -> list[list[int]]:
    return [list(range(i, min(n, i + size))) for i in range(0, n, size)]


@torch.no_grad()
def sequence_logprobs(model: nn.Module, batch: SeqBatch, micro_batch_size: int,
                      return_entropy=False):
    """Forward-only response log-probs ``[B, R]`` (0 outside the mask), micro-batched."""
    lps, ents = [], []
    for idx in micro_batches(len(batch), micro_batch_size):
        mb = batch.select(idx)
        tgt = mb.response_ids.masked_fill(mb.response_mask == 0, -100)
        out = head_call(model, mb, targets=tgt, return_entropy=return_entropy)
        lp, ent = out if return_entropy else (out, None)
        lps.append(lp * mb.response_mask)
        if ent is not None:
            ents.append(ent * mb.response_mask)
    lp = torch.cat(lps)
    return (lp, torch.cat(ents)) if return_entropy else lp


def policy_loss(model: nn.Module, mb: SeqBatch, old_logp, advantages, ref_logp=None,
                return_entropy=False, is_weights=None):
    """StableReinforce loss on one micro-batch: decoder → response hidden → fused head.
    ``is_weights`` ``[B, R]``: per-token importance weights on the policy term (TIS)."""
    return head_call(model, mb, targets=mb.response_ids, old_logp=old_logp,
                     advantages=advantages, mask=mb.response_mask, ref_logp=ref_logp,
                     return_entropy=return_entropy, is_weights=is_weights)


def sft_loss(model: nn.Module, mb: SeqBatch):
    """Mean token NLL of the response (teacher forcing), through the fused log-prob path."""
    tgt = mb.response_ids.masked_fill(mb.response_mask == 0, -100)
    lp = head_call(model, mb, targets=tgt)
    m = mb.response_mask.to(lp.dtype)
    return -(lp * m).sum() / m.sum().clamp_min(1.0)
