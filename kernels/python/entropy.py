"""Token log-probs and entropy *with* an entropy gradient (for an entropy bonus).

The fused backends return entropy as a detached statistic. An entropy bonus needs
``∂H/∂z = −p·(log p + H)``, so this path recomputes logits per row chunk under activation
checkpointing: the forward keeps only each chunk's inputs, the backward rebuilds one
``[C, V]`` chunk at a time. No ``[N, V]`` tensor exists at any point. It costs about two
extra logit GEMMs over the fused path, and a 16-bit weight is cast to fp32 once per call
(one ``V·H·4`` buffer alive until backward) so every logit accumulates in fp32.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from .chunk_plan import EXTRA_BUDGET_BYTES
from .torch_chunked import _check_targets

# fp32 logits, log-softmax and its exp are alive together in a chunk's forward/backward.
_CHUNK_COPIES = 3


def _chunk(hc, w32, b32, tc, inv_tau):
    z = hc.to(torch.float32) @ w32.t()
    if b32 is not None:
        z = z + b32
    if inv_tau != 1.0:
        z = z * inv_tau
    logp = torch.log_softmax(z, dim=-1)
    lp = logp.gather(1, tc[:, None]).squeeze(1)
    ent = -(logp.exp() * logp).sum(dim=-1)
    return lp, ent


def token_logprobs_entropy(h, weight, targets, *, bias, temperature, ignore_index,
                           budget: int = EXTRA_BUDGET_BYTES):
    """``[N, H] → (lp [N], entropy [N])`` fp32, both differentiable; 0 at ignored rows."""
    n, vocab = h.shape[0], weight.shape[0]
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    _check_targets(safe, vocab, "the response")
    w32 = weight.to(torch.float32)
    b32 = None if bias is None else bias.to(torch.float32)
    rows = max(1, budget // (_CHUNK_COPIES * 4 * vocab))
    lps, ents = [], []
    for s0 in range(0, n, rows):
        lp, ent = checkpoint(_chunk, h[s0:s0 + rows], w32, b32, safe[s0:s0 + rows],
                             1.0 / temperature, use_reentrant=False)
        lps.append(lp)
        ents.append(ent)
    if not lps:
        zero = h.new_zeros(0, dtype=torch.float32) + 0.0 * w32.sum()
        return zero, zero
    lp, ent = torch.cat(lps), torch.cat(ents)
    zero = torch.zeros_like(lp)
    return torch.where(valid, lp, zero), torch.where(valid, ent, zero)
