"""Errors that end a job with one line instead of a traceback (a leaf module: imports nothing of
the package, so that every module may raise them without an import cycle).

Only these are caught by ``jobs.common.run``: a ``ValueError`` or ``KeyError`` from a genuine bug
keeps its traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UserError(Exception):
    """A mistake the user can fix (a config key, a path, an address, a data file), raised with a
    message that names the input and what was expected. Jobs exit with status 2."""


class ConfigError(UserError):
    """A bad config value, command-line option or combination of them."""


class DataError(UserError):
    """A file or folder the job reads (a dataset, archive, pickle, weights file or checkpoint) is
    missing, unreadable, corrupt or not what was expected."""


class ClusterUnreachable(UserError):
    """No Ray cluster answers at ``--address``, or the address is malformed."""


class JobFailed(RuntimeError):
    """The job ran, but what it produced cannot be used (e.g. every trial of a search failed).

    Jobs exit with status 1 and the message alone: the details are in the run folder it names."""


class NoUsableTrial(JobFailed):
    """Every trial failed or diverged: nothing to evaluate, explain or report on."""


def did_you_mean(name: str, known: Iterable[str]) -> str:
    """``"did you mean 'x'?"`` for the closest known name, or ``""``: callers word the rest."""
    close = difflib.get_close_matches(name, list(known), n=1)
    return f"did you mean {close[0]!r}?" if close else ""
