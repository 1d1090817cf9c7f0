"""Parallel layout: sizes -> rank lists of the TP, PP, DP, PCP and EP groups.

Ranks are laid out as vLLM does::

    ranks = arange(world).reshape(dp, pp, pcp, tp)      # TP innermost

* a TP group varies the last axis, a PCP group the ``pcp`` axis, a PP group the ``pp`` axis,
  a DP group the ``dp`` axis (the other axes fixed);
* an EP group spans DP x PCP x TP inside one pipeline stage: for each ``pp`` index, the ranks
  ``ranks[:, p, :, :]`` flattened in (dp, pcp, tp) order. So ``ep_size = dp * pcp * tp``.

Example: ``ParallelLayout(tp=2, pp=2)`` on 4 ranks gives TP groups [[0, 1], [2, 3]], PP groups
[[0, 2], [1, 3]], EP groups [[0, 1], [2, 3]].
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

logger = logging.getLogger(__name__)

_AXES = ("dp", "pp", "pcp", "tp")


def _groups_along(shape: tuple[int, ...], axis: int) -> list[list[int]]:
    """Rank lists that vary ``axis`` of a C-ordered ``arange(prod(shape)).reshape(shape)``."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    others = [i for i in range(len(shape)) if i != axis]
    groups: list[list[int]] = []

    def rec(k: int, base: int) -> None:
        if k == len(others):
            groups.append([base + j * strides[axis] for j in range(shape[axis])])
            return
        ax = others[k]
        for j in range(shape[ax]):
            rec(k + 1, base + j * strides[ax])

    rec(0, 0)
    return groups


@dataclass(frozen=True)
class ParallelLayout:
    """Sizes of the parallel dimensions. ``world_size = tp * pp * dp * pcp``."""

    tp: int
    pp: int = 1
    dp: int = 1
    pcp: int = 1

    def __post_init__(self) -> None:
        for name in ("tp", "pp", "dp", "pcp"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int):
                raise TypeError(f"ParallelLayout.{name} must be an int, got {type(v).__name__} {v!r}")
            if v < 1:
                raise ValueError(f"ParallelLayout.{name} must be >= 1, got {v}; every parallel "
                                 f"dimension has at least one rank (use 1 to switch it off)")

    @property
    def world_size(self) -> int:
        return self.tp * self.pp * self.dp * self.pcp

    @property
    def ep_size(self) -> int:
        """Ranks of one EP group: DP x PCP x TP of one pipeline stage."""
        return self.dp * self.pcp * self.tp

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        return (self.dp, self.pp, self.pcp, self.tp)

    def tp_groups(self) -> list[list[int]]:
        return _groups_along(self._shape, 3)

    def pcp_groups(self) -> list[list[int]]:
        return _groups_along(self._shape, 2)

    def pp_groups(self) -> list[list[int]]:
        return _groups_along(self._shape, 1)

    def dp_groups(self) -> list[list[int]]:
        return _groups_along(self._shape, 0)

    def ep_groups(self) -> list[list[int]]:
        per_stage: list[list[int]] = []
        for p in range(self.pp):
            per_stage.append([((d * self.pp + p) * self.pcp + c) * self.tp + t
                              for d in range(self.dp) for c in range(self.pcp)
                              for t in range(self.tp)])
        return per_stage

    def all_groups(self) -> dict[str, list[list[int]]]:
        """Every kind of group, in the order :meth:`create_groups` creates them."""
        return {"tp": self.tp_groups(), "pp": self.pp_groups(), "dp": self.dp_groups(),
                "pcp": self.pcp_groups(), "ep": self.ep_groups()}

    def check_world_size(self, world_size: int) -> None:
        """Raise ValueError, with sizes that would fit, unless ``world_size`` matches."""
        if world_size == self.world_size:
            return
        fits = [f"tp={t}, pp={world_size // t}" for t in (1, 2, 4, 8)
                if world_size % t == 0 and t <= world_size]
        raise ValueError(
            f"{self} needs world_size = tp*pp*dp*pcp = {self.world_size}, but the job has "
            f"{world_size} ranks. Choose sizes whose product is {world_size} "
            f"(e.g. {'; '.join(fits[:3]) or f'tp={world_size}'}).")

    def groups_of(self, rank: int) -> dict[str, list[int]]:
        """The rank list of each kind of group that ``rank`` belongs to."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside [0, {self.world_size}) for {self}")
        return {kind: next(g for g in groups if rank in g)
                for kind, groups in self.all_groups().items()}

    def create_groups(self, backend: str | None = None) -> "Groups":
        """Create every torch.distributed group (same order on every rank) and return this rank's.

        Collective: every rank of the world must call it. ``backend`` defaults to the world's.
        """
        import torch.distributed as dist

        if not dist.is_initialized():
            raise RuntimeError("torch.distributed is not initialised: call "
                               "torch.distributed.init_process_group() before create_groups()")
        self.check_world_size(dist.get_world_size())
        rank = dist.get_rank()
        mine: dict[str, Any] = {}
        ranks_of: dict[str, list[int]] = {}
        for kind, groups in self.all_groups().items():
            for ranks in groups:
                pg = dist.new_group(ranks, backend=backend)
                if rank in ranks:
                    mine[kind] = pg
                    ranks_of[kind] = ranks
        logger.debug("rank %d groups: %s", rank, ranks_of)
        return Groups(layout=self, rank=rank, ranks=ranks_of, **mine)


@dataclass(frozen=True)
class Groups:
    """This rank's process groups, made by :meth:`ParallelLayout.create_groups`."""

    layout: ParallelLayout
    rank: int
    ranks: dict[str, list[int]]
    tp: Any
    pp: Any
    dp: Any
    pcp: Any
    ep: Any
