"""Triton kernels and thin launchers; importing the package itself imports nothing."""

#: options every launcher passes to every launch (and compile) of these kernels.
#: ``enable_fp_fusion``: the kernels' fp32 sums (``acc += w * x``) were checked on the GPUs and
#: timed with multiply-add contraction on, triton's default up to 3.9; triton 3.10 turns that
#: default off (``TRITON_DEFAULT_FP_FUSION``, warned about by 3.9), which would change the last
#: bits of every output between triton releases. Pinned here so it does not.
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
