"""Rankers: hand-made cases with known answers, padding, and networkx cross-checks."""
import networkx as nx
import numpy as np
import pytest

from data_tools import rank

# Codes 0 and 1 agree on tests {0, 1}; code 2 passes only test 2.
SMALL = np.array([[1, 1, 0], [1, 1, 0], [0, 0, 1]], bool)
# Code 0 passes all 4 tests alone; codes 1..5 all pass exactly tests {0, 1}.
CROWD = np.array([[1, 1, 1, 1]] + [[1, 1, 0, 0]] * 5, bool)


@pytest.mark.parametrize("method", ["mutual", "codet", "pass_count"])
def test_small_case_all_rankers(method):
    res = rank.rank(SMALL, method=method)
    v = rank.classify(SMALL, res)
    assert v.top_code.tolist() == [0]  # tie between codes 0 and 1 -> lower index
    assert v.ground_truth.tolist() == [[True, True, False]]
    assert v.correct.tolist() == [[True, True, False]]
    assert v.incorrect.tolist() == [[False, False, True]]
    assert res.order.tolist() == [[0, 1, 2]] and res.ranks.tolist() == [[0, 1, 2]]


def test_small_case_scores():
    np.testing.assert_allclose(rank.codet(SMALL).code_scores, [[2 * np.sqrt(2), 2 * np.sqrt(2), 1.0]])
    np.testing.assert_array_equal(rank.pass_count(SMALL).code_scores, [[2, 2, 1]])
    # Converged mutual scores = HITS hubs: A A^T has Perron vector (1, 1, 0) / 2.
    res = rank.mutual_reinforcement(SMALL, max_iter=2000, patience=10**9, tol=1e-15)
    np.testing.assert_allclose(res.code_scores, [[0.5, 0.5, 0.0]], atol=1e-10)
    np.testing.assert_allclose(res.test_scores, [[0.5, 0.5, 0.0]], atol=1e-10)


def test_rankers_disagree_on_crowd():
    # CodeT: group {1..5} scores 2*sqrt(5)=4.47 > code 0's 4*1 -> the crowd's tests are truth,
    # and code 0 (passing a superset) is correct too.
    v = rank.classify(CROWD, rank.codet(CROWD))
    assert v.top_code.tolist() == [1]
    assert v.ground_truth.tolist() == [[True, True, False, False]]
    assert v.correct.all()
    # Pass counts: code 0 is top, its 4 tests are the truth, only code 0 is correct.
    v = rank.classify(CROWD, rank.pass_count(CROWD))
    assert v.top_code.tolist() == [0]
    assert v.correct.tolist() == [[True] + [False] * 5]
    # Mutual (limit): authorities solve [[12,2],[2,2]] -> hub of code 0 = 2.385 x, crowd = 2 x.
    res = rank.mutual_reinforcement(CROWD)
    assert res.order[0, 0] == 0
    assert rank.classify(CROWD, res).correct.tolist() == [[True] + [False] * 5]


def test_codet_tie_broken_by_pass_count():
    # Crowd of 4: 2*sqrt(4) = 4 ties code 0's 4*sqrt(1); code 0 passes more tests -> first.
    A = np.array([[1, 1, 1, 1]] + [[1, 1, 0, 0]] * 4, bool)
    res = rank.codet(A)
    assert res.code_scores[0, 0] == res.code_scores[0, 1] == 4.0
    assert res.order[0].tolist() == [0, 1, 2, 3, 4]


def test_all_correct_and_none_correct():
    ones = np.ones((4, 3), bool)
    zeros = np.zeros((4, 3), bool)
    for method in rank.RANKERS:
        v = rank.classify(ones, rank.rank(ones, method=method))
        assert v.correct.all() and not v.incorrect.any()
        res = rank.rank(zeros, method=method)
        v = rank.classify(zeros, res)
        # Nothing passes: empty ground truth is no evidence -> no code is correct.
        assert not v.correct.any() and v.incorrect.all() and v.top_code.tolist() == [0]
    # All-zero A: mutual scores stay uniform, and it stops after `patience` unchanged rankings.
    res = rank.mutual_reinforcement(zeros, patience=3)
    np.testing.assert_allclose(res.code_scores, 0.25, rtol=0, atol=1e-15)
    assert res.iterations.tolist() == [1]  # scores did not move at all: delta <= tol at once
    assert res.converged.all()
    # Plain HITS (d = 1) on an all-zero A keeps the previous (uniform) vector instead of 0/0.
    res = rank.mutual_reinforcement(zeros, damping=1.0)
    assert np.isfinite(res.code_scores).all()
    np.testing.assert_allclose(res.code_scores.sum(), 1.0)


def _random_problems(rng, n, max_c=10, max_t=10, density=0.5):
    mats = []
    for _ in range(n):
        c, t = rng.integers(1, max_c + 1), rng.integers(1, max_t + 1)
        mats.append(rng.random((c, t)) < density)
    return mats


@pytest.mark.parametrize("method", ["mutual", "codet", "pass_count"])
def test_batch_with_padding_equals_one_at_a_time(method):
    rng = np.random.default_rng(0)
    mats = _random_problems(rng, 40)
    A, cm, tm = rank.pad_batch(mats)
    batched = rank.rank(A, cm, tm, method=method)
    verdicts = rank.classify(A, batched, cm, tm)
    for b, m in enumerate(mats):
        c, t = m.shape
        single = rank.rank(m, method=method)
        # Same arithmetic per problem; only the einsum summation order over padding differs.
        np.testing.assert_allclose(batched.code_scores[b, :c], single.code_scores[0], rtol=1e-12, atol=1e-15)
        assert (batched.code_scores[b, c:] == 0).all() and (batched.test_scores[b, t:] == 0).all()
        assert batched.order[b, :c].tolist() == single.order[0].tolist()
        assert sorted(batched.order[b, c:].tolist()) == list(range(c, A.shape[1]))  # padding last
        assert batched.iterations[b] == single.iterations[0]
        v = rank.classify(m, single)
        assert verdicts.correct[b, :c].tolist() == v.correct[0].tolist()
        assert not verdicts.correct[b, c:].any() and not verdicts.incorrect[b, c:].any()
        assert not verdicts.ground_truth[b, t:].any()


def _bipartite(m):
    G = nx.DiGraph()
    codes = [("c", i) for i in range(m.shape[0])]
    tests = [("t", j) for j in range(m.shape[1])]
    G.add_nodes_from(codes + tests)
    G.add_edges_from((codes[i], tests[j]) for i, j in zip(*np.nonzero(m)))
    return G, codes, tests


def _connected_random(rng, c, t):
    while True:
        m = rng.random((c, t)) < 0.5
        G, _, _ = _bipartite(m)
        # Connected with every node touched: A A^T is primitive, its Perron vector unique.
        if nx.is_weakly_connected(G):
            return m


@pytest.mark.parametrize("damping", [0.5, 0.85, 1.0])
def test_limit_equals_networkx_hits(damping):
    """At a fixed point s_code ∝ A s_test and s_test ∝ A^T s_code for any damping, i.e. the
    HITS hubs/authorities of the code->test graph. Tolerance: 1e-8 absolute on scores summing
    to 1 (ARPACK's svds in networkx converges to ~1e-10 here)."""
    rng = np.random.default_rng(1)
    mats = [_connected_random(rng, rng.integers(2, 11), rng.integers(2, 11)) for _ in range(12)]
    A, cm, tm = rank.pad_batch(mats)
    res = rank.mutual_reinforcement(A, cm, tm, damping=damping, max_iter=20000, patience=10**9, tol=1e-15)
    for b, m in enumerate(mats):
        G, codes, tests = _bipartite(m)
        hubs, auths = nx.hits(G, max_iter=1000, tol=1e-12)
        np.testing.assert_allclose(res.code_scores[b, :m.shape[0]], [hubs[n] for n in codes], atol=1e-8)
        np.testing.assert_allclose(res.test_scores[b, :m.shape[1]], [auths[n] for n in tests], atol=1e-8)


def _reference_path(m, d, n_iter):
    """An independent scalar loop over networkx's biadjacency matrix: the damped path itself."""
    G, codes, tests = _bipartite(m)
    B = nx.bipartite.biadjacency_matrix(G.to_undirected(), row_order=codes, column_order=tests).toarray()
    sc = [1.0 / len(codes)] * len(codes)
    st = [1.0 / len(tests)] * len(tests)
    for _ in range(n_iter):
        sc = [(1 - d) * sc[i] + d * sum(B[i, j] * st[j] for j in range(len(tests))) for i in range(len(codes))]
        z = sum(sc)
        sc = [x / z for x in sc]
        st = [(1 - d) * st[j] + d * sum(B[i, j] * sc[i] for i in range(len(codes))) for j in range(len(tests))]
        z = sum(st)
        st = [x / z for x in st]
    return np.array(sc), np.array(st)


def test_damped_path_equals_scalar_reference():
    rng = np.random.default_rng(2)
    mats = _random_problems(rng, 8, density=0.6)
    mats = [m for m in mats if m.any()]
    A, cm, tm = rank.pad_batch(mats)
    for n_iter in (1, 2, 10):
        res = rank.mutual_reinforcement(A, cm, tm, max_iter=n_iter, patience=10**9, tol=0.0)
        assert (res.iterations == n_iter).all()
        for b, m in enumerate(mats):
            sc, st = _reference_path(m, 0.85, n_iter)
            np.testing.assert_allclose(res.code_scores[b, :m.shape[0]], sc, rtol=1e-12, atol=1e-15)
            np.testing.assert_allclose(res.test_scores[b, :m.shape[1]], st, rtol=1e-12, atol=1e-15)


def test_stopping_rule_is_per_problem():
    rng = np.random.default_rng(3)
    A, cm, tm = rank.pad_batch(_random_problems(rng, 50))
    res = rank.mutual_reinforcement(A, cm, tm, patience=3, max_iter=100)
    assert res.converged.all()
    assert (res.iterations >= 1).all() and (res.iterations <= 100).all()
    assert len(set(res.iterations.tolist())) > 1  # problems stop at different times
    # Early stopping approximates the limit: on this seed every ordering and every verdict
    # already equals the one after 2000 iterations; we allow 10% of orderings to differ.
    limit = rank.mutual_reinforcement(A, cm, tm, patience=10**9, tol=0.0, max_iter=2000)
    assert (limit.order == res.order).all(-1).mean() >= 0.9
    v_stop, v_limit = rank.classify(A, res, cm, tm), rank.classify(A, limit, cm, tm)
    assert (v_stop.correct == v_limit.correct).all()


def _cluster_against_lone(overlap):
    """Code 0 passes tests 0..6 alone; codes 1..3, three independent samples, all pass the
    same tests: {5, 6, 7, 8} (overlap 2 with code 0) or {7, 8, 9} (overlap 0)."""
    A = np.zeros((4, 10), bool)
    A[0, :7] = True
    A[1:4, [5, 6, 7, 8] if overlap else [7, 8, 9]] = True
    return A


@pytest.mark.parametrize("overlap", [2, 0])
def test_cluster_of_agreeing_codes_beats_lone_code_that_passes_more(overlap):
    """The case mutual reinforcement exists for. Three samples that agree on their tests are
    evidence for those tests; the lone code's extra tests are endorsed by nobody else. By
    hand, with x the hub score of a cluster code and y the lone code's (A A^T restricted to
    the symmetric vectors): overlap 2 gives [[3*4, 2], [3*2, 7]] = [[12, 2], [6, 7]], top
    eigenvalue (19 + sqrt(73)) / 2 = 13.77 and y / x = 1.77 / 2 = 0.885 < 1; overlap 0 gives
    two components with eigenvalues 3*3 = 9 (cluster) and 7 (lone), so y = 0. Either way the
    cluster is on top at the fixed point while pass counts (7 against 4 or 3) put code 0
    first. The damped path needs 4 (overlap 2) or 5 (overlap 0) iterations to overturn the
    pass-count order that iteration 1 produces, so a stop on "ranking unchanged for 3
    iterations" counted from the uniform start ended with the pass-count order."""
    A = _cluster_against_lone(overlap)
    mutual = rank.mutual_reinforcement(A)  # the defaults, as data_tools.build uses them
    counts = rank.pass_count(A)
    assert mutual.converged.all() and mutual.iterations[0] > 5
    assert counts.order[0, 0] == 0
    assert mutual.order[0, :3].tolist() == [1, 2, 3]
    s = mutual.code_scores[0]
    # y / x = (lambda - 12) / 2 from the first row of the reduced matrix.
    expected_ratio = ((19 + np.sqrt(73)) / 2 - 12) / 2 if overlap else 0.0
    np.testing.assert_allclose(s[0] / s[1], expected_ratio, atol=1e-6)
    v_mutual, v_counts = rank.classify(A, mutual), rank.classify(A, counts)
    assert v_mutual.correct.tolist() == [[False, True, True, True]]
    assert v_counts.correct.tolist() == [[True, False, False, False]]
    # The path really does hold the pass-count order for a while before it turns.
    first_turn = next(n for n in range(1, 50) if rank.mutual_reinforcement(
        A, max_iter=n, tol=0.0).order[0, 0] != 0)
    assert first_turn == (4 if overlap else 5)


def test_patience_counts_from_the_first_update():
    # CROWD's order (code 0 first) holds from iteration 1 to the limit and scores keep
    # moving (tol=0), so only patience stops it: after 1 + patience updates, never fewer.
    for patience in (1, 3):
        res = rank.mutual_reinforcement(CROWD, patience=patience, tol=0.0)
        assert res.iterations.tolist() == [1 + patience] and res.converged.all()


def test_converged_order_is_the_top_eigenvector_order_of_AAt():
    """Converged `mutual` ranks codes as the Perron vector of A A^T (numpy.linalg.eigh on the
    real block of each padded problem). Matrices whose top two eigenvalues are closer than a
    ratio of 0.9 are skipped: there the limit depends on the start and the path is slow (the
    module docstring). Pairs whose eigenvector entries differ by more than 1e-6 (entries sum
    to 1) must be in eigenvector order; tied entries (identical pass rows, or codes outside
    the top component, whose scores are still decaying at 1e-9) are not compared."""
    rng = np.random.default_rng(5)
    mats = []
    while len(mats) < 60:
        c, t = rng.integers(2, 11), rng.integers(2, 11)
        m = rng.random((c, t)) < rng.uniform(0.2, 0.8)
        w = np.linalg.eigvalsh(m @ m.T.astype(float))
        if w[-1] > 0 and (len(w) < 2 or w[-2] < 0.9 * w[-1]):
            mats.append(m)
    A, cm, tm = rank.pad_batch(mats)
    res = rank.mutual_reinforcement(A, cm, tm)
    assert res.converged.all()
    compared = 0
    for b, m in enumerate(mats):
        w, vecs = np.linalg.eigh(m @ m.T.astype(float))
        e = np.abs(vecs[:, -1])  # Perron vector, sign fixed
        e /= e.sum()
        np.testing.assert_allclose(res.code_scores[b, :len(e)], e, atol=1e-6)
        ranks = res.ranks[b]
        for i in range(len(e)):
            for j in range(len(e)):
                if e[i] > e[j] + 1e-6:
                    assert ranks[i] < ranks[j], (b, i, j, e)
                    compared += 1
        if np.sum(e > e.max() - 1e-6) == 1:
            assert res.order[b, 0] == np.argmax(e)
    assert compared > 500


def test_errors():
    with pytest.raises(ValueError, match="unknown ranker 'foo'"):
        rank.rank(SMALL, method="foo")
    with pytest.raises(ValueError, match="damping"):
        rank.mutual_reinforcement(SMALL, damping=0.0)
    with pytest.raises(ValueError, match="shape"):
        rank.rank(np.zeros(3))
