# session 16, call 4 (one H200, loopback): the first own token sent before the loop
# (_early_send) A/B against the default, alone and with _one_token_slots
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,8,64,128
echo "=== round 1 (cold)"; date
timeout 330 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128early,lamport128oe --tokens $T --out "$OUT/r1" 2>&1 | grep -v Warning
for r in 2 3; do
  echo "=== round $r"; date
  timeout 60 python3 benchmarks/bench_moe_loopback.py --configs lamport128early,lamport128oe,lamport128 --tokens $T --out "$OUT/r${r}a" 2>&1 | grep -v Warning
  timeout 60 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128early,lamport128oe --tokens $T --out "$OUT/r${r}b" 2>&1 | grep -v Warning
done
date
