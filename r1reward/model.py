"""Load a Qwen2.5-VL / Qwen2-VL checkpoint and its processor from a local directory.

``load_model_and_processor(None)`` loads the embedded tiny checkpoint through the very
same ``from_pretrained`` calls as a real one.
"""
from __future__ import annotations

import logging
import warnings
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def _image_only(processor_cls):
    """A subclass of a Qwen-VL processor without the video processor.

    transformers' video processors need torchvision, which the CPU wheel of torch does not
    pair with; images are all a reward model over image pairs needs.
    """
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_cls.__name__
    return ImageOnlyProcessor


def image_processor_for(min_pixels: int, max_pixels: int):
    try:  # the PIL implementation needs no torchvision
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Qwen2VLImageProcessor as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def save_processor(out_dir, tokenizer, image_processor) -> None:
    from transformers import Qwen2_5_VLProcessor

    proc = _image_only(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                            chat_template=tokenizer.chat_template)
    proc.save_pretrained(out_dir)


def _processor_class(model_type: str):
    from transformers import Qwen2_5_VLProcessor, Qwen2VLProcessor
    return Qwen2VLProcessor if model_type == "qwen2_vl" else Qwen2_5_VLProcessor


def load_processor(model_dir, model_type: str = "qwen2_5_vl"):
    """``AutoProcessor`` when it can load (torchvision present); otherwise the same
    processor built from the directory's tokenizer and image processor, without video."""
    from transformers import AutoImageProcessor, AutoProcessor, AutoTokenizer

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            proc = AutoProcessor.from_pretrained(model_dir)
    except Exception as err:  # noqa: BLE001 - any failure falls back to the image-only build
        log.debug("AutoProcessor failed (%s); building an image-only processor", err)
        tok = AutoTokenizer.from_pretrained(model_dir)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image_proc = AutoImageProcessor.from_pretrained(model_dir)
        proc = _image_only(_processor_class(model_type))(
            image_processor=image_proc, tokenizer=tok, chat_template=tok.chat_template)
    proc.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return proc


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
        from .tiny import default_model_dir
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
    return model, load_processor(model_dir, model_type)
