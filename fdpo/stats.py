"""Statistics of the study: paired per-task differences, a CI over (warm start, task), the
claim rule, Holm's correction and a forest plot.

    diffs = stats.paired_differences(pass_a, pass_b)      # {warm start: {task: pass}} each
    res = stats.hierarchical_bootstrap(diffs)             # estimate, CI, p, per-warm-start means
    res.claim                                             # CI excludes 0 and every warm start agrees

Why this design: a method's lead on the miniature moves with the warm start (float rounding
alone changes it, docs/results/miniature.md), and a test split of a few hundred tasks is
itself a sample. The statistic is the mean over warm starts of the mean per-task difference,
so every warm start weighs the same whatever its task count. Its default interval
(`cluster_t`) is Student's t on W - 1 degrees of freedom over the W warm-start means, never
narrower than the interval from task noise alone (a bootstrap of each warm start's tasks):
with 3-5 warm starts the two-level percentile bootstrap (`percentile`: warm starts, then
their tasks, resampled) is too narrow when warm starts differ by more than their task noise
(coverage 0.87 at 95%, docs/analysis.md#statistics). NumPy, and SciPy for the t quantile;
no JAX (the data stage may use it); matplotlib only in :func:`forest_plot`.
"""

from __future__ import annotations

import dataclasses
import pathlib
from typing import Mapping, Sequence

import numpy as np

# Above this many distinct difference values a warm start's tasks are resampled by index;
# at or below it by multinomial counts of the values (the same distribution, much cheaper:
# single-seed greedy differences take only -1, 0, +1).
_MAX_CATEGORIES = 64
# Rows of resampled task indices drawn at once on the by-index path (bounds memory).
_CHUNK_ELEMENTS = 1 << 22


class StatsError(ValueError):
    """Inputs the statistics cannot use (a task on one side only, an empty warm start)."""


def paired_differences(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]],
                       names: tuple[str, str] = ("A", "B")) -> dict[str, np.ndarray]:
    """{warm start: per-task a - b, tasks sorted by id}, from {warm start: {task id: pass}}
    of each arm. The two arms must have the same warm starts and, within each, the same task
    ids: a task on one side only is an error naming the warm start, the task and the arm
    that lacks it (a score over a subset would not be paired)."""
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise StatsError(f"warm start {only[0]!r} is in "
                         f"{names[0] if only[0] in a else names[1]} only")
    out = {}
    for ws in a:
        ta, tb = a[ws], b[ws]
        for task in sorted(set(ta) ^ set(tb)):
            have, lack = (names[0], names[1]) if task in ta else (names[1], names[0])
            raise StatsError(f"warm start {ws!r}: task {task!r} has a result for {have} but "
                             f"not for {lack}")
        if not ta:
            raise StatsError(f"warm start {ws!r}: no tasks")
        tasks = sorted(ta)
        out[ws] = np.array([ta[t] for t in tasks], float) - np.array([tb[t] for t in tasks], float)
    return out


@dataclasses.dataclass(frozen=True)
class Bootstrap:
    """The result of :func:`hierarchical_bootstrap`, in the units of the differences."""
    estimate: float            # mean over warm starts of the mean per-task difference
    ci: tuple[float, float]    # the interval at `level` (see `interval`)
    p_value: float             # two-sided, see hierarchical_bootstrap
    se: float                  # the standard error the interval uses
    per_warm_start: tuple[float, ...]   # each warm start's mean difference (no resampling)
    n_tasks: tuple[int, ...]
    level: float
    n_boot: int
    interval: str = "cluster_t"   # "cluster_t" or "percentile", see hierarchical_bootstrap

    @property
    def ci_excludes_zero(self) -> bool:
        return self.ci[0] > 0 or self.ci[1] < 0

    @property
    def sign_holds(self) -> bool:
        """Every warm start's mean difference is nonzero and has the estimate's sign."""
        return sign_holds(self.per_warm_start)

    @property
    def claim(self) -> bool:
        """The study's claim rule for the primary comparison."""
        return self.ci_excludes_zero and self.sign_holds


def sign_holds(per_warm_start: Sequence[float], set_aside: Sequence[bool] = ()) -> bool:
    """True when every value is nonzero and all share one sign (a zero or a flip: False).
    `set_aside[i]` True leaves value i out of the rule (a ceiling tie, `CeilingTies`); with
    nothing left the sign does not hold."""
    v = np.asarray(per_warm_start, float)
    if len(set_aside):
        v = v[~np.asarray(set_aside, bool)]
    return bool(v.size) and (bool(np.all(v > 0)) or bool(np.all(v < 0)))


@dataclasses.dataclass(frozen=True)
class CeilingTies:
    """A sign rule that sets ceiling ties aside, registered by a protocol before its runs
    (configs/study.py `stats.max_ceiling_ties`). A warm start where both arms score the top
    on every task cannot show a difference either way, so it carries no sign: it is left out
    of the sign rule, at most `max_ties` of them (more: no claim), and it stays in the
    estimate and the CI as the zero it is. Any other zero still fails the rule."""
    at_ceiling: tuple[bool, ...]   # per warm start: both arms at the top on every task
    max_ties: int

    @property
    def count(self) -> int:
        return int(sum(self.at_ceiling))


def sign_rule(res: Bootstrap, ceiling: CeilingTies | None = None) -> tuple[bool, str]:
    """(whether the sign rule holds, why not): every warm start has the estimate's sign,
    or, with `ceiling`, every warm start not tied at the ceiling, with at most
    `ceiling.max_ties` such ties."""
    per = ", ".join(f"{v:+.2f}" for v in res.per_warm_start)
    if ceiling is None:
        return res.sign_holds, f"not every warm start has the sign of the estimate ({per})"
    if len(ceiling.at_ceiling) != len(res.per_warm_start):
        raise StatsError(f"{len(ceiling.at_ceiling)} ceiling flags for "
                         f"{len(res.per_warm_start)} warm starts")
    if ceiling.count > ceiling.max_ties:
        return False, (f"{ceiling.count} warm starts tie at the ceiling, more than the "
                       f"{ceiling.max_ties} the rule may set aside")
    if not sign_holds(res.per_warm_start, ceiling.at_ceiling):
        return False, ("not every warm start off the ceiling has the sign of the estimate "
                       f"({per})")
    return True, ""


INTERVALS = ("cluster_t", "percentile")


def hierarchical_bootstrap(diffs_by_warm_start: Mapping[str, np.ndarray] | Sequence[np.ndarray],
                           n_boot: int = 10000, seed: int = 0, level: float = 0.95,
                           interval: str = "cluster_t") -> Bootstrap:
    """CI and p-value of the mean over warm starts of the mean paired difference.

    `interval="percentile"`: each of `n_boot` resamples draws W warm starts with replacement
    from the W given, then, for every drawn warm start independently, its T_w per-task
    differences with replacement; the resampled statistic is the mean over the W draws of
    their task means. The CI is its equal-tailed percentile interval at `level` (numpy's
    linear quantiles), the p-value two-sided, p = min(1, 2 (1 + min(#{stat* <= 0},
    #{stat* >= 0})) / (n_boot + 1)): the smallest alpha at which that interval would reach 0
    (the +1 keeps it above 0 with finitely many resamples); `se` the resamples' sd.

    `interval="cluster_t"` (default; W >= 2): the warm-start means m_w give
    mean(m) +- t(W - 1) sd(m) / sqrt(W), p from the same t, se = sd(m) / sqrt(W): exact
    for normal means of one variance whatever the spread between warm starts, where the
    percentile interval, which learns that spread from W draws, is too narrow. Its floor is
    the task-noise interval: each warm start fixed, its tasks resampled `n_boot` times, the
    percentile interval of the mean over warm starts. The CI is the hull of the two, the
    p-value and se the larger of the two: warm starts that agree by chance (or are copies)
    leave the task noise in every mean, which a zero spread would hide.
    Deterministic given `seed`.
    """
    diffs = list(diffs_by_warm_start.values()) if isinstance(diffs_by_warm_start, Mapping) \
        else list(diffs_by_warm_start)
    diffs = [np.asarray(d, float).ravel() for d in diffs]
    if not diffs:
        raise StatsError("no warm starts")
    for i, d in enumerate(diffs):
        if d.size == 0:
            raise StatsError(f"warm start {i}: no tasks")
        if not np.all(np.isfinite(d)):
            raise StatsError(f"warm start {i}: a difference is not finite")
    if not 0 < level < 1:
        raise StatsError(f"level must be in (0, 1), got {level}")
    if n_boot < 1:
        raise StatsError(f"n_boot must be >= 1, got {n_boot}")
    if interval not in INTERVALS:
        raise StatsError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
    if interval == "cluster_t" and len(diffs) < 2:
        raise StatsError("the cluster_t interval needs at least 2 warm starts (it estimates "
                         "their spread), got 1; use interval='percentile' for one")
    rng = np.random.default_rng(seed)
    per = tuple(float(d.mean()) for d in diffs)
    alpha = 1 - level
    if interval == "cluster_t":
        (lo, hi), p, se = _cluster_t(np.array(per), level)
        # The floor: the interval from task noise alone (warm starts fixed, each one's tasks
        # resampled). The t interval estimates the warm starts' spread from W means; when
        # they happen to agree (or are copies) that estimate is near 0, but the warm-start
        # means still carry their tasks' noise.
        tasks_only = np.column_stack([_resampled_means(d, n_boot, rng) for d in diffs]).mean(1)
        t_lo, t_hi = np.quantile(tasks_only, [alpha / 2, 1 - alpha / 2])
        lo, hi = min(lo, float(t_lo)), max(hi, float(t_hi))
        p, se = max(p, _percentile_p(tasks_only)), max(se, float(np.std(tasks_only)))
    else:
        w = len(diffs)
        drawn = rng.integers(w, size=(n_boot, w))       # which warm start fills each slot
        means = np.empty((n_boot, w))
        for j, d in enumerate(diffs):
            slots = drawn == j
            means[slots] = _resampled_means(d, int(slots.sum()), rng)
        resampled = means.mean(axis=1)
        lo, hi = np.quantile(resampled, [alpha / 2, 1 - alpha / 2])
        p, se = _percentile_p(resampled), float(np.std(resampled))
    return Bootstrap(estimate=float(np.mean(per)), ci=(float(lo), float(hi)), p_value=p,
                     se=se, per_warm_start=per, n_tasks=tuple(d.size for d in diffs),
                     level=level, n_boot=n_boot, interval=interval)


def _percentile_p(resampled: np.ndarray) -> float:
    """The smallest alpha at which the equal-tailed percentile interval of `resampled`
    reaches 0 (two-sided; the +1 keeps it above 0 with finitely many resamples)."""
    tail = min(int(np.sum(resampled <= 0)), int(np.sum(resampled >= 0)))
    return min(1.0, 2 * (1 + tail) / (resampled.size + 1))


def _cluster_t(means: np.ndarray, level: float) -> tuple[tuple[float, float], float, float]:
    """CI, p-value and standard error of the mean of W warm-start means from Student's t on
    W - 1 degrees of freedom: se = sd(means) / sqrt(W). Exact when the means are normal with
    one variance (between-warm-start spread plus task noise, which 500 tasks make close to
    normal); the t quantile pays for estimating that variance from W values."""
    from scipy import stats as sps     # here: the percentile path needs only numpy

    w = means.size
    est = float(means.mean())
    se = float(means.std(ddof=1) / np.sqrt(w))
    if se == 0:     # identical means: the floor decides (see hierarchical_bootstrap)
        return (est, est), (1.0 if est == 0 else 0.0), 0.0
    q = float(sps.t.ppf(0.5 + level / 2, w - 1))
    p = float(2 * sps.t.sf(abs(est) / se, w - 1))
    return (est - q * se, est + q * se), p, se


def _resampled_means(d: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """m means of d resampled with replacement (len(d) draws each)."""
    t = d.size
    values, counts = np.unique(d, return_counts=True)
    if values.size <= _MAX_CATEGORIES:
        # The counts of each distinct value in a resample are Multinomial(t, counts / t).
        return rng.multinomial(t, counts / t, size=m) @ values / t
    out = np.empty(m)
    rows = max(1, _CHUNK_ELEMENTS // t)
    for s in range(0, m, rows):
        k = min(rows, m - s)
        out[s:s + k] = d[rng.integers(t, size=(k, t))].mean(axis=1)
    return out


def holm(p_values: Sequence[float]) -> np.ndarray:
    """Holm-Bonferroni step-down adjusted p-values, in the input order: with the m p-values
    sorted ascending, p_adj(i) = max over j <= i of min(1, (m - j + 1) p(j)) (1-based), so
    adjusted values are monotone in the raw ones and rejecting p_adj < alpha controls the
    family-wise error rate at alpha."""
    p = np.asarray(p_values, float)
    if p.ndim != 1 or np.any((p < 0) | (p > 1)) or np.any(np.isnan(p)):
        raise StatsError(f"p-values must be a list of numbers in [0, 1], got {p_values!r}")
    m = p.size
    order = np.argsort(p, kind="stable")
    stepped = np.minimum(1.0, (m - np.arange(m)) * p[order])
    adj = np.empty(m)
    adj[order] = np.maximum.accumulate(stepped)
    return adj


def outcome(res: Bootstrap, label: str, unit: str = "points", p_adjusted: float | None = None,
            ceiling: CeilingTies | None = None) -> str:
    """One sentence stating the result whatever it is. With `p_adjusted` (a secondary
    comparison) the rule is Holm-adjusted p < 1 - level and the sign in every warm start;
    without it the primary rule (:attr:`Bootstrap.claim`). With `ceiling`, the sign rule
    sets its ceiling ties aside (`sign_rule`)."""
    pct = f"{100 * res.level:.0f}%"
    ci = f"{pct} CI [{res.ci[0]:+.2f}, {res.ci[1]:+.2f}]"
    per = ", ".join(f"{v:+.2f}" for v in res.per_warm_start)
    p = f"p = {res.p_value:.4f}" + ("" if p_adjusted is None else f", Holm {p_adjusted:.4f}")
    facts = f"{label}: {res.estimate:+.2f} {unit} ({ci}, {p}; per warm start {per})"
    if ceiling is not None and ceiling.count:
        tied = ", ".join(f"{i}" for i, t in enumerate(ceiling.at_ceiling) if t)
        facts += (f"; tied at the ceiling, set aside from the sign rule: warm start"
                  f"{'s' if ceiling.count > 1 else ''} {tied} (of at most {ceiling.max_ties})")
    if p_adjusted is None:
        ok, why = res.ci_excludes_zero, f"CI [{res.ci[0]:+.2f}, {res.ci[1]:+.2f}] includes 0"
    else:
        ok = p_adjusted < 1 - res.level
        why = f"Holm-adjusted p {p_adjusted:.4f} >= {1 - res.level:.2f}"
    if not ok:
        return f"no claim: {why}. {facts}"
    holds, why = sign_rule(res, ceiling)
    if not holds:
        return f"no claim: {why}. {facts}"
    return f"claim ({'ahead' if res.estimate > 0 else 'behind'}): {facts}"


def primary_claim(res: Bootstrap, ceiling: CeilingTies | None = None) -> bool:
    """:attr:`Bootstrap.claim`, with the sign rule of `sign_rule(res, ceiling)`."""
    return res.ci_excludes_zero and sign_rule(res, ceiling)[0]


def secondary_claim(res: Bootstrap, p_adjusted: float, ceiling: CeilingTies | None = None
                    ) -> bool:
    return p_adjusted < 1 - res.level and sign_rule(res, ceiling)[0]


@dataclasses.dataclass(frozen=True)
class Row:
    """One comparison in a forest plot."""
    label: str
    estimate: float
    lo: float
    hi: float
    claim: bool


def rows_of(comparisons: dict) -> list[Row]:
    """Forest-plot rows of a :func:`compare` result: the primary, then the secondaries."""
    entries = ([("primary", comparisons["primary"])] if comparisons["primary"] else []) + \
        [("Holm", e) for e in comparisons["secondary"]]
    return [Row(f"{e['a']} - {e['b']} ({kind})", e["estimate"], e["ci"][0], e["ci"][1],
                e["claim"]) for kind, e in entries]


def forest_plot(rows: Sequence[Row], path: pathlib.Path, xlabel: str, title: str = "") -> None:
    """One row per comparison (top to bottom in the given order): the point estimate and its
    CI, a line at 0, claims drawn filled and marked "claim", the rest hollow."""
    # Imported here so that the data stage's users of this module do not load matplotlib.
    from matplotlib import figure

    fig = figure.Figure(figsize=(7, 1.2 + 0.45 * max(len(rows), 1)))
    ax = fig.subplots()
    ys = np.arange(len(rows))[::-1]
    for y, r in zip(ys, rows):
        color = "tab:blue" if r.claim else "tab:gray"
        ax.plot([r.lo, r.hi], [y, y], "-", color=color, lw=2)
        ax.plot([r.estimate], [y], "o", color=color, ms=7,
                markerfacecolor=color if r.claim else "white")
        if r.claim:
            ax.annotate("claim", (r.hi, y), xytext=(6, 0), textcoords="offset points",
                        va="center", fontsize=8, color=color)
    ax.axvline(0, color="black", lw=0.8, ls="--")
    ax.set_yticks(ys, [r.label for r in rows], fontsize=8)
    ax.set_ylim(-0.7, len(rows) - 0.3)
    ax.set_xlabel(xlabel)
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def compare(per_task: Mapping[str, Mapping[str, Mapping[str, float]]], focus: str,
            baseline: str, n_boot: int = 10000, seed: int = 0, level: float = 0.95,
            interval: str = "cluster_t") -> dict:
    """The study's comparisons from {warm start: {method: {task id: pass}}}.

    Primary: `focus` minus `baseline`, claimed by :attr:`Bootstrap.claim`. Secondary: `focus`
    minus every other method evaluated in every warm start, each claimed when its
    Holm-adjusted p (over the secondary family) is below 1 - level and the sign holds in
    every warm start. Methods missing from some warm start are listed in "skipped" with the
    warm starts that lack them. Every comparison resamples with the same seed (the same
    warm-start draws), which keeps the numbers reproducible one by one.
    """
    warm = list(per_task)
    everywhere = set.intersection(*(set(per_task[w]) for w in warm)) if warm else set()
    every = sorted(set().union(*(set(per_task[w]) for w in warm))) if warm else []
    skipped = {m: [w for w in warm if m not in per_task[w]] for m in every
               if m not in everywhere}

    def boot(other):
        d = paired_differences({w: per_task[w][focus] for w in warm},
                               {w: per_task[w][other] for w in warm}, (focus, other))
        return hierarchical_bootstrap(d, n_boot=n_boot, seed=seed, level=level,
                                      interval=interval)

    def entry(other, res, p_adj=None):
        e = {"a": focus, "b": other, "estimate": res.estimate, "ci": list(res.ci),
             "p_value": res.p_value, "per_warm_start": dict(zip(warm, res.per_warm_start)),
             "n_tasks": dict(zip(warm, res.n_tasks)), "sign_holds": res.sign_holds}
        if p_adj is None:
            e["claim"] = res.claim
        else:
            e["p_holm"] = float(p_adj)
            e["claim"] = secondary_claim(res, p_adj)
        e["outcome"] = outcome(res, f"{focus} - {other}", p_adjusted=p_adj)
        return e

    out = {"warm_starts": warm, "focus": focus, "baseline": baseline, "level": level,
           "interval": interval, "n_boot": n_boot, "seed": seed, "primary": None,
           "secondary": [],
           "skipped": skipped}
    if focus in everywhere and baseline in everywhere and focus != baseline:
        out["primary"] = entry(baseline, boot(baseline))
    others = [m for m in sorted(everywhere) if m not in (focus, baseline)]
    if focus in everywhere and others:
        results = [boot(m) for m in others]
        adj = holm([r.p_value for r in results])
        out["secondary"] = [entry(m, r, a) for m, r, a in zip(others, results, adj)]
    return out
