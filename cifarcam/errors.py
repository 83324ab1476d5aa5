"""Errors that end a job with one line instead of a traceback (a leaf module: imports nothing)."""

from __future__ import annotations


class JobFailed(RuntimeError):
    """The job ran, but what it produced cannot be used (e.g. every trial of a search failed).

    Jobs exit with status 1 and the message alone: the details are in the run folder it names."""


class NoUsableTrial(JobFailed):
    """Every trial failed or diverged: nothing to evaluate, explain or report on."""
