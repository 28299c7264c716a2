"""longattn: exact distributed attention over millions of tokens (ring, Ulysses, hybrid).

This package binds the library's C API with ctypes. `longattn.torch` holds the PyTorch op;
importing this top-level package needs no torch.
"""

from ._capi import LongattnError, LongattnValueError, version

__version__ = version()
__all__ = ["LongattnError", "LongattnValueError", "version", "__version__"]
