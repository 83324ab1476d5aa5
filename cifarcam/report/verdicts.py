"""Verdicts on faithfulness margins that test what their words claim.

"Better than every baseline" is a claim about each baseline, so each baseline is tested: a
one-sided paired t-test per (map, curve, baseline) of the per-image margin (map minus baseline,
signed so that positive is better), with n - 1 degrees of freedom. One report makes many such
claims, so the p-values of all its tests are adjusted together (Holm, which controls the
family-wise error rate without assuming independence). A curve's verdict is then

- ``better``: the map beats every baseline (each test's adjusted p below ``ALPHA``);
- ``worse``: some baseline beats the map (the opposite test's adjusted p below ``ALPHA``);
- ``tie``: neither;
- ``n/a``: fewer than ``MIN_IMAGES`` scored images, too few for a t-test to mean much.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

ALPHA = 0.05
MIN_IMAGES = 5


def one_sided_p(margin: np.ndarray, se: np.ndarray, n: np.ndarray) -> np.ndarray:
    """P(a margin this large or larger | the true mean margin is 0): the t-test of margin > 0.
    A zero standard error (every image's margin equal) gives 0 for a positive margin, 1 otherwise."""
    margin, se, n = (np.asarray(a, float) for a in (margin, se, n))
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(se > 0, margin / se, np.where(margin > 0, np.inf, -np.inf))
    df = np.maximum(n - 1, 1)
    p = stats.t.sf(t, df)
    return np.where(np.isfinite(margin) & (n >= MIN_IMAGES), p, np.nan)


def holm(p: np.ndarray) -> np.ndarray:
    """Holm's step-down adjustment of the p-values in ``p`` (any shape; NaNs are not tests)."""
    flat = np.asarray(p, float).ravel()
    tested = np.flatnonzero(~np.isnan(flat))
    order = tested[np.argsort(flat[tested], kind="stable")]
    m = len(order)
    adjusted = np.full_like(flat, np.nan)
    running = 0.0
    for rank, i in enumerate(order):
        running = max(running, min(1.0, (m - rank) * flat[i]))
        adjusted[i] = running
    return adjusted.reshape(np.shape(p))


def curve_verdicts(margins: np.ndarray, ses: np.ndarray, n: np.ndarray) -> dict[str, np.ndarray]:
    """Verdicts for (maps, curves, baselines) arrays of margins and their standard errors, with
    ``n`` (maps,) images per map. Returns, per map and curve (maps, curves): the verdict; the
    baseline its words should name (``named``, an index: for ``worse`` the one that most surely
    beats the map, otherwise the one the map is least surely better than); and that test's
    Holm-adjusted p. The family is every test in these arrays, in both directions (``tests``)."""
    margins, ses = np.asarray(margins, float), np.asarray(ses, float)
    images = np.broadcast_to(np.asarray(n, float)[:, None, None], margins.shape)
    adjusted = holm(np.stack([one_sided_p(margins, ses, images), one_sided_p(-margins, ses, images)]))
    better, worse = adjusted[0], adjusted[1]
    untested = np.isnan(better).any(axis=2)
    is_better = (better < ALPHA).all(axis=2)
    is_worse = ~is_better & (worse < ALPHA).any(axis=2)
    verdict = np.where(untested, "n/a", np.where(is_better, "better", np.where(is_worse, "worse", "tie")))
    least_beaten = np.argmax(np.where(np.isnan(better), np.inf, better), axis=2)
    most_beating = np.argmin(np.where(np.isnan(worse), np.inf, worse), axis=2)
    named = np.where(is_worse, most_beating, least_beaten)
    p = np.where(is_worse, np.take_along_axis(worse, named[..., None], 2)[..., 0], np.take_along_axis(better, named[..., None], 2)[..., 0])
    return {"verdict": verdict, "named": named, "p": p, "tests": int((~np.isnan(adjusted)).sum())}
