"""fdpo.stats: the hierarchical bootstrap against its closed-form variance and simulated
coverage (the percentile interval and the default cluster-t interval), the claim rule, Holm
against hand-computed values, paired inputs."""

from __future__ import annotations

import numpy as np
import pytest

from fdpo import stats


def simulate(rng, w, t, mu, tau, q=0.1):
    """One study: warm-start effects m_w ~ N(mu, tau^2); per task a paired greedy difference
    in {+1, -1, 0} with P(+1) = q + m_w / 2, P(-1) = q - m_w / 2 (so its mean is m_w, its
    variance about 2q). The true mean over warm starts is mu."""
    m = mu + tau * rng.standard_normal(w)
    assert np.all(np.abs(m) < 2 * q)
    return [rng.choice([1.0, -1.0, 0.0], p=[q + x / 2, q - x / 2, 1 - 2 * q], size=t) for x in m]


def two_level_se(diffs):
    """The resampled statistic's exact standard deviation: a slot draws warm start j with
    probability 1/W and then a task mean with variance s_j^2 / T_j (s_j^2 the 1/T variance),
    so Var(slot) = mean_j s_j^2 / T_j + mean_j (m_j - mbar)^2 and the statistic, a mean of W
    independent slots, has Var(slot) / W."""
    m = np.array([d.mean() for d in diffs])
    within = np.mean([d.var() / d.size for d in diffs])
    return np.sqrt((within + np.mean((m - m.mean()) ** 2)) / len(diffs))


@pytest.mark.parametrize("kind", ["few values", "continuous"])
def test_bootstrap_spread_matches_the_closed_form(kind):
    # Both resampling paths: multinomial counts of distinct values, and indices.
    rng = np.random.default_rng(3)
    if kind == "few values":
        diffs = simulate(rng, 4, 300, 0.02, 0.03)
    else:
        diffs = [rng.normal(loc, 1.0, size=n) for loc, n in ((0.1, 200), (-0.2, 300), (0.3, 250))]
    res = stats.hierarchical_bootstrap(diffs, n_boot=20000, seed=1, interval="percentile")
    # The sd of an sd estimated from 20,000 draws is ~0.5%: 3% is > 5 sigma.
    assert res.se == pytest.approx(two_level_se(diffs), rel=0.03)
    assert res.estimate == pytest.approx(np.mean([d.mean() for d in diffs]), abs=1e-12)
    assert res.per_warm_start == pytest.approx([d.mean() for d in diffs], abs=1e-12)
    assert res.ci[0] < res.estimate < res.ci[1]


def test_bootstrap_is_deterministic_and_accepts_a_mapping():
    rng = np.random.default_rng(0)
    diffs = simulate(rng, 3, 100, 0.03, 0.01)
    a = stats.hierarchical_bootstrap(dict(zip("abc", diffs)), n_boot=500, seed=7)
    b = stats.hierarchical_bootstrap(diffs, n_boot=500, seed=7)
    assert a == b


def coverage_and_claims(mu, tau, n_data, w=5, t=500, interval="percentile", n_boot=2000):
    rng = np.random.default_rng(2024)
    cover = claims = 0
    for i in range(n_data):
        res = stats.hierarchical_bootstrap(simulate(rng, w, t, mu, tau), n_boot=n_boot, seed=i,
                                           interval=interval)
        cover += res.ci[0] <= mu <= res.ci[1]
        claims += res.claim
    return cover / n_data, claims / n_data


# 400 simulated studies: the binomial sd of a 0.95 rate is sqrt(.95 * .05 / 400) = 0.011;
# tolerances are 3 sd (0.033).
N_DATA, TOL = 400, 3 * np.sqrt(0.95 * 0.05 / 400)


# The percentile interval (interval="percentile", the study's before 2026-12-07).
def test_coverage_is_nominal_when_warm_start_and_task_noise_are_alike():
    # tau = 0.02 equals one warm start's task standard error (sqrt(2 * 0.1 / 500) = 0.02).
    # In this regime the two errors of the two-level percentile bootstrap cancel: resampling
    # tasks inside resampled warm starts counts task noise about twice, while 5 warm starts
    # understate the between-warm-start spread (docs/analysis.md#statistics has the table).
    cover, _ = coverage_and_claims(mu=0.03, tau=0.02, n_data=N_DATA)
    assert abs(cover - 0.95) <= TOL, cover


def test_coverage_is_at_least_nominal_when_tasks_dominate():
    # Identical warm starts (tau = 0): the CI is conservative, never too narrow.
    cover, _ = coverage_and_claims(mu=0.03, tau=0.0, n_data=N_DATA)
    assert cover >= 0.95 - TOL, cover


def test_a_zero_effect_claims_at_most_at_the_nominal_rate():
    # A claim needs the CI to exclude 0 on one side and the sign in every warm start, so its
    # rate under no effect is at most the CI's miss rate, 0.05 (+ the binomial tolerance).
    _, claims = coverage_and_claims(mu=0.0, tau=0.02, n_data=N_DATA)
    assert claims <= 0.05 + TOL, claims


# The default cluster-t interval, where the percentile one fails: 3 warm starts whose effects
# spread by tau = 4 points, twice one warm start's task standard error (percentile: coverage
# 0.87, null claims 0.13; docs/analysis.md#statistics). The t part is closed-form, so few
# resamples (for the task-noise floor) suffice.
def test_cluster_t_covers_with_three_heterogeneous_warm_starts():
    cover, _ = coverage_and_claims(mu=0.03, tau=0.04, n_data=N_DATA, w=3,
                                   interval="cluster_t", n_boot=500)
    assert cover >= 0.95 - TOL, cover


def test_cluster_t_does_not_claim_a_zero_effect_with_heterogeneous_warm_starts():
    _, claims = coverage_and_claims(mu=0.0, tau=0.04, n_data=N_DATA, w=3,
                                    interval="cluster_t", n_boot=500)
    assert claims <= 0.05 + TOL, claims


def test_cluster_t_is_the_t_interval_of_the_warm_start_means():
    # Warm-start means 1, 2, 6 (spread far above the task noise): mean 3, sd sqrt(7), and
    # t(0.975, 2 df) = 4.3027 from a t table.
    diffs = [np.full(50, m) + np.tile([0.01, -0.01], 25) for m in (1.0, 2.0, 6.0)]
    res = stats.hierarchical_bootstrap(diffs, n_boot=500)
    half = 4.3027 * np.sqrt(7.0) / np.sqrt(3)
    assert res.interval == "cluster_t" and res.estimate == pytest.approx(3.0)
    assert res.ci == pytest.approx((3.0 - half, 3.0 + half), abs=2e-4)
    assert res.se == pytest.approx(np.sqrt(7.0 / 3))
    # p: P(|T_2| > 3 / se) with T_2's closed form P(|T_2| > x) = 1 - x / sqrt(2 + x^2).
    x = 3.0 / np.sqrt(7.0 / 3)
    assert res.p_value == pytest.approx(1 - x / np.sqrt(2 + x * x), rel=1e-6)


def test_cluster_t_is_never_narrower_than_the_task_noise():
    # Three copies of one warm start: their means agree exactly (sd 0), but each still has
    # its tasks' noise; the interval is then the task-only one, half-width about
    # 1.96 sqrt(s^2 / (T W)).
    d = np.array([1.0] * 25 + [-1.0] * 20 + [0.0] * 455)
    res = stats.hierarchical_bootstrap([d, d, d], n_boot=20000, seed=0)
    half = 1.96 * np.sqrt(d.var() / (d.size * 3))
    assert res.ci[0] == pytest.approx(d.mean() - half, abs=0.1 * half)
    assert res.ci[1] == pytest.approx(d.mean() + half, abs=0.1 * half)
    # +1 point against a half-width of 1.5 points: no claim (a zero-width t interval would).
    assert res.p_value > 0.05 and not res.ci_excludes_zero and not res.claim


def test_the_sign_rule_blocks_a_claim_the_ci_alone_would_make():
    rng = np.random.default_rng(5)
    strong = [simulate(rng, 1, 400, 0.15, 0.0, q=0.2)[0] for _ in range(4)]
    flipped = np.array([1.0] * 40 + [-1.0] * 48 + [0.0] * 312)     # mean -0.02
    res = stats.hierarchical_bootstrap(strong + [flipped], n_boot=4000, seed=0)
    assert res.ci_excludes_zero and res.ci[0] > 0
    assert res.per_warm_start[-1] == pytest.approx(-0.02)
    assert not res.sign_holds and not res.claim
    text = stats.outcome(res, "focused_dpo - dpo")
    assert text.startswith("no claim: not every warm start has the sign of the estimate (")
    agreed = stats.hierarchical_bootstrap(strong, n_boot=4000, seed=0)
    assert agreed.claim and stats.outcome(agreed, "x").startswith("claim (ahead): x: +")


def test_ceiling_ties_are_set_aside_from_the_sign_rule_and_nothing_else_is():
    """`CeilingTies`: a warm start flagged as both arms at the ceiling leaves the sign rule
    (at most max_ties of them); an unflagged zero or a flip still fails it; the tie stays in
    the estimate as a zero."""
    diffs = [np.full(40, 0.5) + np.r_[np.zeros(39), 1.0] * k for k in range(6)] + [np.zeros(40)]
    res = stats.hierarchical_bootstrap(diffs, n_boot=500, seed=0)
    assert res.per_warm_start[6] == 0 and res.estimate == pytest.approx(
        np.mean([d.mean() for d in diffs]))
    assert res.ci_excludes_zero and not res.claim  # the strict rule: a zero fails
    tie = stats.CeilingTies((False,) * 6 + (True,), max_ties=1)
    assert stats.sign_rule(res, tie) == (True, "") and stats.primary_claim(res, tie)
    text = stats.outcome(res, "a - b", ceiling=tie)
    assert text.startswith("claim (ahead): a - b: +") and "set aside from the sign rule: warm start 6 (of at most 1)" in text
    # The same zero not flagged (a tie below the ceiling) fails, as does one tie too many.
    unflagged = stats.CeilingTies((False,) * 7, max_ties=1)
    assert not stats.primary_claim(res, unflagged)
    assert "off the ceiling" in stats.outcome(res, "a - b", ceiling=unflagged)
    too_many = stats.CeilingTies((False,) * 6 + (True,), max_ties=0)
    assert not stats.primary_claim(res, too_many)
    assert "more than the 0" in stats.outcome(res, "a - b", ceiling=too_many)
    # A flip elsewhere still fails with the tie set aside.
    flipped = stats.hierarchical_bootstrap([*diffs[:5], -np.full(40, 0.01), diffs[6]],
                                           n_boot=500, seed=0)
    assert not stats.primary_claim(flipped, tie)
    assert not stats.secondary_claim(flipped, 0.001, tie) and stats.secondary_claim(res, 0.001, tie)
    with pytest.raises(stats.StatsError, match="3 ceiling flags for 7 warm starts"):
        stats.sign_rule(res, stats.CeilingTies((True, False, False), 1))
    assert stats.sign_holds([1.0, 0.0], set_aside=[False, True])
    assert not stats.sign_holds([0.0], set_aside=[True])  # nothing left: no sign


def test_sign_holds_needs_every_value_nonzero_and_of_one_sign():
    assert stats.sign_holds([0.5, 1.0, 2.0]) and stats.sign_holds([-0.1, -3.0])
    assert not stats.sign_holds([0.5, 0.0, 2.0])
    assert not stats.sign_holds([0.5, -0.1])
    assert not stats.sign_holds([])


def test_no_claim_sentence_names_the_interval():
    res = stats.hierarchical_bootstrap([np.array([1.0, -1.0, 0.0, 0.0])] * 3, n_boot=200)
    assert res.estimate == 0 and res.p_value == 1.0
    assert stats.outcome(res, "a - b").startswith(
        f"no claim: CI [{res.ci[0]:+.2f}, {res.ci[1]:+.2f}] includes 0. a - b: +0.00 points")


def test_holm_against_hand_computed_values():
    # m = 4, sorted 0.005, 0.01, 0.03, 0.04 -> x4, x3, x2, x1 = 0.02, 0.03, 0.06, 0.04;
    # the running maximum makes the last 0.06; back in input order:
    assert stats.holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # capped at 1, and monotone: 0.3 x 2 = 0.6 carries over 0.5 x 1
    assert stats.holm([0.5, 0.3]) == pytest.approx([0.6, 0.6])
    assert stats.holm([0.6, 0.9]) == pytest.approx([1.0, 1.0])
    assert stats.holm([0.2]) == pytest.approx([0.2])
    with pytest.raises(stats.StatsError, match="in \\[0, 1\\]"):
        stats.holm([0.1, 1.5])


def test_paired_differences_match_by_id_and_name_a_missing_task():
    a = {"ws0": {"t2": 1.0, "t1": 0.0}, "ws1": {"t1": 1.0, "t2": 1.0}}
    b = {"ws0": {"t1": 1.0, "t2": 1.0}, "ws1": {"t2": 0.0, "t1": 1.0}}
    d = stats.paired_differences(a, b)
    assert d["ws0"].tolist() == [-1.0, 0.0] and d["ws1"].tolist() == [0.0, 1.0]
    b["ws1"].pop("t2")
    with pytest.raises(stats.StatsError,
                       match="warm start 'ws1': task 't2' has a result for focused_dpo but "
                             "not for dpo"):
        stats.paired_differences(a, b, ("focused_dpo", "dpo"))
    with pytest.raises(stats.StatsError, match="warm start 'ws2' is in B only"):
        stats.paired_differences(a, {**b, "ws2": {}})


def test_bad_bootstrap_inputs_raise():
    with pytest.raises(stats.StatsError, match="no warm starts"):
        stats.hierarchical_bootstrap([])
    with pytest.raises(stats.StatsError, match="warm start 1: no tasks"):
        stats.hierarchical_bootstrap([np.ones(3), np.array([])])
    with pytest.raises(stats.StatsError, match="not finite"):
        stats.hierarchical_bootstrap([np.array([1.0, np.nan])])
    with pytest.raises(stats.StatsError, match="needs at least 2 warm starts"):
        stats.hierarchical_bootstrap([np.ones(3)])
    with pytest.raises(stats.StatsError, match="interval must be one of cluster_t, percentile"):
        stats.hierarchical_bootstrap([np.ones(3)] * 2, interval="bca")


def test_compare_primary_secondary_and_skipped():
    rng = np.random.default_rng(9)
    per_task = {}
    for w in ("ws0", "ws1", "ws2"):
        base = rng.integers(0, 2, size=300).astype(float)
        up = np.where(rng.random(300) < 0.3, 1.0, base)     # focus: more tasks pass
        per_task[w] = {"focused_dpo": dict(enumerate(up)), "dpo": dict(enumerate(base)),
                       "sft": dict(enumerate(base)), "rpo": dict(enumerate(up))}
    per_task["ws2"].pop("rpo")
    c = stats.compare(per_task, "focused_dpo", "dpo", n_boot=2000)
    assert c["primary"]["b"] == "dpo" and c["primary"]["claim"]
    assert c["primary"]["estimate"] == pytest.approx(
        np.mean([np.mean(list(per_task[w]["focused_dpo"].values()))
                 - np.mean(list(per_task[w]["dpo"].values())) for w in per_task]))
    assert [e["b"] for e in c["secondary"]] == ["sft"]
    assert c["secondary"][0]["p_holm"] == pytest.approx(c["secondary"][0]["p_value"])
    assert c["skipped"] == {"rpo": ["ws2"]}
    assert [r.label for r in stats.rows_of(c)] == ["focused_dpo - dpo (primary)",
                                                   "focused_dpo - sft (Holm)"]


def test_forest_plot_writes_a_png(tmp_path):
    stats.forest_plot([stats.Row("a - b", 1.0, 0.2, 1.8, True),
                       stats.Row("a - c", -0.3, -1.2, 0.5, False)], tmp_path / "f.png", "points")
    assert (tmp_path / "f.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
