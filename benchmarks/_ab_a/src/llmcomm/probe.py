"""Fail-soft capability probing of optional libraries (FlashInfer).

:func:`flashinfer` answers "what does the installed FlashInfer offer for allreduce fusion?"
without ever raising and without breaking ``import llmcomm``. It imports nothing at module import
time (not even torch); the probe itself imports ``flashinfer`` and ``flashinfer.comm`` on its
first call and caches the answer.

Every way the probe can fail ends in a :class:`FlashInferCapabilities` with a human-readable
``reason``:

* ``flashinfer`` or ``flashinfer.comm`` cannot be imported (``ImportError``) or raises anything
  else while importing -> ``available=False``;
* ``allreduce_fusion`` / ``create_allreduce_fusion_workspace`` / ``AllReduceFusionPattern`` missing
  (or an attribute lookup that raises) -> ``available=False``;
* ``inspect.signature`` raising ``ValueError`` / ``TypeError`` (C builtins without signature
  metadata) or anything else -> the keyword flags are ``None`` ("unknown");
* a signature that ends in ``**kwargs`` without naming the parameter -> that flag is ``None``.

**Unknown means "not passed":** :mod:`llmcomm.allreduce.flashinfer` passes an optional,
version-dependent keyword (``group``, ``comm_backend``, ``trigger_completion_at_end``, ...) only
when its flag is ``True``.

:func:`agree_flashinfer` exchanges the capabilities over a process group (with the deadline
``LLMCOMM_TIMEOUT_S``). When ranks disagree, every rank gets ``available=False, agreed=False``
and a reason that lists what each rank has, so no rank uses FlashInfer (a fused kernel that only
some ranks launch would hang the others).
"""

from __future__ import annotations

import dataclasses
import importlib
import inspect
import logging
import threading
from dataclasses import dataclass
from typing import Any

from ._warn import warn_once

logger = logging.getLogger(__name__)

#: Parameters the fusion backend may pass, by function; each gets a flag in the capabilities.
WORKSPACE_FN = "create_allreduce_fusion_workspace"
FUSION_FN = "allreduce_fusion"
PATTERN_CLASS = "AllReduceFusionPattern"
#: Fields compared across ranks by :func:`agree_flashinfer` (``reason`` and ``agreed`` are not).
COMPARED_FIELDS = ("available", "version", "has_allreduce_fusion", "workspace_accepts_group",
                   "workspace_accepts_comm_backend", "fusion_accepts_trigger_completion",
                   "patterns", "has_mnnvl", "workspace_params", "fusion_params")


@dataclass(frozen=True)
class FlashInferCapabilities:
    """What the installed FlashInfer offers for allreduce fusion (one rank's view, or agreed).

    Attributes:
        available: ``flashinfer.comm`` imports, the unified fusion API
            (``create_allreduce_fusion_workspace`` + ``allreduce_fusion``) and
            ``AllReduceFusionPattern`` with ``kAllReduce`` are present, and (after
            :func:`agree_flashinfer`) every rank agrees.
        version: ``flashinfer.__version__`` (or the distribution's version), None if unknown.
        reason: why (not) available, and which bits are unknown and why.
        has_allreduce_fusion: both unified-API functions are present and callable.
        workspace_accepts_group: ``create_allreduce_fusion_workspace`` has a ``group`` parameter
            (FlashInfer >= 0.6.11); None = unknown (signature unreadable or only ``**kwargs``).
        workspace_accepts_comm_backend: it has ``comm_backend``; None = unknown.
        fusion_accepts_trigger_completion: ``allreduce_fusion`` has
            ``trigger_completion_at_end`` (>= 0.6.8); None = unknown.
        patterns: names of the ``AllReduceFusionPattern`` members, in value order.
        has_mnnvl: ``MNNVLAllReduceFusionWorkspace`` is exported; None = unknown.
        agreed: False when the ranks of a group disagreed (then ``available`` is False too).
        workspace_params / fusion_params: the parameter names of the two functions, sorted;
            None when the signature could not be read. Used to gate the other optional
            keywords (``use_oneshot``, ``fp32_acc``, ``launch_with_pdl``).
    """

    available: bool
    version: str | None
    reason: str
    has_allreduce_fusion: bool
    workspace_accepts_group: bool | None
    workspace_accepts_comm_backend: bool | None
    fusion_accepts_trigger_completion: bool | None
    patterns: tuple[str, ...]
    has_mnnvl: bool | None
    agreed: bool = True
    workspace_params: tuple[str, ...] | None = None
    fusion_params: tuple[str, ...] | None = None

    def accepts(self, function: str, param: str) -> bool | None:
        """Whether ``function`` (WORKSPACE_FN or FUSION_FN) takes ``param``; None = unknown."""
        params = {WORKSPACE_FN: self.workspace_params, FUSION_FN: self.fusion_params}.get(function)
        if function not in (WORKSPACE_FN, FUSION_FN):
            raise ValueError(f"function must be {WORKSPACE_FN!r} or {FUSION_FN!r}, got {function!r}")
        if params is None:
            return None
        return param in params

    def summary(self) -> str:
        """One line for logs and ``llmcomm doctor``."""
        def flag(v: bool | None) -> str:
            return "unknown" if v is None else ("yes" if v else "no")
        return (f"flashinfer {self.version or '?'}: available={flag(self.available)}, "
                f"fusion={flag(self.has_allreduce_fusion)}, "
                f"group={flag(self.workspace_accepts_group)}, "
                f"comm_backend={flag(self.workspace_accepts_comm_backend)}, "
                f"trigger_completion_at_end={flag(self.fusion_accepts_trigger_completion)}, "
                f"mnnvl={flag(self.has_mnnvl)}, patterns={len(self.patterns)}, "
                f"agreed={flag(self.agreed)}")

    def comparable(self) -> dict[str, Any]:
        """The fields that must be identical on every rank (see :data:`COMPARED_FIELDS`)."""
        return {name: getattr(self, name) for name in COMPARED_FIELDS}


def unavailable(reason: str, version: str | None = None) -> FlashInferCapabilities:
    """Capabilities of a FlashInfer that cannot be used at all."""
    return FlashInferCapabilities(
        available=False, version=version, reason=reason, has_allreduce_fusion=False,
        workspace_accepts_group=None, workspace_accepts_comm_backend=None,
        fusion_accepts_trigger_completion=None, patterns=(), has_mnnvl=None)


# --------------------------------------------------------------------------- probing helpers

def _describe_exc(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else ""
    return f"{type(exc).__name__}: {first[:200]}" if first else type(exc).__name__


def _safe_getattr(obj: Any, name: str) -> tuple[Any, str | None]:
    """``getattr`` that never raises: (value or None, None | why it is missing)."""
    try:
        return getattr(obj, name), None
    except AttributeError:
        return None, "missing"
    except Exception as exc:  # noqa: BLE001 - lazy module attributes may raise anything
        return None, f"lookup raised {_describe_exc(exc)}"


def signature_params(fn: Any) -> tuple[frozenset[str] | None, bool, str | None]:
    """``(parameter names, has **kwargs, None)`` or ``(None, False, why unreadable)``.

    ``inspect.signature`` raises ValueError for builtins without ``__text_signature__`` and
    TypeError for objects it does not support; a broken ``__signature__`` may raise anything.
    """
    try:
        sig = inspect.signature(fn)
    except (ValueError, TypeError) as exc:
        return None, False, f"inspect.signature raised {_describe_exc(exc)} (no signature metadata)"
    except Exception as exc:  # noqa: BLE001 - a broken __signature__ property
        return None, False, f"inspect.signature raised {_describe_exc(exc)}"
    names = frozenset(p.name for p in sig.parameters.values()
                      if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD))
    var_kw = any(p.kind == p.VAR_KEYWORD for p in sig.parameters.values())
    return names, var_kw, None


def _accepts(params: frozenset[str] | None, var_kw: bool, name: str) -> bool | None:
    if params is None:
        return None
    if name in params:
        return True
    return None if var_kw else False


def _pattern_names(cls: Any) -> tuple[tuple[str, ...], str | None]:
    """Names of the pattern constants (an Enum or a class of int constants), in value order."""
    try:
        members = getattr(cls, "__members__", None)
        if isinstance(members, dict) or hasattr(members, "items"):
            items = [(name, int(getattr(m, "value", m))) for name, m in members.items()]
        else:
            items = []
            for name in dir(cls):
                if name.startswith("_"):
                    continue
                value = getattr(cls, name)
                if isinstance(value, int) and not isinstance(value, bool):
                    items.append((name, value))
        items.sort(key=lambda kv: (kv[1], kv[0]))
        return tuple(name for name, _ in items), None
    except Exception as exc:  # noqa: BLE001 - a strange pattern class must not break the probe
        return (), f"{PATTERN_CLASS} could not be read ({_describe_exc(exc)})"


def _version(fi_module: Any) -> str | None:
    value, _ = _safe_getattr(fi_module, "__version__") if fi_module is not None else (None, None)
    if isinstance(value, str) and value:
        return value
    try:
        from importlib import metadata

        for dist_name in ("flashinfer-python", "flashinfer"):
            try:
                return metadata.version(dist_name)
            except metadata.PackageNotFoundError:
                continue
    except Exception:  # noqa: BLE001 - version is informational
        pass
    return None


def _import(name: str) -> tuple[Any, str | None]:
    try:
        return importlib.import_module(name), None
    except ImportError as exc:
        return None, f"`import {name}` failed: {_describe_exc(exc)}"
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - any failure at import is "unavailable"
        return None, f"`import {name}` raised {_describe_exc(exc)}"


# --------------------------------------------------------------------------- the probe

def _probe_flashinfer() -> FlashInferCapabilities:
    fi, why = _import("flashinfer")
    if fi is None:
        return unavailable(f"FlashInfer not usable: {why}", _version(None))
    version = _version(fi)
    comm, why = _import("flashinfer.comm")
    if comm is None:
        return unavailable(f"FlashInfer {version or '?'}: {why}", version)

    notes: list[str] = []
    ws_fn, ws_missing = _safe_getattr(comm, WORKSPACE_FN)
    ar_fn, ar_missing = _safe_getattr(comm, FUSION_FN)
    missing = [f"{n} ({m})" for n, m, f in ((WORKSPACE_FN, ws_missing, ws_fn),
                                            (FUSION_FN, ar_missing, ar_fn))
               if m is not None or not callable(f)]
    has_fusion = not missing

    def read(fn: Any, name: str, optional: str) -> tuple[frozenset[str] | None, bool]:
        """The parameters of ``fn`` (None = unknown), whether it takes **kwargs; notes why."""
        if not callable(fn):
            return None, False
        params, var_kw, err = signature_params(fn)
        if err:
            notes.append(f"{name}: {err}; {optional} unknown and will not be passed")
        elif var_kw:
            notes.append(f"{name} takes **kwargs; parameters it does not name are unknown "
                         f"and will not be passed")
        return params, var_kw

    ws_params, ws_var_kw = read(ws_fn, WORKSPACE_FN, "`group` and `comm_backend` are")
    ar_params, ar_var_kw = read(ar_fn, FUSION_FN, "`trigger_completion_at_end` is")

    accepts_group = _accepts(ws_params, ws_var_kw, "group")
    accepts_cb = _accepts(ws_params, ws_var_kw, "comm_backend")
    accepts_trigger = _accepts(ar_params, ar_var_kw, "trigger_completion_at_end")
    if accepts_group is False:
        notes.append(f"{WORKSPACE_FN} has no `group` parameter (added in FlashInfer 0.6.11)")
    if accepts_trigger is False:
        notes.append(f"{FUSION_FN} has no `trigger_completion_at_end` parameter (added in 0.6.8)")

    pattern_cls, pat_missing = _safe_getattr(comm, PATTERN_CLASS)
    if pat_missing is not None:
        patterns: tuple[str, ...] = ()
        missing.append(f"{PATTERN_CLASS} ({pat_missing})")
    else:
        patterns, err = _pattern_names(pattern_cls)
        if err:
            missing.append(err)
        elif "kAllReduce" not in patterns:
            missing.append(f"{PATTERN_CLASS}.kAllReduce (missing)")

    mnnvl_cls, mnnvl_missing = _safe_getattr(comm, "MNNVLAllReduceFusionWorkspace")
    if mnnvl_missing is None:
        has_mnnvl: bool | None = mnnvl_cls is not None
    elif mnnvl_missing == "missing":
        has_mnnvl = False
    else:
        has_mnnvl = None
        notes.append(f"MNNVL support unknown: MNNVLAllReduceFusionWorkspace {mnnvl_missing}")

    available = not missing
    head = (f"FlashInfer {version or '?'}: allreduce fusion present" if available else
            f"FlashInfer {version or '?'}: allreduce fusion not usable, missing "
            + ", ".join(missing))
    reason = "; ".join([head] + notes)
    return FlashInferCapabilities(
        available=available, version=version, reason=reason, has_allreduce_fusion=has_fusion,
        workspace_accepts_group=accepts_group, workspace_accepts_comm_backend=accepts_cb,
        fusion_accepts_trigger_completion=accepts_trigger, patterns=patterns,
        has_mnnvl=has_mnnvl,
        workspace_params=tuple(sorted(ws_params)) if ws_params is not None else None,
        fusion_params=tuple(sorted(ar_params)) if ar_params is not None else None)


_lock = threading.Lock()
_cached: FlashInferCapabilities | None = None


def flashinfer(refresh: bool = False) -> FlashInferCapabilities:
    """This process's FlashInfer capabilities; never raises; cached (``refresh=True`` re-probes).

    The result is local to this rank. Before acting on it in a group, call
    :func:`agree_flashinfer` so every rank acts on the same answer.
    """
    global _cached
    with _lock:
        if _cached is not None and not refresh:
            return _cached
        try:
            caps = _probe_flashinfer()
        except BaseException as exc:  # noqa: BLE001 - the probe must never raise
            if isinstance(exc, KeyboardInterrupt):
                raise
            caps = unavailable(f"FlashInfer probe failed unexpectedly: {_describe_exc(exc)}")
        logger.debug("probe: %s (%s)", caps.summary(), caps.reason)
        _cached = caps
        return caps


def _rank_line(rank: int, fields: dict[str, Any]) -> str:
    def flag(v: Any) -> str:
        return "unknown" if v is None else ("yes" if v is True else "no" if v is False else str(v))
    pats = fields.get("patterns") or ()
    return (f"rank {rank}: version={fields.get('version') or '?'} "
            f"available={flag(fields.get('available'))} "
            f"fusion={flag(fields.get('has_allreduce_fusion'))} "
            f"group={flag(fields.get('workspace_accepts_group'))} "
            f"comm_backend={flag(fields.get('workspace_accepts_comm_backend'))} "
            f"trigger_completion_at_end={flag(fields.get('fusion_accepts_trigger_completion'))} "
            f"mnnvl={flag(fields.get('has_mnnvl'))} patterns={len(pats)}")


def reconcile(per_rank: list[dict[str, Any]], mine: FlashInferCapabilities) -> FlashInferCapabilities:
    """Pure part of :func:`agree_flashinfer`: ``mine`` if every rank's fields match, else disabled.

    ``per_rank`` holds :meth:`FlashInferCapabilities.comparable` of every rank in group order.
    """
    if not per_rank:
        raise ValueError("reconcile needs the fields of at least one rank")
    differing = sorted({k for fields in per_rank for k in fields
                        if any(f.get(k) != per_rank[0].get(k) for f in per_rank)})
    if not differing:
        return mine
    reason = ("ranks disagree on FlashInfer (" + ", ".join(differing) + "), so no rank uses it; "
              "install the same FlashInfer build on every rank. "
              + "; ".join(_rank_line(r, f) for r, f in enumerate(per_rank)))
    return dataclasses.replace(mine, available=False, agreed=False, reason=reason)


def agree_flashinfer(caps: FlashInferCapabilities, group: Any) -> FlashInferCapabilities:
    """Exchange ``caps`` over ``group``; every rank returns the same verdict.

    Collective: every rank of ``group`` must call it. The exchange goes through the c10d store
    (:func:`llmcomm.agree.exchange`) with the deadline ``get_config().timeout_s``, for gloo and
    NCCL groups alike; a rank that does not arrive ends the wait with
    :class:`~llmcomm.errors.CollectiveTimeoutError` naming it (raised: a missing peer is not a
    capability question). Without an initialised ``torch.distributed`` or for a group of one, the
    capabilities are returned unchanged.

    Returns ``caps`` when all ranks match on :data:`COMPARED_FIELDS`; otherwise a copy with
    ``available=False, agreed=False`` and a reason that lists every rank's version and flags.
    """
    if not isinstance(caps, FlashInferCapabilities):
        raise TypeError(f"caps must be FlashInferCapabilities, got {type(caps).__name__}")
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return caps
    if dist.get_world_size(group) == 1:
        return caps
    from .agree import exchange

    per_rank = exchange(caps.comparable(), group, "flashinfer-capabilities")
    result = reconcile(per_rank, caps)
    if not result.agreed:
        warn_once(logger, "flashinfer-disagree", result.reason)
    return result
