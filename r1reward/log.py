"""The package's one logger: ``logging.getLogger("r1reward")`` (modules log to it or to a
child, ``r1reward.<module>``). CLIs call :func:`setup_logging` once."""
from __future__ import annotations

import logging
import sys

logger = logging.getLogger("r1reward")


def setup_logging(is_main: bool = True) -> None:
    """Rank 0 prints info to stderr, other ranks only warnings; safe to call again."""
    if not any(getattr(h, "_r1reward", False) for h in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._r1reward = True
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.INFO if is_main else logging.WARNING)
