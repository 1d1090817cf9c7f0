"""Triton's compile hook as a recorder, for the warmup tests (one definition for all of them)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator


@contextlib.contextmanager
def record_compiles() -> Iterator[list[str]]:
    """Inside the block, every kernel triton compiles -- a miss of its in-memory cache, whether
    the disk cache then has it or not -- appends a short description to the yielded list; the
    compile goes on as usual. The previous hook is restored on exit."""
    import triton

    compiled: list[str] = []

    def hook(*args, **kwargs):
        compiled.append(str(kwargs.get("repr", args[:1]))[:120])
        return False            # go on compiling: the hook only records

    prev = triton.knobs.runtime.jit_cache_hook
    triton.knobs.runtime.jit_cache_hook = hook
    try:
        yield compiled
    finally:
        triton.knobs.runtime.jit_cache_hook = prev
