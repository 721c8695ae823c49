"""Prefix/mid/suffix segmentation, line snapping, pair selection and its filters."""
import numpy as np
import pytest

from data_tools import segments as sg
from fdpo.records import Segment


@pytest.mark.parametrize("a, b, expected", [
    ([1, 2, 3, 4, 5], [1, 2, 9, 4, 5], (2, 2)),       # one substituted token
    ([1, 2, 3, 4], [1, 2, 3, 4], (4, 0)),             # identical: all prefix
    ([1, 2, 3], [1, 2, 3, 4], (3, 0)),                # rejected extends chosen: chosen mid empty
    ([1, 2, 7, 3], [1, 2, 3], (2, 1)),                # insertion: rejected mid empty
    ([5, 6], [7, 8], (0, 0)),                         # nothing in common
    ([], [1], (0, 0)),
    # A suffix that would overlap: "1 1" vs "1 1 1". LCP = 2; the naive common suffix is 2 too,
    # but only 3 - 2 = 1 token of the longer one and 0 of the shorter remain -> suffix 0.
    ([1, 1], [1, 1, 1], (2, 0)),
    ([1, 2, 1, 2], [1, 2, 1, 2, 1, 2], (4, 0)),
    ([3, 1, 2], [4, 1, 2, 1, 2], (0, 2)),
])
def test_common_prefix_suffix(a, b, expected):
    assert sg.common_prefix_suffix(a, b) == expected
    assert sg.common_prefix_suffix(b, a) == expected  # symmetric
    P, S = sg.pairwise_prefix_suffix([np.array(a, np.int64)], [np.array(b, np.int64)])
    assert (int(P[0, 0]), int(S[0, 0])) == expected


def test_pairwise_matches_scalar_on_random_sequences():
    rng = np.random.default_rng(0)
    base = rng.integers(0, 5, 30)
    seqs = []
    for _ in range(12):
        x = base.copy()
        i, j = sorted(rng.integers(0, 30, 2))
        x = np.concatenate([x[:i], rng.integers(0, 5, rng.integers(0, 6)), x[j:]])
        seqs.append(x)
    P, S = sg.pairwise_prefix_suffix(seqs[:5], seqs[5:])
    for a in range(5):
        for b in range(7):
            p, s = sg.common_prefix_suffix(seqs[a], seqs[5 + b])
            assert (P[a, b], S[a, b]) == (p, s)
            assert p + s <= min(len(seqs[a]), len(seqs[5 + b]))


def test_line_snapping():
    # Tokens; True marks a token whose text contains a newline.
    #            0    1    2    3    4    5    6    7
    chosen = [10, 11, 12, 13, 14, 15, 16, 17]
    nl_c = [False, True, False, False, True, False, False, True]
    rejected = [10, 11, 12, 99, 14, 15, 16, 17]
    nl_r = nl_c
    p, s = sg.common_prefix_suffix(chosen, rejected)
    assert (p, s) == (3, 4)
    # Prefix end 3 -> back to 2 (after token 1's newline); suffix start 4 -> 5 (after token 4).
    p2, s2 = sg.snap_to_lines(p, s, sg.line_boundaries(nl_c), sg.line_boundaries(nl_r))
    assert (p2, s2) == (2, 3)
    # The suffix start must be a boundary in BOTH sequences: here rejected's token 4 has no
    # newline and no later position before the end is a boundary in both, so the suffix
    # shrinks to the end-of-sequence boundary (empty).
    nl_r2 = [False, True, False, False, False, False, False, True]
    rej2 = [10, 11, 12, 99, 98, 15, 16, 17]
    p, s = sg.common_prefix_suffix(chosen, rej2)
    assert (p, s) == (3, 3)
    assert sg.snap_to_lines(p, s, sg.line_boundaries(nl_c), sg.line_boundaries(nl_r2)) == (2, 0)
    # No newline anywhere: prefix snaps to 0, suffix to the end (empty).
    flat = [False] * 8
    assert sg.snap_to_lines(3, 4, sg.line_boundaries(flat), sg.line_boundaries(flat)) == (0, 0)


def test_newline_flags_from_offsets():
    text = "a = 1\nb = 2\n"
    offsets = [(0, 1), (1, 5), (5, 6), (6, 7), (7, 12)]  # "a", " = 1", "\n", "b", " = 2\n"
    assert sg.newline_flags_from_offsets(text, offsets).tolist() == [False, False, True, False, True]
    with pytest.raises(ValueError, match="outside the text"):
        sg.newline_flags_from_offsets(text, [(0, 40)])


def test_segment_ids_layout():
    seg = sg.segment_ids(prompt_len=3, response_len=6, prefix_len=2, suffix_len=1, max_len=12)
    P, X, M, S, O = (int(v) for v in (Segment.PROMPT, Segment.PREFIX, Segment.MID, Segment.SUFFIX, Segment.PAD))
    assert seg.tolist() == [P] * 3 + [X] * 2 + [M] * 3 + [S] + [O] * 3
    assert seg.dtype == np.int8
    with pytest.raises(ValueError, match="exceed max_len"):
        sg.segment_ids(3, 10, 2, 1, 12)
    with pytest.raises(ValueError, match="inconsistent"):
        sg.segment_ids(3, 4, 3, 2, 12)
    # Instruct responses: lead and trail around the code span.
    seg = sg.segment_ids(prompt_len=2, response_len=9, prefix_len=2, suffix_len=1, max_len=12,
                         lead_len=2, trail_len=3)
    L, T = int(Segment.LEAD), int(Segment.TRAIL)
    assert seg.tolist() == [P] * 2 + [L] * 2 + [X] * 2 + [M] + [S] + [T] * 3 + [O]
    with pytest.raises(ValueError, match="inconsistent"):
        sg.segment_ids(2, 5, 2, 1, 12, lead_len=2, trail_len=1)


def _arr(*xs):
    return [np.array(x, np.int64) for x in xs]


def test_select_pairs_diff():
    # 4 codes ranked 0..3. Codes 0, 1 correct; 2, 3 incorrect.
    seqs = _arr([1, 2, 3, 4, 5, 6],     # 0: correct, best rank
                [1, 2, 3, 4, 5, 7],     # 1: correct
                [1, 2, 3, 9, 5, 6],     # 2: incorrect, close to code 0 (common 5/6)
                [8, 8, 8, 8, 8, 8])     # 3: incorrect, nothing in common
    ranks = [0, 1, 2, 3]
    correct = [True, True, False, False]
    sel = sg.select_pairs(seqs, ranks, correct, np.logical_not(correct), max_pairs=4)
    assert sel.drop_reason is None and sel.filtered == {}
    best = sel.pairs[0]
    # (0, 2): rank diff (2-0)/3 = 0.667, common 5/6 -> Diff 1.5; (0, 3): 1.0 + 0 -> 1.0;
    # (1, 2): 1/3 + 3/6 = 0.833; (1, 3): 2/3 + 0 = 0.667.
    assert (best.chosen, best.rejected, best.prefix_len, best.suffix_len) == (0, 2, 3, 2)
    assert best.diff == pytest.approx(2 / 3 + 5 / 6, abs=1e-12)
    assert [(p.chosen, p.rejected) for p in sel.pairs] == [(0, 2), (0, 3), (1, 2), (1, 3)]
    # lambda = 0: rank difference alone -> the best-vs-worst pair.
    sel = sg.select_pairs(seqs, ranks, correct, np.logical_not(correct), lam=0.0)
    assert [(p.chosen, p.rejected) for p in sel.pairs] == [(0, 3)]


def test_select_pairs_filters_and_reasons():
    seqs = _arr([1, 2, 3], [1, 2, 3], [1, 2, 3, 4])
    # All codes correct / none correct.
    assert sg.select_pairs(seqs, [0, 1, 2], [True] * 3, [False] * 3).drop_reason == sg.NO_INCORRECT
    assert sg.select_pairs(seqs, [0, 1, 2], [False] * 3, [True] * 3).drop_reason == sg.NO_CORRECT
    # Code 0 correct; code 1 identical to it; code 2 = code 0 + a token (chosen mid empty).
    sel = sg.select_pairs(seqs, [0, 1, 2], [True, False, False], [False, True, True])
    assert sel.pairs == []
    assert sel.filtered == {sg.IDENTICAL: 1, sg.EMPTY_CHOSEN_MID: 1}
    # Diff of (0, 1) = 1/2 + 1.0 = 1.5; of (0, 2) = 2/2 + 3/4 = 1.75: the highest-Diff
    # candidate is the empty-chosen-mid one, so the problem is dropped for that reason.
    assert sel.drop_reason == sg.EMPTY_CHOSEN_MID
    # One-sided empty mid on the REJECTED side is kept: chosen = rejected + an inserted token.
    seqs = _arr([1, 2, 7, 3], [1, 2, 3])
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True])
    (p,) = sel.pairs
    assert (p.prefix_len, p.suffix_len, p.chosen_mid_len, p.rejected_mid_len) == (2, 1, 1, 0)
    # Too long: the longer response must fit the room after the prompt.
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True], max_response_len=3)
    assert sel.pairs == [] and sel.drop_reason == sg.TOO_LONG and sel.filtered == {sg.TOO_LONG: 1}
    # Code spans of longer responses (prose around them): the whole responses must fit.
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True], max_response_len=5,
                          response_lens=[6, 4])
    assert sel.drop_reason == sg.TOO_LONG
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True], max_response_len=6,
                          response_lens=[6, 4])
    assert len(sel.pairs) == 1 and sel.pairs[0].chosen_len == 4  # segments over the code


def test_select_pairs_snap_lines_changes_common_length():
    seqs = _arr([10, 11, 12, 13, 14, 15], [10, 11, 99, 13, 14, 15])
    flags = [np.array([False, False, False, True, False, False])] * 2
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True])
    assert (sel.pairs[0].prefix_len, sel.pairs[0].suffix_len) == (2, 3)
    sel = sg.select_pairs(seqs, [0, 1], [True, False], [False, True], newline_flags=flags, snap_lines=True)
    assert (sel.pairs[0].prefix_len, sel.pairs[0].suffix_len) == (0, 2)
    assert sel.pairs[0].common_frac == pytest.approx(2 / 6)
    with pytest.raises(ValueError, match="newline_flags"):
        sg.select_pairs(seqs, [0, 1], [True, False], [False, True], snap_lines=True)
