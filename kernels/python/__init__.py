"""Fused log-prob and StableReinforce loss kernels (installed as ``r1reward.kernels``).

Layers: Triton kernels (``triton_fwd``/``triton_bwd``) and the chunked PyTorch path
(``torch_chunked``) → autograd functions → this functional API and ``StableReinforceLoss``.
"""
from .functional import (
                         BACKENDS,
                         BF16_FILTER_EPS,
                         fused_stable_reinforce_loss,
                         resolve_backend,
                         stable_reinforce_loss,
                         token_logprobs,
)
from .loss_math import LossSettings, token_weights
from .module import StableReinforceLoss

__all__ = ["token_logprobs", "stable_reinforce_loss", "fused_stable_reinforce_loss",
           "StableReinforceLoss", "LossSettings", "token_weights", "resolve_backend",
           "BACKENDS", "BF16_FILTER_EPS"]
