#!/usr/bin/env bash
# A/B of this branch (wip/s5-next: late own-slot copies in both dispatch kernels, the lamport
# combine's column split of small batches, relaxed count publication) against main, on 2 GPUs. Prepare locally, from a
# checkout of main (the device gets the working tree, not .git; _ab is untracked, so it travels):
#   rm -rf _ab && mkdir _ab && git archive wip/s5-next src benchmarks tests | tar -x -C _ab
#   git show wip/s5-next:benchmarks/ab_s5_next.sh > _ab_s5_next.sh
# then on the device:  bash _ab_s5_next.sh bench   (~4 min)   and   bash _ab_s5_next.sh tests (~8 min)
# "a" = main (this checkout), "b" = the branch (_ab). bench_moe.py puts its own ../src first on
# sys.path, hence _ab/benchmarks/bench_moe.py for "b".
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
OUT="${OUT:-ab_out}"; mkdir -p "$OUT"
case "${1:-bench}" in
bench)
  PYTHONPATH=src:. timeout 120 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 1,8,32,64,128 \
    --sweep-only lam,flags --out "$OUT/a_sweep" 2>&1 | tail -9
  PYTHONPATH=_ab/src:_ab timeout 150 python3 _ab/benchmarks/bench_moe.py --sweep \
    --sweep-tokens 1,8,32,64,128 --sweep-only lam,lam_cs1,lam_cs2,lam_acqrel,flags,flags_acqrel \
    --out "$OUT/b_sweep" 2>&1 | tail -9
  for v in a b; do
    if [ $v = a ]; then root=.; else root=_ab; fi
    PYTHONPATH=$root/src:$root timeout 150 python3 $root/benchmarks/bench_moe.py --tokens 1,8,128 \
      --p2p-kwargs '{"protocol":"lamport"}' --out "$OUT/${v}_lam" 2>&1 | grep "^| "
    PYTHONPATH=$root/src:$root timeout 200 python3 $root/benchmarks/bench_moe.py --tokens 1,128,4096 \
      --p2p-kwargs '{"protocol":"flags"}' --out "$OUT/${v}_flags" 2>&1 | grep "^| "
  done ;;
tests)
  cd _ab && PYTHONPATH=src:. timeout 580 python3 -m pytest -v -p no:cacheprovider tests/gpu/test_moe_p2p.py 2>&1 \
    | grep -E "PASS|FAIL|ERROR|passed|failed" ;;
esac
