"""Opening images: the one loader for data files, benchmarks, the judge and the server.

:func:`open_image` takes a path, encoded bytes or a PIL image and returns a fully decoded
RGB image that the Qwen2-VL image processor accepts, or raises ``ValueError`` naming the
image and the reason. Decoding happens here, not later in the processor, so a truncated
or corrupt file is refused where it is opened (``load_pairs`` skips its line) and never
fails a rollout or an evaluation batch.

RGB conversion (Pillow's plain ``convert("RGB")`` gets several of these wrong):
- 16-bit greyscale (``I;16*``; ``I`` holding values above 255) is scaled to 8 bits;
  Pillow clips it, so a 16-bit PNG used to come out almost entirely white;
- transparency (RGBA, LA, PA, palette or greyscale with a transparent colour) is
  composited on white, as the release's ``to_rgb`` does; dropping alpha made transparent
  areas black;
- CMYK, YCbCr, 1-bit, palette... convert as Pillow does.
EXIF orientation is not applied (neither the processor nor the release applies it).
"""
from __future__ import annotations

import io
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

# transformers' Qwen2-VL ``smart_resize`` (image_processing_qwen2_vl.py) raises
# "absolute aspect ratio must be smaller than 200" when max(h, w) / min(h, w) > 200.
# Any other size is resized to multiples of 28 px within [min_pixels, max_pixels], so at
# least 1 px per side is all it needs beyond that.
MAX_ASPECT_RATIO = 200
BACKGROUND = (255, 255, 255)  # what transparent pixels become
_SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")
_ALPHA = ("RGBA", "LA", "PA", "RGBa", "La")


class ImageTooLarge(ValueError):
    """More pixels than the caller allows (the server answers 413 for it)."""


def check_size(width: int, height: int, label: str = "image", max_pixels: int | None = None) -> None:
    """Raise ``ValueError`` unless the Qwen2-VL image processor accepts a ``width x height``
    image (and, with ``max_pixels``, ``ImageTooLarge`` above that many pixels)."""
    if width < 1 or height < 1:
        raise ValueError(f"{label} is {width}x{height}: an image needs at least 1 pixel per side")
    ratio = max(width, height) / min(width, height)
    if ratio > MAX_ASPECT_RATIO:
        raise ValueError(f"{label} is {width}x{height}: aspect ratio {ratio:.4g}:1 is over "
                         f"{MAX_ASPECT_RATIO}:1, the most the Qwen2-VL image processor accepts")
    if max_pixels is not None and width * height > max_pixels:
        raise ImageTooLarge(f"{label} is {width}x{height}, over the limit of {max_pixels} pixels")


def _grey16_to_l(im: Image.Image) -> Image.Image:
    a = np.asarray(im).astype(np.float64)
    if im.mode in _SIXTEEN_BIT or a.max(initial=0) > 255:  # "I" in 8-bit range stays as is
        a = np.clip(a, 0, 65535) / 257.0
    return Image.fromarray(np.rint(np.clip(a, 0, 255)).astype(np.uint8), "L")


def to_rgb(im: Image.Image) -> Image.Image:
    """A new RGB image from a decoded PIL image of any mode (see the module docstring)."""
    if im.mode in _SIXTEEN_BIT or im.mode == "I":
        im = _grey16_to_l(im)
    if im.mode in _ALPHA or "transparency" in im.info:
        rgba = im.convert("RGBA")
        out = Image.new("RGB", rgba.size, BACKGROUND)
        out.paste(rgba, mask=rgba.getchannel("A"))
        return out
    return im.convert("RGB")  # a copy even when already RGB


def open_image(source, *, name: str | None = None, max_pixels: int | None = None) -> Image.Image:
    """A path, encoded bytes or a PIL image -> a decoded RGB image the processor accepts.

    ``name`` labels the image in error messages (default: ``image file <path>``, ``image
    bytes`` or ``image``). Raises ``FileNotFoundError`` for a missing path, ``TypeError``
    for another kind of source, and ``ValueError`` (``ImageTooLarge`` past ``max_pixels``,
    which is checked from the header, before decoding) for anything the model cannot take.
    """
    if isinstance(source, Image.Image):
        label = name or "image"
        check_size(*source.size, label, max_pixels)
        return _decode(source, label)
    if isinstance(source, (bytes, bytearray, memoryview)):
        label, fp = name or "image bytes", io.BytesIO(bytes(source))
    elif isinstance(source, (str, os.PathLike)):
        path = Path(source)
        label = name or f"image file {path}"
        if not path.is_file():
            raise FileNotFoundError(f"image file not found: {path}")
        fp = path
    else:
        raise TypeError(f"image must be a path, PIL image or bytes, got {type(source).__name__}")
    try:
        im = Image.open(fp)
    except Image.DecompressionBombError as e:
        raise ImageTooLarge(f"{label}: {e}") from None
    except Exception as e:  # PIL raises several types for what is not an image
        raise ValueError(f"{label} is not a readable image ({type(e).__name__}: {e})") from None
    with im:
        check_size(*im.size, label, max_pixels)  # header only: nothing decoded yet
        return _decode(im, label)


def _decode(im: Image.Image, label: str) -> Image.Image:
    try:
        im.load()  # the full decode: a truncated or corrupt file fails here
    except Exception as e:
        raise ValueError(f"{label} is not a readable image ({type(e).__name__}: {e})") from None
    try:
        return to_rgb(im)
    except Exception as e:
        raise ValueError(f"{label}: cannot convert image mode {im.mode} to RGB "
                         f"({type(e).__name__}: {e})") from None


def image_problems(paths: Iterable) -> dict:
    """``{path: None if it opens (see open_image), else the reason}`` for each distinct
    path, decoded on a few threads (Pillow decodes without holding the GIL)."""
    def problem(path) -> str | None:
        try:
            open_image(path)
        except (OSError, ValueError) as e:
            return str(e)
        return None

    unique = list(dict.fromkeys(paths))
    if len(unique) < 2:
        return {p: problem(p) for p in unique}
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        return dict(zip(unique, pool.map(problem, unique)))
