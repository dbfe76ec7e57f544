"""Correctness stage of ``bench.gpu_check``: our backends against the reference backend.

Each case runs the fused loss (loss, ∂h, ∂W) and ``token_logprobs`` (log-probs, entropy)
through the public API with one of our backends and with ``backend="reference"`` (full
fp32 logits) on the same inputs, and records the largest error relative to the largest
reference value of each output. Tolerances: fp32 1e-4; 16-bit gradients 3e-2 (∂z is
rounded to the input dtype for the tensor cores); filtered and TF32 runs 3e-2.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Case:
    name: str
    N: int
    H: int
    V: int
    dtype: str = "fp32"
    bias: bool = False
    temperature: float = 1.0
    noncontig: bool = False
    filtered: bool = False
    tf32: bool = False

    @property
    def tol(self) -> float:
        return 3e-2 if (self.dtype != "fp32" or self.filtered or self.tf32) else 1e-4


# Ordered so that a time box cut (first-run Triton compiles) loses the least important.
GPU_CASES = (
    Case("odd fp32 + bias, τ=0.7", 37, 100, 1001, bias=True, temperature=0.7),
    Case("real bf16", 4096, 3584, 151936, "bf16"),
    Case("V·H > 2^31 bf16", 256, 16384, 151936, "bf16"),
    Case("real fp32 (TF32 off)", 4096, 3584, 151936, "fp32"),
    Case("non-contiguous bf16", 300, 256, 4099, "bf16", noncontig=True),
    Case("odd bf16", 129, 72, 32003, "bf16"),
    Case("odd fp16", 61, 64, 5003, "fp16"),
    Case("real bf16 filtered", 4096, 3584, 151936, "bf16", filtered=True),
    Case("real fp32, TF32 on", 1024, 3584, 151936, "fp32", tf32=True),
)
SMOKE_CASES = (
    Case("odd fp32 + bias, τ=0.7", 13, 24, 101, bias=True, temperature=0.7),
    Case("odd bf16", 9, 16, 67, "bf16"),
    Case("odd fp16", 9, 16, 67, "fp16"),
    Case("non-contiguous fp32", 11, 20, 53, noncontig=True),
    Case("filtered fp32", 12, 32, 97, filtered=True),
)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def correctness(ctx, emit) -> str:
    from ._worker import set_tf32
    backends = ("torch", "triton", "triton-rows") if ctx.smoke else ("triton", "triton-rows")
    status = "ok"
    for case in SMOKE_CASES if ctx.smoke else GPU_CASES:
        for backend in backends:
            if backend == "torch" and case.dtype == "fp16":
                continue  # CPU fp16 is the triton interpreter's case; the torch path casts
            if backend == "triton-rows" and (case.dtype == "fp16" or case.filtered):
                continue  # that backend refuses both (exact, bf16/fp32 only)
            t0 = time.time()
            try:
                if ctx.device == "cuda":
                    set_tf32(case.tf32)
                errs = compare(case, backend, ctx.device)
                ok = all(v <= case.tol for v in errs.values())
                emit(item=case.name, backend=backend, status="ok" if ok else "FAIL",
                     tol=case.tol, errors=errs, seconds=round(time.time() - t0, 2),
                     **{k: getattr(case, k) for k in ("N", "H", "V", "dtype", "filtered", "tf32")})
                status = status if ok else "fail"
            except Exception as e:  # noqa: BLE001 - one case's crash (e.g. OOM) is a record
                emit(item=case.name, backend=backend, status=f"error: {type(e).__name__}: {e}"[:400])
                status = "fail"
            finally:
                if ctx.device == "cuda":
                    set_tf32(False)
                    torch.cuda.empty_cache()
    return status


def make_inputs(case: Case, device: str, seed: int = 0) -> dict:
    g = torch.Generator(device=device).manual_seed(seed)
    dt = DTYPES[case.dtype]
    pad = 8 if case.noncontig else 0
    h = torch.randn(1, case.N, case.H + pad, generator=g, device=device)[..., :case.H]
    w = (torch.randn(case.V, case.H + pad, generator=g, device=device)
         / math.sqrt(case.H))[:, :case.H]
    if case.filtered:  # an LM-like peaked softmax, where filtering skips most of V
        y = torch.randint(0, case.V, (1, case.N), generator=g, device=device)
        h = h * 0.3 + w[y] * (2.0 * math.log(case.V))
    else:
        y = torch.randint(0, case.V, (1, case.N), generator=g, device=device)
    h, w = h.to(dt), w.to(dt)
    if case.noncontig:
        assert not h.is_contiguous() and not w.is_contiguous()
    b = (torch.randn(case.V, generator=g, device=device) * 0.3).to(dt) if case.bias else None
    mask = torch.rand(1, case.N, generator=g, device=device) > 0.1
    adv = torch.randn(1, generator=g, device=device)
    return {"h": h, "w": w, "b": b, "y": y, "mask": mask, "adv": adv, "g": g}


def compare(case: Case, backend: str, device: str) -> dict:
    """Largest |ours − reference| / max|reference| per output."""
    from r1reward import kernels as K
    x = make_inputs(case, device)
    with torch.no_grad():
        lp_ref = K.token_logprobs(x["h"], x["w"], x["y"], bias=x["b"], backend="reference",
                                  temperature=case.temperature)
    # Ratios near 1 (inside the clip band), so most tokens carry a gradient.
    old = lp_ref + 0.05 * torch.randn(lp_ref.shape, generator=x["g"], device=device)
    out = {}
    for name in (backend, "reference"):
        hh, ww = (t.detach().clone().requires_grad_() for t in (x["h"], x["w"]))
        loss, _ = K.fused_stable_reinforce_loss(
            hh, ww, x["y"], old, x["adv"], x["mask"], bias=x["b"], backend=name,
            temperature=case.temperature, filter_eps="auto" if case.filtered and name != "reference"
            else None)
        dh, dw = torch.autograd.grad(loss, (hh, ww))
        with torch.no_grad():
            lp, ent = K.token_logprobs(x["h"], x["w"], x["y"], bias=x["b"], backend=name,
                                       temperature=case.temperature, return_entropy=True)
        out[name] = {"loss": loss.detach(), "dh": dh, "dW": dw, "logp": lp, "entropy": ent}
        del hh, ww, loss, dh, dw
    return {k: rel_err(out[backend][k], out["reference"][k]) for k in out[backend]}


def rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    got, want = got.double(), want.double()
    if not torch.isfinite(got).all():
        return math.inf
    scale = want.abs().max().item() if want.numel() else 0.0
    return (got - want).abs().max().item() / max(scale, 1e-30) if want.numel() else 0.0
