"""Uncertainty of every number: intervals, paired tests, the multiple-testing family, power.

    lo, hi = wilson_interval(17, 20)                         # a success rate
    d = paired_perplexity(p_sums, p_tokens, v_sums, v_tokens)  # variant vs parent on the same windows
    d["ppl_ratio"], d["ppl_ratio_ci95"], d["p_value"]
    t = mcnemar_exact(parent_correct, variant_correct)       # the same questions, 0/1 each
    adjust([d, t, ...], "holm")                              # p_adjusted, significant, mde, in place

One rule for every interval (``estimate``), by how many units there are and whether they are
independent:

- fewer than ``SMALL_N`` (30) independent units: Student-t on the per-unit values (for a
  ratio estimator such as a perplexity, on its linearized per-unit residuals), n - 1 df. A
  percentile bootstrap of a handful of units is far too narrow (Bowyer et al. 2025);
- ``SMALL_N`` or more independent units: the nonparametric percentile bootstrap (Efron 1979;
  Efron & Tibshirani 1993, ch. 13), ``n_boot`` resamples of the units drawn by
  ``numpy.random.default_rng(seed)``; its p-value inverts the percentile interval;
- units of a stratified sample (``strata``: the ``spread`` design's windows, two drawn at random
  in each of n/2 equal stretches of the text): Student-t on the design's own variance, the
  within-stratum spread of the linearized residuals (Cochran 1977, sections 5.3 and 6.11), n - H
  df for H strata, whatever n is. An iid bootstrap would ignore the stratification and overstate
  the variance; with two units a stratum a bootstrap inside the strata halves it;
- dependent units (adjacent or overlapping text windows): the Ibragimov-Mueller (2010) t-test,
  Student-t over the estimates of q groups of adjacent units (q = ``n_groups(n)``, 2 to 8), with
  q - 1 df: valid whatever the dependence inside a group, where Newey-West with Student-t
  over-rejects badly at these sizes (0.15 at 32 windows with WikiText-2's lag-1 correlation).

A difference between a variant and its parent (or between two siblings) is tested PAIRED over
the same units (windows, samples, questions, seeds, probes): the unit-to-unit spread that both
models see cancels. ``adjust`` then applies one multiple-testing correction (Holm by default,
Benjamini-Hochberg on request; statsmodels' ``multipletests``) to every test of a run, marks
``significant`` from the adjusted p, and gives each test its minimum detectable effect: the
smallest true difference it would detect with 80% power at the Bonferroni level alpha / m (the
strictest step of Holm), in the test's own unit. Non-finite inputs never raise: each function
says what it does with them.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import numpy as np
import scipy.stats

__all__ = ["wilson_interval", "mean_interval", "estimate", "paired_difference", "perplexity_interval",
           "paired_perplexity", "mcnemar_exact", "quantile_interval", "bootstrap_indices", "n_groups", "group_estimates", "adjust",
           "detectable_effect", "MULTIPLE_TESTING"]

NAN = float("nan")
SMALL_N = 30     # below this many independent units: Student-t, not the bootstrap
N_BOOT = 9999    # bootstrap resamples: p-values resolve down to 2 / (N_BOOT + 1) = 2e-4
ALPHA = 0.05
POWER = 0.8
MULTIPLE_TESTING = {"holm": "holm", "bh": "fdr_bh", "none": None}  # ours -> statsmodels' name
# What ``adjust`` writes into a test record: they depend on the run's whole family, so a step called
# alone (a notebook) gives the rest of the record, and ``llm_matrix.finalize`` these.
FAMILY_FIELDS = ("p_adjusted", "significant", "significant_unadjusted", "reachable", "mde")


def _vector(xs, name: str) -> np.ndarray:
    x = np.asarray(xs, dtype=np.float64)
    if x.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {x.shape}")
    return x


def _tails(level: float) -> tuple[float, float]:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    return (1.0 - level) / 2.0, (1.0 + level) / 2.0


def bootstrap_indices(n: int, n_boot: int = N_BOOT, seed: int = 0) -> np.ndarray:
    """[n_boot, n] int64 unit indices drawn with replacement by ``np.random.default_rng(seed)``:
    the one resampling scheme of this module (a paired test applies the same rows to both models)."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))


def _replicates(num: np.ndarray, den: np.ndarray, n_boot: int, seed: int) -> np.ndarray:
    """sum(num[rows]) / sum(den[rows]) for each bootstrap row of ``bootstrap_indices(n, n_boot,
    seed)``, drawn in chunks of rows from the same generator stream (the same rows as one draw),
    so that 10,000 resamples of 10,000 questions never hold 800 MB of indices."""
    if n_boot < 1:
        raise ValueError(f"n_boot must be at least 1, got {n_boot}")
    rng, n = np.random.default_rng(seed), num.size
    chunk = max(1, min(n_boot, 4_000_000 // max(n, 1)))
    out = np.empty(n_boot)
    with np.errstate(invalid="ignore", divide="ignore"):
        for i in range(0, n_boot, chunk):
            idx = rng.integers(0, n, size=(min(chunk, n_boot - i), n))
            out[i:i + idx.shape[0]] = num[idx].sum(axis=1) / den[idx].sum(axis=1)
    return out


def _percentile(boots: np.ndarray, level: float) -> list[float]:
    """Percentile interval of the bootstrap replicates (numpy's default linear interpolation);
    nan when any replicate is nan."""
    lo, hi = _tails(level)
    with np.errstate(invalid="ignore"):  # inf - inf while interpolating between infinite replicates
        q = np.quantile(boots, [lo, hi])
    return [float(q[0]), float(q[1])]


def _excludes(ci: Sequence[float], null: float = 0.0) -> bool:
    lo, hi = ci
    return bool((lo > null or hi < null) and not (math.isnan(lo) or math.isnan(hi)))


def n_groups(n: int) -> int:
    """How many groups of adjacent units the dependence-robust path makes of n units: about 8 units
    a group, 2 to 8 groups. Measured on AR(1) windows with lag-1 correlation 0.47 (WikiText-2's,
    issue 38; ``tests/test_stats.py``): a false-positive rate of 0.054-0.06 at 16-128 units, where
    Newey-West with Student-t gave 0.18 at 16 units and 0.15 at 32."""
    return max(2, min(8, n // 8))


def group_estimates(num, den, groups: int) -> np.ndarray:
    """The ratio estimator sum(num) / sum(den) within each of ``groups`` consecutive, near-equal
    blocks of the units (``np.array_split``): [groups]."""
    return np.array([a.sum() / b.sum() for a, b in zip(np.array_split(num, groups), np.array_split(den, groups))])


def estimate(num, den=None, *, dependent: bool = False, strata: Optional[Sequence] = None, level: float = 0.95,
             n_boot: int = N_BOOT, seed: int = 0, null: float = 0.0, units: str = "units") -> dict:
    """The ratio estimator sum(num) / sum(den) (``den`` None: the mean of ``num``) over n units,
    with its interval and the p-value of "it equals ``null``", by the module's one rule.

    Args:
        num, den: 1-D, the same length: each unit's numerator (an NLL sum, a difference) and
            denominator (its scored tokens; > 0).
        dependent: the units are adjacent or overlapping text, in text order: Ibragimov-Mueller
            groups, whatever n is.
        strata: 1-D labels, the same length: the stratum each unit was drawn in (a stratified
            sample, every stratum with 2 units or more; ``llm_perplexity.spread_strata``). Used
            when the units are not ``dependent``.
    Returns {"estimate", "ci95": [lo, hi] at ``level``, "p_value", "se", "df" (None for the
    bootstrap, whose MDE uses normal quantiles), "n", "kind" ("t", "strata", "groups", "bootstrap" or
    "none"),
    "min_p" (the smallest p this test can give), "method" (words)}. The t path works on the
    linearized residuals (num_i - R den_i) / mean(den) of the ratio R (for den = 1, the centred
    values); the group path on each group's own ratio, centred on the overall R. Fewer than 2
    units, or a non-finite unit: no interval, p nan."""
    x = _vector(num, "num")
    d = np.ones_like(x) if den is None else _vector(den, "den")
    if x.size != d.size:
        raise ValueError(f"{x.size} numerators against {d.size} denominators")
    _tails(level)
    n = int(x.size)
    with np.errstate(invalid="ignore", divide="ignore"):
        est = float(x.sum() / d.sum()) if n else NAN
    out = {"estimate": est, "ci95": [NAN, NAN], "p_value": NAN, "se": NAN, "df": None, "n": n, "kind": "none",
           "min_p": 1.0}
    if n < 2 or not np.isfinite(x).all():
        one = units[:-1] if n == 1 and units.endswith("s") else units
        why = f"{n} {one}: no interval" if n < 2 else f"a non-finite value among {n} {units}: no interval"
        return {**out, "method": why}
    z = (x - est * d) / d.mean()
    stratified = strata is not None and not dependent
    if stratified or dependent or n < SMALL_N:
        if stratified:  # the stratified design's variance: sum_h n_h s_h^2 / n^2 (proportional allocation)
            labels = np.asarray(strata)
            if labels.shape != (n,):
                raise ValueError(f"{labels.size} stratum labels for {n} {units}")
            parts = [z[labels == h] for h in np.unique(labels)]
            if min(p.size for p in parts) < 2:
                raise ValueError("every stratum needs at least 2 units for its variance")
            se, df = math.sqrt(sum(p.size * np.var(p, ddof=1) for p in parts)) / n, n - len(parts)
            method = (f"stratified Student-t over {n} {units} in {len(parts)} strata, {df} df (the spread "
                      f"design's own variance)")
        elif dependent:  # Ibragimov & Mueller (2010): a t-test on the estimates of q blocks of adjacent units
            q = n_groups(n)
            g = group_estimates(x, d, q)
            se, df = float(np.std(g, ddof=1) / math.sqrt(q)), q - 1
            method = (f"Ibragimov-Mueller t over {q} groups of adjacent {units} ({n} {units}, dependent: "
                      f"adjacent or overlapping), {df} df")
        else:
            se, df = float(np.std(z, ddof=1) / math.sqrt(n)), n - 1
            method = f"Student-t over {n} {units} (fewer than {SMALL_N}: no bootstrap)"
        crit = float(scipy.stats.t.ppf(_tails(level)[1], df))
        ci = [est - crit * se, est + crit * se]
        if se > 0:
            p = float(2.0 * scipy.stats.t.sf(abs(est - null) / se, df))
        else:
            p = 1.0 if est == null else 0.0
        kind = "strata" if stratified else "groups" if dependent else "t"
        return {**out, "ci95": ci, "p_value": p, "se": se, "df": df, "kind": kind,
                "min_p": 0.0, "method": method}
    boots = _replicates(x, d, n_boot, seed)
    ci = _percentile(boots, level)
    below, above = int((boots <= null).sum()), int((boots >= null).sum())
    p = min(1.0, 2.0 * (min(below, above) + 1) / (n_boot + 1))  # inverts the percentile interval
    return {**out, "ci95": ci, "p_value": p, "se": float(np.std(boots, ddof=1)) if n_boot > 1 else NAN,
            "kind": "bootstrap",
            "min_p": 2.0 / (n_boot + 1),
            "method": f"bootstrap, {n_boot} resamples of {n} {units} (percentile)"}


def quantile_interval(values, unit_sizes, q: float, **design) -> list[float]:
    """Woodruff's (1952) interval of the ``q``-quantile of ``values`` pooled over units (tokens pooled
    over windows), by the design's own method: the share of values <= the sample quantile is a
    ratio estimator over the units (per unit: its count at or below, over its size), whose interval
    (``estimate``, with ``design``: dependent, strata, seed, level) is mapped back through the sample
    quantile function. ``values`` are the units' values in unit order, ``unit_sizes`` [n] how many
    each unit has. Returns [lo, hi]; [nan, nan] where ``estimate`` gives no interval."""
    x, sizes = _vector(values, "values"), np.asarray(unit_sizes, dtype=np.int64)
    if sizes.sum() != x.size:
        raise ValueError(f"unit sizes add up to {sizes.sum()}, not to the {x.size} values")
    if x.size == 0 or not np.isfinite(x).all():
        return [NAN, NAN]
    at_or_below = np.bincount(np.repeat(np.arange(sizes.size), sizes), weights=x <= np.quantile(x, q),
                              minlength=sizes.size)
    e = estimate(at_or_below, sizes, units="units", **design)
    lo, hi = e["ci95"]
    if math.isnan(lo) or math.isnan(hi):
        return [NAN, NAN]
    return [float(v) for v in np.quantile(x, [min(max(lo, 0.0), 1.0), min(max(hi, 0.0), 1.0)])]


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


def _test(e: dict, **named) -> dict:
    """A test record from ``estimate``'s output: what ``adjust`` and the report read."""
    return {**named, "p_value": e["p_value"], "significant": bool(e["p_value"] < ALPHA),
            "se": e["se"], "df": e["df"], "kind": e["kind"], "min_p": e["min_p"], "n": e["n"],
            "method": ("paired " + e["method"]) if e["kind"] in ("t", "strata", "bootstrap") else e["method"]}


def paired_difference(a, b, n_boot: int = N_BOOT, seed: int = 0, level: float = 0.95, *,
                      units: str = "samples", dependent: bool = False) -> dict:
    """mean(b - a) over the same ``n`` units, by ``estimate``'s rule (Student-t below
    ``SMALL_N`` units, the percentile bootstrap above, Ibragimov-Mueller groups when ``dependent``).

    Args:
        a, b: 1-D, the same length: the parent's and the variant's value on each unit (window,
            sample, question), in the same order.
        units: the word the method names them by.
    Returns {"mean", "ci95", "p_value" (two-sided, of no difference), "significant" (p < 0.05,
    before any adjustment), "n", "se", "df", "kind", "min_p", "method"}. A nan difference makes
    the interval and p nan (not significant). Raises ValueError when the lengths differ."""
    a, b = _vector(a, "a"), _vector(b, "b")
    if a.size != b.size:
        raise ValueError(f"a paired difference needs the same units: {a.size} values against {b.size}")
    with np.errstate(invalid="ignore"):
        d = b - a
    e = estimate(d, dependent=dependent, level=level, n_boot=n_boot, seed=seed, units=units)
    return _test(e, mean=e["estimate"], ci95=e["ci95"])


def _sums(window_nll_sums, window_tokens, name: str) -> tuple[np.ndarray, np.ndarray]:
    s, t = _vector(window_nll_sums, f"{name} NLL sums"), _vector(window_tokens, f"{name} token counts")
    if s.size != t.size:
        raise ValueError(f"{name}: {s.size} window NLL sums against {t.size} token counts")
    if (t <= 0).any():
        raise ValueError(f"{name}: every window must score at least one token")
    return s, t


def _exp(x: float) -> float:
    return NAN if math.isnan(x) else (math.exp(x) if x < 709.0 else math.inf)


def perplexity_interval(window_nll_sums, window_tokens, n_boot: int = N_BOOT, seed: int = 0,
                        level: float = 0.95, *, dependent: bool = False,
                        strata: Optional[Sequence] = None) -> tuple[float, float]:
    """Interval over windows of a perplexity exp(sum nll / sum tokens), by ``estimate``'s rule.

    Args:
        window_nll_sums: 1-D, each window's summed NLL over its scored tokens (nats).
        window_tokens: 1-D, each window's number of scored tokens (> 0).
        dependent: the windows are adjacent or overlap (``--eval-sampling first``, a whole text,
            ``--stride`` < ``--seq-len``): Ibragimov-Mueller groups.
        strata: each window's stratum when they are a stratified sample (``--eval-sampling spread``).
    The interval is taken on the mean NLL per token (the ratio estimator, so windows of unequal
    token counts weigh as they do in the perplexity) and mapped through exp. (nan, nan) with
    fewer than 2 windows or a nan window; an overflowing end is inf."""
    s, t = _sums(window_nll_sums, window_tokens, "perplexity_interval")
    lo, hi = estimate(s, t, dependent=dependent, strata=strata, level=level, n_boot=n_boot, seed=seed,
                      units="windows")["ci95"]
    return _exp(lo), _exp(hi)


def interval_words(n_windows: int, dependent: bool = False, n_boot: int = N_BOOT,
                   strata: Optional[Sequence] = None) -> str:
    """How ``perplexity_interval`` makes its interval over ``n_windows`` windows, in words."""
    return estimate(np.arange(max(n_windows, 0), dtype=float), dependent=dependent, strata=strata, n_boot=1,
                    units="windows")["method"].replace(", 1 resamples", f", {n_boot} resamples")


def paired_perplexity(parent_sums, parent_tokens, variant_sums, variant_tokens, n_boot: int = N_BOOT,
                      seed: int = 0, level: float = 0.95, *, dependent: bool = False,
                      strata: Optional[Sequence] = None) -> dict:
    """A variant's perplexity against its parent's (or a sibling's) on the SAME windows, paired.

    Args: per-window NLL sums (nats) and scored-token counts, 1-D, in the same window order.
    Returns {"delta_nll": variant - parent mean NLL per token (nats), "delta_nll_ci95": [lo, hi],
    "ppl_ratio": exp(delta_nll) = variant / parent perplexity, "ppl_ratio_ci95", "p_value",
    "significant" (p < 0.05 before adjustment), "n_windows", "se", "df", "kind", "min_p",
    "method"}: ``estimate`` on the per-window NLL differences over the shared token counts.
    Raises ValueError when the window counts differ, or a window scores a different number of
    tokens in the two (then they are not the same windows)."""
    ps, pt = _sums(parent_sums, parent_tokens, "parent")
    vs, vt = _sums(variant_sums, variant_tokens, "variant")
    if ps.size != vs.size or not np.array_equal(pt, vt):
        raise ValueError(f"paired perplexity needs the same windows: parent has {ps.size} windows, "
                         f"variant {vs.size}" + ("" if ps.size != vs.size else ", with other token counts"))
    with np.errstate(invalid="ignore"):
        d = vs - ps
    e = estimate(d, pt, dependent=dependent, strata=strata, level=level, n_boot=n_boot, seed=seed, units="windows")
    ci = e["ci95"]
    return _test(e, delta_nll=e["estimate"], delta_nll_ci95=ci, ppl_ratio=_exp(e["estimate"]),
                 ppl_ratio_ci95=[_exp(ci[0]), _exp(ci[1])], n_windows=e["n"])


def mcnemar_exact(a_correct, b_correct, level: float = 0.95, n_boot: int = N_BOOT, seed: int = 0) -> dict:
    """Exact McNemar test (McNemar 1947) of two models on the same questions.

    Args:
        a_correct, b_correct: 1-D booleans (or 0/1), the parent's and the variant's correctness
            on each question, in the same order.
    Returns {"n", "a_only" (questions only a gets right), "b_only", "flip_rate" ((a_only + b_only) / n,
    the share of questions whose correctness changed, either way) with "flip_rate_ci95" (Wilson),
    "acc_a", "acc_b",
    "diff": acc_b - acc_a, "diff_ci95" (``paired_difference``'s rule over the questions;
    "ci_method" says which), "p_value": two-sided exact binomial test of a_only against
    a_only + b_only at 1/2 (scipy.stats.binomtest), 1.0 when no question is discordant,
    "significant": p_value < 1 - level before adjustment, "min_p": 2 / 2^n, the smallest p n
    questions can give, "kind": "mcnemar", "method"}. Raises ValueError when the lengths differ
    or a value is not 0/1."""
    a, b = _vector(a_correct, "a_correct"), _vector(b_correct, "b_correct")
    if a.size != b.size:
        raise ValueError(f"McNemar needs the same questions: {a.size} answers against {b.size}")
    if not (np.isin(a, (0.0, 1.0)).all() and np.isin(b, (0.0, 1.0)).all()):
        raise ValueError("McNemar needs correctness as booleans or 0/1")
    n, a_only, b_only = int(a.size), int(((a == 1) & (b == 0)).sum()), int(((a == 0) & (b == 1)).sum())
    p = float(scipy.stats.binomtest(a_only, a_only + b_only, 0.5).pvalue) if a_only + b_only else 1.0
    boot = paired_difference(a, b, n_boot, seed, level, units="questions")
    flips = a_only + b_only  # "Accuracy is Not All You Need" (2024): answers that changed, either way
    return {"n": n, "a_only": a_only, "b_only": b_only, "flip_rate": flips / n if n else NAN,
            "flip_rate_ci95": list(wilson_interval(flips, n, level)),
            "acc_a": float(a.mean()) if n else NAN, "acc_b": float(b.mean()) if n else NAN,
            "diff": boot["mean"], "diff_ci95": boot["ci95"], "ci_method": boot["method"],
            "p_value": p, "significant": bool(p < 1.0 - level), "kind": "mcnemar",
            "min_p": min(1.0, 2.0 * 0.5 ** n) if n else 1.0, "se": NAN, "df": None,
            "method": f"exact McNemar: two-sided binomial test on {a_only + b_only} discordant of {n} questions"}


def detectable_effect(test: dict, alpha: float, power: float = POWER) -> Optional[float]:
    """The smallest true difference ``test`` detects with probability ``power`` at two-sided level
    ``alpha``, in the test's own unit (nats per token for a perplexity, accuracy for McNemar):
    (q(1 - alpha/2) + q(power)) x se, with Student-t quantiles on ``df`` or normal ones (the
    bootstrap). McNemar: the normal approximation on the observed discordant share d,
    se = sqrt(d / n), but never below k / n, where k discordant questions all one way are the
    fewest whose exact p falls below alpha (inf when there are fewer than k questions). None where
    it cannot be said (no spread measured)."""
    n = test.get("n") or 0
    if test.get("kind") == "mcnemar":
        if not n:
            return None
        k = math.ceil(math.log2(2.0 / alpha))
        if k > n:  # even n discordant questions all one way stay above alpha: no change is detectable
            return math.inf
        d = ((test.get("a_only") or 0) + (test.get("b_only") or 0)) / n
        z = scipy.stats.norm.ppf(1 - alpha / 2) + scipy.stats.norm.ppf(power)
        return float(max(z * math.sqrt(d / n), k / n))
    se, df = test.get("se"), test.get("df")
    if not isinstance(se, (int, float)) or not math.isfinite(se) or se <= 0:
        return None
    dist = scipy.stats.t(df) if df else scipy.stats.norm
    return float((dist.ppf(1 - alpha / 2) + dist.ppf(power)) * se)


def adjust(tests: list, method: str = "holm", alpha: float = ALPHA) -> dict:
    """One multiple-testing family: every test dict in ``tests`` (each with "p_value") gets, in
    place, "p_adjusted" (statsmodels.stats.multitest.multipletests: Holm 1979, or
    Benjamini-Hochberg 1995 for ``method="bh"``; p itself for "none"), "significant" (adjusted
    p < ``alpha``), "significant_unadjusted", "reachable" (False where even the smallest p its
    units allow is not below ``alpha``: it can never be significant) and "mde" (the detectable
    effect at alpha / m, ``detectable_effect``). Tests whose p is nan stay outside the family
    and are never significant (tests without a "p_value", from an older file, keep their mark).
    Returns {"method", "n_tests", "alpha", "mde_level", "power"}.
    Raises ValueError for an unknown method."""
    if method not in MULTIPLE_TESTING:
        raise ValueError(f"multiple testing: {method!r} is not one of {', '.join(MULTIPLE_TESTING)}")
    family = [t for t in tests if isinstance(t.get("p_value"), (int, float)) and math.isfinite(t["p_value"])]
    m = len(family)
    if m and MULTIPLE_TESTING[method]:
        from statsmodels.stats.multitest import multipletests
        adjusted = multipletests([t["p_value"] for t in family], alpha=alpha, method=MULTIPLE_TESTING[method])[1]
    else:
        adjusted = [t["p_value"] for t in family]
    level = alpha / m if m and method != "none" else alpha
    for t, pa in zip(family, adjusted):
        t["significant_unadjusted"] = bool(t["p_value"] < alpha)
        t["p_adjusted"] = float(pa)
        t["reachable"] = bool(t.get("min_p", 0.0) < alpha)
        t["significant"] = bool(pa < alpha) and t["reachable"]
        t["mde"] = detectable_effect(t, level)
    inside = {id(t) for t in family}
    for t in tests:  # p nan (no interval): never a difference; no p at all (an older file): as it was
        if id(t) not in inside and "p_value" in t:
            t["significant"] = False
    return {"method": method, "n_tests": m, "alpha": alpha, "mde_level": level, "power": POWER}
