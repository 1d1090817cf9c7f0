set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for g in 1 128; do timeout 200 python3 benchmarks/probe_chain_cost.py --programs $g --kinds poll_row,load_volatile_own,row_sum,all_threads --out "$OUT/g$g" 2>&1; echo "probe g$g rc=$?"; done
