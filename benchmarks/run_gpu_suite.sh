#!/usr/bin/env bash
# Everything GPU: tests, demos, benchmarks, sweeps, logs into $OUT (or ./gpu_out). Each step has
# its own time limit so a slow step cannot eat the others; the order is by priority (correctness
# first). A device call lasts at most 600 s: pick the STEPS that fit one call (session 5 on
# 2 x H200: tests ~5 min, tests_moe ~8 min, demo ~4 min, bench ~6 min, sweep ~3 min;
# tests_moe_sentinel and tests_moe_warmup, session 15: ~5 min each with a cold triton cache --
# a fresh machine compiles everything cold, so give each tests_* step a device call of its own).
# Usage, from the repository root on a node with 2+ GPUs:
#   [STEPS="tests tests_moe tests_moe_sentinel tests_moe_warmup demo bench sweep"] [WORLD=4] bash benchmarks/run_gpu_suite.sh
# The one-GPU loopback tests (tests/gpu/test_moe_loopback.py, for machines without a second
# GPU) are not in "tests": STEPS="loopback" runs them (~20 min cold: over one call, so name
# tests with PYTEST_K, e.g. PYTEST_K=lamport).
# STEPS="moe_ab" (not in the default): the A/Bs left open by session 11 (docs/moe_sessions.md),
# two off-by-default knobs against the default at 1024 and 4096 tokens, dispatch / combine alone, in
# both orders: flags rounds sized per call from the batch (rt), and the combine's push and finish
# in separate programs (croles, croles_r8: min(G, SMs / 2) programs a role), ~6 min; then, in
# a call of its own, STEPS="moe_ab_tests": the flags GPU tests. STEPS="moe_ab_ce":
# session 17's probe (does copy_ into a peer's buffer run beside kernels on every SM, i.e. on a
# copy engine?), then the dispatch rows by copy_ (ce) against the default at 1024-4096 tokens,
# both orders (with rounds of 4 too: ce_r4, and 112 programs: ce_g112); STEPS="moe_ab_ce_tests",
# a call of its own: the ce 2-GPU tests.
# STEPS="stress" (a call of its own): benchmarks/stress_moe_p2p.py, random sequences of calls
# each checked against the reference (STRESS_VARIANTS=lam, STRESS_SIZES=large, STRESS_S=400 s;
# STRESS_ARGS=--replay: the sentinel test's call sequence over and over instead).
# STEPS="moe_ab_pdl": the lamport decode pair with and without PDL at 1-128 tokens, both orders.
# STEPS="moe_ab_early": the same with and without session 25's early own rows (_early_own).
# STEPS="moe_ab_gate": the lamport pair with session 26's GATE (default) against lam_nogate.
# STEPS="moe_ab_direct": the lamport pair with session 27's direct counts (default) against
#   lam_nodirect.
# STEPS="decode_now" (session 29; the first call when a 2-GPU window opens, ~3-4 min cold): the
#   lamport pair at 1-128 tokens with today's defaults beside NCCL a2a, and lam_nodirect,
#   lam_nogate, lam_noearly in the same run, both orders.
# STEPS="trace": the lamport dispatch's stage stamps (lam_trace) at 1-128 tokens, per rank.
# STEPS="tests_moe_default": only the default lamport dispatcher's 2-GPU tests (a short lease).
# STEPS="floor_small" (~5 min cold): benchmarks/bench_moe_floor.py at 1, 64 and 128 tokens, the
# floor the decode target sits on (docs/moe.md, "Why the targets are missed").
# STEPS="packed" (session 31, ~6 min cold): the packed expert_x (EPDispatcher(packed=True)) on
# 2 GPUs: its 2-GPU test (p2p / torch / allgather packed against the reference) and the flags
# dispatcher with and without it at 128-4096 tokens, both orders.
# STEPS="fp8" (session 32, ~6 min cold): the fp8 dispatch (EPDispatcher(fp8=True)) on 2 GPUs:
# its 2-GPU test (p2p / torch / allgather / p2p packed against the reference) and the flags
# dispatcher with and without it (padded and packed) at 128-4096 tokens, both orders; and
# (session 33) the decode dispatcher (protocol="auto": lamport) with and without it at 1-128
# tokens, both orders.
# WORLD (default 2) is the TP / EP size of the benchmarks; tests/gpu picks its own (gpu4 tests,
# e.g. PP=2 x TP=2, run when 4 GPUs are visible).
# FlashInfer is benchmarked and tested when importable (install the wheels first; CUDA_HOME set).
set -u
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="src:.:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
OUT="${OUT:-gpu_out}"; mkdir -p "$OUT"
STEPS="${STEPS:-tests tests_moe tests_moe_sentinel tests_moe_warmup demo bench sweep}"
WORLD="${WORLD:-2}"
step() {  # name, limit in seconds, command...
  local name=$1 limit=$2; shift 2
  echo "=== $name (limit ${limit}s)"
  # appended (O_APPEND): a child still writing after a timeout kill (e.g. multiprocessing's
  # resource tracker) would otherwise write at its own offset, over the rc line (session 24)
  : > "$OUT/$name.log"
  timeout "$limit" "$@" >> "$OUT/$name.log" 2>&1; echo "rc=$?" >> "$OUT/$name.log"
  tail -n 25 "$OUT/$name.log"
}
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'nccl', torch.cuda.nccl.version())"
case " $STEPS " in *" tests "*)
  step gpu_tests 330 python3 -m pytest -q -p no:cacheprovider tests/gpu \
    --ignore=tests/gpu/test_moe_p2p.py --ignore=tests/gpu/test_moe_loopback.py ;; esac
case " $STEPS " in *" tests_moe "*)
  step gpu_tests_moe 560 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_p2p.py \
    -k "not (warmup or dispatchers_device or sentinel)" ;; esac
case " $STEPS " in *" tests_moe_default "*)   # the default lamport dispatcher's 2-GPU tests
  # alone (reference, graph replays, a missing rank, warmup, sentinel): a first call for a
  # short 2-GPU lease (session 24 had one call)
  T=tests/gpu/test_moe_p2p.py
  step gpu_tests_moe_default 560 python3 -m pytest -q -p no:cacheprovider \
    "$T::test_backends_match_reference_on_gpu[p2p-lamport]" \
    "$T::test_p2p_cuda_graph_replays_fresh_inputs[p2p-lamport]" \
    "$T::test_p2p_missing_rank_times_out_naming_it[p2p-lamport]" \
    "$T::test_p2p_warmup_leaves_nothing_to_compile[p2p-lamport]" \
    "$T::test_p2p_lamport_slots_back_to_sentinel[p2p-lamport]" ;; esac
case " $STEPS " in *" tests_moe_sentinel "*)   # 14 calls per variant after a warm-up each
  step gpu_tests_moe_sentinel 560 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_moe_p2p.py -k sentinel ;; esac
case " $STEPS " in *" tests_moe_warmup "*)   # compiles every variant cold: a step of its own
  step gpu_tests_moe_warmup 560 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_moe_p2p.py -k "warmup or dispatchers_device" ;; esac
case " $STEPS " in *" loopback "*)
  step gpu_tests_loopback 560 python3 -m pytest -q -p no:cacheprovider \
    tests/gpu/test_moe_loopback.py -k "${PYTEST_K:-warmup}" ;; esac
case " $STEPS " in *" demo "*)
  step demo_llama 120 python3 -m llmcomm.cli demo --device cuda --preset llama-8b
  step demo_dsv3 150 python3 -m llmcomm.cli demo --device cuda --preset deepseek-v3
  step demo_dsv3_compile 200 python3 -m llmcomm.cli demo --device cuda --preset deepseek-v3 \
    --compile
  # session 33: the MoE dispatch in fp8 (lamport for the decode steps' dispatcher sizes)
  step demo_dsv3_fp8 150 python3 -m llmcomm.cli demo --device cuda --preset deepseek-v3 \
    --moe-fp8 ;; esac
case " $STEPS " in *" bench "*)
  step bench_allreduce 240 python3 benchmarks/bench_allreduce.py --check --strategies --world "$WORLD" --out "$OUT"
  step bench_moe 300 python3 benchmarks/bench_moe.py --world "$WORLD" --out "$OUT" ;; esac
case " $STEPS " in *" moe_ab "*)
  step ab_a 240 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1024,4096 \
    --sweep-only default,rt,croles,croles_r8 --out "$OUT/ab_a"
  step ab_b 150 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1024,4096 \
    --sweep-only croles_r8,croles,rt,default --out "$OUT/ab_b" ;; esac
case " $STEPS " in *" moe_ab_ce "*)   # session 17: the dispatch's rows by copy_ (ce), ~9 min
  step probe_copy_engine 90 python3 benchmarks/probe_copy_engine.py --peer --out "$OUT/probe_ce.json"
  step ab_ce_a 330 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1024,2048,4096 \
    --sweep-only default,ce,ce_r4,ce_g112 --out "$OUT/ab_ce_a"
  step ab_ce_b 150 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1024,2048,4096 \
    --sweep-only ce_g112,ce_r4,ce,default --out "$OUT/ab_ce_b" ;; esac
case " $STEPS " in *" moe_ab_ce_tests "*)   # a call of its own: the ce 2-GPU tests
  step gpu_tests_moe_ce 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_p2p.py \
    -k "ce" ;; esac
case " $STEPS " in *" moe_ab_tests "*)   # a call of its own: the flags GPU tests (~5 min)
  step gpu_tests_moe_flags 300 python3 -m pytest -q -p no:cacheprovider tests/gpu/test_moe_p2p.py \
    -k flags ;; esac
case " $STEPS " in *" stress "*)   # session 18: random call sequences checked after each call
  step stress_moe 570 python3 benchmarks/stress_moe_p2p.py --variants "${STRESS_VARIANTS:-lam}" \
    --sizes "${STRESS_SIZES:-large}" --seconds "${STRESS_S:-400}" ${STRESS_ARGS:-} --out "$OUT" ;; esac
case " $STEPS " in *" moe_ab_pdl "*)   # the lamport pair without PDL (the default since
  # session 24) / without the per-thread spin (the default since session 20), both orders
  # (~5 min cold)
  step ab_pdl_a 260 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_nopdl,lam_notspin --out "$OUT/ab_pdl_a"
  step ab_pdl_b 140 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam_notspin,lam_nopdl,lam --out "$OUT/ab_pdl_b" ;; esac
case " $STEPS " in *" moe_ab_early "*)   # the lamport pair with own rows placed after the
  # receive (as before session 25) against the default, both orders (~4 min cold)
  step ab_early_a 240 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_noearly --out "$OUT/ab_early_a"
  step ab_early_b 140 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam_noearly,lam --out "$OUT/ab_early_b" ;; esac
case " $STEPS " in *" moe_ab_gate "*)   # session 26's GATE against the masked-off form
  step ab_gate_a 240 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_nogate --out "$OUT/ab_gate_a"
  step ab_gate_b 140 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam_nogate,lam --out "$OUT/ab_gate_b" ;; esac
case " $STEPS " in *" moe_ab_direct "*)   # session 27's counts by direct claims, zeroed at
  # entry, against the "last program out" (lam_nodirect)
  step ab_direct_a 240 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_nodirect --out "$OUT/ab_direct_a"
  step ab_direct_b 140 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam_nodirect,lam --out "$OUT/ab_direct_b" ;; esac
case " $STEPS " in *" decode_now "*)   # session 29: the first call of a short 2-GPU window --
  # the decode standing table with today's defaults (lam: DIRECT, GATE, EARLY) and, in the same
  # run and both orders, the three A/Bs queued since sessions 25-27 (~3-4 min cold: session 24
  # compiled and timed three configs in 108 s)
  step decode_now_a 330 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_nodirect,lam_nogate,lam_noearly --out "$OUT/decode_now_a"
  step decode_now_b 200 python3 benchmarks/bench_moe.py --sweep --split --sweep-tokens 1,8,64,128 \
    --sweep-only lam_noearly,lam_nogate,lam_nodirect,lam --out "$OUT/decode_now_b" ;; esac
case " $STEPS " in *" trace "*)   # session 26: the lamport dispatch's stage table on 2 GPUs
  # (lam_trace, P2PBackend(_trace=True)) beside the unstamped default (~3 min cold)
  step trace 200 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 1,8,64,128 \
    --sweep-only lam,lam_trace --out "$OUT/trace" ;; esac
case " $STEPS " in *" packed "*)   # session 31: the packed expert_x on NVLink
  step packed_tests 300 python3 -m pytest -q tests/gpu/test_moe_p2p.py -k "packed"
  step packed_a 150 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 128,1024,4096 \
    --sweep-only default,packed --out "$OUT/packed_a"
  step packed_b 150 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 128,1024,4096 \
    --sweep-only packed,default --out "$OUT/packed_b" ;; esac
case " $STEPS " in *" fp8 "*)   # session 32: the fp8 dispatch on NVLink
  step fp8_tests 300 python3 -m pytest -q tests/gpu/test_moe_p2p.py -k "fp8"
  step fp8_a 200 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 128,1024,4096 \
    --sweep-only default,fp8,packed,packed_fp8 --out "$OUT/fp8_a"
  step fp8_b 200 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 128,1024,4096 \
    --sweep-only packed_fp8,packed,fp8,default --out "$OUT/fp8_b"
  step fp8_lam_a 150 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 1,8,64,128 \
    --sweep-only default,lam_fp8 --out "$OUT/fp8_lam_a"
  step fp8_lam_b 150 python3 benchmarks/bench_moe.py --sweep --sweep-tokens 1,8,64,128 \
    --sweep-only lam_fp8,default --out "$OUT/fp8_lam_b" ;; esac
case " $STEPS " in *" floor_small "*)   # session 19: the data-movement floor at decode sizes
  for t in 1 64 128; do
    step "floor_t$t" 150 python3 benchmarks/bench_moe_floor.py --tokens "$t" --programs 128 \
      --rungs dispatch_us,combine_us,pair_us,wire_us,expand_us --out "$OUT/floor_t$t"
  done ;; esac
case " $STEPS " in *" sweep "*)
  if [ "$WORLD" -gt 2 ]; then   # W>2: where Lamport / one-shot / two-shot cross (docs/kernels.md)
    step sweep_allreduce 240 python3 benchmarks/bench_allreduce.py --sweep --reps 7 --world "$WORLD" \
      --sweep-only auto,chunked,rows,rows_p256,oneshot,twoshot \
      --sweep-tokens 1 4 16 64 128 256 512 1024 2048 --out "$OUT"
  else
    step sweep_allreduce 90 python3 benchmarks/bench_allreduce.py --sweep --reps 7 --out "$OUT"
  fi
  step sweep_moe 90 python3 benchmarks/bench_moe.py --sweep --out "$OUT" ;; esac
