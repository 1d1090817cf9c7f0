# session 16, call 9 (one H200, loopback): the one-token dispatch (ONE) with the error-flag read
# at entry (C = working tree) against without (A = HEAD, benchmarks/_ab_a), alternated
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,2,8
for r in 1 2 3; do
  echo "=== round $r A"; date
  PYTHONPATH=benchmarks/_ab_a/src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/A$r" 2>&1 | grep -v Warning
  echo "=== round $r C"; date
  PYTHONPATH=src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/C$r" 2>&1 | grep -v Warning
done
date
