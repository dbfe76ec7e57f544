"""Stages of ``bench.gpu_check`` other than correctness: wheels, env, resources, timings,
trainer. Each takes ``(ctx, emit)``, emits one record per item and returns its status."""
from __future__ import annotations

import dataclasses
import glob
import importlib
import importlib.metadata as md
import importlib.util
import os
import subprocess
import sys
import time
from dataclasses import dataclass

import torch


@dataclass
class Context:
    out: str
    smoke: bool
    wheels: str
    root: str
    deadline: float = 0.0

    @property
    def device(self) -> str:
        return "cpu" if self.smoke else "cuda"

    def left(self) -> float:
        return max(0.0, self.deadline - time.time())


def _run(cmd, timeout, **kw) -> subprocess.CompletedProcess | str:
    try:
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, **kw)
    except (OSError, subprocess.SubprocessError) as e:
        return f"{type(e).__name__}: {e}"


# ------------------------------------------------------------------------- 1. wheels
PEERS = {"liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy"}


def wheels(ctx: Context, emit) -> str:
    """Install the peers' wheels offline when they are not importable yet."""
    missing = [m for m in PEERS if importlib.util.find_spec(m) is None]
    files = sorted(glob.glob(os.path.join(ctx.root, ctx.wheels, "*.whl")))
    if not missing:
        emit(item="peers", status="present", versions=_versions(PEERS.values()))
        return "ok"
    if not files:
        emit(item="peers", status=f"missing {missing}, no wheels in {ctx.wheels}/")
        return "ok"  # the timings stage reports those methods as unavailable
    res = _run([sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", *files],
               timeout=max(5.0, ctx.left() - 2))
    ok = not isinstance(res, str) and res.returncode == 0
    importlib.invalidate_caches()
    emit(item="pip install", status="ok" if ok else "failed", wheels=[os.path.basename(f) for f in files],
         output=(res if isinstance(res, str) else (res.stdout + res.stderr))[-1500:],
         versions=_versions(PEERS.values()))
    return "ok" if ok else "error"


def _versions(dists) -> dict:
    out = {}
    for d in dists:
        try:
            out[d] = md.version(d)
        except md.PackageNotFoundError:
            out[d] = None
    return out


# ---------------------------------------------------------------------------- 2. env
def env(ctx: Context, emit) -> str:
    v = _versions(["torch", "triton", "transformers", "numpy", "pytest", *PEERS.values()])
    emit(item="versions", python=sys.version.split()[0], cuda=torch.version.cuda, **v)
    emit(item="tf32", **tf32_state())
    if not torch.cuda.is_available():
        emit(item="gpu", status="no CUDA device" + (" (--smoke)" if ctx.smoke else ""))
        return "ok" if ctx.smoke else "error"
    p = torch.cuda.get_device_properties(0)
    emit(item="gpu", name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
         memory_gib=round(p.total_memory / 2**30, 1), count=torch.cuda.device_count())
    emit(item="clocks", **nvidia_smi())
    return "ok"


def tf32_state() -> dict:
    from r1reward.kernels import triton_fwd
    m = torch.backends.cuda.matmul
    return {"matmul_fp32_precision": getattr(m, "fp32_precision", None),
            "triton_fp32_dots": triton_fwd.dot_precision(torch.float32),
            "cudnn_allow_tf32": torch.backends.cudnn.allow_tf32}


_SMI_FIELDS = ("name", "driver_version", "clocks.sm", "clocks.max.sm", "clocks.mem",
               "clocks.max.mem", "power.draw", "power.limit", "temperature.gpu",
               "persistence_mode")


def nvidia_smi() -> dict:
    res = _run(["nvidia-smi", f"--query-gpu={','.join(_SMI_FIELDS)}", "--format=csv,noheader"],
               timeout=15)
    if isinstance(res, str) or res.returncode:
        return {"nvidia_smi": res if isinstance(res, str) else res.stderr.strip()[-300:]}
    vals = [x.strip() for x in res.stdout.splitlines()[0].split(",")]
    return dict(zip(_SMI_FIELDS, vals))


# ---------------------------------------------------------------------- 4. resources
def resources(ctx: Context, emit) -> str:
    """The compile gate's table (sm_80 and sm_90 with the launchers' configs) and this
    GPU's own architecture if it is another one."""
    from r1reward.kernels import compile_gate as cg
    targets = list(cg.TARGETS)
    if torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(0)
        cc = 10 * major + minor
        if cc not in targets and cc in cg.SMEM_LIMIT:
            targets.append(cc)
    # --smoke: one target and a few kernels keep it quick (the test suite gates them all).
    only = (lambda name: name in ("forward[bf16]", "backward[fp16]")) if ctx.smoke else None
    rows = cg.run_gate(tuple(targets[-1:] if ctx.smoke else targets),
                       ("bf16", "fp16") if ctx.smoke else ("bf16", "fp16", "fp32"), only=only)
    for r in rows:
        emit(item=f"{r.kernel} sm_{r.cc}", **dataclasses.asdict(r), problems=r.problems)
    return "fail" if any(r.problems for r in rows) else "ok"


# ------------------------------------------------------------------------ 5. timings
# (label, method, case, tf32): the list; the filtered ones also on an LM-like case.
TIMED = (("3gemm", "3gemm", "random", False), ("ours exact", "r1reward-triton", "random", False),
         ("ours filtered", "r1reward-triton-filtered", "random", False),
         ("ours row-chunked exact", "r1reward-rows", "random", False),
         ("cce exact", "cce", "random", False), ("cce filtered", "cce-filtered", "random", False),
         ("liger tf32 off", "liger", "random", False), ("liger tf32 on", "liger", "random", True),
         ("ours filtered (peaked)", "r1reward-triton-filtered", "peaked", False),
         ("cce filtered (peaked)", "cce-filtered", "peaked", False))
SMOKE_TIMED = (("3gemm", "3gemm", "random", False), ("ours exact", "r1reward-torch", "random", False),
               ("ours filtered (peaked)", "r1reward-torch-filtered", "peaked", False),
               ("liger tf32 off", "liger", "random", False))
GPU_PROBLEM = dict(N=16384, B=16, H=3584, V=151936, dtype="bf16", device="cuda")
SMOKE_PROBLEM = dict(N=64, B=4, H=256, V=512, dtype="fp32", device="cpu")


def timings(ctx: Context, emit) -> str:
    prob = SMOKE_PROBLEM if ctx.smoke else GPU_PROBLEM
    worst = "ok"
    bound = {}
    for label, method, case, tf32 in (SMOKE_TIMED if ctx.smoke else TIMED):
        if ctx.left() < 10:
            emit(item=label, status="skipped: stage time box spent")
            worst = "partial"
            continue
        spec = {"problem": dict(prob, case=case), "method": method, "tf32": tf32,
                "repeats": 2 if ctx.smoke else 5, "warmup": 1 if ctx.smoke else 2,
                "compile": not ctx.smoke, "cache_dir": os.path.join(ctx.out, "inputs")}
        row = _measure(spec, ctx)
        if method == "3gemm" and row.get("status") == "ok":
            bound[case] = row["fwdbwd_s"]
        b = bound.get("random")
        emit(item=label, method=method, case=case, tf32=tf32, status=row.get("status"),
             fwdbwd_s=row.get("fwdbwd_s"), fwd_s=row.get("fwd_s"),
             x_3gemm=row["fwdbwd_s"] / b if b and row.get("fwdbwd_s") else None,
             peak_mb=row.get("peak_mb"), extra_mb=row.get("logit_mb"),
             target_p_mean=row.get("target_p_mean"), problem=prob)
        if row.get("status") != "ok" and not str(row.get("status", "")).startswith(
                ("skipped", "unavailable")):
            worst = "partial"
    return worst


def _measure(spec: dict, ctx: Context) -> dict:
    """One method's row: in its own process on GPU (peak memory is that method's alone);
    in this process with --smoke (process start-up would dominate the tiny runs)."""
    if not ctx.smoke:
        from .loss_bench import run_worker
        return run_worker(spec, timeout=max(5.0, ctx.left() - 3), verbose=False)
    from ._worker import measure
    try:
        return measure(spec)
    except Exception as e:  # noqa: BLE001 - as the worker process reports it
        return {"method": spec["method"], "status": f"error: {type(e).__name__}: {e}"[:400]}


# ------------------------------------------------------------------------ 6. trainer
def trainer(ctx: Context, emit) -> str:
    """A few RL steps of the embedded tiny Qwen2.5-VL through the real CLI (no SFT, no eval).
    Depends on trainer code outside kernels/: a failure is recorded, not raised."""
    out = os.path.join(ctx.out, "trainer_run")
    cmd = [sys.executable, "-m", "r1reward.train", "--steps", "1" if ctx.smoke else "3",
           "--no-sft.enabled", "--no-eval.enabled", "--checkpoint.interval", "0",
           "--no-checkpoint.export", "--no-progress", "--rollout.batch_size", "4",
           "--rollout.n_samples", "2", "--algo.train_batch_size", "4",
           "--algo.micro_batch_size", "2", "--rollout.max_new_tokens", "16",
           "--output", out, "--overwrite"]
    t0 = time.time()
    res = _run(cmd, timeout=max(5.0, ctx.left() - 2), cwd=ctx.root)
    if isinstance(res, str):
        emit(item="python -m r1reward.train", status=f"error: {res}"[:300], cmd=cmd)
        return "error"
    emit(item="python -m r1reward.train", status="ok" if res.returncode == 0 else "failed",
         rc=res.returncode, seconds=round(time.time() - t0, 1), cmd=cmd,
         tail=(res.stdout + res.stderr)[-2000:])
    return "ok" if res.returncode == 0 else "error"
