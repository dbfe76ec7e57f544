"""Smoke test of bench.trainer_vs_trl at a toy size: both trainers run from the shared cold
start, every column is filled, the JSON file is written. Timings are never asserted."""
import json
import math
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_side_by_side_at_a_toy_size(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "bench.trainer_vs_trl", "--steps", "2", "--prompts", "2", "--samples", "2",
           "--max-new-tokens", "8", "--sft-steps", "10", "--n-train", "16", "--heldout", "2",
           "--repeats", "1", "--out", str(out)]
    env = {**os.environ, "R1REWARD_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["side"]: r for r in json.loads((out / "trainer_vs_trl.json").read_text())["rows"]}
    assert sorted(rows) == ["r1reward", "trl"]
    for r in rows.values():
        for key in ("s_per_step", "rollout_s", "update_s", "response_tokens_per_s", "peak_rss_mb"):
            assert math.isfinite(r[key]) and r[key] > 0, (r["side"], key, r[key])
        assert 0 <= r["heldout_acc_before"] <= 1 and 0 <= r["heldout_acc_after"] <= 1
    assert "throughput r1reward / trl" in proc.stdout and "heldout_acc_after" in proc.stdout
