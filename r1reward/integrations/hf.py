"""Hugging Face ``Trainer``: the fused StableReinforce loss as ``compute_loss``.

    from r1reward.integrations.hf import StableReinforceTrainer
    trainer = StableReinforceTrainer(model=model, args=TrainingArguments(...),
                                     train_dataset=ds, loss=StableReinforceLoss(...))

Each batch holds the model's inputs (``input_ids``, ``attention_mask``, and for a VLM
``pixel_values``/``image_grid_thw``) plus ``response_mask`` ``[B, T]`` (1 on response
tokens), ``advantages`` ``[B]`` or ``[B, T]`` and, optionally, ``old_logp`` and
``ref_logp`` ``[B, T-1]`` (log-probs of tokens 1..T-1; omit ``old_logp`` when on-policy).
The backbone's last hidden states and the lm_head weight go straight to the fused loss:
no ``[tokens × vocab]`` logits. The loss is a mean per micro-batch; the ``Trainer``
divides it by the accumulation steps.
"""
from __future__ import annotations

from transformers import Trainer

from r1reward.kernels import StableReinforceLoss

LOSS_COLUMNS = ("response_mask", "advantages", "old_logp", "ref_logp")


class StableReinforceTrainer(Trainer):
    def __init__(self, *args, loss: StableReinforceLoss | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_fn = loss if loss is not None else StableReinforceLoss()
        self.last_loss_stats: dict = {}

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()  # keep the loss's columns in the batches
        self._signature_columns = list(dict.fromkeys([*self._signature_columns, *LOSS_COLUMNS]))

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        inputs = dict(inputs)
        missing = [k for k in ("response_mask", "advantages") if k not in inputs]
        if missing:
            raise KeyError(f"StableReinforceTrainer batches need {missing} (see the module docstring)")
        mask = inputs.pop("response_mask").bool()
        advantages = inputs.pop("advantages")
        old_logp, ref_logp = inputs.pop("old_logp", None), inputs.pop("ref_logp", None)
        inputs.pop("labels", None)
        backbone = getattr(model, model.base_model_prefix)
        hidden = backbone(**inputs, use_cache=False).last_hidden_state
        head = model.get_output_embeddings()
        loss, stats = self.loss_fn.fused(hidden[:, :-1], head.weight, inputs["input_ids"][:, 1:], old_logp,
                                         advantages, mask[:, 1:], ref_logp=ref_logp, bias=head.bias)
        self.last_loss_stats = {k: float(v) for k, v in stats.items()}
        return (loss, {"loss_stats": stats}) if return_outputs else loss
