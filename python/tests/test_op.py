"""The op against the float64 SDPA oracle in one process (one rank): forward and backward,
causal and full, MHA/GQA/MQA, packed varlen batches, every strategy and layout."""

import pytest
import torch

import longattn.torch as lt
from reference import prefix_sums, random_lengths, reference_attention

TOLERANCE = dict(atol=2e-5, rtol=2e-5)


def random_problem(generator, tokens, q_heads, kv_heads, head_dim=16):
    shape_q, shape_kv = (tokens, q_heads, head_dim), (tokens, kv_heads, head_dim)
    return (torch.randn(shape_q, generator=generator), torch.randn(shape_kv, generator=generator),
            torch.randn(shape_kv, generator=generator))


def forward_and_backward(function, q, k, v, d_o):
    q, k, v = (t.clone().requires_grad_() for t in (q, k, v))
    o = function(q, k, v)
    (o * d_o).sum().backward()
    return o.detach(), q.grad, k.grad, v.grad


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("q_heads,kv_heads", [(4, 4), (8, 2), (6, 1)])
def test_forward_and_backward_match_sdpa(generator, causal, q_heads, kv_heads):
    q, k, v = random_problem(generator, 97, q_heads, kv_heads)
    d_o = torch.randn(q.shape, generator=generator)
    got = forward_and_backward(lambda q, k, v: lt.attention(q, k, v, causal=causal), q, k, v, d_o)
    want = forward_and_backward(lambda q, k, v: reference_attention(q, k, v, causal=causal), q, k, v, d_o)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_batch_matches_sdpa_per_sequence(generator, causal):
    cu_seqlens = prefix_sums(random_lengths(generator, 4, 60))
    q, k, v = random_problem(generator, int(cu_seqlens[-1]), 4, 2)
    d_o = torch.randn(q.shape, generator=generator)
    got = forward_and_backward(lambda q, k, v: lt.attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens), q, k, v,
                               d_o)
    want = forward_and_backward(lambda q, k, v: reference_attention(q, k, v, causal=causal, cu_seqlens=cu_seqlens),
                                q, k, v, d_o)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")


@pytest.mark.parametrize("strategy", ["ring", "ulysses", "hybrid", "auto"])
@pytest.mark.parametrize("layout", ["zigzag", "contiguous", "striped"])
def test_every_strategy_and_layout_on_one_rank(generator, strategy, layout):
    q, k, v = random_problem(generator, 40, 4, 2)
    o = lt.attention(q, k, v, causal=True, strategy=strategy, layout=layout)
    torch.testing.assert_close(o, reference_attention(q, k, v, causal=True), **TOLERANCE)


def test_lse_is_the_log_sum_exp_of_the_scaled_scores(generator):
    q, k, v = random_problem(generator, 30, 2, 2)
    o, lse = lt.attention(q, k, v, causal=False, scale=0.3, return_lse=True)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) * 0.3
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, dim=-1), atol=1e-5, rtol=1e-5)
    assert lse.shape == (2, 30) and lse.dtype == torch.float32


def test_bf16_is_close_to_the_float64_oracle(generator):
    q, k, v = (t.to(torch.bfloat16) for t in random_problem(generator, 64, 4, 2))
    o = lt.attention(q, k, v, causal=True)
    assert o.dtype == torch.bfloat16
    torch.testing.assert_close(o.float(), reference_attention(q.float(), k.float(), v.float(), causal=True),
                               atol=2e-2, rtol=2e-2)


def test_one_rank_sharding_holds_every_row_in_order(generator):
    q, k, _ = random_problem(generator, 50, 4, 2)
    sharding = lt.Sharding(q, k, causal=True)
    assert lt.world_size() == 1 and lt.rank() == 0
    assert torch.equal(sharding.index(), torch.arange(50))
    assert torch.equal(lt.shard(q, sharding), q)
    assert torch.equal(lt.unshard(q, sharding), q)


def test_many_batch_shapes_replan_after_the_oldest_are_released(generator):
    # More distinct batches than the planned objects kept, then the first again: still exact.
    q, k, v = random_problem(generator, 40, 2, 1)
    first = prefix_sums([0, 5, 35])
    sharding = lt.Sharding(q, k, causal=True, cu_seqlens=first)
    for cut in range(1, 21):
        lt.attention(q, k, v, causal=True, cu_seqlens=prefix_sums([cut, 40 - cut]))
    torch.testing.assert_close(lt.attention(q, k, v, causal=True, cu_seqlens=first),
                               reference_attention(q, k, v, causal=True, cu_seqlens=first), **TOLERANCE)
    assert torch.equal(sharding.index(), torch.arange(40))


def test_gradients_flow_through_shard_and_unshard(generator):
    q, k, v = random_problem(generator, 36, 4, 2)
    d_o = torch.randn(q.shape, generator=generator)

    def through_sharding(q, k, v):
        sharding = lt.Sharding(q, k, causal=True, strategy="ring", layout="striped")
        local = [sharding.shard(t) for t in (q, k, v)]
        return sharding.unshard(lt.attention(*local, causal=True, strategy="ring", layout="striped"))

    got = forward_and_backward(through_sharding, q, k, v, d_o)
    want = forward_and_backward(lambda q, k, v: reference_attention(q, k, v, causal=True), q, k, v, d_o)
    for name, g, w in zip(("o", "dq", "dk", "dv"), got, want):
        torch.testing.assert_close(g, w, **TOLERANCE, msg=lambda m, name=name: f"{name}: {m}")
