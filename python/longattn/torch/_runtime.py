"""The process's longattn communicator and the planned attention objects the op runs.

A communicator's creation is collective (a TCP rendezvous, an MPI or NCCL setup), so it happens
once per process, on first use, for the launcher's whole world; planned attention objects are
cached by everything that defines them, which every rank computes alike, so a cache miss (a
collective creation) happens on every rank at the same call.
"""

import atexit
import collections
import contextlib
import ctypes
import os
import socket

import torch

from .. import _capi
from .._capi import check, lib

_TORCHRUN_VARIABLES = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE")
_MPI_LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK")
# torch's own store may listen on MASTER_PORT; longattn's rendezvous uses the next port.
_TCP_PORT_OFFSET = 1

# Planned objects kept per process: a training loop over packed batches of changing lengths plans a
# new one per batch, and the oldest are released (every rank evicts the same, being in step).
_PLANNED_OBJECTS_KEPT = 16

DTYPES = {torch.float32: _capi.DTYPE_F32, torch.bfloat16: _capi.DTYPE_BF16, torch.float16: _capi.DTYPE_F16}


def _free_local_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launcher():
    """'torchrun', 'mpi' or 'none' (a plain process: one rank)."""
    if all(name in os.environ for name in _TORCHRUN_VARIABLES):
        return "torchrun"
    if any(name in os.environ for name in _MPI_LAUNCHER_VARIABLES):
        return "mpi"
    return "none"


def _create_host_communicator():
    handle = ctypes.c_void_p()
    kind = launcher()
    if kind == "torchrun":
        check(lib.longattn_comm_create_tcp_from_env(_TCP_PORT_OFFSET, ctypes.byref(handle)))
    elif kind == "mpi":
        check(lib.longattn_comm_create_mpi_world(ctypes.byref(handle)))
    else:
        # One rank over TCP: the communicator of a world of one, described the way torchrun would.
        single = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_local_port() - _TCP_PORT_OFFSET),
                  "RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "1"}
        saved = {name: os.environ.get(name) for name in single}
        os.environ.update(single)
        try:
            check(lib.longattn_comm_create_tcp_from_env(_TCP_PORT_OFFSET, ctypes.byref(handle)))
        finally:
            for name, value in saved.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value
    return handle


class World:
    """The launcher's processes: host communicator, NCCL over it when CUDA tensors come, contexts
    per device and the planned attention objects."""

    def __init__(self):
        self.host = _create_host_communicator()
        rank, size = ctypes.c_int(), ctypes.c_int()
        check(lib.longattn_comm_rank(self.host, ctypes.byref(rank)))
        check(lib.longattn_comm_size(self.host, ctypes.byref(size)))
        self.rank, self.size = rank.value, size.value
        self.nccl = None
        self.contexts = {}
        self.attentions = collections.OrderedDict()

    def communicator_for(self, device):
        if device.type == "cpu":
            return self.host
        if self.nccl is None:
            handle = ctypes.c_void_p()
            check(lib.longattn_comm_create_nccl(self.host, ctypes.byref(handle)))
            self.nccl = handle
        return self.nccl

    def context_for(self, device):
        key = (device.type, device.index or 0)
        if key not in self.contexts:
            where = _capi.Device(_capi.DEVICE_CPU, 0) if device.type == "cpu" else _capi.Device(_capi.DEVICE_CUDA, key[1])
            handle = ctypes.c_void_p()
            check(lib.longattn_context_create(b"auto", where, ctypes.byref(handle)))
            self.contexts[key] = handle
        return self.contexts[key]

    def attention(self, device, dtype, q_heads, kv_heads, head_dim, causal, scale, layout, strategy, cu_seqlens):
        key = (device.type, device.index or 0, dtype, q_heads, kv_heads, head_dim, causal, scale, layout, strategy,
               cu_seqlens)
        if key in self.attentions:
            self.attentions.move_to_end(key)
        else:
            params = _capi.AttentionParams()
            lib.longattn_attention_params_init(ctypes.byref(params))
            prefix_sums = (ctypes.c_int32 * len(cu_seqlens))(*cu_seqlens)
            params.cu_seqlens = prefix_sums
            params.batch = len(cu_seqlens) - 1
            params.q_heads, params.kv_heads, params.head_dim = q_heads, kv_heads, head_dim
            params.dtype = DTYPES[dtype]
            params.causal = int(causal)
            params.scale = scale
            params.layout = _capi.LAYOUTS[layout]
            params.strategy = _capi.STRATEGIES[strategy]
            handle = ctypes.c_void_p()
            check(lib.longattn_attention_create(self.context_for(device), self.communicator_for(device),
                                                ctypes.byref(params), ctypes.byref(handle)))
            self.attentions[key] = Attention(handle)
            while len(self.attentions) > _PLANNED_OBJECTS_KEPT:
                _, oldest = self.attentions.popitem(last=False)
                lib.longattn_attention_destroy(oldest.handle)
        return self.attentions[key]

    def close(self):
        for attention in self.attentions.values():
            lib.longattn_attention_destroy(attention.handle)
        for context in self.contexts.values():
            lib.longattn_context_destroy(context)
        if self.nccl is not None:
            lib.longattn_comm_destroy(self.nccl)
        lib.longattn_comm_destroy(self.host)
        self.attentions, self.contexts, self.nccl = collections.OrderedDict(), {}, None


class Attention:
    """One planned attention object: what it runs and which tokens each rank holds."""

    def __init__(self, handle):
        self.handle = handle
        info = _capi.AttentionInfo()
        check(lib.longattn_attention_get_info(handle, ctypes.byref(info)))
        self.strategy = _capi.STRATEGY_NAMES[info.strategy]
        self.ulysses_size, self.ring_size = info.ulysses_size, info.ring_size
        self.total_tokens, self.local_tokens = info.total_tokens, info.local_tokens
        self._index = {}

    def shard_index(self, rank):
        """(global index int64, position int32) CPU tensors of the tokens `rank` holds, in local order."""
        if rank not in self._index:
            count = ctypes.c_int64()
            check(lib.longattn_attention_shard_index(self.handle, rank, ctypes.byref(count), None, None, 0))
            index = torch.empty(count.value, dtype=torch.int64)
            positions = torch.empty(count.value, dtype=torch.int32)
            check(lib.longattn_attention_shard_index(self.handle, rank, None, index.data_ptr(), positions.data_ptr(),
                                                     count.value))
            self._index[rank] = (index, positions)
        return self._index[rank]

    def choice_reason(self):
        reason = ctypes.c_char_p()
        check(lib.longattn_attention_choice_reason(self.handle, ctypes.byref(reason)))
        return reason.value.decode(errors="replace")


_world = None


def world():
    global _world
    if _world is None:
        _world = World()
        # Released before the interpreter and the C++ runtime tear down, so the communicator's
        # threads are joined while everything they use still exists (a peer that already left
        # only makes its sends fail, which the teardown ignores).
        atexit.register(_world.close)
    return _world


def descriptor(tensor):
    """A C API descriptor of a torch tensor (its real strides: the library refuses non-dense ones)."""
    if tensor.device.type == "cpu":
        where = _capi.Device(_capi.DEVICE_CPU, 0)
    else:
        where = _capi.Device(_capi.DEVICE_CUDA, tensor.device.index)
    shape = (ctypes.c_int64 * 4)(*tensor.shape)
    strides = (ctypes.c_int64 * 4)(*tensor.stride())
    return _capi.Tensor(tensor.data_ptr() or None, DTYPES[tensor.dtype], where, tensor.dim(), shape, strides)


def on_device_of(tensor):
    """Makes the tensor's GPU current for the call (the C API's CUDA contexts expect that)."""
    if tensor.device.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(tensor.device)


def stream_of(tensor):
    if tensor.device.type != "cuda":
        return None
    return ctypes.c_void_p(torch.cuda.current_stream(tensor.device).cuda_stream)
