"""Training health: skip steps with a non-finite loss or a grad-norm spike; after
``max_bad_steps`` bad steps in a row ask for a rollback (to the last checkpoint, with a
lower learning rate). The decision is made from all-reduced values, so every rank agrees.
"""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from enum import Enum


class Action(Enum):
    OK = "ok"              # apply the update
    SKIP = "skip"          # drop this update, keep going
    ROLLBACK = "rollback"  # too many bad steps in a row: back to the last checkpoint


@dataclass(frozen=True)
class Decision:
    """What :meth:`HealthMonitor.check` decided. ``str()`` gives the form logged in
    metrics.jsonl's "health" field: ``"ok"``, ``"skip:<reason>"``, ``"rollback:<reason>"``."""

    action: Action
    reason: str = ""

    def __str__(self) -> str:
        return self.action.value if self.action is Action.OK else f"{self.action.value}:{self.reason}"


@dataclass
class HealthMonitor:
    spike_factor: float = 10.0
    window: int = 20
    min_history: int = 5
    max_bad_steps: int = 3
    # Norms at or below this are never spikes. Once the policy is right on almost every
    # prompt most advantages are ~0 and the median norm collapses (0.01 on the default
    # run), so a step with a few wrong samples reads as a 15x "spike" although the
    # gradient is far below the clip threshold.
    min_spike_norm: float = 1.0  # the trainer's default too (--health.min_spike_norm)
    history: list = field(default_factory=list)  # recent healthy grad norms
    bad_in_a_row: int = 0
    skipped_total: int = 0
    rollbacks: int = 0

    def check(self, loss: float, grad_norm: float) -> Decision:
        """OK, SKIP or ROLLBACK (with the reason, e.g. ``nonfinite_loss``)."""
        reason = None
        if not math.isfinite(loss):
            reason = "nonfinite_loss"
        elif not math.isfinite(grad_norm):
            reason = "nonfinite_grad"
        elif len(self.history) >= self.min_history:
            median = statistics.median(self.history)
            if (median > 0 and grad_norm > self.spike_factor * median
                    and grad_norm > self.min_spike_norm):
                reason = f"grad_spike({grad_norm:.3g}>{self.spike_factor:g}x{median:.3g})"
        if reason is None:
            self.bad_in_a_row = 0
            self.history = (self.history + [grad_norm])[-self.window:]
            return Decision(Action.OK)
        self.bad_in_a_row += 1
        self.skipped_total += 1
        if self.bad_in_a_row >= self.max_bad_steps:
            self.bad_in_a_row = 0
            self.rollbacks += 1
            return Decision(Action.ROLLBACK, reason)
        return Decision(Action.SKIP, reason)

    def state_dict(self) -> dict:
        return {"history": list(self.history), "bad_in_a_row": self.bad_in_a_row,
                "skipped_total": self.skipped_total, "rollbacks": self.rollbacks}

    def load_state_dict(self, d: dict) -> None:
        self.history = list(d["history"])
        self.bad_in_a_row = d["bad_in_a_row"]
        self.skipped_total = d["skipped_total"]
        self.rollbacks = d["rollbacks"]
