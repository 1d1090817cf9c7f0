#!/bin/bash
# session 12 call 2 (one GPU): the lamport dispatch with deterministic slots (DET) checked and A/B'd in loopback
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONPATH=src:.
mkdir -p $OUT
T0=$(date +%s)
P="python3 -u -m pytest -q -rA --durations=3 -p no:cacheprovider"
F=tests/gpu/test_moe_loopback.py
timeout -s INT 330 $P "$F::test_loopback_matches_reference[lamport-det]" > /tmp/t_ref.log 2>&1 &
timeout -s INT 330 $P "$F::test_loopback_cuda_graph_replays_fresh_inputs[lamport-det]" "$F::test_loopback_missing_rank_times_out_naming_it[lamport-det]" > /tmp/t_graph.log 2>&1 &
B="python3 benchmarks/bench_moe_loopback.py"
timeout 300 $B --check-only --tokens 1,8,64,128 --configs lamportdet128 > /tmp/w1.log 2>&1 &
timeout 300 $B --check-only --tokens 1,8,64,128 --configs lamport128 > /tmp/w2.log 2>&1 &
wait
echo "phase A took $(( $(date +%s) - T0 )) s"
for f in /tmp/t_ref.log /tmp/t_graph.log; do echo "== $f"; grep -E "passed|failed|Error|error|Timeout|PASSED|FAILED" $f | tail -8 | cut -c1-400; done
for f in /tmp/w?.log; do echo "== $f"; tail -4 $f | cut -c1-300; done
i=0
for c in lamport128 lamportdet128 lamport128 lamportdet128 lamport128 lamportdet128; do
  i=$((i+1))
  left=$(( 500 - ($(date +%s) - T0) ))
  [ $left -lt 20 ] && break
  echo "== bench $i $c (left $left s)"
  timeout $left $B --configs $c --tokens 1,8,64,128 --out /tmp/ab${i}_$c 2>&1 | grep -E "pair|FAILED|Error"
done
for c in croles4096r8 flags4096; do
  left=$(( 575 - ($(date +%s) - T0) ))
  [ $left -lt 30 ] && break
  echo "== bench $c --programs 33 (left $left s)"
  timeout $left $B --configs $c --programs 33 --tokens 1024,4096 --out /tmp/g33_$c 2>&1 | grep -E "pair|FAILED|Error"
done
cat /tmp/t_ref.log /tmp/t_graph.log /tmp/w?.log > $OUT/logs.txt
echo "total $(( $(date +%s) - T0 )) s"
