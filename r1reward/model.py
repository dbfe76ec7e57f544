"""Load a Qwen2.5-VL / Qwen2-VL checkpoint and its processor from a local directory.

``load_model_and_processor(None)`` loads the embedded tiny checkpoint through the very
same ``from_pretrained`` calls as a real one. (Processor code: r1reward.processor.)
"""
from __future__ import annotations

from pathlib import Path

import torch

from .patch_embed import linear_patch_embed
from .processor import load_processor
from .tiny import default_model_dir

__all__ = ["attention_implementation", "linear_patch_embed", "load_model_and_processor", "load_processor"]


def _model_class(model_type: str):
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
    if model_type == "qwen2_5_vl":
        return Qwen2_5_VLForConditionalGeneration
    if model_type == "qwen2_vl":
        return Qwen2VLForConditionalGeneration
    raise ValueError(f"model_type {model_type!r} is not a Qwen2.5-VL or Qwen2-VL checkpoint")


def attention_implementation(device) -> str:
    if torch.device(device).type == "cuda":
        try:
            import flash_attn  # noqa: F401
            return "flash_attention_2"
        except ImportError:
            pass
    return "sdpa"


def load_model_and_processor(model_dir=None, *, dtype=None, device="cpu"):
    """``(model, processor)`` from a local checkpoint directory (None = embedded tiny)."""
    if model_dir is None:
        model_dir = default_model_dir()
    model_dir = Path(model_dir)
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"--model {model_dir}: not a checkpoint directory "
                                "(no config.json); pass a local Qwen2.5-VL or Qwen2-VL directory")
    from transformers import AutoConfig
    model_type = AutoConfig.from_pretrained(model_dir).model_type
    cls = _model_class(model_type)
    if dtype is None:
        dtype = torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    model = cls.from_pretrained(model_dir, dtype=dtype,
                                attn_implementation=attention_implementation(device))
    model.to(device)
    linear_patch_embed(model)
    return model, load_processor(model_dir, model_type)
