"""Every GPU kernel compiles for Hopper (sm_90) with the installed Triton -- no GPU needed.

The CPU simulation runs the kernels in Triton's interpreter, which never compiles them; a kernel
that a Triton release cannot compile is otherwise found only on the device (session 6: a
loop-carried ``[TB, BLOCK_H]`` row made triton 3.6's ``RemoveLayoutConversions`` abort while 3.9
compiled it). This test compiles the shapes the launchers use by default, down to a cubin
(Triton's bundled ``ptxas``). To check the device image's Triton (3.6) without a device:
``make compile-check`` (``TRITON=<version>`` for another release; a venv of its own). With 3.6
this test fails on the session-5 lamport dispatch (commit 2f9feae) and passes on the fix.

Kernel signatures are spelled out below by argument name; a kernel that gains an argument fails
here with a ``KeyError`` naming it, and its type goes into ``_TYPES``.
"""

from __future__ import annotations

import pytest

triton = pytest.importorskip("triton")

from llmcomm.kernels import LAUNCH_OPTIONS  # noqa: E402

W = 2
#: argument name -> Triton signature type (tuples: one pointer per rank of the group)
_TYPES = {
    # MoE
    "x_ptr": "*bf16", "ids_ptr": "*i64", "w_ptr": "*fp32", "y_ptr": "*bf16", "T": "i32",
    "expert_out": "*bf16", "expert_x": "*bf16", "counts": "*i32", "cursor": "*i32",
    "done": "*i32", "slot_map": "*i32", "wloc": "*fp32", "peer_T": "*i32", "buf_ptr": "*i32",
    "epoch_ptr": "*i32", "err_dev": "*i32", "err_host_addr": "i64", "timeout_ns": "i64",
    "recv_x": ("*bf16",) * W, "recv_ids": ("*i32",) * W, "recv_w": ("*fp32",) * W,
    "recv_T": ("*i32",) * W, "flags": ("*i32",) * W, "ce_flag": ("*i32",) * W,
    "ce_next": "*i32", "comb": ("*bf16",) * W,
    "lx": ("*bf16",) * W, "lmeta": ("*i32",) * W, "lcnt": ("*i32",) * W,
    "lcomb": ("*bf16",) * W, "hist": ("*i32",) * W, "hflag": ("*i32",) * W, "hepoch": "*i32",
    "offsets": "*i32", "hsum": "*i32",
    # allreduce + epilogue
    "res_ptr": "*bf16", "out_ptr": "*bf16", "rout_ptr": "*bf16", "q_ptr": "*fp8e4nv",
    "scale_ptr": "*fp32", "state_ptr": "*i32", "s_ptr": "*bf16", "eps": "fp32", "H": "i32",
    "peers_ptr": "i64", "host_err_ptr": "i64", "lamp_off": "i64", "slot_elems": "i64",
    "flag_off": "i64", "stage_off": "i64", "msg_elems": "i64",
}
_MOE = dict(RANK=0, W=W, G=128, H=7168, K=8, L=128, E=256, BLOCK_H=8192, BLOCK_K=8,
            BLOCK_L=128, BLOCK_W=2, TB=1, USE_TIMER=True, PDL=False, NT=512, CLAIM_RB=0,
            RT=False)
_AR = dict(RANK=1, W=W, NORM=True, FP8=False, BLOCK=8192, PDL=True, NT=512)
_FLAGS = dict(_MOE, M=4096, CHUNK=8, POSTED=True, INTERLEAVE=True, FUSE=True, CE=False, CE_MIN=0)
_LAMPORT = dict(_MOE, BITS=16, NBUF=3, SHIFT=0, TSPIN=True, MSPIN=False,
                SPREAD=False, EARLY=False, CLAIM1=False, GATE=False, TRACE=False,
                trace=None, DIRECT=False, ZP=0, zflag=None, QW=0)

def _dispatch(num_warps, **variant):
    """A lamport dispatch case (M 128, CAP 256) at ``num_warps`` (``NT`` to match) with the
    ``variant`` constexprs (a ``"*i64"``-like string: a pointer argument of that type)."""
    return ("moe", "ep_dispatch_lamport_kernel",
            dict(_LAMPORT, M=128, CAP=256, NT=32 * num_warps, **variant), num_warps)


#: (module, kernel, constexprs, num_warps): the launchers' defaults at hidden 7168, EP/TP = 2
CASES = {
    "moe-flags-dispatch": ("moe", "ep_dispatch_kernel", dict(_FLAGS, CAP=8192, CLAIM_RB=8), 16),
    "moe-flags-dispatch-rt": ("moe", "ep_dispatch_kernel",
                              dict(_FLAGS, CAP=8192, CLAIM_RB=8, RT=True), 16),
    "moe-flags-dispatch-r32": ("moe", "ep_dispatch_kernel", dict(_FLAGS, CAP=8192, CHUNK=32),
                               16),
    "moe-flags-dispatch-ce": ("moe", "ep_dispatch_kernel",
                              dict(_FLAGS, CAP=8192, CLAIM_RB=8, CE=True, CE_MIN=1024),
                              16),
    "moe-flags-dispatch-phased": ("moe", "ep_dispatch_kernel",
                                  dict(_FLAGS, CAP=8192, INTERLEAVE=False, FUSE=False), 16),
    "moe-flags-packed-offsets": ("moe", "ep_packed_offsets_kernel",
                                 dict(_FLAGS, CAP=8192 + 127, ALIGN=128, BT=32, BLOCK_E=256,
                                      NT=128), 4),
    # the fp8 dispatch's wire rows at hidden 7168: 3696 bf16 elements (7168 fp8 bytes and 56
    # float32 scales), and its quantisation kernel (launcher: llmcomm.moe.fp8)
    "moe-flags-dispatch-fp8": ("moe", "ep_dispatch_kernel",
                               dict(_FLAGS, CAP=8192, CLAIM_RB=8, H=3696, BLOCK_H=4096), 16),
    "fp8-block-quant": ("quant", "fp8_block_quant_kernel",
                        dict(H=7168, Q_STRIDE=7392, S_STRIDE=1848, BB=8, s_ptr="*fp32"), 4),
    "moe-flags-combine": ("moe", "ep_combine_kernel", _FLAGS, 16),
    "moe-flags-combine-rt": ("moe", "ep_combine_kernel", dict(_FLAGS, RT=True), 16),
    "moe-flags-combine-t2-h4096": ("moe", "ep_combine_kernel",
                                   dict(_FLAGS, H=4096, BLOCK_H=4096, TB=2), 16),
    "moe-flags-combine-roles-w16p1": ("moe", "ep_combine_roles_kernel",
                                      dict(_MOE, M=4096, CHUNK=8, POSTED=True, NT=512,
                                           PAIR=1), 16),
    "moe-flags-combine-roles": ("moe", "ep_combine_roles_kernel",
                                dict(_MOE, M=4096, CHUNK=8, POSTED=True, NT=256, PAIR=2), 8),
    "moe-flags-combine-phased": ("moe", "ep_combine_kernel",
                                 dict(_FLAGS, INTERLEAVE=False, FUSE=False), 16),
    "moe-lamport-dispatch": _dispatch(16),
    "moe-lamport-dispatch-t2": _dispatch(16, TB=2, SHIFT=64),
    "moe-lamport-dispatch-mspin-w8": _dispatch(8, MSPIN=True),
    "moe-lamport-dispatch-spread-mspin-w8": _dispatch(8, MSPIN=True, SPREAD=True),
    "moe-lamport-dispatch-spread": _dispatch(16, SPREAD=True),
    "moe-lamport-dispatch-early": _dispatch(16, EARLY=True),
    "moe-lamport-dispatch-early-mspin-w8": _dispatch(8, MSPIN=True, EARLY=True),
    "moe-lamport-dispatch-gate": _dispatch(16, EARLY=True, GATE=True),
    "moe-lamport-dispatch-gate-mspin-w8": _dispatch(8, MSPIN=True, EARLY=True, GATE=True),
    "moe-lamport-dispatch-gate-spread-w8": _dispatch(8, MSPIN=True, SPREAD=True, GATE=True),
    "moe-lamport-dispatch-direct-mspin-w8": _dispatch(8, MSPIN=True, EARLY=True, GATE=True,
                                                      DIRECT=True, ZP=32, zflag="*i32"),
    "moe-lamport-dispatch-direct": _dispatch(16, EARLY=True, DIRECT=True, zflag="*i32"),
    "moe-lamport-dispatch-direct-t2": _dispatch(16, TB=2, SHIFT=64, DIRECT=True,
                                                zflag="*i32"),
    "moe-lamport-dispatch-trace": _dispatch(16, EARLY=True, TRACE=True, trace="*i64"),
    "moe-lamport-dispatch-trace-mspin-w8": _dispatch(8, MSPIN=True, GATE=True, TRACE=True,
                                                     trace="*i64"),
    "moe-lamport-dispatch-claim1": _dispatch(16, CLAIM1=True),
    "moe-lamport-dispatch-claim1-mspin-w8": _dispatch(8, MSPIN=True, CLAIM1=True),
    "moe-lamport-dispatch-notspin": _dispatch(16, TSPIN=False),
    # the fp8 dispatch's wire rows (as moe-flags-dispatch-fp8) through lamport (session 33),
    # at the small-batch warps with the default small-batch variants
    "moe-lamport-dispatch-fp8-w8": _dispatch(8, H=3696, BLOCK_H=4096, MSPIN=True, GATE=True,
                                             DIRECT=True, zflag="*i32", QW=3584),
    "moe-lamport-dispatch-fp8-t2": _dispatch(16, TB=2, H=3696, BLOCK_H=4096, QW=3584),
    "moe-lamport-dispatch-m4096": ("moe", "ep_dispatch_lamport_kernel",
                                   dict(_LAMPORT, M=4096, CAP=8192), 16),
    "moe-lamport-combine-split4": ("moe", "ep_combine_lamport_kernel",
                                   dict(_LAMPORT, M=128, SPLIT=4), 16),
    "moe-lamport-combine-split1": ("moe", "ep_combine_lamport_kernel",
                                   dict(_LAMPORT, M=128, SPLIT=1), 16),
    "moe-lamport-combine-split4-w8": ("moe", "ep_combine_lamport_kernel",
                                      dict(_LAMPORT, M=128, SPLIT=4, NT=256), 8),
    "moe-lamport-combine-notspin": ("moe", "ep_combine_lamport_kernel",
                                    dict(_LAMPORT, M=128, SPLIT=4, TSPIN=False), 16),
    "ar-lamport": ("allreduce", "lamport_kernel", dict(_AR, CHUNK=8 * 512, ELEM_BITS=16), 16),
    "ar-lamport-rows-fp8": ("allreduce", "lamport_rows_kernel",
                            dict(_AR, FP8=True, LAG=1, ELEM_BITS=16), 16),
    "ar-oneshot": ("allreduce", "oneshot_kernel", _AR, 16),
    "ar-twoshot": ("allreduce", "twoshot_kernel", dict(_AR, NORM=False, BLOCK=4096, NT=256), 8),
    "epilogue": ("epilogue", "add_rms_norm_kernel", dict(FP8=True, BLOCK=8192), 16),
}


def _cuda_target():
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as e:   # a Triton without the compiler API this test uses
        pytest.skip(f"triton {triton.__version__}: {e}")
    return ASTSource, GPUTarget("cuda", 90, 32)


@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_compiles_for_sm90(case):
    import importlib

    modname, kname, consts, num_warps = CASES[case]
    fn = getattr(importlib.import_module(f"llmcomm.kernels.{modname}"), kname)
    k = _compile(fn, consts, _TYPES, num_warps)
    assert "ld.global" in k.asm["ptx"] or "ld.volatile" in k.asm["ptx"]


def _launch_attrs(fn, sig):
    """The specialisation a launch gives its arguments on a GPU: 16-byte divisibility of every
    pointer (each element of a tuple of pointers too) and of the i64 scalars (the launchers'
    buffers and sizes all are). Without it triton cannot prove a row's alignment and the PTX
    moves rows by scalar 2-byte loads and stores that no launch runs (session 28)."""
    attrs = {}
    for i, name in enumerate(fn.arg_names):
        ty = sig[name]
        for path, t in (((i, j), tj) for j, tj in enumerate(ty)) if isinstance(ty, tuple) \
                else (((i,), ty),):
            if t.startswith("*") or t == "i64":
                attrs[path] = [["tt.divisibility", 16]]
    return attrs


def _compile(fn, consts, types, num_warps):
    """``fn`` compiled for sm_90 with the constexprs it takes from ``consts``, every other
    argument typed by ``types`` and specialised as a launch would (:func:`_launch_attrs`);
    skips where Triton has no bundled assembler."""
    ASTSource, target = _cuda_target()
    ptrs = {k: v for k, v in consts.items() if isinstance(v, str) and v.startswith("*")}
    types = {**types, **ptrs}   # a pointer given its type here: an argument, not a constexpr
    consts = {k: v for k, v in consts.items() if k in fn.arg_names and k not in ptrs}
    sig = {n: "constexpr" if n in consts else types[n] for n in fn.arg_names}
    return _build(ASTSource(fn, sig, consts, attrs=_launch_attrs(fn, sig)), target,
                  {"num_warps": num_warps, "num_stages": 1})


def _build(src, target, options):
    """``src`` compiled for ``target`` with the launchers' options; skips where Triton has no
    bundled assembler."""
    try:
        return triton.compile(src, target=target, options={**options, **LAUNCH_OPTIONS})
    except RuntimeError as e:
        if "ptxas" in str(e) and "not found" in str(e).lower():   # no bundled assembler
            pytest.skip(str(e))
        raise


@pytest.mark.parametrize("kernel, num_warps, spins", [
    ("ep_combine_lamport_kernel", 8, 1 + 2 + 4), ("ep_combine_lamport_kernel", 16, 1 + 1 + 2),
    ("ep_dispatch_lamport_kernel", 8, 4), ("ep_dispatch_lamport_kernel", 16, 2)])
def test_thread_spin_is_not_duplicated(kernel, num_warps, spins):
    """``TSPIN``: the per-thread spin (inline PTX, impure) must stay one instance per group of
    a thread's elements: when its result needs another layout, triton rematerialises the asm
    there and keeps the original (impure), so every thread would spin twice, and a reset
    store of the other layout could overtake a spin (session 20's prototype did exactly that).
    The combine's three poll sites hold 2048, 4096 and 8192 columns: at 8 warps 8, 16 and 32
    elements a thread (groups of 8), at 16 warps 4, 8 and 16 (groups of 4 and 8); the
    dispatch's one-token receive a row of 8192: 32 or 16 a thread."""
    import importlib

    fn = getattr(importlib.import_module("llmcomm.kernels.moe"), kernel)
    k = _compile(fn, dict(_LAMPORT, M=128, CAP=256, SPLIT=4, NT=32 * num_warps), _TYPES,
                 num_warps)
    assert k.asm["ptx"].count("SPIN:") == spins


@pytest.mark.parametrize("num_warps", [8, 16])
def test_meta_spin_is_not_duplicated(num_warps):
    """``MSPIN``: the count-and-meta spin of the dispatch's one-token receive is one instance
    (the [BLOCK_K] meta holds one element a thread), then the row's groups as without it."""
    from llmcomm.kernels.moe import ep_dispatch_lamport_kernel

    k = _compile(ep_dispatch_lamport_kernel,
                 dict(_LAMPORT, M=128, CAP=256, NT=32 * num_warps, MSPIN=True), _TYPES,
                 num_warps)
    ptx = k.asm["ptx"]
    assert (ptx.count("CNT:"), ptx.count("MSPIN:")) == (1, 1)
    assert ptx.count("\nSPIN:") == 8192 // (32 * num_warps) // 8


@pytest.mark.parametrize("kernel, num_warps", [
    ("ep_dispatch_lamport_kernel", 8), ("ep_dispatch_lamport_kernel", 16),
    ("ep_combine_lamport_kernel", 8), ("ep_combine_lamport_kernel", 16)])
def test_lamport_rows_move_in_16_byte_vectors(kernel, num_warps):
    """With a launch's specialisation every row store of the lamport kernels (own and peer
    rows, expert rows, partials, resets) is a 16-byte vector, and so are the row loads outside
    the spins' re-polls: a mask or index pattern that hid a row's alignment from triton would
    split them into 2-byte accesses (8x the instructions) without failing any other test."""
    import importlib

    fn = getattr(importlib.import_module("llmcomm.kernels.moe"), kernel)
    ptx = _compile(fn, dict(_LAMPORT, M=128, CAP=256, SPLIT=4, NT=32 * num_warps,
                            MSPIN=num_warps <= 8, GATE=num_warps <= 8, EARLY=True,
                            DIRECT=kernel.startswith("ep_dispatch"), zflag="*i32"),
                   _TYPES, num_warps).asm["ptx"]
    assert ptx.count("st.global.v4") > 0 and ptx.count("st.global.b16") == 0
    assert ptx.count("ld.global.b16") + ptx.count("ld.global.nc.b16") == 0


@pytest.mark.parametrize("spread, receives", [(True, 1), (False, 3)])
def test_peer_spread_inlines_one_receive(spread, receives):
    """``SPREAD`` (the default at EP > 2): one receive a program and iteration, whichever peer
    it is from, so the EP=4 dispatch holds one inlined one-token receive (one count-and-meta
    spin) where the peer-by-peer loop holds ``W - 1``."""
    from llmcomm.kernels.moe import ep_dispatch_lamport_kernel

    w4 = {k: (v[0],) * 4 if isinstance(v, tuple) else v for k, v in _TYPES.items()}
    k = _compile(ep_dispatch_lamport_kernel,
                 dict(_LAMPORT, W=4, BLOCK_W=4, L=64, M=128, CAP=256, NT=256, MSPIN=True,
                      SPREAD=spread), w4, 8)
    assert k.asm["ptx"].count("MSPIN:") == receives


#: benchmarks/bench_moe_floor.py's kernels (the data-movement floor and its ladder), by argument
_FLOOR_TYPES = {"x": "*bf16", "peer_recv": "*bf16", "my_recv": "*bf16", "expert_x": "*bf16",
                "slot_own": "*i64", "slot_peer": "*i64", "ids_own": "*i32", "ids_peer": "*i32",
                "cursor": "*i32", "flag": "*i32", "T": "i32", "expert_out": "*bf16",
                "w": "*fp32", "peer_comb": "*bf16", "my_comb": "*bf16", "y": "*bf16",
                "ids": "*i64", "recv_w": ("*fp32",) * W, "comb": ("*bf16",) * W,
                "slot_map": "*i32"}
_FLOOR = dict(H=7168, K=8, BLOCK_H=8192, BLOCK_K=8, G=128, NT=512, ROUND=8)


@pytest.mark.parametrize("which, consts", [
    ("dispatch", dict(RANK=1, L=128, CAP=8192, WIRE=1, LOCAL=1, VEC=0, ATOMIC=0, PHASED=0,
                      FENCE=0)),
    ("dispatch", dict(RANK=1, L=128, CAP=8192, WIRE=1, LOCAL=1, VEC=1, ATOMIC=1, PHASED=1,
                      FENCE=1)),
    ("dispatch", dict(RANK=1, L=128, CAP=8192, WIRE=1, LOCAL=1, VEC=1, ATOMIC=1, PHASED=0,
                      FENCE=1)),
    ("combine", dict(VEC=1, PHASED=1, FENCE=1)),
    ("combine", dict(VEC=1, PHASED=0, FENCE=1)),
    ("combine_token", dict(RANK=1, M=4096, L=128, E=256, FENCE=1, LAGGED=0)),
    ("combine_token", dict(RANK=1, M=4096, L=128, E=256, FENCE=1, LAGGED=1)),
], ids=["d-floor", "d-ladder-top", "d-interleaved-fence", "c-ladder-top", "c-interleaved-fence",
        "c-token-fence", "c-token-lagged-fence"])
def test_floor_benchmark_kernels_compile(which, consts):
    """The floor benchmark is run only on a device: its kernels must compile before one is
    spent on it (the same sm_90 compilation as above)."""
    from benchmarks.bench_moe_floor import _kernels

    fn = _kernels()[("dispatch", "combine", "combine_token").index(which)]
    _compile(fn, dict(_FLOOR, **consts), _FLOOR_TYPES, 16)


@pytest.mark.parametrize("kind, pdl", [("sum8", False), ("all_threads", False),
                                       ("atomic8", False), ("first8", False),
                                       ("row_sum", False), ("poll_row", False), ("alu", True),
                                       ("nt_vload", False), ("atomic_nt_vload", False),
                                       ("atomic_nt_then_vload", False)])
def test_chain_probe_kernel_compiles(kind, pdl):
    """``benchmarks/probe_chain_cost.py`` prices the small-batch kernels' dependent steps on a
    device: its kernel must compile first (the kinds with reductions, atomics and asm, and its
    PDL variant)."""
    from benchmarks.probe_chain_cost import KINDS, _kernel

    k = _compile(_kernel(), dict(KIND=KINDS.index(kind), BLOCK_K=8, NT=256, BLOCK_H=8192,
                                 PDL=pdl),
                 {"buf": "*i32", "cnt": "*i32", "row_ptr": "*i32", "out": "*i32", "R": "i32"},
                 8)
    assert "ld.global" in k.asm["ptx"]


@pytest.mark.parametrize("name", ["row", "claim", "serial", "split"])
def test_warp_specialised_claim_probe_compiles(name):
    """``benchmarks/probe_ws_claim.py`` (Gluon) times a receive step's claim and row wait in
    one partition and in two (a worker warp claims): its kernels must compile for sm_90, the
    ``split`` one with its mbarrier hand-over and the ``serial`` one with the claim's atomic
    ahead of the row's volatile vector loads."""
    gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")
    from benchmarks.probe_ws_claim import _kernels

    _, target = _cuda_target()
    sig = {"cnt": "*i32", "row_ptr": "*bf16", "out": "*i32", "R": "i32", "BLOCK": "constexpr"}
    fn = _kernels()[name]
    src = gluon_runtime.GluonASTSource(fn, sig, constexprs={"BLOCK": 8192},
                                       attrs=_launch_attrs(fn, sig))
    ptx = _build(src, target, {"num_warps": 4}).asm["ptx"]
    assert ("mbarrier" in ptx) == (name == "split")
    if name == "serial":   # as the dispatch: the claim's atomic, then the row's loads
        assert ptx.index("atom.global") < ptx.index("ld.volatile.global.v4")


@pytest.mark.parametrize("both", [False, True], ids=["one-way", "two-way"])
@pytest.mark.parametrize("name", ["serial", "split", "split2", "serial_t", "split_t"])
def test_warp_specialised_receive_probe_compiles(name, both):
    """``benchmarks/probe_ws_recv.py`` (Gluon, session 29) times a whole one-token exchange
    with the receive in one partition and in two: its kernels must compile for sm_90, the
    split ones with their mbarrier hand-overs, each receiver with one slot atomic and the
    row's volatile vector loads."""
    gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")
    from benchmarks.probe_ws_recv import _kernels

    _, target = _cuda_target()
    ptrs = {n: "*i32" for n in ("ids_src", "meta", "cursor", "slot_map", "err")}
    consts = dict(H=7168, K=8, L=8, CAP=64, BLOCK_H=8192, BLOCK_K=8, BOTH=both)
    sig = {"x": "*bf16", "rowbuf": "*bf16", "expert_x": "*bf16", **ptrs,
           **{k: "constexpr" for k in consts}}
    fn = _kernels()[name]
    sig = {n: sig[n] for n in fn.arg_names}
    src = gluon_runtime.GluonASTSource(fn, sig, constexprs=consts,
                                       attrs=_launch_attrs(fn, sig))
    ptx = _build(src, target, {"num_warps": 8}).asm["ptx"]
    assert ("mbarrier" in ptx) == (not name.startswith("serial"))
    assert ptx.count("atom.global") == 1 and "ld.volatile.global.v4" in ptx
    if name.endswith("_t"):   # per-thread spins: ids and weights, the row in 4 packs of 8
        assert ptx.count("CHECK:") == 2 + 4


@pytest.mark.parametrize("kind", ["tma", "tma_gl"])
def test_row_store_probe_tma_kernels_compile(kind):
    """``benchmarks/probe_row_stores.py``'s TMA kinds (session 29) store a row by bulk tensor
    copies from shared memory: they must compile for sm_90 with a host tensor descriptor of
    the probe's box."""
    import torch
    from triton.runtime.jit import mangle_type

    from benchmarks import probe_row_stores as probe

    dst = torch.empty(64, 7168, dtype=torch.bfloat16)
    shape, strides, box = [64, 28, 256], [7168, 256, 1], [1, 32, 256]
    consts = dict(H=7168, BLOCK_H=8192, ROWS=4, REPS=2, CW=256)
    if kind == "tma":
        from triton.tools.tensor_descriptor import TensorDescriptor

        fn, desc, make = probe._rows_tma_kernel, TensorDescriptor(dst, shape, strides, box), None
    else:
        gluon_runtime = pytest.importorskip("triton.experimental.gluon._runtime")
        from triton.experimental.gluon import language as gl
        from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

        layout = gl.NVMMASharedLayout(swizzle_byte_width=0, element_bitwidth=16, rank=3)
        fn, desc = probe._gluon_kernel(), TensorDescriptor(dst, shape, strides, box, layout)
        make = gluon_runtime.GluonASTSource
    sig = {"src": "*bf16", "dst": mangle_type(desc), **{k: "constexpr" for k in consts}}
    _, target = _cuda_target()
    if make is None:
        ptx = _compile(fn, {**consts, "src": "*bf16"}, {"dst": sig["dst"]}, 8).asm["ptx"]
    else:
        src = make(fn, sig, constexprs=consts, attrs=_launch_attrs(fn, sig))
        ptx = _build(src, target, {"num_warps": 8}).asm["ptx"]
    n = ptx.count("cp.async.bulk.tensor.3d.global.shared::cta")
    assert n and n % 4 == 0   # the 4 rows of each unrolled token
