"""Uncertainty of every number: intervals, and paired tests of a variant against its parent.

    lo, hi = wilson_interval(17, 20)                         # a success rate
    d = paired_perplexity(p_sums, p_tokens, v_sums, v_tokens)  # variant vs parent on the same windows
    d["ppl_ratio"], d["ppl_ratio_ci95"], d["significant"]
    t = mcnemar_exact(parent_correct, variant_correct)       # the same questions, 0/1 each

A difference between a variant and its parent is called a difference only when a PAIRED
interval over the same units (windows, samples, questions) excludes zero, or McNemar's exact
p is below 1 - level: the units are shared, so the unit-to-unit spread that both models see
cancels, and the test is much sharper than comparing two separate intervals.

Bootstraps are nonparametric, percentile intervals (Efron 1979; Efron & Tibshirani 1993, ch. 13),
with ``numpy.random.Generator(seed)`` drawing ``n_boot`` resamples of ``n`` unit indices with
replacement, one [n_boot, n] index array: the same seed gives the same interval. scipy.stats
supplies what it has: the binomial test (McNemar 1947, exact form), the Wilson score interval
(Wilson 1927) and Student's t. Non-finite inputs never raise: each function says what it does
with them.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import scipy.stats

__all__ = ["wilson_interval", "mean_interval", "paired_difference", "perplexity_interval", "paired_perplexity",
           "mcnemar_exact", "bootstrap_indices"]

NAN = float("nan")
SMALL_N = 20  # below this many units, paired differences use Student's t, not the bootstrap


def _vector(xs, name: str) -> np.ndarray:
    x = np.asarray(xs, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


def _tails(level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return (1.0 - level) / 2.0, (1.0 + level) / 2.0


def bootstrap_indices(n: int, n_boot: int = 2000, seed: int = 0) -> np.ndarray:
    """[n_boot, n] int64 unit indices drawn with replacement by ``np.random.default_rng(seed)``:
    the one resampling scheme of this module (a paired test applies the same rows to both models)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _percentile(boots: np.ndarray, level: float) -> list[float]:
    """Percentile interval of the bootstrap replicates (numpy's default linear interpolation);
    nan when any replicate is nan."""
    lo, hi = _tails(level)
    with np.errstate(invalid="ignore"):  # inf - inf while interpolating between infinite replicates
        q = np.quantile(boots, [lo, hi])
    return [float(q[0]), float(q[1])]


def _excludes_zero(ci: Sequence[float]) -> bool:
    lo, hi = ci
    return bool((lo > 0 or hi < 0) and not (math.isnan(lo) or math.isnan(hi)))


def wilson_interval(k: int, n: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval (Wilson 1927) of a proportion: ``k`` successes of ``n`` trials.

    scipy.stats.binomtest(k, n).proportion_ci(level, method="wilson"). (nan, nan) when
    n == 0. Raises ValueError unless 0 <= k <= n are integers."""
    k, n = int(k), int(n)
    if n == 0:
        return NAN, NAN
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    ci = scipy.stats.binomtest(k, n).proportion_ci(confidence_level=level, method="wilson")
    return float(ci.low), float(ci.high)


def mean_interval(xs, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean of independent samples ``xs`` (1-D, any unit).

    (nan, nan) for fewer than 2 finite values. Non-finite values are not dropped: with any
    of them the mean itself is non-finite and the interval is (mean, mean), i.e. (inf, inf) when
    one sample is +inf and none -inf or nan, and (nan, nan) otherwise. With zero spread the
    interval is (mean, mean)."""
    x = _vector(xs, "xs")
    _tails(level)
    if np.isfinite(x).sum() < 2:
        return NAN, NAN
    if not np.isfinite(x).all():
        with np.errstate(invalid="ignore"):
            m = float(np.mean(x))
        return m, m
    m, sem = float(x.mean()), float(scipy.stats.sem(x))
    if sem == 0.0:
        return m, m
    lo, hi = scipy.stats.t.interval(level, x.size - 1, loc=m, scale=sem)
    return float(lo), float(hi)


def paired_difference(a, b, n_boot: int = 2000, seed: int = 0, level: float = 0.95, *,
                      units: str = "samples") -> dict:
    """Paired bootstrap (Efron) of mean(b - a) over the same ``n`` units.

    Args:
        a, b: 1-D, the same length: the parent's and the variant's value on each unit (window,
            sample, question), in the same order.
        units: the word the method names them by.
    Returns {"mean", "ci95": [lo, hi] (percentile interval at ``level``), "significant" (the
    interval excludes 0), "n", "method"}. Unit indices are resampled (``bootstrap_indices``)
    and the mean difference taken over each resample. From 2 to ``SMALL_N - 1`` units (attack
    samples, noise seeds and Hutchinson probes on the CPU budget) the percentile bootstrap
    would be far too narrow, so the paired Student-t interval (``mean_interval`` of the
    differences) is used and the method says so. Fewer than 2 units: no interval (nan)
    and never significant. A nan difference makes the interval nan (not significant); an
    infinite one makes the mean and the replicates that draw it infinite.
    Raises ValueError when the lengths differ."""
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.size != b.size:
        raise ValueError(f"a paired difference needs the same units: {a.size} values against {b.size}")
    n = int(a.size)
    with np.errstate(invalid="ignore"):
        d = b - a
        mean = float(d.mean()) if n else NAN
    if n < 2:
        return {"mean": mean, "ci95": [NAN, NAN], "significant": False, "n": n,
                "method": f"{n} {units}: no interval"}
    if n < SMALL_N:  # a percentile bootstrap of a handful of units is far too narrow (n=2: any
        # two differences of one sign would "differ"): the paired t interval instead
        ci = list(mean_interval(d, level))
        return {"mean": mean, "ci95": ci, "significant": _excludes_zero(ci), "n": n,
                "method": f"paired Student-t over {n} {units} (fewer than {SMALL_N}: no bootstrap)"}
    with np.errstate(invalid="ignore"):
        boots = d[bootstrap_indices(n, n_boot, seed)].mean(axis=1)
    ci = _percentile(boots, level)
    return {"mean": mean, "ci95": ci, "significant": _excludes_zero(ci), "n": n,
            "method": f"paired bootstrap, {n_boot} resamples of {n} {units}"}


def _sums(window_nll_sums, window_tokens, name: str) -> tuple[np.ndarray, np.ndarray]:
    s, t = _vector(window_nll_sums, f"{name} NLL sums"), _vector(window_tokens, f"{name} token counts")
    if s.size != t.size:
        raise ValueError(f"{name}: {s.size} window NLL sums against {t.size} token counts")
    if (t <= 0).any():
        raise ValueError(f"{name}: every window must score at least one token")
    return s, t


def perplexity_interval(window_nll_sums, window_tokens, n_boot: int = 2000, seed: int = 0,
                        level: float = 0.95) -> tuple[float, float]:
    """Bootstrap interval over windows of a perplexity exp(sum nll / sum tokens).

    Args:
        window_nll_sums: 1-D, each window's summed NLL over its scored tokens (nats).
        window_tokens: 1-D, each window's number of scored tokens (> 0).
    Windows are resampled whole and each resample's perplexity is the ratio estimator
    exp(sum of resampled NLL sums / sum of resampled tokens), so windows that score unequal
    numbers of tokens weigh as they do in the perplexity itself. The percentile interval is
    taken on the mean NLL and mapped through exp (monotone). Windows are treated as independent
    (adjacent text is not quite). (nan, nan) with fewer than 2 windows, or any nan window;
    an infinite window makes the upper end inf."""
    s, t = _sums(window_nll_sums, window_tokens, "perplexity_interval")
    if s.size < 2:
        return NAN, NAN
    idx = bootstrap_indices(s.size, n_boot, seed)
    with np.errstate(invalid="ignore"):
        lo, hi = _percentile(s[idx].sum(axis=1) / t[idx].sum(axis=1), level)
    return _exp(lo), _exp(hi)


def _exp(x: float) -> float:
    return NAN if math.isnan(x) else (math.exp(x) if x < 709.0 else math.inf)


def paired_perplexity(parent_sums, parent_tokens, variant_sums, variant_tokens, n_boot: int = 2000,
                      seed: int = 0, level: float = 0.95) -> dict:
    """A variant's perplexity against its parent's on the SAME windows, paired.

    Args: per-window NLL sums (nats) and scored-token counts, 1-D, in the same window order.
    Returns {"delta_nll": variant - parent mean NLL per token (nats), "delta_nll_ci95": [lo, hi],
    "ppl_ratio": exp(delta_nll) = variant / parent perplexity, "ppl_ratio_ci95", "significant"
    (the delta interval excludes 0), "n_windows", "method"}. The window indices are resampled
    once per replicate and applied to both models (the ratio estimator of
    ``perplexity_interval`` on each); percentile interval. Fewer than 2 windows: nan interval,
    never significant. Raises ValueError when the window counts differ, or a window scores a
    different number of tokens in the two (then they are not the same windows)."""
    ps, pt = _sums(parent_sums, parent_tokens, "parent")
    vs, vt = _sums(variant_sums, variant_tokens, "variant")
    if ps.size != vs.size or not np.array_equal(pt, vt):
        raise ValueError(f"paired perplexity needs the same windows: parent has {ps.size} windows, "
                         f"variant {vs.size}" + ("" if ps.size != vs.size else ", with other token counts"))
    n = int(ps.size)
    with np.errstate(invalid="ignore"):
        delta = float(vs.sum() / vt.sum() - ps.sum() / pt.sum()) if n else NAN
    if n < 2:
        ci, method = [NAN, NAN], f"{n} window{'s' * (n != 1)}: no interval"
    else:
        idx = bootstrap_indices(n, n_boot, seed)
        with np.errstate(invalid="ignore"):
            boots = vs[idx].sum(axis=1) / vt[idx].sum(axis=1) - ps[idx].sum(axis=1) / pt[idx].sum(axis=1)
        ci = _percentile(boots, level)
        method = (f"paired bootstrap over {n} windows ({n_boot} resamples, percentile; each resample's "
                  "NLL sum / its tokens, for both models)")
    return {"delta_nll": delta, "delta_nll_ci95": ci, "ppl_ratio": _exp(delta),
            "ppl_ratio_ci95": [_exp(ci[0]), _exp(ci[1])], "significant": _excludes_zero(ci), "n_windows": n,
            "method": method}


def mcnemar_exact(a_correct, b_correct, level: float = 0.95, n_boot: int = 2000, seed: int = 0) -> dict:
    """Exact McNemar test (McNemar 1947) of two models on the same questions.

    Args:
        a_correct, b_correct: 1-D booleans (or 0/1), the parent's and the variant's correctness
            on each question, in the same order.
    Returns {"n", "a_only" (questions only a gets right), "b_only", "acc_a", "acc_b",
    "diff": acc_b - acc_a, "diff_ci95": percentile paired-bootstrap interval of diff
    (``paired_difference``; "ci_method" says so), "p_value": two-sided exact binomial test of
    a_only against a_only + b_only at 1/2 (scipy.stats.binomtest), 1.0 when no question
    is discordant, "significant": p_value < 1 - level, "method"}. Raises ValueError when the
    lengths differ or a value is not 0/1."""
    a, b = _vector(a_correct, "a_correct"), _vector(b_correct, "b_correct")
    if a.size != b.size:
        raise ValueError(f"McNemar needs the same questions: {a.size} answers against {b.size}")
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("McNemar needs correctness as booleans or 0/1")
    n, a_only, b_only = int(a.size), int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = float(scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    boot = paired_difference(a, b, n_boot, seed, level, units="questions")
    return {"n": n, "a_only": a_only, "b_only": b_only,
            "acc_a": float(a.mean()) if n else NAN, "acc_b": float(b.mean()) if n else NAN,
            "diff": boot["mean"], "diff_ci95": boot["ci95"], "ci_method": boot["method"],
            "p_value": p, "significant": bool(p < 1.0 - level),
            "method": f"exact McNemar: two-sided binomial test on {a_only + b_only} discordant of {n} questions"}
