"""TRL: ``GRPOTrainer`` with the StableReinforce loss and the Advantage Filter.

    from r1reward.integrations.trl import StableReinforceGRPOTrainer
    trainer = StableReinforceGRPOTrainer(model=..., reward_funcs=..., args=GRPOConfig(...),
                                         train_dataset=..., preclip=(math.log(1e-3), math.log(1e3)),
                                         adv_filter_k=3.0)

Log-probs still come from TRL's own fused LM head (no ``[tokens × vocab]`` logits); the
per-token surrogate is ours (Pre-CLIP, PPO clip, k3 KL with ``beta``, TRL's vLLM
importance weights on the policy term) and is aggregated exactly as TRL aggregates its
``loss_type`` (``grpo``, ``bnpo`` or ``dapo``). The Advantage Filter zeroes advantages
beyond ``adv_filter_k`` standard units after TRL has computed them.
TRL features with no StableReinforce counterpart here are refused at construction.
"""
from __future__ import annotations

import inspect

import torch
from trl import GRPOTrainer

from r1reward.kernels import stable_reinforce_loss
from r1reward.kernels.loss_math import DEFAULT_PRECLIP

SUPPORTED_LOSS_TYPES = ("grpo", "bnpo", "dapo")


class StableReinforceGRPOTrainer(GRPOTrainer):
    def __init__(self, *args, preclip=DEFAULT_PRECLIP, adv_filter_k: float | None = 3.0, **kwargs):
        if adv_filter_k is not None and not adv_filter_k > 0:
            raise ValueError(f"adv_filter_k must be > 0 or None, got {adv_filter_k}")
        self.preclip, self.adv_filter_k = preclip, adv_filter_k
        super().__init__(*args, **kwargs)
        a = self.args
        refused = {
            "loss_type": (a.loss_type not in SUPPORTED_LOSS_TYPES, f"one of {SUPPORTED_LOSS_TYPES}"),
            "importance_sampling_level": (a.importance_sampling_level != "token", "'token'"),
            "delta": (a.delta is not None, "None (Pre-CLIP bounds the ratio instead)"),
            "off_policy_mask_threshold": (a.off_policy_mask_threshold is not None, "None"),
            "top_entropy_quantile": (a.top_entropy_quantile < 1.0, "1.0"),
            "use_bias_correction_kl": (a.beta != 0.0 and bool(getattr(a, "use_bias_correction_kl", False)),
                                       "False when beta != 0"),
            "entropy bonus": (bool(getattr(self, "_entropy_bonus_enabled", False)), "off"),
        }
        bad = [f"{k} (must be {want})" for k, (is_bad, want) in refused.items() if is_bad]
        if bad:
            raise ValueError("StableReinforceGRPOTrainer does not support these GRPOConfig "
                             "settings: " + "; ".join(bad))
        # TRL's log-prob helper takes the multimodal inputs by name; pass those it knows.
        params = inspect.signature(self._get_per_token_logps_and_entropies).parameters
        self._model_input_names = [p for p in params if p not in
                                   ("model", "input_ids", "attention_mask", "logits_to_keep",
                                    "batch_size", "compute_entropy", "compute_aux_loss")]

    # ---- the Advantage Filter, after TRL's own advantages --------------------------------
    def _generate_and_score_completions(self, inputs):
        out = super()._generate_and_score_completions(inputs)
        if self.adv_filter_k is not None:
            adv = out["advantages"]
            bad = ~torch.isfinite(adv) | (adv.abs() > self.adv_filter_k)
            out["advantages"] = torch.where(bad, torch.zeros_like(adv), adv)
            mode = "train" if self.model.training else "eval"
            frac = bad.float().mean() if adv.numel() else adv.new_zeros(())
            self._metrics[mode]["stable_reinforce/filtered_frac"].append(
                self.accelerator.gather(frac).mean().item())
        return out

    # ---- the loss -------------------------------------------------------------------------
    def _compute_loss(self, model, inputs):
        prompt_ids, prompt_mask = inputs["prompt_ids"], inputs["prompt_mask"]
        completion_ids, completion_mask = inputs["completion_ids"], inputs["completion_mask"]
        input_ids = torch.cat([prompt_ids, completion_ids], dim=1)
        attention_mask = torch.cat([prompt_mask, completion_mask], dim=1)
        mask = completion_mask if "tool_mask" not in inputs else completion_mask * inputs["tool_mask"]
        extra = {k: inputs.get(k) for k in self._model_input_names}
        logps, entropies, aux_loss = self._get_per_token_logps_and_entropies(
            model, input_ids, attention_mask, completion_ids.size(1), compute_entropy=True,
            compute_aux_loss=self.aux_loss_enabled, **extra)

        mode = "train" if self.model.training else "eval"
        accumulation = self.current_gradient_accumulation_steps if mode == "train" else 1.0
        if self.loss_type == "grpo":  # mean over sequences of per-sequence token means
            aggregation, normalizer = "seq-mean-token-mean", float(mask.shape[0]) * accumulation
        elif self.loss_type == "bnpo":  # token mean of this micro-batch
            aggregation, normalizer = "token-mean", mask.sum().clamp(min=1.0) * accumulation
        else:  # dapo: token sum over the accumulation window's global token count
            normalizer = inputs["num_items_in_batch"].clamp(min=1.0) / self.accelerator.num_processes
            if mode == "train":
                normalizer = (normalizer * self.current_gradient_accumulation_steps
                              / self.args.steps_per_generation)
            aggregation = "token-mean"
        is_weights = (inputs["importance_sampling_ratio"]
                      if self.use_vllm and self.vllm_importance_sampling_correction else None)
        loss, stats = stable_reinforce_loss(
            logps, inputs.get("old_per_token_logps"), inputs["advantages"], mask.bool(),
            ref_logp=inputs.get("ref_per_token_logps") if self.beta != 0.0 else None,
            preclip=self.preclip, clip_eps=(self.epsilon_low, self.epsilon_high),
            kl_coef=self.beta, kl_estimator="k3", aggregation=aggregation,
            normalizer=normalizer, is_weights=is_weights)
        if self.aux_loss_enabled:
            loss = loss + self.router_aux_loss_coef * aux_loss / accumulation

        def global_mean(x):
            return self.accelerator.gather(x.detach().float()).mean().item()

        m = self._metrics[mode]
        m["entropy"].append(global_mean((entropies * mask).sum() / mask.sum().clamp(min=1.0)))
        for key in ("preclip_frac", "clip_frac", "ratio_max", "approx_kl"):
            m[f"stable_reinforce/{key}"].append(global_mean(stats[key]))
        if "ref_kl" in stats:
            m["kl"].append(global_mean(stats["ref_kl"]))
        return loss
