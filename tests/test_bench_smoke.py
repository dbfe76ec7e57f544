"""Smoke test of the loss benchmark: the harness runs and its numbers are sane.

Timings are never asserted (they depend on the machine); memory is, because the point
of the fused loss is not holding ``[N, V]`` logits.
"""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from bench import _measure, _report
from bench._inputs import Problem, make_inputs
from bench._methods import unavailable

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Every method that runs on CPU, except duplicates of another row's work ("reference" is
# the same full-logits graph as "naive"; the filtered torch row only matters on GPUs).
CPU_METHODS = ["3gemm", "naive", "r1reward-torch", "liger", "cce"]


@pytest.fixture(scope="module")
def quick_rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "bench.loss_bench", "--quick", "--no-compile", "--warmup", "0",
           "--cases", "random", "--methods", ",".join(CPU_METHODS), "--device", "cpu",
           "--out-dir", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return rows, out, proc.stdout


def test_quick_run_rows(quick_rows):
    rows, out, stdout = quick_rows
    by = {r["method"]: r for r in rows}
    assert sorted(by) == sorted(CPU_METHODS)
    for m, r in by.items():
        assert r["status"] == "ok", (m, r["status"])
        for k in ("fwd_s", "fwdbwd_s", "fwd_cpu_s", "fwdbwd_cpu_s", "peak_mb", "logit_mb",
                  "ratio_to_3gemm", "cpu_ratio_to_3gemm"):
            assert isinstance(r[k], float) and math.isfinite(r[k]) and r[k] > 0, (m, k, r[k])
        assert (r["N"], r["H"], r["V"], r["dtype"], r["device"]) == (512, 64, 49152, "fp32", "cpu")
        assert r["torch"] == torch.__version__.split("+")[0] or r["torch"] == torch.__version__
        # CPU figures depend on the instruction set the kernels ran: each row names it
        assert r["cpu_isa"] == torch.backends.cpu.get_cpu_capability() and r["device_name"].startswith("CPU ")
    assert by["3gemm"]["ratio_to_3gemm"] == 1.0 == by["3gemm"]["cpu_ratio_to_3gemm"]
    # Gradients ∂h + ∂W in fp32 are what every method must leave behind.
    assert by["naive"]["grad_mb"] == pytest.approx((512 * 64 + 49152 * 64) * 4 / 2**20)
    # Dense gradients are resident in full (the filtered ∂W may not be: lazy zero pages).
    assert by["naive"]["grad_resident_mb"] == pytest.approx(by["naive"]["grad_mb"], rel=0.1)
    # Full logits are 96 MiB here; the fused loss must need less extra memory than naive.
    assert by["naive"]["logit_mb"] > 96
    assert by["r1reward-torch"]["logit_mb"] < by["naive"]["logit_mb"]
    assert "3gemm" in stdout and "x3gemm" in stdout  # the table was printed
    csv_lines = (out / "loss_bench.csv").read_text().splitlines()
    assert csv_lines[0].split(",") == list(_report.FIELDS) and len(csv_lines) == 1 + len(rows)


def test_unavailable_methods_report_status():
    cpu = torch.device("cpu")
    assert unavailable("r1reward-triton", cpu) == "skipped: needs CUDA"
    assert unavailable("cce-filtered", cpu).startswith("skipped")
    assert unavailable("naive", cpu) is None
    with pytest.raises(ValueError, match="unknown method"):
        unavailable("nope", cpu)


def test_ratios_pair_rows_of_the_same_problem():
    base = {"case": "random", "N": 8, "H": 4, "V": 16, "dtype": "fp32", "device": "cpu"}
    rows = [dict(base, method="3gemm", status="ok", fwdbwd_s=2.0),
            dict(base, method="naive", status="ok", fwdbwd_s=5.0),
            dict(base, H=8, method="naive", status="ok", fwdbwd_s=1.0),
            dict(base, method="liger", status="skipped: x")]
    _report.add_ratios(rows)
    assert [r["ratio_to_3gemm"] for r in rows] == [1.0, 2.5, None, None]
    assert all(r["cpu_ratio_to_3gemm"] is None for r in rows)  # no CPU times given
    assert "skipped: x" in _report.table(rows)


def test_peaked_inputs_concentrate_the_softmax():
    random = make_inputs(Problem(case="random", N=64, B=2, H=256, V=4096))
    peaked = make_inputs(Problem(case="peaked", N=64, B=2, H=256, V=4096, target_p=0.9))
    assert random["info"]["target_p_mean"] < 0.01
    assert peaked["info"]["target_p_mean"] > 0.5
    # old_logp stays close to the current log-probs, so ratios are near 1 as in PPO.
    assert peaked["old_logp"].shape == (2, 32)
    with pytest.raises(ValueError, match="split evenly"):
        Problem(N=10, B=3)


def test_cpu_peak_probe_sees_a_large_allocation():
    if not _measure.can_reset_peak():
        pytest.skip("/proc/self/clear_refs not writable here")
    n = 16 << 20  # 64 MiB of fp32

    def alloc():
        x = torch.ones(n)
        return float(x[-1])

    mb = _measure.peak_extra_bytes(alloc, torch.device("cpu")) / _measure.MB
    assert 56 < mb < 90, mb


def test_methods_compute_the_same_loss_and_gradients(monkeypatch):
    """The benchmark compares equal work: every loss row matches the naive one (Liger is
    set up as close to ours as it goes; Pre-CLIP's band is not reached here)."""
    # CCE's CPU path is torch.compile'd at import; compiling here would take most of the
    # test budget, so call the function it wraps (same math, eager).
    import cut_cross_entropy.torch_compile as cce_tc
    fn = cce_tc.torch_compile_linear_cross_entropy_apply
    monkeypatch.setattr(cce_tc, "torch_compile_linear_cross_entropy_apply",
                        getattr(fn, "_torchdynamo_orig_callable", fn))
    from bench._methods import Options, build
    inp = make_inputs(Problem(N=64, B=4, H=32, V=512))
    results = {}
    for m in ("naive", "reference", "r1reward-torch", "liger", "cce"):
        forward, _ = build(m, inp, Options(compile=False))
        inp["hidden"].grad = inp["weight"].grad = None
        loss = forward()
        loss.backward()
        results[m] = (loss.detach(), inp["hidden"].grad.clone(), inp["weight"].grad.clone())
    ref = results.pop("naive")
    for m, got in results.items():
        for a, b in zip(got, ref):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6, msg=lambda s, m=m: f"{m}: {s}")


def test_cpu_sweep_runs_and_writes_rows(tmp_path, monkeypatch):
    # The sweep command at a toy shape: one JSON row per shape with both modes measured.
    import json as _json

    from bench import cpu_sweep
    monkeypatch.setenv("R1REWARD_CACHE", str(tmp_path / "cache"))
    cpu_sweep.main(["--hidden", "16", "--vocab", "100", "-N", "8", "--repeats", "1", "--warmup", "1",
                    "--out-dir", str(tmp_path)])
    rows = [_json.loads(x) for x in (tmp_path / "cpu_sweep.jsonl").read_text().splitlines()]
    assert len(rows) == 1 and rows[0]["exact_status"] == "ok" and rows[0]["filtered_status"] == "ok"
    assert rows[0]["bound_s"] > 0 and rows[0]["exact_s"] > 0 and "meets_memory" in rows[0]
    assert rows[0]["cpu_isa"] == torch.backends.cpu.get_cpu_capability()


def test_cpu_sweep_rounds_alternate_workers_and_keep_the_median_ratio(tmp_path, monkeypatch):
    # --rounds 3: bound and exact workers three times each, the order flipped every round;
    # the ratio is the median of the per-round ratios (one slow round does not decide).
    from bench import cpu_sweep
    order = []
    times = {"3gemm": iter([1.0, 1.0, 2.0]), "r1reward-torch": iter([1.0, 3.0, 2.1])}

    def fake_worker(spec, timeout, verbose):
        m = spec["method"]
        order.append(m)
        t = next(times[m])
        return {"status": "ok", "fwdbwd_s": t, "fwdbwd_cpu_s": 2 * t, "logit_mb": len(order)}

    monkeypatch.setattr(cpu_sweep, "run_worker", fake_worker)
    args = cpu_sweep.parse_args(["--hidden", "16", "--vocab", "100", "-N", "8", "--rounds", "3",
                                 "--no-filtered", "--out-dir", str(tmp_path)])
    row = cpu_sweep.measure_shape(args, 8, 16, 100, {})
    assert order == ["3gemm", "r1reward-torch", "r1reward-torch", "3gemm", "3gemm", "r1reward-torch"]
    assert row["rounds"] == 3 and row["exact_round_ratios"] == [1.0, 3.0, 1.05]
    assert row["exact_ratio"] == 1.05 and row["exact_ratio_cpu"] == 1.05  # medians of rounds
    assert row["meets_time"] is True  # the slow round alone (3.0) would have missed
    assert row["bound_s"] == 1.0 and row["exact_s"] == 2.1 and row["exact_extra_mb"] == 6


def test_train_step_bench_times_both_layouts_and_restores_the_trainer(capsys):
    from bench import train_step
    from r1reward import logprobs

    real = logprobs.causal_layout
    train_step.main(["--batches", "1", "--batch-size", "2", "--rounds", "1"])
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines() if line.startswith("{")]
    assert [r["layout"] for r in rows] == ["padding mask", "causal layout"]
    assert all(r["ms_per_step_min"] > 0 and r["rounds"] == 1 for r in rows)
    assert logprobs.causal_layout is real
