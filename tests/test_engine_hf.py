"""The HF rollout engine: the same judgments as HF generate, and under FSDP2 (2 CPU ranks,
gloo) the gather-once path gives the sharded path's tokens and leaves the blocks sharded.

The 2-rank half runs this file under torchrun (``_worker``)."""
import os
import subprocess
import sys
from pathlib import Path

import torch

from r1reward import rollout
from r1reward.engine import HFEngine
from r1reward.generation import generate

HERE = Path(__file__).resolve().parent


def _pairs(n, seed=0, n_train=8):
    from r1reward.data import generated_split, load_pairs
    _, held = generated_split(n_train, n, seed, ("color", "shape"))
    return load_pairs(held).pairs[:n]


def test_hf_engine_is_hf_generate_and_keeps_the_model_mode(tiny_dir):
    from r1reward.model import load_model_and_processor
    model, proc = load_model_and_processor(tiny_dir)
    model.train()
    pairs = _pairs(3)
    engine = HFEngine(model, proc)
    got = engine.generate(pairs, do_sample=False, max_new_tokens=12)
    assert model.training  # generation ran in eval mode and gave training mode back
    model.eval()
    want = generate(model, proc, pairs, max_new_tokens=12)
    assert torch.equal(got.sequences, want.sequences) and got.texts == want.texts
    assert got.sampler_logp is None
    torch.manual_seed(1)
    ro = rollout.collect(engine, pairs, temperature=0.7, top_p=1.0, max_new_tokens=8, n_samples=2,
                         forbidden_ids=rollout.vision_placeholder_ids(model))
    assert len(ro.batch) == 6 and ro.sampler_logp is None
    # the static KV cache changes where the cache lives, not what is sampled
    static = HFEngine(model, proc, static_cache=True)
    for eng in (static, engine):
        torch.manual_seed(2)
        got = eng.generate(pairs, do_sample=True, temperature=1.0, max_new_tokens=16, num_samples=2)
        if eng is static:
            first = got
    assert torch.equal(first.sequences, got.sequences) and first.texts == got.texts


def _worker(out_file: str, cache: str) -> None:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from r1reward.model import load_model_and_processor
    from r1reward.parallelize import init_distributed, parallelize, sharded_blocks
    from r1reward.tiny import default_model_dir

    os.environ["R1REWARD_CACHE"] = cache
    d = init_distributed(fsdp=True)
    model_dir = default_model_dir()  # built by the test before launching
    model, proc = load_model_and_processor(model_dir)
    parallelize(model, fsdp=True, compile=False, ac=False, device=d.device)
    pairs = _pairs(4, seed=3)[d.rank * 2:(d.rank + 1) * 2]  # the ranks judge different pairs
    errors = []
    # The two ranks generate different lengths (16 vs 24 new tokens): the gathered path
    # must not need its peer to keep stepping, the sharded one must keep both in step.
    # Count FSDP2's all-gathers (its module-level function; test-only instrumentation).
    from torch.distributed.fsdp._fully_shard import _fsdp_param_group as pg
    real, calls = pg.foreach_all_gather, []
    pg.foreach_all_gather = lambda *a, **k: calls.append(1) or real(*a, **k)
    runs, gathers = {}, {}
    for once in (False, True):
        torch.manual_seed(10 + d.rank)
        n0 = len(calls)
        runs[once] = HFEngine(model, proc, unshard_once=once).generate(
            pairs, do_sample=True, temperature=1.0, max_new_tokens=16 + 8 * d.rank, num_samples=2)
        gathers[once] = len(calls) - n0
    pg.foreach_all_gather = real
    if not torch.equal(runs[True].sequences, runs[False].sequences):
        errors.append(f"rank {d.rank}: gather-once tokens differ from the sharded path")
    n_blocks = len(sharded_blocks(model))
    if gathers[True] > n_blocks + 2 or gathers[False] < 10 * n_blocks:
        errors.append(f"rank {d.rank}: all-gathers {gathers} for {n_blocks} blocks")
    for b in sharded_blocks(model):
        for name, p in b.named_parameters():
            if not isinstance(p, DTensor) or p.to_local().numel() * 2 > p.numel() + 64:
                errors.append(f"rank {d.rank}: {name} not resharded after generation")
                break
    lengths = torch.tensor([float(runs[True].response_ids.shape[1])])
    gathered = [torch.zeros(1) for _ in range(2)]
    dist.all_gather(gathered, lengths)
    (Path(out_file).parent / f"rank{d.rank}.txt").write_text("\n".join(errors) + "\n")
    if d.rank == 0:
        Path(out_file).write_text(f"{gathered[0].item()} {gathered[1].item()}\n")
    dist.barrier()  # neither rank tears the group down while the other still uses it
    dist.destroy_process_group()


def test_fsdp_gather_once_generates_what_the_sharded_path_does(tmp_path):
    cache = tmp_path / "cache"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "R1REWARD_CACHE": str(cache)}
    subprocess.run([sys.executable, "-c", "from r1reward.tiny import default_model_dir as d; d()"],
                   check=True, env=env, timeout=300)
    out = tmp_path / "result.txt"
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node=2", str(Path(__file__)), str(out), str(cache)],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    for rank in (0, 1):
        assert (tmp_path / f"rank{rank}.txt").read_text().strip() == ""
    n0, n1 = map(float, out.read_text().split())
    assert 0 < n0 < n1  # rank 0 stopped first


def test_heldout_evaluation_counts_each_kind_and_shape_apart():
    """rollout.evaluate's by_group: an engine right on every colour pair and wrong on every
    shape pair scores 1 and 0 on them, and the total averages the two."""
    from types import SimpleNamespace

    from r1reward.data import PreferencePair

    def pair(i, kind, shape, preferred):
        meta = {"kind": kind, "shape": shape, "color": "red", "truth": "x", "wrong": "y"}
        return PreferencePair(f"p{i}", None, "q", "a", "b", preferred, meta)

    class KindEngine:
        def generate(self, chunk, **_):
            picks = [p.preferred if p.meta.get("kind") == "color" else 3 - p.preferred for p in chunk]
            return SimpleNamespace(texts=[f"<think>t</think><answer>{k}</answer>" for k in picks])

    pairs = [pair(0, "color", "circle", 1), pair(1, "color", "square", 2), pair(2, "shape", "circle", 2),
             pair(3, "shape", "triangle", 1), PreferencePair("release", None, "q", "a", "b", 1)]
    r = rollout.evaluate(KindEngine(), pairs, batch_size=3, max_new_tokens=8)
    assert r["n"] == 10  # both orders
    assert r["by_group"] == {"color": 1.0, "color/circle": 1.0, "color/square": 1.0,
                             "shape": 0.0, "shape/circle": 0.0, "shape/triangle": 0.0}
    assert r["accuracy"] == 0.4  # the release pair (no kind) is judged wrong in both orders
    assert rollout.at_chance(r) == []  # 1.0 and 0.0 are both far from chance
    near = {"by_group": {"color": 0.95, "shape": 0.555, "shape/circle": 0.5}}
    assert rollout.at_chance(near) == ["shape"]  # kinds only, not kind/shape
    assert rollout.at_chance({"accuracy": None, "n": 0}) == []  # evaluation off


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
