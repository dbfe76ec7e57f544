"""The embedded tiny checkpoint loads like a real one and generates judgments."""
import json

import pytest
import torch

from r1reward.data import generate_dataset, load_pairs
from r1reward.generation import generate, response_mask
from r1reward.model import load_model_and_processor


def test_checkpoint_reloads_and_places_vision_tokens(tiny_dir, tmp_path):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == "qwen2_5_vl" and cfg["vision_config"]["depth"] == 2
    model, proc = load_model_and_processor(tiny_dir)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    train, _ = generate_dataset(tmp_path, 2, 0)
    pair = load_pairs(train).pairs[0]
    from r1reward.generation import build_prompt_inputs
    inputs = build_prompt_inputs(proc, [pair])
    ids = inputs["input_ids"][0].tolist()
    tok = proc.tokenizer
    vs, pad, ve = (tok.convert_tokens_to_ids(t)
                   for t in ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>"))
    n_pad = ids.count(pad)
    assert n_pad == int(inputs["image_grid_thw"][0].prod()) // 4  # merge 2x2
    start = ids.index(vs)
    assert ids[start + 1:start + 1 + n_pad] == [pad] * n_pad and ids[start + 1 + n_pad] == ve
    text = tok.decode(ids)
    assert text.rstrip().endswith("<|im_start|>assistant")
    with torch.no_grad():
        out = model(**inputs)
    assert out.logits.shape[-1] == len(tok) and torch.isfinite(out.logits).all()
    for t in ("<think>", "</think>", "<answer>", "</answer>"):
        assert len(tok.tokenize(t)) == 1


def test_missing_checkpoint_names_the_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_model_and_processor(tmp_path / "nowhere")


def test_generation_masks_stop_at_end_of_turn(tiny_dir, tmp_path):
    model, proc = load_model_and_processor(tiny_dir)
    train, _ = generate_dataset(tmp_path, 3, 0)
    pairs = load_pairs(train).pairs
    torch.manual_seed(0)
    g = generate(model, proc, pairs, do_sample=True, max_new_tokens=6, num_samples=2)
    assert g.sequences.shape[0] == 6 and g.response_ids.shape == g.response_mask.shape
    assert len(g.texts) == 6 and g.prompt_len == g.prompt_inputs["input_ids"].shape[1]
    eot = proc.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([[5, 6, eot, 7, eot], [5, 6, 7, 8, 9]])
    assert response_mask(ids, [eot]).tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_build_is_byte_deterministic_and_auto_classes_load(tmp_path):
    import hashlib

    from transformers import AutoConfig, AutoImageProcessor, AutoTokenizer

    from r1reward.tiny import build_tiny_checkpoint
    a, b = (build_tiny_checkpoint(tmp_path / d, seed=0, reading_steps=3) for d in "ab")
    names = sorted(p.name for p in a.iterdir())
    assert {"config.json", "model.safetensors", "tokenizer.json", "processor_config.json",
            "reading.json"} <= set(names)
    for n in set(names) - {"reading.json"}:  # it holds the seconds the caption steps took
        digest = [hashlib.sha256((d / n).read_bytes()).digest() for d in (a, b)]
        assert digest[0] == digest[1], n
    cfg = AutoConfig.from_pretrained(a)
    tok = AutoTokenizer.from_pretrained(a)
    assert cfg.text_config.vocab_size == len(tok)
    assert cfg.image_token_id == tok.convert_tokens_to_ids("<|image_pad|>")
    assert tok.eos_token == "<|im_end|>"
    # Structure tokens survive decoding with special tokens stripped (the format reward
    # reads decoded text); the end-of-turn token does not.
    s = "<think>Response 2 is better.</think><answer>2</answer>"
    assert tok.decode(tok.encode(s + "<|im_end|>"), skip_special_tokens=True) == s
    ip = AutoImageProcessor.from_pretrained(a)
    assert (ip.size["shortest_edge"], ip.size["longest_edge"]) == (56 * 56, 56 * 56)


def _has_torchvision() -> bool:
    import importlib.util
    return importlib.util.find_spec("torchvision") is not None


def _check_standard_loaders(d):
    """``d`` loads with the stock transformers Auto classes (what a user of an export, or of
    the embedded checkpoint, would call)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor
    from transformers.video_processing_utils import BaseVideoProcessor

    from r1reward.model import load_processor

    model = AutoModelForImageTextToText.from_pretrained(d)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    # The video processor's config is where transformers' own lookup finds it (the nested
    # entry Qwen2_5_VLProcessor.save_pretrained writes), at the image processor's settings.
    saved = json.loads((d / "processor_config.json").read_text())
    assert saved["processor_class"] == "Qwen2_5_VLProcessor"
    video, _ = BaseVideoProcessor.get_video_processor_dict(str(d))
    assert video == saved["video_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    image = saved["image_processor"]
    assert {k: v for k, v in video.items() if k != "video_processor_type"} == {
        k: v for k, v in image.items() if k != "image_processor_type"}
    if _has_torchvision():
        proc = AutoProcessor.from_pretrained(d)
        assert type(proc.video_processor).__name__ == "Qwen2VLVideoProcessor"
        assert proc.video_processor.size == proc.image_processor.size
    else:
        # Without torchvision AutoProcessor cannot load a Qwen-VL processor at all in this
        # transformers version: the processor requires a video processor and
        # Qwen2VLVideoProcessor requires torchvision. It now gets as far as that (before
        # the config was missing: "Can't load video processor"); r1reward.model's loader
        # falls back to the same processor without video.
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(d)
    proc = load_processor(d)
    assert type(proc).__name__ == "Qwen2_5_VLProcessor" and proc.image_processor.size == {
        "shortest_edge": image["size"]["shortest_edge"], "longest_edge": image["size"]["longest_edge"]}
    return model


def test_standard_transformers_loaders_read_the_checkpoint(tiny_dir):
    _check_standard_loaders(tiny_dir)


def test_export_loads_with_standard_transformers_loaders(tiny_dir, tmp_path):
    from r1reward.export import export_hf

    model, proc = load_model_and_processor(tiny_dir)
    out = export_hf(model, proc, tmp_path / "export")
    reloaded = _check_standard_loaders(out)
    want = model.state_dict()
    for k, v in reloaded.state_dict().items():
        assert torch.equal(v, want[k]), k


def test_tiny_does_not_import_model():
    """r1reward.tiny and r1reward.model share r1reward.processor instead of importing each
    other (model -> tiny only)."""
    import subprocess
    import sys
    code = "import sys, r1reward.tiny; assert 'r1reward.model' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_patch_embedding_as_one_gemm_matches_the_conv3d(tiny_dir):
    """load_model_and_processor runs the patch embedding as a GEMM: same values and
    gradients as HF's Conv3d forward, same parameter names, the Qwen2-VL class too."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchEmbed

    from r1reward.model import linear_patch_embed

    model, _ = load_model_and_processor(tiny_dir)
    embed = model.model.visual.patch_embed
    assert "forward" in vars(embed)  # switched on this instance
    names = [n for n, _ in model.named_parameters()]
    assert "model.visual.patch_embed.proj.weight" in names
    embed.double()  # float64: the two paths sum in different orders
    torch.manual_seed(0)
    x = torch.randn(37, 3 * 2 * 14 * 14, dtype=torch.float64, requires_grad=True)
    ours = embed(x)
    ours.square().sum().backward()
    g_ours, gw_ours = x.grad.clone(), embed.proj.weight.grad.clone()
    x.grad, embed.proj.weight.grad = None, None
    conv = type(embed).forward(embed, x)  # the class's own Conv3d forward
    conv.square().sum().backward()
    torch.testing.assert_close(ours, conv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(x.grad, g_ours, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(embed.proj.weight.grad, gw_ours, rtol=1e-12, atol=1e-12)

    qwen2 = torch.nn.Sequential(PatchEmbed(patch_size=14, temporal_patch_size=2, in_channels=3,
                                           embed_dim=16))
    y = torch.randn(5, 3 * 2 * 14 * 14)
    want = qwen2[0](y)
    assert linear_patch_embed(qwen2) == 1
    torch.testing.assert_close(qwen2[0](y), want, rtol=1e-5, atol=1e-5)
    assert linear_patch_embed(torch.nn.Sequential(torch.nn.Conv3d(3, 4, 2))) == 0
