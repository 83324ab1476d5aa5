"""A restricted unpickler for the official CIFAR files.

The CIFAR archives are pickles; plain ``pickle.load`` on a file from the internet runs any code
the file names. This unpickler resolves only the globals that numpy arrays need, so a crafted
file that asks for ``os.system`` (or anything else) fails instead of executing.
"""

from __future__ import annotations

import io
import pickle
from typing import Any, BinaryIO

from cifarcam.errors import DataError

# Exactly what the official files (written by Python 2 numpy) and numpy 2 re-pickles reference.
_ALLOWED_GLOBALS = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("_codecs", "encode"),  # how Python 2 byte strings inside arrays are re-encoded
    }
)


class UnsafePickleError(DataError):
    """Raised when a pickle references anything outside the allow-list: a bad data file, not a bug."""


class _RestrictedUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise UnsafePickleError(f"refused global {module}.{name}")


def safe_load(stream: BinaryIO | bytes, source: str) -> Any:
    """Unpickle ``stream`` allowing only numpy arrays, lists, dicts, ints and strings.

    ``source`` names the file in error messages. Keys come back as ``str`` (latin-1 decoding,
    as the official CIFAR loaders do).
    """
    if isinstance(stream, bytes):
        stream = io.BytesIO(stream)
    try:
        return _RestrictedUnpickler(stream, encoding="latin1").load()
    except UnsafePickleError as err:
        raise UnsafePickleError(f"{source}: not a CIFAR pickle ({err}); only numpy arrays, lists, ints and strings are allowed") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError) as err:
        raise DataError(f"{source}: corrupt or truncated pickle ({type(err).__name__}: {err})") from None
