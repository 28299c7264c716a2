"""longattn's distributed attention as a PyTorch op (torch.library, with autograd and a fake
implementation for torch.compile), and the helpers that say which rows each rank holds.

Under torchrun the op runs over all of torchrun's processes (longattn's TCP communicator, from
torchrun's environment); under mpirun over MPI's world; in a plain process as one rank. CPU tensors
run the CPU backend, CUDA tensors the GPU backends over NCCL on torch.cuda.current_stream().
`BalancedBatch` balances a packed variable-length batch over the ranks and remaps tensors between
the layout linear layers want and the one attention runs on, with gradients through the remap.
"""

from .._capi import LongattnError, LongattnValueError
from ._op import attention
from ._sharding import Sharding, shard, unshard
from ._varlen import BalancedBatch


def world_size():
    """The number of ranks the op runs over (1 in a plain process)."""
    from ._runtime import world

    return world().size


def rank():
    """This process's rank among them."""
    from ._runtime import world

    return world().rank


__all__ = ["attention", "BalancedBatch", "Sharding", "shard", "unshard", "world_size", "rank", "LongattnError", "LongattnValueError"]
