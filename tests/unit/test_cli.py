"""The doctor explains its decisions for the seed scenarios without GPUs."""

import pytest

from llmcomm.cli import main


def test_doctor_cpu_tp2_pp2(capsys):
    assert main(["doctor", "--tp", "2", "--pp", "2"]) == 0
    out = capsys.readouterr().out
    assert "tp groups: [[0, 1], [2, 3]]" in out
    assert "backend=auto       -> torch" in out
    assert "p2p        unavailable: needs CUDA" in out
    assert "torch.compile: 6 custom ops (all_reduce, all_reduce_out" in out
    assert "ordered side effects: 6/6" in out


def test_doctor_simulated_gpus_pp2_keeps_p2p_fusion_and_gates_flashinfer(capsys):
    assert main(["doctor", "--tp", "2", "--pp", "2", "--simulate-gpus", "8",
                 "--flashinfer", "current"]) == 0
    out = capsys.readouterr().out
    assert "backend=auto       -> p2p" in out
    assert "fusion stays on with PP=2" in out
    assert "FlashInfer fusion off with PP=2" in out
    # the kernel each size gets (policy strategy + launch plan), W=2
    assert "(1 tokens bf16) -> lamport" in out and "lamport_kernel grid=" in out
    assert "(1024 tokens bf16) -> lamport" in out and "lamport_rows_kernel grid=128" in out
    assert "(8192 tokens bf16) -> twoshot" in out
    # EP = DP x PCP x TP = 2 here: lamport for a decode dispatcher, flags for a large one
    assert "MoE p2p protocol (EP=2, bf16)" in out
    assert "  128 -> lamport (max_tokens_per_rank 128 <= 128 at EP=2" in out
    assert " 4096 -> flags (max_tokens_per_rank 4096 > 128" in out


def test_doctor_two_nodes_explicit_p2p_is_an_error(capsys):
    assert main(["doctor", "--tp", "4", "--nodes", "2", "--simulate-gpus", "2",
                 "--flashinfer", "old"]) == 0
    out = capsys.readouterr().out
    assert "backend=p2p        -> ValueError" in out and "spans 2 nodes" in out


def test_doctor_bad_layout():
    with pytest.raises(ValueError, match=">= 1"):
        main(["doctor", "--tp", "0"])


def test_bench_without_gpus_says_what_it_needs():
    import torch

    if torch.cuda.is_available() and torch.cuda.device_count() >= 2:
        pytest.skip("this machine has GPUs: the sweep would really run")
    with pytest.raises(SystemExit, match="2 or more CUDA GPUs"):
        main(["bench", "allreduce", "--hidden", "4096"])


def test_bench_finds_the_sweeps_in_the_source_tree():
    from llmcomm.cli.bench import find_sweep

    assert find_sweep("allreduce").name == "bench_allreduce.py"
    assert find_sweep("moe").name == "bench_moe.py"


@pytest.mark.parametrize("preset, words", [("tiny", "tiny has hidden 64"),
                                           ("llama-8b", "and no MoE layer")])
def test_demo_moe_fp8_needs_an_moe_preset_of_hidden_128k(preset, words):
    """``demo --moe-fp8`` refuses a preset it cannot run before any process starts."""
    with pytest.raises(SystemExit, match=words) as e:
        main(["demo", "--moe-fp8", "--preset", preset])
    assert "use --preset tiny128 (cpu) or deepseek-v3" in str(e.value)
