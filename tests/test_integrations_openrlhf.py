"""r1reward.integrations.openrlhf against OpenRLHF 0.11's own PolicyLoss.

``openrlhf.models`` cannot be imported on this machine: its ``__init__`` imports the actor,
whose import chain needs flash-attn (``ring_attn_utils``) and deepspeed (``models/utils``).
So the test runs the installed package's real ``models/loss.py`` file (PolicyLoss and
aggregate_loss, unmodified) with its one relative import, ``masked_mean``, taken from the
installed ``models/utils.py`` source; nothing of OpenRLHF is re-implemented here."""
import ast
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

from r1reward.integrations.openrlhf import StableReinforcePolicyLoss

B, T = 4, 6


@pytest.fixture(scope="module")
def openrlhf_loss():
    spec = importlib.util.find_spec("openrlhf")
    assert spec is not None, "openrlhf is part of the test install (pip install --no-deps openrlhf)"
    models = Path(spec.origin).parent / "models"
    source = (models / "utils.py").read_text()
    fn = next(n for n in ast.parse(source).body if isinstance(n, ast.FunctionDef) and n.name == "masked_mean")
    utils = types.ModuleType("_openrlhf_models.utils")
    code = "import torch\nfrom typing import Optional\n" + ast.get_source_segment(source, fn)
    exec(compile(code, str(models / "utils.py"), "exec"), utils.__dict__)
    pkg = types.ModuleType("_openrlhf_models")
    pkg.__path__ = [str(models)]
    sys.modules.update({"_openrlhf_models": pkg, "_openrlhf_models.utils": utils})
    loss_spec = importlib.util.spec_from_file_location("_openrlhf_models.loss", models / "loss.py")
    mod = importlib.util.module_from_spec(loss_spec)
    loss_spec.loader.exec_module(mod)
    yield mod
    for name in ("_openrlhf_models", "_openrlhf_models.utils"):
        sys.modules.pop(name, None)


def _batch(seed, spread=0.5):
    g = torch.Generator().manual_seed(seed)
    old = torch.randn(B, T, generator=g, dtype=torch.float64) - 2.0
    new = (old + spread * torch.randn(B, T, generator=g, dtype=torch.float64)).requires_grad_(True)
    rollout = old + 0.3 * torch.randn(B, T, generator=g, dtype=torch.float64)
    adv = torch.randn(B, T, generator=g, dtype=torch.float64)
    mask = torch.ones(B, T)
    mask[1, 4:] = 0
    mask[3, :] = 0  # an empty sequence
    return old, new, rollout, adv, mask


@pytest.mark.parametrize("token_level", [True, False])
@pytest.mark.parametrize("global_info", [False, True])
@pytest.mark.parametrize("dual_clip", [None, 3.0])
@pytest.mark.parametrize("correction", ["off", "mask", "clip"])
def test_equals_openrlhf_policy_loss_with_preclip_off(openrlhf_loss, token_level, global_info, dual_clip,
                                                       correction):
    kw = dict(clip_eps_low=0.2, clip_eps_high=0.28, dual_clip=dual_clip, token_level_loss=token_level,
              is_correction_level="off" if correction == "off" else "token",
              is_correction_mode="mask" if correction == "off" else correction,
              is_correction_threshold=(0.8, 1.25))
    old, new, rollout, adv, mask = _batch(0)
    call = dict(rollout_log_probs=rollout)
    if global_info:
        call.update(dp_size=2, batch_num_tokens=31.0, global_batch_size=7.0)
    ours = StableReinforcePolicyLoss(preclip=None, **kw)(new, old, adv, mask, **call)
    theirs = openrlhf_loss.PolicyLoss(**kw)(new, old, adv, mask, **call)
    (g_ours,) = torch.autograd.grad(ours[0], new)
    (g_theirs,) = torch.autograd.grad(theirs[0], new)
    torch.testing.assert_close(ours[0], theirs[0])
    torch.testing.assert_close(g_ours, g_theirs)
    if dual_clip is None:
        torch.testing.assert_close(ours[1].double(), theirs[1].double())  # clip ratio
    torch.testing.assert_close(ours[2], theirs[2])  # ppo_kl
    for a, b in zip(ours[3:], theirs[3:]):  # vllm_kl, is_filter_ratio
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a.double(), b.double())


def test_preclip_acts_where_openrlhf_only_clamps_at_20(openrlhf_loss):
    old, new, rollout, adv, mask = _batch(1)
    with torch.no_grad():
        new[0, 0] = old[0, 0] + 8.0
    adv[0, 0] = -1.0
    ours_fn = StableReinforcePolicyLoss(preclip=(math.log(0.5), math.log(2.0)))
    ours = ours_fn(new, old, adv, mask)
    theirs = openrlhf_loss.PolicyLoss()(new, old, adv, mask)
    (g,) = torch.autograd.grad(ours[0], new)
    assert ours_fn.last_stats["preclip_frac"] > 0 and g[0, 0] == 0
    assert not torch.allclose(ours[0], theirs[0])


@pytest.mark.parametrize("kw, match", [
    (dict(policy_loss_type="gspo"), "only 'ppo'"),
    (dict(is_correction_level="seq"), "is_correction_level"),
    (dict(is_correction_level="token", is_correction_gating="tv"), "is_correction_gating"),
])
def test_settings_without_a_counterpart_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        StableReinforcePolicyLoss(**kw)
