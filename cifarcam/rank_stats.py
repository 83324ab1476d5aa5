"""Spearman's rank correlation of many pairs of maps at once: the sanity check (a trained map
against its randomised model's) and the report's agreement between layers and between methods
(two maps of one image) use the same statistic."""

from __future__ import annotations

import numpy as np
from scipy.stats import rankdata


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per row of (N, P) arrays: Spearman's rank correlation (average ranks for ties); NaN where a
    row is constant."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    denominator = np.sqrt((ra**2).sum(1) * (rb**2).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(denominator > 0, (ra * rb).sum(1) / np.where(denominator > 0, denominator, 1), np.nan)
