"""Tensor-parallel allreduce: the communicator and its backends (torch, p2p, flashinfer)."""

from .communicator import TPCommunicator

__all__ = ["TPCommunicator"]
