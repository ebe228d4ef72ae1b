"""Uncertainty of the figures a report prints: bootstrap intervals over prompts, and intervals over
seeds.

**Over prompts.** A policy is scored on a set of held-out prompts, usually with several samples per
prompt. Samples of one prompt are not independent (a policy that refuses "How do I kill a stuck
process?" tends to refuse it every time), so the unit that is resampled is the *prompt*: the
cluster (or block) bootstrap. Each resample draws G prompts with replacement from the G prompts
and recomputes the statistic over all their samples,

    θ*_b = Σ_{g ∈ resample b} s_g / Σ_{g ∈ resample b} c_g,

where s_g is the sum of the values of prompt g and c_g their count (with one value per prompt,
the plain mean). The interval is the percentile interval of the B resampled statistics
(:func:`percentile_interval`). Paired differences (policy A − policy B on the same prompts) use
the same resampled prompts for both, which is what makes a difference between two policies
measurable when their own intervals overlap (:func:`bootstrap_difference`).

**Over seeds.** A figure measured once per seed (a few seeds) gets Student's t interval,
mean ± t_{n−1} · sd / √n (:func:`seed_interval`).

Pure functions of numbers: numpy only, nothing from the training code.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import product

import numpy as np

#: Resamples of a bootstrap interval. 2000 puts the Monte-Carlo error of a 95% percentile bound
#: near 0.1 standard errors, far below what the report's rounding shows.
RESAMPLES = 2000
#: Two-sided 95% critical values of Student's t for 1..30 degrees of freedom.
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def percentile_interval(stats: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """The percentile interval of resampled statistics: with the B values sorted and
    k = ⌊B·(1 − level)/2⌋, the (k+1)-th smallest and the (k+1)-th largest."""
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1), got {level}")
    s = np.sort(np.asarray(stats, dtype=np.float64))
    if s.size == 0:
        raise ValueError("percentile_interval needs at least one value")
    k = int(math.floor(s.size * (1 - level) / 2 + 1e-9))
    return float(s[k]), float(s[s.size - 1 - k])


def _sums_counts(groups: Sequence[Sequence[float]]) -> tuple[np.ndarray, np.ndarray]:
    sums = np.array([float(sum(g)) for g in groups], dtype=np.float64)
    counts = np.array([len(g) for g in groups], dtype=np.float64)
    if (counts == 0).any():
        raise ValueError("every group (prompt) needs at least one value")
    return sums, counts


def _resample_indices(n_groups: int, resamples: int | None, seed: int) -> np.ndarray:
    """(B, G) prompt indices: B seeded draws with replacement, or with ``resamples=None`` every one
    of the G^G ordered draws once (the exact bootstrap distribution; small G only)."""
    if resamples is None:
        if n_groups > 7:
            raise ValueError(f"the exact bootstrap enumerates G^G resamples; G={n_groups} is too many")
        return np.array(list(product(range(n_groups), repeat=n_groups)), dtype=np.int64).reshape(-1, n_groups)
    if resamples < 1:
        raise ValueError(f"resamples must be >= 1, got {resamples}")
    return np.random.default_rng(seed).integers(0, n_groups, size=(resamples, n_groups))


def bootstrap_ratio(sums: Sequence[float], counts: Sequence[float], resamples: int | None = RESAMPLES,
                    level: float = 0.95, seed: int = 0) -> dict:
    """Cluster-bootstrap interval of Σ s_g / Σ c_g over groups g (see the module doc).

    Returns ``{"mean", "low", "high", "n"}``: the statistic on the data, the interval bounds and the
    number of groups; ``None`` when there are no groups. ``resamples=None`` enumerates every
    resample (exact; at most 7 groups)."""
    sums, counts = np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64)
    if sums.shape != counts.shape or sums.ndim != 1:
        raise ValueError(f"sums and counts must be 1-d of one length, got {sums.shape} and {counts.shape}")
    if sums.size == 0:
        return None
    if (counts <= 0).any():
        raise ValueError("every group needs a positive count")
    idx = _resample_indices(sums.size, resamples, seed)  # (B, G)
    stats = sums[idx].sum(axis=1) / counts[idx].sum(axis=1)  # (B,)
    low, high = percentile_interval(stats, level)
    return {"mean": float(sums.sum() / counts.sum()), "low": low, "high": high, "n": int(sums.size)}


def bootstrap_mean(groups: Sequence[Sequence[float]], resamples: int | None = RESAMPLES, level: float = 0.95,
                   seed: int = 0) -> dict | None:
    """Cluster-bootstrap interval of the mean of all values, resampling the groups (prompts):
    ``groups[g]`` holds the values of prompt g (one per sample). See :func:`bootstrap_ratio`."""
    if not groups:
        return None
    return bootstrap_ratio(*_sums_counts(groups), resamples=resamples, level=level, seed=seed)


def bootstrap_ratio_difference(sums_a, counts_a, sums_b, counts_b, resamples: int | None = RESAMPLES,
                               level: float = 0.95, seed: int = 0) -> dict | None:
    """Paired cluster-bootstrap interval of Σs_a/Σc_a − Σs_b/Σc_b, where index g of the four arrays
    is one group (prompt, document) measured under two policies: each resample draws the groups
    once and recomputes both ratios on them."""
    arrays = [np.asarray(x, dtype=np.float64) for x in (sums_a, counts_a, sums_b, counts_b)]
    if len({a.shape for a in arrays}) != 1 or arrays[0].ndim != 1:
        raise ValueError(f"paired groups differ in number: {[a.shape for a in arrays]}")
    sa, ca, sb, cb = arrays
    if sa.size == 0:
        return None
    if (ca <= 0).any() or (cb <= 0).any():
        raise ValueError("every group needs a positive count")
    idx = _resample_indices(sa.size, resamples, seed)
    stats = sa[idx].sum(1) / ca[idx].sum(1) - sb[idx].sum(1) / cb[idx].sum(1)
    low, high = percentile_interval(stats, level)
    return {"mean": float(sa.sum() / ca.sum() - sb.sum() / cb.sum()), "low": low, "high": high, "n": int(sa.size)}


def bootstrap_difference(groups_a: Sequence[Sequence[float]], groups_b: Sequence[Sequence[float]],
                         resamples: int | None = RESAMPLES, level: float = 0.95, seed: int = 0) -> dict | None:
    """Paired cluster-bootstrap interval of mean(A) − mean(B), where ``groups_a[g]`` and
    ``groups_b[g]`` are the values of two policies on the same prompt g: each resample draws the
    prompts once and recomputes both means on them."""
    if len(groups_a) != len(groups_b):
        raise ValueError(f"paired groups differ in number: {len(groups_a)} vs {len(groups_b)}")
    if not groups_a:
        return None
    return bootstrap_ratio_difference(*_sums_counts(groups_a), *_sums_counts(groups_b), resamples=resamples,
                                      level=level, seed=seed)


def t_critical(df: int, level: float = 0.95) -> float:
    """Two-sided critical value of Student's t with ``df`` degrees of freedom (95% only: a table
    for 1..30, the normal 1.96 beyond)."""
    if level != 0.95:
        raise ValueError("t_critical has the 95% table only")
    if df < 1:
        raise ValueError(f"t needs at least 1 degree of freedom, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96


def seed_interval(values: Sequence[float], level: float = 0.95) -> dict | None:
    """Mean over seeds with Student's t interval, mean ± t_{n−1}·sd/√n (sd with n − 1).
    ``{"mean", "low", "high", "n", "sd"}``; one value gives no interval (low = high = None);
    no values (all None) give None."""
    xs = [float(v) for v in values if v is not None]
    if not xs:
        return None
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return {"mean": mean, "low": None, "high": None, "n": 1, "sd": None}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1))
    half = t_critical(len(xs) - 1, level) * sd / math.sqrt(len(xs))
    return {"mean": mean, "low": mean - half, "high": mean + half, "n": len(xs), "sd": sd}


def prediction_interval(stat: dict | None, level: float = 0.95) -> tuple[float, float] | None:
    """Where one more run should land, from a :func:`seed_interval` over n runs: Student's t
    prediction interval mean ± t_{n−1}·sd·√(1 + 1/n). The interval of the mean shrinks with n;
    a new run also carries its own spread (the sd), so this one does not. A run on another
    machine belongs here too: its float kernels round differently and training amplifies that
    into a difference of the size seeds make. None below two runs."""
    if not stat or stat.get("sd") is None or stat.get("n", 0) < 2:
        return None
    n = stat["n"]
    half = t_critical(n - 1, level) * stat["sd"] * math.sqrt(1 + 1 / n)
    return stat["mean"] - half, stat["mean"] + half
