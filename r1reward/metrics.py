"""Run-directory logging: ``metrics.jsonl`` (one object per step), TensorBoard events, a
progress bar, and GPU memory/utilisation through nvidia-ml-py when CUDA is present."""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch


def _clean(v):
    if torch.is_tensor(v):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)  # JSON has no NaN/inf; keep the fact visible
    return v


class MetricsLogger:
    def __init__(self, run_dir: str | Path, *, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self._tb = None
        if enabled and tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(Path(run_dir) / "tb"))
        self._nvml = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop rows a killed run wrote after its last checkpoint."""
        if not (self.enabled and self.path.exists()):
            return
        rows = []
        for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by the kill: dropped, it is redone
                continue
            if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
                rows.append(line)
        self.path.write_text("".join(r + "\n" for r in rows))

    def log(self, step: int, row: dict) -> dict:
        row = {"step": step, **{k: _clean(v) for k, v in row.items()}}
        row.update(self.gpu_stats())
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(row) + "\n")
            if self._tb is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step":
                        self._tb.add_scalar(k, v, step)
        return row

    def gpu_stats(self) -> dict:
        if not torch.cuda.is_available():
            return {}
        out = {"gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / 2**30}
        try:
            if self._nvml is None:
                import pynvml  # nvidia-ml-py, imported only where CUDA exists
                pynvml.nvmlInit()
                idx = torch.cuda.current_device()
                self._nvml = (pynvml, pynvml.nvmlDeviceGetHandleByIndex(idx))
            nv, handle = self._nvml
            out["gpu_util"] = nv.nvmlDeviceGetUtilizationRates(handle).gpu
            out["gpu_mem_used_gb"] = nv.nvmlDeviceGetMemoryInfo(handle).used / 2**30
        except Exception:  # nvml missing or unsupported: memory peak is still reported
            pass
        return out

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def heldout_points(rows: list[dict], key: str, first, last, last_step: int) -> list[tuple[int, float]]:
    """(RL step, held-out accuracy): ``first`` at step 0, the rows' ``key`` (every
    ``--eval.every`` steps), ``last`` at ``last_step``; missing values are left out."""
    held = [(0, first)] + [(r["step"], r.get(key)) for r in rows]
    held.append((last_step, last))
    return [(s, a) for s, a in held if isinstance(a, (int, float))]


def plot_training_curves(run_dir: str | Path, before: float | None = None,
                         after: float | None = None, before_by_kind: dict | None = None,
                         after_by_kind: dict | None = None) -> Path | None:
    """``<run_dir>/curves.png``: reward, rollout accuracy and answer-"1" rate per RL step
    (with a running mean), and held-out accuracy before RL, every ``--eval.every`` steps
    and after RL, in all and per question kind (``heldout_accuracy/<kind>`` in the rows;
    the ``*_by_kind`` dicts, kind -> accuracy, hold the first and last points). Returns the path, or None
    when there is nothing to draw."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] \
        if path.exists() else []
    if not rows:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]

    def running_mean(key, w=10):
        vals = [r.get(key) for r in rows]
        out = []
        for i in range(len(vals)):
            win = [v for v in vals[max(0, i - w + 1):i + 1] if isinstance(v, (int, float))]
            out.append(sum(win) / len(win) if win else float("nan"))
        return out

    fig, (ax_r, ax_a) = plt.subplots(1, 2, figsize=(10, 3.6))
    ax_r.plot(steps, [r.get("reward") for r in rows], color="C0", alpha=0.3, lw=0.8)
    ax_r.plot(steps, running_mean("reward"), color="C0", label="reward (mean of 10)")
    ax_r.set_xlabel("RL step")
    ax_r.set_ylabel("reward")
    ax_r.legend(fontsize=8)
    ax_a.plot(steps, running_mean("accuracy"), color="C1", label="rollout accuracy (mean of 10)")
    ax_a.plot(steps, running_mean("answer1_rate"), color="C2", ls=":", label='answer-"1" rate')
    def held_curve(key, first, last):
        return heldout_points(rows, key, first, last, steps[-1])

    held = held_curve("heldout_accuracy", before, after)
    if held:
        ax_a.plot(*zip(*held), "ko-", ms=4, label="held-out accuracy (greedy)")
    kinds = sorted({k.split("/", 1)[1] for r in rows for k in r if k.startswith("heldout_accuracy/")}
                   | set(before_by_kind or {}) | set(after_by_kind or {}))
    for i, kind in enumerate(kinds):
        curve = held_curve(f"heldout_accuracy/{kind}", (before_by_kind or {}).get(kind),
                           (after_by_kind or {}).get(kind))
        if curve:
            ax_a.plot(*zip(*curve), "o--", color=f"C{3 + i}", ms=3, lw=1, label=f"held-out: {kind}")
    ax_a.set_xlabel("RL step")
    ax_a.set_ylim(-0.02, 1.02)
    ax_a.legend(fontsize=8)
    fig.tight_layout()
    out = run_dir / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
