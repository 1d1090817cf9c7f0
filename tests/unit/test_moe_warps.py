"""The lamport backend's warps per call (``llmcomm.moe.p2p._lamport_warps``): 8 warps for a
batch whose tiles times ``combine_split`` fit the grid, the configured count above (session 14:
8 warps were faster for small batches and slower at 64-128 tokens, docs/moe.md)."""

import pytest

from llmcomm.moe.p2p import _at_warps, _lamport_warps, _spread_by_default


@pytest.mark.parametrize("T, tile, expect", [
    (0, 1, 8), (1, 1, 8), (16, 1, 8),     # 16 tiles x 4 chunks = 64 <= 66 programs
    (17, 1, 16), (128, 1, 16),            # 68 > 66: whole rows or 2 chunks, 16 warps
    (32, 2, 8), (34, 2, 16),              # tiles of 2 tokens: 16 and 17 tiles
])
def test_small_batches_take_the_small_warp_count(T, tile, expect):
    assert _lamport_warps(T, tile, 66, 4, 16, 8) == expect


def test_no_small_count_keeps_the_configured_warps():
    # an explicit num_warps (or hidden < 4096) leaves small=None: every call runs num_warps
    assert [_lamport_warps(T, 1, 66, 4, 16, None) for T in (0, 1, 128)] == [16, 16, 16]
    assert _lamport_warps(1, 1, 66, 4, 4, None) == 4


def test_meta_spin_only_at_small_warp_counts():
    """``MSPIN`` (session 20: faster at 8 warps, 1 us slower a dispatch at 16) is dropped from
    a launch at more than 8 warps; nothing else changes."""
    kw = {"EARLY": True, "TSPIN": True, "MSPIN": True}
    assert _at_warps(kw, 8) == kw and _at_warps(kw, 4) == kw
    assert _at_warps(kw, 16) == {"EARLY": True, "TSPIN": True, "MSPIN": False}
    assert _at_warps({"TSPIN": True}, 16) == {"TSPIN": True}
    assert kw["MSPIN"] is True   # not mutated


def test_gate_only_at_small_warp_counts():
    """``GATE`` (session 26: faster at 1-8 tokens, at 8 warps; 0.2-0.7 us slower at 64-128
    tokens, 16 warps) is dropped from a launch at more than 8 warps, as ``MSPIN``."""
    kw = {"TSPIN": True, "MSPIN": True, "GATE": True, "EARLY": True}
    assert _at_warps(kw, 8) == kw
    assert _at_warps(kw, 16) == {**kw, "MSPIN": False, "GATE": False}
    assert _at_warps({"GATE": False}, 8) == {"GATE": False}
    assert kw["GATE"] is True   # not mutated


def test_peer_spread_launches_at_most_128_registers_on_a_gpu():
    """``SPREAD`` gets ``maxnreg=128`` on a GPU (ptxas gives it ~200 registers at 8 warps
    otherwise: one program an SM), not in the simulation, and nothing else gets it."""
    kw = {"TSPIN": True, "MSPIN": True, "SPREAD": True}
    assert _at_warps(kw, 8) == {**kw, "maxnreg": 128}
    assert _at_warps(kw, 16) == {**kw, "MSPIN": False, "maxnreg": 128}
    assert _at_warps(kw, 8, sim=True) == kw
    assert "maxnreg" not in _at_warps({"TSPIN": True, "SPREAD": False}, 8)
    assert "maxnreg" not in kw


def test_peer_spread_default_by_ep_size():
    """On by default at EP > 2 (EP=2: slower, session 21), never in the sequential
    simulation."""
    assert [_spread_by_default(w, False) for w in (2, 3, 4, 8)] == [False, True, True, True]
    assert not _spread_by_default(4, True)


@pytest.mark.parametrize("M, expect", [
    (1, [0, 1]), (2, [0, 1, 2]), (5, [0, 1, 2, 5]), (16, [0, 1, 2, 16]),
    (128, [0, 1, 2, 16, 128]),
])
def test_warmup_covers_every_token_class(M, expect):
    """EPDispatcher.warmup's default counts: one per class triton compiles apart (T == 1, T a
    multiple of 16 with 0, any other) wherever max_tokens_per_rank has that class, and M."""
    from llmcomm.moe.dispatcher import warm_token_counts

    counts = warm_token_counts(M)
    assert counts == expect
    classes = {(t == 1, t % 16 == 0) for t in range(M + 1)}
    assert {(t == 1, t % 16 == 0) for t in counts} == classes


@pytest.mark.parametrize("ce, M, expect", [
    (None, 4096, []), (5000, 4096, []),
    (2048, 4096, [2048, 2049]), (2049, 4096, [2049, 2064]), (9, 40, [9, 16]),
    (1, 40, [1, 2, 16]), (16, 16, [16]), (40, 40, [40]), (33, 40, [33]),
])
def test_ce_warmup_covers_the_copy_paths_classes(ce, M, expect):
    """P2PBackend.warmup's extra counts for ``_ce_tokens``: a count >= the threshold in every
    class triton compiles apart that has one up to M (the copy path is its own variant)."""
    from llmcomm.moe.p2p import _ce_warm_tokens

    counts = _ce_warm_tokens(ce, M)
    assert counts == expect
    if ce is not None and ce <= M:
        assert all(ce <= t <= M for t in counts)
        classes = {(t == 1, t % 16 == 0) for t in range(ce, M + 1)}
        assert {(t == 1, t % 16 == 0) for t in counts} == classes
