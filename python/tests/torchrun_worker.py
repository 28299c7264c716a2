"""One process of a torchrun job (test_torchrun.py): every rank draws the same whole batch from the
seed it is given, attends with its shard through the op, and compares its rows of o, dq, dk, dv
with the float64 SDPA oracle on the whole batch; also the refusal of a group that is not the world.
Exits non-zero with the first disagreement."""

import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))
import longattn.torch as lt  # noqa: E402
from reference import prefix_sums, random_lengths, reference_attention  # noqa: E402

TOLERANCE = dict(atol=3e-5, rtol=3e-5)


def check_problem(generator, *, causal, q_heads, kv_heads, strategy, layout, lengths):
    cu_seqlens = prefix_sums(lengths)
    total, head_dim = int(cu_seqlens[-1]), 16
    q = torch.randn((total, q_heads, head_dim), generator=generator)
    k, v = (torch.randn((total, kv_heads, head_dim), generator=generator) for _ in range(2))
    d_o = torch.randn(q.shape, generator=generator)

    sharding = lt.Sharding(q, k, causal=causal, cu_seqlens=cu_seqlens, strategy=strategy, layout=layout)
    local = [sharding.shard(t).requires_grad_() for t in (q, k, v)]
    o = lt.attention(*local, causal=causal, cu_seqlens=cu_seqlens, strategy=strategy, layout=layout)
    (o * sharding.shard(d_o)).sum().backward()

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = reference_attention(*full, causal=causal, cu_seqlens=cu_seqlens)
    (o_ref * d_o).sum().backward()
    where = f"rank {lt.rank()} of {lt.world_size()}, {strategy}/{layout}, causal={causal}, heads {q_heads}/{kv_heads}"
    for name, got, want in zip(("o", "dq", "dk", "dv"), [o.detach()] + [t.grad for t in local],
                               [o_ref.detach()] + [t.grad for t in full]):
        torch.testing.assert_close(got, sharding.shard(want), **TOLERANCE, msg=lambda m: f"{where}: {name}: {m}")


def check_group_refusal(generator):
    dist.init_process_group("gloo")
    q = torch.randn((8, 2, 8), generator=generator)
    # The world group is accepted; a group of rank 0 alone disagrees with torchrun's world.
    lt.attention(q, q, q, causal=True, group=dist.group.WORLD)
    alone = dist.new_group(ranks=[0])
    if dist.get_rank() == 0:
        try:
            lt.attention(q, q, q, causal=True, group=alone)
        except ValueError as error:
            assert "pass group=None" in str(error), str(error)
        else:
            raise AssertionError("a group of 1 rank under a world of several was accepted")
    dist.barrier()
    dist.destroy_process_group()


def main():
    seed = int(sys.argv[1])
    world = int(os.environ["WORLD_SIZE"])
    assert lt.world_size() == world and lt.rank() == int(os.environ["RANK"]), "longattn's world is not torchrun's"
    generator = torch.Generator().manual_seed(seed)
    check_problem(generator, causal=True, q_heads=8, kv_heads=2, strategy="ring", layout="zigzag",
                  lengths=[64 * world])
    check_problem(generator, causal=False, q_heads=4, kv_heads=1, strategy="ring", layout="striped",
                  lengths=[30 * world + 2])
    check_problem(generator, causal=True, q_heads=12, kv_heads=12, strategy="ulysses", layout="zigzag",
                  lengths=[24 * world])
    check_problem(generator, causal=True, q_heads=4, kv_heads=2, strategy="auto", layout="zigzag",
                  lengths=random_lengths(generator, 3, 50))
    check_problem(generator, causal=False, q_heads=4, kv_heads=2, strategy="ring", layout="contiguous",
                  lengths=random_lengths(generator, 3, 50))
    check_group_refusal(generator)
    print(f"rank {lt.rank()}: every problem matches the oracle")


if __name__ == "__main__":
    main()
