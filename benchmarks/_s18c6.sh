set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:. PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
timeout 250 python3 benchmarks/stress_moe_p2p.py --loopback --variants flags,flags-g8 --sizes small --seconds 80 --out "$OUT/small" 2>&1 | grep -v "calls ok" | tail -12
echo rc=$?
timeout 280 python3 benchmarks/stress_moe_p2p.py --loopback --variants flags --sizes large --seconds 90 --out "$OUT/large" 2>&1 | tail -12
echo rc=$?
