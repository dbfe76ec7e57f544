"""The benchmarked methods: each builds ``(forward, step)`` closures over the inputs.

``forward()`` runs the training forward (graph kept, as before ``backward``); ``step()``
runs forward + backward and leaves ``hidden.grad`` / ``weight.grad`` set. Methods from
other packages or from backends still being written report why they cannot run
(:func:`unavailable`) instead of failing the whole benchmark.
"""
from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

# "bound" = the three GEMMs every exact method must do; "exact" / "filtered" as in the API.
MODES = {"3gemm": "bound", "naive": "exact", "reference": "exact",
         "r1reward-torch": "exact", "r1reward-torch-filtered": "filtered",
         "r1reward-triton": "exact", "r1reward-triton-filtered": "filtered",
         "r1reward-rows": "exact",
         "liger": "exact", "cce": "exact", "cce-filtered": "filtered"}
METHODS = tuple(MODES)
# Methods worth running on the "peaked" (LM-like) case: the ones that can skip work there.
PEAKED_METHODS = ("3gemm", "r1reward-torch", "r1reward-torch-filtered", "r1reward-triton",
                  "r1reward-triton-filtered", "cce", "cce-filtered")
_BACKEND_MODULES = {"torch": "r1reward.kernels.torch_chunked",
                    "rows": "r1reward.kernels.rows_chunked",
                    "triton": "r1reward.kernels.triton_ops"}


@dataclass
class Options:
    compile: bool = True       # Liger's compiled loss math; off for quick smoke runs
    filter_eps: float | None = None  # set for "*-filtered" methods


def unavailable(method: str, device: torch.device) -> str | None:
    """Why ``method`` cannot run here (a short status), or None if it can."""
    if method not in MODES:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    if method.startswith(("r1reward-triton", "r1reward-rows")) and device.type != "cuda":
        return "skipped: needs CUDA"
    if method == "cce-filtered" and device.type != "cuda":
        return "skipped: gradient filtering exists only in CCE's CUDA kernels"
    needs = {"liger": "liger_kernel.chunked_loss", "cce": "cut_cross_entropy",
             "cce-filtered": "cut_cross_entropy"}.get(method)
    if method.startswith("r1reward-"):
        needs = _BACKEND_MODULES[method.split("-")[1]]
    if needs:
        try:
            importlib.import_module(needs)
        except Exception as e:  # noqa: BLE001 - any import failure means "not usable"
            return f"unavailable: cannot import {needs} ({type(e).__name__}: {e})"[:300]
    return None


def build(method: str, inp: dict, opts: Options) -> tuple[Callable, Callable]:
    """``(forward, step)`` closures for ``method`` on the inputs of ``make_inputs``."""
    if method == "3gemm":
        return _three_gemms(inp)
    loss_fn = {"naive": _naive, "reference": _r1reward, "liger": _liger,
               "cce": _cce, "cce-filtered": _cce}.get(method)
    if method.startswith("r1reward-"):
        loss_fn = _r1reward
    if loss_fn is None:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    forward = loss_fn(method, inp, opts)

    def step():
        forward().backward()

    return forward, step


def _three_gemms(inp):
    """z = h·Wᵀ, ∂h = dz·W, ∂W = dzᵀ·h on the same shapes; z stands in for dz (the values
    do not matter for timing, and it keeps the bound's memory at one [N, V] buffer)."""
    hidden, weight = inp["hidden"], inp["weight"]
    h = hidden.detach().reshape(-1, hidden.shape[-1])
    w = weight.detach()

    def forward():
        return h @ w.T

    def step():
        z = h @ w.T
        hidden.grad = (z @ w).reshape(hidden.shape)
        weight.grad = z.T @ h

    return forward, step


def _sr_loss(lp, inp):
    from r1reward.kernels import stable_reinforce_loss
    loss, _ = stable_reinforce_loss(lp.reshape(inp["mask"].shape), inp["old_logp"],
                                    inp["advantages"], inp["mask"])
    return loss


def _naive(method, inp, opts):
    """Full fp32 logits, log_softmax, gather, then our loss (what OpenRLHF-style code does)."""
    hidden, weight, targets = inp["hidden"], inp["weight"], inp["targets"]

    def forward():
        z = (hidden.reshape(-1, hidden.shape[-1]) @ weight.T).float()
        lp = torch.log_softmax(z, dim=-1).gather(1, targets.reshape(-1, 1)).squeeze(1)
        return _sr_loss(lp, inp)

    return forward


def _r1reward(method, inp, opts):
    from r1reward.kernels import fused_stable_reinforce_loss
    backend = "reference" if method == "reference" else method.split("-")[1]
    backend = {"rows": "triton-rows"}.get(backend, backend)
    filter_eps = "auto" if method.endswith("-filtered") else None

    def forward():
        loss, _ = fused_stable_reinforce_loss(
            inp["hidden"], inp["weight"], inp["targets"], inp["old_logp"], inp["advantages"],
            inp["mask"], backend=backend, filter_eps=filter_eps)
        return loss

    return forward


def _liger(method, inp, opts):
    """Liger's chunked GRPO loss set as close to ours as it goes: no KL (beta=0, no ref
    model), ε = 0.2 both sides, token-mean over the batch ("dapo"). It has no Pre-CLIP."""
    from liger_kernel.chunked_loss import LigerFusedLinearGRPOLoss
    mod = LigerFusedLinearGRPOLoss(beta=0.0, use_ref_model=False, epsilon_low=0.2,
                                   epsilon_high=0.2, loss_type="dapo", temperature=1.0,
                                   compiled=opts.compile, chunk_size=1)
    mask = inp["mask"].to(torch.float32)

    def forward():
        loss, _metrics = mod(inp["hidden"], inp["weight"], inp["targets"], mask,
                             inp["advantages"], old_per_token_logps=inp["old_logp"])
        return loss

    return forward


def _cce(method, inp, opts):
    """CCE's per-token cross-entropy (= -logp), then our loss on top. CUDA: the Triton
    kernels (exact, or filtered at our bf16 threshold); CPU: its torch.compile path."""
    from cut_cross_entropy import linear_cross_entropy

    from r1reward.kernels import BF16_FILTER_EPS
    cuda = inp["hidden"].device.type == "cuda"
    impl = "cce" if cuda else "torch_compile"
    filter_eps = BF16_FILTER_EPS if method == "cce-filtered" else None

    def forward():
        nll = linear_cross_entropy(inp["hidden"], inp["weight"], inp["targets"],
                                   reduction="none", impl=impl, filter_eps=filter_eps)
        return _sr_loss(-nll.float(), inp)

    return forward
