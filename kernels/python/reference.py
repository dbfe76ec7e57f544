"""Plain PyTorch with full logits: the oracle every other backend is tested against.

It materializes ``[N, V]`` logits, so it is only for tests and small problems.
``compute_dtype=torch.float64`` gives the tight oracle used by the test suite.
"""
from __future__ import annotations

import torch

from .loss_math import LossSettings, per_token_loss


def logits(hidden, weight, bias, temperature, compute_dtype):
    z = hidden.to(compute_dtype) @ weight.to(compute_dtype).T
    if bias is not None:
        z = z + bias.to(compute_dtype)
    return z / temperature


def token_logprobs(hidden, weight, targets, *, bias=None, temperature=1.0, ignore_index=-100,
                   return_entropy=False, compute_dtype=torch.float32):
    """``[N, H] -> [N]`` log-probs (fp32 unless ``compute_dtype`` is wider); 0 at ignored rows.

    Entropy is returned detached (it is a statistic, not a training signal here).
    """
    z = logits(hidden, weight, bias, temperature, compute_dtype)
    logp_all = torch.log_softmax(z, dim=-1)
    valid = targets != ignore_index
    safe = torch.where(valid, targets, torch.zeros_like(targets))
    lp = logp_all.gather(1, safe[:, None]).squeeze(1)
    lp = torch.where(valid, lp, torch.zeros_like(lp))
    out_dtype = torch.promote_types(compute_dtype, torch.float32)
    entropy = None
    if return_entropy:
        with torch.no_grad():
            entropy = -(logp_all.exp() * logp_all).sum(-1)
            entropy = torch.where(valid, entropy, torch.zeros_like(entropy)).to(out_dtype)
    return lp.to(out_dtype), entropy


def fused_loss(hidden, weight, targets, old_lp, adv, ref_lp, tok_weight, valid, *, bias,
               temperature, settings: LossSettings, return_entropy, filter_eps=None,
               compute_dtype=torch.float32):
    """Full-logits version of the fused loss: ``Σ w · loss_t(lp)`` with autograd."""
    del filter_eps  # the oracle is always exact
    tgt = torch.where(valid, targets, torch.full_like(targets, -100))
    lp, entropy = token_logprobs(hidden, weight, tgt, bias=bias, temperature=temperature,
                                 return_entropy=return_entropy, compute_dtype=compute_dtype)
    loss_t = per_token_loss(lp, old_lp.to(lp.dtype), adv.to(lp.dtype),
                            None if ref_lp is None else ref_lp.to(lp.dtype), settings)
    loss = (tok_weight.to(lp.dtype) * torch.where(valid, loss_t, torch.zeros_like(loss_t))).sum()
    return loss, lp.detach(), entropy
