# session 16, call 8 (one H200, loopback): the lamport kernels without the error-flag read at
# entry (B = working tree) against HEAD afc307d (A = benchmarks/_ab_a), alternated; then the
# missing-rank and CUDA-graph loopback tests of B
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,8,17,64,128
for r in 1 2 3; do
  echo "=== round $r A"; date
  PYTHONPATH=benchmarks/_ab_a/src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/A$r" 2>&1 | grep -v Warning
  echo "=== round $r B"; date
  PYTHONPATH=src:. timeout 150 python3 benchmarks/bench_moe_loopback.py --configs lamport128 --tokens $T --out "$OUT/B$r" 2>&1 | grep -v Warning
done
date
PYTHONPATH=src:. timeout 200 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "(missing or graph) and (lamport] or lamport-one)" -rA 2>&1 | tail -8
date
