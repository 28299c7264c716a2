"""The oracle the tests compare with: PyTorch's scaled_dot_product_attention on its math backend,
in float64, sequence by sequence of a packed batch, with GQA by repeating kv heads."""

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel


def reference_attention(q, k, v, *, causal, cu_seqlens=None):
    """o [T, Hq, D] of the whole batch, in q's dtype, computed in float64; differentiable."""
    group = q.shape[1] // k.shape[1]
    q64, k64, v64 = q.double(), k.double().repeat_interleave(group, 1), v.double().repeat_interleave(group, 1)
    bounds = [0, q.shape[0]] if cu_seqlens is None else [int(x) for x in cu_seqlens.tolist()]
    pieces = []
    with sdpa_kernel(SDPBackend.MATH):
        for start, end in zip(bounds[:-1], bounds[1:]):
            if end == start:
                continue
            pieces.append(F.scaled_dot_product_attention(q64[start:end].transpose(0, 1), k64[start:end].transpose(0, 1),
                                                         v64[start:end].transpose(0, 1),
                                                         is_causal=causal).transpose(0, 1))
    return torch.cat(pieces).to(q.dtype)


def random_lengths(generator, count, longest):
    """Sequence lengths including an empty and a one-token sequence, the rest random."""
    lengths = [int(x) for x in torch.randint(2, longest, (count,), generator=generator)]
    return [0, 1] + lengths


def prefix_sums(lengths):
    sums = [0]
    for length in lengths:
        sums.append(sums[-1] + length)
    return torch.tensor(sums, dtype=torch.int32)
