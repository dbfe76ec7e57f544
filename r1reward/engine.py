"""Rollout engines: what generates the judgments the trainer scores and learns from.

An engine generates K samples per prompt (with images) and returns a
:class:`~r1reward.generation.Generation`: token ids laid out for the trainer's
teacher-forced forward, texts, and, where the backend reports them, the sampler's own
per-token log-probs. The trainer tells it when the policy's weights changed
(:meth:`RolloutEngine.sync_weights`) and when it may hold memory (:meth:`wake` /
:meth:`sleep`).

- ``hf`` (:class:`HFEngine`): Hugging Face ``generate`` on the policy itself. No second copy
  of the weights; under FSDP2 the decoder blocks are gathered once per rollout instead of
  once per decoding step (:func:`r1reward.parallelize.unsharded`).
- ``vllm`` (:class:`r1reward.engine_vllm.VLLMEngine`): a colocated vLLM engine holding its
  own copy of the weights, reloaded in place from the policy before each rollout.
"""
from __future__ import annotations

import torch.distributed as dist

from r1reward import generation
from r1reward.data import PreferencePair
from r1reward.generation import Generation
from r1reward.parallelize import unsharded


class RolloutEngine:
    """The interface: ``generate`` is required; the rest are no-ops unless a backend
    keeps its own weights (``sync_weights``) or device memory (``sleep`` / ``wake``)."""

    def generate(self, pairs: list[PreferencePair], *, do_sample: bool, temperature: float = 1.0,
                 top_p: float = 1.0, max_new_tokens: int, num_samples: int = 1) -> Generation:
        raise NotImplementedError

    def sync_weights(self, model) -> None:
        """Take the trainer's current weights (called before generating after an update)."""

    def wake(self) -> None:
        """Retake device memory before generating."""

    def sleep(self) -> None:
        """Give device memory back to training after generating."""

    def close(self) -> None:
        """Free the engine."""


class HFEngine(RolloutEngine):
    """``generate`` on the training model; ``unshard_once`` gathers FSDP2 blocks once per
    call rather than once per decoding step (more memory during generation, far fewer
    all-gathers)."""

    def __init__(self, model, processor, *, unshard_once: bool = True, static_cache: bool = False):
        self.model, self.processor, self.unshard_once = model, processor, unshard_once
        # a KV cache preallocated to prompt + max_new_tokens (HF's "static" cache)
        self.cache_kwargs = {"cache_implementation": "static"} if static_cache else {}

    def generate(self, pairs, *, do_sample, temperature=1.0, top_p=1.0, max_new_tokens,
                 num_samples=1) -> Generation:
        kw = dict(do_sample=do_sample, temperature=temperature, top_p=top_p,
                  max_new_tokens=max_new_tokens, num_samples=num_samples,
                  generate_kwargs=self.cache_kwargs)
        was_training = self.model.training
        self.model.eval()
        try:
            with unsharded(self.model, enabled=self.unshard_once) as gathered:
                # Sharded blocks all-gather in every forward, a collective: all ranks must keep
                # stepping until the longest finishes (HF's synced_gpus). Gathered, no forward
                # communicates and each rank stops at its own length.
                kw["synced_gpus"] = (not gathered and dist.is_initialized()
                                     and dist.get_world_size() > 1)
                return generation.generate(self.model, self.processor, pairs, **kw)
        finally:
            self.model.train(was_training)

