"""``python -m r1reward.train``: cold-start SFT then StableReinforce RL, end to end.

A thin CLI: parse and check the settings (a bad one exits with status 2 before anything
is written), then :func:`r1reward.job.run` sets up and hands over to
:class:`r1reward.trainer.Trainer`. Start reading there.
"""
from __future__ import annotations

import sys

from r1reward.config import ConfigError, parse_args
from r1reward.job import run
from r1reward.trainer import TIMING_KEYS

__all__ = ["main", "run", "TIMING_KEYS"]


def main(argv=None) -> None:
    try:
        cfg = parse_args(argv)
    except ConfigError as err:
        print(f"python -m r1reward.train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        run(cfg)
    except ConfigError as err:  # settings that conflict with the run directory
        print(f"python -m r1reward.train: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    finally:
        from r1reward.parallelize import destroy
        destroy()


if __name__ == "__main__":
    main()
