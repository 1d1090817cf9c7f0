"""GPU tests of the p2p allreduce backend (2 GPUs with NVLink peer access).

One process pair per test (spawn + compile is the expensive part); each worker loops over many
cases and returns its failures. Inputs are fresh random data from a seed shared by the ranks, so
each rank computes the fp32 reference of every rank's input locally; outputs are poisoned (NaN)
before every run; results must match the reference within bf16/fp16/fp32 rounding and be
bitwise identical across ranks.
"""

from __future__ import annotations

import importlib.util

import pytest

from tests._dist import run_ranks

pytestmark = [pytest.mark.gpu2,
              pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                 reason="triton is not installed")]

STRATEGIES = ("lamport", "oneshot", "twoshot")
TOL = {"bfloat16": 4e-3, "float16": 1e-3, "float32": 1e-5}


def _inputs(torch, seed, world, T, H, dtype, dev):
    g = torch.Generator(device=dev).manual_seed(seed)
    xs = [torch.randn(T, H, generator=g, device=dev, dtype=torch.float32).to(dtype)
          for _ in range(world)]
    res = torch.randn(T, H, generator=g, device=dev, dtype=torch.float32).to(dtype)
    w = (torch.rand(H, generator=g, device=dev) + 0.5).to(dtype)
    return xs, res, w


def _rel(torch, a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("inf")
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _run_case(torch, dist, group, be, rank, world, pattern, T, H, dtype, seed, scale, dev):
    """One call; returns (list of failure strings, outputs tuple)."""
    from llmcomm import reference

    xs, res, w = _inputs(torch, seed, world, T, H, dtype, dev)
    x = xs[rank]
    nan = float("nan")
    out = torch.full((T, H), nan, device=dev, dtype=dtype)
    rout = torch.full((T, H), nan, device=dev, dtype=dtype)
    q = torch.full((T, H), nan, device=dev, dtype=torch.float32).to(torch.float8_e4m3fn)
    fails = []
    if pattern == "ar":
        be.all_reduce(x, out)
        outs = (out,)
    elif pattern == "norm":
        be.all_reduce_add_rms_norm(x, res, w, 1e-6, out, rout)
        outs = (out, rout)
    else:
        be.all_reduce_add_rms_norm(x, res, w, 1e-6, out, rout, quant_scale=scale, fp8_out=q)
        outs = (out, rout, q)
    be.check_errors()
    tol = TOL[str(dtype).split(".")[-1]]
    tag = f"{pattern} T={T} H={H} {dtype} {be.strategy(T)}"
    if pattern == "ar":
        ref = reference.all_reduce(xs)
        if (e := _rel(torch, out, ref.float())) > tol:
            fails.append(f"{tag}: out rel err {e:.2e}")
    else:
        got = reference.all_reduce_add_rms_norm(xs, res, w, 1e-6,
                                                scale if pattern == "fp8" else None)
        ref_n, ref_r = (got[0], got[1]) if pattern == "norm" else (got[2], got[1])
        if (e := _rel(torch, rout, ref_r.float())) > tol:
            fails.append(f"{tag}: residual_out rel err {e:.2e}")
        if (e := _rel(torch, out, ref_n.float())) > tol:
            fails.append(f"{tag}: normed rel err {e:.2e}")
        if pattern == "fp8":
            if (e := _rel(torch, q.float(), got[0].float())) > 3e-2:
                fails.append(f"{tag}: fp8 rel err {e:.2e}")
    for o in outs:  # bitwise identical across ranks
        bits = o.view(torch.uint8).contiguous()
        allb = torch.empty((world,) + tuple(bits.shape), dtype=torch.uint8, device=dev)
        dist.all_gather_into_tensor(allb, bits, group=group)
        if not all(torch.equal(allb[0], allb[r]) for r in range(1, world)):
            fails.append(f"{tag}: outputs differ across ranks")
    return fails, outs


def _make(torch, dist, H, dtype, max_tokens):
    from llmcomm.allreduce.p2p import P2PAllReduceBackend

    group = dist.new_group(ranks=list(range(dist.get_world_size())))
    dev = torch.device("cuda", torch.cuda.current_device())
    return group, P2PAllReduceBackend(group, H, dtype, max_tokens, dev), dev


def _matrix_worker(rank, world, dtype_name, hiddens, tokens, patterns):
    import torch
    import torch.distributed as dist

    dtype = getattr(torch, dtype_name)
    fails = []
    for H in hiddens:
        group, be, dev = _make(torch, dist, H, dtype, max(tokens))
        scale = torch.tensor([0.05], device=dev, dtype=torch.float32)
        for si, strat in enumerate(STRATEGIES):
            be.force_strategy = strat
            for T in tokens:
                if strat == "lamport" and T * H > be.slot_elems:
                    continue
                for pi, pattern in enumerate(patterns):
                    seed = H * 1000003 + T * 101 + si * 11 + pi * 3 + len(dtype_name)
                    f, _ = _run_case(torch, dist, group, be, rank, world, pattern, T, H, dtype,
                                     seed, scale, dev)
                    fails += f
        be.force_strategy = None
        for T in tokens:  # the policy's own choice
            f, _ = _run_case(torch, dist, group, be, rank, world, "norm", T, H, dtype, 7 + T,
                             scale, dev)
            fails += f
        be.close()
    return fails


@pytest.mark.parametrize("dtype_name,hiddens,tokens,patterns", [
    ("bfloat16", (2880, 4096, 5120, 8192), (1, 7, 64, 1000, 4096), ("ar", "norm", "fp8")),
    ("float16", (2880, 8192), (1, 7, 64, 1000), ("ar", "norm", "fp8")),
    ("float32", (64, 4096, 5120), (1, 7, 64, 1000), ("ar", "norm")),  # 64: 2-warp rows
])
def test_p2p_matrix(dtype_name, hiddens, tokens, patterns):
    fails = run_ranks(_matrix_worker, 2, dtype_name, hiddens, tokens, patterns,
                      backend="nccl", timeout=240)
    assert fails == [[], []], "\n".join(sum(fails, [])[:40])


#: non-default LaunchTable knobs (the --sweep entries of benchmarks/bench_allreduce.py)
ALT_TABLES = ({"lamport_chunk_vecs": 2}, {"norm_min_warps": 16},
              {"lamport_max_programs": 256, "norm_max_warps": 4},
              {"norm_max_warps": 8, "flat_block": 2048, "flat_warps": 4},
              {"oneshot_max_programs": 132, "twoshot_max_programs": 64},
              {"lamport_rows_min_tiles": 1, "lamport_rows_wide_tiles": 0},
              {"lamport_rows_min_tiles": 1, "lamport_lag": 2, "lamport_max_programs": 256,
               "norm_max_warps": 4})


def _table_worker(rank, world):
    import torch
    import torch.distributed as dist

    from llmcomm.allreduce.p2p import LaunchTable

    fails = []
    for H in (4096, 8192):
        group, be, dev = _make(torch, dist, H, torch.bfloat16, 1000)
        scale = torch.tensor([0.05], device=dev, dtype=torch.float32)
        for ti, knobs in enumerate(ALT_TABLES):
            be.table = LaunchTable(**knobs)
            for si, strat in enumerate(STRATEGIES):
                be.force_strategy = strat
                for T in (1, 64, 256, 1000):
                    if strat == "lamport" and T * H > be.slot_elems:
                        continue
                    for pi, pattern in enumerate(("ar", "norm", "fp8")):
                        seed = H * 7 + T * 13 + ti * 101 + si * 11 + pi
                        f, _ = _run_case(torch, dist, group, be, rank, world, pattern, T, H,
                                         torch.bfloat16, seed, scale, dev)
                        fails += [f"table {knobs}: {m}" for m in f]
        be.close()
    return fails


def test_p2p_launch_tables():
    """Every strategy stays correct under the non-default launch knobs the sweep times."""
    fails = run_ranks(_table_worker, 2, backend="nccl", timeout=240)
    assert fails == [[], []], "\n".join(sum(fails, [])[:40])


def _graph_worker(rank, world):
    import torch
    import torch.distributed as dist

    from llmcomm import reference

    H, dtype = 4096, torch.bfloat16
    group, be, dev = _make(torch, dist, H, dtype, 1024)
    # chunked Lamport (1, 7 tokens), pipelined rows Lamport (200: one program per row; 1000:
    # 128 programs, several rows each), one-shot, two-shot
    sizes = [(1, "lamport"), (7, "lamport"), (200, "lamport"), (1000, "lamport"),
             (300, "oneshot"), (1000, "twoshot")]
    slots = []
    for i, (T, strat) in enumerate(sizes):
        xs, res, w = _inputs(torch, 100 + i, world, T, H, dtype, dev)
        slots.append({"T": T, "strat": strat, "x": xs[rank].clone(), "res": res.clone(),
                      "w": w.clone(), "out": torch.empty(T, H, device=dev, dtype=dtype),
                      "rout": torch.empty(T, H, device=dev, dtype=dtype)})

    def call(s):
        be.force_strategy = s["strat"]
        be.all_reduce_add_rms_norm(s["x"], s["res"], s["w"], 1e-6, s["out"], s["rout"])

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for s in slots:  # warm every kernel before capture
            call(s)
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    dist.barrier(group)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for i in range(100):
            call(slots[i % len(slots)])
    fails = []
    for rep in range(5):
        refs = []
        for i, s in enumerate(slots):
            xs, res, w = _inputs(torch, 1000 * rep + i, world, s["T"], H, dtype, dev)
            s["x"].copy_(xs[rank]); s["res"].copy_(res); s["w"].copy_(w)
            s["out"].fill_(float("nan")); s["rout"].fill_(float("nan"))
            refs.append(reference.all_reduce_add_rms_norm(xs, res, w, 1e-6))
        torch.cuda.synchronize()
        dist.barrier(group)
        g.replay()
        torch.cuda.synchronize()
        be.check_errors()
        for s, (rn, rr) in zip(slots, refs):
            for name, o, r in (("normed", s["out"], rn), ("residual_out", s["rout"], rr)):
                e = _rel(torch, o, r.float())
                if e > 4e-3:
                    fails.append(f"replay {rep} T={s['T']} {s['strat']} {name}: rel err {e:.2e}")
    # the CaptureError path: an unwarmed kernel during capture must raise, not compile
    from llmcomm.errors import CaptureError
    be.force_strategy = "twoshot"
    x = torch.randn(3, H, device=dev, dtype=dtype)
    g2 = torch.cuda.CUDAGraph()
    raised = False
    try:
        with torch.cuda.graph(g2):
            be.all_reduce(x, torch.empty_like(x))
    except CaptureError:
        raised = True
    except Exception as e:  # noqa: BLE001 - capture machinery may wrap it
        raised = "CaptureError" in repr(e)
    if not raised:
        fails.append("capture of an unwarmed kernel did not raise CaptureError")
    torch.cuda.synchronize()
    be.close()
    return fails


def test_p2p_cuda_graph_replay():
    fails = run_ranks(_graph_worker, 2, backend="nccl", timeout=180)
    assert fails == [[], []], "\n".join(sum(fails, []))


def _missing_peer_worker(rank, world):
    import time

    import torch
    import torch.distributed as dist

    from llmcomm.errors import CollectiveTimeoutError

    H, dtype = 4096, torch.bfloat16
    report = []
    for strat, T in (("lamport", 4), ("lamport", 200), ("oneshot", 64), ("twoshot", 64)):
        group, be, dev = _make(torch, dist, H, dtype, 256)
        be.force_strategy = strat
        x = torch.randn(T, H, device=dev, dtype=dtype)
        out = torch.empty_like(x)
        be.all_reduce(x, out)  # both ranks: one good call
        be.check_errors()
        dist.barrier(group)
        if rank == 0:
            t0 = time.monotonic()
            be.all_reduce(x, out)  # rank 1 skips this call
            try:
                be.check_errors()
                report.append((strat, "no error", None, ""))
            except CollectiveTimeoutError as e:
                report.append((strat, e.missing_ranks, round(time.monotonic() - t0, 1), str(e)))
        dist.barrier(group)
        be.close()
    return report


def test_p2p_missing_peer_times_out():
    got = run_ranks(_missing_peer_worker, 2, backend="nccl", timeout=120,
                    env={"LLMCOMM_TIMEOUT_S": "2"})
    rep = got[0]
    # lamport at 4 tokens: chunked kernel; at 200 tokens: the pipelined rows kernel
    assert [r[0] for r in rep] == ["lamport", "lamport", "oneshot", "twoshot"]
    for strat, missing, _elapsed, msg in rep:
        assert missing == [1], f"{strat}: expected an error naming rank 1, got {missing}: {msg}"
        # the kernel's own bitmask too (not only the host's re-derivation from the flags)
        assert "kernel mask 0x2;" in msg, f"{strat}: the kernel's mask does not name rank 1: {msg}"
