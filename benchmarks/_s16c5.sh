# session 16, call 5 (one H200, loopback): the one-token path (ONE: first own token sent before
# the loop + computed slots/counts; now the default) against the path before it, then the
# loopback reference tests of lamport (default) and lamport-one
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
T=1,2,8,64
echo "=== round 1 (cold)"; date
timeout 200 python3 benchmarks/bench_moe_loopback.py --configs lamport128noone,lamport128 --tokens $T --out "$OUT/r1" 2>&1 | grep -v Warning
for r in 2 3; do
  echo "=== round $r"; date
  timeout 45 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128noone --tokens $T --out "$OUT/r${r}a" 2>&1 | grep -v Warning
  timeout 45 python3 benchmarks/bench_moe_loopback.py --configs lamport128noone,lamport128 --tokens $T --out "$OUT/r${r}b" 2>&1 | grep -v Warning
done
date
timeout 330 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "matches_reference and (lamport] or lamport-one)" -rA 2>&1 | tail -8
date
