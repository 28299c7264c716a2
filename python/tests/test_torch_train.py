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
