"""One side of ``bench.trainer_vs_trl`` in its own process: train, time, evaluate.

    python -m bench._trainer_side r1reward|trl|eval --init DIR --train F --heldout F --out DIR --result F ...
"""
from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch


def heldout_accuracy(model_dir, processor_dir, heldout, max_new_tokens) -> float:
    from transformers import AutoModelForImageTextToText

    from r1reward.data import load_pairs
    from r1reward.engine import HFEngine
    from r1reward.processor import load_processor
    from r1reward.rollout import evaluate

    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=torch.float32)
    processor = load_processor(processor_dir)
    pairs = load_pairs(heldout).pairs
    return evaluate(HFEngine(model, processor), pairs, batch_size=32,
                    max_new_tokens=max_new_tokens)["accuracy"]


def run_r1reward(a) -> dict:
    from r1reward.train import main as train_main

    argv = ["--preset", "tiny", "--output", a.out, "--overwrite", "--model", a.init, "--no-sft.enabled",
            "--algo.train_batch_size", "0", "--algo.ppo_epochs", "1", "--model.dtype", "float32",
            "--data.train", a.train, "--data.heldout", a.heldout, "--steps", str(a.steps),
            "--seed", str(a.seed), "--rollout.batch_size", str(a.prompts),
            "--rollout.n_samples", str(a.samples), "--rollout.max_new_tokens", str(a.max_new_tokens),
            "--rollout.temperature", "1.0", "--algo.estimator", "grpo", "--algo.kl_coef", "0",
            "--algo.adv_filter", "off", "--no-algo.preclip", "--reward.judge", "none",
            "--reward.w_consistency", "0", "--optim.lr", str(a.lr), "--optim.warmup_steps", "0",
            "--optim.min_lr_ratio", "1", "--no-eval.enabled", "--no-health.enabled",
            "--checkpoint.interval", "0", "--no-progress"]
    train_main(argv)
    rows = [json.loads(line) for line in (Path(a.out) / "metrics.jsonl").read_text().splitlines() if line]
    rows = [r for r in rows if r.get("step", 0) > 1]  # step 1 is warm-up
    return {"s_per_step": statistics.mean(r["time_step"] for r in rows),
            "rollout_s": statistics.mean(r["time_rollout"] for r in rows),
            "logprobs_s": statistics.mean(r["time_logprobs"] for r in rows),
            "update_s": statistics.mean(r["time_update"] for r in rows),
            "mean_response_len": statistics.mean(r["response_length"] for r in rows),
            "train_reward": statistics.mean(r["reward"] for r in rows),
            "final_dir": str(Path(a.out) / "export")}


def run_trl(a) -> dict:
    from datasets import Dataset, Image
    from trl import GRPOConfig, GRPOTrainer

    from r1reward.data import load_pairs
    from r1reward.processor import load_processor
    from r1reward.prompt import format_judge_prompt
    from r1reward.rewards import compute_rewards
    from r1reward.rollout import present

    pairs = present(load_pairs(a.train).pairs, balance=True)
    rows = [{"prompt": [{"role": "user", "content": [
                {"type": "image", "text": None},
                {"type": "text", "text": format_judge_prompt(p.question, p.response_1, p.response_2)}]}],
             "image": p.image, "preferred": p.preferred} for p in pairs]
    ds = Dataset.from_list(rows).cast_column("image", Image())

    def rule_reward(completions, preferred, **kw):
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return compute_rewards(texts, preferred, judge=None, w_format=0.5, w_consistency=0.0).total.tolist()

    from transformers import TrainerCallback

    timing = {"rollout": [], "step": []}

    class StepClock(TrainerCallback):
        """Wall time of a whole step, optimizer step included (TRL's step_time is not)."""

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            timing["step"].append(time.perf_counter() - self.t0)

    class TimedGRPOTrainer(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            timing["rollout"].append(time.perf_counter() - t0)
            return out

    n = a.prompts * a.samples
    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=n, num_generations=a.samples,
                      max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0,
                      learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, adam_beta1=0.9,
                      adam_beta2=0.95, weight_decay=0.0, max_grad_norm=1.0, beta=0.0, loss_type="grpo",
                      epsilon=0.2, max_steps=a.steps, seed=a.seed, use_cpu=True, bf16=False,
                      report_to="none", logging_steps=1, save_strategy="no", shuffle_dataset=True)
    trainer = TimedGRPOTrainer(model=a.init, reward_funcs=rule_reward, args=args, train_dataset=ds,
                               processing_class=load_processor(a.init), callbacks=[StepClock()])
    trainer.train()
    logs = [h for h in trainer.state.log_history if "step_time" in h][1:]  # drop warm-up
    rollout, step = timing["rollout"][1:], statistics.mean(timing["step"][1:])
    final = Path(a.out) / "final"
    trainer.model.save_pretrained(final)
    return {"s_per_step": step, "rollout_s": statistics.mean(rollout),
            "update_s": step - statistics.mean(rollout),
            "mean_response_len": statistics.mean(h["completions/mean_length"] for h in logs),
            "train_reward": statistics.mean(h["reward"] for h in logs), "final_dir": str(final)}


def main(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("side", choices=["r1reward", "trl"])
    for name in ("--init", "--train", "--heldout", "--out", "--result"):
        p.add_argument(name, required=True)
    for name in ("--steps", "--prompts", "--samples", "--max-new-tokens", "--threads", "--seed"):
        p.add_argument(name, type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    row = {"side": a.side, "steps": a.steps, "prompts": a.prompts, "samples": a.samples,
           "max_new_tokens": a.max_new_tokens, "threads": a.threads}
    row.update(run_r1reward(a) if a.side == "r1reward" else run_trl(a))
    row["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row["response_tokens_per_s"] = a.prompts * a.samples * row["mean_response_len"] / row["s_per_step"]
    row["heldout_acc_after"] = heldout_accuracy(row["final_dir"], a.init, a.heldout, a.max_new_tokens)
    Path(a.result).write_text(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
