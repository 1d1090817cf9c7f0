set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
timeout 575 python3 benchmarks/stress_moe_p2p.py --loopback --free --variants one --sizes small,large64 --seconds 90 --out "$OUT/free" 2>&1; echo "stress rc=$?"
