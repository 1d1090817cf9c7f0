"""``torch.library`` custom ops: every llmcomm call as one opaque node for ``torch.compile``.

Eager calls never come here. When Dynamo traces a call (``torch.compiler.is_compiling()``),
:class:`~llmcomm.TPCommunicator` and :class:`~llmcomm.EPDispatcher` call these ops instead of
running their Python bodies, so Dynamo neither traces host-side checks, agreement exchanges and
kernel launches nor breaks the graph: ``torch.compile(..., fullgraph=True)`` works. An op names
its object by a registry key (a string, a constant of the graph) and at run time calls the
object's eager method, so results, checks, errors and CUDA-graph safety are those of eager
mode. The fake implementations give output shapes and dtypes::

    llmcomm::all_reduce(x [T, H], key) -> y [T, H]
    llmcomm::all_reduce_out(x [T, H], out [T, H]!, key) -> ()                 (writes ``out``)
    llmcomm::all_reduce_add_rms_norm(x, residual [T, H], weight [H], eps, key)
        -> (normed [T, H], residual_out [T, H])
    llmcomm::all_reduce_add_rms_norm_fp8(x, residual, weight, eps, quant_scale [1], key)
        -> (normed_fp8 [T, H] float8_e4m3fn, residual_out, normed)
    llmcomm::moe_dispatch(x [T, H], topk_ids [T, K], topk_weights [T, K], key, x_scale=None)
        -> (expert_x [L, capacity, H] (packed: [rows, H]), counts [L] int32)
    llmcomm::moe_combine(expert_out (expert_x's shape), num_tokens, key) -> y [num_tokens, H]

(A packed dispatcher's ``offsets`` are computed from ``counts`` in the traced graph,
:func:`llmcomm.moe.backends.packed_offsets`. An fp8 dispatcher's op returns the wire rows,
``[..., EPConfig.row_width]`` of its dtype, which the traced graph views as ``expert_x`` and
``expert_x_scale``, :func:`llmcomm.moe.fp8.split_wire`; ``x_scale``: the caller's scales when
it passed ``(q, scale)``.)

``moe_combine`` combines the dispatch in flight on that dispatcher (one at a time, as in eager
mode; the dispatcher keeps its handle between the two ops). Every op is registered as an ORDERED
side effect, so the compiler keeps each call, once, in program order (without that, dead-code
elimination drops an allreduce whose result is unused: ``tests/distributed/test_compile.py``).
"""

from __future__ import annotations

import itertools
import logging
import weakref
from typing import Any

import torch

logger = logging.getLogger(__name__)

_OBJECTS: dict[str, weakref.ref] = {}
_KEYS = itertools.count()


def register(obj: Any) -> str:
    """A process-unique key under which the ops find ``obj`` (held weakly)."""
    key = f"{type(obj).__name__}#{next(_KEYS)}"
    _OBJECTS[key] = weakref.ref(obj, lambda _ref, key=key: _OBJECTS.pop(key, None))
    return key


def _lookup(key: str) -> Any:
    ref = _OBJECTS.get(key)
    obj = ref() if ref is not None else None
    if obj is None:
        raise RuntimeError(f"llmcomm op: no live communicator or dispatcher under key {key!r}: "
                           f"it was garbage-collected while a compiled graph still calls it; "
                           f"keep it alive as long as the compiled model")
    return obj


@torch.library.custom_op("llmcomm::all_reduce", mutates_args=())
def all_reduce(x: torch.Tensor, key: str) -> torch.Tensor:
    return _lookup(key).all_reduce(x)


@all_reduce.register_fake
def _(x, key):
    return torch.empty_like(x)


@torch.library.custom_op("llmcomm::all_reduce_out", mutates_args=("out",))
def all_reduce_out(x: torch.Tensor, out: torch.Tensor, key: str) -> None:
    _lookup(key).all_reduce(x, out=out)


@all_reduce_out.register_fake
def _(x, out, key):
    return None


@torch.library.custom_op("llmcomm::all_reduce_add_rms_norm", mutates_args=())
def all_reduce_add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                            eps: float, key: str) -> tuple[torch.Tensor, torch.Tensor]:
    return _lookup(key).all_reduce_add_rms_norm(x, residual, weight, eps)


@all_reduce_add_rms_norm.register_fake
def _(x, residual, weight, eps, key):
    return torch.empty_like(x), torch.empty_like(x)


@torch.library.custom_op("llmcomm::all_reduce_add_rms_norm_fp8", mutates_args=())
def all_reduce_add_rms_norm_fp8(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                eps: float, quant_scale: torch.Tensor, key: str
                                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return _lookup(key).all_reduce_add_rms_norm(x, residual, weight, eps,
                                                quant_scale=quant_scale)


@all_reduce_add_rms_norm_fp8.register_fake
def _(x, residual, weight, eps, quant_scale, key):
    return (torch.empty(x.shape, dtype=torch.float8_e4m3fn, device=x.device),
            torch.empty_like(x), torch.empty_like(x))


@torch.library.custom_op("llmcomm::moe_dispatch", mutates_args=())
def moe_dispatch(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor,
                 key: str, x_scale: torch.Tensor | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    ep = _lookup(key)
    expert_x, counts, handle = ep._dispatch(x, x_scale, topk_ids, topk_weights)
    ep._compiled_in_flight = handle   # for moe_combine
    return expert_x, counts


@moe_dispatch.register_fake
def _(x, topk_ids, topk_weights, key, x_scale=None):
    ep = _lookup(key)
    return (torch.empty(ep._cfg.wire_shape, dtype=ep.dtype, device=x.device),
            torch.empty(ep.local_experts, dtype=torch.int32, device=x.device))


@torch.library.custom_op("llmcomm::moe_combine", mutates_args=())
def moe_combine(expert_out: torch.Tensor, num_tokens: int, key: str) -> torch.Tensor:
    ep = _lookup(key)
    d, ep._compiled_in_flight = ep._compiled_in_flight, None
    if d is None:
        raise RuntimeError("llmcomm::moe_combine: no dispatch of this EPDispatcher is in flight "
                           "in the compiled graph; call dispatch() before combine()")
    return ep.combine(expert_out, d)


@moe_combine.register_fake
def _(expert_out, num_tokens, key):
    return expert_out.new_empty(num_tokens, _lookup(key).hidden_size)


#: op name -> whether it is registered as an ORDERED side effect (see ``_mark_ordered``)
ORDERED: dict[str, bool] = {}


def describe() -> str:
    """One line for ``llmcomm doctor``: the custom ops and whether their ordering holds."""
    ok = sum(ORDERED.values())
    return (f"{len(ORDERED)} custom ops ({', '.join(n.split('::')[1] for n in ORDERED)}); "
            f"ordered side effects: {ok}/{len(ORDERED)}"
            + ("" if ok == len(ORDERED) else " (see the warning logged at import)"))


def _mark_ordered(*names: str) -> None:
    """Declare the ops ORDERED-effectful: torch.compile then neither drops one whose outputs are
    unused (every rank must make every collective call) nor merges two equal calls nor reorders
    them against each other (``moe_combine`` uses the state its ``moe_dispatch`` left). The
    registration is a private API of torch whose home moved between releases; without it the
    ops are still correct wherever their results are used in program order."""
    def new_api(name):
        torch.library._register_effectful_op(name, torch.library.EffectType.ORDERED)

    def old_api(name):   # older torch: the effects module of the higher-order ops
        from torch._higher_order_ops import effects

        op = getattr(torch.ops.llmcomm, name.split("::")[1]).default
        effects._register_effectful_op(op, effects._EffectType.ORDERED)

    for name in names:
        errors = []
        for register_effect in (new_api, old_api):
            try:
                register_effect(name)
                ORDERED[name] = True
                break
            except Exception as e:  # noqa: BLE001 - never fail communicator creation over this
                errors.append(repr(e))
        else:
            ORDERED[name] = False
            logger.warning("could not mark %s as an ordered side effect for torch.compile (%s): "
                           "an llmcomm call whose result is unused may be dropped from a "
                           "compiled graph", name, "; ".join(errors))


_mark_ordered("llmcomm::all_reduce", "llmcomm::all_reduce_out", "llmcomm::all_reduce_add_rms_norm",
              "llmcomm::all_reduce_add_rms_norm_fp8", "llmcomm::moe_dispatch",
              "llmcomm::moe_combine")
