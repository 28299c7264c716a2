"""The distributed attention op: `longattn::attention_forward` and `longattn::attention_backward`
registered with torch.library (fake implementations for torch.compile, autograd linking the two),
and `attention()`, the checked entry point users call."""

import math
from typing import Optional

import torch

from .. import _capi
from .._capi import check, lib
from . import _runtime

_ALL_RANKS = -1  # group_rank/group_size when the caller passed no group: the launcher's whole world


def global_cu_seqlens(cu_seqlens, local_tokens, world_size):
    """The whole batch's prefix sums as a tuple; with none given, one sequence of every rank's rows."""
    if cu_seqlens is None:
        return (0, local_tokens * world_size)
    return tuple(int(x) for x in cu_seqlens.tolist())


def check_group(world, group_rank, group_size):
    if group_size != _ALL_RANKS and (group_size != world.size or group_rank != world.rank):
        raise ValueError(
            f"group has {group_size} ranks and this process is its rank {group_rank}, but the launcher started "
            f"{world.size} processes and this is rank {world.rank}: longattn runs over the launcher's whole world, "
            "so pass group=None (or the world group)")


def planned_attention(q, k, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size):
    world = _runtime.world()
    check_group(world, group_rank, group_size)
    prefix_sums = global_cu_seqlens(cu_seqlens, q.shape[0], world.size)
    attention = world.attention(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], causal, scale, layout,
                                strategy, prefix_sums)
    if attention.local_tokens != q.shape[0]:
        raise ValueError(
            f"q, k, v have {q.shape[0]} rows but rank {world.rank} holds {attention.local_tokens} of the batch's "
            f"{attention.total_tokens} tokens under layout {layout!r} and strategy {strategy!r}: give this rank's "
            "shard (longattn.torch.Sharding(...).shard(x)), and cu_seqlens of the whole batch when its length is "
            "not rows x ranks")
    return attention


def _effective_scale(scale, head_dim):
    return scale if scale is not None and scale > 0 else 1.0 / math.sqrt(head_dim)


@torch.library.custom_op("longattn::attention_forward", mutates_args=())
def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor],
                      causal: bool, scale: float, strategy: str, layout: str, group_rank: int,
                      group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    with _runtime.on_device_of(q):
        return _run_forward(q, k, v, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size)


def _run_forward(q, k, v, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size):
    attention = planned_attention(q, k, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size)
    o = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    d = _runtime.descriptor
    check(lib.longattn_attention_forward(attention.handle, d(q), d(k), d(v), d(o), d(lse), _runtime.stream_of(q)))
    return o, lse


@attention_forward.register_fake
def _(q, k, v, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longattn::attention_backward", mutates_args=())
def attention_backward(d_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                       lse: torch.Tensor, cu_seqlens: Optional[torch.Tensor], causal: bool, scale: float,
                       strategy: str, layout: str, group_rank: int,
                       group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with _runtime.on_device_of(q):
        return _run_backward(d_o, q, k, v, o, lse, cu_seqlens, causal, scale, strategy, layout, group_rank,
                             group_size)


def _run_backward(d_o, q, k, v, o, lse, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size):
    attention = planned_attention(q, k, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size)
    d_o = d_o.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = _runtime.descriptor
    check(lib.longattn_attention_backward(attention.handle, d(q), d(k), d(v), d(o), d(lse), d(d_o), d(dq), d(dk),
                                          d(dv), _runtime.stream_of(q)))
    return dq, dk, dv


@attention_backward.register_fake
def _(d_o, q, k, v, o, lse, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, causal, scale, strategy, layout, group_rank, group_size = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.settings = (causal, scale, strategy, layout, group_rank, group_size)


def _backward(ctx, d_o, d_lse):
    # lse is an output for callers who merge partial results; it carries no gradient of its own.
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    if d_o is None:
        d_o = torch.zeros_like(o)
    dq, dk, dv = attention_backward(d_o, q, k, v, o, lse, cu_seqlens, *ctx.settings)
    return dq, dk, dv, None, None, None, None, None, None, None


attention_forward.register_autograd(_backward, setup_context=_setup_context)


def _check_tensor(name, tensor, q):
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in _runtime.DTYPES:
        raise TypeError(f"{name} has dtype {tensor.dtype}; longattn takes torch.float32, torch.bfloat16 or "
                        f"torch.float16: convert it with {name}.to(torch.bfloat16) (or float32 on CPU)")
    if tensor.device.type not in ("cpu", "cuda"):
        raise ValueError(f"{name} is on {tensor.device}; longattn runs on CPU and CUDA tensors: move it with "
                         f"{name}.cpu() or {name}.cuda()")
    if tensor.dim() != 3:
        raise ValueError(f"{name} has shape {tuple(tensor.shape)}; longattn wants [tokens, heads, head_dim] "
                         "(packed THD): reshape a [batch, tokens, ...] tensor with .flatten(0, 1) and pass cu_seqlens")
    if not tensor.is_contiguous():
        raise ValueError(f"{name} is not contiguous (strides {tensor.stride()}); pass {name}.contiguous()")
    if tensor is not q:
        if tensor.dtype != q.dtype:
            raise TypeError(f"{name} has dtype {tensor.dtype} but q has {q.dtype}: give q, k and v one dtype")
        if tensor.device != q.device:
            raise ValueError(f"{name} is on {tensor.device} but q is on {q.device}: put q, k and v on one device")


def attention(q, k, v, *, causal, cu_seqlens=None, strategy="auto", layout="zigzag", group=None, scale=None,
              return_lse=False):
    """Exact softmax attention of this rank's queries over the keys of every rank.

    q: [n, q_heads, head_dim]; k, v: [n, kv_heads, head_dim] (q_heads % kv_heads == 0): this rank's
    shard of the batch (the rows `Sharding(...).shard` gives it), float32/bfloat16/float16, CPU or
    CUDA (run on torch.cuda.current_stream()). causal: each token attends to those before it in its
    sequence. cu_seqlens: int tensor of prefix sums of the whole batch (batch + 1 entries from 0);
    None: one sequence of n x world_size tokens. strategy: "auto", "ring", "ulysses", "hybrid".
    layout: "zigzag", "contiguous", "striped". group: None or the world's torch.distributed group
    (longattn runs over the launcher's whole world). scale: softmax scale, default 1/sqrt(head_dim).
    Returns o shaped like q, and with return_lse=True also lse [q_heads, n] float32 (no gradient).
    """
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be True or False, got {causal!r}")
    _check_tensor("q", q, q)
    _check_tensor("k", k, q)
    _check_tensor("v", v, q)
    if k.shape != v.shape:
        raise ValueError(f"k has shape {tuple(k.shape)} but v has {tuple(v.shape)}: they must match")
    if k.shape[0] != q.shape[0] or k.shape[2] != q.shape[2]:
        raise ValueError(f"q has shape {tuple(q.shape)} and k {tuple(k.shape)}: they need the same tokens (dim 0) "
                         "and head_dim (dim 2)")
    if k.shape[1] == 0 or q.shape[1] % k.shape[1] != 0:
        raise ValueError(f"q has {q.shape[1]} heads and k, v {k.shape[1]}: q's heads must be a multiple of k's "
                         "(GQA/MQA)")
    if cu_seqlens is not None:
        if not isinstance(cu_seqlens, torch.Tensor):
            raise TypeError("cu_seqlens must be a torch.Tensor of int32 prefix sums, e.g. "
                            "torch.tensor([0, 300, 1000], dtype=torch.int32)")
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1 or cu_seqlens.shape[0] < 2:
            raise ValueError(f"cu_seqlens has dtype {cu_seqlens.dtype} and shape {tuple(cu_seqlens.shape)}; it must "
                             "be a 1-D int32 tensor of batch + 1 prefix sums starting at 0")
    if strategy not in _capi.STRATEGIES:
        raise ValueError(f"strategy {strategy!r} is unknown; choose one of {sorted(_capi.STRATEGIES)}")
    if layout not in _capi.LAYOUTS:
        raise ValueError(f"layout {layout!r} is unknown; choose one of {sorted(_capi.LAYOUTS)}")
    group_rank, group_size = _group_position(group)
    o, lse = attention_forward(q, k, v, cu_seqlens, causal, _effective_scale(scale, q.shape[2]), strategy, layout,
                               group_rank, group_size)
    return (o, lse) if return_lse else o


def _group_position(group):
    if group is None:
        return _ALL_RANKS, _ALL_RANKS
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("group was given but torch.distributed is not initialized: pass group=None (longattn "
                         "runs over the launcher's world by itself)")
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed.ProcessGroup or None, got {type(group).__name__}")
    return dist.get_rank(group), dist.get_world_size(group)
