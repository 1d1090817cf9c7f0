"""TPCommunicator with the torch backend on gloo, world sizes 1, 2 and 4, vs the fp32 reference."""

import pytest
import torch

from llmcomm import reference
from tests._dist import run_ranks

HIDDEN = 40


def _inputs(world, tokens, dtype, seed):
    """Every rank's input, drawn from a shared seed so each rank can compute the reference."""
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(tokens, HIDDEN, generator=g).to(dtype) for _ in range(world)]
    residual = torch.randn(tokens, HIDDEN, generator=g).to(dtype)
    weight = (torch.rand(HIDDEN, generator=g) + 0.5).to(dtype)
    return xs, residual, weight


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def _fused_worker(rank, world, dtype, tokens_list):
    import llmcomm

    comm = llmcomm.TPCommunicator(torch.distributed.group.WORLD, HIDDEN, dtype, max_tokens=64,
                                  backend="auto")
    assert comm.decision.choice == "torch"
    errs = []
    for i, tokens in enumerate(tokens_list):
        xs, residual, weight = _inputs(world, tokens, dtype, seed=100 + i)
        out = comm.all_reduce(xs[rank])
        errs.append(_rel(out, reference.all_reduce(xs)))
        normed, r_out = comm.all_reduce_add_rms_norm(xs[rank], residual, weight, 1e-6)
        ref_n, ref_r = reference.all_reduce_add_rms_norm(xs, residual, weight, 1e-6,
                                                         acc_dtype=torch.float64)
        errs += [_rel(normed, ref_n), _rel(r_out, ref_r)]
        scale = torch.tensor(0.02, dtype=torch.float32)
        q, r2, n2 = comm.all_reduce_add_rms_norm(xs[rank], residual, weight, 1e-6, quant_scale=scale)
        ref_q, _, _ = reference.all_reduce_add_rms_norm(xs, residual, weight, 1e-6, scale)
        assert q.dtype == torch.float8_e4m3fn
        errs.append(_rel(q.float(), ref_q.float()))
        assert torch.equal(r2, r_out) and torch.equal(n2, normed)
    return {"errs": errs, "out": out, "normed": normed, "decision": str(comm.decision)}


@pytest.mark.parametrize("world", [1, 2, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_reference(world, dtype):
    results = run_ranks(_fused_worker, world, dtype, [1, 7, 33, 64], timeout=120)
    tol = 1e-5 if dtype == torch.float32 else 8e-3
    for r in results:
        assert max(r["errs"][:3]) < tol, r["errs"]
        assert max(r["errs"]) < 0.07, r["errs"]  # fp8 e4m3 carries 3 mantissa bits
    # every rank holds identical results
    for r in results[1:]:
        assert torch.equal(r["out"], results[0]["out"])
        assert torch.equal(r["normed"], results[0]["normed"])


def _bad_input_worker(rank, world):
    import llmcomm

    comm = llmcomm.TPCommunicator(torch.distributed.group.WORLD, HIDDEN, torch.float32, 8,
                                  backend="torch")
    x = torch.randn(4, HIDDEN)
    res, w = torch.randn(4, HIDDEN), torch.rand(HIDDEN)
    cases = {
        "dtype": lambda: comm.all_reduce(x.half()),
        "rank3": lambda: comm.all_reduce(x.view(2, 2, HIDDEN)),
        "hidden": lambda: comm.all_reduce(torch.randn(4, HIDDEN + 8)),
        "noncontig": lambda: comm.all_reduce(torch.randn(HIDDEN, 4).t()),
        "capacity": lambda: comm.all_reduce(torch.randn(9, HIDDEN)),
        "notensor": lambda: comm.all_reduce([1.0]),
        "weight": lambda: comm.all_reduce_add_rms_norm(x, res, torch.rand(HIDDEN + 1)),
        "residual": lambda: comm.all_reduce_add_rms_norm(x, res[:3], w),
        "scale": lambda: comm.all_reduce_add_rms_norm(x, res, w, quant_scale=0.5),
        "scale_shape": lambda: comm.all_reduce_add_rms_norm(x, res, w,
                                                            quant_scale=torch.ones(2)),
    }
    msgs = {}
    for name, fn in cases.items():
        try:
            fn()
        except (TypeError, ValueError) as e:
            msgs[name] = (type(e).__name__, str(e))
        else:
            msgs[name] = ("no error", "")
    return msgs


def test_bad_inputs_raise_clear_errors():
    msgs = run_ranks(_bad_input_worker, 2, timeout=60)[0]
    assert msgs["dtype"][0] == "TypeError" and "torch.float32" in msgs["dtype"][1]
    assert msgs["rank3"][0] == "ValueError" and "x.view(-1, 40)" in msgs["rank3"][1]
    assert msgs["hidden"][0] == "ValueError" and "[tokens, 40]" in msgs["hidden"][1]
    assert msgs["noncontig"][0] == "ValueError" and ".contiguous()" in msgs["noncontig"][1]
    assert msgs["capacity"][0] == "ValueError" and "max_tokens>=9" in msgs["capacity"][1]
    assert msgs["notensor"][0] == "TypeError"
    assert msgs["weight"][0] == "ValueError" and "[40]" in msgs["weight"][1]
    assert msgs["residual"][0] == "ValueError"
    assert msgs["scale"][0] == "TypeError"
    assert msgs["scale_shape"][0] == "ValueError" and "one element" in msgs["scale_shape"][1]


def _layout_worker(rank, world):
    import llmcomm

    layout = llmcomm.ParallelLayout(tp=2, pp=2)
    groups = layout.create_groups()
    comm = llmcomm.TPCommunicator(groups.tp, HIDDEN, torch.float32, 16, layout=layout)
    xs, residual, weight = _inputs(2, 5, torch.float32, seed=7 + groups.ranks["tp"][0])
    tp_rank = groups.ranks["tp"].index(rank)
    out = comm.all_reduce(xs[tp_rank])
    return {"tp": groups.ranks["tp"], "err": _rel(out, reference.all_reduce(xs)),
            "fusion": str(comm.fusion)}


def test_pp2_tp2_groups_reduce_within_their_tp_group():
    results = run_ranks(_layout_worker, 4, timeout=120)
    assert [r["tp"] for r in results] == [[0, 1], [0, 1], [2, 3], [2, 3]]
    assert all(r["err"] < 1e-6 for r in results)
