"""Helpers for the trainer tests: a raw tiny Qwen2.5-VL built from a config (no tokenizer
or processor: those come from r1reward.tiny in the end-to-end tests), and hand-made
prompt+response batches with one image per row."""
from __future__ import annotations

import torch

from r1reward.logprobs import SeqBatch

IMG, VSTART, VEND = 290, 292, 293
PATCH_DIM = 3 * 2 * 14 * 14


def tiny_vlm(seed: int = 0, layers: int = 2):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
    from transformers.utils import logging
    logging.set_verbosity_error()
    cfg = Qwen2_5_VLConfig(
        text_config=dict(vocab_size=300, hidden_size=32, intermediate_size=64,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]},
                         bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=4,
                           out_hidden_size=32, patch_size=14, spatial_merge_size=2,
                           temporal_patch_size=2, fullatt_block_indexes=[1], window_size=56),
        image_token_id=IMG, video_token_id=291, vision_start_token_id=VSTART,
        vision_end_token_id=VEND, tie_word_embeddings=False)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(cfg).eval()


def seq_batch(B: int = 3, R: int = 5, seed: int = 0) -> SeqBatch:
    """Left-padded prompts with a 4x4-patch image (4 merged tokens), right-padded responses."""
    g = torch.Generator().manual_seed(seed)
    P = 10 + B
    ids = torch.zeros(B, P, dtype=torch.long)
    amask = torch.zeros(B, P, dtype=torch.long)
    for b in range(B):
        text = torch.randint(3, 280, (3 + b,), generator=g)
        row = torch.cat([torch.tensor([5, VSTART, IMG, IMG, IMG, IMG, VEND]), text])
        ids[b, P - len(row):] = row
        amask[b, P - len(row):] = 1
    resp = torch.randint(3, 280, (B, R), generator=g)
    rmask = torch.ones(B, R, dtype=torch.long)
    for b in range(B):
        rmask[b, R - b:] = 0 if b else 1  # rows end at different lengths
    resp = resp.masked_fill(rmask == 0, 0)
    grid = torch.tensor([[1, 4, 4]] * B)
    pix = torch.randn(16 * B, PATCH_DIM, generator=g)
    tt = torch.cat([(ids == IMG).int(), torch.zeros(B, R, dtype=torch.int)], 1)
    return SeqBatch(torch.cat([ids, resp], 1), torch.cat([amask, rmask], 1), P, resp, rmask,
                    {"pixel_values": pix, "image_grid_thw": grid, "mm_token_type_ids": tt})


def full_logits_logprobs(model, batch: SeqBatch) -> torch.Tensor:
    """Oracle: the stock HF forward with full logits, log-softmax, gather."""
    out = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False,
                **batch.vision)
    P, R = batch.prompt_len, batch.response_ids.shape[1]
    lp = torch.log_softmax(out.logits[:, P - 1:P - 1 + R].float(), -1)
    return lp.gather(-1, batch.response_ids[..., None]).squeeze(-1) * batch.response_mask
