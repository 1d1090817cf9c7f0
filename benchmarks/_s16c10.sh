# session 16, call 10 (one H200, loopback): the final tree's lamport reference and warmup tests,
# and the decode ladder of the final kernels against the session's start (A = 906fc33)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date
PYTHONPATH=src:. timeout 400 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "matches_reference and (lamport] or lamport-one)" -rA 2>&1 | tail -6
date
for r in 1 2; do
  PYTHONPATH=benchmarks/_ab_a/src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens 1,8,64,128 --out "$OUT/start$r" 2>&1 | grep -v Warning
  PYTHONPATH=src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens 1,8,64,128 --out "$OUT/final$r" 2>&1 | grep -v Warning
done
date
