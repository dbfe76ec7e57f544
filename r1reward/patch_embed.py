"""The vision tower's patch embedding as one GEMM (kept apart from r1reward.model so the
tiny checkpoint's builder can use it without importing the loader)."""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F


def _patch_embed_linear_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
    weight = self.proj.weight
    return F.linear(hidden_states.reshape(-1, weight[0].numel()).to(weight.dtype),
                    weight.reshape(weight.shape[0], -1), self.proj.bias)


def linear_patch_embed(model: torch.nn.Module) -> int:
    """Run the vision tower's patch embedding as one GEMM instead of a Conv3d.

    The Conv3d's kernel equals its stride and covers a whole patch, so it is a linear map
    of each flattened patch; on CPU the convolution path took ~7x the GEMM's time
    (fwd+bwd). The parameter keeps its name and shape, so checkpoints and exports are
    unchanged. Returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        proj = getattr(module, "proj", None)
        if (isinstance(proj, torch.nn.Conv3d) and type(module).__name__.endswith("PatchEmbed")
                and tuple(proj.kernel_size) == tuple(proj.stride)
                and tuple(proj.padding) == (0, 0, 0) and proj.groups == 1):
            module.forward = types.MethodType(_patch_embed_linear_forward, module)
            switched += 1
    return switched
