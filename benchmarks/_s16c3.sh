# session 16, call 3 (one H200, loopback): the GPU tests of _one_token_slots (per call, T <= 1)
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date
timeout 570 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "lamport-one" -rA 2>&1 | tail -12
date
