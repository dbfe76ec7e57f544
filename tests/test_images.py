"""r1reward.images.open_image: mode conversion, full decoding, what the Qwen2-VL image
processor accepts, and that data loading skips (never crashes on) a bad image."""
import io
import json

import numpy as np
import pytest
from PIL import Image

from r1reward.data import generate_dataset, load_pairs
from r1reward.images import MAX_ASPECT_RATIO, ImageTooLarge, open_image


def _save(im, path, **kw):
    im.save(path, **kw)
    return path


def test_16bit_greyscale_png_keeps_its_shape(tmp_path):
    a = np.full((40, 60), 1000, np.uint16)
    a[10:30, 20:40] = 60000  # a bright square on a dark 16-bit background
    p = _save(Image.fromarray(a), tmp_path / "grey16.png")
    assert Image.open(p).mode.startswith("I")  # Pillow opens it as a 16-bit mode
    rgb = np.asarray(open_image(p))
    assert rgb.shape == (40, 60, 3)
    assert (rgb[20, 30] == round(60000 / 257)).all() and (rgb[0, 0] == round(1000 / 257)).all()
    assert rgb.min() < 10 and rgb.max() > 200  # Pillow's plain convert made it all white
    # mode "I" (32-bit) holding 16-bit values is scaled the same way; 8-bit values are kept
    assert np.asarray(open_image(Image.fromarray(a.astype(np.int32))))[20, 30, 0] == 233
    assert np.asarray(open_image(Image.fromarray(np.full((4, 4), 200, np.int32))))[0, 0, 0] == 200


def test_transparency_is_composited_on_white(tmp_path):
    rgba = Image.new("RGBA", (20, 20), (0, 0, 0, 0))  # transparent black background
    rgba.paste((200, 0, 0, 255), (5, 5, 15, 15))
    rgb = open_image(_save(rgba, tmp_path / "rgba.png"))
    assert rgb.mode == "RGB" and rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((10, 10)) == (200, 0, 0)
    half = open_image(Image.new("RGBA", (2, 2), (0, 0, 0, 128)))  # half-transparent black
    assert half.getpixel((0, 0)) == (127, 127, 127)
    la = open_image(Image.new("LA", (3, 3), (0, 0)))
    assert la.getpixel((1, 1)) == (255, 255, 255)
    # a palette image whose colour 0 is transparent (tRNS chunk)
    p = Image.new("P", (4, 4), 0)
    p.putpalette([0, 0, 0, 0, 0, 255] + [0] * 762)
    p.putpixel((1, 1), 1)
    pal = open_image(_save(p, tmp_path / "pal_t.png", transparency=0))
    assert pal.getpixel((0, 0)) == (255, 255, 255) and pal.getpixel((1, 1)) == (0, 0, 255)


def test_palette_cmyk_and_bilevel_convert(tmp_path):
    p = Image.new("P", (6, 6), 1)
    p.putpalette([255, 0, 0, 0, 128, 0] + [0] * 762)
    p.putpixel((0, 0), 0)
    rgb = open_image(_save(p, tmp_path / "pal.png"))
    assert rgb.getpixel((0, 0)) == (255, 0, 0) and rgb.getpixel((3, 3)) == (0, 128, 0)
    cmyk = open_image(_save(Image.new("CMYK", (8, 8), (0, 255, 255, 0)), tmp_path / "c.jpg"))
    r, g, b = cmyk.getpixel((4, 4))
    assert r > 200 and g < 60 and b < 60  # full magenta + yellow ink = red
    assert open_image(Image.new("1", (3, 3), 1)).getpixel((0, 0)) == (255, 255, 255)


def _truncated(tmp_path, fmt):
    rng = np.random.default_rng(0)
    im = Image.fromarray((rng.random((64, 64, 3)) * 255).astype(np.uint8))
    buf = io.BytesIO()
    im.save(buf, format=fmt)
    p = tmp_path / f"cut.{fmt.lower()}"
    p.write_bytes(buf.getvalue()[:len(buf.getvalue()) // 2])
    return p


@pytest.mark.parametrize("fmt", ["PNG", "JPEG"])
def test_truncated_file_fails_when_opened_naming_the_file(tmp_path, fmt):
    p = _truncated(tmp_path, fmt)
    if fmt == "JPEG":
        Image.open(p).verify()  # the old header-only check let a cut JPEG through
    with pytest.raises(ValueError, match=rf"{p}.*not a readable image.*truncated"):
        open_image(p)
    with pytest.raises(ValueError, match="request image is not a readable image"):
        open_image(p.read_bytes(), name="request image")


def test_aspect_ratio_the_processor_refuses(tmp_path):
    # (the PIL image processor's copy of smart_resize: the torchvision one needs torchvision)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize

    p = _save(Image.new("RGB", (4000, 10)), tmp_path / "strip.png")
    with pytest.raises(ValueError, match=rf"{p} is 4000x10: aspect ratio 400:1 is over 200:1"):
        open_image(p)
    # the same rule as transformers' Qwen2-VL smart_resize: 200:1 passes, beyond it raises
    assert MAX_ASPECT_RATIO == 200
    smart_resize(10, 2000)
    assert open_image(Image.new("RGB", (2000, 10))).size == (2000, 10)
    with pytest.raises(ValueError, match="aspect ratio"):
        smart_resize(10, 2010)
    with pytest.raises(ValueError, match="aspect ratio"):
        open_image(Image.new("RGB", (10, 2010)))
    assert open_image(Image.new("RGB", (1, 1))).size == (1, 1)  # 1 px is enough


def test_limits_missing_files_and_bad_sources(tmp_path):
    big = _save(Image.new("RGB", (300, 300)), tmp_path / "big.png")
    with pytest.raises(ImageTooLarge, match="300x300, over the limit of 40000 pixels"):
        open_image(big, max_pixels=200 * 200)
    with pytest.raises(FileNotFoundError, match="nope.png"):
        open_image(tmp_path / "nope.png")
    with pytest.raises(ValueError, match="image bytes is not a readable image"):
        open_image(b"junk")
    with pytest.raises(TypeError, match="image must be"):
        open_image(3)


def test_load_pairs_skips_bad_images_with_file_and_line(tmp_path):
    train, _ = generate_dataset(tmp_path / "d", 4, 0)
    lines = train.read_text().splitlines()
    images = tmp_path / "d" / "images"
    _truncated(tmp_path, "PNG").replace(images / "train_000001.png")
    _save(Image.new("RGB", (4000, 10)), images / "train_000002.png")
    res = load_pairs(train)
    assert [p.id for p in res.pairs] == ["train-000000", "train-000003"]
    why = dict(res.skipped)
    assert set(why) == {2, 3}
    assert why[2].startswith(f"{train}:2: field 'message': image file ")
    assert "train_000001.png is not a readable image" in why[2]
    assert why[3].startswith(f"{train}:3: ") and "train_000002.png is 4000x10: aspect ratio" in why[3]
    with pytest.raises(ValueError, match=rf"{train}:2: .*train_000001.png"):
        load_pairs(train, strict=True)
    assert json.loads(lines[0])["id"] == "train-000000"
