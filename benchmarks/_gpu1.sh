export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:.
nvidia-smi -L; python3 -c "import torch,triton,torch.distributed as d;print('torch',torch.__version__,'triton',triton.__version__,'nccl',torch.cuda.nccl.version())"
echo "== gpu tests moe"; timeout 200 python3 -m pytest -q tests/gpu/test_moe_p2p.py 2>&1 | tail -4
echo "== bench"; date -u; timeout 240 python3 benchmarks/bench_moe.py --out $OUT 2>&1 | grep -v "it/s\|size/s\|^{" | tail -30
echo "== sweep"; LLMCOMM_TIMEOUT_S=5 timeout 120 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 1,128,4096 --out $OUT 2>&1 | grep -v "it/s\|size/s" | grep -v "^  " | tail -9
echo "== allreduce graph test"; timeout 100 python3 -m pytest -q tests/gpu/test_p2p_allreduce.py -k graph 2>&1 | tail -3
