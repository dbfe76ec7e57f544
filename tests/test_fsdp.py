"""FSDP2 on CPU with gloo, 2 ranks: the [norm, lm_head] unit hands the fused loss a plain
weight, and sharded loss/gradients equal the single-process ones.

The test launches this file under torchrun; the worker half is ``_worker`` below.
"""
import copy
import math
import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _worker(out_file: str) -> None:
    import torch.distributed as dist

    sys.path.insert(0, str(HERE))
    from test_train_utils import seq_batch, tiny_vlm

    from r1reward.logprobs import FusedLMHead, policy_loss, sequence_logprobs
    from r1reward.parallelize import init_distributed, parallelize

    d = init_distributed(fsdp=True)
    torch.manual_seed(0)
    base = tiny_vlm(seed=0)
    kw = dict(backend="auto", preclip=(math.log(1e-3), math.log(1e3)),
              aggregation="seq-mean-token-mean")
    FusedLMHead.install(base, **kw)
    plain = copy.deepcopy(base)
    batch = seq_batch(B=4, seed=3)
    halves = [batch.select([0, 1]), batch.select([2, 3])]
    old = sequence_logprobs(plain, batch, 4) - 0.1
    adv = torch.linspace(-1, 1, 4)[:, None].expand_as(old) * batch.response_mask

    # Single process: mean of the two halves' losses.
    plain.train()
    want = sum(policy_loss(plain, h, old[i * 2:i * 2 + 2], adv[i * 2:i * 2 + 2])[0]
               for i, h in enumerate(halves)) / 2
    want.backward()

    sharded = parallelize(base, fsdp=True, compile=False, ac=True, device=d.device)
    sharded.train()
    mine = halves[d.rank]
    sl = slice(d.rank * 2, d.rank * 2 + 2)
    lp = sequence_logprobs(sharded, mine, 2)  # forward-only path under FSDP
    loss, _ = policy_loss(sharded, mine, old[sl], adv[sl])
    loss.backward()  # FSDP averages the gradients over the 2 ranks
    got_loss = loss.detach().clone()
    dist.all_reduce(got_loss)
    errors = []
    if not torch.allclose(lp, old[sl] + 0.1, atol=1e-5):
        errors.append("sharded sequence_logprobs differ")
    if not torch.allclose(got_loss / 2, want.detach(), atol=1e-5):
        errors.append(f"loss {got_loss.item() / 2} != {want.item()}")
    ref_grads = dict(plain.named_parameters())
    n_checked = 0
    for name, p in sharded.named_parameters():
        g = p.grad.full_tensor()
        r = ref_grads[name].grad
        if not torch.allclose(g, r, atol=1e-5, rtol=1e-3):
            errors.append(f"grad {name}: max diff {(g - r).abs().max().item():.3g}")
        n_checked += 1
    from torch.distributed.tensor import DTensor
    if not isinstance(sharded.lm_head.weight, DTensor):
        errors.append("lm_head.weight is not sharded outside forward")
    # HF export from the sharded policy (collective), reloaded on rank 0.
    from r1reward.export import export_hf
    export_dir = Path(out_file).parent / "export"
    export_hf(sharded, None, export_dir)
    if d.rank == 0:
        from transformers import Qwen2_5_VLForConditionalGeneration
        back = Qwen2_5_VLForConditionalGeneration.from_pretrained(export_dir)
        for name, p in back.named_parameters():
            if not torch.equal(p, dict(plain.named_parameters())[name]):
                errors.append(f"exported {name} differs")
    if d.rank == 0:
        Path(out_file).write_text("\n".join(errors) + f"\nchecked {n_checked}\n")
    dist.destroy_process_group()


def torchrun(args, timeout=600, env_extra=None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    # --standalone: the rendezvous picks a free port (a fixed port per test process was
    # shared by this file's two launches and by any other job on the machine).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           "--nproc_per_node=2"] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)


def test_fsdp_two_ranks_match_single_process(tmp_path):
    out = tmp_path / "result.txt"
    r = torchrun([str(Path(__file__)), str(out)])
    assert r.returncode == 0, r.stderr[-4000:]
    lines = out.read_text().strip().splitlines()
    assert lines[-1].startswith("checked ") and int(lines[-1].split()[1]) > 20
    assert lines[:-1] == [], lines[:-1]


if __name__ == "__main__":
    _worker(sys.argv[1])


def test_torchrun_two_rank_fsdp_training_run(tmp_path):
    # The command on this CPU box: torchrun --nproc_per_node=2 -m r1reward.train --fsdp,
    # with a cold start on a fresh cache (rank 0 trains and exports it while rank 1 waits)
    out = tmp_path / "run"
    r = torchrun(["-m", "r1reward.train", "--fsdp", "--output", str(out), "--steps", "2",
                  "--no-progress", "--data.n_train", "8", "--data.n_heldout", "2",
                  "--sft.steps", "2", "--sft.n_examples", "4", "--sft.batch_size", "4",
                  "--rollout.batch_size", "4", "--algo.train_batch_size", "2",
                  "--rollout.max_new_tokens", "8", "--eval.max_new_tokens", "8",
                  "--checkpoint.interval", "1"],
                 env_extra={"R1REWARD_CACHE": str(tmp_path / "cache")})
    assert r.returncode == 0, r.stderr[-4000:]
    import json
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and summary["steps"] == 2
    assert summary["sft"]["steps"] == 2 and summary["sft"]["cached"] is False
    assert 0.0 <= summary["heldout_accuracy_after"] <= 1.0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    ck = out / "checkpoints" / "step_000002"
    assert (ck / "rng_rank0.pt").is_file() and (ck / "rng_rank1.pt").is_file()
    assert (out / "export" / "model.safetensors").is_file()
