"""CPU tests of ``benchmarks/stress_moe_p2p.py``'s checks (the tool that hunts intermittent
p2p MoE failures on the GPU): a wrong dispatch names every expert whose count is off, state
left after a call is reported, and the stress loop stops at the first failure with the calls
before it. Its GPU runs are in ``benchmarks/results/s18_20261124_gpu.log``."""

from __future__ import annotations

import types

import torch

from benchmarks.stress_moe_p2p import _check, _state, _stress
from llmcomm.moe.reference import affine_expert, reference_dispatch
from tests.distributed._moe_cases import make_inputs

E, K, H = 16, 3, 32


def _dispatched(inputs, rank=0):
    """What a correct dispatch gives ``rank``: rows by local expert, counts, and the combine
    output computed from them (the affine test experts, weighted, fp64)."""
    ref = reference_dispatch([i for _, i, _ in inputs], E, rank)
    L = E // 2
    ex = torch.full((L, 2 * 8, H), float("nan"))
    counts = torch.zeros(L, dtype=torch.int32)
    for le in range(L):
        for j, (src, t) in enumerate(ref[le]):
            ex[le, j] = inputs[src][0][t]
        counts[le] = len(ref[le])
    x, ids, w = inputs[rank]
    y = torch.zeros(x.shape[0], H, dtype=torch.float64)
    for t in range(x.shape[0]):
        for k in range(K):
            y[t] += w[t, k].double() * affine_expert(int(ids[t, k]), x[t].double())
    return ex, counts, y.float()


def test_check_passes_a_correct_call_and_lists_every_off_expert():
    inputs = make_inputs(5, 2, [6, 7], E, K, H, torch.float32)
    ex, counts, y = _dispatched(inputs)
    assert _check(0, 2, E, inputs, torch.float32, (ex, counts), y) == ""
    bad = counts.clone()
    lo = int(torch.nonzero(bad).flatten()[0])   # an expert with a row: one fewer
    hi = (lo + 3) % len(bad)
    bad[lo] -= 1
    bad[hi] += 1
    msg = _check(0, 2, E, inputs, torch.float32, (ex, bad), y)
    assert f"({lo}, {int(counts[lo]) - 1}, {int(counts[lo])})" in msg, msg
    assert f"({hi}, {int(counts[hi]) + 1}, {int(counts[hi])})" in msg, msg
    y_half = y.clone()
    y_half[0] *= 0.5                            # a contribution missing in the combine
    assert "combine" in _check(0, 2, E, inputs, torch.float32, (ex, counts), y_half)


def test_state_reports_last_out_leftovers():
    idle = types.SimpleNamespace(done=torch.zeros(1, dtype=torch.int32),
                                 cursor=torch.zeros(8, dtype=torch.int32))
    assert _state(idle, 0, lamport=False) == []
    left = types.SimpleNamespace(done=torch.tensor([3], dtype=torch.int32),
                                 cursor=torch.tensor([0, 0, 2, 0], dtype=torch.int32))
    msgs = _state(left, 1, lamport=False)
    assert any("done = 3" in m for m in msgs) and any("[2]: [2]" in m for m in msgs), msgs
    # a packed backend: the count exchange's summed histogram and counter must be back at 0
    packed = types.SimpleNamespace(done=torch.zeros(1, dtype=torch.int32),
                                   cursor=torch.zeros(8, dtype=torch.int32),
                                   cfg=types.SimpleNamespace(packed=True),
                                   hsum=torch.zeros(16, dtype=torch.int32),
                                   hdone=torch.zeros(1, dtype=torch.int32))
    assert _state(packed, 0, lamport=False) == []
    packed.hsum[5] = 2
    msgs = _state(packed, 0, lamport=False)
    assert any("packed exchange state not reset" in m and "[5]" in m for m in msgs), msgs


def test_check_reads_a_packed_dispatch_by_its_offsets():
    """The same correct call, its rows packed (expert l at offsets[l]); a wrong offset fails."""
    from llmcomm.moe.backends import packed_offsets

    inputs = make_inputs(6, 2, [6, 7], E, K, H, torch.float32)
    ex, counts, y = _dispatched(inputs)
    offsets = packed_offsets(counts)
    rows = torch.cat([ex[le, :int(c)] for le, c in enumerate(counts)] + [ex[0, -3:]])
    assert _check(0, 2, E, inputs, torch.float32, (rows, counts, offsets), y) == ""
    shifted = offsets.clone()
    shifted[1:] += 1
    assert _check(0, 2, E, inputs, torch.float32, (rows, counts, shifted), y) != ""


def test_check_reads_an_fp8_dispatch_by_its_scales():
    """The same check of an fp8 dispatch: the rows as the reference quantises them (fp8 bytes
    and scales), the combine of the quantised tokens; one scale off fails it."""
    from llmcomm.moe.reference import dequantize_fp8_blocks, quantize_fp8_blocks

    Hq = 128
    inputs = make_inputs(7, 2, [6, 7], E, K, Hq, torch.float32)
    quant = [quantize_fp8_blocks(x) for x, _, _ in inputs]
    ref = reference_dispatch([i for _, i, _ in inputs], E, 0)
    L = E // 2
    q = torch.zeros(L, 16, Hq, dtype=torch.float8_e4m3fn)
    sc = torch.full((L, 16, 1), float("nan"))
    counts = torch.zeros(L, dtype=torch.int32)
    for le in range(L):
        for j, (src, t) in enumerate(ref[le]):
            q[le, j], sc[le, j] = quant[src][0][t], quant[src][1][t]
        counts[le] = len(ref[le])
    x, ids, w = inputs[0]
    xq = dequantize_fp8_blocks(*quant[0])
    y = sum(w[:, k:k + 1].double() * torch.stack([affine_expert(int(ids[t, k]), xq[t])
                                                  for t in range(x.shape[0])])
            for k in range(K)).float()
    assert _check(0, 2, E, inputs, torch.float32, (q, counts, None, sc), y) == ""
    le = int(torch.nonzero(counts).flatten()[0])
    sc[le, 0] *= 2
    assert "content differs" in _check(0, 2, E, inputs, torch.float32, (q, counts, None, sc), y)


def test_stress_stops_at_the_first_failure_with_its_history():
    seen = []

    def call(inputs):
        seen.append([x.shape[0] for x, _, _ in inputs])
        return "boom" if len(seen) == 7 else ""

    res = _stress("fake", (E, K, H, 13, "float32"), 60.0, 1, call, lambda: [], bool)
    f = res["first_failure"]
    assert res["calls"] == 7 and f["call"] == 6 and f["error"] == "boom", res
    assert f["tokens"] == seen[6] and f["before"] == seen[1:6], (f, seen)
    assert all(0 <= t <= 13 for toks in seen for t in toks)
    # state left after a call is a failure too; the sequence is the seed's, on every rank
    again = _stress("fake", (E, K, H, 13, "float32"), 60.0, 1, lambda i: "",
                    lambda: ["rank 0 done = 1"], bool)
    assert again["calls"] == 1 and again["first_failure"]["state"] == ["rank 0 done = 1"]
    assert again["first_failure"]["tokens"] == seen[0]


def test_replay_runs_the_sentinel_tests_calls_in_order():
    from tests.distributed._moe_cases import sentinel_calls

    seen = []

    def call(inputs):
        seen.append(([x.shape[0] for x, _, _ in inputs], inputs[0][1].clone()))
        return "stop" if len(seen) == 14 else ""

    _stress("fake", (E, K, H, 40, "float32"), 60.0, 1, call, lambda: [], bool, replay=True)
    want = sentinel_calls(40)
    assert [toks for toks, _ in seen] == (want + want)[:14]
    # call i draws make_inputs(70 + i): the same ids each time round
    n = len(want)
    assert torch.equal(seen[1][1], make_inputs(71, 2, want[1], E, K, H, torch.float32)[0][1])
    assert torch.equal(seen[1][1], seen[1 + n][1])


def test_free_running_check_names_off_counts_and_a_wrong_combine():
    """``--loopback --free`` (and the free-running PDL GPU test) check each call after its
    batch from copies of ``counts`` and of the combine output with identity experts
    (``check_identity_call``): a correct call passes, an expert one row short is named with
    both counts, a combine that lost a token's contribution fails."""
    from tests.distributed._moe_cases import check_identity_call

    inputs = make_inputs(9, 2, [5, 3], E, K, H, torch.float32)
    _, counts, _ = _dispatched(inputs, rank=1)
    x, ids, w = inputs[1]
    y = (w.double().sum(dim=1, keepdim=True) * x.double()).float()   # identity experts
    assert check_identity_call(1, E, torch.float32, inputs, counts, y) == ""
    bad = counts.clone()
    lo = int(torch.nonzero(bad).flatten()[0])
    bad[lo] -= 1
    msg = check_identity_call(1, E, torch.float32, inputs, bad, y)
    assert f"({lo}, {int(counts[lo]) - 1}, {int(counts[lo])})" in msg, msg
    y_bad = y.clone()
    y_bad[1] = 0.0
    assert "combine" in check_identity_call(1, E, torch.float32, inputs, counts, y_bad)
