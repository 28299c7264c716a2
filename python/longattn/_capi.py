"""ctypes mirror of include/longattn/longattn.h: its structs, enums and functions, and the one place
where a failed status becomes a Python exception carrying the library's message."""

import ctypes
import os

ABI_VERSION = 1

OK = 0
ERROR_INVALID_ARGUMENT = 1
ERROR_UNSUPPORTED = 2

DTYPE_F32, DTYPE_BF16, DTYPE_F16 = 0, 1, 2
DEVICE_CPU, DEVICE_CUDA = 0, 1
LAYOUTS = {"contiguous": 0, "zigzag": 1, "striped": 2}
STRATEGIES = {"ring": 0, "ulysses": 1, "hybrid": 2, "auto": 3}
STRATEGY_NAMES = {value: name for name, value in STRATEGIES.items()}


class LongattnError(RuntimeError):
    """A call into the library failed; `status` is the C API's status name."""

    def __init__(self, message, status):
        super().__init__(message)
        self.status = status


class LongattnValueError(LongattnError, ValueError):
    """The library refused a value (shape, option, batch): the message says which and what to do."""


class Device(ctypes.Structure):
    _fields_ = [("kind", ctypes.c_int), ("index", ctypes.c_int)]


class Tensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("dtype", ctypes.c_int),
        ("device", Device),
        ("ndim", ctypes.c_int),
        ("shape", ctypes.c_int64 * 4),
        ("strides", ctypes.c_int64 * 4),
    ]


class AttentionParams(ctypes.Structure):
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
        ("layout", ctypes.c_int),
        ("strategy", ctypes.c_int),
        ("ulysses_size", ctypes.c_int),
        ("machine_file", ctypes.c_char_p),
        ("gradient_transport", ctypes.c_int),
    ]


class AttentionInfo(ctypes.Structure):
    _fields_ = [
        ("strategy", ctypes.c_int),
        ("ulysses_size", ctypes.c_int),
        ("ring_size", ctypes.c_int),
        ("total_tokens", ctypes.c_int64),
        ("local_tokens", ctypes.c_int64),
    ]


_handle = ctypes.c_void_p
_status = ctypes.c_int
_SIGNATURES = {
    "longattn_abi_version": (ctypes.c_int, []),
    "longattn_version_string": (ctypes.c_char_p, []),
    "longattn_last_error": (ctypes.c_char_p, []),
    "longattn_status_name": (ctypes.c_char_p, [ctypes.c_int]),
    "longattn_comm_create_mpi_world": (_status, [ctypes.POINTER(_handle)]),
    "longattn_comm_create_tcp_from_env": (_status, [ctypes.c_int, ctypes.POINTER(_handle)]),
    "longattn_comm_create_nccl": (_status, [_handle, ctypes.POINTER(_handle)]),
    "longattn_comm_destroy": (None, [_handle]),
    "longattn_comm_rank": (_status, [_handle, ctypes.POINTER(ctypes.c_int)]),
    "longattn_comm_size": (_status, [_handle, ctypes.POINTER(ctypes.c_int)]),
    "longattn_context_create": (_status, [ctypes.c_char_p, Device, ctypes.POINTER(_handle)]),
    "longattn_context_destroy": (None, [_handle]),
    "longattn_attention_params_init": (None, [ctypes.POINTER(AttentionParams)]),
    "longattn_attention_create": (_status, [_handle, _handle, ctypes.POINTER(AttentionParams), ctypes.POINTER(_handle)]),
    "longattn_attention_destroy": (None, [_handle]),
    "longattn_attention_get_info": (_status, [_handle, ctypes.POINTER(AttentionInfo)]),
    "longattn_attention_choice_reason": (_status, [_handle, ctypes.POINTER(ctypes.c_char_p)]),
    "longattn_attention_shard_index": (
        _status,
        [_handle, ctypes.c_int, ctypes.POINTER(ctypes.c_int64), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64],
    ),
    "longattn_attention_forward": (_status, [_handle] + [ctypes.POINTER(Tensor)] * 5 + [ctypes.c_void_p]),
    "longattn_attention_backward": (_status, [_handle] + [ctypes.POINTER(Tensor)] * 9 + [ctypes.c_void_p]),
}


def _load():
    path = os.environ.get("LONGATTN_C_LIBRARY") or os.path.join(os.path.dirname(__file__), "liblongattn_c.so")
    if not os.path.exists(path):
        raise ImportError(
            f"longattn's shared library is missing at {path}: install the package with "
            "`pip install ./python` from the repository (or set LONGATTN_C_LIBRARY to a liblongattn_c.so)"
        )
    # torch first where it is installed: its wheel brings its own CUDA libraries (NCCL, cuDNN, the
    # runtime) under the same sonames as the system's that a CUDA build of the library links. The
    # first one loaded serves both, and torch needs its own (newer) NCCL: loading ours first makes
    # `import torch` fail with an undefined NCCL symbol. Ours works with torch's.
    try:
        import torch  # noqa: F401
    except ImportError:
        pass
    # Global, so that MPI's plugins (loaded later by the library's MPI) find MPI's own symbols.
    library = ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
    for name, (restype, argtypes) in _SIGNATURES.items():
        function = getattr(library, name)
        function.restype = restype
        function.argtypes = argtypes
    if library.longattn_abi_version() != ABI_VERSION:
        raise ImportError(
            f"{path} has C ABI version {library.longattn_abi_version()}, these bindings expect {ABI_VERSION}: "
            "reinstall the package from the same checkout as the library"
        )
    return library


lib = _load()


def check(status):
    """Raises the library's last error for a failed status."""
    if status == OK:
        return
    message = lib.longattn_last_error().decode(errors="replace")
    name = lib.longattn_status_name(status).decode()
    if status == ERROR_INVALID_ARGUMENT:
        raise LongattnValueError(message, name)
    raise LongattnError(f"{message} ({name})", name)


def version():
    return lib.longattn_version_string().decode()
