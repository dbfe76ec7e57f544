"""Chunked "torch" backend (and the fp32 "reference" backend) against the float64 oracle.

Every comparison goes through the public functional API, with a small logit budget so
the chunk loop really runs several (unequal) chunks, drops rows and compacts the buffer.
"""
import json
import math
from pathlib import Path

import pytest
import torch

from r1reward.kernels import (
    LossSettings,
    chunk_plan,
    cpu_blas,
    fused_stable_reinforce_loss,
    reference,
    stable_reinforce_loss,
    token_logprobs,
    whole_batch,
)
from r1reward.kernels import torch_chunked as tc
from r1reward.kernels.loss_math import broadcast_advantages, loss_and_grad, token_weights

BACKENDS = ["torch", "reference"]
V_ODD = 37  # prime: never a multiple of the chunk or of any block

# Log-ratios lp − old_lp used by the cases: far from every branch edge of the loss
# (Pre-CLIP ±6.91, PPO clip log 0.8 / log 1.2 and log 0.9 / log 1.3, dual-clip ratio 3),
# so the fp32 backends and the fp64 oracle take the same branch for every token.
SAFE_LOG_RATIOS = torch.tensor([-9.0, -3.0, -0.4, -0.02, 0.03, 0.4, 3.0, 9.0], dtype=torch.float64)

SETTINGS = [
    LossSettings(),
    LossSettings(preclip=None),
    LossSettings(clip_eps=(0.1, 0.3), dual_clip=3.0),
    LossSettings(kl_coef=0.1, kl_estimator="k1"),
    LossSettings(kl_coef=0.1, kl_estimator="k2", aggregation="seq-mean-token-sum"),
    LossSettings(kl_coef=0.1, kl_estimator="k3", aggregation="seq-mean-token-mean"),
]


@pytest.fixture(autouse=True, params=["torch-blas", "numpy-blas", "whole-batch"])
def small_chunks(monkeypatch, request):
    # 4 rows per chunk: 10+ valid rows give 3+ chunks, one of them shorter. Every test runs
    # with the chunk GEMMs on torch.mm and on numpy's BLAS (the two CPU engines), and with
    # the whole-batch path allowed (it takes the cases with rows <= H).
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", 4)
    monkeypatch.setenv(cpu_blas.ENV, "numpy" if request.param == "numpy-blas" else "torch")
    monkeypatch.setattr(whole_batch, "ENABLED", request.param == "whole-batch")
    return request.param


# ---------------------------------------------------------------------------- helpers
def assert_close(name, got, exp, *, rtol, atol_scale):
    """Fail with the max abs/rel error and where; ``atol = atol_scale · max|exp|``."""
    got = got.detach().to(torch.float64)
    exp = exp.detach().to(torch.float64)
    assert got.shape == exp.shape, f"{name}: shape {tuple(got.shape)} != {tuple(exp.shape)}"
    assert torch.isfinite(got).all(), f"{name}: non-finite at {(~torch.isfinite(got)).nonzero()[:5].tolist()}"
    atol = atol_scale * max(exp.abs().max().item() if exp.numel() else 0.0, 1e-12)
    err = (got - exp).abs()
    bad = err > atol + rtol * exp.abs()
    if bad.any():
        i = int(err.reshape(-1).argmax())
        where = [int(x) for x in torch.unravel_index(torch.tensor(i), err.shape)] if err.dim() else []
        rel = (err / exp.abs().clamp_min(1e-30)).max().item()
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{err.numel()} off; max abs err {err.max().item():.3e} at "
            f"{where} (got {got.reshape(-1)[i].item():.6e}, want {exp.reshape(-1)[i].item():.6e}); "
            f"max rel err {rel:.3e}; atol {atol:.2e}, rtol {rtol}")


TOL = {torch.float32: dict(rtol=1e-4, atol_scale=2e-5),
       torch.bfloat16: dict(rtol=5e-2, atol_scale=2e-2)}


def make_inputs(B, T, H, V=V_ODD, *, seed=0, dtype=torch.float32, bias=True, logit_scale=3.0,
                mask_frac=0.25):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, T, H, generator=g, dtype=torch.float64)
    w = torch.randn(V, H, generator=g, dtype=torch.float64) * (logit_scale / H ** 0.5)
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.5 if bias else None
    y = torch.randint(0, V, (B, T), generator=g)
    mask = torch.rand(B, T, generator=g) >= mask_frac
    cast = (lambda x: None if x is None else x.to(dtype))
    return cast(h), cast(w), cast(b), y, mask, g


def leaf(*xs):
    return [None if x is None else x.detach().clone().requires_grad_() for x in xs]


def oracle_logprobs(h, w, y, bias=None, temperature=1.0, ignore_index=-100):
    H = h.shape[-1]
    lp, ent = reference.token_logprobs(
        h.reshape(-1, H).double(), w.double(), y.reshape(-1),
        bias=None if bias is None else bias.double(), temperature=temperature,
        ignore_index=ignore_index, return_entropy=True, compute_dtype=torch.float64)
    return lp.reshape(y.shape), ent.reshape(y.shape)


def loss_inputs(h, w, y, mask, g, *, bias=None, temperature=1.0, per_token_adv=True):
    """old_logp at safe log-ratios from the true log-probs, advantages and ref_logp."""
    lp64, _ = oracle_logprobs(h, w, y, bias, temperature)
    pick = torch.randint(0, len(SAFE_LOG_RATIOS), lp64.shape, generator=g)
    old = (lp64 - SAFE_LOG_RATIOS[pick]).float()
    adv = torch.randn(lp64.shape if per_token_adv else lp64.shape[:1], generator=g)
    ref = (lp64 + torch.randn(lp64.shape, generator=g, dtype=torch.float64) * 0.3).float()
    return old, adv, ref


def oracle_fused(h, w, y, old, adv, mask, *, ref=None, bias=None, temperature=1.0,
                 settings=None):
    """float64 loss, lp, entropy and (∂h, ∂W[, ∂b]) from the full-logits oracle."""
    settings = settings or LossSettings()
    H = h.shape[-1]
    h64, w64, b64 = leaf(h.double(), w.double(), None if bias is None else bias.double())
    tw = token_weights(mask, settings.aggregation).double().reshape(-1)
    a = broadcast_advantages(adv, mask).double().reshape(-1)
    loss, lp, ent = reference.fused_loss(
        h64.reshape(-1, H), w64, y.reshape(-1), old.double().reshape(-1), a,
        None if ref is None else ref.double().reshape(-1), tw, mask.reshape(-1), bias=b64,
        temperature=temperature, settings=settings, return_entropy=True,
        compute_dtype=torch.float64)
    params = [x for x in (h64, w64, b64) if x is not None]
    return loss, lp.reshape(y.shape), ent.reshape(y.shape), torch.autograd.grad(loss, params)


def run_fused(backend, h, w, y, old, adv, mask, *, bias=None, **kw):
    hh, ww, bb = leaf(h, w, bias)
    loss, stats = fused_stable_reinforce_loss(hh, ww, y, old, adv, mask, bias=bb,
                                              backend=backend, return_entropy=True, **kw)
    params = [x for x in (hh, ww, bb) if x is not None]
    return loss, stats, torch.autograd.grad(loss, params)


def settings_kw(s):
    return dict(preclip=s.preclip, clip_eps=s.clip_eps, dual_clip=s.dual_clip,
                kl_coef=s.kl_coef, kl_estimator=s.kl_estimator, aggregation=s.aggregation)


# ------------------------------------------------------------------- token_logprobs
LP_CASES = {
    "odd-shape+bias": dict(B=3, T=7, H=12),
    "single-token": dict(B=1, T=1, H=8),
    "temperature-0.6": dict(B=2, T=9, H=16, temperature=0.6),
    "no-bias-temp-1.7": dict(B=2, T=6, H=10, bias=False, temperature=1.7),
    "huge-logits": dict(B=2, T=5, H=8, logit_scale=4e4),  # |z| ~ 1e4: stability
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", list(LP_CASES), ids=str)
def test_token_logprobs_values_and_grads(backend, case):
    cfg = dict(LP_CASES[case])
    temperature = cfg.pop("temperature", 1.0)
    h, w, b, y, mask, g = make_inputs(**cfg)
    y = torch.where(mask, y, torch.full_like(y, -100))  # ignore_index rows
    lp64, ent64 = oracle_logprobs(h, w, y, b, temperature)
    if case == "huge-logits":
        assert lp64.abs().max() > 1e3, "case must actually produce extreme log-probs"
    hh, ww, bb = leaf(h, w, b)
    lp, ent = token_logprobs(hh, ww, y, bias=bb, temperature=temperature,
                             return_entropy=True, backend=backend)
    assert lp.dtype == torch.float32 and lp.shape == y.shape
    assert (lp[y == -100] == 0).all() and (ent[y == -100] == 0).all()
    assert_close(f"{backend} lp", lp, lp64, rtol=1e-5, atol_scale=2e-6)
    assert_close(f"{backend} entropy", ent, ent64, rtol=1e-4, atol_scale=1e-5)
    assert not ent.requires_grad
    # Backward with an arbitrary upstream gradient (zeros included: rows are skipped).
    up = torch.randn(y.shape, generator=g) * (torch.rand(y.shape, generator=g) > 0.2)
    params = [x for x in (hh, ww, bb) if x is not None]
    grads = torch.autograd.grad((lp * up).sum(), params)
    h64, w64, b64 = leaf(h.double(), w.double(), None if b is None else b.double())
    lp_o, _ = reference.token_logprobs(h64.reshape(-1, h.shape[-1]), w64, y.reshape(-1),
                                       bias=b64, temperature=temperature,
                                       compute_dtype=torch.float64)
    want = torch.autograd.grad((lp_o * up.double().reshape(-1)).sum(),
                               [x for x in (h64, w64, b64) if x is not None])
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"{backend} {case} {name}", got, exp, **TOL[torch.float32])


def test_token_logprobs_no_grad_call_builds_no_graph():
    h, w, b, y, _, _ = make_inputs(2, 5, 8)
    hh, ww = leaf(h, w)
    with torch.no_grad():
        lp = token_logprobs(hh, ww, y, backend="torch")
    assert lp.grad_fn is None and not lp.requires_grad


# --------------------------------------------------------------------- fused loss
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("s", SETTINGS, ids=lambda s: f"{s.aggregation}-kl{s.kl_coef}{s.kl_estimator}-"
                         f"pre{s.preclip is not None}-dual{s.dual_clip}")
@pytest.mark.parametrize("per_token_adv", [True, False], ids=["adv[B,T]", "adv[B]"])
def test_fused_loss_matches_oracle(backend, s, per_token_adv):
    h, w, b, y, mask, g = make_inputs(3, 8, 12, seed=1)
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b, temperature=0.8,
                                per_token_adv=per_token_adv)
    loss64, lp64, ent64, want = oracle_fused(h, w, y, old, adv, mask, ref=ref, bias=b,
                                             temperature=0.8, settings=s)
    loss, stats, grads = run_fused(backend, h, w, y, old, adv, mask, bias=b, ref_logp=ref,
                                   temperature=0.8, **settings_kw(s))
    assert loss.dim() == 0 and loss.dtype == torch.float32
    assert_close(f"{backend} loss", loss, loss64, rtol=1e-5, atol_scale=1e-5)
    assert_close(f"{backend} entropy stat", stats["entropy"],
                 (ent64 * mask).sum() / mask.sum(), rtol=1e-5, atol_scale=1e-6)
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"{backend} {name}", got, exp, **TOL[torch.float32])


@pytest.mark.parametrize("budget_rows", [1, 3, 1000])
def test_fused_loss_any_chunking_3d_no_bias(monkeypatch, budget_rows):
    # One row per chunk, ragged chunks, one chunk: identical results up to fp32 rounding.
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", budget_rows)
    h, w, _, y, mask, g = make_inputs(4, 6, 9, V=61, seed=2, bias=False)
    old, adv, ref = loss_inputs(h, w, y, mask, g)
    loss64, _, _, want = oracle_fused(h, w, y, old, adv, mask)
    loss, _, grads = run_fused("torch", h, w, y, old, adv, mask)
    assert_close("loss", loss, loss64, rtol=1e-5, atol_scale=1e-5)
    for name, got, exp in zip(("dh", "dW"), grads, want):
        assert_close(f"chunk={budget_rows} {name}", got, exp, **TOL[torch.float32])


def test_fused_equals_two_step_path():
    h, w, b, y, mask, g = make_inputs(3, 7, 10, seed=3)
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b)
    kw = dict(ref_logp=ref, kl_coef=0.05, aggregation="seq-mean-token-mean")
    loss_f, stats_f, grads_f = run_fused("torch", h, w, y, old, adv, mask, bias=b, **kw)
    hh, ww, bb = leaf(h, w, b)
    lp = token_logprobs(hh, ww, y, bias=bb, backend="torch")
    loss_2, stats_2 = stable_reinforce_loss(lp, old, adv, mask, **kw)
    grads_2 = torch.autograd.grad(loss_2, [hh, ww, bb])
    assert_close("loss fused vs two-step", loss_f, loss_2, rtol=1e-6, atol_scale=1e-6)
    for name, a, c in zip(("dh", "dW", "db"), grads_f, grads_2):
        assert_close(f"{name} fused vs two-step", a, c, rtol=1e-5, atol_scale=1e-6)
    for k in ("preclip_frac", "clip_frac", "ratio_mean", "ratio_max", "approx_kl", "ref_kl"):
        assert_close(f"stat {k}", stats_f[k], stats_2[k], rtol=1e-5, atol_scale=1e-6)


def test_bf16_inputs_within_bf16_tolerance():
    h, w, b, y, mask, g = make_inputs(3, 8, 16, seed=4, dtype=torch.bfloat16)
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b)
    loss64, _, _, want = oracle_fused(h, w, y, old, adv, mask, bias=b)
    loss, _, grads = run_fused("torch", h, w, y, old, adv, mask, bias=b)
    assert [x.dtype for x in grads] == [torch.bfloat16] * 3  # grads in the inputs' dtype
    assert_close("bf16 loss", loss, loss64, rtol=1e-3, atol_scale=1e-3)  # fp32 accumulation
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"bf16 {name}", got, exp, **TOL[torch.bfloat16])
    lp = token_logprobs(h, w, y, bias=b, backend="torch")
    assert_close("bf16 lp", lp, oracle_logprobs(h, w, y, b)[0], rtol=1e-5, atol_scale=1e-5)


# ------------------------------------------------------------ semantics end to end
def test_preclip_grad_zero_outside_band_equal_inside():
    # Token 0: log-ratio 9 (above log 1e3); token 1: −9 (below log 1e-3); tokens 2, 3 in
    # the band. PPO clip is pushed out of the way so only Pre-CLIP decides.
    h, w, _, y, _, _ = make_inputs(1, 4, 8, seed=5, bias=False)
    mask = torch.ones(1, 4, dtype=torch.bool)
    lp64, _ = oracle_logprobs(h, w, y)
    old = (lp64 - torch.tensor([[9.0, -9.0, 0.5, -0.5]], dtype=torch.float64)).float()
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    kw = dict(clip_eps=(0.99, 1e9))
    loss, stats, (dh, dw) = run_fused("torch", h, w, y, old, adv, mask, **kw)
    assert (dh[0, :2] == 0).all(), "Pre-CLIP: tokens outside the band must get exactly 0"
    assert stats["preclip_frac"].item() == 0.5
    # Inside the band: the gradient of the plain (unclipped) surrogate −A·exp(lp − old).
    hh, ww = leaf(h, w)
    lp = token_logprobs(hh, ww, y, backend="reference")
    plain = (-(adv * torch.exp(lp - old))[0, 2:]).sum() / 4
    gh, gw = torch.autograd.grad(plain, [hh, ww])
    assert_close("in-band dh", dh[0, 2:], gh[0, 2:], rtol=1e-5, atol_scale=1e-6)
    assert_close("in-band dW", dw, gw, rtol=1e-5, atol_scale=1e-6)


def test_masked_and_zero_advantage_tokens_contribute_nothing():
    h, w, b, y, mask, g = make_inputs(2, 6, 8, seed=6)
    old, adv, _ = loss_inputs(h, w, y, mask, g, bias=b)
    adv[0, 1] = 0.0
    mask[1, 2] = False
    loss, _, (dh, dw, db) = run_fused("torch", h, w, y, old, adv, mask, bias=b)
    assert (dh[0, 1] == 0).all() and (dh[1, 2] == 0).all()
    # Changing what sits at those positions changes nothing at all.
    h2, old2, y2 = h.clone(), old.clone(), y.clone()
    h2[1, 2] += 5.0
    old2[1, 2] = 123.0
    y2[1, 2] = 10**9  # out of vocabulary, but masked: never looked at
    loss2, _, (dh2, dw2, db2) = run_fused("torch", h2, w, y2, old2, adv, mask, bias=b)
    assert loss2.item() == loss.item()
    assert torch.equal(dw2, dw) and torch.equal(db2, db)


def test_all_masked_batch_gives_zero_loss_and_grads():
    h, w, b, y, _, _ = make_inputs(2, 5, 8, seed=7)
    mask = torch.zeros(2, 5, dtype=torch.bool)
    old, adv = torch.zeros(2, 5), torch.ones(2)
    for backend in BACKENDS:
        loss, stats, grads = run_fused(backend, h, w, y, old, adv, mask, bias=b)
        assert loss.item() == 0.0
        for x in grads:
            assert torch.isfinite(x).all() and (x == 0).all()
        for k, v in stats.items():
            assert torch.isfinite(v), f"{backend} stat {k} = {v}"


def test_stats_on_hand_built_case():
    # Uniform logits (W = 0, no bias): lp = −log V and entropy = log V exactly.
    V = 8
    h = torch.randn(1, 4, 3)
    w = torch.zeros(V, 3, requires_grad=True)
    y = torch.tensor([[0, 1, 2, 3]])
    mask = torch.tensor([[True, True, True, False]])
    lp0 = -math.log(V)
    d = torch.tensor([[math.log(2.0), 10.0, -0.1, 0.0]])  # ratios 2, e^10 (pre-clipped), 0.905
    old = lp0 - d
    adv = torch.tensor([[1.0, 1.0, -1.0, 1.0]])
    loss, stats = fused_stable_reinforce_loss(h, w, y, old, adv, mask, backend="torch",
                                              return_entropy=True, ref_logp=old)
    r = torch.tensor([2.0, 1e3, math.exp(-0.1)])
    assert stats["preclip_frac"].item() == pytest.approx(1 / 3)
    assert stats["clip_frac"].item() == pytest.approx(2 / 3)  # ratios 2 and 1e3 clipped at 1.2
    assert stats["ratio_mean"].item() == pytest.approx(r.mean().item(), rel=1e-5)
    assert stats["ratio_max"].item() == pytest.approx(1e3, rel=1e-5)
    dd = torch.tensor([math.log(2.0), 10.0, -0.1])
    assert stats["approx_kl"].item() == pytest.approx((dd.exp() - 1 - dd).mean().item(), rel=1e-5)
    assert stats["entropy"].item() == pytest.approx(math.log(V), rel=1e-6)
    assert stats["valid_tokens"].item() == 3
    # Loss: −min(r·A, clip(r)·A) averaged over the 3 tokens.
    want = -(1.2 * 1 + 1.2 * 1 + (-1) * math.exp(-0.1)) / 3
    assert loss.item() == pytest.approx(want, rel=1e-5)


def test_out_of_vocab_target_names_the_field():
    h, w, _, y, mask, _ = make_inputs(1, 3, 4, bias=False)
    y[0, 1] = V_ODD
    mask[:] = True
    with pytest.raises(ValueError, match="targets.*outside"):
        fused_stable_reinforce_loss(h, w, y, torch.zeros(1, 3), torch.ones(1), mask,
                                    backend="torch")
    with pytest.raises(ValueError, match="targets.*outside"):
        token_logprobs(h, w, y, backend="torch")


# ------------------------------------------------------------- memory and filtering
def _torch_alloc_peak(fn) -> int:
    """Peak bytes held by torch's CPU allocator during ``fn()`` above its start (profiler
    memory events, in order): deterministic, unlike RSS."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        fn()
    cur = peak = 0
    for e in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if e.name() == "[memory]":
            cur += e.nbytes()
            peak = max(peak, cur)
    return peak


@pytest.mark.parametrize("entropy,filtered,temperature,bias", [
    (False, False, 1.0, False), (True, False, 0.7, True), (False, True, 1.0, False)],
    ids=["plain", "entropy-temp-bias", "filtered"])
def test_fused_extra_memory_within_plan_and_budget(monkeypatch, entropy, filtered,
                                                   temperature, bias):
    # The fused fwd+bwd's peak allocation beyond the gradients stays within the chunk
    # plan's total, which stays within the budget, while full logits are 16x the budget.
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", None)
    budget = 2 << 20
    monkeypatch.setattr(tc, "EXTRA_BUDGET_BYTES", budget)
    monkeypatch.setattr(chunk_plan, "RESERVE_BYTES", 0)  # no BLAS buffers in torch's count
    N, H, V = 1024, 96, 8192
    g = torch.Generator().manual_seed(8)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (1, N), generator=g)
    # Filtered: a peaked softmax, so few columns survive and the gathered path runs.
    h = torch.randn(1, N, H, generator=g) * (0.3 if filtered else 1.0) + (20.0 * w[y] if filtered else 0.0)
    b = torch.randn(V, generator=g) * 0.1 if bias else None
    with torch.no_grad():
        old = token_logprobs(h, w, y, bias=b, backend="torch", temperature=temperature) - 0.05
    adv, mask = torch.randn(1, N, generator=g), torch.ones(1, N, dtype=torch.bool)
    hh, ww, bb = leaf(h, w, b)
    assert N * V * 4 >= 16 * budget

    def step():
        loss, _ = fused_stable_reinforce_loss(hh, ww, y, old, adv, mask, bias=bb,
                                              backend="torch", return_entropy=entropy,
                                              temperature=temperature,
                                              filter_eps="auto" if filtered else None)
        loss.backward()
    step()  # warm-up: lazily created state is not part of a call's peak
    for x in (hh, ww, bb):
        if x is not None:
            x.grad = None
    peak = _torch_alloc_peak(step)
    grads = sum(x.grad.nbytes for x in (hh, ww, bb) if x is not None)
    if filtered:
        grads -= ww.grad.nbytes  # lazily zeroed mapping: not torch's allocator
        assert (ww.grad != 0).any(1).sum() < V // 4, "the filtered path did not run"
    p = chunk_plan.plan(N, H, V, entropy=entropy, filtered=filtered, bias=bias,
                        tau_scaled=temperature != 1.0, budget=budget)
    assert p.rows > 1 and p.rows < N, p
    assert p.total <= budget, p.temporaries
    assert peak - grads <= p.total, (
        f"measured {peak - grads} B beyond the gradients > planned {p.total} B: "
        f"{p.temporaries}")
    assert peak - grads >= 4 * p.rows * V, "the profiler missed the logit chunk: test is blind"


@pytest.mark.parametrize("N", [1, 256, 4096, 65536])
@pytest.mark.parametrize("H,V", [(128, 65536), (4096, 151936), (64, 4_000_000)])
def test_chunk_plan_fits_the_budget_at_any_n(N, H, V):
    for kw in (dict(), dict(entropy=True, bias=True, tau_scaled=True), dict(filtered=True),
               dict(in_bytes=2, grads=False)):
        p = chunk_plan.plan(N, H, V, **kw)
        assert p.total <= chunk_plan.EXTRA_BUDGET_BYTES - chunk_plan.RESERVE_BYTES \
            or p.rows == 1, (N, H, V, kw, p.temporaries)
        assert 1 <= p.rows <= N


def _peaked_case(N, H, V, seed=9):
    # Hidden states pulled toward their targets' embeddings: a concentrated softmax
    # (mean p_target ≈ 0.99), as for most sampled tokens of a trained LM.
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (1, N), generator=g)
    h = (torch.randn(1, N, H, generator=g) * 0.3 + w[y] * 20.0)
    return h, w, y, g


def test_filtered_gradients_within_bf16_tolerance_and_skip_columns(monkeypatch):
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", None)
    N, H, V = 48, 64, 4000
    h, w, y, g = _peaked_case(N, H, V)
    mask = torch.ones(1, N, dtype=torch.bool)
    with torch.no_grad():
        lp = token_logprobs(h, w, y, backend="torch")
    assert lp.exp().mean() > 0.9, "the case must be peaked"
    old, adv = lp - 0.05, torch.randn(1, N, generator=g)
    picked = []
    orig = torch.Tensor.index_select

    def spy(self, dim, index):
        if self.dim() == 2 and self.shape == w.shape and dim == 0:
            picked.append(index.numel())
        return orig(self, dim, index)
    monkeypatch.setattr(torch.Tensor, "index_select", spy)
    _, _, (dh_x, dw_x) = run_fused("torch", h, w, y, old, adv, mask)
    _, _, (dh_f, dw_f) = run_fused("torch", h, w, y, old, adv, mask, filter_eps="auto")
    assert picked and max(picked) < 0.25 * V, f"filtered GEMMs used {picked} of {V} rows"
    # The batch weight gradient is within bf16 tolerance of the exact one.
    assert_close("filtered dW", dw_f, dw_x, **TOL[torch.bfloat16])
    # Per token (Cut Cross-Entropy's guarantee): the ∂h error is below bf16 resolution of
    # the token's upstream gradient, |Δ∂h_t| ≤ 2⁻⁸·|dL/dlp_t|·max|W|. (A token with
    # p_t ≈ 1 has an exact ∂h of size ~(1 − p_t), so its relative error can be large.)
    _, gl, _ = loss_and_grad(lp.reshape(-1), old.reshape(-1), adv.reshape(-1), None,
                             token_weights(mask, "token-mean").reshape(-1), LossSettings())
    bound = 2.0 ** -8 * gl.abs()[:, None] * w.abs().max()
    err = (dh_f - dh_x).reshape(N, H).abs()
    assert (err <= bound).all(), f"∂h error {err.max():.3e} above the bf16 bound {bound.max():.3e}"
    assert err.max() > 0, "filtering dropped nothing: the test does not exercise it"


# ------------------------------------------------------------- CPU GEMM engine choice
def test_cpu_blas_engine_measured_once_and_cached(monkeypatch, tmp_path):
    # "auto" measures both engines on first use of a shape class, stores the winner under
    # this machine's key and reuses it (no second measurement, also in a new process);
    # the environment variable forces an engine without measuring.
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_blas.ENV, "auto")
    monkeypatch.setattr(cpu_blas, "_memo", {})
    monkeypatch.setattr(cpu_blas, "PROBE_BYTES", 1 << 18)
    calls = []
    real = cpu_blas.measure
    monkeypatch.setattr(cpu_blas, "measure", lambda *a: calls.append(a) or real(*a))
    assert cpu_blas.engine(16, 100, 4) == "torch" and not calls  # below MIN_MACS
    monkeypatch.setattr(cpu_blas, "MIN_MACS", 1)
    e = cpu_blas.engine(64, 3000, 8)
    assert e in cpu_blas.ENGINES and len(calls) == 1
    assert cpu_blas.engine(60, 3100, 8) == e and len(calls) == 1  # same shape class
    monkeypatch.setattr(cpu_blas, "_memo", {})
    assert cpu_blas.engine(64, 3000, 8) == e and len(calls) == 1  # read back from the file
    cpu_blas.engine(64, 3000, 8, grads=False)  # log-probs only: another pattern, measured
    assert len(calls) == 2
    data = json.loads((tmp_path / cpu_blas.CACHE_FILE).read_text())[cpu_blas.machine_key()]
    entry = data[cpu_blas.shape_class(64, 3000, 8)]
    assert entry["engine"] == e and entry["torch_s"] > 0 and entry["numpy_s"] > 0
    assert set(data) == {"H64-V4096-C8-grad", "H64-V4096-C8-fwd"}
    for forced in cpu_blas.ENGINES:
        monkeypatch.setenv(cpu_blas.ENV, forced)
        assert cpu_blas.engine(1 << 12, 1 << 17, 1 << 10) == forced and len(calls) == 2
    monkeypatch.setenv(cpu_blas.ENV, "mkl")
    with pytest.raises(ValueError, match=cpu_blas.ENV):
        cpu_blas.engine(64, 3000, 8)


@pytest.mark.parametrize("fast", cpu_blas.ENGINES)
def test_cpu_blas_probe_runs_torch_first_and_picks_the_faster(fast):
    # Torch's rounds all run before numpy's (OpenBLAS's spinning threads must not slow
    # them); one warm-up round each is not timed; numpy needs a 10 % margin to win.
    import time
    seen = []

    def probe(eng):
        seen.append(eng)
        time.sleep(0.002 if eng == fast else 0.02)

    result = cpu_blas.measure(probe)
    n = cpu_blas.PROBE_ROUNDS + 1
    assert seen == ["torch"] * n + ["numpy"] * n
    assert result["engine"] == fast
    assert result[f"{fast}_s"] < result[f"{'numpy' if fast == 'torch' else 'torch'}_s"]


@pytest.mark.parametrize("filtered", [False, True])
def test_cpu_blas_probe_times_the_calls_own_chunk_and_leaves_results_alone(
        monkeypatch, tmp_path, filtered):
    # The first call of a shape class times its own first chunk (rows, weight, logit
    # buffer, ∂W's empty storage) with both engines; that must not change what it returns:
    # the same call with the chosen engine forced gives the same loss and gradients.
    monkeypatch.setattr(whole_batch, "ENABLED", False)  # that path chooses no engine
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path))
    monkeypatch.setenv(cpu_blas.ENV, "auto")
    monkeypatch.setattr(cpu_blas, "_memo", {})
    monkeypatch.setattr(cpu_blas, "MIN_MACS", 1)
    shapes = []
    real = cpu_blas.measure
    monkeypatch.setattr(cpu_blas, "measure", lambda p: shapes.append(p.shape) or real(p))
    B, T, H, V = 3, 5, 24, 301
    h, w, _, y, mask, g = make_inputs(B, T, H, V)
    old, adv, _ = loss_inputs(h, w, y, mask, g)
    kw = dict(filter_eps=1e-3) if filtered else {}
    loss, stats, grads = run_fused("torch", h, w, y, old, adv, mask, **kw)
    assert shapes == [[4, H, V]]  # the call's own chunk of 4 rows over the whole vocabulary
    monkeypatch.setenv(cpu_blas.ENV, next(iter(cpu_blas._memo.values())))
    loss_f, stats_f, grads_f = run_fused("torch", h, w, y, old, adv, mask, **kw)
    assert len(shapes) == 1  # forced: not measured again
    torch.testing.assert_close(loss, loss_f, rtol=0, atol=0)
    for a, b in zip(grads, grads_f):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for k, v in stats.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v, stats_f[k], rtol=0, atol=0, msg=k)


def test_numpy_engine_runs_on_torch_thread_count_and_matches(monkeypatch):
    h, w, b, y, *_ = make_inputs(2, 7, 16)
    seen = []
    real = cpu_blas.numpy_threads
    monkeypatch.setattr(cpu_blas, "numpy_threads", lambda n: seen.append(n) or real(n))
    monkeypatch.setenv(cpu_blas.ENV, "torch")
    expected = token_logprobs(h, w, y, bias=b, backend="torch", temperature=0.7)
    assert not seen
    monkeypatch.setenv(cpu_blas.ENV, "numpy")
    got = token_logprobs(h, w, y, bias=b, backend="torch", temperature=0.7)
    assert seen and set(seen) == {torch.get_num_threads()}
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_numpy_blas_threads_follow_torch_setting():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    blas = threadpoolctl.ThreadpoolController().select(user_api="blas")
    if not blas.lib_controllers:
        pytest.skip("numpy here has no BLAS threadpoolctl can control")
    before = [lib["num_threads"] for lib in blas.info()]
    with cpu_blas.numpy_threads(1):
        assert [lib["num_threads"] for lib in blas.info()] == [1] * len(before)
    assert [lib["num_threads"] for lib in blas.info()] == before


def _mapping_kb(ptr: int) -> dict:
    """``Rss`` and ``AnonHugePages`` (kB) of the memory mapping that holds address ``ptr``."""
    out, inside = {}, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= ptr < hi
            elif inside and head in ("Rss:", "AnonHugePages:"):
                out[head[:-1]] = int(line.split()[1])
    return out


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux /proc")
def test_filtered_weight_grad_touches_only_surviving_rows(monkeypatch):
    # In filtered mode the weight gradient is zero except for a few hundred vocab rows; it
    # must stay mostly unbacked memory. With transparent huge pages each scattered row
    # write would fault in a whole zeroed 2 MB page (measured: seconds at Qwen scale).
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", None)
    N, H, V = 32, 256, 16384  # ∂W is 16 MiB: 8 huge pages' worth
    h, w, y, g = _peaked_case(N, H, V)
    h.requires_grad_(True)
    w.requires_grad_(True)
    with torch.no_grad():
        old = token_logprobs(h, w, y, backend="torch") - 0.05
    loss, _ = fused_stable_reinforce_loss(h, w, y, old, torch.randn(1, N, generator=g),
                                          torch.ones(1, N, dtype=torch.bool), backend="torch",
                                          filter_eps="auto")
    loss.backward()
    kb = _mapping_kb(w.grad.data_ptr())  # before anything reads the untouched pages
    rows = (w.grad != 0).any(1)
    assert 0 < int(rows.sum()) <= 2 * N, "the case must leave a few rows of ∂W non-zero"
    assert kb.get("AnonHugePages", 0) == 0, kb
    assert kb["Rss"] * 1024 < 0.25 * w.grad.nbytes, (
        f"{kb['Rss']} kB of the {w.grad.nbytes >> 10} kB weight gradient are resident")


# ------------------------------------------------ whole-batch path (logits in ∂W's storage)
@pytest.fixture
def wide_modes(monkeypatch):
    """Turns the whole-batch path on and records the mode of every call that took it."""
    monkeypatch.setattr(whole_batch, "ENABLED", True)
    modes, fused = [], whole_batch.fused

    def spy(runs, *a, **k):
        modes.append("gather" if runs is None else f"runs={len(runs)}")
        return fused(runs, *a, **k)
    monkeypatch.setattr(whole_batch, "fused", spy)
    return modes


@pytest.mark.parametrize("s", SETTINGS[:4], ids=lambda s: f"pre{s.preclip is not None}-"
                         f"dual{s.dual_clip}-kl{s.kl_coef}{s.kl_estimator}")
@pytest.mark.parametrize("bias,temperature", [(True, 0.8), (False, 1.0)], ids=["bias-t0.8", "plain"])
def test_whole_batch_matches_oracle(wide_modes, s, bias, temperature):
    # 3×7 rows (some masked) <= H = 24: the rows fit in ∂W's storage, the chunk plan says 4.
    h, w, b, y, mask, g = make_inputs(3, 7, 24, seed=11, bias=bias)
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b, temperature=temperature)
    loss64, lp64, ent64, want = oracle_fused(h, w, y, old, adv, mask, ref=ref, bias=b,
                                             temperature=temperature, settings=s)
    loss, stats, grads = run_fused("torch", h, w, y, old, adv, mask, bias=b, ref_logp=ref,
                                   temperature=temperature, **settings_kw(s))
    assert wide_modes == ["gather"]
    assert_close("loss", loss, loss64, rtol=1e-5, atol_scale=1e-5)
    assert_close("entropy stat", stats["entropy"], (ent64 * mask).sum() / mask.sum(),
                 rtol=1e-5, atol_scale=1e-6)
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"whole-batch {name}", got, exp, **TOL[torch.float32])


def test_whole_batch_bf16_and_extreme_logits(wide_modes):
    h, w, b, y, mask, g = make_inputs(2, 9, 20, seed=12, dtype=torch.bfloat16)
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b)
    loss64, _, _, want = oracle_fused(h, w, y, old, adv, mask, bias=b)
    loss, _, grads = run_fused("torch", h, w, y, old, adv, mask, bias=b)
    assert [x.dtype for x in grads] == [torch.bfloat16] * 3
    assert_close("bf16 loss", loss, loss64, rtol=1e-3, atol_scale=1e-3)
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"bf16 {name}", got, exp, **TOL[torch.bfloat16])
    # |z| ~ 1e4: log-probs and entropy from max-shifted exponentials keep fp32 precision.
    h, w, _, y, mask, g = make_inputs(2, 6, 16, seed=13, bias=False, logit_scale=4e4)
    lp64, ent64 = oracle_logprobs(h, w, y)
    assert lp64.abs().max() > 1e3
    n = y.numel()
    out = tc.fused_loss_impl(h.reshape(n, -1), w, y.reshape(-1), torch.zeros(n), torch.ones(n),
                             None, torch.full((n,), 1.0 / n), mask.reshape(-1), None, 1.0,
                             LossSettings(), True, None, True, True, False)
    assert wide_modes == ["gather", "gather"]
    lp, ent = out[1].reshape(y.shape), out[2].reshape(y.shape)
    assert_close("extreme lp", lp[mask], lp64[mask], rtol=1e-6, atol_scale=1e-7)
    assert_close("extreme entropy", ent[mask], ent64[mask], rtol=1e-4, atol_scale=1e-5)
    assert (lp[~mask] == 0).all()


def test_whole_batch_uses_runs_of_rows_in_place(monkeypatch, wide_modes):
    # Right-padded sequences: runs of active rows are used in place (no copy), as columns
    # of the logits; the padding is never read, so even non-finite values there are fine.
    monkeypatch.setattr(whole_batch, "RUN_ROWS", 8)  # 1 + 25 // 8 = 4 runs allowed
    h, w, b, y, _, g = make_inputs(3, 10, 32, seed=14)
    mask = torch.ones(3, 10, dtype=torch.bool)
    mask[0, 8:] = False
    mask[2, 7:] = False  # active rows: [0, 8), [10, 27) -> 2 runs
    old, adv, ref = loss_inputs(h, w, y, mask, g, bias=b)
    loss64, _, _, want = oracle_fused(h, w, y, old, adv, mask, bias=b)
    h_pad = h.clone()
    h_pad[~mask] = float("inf")
    loss, stats, grads = run_fused("torch", h_pad, w, y, old, adv, mask, bias=b)
    assert wide_modes == ["runs=2"]
    assert_close("loss", loss, loss64, rtol=1e-5, atol_scale=1e-5)
    for name, got, exp in zip(("dh", "dW", "db"), grads, want):
        assert_close(f"runs {name}", got, exp, **TOL[torch.float32])
    assert (grads[0][~mask] == 0).all()


def test_whole_batch_gathers_scattered_rows_or_falls_back(monkeypatch, wide_modes):
    # Scattered rows (many runs) are gathered when their fp32 copy fits the budget; when it
    # does not, the row-chunked path runs. Both exact.
    h, w, _, y, mask, g = make_inputs(2, 16, 64, seed=17, bias=False, mask_frac=0.3)
    old, adv, _ = loss_inputs(h, w, y, mask, g)
    loss64, _, _, want = oracle_fused(h, w, y, old, adv, mask)
    n = int(mask.sum())
    monkeypatch.setattr(chunk_plan, "RESERVE_BYTES", 0)
    fits = chunk_plan.whole_batch_block(n, 64, V_ODD, copy_bytes=4 * n * 64, bias=False,
                                        budget=64 << 10)
    assert fits and not chunk_plan.whole_batch_block(n, 64, V_ODD, copy_bytes=4 * n * 64,
                                                     bias=False, budget=8 << 10)
    for budget, taken in ((64 << 10, ["gather"]), (8 << 10, [])):
        monkeypatch.setattr(tc, "EXTRA_BUDGET_BYTES", budget)
        wide_modes.clear()
        loss, _, grads = run_fused("torch", h, w, y, old, adv, mask)
        assert wide_modes == taken, budget
        assert_close(f"loss, budget {budget}", loss, loss64, rtol=1e-5, atol_scale=1e-5)
        for name, got, exp in zip(("dh", "dW"), grads, want):
            assert_close(f"budget {budget} {name}", got, exp, **TOL[torch.float32])


def test_whole_batch_every_row_preclipped_gives_zero_grads(wide_modes):
    # No row has a gradient: ∂W (whose storage held the logits) must come back all zero.
    h, w, b, y, _, _ = make_inputs(1, 10, 16, seed=15)
    mask = torch.ones(1, 10, dtype=torch.bool)
    lp64, _ = oracle_logprobs(h, w, y, b)
    old = (lp64 - 9.0).float()  # log-ratio 9: above Pre-CLIP's band everywhere
    loss, stats, grads = run_fused("torch", h, w, y, old, torch.ones(1), mask, bias=b)
    assert wide_modes == ["runs=1"] and stats["preclip_frac"].item() == 1.0
    for x in grads:
        assert torch.isfinite(x).all() and (x == 0).all()


@pytest.mark.parametrize("masked", [False, True], ids=["all-valid", "masked-rows"])
def test_whole_batch_extra_memory_within_budget(monkeypatch, wide_modes, masked):
    # Logits 16x the budget; the whole-batch call's peak beyond its gradients stays inside.
    monkeypatch.setattr(tc, "MAX_CHUNK_ROWS", None)
    monkeypatch.setattr(chunk_plan, "RESERVE_BYTES", 0)
    budget = 1 << 20
    monkeypatch.setattr(tc, "EXTRA_BUDGET_BYTES", budget)
    N, H, V = 256, 256, 16384
    g = torch.Generator().manual_seed(16)
    h, w = torch.randn(1, N, H, generator=g), torch.randn(V, H, generator=g) / H ** 0.5
    y = torch.randint(0, V, (1, N), generator=g)
    mask = torch.ones(1, N, dtype=torch.bool)
    if masked:
        mask[0, ::8] = False
    with torch.no_grad():
        old = token_logprobs(h, w, y, backend="torch") - 0.05
    adv = torch.randn(1, N, generator=g)
    hh, ww = leaf(h, w)
    assert N * V * 4 >= 16 * budget

    def step():
        loss, _ = fused_stable_reinforce_loss(hh, ww, y, old, adv, mask, backend="torch",
                                              return_entropy=True)
        loss.backward()
    step()
    hh.grad = ww.grad = None
    peak = _torch_alloc_peak(step)
    assert wide_modes == 2 * ["gather" if masked else "runs=1"]
    assert peak - hh.grad.nbytes - ww.grad.nbytes <= budget
