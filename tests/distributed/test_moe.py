"""EPDispatcher over gloo (CPU), world 2 and 4: routing, contract, layout and error cases.

Every received row is checked against its (rank-tagged) source row; combine is checked against
the dense float64 reference with ``check_combine_output``; expert outputs are NaN-poisoned past
``counts`` so a backend that reads an unwritten row fails. The ``p2p`` backend runs here too, its
Triton kernels under ``TRITON_INTERPRET=1`` over file-mapped shared memory (the protocol, not the
GPU memory model, which ``tests/gpu/test_moe_p2p.py`` covers), with both protocols (``flags`` and
``lamport``, see ``P2P_SIM``): every routing case, world 4, six consecutive
calls on one dispatcher per protocol (lamport buffer rotation and sentinel reset; outputs of the
two protocols bitwise equal), a missing peer ending in ``CollectiveTimeoutError`` (in the
dispatch, and in the combine after a completed dispatch), and the
lamport kernels with every program of a grid running concurrently (``_interp_threads``).
"""

from __future__ import annotations

import importlib.util
import tempfile

import pytest
import torch

from tests._dist import run_ranks
from tests.distributed._moe_cases import (assert_lamport_sentinel, check_combine, check_dispatch,
                                          make_inputs, roundtrip, run_experts)

E, H = 8, 12
# (routing, tokens per rank for world 4 (world 2 takes the first two), top_k)
CASES = [
    ("random", [13, 0, 7, 1], 3),      # zero tokens on a rank, T not round
    ("random", [1, 13, 0, 5], 1),      # top_k = 1
    ("one_expert", [13, 9, 11, 2], 2),  # every token to one expert (worst-case capacity)
    ("dups", [6, 13, 3, 0], 3),        # repeated ids inside a token
    ("low_experts", [13, 13, 4, 8], 2),  # experts (and whole ranks) with no tokens
]
SIM = {"TRITON_INTERPRET": "1"}
#: p2p kernel shapes the simulation covers: name -> P2PBackend knobs (3 programs unless said,
#: M = 13, so a program owns up to 5 tokens): protocol "flags" with its defaults, tiles that
#: straddle round ends, and one round with one token per step; protocol "lamport" with its
#: defaults (1-token tiles), 2-token dispatch tiles, 4/2-token tiles, and the column-split
#: combine (its split path is taken in ``_repeat_worker``, where batches are small enough).
#: (No entry relies on protocol="auto", which picks lamport for these small dispatchers at
#: world 2 and flags at world 4.)
P2P_SIM = {"p2p-sim": {"protocol": "flags"},
           # rounds sized per call from each batch (RT, an A/B knob), 3 programs and one
           # (up to 13 tokens a program: rounds of 4 / 7 ... by batch, the ranks' differ)
           "p2p-sim-rt": {"protocol": "flags", "_runtime_rounds": True},
           "p2p-sim-rt-g1": {"protocol": "flags", "num_programs": 1, "_runtime_rounds": True},
           "p2p-sim-t4c2r3": {"tile_tokens": 4, "combine_tile_tokens": 2, "round_tokens": 3},
           "p2p-sim-t1r13": {"tile_tokens": 1, "round_tokens": 13},
           "p2p-sim-r1": {"round_tokens": 1},   # a round per token
           # the combine's push and finish in separate programs (a grid of 2 G), one token a
           # step, rounds of 3; two tokens a step, rounds of 2
           "p2p-sim-roles": {"protocol": "flags", "_combine_roles": True, "round_tokens": 3},
           "p2p-sim-roles-p2": {"protocol": "flags", "_combine_roles": True, "round_tokens": 2,
                                "_roles_pair": 2},
           # ... on a grid of its own, smaller than the dispatch's (2 programs a role vs 3)
           "p2p-sim-roles-gc2": {"protocol": "flags", "_combine_roles": True,
                                 "_roles_programs": 2},
           # rounds of 3 (slots claimed a round at a time) and of 17 (claimed per token)
           "p2p-sim-r3": {"round_tokens": 3},
           "p2p-sim-r17": {"round_tokens": 17},
           # the phased rounds (interleave=False; the default interleaves), 2-token tiles
           "p2p-sim-phased": {"interleave": False, "tile_tokens": 2, "round_tokens": 3},
           # rows by copy_ on a side stream (an A/B knob): every call with a token; and only
           # calls of 9+ tokens, so that in most cases one rank copies its rows and the other
           # stores them
           "p2p-sim-ce": {"protocol": "flags", "_ce_tokens": 1},
           "p2p-sim-ce9r2": {"protocol": "flags", "_ce_tokens": 9, "round_tokens": 2},
           "p2p-sim-lamport": {"protocol": "lamport"},
           "p2p-sim-lamport-t2": {"protocol": "lamport", "tile_tokens": 2},
           "p2p-sim-lamport-t4c2": {"protocol": "lamport", "tile_tokens": 4,
                                    "combine_tile_tokens": 2},
           # 8 programs: up to 2 tokens per rank take the column-split combine in 4 chunks, 3-4
           # tokens in 2
           "p2p-sim-lamport-cs4": {"protocol": "lamport", "combine_split": 4,
                                   "num_programs": 8}}
#: the default protocol="auto" (lamport here: world 2, M <= 128); used by the repeat test only
P2P_SIM_AUTO = {"p2p-sim-auto": {}}


#: the packed layout (``EPDispatcher(packed=True)``) for a name ending in this, and
#: ``packed_align=N`` for one ending in it and ``N``
PACKED = "-packed"


#: the fp8 dispatch (``EPDispatcher(fp8=True)``) for a name ending in this (after any
#: packed suffix is taken off: ``torch-packed-fp8``)
FP8 = "-fp8"


def _make(backend, K, M, tmp, group=None, layout=None, hidden=H, **kw):
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher

    group = group if group is not None else dist.group.WORLD
    if backend.endswith(FP8):
        backend = backend[:-len(FP8)]
        kw["fp8"] = True
    base, sep, align = backend.rpartition(PACKED)
    if sep and (align.isdigit() or not align):
        backend = base
        kw.update(packed=True, packed_align=int(align or 1))
    if backend in P2P_SIM or backend in P2P_SIM_AUTO:
        from llmcomm.moe.p2p import P2PBackend

        return EPDispatcher(group, E, K, hidden, M, kw.pop("dtype", torch.float32),
                            layout=layout, _backend_cls=P2PBackend,
                            _backend_kwargs=dict(simulate_dir=tmp, **{
                                "num_programs": 3, **{**P2P_SIM, **P2P_SIM_AUTO}[backend]}),
                            **kw)
    return EPDispatcher(group, E, K, hidden, M, kw.pop("dtype", torch.float32), backend=backend,
                        layout=layout, **kw)


def _cases_worker(rank, world, backend, tmp, seed, hidden=H, dtype=torch.float32):
    """Every routing case of ``CASES`` through one dispatcher per top_k (buffer reuse); an fp8
    dispatcher gets the caller's own ``(q, scale)`` in every other call."""
    out = []
    by_k: dict[int, object] = {}
    for i, (routing, toks, K) in enumerate(CASES):
        if K not in by_k:   # one dispatcher per top_k, reused across calls (buffer reuse)
            by_k[K] = _make(backend, K, 13, f"{tmp}/k{K}", hidden=hidden, dtype=dtype)
        ep = by_k[K]
        inputs = make_inputs(seed + i, world, toks[:world], E, K, hidden, dtype, routing)
        out.append((routing, *roundtrip(ep, rank, world, E, inputs, dtype,
                                        pair=ep.fp8 and i % 2 == 1)))
    return out


def _run_cases(backend, seed, tol, timeout, hidden=H, dtype=torch.float32):
    """``_cases_worker`` on two ranks (the p2p simulation under the interpreter); every case
    within ``tol`` of the reference and some rows received."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        for k in (1, 2, 3):
            os.makedirs(f"{tmp}/k{k}")
        res = run_ranks(_cases_worker, 2, backend, tmp, seed, hidden, dtype, timeout=timeout,
                        env=SIM if backend.startswith("p2p") else None)
    for rank_res in res:
        assert len(rank_res) == len(CASES)
        for routing, n, err in rank_res:
            assert err <= tol, (routing, err)
    assert sum(n for r in res for _, n, _ in r) > 0


NEEDS_TRITON = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                  reason="the p2p kernels run under TRITON_INTERPRET=1: needs "
                                         "triton (pip install triton; `make test` installs it)")


#: the packed layout: both collective backends, and the flags dispatch's three placement paths
#: (slots claimed a round at a time, per token, and per tile)
#: (segments aligned to 4 rows: torch, and the p2p-sim per-token claims and tiles)
PACKED_CASES = ["torch-packed", "allgather-packed", "torch-packed4",
                *(pytest.param(n, marks=NEEDS_TRITON)
                  for n in ("p2p-sim-packed", "p2p-sim-r17-packed", "p2p-sim-t4c2r3-packed",
                            "p2p-sim-r17-packed4", "p2p-sim-t4c2r3-packed3"))]


@pytest.mark.parametrize("backend", ["torch", "allgather",
                                     *(pytest.param(n, marks=NEEDS_TRITON) for n in P2P_SIM),
                                     *PACKED_CASES])
def test_contract_every_backend_world2(backend):
    """THE contract test: each backend vs the dense single-process reference."""
    _run_cases(backend, 100, 2e-5, 150)


#: the fp8 dispatch: both collective backends, a packed layout, the flags dispatch's
#: placement paths (rounds, per-token claims, tiles; packed) and lamport's (one-token and
#: 4-token tiles; its sentinel in the wire rows: ``make_inputs``); the dtype the wire rows are
#: viewed as (fp32: 66 elements a row at hidden 256, bf16: 132)
FP8_CASES = {"torch-fp8": torch.float32, "allgather-fp8": torch.bfloat16,
             "torch-packed4-fp8": torch.bfloat16, "p2p-sim-fp8": torch.float32,
             "p2p-sim-r17-fp8": torch.bfloat16, "p2p-sim-t4c2r3-packed-fp8": torch.float32,
             "p2p-sim-lamport-fp8": torch.bfloat16, "p2p-sim-lamport-t4c2-fp8": torch.float32}
H_FP8 = 256   # two scales a token


@pytest.mark.parametrize("backend", [n if not n.startswith("p2p") else
                                     pytest.param(n, marks=NEEDS_TRITON) for n in FP8_CASES])
def test_contract_fp8_dispatch(backend):
    """The fp8 dispatch: every received row's fp8 bytes and scales are the float64 reference
    quantisation of its source row, bit for bit (``check_dispatch``), and the combine of the
    experts on the dequantised rows matches the dense reference of the quantised tokens."""
    from llmcomm.moe.reference import RTOL

    dtype = FP8_CASES[backend]
    _run_cases(backend, 300, RTOL[dtype], 200, hidden=H_FP8, dtype=dtype)


def _caller_scales_worker(rank, world, backend, tmp):
    """An fp8 dispatch (bf16 wire view) of the caller's own ``(q, scale)`` whose second
    block's scales have low 16 bits 0x8000 (in a bf16 view, lamport's sentinel); per received
    row: (the sent scale bits, the received ones, whether the fp8 bytes are the sent ones but
    for the sign of zeros)."""
    from llmcomm.moe.reference import dequantize_fp8_blocks, quantize_fp8_blocks
    from tests.distributed._moe_cases import _fp8_bits

    ep = _make(backend, 2, 13, tmp, hidden=H_FP8, dtype=torch.bfloat16)
    inputs = make_inputs(7, world, [13, 11], E, 2, H_FP8, torch.bfloat16, "random")
    pairs = []
    for x, _, _ in inputs:
        q, s = quantize_fp8_blocks(x)
        s[:, 1] = (s[:, 1].view(torch.int32) | 0x8000).view(torch.float32)
        pairs.append((q, s))
    _, ids, w = inputs[rank]
    d = ep.dispatch(pairs[rank], ids, w)
    rows = []
    for le, c in enumerate(d.counts.tolist()):
        q, s = d.expert_x[le, :c], d.expert_x_scale[le, :c]
        tag = dequantize_fp8_blocks(q[:, :128], s[:, :1])   # block 0: the reference's scales
        for i in range(c):
            src = int(tag[i, 0])
            t = int(tag[i, 1]) + 16 * int(tag[i, 2]) + 256 * int(tag[i, 3])
            rows.append((pairs[src][1][t].view(torch.int32).tolist(),
                         s[i].view(torch.int32).tolist(),
                         torch.equal(_fp8_bits(q[i]), _fp8_bits(pairs[src][0][t]))))
    return rows


@NEEDS_TRITON
@pytest.mark.parametrize("backend, bump", [("p2p-sim-lamport-fp8", 1),
                                           ("p2p-sim-lamport-t4c2-fp8", 1), ("p2p-sim-fp8", 0)])
def test_fp8_caller_scale_with_sentinel_bits(backend, bump):
    """A caller's scale whose low 16 bits are 0x8000: lamport sends it one ulp larger (its
    sentinel rewrite of the scale columns, ``_no_sentinel`` in :mod:`llmcomm.kernels.moe`),
    flags unchanged; the fp8 bytes arrive as sent either way, and the other scales too."""
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_caller_scales_worker, 2, backend, tmp, timeout=150, env=SIM)
    rows = [r for rank_rows in res for r in rank_rows]
    assert len(rows) >= 20, len(rows)
    for sent, got, same_q in rows:
        assert same_q
        assert got == [sent[0], sent[1] + bump], (sent, got)


def _layout_worker(rank, world, tmp):
    from llmcomm.layout import ParallelLayout

    layout = ParallelLayout(tp=2, dp=2)                # EP = DP x TP = 4
    groups = layout.create_groups()
    errs = []
    for backend in ("torch", "allgather"):
        ep = _make(backend, 3, 13, tmp, group=groups.ep, layout=layout)
        assert ep.world_size == 4 and ep.local_experts == 2 and ep.capacity == 52
        for i, (routing, toks, K) in enumerate(CASES[:1] + CASES[2:3]):
            inputs = make_inputs(7 + i, 4, toks, E, 3, H, torch.float32, routing)
            errs.append(roundtrip(ep, rank, 4, E, inputs, torch.float32)[1])
    # a workspace sized to the DP group (seed 002) is refused at creation, naming both sizes
    try:
        _make("torch", 3, 13, tmp, group=groups.dp, layout=layout)
        wrong = None
    except ValueError as e:
        wrong = str(e)
    return max(errs), wrong


def test_world4_tp2_dp2_layout():
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_layout_worker, 4, tmp, timeout=150)
    for err, wrong in res:
        assert err <= 2e-5
        assert wrong is not None and "ep_size=4" in wrong and "2 ranks" in wrong, wrong


def _full_segments_worker(rank, world, tmp, backend):
    """Both ranks at capacity, every token to experts 0 and 1: rank 0's two segments are full,
    the second starting past ``capacity`` when the first is rounded up to ``packed_align``."""
    ep = _make(backend, 3, 13, tmp)
    inputs = make_inputs(8, world, [13, 13], E, 3, H, torch.float32, "first_two")
    return roundtrip(ep, rank, world, E, inputs, torch.float32)


@pytest.mark.parametrize("backend", ["torch-packed4", pytest.param("p2p-sim-packed4",
                                                                   marks=NEEDS_TRITON)])
def test_packed_full_segments_with_alignment(backend):
    """The p2p kernels' ``CAP`` grows by ``packed_align - 1`` (``EPConfig.slot_cap``); without
    that the dispatch's ``slot < CAP`` guard drops the last rows of expert 1 here."""
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_full_segments_worker, 2, tmp, backend, timeout=150,
                        env=SIM if backend.startswith("p2p") else None)
    assert res[0][0] >= 2 * 26, res   # rank 0's rows, each checked: experts 0 and 1 full
    assert max(err for _, err in res) <= 2e-5


def _p2p_sim_world4_worker(rank, world, tmp, backend):
    hidden = H_FP8 if backend.endswith(FP8) else H
    ep = _make(backend, 2, 13, tmp, hidden=hidden)
    routing, toks, K = CASES[0]
    inputs = make_inputs(3, 4, toks, E, 2, hidden, torch.float32, routing)
    return roundtrip(ep, rank, 4, E, inputs, torch.float32)[1]


@NEEDS_TRITON
@pytest.mark.parametrize("backend", ["p2p-sim", "p2p-sim-lamport", "p2p-sim" + PACKED,
                                     "p2p-sim" + FP8])
def test_world4_p2p_sim(backend):
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_p2p_sim_world4_worker, 4, tmp, backend, timeout=150, env=SIM)
    assert max(res) <= 2e-5


def _repeat_worker(rank, world, tmp):
    """Both protocols, one dispatcher each (flags explicitly, lamport as the default
    protocol="auto" picks it here, lamport with the column-split combine on 8 programs, and
    flags with a packed ``expert_x``: its count exchange alternates two buffers by parity and
    its cursors start biased), 8 consecutive dispatch/combine pairs with changing token counts (0 and M included; the split
    path in 4 chunks for at most 2 tokens per rank, in 2 chunks for 3-4, whole rows otherwise):
    every receive buffer of the lamport rotation is used twice and its sentinel reset is
    exercised across the combine paths; the combine outputs must be bitwise equal (fixed-order
    fp32 sums; no FMA contraction in the interpreter)."""
    import logging
    import os

    hints = []       # the dispatcher's once-only "dispatch before warmup()" hint

    class Hints(logging.Handler):
        def emit(self, record):
            if "before warmup()" in record.getMessage():
                hints.append(record.getMessage())

    log = logging.getLogger("llmcomm.moe.dispatcher")
    log.setLevel(logging.INFO)
    log.addHandler(Hints())
    eps = {}
    for b in ("p2p-sim", "p2p-sim-auto", "p2p-sim-lamport-cs4", "p2p-sim-auto" + PACKED):
        os.makedirs(f"{tmp}/{b}", exist_ok=True)
        eps[b] = _make(b, 3, 9, f"{tmp}/{b}", dtype=torch.bfloat16)
    if rank == 1:   # local and a no-op in the simulation (nothing compiles ahead there)
        assert all(ep.warmup() == 0 for ep in eps.values())
    tokens = [[9, 2], [0, 5], [1, 2], [3, 0], [1, 9], [0, 1], [7, 7], [2, 1]]
    errs, same = [], True
    for i, toks in enumerate(tokens):
        inputs = make_inputs(40 + i, world, toks, E, 3, H, torch.bfloat16,
                             ("random", "dups")[i % 2])
        ys = []
        for b, ep in eps.items():
            x, ids, w = inputs[rank]
            d = ep.dispatch(x, ids, w)
            check_dispatch(rank, world, E, inputs, d.expert_x, d.counts, d.offsets)
            y = ep.combine(run_experts(rank, E, world, d.expert_x, d.counts, d.offsets), d)
            errs.append(check_combine(rank, inputs, y, torch.bfloat16, what=b))
            ys.append(y)
        same = same and all(torch.equal(ys[0].view(torch.int16), y.view(torch.int16))
                            for y in ys[1:])
    for ep in eps.values():
        ep.check_errors()
    return (max(errs), same, [str(ep.decision) for ep in eps.values()], len(hints),
            eps["p2p-sim-auto"].describe())


@NEEDS_TRITON
def test_p2p_sim_repeated_calls_both_protocols():
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_repeat_worker, 2, tmp, timeout=150, env=SIM)
    assert [r[3] for r in res] == [4, 0]   # once per dispatcher on rank 0; rank 1 warmed up
    assert "warmup:   done (0 kernel variants" in res[1][4]     # the simulation compiles none
    assert "warmup:   not called" in res[0][4]
    for err, same, decisions, _, text in res:
        assert "protocol lamport" in text and "GB; symmetric workspace" in text, text
        assert err <= 2.5e-2
        assert same, "flags and lamport combine outputs differ bitwise"
        assert "protocol flags (requested explicitly)" in decisions[0], decisions
        assert "protocol lamport (max_tokens_per_rank 9 <= 128 at EP=2" in decisions[1], decisions
        assert "protocol flags (packed expert_x" in decisions[3], decisions


def _trace_worker(rank, world, tmp):
    """``_trace``: a lamport dispatcher whose dispatch stamps its stages, checked calls (the
    stamps must not change a result), then how often each stage was passed. The interpreter
    has no clock (every stamp is 0 ns), so the counts are what is checked here."""
    import torch.distributed as dist

    from llmcomm.kernels.moe import TRACE_STAGES
    from llmcomm.moe import EPDispatcher
    from llmcomm.moe.p2p import P2PBackend

    G, M, K = 4, 6, 3
    ep = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.float32, _backend_cls=P2PBackend,
                      _backend_kwargs=dict(simulate_dir=tmp, num_programs=G, protocol="lamport",
                                           _trace=True))
    tokens = [[6, 2], [0, 3], [1, 1], [5, 6]]
    errs = []
    for i, toks in enumerate(tokens):
        inputs = make_inputs(90 + i, world, toks, E, K, H, torch.float32, "random")
        errs.append(roundtrip(ep, rank, world, E, inputs, torch.float32)[1])
    ep.check_errors()
    plain = EPDispatcher(dist.group.WORLD, E, K, H, M, torch.float32, _backend_cls=P2PBackend,
                         _backend_kwargs=dict(simulate_dir=f"{tmp}/plain", num_programs=G,
                                              protocol="lamport"))
    try:
        plain._backend.trace_summary()
        refused = ""
    except ValueError as e:
        refused = str(e)
    summary = ep._backend.trace_summary()
    return max(errs), list(summary) == list(TRACE_STAGES), summary, refused


@NEEDS_TRITON
def test_p2p_sim_lamport_trace_counts_every_stage():
    """With one-token tiles on 4 programs: per call, every program stamps "counts sent",
    "loop done" and "end" once, none "counts published" (the default's direct counts have no
    last program out, session 27); "own token sent" once an
    iteration, and program ``p`` iterates while it has an own or a peer's token ``p + i*G``
    left (calls of 6 and 5 tokens: programs 0-1 twice)."""
    import os

    with tempfile.TemporaryDirectory() as tmp:
        os.makedirs(f"{tmp}/plain")
        res = run_ranks(_trace_worker, 2, tmp, timeout=150, env=SIM)
    G, calls = 4, 4
    for err, names_ok, summary, refused in res:
        assert err <= 2e-5
        assert names_ok
        assert "_trace=True" in refused, refused
        for stage in ("counts sent", "loop done", "end"):
            assert summary[stage]["n"] == calls * G, (stage, summary[stage])
        assert summary["counts published"]["n"] == 0, summary["counts published"]
    tokens = [[6, 2], [0, 3], [1, 1], [5, 6]]   # as _trace_worker's calls, rank 0 / rank 1
    iters = sum(1 + sum(p + i * G < max(toks) for i in range(1, 3))
                for toks in tokens for p in range(G))
    assert iters == 4 * G + 2 + 2   # programs 0 and 1 of calls 0 and 3 (the peer's 6 tokens)
    for _, _, summary, _ in res:
        assert summary["own token sent"]["n"] == iters, summary["own token sent"]
        assert summary["end"]["p0"] == 0.0 and summary["end"]["max"] == 0.0   # no clock here


def _missing_peer_worker(rank, world, tmp, backend, absent=1):
    import torch.distributed as dist

    from llmcomm.errors import CollectiveTimeoutError

    ep = _make(backend, 2, 4, tmp)
    ep._backend.timeout_ns = 1_000_000      # 1 ms = 1000 interpreter spins
    msg = None
    if rank != absent:                      # the absent rank never dispatches: no one may hang
        x = torch.randn(3, H)
        d = ep.dispatch(x, torch.tensor([[0, 7], [5, 1], [2, 2]]), torch.rand(3, 2))
        try:
            ep.check_errors()
        except CollectiveTimeoutError as e:
            msg = (e.missing_ranks, str(e))
        assert d is not None
    dist.barrier()
    return msg


def _missing_combine_worker(rank, world, tmp, backend):
    """Both ranks dispatch; rank 1 never combines: rank 0's combine must end in a timeout
    naming rank 1 (the combine's own deadline: its waits come after a successful dispatch)."""
    import torch.distributed as dist

    from llmcomm.errors import CollectiveTimeoutError

    ep = _make(backend, 2, 4, tmp)
    x = torch.randn(3, H)
    d = ep.dispatch(x, torch.tensor([[0, 7], [5, 1], [2, 6]]), torch.rand(3, 2))
    ep.check_errors()                       # the dispatch itself completes on both ranks
    dist.barrier()
    msg = None
    if rank == 0:
        ep._backend.timeout_ns = 1_000_000  # 1 ms = 1000 interpreter spins
        ep.combine(run_experts(rank, E, world, d.expert_x, d.counts), d)
        try:
            ep.check_errors()
        except CollectiveTimeoutError as e:
            msg = (e.missing_ranks, str(e))
    dist.barrier()
    return msg


@NEEDS_TRITON
@pytest.mark.parametrize("op, backend", [("dispatch", "p2p-sim"), ("dispatch", "p2p-sim-lamport"),
                                         ("dispatch", "p2p-sim-ce"),
                                         ("dispatch", "p2p-sim" + PACKED),
                                         ("combine", "p2p-sim"), ("combine", "p2p-sim-lamport"),
                                         ("combine", "p2p-sim-roles")])
def test_p2p_sim_missing_peer_times_out(op, backend):
    """A peer missing from the dispatch, or from the combine after a completed dispatch."""
    worker = {"dispatch": _missing_peer_worker, "combine": _missing_combine_worker}[op]
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(worker, 2, tmp, backend, timeout=150, env=SIM)
    assert res[0] is not None, f"rank 0's {op} did not raise CollectiveTimeoutError"
    missing, text = res[0]
    assert missing == [1] and op in text, text
    # the copied-rows path says what else may hold a dispatch back: copies waiting for SMs
    assert ("_ce_tokens=1" in text and "num_programs" in text) == ("-ce" in backend), text


@NEEDS_TRITON
def test_p2p_sim_missing_peer_among_present_ones_is_named():
    """World 4, rank 3 absent: the flags kernels poll every peer's flag at once; ranks 0-2 each
    see two peers arrive and must name exactly the one that did not."""
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_missing_peer_worker, 4, tmp, "p2p-sim", 3, timeout=200, env=SIM)
    for rank in range(3):
        assert res[rank] is not None, f"rank {rank} did not raise CollectiveTimeoutError"
        missing, text = res[rank]
        assert missing == [3] and "dispatch" in text, (rank, text)


def _errors_worker(rank, world, tmp):
    import torch.distributed as dist

    from llmcomm.errors import ConfigMismatchError
    from llmcomm.moe import EPDispatcher
    from llmcomm.moe.backends import TorchA2ABackend
    from llmcomm.moe.reference import check_combine_output, reference_combine

    seen = {}

    def expect(name, exc, fn):
        try:
            fn()
        except exc as e:
            seen[name] = str(e)
            return
        raise AssertionError(f"{name}: no {exc.__name__} raised")

    ep = _make("torch", 2, 5, tmp)
    x, ids, w = torch.randn(3, H), torch.tensor([[0, 1], [2, 7], [5, 5]]), torch.rand(3, 2)
    expect("too_many_tokens", ValueError, lambda: ep.dispatch(torch.randn(6, H),
                                                              torch.zeros(6, 2, dtype=torch.long),
                                                              torch.rand(6, 2)))
    expect("ids_float", TypeError, lambda: ep.dispatch(x, ids.float(), w))
    expect("weights_int", TypeError, lambda: ep.dispatch(x, ids, ids))
    expect("ids_range", ValueError, lambda: ep.dispatch(x, ids + 3, w))
    expect("ids_negative", ValueError, lambda: ep.dispatch(x, ids - 1, w))
    expect("dtype", TypeError, lambda: ep.dispatch(x.double(), ids, w))
    expect("shape", ValueError, lambda: ep.dispatch(x, ids[:, :1], w))
    expect("warm_counts", ValueError, lambda: ep.warmup([0, 6]))
    expect("warm_ids_dtype", TypeError, lambda: ep.warmup(topk_ids_dtype=torch.float32))
    expect("warm_weights_dtype", TypeError, lambda: ep.warmup(topk_weights_dtype=torch.int32))
    seen["describe_cold"] = ep.describe()
    if rank == 0:   # local: one rank alone, no collective and no call-order entry
        seen["warm_torch"] = ep.warmup()
    seen["describe"] = ep.describe()
    d = ep.dispatch(x, ids, w)
    expect("in_flight", RuntimeError, lambda: ep.dispatch(x, ids, w))
    expect("expert_out_shape", ValueError, lambda: ep.combine(d.expert_x[:1], d))
    expect("expert_out_dtype", TypeError, lambda: ep.combine(d.expert_x.double(), d))
    y = ep.combine(d.expert_x.clone(), d)
    expect("handle_reuse", ValueError, lambda: ep.combine(d.expert_x, d))
    assert y.shape == (3, H)
    pk = _make("torch" + PACKED, 2, 5, tmp)
    d = pk.dispatch(x, ids, w)
    seen["packed_shapes"] = (tuple(d.expert_x.shape), pk.expert_x_shape, repr(pk),
                             pk.describe())
    expect("packed_expert_out_shape", ValueError,
           lambda: pk.combine(torch.zeros(4, 10, H), d))   # the padded shape [L, W*M, H]
    pk.combine(d.expert_x.clone(), d)
    expect("packed_not_bool", TypeError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2, H, 5, torch.float32, packed=1))
    # fp8: creation, then a pair for a dispatcher without fp8, then bad pairs and expert_out
    expect("fp8_not_bool", TypeError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2, 128, 5, torch.float32, fp8=1))
    expect("fp8_hidden", ValueError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2, H, 5, torch.float32, fp8=True))
    expect("fp8_float64", ValueError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2, 128, 5, torch.float64, fp8=True))
    expect("pair_without_fp8", TypeError, lambda: ep.dispatch((x, x), ids, w))
    f8 = _make("torch-fp8", 2, 5, tmp, hidden=128)
    x8 = torch.randn(3, 128)
    q8 = x8.to(torch.float8_e4m3fn)
    expect("pair_q_dtype", TypeError, lambda: f8.dispatch((x8, torch.ones(3, 1)), ids, w))
    expect("pair_scale_dtype", TypeError,
           lambda: f8.dispatch((q8, torch.ones(3, 1, dtype=torch.float64)), ids, w))
    expect("pair_scale_shape", ValueError, lambda: f8.dispatch((q8, torch.ones(3, 2)), ids, w))
    expect("pair_three", TypeError, lambda: f8.dispatch((q8, q8, q8), ids, w))
    d = f8.dispatch(x8, ids, w)
    seen["fp8_result"] = (d.expert_x.dtype, tuple(d.expert_x.shape),
                          tuple(d.expert_x_scale.shape), repr(f8), f8.describe())
    expect("fp8_expert_out_dtype", TypeError,
           lambda: f8.combine(d.expert_x.clone(), d))   # fp8 in: combine wants float32
    f8.combine(torch.zeros(f8.expert_x_shape), d)
    expect("not_divisible", ValueError,
           lambda: EPDispatcher(dist.group.WORLD, 7, 2, H, 5, torch.float32))
    expect("top_k", ValueError, lambda: EPDispatcher(dist.group.WORLD, 8, 9, H, 5, torch.float32))

    # every rank must agree on the fingerprint: rank 1 asks for another top_k
    expect("fingerprint", ConfigMismatchError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2 + rank, H, 5, torch.float32,
                                backend="torch"))

    class NotReduced(TorchA2ABackend):
        output_is_reduced = False  # type: ignore[misc]

    expect("not_reduced_backend", TypeError,
           lambda: EPDispatcher(dist.group.WORLD, E, 2, H, 5, torch.float32,
                                _backend_cls=NotReduced))

    class DoubleReduce(TorchA2ABackend):    # a buggy backend: the caller-side sum done again
        def combine(self, expert_out, state, num_tokens):
            return 2 * super().combine(expert_out, state, num_tokens)

    bad = EPDispatcher(dist.group.WORLD, E, 2, H, 5, torch.float32, _backend_cls=DoubleReduce)
    d = bad.dispatch(x, ids, w)
    y = bad.combine(d.expert_x.clone(), d)              # identity experts
    ref = reference_combine(x, ids, w, expert_fn=lambda e, r: r)
    expect("double_reduce_caught", AssertionError,
           lambda: check_combine_output(y, ref, torch.float32))
    return seen


def test_errors_world2():
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_errors_worker, 2, tmp, timeout=120)
    for seen in res:
        assert "max_tokens_per_rank=5" in seen["too_many_tokens"]
        assert "fp8 must be a bool" in seen["fp8_not_bool"]
        assert "divisible by 128" in seen["fp8_hidden"] and f"got {H}" in seen["fp8_hidden"]
        assert "bf16 / fp16 / fp32" in seen["fp8_float64"]
        assert "fp8=True" in seen["pair_without_fp8"]
        assert "float8_e4m3fn" in seen["pair_q_dtype"] and "float32" in seen["pair_q_dtype"]
        assert "float32 tensor [T, 1]" in seen["pair_scale_dtype"]
        assert "[3, 1]" in seen["pair_scale_shape"] and "[3, 2]" in seen["pair_scale_shape"]
        assert "got 3 items" in seen["pair_three"]
        dt, shape, sshape, text, described = seen["fp8_result"]
        assert dt == torch.float8_e4m3fn and shape == (4, 10, 128) and sshape == (4, 10, 1)
        assert text.endswith(", fp8)") and "fp8 + scales" in described, (text, described)
        assert "must be torch.float32" in seen["fp8_expert_out_dtype"]
        assert "[0, num_experts=8)" in seen["ids_range"]
        assert "previous dispatch" in seen["in_flight"]
        assert "top_k" in seen["fingerprint"] and "rank 1=3" in seen["fingerprint"]
        assert "output_is_reduced=False" in seen["not_reduced_backend"]
        assert "more than once" in seen["double_reduce_caught"]
        assert "divisible" in seen["not_divisible"]
        assert "[0, max_tokens_per_rank=5]" in seen["warm_counts"]
        assert "integer" in seen["warm_ids_dtype"] and "floating" in seen["warm_weights_dtype"]
        # packed: W * M * min(K, L) = 2 * 5 * 2 rows; the padded shape is refused, named
        shape, want, text, described = seen["packed_shapes"]
        assert shape == want == (20, H), (shape, want)
        assert text.endswith("packed)") and f"expert_x [20, {H}] packed" in described, described
        assert f"(20, {H}) ([rows, hidden], packed), got (4, 10, {H})" in \
            seen["packed_expert_out_shape"]
        assert "packed must be a bool" in seen["packed_not_bool"]
    assert res[0]["warm_torch"] == 0      # the torch backend has no kernels of its own
    # E = 8 experts over 2 ranks, capacity 2 x 5, fp32: 4 x 10 x H x 4 bytes
    assert f"expert_x [4, 10, {H}] {4 * 10 * H * 4 / 1e9:.3g} GB" in res[0]["describe"]
    assert "backend:  torch" in res[0]["describe"] and "topology:" in res[0]["describe"]
    assert "warmup:   done (0 kernel variants" in res[0]["describe"]
    assert "warmup:   not called" in res[1]["describe"] and "not called" in res[0]["describe_cold"]


@pytest.mark.parametrize("kw, words", [
    ({"tile_tokens": 3}, "tile_tokens must be a power of 2 in [1, 8], got 3"),
    ({"combine_tile_tokens": 16}, "combine_tile_tokens must be a power of 2 in [1, 8]"),
    ({"round_tokens": 0}, "round_tokens must be an int >= 1, got 0"),
    ({"num_warps": 3}, "num_warps must be a power of 2 <= 16"),
    ({"posted_flags": True}, "inline PTX"),
    ({"num_programs": 0}, "num_programs must be >= 1"),
    ({"protocol": "lamprey"}, "protocol must be 'auto', 'flags' or 'lamport', got 'lamprey'"),
    ({"protocol": "flags", "shift": 0}, "shift applies to protocol='lamport' only"),
    ({"protocol": "flags", "shift": 1}, "shift applies to protocol='lamport' only"),
    ({"protocol": "lamport", "shift": 1}, "shift must be 0 in the TRITON_INTERPRET simulation"),
    ({"protocol": "lamport", "round_tokens": 2},
     "round_tokens and posted_flags apply to protocol='flags' only"),
    ({"protocol": "lamport", "posted_flags": False},
     "round_tokens and posted_flags apply to protocol='flags' only"),
    ({"protocol": "lamport", "tile_tokens": 3}, "tile_tokens must be a power of 2 in [1, 8]"),
    ({"protocol": "lamport", "combine_tile_tokens": 16},
     "combine_tile_tokens must be a power of 2 in [1, 8]"),
    ({"protocol": "lamport", "pdl": True}, "inline PTX"),
    ({"protocol": "lamport", "_thread_spin": True}, "inline PTX"),
    ({"protocol": "lamport", "_meta_spin": True}, "_meta_spin needs _thread_spin"),
    ({"protocol": "lamport", "combine_split": 3}, "combine_split must be a power of 2 in [1, 16]"),
    ({"protocol": "flags", "combine_split": 2}, "combine_split applies to protocol='lamport'"),
    ({"protocol": "lamport", "interleave": True}, "interleave applies to protocol='flags' only"),
    ({"_runtime_rounds": True, "round_tokens": 2},
     "_runtime_rounds needs protocol='flags' with interleave and the default rounds"),
    ({"protocol": "lamport", "_combine_roles": True},
     "_combine_roles needs protocol='flags' at EP=2, got protocol 'lamport'"),
    ({"protocol": "lamport", "_peer_spread": True},
     "_peer_spread needs every program of a grid running at once"),
    ({"protocol": "flags", "_peer_spread": True},
     "_peer_spread needs protocol='lamport' with tile_tokens=1 and shift 0; got protocol "
     "'flags'"),
    ({"protocol": "lamport", "tile_tokens": 2, "_peer_spread": True}, "tile_tokens 2"),
    ({"protocol": "flags", "_early_own": True},
     "_early_own needs protocol='lamport' with tile_tokens=1; got protocol 'flags'"),
    ({"protocol": "lamport", "tile_tokens": 2, "_claim_first": True},
     "_claim_first needs protocol='lamport' with tile_tokens=1; got protocol 'lamport', "
     "tile_tokens 2"),
    ({"protocol": "flags", "_gate": True}, "_gate needs protocol='lamport' with tile_tokens=1"),
    ({"protocol": "flags", "_trace": True}, "_trace needs protocol='lamport'"),
    ({"protocol": "lamport", "_zero_program": 1}, "_zero_program must be an int in [0, 4) (0 in "
     "the simulation), got 1"),
    ({"protocol": "flags", "_direct_counts": True},
     "_direct_counts needs protocol='lamport'; got protocol 'flags'"),
    ({"_ce_tokens": 0}, "_ce_tokens must be an int >= 1 (or None: off), got 0"),
    ({"protocol": "lamport", "_ce_tokens": 8},
     "_ce_tokens needs protocol='flags' at EP=2 with interleave and the default rounds; got "
     "protocol 'lamport'"),
    ({"_ce_tokens": 8, "interleave": False}, "interleave False"),
    ({"_combine_roles": True, "_roles_warps": 3}, "_roles_warps must be a power of 2 <= 16"),
    ({"_combine_roles": True, "_roles_pair": 3}, "_roles_pair (tokens a step) must be 1 or 2"),
    ({"_combine_roles": True, "_roles_programs": 67},
     "_roles_programs must be in [1, 66] (2 x that many programs of 16 warps fit 132 SMs)"),
    # "packed" goes into the EPConfig (EPDispatcher(packed=True)), not to P2PBackend
    ({"packed": True, "protocol": "lamport"},
     "a packed expert_x (EPDispatcher(packed=True)) needs the p2p protocol 'flags'"),
    ({"packed": True, "shift": 0}, "leave protocol and shift unset, or pass protocol='flags'"),
])
def test_p2p_knob_validation(kw, words, tmp_path):
    """Bad P2PBackend knobs are refused before any workspace or collective, naming the fix."""
    import re

    from llmcomm.moe.backends import EPConfig
    from llmcomm.moe.p2p import P2PBackend

    kw = dict(kw)
    fp8 = kw.pop("fp8", False)   # (no entry sets it since session 33: lamport takes fp8 too)
    cfg = EPConfig(rank=0, world_size=2, num_experts=E, top_k=2,
                   hidden_size=128 if fp8 else H, max_tokens_per_rank=4, dtype=torch.float32,
                   device=torch.device("cpu"), packed=kw.pop("packed", False), fp8=fp8)
    with pytest.raises(ValueError, match=re.escape(words)):
        P2PBackend(None, cfg, simulate_dir=str(tmp_path), **kw)


def test_p2p_refuses_an_ep_group_of_one(tmp_path):
    """EP=1 (TP = DP = 1): the p2p kernels pair ranks, so the backend refuses it at creation
    (``auto`` picks torch there: ``resolve_ep_backend``)."""
    from llmcomm.moe.backends import EPConfig
    from llmcomm.moe.p2p import P2PBackend

    cfg = EPConfig(rank=0, world_size=1, num_experts=E, top_k=2, hidden_size=H,
                   max_tokens_per_rank=4, dtype=torch.float32, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="at least 2 ranks .* got 1; use backend='torch'"):
        P2PBackend(None, cfg, simulate_dir=str(tmp_path))


def _concurrent_worker(rank, world, tmp, E_, kw, G, shift, seed, spread=False):
    """The lamport kernels with every program of a grid running concurrently (one thread each,
    ``_interp_threads``), so ``shift != 0`` (program p waits for program p - shift of the peer)
    and GPU-like orderings run on CPU. Consecutive back-to-back calls with changing T (0, M, T
    not a multiple of the tile, ranks with different T), each checked against the reference;
    after every call (both ranks quiescent) every receive slot must be the sentinel again."""
    import torch.distributed as dist

    from llmcomm.moe import EPDispatcher
    from llmcomm.moe.p2p import P2PBackend
    from tests.distributed._interp_threads import install

    install(seed=seed + rank)
    M, K = 9, 3
    ep = EPDispatcher(dist.group.WORLD, E_, K, H, M, torch.float32, _backend_cls=P2PBackend,
                      _backend_kwargs=dict(simulate_dir=tmp, num_programs=G, **kw))
    ep._backend.shift = shift   # the constructor refuses shift != 0 for the sequential sim
    if spread:                  # and _peer_spread (the default at EP > 2 on a GPU)
        ep._backend._spread = True
    seqs = [[M, 5, 2], [3, M, 0], [M, M, M], [1, 0, 7], [7, M, 4], [M, 1, M], [0, 4, 5]]
    errs = []
    for i, toks in enumerate(seqs):
        toks = ((toks + toks[::-1]) * 2)[:world]   # world 4: ranks 0-2 as listed, rank 3 as 2
        inputs = make_inputs(seed * 100 + i, world, toks, E_, K, H, torch.float32,
                             ("random", "dups", "one_expert")[i % 3])
        if i % 2:   # a backend dispatch with no combine (the benchmarks' "dispatch alone"),
            x, ids, w = inputs[rank]   # then the same through the dispatcher: the counts of
            expert_x, counts, _ = ep._backend.dispatch(x, ids, w)   # both from zero
            check_dispatch(rank, world, E_, inputs, expert_x, counts)
        errs.append(roundtrip(ep, rank, world, E_, inputs, torch.float32)[1])
        dist.barrier()
        assert_lamport_sentinel(ep, rank, f"after call {i} (tokens {toks})")
        dist.barrier()
    ep.check_errors()
    return max(errs)


@NEEDS_TRITON
@pytest.mark.parametrize("world, E_, kw, G, shift", [
    (2, 8, {"tile_tokens": 4, "combine_tile_tokens": 2}, 4, 2),   # tiles past M, shift G/2
    (2, 8, {}, 2, 1),                                             # several iterations/program
    (3, 6, {"tile_tokens": 2, "combine_tile_tokens": 4}, 3, 1),   # W=3
    (2, 8, {}, 8, 0),   # own rows placed by the other half of the grid at T <= 4, not above
    (2, 8, {"_early_own": False}, 2, 0),  # own rows after the receive (before session 25)
    (2, 8, {"_claim_first": True}, 8, 0),   # slots claimed before the row's wait
    (2, 8, {"_gate": False}, 8, 0),   # claims and placements masked off, not branched around
    (2, 8, {"_direct_counts": False}, 8, 0),   # counts published by the last program out
    # the peers' tokens spread over the programs (_peer_spread, the default at EP > 2 on a
    # GPU): several units a program (G 2), and one a program with ranks of 0 tokens (G 8)
    (3, 6, {"_peer_spread": True}, 2, 0),
    (4, 8, {"_peer_spread": True}, 8, 0),
], ids=["w2-t4c2-G4s2", "w2-t1-G2s1", "w3-t2c4-G3s1", "w2-t1-G8", "w2-t1-G2-noearly",
        "w2-t1-G8-claim1", "w2-t1-G8-nogate", "w2-t1-G8-nodirect", "w3-t1-G2-spread",
        "w4-t1-G8-spread"])
def test_p2p_sim_lamport_concurrent_programs(world, E_, kw, G, shift):
    kw = dict(kw)
    spread = kw.pop("_peer_spread", False)   # set after construction, as shift
    with tempfile.TemporaryDirectory() as tmp:
        res = run_ranks(_concurrent_worker, world, tmp, E_, {"protocol": "lamport", **kw}, G,
                        shift, 5, spread, timeout=200, env=SIM)
    assert max(res) <= 2e-5
