"""Named components the trainer can be configured with.

Each registry maps a setting's value (``--algo.estimator grpo``) to the function that
builds or runs that component. The config validates a setting against the registry's
names when it is parsed, and the trainer builds the component from the same registry,
so the allowed values are written in exactly one place.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from r1reward.kernels import BACKENDS
from r1reward.kernels.loss_math import AGGREGATIONS, KL_ESTIMATORS


@dataclass
class Registry:
    """``name -> component`` for one configurable slot (``kind`` names it in errors)."""

    kind: str
    _items: dict[str, Callable] = field(default_factory=dict)

    def register(self, name: str) -> Callable[[Callable], Callable]:
        def add(fn: Callable) -> Callable:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} is registered twice")
            self._items[name] = fn
            return fn
        return add

    def names(self) -> tuple[str, ...]:
        return tuple(self._items)

    def __contains__(self, name: object) -> bool:
        return name in self._items

    def get(self, name: str) -> Callable:
        if name not in self._items:
            raise KeyError(f"unknown {self.kind} {name!r}; choose from {'|'.join(self._items)}")
        return self._items[name]


# ------------------------------------------------------------------ advantage estimators
# An estimator turns per-rollout rewards into per-token advantages. Each receives an
# ``AdvantageInputs``-like object (see r1reward.trainer) and returns ``(adv, raw_mean)``:
# ``raw_mean`` is the mean of the returns before normalization (the release filter needs
# it) or None.
ADVANTAGE_ESTIMATORS = Registry("advantage estimator")
# Estimators that compare samples of the same prompt need rollout.n_samples > 1.
GROUP_ESTIMATORS = ("grpo", "rloo")


@ADVANTAGE_ESTIMATORS.register("reinforce_pp")
def _reinforce_pp(x):
    from r1reward.advantages import reinforce_pp_advantages
    adv, stats = reinforce_pp_advantages(x.rewards, x.mask, x.old_logp, x.ref_logp, x.kl_coef,
                                         x.kl_estimator, process_group=x.process_group,
                                         return_stats=True)
    return adv, stats.mean


@ADVANTAGE_ESTIMATORS.register("grpo")
def _grpo(x):
    from r1reward.advantages import grpo_advantages
    return grpo_advantages(x.rewards, x.mask, x.n_samples), None


@ADVANTAGE_ESTIMATORS.register("rloo")
def _rloo(x):
    from r1reward.advantages import rloo_advantages
    return rloo_advantages(x.rewards, x.mask, x.n_samples), None


# ------------------------------------------------------------------ advantage filters
# A filter zeroes outlier token advantages: ``(adv, mask, k, raw_mean) -> (adv, filtered)``.
ADVANTAGE_FILTERS = Registry("advantage filter")
# Filters that need the pre-normalization mean (only reinforce_pp provides it).
FILTERS_NEEDING_RAW_MEAN = ("release",)


def _filter(mode: str):
    def run(adv, mask, k, raw_mean):
        from r1reward.advantages import advantage_filter
        return advantage_filter(adv, mask, mode, k, raw_mean=raw_mean)
    return run


for _mode in ("zscore", "release", "off"):
    ADVANTAGE_FILTERS.register(_mode)(_filter(_mode))


# ------------------------------------------------------------------ consistency judges
# ``(RewardConfig, device) -> Judge | None``: who says whether an analysis supports its
# answer (SPEC §2). ``none`` switches the consistency reward off.
CONSISTENCY_JUDGES = Registry("consistency judge")


@CONSISTENCY_JUDGES.register("rule")
def _rule_judge(cfg, device):
    from r1reward.rewards import RuleJudge
    return RuleJudge()


@CONSISTENCY_JUDGES.register("openai")
def _openai_judge(cfg, device):
    from r1reward.rewards import OpenAIJudge
    return OpenAIJudge(cfg.openai_url, cfg.openai_model)


@CONSISTENCY_JUDGES.register("local")
def _local_judge(cfg, device):
    from r1reward.model import load_model_and_processor
    from r1reward.rewards import LocalJudge
    model, processor = load_model_and_processor(cfg.local_model, device=device)
    return LocalJudge(model, processor)


@CONSISTENCY_JUDGES.register("none")
def _no_judge(cfg, device):
    return None


# ------------------------------------------------------------------ kernel backends
# Which implementation of the fused log-prob / loss kernels runs (r1reward.kernels).
# The kernels' own lists are the source; these registries only expose them for checks.
KERNEL_BACKENDS = Registry("kernel backend")
for _backend in BACKENDS:
    KERNEL_BACKENDS.register(_backend)(lambda name=_backend: name)

AGGREGATION_MODES = Registry("loss aggregation")
for _agg in AGGREGATIONS:
    AGGREGATION_MODES.register(_agg)(lambda name=_agg: name)

KL_ESTIMATOR_NAMES = Registry("KL estimator")
for _kl in KL_ESTIMATORS:
    KL_ESTIMATOR_NAMES.register(_kl)(lambda name=_kl: name)
