"""The on-disk cache (embedded tiny model, generated data, cold-start SFT results).

Everything is built aside and renamed into place, so an interrupted build never leaves a
half-written entry that a later run would take for a complete one: directories with
:func:`build_once`, single files with :func:`write_atomically`.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_root() -> Path:
    """``$R1REWARD_CACHE``, default ``~/.cache/r1reward``."""
    return Path(os.environ.get("R1REWARD_CACHE", Path.home() / ".cache" / "r1reward"))


def build_once(final: Path, build: Callable[[Path], object], *, marker: str) -> Path:
    """``final`` if it already holds ``marker``; otherwise ``build(tmp_dir)`` then rename.

    ``marker`` is a file the build writes last-ish (``config.json``, ``heldout.jsonl``...):
    its presence is what "complete" means. Two processes racing to build the same entry
    both succeed; the first rename wins and the loser's copy is discarded.
    """
    final = Path(final)
    if (final / marker).exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.building-"))
    try:
        build(tmp)
        if not (tmp / marker).exists():
            raise RuntimeError(f"building {final}: the build did not write {marker}")
        try:
            tmp.rename(final)
        except OSError:  # another process won the race (or a stale partial dir is there)
            if not (final / marker).exists():
                shutil.rmtree(final, ignore_errors=True)
                tmp.rename(final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def write_atomically(path: Path, write: Callable[[Path], object]) -> Path:
    """``write(tmp)`` to a temporary file beside ``path``, then ``os.replace`` it onto
    ``path``: a concurrent reader sees no file or a complete one, never half of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
