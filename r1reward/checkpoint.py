"""Checkpoints with torch.distributed.checkpoint (DCP): sharded model + optimizer, plus the
trainer state (step, scheduler, data cursor, health history, …) and per-rank RNG states.

Layout: ``<run>/checkpoints/step_000010/`` holding the DCP files, ``trainer_state.pt``,
``rng_rank<r>.pt``, ``checksums_rank<r>.json`` (SHA-256 of the files rank r wrote) and a
``COMPLETE`` marker written last, so a run killed while saving never resumes from a
half-written checkpoint, and flipped bytes are caught at load (:class:`CorruptCheckpoint`)
instead of resuming silently. Only the last ``keep`` are kept.
"""
from __future__ import annotations

import hashlib
import json
import random
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

MARKER = "COMPLETE"
_NO_PG_WARNING = "torch.distributed is disabled, unavailable or uninitialized"


def _dcp(fn, state, path):
    # DCP works without a process group (one process); its warning about that is noise.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_NO_PG_WARNING)
        fn(state, checkpoint_id=str(path))


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CorruptCheckpoint(RuntimeError):
    """A complete-looking checkpoint whose files do not match their checksums."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return h.hexdigest()


def _own_files(path: Path, rank: int) -> list[Path]:
    """The files rank ``rank`` wrote into a checkpoint directory (DCP names shards
    ``__<rank>_<i>.distcp``; rank 0 also writes the metadata and the trainer state)."""
    mine = sorted(path.glob(f"__{rank}_*.distcp")) + [path / f"rng_rank{rank}.pt"]
    if rank == 0:
        mine += [p for p in (path / ".metadata", path / "trainer_state.pt") if p.exists()]
    return mine


def verify(path: Path) -> None:
    """Check this rank's files against their checksums; every rank agrees on the outcome."""
    rank = _rank()
    problem = ""
    sums_file = path / f"checksums_rank{rank}.json"
    if not sums_file.exists():
        problem = f"{sums_file} missing"
    else:
        try:
            sums = json.loads(sums_file.read_text())
        except ValueError:
            sums, problem = {}, f"{sums_file} is not valid JSON"
        for name, want in sums.items():
            f = path / name
            if not f.exists():
                problem = f"{f} missing"
                break
            if _sha256(f) != want:
                problem = f"{f} does not match its checksum"
                break
    bad = torch.tensor([1.0 if problem else 0.0])
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad)
    if problem:
        raise CorruptCheckpoint(problem)
    if bad.item() > 0:
        raise CorruptCheckpoint(f"{path}: another rank found a corrupt or missing file")


class Checkpointer:
    def __init__(self, run_dir: str | Path, keep: int = 2):
        self.root = Path(run_dir) / "checkpoints"
        self.keep = keep

    def path(self, step: int) -> Path:
        return self.root / f"step_{step:06d}"

    def complete(self) -> list[Path]:
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.glob("step_*") if (p / MARKER).exists())

    def latest(self) -> Path | None:
        done = self.complete()
        return done[-1] if done else None

    def save(self, step: int, model, optimizer, trainer_state: dict) -> Path:
        path = self.path(step)
        rank = _rank()
        if rank == 0 and path.exists():  # a stale partial save of the same step
            shutil.rmtree(path)
        _barrier()
        model_sd, optim_sd = get_state_dict(model, optimizer)
        _dcp(dcp.save, {"model": model_sd, "optim": optim_sd}, path)
        torch.save(rng_state(), path / f"rng_rank{rank}.pt")
        if rank == 0:
            torch.save(trainer_state, path / "trainer_state.pt")
        sums = {f.name: _sha256(f) for f in _own_files(path, rank)}
        (path / f"checksums_rank{rank}.json").write_text(json.dumps(sums, indent=1))
        _barrier()
        if rank == 0:
            (path / MARKER).write_text(str(step))
            for old in self.complete()[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        _barrier()
        return path

    def load(self, path: str | Path, model, optimizer) -> dict:
        """Restore model, optimizer and this rank's RNG; returns the trainer state.

        Raises :class:`CorruptCheckpoint` (naming the file) before touching the model when
        a file does not match its checksum."""
        path = Path(path)
        if not (path / MARKER).exists():
            raise FileNotFoundError(f"{path} is not a complete checkpoint (no {MARKER} marker)")
        rng_file = path / f"rng_rank{_rank()}.pt"
        if not rng_file.exists():
            raise FileNotFoundError(f"{rng_file} missing: was the checkpoint written with a "
                                    "different number of ranks?")
        verify(path)
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        _dcp(dcp.load, state, path)
        set_state_dict(model, optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"])
        set_rng_state(torch.load(rng_file, weights_only=False))
        return torch.load(path / "trainer_state.pt", weights_only=False)
