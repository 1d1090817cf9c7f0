# session 16, call 2 (one H200, loopback): one-token lamport dispatch without slot atomics
# (_one_token_slots) A/B against the default, then its CUDA-graph and missing-rank tests
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,2,8,64
for r in 1 2 3; do
  echo "=== round $r"; date
  timeout 200 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128one --tokens $T --out "$OUT/ab$r" 2>&1 | grep -v Warning
  timeout 100 python3 benchmarks/bench_moe_loopback.py --configs lamport128one,lamport128 --tokens 1 --out "$OUT/ba$r" 2>&1 | grep -v Warning
done
date
timeout 250 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "one and (graph or missing)" -rA 2>&1 | tail -8
date
