export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:.
echo "== sweep"; LLMCOMM_TIMEOUT_S=5 timeout 250 python3 benchmarks/bench_moe.py --sweep --out $OUT 2>&1 | grep -v "it/s\|size/s" | grep -v "^  " | tail -14
echo "== gpu tests moe"; timeout 300 python3 -m pytest -q tests/gpu/test_moe_p2p.py 2>&1 | tail -8
