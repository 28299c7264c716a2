"""BalancedBatch under torchrun --nproc-per-node 2 and 3 on CPU (longattn's TCP communicator): every
rank runs test_varlen's step from its linear slice through the remap, attention and back, and its
rows of o and of the gradients must be the float64 SDPA oracle's on the whole batch, for every
balance, with a cap and one rank per node forcing long sequences over several ranks, and with
ranks that hold no rows in the attention layout. Run by
torchrun, this file is the worker."""

import os
import random
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.mark.parametrize("processes", [2, 3])
def test_ranks_match_the_oracle_through_the_remap(processes):
    from test_torchrun import run_torchrun

    seed = random.randrange(2**31)
    result = run_torchrun(processes, os.path.abspath(__file__), str(seed))
    assert result.returncode == 0, f"seed {seed}\n{result.stdout[-4000:]}\n{result.stderr[-4000:]}"
    assert result.stdout.count("balanced steps match the oracle") == processes, result.stdout[-4000:]


def main():
    import torch

    sys.path.insert(0, HERE)
    import longattn.torch as lt
    from reference import random_lengths
    from test_varlen import BALANCES, check_balanced_step

    generator = torch.Generator().manual_seed(int(sys.argv[1]))
    world = lt.world_size()
    assert world == int(os.environ["WORLD_SIZE"]), "longattn's world is not torchrun's"
    for balance in BALANCES:
        for causal in (True, False):
            check_balanced_step(generator, balance=balance, causal=causal, q_heads=4, kv_heads=2,
                                lengths=random_lengths(generator, 4, 40))
    # One long sequence and short ones, every rank its own node, under a cap: the long one must be
    # split over ranks (a ring across "nodes"), the short ones stay whole.
    for balance in ("hierarchical", "per-sequence-zigzag"):
        lengths = random_lengths(generator, 3, 20) + [60 * world + 5]
        check_balanced_step(generator, balance=balance, causal=True, q_heads=6, kv_heads=3, lengths=lengths,
                            cap_tokens=(sum(lengths) + world - 1) // world + 6, gpus_per_node=1)
    # One sequence, whole on one rank: the others hold no rows in the attention layout.
    check_balanced_step(generator, balance="whole-sequences", causal=True, q_heads=2, kv_heads=1,
                        lengths=[0, 20 + world])
    print(f"rank {lt.rank()}: balanced steps match the oracle")


if __name__ == "__main__":
    main()
