"""Loud, once-per-process warnings (fusion asked for and not used is never silent)."""

from __future__ import annotations

import logging
import warnings

_warned: set[str] = set()


def warn_once(logger: logging.Logger, key: str, message: str) -> None:
    """``logger.warning`` and ``warnings.warn(RuntimeWarning)``, once per process and ``key``."""
    if key in _warned:
        return
    _warned.add(key)
    logger.warning("%s", message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
