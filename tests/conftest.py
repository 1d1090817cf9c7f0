"""Shared pytest set-up: GPU markers skip cleanly where the GPUs are missing."""

from __future__ import annotations

import pytest


def _gpu_count() -> int:
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        return 0


def pytest_collection_modifyitems(config, items):
    n = _gpu_count()
    need = {"gpu": 1, "gpu2": 2, "gpu4": 4}
    for item in items:
        for mark, count in need.items():
            if item.get_closest_marker(mark) and n < count:
                item.add_marker(pytest.mark.skip(reason=f"needs {count} CUDA GPU(s), found {n}"))
