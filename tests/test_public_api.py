"""Public kernel API: README example, torch.compile, FSDP2 DTensor guard, input errors."""
import math
import os
import re
import socket
from pathlib import Path

import pytest
import torch

import r1reward.kernels as K
from r1reward.kernels import (
    StableReinforceLoss,
    fused_stable_reinforce_loss,
    stable_reinforce_loss,
    token_logprobs,
)

ROOT = Path(__file__).resolve().parents[1]


def _example_code():
    """The plain-PyTorch example block from the README."""
    for block in re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S):
        if "StableReinforceLoss(" in block and "toy LM" in block:
            return block
    pytest.fail("no StableReinforceLoss toy-LM example block in README.md")


def test_readme_example_trains_toy_lm():
    scope = {}
    exec(compile(_example_code(), "readme-example", "exec"), scope)
    hist = scope["history"]
    assert all(math.isfinite(x) for x in hist)
    # On-policy start: ratio 1 everywhere and the advantages average to 0, so loss 0; the
    # surrogate then falls until the PPO clip (ε = 0.2) stops it at −0.15.
    assert abs(hist[0]) < 1e-6
    assert hist[-1] < -0.1, f"loss did not go down: {hist}"
    assert scope["stats"]["clip_frac"] > 0


def test_module_forward_and_fused_agree():
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 5, 8, generator=g)
    w = torch.randn(11, 8, generator=g)
    y = torch.randint(0, 11, (2, 5), generator=g)
    mask = torch.rand(2, 5, generator=g) > 0.2
    old = token_logprobs(h, w, y, backend="torch") - 0.1
    adv = torch.randn(2, generator=g)
    mod = StableReinforceLoss(dual_clip=3.0, kl_coef=0.01, backend="torch")
    ref = old + 0.05
    a, _ = mod(token_logprobs(h, w, y, backend="torch"), old, adv, mask, ref_logp=ref)
    b, _ = mod.fused(h, w, y, old, adv, mask, ref_logp=ref)
    assert torch.allclose(a, b, rtol=1e-6, atol=1e-7)
    assert "torch" in repr(mod)


def test_torch_compile_fullgraph_matches_eager():
    g = torch.Generator().manual_seed(1)
    B, T, H, V = 2, 6, 8, 23
    h0 = torch.randn(B, T, H, generator=g)
    w0 = torch.randn(V, H, generator=g) / 3
    b0 = torch.randn(V, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) > 0.3
    old = token_logprobs(h0, w0, y, bias=b0, backend="torch") - 0.1
    adv = torch.randn(B, T, generator=g)

    def step(h, w, b):
        loss, stats = fused_stable_reinforce_loss(h, w, y, old, adv, mask, bias=b,
                                                  temperature=0.9, backend="torch",
                                                  return_entropy=True)
        lp = token_logprobs(h * 2.0, w, y, bias=b, backend="torch")
        return loss + 0.01 * (lp * mask).sum(), stats["clip_frac"], stats["entropy"]

    def run(fn):
        h, w, b = (x.clone().requires_grad_() for x in (h0, w0, b0))
        out = fn(h, w, b)
        return out, torch.autograd.grad(out[0], [h, w, b])

    torch._dynamo.reset()
    # aot_eager: Dynamo (fullgraph: any graph break fails) + AOTAutograd with the ops'
    # fake and autograd registrations, without Inductor's slow C++ build on CPU.
    backend = os.environ.get("R1REWARD_COMPILE_BACKEND", "aot_eager")
    got, g_got = run(torch.compile(step, fullgraph=True, backend=backend))
    want, g_want = run(step)
    for a, c in zip(got + g_got, want + g_want):
        torch.testing.assert_close(a, c, rtol=1e-6, atol=1e-7)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_fsdp2_dtensor_weight_is_refused_with_the_fix():
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                                rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        w = distribute_tensor(torch.randn(16, 4), mesh, [Shard(0)])
        h, y = torch.randn(1, 3, 4), torch.zeros(1, 3, dtype=torch.long)
        mask = torch.ones(1, 3, dtype=torch.bool)
        with pytest.raises(TypeError, match=r"weight is a DTensor.*full_tensor\(\)") as e:
            fused_stable_reinforce_loss(h, w, y, torch.zeros(1, 3), torch.ones(1), mask,
                                        backend="torch")
        assert "fully_shard" in str(e.value)
        with pytest.raises(TypeError, match="weight is a DTensor"):
            token_logprobs(h, w, y, backend="torch")
        # The suggested fix works: the full tensor goes through.
        lp = token_logprobs(h, w.full_tensor(), y, backend="torch")
        assert torch.isfinite(lp).all()
    finally:
        if created:
            dist.destroy_process_group()


@pytest.mark.parametrize("call, match", [
    (lambda a: token_logprobs(*a[:3], backend="nope"), "backend must be one of"),
    (lambda a: token_logprobs(*a[:3], temperature=0.0, backend="torch"), "temperature"),
    (lambda a: token_logprobs(a[0], a[1][:, :3], a[2], backend="torch"), r"hidden \[\.\.\., H=4\]"),
    (lambda a: token_logprobs(a[0], a[1], a[2][:, :2], backend="torch"), "targets shape"),
    (lambda a: fused_stable_reinforce_loss(*a, backend="torch", aggregation="mean"), "aggregation"),
    (lambda a: fused_stable_reinforce_loss(*a, backend="torch", clip_eps=(1.5, 0.2)), "clip_eps"),
    (lambda a: fused_stable_reinforce_loss(a[0], a[1], a[2], a[3][:, :2], *a[4:],
                                           backend="torch"), "old_logp must have"),
    (lambda a: fused_stable_reinforce_loss(*a[:4], torch.ones(5), a[5], backend="torch"),
     r"advantages \[B\]"),
    (lambda a: stable_reinforce_loss(a[3], a[3], a[4], a[5], kl_estimator="k9"), "kl_estimator"),
])
def test_bad_input_errors_name_the_field(call, match):
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    y = torch.randint(0, 7, (2, 3))
    args = (h, w, y, torch.zeros(2, 3), torch.ones(2), torch.ones(2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=match):
        call(args)


def test_triton_backend_refused_on_cpu_unless_interpreting(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(ValueError, match="use backend='torch' on CPU"):
        K.resolve_backend("triton", torch.device("cpu"))
    assert K.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_the_source_folder_never_shadows_a_top_level_kernels_package():
    # With the repository root first on sys.path (running from a checkout), "kernels" must
    # be Hugging Face's package when it is installed (transformers >= 5.25 requires it and
    # imports its names), or nothing: never these sources, which live in kernels/python/.
    import subprocess
    import sys
    assert not (ROOT / "kernels" / "__init__.py").exists()
    code = (
        "import sys; root = " + repr(str(ROOT)) + "; sys.path.insert(0, root)\n"
        "import importlib.util as u\n"
        "spec = u.find_spec('kernels')\n"
        "origin = spec.origin if spec else None\n"
        "assert not (origin or '').startswith(root + '/kernels/'), origin\n"
        "from transformers.activations import ACT2FN\n"  # imports kernels when installed
        "import r1reward.kernels as K\n"
        "assert K.__file__.startswith(root + '/kernels/python/'), K.__file__\n"
        "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
