"""``python -m bench.gpu_check --smoke``: every stage on CPU at tiny sizes, so the GPU
validation script cannot rot between the rare runs on a GPU machine."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bench import gpu_check

ROOT = Path(__file__).resolve().parents[1]
STAGES = [s[0] for s in gpu_check.STAGES]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory, tiny_dir):
    # tiny_dir: the session's embedded model cache, reused by the trainer stage's subprocess.
    out = tmp_path_factory.mktemp("gpu_check")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-m", "bench.gpu_check", "--out", str(out), "--smoke"],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    return res, records, out


def _items(records, stage):
    return [r for r in records if r["stage"] == stage and r.get("kind") == "item"]


def test_smoke_runs_every_stage(smoke_run):
    res, records, out = smoke_run
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    status = {r["stage"]: r["status"] for r in records if r.get("kind") == "stage"}
    assert list(status) == STAGES
    # The trainer stage depends on code outside kernels/: recorded either way, never fatal.
    assert all(status[s] == "ok" for s in STAGES if s != "trainer"), status
    assert _items(records, "trainer"), "the trainer stage recorded nothing"
    summary = (out / "summary.md").read_text()
    for head in ("## Correctness", "## Compiled resources", "## Timings", "## Trainer smoke"):
        assert head in summary


def test_smoke_correctness_covers_both_backends_and_passes(smoke_run):
    _, records, _ = smoke_run
    rows = _items(records, "correctness")
    assert {r["backend"] for r in rows} == {"torch", "triton", "triton-rows"}
    assert {r["dtype"] for r in rows} >= {"fp32", "bf16", "fp16"}
    for r in rows:
        assert r["status"] == "ok", r
        assert set(r["errors"]) == {"loss", "logp", "entropy", "dh", "dW"}
        assert max(r["errors"].values()) <= r["tol"]


def test_smoke_resources_and_timings_have_numbers(smoke_run):
    _, records, _ = smoke_run
    res = _items(records, "resources")
    assert res and all(r["regs"] > 0 and not r["problems"] for r in res)
    timed = {r["item"]: r for r in _items(records, "timings")}
    for label in ("3gemm", "ours exact"):
        assert timed[label]["status"] == "ok" and timed[label]["fwdbwd_s"] > 0
        assert timed[label]["peak_mb"] is not None


def test_failing_or_slow_stage_is_recorded_and_the_run_goes_on(tmp_path, monkeypatch):
    def boom(ctx, emit):
        raise RuntimeError("no GPU here")

    def slow(ctx, emit):
        time.sleep(5)

    def fine(ctx, emit):
        emit(item="x", value=1)

    monkeypatch.setattr(gpu_check, "STAGES", (("a", boom, 5, 5), ("b", slow, 0.2, 0.2),
                                              ("c", fine, 5, 5)))
    rc = gpu_check.main(["--out", str(tmp_path)])
    recs = [json.loads(x) for x in (tmp_path / "results.jsonl").read_text().splitlines()]
    status = {r["stage"]: r["status"] for r in recs if r.get("kind") == "stage"}
    assert status == {"a": "error", "b": "timeout", "c": "ok"} and rc == 1
    assert any(r.get("item") == "x" for r in recs)
    assert (tmp_path / "summary.md").exists()
