"""Host-side checks of the in-sandbox oracle code (fdpo/evaluation/_cell.py) and of the
input encoding; the sandboxed end-to-end runs are in tests/fdpo/evaluation/test_benchmarks.py."""
import math

import pytest

from fdpo.evaluation import _cell
from fdpo.evaluation import tasks as tk


def test_encode_round_trip():
    value = [1, -2.5, float("inf"), float("-inf"), "a\n'\"", None, True, (1, (2, 3)), (),
             (7,), {1, 2}, set(), frozenset({"x"}), 1 + 2j, {(1, 2): [3], "k": {"n": 1}},
             [[], [[]]], 10 ** 30, -0.0]
    back = _cell.decode(tk.encode(value))
    assert back == value
    assert [type(x) for x in back] == [type(x) for x in value]
    assert type(back[7][1]) is tuple and type(back[14]) is dict
    nan = _cell.decode(tk.encode([float("nan")]))[0]
    assert math.isnan(nan)
    with pytest.raises(TypeError):
        tk.encode([object()])


def test_mbpp_inputs_restore_tuples_sets_complex():
    assert tk.mbpp_inputs("Mbpp/2", [[[1, 2], [3]]]) == [[(1, 2), (3,)]]
    assert tk.mbpp_inputs("Mbpp/115", [[[[1], []]]]) == [[[{1}, {}]]]  # EvalPlus's quirk
    assert tk.mbpp_inputs("Mbpp/252", [["1+2j"]]) == [[1 + 2j]]
    assert tk.mbpp_inputs("Mbpp/580", [[[1, [2, [3]]]]]) == [((1, (2, (3,))),)]
    assert tk.mbpp_inputs("Mbpp/3", [[1]]) == [[1]]


def ok(dataset, entry, inp, out, exp, atol=0.0):
    try:
        _cell.check_output(dataset, entry, inp, out, exp, atol)
        return True
    except AssertionError:
        return False


def test_find_zero_accepts_any_root():
    xs = [-6, 11, -6, 1]  # roots 1, 2, 3
    for root in (1.0, 2.0, 3.0, 2.0 + 1e-9):
        assert ok("humaneval", "find_zero", [xs], root, 1.0, atol=1e-4)
    assert not ok("humaneval", "find_zero", [xs], 1.5, 1.0, atol=1e-4)
    # only for HumanEval: another dataset's find_zero compares values
    assert not ok("mbpp", "find_zero", [xs], 2.0, 1.0, atol=0)


def test_mbpp_set_and_not_none_oracles():
    assert ok("mbpp", "similar_elements", [(3, 4, 5), (5, 4)], (5, 4), (4, 5))
    assert not ok("mbpp", "similar_elements", [(3, 4, 5), (5, 4)], (5,), (4, 5))
    assert not ok("humaneval", "similar_elements", [0], (5, 4), (4, 5))  # MBPP only
    # "not None" tasks: the expected value is the canonical output's `is not None`
    assert ok("mbpp", "text_match_three", ["abbb"], object(), True)
    assert ok("mbpp", "text_match_three", ["ac"], None, False)
    assert ok("mbpp", "text_match_three", ["ac"], False, False)
    assert not ok("mbpp", "text_match_three", ["ac"], "match", False)
    assert not ok("mbpp", "text_match_three", ["abbb"], False, True)


def test_mbpp_special_tasks():
    assert ok("mbpp", "are_equivalent", [36, 57], "anything", False)
    assert ok("mbpp", "sum_div", [8], 0, 7)
    assert not ok("mbpp", "sum_div", [8], 6, 7)
    alt = _cell.surface_area_slant(3, 4)
    assert ok("mbpp", "surface_Area", [3, 4], alt, 33, atol=1e-4)
    assert ok("mbpp", "digit_distance_nums", [123, 4], _cell.digit_distance_padded(123, 4), 0)


def test_floats_within_atol():
    assert ok("humaneval", "f", [1], 0.5 + 1e-9, 0.5)           # atol 0 -> 1e-6 for floats
    assert not ok("humaneval", "f", [1], 0.5 + 1e-3, 0.5)
    assert ok("mbpp", "f", [1], 2.00005, 2.0, atol=1e-4)
    assert ok("mbpp", "f", [1], [1.0, 2.0 + 1e-8], [1.0, 2.0])
    assert not ok("mbpp", "f", [1], (1.0, 2.0 + 1e-8), [1.0, 2.0])  # type must match
    assert not ok("mbpp", "f", [1], [1.0], [1.0, 2.0])
    assert not ok("mbpp", "f", [1], 3, 2)                          # ints compare exactly
    assert not ok("mbpp", "f", [1], float("nan"), float("nan"))    # as np.allclose
    # EvalPlus keeps the enforced 1e-6 for the rest of the split
    assert _cell.check_output("mbpp", "f", [1], 0.5, 0.5, 0) == 1e-6


def test_lcb_stdout_rule():
    assert _cell.stdout_matches("6\n", "6")
    assert _cell.stdout_matches("  0.50  2\n\n", "0.5 2.0\n")
    assert not _cell.stdout_matches("0.5 2.01", "0.5 2.0")
    assert not _cell.stdout_matches("1\n2", "1 2")
    assert not _cell.stdout_matches("yes", "YES")
