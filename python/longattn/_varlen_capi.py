"""ctypes mirror of the balanced variable-length part of include/longattn/longattn.h (longattn_varlen_*):
its structs, its enum and the signatures of its functions, registered on the library _capi loaded."""

import ctypes

from ._capi import Tensor, lib

BALANCES = {"hierarchical": 0, "per-sequence-zigzag": 1, "whole-sequences": 2}


class VarlenParams(ctypes.Structure):
    _fields_ = [
        ("struct_size", ctypes.c_size_t),
        ("cu_seqlens", ctypes.POINTER(ctypes.c_int32)),
        ("batch", ctypes.c_int),
        ("q_heads", ctypes.c_int),
        ("kv_heads", ctypes.c_int),
        ("head_dim", ctypes.c_int),
        ("dtype", ctypes.c_int),
        ("causal", ctypes.c_int),
        ("scale", ctypes.c_float),
        ("balance", ctypes.c_int),
        ("gpus_per_node", ctypes.c_int),
        ("cap_tokens", ctypes.c_int64),
        ("machine", ctypes.c_char_p),
        ("machine_file", ctypes.c_char_p),
        ("gradient_transport", ctypes.c_int),
    ]


class VarlenInfo(ctypes.Structure):
    _fields_ = [
        ("total_tokens", ctypes.c_int64),
        ("linear_begin", ctypes.c_int64),
        ("linear_tokens", ctypes.c_int64),
        ("attention_tokens", ctypes.c_int64),
        ("groups", ctypes.c_int),
        ("modelled_imbalance", ctypes.c_double),
    ]


_handle = ctypes.c_void_p
_status = ctypes.c_int
_tensor = ctypes.POINTER(Tensor)
_SIGNATURES = {
    "longattn_varlen_params_init": (None, [ctypes.POINTER(VarlenParams)]),
    "longattn_varlen_create": (_status, [_handle, _handle, ctypes.POINTER(VarlenParams), ctypes.POINTER(_handle)]),
    "longattn_varlen_destroy": (None, [_handle]),
    "longattn_varlen_get_info": (_status, [_handle, ctypes.POINTER(VarlenInfo)]),
    "longattn_varlen_linear_rows": (
        _status, [_handle, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.POINTER(ctypes.c_int64)]),
    "longattn_varlen_attention_index": (
        _status,
        [_handle, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
    ),
    "longattn_varlen_to_attention": (_status, [_handle, _tensor, _tensor, ctypes.c_void_p]),
    "longattn_varlen_to_linear": (_status, [_handle, _tensor, _tensor, ctypes.c_void_p]),
    "longattn_varlen_forward": (_status, [_handle] + [_tensor] * 5 + [ctypes.c_void_p]),
    "longattn_varlen_backward": (_status, [_handle] + [_tensor] * 9 + [ctypes.c_void_p]),
}

for _name, (_restype, _argtypes) in _SIGNATURES.items():
    try:
        _function = getattr(lib, _name)
    except AttributeError:
        raise ImportError(f"the installed longattn library has no {_name}: it predates the balanced varlen C API; "
                          "reinstall the package from this checkout (`pip install ./python`)") from None
    _function.restype = _restype
    _function.argtypes = _argtypes
