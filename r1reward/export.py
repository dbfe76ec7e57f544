"""Final export in Hugging Face format (config + safetensors + processor), loadable with
``from_pretrained`` — also from an FSDP2-sharded policy (full state dict gathered on rank 0).

The processor's ``processor_config.json`` includes the video processor's config also
when it was built without one (r1reward.processor), so ``AutoModelForImageTextToText``
and ``AutoProcessor`` (where torchvision is installed) load the export as they are.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from transformers import PreTrainedModel


def _hf_class(model) -> type:
    """The original HF class (FSDP2 wraps it in a dynamic ``FSDP<name>`` subclass)."""
    from torch.distributed.fsdp import FSDPModule
    for cls in type(model).__mro__:
        if issubclass(cls, PreTrainedModel) and not issubclass(cls, FSDPModule):
            return cls
    raise TypeError(f"{type(model).__name__} is not a Hugging Face PreTrainedModel")


def export_hf(model, processor, out_dir: str | Path, dtype: torch.dtype | None = None) -> Path | None:
    """An FSDP2-sharded model: collective (every rank must call), rank 0 writes ``out_dir``.
    A plain model: the calling process writes it (rank 0's cold start, while the other
    ranks wait elsewhere)."""
    from torch.distributed.fsdp import FSDPModule
    sharded = dist.is_initialized() and any(isinstance(m, FSDPModule) for m in model.modules())
    if sharded:
        full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True,
                                                                    cpu_offload=True))
        rank = dist.get_rank()
    else:
        full, rank = {k: v.detach().cpu() for k, v in model.state_dict().items()}, 0
    out = Path(out_dir)
    if rank == 0:
        # A fresh plain model (plain nn.Linear lm_head, no FSDP/compile wrappers) receives the
        # gathered weights, so what is saved is exactly a stock HF checkpoint.
        fresh = _hf_class(model)._from_config(model.config)
        missing, unexpected = fresh.load_state_dict(full, strict=False)
        tied = {k for k in missing if k.endswith("lm_head.weight")} if getattr(
            fresh.config.get_text_config(), "tie_word_embeddings", False) else set()
        if set(missing) - tied or unexpected:
            raise RuntimeError(f"export: state dict mismatch, missing={missing} "
                               f"unexpected={unexpected}")
        fresh.tie_weights()
        if dtype is not None:
            fresh = fresh.to(dtype)
        out.mkdir(parents=True, exist_ok=True)
        fresh.save_pretrained(out, safe_serialization=True)
        if processor is not None:
            processor.save_pretrained(out)
    if sharded:
        dist.barrier()
    return out if rank == 0 else None
