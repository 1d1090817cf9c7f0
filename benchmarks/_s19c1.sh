set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 575 python3 benchmarks/bench_moe_loopback.py --programs 33 --configs lamport128,lamport128pdl,lamport128one,lamport128onepdl,lamport128,lamport128pdl,lamport128one,lamport128onepdl --tokens 1,8 --out "$OUT/lb_g33" 2>&1; echo "loopback rc=$?"
