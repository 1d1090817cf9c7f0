"""Triton kernels and thin launchers; importing the package itself imports nothing."""

#: options every launcher passes to every launch (and compile) of these kernels.
#: ``enable_fp_fusion``: the kernels' fp32 sums (``acc += w * x``) were checked on the GPUs and
#: timed with multiply-add contraction on, triton's default up to 3.9; triton 3.10 turns that
#: default off (``TRITON_DEFAULT_FP_FUSION``, warned about by 3.9), which would change the last
#: bits of every output between triton releases. Pinned here so it does not. Every compile
#: ahead of a launch (warmup) must pass these too, first, as the launch does: triton keys its
#: in-memory cache on the options as passed, order included (session 24).
LAUNCH_OPTIONS = {"enable_fp_fusion": True}
