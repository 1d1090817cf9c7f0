# session 16, call 1 (one H200, loopback): the small-batch lamport dispatch (_small_tokens) A/B
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
T=1,2,3,4,8,64
echo "=== round 1 (cold compile)"; date
timeout 330 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128s4,lamport128s1 --tokens $T --out "$OUT/ab1" 2>&1 | grep -v Warning
echo "=== round 2"; date
timeout 120 python3 benchmarks/bench_moe_loopback.py --configs lamport128s1,lamport128s4,lamport128 --tokens $T --out "$OUT/ab2" 2>&1 | grep -v Warning
echo "=== round 3"; date
timeout 100 python3 benchmarks/bench_moe_loopback.py --configs lamport128,lamport128s4 --tokens 1,2,4,8 --out "$OUT/ab3" 2>&1 | grep -v Warning
date
