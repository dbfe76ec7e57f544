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
        rows = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] <= step]
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
