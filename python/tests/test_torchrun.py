"""torchrun --nproc-per-node 2..4 on CPU: longattn's TCP communicator from torchrun's environment,
each rank's shard of o and the gradients against the oracle on the whole batch."""

import os
import random
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def run_torchrun(processes, script, *arguments, timeout=300):
    environment = dict(os.environ, OMP_NUM_THREADS="1", LONGATTN_COMM_TIMEOUT_S="60")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               script, *arguments]
    return subprocess.run(command, env=environment, capture_output=True, text=True, timeout=timeout)


@pytest.mark.parametrize("processes", [2, 3, 4])
def test_ranks_match_the_single_process_oracle(processes):
    seed = random.randrange(2**31)
    result = run_torchrun(processes, os.path.join(HERE, "torchrun_worker.py"), str(seed))
    assert result.returncode == 0, f"seed {seed}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.count("every problem matches the oracle") == processes, result.stdout[-4000:]
