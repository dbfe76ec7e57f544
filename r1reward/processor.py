"""The Qwen-VL processor (tokenizer + image processor): build, save and load it.

r1reward.tiny writes the embedded checkpoint's processor with it and r1reward.model
loads every checkpoint's processor with it, so neither has to import the other.

transformers' video processors need torchvision, which the CPU wheel of torch does not
pair with, and images are all a reward model over image pairs needs; without torchvision
the processor is built without a video processor (:func:`image_only`). Its saved config
still carries the ``video_processor`` entry that ``Qwen2_5_VLProcessor.save_pretrained``
writes, so ``AutoProcessor.from_pretrained`` loads the directory wherever torchvision is
installed.
"""
from __future__ import annotations

import functools
import logging
import warnings

log = logging.getLogger(__name__)

# The video processor class of both Qwen2-VL and Qwen2.5-VL (transformers' auto mapping).
VIDEO_PROCESSOR_TYPE = "Qwen2VLVideoProcessor"
# Image-processor settings the video processor shares (the keys transformers writes for
# both): a video is processed at the image processor's resolution, patch and merge sizes.
_SHARED_WITH_VIDEO = ("do_convert_rgb", "do_normalize", "do_rescale", "do_resize", "image_mean",
                      "image_std", "merge_size", "patch_size", "resample", "rescale_factor", "size",
                      "temporal_patch_size")


def video_processor_config(image_processor) -> dict:
    """The ``video_processor`` entry of ``processor_config.json`` for a Qwen-VL image
    processor: what ``Qwen2VLVideoProcessor(**shared settings).to_dict()`` would write,
    less the class defaults, which a loader fills in the same way."""
    d = image_processor.to_dict()
    return {**{k: d[k] for k in _SHARED_WITH_VIDEO if k in d},
            "video_processor_type": VIDEO_PROCESSOR_TYPE}


@functools.cache
def image_only(processor_cls):
    """A subclass of a Qwen-VL processor class that works without a video processor and
    saves the video processor's config all the same (see the module docstring)."""
    from transformers.processing_utils import ProcessorMixin

    class ImageOnlyProcessor(processor_cls):
        def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
            self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
            self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
            self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
            self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
            ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

        def to_dict(self) -> dict:  # what save_pretrained writes to processor_config.json
            out = super().to_dict()
            out.setdefault("video_processor", video_processor_config(self.image_processor))
            return out

    ImageOnlyProcessor.__name__ = ImageOnlyProcessor.__qualname__ = processor_cls.__name__
    return ImageOnlyProcessor


def image_processor_for(min_pixels: int, max_pixels: int):
    try:  # the PIL implementation needs no torchvision
        from transformers import Qwen2VLImageProcessorPil as cls
    except ImportError:  # pragma: no cover - older transformers
        from transformers import Qwen2VLImageProcessor as cls
    return cls(min_pixels=min_pixels, max_pixels=max_pixels)


def save_processor(out_dir, tokenizer, image_processor) -> None:
    """Write a Qwen2.5-VL processor (tokenizer, chat template, image and video processor
    configs) into ``out_dir``."""
    from transformers import Qwen2_5_VLProcessor

    proc = image_only(Qwen2_5_VLProcessor)(image_processor=image_processor, tokenizer=tokenizer,
                                           chat_template=tokenizer.chat_template)
    proc.save_pretrained(out_dir)


def processor_class(model_type: str):
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
        proc = image_only(processor_class(model_type))(
            image_processor=image_proc, tokenizer=tok, chat_template=tok.chat_template)
    proc.tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    return proc
