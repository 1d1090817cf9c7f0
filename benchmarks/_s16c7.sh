# session 16, call 7 (one H200, loopback): the lamport combine's routing loads issued before the
# error flag's reduction (B = working tree) against HEAD (A = benchmarks/_ab_a), alternated
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,8,16,17,64,128
for r in 1 2 3; do
  echo "=== round $r A"; date
  PYTHONPATH=benchmarks/_ab_a/src:. timeout 200 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/A$r" 2>&1 | grep -v Warning
  echo "=== round $r B"; date
  PYTHONPATH=src:. timeout 200 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/B$r" 2>&1 | grep -v Warning
done
date
