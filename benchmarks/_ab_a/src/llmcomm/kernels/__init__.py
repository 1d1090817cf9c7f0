"""Triton kernels and thin launchers; importing the package itself imports nothing."""
