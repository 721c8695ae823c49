"""Rank sampled codes by their agreement with sampled tests (METHOD.md section 2, phase 2).

Every function works on a batch of problems at once: ``A`` is ``[B, C, T]`` (``A[b, i, j]``
true when code i of problem b passes test j), padded to the largest code count C and test
count T in the batch, with boolean masks ``code_mask [B, C]`` and ``test_mask [B, T]`` marking
the real entries. Padded entries never influence real ones and get score 0.

Rankers (selectable by name through :func:`rank`):

``mutual`` (default) -- the CodeDPO / Focused-DPO mutual-reinforcement iteration::

    s_code <- (1-d) * s_code + d * A @ s_test      then renormalise to sum 1
    s_test <- (1-d) * s_test + d * A.T @ s_code    then renormalise to sum 1 (uses the new s_code)

  [open] choices, documented here and in docs/data.md:
  * initial values: uniform, 1/k over the real codes and 1/k over the real tests;
  * normalisation: divide by the sum over the real entries. Since both terms are
    non-negative and ``(1-d) * s`` sums to ``1-d > 0``, the sum never vanishes for d < 1; with
    an all-zero A the scores simply stay uniform (every code tied). For d = 1 (plain HITS) a
    zero sum keeps the previous vector;
  * stopping rule: per problem, stop at a fixed point, when no score moved by more than
    ``tol`` (1e-9) in one iteration, or after ``max_iter`` (1000) iterations (then
    ``converged`` is False). Converged problems are frozen while the rest of the batch keeps
    iterating. An optional early stop, ``patience`` > 0 (default 0: off), ends a problem
    whose ranking has not changed for ``patience`` consecutive updates; it is counted from
    the first update, never against the initial order, because the uniform start is no
    ranking (its order is the pass-count tie-break, which iteration 1 reproduces, so an
    unchanged ranking there says nothing). Even so, an order can hold for several
    iterations and then turn (a cluster of agreeing codes overtaking a lone code that
    passes more tests typically needs 4 to 7), so early stopping approximates the limit.
  * Note: at a fixed point ``s_code ∝ A s_test`` and ``s_test ∝ A^T s_code`` whatever d is, so
    the converged scores are the HITS hub (codes) and authority (tests) vectors of the
    code->test graph, i.e. the top eigenvectors of ``A A^T`` and ``A^T A``; damping only
    slows the path (a "lazy" power iteration). The tests check this against ``networkx.hits``
    and ``numpy.linalg.eigh``. When the top two eigenvalues of ``A A^T`` nearly coincide the
    path converges very slowly and the limit depends on the start; ``max_iter`` bounds it.

``codet`` -- CodeT dual agreement: codes with identical pass sets (over the real tests) form a
  group; every code of a group scores ``#tests passed x sqrt(#codes in group)``.

``pass_count`` -- the number of tests passed.

Ordering and ties: codes are ordered by score (descending), scores compared after rounding to
12 decimals (codes with identical pass rows get identical scores anyway), then by pass count
(descending), then by sample index (ascending, so the earliest sample wins). The top code is
the first of this ordering.

Verdicts (:func:`classify`): the tests passed by the top code are the ground truth; a code is
correct when it passes all of them. When the top code passes no test at all, no code is
called correct (an empty ground truth is no evidence), so such problems yield no pairs.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import numpy as np

DEFAULT_DAMPING = 0.85
DEFAULT_MAX_ITER = 1000
DEFAULT_PATIENCE = 0  # off: stop at the fixed point (tol) or max_iter
DEFAULT_TOL = 1e-9
_TIE_DECIMALS = 12


@dataclasses.dataclass
class RankResult:
    code_scores: np.ndarray  # float64[B, C]; 0 on padded codes
    test_scores: np.ndarray  # float64[B, T]; 0 on padded tests
    order: np.ndarray  # int64[B, C]: code indices best first; padded codes last
    ranks: np.ndarray  # int64[B, C]: position of each code in `order` (0 = best)
    iterations: np.ndarray  # int64[B]: iterations run (0 for the closed-form rankers)
    converged: np.ndarray  # bool[B]


@dataclasses.dataclass
class Verdicts:
    top_code: np.ndarray  # int64[B]; -1 for a problem without real codes
    ground_truth: np.ndarray  # bool[B, T]: tests passed by the top code
    correct: np.ndarray  # bool[B, C]
    incorrect: np.ndarray  # bool[B, C]: real codes that are not correct


def _as_batch(A, code_mask, test_mask):
    A = np.asarray(A)
    if A.ndim == 2:
        A = A[None]
    if A.ndim != 3:
        raise ValueError(f"A must be [B, C, T] or [C, T], got shape {A.shape}")
    B, C, T = A.shape
    code_mask = np.ones((B, C), bool) if code_mask is None else np.asarray(code_mask, bool).reshape(B, C)
    test_mask = np.ones((B, T), bool) if test_mask is None else np.asarray(test_mask, bool).reshape(B, T)
    A = A.astype(bool) & code_mask[:, :, None] & test_mask[:, None, :]
    return A, code_mask, test_mask


def pad_batch(matrices: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Pads per-problem ``[k_codes, k_tests]`` pass matrices into ``(A, code_mask, test_mask)``."""
    if not matrices:
        return np.zeros((0, 0, 0), bool), np.zeros((0, 0), bool), np.zeros((0, 0), bool)
    shapes = [np.shape(m) for m in matrices]
    for i, s in enumerate(shapes):
        if len(s) != 2:
            raise ValueError(f"pass matrix {i} has shape {s}, expected [codes, tests]")
    C = max(s[0] for s in shapes)
    T = max(s[1] for s in shapes)
    A = np.zeros((len(matrices), C, T), bool)
    cm = np.zeros((len(matrices), C), bool)
    tm = np.zeros((len(matrices), T), bool)
    for b, (m, (c, t)) in enumerate(zip(matrices, shapes)):
        A[b, :c, :t] = m
        cm[b, :c] = True
        tm[b, :t] = True
    return A, cm, tm


def _order(scores, passed, code_mask):
    """Ordering described in the module docstring; returns (order, ranks)."""
    B, C = scores.shape
    key_score = np.where(code_mask, np.round(scores, _TIE_DECIMALS), -np.inf)
    index = np.broadcast_to(np.arange(C), (B, C))
    # np.lexsort: the last key is the primary one.
    order = np.lexsort((index, -passed, -key_score), axis=-1)
    ranks = np.empty_like(order)
    np.put_along_axis(ranks, order, np.broadcast_to(np.arange(C), (B, C)), axis=-1)
    return order, ranks


def _normalise(new, old, mask):
    total = new.sum(-1, keepdims=True)
    # A zero total only happens for d = 1 with nothing passed: keep the previous vector.
    safe = np.where(total > 0, total, 1.0)
    return np.where(total > 0, new / safe, old) * mask


def mutual_reinforcement(A, code_mask=None, test_mask=None, *, damping: float = DEFAULT_DAMPING,
                         max_iter: int = DEFAULT_MAX_ITER, patience: int = DEFAULT_PATIENCE,
                         tol: float = DEFAULT_TOL) -> RankResult:
    """The damped code-test score iteration; see the module docstring for every choice."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"damping must be in (0, 1], got {damping}")
    if max_iter < 1 or patience < 0:
        raise ValueError(f"need max_iter >= 1 and patience >= 0, got {max_iter}, {patience}")
    A, code_mask, test_mask = _as_batch(A, code_mask, test_mask)
    B, C, T = A.shape
    Af = A.astype(np.float64)
    passed = A.sum(-1)
    cmf, tmf = code_mask.astype(np.float64), test_mask.astype(np.float64)
    # Uniform start over the real entries (a problem with no codes/tests keeps zeros).
    s_code = cmf / np.maximum(cmf.sum(-1, keepdims=True), 1.0)
    s_test = tmf / np.maximum(tmf.sum(-1, keepdims=True), 1.0)
    # No order to compare with before the first update (module docstring, stopping rule).
    order = np.full((B, C), -1, np.int64)
    stable = np.zeros(B, np.int64)
    done = np.zeros(B, bool)
    iterations = np.zeros(B, np.int64)
    for _ in range(max_iter):
        act = np.flatnonzero(~done)
        if not act.size:
            break
        # Only the problems still running are updated (slow ones do not cost the batch).
        sc, st, Aa = s_code[act], s_test[act], Af[act]
        new_code = (1 - damping) * sc + damping * np.einsum("bct,bt->bc", Aa, st)
        new_code = _normalise(new_code, sc, cmf[act])
        new_test = (1 - damping) * st + damping * np.einsum("bct,bc->bt", Aa, new_code)
        new_test = _normalise(new_test, st, tmf[act])
        delta = np.maximum(np.abs(new_code - sc).max(-1, initial=0.0),
                           np.abs(new_test - st).max(-1, initial=0.0))
        s_code[act], s_test[act] = new_code, new_test
        iterations[act] += 1
        new_order, _ = _order(new_code, passed[act], code_mask[act])
        stable[act] = np.where((new_order == order[act]).all(-1), stable[act] + 1, 0)
        order[act] = new_order
        done[act] = (delta <= tol) | ((stable[act] >= patience) if patience else False)
    order, ranks = _order(s_code, passed, code_mask)
    return RankResult(s_code, s_test, order, ranks, iterations, done)


def codet(A, code_mask=None, test_mask=None) -> RankResult:
    """CodeT dual agreement: group score = #tests passed x sqrt(#codes in the group)."""
    A, code_mask, test_mask = _as_batch(A, code_mask, test_mask)
    B, C, T = A.shape
    passed = A.sum(-1)
    # same[b, i, j]: codes i and j are real and have identical pass rows over the real tests.
    same = (A[:, :, None, :] == A[:, None, :, :]).all(-1)
    same &= code_mask[:, :, None] & code_mask[:, None, :]
    group_size = same.sum(-1)
    scores = np.where(code_mask, passed * np.sqrt(group_size), 0.0)
    order, ranks = _order(scores, passed, code_mask)
    return RankResult(scores.astype(np.float64), A.sum(1).astype(np.float64), order, ranks,
                      np.zeros(B, np.int64), np.ones(B, bool))


def pass_count(A, code_mask=None, test_mask=None) -> RankResult:
    """Plain number of tests passed."""
    A, code_mask, test_mask = _as_batch(A, code_mask, test_mask)
    B = A.shape[0]
    passed = A.sum(-1)
    order, ranks = _order(passed.astype(np.float64), passed, code_mask)
    return RankResult(passed.astype(np.float64), A.sum(1).astype(np.float64), order, ranks,
                      np.zeros(B, np.int64), np.ones(B, bool))


RANKERS: dict[str, Callable[..., RankResult]] = {
    "mutual": mutual_reinforcement,
    "codet": codet,
    "pass_count": pass_count,
}


def rank(A, code_mask=None, test_mask=None, method: str = "mutual", **kwargs) -> RankResult:
    """Runs the ranker named ``method`` (one of :data:`RANKERS`)."""
    if method not in RANKERS:
        raise ValueError(f"unknown ranker {method!r}; choose one of {sorted(RANKERS)}")
    return RANKERS[method](A, code_mask, test_mask, **kwargs)


def classify(A, result: RankResult, code_mask=None, test_mask=None) -> Verdicts:
    """Ground truth = tests passed by the top code; correct = codes passing all of them."""
    A, code_mask, test_mask = _as_batch(A, code_mask, test_mask)
    B, C, T = A.shape
    has_code = code_mask.any(-1)
    top = np.where(has_code, result.order[:, 0] if C else -1, -1)
    gt = A[np.arange(B), np.maximum(top, 0)] & has_code[:, None] if C else np.zeros((B, T), bool)
    # A code is correct when it passes every ground-truth test: no gt test it fails.
    fails_gt = (gt[:, None, :] & ~A).any(-1)
    correct = code_mask & ~fails_gt & gt.any(-1, keepdims=True)
    incorrect = code_mask & ~correct
    return Verdicts(top.astype(np.int64), gt, correct, incorrect)
