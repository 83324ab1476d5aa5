"""Pickles: a restricted unpickler for the official CIFAR files, and who could have planted one.

The CIFAR archives are pickles; plain ``pickle.load`` on a file from the internet runs any code
the file names. This unpickler resolves only the globals that numpy arrays need, so a crafted
file that asks for ``os.system`` (or anything else) fails instead of executing.

Pickles that must be loaded whole (Tune's experiment state, submitit's jobs) are trusted only
where no one else could have written them: ``others_can_write``.
"""

from __future__ import annotations

import io
import os
import pickle
import stat
from pathlib import Path
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


def others_can_write(path: Path) -> str | None:
    """Why someone other than this user could have written ``path`` (a symlink is judged by what
    it points to), or None. As ssh does with its keys: it must be this user's, and writable by no
    one else; group write only where the group is this user's own and has no other member."""
    info = path.stat()
    if info.st_uid != os.getuid():
        return f"owned by uid {info.st_uid} (mode {stat.filemode(info.st_mode)})"
    if info.st_mode & stat.S_IWOTH or (info.st_mode & stat.S_IWGRP and not _own_group(info.st_gid)):
        return f"writable by others (mode {stat.filemode(info.st_mode)})"
    return None


def _own_group(gid: int) -> bool:
    """A user private group (Debian's default with umask 002): this user's, with no other member."""
    import grp
    import pwd

    try:
        group, user = grp.getgrgid(gid), pwd.getpwuid(os.getuid())
    except KeyError:
        return False
    return gid == user.pw_gid and set(group.gr_mem) <= {user.pw_name}
