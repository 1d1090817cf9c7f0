"""``import llmcomm`` stays light: no triton, no optional library, no CUDA initialisation."""

import os
import subprocess
import sys
from pathlib import Path

SRC = str(Path(__file__).resolve().parents[2] / "src")


def test_import_does_not_pull_triton_or_flashinfer():
    code = ("import sys, llmcomm; llmcomm.TPCommunicator; llmcomm.EPDispatcher; "
            "from llmcomm import policy, probe; probe.flashinfer; "
            "bad = [m for m in ('triton', 'flashinfer') if m in sys.modules]; "
            "import torch; print(bad, torch.cuda.is_initialized())")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([SRC, os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=True, env=env).stdout.strip()
    assert out == "[] False", out


def test_public_names():
    import llmcomm

    for name in llmcomm.__all__:
        assert getattr(llmcomm, name) is not None, name
