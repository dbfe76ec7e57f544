"""``--compile``: per-block torch.compile gives the eager loss, log-probs and gradients.

CPU inductor needs a C++ compiler, which the CI image has; the blocks are compiled with
``dynamic=True`` so a second batch shape reuses the graph instead of recompiling.
"""
import copy
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_train_utils import seq_batch, tiny_vlm  # noqa: E402

from r1reward.logprobs import FusedLMHead, policy_loss, sequence_logprobs  # noqa: E402
from r1reward.parallelize import decoder_blocks, parallelize, vision_blocks  # noqa: E402


def test_compiled_blocks_match_eager_loss_and_grads():
    torch._dynamo.reset()
    from torch._dynamo.utils import counters
    counters.clear()
    torch.manual_seed(0)
    eager = tiny_vlm(seed=0, layers=6)  # 6 + 2 blocks: past dynamo's default 8 entries
    FusedLMHead.install(eager, backend="torch", preclip=(math.log(1e-3), math.log(1e3)),
                        aggregation="seq-mean-token-mean")
    compiled = copy.deepcopy(eager)
    parallelize(compiled, fsdp=False, compile=True, ac=False, device=torch.device("cpu"))
    blocks = vision_blocks(compiled) + decoder_blocks(compiled)
    assert all(hasattr(b, "_compiled_call_impl") and b._compiled_call_impl is not None
               for b in blocks), "parallelize(compile=True) left a block uncompiled"

    for B, seed in ((3, 1), (4, 2)):  # two batch shapes: dynamic shapes, no crash
        batch = seq_batch(B=B, seed=seed)
        old = sequence_logprobs(eager, batch, B) - 0.1
        adv = torch.linspace(-1, 1, B)[:, None].expand_as(old) * batch.response_mask
        torch.testing.assert_close(sequence_logprobs(compiled, batch, B), old + 0.1,
                                   rtol=1e-4, atol=1e-5)
        for m in (eager, compiled):
            m.zero_grad(set_to_none=True)
            m.train()
        want, _ = policy_loss(eager, batch, old, adv)
        want.backward()
        got, _ = policy_loss(compiled, batch, old, adv)
        got.backward()
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
        ref = dict(eager.named_parameters())
        n = 0
        for name, p in compiled.named_parameters():
            if ref[name].grad is None:
                assert p.grad is None, name
                continue
            torch.testing.assert_close(p.grad, ref[name].grad, rtol=1e-3, atol=1e-5,
                                       msg=lambda m, name=name: f"grad {name}: {m}")
            n += 1
        assert n > 20, "too few gradients compared: the test is blind"
    from torch._dynamo.utils import counters
    limits = [k for k in counters["unimplemented"] if "recompile limit" in k.lower()]
    assert not limits, "dynamo hit its recompile limit: some blocks ran eagerly"
