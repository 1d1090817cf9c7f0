"""Triton kernels (``@triton.jit`` code and thin launchers); importing this package imports nothing."""
