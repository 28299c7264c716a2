"""Which rows of the whole batch each rank holds, for a given attention problem, and moving rows
between the whole batch and a rank's shard (differentiable: index_select and index_copy)."""

import torch

from . import _op, _runtime


class Sharding:
    """The token layout `attention()` expects for whole-batch tensors shaped like `q` and `k`.

    q, k: any tensors [tokens, heads, head_dim] of the problem (the whole batch, or only their
    shape, dtype and device matter); total_tokens: the whole batch's tokens (default q's rows);
    the other arguments are attention()'s and must be the same as in its calls. Ulysses and
    hybrid place tokens differently from a ring, so shard with the same strategy you attend with.
    """

    def __init__(self, q, k, *, causal, cu_seqlens=None, total_tokens=None, strategy="auto", layout="zigzag",
                 group=None, scale=None):
        world = _runtime.world()
        total = q.shape[0] if total_tokens is None else int(total_tokens)
        if cu_seqlens is None:
            if total % world.size != 0:
                raise ValueError(f"{total} tokens do not split evenly over {world.size} ranks: pass cu_seqlens "
                                 f"(torch.tensor([0, {total}], dtype=torch.int32)) to state the batch")
            cu_seqlens = torch.tensor([0, total], dtype=torch.int32)
        elif int(cu_seqlens[-1]) != total:
            raise ValueError(f"cu_seqlens ends at {int(cu_seqlens[-1])} but the batch has {total} tokens: they must "
                             "agree")
        _op.check_group(world, *_op._group_position(group))
        self.rank, self.world_size = world.rank, world.size
        attention = world.attention(q.device, q.dtype, q.shape[1], k.shape[1], q.shape[2], causal,
                                          _op._effective_scale(scale, q.shape[2]), layout, strategy,
                                          _op.global_cu_seqlens(cu_seqlens, 0, world.size))
        self.cu_seqlens = cu_seqlens
        self.strategy = attention.strategy
        self.local_tokens, self.total_tokens = attention.local_tokens, attention.total_tokens
        # Every rank's rows now: the planned object may be released later (runtime keeps a few).
        self._indices = [attention.shard_index(rank) for rank in range(world.size)]

    def index(self, rank=None):
        """int64 indices into the whole batch of the rows `rank` (default this rank) holds, in order."""
        return self._indices[self.rank if rank is None else rank][0]

    def positions(self, rank=None):
        """Each held row's position inside its sequence (int32), e.g. for rotary embeddings."""
        return self._indices[self.rank if rank is None else rank][1]

    def shard(self, full, rank=None):
        """The rows of the whole-batch tensor `full` ([total_tokens, ...]) that `rank` holds."""
        return full.index_select(0, self.index(rank).to(full.device))

    def unshard(self, local, out=None, rank=None):
        """Writes `rank`'s rows `local` into the whole-batch tensor `out` (zeros when None); returns it."""
        index = self.index(rank).to(local.device)
        if out is None:
            out = local.new_zeros((int(self.total_tokens),) + tuple(local.shape[1:]))
        return out.index_copy(0, index, local)


def shard(full, sharding, rank=None):
    """sharding.shard(full, rank): the rows of a whole-batch tensor that a rank holds."""
    return sharding.shard(full, rank)


def unshard(local, sharding, out=None, rank=None):
    """sharding.unshard(local, out, rank): a rank's rows written back into a whole-batch tensor."""
    return sharding.unshard(local, out, rank)
