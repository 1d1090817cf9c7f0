"""CPU tests of llmcomm.probe with fake ``flashinfer`` / ``flashinfer.comm`` modules.

The fakes mimic FlashInfer's API as it drifted (see docs/flashinfer.md): the current API, the
0.6.8 API (no ``group``), an old unified API (no ``trigger_completion_at_end``), builtins without
signature metadata, ``**kwargs`` wrappers, missing attributes, import errors and a module that
raises at import. ``install_fake`` is also used by ``test_flashinfer_backend.py`` and inside
spawned ranks (so it works without pytest's monkeypatch too).
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import textwrap
import types

import pytest

from llmcomm import probe
from tests._dist import run_ranks

# --------------------------------------------------------------------------- fake FlashInfer

#: every call the fakes receive: (function name, kwargs)
CALLS: list[tuple[str, dict]] = []

_PATTERNS = ["kAllReduce", "kARResidualRMSNorm", "kARResidualRMSNormFP8Quant",
             "kARResidualRMSNormFP4Quant", "kARResidualRMSNormOutFP8Quant",
             "kARResidualRMSNormOutFP4Quant", "kMoEReductionARResidualRMSNorm",
             "kMoEFinalizeARResidualRMSNorm", "kARResidualRMSNormPerTokenGroupFP8PackedQuant",
             "kARResidualRMSNormOutPerTokenGroupFP8PackedQuant",
             "kARResidualRMSNormDynamicFP8Quant", "kARResidualRMSNormOutDynamicFP8Quant"]


def _pattern_class(n: int) -> type:
    """A pseudo-enum of int constants, as FlashInfer's ``AllReduceFusionPattern``."""
    return type("AllReduceFusionPattern", (), {name: i for i, name in enumerate(_PATTERNS[:n])})


class FakeWorkspace:
    def __init__(self, kw: dict) -> None:
        self.kw = kw
        self.destroyed = 0

    def destroy(self) -> None:
        self.destroyed += 1


def _group_of(kw: dict):
    if kw.get("group") is not None:
        return kw["group"]
    cb = kw.get("comm_backend")
    return getattr(cb, "_group", None)


def _create(kw: dict) -> FakeWorkspace:
    CALLS.append(("create_allreduce_fusion_workspace", dict(kw)))
    cb = kw.get("comm_backend")
    if cb is not None:  # exercise the comm backend the way SymmDeviceMemory does
        got = cb.allgather(kw["rank"])
        if got != list(range(kw["world_size"])):
            raise RuntimeError(f"comm_backend.allgather returned {got}")
        token = cb.bcast("token-from-group-rank-0" if cb.Get_rank() == 0 else None, root=0)
        if token != "token-from-group-rank-0":
            raise RuntimeError(f"comm_backend.bcast returned {token!r}")
        cb.barrier()
    ws = FakeWorkspace(kw)
    ws.group = _group_of(kw)
    return ws


def _fusion(kw: dict):
    """CPU semantics of FlashInfer's trtllm kernel (patterns 0, 1, 4) over torch.distributed."""
    import torch
    import torch.distributed as dist

    CALLS.append(("allreduce_fusion", dict(kw)))
    x = kw["input"]
    ws = kw["workspace"]
    s = x.float().clone()
    if dist.is_initialized():
        dist.all_reduce(s, group=ws.group)
    p = kw["pattern"]
    if p == 0:
        kw["output"].copy_(s.to(x.dtype))
        return kw["output"]
    r = (s.to(x.dtype).float() + kw["residual_in"].float()).to(x.dtype)  # rounds twice, as FI
    kw["residual_out"].copy_(r)
    rf = r.float()
    n = rf * torch.rsqrt((rf * rf).mean(-1, keepdim=True) + kw["rms_eps"]) \
        * kw["rms_gamma"].float()
    kw["norm_out"].copy_(n.to(x.dtype))
    if p == 4:
        inv = 1.0 / kw["scale_factor"].float()  # FusedOp: m_scale_factor = 1.f / *scale_factor
        q = (kw["norm_out"].float() * inv).clamp(-448.0, 448.0)
        kw["quant_out"].copy_(q.to(torch.float8_e4m3fn))
    elif p != 1:
        raise ValueError(f"fake supports patterns 0, 1, 4; got {p}")
    return kw["norm_out"]


# exact signatures per API era (the fakes reject unknown keywords, as the real ones do)

def _ws_current(backend="auto", world_size=None, rank=None, max_token_num=None, hidden_dim=None,
                dtype=None, gpus_per_node=None, comm_backend=None, force_oneshot_support=False,
                group=None):
    return _create(dict(locals()))


def _ws_068(backend="auto", world_size=None, rank=None, max_token_num=None, hidden_dim=None,
            dtype=None, gpus_per_node=None, comm_backend=None, force_oneshot_support=False):
    return _create(dict(locals()))


def _ar_current(input, workspace, pattern, launch_with_pdl=False, trigger_completion_at_end=True,
                output=None, residual_out=None, norm_out=None, quant_out=None, scale_out=None,
                residual_in=None, rms_gamma=None, rms_eps=1e-6, scale_factor=None,
                layout_code=None, use_oneshot=None, fp32_acc=False, weight_bias=0.0):
    return _fusion(dict(locals()))


def _ar_060(input, workspace, pattern, launch_with_pdl=False, output=None, residual_out=None,
            norm_out=None, quant_out=None, scale_out=None, residual_in=None, rms_gamma=None,
            rms_eps=1e-6, scale_factor=None, layout_code=None, use_oneshot=None, fp32_acc=False):
    return _fusion(dict(locals()))


class _NoSignature:
    """A callable whose ``__signature__`` raises, like an extension without metadata."""

    def __init__(self, impl, exc: type[Exception]) -> None:
        self._impl = impl
        self._exc = exc

    @property
    def __signature__(self):
        raise self._exc("no signature metadata")

    def __call__(self, **kw):
        return self._impl(kw)


def _kwargs_wrapper(impl):
    def wrapper(*args, **kwargs):  # a decorator without functools.wraps
        return impl(kwargs)
    return wrapper


class _MNNVLWorkspace:
    pass


def make_fake(kind: str) -> tuple[types.ModuleType | None, types.ModuleType | None]:
    """``(flashinfer, flashinfer.comm)`` fakes for one API era; None = import fails."""
    fi = types.ModuleType("flashinfer")
    comm = types.ModuleType("flashinfer.comm")
    fi.comm = comm
    fi.__path__ = []  # a package
    if kind == "current":
        fi.__version__ = "0.6.18"
        comm.create_allreduce_fusion_workspace = _ws_current
        comm.allreduce_fusion = _ar_current
        comm.AllReduceFusionPattern = _pattern_class(12)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "v0610":  # group not yet accepted, torch symm-mem rendezvous on WORLD
        fi.__version__ = "0.6.10"
        comm.create_allreduce_fusion_workspace = _ws_068
        comm.allreduce_fusion = _ar_current
        comm.AllReduceFusionPattern = _pattern_class(8)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "v068":  # like the real 0.6.8.post1: no group, comm_backend, trigger
        fi.__version__ = "0.6.8.post1"
        comm.create_allreduce_fusion_workspace = _ws_068
        comm.allreduce_fusion = _ar_current
        comm.AllReduceFusionPattern = _pattern_class(8)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "old":  # first unified API: no group, no trigger_completion_at_end
        fi.__version__ = "0.6.0"
        comm.create_allreduce_fusion_workspace = _ws_068
        comm.allreduce_fusion = _ar_060
        comm.AllReduceFusionPattern = _pattern_class(6)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "nosig":  # builtins / extensions without signature metadata
        fi.__version__ = "0.6.12"
        comm.create_allreduce_fusion_workspace = _NoSignature(_create, ValueError)
        comm.allreduce_fusion = _NoSignature(_fusion, TypeError)
        comm.AllReduceFusionPattern = _pattern_class(12)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "cbuiltin":  # real C builtins: inspect.signature raises ValueError
        fi.__version__ = "0.6.12"
        comm.create_allreduce_fusion_workspace = getattr
        comm.allreduce_fusion = next
        comm.AllReduceFusionPattern = _pattern_class(8)
    elif kind == "kwargs":  # wrappers that hide the signature behind **kwargs
        fi.__version__ = "0.6.12"
        comm.create_allreduce_fusion_workspace = _kwargs_wrapper(_create)
        comm.allreduce_fusion = _kwargs_wrapper(_fusion)
        comm.AllReduceFusionPattern = _pattern_class(8)
        comm.MNNVLAllReduceFusionWorkspace = _MNNVLWorkspace
    elif kind == "missing":  # comm without the unified API (e.g. 0.5.x)
        fi.__version__ = "0.5.3"
        comm.trtllm_allreduce_fusion = _ar_060
    elif kind == "nopattern":
        fi.__version__ = "0.6.12"
        comm.create_allreduce_fusion_workspace = _ws_current
        comm.allreduce_fusion = _ar_current
    elif kind == "lazyraise":  # module __getattr__ raising something other than AttributeError
        fi.__version__ = "0.6.12"
        comm.create_allreduce_fusion_workspace = _ws_current
        comm.allreduce_fusion = _ar_current
        comm.AllReduceFusionPattern = _pattern_class(8)

        def _getattr(name):
            raise RuntimeError(f"lazy import of {name} failed: libcuda.so.1 not found")
        comm.__getattr__ = _getattr
    elif kind == "noimport":
        return None, None
    elif kind == "nocomm":
        fi.__version__ = "0.6.12"
        return fi, None
    else:
        raise ValueError(f"unknown fake kind {kind!r}")
    return fi, comm


def install_fake(kind: str, monkeypatch=None) -> None:
    """Put the fakes in ``sys.modules`` (None entries make the import raise ImportError)."""
    fi, comm = make_fake(kind)
    for name, mod in (("flashinfer", fi), ("flashinfer.comm", comm)):
        if monkeypatch is not None:
            monkeypatch.setitem(sys.modules, name, mod)
        else:
            sys.modules[name] = mod
    CALLS.clear()


@pytest.fixture
def fake(monkeypatch):
    def use(kind: str) -> probe.FlashInferCapabilities:
        install_fake(kind, monkeypatch)
        return probe.flashinfer(refresh=True)
    yield use
    probe.flashinfer(refresh=True)  # do not leave a fake's answer in the cache


# --------------------------------------------------------------------------- single process

def test_current_api(fake):
    caps = fake("current")
    assert caps.available and caps.agreed and caps.has_allreduce_fusion
    assert caps.version == "0.6.18"
    assert caps.workspace_accepts_group is True
    assert caps.workspace_accepts_comm_backend is True
    assert caps.fusion_accepts_trigger_completion is True
    assert caps.has_mnnvl is True
    assert caps.patterns == tuple(_PATTERNS)
    assert "group" in caps.workspace_params and "fp32_acc" in caps.fusion_params
    assert caps.accepts(probe.FUSION_FN, "use_oneshot") is True
    assert caps.accepts(probe.WORKSPACE_FN, "bogus") is False


def test_068_api_has_no_group(fake):
    caps = fake("v068")
    assert caps.available
    assert caps.workspace_accepts_group is False
    assert caps.workspace_accepts_comm_backend is True
    assert caps.fusion_accepts_trigger_completion is True
    assert "kARResidualRMSNormOutFP8Quant" in caps.patterns
    assert "no `group` parameter" in caps.reason


def test_old_api_has_no_trigger(fake):
    caps = fake("old")
    assert caps.available
    assert caps.workspace_accepts_group is False
    assert caps.fusion_accepts_trigger_completion is False
    assert caps.patterns == tuple(_PATTERNS[:6])
    assert "trigger_completion_at_end" in caps.reason


@pytest.mark.parametrize("kind", ["nosig", "cbuiltin"])
def test_signatureless_builtins_are_unknown(fake, kind):
    caps = fake(kind)
    assert caps.available  # the functions exist; only their keywords are unknown
    assert caps.workspace_accepts_group is None
    assert caps.workspace_accepts_comm_backend is None
    assert caps.fusion_accepts_trigger_completion is None
    assert caps.workspace_params is None and caps.fusion_params is None
    assert caps.accepts(probe.FUSION_FN, "use_oneshot") is None
    assert "inspect.signature raised" in caps.reason and "will not be passed" in caps.reason


def test_kwargs_wrappers_are_unknown_not_false(fake):
    caps = fake("kwargs")
    assert caps.available
    assert caps.workspace_accepts_group is None
    assert caps.fusion_accepts_trigger_completion is None
    assert "**kwargs" in caps.reason


def test_missing_unified_api(fake):
    caps = fake("missing")
    assert not caps.available and not caps.has_allreduce_fusion
    assert caps.version == "0.5.3"
    assert "create_allreduce_fusion_workspace (missing)" in caps.reason
    assert "allreduce_fusion (missing)" in caps.reason


def test_missing_pattern_class(fake):
    caps = fake("nopattern")
    assert not caps.available and caps.has_allreduce_fusion
    assert caps.patterns == ()
    assert "AllReduceFusionPattern (missing)" in caps.reason


def test_attribute_lookup_raising_non_attribute_error(fake):
    caps = fake("lazyraise")
    assert caps.available
    assert caps.has_mnnvl is None
    assert "libcuda.so.1" in caps.reason


def test_import_error(fake):
    caps = fake("noimport")
    assert not caps.available and not caps.has_allreduce_fusion
    assert "import flashinfer" in caps.reason


def test_comm_import_error(fake):
    caps = fake("nocomm")
    assert not caps.available and caps.version == "0.6.12"
    assert "flashinfer.comm" in caps.reason


@pytest.mark.parametrize("body,word", [
    ("raise RuntimeError('CUDA driver version is insufficient')", "RuntimeError"),
    ("raise OSError('libcudart.so.12: cannot open shared object file')", "OSError"),
    ("import sys; sys.exit(3)", "SystemExit"),
])
def test_module_raising_at_import(monkeypatch, tmp_path, body, word):
    pkg = tmp_path / "flashinfer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(body + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flashinfer", raising=False)
    monkeypatch.delitem(sys.modules, "flashinfer.comm", raising=False)
    try:
        caps = probe.flashinfer(refresh=True)
    finally:
        sys.modules.pop("flashinfer", None)
    assert not caps.available
    assert word in caps.reason
    probe.flashinfer(refresh=True)


def test_cached_until_refresh(fake):
    first = fake("current")
    install_fake("noimport")
    try:
        assert probe.flashinfer() is first
        assert not probe.flashinfer(refresh=True).available
    finally:
        sys.modules.pop("flashinfer", None)
        sys.modules.pop("flashinfer.comm", None)


def test_probe_itself_never_raises(monkeypatch):
    def boom():
        raise MemoryError("simulated")
    monkeypatch.setattr(probe, "_probe_flashinfer", boom)
    caps = probe.flashinfer(refresh=True)
    assert not caps.available and "MemoryError" in caps.reason
    monkeypatch.undo()
    probe.flashinfer(refresh=True)


def test_import_is_light_and_survives_a_broken_flashinfer(tmp_path):
    pkg = tmp_path / "flashinfer"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('broken build')\n")
    code = textwrap.dedent("""
        import sys
        import llmcomm.probe as p
        assert 'torch' not in sys.modules, 'probe imported torch at import time'
        assert 'flashinfer' not in sys.modules, 'probe imported flashinfer at import time'
        caps = p.flashinfer()
        assert not caps.available and 'broken build' in caps.reason, caps
        print('ok')
    """)
    import os
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(tmp_path), "src", env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_reconcile_disagreement_lists_each_rank():
    a = probe.FlashInferCapabilities(True, "0.6.18", "r", True, True, True, True, ("kAllReduce",),
                                     True)
    b = dataclasses.replace(a, version="0.6.8.post1", workspace_accepts_group=False)
    same = probe.reconcile([a.comparable(), a.comparable()], a)
    assert same is a
    res = probe.reconcile([a.comparable(), b.comparable()], a)
    assert not res.available and not res.agreed
    assert "rank 0: version=0.6.18" in res.reason and "rank 1: version=0.6.8.post1" in res.reason
    assert "group=yes" in res.reason and "group=no" in res.reason
    assert "version" in res.reason and "workspace_accepts_group" in res.reason
    with pytest.raises(ValueError):
        probe.reconcile([], a)


def test_agree_without_distributed_returns_caps(fake):
    caps = fake("current")
    assert probe.agree_flashinfer(caps, None) is caps
    with pytest.raises(TypeError):
        probe.agree_flashinfer({"available": True}, None)


# --------------------------------------------------------------------------- across ranks

def _agree_rank(rank, world, kinds):
    import torch.distributed as dist

    install_fake(kinds[rank])
    caps = probe.flashinfer(refresh=True)
    agreed = probe.agree_flashinfer(caps, dist.group.WORLD)
    return dataclasses.asdict(caps), dataclasses.asdict(agreed)


def test_mixed_versions_across_ranks_disable_flashinfer_everywhere():
    out = run_ranks(_agree_rank, 2, ("current", "v068"), timeout=120)
    for rank, (local, agreed) in enumerate(out):
        assert local["available"], local["reason"]
        assert not agreed["available"] and not agreed["agreed"]
        assert "rank 0: version=0.6.18" in agreed["reason"]
        assert "rank 1: version=0.6.8.post1" in agreed["reason"]
    assert out[0][1]["reason"] == out[1][1]["reason"]  # every rank says the same


def test_same_build_across_ranks_agrees():
    out = run_ranks(_agree_rank, 2, ("v068", "v068"), timeout=120)
    for local, agreed in out:
        assert agreed == local and agreed["available"] and agreed["agreed"]


def test_installed_on_one_rank_only():
    out = run_ranks(_agree_rank, 2, ("current", "noimport"), timeout=120)
    for _local, agreed in out:
        assert not agreed["available"] and not agreed["agreed"]
        assert "available=yes" in agreed["reason"] and "available=no" in agreed["reason"]
