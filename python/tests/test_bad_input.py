"""Every bad input is refused with one exception whose message says what to do."""

import pytest
import torch

import longattn.torch as lt


def problem(generator, tokens=16, q_heads=4, kv_heads=2, head_dim=8, dtype=torch.float32):
    make = lambda heads: torch.randn((tokens, heads, head_dim), generator=generator).to(dtype)  # noqa: E731
    return make(q_heads), make(kv_heads), make(kv_heads)


def test_dtype_not_supported(generator):
    q, k, v = problem(generator, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"torch.float64.*torch.bfloat16"):
        lt.attention(q, k, v, causal=True)


def test_integer_tensor_refused(generator):
    q, k, v = problem(generator)
    with pytest.raises(TypeError, match="dtype torch.int64"):
        lt.attention(q.long(), k, v, causal=True)


def test_mixed_dtypes(generator):
    q, k, v = problem(generator)
    with pytest.raises(TypeError, match="k has dtype torch.bfloat16 but q has torch.float32"):
        lt.attention(q, k.bfloat16(), v, causal=True)


def test_not_a_tensor(generator):
    q, k, v = problem(generator)
    with pytest.raises(TypeError, match="v must be a torch.Tensor"):
        lt.attention(q, k, v.numpy(), causal=True)


def test_device_not_supported(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match=r"meta.*\.cpu\(\)"):
        lt.attention(q.to("meta"), k.to("meta"), v.to("meta"), causal=True)


def test_k_on_another_device_than_q(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match=r"k is on meta.*k\.cpu\(\)"):
        lt.attention(q, k.to("meta"), v, causal=True)


def test_non_contiguous(generator):
    q, k, v = problem(generator)
    transposed = q.transpose(1, 2).contiguous().transpose(1, 2)
    with pytest.raises(ValueError, match=r"q is not contiguous.*q\.contiguous\(\)"):
        lt.attention(transposed, k, v, causal=True)


def test_wrong_rank_of_shape(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match=r"\[tokens, heads, head_dim\]"):
        lt.attention(q.unsqueeze(0), k, v, causal=True)


def test_heads_not_a_multiple(generator):
    q, k, v = problem(generator, q_heads=5, kv_heads=2)
    with pytest.raises(ValueError, match="multiple"):
        lt.attention(q, k, v, causal=True)


def test_token_counts_differ(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match="same tokens"):
        lt.attention(q[:-1].contiguous(), k, v, causal=True)


def test_k_and_v_differ(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match="k has shape .* but v has"):
        lt.attention(q, k, v[:, :1].contiguous(), causal=True)


def test_causal_must_be_given_as_bool(generator):
    q, k, v = problem(generator)
    with pytest.raises(TypeError):
        lt.attention(q, k, v)
    with pytest.raises(TypeError, match="causal must be True or False"):
        lt.attention(q, k, v, causal=1)


def test_unknown_strategy_and_layout(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match=r"strategy 'rings' is unknown; choose one of"):
        lt.attention(q, k, v, causal=True, strategy="rings")
    with pytest.raises(ValueError, match=r"layout 'zig' is unknown; choose one of"):
        lt.attention(q, k, v, causal=True, layout="zig")


def test_cu_seqlens_malformed(generator):
    q, k, v = problem(generator)
    with pytest.raises(TypeError, match="cu_seqlens must be a torch.Tensor"):
        lt.attention(q, k, v, causal=True, cu_seqlens=[0, 16])
    with pytest.raises(ValueError, match="1-D int32"):
        lt.attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0.0, 16.0]))


def test_cu_seqlens_that_disagree_with_the_rows(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match=r"16 rows but rank 0 holds 20 .*shard"):
        lt.attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 5, 20], dtype=torch.int32))


def test_cu_seqlens_decreasing_is_refused_by_the_library(generator):
    q, k, v = problem(generator)
    with pytest.raises(ValueError, match="cu_seqlens"):
        lt.attention(q, k, v, causal=True, cu_seqlens=torch.tensor([0, 10, 4, 16], dtype=torch.int32))


def test_group_without_torch_distributed(generator):
    q, k, v = problem(generator)
    with pytest.raises((ValueError, TypeError), match="group"):
        lt.attention(q, k, v, causal=True, group=object())


def test_sharding_of_a_batch_that_does_not_match_cu_seqlens(generator):
    q, k, _ = problem(generator)
    with pytest.raises(ValueError, match="cu_seqlens ends at 12 but the batch has 16 tokens"):
        lt.Sharding(q, k, causal=True, cu_seqlens=torch.tensor([0, 12], dtype=torch.int32))
