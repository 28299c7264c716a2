"""longattn.torch.BalancedBatch in one process (one rank) against the float64 SDPA oracle: a step
from the linear layout through to_attention, attention and from_attention, forward and gradients,
for every balance, causal and full, GQA; the remap's rows and its round trip; torch.compile through
the ops; bad input; and CUDA tensors in bf16 where a GPU is present. test_varlen_torchrun.py runs the same step over 2 and 3 ranks."""

import pytest
import torch

import longattn.torch as lt
from reference import prefix_sums, random_lengths, reference_attention

TOLERANCE = dict(atol=3e-5, rtol=3e-5)
LOW_PRECISION_TOLERANCE = 5e-2  # bf16: largest error relative to the oracle's largest magnitude
BALANCES = ["hierarchical", "per-sequence-zigzag", "whole-sequences"]


def check_balanced_step(generator, *, balance, causal, q_heads, kv_heads, lengths, cap_tokens=0, gpus_per_node=None,
                        head_dim=16, device="cpu", dtype=torch.float32):
    """Every rank draws the same whole batch; its linear slice goes to the attention layout,
    through attention and back, and its rows of o and of the gradients (which flow back through
    both remaps) must be the oracle's on the whole batch."""
    cu_seqlens = prefix_sums(lengths)
    total = int(cu_seqlens[-1])
    q = torch.randn((total, q_heads, head_dim), generator=generator).to(device, dtype)
    k, v = (torch.randn((total, kv_heads, head_dim), generator=generator).to(device, dtype) for _ in range(2))
    d_o = torch.randn(q.shape, generator=generator).to(device, dtype)

    batch = lt.BalancedBatch(cu_seqlens, balance, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim, causal=causal,
                             dtype=dtype, device=device, cap_tokens=cap_tokens, gpus_per_node=gpus_per_node)
    rows = batch.linear_slice()
    assert rows.stop - rows.start == batch.linear_tokens
    local = [t[rows].clone().requires_grad_() for t in (q, k, v)]
    in_attention_layout = [batch.to_attention(t) for t in local]
    index, positions = batch.attention_index()
    for moved, whole in zip(in_attention_layout, (q, k, v)):
        assert torch.equal(moved.detach(), whole[index.to(device)]), "the remap did not deliver the rows attention_index names"
    starts = cu_seqlens.long()[torch.searchsorted(cu_seqlens.long(), index, right=True) - 1]
    assert torch.equal(positions.long(), index - starts), "positions are not those inside each sequence"
    o = batch.from_attention(batch.attention(*in_attention_layout))
    (o * d_o[rows]).sum().backward()

    full = [t.clone().requires_grad_() for t in (q, k, v)]
    o_ref = reference_attention(*full, causal=causal, cu_seqlens=cu_seqlens)
    (o_ref * d_o).sum().backward()
    where = (f"rank {lt.rank()} of {lt.world_size()}, {balance}, causal={causal}, heads {q_heads}/{kv_heads}, "
             f"lengths {lengths}, cap {cap_tokens}")
    for name, got, want in zip(("o", "dq", "dk", "dv"), [o.detach()] + [t.grad for t in local],
                               [o_ref.detach()] + [t.grad for t in full]):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want[rows], **TOLERANCE, msg=lambda m, name=name: f"{where}: {name}: {m}")
        else:
            error, scale = (got.float() - want[rows].float()).abs().max(), want.float().abs().max().clamp(min=1)
            assert error <= LOW_PRECISION_TOLERANCE * scale, f"{where}: {name}: max error {error} (scale {scale})"


@pytest.mark.parametrize("balance", BALANCES)
@pytest.mark.parametrize("causal", [True, False])
def test_step_through_remap_matches_sdpa(generator, balance, causal):
    check_balanced_step(generator, balance=balance, causal=causal, q_heads=6, kv_heads=2,
                        lengths=random_lengths(generator, 4, 50))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("balance", BALANCES)
def test_step_on_cuda_tensors_matches_sdpa(generator, balance):
    check_balanced_step(generator, balance=balance, causal=True, q_heads=8, kv_heads=2, head_dim=64,
                        lengths=random_lengths(generator, 4, 300), device="cuda", dtype=torch.bfloat16)


def test_round_trip_is_the_identity_and_the_remaps_are_each_others_gradient(generator):
    batch = lt.BalancedBatch([0, 7, 7, 60, 61, 90], q_heads=2, head_dim=8, dtype=torch.float32)
    for shape, dtype in (((90,), torch.float32), ((90, 5), torch.bfloat16), ((90, 2, 3, 4), torch.float16)):
        x = torch.randn(shape, generator=generator).to(dtype)
        there = batch.to_attention(x)
        assert there.shape == (batch.attention_tokens,) + shape[1:] and there.dtype == dtype
        assert torch.equal(batch.from_attention(there), x)
    x = torch.randn((90, 3), generator=generator, requires_grad=True)
    weight = torch.randn((90, 3), generator=generator)
    (batch.to_attention(x) * weight).sum().backward()
    assert torch.equal(x.grad, batch.from_attention(weight))
    y = torch.randn((90, 3), generator=generator, requires_grad=True)
    (batch.from_attention(y) * weight).sum().backward()
    assert torch.equal(y.grad, batch.to_attention(weight))


def test_compiled_step_equals_eager(generator):
    batch = lt.BalancedBatch([0, 20, 50, 51], q_heads=4, kv_heads=2, head_dim=16, dtype=torch.float32)
    q = torch.randn((51, 4, 16), generator=generator)
    k, v = (torch.randn((51, 2, 16), generator=generator) for _ in range(2))
    weight = torch.randn(16, generator=generator)

    def step(q, k, v, weight):
        o = batch.attention(*(batch.to_attention(t) for t in (torch.tanh(q) * weight, k, v)))
        return batch.from_attention(o).square().sum()

    def run(function):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, weight)]
        function(*leaves).backward()
        return [t.grad for t in leaves]

    eager, compiled = run(step), run(torch.compile(step, fullgraph=True))
    for name, got, want in zip(("dq", "dk", "dv", "dweight"), compiled, eager):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5, msg=lambda m, name=name: f"{name}: {m}")


def test_bad_input_is_one_clear_error(generator):
    with pytest.raises(ValueError, match="balance 'round-robin' is unknown"):
        lt.BalancedBatch([0, 10], "round-robin", q_heads=2, head_dim=8)
    with pytest.raises(ValueError, match="not a multiple of kv_heads"):
        lt.BalancedBatch([0, 10], q_heads=3, kv_heads=2, head_dim=8)
    with pytest.raises(TypeError, match="cu_seqlens must be"):
        lt.BalancedBatch("0,10", q_heads=2, head_dim=8)
    with pytest.raises(lt.LongattnValueError, match="cu_seqlens"):
        lt.BalancedBatch([0, 10, 5], q_heads=2, head_dim=8)
    with pytest.raises(lt.LongattnValueError, match="cap"):
        lt.BalancedBatch([0, 10, 30], q_heads=2, head_dim=8, cap_tokens=4)
    batch = lt.BalancedBatch([0, 10, 30], q_heads=2, head_dim=8, dtype=torch.float32)
    with pytest.raises(ValueError, match="holds 30 rows of the batch's 30 in the linear layout"):
        batch.to_attention(torch.randn((29, 2, 8), generator=generator))
    with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
        batch.to_attention(torch.zeros((30, 2), dtype=torch.int64))
    with pytest.raises(ValueError, match="is on meta"):
        batch.from_attention(torch.empty((30, 2), device="meta"))
    q = torch.randn((30, 2, 8), generator=generator)
    with pytest.raises(ValueError, match="planned with causal=True"):
        batch.attention(q, q, q, causal=False)
    with pytest.raises(TypeError, match="plan's is torch.float32"):
        batch.attention(q.bfloat16(), q.bfloat16(), q.bfloat16())
    with pytest.raises(ValueError, match=r"the plan wants \[30, 2, 8\]"):
        batch.attention(q, q[:, :, :4], q)
