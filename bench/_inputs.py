"""Benchmark problem: one configuration and the tensors it stands for.

Every method runs in its own process, so the inputs are rebuilt from a seed in each one;
they must be identical across processes and cheap to make (``torch.randn`` of a
151936 × 3584 lm_head takes ~13 s on two cores, numpy's uniform generator ~1 s).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass

import numpy as np
import torch

from r1reward.cache import write_atomically

CASES = ("random", "peaked")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
OLD_LOGP_NOISE = 0.1  # std of (old_logp - logp): most ratios inside the 0.2 clip band


@dataclass(frozen=True)
class Problem:
    """Shape and data of one benchmark row (method-independent)."""

    case: str = "random"
    N: int = 512           # tokens = B * T
    B: int = 4             # sequences (Liger chunks over these)
    H: int = 2048
    V: int = 151936
    dtype: str = "fp32"
    device: str = "cpu"
    seed: int = 0
    target_p: float = 0.9  # "peaked": wanted softmax mass of the target token

    def __post_init__(self):
        if self.case not in CASES:
            raise ValueError(f"case must be one of {CASES}, got {self.case!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        for name in ("N", "B", "H", "V"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.N % self.B:
            raise ValueError(f"N={self.N} tokens must split evenly into B={self.B} sequences")
        if not 0.0 < self.target_p < 1.0:
            raise ValueError(f"target_p must be in (0, 1), got {self.target_p}")

    @property
    def T(self) -> int:
        return self.N // self.B

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def key(self) -> str:
        return hashlib.sha1(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


def _uniform(rng: np.random.Generator, shape, std: float) -> torch.Tensor:
    """Zero-mean uniform fp32 noise with the given std, transformed in place (no copies)."""
    a = rng.random(shape, dtype=np.float32)
    a -= 0.5
    a *= std * math.sqrt(12.0)
    return torch.from_numpy(a)


def peaked_alpha(V: int, H: int, target_p: float) -> float:
    """Scale α so that ``h = noise + α·W[y]`` gives the target about ``target_p`` of the mass.

    With unit-variance noise and rows of W of unit norm, the target logit is ≈ α and the
    others are ≈ N(0, s²), s² = 1 + α²/H, so ``p ≈ 1 / (1 + V·exp(s²/2 - α))``; solve for α
    by fixed-point iteration (α²/H is small, it converges in a few steps).
    """
    alpha = math.log(V)
    for _ in range(20):
        alpha = math.log(V) + 0.5 * (1.0 + alpha * alpha / H) + math.log(target_p / (1 - target_p))
        if alpha > 1e3:  # diverges when α/H is not small: tiny H cannot be peaked this way
            raise ValueError(f"case 'peaked' needs a larger hidden size than H={H}")
    return alpha


def make_inputs(p: Problem, cache_dir: str | None = None) -> dict:
    """Leaf tensors ``hidden [B,T,H]`` and ``weight [V,H]`` (requires_grad) plus targets,
    old_logp ``[B,T]``, per-sequence advantages ``[B]`` and a mask with some padding."""
    rng = np.random.default_rng(p.seed)
    dev = torch.device(p.device)
    # Rows of W have unit norm in expectation, so logits of random h are ~N(0, 1).
    weight = _uniform(rng, (p.V, p.H), 1.0 / math.sqrt(p.H))
    targets = torch.from_numpy(rng.integers(0, p.V, size=(p.N,), dtype=np.int64))
    hidden = _uniform(rng, (p.N, p.H), 1.0)
    if p.case == "peaked":
        hidden += peaked_alpha(p.V, p.H, p.target_p) * weight[targets]
    advantages = torch.from_numpy(rng.standard_normal(p.B).astype(np.float32))
    mask = torch.ones(p.B, p.T, dtype=torch.bool)
    mask[1::2, p.T - p.T // 8:] = False  # odd sequences end early (right padding)

    weight = weight.to(dev, p.torch_dtype)
    hidden = hidden.to(dev, p.torch_dtype).reshape(p.B, p.T, p.H)
    targets = targets.to(dev).reshape(p.B, p.T)
    lp, info = _exact_logp(p, hidden, weight, targets, cache_dir)
    noise = torch.from_numpy(rng.standard_normal(p.N).astype(np.float32) * OLD_LOGP_NOISE)
    old_logp = (lp.reshape(-1) + noise).reshape(p.B, p.T).to(dev)
    return {
        "hidden": hidden.requires_grad_(True),
        "weight": weight.requires_grad_(True),
        "targets": targets,
        "old_logp": old_logp,
        "advantages": advantages.to(dev),
        "mask": mask.to(dev),
        "info": info,
    }


@torch.no_grad()
def _exact_logp(p: Problem, hidden, weight, targets, cache_dir):
    """Exact fp32 log-probs (so old_logp is realistic: ratios near 1), cached on disk
    because computing them costs one full lm_head GEMM in every method's process."""
    path = os.path.join(cache_dir, f"old_logp_{p.key()}.pt") if cache_dir else None
    if path and os.path.exists(path):
        saved = torch.load(path)
        return saved["lp"], saved["info"]
    h = hidden.reshape(-1, p.H)
    y = targets.reshape(-1)
    out = torch.empty(p.N, dtype=torch.float32, device=h.device)
    chunk = 32  # 32 × V fp32 logits ≈ 19 MB at V = 151936
    for i in range(0, p.N, chunk):
        z = (h[i:i + chunk] @ weight.T).float()
        out[i:i + chunk] = z.gather(1, y[i:i + chunk, None]).squeeze(1) - torch.logsumexp(z, 1)
    lp = out.cpu()
    info = {"target_p_mean": float(lp.exp().mean()), "target_p_median": float(lp.exp().median())}
    if path:  # atomic: a concurrent reader sees all or nothing
        write_atomically(path, lambda tmp: torch.save({"lp": lp, "info": info}, tmp))
    return lp, info
