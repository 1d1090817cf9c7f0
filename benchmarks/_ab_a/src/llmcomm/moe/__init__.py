"""MoE expert-parallel dispatch/combine: :class:`EPDispatcher` and its backends."""

from .backends import MoEBackend
from .dispatcher import (EP_BACKENDS, DispatchHandle, DispatchResult, EPDispatcher,
                         resolve_ep_backend)

__all__ = ["EPDispatcher", "DispatchResult", "DispatchHandle", "MoEBackend", "EP_BACKENDS",
           "resolve_ep_backend"]
