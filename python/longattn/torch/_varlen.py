"""Balanced variable-length batches in PyTorch: `BalancedBatch` plans a packed batch over the ranks
(the C API's longattn_varlen_*), and three autograd-aware custom ops (with fake implementations for
torch.compile) run on it: the remap from the linear layout to the attention layout, the way back,
and attention on the attention layout. The backward of one remap is the other remap of the gradient,
so gradients flow through remap -> attention -> remap back to the linear layout's tensors."""

import atexit
import contextlib
import ctypes
import itertools
import math
import weakref

import torch

from .._capi import check, lib
from . import _runtime

# Every live plan by id: the ops take the id (an int, which torch.library can carry and
# torch.compile can bake in), and look the plan up here.
_plans = weakref.WeakValueDictionary()
_ids = itertools.count(1)
_closing_registered = False


def _bindings():
    from .. import _varlen_capi

    return _varlen_capi


class _Plan:
    """Owns one longattn_varlen handle; released when the last BalancedBatch or autograd graph
    holding it goes, or at exit before the process's communicator."""

    def __init__(self, handle):
        self.handle = handle
        info = _bindings().VarlenInfo()
        check(lib.longattn_varlen_get_info(handle, ctypes.byref(info)))
        self.total_tokens, self.groups = info.total_tokens, info.groups
        self.linear_begin, self.linear_tokens = info.linear_begin, info.linear_tokens
        self.attention_tokens, self.modelled_imbalance = info.attention_tokens, info.modelled_imbalance
        self.id = next(_ids)
        _plans[self.id] = self

    def close(self):
        if self.handle is not None:
            lib.longattn_varlen_destroy(self.handle)
            self.handle = None

    def __del__(self):
        self.close()


def _close_every_plan():
    for plan in list(_plans.values()):
        plan.close()


def _plan(plan_id):
    plan = _plans.get(plan_id)
    if plan is None or plan.handle is None:
        raise RuntimeError(f"the BalancedBatch of plan {plan_id} was released: keep it alive while its tensors are in use")
    return plan


def _remap(x, plan_id, function, rows):
    plan = _plan(plan_id)
    # As [rows, width]: the remap moves whole rows of any shape (and a rank may hold no rows).
    width = math.prod(x.shape[1:])
    source = x.contiguous().reshape(x.shape[0], width)
    out = x.new_empty((rows,) + tuple(x.shape[1:]))
    d = _runtime.descriptor
    with _runtime.on_device_of(x):
        check(function(plan.handle, d(source), d(out.view(rows, width)), _runtime.stream_of(x)))
    return out


@torch.library.custom_op("longattn::varlen_to_attention", mutates_args=())
def varlen_to_attention(x: torch.Tensor, plan_id: int) -> torch.Tensor:
    return _remap(x, plan_id, lib.longattn_varlen_to_attention, _plan(plan_id).attention_tokens)


@varlen_to_attention.register_fake
def _(x, plan_id):
    return x.new_empty((_plan(plan_id).attention_tokens,) + tuple(x.shape[1:]))


@torch.library.custom_op("longattn::varlen_to_linear", mutates_args=())
def varlen_to_linear(x: torch.Tensor, plan_id: int) -> torch.Tensor:
    return _remap(x, plan_id, lib.longattn_varlen_to_linear, _plan(plan_id).linear_tokens)


@varlen_to_linear.register_fake
def _(x, plan_id):
    return x.new_empty((_plan(plan_id).linear_tokens,) + tuple(x.shape[1:]))


def _remember_plan(ctx, inputs, output):
    ctx.plan_id = inputs[-1]
    ctx.plan = _plan(ctx.plan_id)  # the graph keeps the plan alive until its backward ran


# A remap is a permutation of rows across ranks, so its adjoint is the inverse permutation.
varlen_to_attention.register_autograd(lambda ctx, grad: (varlen_to_linear(grad, ctx.plan_id), None),
                                      setup_context=_remember_plan)
varlen_to_linear.register_autograd(lambda ctx, grad: (varlen_to_attention(grad, ctx.plan_id), None),
                                   setup_context=_remember_plan)


@torch.library.custom_op("longattn::varlen_attention_forward", mutates_args=())
def varlen_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                             plan_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    plan = _plan(plan_id)
    o = torch.empty_like(q)
    lse = torch.empty((q.shape[1], q.shape[0]), dtype=torch.float32, device=q.device)
    d = _runtime.descriptor
    with _runtime.on_device_of(q):
        check(lib.longattn_varlen_forward(plan.handle, d(q), d(k), d(v), d(o), d(lse), _runtime.stream_of(q)))
    return o, lse


@varlen_attention_forward.register_fake
def _(q, k, v, plan_id):
    return torch.empty_like(q), q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)


@torch.library.custom_op("longattn::varlen_attention_backward", mutates_args=())
def varlen_attention_backward(d_o: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor,
                              lse: torch.Tensor, plan_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    plan = _plan(plan_id)
    d_o = d_o.to(q.dtype).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    d = _runtime.descriptor
    with _runtime.on_device_of(q):
        check(lib.longattn_varlen_backward(plan.handle, d(q), d(k), d(v), d(o), d(lse), d(d_o), d(dq), d(dk), d(dv),
                                           _runtime.stream_of(q)))
    return dq, dk, dv


@varlen_attention_backward.register_fake
def _(d_o, q, k, v, o, lse, plan_id):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _save_for_attention_backward(ctx, inputs, output):
    q, k, v, plan_id = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse)
    ctx.plan_id = plan_id
    ctx.plan = _plan(plan_id)


def _attention_backward(ctx, d_o, d_lse):
    # lse is returned for callers who merge partial results; it carries no gradient of its own.
    q, k, v, o, lse = ctx.saved_tensors
    if d_o is None:
        d_o = torch.zeros_like(o)
    dq, dk, dv = varlen_attention_backward(d_o, q, k, v, o, lse, ctx.plan_id)
    return dq, dk, dv, None


varlen_attention_forward.register_autograd(_attention_backward, setup_context=_save_for_attention_backward)


def _cu_seqlens_list(cu_seqlens):
    if isinstance(cu_seqlens, torch.Tensor):
        if cu_seqlens.dtype not in (torch.int32, torch.int64) or cu_seqlens.dim() != 1:
            raise ValueError(f"cu_seqlens has dtype {cu_seqlens.dtype} and shape {tuple(cu_seqlens.shape)}; it must be a "
                             "1-D int32 tensor of batch + 1 prefix sums starting at 0")
        values = [int(x) for x in cu_seqlens.tolist()]
    elif isinstance(cu_seqlens, (list, tuple)) and all(isinstance(x, int) for x in cu_seqlens):
        values = list(cu_seqlens)
    else:
        raise TypeError("cu_seqlens must be a 1-D int tensor or a list of ints: the prefix sums of the whole batch, "
                        "e.g. torch.tensor([0, 300, 1000], dtype=torch.int32)")
    if len(values) < 2:
        raise ValueError(f"cu_seqlens has {len(values)} entries; it needs batch + 1 >= 2 prefix sums starting at 0")
    if any(x < 0 or x >= 2**31 for x in values):
        raise ValueError("cu_seqlens holds values outside int32's range [0, 2**31): prefix sums of token counts")
    return values


class BalancedBatch:
    """A packed batch of sequences of different lengths, balanced over the ranks for attention.

    Linear layers want equal tokens per rank: in the *linear layout* rank r holds the contiguous
    rows `linear_slice()` of the packed batch. Attention wants equal work per rank: in the
    *attention layout* short sequences stay whole on one rank and long ones are split over a group
    of ranks (balance="hierarchical", the cost-model planner), or every sequence is zigzagged over
    all ranks ("per-sequence-zigzag"), or placed whole ("whole-sequences"). A step is

        q, k, v = (batch.to_attention(t) for t in (q, k, v))   # [linear_tokens, ...] -> [attention_tokens, ...]
        o = batch.attention(q, k, v)
        o = batch.from_attention(o)                              # back to the linear layout

    and autograd carries the gradients back the same way. Creating one is collective: every rank
    passes the same arguments (checked).

    cu_seqlens: prefix sums of the whole batch (batch + 1 ints from 0; empty sequences allowed).
    q_heads, kv_heads (default q_heads), head_dim, dtype, causal: the attention this plan runs
    (the planner balances its cost, so they are fixed here). device: where the tensors live (CPU,
    or the CUDA device of this rank). scale: softmax scale, default 1/sqrt(head_dim). cap_tokens:
    most tokens one rank may hold in the attention layout (0: none). gpus_per_node: ranks per node
    (default: from the hosts' names). machine: the cost model's machine, "h100", "h200" or "cpu"
    (default: by device).
    """

    def __init__(self, cu_seqlens, balance="hierarchical", *, q_heads, head_dim, kv_heads=None, causal=True,
                 dtype=torch.bfloat16, device="cpu", scale=None, cap_tokens=0, gpus_per_node=None, machine=None):
        bindings = _bindings()
        prefix_sums = _cu_seqlens_list(cu_seqlens)
        balance_name = balance.replace("_", "-") if isinstance(balance, str) else balance
        if balance_name not in bindings.BALANCES:
            raise ValueError(f"balance {balance!r} is unknown; choose one of {sorted(bindings.BALANCES)}")
        if not isinstance(causal, bool):
            raise TypeError(f"causal must be True or False, got {causal!r}")
        if dtype not in _runtime.DTYPES:
            raise TypeError(f"dtype {dtype} is not one longattn runs: torch.float32, torch.bfloat16 or torch.float16")
        kv_heads = q_heads if kv_heads is None else kv_heads
        for name, value in (("q_heads", q_heads), ("kv_heads", kv_heads), ("head_dim", head_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if q_heads % kv_heads != 0:
            raise ValueError(f"q_heads {q_heads} is not a multiple of kv_heads {kv_heads} (GQA/MQA)")
        device = torch.device(device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device {device} is not one longattn runs on: 'cpu' or a CUDA device")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())

        world = _runtime.world()
        global _closing_registered
        if not _closing_registered:
            # Registered after the world's own exit hook, so it runs first: plans go before the
            # communicators they were made on.
            atexit.register(_close_every_plan)
            _closing_registered = True
        params = bindings.VarlenParams()
        lib.longattn_varlen_params_init(ctypes.byref(params))
        self._prefix_sums = (ctypes.c_int32 * len(prefix_sums))(*prefix_sums)
        params.cu_seqlens = self._prefix_sums
        params.batch = len(prefix_sums) - 1
        params.q_heads, params.kv_heads, params.head_dim = q_heads, kv_heads, head_dim
        params.dtype = _runtime.DTYPES[dtype]
        params.causal = int(causal)
        params.scale = scale if scale is not None and scale > 0 else 1.0 / math.sqrt(head_dim)
        params.balance = bindings.BALANCES[balance_name]
        params.gpus_per_node = 0 if gpus_per_node is None else int(gpus_per_node)
        params.cap_tokens = int(cap_tokens)
        params.machine = machine.encode() if machine else None
        handle = ctypes.c_void_p()
        with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
            check(lib.longattn_varlen_create(world.context_for(device), world.communicator_for(device),
                                             ctypes.byref(params), ctypes.byref(handle)))
        self._plan = _Plan(handle)
        self.cu_seqlens = torch.tensor(prefix_sums, dtype=torch.int32)
        self.balance, self.causal, self.dtype, self.device = balance_name, causal, dtype, device
        self.q_heads, self.kv_heads, self.head_dim = q_heads, kv_heads, head_dim
        self.rank, self.world_size = world.rank, world.size

    # ---- the two layouts ------------------------------------------------------------------------
    @property
    def total_tokens(self):
        return self._plan.total_tokens

    @property
    def linear_tokens(self):
        """Rows of this rank's tensors in the linear layout."""
        return self._plan.linear_tokens

    @property
    def attention_tokens(self):
        """Rows of this rank's q, k, v, o in the attention layout."""
        return self._plan.attention_tokens

    @property
    def modelled_imbalance(self):
        """The cost model's slowest rank over the mean rank for this plan."""
        return self._plan.modelled_imbalance

    def linear_slice(self, rank=None):
        """The slice of whole-batch rows `rank` (default this rank) holds in the linear layout."""
        begin, tokens = ctypes.c_int64(), ctypes.c_int64()
        check(lib.longattn_varlen_linear_rows(self._plan.handle, self.rank if rank is None else rank,
                                              ctypes.byref(begin), ctypes.byref(tokens)))
        return slice(begin.value, begin.value + tokens.value)

    def attention_index(self, rank=None):
        """(global index int64, position int32) CPU tensors of the rows `rank` (default this rank)
        holds in the attention layout, in its local order (positions inside their sequences, for
        rotary embeddings)."""
        rank = self.rank if rank is None else rank
        count = ctypes.c_int64()
        check(lib.longattn_varlen_attention_index(self._plan.handle, rank, ctypes.byref(count), None, None, 0))
        index = torch.empty(count.value, dtype=torch.int64)
        positions = torch.empty(count.value, dtype=torch.int32)
        check(lib.longattn_varlen_attention_index(self._plan.handle, rank, None, index.data_ptr() or None,
                                                  positions.data_ptr() or None, count.value))
        return index, positions

    # ---- the ops ------------------------------------------------------------------------------
    def to_attention(self, x):
        """This rank's rows of x in the linear layout ([linear_tokens, ...], any trailing shape)
        moved to the attention layout ([attention_tokens, ...]). Collective; differentiable."""
        self._check_rows("x", x, self.linear_tokens, "linear")
        return varlen_to_attention(x, self._plan.id)

    def from_attention(self, x):
        """The inverse of to_attention: [attention_tokens, ...] back to [linear_tokens, ...]."""
        self._check_rows("x", x, self.attention_tokens, "attention")
        return varlen_to_linear(x, self._plan.id)

    def attention(self, q, k, v, *, causal=None, return_lse=False):
        """Exact attention of the batch on the attention layout: q [attention_tokens, q_heads,
        head_dim], k, v [attention_tokens, kv_heads, head_dim] in the plan's dtype and device.
        causal: None or the plan's (the plan balanced that cost). Returns o shaped like q, and with
        return_lse=True also lse [q_heads, attention_tokens] float32 (no gradient). Collective."""
        if causal is not None and causal != self.causal:
            raise ValueError(f"causal={causal} but this BalancedBatch was planned with causal={self.causal}: make it "
                             f"with causal={causal} (the plan balances that attention's cost)")
        for name, tensor, heads in (("q", q, self.q_heads), ("k", k, self.kv_heads), ("v", v, self.kv_heads)):
            self._check_rows(name, tensor, self.attention_tokens, "attention")
            if tensor.dtype != self.dtype:
                raise TypeError(f"{name} has dtype {tensor.dtype} but the plan's is {self.dtype}: convert it with "
                                f"{name}.to({self.dtype}) or plan with dtype={tensor.dtype}")
            if tuple(tensor.shape[1:]) != (heads, self.head_dim):
                raise ValueError(f"{name} has shape {tuple(tensor.shape)}; the plan wants [{self.attention_tokens}, "
                                 f"{heads}, {self.head_dim}] ([tokens, heads, head_dim] in the attention layout)")
        o, lse = varlen_attention_forward(q.contiguous(), k.contiguous(), v.contiguous(), self._plan.id)
        return (o, lse) if return_lse else o

    def _check_rows(self, name, x, rows, layout):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _runtime.DTYPES:
            raise TypeError(f"{name} has dtype {x.dtype}; the remap and attention move float32, bfloat16 or float16 rows")
        if x.device != self.device:
            raise ValueError(f"{name} is on {x.device} but this BalancedBatch was made for {self.device}: move it, or "
                             f"make the BalancedBatch with device={str(x.device)!r}")
        if x.dim() < 1 or x.shape[0] != rows:
            raise ValueError(f"{name} has shape {tuple(x.shape)}; rank {self.rank} holds {rows} rows of the batch's "
                             f"{self.total_tokens} in the {layout} layout"
                             + (" (rows linear_slice() of the packed batch)" if layout == "linear" else
                                " (to_attention's output)"))
