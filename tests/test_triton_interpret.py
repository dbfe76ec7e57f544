"""Triton kernels under TRITON_INTERPRET=1 on CPU vs the float64 full-logits oracle.

Triton decides interpreter-or-compiler when a ``@triton.jit`` decorator runs, and its own
library helpers (``tl.zeros``, ``tl.sum``, ...) are decorated when triton is first
imported. So the interpreter only works in a process that had TRITON_INTERPRET=1 before
importing triton. When this module finds triton already imported without it (the normal
``pytest tests`` run, where other modules import triton first), it replaces its tests by
one test that re-runs this file in a child pytest with TRITON_INTERPRET=1 and fails with
the child's report if any case fails. Triton missing = import error = failure, not a skip.
"""
import importlib
import math
import os
import subprocess
import sys

import pytest
import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from r1reward.kernels import reference as ref
from r1reward.kernels.loss_math import LossSettings, loss_and_grad, token_weights

F64 = torch.float64
# True only if triton itself was imported in interpreter mode (see the docstring).
INTERPRETED = isinstance(tl.zeros, InterpretedFunction)


@pytest.fixture(scope="module")
def ops():
    mod = importlib.import_module("r1reward.kernels.triton_ops")
    for k in ("_fwd_partial_kernel", "_fwd_combine_kernel"):
        assert isinstance(getattr(mod.triton_fwd, k), InterpretedFunction), k
    assert isinstance(mod.triton_bwd._bwd_kernel, InterpretedFunction)
    assert os.environ.get("TRITON_INTERPRET") == "1"  # functional.py then accepts CPU
    return mod


def check(name, got, want, atol, rtol=0.0):
    assert got is not None, f"{name}: missing"
    assert torch.isfinite(got.double()).all(), f"{name}: non-finite values {got}"
    torch.testing.assert_close(got.double(), want.double(), atol=atol, rtol=rtol,
                               msg=lambda m: f"{name}: {m}")


def make(N, H, V, *, dtype=torch.float32, scale=1.0, bias=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = (torch.randn(N, H, generator=g) * scale).to(dtype)
    w = (torch.randn(V, H, generator=g) / math.sqrt(H)).to(dtype)
    b = (torch.randn(V, generator=g) * 0.5).to(dtype) if bias else None
    t = torch.randint(0, V, (N,), generator=g)
    return h, w, b, t, g


def leaves(*ts, dtype=None):
    return [None if t is None else t.detach().to(dtype or t.dtype).requires_grad_() for t in ts]


def grads(*ts):
    return [None if t is None else t.grad for t in ts]


def run_tlp(ops, h, w, b, t, gw, *, temperature=1.0, entropy=False):
    """Kernel vs float64 oracle: (kernel lp, ent, grads), (oracle lp, ent, grads)."""
    hk, wk, bk = leaves(h, w, b)
    lp, ent = ops.token_logprobs(hk, wk, t, bias=bk, temperature=temperature,
                                 ignore_index=-100, return_entropy=entropy)
    (lp * gw).sum().backward()
    hr, wr, br = leaves(h, w, b, dtype=F64)
    lr, er = ref.token_logprobs(hr, wr, t, bias=br, temperature=temperature, ignore_index=-100,
                                return_entropy=entropy, compute_dtype=F64)
    (lr * gw.double()).sum().backward()
    return (lp, ent, grads(hk, wk, bk)), (lr, er, grads(hr, wr, br))


def compare(name, got, want, atol=2e-5, rtol=1e-4, gatol=None):
    (lp, ent, gk), (lr, er, gr) = got, want
    assert lp.dtype == torch.float32, f"{name}: lp dtype {lp.dtype}"
    check(f"{name} lp", lp, lr, atol, rtol)
    if er is not None:
        check(f"{name} entropy", ent, er, atol, rtol)
    for label, a, b in zip(("dh", "dW", "dbias"), gk, gr):
        if b is not None:
            check(f"{name} {label}", a, b, gatol or atol, rtol)


# ------------------------------------------------------------------- token_logprobs
@pytest.mark.parametrize("N,H,V,bias,temp,splits", [
    (1, 16, 40, False, 1.0, None),      # N = 1, V not a multiple of BLOCK_V=32
    (7, 24, 70, True, 0.7, None),       # bias, temperature, H not a multiple of BLOCK_H
    (19, 16, 100, True, 1.3, 3),        # rows span two row blocks, vocab split in 3
])
def test_token_logprobs_values_and_grads(ops, N, H, V, bias, temp, splits):
    h, w, b, t, g = make(N, H, V, bias=bias, scale=2.0)
    if N > 2:
        t[1] = -100  # ignored row: lp 0, no gradient
    gw = torch.randn(N, generator=g)
    with ops.use_config(splits=splits):
        got, want = run_tlp(ops, h, w, b, t, gw, temperature=temp, entropy=True)
    compare(f"N={N} V={V}", got, want)
    if N > 2:
        assert got[0][1] == 0 and got[1][1] == 0 and (got[2][0][1] == 0).all()


def test_vocab_151936(ops):
    # The real Qwen2.5 vocabulary: int64 offsets, many vocab tiles, tail tile of 4 736.
    h, w, b, t, g = make(3, 16, 151936, bias=True, scale=3.0)
    t[0] = 151935  # the last vocab row
    big = dict(BLOCK_N=16, BLOCK_V=8192, BLOCK_H=16, num_warps=1, num_stages=1)
    with ops.use_config(fwd=big, bwd=dict(big, GROUP=1), splits=4):
        got, want = run_tlp(ops, h, w, b, t, torch.randn(3, generator=g), entropy=True)
    compare("V=151936", got, want)


def test_all_masked_batch(ops):
    h, w, b, t, _ = make(5, 16, 40, bias=True)
    t[:] = -100
    got, want = run_tlp(ops, h, w, b, t, torch.ones(5), entropy=True)
    lp, ent, gk = got
    assert (lp == 0).all() and (ent == 0).all()
    for gr in gk:
        assert torch.isfinite(gr).all() and (gr == 0).all()


def test_extreme_logits_no_nan(ops):
    # Logits of about ±1e4: the online LSE must neither overflow nor produce NaN.
    h, w, b, t, g = make(6, 16, 50)
    w = w * (1e4 / (h @ w.T).abs().max())
    got, want = run_tlp(ops, h, w, None, t, torch.randn(6, generator=g), entropy=True)
    lp = got[0]
    assert (want[0].abs() > 100).any(), "test data should reach large |lp|"
    # fp32 logits of size 1e4 carry ~1e-3 absolute rounding.
    compare("±1e4 logits", got, want, atol=5e-2, rtol=1e-5, gatol=5e-2)
    assert torch.isfinite(lp).all()


def test_bf16_inputs_give_bf16_grads(ops):
    h, w, b, t, g = make(9, 32, 90, dtype=torch.bfloat16, bias=True, scale=2.0)
    got, want = run_tlp(ops, h, w, b, t, torch.randn(9, generator=g), temperature=0.9)
    for gr, like in zip(got[2], (h, w, b)):
        assert gr.dtype == torch.bfloat16 and gr.shape == like.shape
    # Logits are fp32 sums of exact bf16 products: lp is fp32-accurate; gradients carry
    # the bf16 rounding of dz and of the output (Liger's bf16 tolerances).
    check("bf16 lp", got[0], want[0], 1e-4, 1e-4)
    for label, a, e in zip(("dh", "dW", "dbias"), got[2], want[2]):
        check(f"bf16 {label}", a, e, 5e-3, 5e-2)


def test_fp16_tiny_softmax_gradient_is_not_flushed(ops):
    # dz = g·(onehot − p) off the targets is ~1e-9 here (g = 1e-3, p ~ 1e-6 over 2 000
    # tokens), below fp16's smallest subnormal (6e-8): cast as is it would be 0 and the
    # non-target rows of ∂W would be 0. Scaled per tile, the fp32 gradient buffers keep
    # fp16's relative accuracy (checked on the kernel's fp32 outputs: an fp16 ∂W of this
    # size would itself be subnormal).
    N, H, V = 9, 32, 2000
    h, w, _, t, g = make(N, H, V, scale=0.1)
    h = (h + 5.0 * w[t] * H ** 0.5).half()  # peaked: p_target ~0.9, most others < 3e-5
    w = w.half()
    gl = torch.full((N,), 1e-3)
    z = h.double() @ w.double().T
    lse = torch.logsumexp(z, -1)
    p = torch.softmax(z, -1)
    assert (gl[:, None] * p < 3e-8).float().mean() > 0.95, "the case must underflow fp16"
    dz = gl[:, None].double() * (torch.nn.functional.one_hot(t, V).double() - p)
    dh, dw, _ = ops.triton_bwd.launch_backward(
        h, w, None, t, gl, lse.float(), temperature=1.0, config=ops._bwd_cfg(h),
        need_db=False)
    off = torch.ones(V, dtype=torch.bool)
    off[t] = False
    want_dw = dz.T @ h.double()
    # Per non-target row of ∂W, relative error; rows within 1e-4 of the largest (below
    # that, the tile-relative fp16 resolution ends). Unscaled: most of them are 0.
    norm = want_dw.norm(dim=1)
    rows = off & (norm > 1e-4 * norm[off].max())
    rel = (dw.double() - want_dw).norm(dim=1)[rows] / norm[rows]
    assert rows.sum() > 100 and rel.max() < 1e-2, f"{int(rows.sum())} rows, max rel err {rel.max():.3g}"
    check("fp16 dh", dh, dz @ w.double(), 1e-2 * (dz @ w.double()).abs().max().item())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_minus_inf_bias_gives_finite_entropy_and_grads(ops, backend):
    # A −inf logit (a banned token's bias) has p = 0 and contributes 0 to the entropy
    # (p·log p → 0), never 0·(−inf) = NaN.
    import r1reward.kernels as K
    h, w, b, t, g = make(7, 16, 40, bias=True)
    b = b.clone()
    b[[3, 17]] = float("-inf")
    t[t == 3] = 4
    t[t == 17] = 5
    hk, wk = leaves(h, w)
    lp, ent = K.token_logprobs(hk, wk, t, bias=b, return_entropy=True, backend=backend)
    lp.sum().backward()
    z = h.double() @ w.double().T + b.double()
    logp = torch.log_softmax(z, -1)
    p = logp.exp()
    want_ent = -(p * torch.where(p > 0, logp, 0.0)).sum(-1)
    check(f"{backend} entropy", ent, want_ent, 2e-5, 1e-4)
    check(f"{backend} lp", lp, logp.gather(1, t[:, None]).squeeze(1), 2e-5, 1e-4)
    assert torch.isfinite(hk.grad).all() and torch.isfinite(wk.grad).all()
    assert (wk.grad[[3, 17]] == 0).all()


def test_fp32_dot_precision_follows_torch_tf32_switch(ops):
    m = torch.backends.cuda.matmul
    saved = m.fp32_precision
    try:
        m.fp32_precision = "tf32"
        assert ops.triton_fwd.dot_precision(torch.float32) == "tf32"
        m.fp32_precision = "ieee"
        assert ops.triton_fwd.dot_precision(torch.float32) == "ieee"
        assert ops.triton_fwd.dot_precision(torch.bfloat16) == "tf32"  # exact products anyway
    finally:
        m.fp32_precision = saved
    # The backward launcher asks the same function (no hard-coded precision left).
    assert ops.triton_bwd.dot_precision is ops.triton_fwd.dot_precision


def test_launches_run_under_the_tensors_cuda_device(ops):
    # Triton launches on the current CUDA device; the ops enter the tensors' device first.
    class FakeTensor:
        device = torch.device("cuda", 1)
    guard = ops._on_device(FakeTensor())
    assert isinstance(guard, torch.cuda.device) and guard.idx == 1
    assert not isinstance(ops._on_device(torch.empty(0)), torch.cuda.device)


@pytest.mark.parametrize("need", ["h", "weight"])
def test_partial_requires_grad(ops, need):
    # Frozen lm_head (only ∂h) or frozen trunk (only ∂W): the other buffer is never made.
    h, w, b, t, g = make(5, 16, 40, bias=True)
    gw = torch.randn(5, generator=g)
    hk, wk = h.clone().requires_grad_(need == "h"), w.clone().requires_grad_(need == "weight")
    lp, _ = ops.token_logprobs(hk, wk, t, bias=b)
    (lp * gw).sum().backward()
    hr, wr = leaves(h, w, dtype=F64)
    lr, _ = ref.token_logprobs(hr, wr, t, bias=b.double(), compute_dtype=F64)
    (lr * gw.double()).sum().backward()
    got, want = (hk.grad, hr.grad) if need == "h" else (wk.grad, wr.grad)
    check(f"only {need}", got, want, 2e-5, 1e-4)
    assert (wk.grad if need == "h" else hk.grad) is None


def test_forward_only_stores_no_lse(ops):
    h, w, b, t, _ = make(4, 16, 40)
    lp, lse, ent = ops._tlp_op(h, w, None, t, 1.0, -100, False, False)
    assert lse.numel() == 0 and ent.numel() == 0
    with torch.no_grad():
        lp2, _ = ops.token_logprobs(h, w.requires_grad_(), t)
    assert not lp2.requires_grad
    lr, _ = ref.token_logprobs(h.double(), w.detach().double(), t, compute_dtype=F64)
    check("forward-only lp", lp, lr, 2e-5)
    check("no_grad lp", lp2, lr, 2e-5)


def test_bad_inputs_raise_clear_errors(ops):
    h, w, b, t, _ = make(4, 16, 40)
    t[2] = 40
    with pytest.raises(ValueError, match="targets: token ids out of range"):
        ops.token_logprobs(h, w, t)
    with pytest.raises(TypeError, match="dtype"):
        ops.token_logprobs(h.double(), w, t.clamp(max=39))
    t[2] = -100  # fine for token_logprobs (ignored), an error at a valid loss position
    ops.token_logprobs(h, w, t)
    z = torch.zeros(4)
    with pytest.raises(ValueError, match="targets: token ids out of range"):
        ops.fused_loss(h, w, t, z, z, None, z, torch.ones(4, dtype=torch.bool), bias=None,
                       temperature=1.0, settings=LossSettings(), return_entropy=False)


# --------------------------------------------------------------------- fused loss
SETTINGS = [
    LossSettings(),
    LossSettings(preclip=None),
    LossSettings(clip_eps=(0.1, 0.3), dual_clip=3.0),
    LossSettings(kl_coef=0.1, kl_estimator="k1"),
    LossSettings(kl_coef=0.1, kl_estimator="k2", aggregation="seq-mean-token-sum"),
    LossSettings(kl_coef=0.1, kl_estimator="k3", aggregation="seq-mean-token-mean"),
]


def loss_inputs(N, H, V, s: LossSettings, *, seed=1, B=3):
    """Inputs whose log-ratios cross the PPO clip and the Pre-CLIP band."""
    h, w, b, t, g = make(N, H, V, bias=True, scale=2.0, seed=seed)
    lp, _ = ref.token_logprobs(h.double(), w.double(), t, bias=b.double(), compute_dtype=F64)
    old = (lp + torch.randn(N, generator=g, dtype=F64) * 1.5).float()
    old[0], old[1] = lp[0] + 9.0, lp[1] - 9.0  # outside ±log 1e3: pre-clipped
    adv = torch.randn(N, generator=g) * 2
    reflp = (lp + torch.randn(N, generator=g, dtype=F64) * 0.3).float()
    mask = torch.rand(N, generator=g) > 0.25
    mask[2] = True
    t[~mask] = 10 ** 6  # garbage targets at invalid rows must be ignored, not rejected
    tw = token_weights(mask.view(B, N // B), s.aggregation).flatten()
    return h, w, b, t, old, adv, reflp, tw, mask


def run_fused(fn, h, w, b, t, old, adv, reflp, tw, valid, s, dtype=None, **kw):
    hk, wk, bk = leaves(h, w, b, dtype=dtype)
    loss, lp, ent = fn(hk, wk, t, old, adv, reflp, tw, valid, bias=bk, temperature=0.8,
                       settings=s, return_entropy=True, **kw)
    loss.backward()
    return loss, lp, ent, grads(hk, wk, bk)


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"pre={s.preclip is not None},"
                         f"dual={s.dual_clip},kl={s.kl_coef}{s.kl_estimator},{s.aggregation}")
def test_fused_loss_matches_reference(ops, s):
    inp = loss_inputs(12, 16, 70, s)
    loss, lp, ent, gk = run_fused(ops.fused_loss, *inp, s)
    rl, rlp, rent, gr = run_fused(lambda *a, **k: ref.fused_loss(*a, compute_dtype=F64, **k),
                                  *inp, s, dtype=F64)
    assert loss.dim() == 0 and loss.dtype == torch.float32 and not lp.requires_grad
    check("loss", loss, rl, 1e-5, 1e-4)
    check("lp", lp, rlp, 2e-5, 1e-4)
    check("entropy", ent, rent, 2e-5, 1e-4)
    for label, a, e in zip(("dh", "dW", "dbias"), gk, gr):
        check(f"{label}", a, e, 2e-5, 1e-4)
        assert a.abs().sum() > 0, f"{label}: all-zero gradient, the test data is too tame"


def test_fused_loss_bf16(ops):
    s = LossSettings(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3")
    h, w, b, t, old, adv, reflp, tw, mask = loss_inputs(12, 32, 70, s, seed=3)
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    loss, lp, _, gk = run_fused(ops.fused_loss, h, w, b, t, old, adv, reflp, tw, mask, s)
    rl, rlp, _, gr = run_fused(lambda *a, **k: ref.fused_loss(*a, compute_dtype=F64, **k),
                               h, w, b, t, old, adv, reflp, tw, mask, s, dtype=F64)
    assert [g.dtype for g in gk] == [torch.bfloat16] * 3
    check("bf16 loss", loss, rl, 1e-4, 1e-4)
    check("bf16 lp", lp, rlp, 1e-4, 1e-4)
    for label, a, e in zip(("dh", "dW", "dbias"), gk, gr):
        check(f"bf16 {label}", a, e, 5e-3, 5e-2)


@pytest.fixture(scope="module")
def rows_mod(ops):
    mod = importlib.import_module("r1reward.kernels.rows_chunked")
    assert isinstance(mod.triton_rows._row_kernel, InterpretedFunction)
    return mod


@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"pre={s.preclip is not None},"
                         f"dual={s.dual_clip},kl={s.kl_coef}{s.kl_estimator},{s.aggregation}")
def test_row_chunked_backend_matches_reference(rows_mod, monkeypatch, s):
    # GEMMs + the Triton row kernel, 5 rows per chunk: several chunks, one short.
    monkeypatch.setattr(rows_mod, "MAX_CHUNK_ROWS", 5)
    inp = loss_inputs(12, 16, 70, s)
    loss, lp, ent, gk = run_fused(rows_mod.fused_loss, *inp, s)
    rl, rlp, rent, gr = run_fused(lambda *a, **k: ref.fused_loss(*a, compute_dtype=F64, **k),
                                  *inp, s, dtype=F64)
    check("rows loss", loss, rl, 1e-5, 1e-4)
    check("rows lp", lp, rlp, 2e-5, 1e-4)
    check("rows entropy", ent, rent, 2e-5, 1e-4)
    for label, a, e in zip(("dh", "dW", "dbias"), gk, gr):
        check(f"rows {label}", a, e, 2e-5, 1e-4)
        assert a.abs().sum() > 0, f"{label}: all-zero gradient, the test data is too tame"


def test_row_chunked_backend_bf16_and_refusals(rows_mod, monkeypatch):
    monkeypatch.setattr(rows_mod, "MAX_CHUNK_ROWS", 4)
    s = LossSettings(dual_clip=3.0, kl_coef=0.1, kl_estimator="k3")
    h, w, b, t, old, adv, reflp, tw, mask = loss_inputs(12, 32, 70, s, seed=3)
    h, w, b = h.bfloat16(), w.bfloat16(), b.bfloat16()
    loss, lp, _, gk = run_fused(rows_mod.fused_loss, h, w, b, t, old, adv, reflp, tw, mask, s)
    rl, rlp, _, gr = run_fused(lambda *a, **k: ref.fused_loss(*a, compute_dtype=F64, **k),
                               h, w, b, t, old, adv, reflp, tw, mask, s, dtype=F64)
    assert [g.dtype for g in gk] == [torch.bfloat16] * 3
    check("rows bf16 loss", loss, rl, 1e-4, 1e-4)
    check("rows bf16 lp", lp, rlp, 1e-4, 1e-4)
    for label, a, e in zip(("dh", "dW", "dbias"), gk, gr):
        check(f"rows bf16 {label}", a, e, 5e-3, 5e-2)
    with pytest.raises(TypeError, match="fp16"):
        run_fused(rows_mod.fused_loss, h.half(), w.half(), b.half(), t, old, adv, reflp, tw,
                  mask, s)
    with pytest.raises(ValueError, match="exact only"):
        run_fused(rows_mod.fused_loss, h, w, b, t, old, adv, reflp, tw, mask, s, filter_eps=0.01)
    import r1reward.kernels as K
    assert "triton-rows" in K.BACKENDS and K.resolve_backend("auto", torch.device("cpu")) == "torch"


def test_fused_loss_all_masked(ops):
    s = LossSettings(kl_coef=0.1)
    h, w, b, t, old, adv, reflp, tw, mask = loss_inputs(6, 16, 40, s)
    mask[:] = False
    tw = token_weights(mask.view(2, 3), s.aggregation).flatten()
    loss, lp, ent, gk = run_fused(ops.fused_loss, h, w, b, t, old, adv, reflp, tw, mask, s)
    assert loss.item() == 0.0 and (lp == 0).all() and (ent == 0).all()
    for gr in gk:
        assert torch.isfinite(gr).all() and (gr == 0).all()


@pytest.mark.parametrize("s", [LossSettings(clip_eps=(0.1, 0.3), dual_clip=3.0),
                               LossSettings(preclip=None, kl_coef=0.2, kl_estimator="k3")])
def test_epilogue_matches_loss_and_grad(ops, s):
    # The in-kernel epilogue vs loss_math.loss_and_grad on the kernel's own lp.
    h, w, b, t, old, adv, reflp, tw, mask = loss_inputs(15, 16, 40, s)
    rows = torch.nonzero(mask).flatten()
    la = dict(old=old, adv=adv, ref=reflp, tok_w=tw, preclip=s.preclip,
              clip=(1 - s.clip_eps[0], 1 + s.clip_eps[1]), dual_clip=s.dual_clip,
              kl_coef=s.kl_coef, kl_estimator=s.kl_estimator)
    out = ops.triton_fwd.launch_forward(h, w, b, t, rows, temperature=1.0, entropy=False,
                                        store_lse=True, loss_args=la,
                                        config=ops.triton_fwd.fwd_config(None, h.dtype))
    loss_t, g, parts = loss_and_grad(out["lp"], old, adv, reflp, tw, s)
    check("loss_t", out["loss_t"][mask], loss_t[mask], 1e-6, 1e-6)
    check("g", out["g"][mask], g[mask], 1e-6, 1e-6)
    assert (out["loss_t"][~mask] == 0).all() and (out["g"][~mask] == 0).all()
    assert (~parts["in_band"][mask]).any() or s.preclip is None


def test_filtered_backward_error_is_bounded(ops):
    # Peaked softmax: the first vocab tile (BLOCK_V = 32) holds the targets and large
    # logits; the other two tiles have logits near 0, so p < eps there for every row and
    # the filtered backward skips them.
    s = LossSettings(preclip=None)
    h, w, b, t, old, adv, reflp, tw, mask = loss_inputs(12, 16, 96, s)
    w = torch.cat([w[:32] * 4.0, w[32:] * 0.05])
    t = torch.where(mask, t % 32, t)
    eps, temp = 1e-3, 0.8
    _, _, _, exact = run_fused(ops.fused_loss, h, w, None, t, old, adv, reflp, tw, mask, s)
    _, _, _, filt = run_fused(ops.fused_loss, h, w, None, t, old, adv, reflp, tw, mask, s,
                              filter_eps=eps)
    # A skipped entry has |dz_ij| = |g_i|·p_ij/τ < eps·|g_i|/τ: bound dh and dW errors.
    lp_k, _ = ops.token_logprobs(h, w, torch.where(mask, t, -100))
    _, gtok, _ = loss_and_grad(lp_k, old, adv, reflp, tw, s)
    gabs = torch.where(mask, gtok, 0.0).abs() / temp
    bound_dh = gabs[:, None] * eps * w.abs().sum(0)[None, :]
    bound_dw = eps * (gabs[:, None] * h.abs()).sum(0)[None, :].expand_as(w)
    err_dh, err_dw = (filt[0] - exact[0]).abs(), (filt[1] - exact[1]).abs()
    assert (err_dh <= bound_dh + 1e-7).all(), f"dh error {err_dh.max()} over bound"
    assert (err_dw <= bound_dw + 1e-7).all(), f"dW error {err_dw.max()} over bound"
    # The skipped tiles' dW rows are exactly 0, the exact ones are not: filtering happened.
    assert (filt[1][32:] == 0).all() and exact[1][32:].abs().max() > 0
    check("filtered dW kept tile", filt[1][:32], exact[1][:32], 1e-6, 1e-5)


# -------------------------------------------------------- through the public API
def test_functional_api_triton_backend(ops):
    from r1reward.kernels import functional as F
    B, T, H, V = 2, 5, 16, 45
    h, w, b, t, g = make(B * T, H, V, bias=True, scale=2.0)
    h, t = h.view(B, T, H), t.view(B, T)
    old = torch.randn(B, T, generator=g) - 4
    adv = torch.randn(B, generator=g)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[1, 3:] = False
    res = {}
    for backend in ("triton", "reference"):
        hk, wk, bk = leaves(h, w, b)
        loss, stats = F.fused_stable_reinforce_loss(
            hk, wk, t, old, adv, mask, bias=bk, aggregation="seq-mean-token-mean",
            return_entropy=True, backend=backend)
        loss.backward()
        res[backend] = (loss, stats["entropy"], hk.grad, wk.grad, bk.grad)
    for label, a, e in zip(("loss", "entropy", "dh", "dW", "dbias"), res["triton"],
                           res["reference"]):
        check(f"functional {label}", a, e, 2e-5, 1e-4)
    lp = F.token_logprobs(h, w, t, backend="triton")
    assert lp.shape == (B, T)


def test_torch_compile_sees_custom_ops(ops):
    # fullgraph=True fails on any graph break: the custom ops must trace as single nodes.
    h, w, b, t, g = make(6, 16, 40, bias=True)

    def f(hh, ww, bb):
        lp, _ = ops.token_logprobs(hh, ww, t, bias=bb)
        return (lp * torch.arange(6.0)).sum()

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    hk, wk, bk = leaves(h, w, b)
    compiled(hk, wk, bk).backward()
    he, we, be = leaves(h, w, b)
    f(he, we, be).backward()
    for label, a, e in zip(("dh", "dW", "dbias"), grads(hk, wk, bk), grads(he, we, be)):
        check(f"compiled {label}", a, e, 1e-6, 1e-6)


if not INTERPRETED:
    # Not an interpreter process: run every case above in one that is (see docstring).
    for _name in [n for n in globals() if n.startswith("test_")]:
        del globals()[_name]

    def test_triton_interpreter_suite():
        env = dict(os.environ, TRITON_INTERPRET="1", TRITON_DEFAULT_FP_FUSION="1")
        res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rfE", "-p",
                              "no:cacheprovider", os.path.abspath(__file__)],
                             env=env, capture_output=True, text=True, timeout=900)
        summary = res.stdout.strip().splitlines()[-1:] or ["<no output>"]
        assert res.returncode == 0, (f"interpreter suite failed ({summary[0]}):\n"
                                     f"{res.stdout[-12000:]}\n{res.stderr[-3000:]}")
        assert " passed" in summary[0] and "skipped" not in summary[0], summary[0]
