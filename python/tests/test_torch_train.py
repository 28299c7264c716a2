"""examples/torch_train.py under torchrun on 2 CPU ranks: the losses of longattn's distributed
attention equal the one-process SDPA model's step by step (tiny sizes, a few steps)."""

import json
import os

import pytest

from test_torchrun import run_torchrun

EXAMPLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "examples", "torch_train.py")


@pytest.mark.parametrize("strategy", ["ring", "auto"])
def test_two_ranks_train_like_one_process_with_sdpa(strategy):
    result = run_torchrun(2, EXAMPLE, "--steps", "3", "--seq-len", "96", "--dim", "32", "--strategy", strategy)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(lines) == 1, result.stdout[-3000:]
    report = json.loads(lines[0][len("RESULT "):])
    assert report["ranks"] == 2 and len(report["losses"]) == 3 and len(report["sdpa_losses"]) == 3
    for ours, theirs in zip(report["losses"], report["sdpa_losses"]):
        assert abs(ours - theirs) <= 1e-4 * max(1.0, abs(theirs))
    assert report["losses"][-1] < report["losses"][0], "training did not lower the loss"


def test_the_report_has_the_step_time_and_cuda_without_a_gpu_is_one_clear_error():
    import subprocess
    import sys

    import torch

    result = run_torchrun(2, EXAMPLE, "--steps", "2", "--seq-len", "64", "--dim", "32")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    report = json.loads([line for line in result.stdout.splitlines() if line.startswith("RESULT ")][0][len("RESULT "):])
    assert report["device"] == "cpu" and report["step_ms"] > 0 and report["tokens_per_second"] > 0
    if torch.cuda.is_available():
        pytest.skip("a CUDA device is visible: the refusal is for machines without one")
    refused = subprocess.run([sys.executable, EXAMPLE, "--device", "cuda"], capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2
    assert "--device cuda: this PyTorch sees no CUDA device" in refused.stderr and "--device cpu" in refused.stderr
