"""The one place where llmcomm reads environment variables.

Variables (all optional):

=============================  ==========================================================
``LLMCOMM_TIMEOUT_S``          deadline in seconds for every cross-rank wait (default 30)
``LLMCOMM_CHECK``              ``1``: per-call cross-rank check of op, shape and sequence
``LLMCOMM_NODE_ID``            overrides the host identity used to group ranks into nodes
``LLMCOMM_LOG_LEVEL``          level of the ``llmcomm`` logger (default WARNING)
``NCCL_NVLS_ENABLE``           ``0`` disables NVLink multicast (read, never written)
``TORCH_SYMM_MEM_DISABLE_MULTICAST``  ``1`` disables multicast (read, never written)
``NVSHMEM_DISABLE_NVLS``       ``1`` disables multicast (read, never written)
=============================  ==========================================================

``get_config()`` reads the environment on every call (cheap), so tests can monkeypatch it.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

DEFAULT_TIMEOUT_S = 30.0


def _flag(name: str, env: dict[str, str]) -> bool:
    return env.get(name, "").strip().lower() in ("1", "true", "yes", "on")


@dataclass(frozen=True)
class Config:
    timeout_s: float
    check: bool
    node_id: str
    multicast_disabled: bool
    multicast_disabled_by: tuple[str, ...]
    log_level: str


def get_config(env: dict[str, str] | None = None) -> Config:
    """Read llmcomm's settings from ``env`` (default ``os.environ``)."""
    env = dict(os.environ) if env is None else env
    raw_timeout = env.get("LLMCOMM_TIMEOUT_S", "")
    try:
        timeout = float(raw_timeout) if raw_timeout else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ValueError(f"LLMCOMM_TIMEOUT_S must be a number of seconds, got {raw_timeout!r}; "
                         f"unset it for the default of {DEFAULT_TIMEOUT_S:g} s") from None
    if timeout <= 0:
        raise ValueError(f"LLMCOMM_TIMEOUT_S must be > 0, got {timeout!r}")
    disabled_by = []
    if env.get("NCCL_NVLS_ENABLE", "").strip() == "0":
        disabled_by.append("NCCL_NVLS_ENABLE=0")
    if _flag("TORCH_SYMM_MEM_DISABLE_MULTICAST", env):
        disabled_by.append("TORCH_SYMM_MEM_DISABLE_MULTICAST=1")
    if _flag("NVSHMEM_DISABLE_NVLS", env):
        disabled_by.append("NVSHMEM_DISABLE_NVLS=1")
    return Config(
        timeout_s=timeout,
        check=_flag("LLMCOMM_CHECK", env),
        node_id=env.get("LLMCOMM_NODE_ID") or socket.gethostname(),
        multicast_disabled=bool(disabled_by),
        multicast_disabled_by=tuple(disabled_by),
        log_level=env.get("LLMCOMM_LOG_LEVEL", "WARNING").upper(),
    )


@dataclass(frozen=True)
class LauncherEnv:
    """What torchrun (or a similar launcher) tells this process."""

    rank: int
    world_size: int
    local_rank: int


def launcher_env(env: dict[str, str] | None = None) -> LauncherEnv | None:
    """``RANK`` / ``WORLD_SIZE`` / ``LOCAL_RANK`` when set by a launcher with more than one rank."""
    env = dict(os.environ) if env is None else env
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return None
    return LauncherEnv(rank=int(env["RANK"]), world_size=int(env["WORLD_SIZE"]),
                       local_rank=int(env.get("LOCAL_RANK", "0")))
