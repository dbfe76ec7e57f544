"""All parallelism in one place: process group, activation checkpointing, per-block
``torch.compile`` and FSDP2 (torchtitan's order: AC → compile → fully_shard).

FSDP2 units: every vision block, every decoder block, ``[final norm, lm_head]`` as one unit
that is NOT resharded after forward (the fused loss runs inside the lm_head's forward and
needs the plain, unsharded weight; see logprobs.FusedLMHead), and the root (embeddings,
patch embed, merger).
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def group(self):
        return dist.group.WORLD if self.world > 1 else None


def init_distributed(fsdp: bool) -> Dist:
    """Join the torchrun process group (gloo on CPU, nccl on CUDA) when there is one.

    ``--fsdp`` without torchrun runs FSDP2 on a one-process group, so the code path is the
    same as on many ranks.
    """
    cuda = torch.cuda.is_available()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if (world > 1 or fsdp) and not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # a lone process: make a 1-rank group
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
            os.environ.setdefault("RANK", "0")
            os.environ.setdefault("WORLD_SIZE", "1")
        dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None)
    if dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size(), local_rank, device)
    return Dist(device=device)


def decoder_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.language_model.layers)


def vision_blocks(model: nn.Module) -> list[nn.Module]:
    return list(model.model.visual.blocks)


def final_norm(model: nn.Module) -> nn.Module:
    return model.model.language_model.norm


def parallelize(model: nn.Module, *, fsdp: bool, compile: bool, ac: bool, device: torch.device,
                trainable: bool = True) -> nn.Module:
    """Apply AC, per-block compile and FSDP2 to a Qwen2(.5)-VL model, in place."""
    if ac and trainable:
        # HF's own per-layer checkpointing keeps parameter names (and so checkpoints and the
        # HF export) unchanged; non-reentrant is the variant that composes with FSDP2.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile:
        blocks = vision_blocks(model) + decoder_blocks(model)
        # Every block runs the same forward code, and dynamo keeps one cache entry per
        # variant it meets (vision vs text block, window vs full attention, each layer,
        # training vs generation). Past the default limit of 8 entries it silently runs
        # the remaining blocks eagerly (seen with 6 + 2 tiny blocks), so size it to the model.
        cfg = torch._dynamo.config
        cfg.recompile_limit = max(cfg.recompile_limit, 4 * len(blocks))
        cfg.accumulated_recompile_limit = max(cfg.accumulated_recompile_limit, 8 * len(blocks))
        for block in blocks:
            block.compile(dynamic=True)  # in place: names stay the same
    if fsdp:
        apply_fsdp(model, device)
    return model


def apply_fsdp(model: nn.Module, device: torch.device) -> None:
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

    if device.type == "cuda":
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    else:  # CPU: gloo and CPU kernels are fp32 throughout
        mp = MixedPrecisionPolicy(param_dtype=torch.float32, reduce_dtype=torch.float32)
    for block in vision_blocks(model) + decoder_blocks(model):
        fully_shard(block, mp_policy=mp)
    head_unit = [final_norm(model), model.lm_head]
    embed = model.get_input_embeddings()
    if embed.weight is model.lm_head.weight:  # tied embeddings: one unit must own the weight
        head_unit.insert(0, embed)
    fully_shard(head_unit, mp_policy=mp, reshard_after_forward=False)
    fully_shard(model, mp_policy=mp)
    # HF generate (transformers 5) encodes images *before* prefill by calling the vision
    # tower directly, outside the root's forward, where the root's own parameters (patch
    # embed, merger) would still be sharded. FSDP2's public hook for such methods makes
    # generate itself run the root's pre-forward (lazy init, unshard) around all of it.
    register_fsdp_forward_method(model, "generate")


def sharded_blocks(model: nn.Module) -> list[nn.Module]:
    """The FSDP2 units that reshard after every forward (the vision and decoder blocks)."""
    from torch.distributed.fsdp import FSDPModule
    return [b for b in vision_blocks(model) + decoder_blocks(model) if isinstance(b, FSDPModule)]


@contextmanager
def unsharded(model: nn.Module, enabled: bool = True):
    """Keep every block gathered for the body (generation): one all-gather per block, not
    one per block per decoding step. Yields whether anything was gathered; afterwards the
    blocks are resharded and reshard after forward again, as :func:`apply_fsdp` set them."""
    blocks = sharded_blocks(model) if enabled else []
    if not blocks:
        yield False
        return
    for b in blocks:
        b.set_reshard_after_forward(False, recurse=False)
    try:
        for b in blocks:
            b.unshard()
        yield True
    finally:
        for b in blocks:
            b.reshard()
            b.set_reshard_after_forward(True, recurse=False)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
