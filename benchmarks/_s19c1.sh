set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
for p in "" --pdl; do for g in 1 128; do timeout 120 python3 benchmarks/probe_chain_cost.py --programs $g --kinds alu,load_volatile_own $p --out "$OUT/g$g$p" 2>&1; echo "probe g$g $p rc=$?"; done; done
