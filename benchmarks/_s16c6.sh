# session 16, call 6 (one H200, loopback): CUDA-graph, missing-rank and warmup tests of the
# lamport default (the one-token path ONE on) and of lamport-one
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
date
timeout 570 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_loopback.py -k "(graph or missing or warmup) and lamport" -rA 2>&1 | tail -14
date
